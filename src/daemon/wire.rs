//! vhost's region messages as [`WireRegion`]s. In the `xen` build vhost parses the 40-byte
//! layout and the Xen fields come through; without it the layout is the standard 32 bytes and
//! the fields are zero (UNIX regions).

use vhost::vhost_user::message::{VhostUserMemoryRegion, VhostUserSingleMemoryRegion};

use crate::descriptor::WireRegion;

impl From<&VhostUserMemoryRegion> for WireRegion {
    fn from(r: &VhostUserMemoryRegion) -> Self {
        WireRegion {
            guest_phys_addr: r.guest_phys_addr,
            memory_size: r.memory_size,
            userspace_addr: r.user_addr,
            mmap_offset: r.mmap_offset,
            #[cfg(feature = "xen")]
            xen_mmap_flags: r.xen_mmap_flags,
            #[cfg(feature = "xen")]
            xen_mmap_data: r.xen_mmap_data,
            #[cfg(not(feature = "xen"))]
            xen_mmap_flags: 0,
            #[cfg(not(feature = "xen"))]
            xen_mmap_data: 0,
        }
    }
}

impl From<&VhostUserSingleMemoryRegion> for WireRegion {
    fn from(r: &VhostUserSingleMemoryRegion) -> Self {
        WireRegion::from(&**r)
    }
}
