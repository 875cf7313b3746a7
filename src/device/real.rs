//! The device boundary on real Xen: `/dev/xen/gntdev` and `/dev/xen/privcmd` via `xen-sys`.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use xen_sys::gntdev::{GntdevGrantCopyForeign, GntdevGrantCopySegment};
use xen_sys::{Gntdev, Privcmd};

use super::{CopyDirection, CopySegment, DeviceError, GrantPage, Protection, XenDriver};
use crate::xen_page::XEN_PAGE_SIZE;

/// The kernel's Xen drivers. gntdev is required; privcmd only for FOREIGN regions.
#[derive(Debug)]
pub struct RealXen {
    gntdev: Gntdev,
    privcmd: Option<Privcmd>,
}

impl RealXen {
    /// Opens `/dev/xen/gntdev` and, if present, `/dev/xen/privcmd`.
    pub fn open() -> Result<Self, DeviceError> {
        let gntdev = Gntdev::open().map_err(|source| DeviceError::Open {
            path: Gntdev::PATH,
            source,
        })?;
        Ok(RealXen {
            gntdev,
            privcmd: Privcmd::open().ok(),
        })
    }

    /// Wraps already-open handles (e.g. fds the frontend sent).
    pub fn from_handles(gntdev: Gntdev, privcmd: Option<Privcmd>) -> Self {
        RealXen { gntdev, privcmd }
    }

    fn privcmd(&self, call: &'static str) -> Result<&Privcmd, DeviceError> {
        self.privcmd
            .as_ref()
            .ok_or(DeviceError::sys(call, libc::ENODEV))
    }
}

fn io(call: &'static str) -> impl FnOnce(std::io::Error) -> DeviceError {
    move |source| DeviceError::Syscall { call, source }
}

/// `mmap` of a Xen device fd; `MAP_FAILED` becomes the errno.
fn mmap_dev(
    call: &'static str,
    fd: libc::c_int,
    pages: usize,
    prot: libc::c_int,
    offset: u64,
) -> Result<NonNull<u8>, DeviceError> {
    let off = libc::off_t::try_from(offset).map_err(|_| DeviceError::sys(call, libc::EOVERFLOW))?;
    let len = pages
        .checked_mul(XEN_PAGE_SIZE)
        .ok_or(DeviceError::sys(call, libc::EOVERFLOW))?;
    // SAFETY: a fresh shared mapping of a device fd at a kernel-chosen address; the result is
    // checked for MAP_FAILED.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, off) };
    if p == libc::MAP_FAILED {
        return Err(DeviceError::last(call));
    }
    NonNull::new(p.cast()).ok_or(DeviceError::sys(call, libc::EFAULT))
}

/// # Safety
/// `addr`/`pages` must be a whole mapping the caller owns and no longer uses.
unsafe fn munmap(call: &'static str, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError> {
    // SAFETY: per the contract.
    if unsafe { libc::munmap(addr.as_ptr().cast(), pages * XEN_PAGE_SIZE) } != 0 {
        return Err(DeviceError::last(call));
    }
    Ok(())
}

impl XenDriver for RealXen {
    fn grant_map_refs(&self, refs: &[GrantPage]) -> Result<u64, DeviceError> {
        let pairs: Vec<(u32, u32)> = refs.iter().map(|r| (u32::from(r.domid), r.gref)).collect();
        self.gntdev
            .map_grant_refs(&pairs)
            .map_err(io("IOCTL_GNTDEV_MAP_GRANT_REF"))
    }

    fn grant_mmap(
        &self,
        index: u64,
        pages: usize,
        prot: Protection,
    ) -> Result<NonNull<u8>, DeviceError> {
        mmap_dev(
            "mmap(gntdev)",
            self.gntdev.as_raw_fd(),
            pages,
            prot.bits(),
            index,
        )
    }

    unsafe fn grant_munmap(&self, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError> {
        // SAFETY: forwarded contract.
        unsafe { munmap("munmap(gntdev)", addr, pages) }
    }

    fn grant_unmap_refs(&self, index: u64, pages: usize) -> Result<(), DeviceError> {
        const CALL: &str = "IOCTL_GNTDEV_UNMAP_GRANT_REF";
        let count = u32::try_from(pages).map_err(|_| DeviceError::sys(CALL, libc::EINVAL))?;
        self.gntdev.unmap_grant_ref(index, count).map_err(io(CALL))
    }

    unsafe fn grant_copy(&self, segments: &mut [CopySegment]) -> Result<(), DeviceError> {
        let mut segs: Vec<GntdevGrantCopySegment> = segments
            .iter()
            .map(|s| {
                let foreign = GntdevGrantCopyForeign {
                    gref: s.grant.gref,
                    offset: s.offset,
                    domid: s.grant.domid,
                };
                match s.direction {
                    CopyDirection::FromGuest => {
                        GntdevGrantCopySegment::from_grant(foreign, s.local, s.len)
                    }
                    CopyDirection::ToGuest => {
                        GntdevGrantCopySegment::to_grant(s.local, foreign, s.len)
                    }
                }
            })
            .collect();
        // SAFETY: the caller guarantees every local buffer is valid for its length and
        // direction and unaliased during the call.
        unsafe { self.gntdev.grant_copy(&mut segs) }.map_err(io("IOCTL_GNTDEV_GRANT_COPY"))?;
        for (s, k) in segments.iter_mut().zip(&segs) {
            s.status = k.status;
        }
        Ok(())
    }

    unsafe fn foreign_mmap_at(&self, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError> {
        const CALL: &str = "mmap(privcmd)";
        let fd = self.privcmd(CALL)?.as_raw_fd();
        let len = pages
            .checked_mul(XEN_PAGE_SIZE)
            .ok_or(DeviceError::sys(CALL, libc::EOVERFLOW))?;
        // SAFETY: the caller owns `addr..addr+len` and holds no references into it, so
        // MAP_FIXED replaces nothing anyone uses; the result is checked.
        let p = unsafe {
            libc::mmap(
                addr.as_ptr().cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DeviceError::last(CALL));
        }
        Ok(())
    }

    unsafe fn foreign_map_batch(
        &self,
        domid: u16,
        addr: NonNull<u8>,
        gfns: &[u64],
        errs: &mut [i32],
    ) -> Result<(), DeviceError> {
        const CALL: &str = "IOCTL_PRIVCMD_MMAPBATCH_V2";
        self.privcmd(CALL)?
            .mmap_batch_v2(domid, addr.as_ptr() as u64, gfns, errs)
            .map_err(io(CALL))
    }

    unsafe fn foreign_munmap(&self, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError> {
        // SAFETY: forwarded contract.
        unsafe { munmap("munmap(privcmd)", addr, pages) }
    }

    unsafe fn foreign_unmap_to_reserve(
        &self,
        addr: NonNull<u8>,
        pages: usize,
    ) -> Result<(), DeviceError> {
        // SAFETY: forwarded contract: a privcmd mapping of ours that nobody uses.
        unsafe { super::reserve::reserve_fixed("mmap(reserve over privcmd)", addr, pages) }
    }
}
