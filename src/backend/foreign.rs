//! FOREIGN regions: privcmd reservation + MMAPBATCH_V2 in bounded chunks, every per-frame
//! error checked, paged-out frames retried a bounded number of times.

use std::time::Duration;

use super::{BackendError, HostMapping, Release};
use std::ptr::NonNull;

use crate::device::{DeviceError, XenHandle};
use crate::xen_page::{page_offset, pages_spanned, XEN_PAGE_SHIFT, XEN_PAGE_SIZE};

/// Frames per MMAPBATCH_V2 call: bounds the kernel's temporary allocation and our err[] buffer.
pub const BATCH_FRAMES: usize = 1024;
/// Attempts for frames the hypervisor reports as paged out (`-ENOENT`).
pub const PAGED_OUT_ATTEMPTS: u32 = 5;

/// Maps foreign region `[gpa, gpa + size)` of `domid`.
///
/// Linux privcmd insists that the first MMAPBATCH on a privcmd mapping covers it whole, so
/// the region is one reservation of address space holding one privcmd mapping per chunk of
/// [`BATCH_FRAMES`] frames, each filled by one call (then per-frame retries of paged-out ones).
pub(crate) fn map_foreign_region(
    dev: &XenHandle,
    domid: u16,
    gpa: u64,
    size: u64,
) -> Result<HostMapping, BackendError> {
    let map_err = |source| BackendError::ForeignMap {
        domid,
        gpa,
        size,
        source,
    };
    let pages = pages_spanned(page_offset(gpa), size) as usize;
    let base = reserve(pages).map_err(map_err)?;
    // From here on the reservation is owned by `mapping` and released on every error path.
    let mut mapping = HostMapping {
        base,
        offset: page_offset(gpa) as usize,
        release: Release::Foreign {
            dev: dev.clone(),
            chunks: Vec::new(),
            pages,
        },
    };
    // A foreign gpa is a plain guest physical address (bit 63 is no grant marker here).
    let first_gfn = gpa >> XEN_PAGE_SHIFT;
    let mut errs = vec![0i32; BATCH_FRAMES.min(pages)];
    for start in (0..pages).step_by(BATCH_FRAMES) {
        let n = BATCH_FRAMES.min(pages - start);
        // In bounds: `start + n <= pages`, the size of the reservation.
        let chunk = NonNull::new(base.as_ptr().wrapping_add(start * XEN_PAGE_SIZE))
            .ok_or_else(|| map_err(DeviceError::sys("mmap(privcmd)", libc::EFAULT)))?;
        // SAFETY: the chunk lies inside our reservation, which nothing refers into yet.
        unsafe { dev.foreign_mmap_at(chunk, n) }.map_err(map_err)?;
        if let Release::Foreign { chunks, .. } = &mut mapping.release {
            chunks.push((chunk, n));
        }
        // SAFETY: `chunk` is a fresh privcmd mapping of exactly `n` pages.
        let faults = unsafe {
            fill_chunk(
                dev,
                domid,
                chunk,
                first_gfn + start as u64,
                n,
                &mut errs,
                true,
            )
        }
        .map_err(map_err)?;
        if let Some((_, fault)) = faults.into_iter().next() {
            return Err(fault.error(domid));
        }
    }
    Ok(mapping)
}

/// Why one frame of a chunk stayed unmapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// MMAPBATCH's per-frame error (positive errno) for this gfn.
    Errno {
        /// The frame.
        gfn: u64,
        /// Positive errno.
        errno: i32,
    },
    /// Still paged out after this many attempts.
    PagedOut {
        /// The frame.
        gfn: u64,
        /// Attempts made.
        attempts: u32,
    },
}

impl Fault {
    pub(crate) fn error(self, domid: u16) -> BackendError {
        match self {
            Fault::Errno { gfn, errno } => BackendError::ForeignFrame { domid, gfn, errno },
            Fault::PagedOut { gfn, attempts } => BackendError::ForeignPagedOut {
                domid,
                gfn,
                attempts,
            },
        }
    }
}

/// Fills the fresh privcmd mapping `chunk` of `n` pages with frames `first_gfn..+n`: one
/// MMAPBATCH_V2 for the whole chunk, then one-by-one retries of paged-out frames. Returns the
/// frames that stayed unmapped (slot in the chunk, why), sorted by slot; with `stop_at_first`
/// it returns at the first per-frame error (eager mapping fails the region there). Errors only
/// when a call fails as a whole.
///
/// # Safety
/// `chunk` is a privcmd mapping of exactly `n` pages made through `dev` that no batch has
/// filled yet and that nothing refers into.
pub(super) unsafe fn fill_chunk(
    dev: &XenHandle,
    domid: u16,
    chunk: NonNull<u8>,
    first_gfn: u64,
    n: usize,
    errs: &mut Vec<i32>,
    stop_at_first: bool,
) -> Result<Vec<(usize, Fault)>, DeviceError> {
    if errs.len() < n {
        errs.resize(n, 0);
    }
    let mut faults = Vec::new();
    let mut gfns: Vec<u64> = (0..n).map(|i| first_gfn + i as u64).collect();
    let mut slots: Vec<usize> = (0..n).collect();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let errs = &mut errs[..gfns.len()];
        errs.fill(0);
        let r = if attempt == 1 {
            // SAFETY: `chunk` is a fresh privcmd mapping of exactly `n` pages (caller).
            unsafe { dev.foreign_map_batch(domid, chunk, &gfns, errs) }
        } else {
            retry_one_by_one(dev, domid, chunk, &gfns, &slots, errs)
        };
        match r {
            Ok(()) => {}
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            Err(source) => return Err(source),
        }
        let mut again = (Vec::new(), Vec::new());
        for (i, &e) in errs.iter().enumerate() {
            match e {
                0 => {}
                e if e == -libc::ENOENT => {
                    again.0.push(gfns[i]);
                    again.1.push(slots[i]);
                }
                e => {
                    faults.push((
                        slots[i],
                        Fault::Errno {
                            gfn: gfns[i],
                            errno: -e,
                        },
                    ));
                    if stop_at_first {
                        return Ok(faults);
                    }
                }
            }
        }
        if again.0.is_empty() {
            break;
        }
        if attempt >= PAGED_OUT_ATTEMPTS {
            faults.extend(again.0.iter().zip(&again.1).map(|(&gfn, &slot)| {
                (
                    slot,
                    Fault::PagedOut {
                        gfn,
                        attempts: attempt,
                    },
                )
            }));
            break;
        }
        // Give the pager a moment to bring the frames back.
        std::thread::sleep(Duration::from_millis(1 << attempt));
        (gfns, slots) = again;
    }
    faults.sort_by_key(|&(slot, _)| slot);
    Ok(faults)
}

/// Reserves address space for a region's privcmd mappings (no access, no memory).
pub(super) fn reserve(pages: usize) -> Result<NonNull<u8>, DeviceError> {
    crate::device::reserve::reserve("mmap(reserve)", pages)
}

/// Re-batches scattered frames one at a time at their own slots, so each lands at its gpa.
fn retry_one_by_one(
    dev: &XenHandle,
    domid: u16,
    base: NonNull<u8>,
    gfns: &[u64],
    slots: &[usize],
    errs: &mut [i32],
) -> Result<(), DeviceError> {
    for ((gfn, slot), err) in gfns.iter().zip(slots).zip(errs.iter_mut()) {
        let mut e = [0i32];
        // SAFETY: `slot` is an unmapped page of the chunk's privcmd mapping; nothing refers
        // into it.
        let r = unsafe {
            dev.foreign_map_batch(
                domid,
                base.add(slot * XEN_PAGE_SIZE),
                std::slice::from_ref(gfn),
                &mut e,
            )
        };
        *err = e[0];
        match r {
            Err(x) if x.errno() != Some(libc::ENOENT) => return Err(x),
            _ => {}
        }
    }
    Ok(())
}

/// How a table's ordinary FOREIGN regions get their mapping. Chosen by the backend (per
/// region, [`crate::XenRegion::with_foreign_mapping`]); the frontend's "no advance" flag on a
/// FOREIGN region is still refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForeignMapping {
    /// The whole region is mapped when it is added (one privcmd mapping + MMAPBATCH per
    /// [`BATCH_FRAMES`] frames).
    #[default]
    Eager,
    /// Only address space is reserved when the region is added; each bucket of
    /// `bucket_frames` frames (a power of two, at most [`BATCH_FRAMES`]) is mapped the first
    /// time a request scope touches it (one privcmd mapping + one MMAPBATCH), held by every
    /// live scope that touched it, and unmapped again only when the handle's bound
    /// ([`crate::XenHandle::set_lazy_bucket_limit`]) needs room and no scope holds it. Only
    /// request scopes reach the region's bytes: a plain-table access fails with
    /// [`crate::region::OnDemandAccess`].
    Lazy {
        /// Frames per bucket; [`DEFAULT_BUCKET_FRAMES`] is QEMU mapcache's 1 MiB.
        bucket_frames: usize,
    },
}

/// Frames per lazily mapped bucket unless told otherwise: 1 MiB, as QEMU's mapcache.
pub const DEFAULT_BUCKET_FRAMES: usize = 256;

impl ForeignMapping {
    /// Lazy mapping with [`DEFAULT_BUCKET_FRAMES`].
    pub const fn lazy() -> Self {
        ForeignMapping::Lazy {
            bucket_frames: DEFAULT_BUCKET_FRAMES,
        }
    }
}
