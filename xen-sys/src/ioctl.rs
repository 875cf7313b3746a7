//! Linux ioctl request numbers for the Xen devices.
//!
//! The headers build every number with `_IOC(_IOC_NONE, type, nr, sizeof(struct))`,
//! so the size of the argument struct is part of the number: the kernel rejects
//! a request whose struct size differs from its own. Computing the numbers here
//! from `size_of` of our `#[repr(C)]` structs, as the headers do, means a wrong
//! struct gives a wrong number, which `tests/layout.rs` catches.

use core::mem::size_of;

use crate::dm_op::PrivcmdDmOp;
use crate::evtchn::{IoctlEvtchnBindInterdomain, IoctlEvtchnNotify, IoctlEvtchnUnbind};
use crate::gntalloc::{IoctlGntallocAllocGref, IoctlGntallocDeallocGref};
use crate::gntdev::{
    IoctlGntdevGrantCopy, IoctlGntdevMapGrantRef, IoctlGntdevUnmapGrantRef, IoctlGntdevUnmapNotify,
};
use crate::privcmd::{PrivcmdMmapResource, PrivcmdMmapbatchV2};

// The asm-generic encoding, used by x86 and Arm (the architectures Xen dom0
// runs on); powerpc, mips and sparc use other widths and are not supported.
const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;

/// `_IOC_NONE`: the Xen devices declare every request without a direction.
pub const IOC_NONE: u32 = 0;
/// `_IOC_WRITE` (userspace writes, the kernel reads).
pub const IOC_WRITE: u32 = 1;
/// `_IOC_READ` (the kernel writes back).
pub const IOC_READ: u32 = 2;

/// Linux `_IOC(dir, type, nr, size)`.
///
/// Panics (at compile time, in a const) if `size` does not fit the 14-bit size
/// field, like the kernel's `_IOC_TYPECHECK`.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(
        size < (1 << IOC_SIZEBITS),
        "ioctl argument too large for _IOC"
    );
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// `_IOC(_IOC_NONE, ty, nr, sizeof(T))`, the form every Xen device request uses.
pub const fn ioc_none<T>(ty: u8, nr: u8) -> u32 {
    ioc(IOC_NONE, ty, nr, size_of::<T>())
}

/// Map foreign frames, one error code per frame (`0x205004`).
pub const IOCTL_PRIVCMD_MMAPBATCH_V2: u32 = ioc_none::<PrivcmdMmapbatchV2>(b'P', 4);
/// Map a domain resource such as its grant table (`0x205007`).
pub const IOCTL_PRIVCMD_MMAP_RESOURCE: u32 = ioc_none::<PrivcmdMmapResource>(b'P', 7);
/// Device-model operation on a guest (ioreq servers, interrupt lines) (`0x105005`).
pub const IOCTL_PRIVCMD_DM_OP: u32 = ioc_none::<PrivcmdDmOp>(b'P', 5);
/// Bind an interdomain event channel; returns the local port (`0x84501`).
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: u32 = ioc_none::<IoctlEvtchnBindInterdomain>(b'E', 1);
/// Unbind a local port (`0x44503`).
pub const IOCTL_EVTCHN_UNBIND: u32 = ioc_none::<IoctlEvtchnUnbind>(b'E', 3);
/// Signal a local port's remote end (`0x44504`).
pub const IOCTL_EVTCHN_NOTIFY: u32 = ioc_none::<IoctlEvtchnNotify>(b'E', 4);
/// Map grant refs; returns the mmap offset (`0x184700`).
pub const IOCTL_GNTDEV_MAP_GRANT_REF: u32 = ioc_none::<IoctlGntdevMapGrantRef>(b'G', 0);
/// Release a grant map made by `IOCTL_GNTDEV_MAP_GRANT_REF` (`0x104701`).
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 = ioc_none::<IoctlGntdevUnmapGrantRef>(b'G', 1);
/// Ask for a byte clear or an event when a grant page is unmapped (`0x104707`).
pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: u32 = ioc_none::<IoctlGntdevUnmapNotify>(b'G', 7);
/// Hypervisor copy between grant refs and local buffers (`0x104708`).
pub const IOCTL_GNTDEV_GRANT_COPY: u32 = ioc_none::<IoctlGntdevGrantCopy>(b'G', 8);
/// Share our own pages with a domain (`0x184705`).
pub const IOCTL_GNTALLOC_ALLOC_GREF: u32 = ioc_none::<IoctlGntallocAllocGref>(b'G', 5);
/// Release grants made by `IOCTL_GNTALLOC_ALLOC_GREF` (`0x104706`).
pub const IOCTL_GNTALLOC_DEALLOC_GREF: u32 = ioc_none::<IoctlGntallocDeallocGref>(b'G', 6);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_ones_used_on_real_xen() {
        assert_eq!(IOCTL_PRIVCMD_MMAPBATCH_V2, 0x205004);
        assert_eq!(IOCTL_PRIVCMD_MMAP_RESOURCE, 0x205007);
        assert_eq!(IOCTL_PRIVCMD_DM_OP, 0x105005);
        assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x84501);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x44504);
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x184700);
        assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x104701);
        assert_eq!(IOCTL_GNTDEV_SET_UNMAP_NOTIFY, 0x104707);
        assert_eq!(IOCTL_GNTDEV_GRANT_COPY, 0x104708);
        assert_eq!(IOCTL_GNTALLOC_ALLOC_GREF, 0x184705);
        assert_eq!(IOCTL_GNTALLOC_DEALLOC_GREF, 0x104706);
    }

    #[test]
    fn ioc_encodes_each_field() {
        assert_eq!(ioc(IOC_READ | IOC_WRITE, b'V', 0x12, 8), 0xc008_5612);
        assert_eq!(ioc(IOC_NONE, 0, 0, 0), 0);
    }
}
