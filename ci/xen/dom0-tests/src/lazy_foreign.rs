//! Lazy FOREIGN mapping on the real privcmd: one 1 GiB FOREIGN region over the domU's frames,
//! mapped eagerly (whole, when the region is added: what SET_MEM_TABLE costs) against lazily
//! (address space reserved; each 1 MiB bucket mapped the first time `RequestMemory` touches it).
//!
//! The memory: `ci/xen/domu/domu.cfg` gives the domU 1296 MiB of which its kernel uses the
//! first 128 MiB (`mem=128M`), so guest frames [`GPA`, `GPA` + `SIZE`) = [256 MiB, 1280 MiB) are
//! populated by Xen yet never used by the domU: dom0 reads and writes them freely. That is
//! checked, not assumed: the domU prints the RAM its kernel uses (`XVM-DOMU-RAM`, from
//! `/proc/iomem`) and none of it may lie in the range; the eager mapping of the whole range
//! must succeed with no per-frame error; every page sampled must read zero (Xen scrubs what it
//! gives a domain) before we write it.
//!
//! `domu/lazy-foreign/setup` and `domu/lazy-foreign/1gib` are correctness cases; the
//! `bench/lazy-foreign/*` rows (skipped with `--no-bench`) print `XVM-JSON` lines with
//! `"bench":"lazy-foreign"`, tabled by `ci/xen/results.py`. Speed is in interleaved rounds
//! (eager and lazy alternated, the order flipped each round): the median and min-max of the
//! per-round ratios, with exact device syscall counts (the `XenHandle` counters) beside them.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};
use xen_vhost_mem::backend::foreign::{BATCH_FRAMES, DEFAULT_BUCKET_FRAMES};
use xen_vhost_mem::device::CounterSnapshot;
use xen_vhost_mem::region::OnDemandAccess;
use xen_vhost_mem::{
    ForeignMapping, RegionDescriptor, RegionTable, RequestMemory, WireRegion, XenHandle,
    XenMmapFlags, XenRegion,
};

use crate::cases::open_dev;
use crate::domu;
use crate::stats::{list, median, min_max};
use crate::{CaseResult, Report};

/// First byte of the region: 256 MiB, above the domU kernel's 128 MiB.
pub const GPA: u64 = 256 << 20;
/// 1 GiB.
pub const SIZE: u64 = 1 << 30;
const PAGE: usize = 4096;
const PAGES: usize = (SIZE as usize) / PAGE;
/// `ForeignMapping::lazy()`'s bucket: 256 frames, 1 MiB.
const BUCKET_FRAMES: usize = DEFAULT_BUCKET_FRAMES;
const BUCKETS: usize = PAGES / BUCKET_FRAMES;
/// Interleaved rounds of region creation (under TCG an eager one maps the GiB in about 0.4 s
/// and unmaps it in about 1 s).
const CREATE_ROUNDS: usize = 5;
/// Interleaved rounds of warm requests.
const WARM_ROUNDS: usize = 7;

/// What `domu/lazy-foreign/setup` found.
struct Target {
    domid: u32,
    /// The domU's console log.
    console: String,
}

fn wire_desc(domid: u32) -> Result<RegionDescriptor, String> {
    let w = WireRegion {
        guest_phys_addr: GPA,
        memory_size: SIZE,
        userspace_addr: 0,
        mmap_offset: 0,
        xen_mmap_flags: XenMmapFlags::FOREIGN.bits(),
        xen_mmap_data: domid,
    };
    RegionDescriptor::from_wire(&w).map_err(|e| format!("from_wire({w:?}): {e}"))
}

/// What SET_MEM_TABLE builds for this one region: descriptor, region, table.
fn table(dev: &XenHandle, domid: u32, policy: ForeignMapping) -> Result<RegionTable, String> {
    let r = XenRegion::with_foreign_mapping(wire_desc(domid)?, None, Some(dev), policy)
        .map_err(|e| format!("{policy:?} region [{GPA:#x}, +{SIZE:#x}) of domid {domid}: {e}"))?;
    RegionTable::from_regions(vec![r]).map_err(|e| format!("RegionTable: {e}"))
}

fn snap(dev: &XenHandle) -> CounterSnapshot {
    dev.counters().snapshot()
}

/// Guest address of page `page` (0..PAGES) of the region.
fn page_addr(page: usize) -> GuestAddress {
    GuestAddress(GPA + (page * PAGE) as u64)
}

/// Page `i` of a spread sequence: an odd multiplier modulo a power of two is a permutation, so
/// consecutive `i` land on distinct pages all over the GiB.
fn spread(i: usize) -> usize {
    (i.wrapping_mul(0x9E37_79B1)) % PAGES
}

/// A page's worth of pattern `seed`.
fn pattern(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    (0..PAGE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `a-b` hex ranges, comma separated, as the domU's init prints them.
fn ranges(text: &str) -> Result<Vec<(u64, u64)>, String> {
    text.split(',')
        .map(|r| {
            let (a, b) = r.split_once('-').ok_or_else(|| format!("range {r:?}"))?;
            let hex = |s: &str| u64::from_str_radix(s, 16).map_err(|e| format!("{s:?}: {e}"));
            Ok((hex(a)?, hex(b)?))
        })
        .collect()
}

/// The domU's console log as text, without carriage returns.
fn console_text(console: &str) -> Result<String, String> {
    let log = std::fs::read(console).map_err(|e| format!("{console}: {e}"))?;
    Ok(String::from_utf8_lossy(&log).replace('\r', ""))
}

/// How long `setup` waits for a copy of the domU's RAM line that reads whole.
const RAM_LINE_WAIT: Duration = Duration::from_secs(30);

/// The first copy of the domU's `XVM-DOMU-RAM` line that reads whole, and its ranges. The
/// domU's read of `/proc/iomem` came out empty now and then (two CI runs failed on it); the domU
/// reads again when it does, prints the line twice at boot and once more after `domu-grant`
/// ends, and this waits for a later copy before giving up, then names every copy and any
/// `XVM-DOMU-IOMEM` line the domU printed.
fn ram_line(console: &str) -> Result<(String, Vec<(u64, u64)>), String> {
    // Whole: from `ram=` to the last field, `tries=` (a cut copy may still hold whole ranges).
    let parse = |line: &str| -> Result<Vec<(u64, u64)>, String> {
        if !line.split_whitespace().any(|f| f.starts_with("tries=")) {
            return Err(format!("no tries= (the last field) in {line:?}"));
        }
        let ram = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("ram="))
            .ok_or_else(|| format!("no ram= in {line:?}"))?;
        ranges(ram)
    };
    let t = Instant::now();
    loop {
        let log = console_text(console)?;
        let tagged = |tag: &str| -> Vec<String> {
            log.lines()
                .filter_map(|l| l.split_once(tag).map(|(_, r)| r.trim().to_string()))
                .collect()
        };
        let copies = tagged("XVM-DOMU-RAM ");
        if let Some(found) = copies
            .iter()
            .find_map(|l| parse(l).ok().map(|r| (l.clone(), r)))
        {
            return Ok(found);
        }
        if t.elapsed() > RAM_LINE_WAIT {
            let why = copies.first().map_or("no copy".to_string(), |l| {
                parse(l).err().unwrap_or_default()
            });
            return Err(format!(
                "no XVM-DOMU-RAM line reads whole after {} s: copies {copies:?} ({why}); \
                 XVM-DOMU-IOMEM {:?}",
                RAM_LINE_WAIT.as_secs(),
                tagged("XVM-DOMU-IOMEM ")
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The domU, and proof that its kernel uses none of the range.
fn setup() -> Result<(Target, String), String> {
    let (domid, console) = domu::domid_and_console()?;
    let (line, ram) = ram_line(&console)?;
    let end = GPA + SIZE - 1;
    if let Some((a, b)) = ram.iter().find(|&&(a, b)| a <= end && b >= GPA) {
        return Err(format!(
            "the domU's kernel uses RAM {a:#x}-{b:#x}, inside [{GPA:#x}, {end:#x}]: {line}"
        ));
    }
    let top = ram.iter().map(|&(_, b)| b).max().unwrap_or(0);
    let msg =
        format!("domid {domid}; the domU's kernel RAM ends at {top:#x} (below {GPA:#x}): {line}");
    Ok((Target { domid, console }, msg))
}

/// The domU's balloon driver, at boot and now (after our writes): the frames we mapped stayed
/// the domU's (a balloon that gave frames back would have made the eager mapping fail).
fn balloon(t: &Target) -> CaseResult {
    let log = console_text(&t.console)?;
    let field = |tag: &str| {
        log.lines()
            .find_map(|l| l.split_once(tag).map(|(_, r)| r.trim().to_string()))
    };
    let boot = field("XVM-DOMU-RAM ").ok_or("no XVM-DOMU-RAM line")?;
    let later =
        field("XVM-DOMU-BALLOON ").unwrap_or_else(|| "(no XVM-DOMU-BALLOON line yet)".into());
    let kb = |s: &str, k: &str| {
        s.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.parse::<u64>().ok())
    };
    // The balloon driver must not have been asked to grow into the frames we use.
    for s in [&boot, &later] {
        if let (Some(cur), Some(target)) =
            (kb(s, "balloon_current_kb="), kb(s, "balloon_target_kb="))
        {
            if cur != target {
                return Err(format!(
                    "balloon current {cur} kB != target {target} kB: {s}"
                ));
            }
        }
    }
    Ok(format!("at boot: {boot}; after domu-grant: {later}"))
}

/// The lazy region on the real privcmd against an eager one of the same range: syscalls, the
/// same bytes both ways, nothing left mapped.
fn one_gib(t: &Target) -> CaseResult {
    let dev = open_dev()?;
    let domid = t.domid;
    let mut out = Vec::new();

    // Creating the lazy region: no device call at all.
    let c = snap(&dev);
    let lazy = table(&dev, domid, ForeignMapping::lazy())?;
    let d = snap(&dev).since(&c);
    if d != CounterSnapshot::default() {
        return Err(format!("creating the lazy region made device calls: {d:?}"));
    }
    let region = lazy.regions().first().ok_or("empty table")?;
    if !region.is_lazy_foreign() || region.lazy_mapped_buckets() != 0 {
        return Err(format!(
            "lazy region: is_lazy_foreign {}, {} buckets mapped",
            region.is_lazy_foreign(),
            region.lazy_mapped_buckets()
        ));
    }
    // The plain table refuses it (only request-scoped memory maps its buckets).
    let refused = match lazy.read_obj::<u64>(GuestAddress(GPA)) {
        Ok(v) => return Err(format!("plain-table read of the lazy region gave {v:#x}")),
        Err(GuestMemoryError::IOError(io)) => {
            match io
                .get_ref()
                .and_then(|x| x.downcast_ref::<OnDemandAccess>())
            {
                Some(a) if a.gpa == GPA && u32::from(a.domid) == domid => a.to_string(),
                _ => return Err(format!("plain-table read: unexpected I/O error {io}")),
            }
        }
        Err(e) => {
            return Err(format!(
                "plain-table read: expected OnDemandAccess, got {e}"
            ))
        }
    };
    out.push(format!(
        "lazy region: 0 device syscalls; plain read refused: {refused}"
    ));

    // The eager region of the same range: every frame mapped, no per-frame error.
    let c = snap(&dev);
    let t0 = Instant::now();
    let eager = table(&dev, domid, ForeignMapping::Eager)?;
    let eager_ms = t0.elapsed().as_secs_f64() * 1e3;
    let d = snap(&dev).since(&c);
    let chunks = PAGES.div_ceil(BATCH_FRAMES) as u64;
    if (d.mmaps, d.ioctls, d.munmaps, d.errors, d.pages_mapped)
        != (chunks, chunks, 0, 0, PAGES as u64)
    {
        return Err(format!(
            "eager region: expected {chunks} privcmd mmaps + {chunks} MMAPBATCH, {PAGES} pages, 0 errors: {d:?}"
        ));
    }
    out.push(format!(
        "eager region: {PAGES} frames in {chunks} chunks, 0 per-frame errors ({eager_ms:.0} ms)"
    ));

    // One page per bucket, read through the eager region before anyone wrote it: zero.
    let sample = |b: usize, k: usize| b * BUCKET_FRAMES + (b * 37 + k) % BUCKET_FRAMES;
    let mut page = vec![0u8; PAGE];
    let mut nonzero = Vec::new();
    for b in 0..BUCKETS {
        for k in [0, 100, 200] {
            eager
                .read_slice(&mut page, page_addr(sample(b, k)))
                .map_err(|e| format!("eager read of page {:#x}: {e}", sample(b, k)))?;
            if page.iter().any(|&x| x != 0) {
                nonzero.push(sample(b, k));
            }
        }
    }
    if !nonzero.is_empty() {
        return Err(format!(
            "{} of {} sampled pages are not zero before our writes (the domU uses them?), e.g. page {:#x} (gpa {:#x})",
            nonzero.len(),
            3 * BUCKETS,
            nonzero[0],
            page_addr(nonzero[0]).0
        ));
    }

    // First touch of one bucket: exactly one privcmd mmap + one MMAPBATCH of 256 frames.
    let first = sample(BUCKETS / 2, 0);
    let a = pattern(1);
    let c = snap(&dev);
    let mem = RequestMemory::new(&lazy);
    mem.write_slice(&a, page_addr(first))
        .map_err(|e| format!("lazy write of page {first:#x}: {e}"))?;
    mem.finish().map_err(|e| format!("finish: {e}"))?;
    let d = snap(&dev).since(&c);
    let want = CounterSnapshot {
        mmaps: 1,
        ioctls: 1,
        pages_mapped: BUCKET_FRAMES as u64,
        live_mappings: 1,
        ..Default::default()
    };
    if d != want || region.lazy_mapped_buckets() != 1 {
        return Err(format!(
            "first touch: {d:?} and {} bucket(s) mapped; want {want:?} and 1",
            region.lazy_mapped_buckets()
        ));
    }
    eager
        .read_slice(&mut page, page_addr(first))
        .map_err(|e| format!("eager read: {e}"))?;
    if page != a {
        return Err(format!(
            "page {first:#x} written through the lazy region reads otherwise through the eager one"
        ));
    }
    out.push(format!(
        "first touch (4 KiB write at gpa {:#x}): 1 mmap + 1 MMAPBATCH of {BUCKET_FRAMES} frames, seen through the eager region",
        page_addr(first).0
    ));

    // Eager → lazy: a page of each bucket written through the eager region, read through the
    // lazy one, one request each (the rest of the buckets mapped on first touch).
    for b in 0..BUCKETS {
        eager
            .write_slice(&pattern(1000 + b as u64), page_addr(sample(b, 100)))
            .map_err(|e| format!("eager write: {e}"))?;
    }
    let c = snap(&dev);
    for b in 0..BUCKETS {
        let mem = RequestMemory::new(&lazy);
        mem.read_slice(&mut page, page_addr(sample(b, 100)))
            .map_err(|e| format!("lazy read of bucket {b}: {e}"))?;
        mem.finish().map_err(|e| format!("finish: {e}"))?;
        if page != pattern(1000 + b as u64) {
            return Err(format!(
                "bucket {b}: page {:#x} written through the eager region reads otherwise through the lazy one",
                sample(b, 100)
            ));
        }
    }
    let d = snap(&dev).since(&c);
    let n = BUCKETS as u64 - 1;
    if (d.mmaps, d.ioctls, d.munmaps, d.errors) != (n, n, 0, 0)
        || region.lazy_mapped_buckets() != BUCKETS
    {
        return Err(format!(
            "touching every bucket: {d:?}, {} buckets mapped; want {n} mmaps + {n} MMAPBATCH",
            region.lazy_mapped_buckets()
        ));
    }
    // Lazy → eager, warm: no device call.
    let c = snap(&dev);
    for b in 0..BUCKETS {
        let mem = RequestMemory::new(&lazy);
        mem.write_slice(&pattern(5000 + b as u64), page_addr(sample(b, 200)))
            .map_err(|e| format!("lazy write of bucket {b}: {e}"))?;
        mem.finish().map_err(|e| format!("finish: {e}"))?;
    }
    for b in 0..BUCKETS {
        eager
            .read_slice(&mut page, page_addr(sample(b, 200)))
            .map_err(|e| format!("eager read: {e}"))?;
        if page != pattern(5000 + b as u64) {
            return Err(format!(
                "bucket {b}: page {:#x} written through the lazy region reads otherwise through the eager one",
                sample(b, 200)
            ));
        }
    }
    // Across a bucket boundary: 8 KiB from the last page of one bucket into the next.
    let edge = BUCKETS / 3 * BUCKET_FRAMES - 1;
    let both: Vec<u8> = [pattern(7), pattern(8)].concat();
    eager
        .write_slice(&both, page_addr(edge))
        .map_err(|e| format!("eager write across buckets: {e}"))?;
    let mut got = vec![0u8; 2 * PAGE];
    let mem = RequestMemory::new(&lazy);
    mem.read_slice(&mut got, page_addr(edge))
        .map_err(|e| format!("lazy read across buckets: {e}"))?;
    mem.finish().map_err(|e| format!("finish: {e}"))?;
    if got != both {
        return Err(format!(
            "8 KiB across the bucket boundary at gpa {:#x} differ",
            page_addr(edge + 1).0
        ));
    }
    let d = snap(&dev).since(&c);
    if d.syscalls() != 0 || d.errors != 0 {
        return Err(format!("warm lazy requests made device calls: {d:?}"));
    }
    out.push(format!(
        "{BUCKETS} buckets: a page each written through the eager region read back through the lazy one \
         ({n} more first touches: {n} mmaps + {n} MMAPBATCH) and another the other way (0 syscalls), \
         8 KiB across a bucket boundary; {} sampled pages were zero before",
        3 * BUCKETS
    ));

    // Nothing stays mapped.
    let live = dev.counters().live_mappings();
    drop(lazy);
    let after_lazy = dev.counters().live_mappings();
    drop(eager);
    let after = snap(&dev);
    if live != chunks as i64 + BUCKETS as i64
        || after_lazy != chunks as i64
        || after.live_mappings != 0
        || after.mmaps != after.munmaps
        || after.errors != 0
    {
        return Err(format!(
            "live mappings: {live} with both (want {}), {after_lazy} after dropping the lazy region \
             (want {chunks}), {} after both (want 0); totals {after:?}",
            chunks as i64 + BUCKETS as i64,
            after.live_mappings
        ));
    }
    out.push(format!(
        "dropped: {live} mappings -> {after_lazy} -> 0 ({} mmaps, {} munmaps in all)",
        after.mmaps, after.munmaps
    ));
    Ok(out.join("; "))
}

/// A figure per round for each side.
#[derive(Default)]
struct Sides {
    eager: Vec<f64>,
    lazy: Vec<f64>,
}

impl Sides {
    /// Per round: lazy ÷ eager.
    fn ratios(&self) -> Vec<f64> {
        self.lazy
            .iter()
            .zip(&self.eager)
            .map(|(l, e)| l / e)
            .collect()
    }
}

/// Creation (and teardown) of the 1 GiB region, eager against lazy, interleaved.
fn bench_create(t: &Target) -> CaseResult {
    let dev = open_dev()?;
    let (mut create, mut teardown) = (Sides::default(), Sides::default());
    let (mut eager_sys, mut lazy_sys) = (None, None);
    let (mut eager_drop_sys, mut lazy_drop_sys) = (None, None);
    for round in 0..CREATE_ROUNDS {
        let order = if round % 2 == 0 {
            [ForeignMapping::Eager, ForeignMapping::lazy()]
        } else {
            [ForeignMapping::lazy(), ForeignMapping::Eager]
        };
        for policy in order {
            let c = snap(&dev);
            let t0 = Instant::now();
            let tbl = table(&dev, t.domid, policy)?;
            let made = t0.elapsed().as_secs_f64() * 1e3;
            let c1 = snap(&dev);
            let t0 = Instant::now();
            drop(tbl);
            let gone = t0.elapsed().as_secs_f64() * 1e3;
            let (d, dd) = (c1.since(&c), snap(&dev).since(&c1));
            if d.errors != 0 || dd.errors != 0 || dev.counters().live_mappings() != 0 {
                return Err(format!(
                    "{policy:?}: errors or mappings left: create {d:?}, drop {dd:?}"
                ));
            }
            let (side, drop_side, sys, drop_sys) = match policy {
                ForeignMapping::Eager => (
                    &mut create.eager,
                    &mut teardown.eager,
                    &mut eager_sys,
                    &mut eager_drop_sys,
                ),
                ForeignMapping::Lazy { .. } => (
                    &mut create.lazy,
                    &mut teardown.lazy,
                    &mut lazy_sys,
                    &mut lazy_drop_sys,
                ),
            };
            side.push(made);
            drop_side.push(gone);
            // Exact and the same every round.
            for (slot, n) in [(sys, d.syscalls()), (drop_sys, dd.syscalls())] {
                match *slot {
                    Some(m) if m != n => {
                        return Err(format!("{policy:?}: {m} then {n} syscalls in two rounds"))
                    }
                    _ => *slot = Some(n),
                }
            }
        }
    }
    let r = create.ratios();
    let (lo, hi) = min_max(&r);
    let (em, lm) = (median(&create.eager), median(&create.lazy));
    let (ed, ld) = (median(&teardown.eager), median(&teardown.lazy));
    let (es, ls) = (eager_sys.unwrap_or(0), lazy_sys.unwrap_or(0));
    let (eds, lds) = (eager_drop_sys.unwrap_or(0), lazy_drop_sys.unwrap_or(0));
    let goal = 1.0 / 50.0;
    let met = median(&r) <= goal;
    println!(
        "XVM-JSON {{\"bench\":\"lazy-foreign\",\"row\":\"create\",\"mib\":{},\"rounds\":{CREATE_ROUNDS},\
         \"eager_ms\":{em:.3},\"lazy_ms\":{lm:.4},\"eager_round_ms\":[{}],\"lazy_round_ms\":[{}],\
         \"round_ratios\":[{}],\"ratio_median\":{:.7},\"ratio_min\":{lo:.7},\"ratio_max\":{hi:.7},\
         \"eager_syscalls\":{es},\"lazy_syscalls\":{ls},\"eager_drop_ms\":{ed:.3},\"lazy_drop_ms\":{ld:.4},\
         \"eager_drop_syscalls\":{eds},\"lazy_drop_syscalls\":{lds},\"goal_ratio_max\":{goal},\"goal_met\":{met}}}",
        SIZE >> 20,
        list(&create.eager, 3),
        list(&create.lazy, 5),
        list(&r, 7),
        median(&r)
    );
    Ok(format!(
        "1 GiB FOREIGN region, {CREATE_ROUNDS} interleaved rounds: eager {em:.1} ms ({es} device syscalls), \
         lazy {lm:.3} ms ({ls}); lazy/eager median {:.6} ({lo:.6}-{hi:.6}), goal <= {goal} {}; \
         teardown eager {ed:.1} ms ({eds} syscalls), lazy {ld:.3} ms ({lds})",
        median(&r),
        if met { "met" } else { "NOT met" }
    ))
}

/// The first touch of every bucket of a fresh lazy region, one 8-byte read per request; then
/// warm requests over it against an eager region of the same range, interleaved.
fn bench_touch_and_warm(t: &Target, r: &mut Report) {
    let dev = match open_dev() {
        Ok(d) => d,
        Err(e) => {
            r.case("bench/lazy-foreign/first-touch", || Err(e));
            return;
        }
    };
    let mut tables = None;
    // Run even when `--only` leaves it out: the warm rows need its regions.
    r.force_case("bench/lazy-foreign/first-touch", || {
        let lazy = table(&dev, t.domid, ForeignMapping::lazy())?;
        let mut us = Vec::with_capacity(BUCKETS);
        let c = snap(&dev);
        let all = Instant::now();
        for b in 0..BUCKETS {
            // Every bucket once, in spread order (an odd multiplier modulo a power of two),
            // at a page of its own.
            let bucket = b.wrapping_mul(0x9E37_79B1) % BUCKETS;
            let at = page_addr(bucket * BUCKET_FRAMES + b % BUCKET_FRAMES);
            let mem = RequestMemory::new(&lazy);
            let c = snap(&dev);
            let t0 = Instant::now();
            let v: Result<u64, _> = mem.read_obj(at);
            let el = t0.elapsed();
            let d = snap(&dev).since(&c);
            v.map_err(|e| format!("first touch of bucket {bucket}: {e}"))?;
            mem.finish().map_err(|e| format!("finish: {e}"))?;
            if (d.mmaps, d.ioctls, d.errors) != (1, 1, 0) {
                return Err(format!(
                    "first touch of bucket {bucket}: {d:?}, want 1 mmap + 1 MMAPBATCH"
                ));
            }
            us.push(el.as_secs_f64() * 1e6);
        }
        let total_ms = all.elapsed().as_secs_f64() * 1e3;
        let d = snap(&dev).since(&c);
        let mapped = lazy
            .regions()
            .first()
            .map_or(0, |x| x.lazy_mapped_buckets());
        if mapped != BUCKETS {
            return Err(format!("{mapped} buckets mapped, want {BUCKETS}"));
        }
        let (lo, hi) = min_max(&us);
        let per = d.syscalls() as f64 / BUCKETS as f64;
        println!(
            "XVM-JSON {{\"bench\":\"lazy-foreign\",\"row\":\"first-touch\",\"buckets\":{BUCKETS},\
             \"bucket_kib\":{},\"us_median\":{:.1},\"us_min\":{lo:.1},\"us_max\":{hi:.1},\
             \"all_buckets_ms\":{total_ms:.1},\"syscalls_per_touch\":{per}}}",
            BUCKET_FRAMES * PAGE / 1024,
            median(&us)
        );
        let eager = table(&dev, t.domid, ForeignMapping::Eager)?;
        tables = Some((eager, lazy));
        Ok(format!(
            "{BUCKETS} buckets of 1 MiB, one 8-byte read each in its own request: median {:.0} us \
             ({lo:.0}-{hi:.0}), {per} syscalls (1 mmap + 1 MMAPBATCH) per bucket; all {BUCKETS} in {total_ms:.0} ms",
            median(&us)
        ))
    });
    let Some((eager, lazy)) = tables else { return };
    let mut buf = vec![0u8; PAGE];
    let wbuf = pattern(9);
    // A request: a scope, 4 KiB read at one spread page and 4 KiB written at the next.
    let mut req_4k = |tbl: &RegionTable, i: usize| -> Result<(), String> {
        let mem = RequestMemory::new(tbl);
        mem.read_slice(&mut buf, page_addr(spread(2 * i)))
            .map_err(|e| format!("read: {e}"))?;
        mem.write_slice(&wbuf, page_addr(spread(2 * i + 1)))
            .map_err(|e| format!("write: {e}"))?;
        mem.finish().map_err(|e| format!("finish: {e}"))
    };
    r.case("bench/lazy-foreign/warm-4k", || {
        warm(&dev, &eager, &lazy, "warm-4k", 16384, &mut req_4k)
    });
    // The same over a lazy region on a handle with a bound (every bucket fits: no eviction,
    // but each scope holds the buckets it touches and lets go at its end).
    r.case("bench/lazy-foreign/warm-4k-bounded", || {
        let bdev = open_dev()?;
        bdev.set_lazy_bucket_limit(BUCKETS)
            .map_err(|e| format!("bound: {e}"))?;
        let bounded = table(&bdev, t.domid, ForeignMapping::lazy())?;
        for b in 0..BUCKETS {
            let mem = RequestMemory::new(&bounded);
            let v: Result<u64, _> = mem.read_obj(page_addr(b * BUCKET_FRAMES));
            v.map_err(|e| format!("bounded: first touch of bucket {b}: {e}"))?;
            mem.finish().map_err(|e| format!("finish: {e}"))?;
        }
        let res = warm(
            &dev,
            &eager,
            &bounded,
            "warm-4k-bounded",
            16384,
            &mut req_4k,
        );
        let (mapped, evicted) = (bdev.lazy_buckets_mapped(), bdev.lazy_evictions());
        drop(bounded);
        let c = snap(&bdev);
        if mapped != BUCKETS || evicted != 0 || c.live_mappings != 0 || c.errors != 0 {
            return Err(format!(
                "bounded handle: {mapped} buckets mapped, {evicted} evicted, then {c:?}"
            ));
        }
        res
    });
    let mut sum = 0u64;
    let mut req_obj = |tbl: &RegionTable, i: usize| -> Result<(), String> {
        let mem = RequestMemory::new(tbl);
        let v: u64 = mem
            .read_obj(GuestAddress(page_addr(spread(i)).0 + (i % 512) as u64 * 8))
            .map_err(|e| format!("read_obj: {e}"))?;
        sum = sum.wrapping_add(v);
        mem.finish().map_err(|e| format!("finish: {e}"))
    };
    r.case("bench/lazy-foreign/warm-read-obj", || {
        warm(&dev, &eager, &lazy, "warm-read-obj", 32768, &mut req_obj)
    });
    // What part of that is the scope itself: one opened and finished without an access.
    let mut req_scope = |tbl: &RegionTable, _: usize| -> Result<(), String> {
        RequestMemory::new(tbl)
            .finish()
            .map_err(|e| format!("finish: {e}"))
    };
    r.case("bench/lazy-foreign/warm-scope-only", || {
        warm(
            &dev,
            &eager,
            &lazy,
            "warm-scope-only",
            32768,
            &mut req_scope,
        )
    });
    std::hint::black_box(sum);
    // Teardown with every bucket mapped (one measurement each, not interleaved).
    let c = snap(&dev);
    let t0 = Instant::now();
    drop(lazy);
    let lazy_ms = t0.elapsed().as_secs_f64() * 1e3;
    let c1 = snap(&dev);
    let t0 = Instant::now();
    drop(eager);
    let eager_ms = t0.elapsed().as_secs_f64() * 1e3;
    let (dl, de) = (c1.since(&c), snap(&dev).since(&c1));
    r.case("bench/lazy-foreign/released", || {
        let c = snap(&dev);
        if c.live_mappings != 0 || c.mmaps != c.munmaps || c.errors != 0 {
            return Err(format!("after dropping both regions: {c:?}"));
        }
        println!(
            "XVM-JSON {{\"bench\":\"lazy-foreign\",\"row\":\"teardown-touched\",\"eager_ms\":{eager_ms:.1},\
             \"lazy_ms\":{lazy_ms:.1},\"eager_syscalls\":{},\"lazy_syscalls\":{}}}",
            de.syscalls(),
            dl.syscalls()
        );
        Ok(format!(
            "both regions dropped: 0 live mappings ({} mmaps, {} munmaps, 0 errors in all); teardown \
             with every bucket mapped: lazy {lazy_ms:.0} ms ({} munmaps), eager {eager_ms:.0} ms ({})",
            c.mmaps,
            c.munmaps,
            dl.munmaps,
            de.munmaps
        ))
    });
}

/// Warm requests `req` over the eager and the (fully touched) lazy table, interleaved: each
/// round runs `requests` on each side at its own spread addresses.
fn warm(
    dev: &XenHandle,
    eager: &RegionTable,
    lazy: &RegionTable,
    row: &str,
    requests: usize,
    req: &mut dyn FnMut(&RegionTable, usize) -> Result<(), String>,
) -> CaseResult {
    let mut ns = Sides::default();
    // Warm-up: both sides' code paths and scope state.
    for i in 0..256 {
        req(eager, i)?;
        req(lazy, i)?;
    }
    let c = snap(dev);
    for round in 0..WARM_ROUNDS {
        let sides: [(bool, &RegionTable); 2] = if round % 2 == 0 {
            [(true, eager), (false, lazy)]
        } else {
            [(false, lazy), (true, eager)]
        };
        for (k, (is_eager, tbl)) in sides.into_iter().enumerate() {
            // Each side of each round at addresses of its own (no side reads pages the other
            // just brought into the host's caches).
            let base = (2 * round + k) * requests + 1024;
            let t0 = Instant::now();
            for i in 0..requests {
                req(tbl, base + i)?;
            }
            let el = t0.elapsed().as_nanos() as f64 / requests as f64;
            if is_eager {
                ns.eager.push(el);
            } else {
                ns.lazy.push(el);
            }
        }
    }
    let d = snap(dev).since(&c);
    if d.syscalls() != 0 || d.errors != 0 {
        return Err(format!("warm requests made device calls: {d:?}"));
    }
    let r = ns.ratios();
    let (lo, hi) = min_max(&r);
    let (e, l) = (median(&ns.eager), median(&ns.lazy));
    let goal = 1.1;
    let met = median(&r) <= goal;
    println!(
        "XVM-JSON {{\"bench\":\"lazy-foreign\",\"row\":\"{row}\",\"rounds\":{WARM_ROUNDS},\
         \"requests_per_round\":{requests},\"eager_requests_per_s\":{:.1},\"lazy_requests_per_s\":{:.1},\
         \"eager_ns_per_request\":{e:.1},\"lazy_ns_per_request\":{l:.1},\"round_ratios\":[{}],\
         \"ratio_median\":{:.4},\"ratio_min\":{lo:.4},\"ratio_max\":{hi:.4},\
         \"eager_syscalls_per_request\":0,\"lazy_syscalls_per_request\":0,\"goal_ratio_max\":{goal},\"goal_met\":{met}}}",
        1e9 / e,
        1e9 / l,
        list(&r, 4),
        median(&r)
    );
    Ok(format!(
        "{WARM_ROUNDS} interleaved rounds of {requests} requests per side: eager {:.0} req/s \
         ({e:.0} ns), lazy {:.0} req/s ({l:.0} ns); lazy time / eager time median {:.3} ({lo:.3}-{hi:.3}), \
         goal <= {goal} {}; 0 syscalls either side",
        1e9 / e,
        1e9 / l,
        median(&r),
        if met { "met" } else { "NOT met" }
    ))
}

/// The correctness cases, and with `bench` the benchmark rows.
pub fn run_all(r: &mut Report, bench: bool) {
    let names = [
        "domu/lazy-foreign/setup",
        "domu/lazy-foreign/1gib",
        "bench/lazy-foreign/create",
        "bench/lazy-foreign/set-mem-table",
        "bench/lazy-foreign/first-touch",
        "bench/lazy-foreign/warm-4k",
        "bench/lazy-foreign/warm-4k-bounded",
        "bench/lazy-foreign/warm-read-obj",
        "bench/lazy-foreign/warm-scope-only",
        "bench/lazy-foreign/released",
        "domu/lazy-foreign/balloon",
    ];
    if !domu::integrated() || !names.iter().any(|n| r.wants(n)) {
        return;
    }
    let started = Instant::now();
    let mut target = None;
    // Run even when `--only` leaves it out: every other case needs the domU.
    r.force_case("domu/lazy-foreign/setup", || {
        let (t, msg) = setup()?;
        target = Some(t);
        Ok(msg)
    });
    let Some(t) = target else { return };
    r.case("domu/lazy-foreign/1gib", || one_gib(&t));
    if bench {
        r.case("bench/lazy-foreign/create", || bench_create(&t));
        r.case("bench/lazy-foreign/set-mem-table", || {
            crate::set_mem_table::bench(t.domid)
        });
        if names[4..10].iter().any(|n| r.wants(n)) {
            bench_touch_and_warm(&t, r);
        }
    }
    r.case("domu/lazy-foreign/balloon", || balloon(&t));
    eprintln!("lazy-foreign: {:.1} s", started.elapsed().as_secs_f64());
}
