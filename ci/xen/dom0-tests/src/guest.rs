//! A real "guest" in dom0: dom0 grants its own pages to itself (domid 0) through
//! `/dev/xen/gntalloc`, like `xen_vhost_mem::testing::GuestSim` does on the emulation.
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

use std::os::fd::AsRawFd;

use xen_sys::Gntdev;
use xen_vhost_mem::testing::GntallocGuest;
use xen_vhost_mem::testing::{Guest, GuestBuffer};

use xen_sys::xen::XEN_PAGE_SIZE as PAGE;
/// The domain the pages are granted to, and the domain the backend maps them from: dom0.
pub const DOMID: u16 = 0;

/// A buffer the guest granted: `pages` pages on consecutive refs from `first_ref`.
pub type GuestBuf = GuestBuffer;

/// dom0 as a guest that grants its own pages to itself: the library's [`GntallocGuest`], plus
/// the end-of-test checks.
#[derive(Debug)]
pub struct RealGuest {
    inner: GntallocGuest,
    /// A gntdev handle of our own (not the backend's), for the end-of-test re-map checks.
    checker: Gntdev,
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
        let inner = GntallocGuest::new().map_err(|e| e.to_string())?;
        let checker = Gntdev::open().map_err(|e| format!("open gntdev: {e}"))?;
        Ok(RealGuest {
            inner,
            checker,
            kmsg: Kmsg::open(),
        })
    }

    /// Grants `pages` fresh zeroed pages to dom0 (read-only grants when `readonly`), on
    /// consecutive refs (a Linux guest's buffer uses consecutive refs), and maps the guest's
    /// view of them.
    pub fn grant(&self, pages: usize, readonly: bool) -> Result<GuestBuf, String> {
        self.inner
            .grant(pages, readonly)
            .map_err(|e| format!("grant {pages} page(s): {e}"))
    }

    /// The guest writes `data` at `offset` of `buf`.
    pub fn write(&self, buf: &GuestBuf, offset: usize, data: &[u8]) -> Result<(), String> {
        self.inner
            .write(buf, offset, data)
            .map_err(|e| format!("guest write at ref {}: {e}", buf.first_ref))
    }

    /// The guest reads `len` bytes at `offset` of `buf`.
    pub fn read(&self, buf: &GuestBuf, offset: usize, len: usize) -> Result<Vec<u8>, String> {
        self.inner
            .read(buf, offset, len)
            .map_err(|e| format!("guest read at ref {}: {e}", buf.first_ref))
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
        let (refs, failures) = self.inner.end_all();
        let mut problems: Vec<String> = failures.iter().map(ToString::to_string).collect();
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
                "{} pages DEALLOC ok and no longer mappable, {}{}",
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
