//! `/dev/xen/gntalloc`: granting our own pages to a domain.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use super::{fd_handle, ioctl};
use crate::gntalloc::{AllocGrefBuf, IoctlGntallocDeallocGref};
use crate::ioctl::{IOCTL_GNTALLOC_ALLOC_GREF, IOCTL_GNTALLOC_DEALLOC_GREF};
use crate::xen::DomId;

/// An open gntalloc device.
#[derive(Debug)]
pub struct Gntalloc(OwnedFd);

fd_handle!(Gntalloc, "/dev/xen/gntalloc");

impl Gntalloc {
    /// `IOCTL_GNTALLOC_ALLOC_GREF`: allocates `count` zeroed pages granted to
    /// `domid` (read-only unless `writable`) and returns the offset to `mmap`
    /// them at and their grant refs. dom0 may grant to itself (domid 0).
    pub fn alloc_gref(
        &self,
        domid: DomId,
        count: u32,
        writable: bool,
    ) -> io::Result<(u64, Vec<u32>)> {
        let mut buf = AllocGrefBuf::new(domid, count, writable)?;
        // SAFETY: `buf` holds the header and room for the `count` refs the
        // kernel writes, 8-aligned and borrowed for the call.
        unsafe { ioctl(self.as_fd(), IOCTL_GNTALLOC_ALLOC_GREF, buf.as_mut_ptr()) }?;
        Ok((buf.header().index, buf.elems().to_vec()))
    }

    /// `IOCTL_GNTALLOC_DEALLOC_GREF`: releases `count` pages from `index`;
    /// the grants end once the pages are also unmapped.
    pub fn dealloc_gref(&self, index: u64, count: u32) -> io::Result<()> {
        let mut arg = IoctlGntallocDeallocGref { index, count };
        // SAFETY: `arg` is the struct this request takes, with no pointers.
        unsafe { ioctl(self.as_fd(), IOCTL_GNTALLOC_DEALLOC_GREF, &mut arg) }.map(drop)
    }
}
