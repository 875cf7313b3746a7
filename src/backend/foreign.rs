//! FOREIGN regions: privcmd reservation + MMAPBATCH_V2 in bounded chunks, every per-frame
//! error checked, paged-out frames retried a bounded number of times.

use std::time::Duration;

use super::{BackendError, HostMapping, Release};
use crate::device::XenDev;
use crate::xen_page::{page_offset, pages_spanned, XEN_PAGE_SHIFT, XEN_PAGE_SIZE};

/// Frames per MMAPBATCH_V2 call: bounds the kernel's temporary allocation and our err[] buffer.
pub const BATCH_FRAMES: usize = 1024;
/// Attempts for frames the hypervisor reports as paged out (`-ENOENT`).
pub const PAGED_OUT_ATTEMPTS: u32 = 5;

/// Maps foreign region `[gpa, gpa + size)` of `domid`.
pub fn map_foreign_region(
    dev: &XenDev,
    domid: u16,
    gpa: u64,
    size: u64,
) -> Result<HostMapping, BackendError> {
    let pages = pages_spanned(page_offset(gpa), size) as usize;
    let base = dev
        .foreign_mmap(pages)
        .map_err(|source| BackendError::ForeignMap {
            domid,
            gpa,
            size,
            source,
        })?;
    // From here on the reservation is owned by `mapping` and released on every error path.
    let mapping = HostMapping {
        base,
        offset: page_offset(gpa) as usize,
        len: size as usize,
        release: Release::Foreign {
            dev: dev.clone(),
            pages,
        },
    };
    // A foreign gpa is a plain guest physical address (bit 63 is no grant marker here).
    let first_gfn = gpa >> XEN_PAGE_SHIFT;
    let mut errs = vec![0i32; BATCH_FRAMES.min(pages)];
    for start in (0..pages).step_by(BATCH_FRAMES) {
        let n = BATCH_FRAMES.min(pages - start);
        let mut gfns: Vec<u64> = (start..start + n).map(|i| first_gfn + i as u64).collect();
        let mut slots: Vec<usize> = (start..start + n).collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let errs = &mut errs[..gfns.len()];
            errs.fill(0);
            // The first pass maps the whole chunk in one call; retries of scattered paged-out
            // frames map one frame at a time at its own slot.
            let r = if slots.len() == n && attempt == 1 {
                // SAFETY: `base + start` pages lies inside our reservation of `pages` pages,
                // with room for `n` pages; nothing refers into it yet.
                unsafe {
                    dev.foreign_map_batch(
                        domid,
                        base.add(start * XEN_PAGE_SIZE as usize),
                        &gfns,
                        errs,
                    )
                }
            } else {
                retry_one_by_one(dev, domid, base, &gfns, &slots, errs)
            };
            match r {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::ENOENT) => {}
                Err(source) => {
                    return Err(BackendError::ForeignMap {
                        domid,
                        gpa,
                        size,
                        source,
                    })
                }
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

/// Re-batches scattered frames one at a time at their own slots, so each lands at its gpa.
fn retry_one_by_one(
    dev: &XenDev,
    domid: u16,
    base: std::ptr::NonNull<u8>,
    gfns: &[u64],
    slots: &[usize],
    errs: &mut [i32],
) -> Result<(), crate::device::DeviceError> {
    for ((gfn, slot), err) in gfns.iter().zip(slots).zip(errs.iter_mut()) {
        let mut e = [0i32];
        // SAFETY: `slot` is a page index inside our reservation; nothing refers into it.
        let r = unsafe {
            dev.foreign_map_batch(
                domid,
                base.add(slot * XEN_PAGE_SIZE as usize),
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
