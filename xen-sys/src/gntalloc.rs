//! `#[repr(C)]` structs of `<xen/gntalloc.h>` (`/dev/xen/gntalloc`).

use std::io;

use core::mem::offset_of;

use crate::flex::{FlexBuf, FlexHeader};

/// `GNTALLOC_FLAG_WRITABLE`: the grantee may write the pages.
pub const GNTALLOC_FLAG_WRITABLE: u16 = 1;

/// `struct ioctl_gntalloc_alloc_gref`, header part: the kernel writes `count`
/// grant refs from `gref_ids` on, past the end of this struct when
/// `count > 1`; build it with [`AllocGrefBuf`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlGntallocAllocGref {
    /// Domain to grant the pages to.
    pub domid: u16,
    /// `GNTALLOC_FLAG_*`.
    pub flags: u16,
    /// Number of pages.
    pub count: u32,
    /// Out: the mmap offset of the new pages.
    pub index: u64,
    /// Out: the first of `count` grant refs (a C flexible array, declared `[1]`).
    pub gref_ids: [u32; 1],
}

// SAFETY: repr(C) plain integers (zero is valid), alignment 8, and the
// flexible array of u32 starts at `gref_ids`.
unsafe impl FlexHeader for IoctlGntallocAllocGref {
    type Elem = u32;
    const ARRAY_OFFSET: usize = offset_of!(IoctlGntallocAllocGref, gref_ids);
}

/// The variable-length `IOCTL_GNTALLOC_ALLOC_GREF` argument.
pub type AllocGrefBuf = FlexBuf<IoctlGntallocAllocGref>;

impl AllocGrefBuf {
    /// A request for `count` pages granted to `domid`, with room for the refs.
    pub fn new(domid: u16, count: u32, writable: bool) -> io::Result<Self> {
        let mut buf = Self::zeroed(count as usize)?;
        let hdr = buf.header_mut();
        hdr.domid = domid;
        hdr.flags = if writable { GNTALLOC_FLAG_WRITABLE } else { 0 };
        hdr.count = count;
        Ok(buf)
    }
}

/// `struct ioctl_gntalloc_dealloc_gref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlGntallocDeallocGref {
    /// The `index` returned by the allocation.
    pub index: u64,
    /// Number of pages to release.
    pub count: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_buf_has_room_for_every_ref() {
        let mut buf = AllocGrefBuf::new(0, 5, true).unwrap();
        let hdr = *buf.header();
        assert_eq!(
            (hdr.domid, hdr.flags, hdr.count),
            (0, GNTALLOC_FLAG_WRITABLE, 5)
        );
        assert_eq!(
            buf.as_bytes().len(),
            16 + 5 * 4 + 4,
            "rounded up to 8 bytes"
        );
        buf.elems_mut().copy_from_slice(&[8, 9, 10, 11, 12]);
        assert_eq!(buf.header().gref_ids, [8]);
        let b = buf.as_bytes();
        assert_eq!(u32::from_ne_bytes(b[32..36].try_into().unwrap()), 12);
        assert_eq!(AllocGrefBuf::new(7, 1, false).unwrap().header().flags, 0);
    }
}
