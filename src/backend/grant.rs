//! GRANT regions mapped in advance (vrings): one MAP_GRANT_REF and one mmap for the pages that
//! cover the region's bytes, pointing at the region's in-page offset.

use super::{BackendError, HostMapping, Release};
use crate::device::{GrantPage, Protection, XenHandle};
use crate::xen_page::{frame_of, page_offset, pages_spanned};

/// Maps grant region `[gpa, gpa + size)` of `domid` read-write.
///
/// Pages are Xen pages (4 KiB) whatever the host page size; refs run consecutively from the
/// ref of `gpa`'s page. Unlike vm-memory, the returned mapping points at `gpa`'s in-page offset,
/// so a ring that starts mid-page reads its own bytes.
pub(crate) fn map_grant_region(
    dev: &XenHandle,
    domid: u16,
    gpa: u64,
    size: u64,
) -> Result<HostMapping, BackendError> {
    let first = frame_of(gpa);
    let pages = pages_spanned(page_offset(gpa), size);
    let err = |source| BackendError::GrantMap {
        domid,
        gpa,
        first_ref: first,
        pages,
        source,
    };
    // `from_wire` refuses such regions; a hand-built descriptor gets the same answer here.
    let refs: Vec<GrantPage> = (0..pages)
        .map(|i| {
            u32::try_from(first + i)
                .map(|gref| GrantPage { domid, gref })
                .map_err(|_| BackendError::GrantRefOutOfRange { gpa, size })
        })
        .collect::<Result<_, _>>()?;
    let index = dev.grant_map_refs(&refs).map_err(err)?;
    let base = match dev.grant_mmap(index, refs.len(), Protection::ReadWrite) {
        Ok(b) => b,
        Err(e) => {
            let _ = dev.grant_unmap_refs(index, refs.len());
            return Err(err(e));
        }
    };
    Ok(HostMapping {
        base,
        offset: page_offset(gpa) as usize,
        release: Release::Grant {
            dev: dev.clone(),
            index,
            pages: refs.len(),
        },
    })
}
