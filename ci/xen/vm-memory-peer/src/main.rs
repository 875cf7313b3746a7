//! vm-memory-peer: the PEER of our benchmarks on real Xen, and probes of its
//! defects. Run in dom0 by `ci/xen/run`.
//!
//! vm-memory 0.18 with its `xen` feature (which changes vm-memory for the whole
//! build, hence this own cargo workspace) serves the block-like workload of
//! `src/block_workload.rs` in the main crate: pop a chain, read a 16-byte
//! header, write 4 KiB of data and a 1-byte status, add_used; queue size 256;
//! batches 1, 8 and 64. The "guest" is dom0 itself: gntalloc grants dom0's own
//! pages to domid 0, and vm-memory maps them back through gntdev, laid out as
//! xen-vhost-frontend sends them (DESIGN.md §2): the ring in a GRANT region
//! mapped in advance, the buffers in a GRANT|NO_ADVANCE_MAP region from the
//! first buffer's grant address up.
//!
//! Syscalls are counted, not assumed: this executable defines the C symbols
//! `ioctl`, `mmap` and `munmap`, which win over glibc's at link time for every
//! call made through the `libc` crate (vm-memory, vmm-sys-util, xen-sys); they
//! count in atomics and forward with `syscall(2)`. glibc's internal calls
//! (malloc) use hidden aliases and are not counted. The `syscall-counter` case
//! checks the override takes effect (4 per vm-memory access).
//!
//! Prints `XVM-TEST vm-memory-peer/<case> PASS|FAIL <details>` per case,
//! `XVM-JSON {...}` per bench row; exit status 1 if a case failed. Defect
//! probes PASS when the defect is confirmed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::panic::{self, AssertUnwindSafe};
use std::process::Command;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use libc::{c_int, c_long, c_ulong, c_void, off_t, size_t};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRange,
    MmapRegion, MmapXenFlags,
};

const BIN: &str = "vm-memory-peer";
const PG: usize = 4096;
const GRANT_BIT: u64 = 1 << 63;
const QUEUE_SIZE: u16 = 256;
const HEADER_LEN: u32 = 16;
const DATA_LEN: u32 = 4096;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Pre-granted requests, published round-robin (as many as the biggest batch).
const REQUESTS: usize = 64;
/// Requests measured per bench row (a multiple of every batch).
const MEASURED: usize = 640;
const BATCHES: [usize; 3] = [1, 8, 64];
const IOCTL_GNTDEV_MAP_GRANT_REF: c_ulong = 0x184700;

// ---------------------------------------------------------------------------
// Syscall counting: our definitions of ioctl/mmap/munmap win over glibc's.

static IOCTLS: AtomicU64 = AtomicU64::new(0);
static MMAPS: AtomicU64 = AtomicU64::new(0);
static MUNMAPS: AtomicU64 = AtomicU64::new(0);
/// The `index` of the last successful IOCTL_GNTDEV_MAP_GRANT_REF (to find a leaked map).
static LAST_MAP_INDEX: AtomicU64 = AtomicU64::new(u64::MAX);

/// `ioctl(2)`, counted. Non-variadic: every caller here passes one pointer
/// argument, and on x86-64 a variadic caller's registers match this signature.
///
/// # Safety
/// As `ioctl(2)`: `arg` must be what `req` expects.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    IOCTLS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: forwarded unchanged; the caller vouches for `arg`.
    let ret = unsafe { libc::syscall(libc::SYS_ioctl, fd as c_long, req, arg) } as c_int;
    if ret == 0 && req == IOCTL_GNTDEV_MAP_GRANT_REF && !arg.is_null() {
        // SAFETY: MAP_GRANT_REF's argument starts {u32 count; u32 pad; u64 index}.
        let index = unsafe { (arg as *const u64).add(1).read_unaligned() };
        LAST_MAP_INDEX.store(index, Ordering::Relaxed);
    }
    ret
}

/// `mmap(2)`, counted.
///
/// # Safety
/// As `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    MMAPS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: forwarded unchanged; -1 (MAP_FAILED) with errno set on failure.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mmap,
            addr,
            len,
            prot as c_long,
            flags as c_long,
            fd as c_long,
            off,
        )
    };
    ret as *mut c_void
}

/// `munmap(2)`, counted.
///
/// # Safety
/// As `munmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: size_t) -> c_int {
    MUNMAPS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: forwarded unchanged.
    unsafe { libc::syscall(libc::SYS_munmap, addr, len) as c_int }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    ioctl: u64,
    mmap: u64,
    munmap: u64,
}

impl Counts {
    fn now() -> Self {
        Counts {
            ioctl: IOCTLS.load(Ordering::Relaxed),
            mmap: MMAPS.load(Ordering::Relaxed),
            munmap: MUNMAPS.load(Ordering::Relaxed),
        }
    }
    fn since(self) -> Self {
        let n = Self::now();
        Counts {
            ioctl: n.ioctl - self.ioctl,
            mmap: n.mmap - self.mmap,
            munmap: n.munmap - self.munmap,
        }
    }
    fn total(self) -> u64 {
        self.ioctl + self.mmap + self.munmap
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} syscalls ({} ioctl, {} mmap, {} munmap)",
            self.total(),
            self.ioctl,
            self.mmap,
            self.munmap
        )
    }
}

// ---------------------------------------------------------------------------
// Reporting.

struct Report {
    failed: usize,
}

impl Report {
    fn case(&mut self, name: &str, pass: bool, detail: impl AsRef<str>) {
        if !pass {
            self.failed += 1;
        }
        let status = if pass { "PASS" } else { "FAIL" };
        println!("XVM-TEST {BIN}/{name} {status} {}", detail.as_ref());
        let _ = std::io::stdout().flush();
    }
}

type Res<T> = Result<T, String>;

fn grant_addr(r: u32, offset: u64) -> u64 {
    GRANT_BIT | (u64::from(r) << 12) | offset
}

// ---------------------------------------------------------------------------
// The guest side: dom0's own pages granted to domid 0 through gntalloc.

struct GrantedPage {
    gref: u32,
    /// gntalloc's view of the page (the guest's view).
    view: *mut u8,
}

struct Guest {
    gntalloc: xen_sys::Gntalloc,
    /// (gntalloc index, pages, view) of every allocation, released on drop.
    allocs: Vec<(u64, usize, *mut u8)>,
}

impl Guest {
    fn new() -> Res<Self> {
        let gntalloc = xen_sys::Gntalloc::open().map_err(|e| format!("open gntalloc: {e}"))?;
        Ok(Guest {
            gntalloc,
            allocs: Vec::new(),
        })
    }

    /// Grants `count` zeroed pages to domid 0 (one allocation) and maps them.
    fn grant(&mut self, count: usize, writable: bool) -> Res<Vec<GrantedPage>> {
        let (index, refs) = self
            .gntalloc
            .alloc_gref(0, count as u32, writable)
            .map_err(|e| format!("IOCTL_GNTALLOC_ALLOC_GREF({count}): {e}"))?;
        // SAFETY: a fresh shared mapping of the pages just allocated at `index`.
        let view = unsafe {
            libc::mmap(
                null_mut(),
                count * PG,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.gntalloc.as_raw_fd(),
                index as off_t,
            )
        };
        if view == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            let _ = self.gntalloc.dealloc_gref(index, count as u32);
            return Err(format!("mmap gntalloc index {index:#x}: {e}"));
        }
        let view = view as *mut u8;
        self.allocs.push((index, count, view));
        Ok(refs
            .into_iter()
            .enumerate()
            // SAFETY: page i of the `count`-page mapping.
            .map(|(i, gref)| GrantedPage {
                gref,
                view: unsafe { view.add(i * PG) },
            })
            .collect())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        for &(index, count, view) in &self.allocs {
            // SAFETY: our own mapping of `count` pages; nothing borrows it any more.
            unsafe { libc::munmap(view as *mut c_void, count * PG) };
            let _ = self.gntalloc.dealloc_gref(index, count as u32);
        }
    }
}

fn peek(p: &GrantedPage, off: usize, n: usize) -> Vec<u8> {
    // SAFETY: `off + n <= PG` in every caller; the view is mapped for the guest's life.
    unsafe { std::slice::from_raw_parts(p.view.add(off), n).to_vec() }
}

fn poke(p: &GrantedPage, off: usize, bytes: &[u8]) {
    assert!(off + bytes.len() <= PG);
    // SAFETY: in bounds of the page, mapped writable by gntalloc.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.view.add(off), bytes.len()) };
}

// ---------------------------------------------------------------------------
// vm-memory with Xen regions.

fn gntdev() -> Res<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/xen/gntdev")
        .map_err(|e| format!("open /dev/xen/gntdev: {e}"))
}

/// A GRANT region (flags 0x2, or 0x2|0x8 with `on_demand`) at `gpa`, domid 0.
fn grant_region(gntdev: &File, gpa: u64, size: usize, on_demand: bool) -> Res<GuestRegionMmap> {
    let mut flags = MmapXenFlags::GRANT;
    if on_demand {
        flags |= MmapXenFlags::NO_ADVANCE_MAP;
    }
    let fd = gntdev.try_clone().map_err(|e| format!("dup gntdev: {e}"))?;
    let range = MmapRange::new(
        size,
        Some(FileOffset::new(fd, 0)),
        GuestAddress(gpa),
        flags.bits(),
        0,
    );
    let region = MmapRegion::<()>::from_range(range).map_err(|e| {
        format!(
            "MmapRegion::from_range(gpa {gpa:#x}, size {size:#x}, flags {:#x}): {e}",
            flags.bits()
        )
    })?;
    GuestRegionMmap::new(region, GuestAddress(gpa))
        .ok_or_else(|| format!("GuestRegionMmap::new({gpa:#x})"))
}

// ---------------------------------------------------------------------------
// The block workload (as src/block_workload.rs), on vm-memory's memory.

#[derive(Clone, Copy)]
struct BlockBuffers {
    header: u64,
    data: u64,
    status: u64,
}

fn ring_bytes(size: u16) -> u64 {
    let s = u64::from(size);
    let used = (16 * s + 6 + 2 * s).next_multiple_of(4);
    used + 6 + 8 * s
}

struct BlockWorkload<'m> {
    mem: &'m GuestMemoryMmap,
    queue: Queue,
    avail: GuestAddress,
    requests: usize,
    next: usize,
    avail_idx: u16,
}

impl<'m> BlockWorkload<'m> {
    fn new(mem: &'m GuestMemoryMmap, ring_gpa: u64, requests: &[BlockBuffers]) -> Res<Self> {
        let size = QUEUE_SIZE;
        assert!(requests.len() * 3 <= usize::from(size));
        let desc = GuestAddress(ring_gpa);
        let avail = GuestAddress(ring_gpa + 16 * u64::from(size));
        let used = GuestAddress((avail.0 + 6 + 2 * u64::from(size)).next_multiple_of(4));
        let e = |e: vm_memory::GuestMemoryError| format!("ring write: {e}");
        for (i, r) in requests.iter().enumerate() {
            let head = (3 * i) as u16;
            let descs = [
                (r.header, HEADER_LEN, F_NEXT),
                (r.data, DATA_LEN, F_NEXT | F_WRITE),
                (r.status, 1, F_WRITE),
            ];
            for (j, (addr, len, flags)) in descs.into_iter().enumerate() {
                let next = if flags & F_NEXT != 0 {
                    head + j as u16 + 1
                } else {
                    0
                };
                let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
                mem.write_obj(d, desc.unchecked_add(16 * u64::from(head + j as u16)))
                    .map_err(e)?;
            }
        }
        mem.write_obj(0u16, avail).map_err(e)?;
        mem.write_obj(0u16, avail.unchecked_add(2)).map_err(e)?;
        mem.write_obj(0u32, used).map_err(e)?;
        let qe = |e: virtio_queue::Error| format!("queue setup: {e}");
        let mut queue = Queue::new(size).map_err(qe)?;
        queue.try_set_desc_table_address(desc).map_err(qe)?;
        queue.try_set_avail_ring_address(avail).map_err(qe)?;
        queue.try_set_used_ring_address(used).map_err(qe)?;
        queue.set_ready(true);
        Ok(BlockWorkload {
            mem,
            queue,
            avail,
            requests: requests.len(),
            next: 0,
            avail_idx: 0,
        })
    }

    /// The driver publishes `batch` requests; the device serves them through
    /// virtio-queue's Reader/Writer over vm-memory; add_used.
    fn run_batch(&mut self, batch: usize) -> Res<()> {
        let mem = self.mem;
        let e = |e: vm_memory::GuestMemoryError| format!("avail write: {e}");
        for _ in 0..batch {
            let head = (3 * self.next) as u16;
            self.next = (self.next + 1) % self.requests;
            let slot = u64::from(self.avail_idx % QUEUE_SIZE);
            mem.write_obj(head, self.avail.unchecked_add(4 + 2 * slot))
                .map_err(e)?;
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        mem.write_obj(self.avail_idx, self.avail.unchecked_add(2))
            .map_err(e)?;
        let chains: Vec<DescriptorChain<&GuestMemoryMmap>> =
            std::iter::from_fn(|| self.queue.pop_descriptor_chain(mem)).collect();
        if chains.len() != batch {
            return Err(format!("popped {} chains, expected {batch}", chains.len()));
        }
        let data = [0xd5u8; DATA_LEN as usize];
        for c in chains {
            let head = c.head_index();
            let mut r = Reader::new(mem, c.clone()).map_err(|e| format!("Reader: {e}"))?;
            let mut header = [0u8; HEADER_LEN as usize];
            r.read_exact(&mut header)
                .map_err(|e| format!("read header: {e}"))?;
            let mut w = Writer::new(mem, c).map_err(|e| format!("Writer: {e}"))?;
            w.write_all(&data).map_err(|e| format!("write data: {e}"))?;
            w.write_obj(0u8).map_err(|e| format!("write status: {e}"))?;
            self.queue
                .add_used(mem, head, DATA_LEN + 1)
                .map_err(|e| format!("add_used: {e}"))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The cases.

/// A panic's message and location, captured by a temporary hook.
fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let caught = Arc::new(Mutex::new(String::new()));
    let c2 = caught.clone();
    let old = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            s.to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "(non-string payload)".into()
        };
        let loc = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        *c2.lock().unwrap() = format!("{msg}{loc}");
    }));
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    panic::set_hook(old);
    r.map_err(|_| caught.lock().unwrap().clone())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Defect (a): a GRANT region at a mid-page gpa is mapped from the page start.
fn probe_midpage(rep: &mut Report, guest: &mut Guest, gntdev: &File) -> Res<()> {
    let pages = guest.grant(2, true)?;
    if pages[1].gref != pages[0].gref + 1 {
        return Err(format!(
            "refs not consecutive: {} {}",
            pages[0].gref, pages[1].gref
        ));
    }
    let p = &pages[0];
    let at0 = [0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7u8];
    let at840 = [0xb0, 0xb1, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7u8];
    poke(p, 0, &at0);
    poke(p, 0x840, &at840);
    let gpa = grant_addr(p.gref, 0x840);
    let mem = GuestMemoryMmap::from_regions(vec![grant_region(gntdev, gpa, 0x1002, false)?])
        .map_err(|e| format!("GuestMemoryMmap: {e}"))?;
    let got: [u8; 8] = mem
        .read_obj(GuestAddress(gpa))
        .map_err(|e| format!("read {gpa:#x}: {e}"))?;
    let confirmed_read = got == at0;
    rep.case(
        "defect-midpage-grant-reads-page-offset-0",
        confirmed_read,
        format!(
            "GRANT region at gpa {gpa:#x} (ref {} + 0x840, size 0x1002): read of 8 bytes at its start gave {}; page offset 0 holds {}, offset 0x840 holds {} ({})",
            p.gref,
            hex(&got),
            hex(&at0),
            hex(&at840),
            if confirmed_read { "the bytes at offset 0: defect confirmed" } else if got == at840 { "the right bytes: defect NOT present" } else { "neither" }
        ),
    );
    let w = [0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7u8];
    mem.write_obj(w, GuestAddress(gpa))
        .map_err(|e| format!("write {gpa:#x}: {e}"))?;
    let (now0, now840) = (peek(p, 0, 8), peek(p, 0x840, 8));
    let confirmed_write = now0 == w && now840 == at840;
    rep.case(
        "defect-midpage-grant-write-lands-at-page-offset-0",
        confirmed_write,
        format!(
            "wrote {} at gpa {gpa:#x}: page offset 0 now {}, offset 0x840 now {}",
            hex(&w),
            hex(&now0),
            hex(&now840)
        ),
    );
    Ok(())
}

/// The guest's pages and vm-memory's view of them, as the benchmark uses them.
struct Setup {
    ring: Vec<GrantedPage>,
    data: Vec<GrantedPage>,
    status: Vec<GrantedPage>,
    first_buf_ref: u32,
    last_ref: u32,
    max_ring: u32,
    all: usize,
    consecutive: bool,
    ring_gpa: u64,
    reqs: Vec<BlockBuffers>,
    mem: GuestMemoryMmap,
}

/// The guest: ring pages, then per request a read-only header page with content and
/// writable data and status pages; vm-memory: the ring in a GRANT region mapped in advance
/// (odd size, as xen-vhost-frontend sends it), the buffers in an on-demand GRANT region
/// from the next page boundary up, covering refs far past the last one.
fn setup(guest: &mut Guest, gntdev: &File) -> Res<Setup> {
    let ring_pages = ring_bytes(QUEUE_SIZE).div_ceil(PG as u64) as usize;
    let ring = guest.grant(ring_pages, true)?;
    let mut hdr = Vec::new();
    let mut data = Vec::new();
    let mut status = Vec::new();
    for _ in 0..REQUESTS {
        let h = guest.grant(1, false)?.remove(0);
        poke(&h, 0, &[0x11; HEADER_LEN as usize]);
        hdr.push(h);
        data.push(guest.grant(1, true)?.remove(0));
        let s = guest.grant(1, true)?.remove(0);
        poke(&s, 0, &[0xff]);
        status.push(s);
    }
    let first_buf_ref = hdr[0].gref;
    let all: Vec<u32> = ring
        .iter()
        .chain(hdr.iter())
        .chain(data.iter())
        .chain(status.iter())
        .map(|p| p.gref)
        .collect();
    let last_ref = *all.iter().max().unwrap();
    let min_buf = hdr
        .iter()
        .chain(&data)
        .chain(&status)
        .map(|p| p.gref)
        .min()
        .unwrap();
    let max_ring = ring.iter().map(|p| p.gref).max().unwrap();
    if min_buf != first_buf_ref || max_ring >= first_buf_ref {
        return Err(format!(
            "unexpected ref order: ring {:?}, first buffer {first_buf_ref}, min buffer {min_buf}",
            ring.iter().map(|p| p.gref).collect::<Vec<_>>()
        ));
    }
    let mut sorted = all.clone();
    sorted.sort_unstable();
    let consecutive = sorted.windows(2).all(|w| w[1] == w[0] + 1);
    let ring_gpa = grant_addr(ring[0].gref, 0);
    let ring_size = ring_bytes(QUEUE_SIZE) as usize;
    let bufs_gpa = grant_addr(first_buf_ref, 0);
    let bufs_size = ((last_ref - first_buf_ref) as usize + 4096) * PG;
    let mem = GuestMemoryMmap::from_regions(vec![
        grant_region(gntdev, ring_gpa, ring_size, false)?,
        grant_region(gntdev, bufs_gpa, bufs_size, true)?,
    ])
    .map_err(|e| format!("GuestMemoryMmap::from_regions: {e}"))?;
    let reqs: Vec<BlockBuffers> = (0..REQUESTS)
        .map(|i| BlockBuffers {
            header: grant_addr(hdr[i].gref, 0),
            data: grant_addr(data[i].gref, 0),
            status: grant_addr(status[i].gref, 0),
        })
        .collect();
    Ok(Setup {
        ring,
        data,
        status,
        first_buf_ref,
        last_ref,
        max_ring,
        all: all.len(),
        consecutive,
        ring_gpa,
        reqs,
        mem,
    })
}

fn run(rep: &mut Report) -> Res<()> {
    let gntdev = gntdev()?;
    let mut guest = Guest::new()?;
    let Setup {
        ring,
        data,
        status,
        first_buf_ref,
        last_ref,
        max_ring,
        all,
        consecutive,
        ring_gpa,
        reqs,
        mem,
    } = setup(&mut guest, &gntdev)?;
    rep.case(
        "guest-grants",
        true,
        format!(
            "{all} pages granted to domid 0: ring refs {}..={}, buffer refs {}..={}{}",
            ring[0].gref,
            max_ring,
            first_buf_ref,
            last_ref,
            if consecutive {
                " (consecutive)"
            } else {
                " (not consecutive)"
            }
        ),
    );

    // --- the counter sees vm-memory's calls: one 16-byte read on demand.
    let c0 = Counts::now();
    let h: [u8; 16] = mem
        .read_obj(GuestAddress(reqs[0].header))
        .map_err(|e| format!("read header {:#x}: {e}", reqs[0].header))?;
    let per_access = c0.since();
    rep.case(
        "syscall-counter",
        per_access == Counts { ioctl: 2, mmap: 1, munmap: 1 } && h == [0x11; 16],
        format!("one 16-byte read_obj on the on-demand region: {per_access} (expected 4: map ioctl, mmap, munmap, unmap ioctl); read {}", hex(&h)),
    );

    // --- the benchmark.
    for &batch in &BATCHES {
        let mut wl = BlockWorkload::new(&mem, ring_gpa, &reqs)?;
        wl.run_batch(batch)?; // warm-up
                              // Best of five rounds: the host under QEMU/TCG is noisy, and ours are measured the
                              // same way.
        let c0 = Counts::now();
        let per_round = (MEASURED / 5 / batch).max(1);
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t0 = Instant::now();
            for _ in 0..per_round {
                wl.run_batch(batch)?;
            }
            best = best.min(t0.elapsed().as_secs_f64() / (per_round * batch) as f64);
        }
        let c = c0.since();
        let n = 5 * per_round * batch;
        let secs = best * n as f64;
        let spr = c.total() as f64 / n as f64;
        println!(
            "XVM-JSON {{\"bench\":\"block\",\"impl\":\"vm-memory-xen\",\"strategy\":\"vm-memory-xen\",\"batch\":{batch},\"requests\":{n},\"requests_per_s\":{:.1},\"syscalls_per_request\":{:.3},\"ns_per_request\":{:.0}}}",
            n as f64 / secs,
            spr,
            secs * 1e9 / n as f64
        );
        rep.case(
            &format!("bench-batch-{batch}"),
            c.total() == 12 * n as u64,
            format!(
                "{n} requests in {:.3} s, {c} = {spr} per request (expected 12: 3 accesses x 4)",
                secs
            ),
        );
    }
    let landed = data
        .iter()
        .all(|p| peek(p, 0, PG).iter().all(|&b| b == 0xd5))
        && status.iter().all(|p| peek(p, 0, 1) == [0]);
    rep.case(
        "bench-data-landed",
        landed,
        format!(
            "all {REQUESTS} data pages hold 0xd5 and status bytes 0 in the guest's view: {landed}"
        ),
    );

    // --- defect (b): a read at a ref the guest never granted panics.
    let bad_ref = last_ref + 1000;
    let bad = grant_addr(bad_ref, 0);
    LAST_MAP_INDEX.store(u64::MAX, Ordering::Relaxed);
    let c0 = Counts::now();
    let r = catch_panic(|| mem.read_obj::<u64>(GuestAddress(bad)));
    let c = c0.since();
    match &r {
        Err(msg) => rep.case(
            "defect-ungranted-ref-panics",
            true,
            format!("read_obj::<u64> at {bad:#x} (ref {bad_ref}, never granted) panicked: {msg}; {c} before the panic"),
        ),
        Ok(v) => rep.case(
            "defect-ungranted-ref-panics",
            false,
            format!("read_obj at {bad:#x} returned {v:?} without panicking; {c}"),
        ),
    }
    // The gntdev map made before the failed mmap is never released.
    let idx = LAST_MAP_INDEX.load(Ordering::Relaxed);
    if r.is_err() && idx != u64::MAX {
        let fd = gntdev.try_clone().map_err(|e| format!("dup gntdev: {e}"))?;
        let res = xen_sys::Gntdev::from_fd(fd.into()).unmap_grant_ref(idx, 1);
        rep.case(
            "defect-failed-map-leaks-gntdev-map",
            res.is_ok(),
            match res {
                Ok(()) => format!("the map at gntdev index {idx:#x} was still live after the panic (our UNMAP_GRANT_REF of it succeeded): vm-memory leaks it"),
                Err(e) => format!("UNMAP_GRANT_REF of index {idx:#x} failed ({e}): not leaked"),
            },
        );
    }

    // --- defect: atomic access on an on-demand region dereferences a fake pointer.
    let out = Command::new("/proc/self/exe")
        .arg("atomic-probe")
        .arg(format!("{:#x}", reqs[0].data))
        .output()
        .map_err(|e| format!("re-exec for the atomic probe: {e}"))?;
    use std::os::unix::process::ExitStatusExt;
    let sig = out.status.signal();
    rep.case(
        "defect-atomic-on-demand-segfaults",
        sig == Some(libc::SIGSEGV),
        format!(
            "child doing load::<u32>(Acquire) at {:#x} (granted ref {}) ended with {:?} (signal {:?}); stdout: {}",
            reqs[0].data,
            data[0].gref,
            out.status,
            sig,
            String::from_utf8_lossy(&out.stdout).trim()
        ),
    );

    probe_midpage(rep, &mut guest, &gntdev)?;
    drop(mem);
    Ok(())
}

/// In a child process: an atomic load through an on-demand region at `gpa`.
fn atomic_probe(gpa: &str) -> ! {
    let gpa = u64::from_str_radix(gpa.trim_start_matches("0x"), 16).expect("gpa");
    let dev = gntdev().expect("gntdev");
    let mem =
        GuestMemoryMmap::from_regions(
            vec![grant_region(&dev, gpa, 64 * PG, true).expect("region")],
        )
        .expect("memory");
    let v: Result<u32, _> = mem.load(GuestAddress(gpa), std::sync::atomic::Ordering::Acquire);
    println!("atomic load returned {v:?}");
    std::process::exit(0)
}

/// `serve`: one round of one bench row per stdin line `BATCH REQUESTS`, answered on stdout
/// with `ROUND <ns> <syscalls>` (wall ns for REQUESTS requests, exact syscalls counted by
/// interposition) or `ERR <reason>`; ends at EOF. xen-dom0-tests' bench drives it, its own
/// rounds interleaved with these (ci/xen/dom0-tests/src/bench.rs). One workload per batch:
/// a new batch rebuilds the ring (and warms up once), as `run`'s benchmark does.
fn serve() -> ! {
    let out = (|| -> Res<()> {
        let gntdev = gntdev()?;
        let mut guest = Guest::new()?;
        let s = setup(&mut guest, &gntdev)?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "READY").map_err(|e| e.to_string())?;
        stdout.flush().map_err(|e| e.to_string())?;
        let mut wl: Option<(usize, BlockWorkload<'_>)> = None;
        for line in std::io::stdin().lines() {
            let line = line.map_err(|e| format!("stdin: {e}"))?;
            let reply = (|| -> Res<String> {
                let mut it = line.split_whitespace().map(str::parse::<usize>);
                let (Some(Ok(batch)), Some(Ok(n))) = (it.next(), it.next()) else {
                    return Err(format!("bad request {line:?}"));
                };
                if batch == 0 || n % batch != 0 || batch > REQUESTS {
                    return Err(format!("bad request {line:?}"));
                }
                if wl.as_ref().map(|w| w.0) != Some(batch) {
                    wl = None; // the old workload's queue state goes before the ring is rewritten
                    let mut w = BlockWorkload::new(&s.mem, s.ring_gpa, &s.reqs)?;
                    w.run_batch(batch)?; // warm-up
                    wl = Some((batch, w));
                }
                let w = &mut wl.as_mut().unwrap().1;
                let c0 = Counts::now();
                let t0 = Instant::now();
                for _ in 0..n / batch {
                    w.run_batch(batch)?;
                }
                let ns = t0.elapsed().as_nanos();
                Ok(format!("ROUND {ns} {}", c0.since().total()))
            })();
            let reply = reply.unwrap_or_else(|e| format!("ERR {e}"));
            writeln!(stdout, "{reply}").map_err(|e| e.to_string())?;
            stdout.flush().map_err(|e| e.to_string())?;
        }
        let landed = s
            .data
            .iter()
            .all(|p| peek(p, 0, PG).iter().all(|&b| b == 0xd5))
            && s.status.iter().all(|p| peek(p, 0, 1) == [0]);
        drop(s);
        if !landed {
            return Err("data not written to the guest's pages".into());
        }
        Ok(())
    })();
    match out {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            println!("ERR {e}");
            std::process::exit(1)
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 2 && args[1] == "serve" {
        serve();
    }
    if args.len() == 3 && args[1] == "atomic-probe" {
        atomic_probe(&args[2]);
    }
    let mut rep = Report { failed: 0 };
    if let Err(e) = run(&mut rep) {
        rep.case("setup", false, e);
    }
    std::process::exit(i32::from(rep.failed > 0));
}
