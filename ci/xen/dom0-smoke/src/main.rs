//! dom0-smoke: grant facts on the real Xen drivers, run in dom0 by `ci/xen/run`.
//!
//! dom0 grants its own pages to itself (gntalloc, domid 0) and maps them back
//! through gntdev. Prints one line per case:
//! `XVM-TEST dom0-smoke/<case> PASS|FAIL <details>`, and `XVM-JSON {...}` for
//! the small map/unmap benchmark. Exit status 1 if any case failed.

use std::ffi::CStr;
use std::io::Error;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

// The ioctl numbers, flags and page size are xen-sys's (checked against the C headers by its
// tests/layout.rs). The argument structs below are deliberately this file's own, with the refs
// inline as fixed-size arrays: the smoke test probes the raw ABI without xen-sys's buffers.
use xen_sys::gntalloc::GNTALLOC_FLAG_WRITABLE;
use xen_sys::ioctl::{
    IOCTL_GNTALLOC_ALLOC_GREF, IOCTL_GNTALLOC_DEALLOC_GREF, IOCTL_GNTDEV_MAP_GRANT_REF,
    IOCTL_GNTDEV_UNMAP_GRANT_REF,
};
use xen_sys::xen::XEN_PAGE_SIZE as PG; // Xen pages are always 4 KiB

const BIN: &str = "dom0-smoke";

/// `struct ioctl_gntalloc_alloc_gref` with `N` refs.
#[repr(C)]
struct AllocGref<const N: usize> {
    domid: u16,
    flags: u16,
    count: u32,
    index: u64,
    gref_ids: [u32; N],
}

#[repr(C)]
struct DeallocGref {
    index: u64,
    count: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct GrantRef {
    domid: u32,
    r#ref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` with `N` refs.
#[repr(C)]
struct MapGrantRef<const N: usize> {
    count: u32,
    pad: u32,
    index: u64,
    refs: [GrantRef; N],
}

#[repr(C)]
struct UnmapGrantRef {
    index: u64,
    count: u32,
    pad: u32,
}

type Res<T> = Result<T, String>;

/// "errno=22 EINVAL (Invalid argument)" for the last OS error.
fn errno_text(what: &str) -> String {
    let e = Error::last_os_error();
    let n = e.raw_os_error().unwrap_or(0);
    let name = match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::ENOSPC => "ENOSPC",
        libc::ENOTTY => "ENOTTY",
        libc::ENODEV => "ENODEV",
        _ => "?",
    };
    // SAFETY: strerror returns a pointer to a static, NUL-terminated string.
    let msg = unsafe { CStr::from_ptr(libc::strerror(n)) }.to_string_lossy().into_owned();
    format!("{what}: errno={n} {name} ({msg})")
}

fn open(path: &CStr) -> Res<OwnedFd> {
    // SAFETY: path is NUL-terminated; the returned fd is owned by nobody else.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno_text(&format!("open {}", path.to_string_lossy())));
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl<T>(fd: &OwnedFd, req: u32, arg: &mut T, what: &str) -> Res<()> {
    // SAFETY: arg points to a live #[repr(C)] struct of the layout `req` expects.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        return Err(errno_text(what));
    }
    Ok(())
}

/// A shared mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(fd: &OwnedFd, len: usize, prot: i32, offset: u64, what: &str) -> Res<Mapping> {
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is touched.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), offset as libc::off_t)
        };
        if p == libc::MAP_FAILED {
            return Err(errno_text(what));
        }
        Ok(Mapping { ptr: p.cast(), len })
    }
    fn read(&self, i: usize) -> u8 {
        assert!(i < self.len);
        // SAFETY: i is in bounds of a live mapping; volatile because another mapping aliases it.
        unsafe { self.ptr.add(i).read_volatile() }
    }
    fn write(&self, i: usize, v: u8) {
        assert!(i < self.len);
        // SAFETY: i is in bounds of a live, writable mapping.
        unsafe { self.ptr.add(i).write_volatile(v) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing borrows them any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Pages granted by dom0 to itself through gntalloc; deallocated on drop.
struct Granted<const N: usize> {
    fd: OwnedFd,
    index: u64,
    refs: [u32; N],
}

impl<const N: usize> Granted<N> {
    fn new(flags: u16) -> Res<Self> {
        let fd = open(c"/dev/xen/gntalloc")?;
        let mut a = AllocGref::<N> { domid: 0, flags, count: N as u32, index: 0, gref_ids: [0; N] };
        ioctl(&fd, IOCTL_GNTALLOC_ALLOC_GREF, &mut a, "ALLOC_GREF")?;
        Ok(Granted { fd, index: a.index, refs: a.gref_ids })
    }
    /// gntalloc's own (always writable) view of the pages.
    fn map(&self) -> Res<Mapping> {
        Mapping::new(&self.fd, N * PG, libc::PROT_READ | libc::PROT_WRITE, self.index, "mmap gntalloc")
    }
}

impl<const N: usize> Drop for Granted<N> {
    fn drop(&mut self) {
        let mut d = DeallocGref { index: self.index, count: N as u32 };
        let _ = ioctl(&self.fd, IOCTL_GNTALLOC_DEALLOC_GREF, &mut d, "DEALLOC_GREF");
    }
}

/// gntdev MAP_GRANT_REF of `refs` (domid 0); returns the mmap offset.
fn map_grant_ref<const N: usize>(dev: &OwnedFd, refs: [u32; N]) -> Res<u64> {
    let mut m = MapGrantRef::<N> {
        count: N as u32,
        pad: 0,
        index: 0,
        refs: refs.map(|r| GrantRef { domid: 0, r#ref: r }),
    };
    ioctl(dev, IOCTL_GNTDEV_MAP_GRANT_REF, &mut m, "MAP_GRANT_REF")?;
    Ok(m.index)
}

fn unmap_grant_ref(dev: &OwnedFd, index: u64, count: u32) -> Res<()> {
    let mut u = UnmapGrantRef { index, count, pad: 0 };
    ioctl(dev, IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut u, "UNMAP_GRANT_REF")
}

fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(7).wrapping_add(13) ^ (i / PG) as u8
}

/// 4 writable pages: gntalloc writes, gntdev reads; gntdev writes, gntalloc reads.
fn rw_roundtrip() -> Res<String> {
    let g = Granted::<4>::new(GNTALLOC_FLAG_WRITABLE)?;
    let src = g.map()?;
    (0..4 * PG).for_each(|i| src.write(i, pattern(i)));
    let dev = open(c"/dev/xen/gntdev")?;
    let idx = map_grant_ref(&dev, g.refs)?;
    {
        let dst = Mapping::new(&dev, 4 * PG, libc::PROT_READ | libc::PROT_WRITE, idx, "mmap gntdev")?;
        if let Some(i) = (0..4 * PG).find(|&i| dst.read(i) != pattern(i)) {
            return Err(format!("gntdev view differs at byte {i}"));
        }
        (0..4 * PG).step_by(97).for_each(|i| dst.write(i, 0xA5));
        let want = |i: usize| if i % 97 == 0 { 0xA5 } else { pattern(i) };
        if let Some(i) = (0..4 * PG).find(|&i| src.read(i) != want(i)) {
            return Err(format!("gntdev write not seen by gntalloc at byte {i}"));
        }
    } // munmap before UNMAP_GRANT_REF
    unmap_grant_ref(&dev, idx, 4)?;
    Ok(format!("refs={:?} gntdev index={idx:#x}; 16 KiB both ways; munmap+UNMAP+DEALLOC ok", g.refs))
}

/// Read-only grant (flags 0) mapped through gntdev with `prot`.
/// Ok((mmap succeeded, text)); mmap failure is reported, not an Err.
fn ro_grant(prot: i32) -> Res<(bool, String)> {
    let g = Granted::<1>::new(0)?;
    let src = g.map()?;
    (0..PG).for_each(|i| src.write(i, pattern(i)));
    let dev = open(c"/dev/xen/gntdev")?;
    let idx = map_grant_ref(&dev, g.refs)?;
    let out = match Mapping::new(&dev, PG, prot, idx, "mmap gntdev") {
        Ok(m) => {
            let same = (0..PG).all(|i| m.read(i) == pattern(i));
            (true, format!("ref={} mmap ok, contents {}", g.refs[0], if same { "match" } else { "DIFFER" }))
        }
        Err(e) => {
            // Is the map still usable after the refused mmap? (retry read-only)
            let retry = Mapping::new(&dev, PG, libc::PROT_READ, idx, "retry PROT_READ on the same map")
                .map(|m| format!("retry PROT_READ on the same map: ok, contents {}", if m.read(1) == pattern(1) { "match" } else { "DIFFER" }));
            (false, format!("ref={} {e}; {}", g.refs[0], retry.unwrap_or_else(|e| e)))
        }
    };
    let un = match unmap_grant_ref(&dev, idx, 1) {
        Ok(()) => "UNMAP ok".to_string(),
        Err(e) => e,
    };
    Ok((out.0, format!("{}; {un}", out.1)))
}

/// MAP_GRANT_REF of 4 pages, then mmap of only part of it.
fn partial_mmap() -> Res<(bool, String)> {
    let g = Granted::<4>::new(GNTALLOC_FLAG_WRITABLE)?;
    let dev = open(c"/dev/xen/gntdev")?;
    let idx = map_grant_ref(&dev, g.refs)?;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let mut any_ok = false;
    let mut texts = Vec::new();
    for (name, off, pages) in [("first 2 of 4 pages", 0, 2), ("pages 1..4 of 4", 1, 3)] {
        match Mapping::new(&dev, pages * PG, rw, idx + (off * PG) as u64, "mmap") {
            Ok(_m) => {
                any_ok = true;
                texts.push(format!("{name}: mmap SUCCEEDED"));
            }
            Err(e) => texts.push(format!("{name}: {e}")),
        }
    }
    let whole = Mapping::new(&dev, 4 * PG, rw, idx, "whole mmap").map(|_| "whole map afterwards: mmap ok".into());
    texts.push(whole.unwrap_or_else(|e| e));
    unmap_grant_ref(&dev, idx, 4)?;
    Ok((any_ok, texts.join("; ")))
}

/// MAP_GRANT_REF of a ref nobody granted: where does it fail?
fn never_granted(r: u32) -> Res<(bool, String)> {
    let dev = open(c"/dev/xen/gntdev")?;
    let idx = match map_grant_ref(&dev, [r]) {
        Ok(i) => i,
        Err(e) => return Ok((false, format!("ref={r}: fails at ioctl: {e}"))),
    };
    let res = match Mapping::new(&dev, PG, libc::PROT_READ, idx, "mmap") {
        // Do not touch it: on a lazily-mapping dom0 that would be SIGBUS.
        Ok(_m) => (true, format!("ref={r}: ioctl ok, mmap SUCCEEDED")),
        Err(e) => (false, format!("ref={r}: ioctl ok (index={idx:#x}), fails at {e}")),
    };
    let un = unmap_grant_ref(&dev, idx, 1).map(|_| "UNMAP ok".to_string());
    Ok((res.0, format!("{}; {}", res.1, un.unwrap_or_else(|e| e))))
}

/// One MAP_GRANT_REF of a good ref and a never-granted one: is the whole mmap
/// refused, and is the good ref still mappable on its own afterwards?
fn mixed_batch(bad: u32) -> Res<(bool, String)> {
    let g = Granted::<1>::new(GNTALLOC_FLAG_WRITABLE)?;
    let dev = open(c"/dev/xen/gntdev")?;
    let idx = map_grant_ref(&dev, [g.refs[0], bad])?;
    let mapped = Mapping::new(&dev, 2 * PG, libc::PROT_READ | libc::PROT_WRITE, idx, "mmap [good, bad]");
    let first = match &mapped {
        Ok(_) => "mmap [good, bad] SUCCEEDED".to_string(),
        Err(e) => e.clone(),
    };
    let refused = mapped.is_err();
    drop(mapped);
    unmap_grant_ref(&dev, idx, 2)?;
    let idx = map_grant_ref(&dev, g.refs)?;
    let again = Mapping::new(&dev, PG, libc::PROT_READ | libc::PROT_WRITE, idx, "then good ref alone")
        .map(|_| "then good ref alone: mmap ok".to_string());
    unmap_grant_ref(&dev, idx, 1)?;
    Ok((refused, format!("refs=[{}, {bad}]: {first}; {}", g.refs[0], again.unwrap_or_else(|e| e))))
}

/// Cost of one 1-page map cycle: MAP_GRANT_REF + mmap + touch + munmap + UNMAP.
fn bench_map_cycle(iters: u32) -> Res<String> {
    let g = Granted::<1>::new(GNTALLOC_FLAG_WRITABLE)?;
    let dev = open(c"/dev/xen/gntdev")?;
    let t = Instant::now();
    for _ in 0..iters {
        let idx = map_grant_ref(&dev, g.refs)?;
        {
            let m = Mapping::new(&dev, PG, libc::PROT_READ | libc::PROT_WRITE, idx, "mmap")?;
            m.write(0, m.read(0).wrapping_add(1));
        }
        unmap_grant_ref(&dev, idx, 1)?;
    }
    let ns = t.elapsed().as_nanos() as f64 / iters as f64;
    Ok(format!(
        "{{\"bench\":\"{BIN}/gntdev-map-cycle-1p\",\"iters\":{iters},\"ns_per_iter\":{ns:.0},\"syscalls_per_iter\":4}}"
    ))
}

fn main() {
    let mut failed = 0;
    let mut report = |case: &str, pass: bool, detail: &str| {
        failed += usize::from(!pass);
        println!("XVM-TEST {BIN}/{case} {} {detail}", if pass { "PASS" } else { "FAIL" });
    };
    match rw_roundtrip() {
        Ok(d) => report("rw-roundtrip", true, &d),
        Err(e) => report("rw-roundtrip", false, &e),
    }
    // A read-only grant must map read-only...
    match ro_grant(libc::PROT_READ) {
        Ok((ok, d)) => report("ro-grant-prot-read", ok, &d),
        Err(e) => report("ro-grant-prot-read", false, &e),
    }
    // ...and must refuse a writable mapping (DESIGN.md, Grants).
    match ro_grant(libc::PROT_READ | libc::PROT_WRITE) {
        Ok((ok, d)) => report("ro-grant-prot-write-refused", !ok, &d),
        Err(e) => report("ro-grant-prot-write-refused", false, &e),
    }
    // mmap must cover exactly one whole map (DESIGN.md: EINVAL).
    match partial_mmap() {
        Ok((any_ok, d)) => report("partial-mmap-refused", !any_ok, &d),
        Err(e) => report("partial-mmap-refused", false, &e),
    }
    // A never-granted ref must fail at MAP_GRANT_REF or mmap, never later.
    match never_granted(1000) {
        Ok((mapped, d)) => report("never-granted-ref-refused", !mapped, &d),
        Err(e) => report("never-granted-ref-refused", false, &e),
    }
    // Beyond the grant table: also refused, not a crash.
    match never_granted(0xF_FFF0) {
        Ok((mapped, d)) => report("ref-beyond-table-refused", !mapped, &d),
        Err(e) => report("ref-beyond-table-refused", false, &e),
    }
    // One bad ref in a batch: the whole mmap fails (so errors are per map, not per ref).
    match mixed_batch(1000) {
        Ok((refused, d)) => report("mixed-batch-bad-ref-refused", refused, &d),
        Err(e) => report("mixed-batch-bad-ref-refused", false, &e),
    }
    match bench_map_cycle(200) {
        Ok(json) => {
            report("bench-map-cycle", true, "see XVM-JSON");
            println!("XVM-JSON {json}");
        }
        Err(e) => report("bench-map-cycle", false, &e),
    }
    std::process::exit(i32::from(failed > 0));
}
