//! Mapping backends: how each region kind gets its host mapping when it is added.
//!
//! One crate-private constructor per kind ([`unix`], [`foreign`], [`grant`]), one owned
//! result (the crate's `HostMapping`) that releases itself the way its kind requires. Public
//! here: the errors ([`BackendError`]) and the FOREIGN batching limits.

pub mod foreign;
pub mod grant;
pub(crate) mod lazy;
pub mod unix;

use std::ptr::NonNull;

use crate::device::{DeviceError, XenHandle};

/// Why a region could not be mapped. Each variant names the region or frame at fault.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `mmap` of a UNIX region's fd failed.
    #[error("mmap of UNIX region gpa {gpa:#x} size {size:#x} at fd offset {offset:#x}: {source}")]
    UnixMmap {
        /// Region gpa.
        gpa: u64,
        /// Region size.
        size: u64,
        /// fd offset.
        offset: u64,
        /// The errno.
        source: std::io::Error,
    },
    /// A UNIX region reaching past the end of its file: an access there would be SIGBUS.
    #[error("UNIX region gpa {gpa:#x} size {size:#x} at fd offset {offset:#x} ends past the file's {file_len:#x} bytes")]
    UnixBeyondFile {
        /// Region gpa.
        gpa: u64,
        /// Region size.
        size: u64,
        /// fd offset.
        offset: u64,
        /// The file's length.
        file_len: u64,
    },
    /// Reserving or batching foreign frames failed as a whole.
    #[error("foreign mapping of domain {domid} gpa {gpa:#x} size {size:#x}: {source}")]
    ForeignMap {
        /// Guest domain.
        domid: u16,
        /// Region gpa.
        gpa: u64,
        /// Region size.
        size: u64,
        /// The device error.
        source: DeviceError,
    },
    /// One frame could not be mapped (MMAPBATCH's per-frame error).
    #[error("foreign frame gfn {gfn:#x} of domain {domid}: errno {errno}")]
    ForeignFrame {
        /// Guest domain.
        domid: u16,
        /// The frame.
        gfn: u64,
        /// Positive errno from `err[]`.
        errno: i32,
    },
    /// A frame stayed paged out through every retry.
    #[error(
        "foreign frame gfn {gfn:#x} of domain {domid} still paged out after {attempts} attempts"
    )]
    ForeignPagedOut {
        /// Guest domain.
        domid: u16,
        /// The frame.
        gfn: u64,
        /// Attempts made.
        attempts: u32,
    },
    /// Mapping another lazily mapped FOREIGN bucket would pass the handle's bound
    /// ([`crate::XenHandle::set_lazy_bucket_limit`]) and every mapped bucket is in use.
    #[error(
        "lazy foreign bucket at gfn {gfn:#x} of domain {domid}: all {max} buckets the bound \
         allows are in use"
    )]
    LazyBucketLimit {
        /// Guest domain.
        domid: u16,
        /// First frame of the access that needed the bucket.
        gfn: u64,
        /// The bound.
        max: usize,
    },
    /// A grant region whose pages would need refs above `u32::MAX`.
    #[error("grant region gpa {gpa:#x} size {size:#x} needs refs above u32::MAX")]
    GrantRefOutOfRange {
        /// Region gpa.
        gpa: u64,
        /// Region size.
        size: u64,
    },
    /// Mapping a grant region in advance failed.
    #[error(
        "grant mapping of domain {domid} refs {first_ref:#x}+{pages} (gpa {gpa:#x}): {source}"
    )]
    GrantMap {
        /// Guest domain.
        domid: u16,
        /// Region gpa.
        gpa: u64,
        /// First grant ref.
        first_ref: u64,
        /// Pages.
        pages: u64,
        /// The device error.
        source: DeviceError,
    },
}

/// How a [`HostMapping`] gives its memory back.
#[derive(Debug)]
enum Release {
    /// Plain `munmap` of `len` bytes.
    Munmap { len: usize },
    /// A reservation of `pages` pages holding one privcmd mapping per chunk.
    Foreign {
        dev: XenHandle,
        chunks: Vec<(NonNull<u8>, usize)>,
        pages: usize,
    },
    /// gntdev mapping: munmap, then UNMAP_GRANT_REF.
    Grant {
        dev: XenHandle,
        index: u64,
        pages: usize,
    },
}

/// An owned host mapping of one region's bytes. The mapping starts at a page boundary; the
/// region's first byte sits `offset` bytes in (regions need not be page aligned).
#[derive(Debug)]
pub(crate) struct HostMapping {
    base: NonNull<u8>,
    offset: usize,
    release: Release,
}

// SAFETY: the mapping is plain shared memory owned by this value; it is only released in Drop.
unsafe impl Send for HostMapping {}
// SAFETY: as above; accesses through it are volatile slices, as for any guest memory.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Host address of the region's first byte.
    #[inline]
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        // In bounds: `offset` is less than a page and the mapping covers the region's bytes
        // from there.
        self.base.as_ptr().wrapping_add(self.offset)
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // Release errors cannot be returned from Drop; the device counts them.
        match &self.release {
            Release::Munmap { len } => {
                // SAFETY: `base`/`len` is exactly the mapping we created; it dies with us.
                unsafe { libc::munmap(self.base.as_ptr().cast(), *len) };
            }
            Release::Foreign { dev, chunks, pages } => {
                for (addr, n) in chunks {
                    // SAFETY: exactly a privcmd mapping we made through this device.
                    let _ = unsafe { dev.foreign_munmap(*addr, *n) };
                }
                // Whatever of the reservation no chunk replaced.
                // SAFETY: our own reservation; nothing refers into it any more.
                unsafe {
                    libc::munmap(
                        self.base.as_ptr().cast(),
                        *pages * crate::xen_page::XEN_PAGE_SIZE,
                    )
                };
            }
            Release::Grant { dev, index, pages } => {
                // SAFETY: exactly the gntdev mapping we made through this device.
                let _ = unsafe { dev.grant_munmap(self.base, *pages) };
                let _ = dev.grant_unmap_refs(*index, *pages);
            }
        }
    }
}
