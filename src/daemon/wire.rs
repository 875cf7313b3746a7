//! vhost's region messages as [`WireRegion`]s. vhost parses the 40-byte XEN_MMAP layout;
//! for a frontend that speaks the standard one, [`super::layout`] widened each region with
//! flags and domid 0 (UNIX regions).

use vhost::vhost_user::message::{VhostUserMemoryRegion, VhostUserSingleMemoryRegion};

use crate::descriptor::WireRegion;

impl From<&VhostUserMemoryRegion> for WireRegion {
    fn from(r: &VhostUserMemoryRegion) -> Self {
        WireRegion {
            guest_phys_addr: r.guest_phys_addr,
            memory_size: r.memory_size,
            userspace_addr: r.user_addr,
            mmap_offset: r.mmap_offset,
            xen_mmap_flags: r.xen_mmap_flags,
            xen_mmap_data: r.xen_mmap_data,
        }
    }
}

impl From<&VhostUserSingleMemoryRegion> for WireRegion {
    fn from(r: &VhostUserSingleMemoryRegion) -> Self {
        WireRegion::from(&**r)
    }
}
