//! The block workload of `xen_vhost_bench` (`bench/`) on the real gntdev, over buffers
//! dom0 granted to itself through gntalloc: one `XVM-JSON` line per (strategy, batch) row.
//! Syscalls come from the `XenHandle` counters (exact); time is wall time under TCG.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xen_vhost_mem::device::real::RealXen;
use xen_vhost_mem::device::{CopySegment, DeviceError, GrantPage, Protection, XenDriver};

use xen_vhost_bench::{
    BenchRow, BlockBuffers, BlockWorkload, Mode, DRAIN_BATCH, HEADER_LEN, QUEUE_SIZE,
};
use xen_vhost_mem::{GrantMapping, RegionTable, XenHandle};

use crate::cases::{build_table, grant_region, on_demand_around, own_mappings};
use crate::guest::{GuestBuf, RealGuest};
use crate::stats::{list, median, min_max};
use crate::Report;

/// A guest on real Xen ready for [`BlockWorkload`], like `emulated_block_guest`: a ring region
/// mapped in advance and `requests` requests (header read-only with content, data and status
/// writable) in on-demand regions or, with `premapped`, in one region mapped in advance (the
/// ceiling; a region mapped in advance is mapped writable, so headers are granted writable).
fn real_block_guest(
    dev: &XenHandle,
    guest: &RealGuest,
    requests: usize,
    premapped: bool,
) -> Result<BlockGuest, String> {
    let ring_pages = BlockWorkload::ring_bytes(QUEUE_SIZE).div_ceil(4096) as usize;
    let ring = guest.grant(ring_pages, false)?;
    let mut bufs = Vec::with_capacity(requests);
    let mut data = Vec::with_capacity(requests);
    let mut descs = vec![grant_region(
        ring.gpa(0),
        ring_pages as u64 * 4096,
        GrantMapping::InAdvance,
        0x7000_0000,
    )];
    if premapped {
        let all = guest.grant(3 * requests, false)?;
        for i in 0..requests {
            guest.write(&all, 3 * i * 4096, &[0x11; HEADER_LEN as usize])?;
            bufs.push(BlockBuffers {
                header: all.gpa(3 * i * 4096),
                data: all.gpa((3 * i + 1) * 4096),
                status: all.gpa((3 * i + 2) * 4096),
            });
            data.push((all, (3 * i + 1) * 4096));
        }
        descs.push(grant_region(
            all.gpa(0),
            3 * requests as u64 * 4096,
            GrantMapping::InAdvance,
            0x8000_0000,
        ));
    } else {
        for _ in 0..requests {
            let h = guest.grant(1, true)?;
            guest.write(&h, 0, &[0x11; HEADER_LEN as usize])?;
            let d = guest.grant(1, false)?;
            let s = guest.grant(1, false)?;
            bufs.push(BlockBuffers {
                header: h.gpa(0),
                data: d.gpa(0),
                status: s.gpa(0),
            });
            data.push((d, 0));
        }
        descs.extend(on_demand_around(ring.first_ref, ring_pages as u32));
    }
    let table = build_table(dev, descs)?;
    Ok((table, ring.gpa(0), bufs, data))
}

/// The table, ring gpa, requests' buffers, and where each request's data page is in the
/// guest's view.
type BlockGuest = (RegionTable, u64, Vec<BlockBuffers>, Vec<(GuestBuf, usize)>);

/// Rounds per row of `device_share`; the best one counts.
const ROUNDS: usize = 5;
/// Rounds per row of the main table, each paired with a round of the vm-memory peer.
const PEER_ROUNDS: usize = 7;
/// Requests per peer round (a multiple of every batch; the peer serves ~900 requests/s
/// under TCG).
const PEER_REQUESTS: usize = 64;

/// The vm-memory peer (`/tests/vm-memory-peer serve`, its own process: vm-memory's `xen`
/// feature cannot share our build), one round of one row per request line.
struct Peer {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

/// One peer round: wall ns and exact syscalls (counted in the peer by interposition).
#[derive(Clone, Copy)]
struct PeerRound {
    ns: u64,
    syscalls: u64,
}

impl Peer {
    fn spawn() -> Result<Peer, String> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let exe = std::env::var("XVM_PEER").unwrap_or_else(|_| "/tests/vm-memory-peer".into());
        let mut child = Command::new(&exe)
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {exe} serve: {e}"))?;
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .map_err(|e| format!("peer: {e}"))?;
        if line.trim() != "READY" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("peer did not start: {:?}", line.trim()));
        }
        Ok(Peer {
            child,
            stdin,
            stdout,
        })
    }

    fn round(&mut self, batch: usize, requests: usize) -> Result<PeerRound, String> {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "{batch} {requests}").map_err(|e| format!("peer: {e}"))?;
        self.stdin.flush().map_err(|e| format!("peer: {e}"))?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .map_err(|e| format!("peer: {e}"))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["ROUND", ns, sys] => Ok(PeerRound {
                ns: ns.parse().map_err(|_| format!("peer: {line:?}"))?,
                syscalls: sys.parse().map_err(|_| format!("peer: {line:?}"))?,
            }),
            _ => Err(format!("peer: {:?}", line.trim())),
        }
    }

    /// Closes its stdin; the peer checks its guest pages hold the data and exits.
    fn finish(self) -> Result<(), String> {
        let Peer {
            mut child,
            stdin,
            stdout,
        } = self;
        drop(stdin);
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout.into_inner(), &mut rest);
        let st = child.wait().map_err(|e| format!("peer: {e}"))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("peer exited {st}: {}", rest.trim()))
        }
    }
}

/// Per round: the peer's ns per request over ours (ours' speed-up in that round).
fn ratios(row: &Row) -> Vec<f64> {
    row.round_ns
        .iter()
        .zip(&row.peer_rounds)
        .map(|(ours, p)| p.ns as f64 / PEER_REQUESTS as f64 / ours)
        .collect()
}

struct Row {
    label: &'static str,
    batch: usize,
    requests: usize,
    ns_per_request: f64,
    /// Of which inside device calls (kernel + hypervisor).
    device_ns_per_request: f64,
    syscalls_per_request: f64,
    /// Per round, ours: ns per request.
    round_ns: Vec<f64>,
    /// Per round, the peer's round next to ours (with a peer).
    peer_rounds: Vec<PeerRound>,
}

/// Requests per row: at least `min`, then until `budget` is spent or `max` is reached.
#[derive(Clone, Copy)]
struct Size {
    min: usize,
    max: usize,
    budget: Duration,
}

/// The real device with a clock around every call: how much of a request is spent in the
/// kernel and hypervisor, and how much in our code.
#[derive(Debug)]
struct Timed {
    inner: RealXen,
    ns: AtomicU64,
}

impl Timed {
    fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

impl XenDriver for Timed {
    fn grant_map_refs(&self, refs: &[GrantPage]) -> Result<u64, DeviceError> {
        self.time(|| self.inner.grant_map_refs(refs))
    }
    fn grant_mmap(
        &self,
        index: u64,
        pages: usize,
        prot: Protection,
    ) -> Result<NonNull<u8>, DeviceError> {
        self.time(|| self.inner.grant_mmap(index, pages, prot))
    }
    unsafe fn grant_munmap(&self, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError> {
        // SAFETY: forwarded contract.
        self.time(|| unsafe { self.inner.grant_munmap(addr, pages) })
    }
    fn grant_unmap_refs(&self, index: u64, pages: usize) -> Result<(), DeviceError> {
        self.time(|| self.inner.grant_unmap_refs(index, pages))
    }
    unsafe fn grant_copy(&self, segments: &mut [CopySegment]) -> Result<(), DeviceError> {
        // SAFETY: forwarded contract.
        self.time(|| unsafe { self.inner.grant_copy(segments) })
    }
    unsafe fn foreign_mmap_at(&self, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError> {
        // SAFETY: forwarded contract.
        self.time(|| unsafe { self.inner.foreign_mmap_at(addr, pages) })
    }
    unsafe fn foreign_map_batch(
        &self,
        domid: u16,
        addr: NonNull<u8>,
        gfns: &[u64],
        errs: &mut [i32],
    ) -> Result<(), DeviceError> {
        // SAFETY: forwarded contract.
        self.time(|| unsafe { self.inner.foreign_map_batch(domid, addr, gfns, errs) })
    }
    unsafe fn foreign_munmap(&self, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError> {
        // SAFETY: forwarded contract.
        self.time(|| unsafe { self.inner.foreign_munmap(addr, pages) })
    }

    unsafe fn foreign_unmap_to_reserve(
        &self,
        addr: NonNull<u8>,
        pages: usize,
    ) -> Result<(), DeviceError> {
        // SAFETY: forwarded contract.
        self.time(|| unsafe { self.inner.foreign_unmap_to_reserve(addr, pages) })
    }
}

/// One row in `rounds` rounds; `ns_per_request` is the best round's. With `peer`, each round
/// of ours is paired with a round of the peer at the same batch, in the order A B B A ...
/// (ours first in even rounds, the peer first in odd ones). With `timed`, every device call
/// is clocked too — which adds a clock read around each call, so timed rows are reported
/// apart from the main table.
fn measure(
    bench_row: BenchRow,
    batch: usize,
    size: Size,
    clock_calls: bool,
    rounds: usize,
    mut peer: Option<&mut Peer>,
) -> Result<(Row, String), String> {
    let real = || RealXen::open().map_err(|e| format!("RealXen::open: {e}"));
    let timed = Arc::new(Timed {
        inner: real()?,
        ns: AtomicU64::new(0),
    });
    let dev = if clock_calls {
        XenHandle::new(timed.clone())
    } else {
        XenHandle::new(Arc::new(real()?))
    };
    let guest = RealGuest::new()?;
    let BenchRow {
        label,
        mode,
        premapped,
    } = bench_row;
    let r = (|| {
        let (table, ring, bufs, data) = real_block_guest(&dev, &guest, DRAIN_BATCH, premapped)?;
        let mut w = BlockWorkload::new(&table, ring, QUEUE_SIZE, &bufs)
            .map_err(|e| format!("BlockWorkload::new: {e}"))?;
        for _ in 0..(64 / batch).max(2) {
            w.run_batch(mode, batch)
                .map_err(|e| format!("warm-up: {e}"))?;
        }
        let before = dev.counters().snapshot();
        let device_before = timed.ns.load(Ordering::Relaxed);
        let mut n = 0;
        let mut best = f64::INFINITY;
        let mut total_ns = 0.0;
        let mut round_ns = Vec::with_capacity(rounds);
        let mut peer_rounds = Vec::with_capacity(rounds);
        for round in 0..rounds {
            if let (Some(p), 1) = (peer.as_deref_mut(), round % 2) {
                peer_rounds.push(p.round(batch, PEER_REQUESTS)?);
            }
            let t = Instant::now();
            let mut k = 0;
            while k < size.min / rounds
                || (k < size.max / rounds && t.elapsed() < size.budget / rounds as u32)
            {
                w.run_batch(mode, batch).map_err(|e| format!("run: {e}"))?;
                k += batch;
            }
            let el = t.elapsed().as_nanos() as f64;
            best = best.min(el / k as f64);
            round_ns.push(el / k as f64);
            total_ns += el;
            n += k;
            if let (Some(p), 0) = (peer.as_deref_mut(), round % 2) {
                peer_rounds.push(p.round(batch, PEER_REQUESTS)?);
            }
        }
        let ns = best * n as f64;
        let device_ns = (timed.ns.load(Ordering::Relaxed) - device_before) as f64;
        let d = dev.counters().snapshot().since(&before);
        let own = own_mappings(&table);
        let live = dev.counters().live_mappings();
        if d.errors != 0 || live != own {
            return Err(format!(
                "{} errors, {live} live mappings (table's own {own})",
                d.errors
            ));
        }
        drop(table);
        if dev.counters().live_mappings() != 0 {
            return Err("mappings left after dropping the table".into());
        }
        // Every request was served for real: the guest sees the device's data.
        for (i, (b, off)) in data.iter().enumerate() {
            if guest.read(b, *off, 4096)?.iter().any(|&x| x != 0xd5) {
                return Err(format!("request {i}: data not written by the device"));
            }
        }
        Ok(Row {
            label,
            batch,
            requests: n,
            ns_per_request: ns / n as f64,
            // Scaled to the best round: the device's share of all rounds.
            device_ns_per_request: device_ns / total_ns * best,
            syscalls_per_request: d.syscalls() as f64 / n as f64,
            round_ns,
            peer_rounds,
        })
    })();
    let fin = guest.release_all();
    match (r, fin) {
        (Ok(row), Ok(f)) => Ok((row, f)),
        (Ok(_), Err(f)) => Err(format!("cleanup: {f}")),
        (Err(e), f) => Err(format!("{e}; cleanup: {f:?}")),
    }
}

pub fn run_all(report: &mut Report) {
    // Per round: at least 64 requests (slow rows), or ~150 ms (fast rows).
    let slow = Size {
        min: 64 * PEER_ROUNDS,
        max: 64 * PEER_ROUNDS,
        budget: Duration::from_millis(1000),
    };
    let fast = Size {
        min: 64 * PEER_ROUNDS,
        max: 5000 * PEER_ROUNDS,
        budget: Duration::from_millis(150 * PEER_ROUNDS as u64),
    };
    // The vm-memory peer, in rounds interleaved with ours (its whole run, with its syscall
    // checks and defect probes, comes later as its own test binary).
    let mut peer = None;
    report.case("bench/peer-interleaved-start", || {
        let p = Peer::spawn()?;
        peer = Some(p);
        Ok(format!(
            "vm-memory-peer serve: {PEER_ROUNDS} rounds of {PEER_REQUESTS} requests per row, interleaved with ours"
        ))
    });
    let mut rows: Vec<Row> = Vec::new();
    for batch in [1, 8, DRAIN_BATCH] {
        for bench_row in BenchRow::all() {
            let BenchRow {
                label,
                mode,
                premapped,
            } = bench_row;
            let name = format!("bench/{label}/batch-{batch}");
            if !report.wants(&name) {
                continue;
            }
            let size = if matches!(mode, Mode::PerAccess | Mode::Request) && !premapped {
                slow
            } else {
                fast
            };
            let mut out = None;
            report.case(&name, || {
                let (row, fin) =
                    measure(bench_row, batch, size, false, PEER_ROUNDS, peer.as_mut())?;
                let mut d = format!(
                    "{} requests, {:.3} syscalls/request, {:.0} ns/request (median of {} rounds)",
                    row.requests,
                    row.syscalls_per_request,
                    median(&row.round_ns),
                    row.round_ns.len()
                );
                if !row.peer_rounds.is_empty() {
                    let r = ratios(&row);
                    let (lo, hi) = min_max(&r);
                    d += &format!(
                        "; x{:.2} vs vm-memory (median of per-round ratios, {lo:.2}-{hi:.2})",
                        median(&r),
                    );
                }
                out = Some(row);
                Ok(format!("{d}; cleanup: {fin}"))
            });
            if let Some(row) = out {
                let mut peer_json = String::new();
                if !row.peer_rounds.is_empty() {
                    let r = ratios(&row);
                    let peer_ns: Vec<f64> = row
                        .peer_rounds
                        .iter()
                        .map(|p| p.ns as f64 / PEER_REQUESTS as f64)
                        .collect();
                    let peer_sys: u64 = row.peer_rounds.iter().map(|p| p.syscalls).sum();
                    let (lo, hi) = min_max(&r);
                    peer_json = format!(
                        ",\"rounds\":{},\"round_ratios\":[{}],\"ratio_median\":{:.3},\"ratio_min\":{lo:.3},\"ratio_max\":{hi:.3},\"peer_requests\":{},\"peer_requests_per_s\":{:.1},\"peer_syscalls_per_request\":{:?}",
                        r.len(),
                        list(&r, 3),
                        median(&r),
                        PEER_REQUESTS * row.peer_rounds.len(),
                        1e9 / median(&peer_ns),
                        peer_sys as f64 / (PEER_REQUESTS * row.peer_rounds.len()) as f64
                    );
                }
                println!(
                    "XVM-JSON {{\"bench\":\"block\",\"impl\":\"ours\",\"strategy\":\"{}\",\"batch\":{},\"requests\":{},\"requests_per_s\":{:.1},\"best_requests_per_s\":{:.1},\"syscalls_per_request\":{:?},\"ns_per_request\":{:.1}{peer_json}}}",
                    row.label,
                    row.batch,
                    row.requests,
                    1e9 / median(&row.round_ns),
                    1e9 / row.ns_per_request,
                    row.syscalls_per_request,
                    median(&row.round_ns)
                );
                rows.push(row);
            }
        }
    }
    if let Some(p) = peer {
        report.case("bench/peer-interleaved-finish", || {
            p.finish()?;
            Ok("the peer's guest pages hold the data it wrote; it exited 0".into())
        });
    }
    eprintln!("| strategy | batch | requests | syscalls/request | ns/request | vs per-access |");
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b.label == "per-access" && b.batch == r.batch)
            .map_or(f64::NAN, |b| b.ns_per_request);
        eprintln!(
            "| {} | {} | {} | {:.3} | {:.0} | {:.1}x |",
            r.label,
            r.batch,
            r.requests,
            r.syscalls_per_request,
            r.ns_per_request,
            base / r.ns_per_request
        );
    }
}

/// How much of a request is kernel + hypervisor (clocked device calls) for the grant-copy
/// strategies; reported apart because the clock reads themselves cost.
pub fn device_share(report: &mut Report) {
    let size = Size {
        min: 384,
        max: 6000,
        budget: Duration::from_millis(900),
    };
    for batch in [1, 8, DRAIN_BATCH] {
        let grant_copies = BenchRow::all()
            .filter(|r| matches!(r.mode, Mode::GrantCopy | Mode::Overwrite) && !r.premapped);
        for bench_row in grant_copies {
            let name = format!("bench/device-share/{}/batch-{batch}", bench_row.label);
            report.case(&name, || {
                let (row, fin) = measure(bench_row, batch, size, true, ROUNDS, None)?;
                println!(
                    "XVM-JSON {{\"bench\":\"device-share\",\"strategy\":\"{}\",\"batch\":{},\"ns_per_request\":{:.0},\"device_ns_per_request\":{:.0}}}",
                    row.label, batch, row.ns_per_request, row.device_ns_per_request
                );
                Ok(format!(
                    "{:.0} ns/request, of which {:.0} in device calls; cleanup: {fin}",
                    row.ns_per_request, row.device_ns_per_request
                ))
            });
        }
    }
}

/// What one grant-copy ioctl costs by segment count and size on the real driver: the numbers
/// behind the grant-copy strategy's choices (probe segments, copying in write-only buffers).
pub fn grant_copy_cost(report: &mut Report) {
    use xen_vhost_mem::device::{CopyDirection, CopySegment, GrantPage, GNTST_OKAY};
    report.case("bench/grant-copy-cost", || {
        let dev = crate::cases::open_dev()?;
        let guest = RealGuest::new()?;
        let buf = guest.grant(16, false)?;
        let mut local = vec![0u8; 16 * 4096];
        let mut out = Vec::new();
        for (segs, len) in [(1usize, 16u16), (2, 16), (4, 16), (8, 16), (16, 16), (1, 4096), (4, 4096)] {
            let base = local.as_mut_ptr();
            let mut v: Vec<CopySegment> = (0..segs)
                .map(|i| CopySegment {
                    grant: GrantPage {
                        domid: crate::guest::DOMID,
                        gref: buf.first_ref + i as u32,
                    },
                    offset: 0,
                    len,
                    // In bounds: i < 16 pages of `local`.
                    local: base.wrapping_add(i * 4096),
                    direction: CopyDirection::FromGuest,
                    status: GNTST_OKAY,
                })
                .collect();
            let rounds = 300;
            let t = Instant::now();
            for _ in 0..rounds {
                // SAFETY: every segment's local range is inside `local`, alive and unaliased.
                unsafe { dev.grant_copy(&mut v) }.map_err(|e| e.to_string())?;
            }
            let ns = t.elapsed().as_nanos() as f64 / rounds as f64;
            if v.iter().any(|s| s.status != GNTST_OKAY) {
                return Err(format!("status {:?}", v.iter().map(|s| s.status).collect::<Vec<_>>()));
            }
            println!("XVM-JSON {{\"bench\":\"grant-copy-cost\",\"segments\":{segs},\"len\":{len},\"ns_per_call\":{ns:.0}}}");
            out.push(format!("{segs}x{len}B: {ns:.0} ns"));
        }
        let fin = guest.release_all()?;
        Ok(format!("{}; cleanup: {fin}", out.join(", ")))
    });
}

/// Grant copy against mapping for one on-demand buffer the device writes whole, by size: where
/// mapping starts to win is `DEFAULT_MAP_THRESHOLD` (the Auto strategy's switch).
pub fn buffer_sweep(report: &mut Report) {
    use vm_memory::{Bytes, GuestAddress, Permissions};
    use xen_vhost_mem::{RequestMemory, Strategy};
    report.case("bench/buffer-sweep", || {
        let dev = XenHandle::new(Arc::new(
            RealXen::open().map_err(|e| format!("RealXen::open: {e}"))?,
        ));
        let guest = RealGuest::new()?;
        let r = (|| {
            let buf = guest.grant(256, false)?;
            let table = build_table(&dev, on_demand_around(0, 0))?;
            let mut out = Vec::new();
            for kib in [4usize, 16, 64, 256, 512, 1024] {
                let data = vec![0x3cu8; kib * 1024];
                let mut ns = [0f64; 2];
                for (i, strategy) in [Strategy::GrantCopy, Strategy::Map].into_iter().enumerate() {
                    let mut best = f64::INFINITY;
                    for _ in 0..3 {
                        let rounds = 8;
                        let t = Instant::now();
                        for _ in 0..rounds {
                            let mem = RequestMemory::with_strategy(&table, strategy);
                            let at = GuestAddress(buf.gpa(0));
                            mem.prefetch(&[(at, data.len(), Permissions::Write)])
                                .map_err(|e| e.to_string())?;
                            mem.write_slice(&data, at).map_err(|e| e.to_string())?;
                            mem.finish().map_err(|e| e.to_string())?;
                        }
                        best = best.min(t.elapsed().as_nanos() as f64 / rounds as f64);
                    }
                    ns[i] = best;
                }
                println!(
                    "XVM-JSON {{\"bench\":\"buffer\",\"kib\":{kib},\"grant_copy_ns\":{:.0},\"map_ns\":{:.0}}}",
                    ns[0], ns[1]
                );
                out.push(format!("{kib} KiB: copy {:.0} us, map {:.0} us", ns[0] / 1e3, ns[1] / 1e3));
            }
            if dev.counters().live_mappings() != 0 {
                return Err("mappings left".into());
            }
            Ok(out.join("; "))
        })();
        let fin = guest.release_all()?;
        r.map(|s| format!("{s}; cleanup: {fin}"))
    });
}
