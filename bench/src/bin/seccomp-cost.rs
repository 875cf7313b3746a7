//! What the sandbox adds to a system call. A queue worker's calls (an eventfd read, a futex
//! wake) timed in a thread without filters, and in a queue worker under the filters it has in
//! the daemon binaries (Main's, then Connection's, then its own, each with the open-refusing
//! filter). Interleaved rounds; median and min-max of the per-round cost difference.
//!
//!     cargo run --release -p xen-vhost-bench --bin seccomp-cost [-- ROUNDS]

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use xen_vhost_mem::daemon::threads::{Sandbox, ThreadKind};

const CALLS: u32 = 500_000;

/// ns per (eventfd read + futex wake) pair, on `fd`.
fn pair_ns(fd: RawFd) -> f64 {
    let mut v = 0u64;
    let word = 0u32;
    let t = Instant::now();
    for _ in 0..CALLS {
        // SAFETY: a read of 8 bytes into `v` from a nonblocking eventfd (EAGAIN when empty),
        // and a futex wake on a live word nobody waits on.
        unsafe {
            libc::read(fd, (&mut v as *mut u64).cast(), 8);
            libc::syscall(
                libc::SYS_futex,
                &word as *const u32,
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            );
        }
    }
    t.elapsed().as_nanos() as f64 / f64::from(CALLS)
}

fn sandboxed(s: &Arc<Sandbox>, fd: RawFd) -> Result<f64, Box<dyn std::error::Error>> {
    let (s1, s2) = (s.clone(), s.clone());
    let r = s
        .spawn(ThreadKind::Main, "main".into(), move || {
            s1.spawn(ThreadKind::Connection, "conn".into(), move || {
                s2.spawn(ThreadKind::QueueWorker, "vq0".into(), move || pair_ns(fd))
                    .map(|t| t.join())
            })
            .map(|t| t.join())
        })?
        .join();
    match r {
        Ok(Ok(Ok(Ok(Ok(Ok(Ok(Ok(ns)))))))) => Ok(ns),
        _ => Err("a sandboxed thread failed".into()),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(7);
    let sandbox = Sandbox::new(&[])?;
    // SAFETY: plain flags; the fd lives until the process exits.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut diffs = Vec::new();
    let (mut plain, mut filtered) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let (a, b) = if r % 2 == 0 {
            let a = std::thread::spawn(move || pair_ns(fd))
                .join()
                .map_err(|_| "thread")?;
            (a, sandboxed(&sandbox, fd)?)
        } else {
            let b = sandboxed(&sandbox, fd)?;
            (
                std::thread::spawn(move || pair_ns(fd))
                    .join()
                    .map_err(|_| "thread")?,
                b,
            )
        };
        plain.push(a);
        filtered.push(b);
        diffs.push((b - a) / 2.0);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (lo, hi) = (
        diffs.iter().copied().fold(f64::INFINITY, f64::min),
        diffs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    println!(
        "{rounds} rounds of {CALLS} (eventfd read + futex wake): unfiltered {:.0} ns, queue worker \
         under Main+Connection+QueueWorker filters {:.0} ns per pair; the sandbox adds {:.1} ns per \
         system call (median, min-max {lo:.1}-{hi:.1})",
        med(&mut plain),
        med(&mut filtered),
        med(&mut diffs)
    );
    Ok(())
}
