//! Shared helpers for the integration tests: an emulated Xen guest, wire regions, memfds.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use xen_vhost_mem::device::emulated::EmulatedXen;
use xen_vhost_mem::device::XenHandle;
use xen_vhost_mem::{RegionDescriptor, WireRegion, XenRegion};

/// The emulated guest's domid.
pub const DOMID: u16 = 1;
/// Xen page size as a usize.
pub const PAGE: usize = 4096;

pub const FLAG_FOREIGN: u32 = 0x1;
pub const FLAG_GRANT: u32 = 0x2;
pub const FLAG_NO_ADVANCE: u32 = 0x8;
pub const FLAG_NO_ADVANCE_SPEC: u32 = 0x100;

/// An emulated Xen plus the device handle wrapping it; the `Arc` lets tests play the guest.
pub struct Guest {
    pub emu: Arc<EmulatedXen>,
    pub dev: XenHandle,
}

impl Guest {
    pub fn new(capacity_pages: usize) -> Self {
        let emu = Arc::new(EmulatedXen::new(capacity_pages).expect("emulation setup"));
        let dev = XenHandle::new(emu.clone());
        Guest { emu, dev }
    }

    /// Allocates `n` pages and grants them (consecutive refs); returns (first page, first ref).
    pub fn grant(&self, n: usize, readonly: bool) -> (usize, u32) {
        let page = self.emu.alloc_pages(n).expect("alloc pages");
        let gref = self
            .emu
            .grant_pages(DOMID, page, n, readonly)
            .expect("grant pages");
        (page, gref)
    }

    /// Allocates `n` pages and exposes them as frames `first_gfn..`; returns the first page.
    pub fn frames(&self, first_gfn: u64, n: usize) -> usize {
        let page = self.emu.alloc_pages(n).expect("alloc pages");
        self.emu
            .add_frames(DOMID, first_gfn, page, n)
            .expect("add frames");
        page
    }

    /// Asserts that no mapping is live, neither in the emulation nor in the counters.
    pub fn assert_nothing_live(&self) {
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
}

/// A wire region.
pub fn wire(gpa: u64, size: u64, uaddr: u64, offset: u64, flags: u32, data: u32) -> WireRegion {
    WireRegion {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: uaddr,
        mmap_offset: offset,
        xen_mmap_flags: flags,
        xen_mmap_data: data,
    }
}

/// A validated descriptor (panics if the wire region is invalid: test setup only).
pub fn desc(w: WireRegion) -> RegionDescriptor {
    RegionDescriptor::from_wire(&w).expect("valid test descriptor")
}

/// A FOREIGN region of [`DOMID`], mapped through `g`.
pub fn foreign_region(g: &Guest, gpa: u64, size: u64) -> XenRegion {
    XenRegion::new(
        desc(wire(gpa, size, 0, 0, FLAG_FOREIGN, DOMID.into())),
        None,
        Some(&g.dev),
    )
    .expect("map foreign region")
}

/// A GRANT region of [`DOMID`] mapped in advance, with a frontend virtual address.
pub fn grant_region(g: &Guest, gpa: u64, size: u64, uaddr: u64) -> XenRegion {
    XenRegion::new(
        desc(wire(gpa, size, uaddr, 0, FLAG_GRANT, DOMID.into())),
        None,
        Some(&g.dev),
    )
    .expect("map grant region")
}

/// A GRANT region of [`DOMID`] mapped on demand (nothing mapped).
pub fn on_demand_region(g: &Guest, gpa: u64, size: u64) -> XenRegion {
    XenRegion::new(
        desc(wire(
            gpa,
            size,
            0,
            0,
            FLAG_GRANT | FLAG_NO_ADVANCE,
            DOMID.into(),
        )),
        None,
        Some(&g.dev),
    )
    .expect("on-demand grant region")
}

/// An anonymous UNIX region.
pub fn anon_region(gpa: u64, size: u64, uaddr: u64) -> XenRegion {
    XenRegion::new(desc(wire(gpa, size, uaddr, 0, 0, 0)), None, None).expect("anonymous region")
}

/// A memfd of `len` bytes as a `File`.
pub fn memfd(len: u64) -> File {
    // SAFETY: a valid NUL-terminated name and plain flags.
    let fd = unsafe { libc::memfd_create(c"xen-vhost-mem-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size memfd");
    f
}

/// A recognisable byte pattern: byte `i` is a function of `seed` and `i`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i as u32 % 251) as u8) ^ 0x5a)
        .collect()
}
