//! A real "guest" in dom0: dom0 grants its own pages to itself (domid 0) through
//! `/dev/xen/gntalloc`, like `xen_vhost_mem::guest_sim::GuestSim` does on the emulation.
//!
//! The guest reads and writes its pages through gntalloc's own mapping of them (the guest's
//! view). When a test ends, [`RealGuest::release_all`] ends every grant and checks the
//! strongest things userspace can see that nothing still maps them:
//! - `IOCTL_GNTALLOC_DEALLOC_GREF` returns 0 for every allocation;
//! - every ref is refused by a fresh gntdev map (the mmap fails with EINVAL, as for a ref
//!   never granted): Linux only ends a grant when no grantee maps it; if one still does,
//!   gntalloc's dealloc defers the end and the ref stays mappable;
//! - the kernel log (`/dev/kmsg`) has no new `g.e.` line. Linux 6.1 logs a deferred grant end
//!   ("deferring g.e. …") only with pr_debug, so this catches just the "leaking g.e." warning;
//!   the re-map check above is the one that sees a held mapping (proved by the
//!   `dealloc-check-detects-held-mapping` case).

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use xen_sys::{Gntalloc, Gntdev};
use xen_vhost_mem::xen_page::grant_addr;

const PAGE: usize = 4096;
/// The domain the pages are granted to, and the domain the backend maps them from: dom0.
pub const DOMID: u16 = 0;

/// A buffer the guest granted: `pages` pages on consecutive refs from `first_ref`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestBuf {
    id: usize,
    /// First grant ref; page `i` is ref `first_ref + i`.
    pub first_ref: u32,
    /// Number of pages.
    pub pages: usize,
}

impl GuestBuf {
    /// The grant address of byte `offset` of the buffer (`1 << 63 | ref << 12 | offset`).
    pub fn gpa(&self, offset: usize) -> u64 {
        grant_addr(
            self.first_ref + (offset / PAGE) as u32,
            (offset % PAGE) as u64,
        )
    }
}

#[derive(Debug)]
struct Grant {
    index: u64,
    refs: Vec<u32>,
    /// gntalloc's mapping of the pages (the guest's view); `None` once released.
    view: Option<NonNull<u8>>,
}

/// dom0 as a guest that grants its own pages to itself.
#[derive(Debug)]
pub struct RealGuest {
    gntalloc: Gntalloc,
    /// A gntdev handle of our own (not the backend's), for the end-of-test re-map checks.
    checker: Gntdev,
    grants: RefCell<Vec<Grant>>,
    kmsg: Option<Kmsg>,
}

fn errno_name(e: &std::io::Error) -> String {
    let n = e.raw_os_error().unwrap_or(0);
    let name = match n {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EIO => "EIO",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::ENOSPC => "ENOSPC",
        libc::ENOTTY => "ENOTTY",
        libc::ENODEV => "ENODEV",
        libc::ENXIO => "ENXIO",
        _ => "?",
    };
    format!("errno {n} {name}")
}

/// "errno 22 EINVAL (Invalid argument)".
pub fn errno_text(e: &std::io::Error) -> String {
    format!("{} ({e})", errno_name(e))
}

impl RealGuest {
    /// Opens gntalloc (the guest side), a gntdev for checks, and the kernel log.
    pub fn new() -> Result<Self, String> {
        let gntalloc = Gntalloc::open().map_err(|e| format!("open gntalloc: {e}"))?;
        let checker = Gntdev::open().map_err(|e| format!("open gntdev: {e}"))?;
        Ok(RealGuest {
            gntalloc,
            checker,
            grants: RefCell::new(Vec::new()),
            kmsg: Kmsg::open(),
        })
    }

    /// Grants `pages` fresh zeroed pages to dom0 (read-only grants when `readonly`), on
    /// consecutive refs (a Linux guest's buffer uses consecutive refs), and maps the guest's
    /// view of them.
    pub fn grant(&self, pages: usize, readonly: bool) -> Result<GuestBuf, String> {
        let count = u32::try_from(pages).map_err(|_| format!("{pages} pages"))?;
        let (index, refs) = self
            .gntalloc
            .alloc_gref(DOMID, count, !readonly)
            .map_err(|e| format!("IOCTL_GNTALLOC_ALLOC_GREF({pages}): {}", errno_text(&e)))?;
        // Record it at once so that every path below releases it.
        let id = {
            let mut g = self.grants.borrow_mut();
            g.push(Grant {
                index,
                refs: refs.clone(),
                view: None,
            });
            g.len() - 1
        };
        let first_ref = *refs.first().ok_or("ALLOC_GREF returned no refs")?;
        if refs
            .iter()
            .enumerate()
            .any(|(i, &r)| u64::from(r) != u64::from(first_ref) + i as u64)
        {
            return Err(format!("gntalloc refs not consecutive: {refs:?}"));
        }
        let off = libc::off_t::try_from(index).map_err(|_| format!("index {index:#x}"))?;
        // SAFETY: a fresh shared mapping of the gntalloc fd at the index the kernel returned
        // for exactly `pages` pages; the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.gntalloc.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            return Err(format!(
                "mmap gntalloc index {index:#x}: {}",
                errno_text(&e)
            ));
        }
        let view = NonNull::new(p.cast::<u8>()).ok_or("mmap returned NULL")?;
        if let Some(g) = self.grants.borrow_mut().get_mut(id) {
            g.view = Some(view);
        }
        Ok(GuestBuf {
            id,
            first_ref,
            pages,
        })
    }

    fn view(&self, buf: &GuestBuf, offset: usize, len: usize) -> Result<*mut u8, String> {
        match offset.checked_add(len) {
            Some(end) if end <= buf.pages * PAGE => {}
            _ => {
                return Err(format!(
                    "{len} bytes at {offset:#x} outside a {}-page buffer",
                    buf.pages
                ))
            }
        }
        let g = self.grants.borrow();
        let view = g
            .get(buf.id)
            .and_then(|g| g.view)
            .ok_or_else(|| format!("buffer at ref {} already released", buf.first_ref))?;
        // SAFETY: `offset + len <= pages * 4096`, inside the view mapping (checked above).
        Ok(unsafe { view.as_ptr().add(offset) })
    }

    /// The guest writes `data` at `offset` of `buf`.
    pub fn write(&self, buf: &GuestBuf, offset: usize, data: &[u8]) -> Result<(), String> {
        let p = self.view(buf, offset, data.len())?;
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: `p..p + data.len()` lies in the live view (checked by `view`); the page
            // is shared with the backend, so every access is volatile.
            unsafe { p.add(i).write_volatile(b) };
        }
        Ok(())
    }

    /// The guest reads `len` bytes at `offset` of `buf`.
    pub fn read(&self, buf: &GuestBuf, offset: usize, len: usize) -> Result<Vec<u8>, String> {
        let p = self.view(buf, offset, len)?;
        // SAFETY: `p..p + len` lies in the live view (checked by `view`); volatile as above.
        Ok((0..len)
            .map(|i| unsafe { p.add(i).read_volatile() })
            .collect())
    }

    /// Whether a fresh gntdev map of `gref` (domid 0) can be mmapped, i.e. the grant is still
    /// active. A ref that is not granted passes MAP_GRANT_REF and fails the mmap with EINVAL.
    pub fn ref_is_mappable(&self, gref: u32) -> Result<bool, String> {
        let index = self
            .checker
            .map_grant_refs(&[(u32::from(DOMID), gref)])
            .map_err(|e| format!("check MAP_GRANT_REF ref {gref}: {}", errno_text(&e)))?;
        let off = libc::off_t::try_from(index).map_err(|_| format!("index {index:#x}"))?;
        // SAFETY: a fresh read-only shared mapping of our own gntdev fd at the index just
        // registered; checked for MAP_FAILED and unmapped below without being read.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ,
                libc::MAP_SHARED,
                self.checker.as_raw_fd(),
                off,
            )
        };
        let r = if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                Ok(false)
            } else {
                Err(format!("check mmap ref {gref}: {}", errno_text(&e)))
            }
        } else {
            // SAFETY: exactly the one-page mapping made above, never referenced.
            unsafe { libc::munmap(p, PAGE) };
            Ok(true)
        };
        self.checker
            .unmap_grant_ref(index, 1)
            .map_err(|e| format!("check UNMAP_GRANT_REF ref {gref}: {}", errno_text(&e)))?;
        r
    }

    /// Ends every grant of this guest and checks that nothing still mapped them (see the
    /// module docs). Ok with a summary, or Err naming every problem.
    pub fn release_all(&self) -> Result<String, String> {
        let grants: Vec<Grant> = self.grants.borrow_mut().drain(..).collect();
        let mut problems = Vec::new();
        let mut refs = Vec::new();
        for g in &grants {
            if let Some(v) = g.view {
                // SAFETY: the view mapping made in `grant`, of exactly this size; buffers
                // referring to it are rejected from now on (the grant is drained).
                if unsafe { libc::munmap(v.as_ptr().cast(), g.refs.len() * PAGE) } != 0 {
                    problems.push(format!("munmap view index {:#x}", g.index));
                }
            }
            for (i, &r) in g.refs.iter().enumerate() {
                refs.push((r, g.index + (i * PAGE) as u64));
            }
        }
        // One page at a time, highest ref first: Linux pushes freed refs on the head of its
        // free list, so the next allocations get them back in ascending order (consecutive
        // refs for multi-page buffers, as on a fresh boot).
        refs.sort_unstable_by_key(|r| std::cmp::Reverse(r.0));
        for &(r, index) in &refs {
            if let Err(e) = self.gntalloc.dealloc_gref(index, 1) {
                problems.push(format!(
                    "DEALLOC_GREF ref {r} index {index:#x}: {}",
                    errno_text(&e)
                ));
            }
        }
        let refs: Vec<u32> = refs.into_iter().map(|(r, _)| r).collect();
        let mut still = Vec::new();
        for &r in &refs {
            match self.ref_is_mappable(r) {
                Ok(false) => {}
                Ok(true) => still.push(r),
                Err(e) => problems.push(e),
            }
        }
        if !still.is_empty() {
            problems.push(format!(
                "{} ref(s) still granted after DEALLOC (someone maps them): {:?}",
                still.len(),
                &still[..still.len().min(8)]
            ));
        }
        let (deferred, other): (Vec<String>, Vec<String>) = self
            .kernel_grant_lines()
            .into_iter()
            .partition(|l| l.contains("g.e."));
        if !deferred.is_empty() {
            problems.push(format!("kernel log: {}", deferred.join(" | ")));
        }
        if problems.is_empty() {
            Ok(format!(
                "{} grants ({} pages) DEALLOC ok and no longer mappable, {}{}",
                grants.len(),
                refs.len(),
                if self.kmsg.is_some() {
                    "kernel log clean"
                } else {
                    "kernel log unreadable"
                },
                if other.is_empty() {
                    String::new()
                } else {
                    format!(" (kernel said: {})", other.join(" | "))
                }
            ))
        } else {
            Err(problems.join("; "))
        }
    }

    /// New kernel log lines about grant entries ("deferring g.e. …", "leaking g.e. …").
    pub fn kernel_grant_lines(&self) -> Vec<String> {
        self.kmsg
            .as_ref()
            .map(|k| {
                k.new_lines()
                    .into_iter()
                    .filter(|l| l.contains("g.e.") || l.contains("grant"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for RealGuest {
    fn drop(&mut self) {
        // Best effort for grants a failed test left behind.
        for g in self.grants.get_mut().drain(..) {
            if let Some(v) = g.view {
                // SAFETY: the view mapping made in `grant`, of exactly this size; no buffer
                // can reach it once the guest is gone.
                unsafe { libc::munmap(v.as_ptr().cast(), g.refs.len() * PAGE) };
            }
            let _ = self.gntalloc.dealloc_gref(g.index, g.refs.len() as u32);
        }
    }
}

/// `/dev/kmsg`, positioned at its end when opened: each read returns one new record.
#[derive(Debug)]
pub struct Kmsg {
    fd: std::os::fd::OwnedFd,
}

impl Kmsg {
    /// Opens the kernel log (None if it cannot be read).
    pub fn open() -> Option<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: a NUL-terminated path; the returned fd is checked and then owned.
        let fd = unsafe {
            libc::open(
                c"/dev/kmsg".as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain lseek on our fd: skip the records logged so far.
        unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
        Some(Kmsg { fd })
    }

    /// The messages logged since the last call.
    pub fn new_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: reads at most `buf.len()` bytes into our buffer.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                // EPIPE: records were overwritten; the next read continues after them.
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EPIPE) {
                    continue;
                }
                break;
            }
            if n == 0 {
                break;
            }
            let rec = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
            // "prio,seq,usec,flags;message\n continuation lines"
            let msg = rec.split_once(';').map_or(rec.as_str(), |(_, m)| m);
            out.push(msg.lines().next().unwrap_or_default().to_string());
        }
        out
    }
}
