//! `/dev/xen/gntdev`: mapping and copying pages other domains granted us.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use super::{fd_handle, invalid_input, ioctl};
use crate::gntdev::{
    GntdevGrantCopySegment, IoctlGntdevGrantCopy, IoctlGntdevUnmapGrantRef, IoctlGntdevUnmapNotify,
    MapGrantRefBuf,
};
use crate::ioctl::{
    IOCTL_GNTDEV_GRANT_COPY, IOCTL_GNTDEV_MAP_GRANT_REF, IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
    IOCTL_GNTDEV_UNMAP_GRANT_REF,
};

/// An open gntdev device.
#[derive(Debug)]
pub struct Gntdev(OwnedFd);

fd_handle!(Gntdev, "/dev/xen/gntdev");

impl Gntdev {
    /// `IOCTL_GNTDEV_MAP_GRANT_REF`: reserves a map of `refs`, given as
    /// `(domid, ref)` pairs (need not be consecutive), and returns the offset
    /// to `mmap` it at: one `mmap` of exactly `refs.len()` pages; a partial
    /// `mmap` fails with `EINVAL`.
    pub fn map_grant_refs(&self, refs: &[(u32, u32)]) -> io::Result<u64> {
        let mut buf = MapGrantRefBuf::from_refs(refs)?;
        // SAFETY: `buf` holds the header and `count` refs the kernel reads,
        // 8-aligned and borrowed for the call; the kernel writes only `index`.
        unsafe { ioctl(self.as_fd(), IOCTL_GNTDEV_MAP_GRANT_REF, buf.as_mut_ptr()) }?;
        Ok(buf.header().index)
    }

    /// `IOCTL_GNTDEV_UNMAP_GRANT_REF`: releases the map at `index`
    /// (`count` pages, as mapped). `munmap` it first: the grants stay mapped
    /// until the last `mmap` of them is gone.
    pub fn unmap_grant_ref(&self, index: u64, count: u32) -> io::Result<()> {
        let mut arg = IoctlGntdevUnmapGrantRef {
            index,
            count,
            pad: 0,
        };
        // SAFETY: `arg` is the struct this request takes, with no pointers.
        unsafe { ioctl(self.as_fd(), IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut arg) }.map(drop)
    }

    /// `IOCTL_GNTDEV_SET_UNMAP_NOTIFY`: when the page holding offset `index`
    /// is unmapped, clear that byte and/or signal `event_channel_port`
    /// (`action` is `UNMAP_NOTIFY_*` bits), so the granter learns we are gone.
    pub fn set_unmap_notify(
        &self,
        index: u64,
        action: u32,
        event_channel_port: u32,
    ) -> io::Result<()> {
        let mut arg = IoctlGntdevUnmapNotify {
            index,
            action,
            event_channel_port,
        };
        // SAFETY: `arg` is the struct this request takes, with no pointers;
        // the byte cleared later is in a grant mapping, not our memory.
        unsafe { ioctl(self.as_fd(), IOCTL_GNTDEV_SET_UNMAP_NOTIFY, &mut arg) }.map(drop)
    }

    /// `IOCTL_GNTDEV_GRANT_COPY`: Xen copies each segment between a grant
    /// and a local buffer, without mapping. `Ok` means the call ran: each
    /// segment's `status` (`GNTST_*`) says whether its copy happened.
    /// `InvalidInput` if there are more than `u32::MAX` segments.
    ///
    /// # Safety
    ///
    /// Every local side (`virt`, per the `GNTCOPY_*` flags) must be valid for
    /// `len` bytes, readable as a source or writable as a destination, for
    /// the whole call, and no Rust reference may alias a destination.
    pub unsafe fn grant_copy(&self, segs: &mut [GntdevGrantCopySegment]) -> io::Result<()> {
        let count = u32::try_from(segs.len())
            .map_err(|_| invalid_input(format!("{} grant copy segments", segs.len())))?;
        let mut arg = IoctlGntdevGrantCopy {
            count,
            segments: segs.as_mut_ptr(),
        };
        // SAFETY: `segments` is readable and writable for `count` segments,
        // borrowed for the call; the caller vouches for their local buffers.
        unsafe { ioctl(self.as_fd(), IOCTL_GNTDEV_GRANT_COPY, &mut arg) }.map(drop)
    }
}
