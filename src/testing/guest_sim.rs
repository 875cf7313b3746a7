//! A simulated Xen guest over the emulated device, for tests, benchmarks and demos on machines
//! without Xen (and for the test suites of daemons built on this crate).
//!
//! The guest grants buffers the way Linux's grant DMA ops do (consecutive refs, read-only for
//! buffers the device only reads) and hands out grant addresses `1 << 63 | ref << 12 | off`.

use std::sync::Arc;

use super::emulated::{EmulatedXen, EmulationError};
use crate::descriptor::{GrantMapping, RegionDescriptor, RegionKind};
use crate::device::XenHandle;
use crate::xen_page::{grant_addr, GRANT_ADDR_BIT, XEN_PAGE_SHIFT, XEN_PAGE_SIZE};

/// Pages a guest granted, as one buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestBuffer {
    /// Where the guest keeps the buffer: the emulation's first page, or a gntalloc grant's
    /// slot in [`super::GntallocGuest`].
    pub backing: usize,
    /// First grant ref; page `i` is ref `first_ref + i`.
    pub first_ref: u32,
    /// Number of pages.
    pub pages: usize,
}

impl GuestBuffer {
    /// The grant address of byte `offset` of the buffer.
    pub fn gpa(&self, offset: usize) -> u64 {
        grant_addr(
            self.first_ref + (offset / XEN_PAGE_SIZE) as u32,
            (offset % XEN_PAGE_SIZE) as u64,
        )
    }
}

/// A guest the tests and demos play: it grants buffers and reads and writes its own view of
/// them. [`GuestSim`] plays it on the emulated device; on real Xen,
/// [`super::GntallocGuest`] has dom0 grant its own pages to itself.
pub trait Guest {
    /// What can go wrong on the guest's side.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The granting domain.
    fn domid(&self) -> u16;

    /// Grants `pages` pages on consecutive refs (read-only when `readonly`).
    fn grant(&self, pages: usize, readonly: bool) -> Result<GuestBuffer, Self::Error>;

    /// Writes `data` at byte `offset` of `buf`, in the guest's own view.
    fn write(&self, buf: &GuestBuffer, offset: usize, data: &[u8]) -> Result<(), Self::Error>;

    /// Reads `len` bytes at `offset` of `buf`, in the guest's own view.
    fn read(&self, buf: &GuestBuffer, offset: usize, len: usize) -> Result<Vec<u8>, Self::Error>;

    /// A GRANT region mapped in advance covering `[gpa, gpa + size)` (e.g. a vring).
    fn in_advance_region(&self, gpa: u64, size: u64, userspace_addr: u64) -> RegionDescriptor {
        RegionDescriptor {
            guest_phys_addr: gpa,
            size,
            userspace_addr,
            mmap_offset: 0,
            kind: RegionKind::Grant {
                domid: self.domid(),
                mapping: GrantMapping::InAdvance,
            },
        }
    }

    /// An on-demand GRANT region covering grant refs `first_ref..first_ref + pages` (what
    /// xen-vhost-frontend sends for everything but the rings).
    fn on_demand_region(&self, first_ref: u32, pages: u64) -> RegionDescriptor {
        RegionDescriptor {
            guest_phys_addr: GRANT_ADDR_BIT | (u64::from(first_ref) << XEN_PAGE_SHIFT),
            size: pages * XEN_PAGE_SIZE as u64,
            userspace_addr: 0,
            mmap_offset: 0,
            kind: RegionKind::Grant {
                domid: self.domid(),
                mapping: GrantMapping::OnDemand,
            },
        }
    }
}

impl Guest for GuestSim {
    type Error = EmulationError;
    fn domid(&self) -> u16 {
        self.domid
    }
    fn grant(&self, pages: usize, readonly: bool) -> Result<GuestBuffer, EmulationError> {
        GuestSim::grant(self, pages, readonly)
    }
    fn write(&self, buf: &GuestBuffer, offset: usize, data: &[u8]) -> Result<(), EmulationError> {
        GuestSim::write(self, buf, offset, data)
    }
    fn read(
        &self,
        buf: &GuestBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, EmulationError> {
        GuestSim::read(self, buf, offset, len)
    }
}

/// One simulated guest domain on an emulated Xen.
#[derive(Clone, Debug)]
pub struct GuestSim {
    /// The emulated hypervisor and drivers (to inspect live mappings).
    pub emu: Arc<EmulatedXen>,
    /// The device handle the backend uses (with its counters).
    pub dev: XenHandle,
    /// The guest's domain id.
    pub domid: u16,
}

impl GuestSim {
    /// A guest `domid` with room for `capacity_pages` pages.
    pub fn new(domid: u16, capacity_pages: usize) -> Result<Self, EmulationError> {
        let emu = Arc::new(EmulatedXen::new(capacity_pages)?);
        let dev = XenHandle::new(emu.clone());
        Ok(GuestSim { emu, dev, domid })
    }

    /// Allocates and grants `pages` pages on consecutive refs.
    pub fn grant(&self, pages: usize, readonly: bool) -> Result<GuestBuffer, EmulationError> {
        let backing = self.emu.alloc_pages(pages)?;
        let first_ref = self.emu.grant_pages(self.domid, backing, pages, readonly)?;
        Ok(GuestBuffer {
            backing,
            first_ref,
            pages,
        })
    }

    /// Writes `data` at byte `offset` of `buf` (the guest filling a buffer).
    pub fn write(
        &self,
        buf: &GuestBuffer,
        offset: usize,
        data: &[u8],
    ) -> Result<(), EmulationError> {
        self.check(buf, offset, data.len())?;
        self.emu.write_page(buf.backing, offset, data)
    }

    /// Reads `len` bytes at `offset` of `buf` (the guest reading what the device wrote).
    pub fn read(
        &self,
        buf: &GuestBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, EmulationError> {
        self.check(buf, offset, len)?;
        self.emu.read_page(buf.backing, offset, len)
    }

    /// Allocates `pages` pages and exposes them as the guest's frames `first_gfn..` (for
    /// FOREIGN regions); returns the emulation's first page.
    pub fn frames(&self, first_gfn: u64, pages: usize) -> Result<usize, EmulationError> {
        let page = self.emu.alloc_pages(pages)?;
        self.emu.add_frames(self.domid, first_gfn, page, pages)?;
        Ok(page)
    }

    /// Panics unless nothing is mapped: no live mapping or grant map in the emulation, and no
    /// live mapping in the counters of [`GuestSim::dev`].
    #[track_caller]
    pub fn assert_nothing_mapped(&self) {
        assert_eq!(self.emu.live_mappings(), 0, "emulation live mappings");
        assert_eq!(self.emu.live_grant_maps(), 0, "emulation live grant maps");
        assert_eq!(
            self.dev.counters().live_mappings(),
            0,
            "counters live mappings"
        );
        assert_eq!(
            self.dev.counters().snapshot().live_mappings,
            0,
            "snapshot live mappings"
        );
    }

    /// Ends foreign access to every page of `buf`, as the guest does when a request
    /// completes; fails if the backend still maps any of them.
    pub fn end_access(&self, buf: &GuestBuffer) -> Result<(), EmulationError> {
        (0..buf.pages).try_for_each(|i| self.emu.end_access(self.domid, buf.first_ref + i as u32))
    }

    fn check(&self, buf: &GuestBuffer, offset: usize, len: usize) -> Result<(), EmulationError> {
        match offset.checked_add(len) {
            Some(end) if end <= buf.pages * XEN_PAGE_SIZE => Ok(()),
            _ => Err(EmulationError::BadPage {
                page: buf.backing,
                offset,
                len,
            }),
        }
    }
}
