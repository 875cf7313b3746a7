//! Shared helpers for the integration tests: wire regions, memfds, and shorthands over the
//! library's test kit (`xen_vhost_mem::testing`, feature `test-utils`).
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::FromRawFd;
use xen_vhost_mem::testing::{Guest as _, GuestBuffer, GuestSim};
use xen_vhost_mem::{RegionDescriptor, RegionTable, WireRegion, XenMmapFlags, XenRegion};

/// The emulated guest's domid.
pub const DOMID: u16 = 1;
/// The Xen page size (xen-sys's, through the library), short.
pub const PAGE: usize = xen_vhost_mem::xen_page::XEN_PAGE_SIZE;

/// The wire's `xen_mmap_flags` bits, from [`XenMmapFlags`].
pub const FLAG_FOREIGN: u32 = XenMmapFlags::FOREIGN.bits();
pub const FLAG_GRANT: u32 = XenMmapFlags::GRANT.bits();
pub const FLAG_NO_ADVANCE: u32 = XenMmapFlags::NO_ADVANCE_MAP.bits();
pub const FLAG_NO_ADVANCE_SPEC: u32 = XenMmapFlags::NO_ADVANCE_MAP_SPEC.bits();

/// A guest of domain [`DOMID`] on a fresh emulated Xen with room for `capacity_pages` pages
/// (the library's test kit; `g.emu` is the emulation, `g.dev` the handle the backend uses).
pub fn guest(capacity_pages: usize) -> GuestSim {
    GuestSim::new(DOMID, capacity_pages).expect("emulation setup")
}

/// Allocates `n` pages and grants them (consecutive refs); returns (first page, first ref).
pub fn grant(g: &GuestSim, n: usize, readonly: bool) -> (usize, u32) {
    let b = g.grant(n, readonly).expect("grant pages");
    (b.backing, b.first_ref)
}

/// Allocates `n` pages and exposes them as frames `first_gfn..`; returns the first page.
pub fn frames(g: &GuestSim, first_gfn: u64, n: usize) -> usize {
    g.frames(first_gfn, n).expect("add frames")
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
pub fn foreign_region(g: &GuestSim, gpa: u64, size: u64) -> XenRegion {
    XenRegion::new(
        desc(wire(gpa, size, 0, 0, FLAG_FOREIGN, DOMID.into())),
        None,
        Some(&g.dev),
    )
    .expect("map foreign region")
}

/// A lazily mapped FOREIGN region of [`DOMID`] (buckets of `bucket_frames` frames).
pub fn lazy_region(g: &GuestSim, gpa: u64, size: u64, bucket_frames: usize) -> XenRegion {
    XenRegion::with_foreign_mapping(
        desc(wire(gpa, size, 0, 0, FLAG_FOREIGN, DOMID.into())),
        None,
        Some(&g.dev),
        xen_vhost_mem::ForeignMapping::Lazy { bucket_frames },
    )
    .expect("reserve lazy foreign region")
}

/// A GRANT region of [`DOMID`] mapped in advance, with a frontend virtual address.
pub fn grant_region(g: &GuestSim, gpa: u64, size: u64, uaddr: u64) -> XenRegion {
    XenRegion::new(
        desc(wire(gpa, size, uaddr, 0, FLAG_GRANT, DOMID.into())),
        None,
        Some(&g.dev),
    )
    .expect("map grant region")
}

/// A GRANT region of [`DOMID`] mapped on demand (nothing mapped).
pub fn on_demand_region(g: &GuestSim, gpa: u64, size: u64) -> XenRegion {
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

/// A guest with a two-page ring granted and mapped in advance, and every ref after it in an
/// on-demand region: where request-scope tests put their buffers.
pub struct GrantedRing {
    pub sim: GuestSim,
    pub ring: GuestBuffer,
    pub table: RegionTable,
}

/// A [`GrantedRing`] on an emulation with room for `capacity_pages` pages.
pub fn granted_ring(capacity_pages: usize) -> GrantedRing {
    let sim = GuestSim::new(1, capacity_pages).expect("emulation setup");
    let ring = sim.grant(2, false).expect("grant the ring");
    let ring_desc = sim.in_advance_region(ring.gpa(0), 8192, 0x7000_0000);
    let od = sim.on_demand_region(ring.first_ref + 2, 1 << 16);
    let table = RegionTable::from_regions(vec![
        XenRegion::new(ring_desc, None, Some(&sim.dev)).expect("ring region"),
        XenRegion::new(od, None, Some(&sim.dev)).expect("on-demand region"),
    ])
    .expect("table");
    GrantedRing { sim, ring, table }
}

/// A scratch directory, unique per process and thread, removed on drop.
pub struct ScratchDir(pub std::path::PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "xvm-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        ScratchDir(p)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
