//! Errors of request-scoped memory. They reach device code inside vm-memory's
//! `GuestMemoryError::IOError`; [`RequestError::from_guest_memory_error`] gets them back.

use vm_memory::GuestMemoryError;

use crate::device::DeviceError;

/// Why an access to an on-demand grant page, or the end of a scope, failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The guest never granted this ref (grant copy reported `GNTST_bad_gntref`).
    #[error("gpa {gpa:#x}: grant ref {gref:#x} of domain {domid} is not granted")]
    UnknownRef {
        /// The address accessed.
        gpa: u64,
        /// Granting domain.
        domid: u16,
        /// The ref.
        gref: u32,
    },
    /// A write to a page the guest granted read-only.
    #[error("gpa {gpa:#x}: grant ref {gref:#x} of domain {domid} is read-only")]
    ReadOnlyGrant {
        /// The address accessed.
        gpa: u64,
        /// Granting domain.
        domid: u16,
        /// The ref.
        gref: u32,
    },
    /// Grant copy failed for this page with another status.
    #[error("gpa {gpa:#x}: grant copy of ref {gref:#x} failed with status {status}")]
    GrantCopy {
        /// The address accessed.
        gpa: u64,
        /// The ref.
        gref: u32,
        /// Xen's `GNTST_*` status.
        status: i16,
    },
    /// Mapping this page failed (on real gntdev an ungranted ref fails the mmap with EINVAL).
    #[error("gpa {gpa:#x}: mapping grant ref {gref:#x} of domain {domid}: {source}")]
    GrantMap {
        /// The address accessed.
        gpa: u64,
        /// Granting domain.
        domid: u16,
        /// The ref.
        gref: u32,
        /// The device error.
        source: DeviceError,
    },
    /// The address lies in an on-demand region but beyond the last possible grant ref.
    #[error("gpa {gpa:#x} is beyond the last grant ref")]
    RefOutOfRange {
        /// The address accessed.
        gpa: u64,
    },
    /// A page was not fetched although its fetch reported success (a bug in this crate,
    /// reported rather than served short).
    #[error("gpa {gpa:#x}: page not fetched")]
    NotFetched {
        /// The address accessed.
        gpa: u64,
    },
    /// The on-demand region has no Xen device, or not the one this scope already uses.
    #[error("on-demand region at gpa {gpa:#x} has no device this scope can use")]
    NoDevice {
        /// The region's gpa.
        gpa: u64,
    },
    /// A whole device call failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Mapping a bucket of a lazy FOREIGN region failed, or a frame the access touches is
    /// missing from it (the error names the lowest such gfn).
    #[error(transparent)]
    Foreign(#[from] crate::backend::BackendError),
    /// The access would make the scope hold more on-demand pages than it may: a guest cannot
    /// make the daemon copy or map without bound.
    #[error("gpa {gpa:#x} len {len:#x}: scope would hold {pages} on-demand pages, limit {max}")]
    ScopeFull {
        /// The access.
        gpa: u64,
        /// Its length.
        len: usize,
        /// Pages the scope would hold.
        pages: usize,
        /// The limit ([`super::MAX_SCOPE_PAGES`]).
        max: usize,
    },
    /// No memory for bounce buffers.
    #[error("cannot allocate {pages} bounce pages")]
    OutOfMemory {
        /// Pages asked for.
        pages: usize,
    },
    /// Copying written bytes back to the guest failed for some pages.
    #[error("copy-back failed for {failed} page(s); first: ref {gref:#x} status {status}")]
    CopyBack {
        /// Pages that failed.
        failed: usize,
        /// First failing ref.
        gref: u32,
        /// Its status.
        status: i16,
    },
}

impl RequestError {
    /// The request error inside a `GuestMemoryError` returned by request-scoped memory, if any.
    pub fn from_guest_memory_error(e: &GuestMemoryError) -> Option<&RequestError> {
        match e {
            GuestMemoryError::IOError(io) => io.get_ref()?.downcast_ref::<RequestError>(),
            _ => None,
        }
    }

    pub(crate) fn into_guest_memory_error(self) -> GuestMemoryError {
        GuestMemoryError::IOError(std::io::Error::other(self))
    }
}
