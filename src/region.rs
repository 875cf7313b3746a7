//! One guest memory region: its validated descriptor and, unless it is an on-demand grant
//! region, its host mapping. Implements vm-memory's `GuestMemoryRegion`.

use std::fs::File;

use vm_memory::bitmap::BS;
use vm_memory::{
    GuestAddress, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes, GuestUsize,
    MemoryRegionAddress, VolatileSlice,
};

use crate::backend::foreign::map_foreign_region;
use crate::backend::grant::map_grant_region;
use crate::backend::unix::map_unix;
use crate::backend::{BackendError, HostMapping};
use crate::descriptor::{GrantMapping, RegionDescriptor, RegionKind};
use crate::device::XenHandle;

/// Why a region could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The backend failed to map it.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The descriptor's addresses or sizes are invalid (hand-built descriptors).
    #[error(transparent)]
    Descriptor(#[from] crate::descriptor::DescriptorError),
    /// A Xen region was added to a table that has no Xen device.
    #[error("region at gpa {gpa:#x} needs a Xen device and none was given")]
    NoDevice {
        /// Region gpa.
        gpa: u64,
    },
}

/// Error returned (inside vm-memory's `IOError`) by a plain-table access to an on-demand grant
/// region: those bytes are only reachable through request-scoped memory.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("gpa {gpa:#x} is in an on-demand grant region (domain {domid}); access it through RequestMemory")]
pub struct OnDemandAccess {
    /// The address accessed.
    pub gpa: u64,
    /// The region's domain.
    pub domid: u16,
}

/// A region of the guest memory map.
#[derive(Debug)]
pub struct XenRegion {
    desc: RegionDescriptor,
    mapping: Option<HostMapping>,
    dev: Option<XenHandle>,
}

impl XenRegion {
    /// Builds and, except for on-demand grants, maps a region.
    ///
    /// `file` is the fd the frontend sent, used for UNIX regions (`None` maps anonymous memory,
    /// for tests). Xen regions go through `dev` (the frontend's privcmd/gntdev fd adds nothing
    /// the device handle does not have).
    pub fn new(
        desc: RegionDescriptor,
        file: Option<&File>,
        dev: Option<&XenHandle>,
    ) -> Result<Self, RegionError> {
        desc.check()?;
        let (gpa, size) = (desc.guest_phys_addr, desc.size);
        let need_dev = || dev.ok_or(RegionError::NoDevice { gpa });
        let mapping = match desc.kind {
            RegionKind::Unix => Some(map_unix(gpa, size, file, desc.mmap_offset)?),
            RegionKind::Foreign { domid } => {
                Some(map_foreign_region(need_dev()?, domid, gpa, size)?)
            }
            RegionKind::Grant {
                domid,
                mapping: GrantMapping::InAdvance,
            } => Some(map_grant_region(need_dev()?, domid, gpa, size)?),
            RegionKind::Grant {
                mapping: GrantMapping::OnDemand,
                ..
            } => {
                need_dev()?;
                None
            }
        };
        Ok(XenRegion {
            desc,
            mapping,
            dev: dev.cloned(),
        })
    }

    /// The validated descriptor.
    #[inline]
    pub fn descriptor(&self) -> &RegionDescriptor {
        &self.desc
    }

    /// The device this region's Xen memory goes through (None for UNIX regions built without).
    #[inline]
    pub fn device(&self) -> Option<&XenHandle> {
        self.dev.as_ref()
    }

    /// The domid, when this region is an on-demand grant region.
    #[inline]
    pub fn on_demand_domid(&self) -> Option<u16> {
        match self.desc.kind {
            RegionKind::Grant {
                domid,
                mapping: GrantMapping::OnDemand,
            } => Some(domid),
            _ => None,
        }
    }

    /// Host address of the region's first byte, when the region is mapped in advance (None
    /// for on-demand grant regions).
    #[inline]
    pub fn host_address(&self) -> Option<*mut u8> {
        self.mapping.as_ref().map(HostMapping::as_ptr)
    }
}

impl GuestMemoryRegion for XenRegion {
    type B = ();

    #[inline]
    fn len(&self) -> GuestUsize {
        self.desc.size
    }

    #[inline]
    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.desc.guest_phys_addr)
    }

    #[inline]
    fn bitmap(&self) -> BS<'_, ()> {}

    #[inline]
    fn get_host_address(
        &self,
        addr: MemoryRegionAddress,
    ) -> vm_memory::guest_memory::Result<*mut u8> {
        let m = self
            .mapping
            .as_ref()
            .ok_or_else(|| self.on_demand_error(addr))?;
        self.check_address(addr)
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        Ok(m.as_ptr().wrapping_add(addr.0 as usize))
    }

    #[inline]
    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BS<'_, ()>>> {
        let m = self
            .mapping
            .as_ref()
            .ok_or_else(|| self.on_demand_error(offset))?;
        let end = offset
            .0
            .checked_add(count as u64)
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        if end > self.desc.size {
            return Err(GuestMemoryError::InvalidBackendAddress);
        }
        // SAFETY: `offset..offset+count` lies inside the mapping (checked above), which lives
        // as long as `self`, and the returned slice borrows `self`. Guest memory is accessed
        // volatilely by everyone who touches it.
        Ok(unsafe { VolatileSlice::new(m.as_ptr().add(offset.0 as usize), count) })
    }
}

impl XenRegion {
    fn on_demand_error(&self, addr: MemoryRegionAddress) -> GuestMemoryError {
        GuestMemoryError::IOError(std::io::Error::other(OnDemandAccess {
            gpa: self.desc.guest_phys_addr.wrapping_add(addr.0),
            domid: self.on_demand_domid().unwrap_or_default(),
        }))
    }
}

impl GuestMemoryRegionBytes for XenRegion {}
