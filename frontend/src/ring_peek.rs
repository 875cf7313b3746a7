//! Reading one ring index out of the guest's memory, for the frontend's own
//! use: after a daemon restart, each queue resumes at its used index (what
//! was popped but never completed is served again), and the frontend reads
//! that index from the guest's used ring, since the daemon that knew it is
//! gone. One page mapped (a grant read-only, or a FOREIGN frame), read,
//! unmapped.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};

use xen_sys::xen::{DomId, XEN_PAGE_SIZE};
use xen_sys::{Gntdev, Privcmd};

use crate::backend::{Memory, GRANT_BIT};

/// The device a ring field is read through, per memory mode.
pub enum RingPeek {
    /// Grant addresses, through gntdev.
    Grant(Gntdev),
    /// Guest-physical addresses, through privcmd.
    Foreign(Privcmd),
}

impl RingPeek {
    /// Opens the device `memory` needs.
    pub fn open(memory: &Memory) -> io::Result<Self> {
        Ok(match memory {
            Memory::Grant => RingPeek::Grant(Gntdev::open()?),
            Memory::Foreign(_) => RingPeek::Foreign(Privcmd::open()?),
        })
    }

    /// The u16 at guest address `addr` of `domid` (2-byte aligned).
    pub fn read_u16(&self, domid: DomId, addr: u64) -> Result<u16, PeekError> {
        match self {
            RingPeek::Grant(g) => read_u16(g, domid, addr),
            RingPeek::Foreign(p) => read_u16_foreign(p, domid, addr),
        }
    }
}

/// Errors of a ring read.
#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    /// The address is not a grant address or the field crosses a page.
    #[error("ring field at {0:#x} is not a 2-byte-aligned grant address")]
    BadAddress(u64),
    /// The frame could not be mapped.
    #[error("mapping frame {gfn:#x} of domain {domid}: {source}")]
    MapFrame {
        gfn: u64,
        domid: DomId,
        source: io::Error,
    },
    /// The grant could not be mapped.
    #[error("mapping grant ref {gref} of domain {domid}: {source}")]
    Map {
        gref: u32,
        domid: DomId,
        source: io::Error,
    },
}

/// The u16 at grant address `addr` of `domid` (2-byte aligned).
pub fn read_u16(gntdev: &Gntdev, domid: DomId, addr: u64) -> Result<u16, PeekError> {
    if addr & GRANT_BIT == 0 || addr & 1 != 0 {
        return Err(PeekError::BadAddress(addr));
    }
    let off = addr & !GRANT_BIT;
    let gref = u32::try_from(off >> 12).map_err(|_| PeekError::BadAddress(addr))?;
    let in_page = (off & 0xfff) as usize;
    let map_err = |source| PeekError::Map {
        gref,
        domid,
        source,
    };
    let index = gntdev
        .map_grant_refs(&[(u32::from(domid), gref)])
        .map_err(map_err)?;
    // SAFETY: a fresh read-only shared mapping of the one-page grant map at
    // `index`; nothing else points there.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            XEN_PAGE_SIZE,
            libc::PROT_READ,
            libc::MAP_SHARED,
            gntdev.as_raw_fd(),
            index as libc::off_t,
        )
    };
    let result = if p == libc::MAP_FAILED {
        Err(map_err(io::Error::last_os_error()))
    } else {
        // SAFETY: `in_page` is even and below 4096, so 2 aligned bytes inside
        // the page; the guest may write them concurrently, hence atomic.
        let v = unsafe { AtomicU16::from_ptr(p.cast::<u8>().add(in_page).cast()) }
            .load(Ordering::Acquire);
        // SAFETY: unmapping the page mapped above; the atomic view is gone.
        unsafe { libc::munmap(p, XEN_PAGE_SIZE) };
        Ok(v)
    };
    let _ = gntdev.unmap_grant_ref(index, 1);
    result
}

/// The u16 at guest-physical `addr` of `domid`, through a privcmd mapping of
/// its frame.
pub fn read_u16_foreign(privcmd: &Privcmd, domid: DomId, addr: u64) -> Result<u16, PeekError> {
    if addr & 1 != 0 {
        return Err(PeekError::BadAddress(addr));
    }
    let gfn = addr >> 12;
    let in_page = (addr & 0xfff) as usize;
    let err = |source| PeekError::MapFrame { gfn, domid, source };
    // SAFETY: a fresh shared mapping of privcmd; nothing else points there.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            XEN_PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            privcmd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(err(io::Error::last_os_error()));
    }
    let mut errs = [0i32];
    let r = privcmd
        .mmap_batch_v2(domid, p as u64, &[gfn], &mut errs)
        .map_err(err)
        .and_then(|()| match errs[0] {
            0 => Ok(()),
            e => Err(err(io::Error::from_raw_os_error(-e))),
        })
        .map(|()| {
            // SAFETY: the frame is mapped at `p`; `in_page` is even and below
            // 4096; the guest may write the field concurrently, hence atomic.
            unsafe { AtomicU16::from_ptr(p.cast::<u8>().add(in_page).cast()) }
                .load(Ordering::Acquire)
        });
    // SAFETY: unmapping the page mapped above; the atomic view is gone.
    unsafe { libc::munmap(p, XEN_PAGE_SIZE) };
    r
}
