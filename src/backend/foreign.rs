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
        let mut gfns: Vec<u64> = (start..start + n).map(|i| first_gfn + i as u64).collect();
        let mut slots: Vec<usize> = (0..n).collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let errs = &mut errs[..gfns.len()];
            errs.fill(0);
            let r = if attempt == 1 {
                // SAFETY: `chunk` is a fresh privcmd mapping of exactly `n` pages.
                unsafe { dev.foreign_map_batch(domid, chunk, &gfns, errs) }
            } else {
                retry_one_by_one(dev, domid, chunk, &gfns, &slots, errs)
            };
            match r {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::ENOENT) => {}
                Err(source) => return Err(map_err(source)),
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
                        return Err(BackendError::ForeignFrame {
                            domid,
                            gfn: gfns[i],
                            errno: -e,
                        })
                    }
                }
            }
            if again.0.is_empty() {
                break;
            }
            if attempt >= PAGED_OUT_ATTEMPTS {
                return Err(BackendError::ForeignPagedOut {
                    domid,
                    gfn: again.0[0],
                    attempts: attempt,
                });
            }
            // Give the pager a moment to bring the frames back.
            std::thread::sleep(Duration::from_millis(1 << attempt));
            (gfns, slots) = again;
        }
    }
    Ok(mapping)
}

/// Reserves address space for a region's privcmd mappings (no access, no memory).
fn reserve(pages: usize) -> Result<NonNull<u8>, DeviceError> {
    const CALL: &str = "mmap(reserve)";
    let len = pages
        .checked_mul(XEN_PAGE_SIZE)
        .ok_or(DeviceError::sys(CALL, libc::EOVERFLOW))?;
    // SAFETY: a fresh anonymous mapping at a kernel-chosen address; checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(DeviceError::last(CALL));
    }
    NonNull::new(p.cast()).ok_or(DeviceError::sys(CALL, libc::EFAULT))
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
