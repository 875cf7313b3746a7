//! `#[repr(C)]` structs of `<xen/gntdev.h>` (`/dev/xen/gntdev`).

use std::io;

use core::ffi::c_void;
use core::mem::offset_of;

use crate::flex::{FlexBuf, FlexHeader};
use crate::xen::{DomId, GrantRef, GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF};

/// `UNMAP_NOTIFY_CLEAR_BYTE`: zero the byte at `index` when the page is unmapped.
pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// `UNMAP_NOTIFY_SEND_EVENT`: signal `event_channel_port` when the page is unmapped.
pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;

/// `struct ioctl_gntdev_grant_ref`: one grant to map. `domid` is 32 bits here
/// although domain ids are 16.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlGntdevGrantRef {
    /// Domain that granted the page.
    pub domid: u32,
    /// The grant ref (C: `ref`).
    pub gref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref`, header part: the kernel reads `count`
/// refs from `refs` on, past the end of this struct when `count > 1`; build it
/// with [`MapGrantRefBuf`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlGntdevMapGrantRef {
    /// Number of refs.
    pub count: u32,
    /// Padding.
    pub pad: u32,
    /// Out: the offset to pass to `mmap` for exactly this map.
    pub index: u64,
    /// The first of `count` refs (a C flexible array, declared `[1]`).
    pub refs: [IoctlGntdevGrantRef; 1],
}

// SAFETY: repr(C) plain integers (zero is valid), alignment 8, and the
// flexible array of IoctlGntdevGrantRef starts at `refs`.
unsafe impl FlexHeader for IoctlGntdevMapGrantRef {
    type Elem = IoctlGntdevGrantRef;
    const ARRAY_OFFSET: usize = offset_of!(IoctlGntdevMapGrantRef, refs);
}

/// The variable-length `IOCTL_GNTDEV_MAP_GRANT_REF` argument.
pub type MapGrantRefBuf = FlexBuf<IoctlGntdevMapGrantRef>;

impl MapGrantRefBuf {
    /// A request mapping `refs`, given as `(domid, ref)` pairs, in that order.
    /// `InvalidInput` if there are more than `u32::MAX`.
    pub fn from_refs(refs: &[(u32, u32)]) -> io::Result<Self> {
        let count = u32::try_from(refs.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} grant refs", refs.len()),
            )
        })?;
        let mut buf = Self::zeroed(refs.len())?;
        buf.header_mut().count = count;
        for (slot, &(domid, gref)) in buf.elems_mut().iter_mut().zip(refs) {
            *slot = IoctlGntdevGrantRef { domid, gref };
        }
        Ok(buf)
    }
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlGntdevUnmapGrantRef {
    /// The `index` returned by the map.
    pub index: u64,
    /// Number of pages, as mapped.
    pub count: u32,
    /// Padding.
    pub pad: u32,
}

/// `struct ioctl_gntdev_unmap_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlGntdevUnmapNotify {
    /// Offset (as for `mmap`) of a byte in the page: the byte to clear for
    /// `UNMAP_NOTIFY_CLEAR_BYTE`.
    pub index: u64,
    /// `UNMAP_NOTIFY_*` bits.
    pub action: u32,
    /// Event channel for `UNMAP_NOTIFY_SEND_EVENT`.
    pub event_channel_port: u32,
}

/// The anonymous `foreign` struct of a grant-copy side: a byte range of a
/// granted page.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GntdevGrantCopyForeign {
    /// The grant ref (C: `ref`).
    pub gref: GrantRef,
    /// Byte offset in the granted page.
    pub offset: u16,
    /// Domain that granted the page.
    pub domid: DomId,
}

/// One side of a grant copy (the C union of `source`/`dest`): a local
/// address, or a granted page when the segment's flags say so.
#[repr(C)]
#[derive(Clone, Copy)]
pub union GntdevGrantCopyPtr {
    /// A local buffer (C: `void *virt`).
    pub virt: *mut c_void,
    /// A byte range of a granted page.
    pub foreign: GntdevGrantCopyForeign,
}

/// `struct gntdev_grant_copy_segment`: copy `len` bytes, within one Xen page
/// on the grant side; Xen writes the outcome (`GNTST_*`) to `status`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GntdevGrantCopySegment {
    /// Where to copy from; a grant if `flags` has `GNTCOPY_SOURCE_GREF`.
    pub source: GntdevGrantCopyPtr,
    /// Where to copy to; a grant if `flags` has `GNTCOPY_DEST_GREF`.
    pub dest: GntdevGrantCopyPtr,
    /// Number of bytes.
    pub len: u16,
    /// `GNTCOPY_*` bits.
    pub flags: u16,
    /// Out: `GNTST_*`, 0 on success.
    pub status: i16,
}

impl GntdevGrantCopySegment {
    /// Copy `len` bytes from a granted page into the local buffer `dst`.
    pub fn from_grant(src: GntdevGrantCopyForeign, dst: *mut u8, len: u16) -> Self {
        Self {
            source: GntdevGrantCopyPtr { foreign: src },
            dest: GntdevGrantCopyPtr { virt: dst.cast() },
            len,
            flags: GNTCOPY_SOURCE_GREF,
            status: 0,
        }
    }

    /// Copy `len` bytes from the local buffer `src` into a granted page.
    pub fn to_grant(src: *const u8, dst: GntdevGrantCopyForeign, len: u16) -> Self {
        Self {
            source: GntdevGrantCopyPtr {
                virt: src.cast_mut().cast(),
            },
            dest: GntdevGrantCopyPtr { foreign: dst },
            len,
            flags: GNTCOPY_DEST_GREF,
            status: 0,
        }
    }
}

impl core::fmt::Debug for GntdevGrantCopySegment {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let side = |p: &GntdevGrantCopyPtr, is_gref: bool| {
            if is_gref {
                // SAFETY: the flag says the union holds `foreign`; any bits are valid integers.
                format!("{:?}", unsafe { p.foreign })
            } else {
                // SAFETY: the flag says the union holds `virt`; any bits are a valid raw pointer.
                format!("{:?}", unsafe { p.virt })
            }
        };
        f.debug_struct("GntdevGrantCopySegment")
            .field(
                "source",
                &side(&self.source, self.flags & GNTCOPY_SOURCE_GREF != 0),
            )
            .field(
                "dest",
                &side(&self.dest, self.flags & GNTCOPY_DEST_GREF != 0),
            )
            .field("len", &self.len)
            .field("flags", &self.flags)
            .field("status", &self.status)
            .finish()
    }
}

/// `struct ioctl_gntdev_grant_copy`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IoctlGntdevGrantCopy {
    /// Number of segments.
    pub count: u32,
    /// `count` segments; Xen writes each one's `status`.
    pub segments: *mut GntdevGrantCopySegment,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(bytes: &[u8], off: usize) -> u32 {
        u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn map_buf_lays_out_count_then_refs() {
        let buf = MapGrantRefBuf::from_refs(&[(1, 10), (2, 20), (3, 30)]).unwrap();
        let b = buf.as_bytes();
        assert_eq!(b.len(), 16 + 3 * 8);
        assert_eq!(u32_at(b, 0), 3, "count");
        assert_eq!(&b[4..16], &[0; 12], "pad and index");
        let refs: Vec<(u32, u32)> = (0..3)
            .map(|i| (u32_at(b, 16 + 8 * i), u32_at(b, 20 + 8 * i)))
            .collect();
        assert_eq!(refs, [(1, 10), (2, 20), (3, 30)]);
        assert_eq!(buf.header().refs[0], buf.elems()[0]);
        assert_eq!(buf.as_bytes().as_ptr() as usize % 8, 0);
    }

    #[test]
    fn map_buf_is_never_smaller_than_the_declared_struct() {
        for refs in [&[][..], &[(0, 7)][..]] {
            let buf = MapGrantRefBuf::from_refs(refs).unwrap();
            assert_eq!(buf.as_bytes().len(), size_of::<IoctlGntdevMapGrantRef>());
            assert_eq!(buf.header().count as usize, refs.len());
            assert_eq!(buf.len(), refs.len());
        }
    }

    #[test]
    fn copy_segment_constructors_set_the_grant_flag_of_their_side() {
        let mut local = [0u8; 8];
        let g = GntdevGrantCopyForeign {
            gref: 5,
            offset: 100,
            domid: 3,
        };
        let from = GntdevGrantCopySegment::from_grant(g, local.as_mut_ptr(), 8);
        assert_eq!(from.flags, GNTCOPY_SOURCE_GREF);
        // SAFETY: from_grant stores `foreign` in source and `virt` in dest.
        let (src, dst) = unsafe { (from.source.foreign, from.dest.virt) };
        assert_eq!((src, dst.cast::<u8>()), (g, local.as_mut_ptr()));
        let to = GntdevGrantCopySegment::to_grant(local.as_ptr(), g, 8);
        assert_eq!(to.flags, GNTCOPY_DEST_GREF);
        // SAFETY: to_grant stores `foreign` in dest.
        assert_eq!(unsafe { to.dest.foreign }, g);
        assert!(format!("{to:?}").contains("gref: 5"));
    }
}
