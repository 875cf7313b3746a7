//! `/dev/xen/privcmd`: foreign mapping of other domains' frames.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use super::{fd_handle, invalid_input, ioctl};
use crate::dm_op::{PrivcmdDmOp, PrivcmdDmOpBuf, XenDmOp};
use crate::ioctl::{IOCTL_PRIVCMD_DM_OP, IOCTL_PRIVCMD_MMAPBATCH_V2, IOCTL_PRIVCMD_MMAP_RESOURCE};
use crate::privcmd::{PrivcmdMmapResource, PrivcmdMmapbatchV2};
use crate::xen::DomId;

/// An open privcmd device.
#[derive(Debug)]
pub struct Privcmd(OwnedFd);

fd_handle!(Privcmd, "/dev/xen/privcmd");

impl Privcmd {
    /// `IOCTL_PRIVCMD_MMAPBATCH_V2`: maps frame `gfns[i]` of domain `dom` at
    /// `addr + i * 4096` and stores that frame's result (0 or `-errno`) in
    /// `errs[i]`.
    ///
    /// `addr` must be inside a `mmap` of this fd; the kernel refuses
    /// (`EINVAL`) any other range and any page already populated, so this
    /// call cannot replace memory the program uses. `Ok` means the call ran:
    /// check `errs`. An error with `raw_os_error() == Some(ENOENT)` means
    /// some frames are paged out: `errs` is still filled, retry those frames.
    /// `InvalidInput` if the slice lengths differ or exceed `u32::MAX`.
    pub fn mmap_batch_v2(
        &self,
        dom: DomId,
        addr: u64,
        gfns: &[u64],
        errs: &mut [i32],
    ) -> io::Result<()> {
        if gfns.len() != errs.len() {
            return Err(invalid_input(format!(
                "{} frames but {} error slots",
                gfns.len(),
                errs.len()
            )));
        }
        let num = u32::try_from(gfns.len())
            .map_err(|_| invalid_input(format!("{} frames in one batch", gfns.len())))?;
        let mut arg = PrivcmdMmapbatchV2 {
            num,
            dom,
            addr,
            arr: gfns.as_ptr(),
            err: errs.as_mut_ptr(),
        };
        // SAFETY: `arg` is the struct this request takes; `arr` is readable
        // and `err` writable for `num` elements (equal slice lengths), both
        // borrowed for the call; the kernel only maps into privcmd VMAs.
        unsafe { ioctl(self.as_fd(), IOCTL_PRIVCMD_MMAPBATCH_V2, &mut arg) }.map(drop)
    }

    /// Size query of `IOCTL_PRIVCMD_MMAP_RESOURCE` (`addr` and `num` 0):
    /// the number of frames of resource `type_`/`id` of `dom`.
    pub fn resource_size(&self, dom: DomId, type_: u32, id: u32) -> io::Result<u64> {
        let mut arg = PrivcmdMmapResource {
            dom,
            type_,
            id,
            ..Default::default()
        };
        // SAFETY: `arg` is the struct this request takes; with addr 0 and
        // num 0 the kernel maps nothing and only writes `num` back.
        unsafe { ioctl(self.as_fd(), IOCTL_PRIVCMD_MMAP_RESOURCE, &mut arg) }?;
        Ok(arg.num)
    }

    /// `IOCTL_PRIVCMD_MMAP_RESOURCE`: maps `res.num` frames of a resource at
    /// `res.addr` (or, with both 0, only writes the size back to `res.num`).
    ///
    /// # Safety
    ///
    /// Unless both are 0, `res.addr` must start a `mmap` of this fd at least
    /// `res.num` pages long, which no Rust reference points into: unlike
    /// MMAPBATCH_V2, the kernel does not refuse pages already mapped.
    pub unsafe fn mmap_resource(&self, res: &mut PrivcmdMmapResource) -> io::Result<()> {
        // SAFETY: `res` is the struct this request takes; the caller vouches
        // for the target range.
        unsafe { ioctl(self.as_fd(), IOCTL_PRIVCMD_MMAP_RESOURCE, res) }.map(drop)
    }

    /// `IOCTL_PRIVCMD_DM_OP` with one buffer: Xen reads `op`, performs it on
    /// domain `dom` and writes the results back into `op` (e.g. a new ioreq
    /// server's id). `ESRCH` once the domain is gone.
    pub fn dm_op(&self, dom: DomId, op: &mut XenDmOp) -> io::Result<()> {
        let buf = PrivcmdDmOpBuf {
            uptr: (op as *mut XenDmOp).cast(),
            size: std::mem::size_of::<XenDmOp>(),
        };
        let mut arg = PrivcmdDmOp {
            dom,
            num: 1,
            ubufs: &buf,
        };
        // SAFETY: `arg` is the struct this request takes; its one buffer is
        // `op`, a whole `struct xen_dm_op` exclusively borrowed for the call,
        // which the kernel copies in and Xen writes back within its size.
        unsafe { ioctl(self.as_fd(), IOCTL_PRIVCMD_DM_OP, &mut arg) }.map(drop)
    }
}
