//! The device boundary: the handful of things the kernel's Xen drivers do for us.
//!
//! [`XenDriver`] is the trait: each method is exactly one system call on real Xen, so
//! counting calls through [`XenHandle`] (the handle every region and request scope holds)
//! counts syscalls. Two implementations: [`real::RealXen`] on `xen-sys`, and, with the
//! `test-utils` feature, `testing::EmulatedXen`, a memfd-backed grant table and frame table
//! that enforces what Xen enforces, so every layer above runs and is tested on any machine.

pub(crate) mod budget;
pub mod counters;
pub mod real;
pub(crate) mod reserve;

use std::ptr::NonNull;
use std::sync::Arc;

pub use counters::{CounterSnapshot, Counters};

/// Page protection of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protection {
    /// `PROT_READ`: gntdev maps the grant read-only.
    ReadOnly,
    /// `PROT_READ | PROT_WRITE`.
    ReadWrite,
}

impl Protection {
    /// The `mmap` protection bits.
    pub fn bits(self) -> libc::c_int {
        match self {
            Protection::ReadOnly => libc::PROT_READ,
            Protection::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        }
    }
}

/// One page a domain granted: the granting domain and the grant ref, as gntdev maps it and
/// grant copy reads and writes it (a request scope also keys its pages by it). Not to be
/// confused with [`xen_sys::xen::GrantRef`], the bare ref number of Xen's ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GrantPage {
    /// Granting domain.
    pub domid: u16,
    /// Grant reference.
    pub gref: u32,
}

/// Direction of one grant-copy segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyDirection {
    /// Guest page to local buffer.
    FromGuest,
    /// Local buffer to guest page.
    ToGuest,
}

/// One grant-copy segment: `len` bytes at `offset` in grant `grant`, to or from `local`.
/// A segment never crosses a Xen page.
#[derive(Clone, Copy, Debug)]
pub struct CopySegment {
    /// The guest page.
    pub grant: GrantPage,
    /// Offset inside the guest page.
    pub offset: u16,
    /// Bytes to copy; `offset + len <= 4096`.
    pub len: u16,
    /// Local buffer.
    pub local: *mut u8,
    /// Which way.
    pub direction: CopyDirection,
    /// Xen's per-segment status (`GNTST_*`), written by the call; 0 is success.
    pub status: i16,
}

/// Grant-copy statuses. On Xen 4.17 an ungranted ref gives `GNTST_BAD_GNTREF` (-3) and a write
/// to a read-only grant gives `GNTST_GENERAL_ERROR` (-1), not `GNTST_PERMISSION_DENIED`.
pub use xen_sys::xen::{
    GNTST_BAD_COPY_ARG, GNTST_BAD_GNTREF, GNTST_GENERAL_ERROR, GNTST_OKAY, GNTST_PERMISSION_DENIED,
};

/// Errors of the device boundary: the failing call and its errno.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Syscall {
        /// Which call.
        call: &'static str,
        /// The errno.
        source: std::io::Error,
    },
    /// The device node could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// Device path.
        path: &'static str,
        /// The errno.
        source: std::io::Error,
    },
}

impl DeviceError {
    /// The errno, when the kernel (or the emulation) returned one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            DeviceError::Syscall { source, .. } | DeviceError::Open { source, .. } => {
                source.raw_os_error()
            }
        }
    }

    pub(crate) fn sys(call: &'static str, errno: i32) -> Self {
        DeviceError::Syscall {
            call,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    pub(crate) fn last(call: &'static str) -> Self {
        DeviceError::Syscall {
            call,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// The one system call each [`XenDriver`] method makes on the real drivers (`RealXen`), by
/// method name: what the daemon's seccomp allowlists must allow in a thread that calls it
/// (`daemon::threads`; the emulation records which thread kinds call which methods, and
/// `tests/sandbox.rs` checks them against the lists).
pub const DRIVER_SYSCALLS: &[(&str, &str)] = &[
    ("grant_map_refs", "SYS_ioctl"),
    ("grant_mmap", "SYS_mmap"),
    ("grant_munmap", "SYS_munmap"),
    ("grant_unmap_refs", "SYS_ioctl"),
    ("grant_copy", "SYS_ioctl"),
    ("foreign_mmap_at", "SYS_mmap"),
    ("foreign_map_batch", "SYS_ioctl"),
    ("foreign_munmap", "SYS_munmap"),
    ("foreign_unmap_to_reserve", "SYS_mmap"),
];

/// What the Xen drivers do for a vhost-user backend. One method, one system call.
///
/// Implementations must be usable from several threads (one worker per queue).
pub trait XenDriver: Send + Sync + std::fmt::Debug {
    /// `IOCTL_GNTDEV_MAP_GRANT_REF`: registers `refs` (not necessarily consecutive) and returns
    /// the offset to `mmap`. Refs are not checked until [`XenDriver::grant_mmap`].
    fn grant_map_refs(&self, refs: &[GrantPage]) -> Result<u64, DeviceError>;

    /// `mmap` of a whole grant map registered at `index` with `pages` pages. Mapping only part
    /// of a map fails with `EINVAL` on the real driver; the emulation refuses it the same way.
    fn grant_mmap(
        &self,
        index: u64,
        pages: usize,
        prot: Protection,
    ) -> Result<NonNull<u8>, DeviceError>;

    /// `munmap` of a mapping returned by [`XenDriver::grant_mmap`].
    ///
    /// # Safety
    /// `addr`/`pages` must be exactly a mapping returned by `grant_mmap` of this device, and no
    /// reference into it may be used afterwards.
    unsafe fn grant_munmap(&self, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError>;

    /// `IOCTL_GNTDEV_UNMAP_GRANT_REF`: forgets the map at `index` (after its `munmap`).
    fn grant_unmap_refs(&self, index: u64, pages: usize) -> Result<(), DeviceError>;

    /// `IOCTL_GNTDEV_GRANT_COPY`: runs all segments in order; each gets its own status.
    ///
    /// # Safety
    /// Every segment's `local` must be valid for `len` bytes, writable for
    /// [`CopyDirection::FromGuest`], and not accessed by anything else during the call.
    unsafe fn grant_copy(&self, segments: &mut [CopySegment]) -> Result<(), DeviceError>;

    /// `mmap` of `/dev/xen/privcmd` at `addr` (`MAP_FIXED`): a privcmd mapping of `pages`
    /// pages for foreign frames. The first MMAPBATCH on it must cover it whole.
    ///
    /// # Safety
    /// `addr..addr + pages` must be address space the caller owns (e.g. its own reservation)
    /// with no live references into it: it is replaced.
    unsafe fn foreign_mmap_at(&self, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError>;

    /// `IOCTL_PRIVCMD_MMAPBATCH_V2`: maps `gfns` of `domid` at `addr`, writing a per-frame
    /// error (0 or `-errno`) into `errs`. Returns `ENOENT` when some frames are paged out.
    /// The first call on a privcmd mapping must cover all of it; later calls may only fill
    /// pages left unmapped (retries of paged-out frames).
    ///
    /// # Safety
    /// `addr` must point into a mapping from [`XenDriver::foreign_mmap_at`] of this device with
    /// room for `gfns.len()` pages, and nothing may hold references into those pages.
    unsafe fn foreign_map_batch(
        &self,
        domid: u16,
        addr: NonNull<u8>,
        gfns: &[u64],
        errs: &mut [i32],
    ) -> Result<(), DeviceError>;

    /// `munmap` of a mapping from [`XenDriver::foreign_mmap_at`].
    ///
    /// # Safety
    /// As for [`XenDriver::grant_munmap`].
    unsafe fn foreign_munmap(&self, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError>;

    /// Replaces the privcmd mapping of `pages` pages at `addr` (made by
    /// [`XenDriver::foreign_mmap_at`]) with an inaccessible reservation, in one `mmap`
    /// (`MAP_FIXED`, `PROT_NONE`): the address range never has a hole another mapping could
    /// land in. Unmaps a lazily mapped bucket that is evicted.
    ///
    /// # Safety
    /// `addr` must be exactly such a mapping, with no references into it.
    unsafe fn foreign_unmap_to_reserve(
        &self,
        addr: NonNull<u8>,
        pages: usize,
    ) -> Result<(), DeviceError>;
}

/// [`XenHandle::set_lazy_bucket_limit`] while lazy FOREIGN regions are alive on the handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the lazy bucket bound cannot change while {regions} lazy FOREIGN regions are alive")]
pub struct LazyLimitBusy {
    /// Lazy regions alive on the handle.
    pub regions: usize,
}

/// A device plus the counters of every call made through it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct XenHandle {
    dev: Arc<dyn XenDriver>,
    counters: Arc<Counters>,
    /// The lazy FOREIGN buckets of every region on this handle and its clones.
    budget: Arc<budget::LazyBudget>,
}

impl XenHandle {
    /// Wraps a device with fresh counters.
    pub fn new(dev: Arc<dyn XenDriver>) -> Self {
        XenHandle {
            dev,
            counters: Arc::new(Counters::default()),
            budget: Arc::default(),
        }
    }

    /// Bounds the lazily mapped FOREIGN buckets ([`crate::ForeignMapping::Lazy`]) of all the
    /// regions on this handle and its clones (a daemon's every connection) to `max`. Mapping
    /// a bucket past it first unmaps buckets no request scope holds; if none can go, the
    /// access fails with [`crate::backend::BackendError::LazyBucketLimit`]. Unbounded by
    /// default, and then a scope takes no holds (nothing is ever evicted): a warm access to
    /// a lazy bucket costs one load. Set it before the first lazy region is built (a daemon:
    /// before serving); with lazy regions alive it is refused.
    pub fn set_lazy_bucket_limit(&self, max: usize) -> Result<(), LazyLimitBusy> {
        self.budget
            .set_max(max)
            .map_err(|regions| LazyLimitBusy { regions })
    }

    /// The bound set by [`XenHandle::set_lazy_bucket_limit`] (`usize::MAX`: none).
    pub fn lazy_bucket_limit(&self) -> usize {
        self.budget.max()
    }

    /// Lazily mapped FOREIGN buckets mapped now, over all regions on this handle.
    pub fn lazy_buckets_mapped(&self) -> usize {
        self.budget.mapped()
    }

    /// Lazily mapped buckets unmapped to make room so far.
    pub fn lazy_evictions(&self) -> u64 {
        self.budget.evictions()
    }

    pub(crate) fn budget(&self) -> &Arc<budget::LazyBudget> {
        &self.budget
    }

    /// True when both are clones of one handle: they share its counters (and so its device).
    /// Two handles made by separate [`XenHandle::new`] calls are different even when they wrap
    /// the same device, since their counts would split. A request scope and a region table
    /// use this to keep all their Xen memory on one handle.
    pub fn same_device(&self, other: &XenHandle) -> bool {
        Arc::ptr_eq(&self.counters, &other.counters)
    }

    /// The counters of calls made through this handle and its clones.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    fn count<T>(&self, r: Result<T, DeviceError>) -> Result<T, DeviceError> {
        if r.is_err() {
            self.counters.add_error();
        }
        r
    }

    /// One unmap through the device: counted as a munmap, and as one mapping fewer if it
    /// worked.
    fn count_unmap(
        &self,
        unmap: impl FnOnce() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        self.counters.add_munmap();
        let r = self.count(unmap());
        if r.is_ok() {
            self.counters.unmapped();
        }
        r
    }

    /// See [`XenDriver::grant_map_refs`].
    pub fn grant_map_refs(&self, refs: &[GrantPage]) -> Result<u64, DeviceError> {
        self.counters.add_ioctl();
        self.count(self.dev.grant_map_refs(refs))
    }

    /// See [`XenDriver::grant_mmap`].
    pub fn grant_mmap(
        &self,
        index: u64,
        pages: usize,
        prot: Protection,
    ) -> Result<NonNull<u8>, DeviceError> {
        self.counters.add_mmap();
        let r = self.count(self.dev.grant_mmap(index, pages, prot));
        if r.is_ok() {
            self.counters.mapped(pages);
        }
        r
    }

    /// See [`XenDriver::grant_munmap`].
    ///
    /// # Safety
    /// As for [`XenDriver::grant_munmap`].
    pub unsafe fn grant_munmap(&self, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError> {
        // SAFETY: forwarded contract.
        self.count_unmap(|| unsafe { self.dev.grant_munmap(addr, pages) })
    }

    /// See [`XenDriver::grant_unmap_refs`].
    pub fn grant_unmap_refs(&self, index: u64, pages: usize) -> Result<(), DeviceError> {
        self.counters.add_ioctl();
        self.count(self.dev.grant_unmap_refs(index, pages))
    }

    /// See [`XenDriver::grant_copy`].
    ///
    /// # Safety
    /// As for [`XenDriver::grant_copy`].
    pub unsafe fn grant_copy(&self, segments: &mut [CopySegment]) -> Result<(), DeviceError> {
        self.counters.add_grant_copy(segments.len());
        // SAFETY: forwarded contract.
        self.count(unsafe { self.dev.grant_copy(segments) })
    }

    /// See [`XenDriver::foreign_mmap_at`].
    ///
    /// # Safety
    /// As for [`XenDriver::foreign_mmap_at`].
    pub unsafe fn foreign_mmap_at(
        &self,
        addr: NonNull<u8>,
        pages: usize,
    ) -> Result<(), DeviceError> {
        self.counters.add_mmap();
        // SAFETY: forwarded contract.
        let r = self.count(unsafe { self.dev.foreign_mmap_at(addr, pages) });
        if r.is_ok() {
            self.counters.mapped(pages);
        }
        r
    }

    /// See [`XenDriver::foreign_map_batch`].
    ///
    /// # Safety
    /// As for [`XenDriver::foreign_map_batch`].
    pub unsafe fn foreign_map_batch(
        &self,
        domid: u16,
        addr: NonNull<u8>,
        gfns: &[u64],
        errs: &mut [i32],
    ) -> Result<(), DeviceError> {
        self.counters.add_ioctl();
        // SAFETY: forwarded contract.
        self.count(unsafe { self.dev.foreign_map_batch(domid, addr, gfns, errs) })
    }

    /// See [`XenDriver::foreign_munmap`].
    ///
    /// # Safety
    /// As for [`XenDriver::foreign_munmap`].
    pub unsafe fn foreign_munmap(
        &self,
        addr: NonNull<u8>,
        pages: usize,
    ) -> Result<(), DeviceError> {
        // SAFETY: forwarded contract.
        self.count_unmap(|| unsafe { self.dev.foreign_munmap(addr, pages) })
    }

    /// See [`XenDriver::foreign_unmap_to_reserve`].
    ///
    /// # Safety
    /// As for [`XenDriver::foreign_unmap_to_reserve`].
    pub unsafe fn foreign_unmap_to_reserve(
        &self,
        addr: NonNull<u8>,
        pages: usize,
    ) -> Result<(), DeviceError> {
        // SAFETY: forwarded contract.
        self.count_unmap(|| unsafe { self.dev.foreign_unmap_to_reserve(addr, pages) })
    }
}
