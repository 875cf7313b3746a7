//! `peer-blk-xen --socket-path PATH --blk-file FILE`: serves one frontend with the peer device
//! (`peer.rs`) on vhost-user-backend 0.24 with vm-memory `xen`, then prints on stderr
//! `peer-blk-xen: N requests; syscalls S (P per request: I ioctls, M mmaps, U munmaps)`.
//!
//! System calls are counted as `ci/xen/vm-memory-peer` counts them: this executable defines
//! the C symbols `ioctl`, `mmap` and `munmap`, which win over glibc's at link time for every
//! call made through the `libc` crate (vm-memory, vmm-sys-util, vhost); they count in atomics
//! and forward with `syscall(2)`.

// The same device as the stock peer of `bench/`, built here with vm-memory's `xen`.
#[path = "../../../../bench/peer-blk/src/peer.rs"]
mod peer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use libc::{c_int, c_long, c_ulong, c_void, off_t, size_t};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

static IOCTLS: AtomicU64 = AtomicU64::new(0);
static MMAPS: AtomicU64 = AtomicU64::new(0);
static MUNMAPS: AtomicU64 = AtomicU64::new(0);

/// `ioctl(2)`, counted. Non-variadic: every caller passes one pointer argument, and on
/// x86-64 a variadic caller's registers match this signature.
///
/// # Safety
/// As `ioctl(2)`: `arg` must be what `req` expects.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    IOCTLS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: forwarded unchanged; the caller vouches for `arg`.
    unsafe { libc::syscall(libc::SYS_ioctl, fd as c_long, req, arg) as c_int }
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let socket = arg("--socket-path").ok_or("--socket-path missing")?;
    let file = arg("--blk-file").ok_or("--blk-file missing")?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)?;
    let backend = Arc::new(RwLock::new(peer::PeerBlk::new(f, 1, true)?));
    let mut d = vhost_user_backend::VhostUserDaemon::new(
        "peer-blk-xen".into(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| format!("{e:?}"))?;
    let (i0, m0, u0) = (
        IOCTLS.load(Ordering::Relaxed),
        MMAPS.load(Ordering::Relaxed),
        MUNMAPS.load(Ordering::Relaxed),
    );
    let served = d.serve(&socket).map_err(|e| format!("{e:?}"));
    let (i, m, u) = (
        IOCTLS.load(Ordering::Relaxed) - i0,
        MMAPS.load(Ordering::Relaxed) - m0,
        MUNMAPS.load(Ordering::Relaxed) - u0,
    );
    let req = peer::REQUESTS.load(Ordering::Relaxed);
    eprintln!(
        "peer-blk-xen: {req} requests; syscalls {} ({:.2} per request: {i} ioctls, {m} mmaps, {u} munmaps); serve: {served:?}",
        i + m + u,
        (i + m + u) as f64 / req.max(1) as f64
    );
    // The daemon's epoll handler threads outlive serve(); do not wait for them at exit.
    std::process::exit(0)
}
