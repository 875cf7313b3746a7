//! FOREIGN regions on the real privcmd: dom0 maps its own frames with `DOMID_SELF`, as
//! `shared/xen-lab/src/xentest.c` does.
//!
//! dom0 is a PV guest, so the frame numbers MMAPBATCH takes for it are machine frames (MFNs).
//! A page we own gives its pseudo-physical frame (PFN) in `/proc/self/pagemap`; Xen's M2P
//! table (MFN → PFN, mapped read-only with `DOMID_XEN`) is searched for the MFNs whose entry
//! is our PFN. The region is then built through the library like any FOREIGN region.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use vm_memory::{Bytes, GuestAddress};
use xen_sys::xen::{DOMID_SELF, DOMID_XEN};
use xen_sys::Privcmd;
use xen_vhost_mem::backend::BackendError;
use xen_vhost_mem::region::RegionError;
use xen_vhost_mem::{
    RegionDescriptor, RegionKind, RegionTable, WireRegion, XenHandle, XenMmapFlags, XenRegion,
};

use crate::cases::open_dev;
use crate::guest::errno_text;
use crate::{CaseResult, Report};

use xen_sys::xen::XEN_PAGE_SIZE as PAGE;
/// `_IOC(_IOC_NONE, 'P', 0, sizeof(struct privcmd_hypercall))`.
const IOCTL_PRIVCMD_HYPERCALL: libc::c_ulong = 0x305000;
const HYPERVISOR_MEMORY_OP: u64 = 12;
const XENMEM_MAXIMUM_RAM_PAGE: u64 = 2;
const XENMEM_MACHPHYS_MFN_LIST: u64 = 5;

#[repr(C)]
struct PrivcmdHypercall {
    op: u64,
    arg: [u64; 5],
}

/// `struct xen_machphys_mfn_list` (x86_64).
#[repr(C)]
struct MachphysMfnList {
    max_extents: u32,
    extent_start: u64,
    nr_extents: u32,
}

fn hypercall(p: &Privcmd, op: u64, a0: u64, a1: u64) -> Result<i64, String> {
    let mut h = PrivcmdHypercall {
        op,
        arg: [a0, a1, 0, 0, 0],
    };
    // SAFETY: `h` is the struct this ioctl takes; the hypercalls used here (memory_op
    // maximum_ram_page and machphys_mfn_list) only write to buffers the caller owns and
    // passes in `a1`.
    let r = unsafe { libc::ioctl(p.as_raw_fd(), IOCTL_PRIVCMD_HYPERCALL, &mut h) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("hypercall {op}/{a0}: {}", errno_text(&e)));
    }
    Ok(i64::from(r))
}

/// An anonymous, locked page of ours with a pattern in it.
struct OwnPage {
    ptr: NonNull<u8>,
}

impl OwnPage {
    fn new(seed: u32) -> Result<Self, String> {
        // SAFETY: a fresh private anonymous mapping; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap anon: {}",
                errno_text(&std::io::Error::last_os_error())
            ));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or("mmap NULL")?;
        let page = OwnPage { ptr };
        // SAFETY: our own mapping of one page; mlock keeps its frame in place.
        if unsafe { libc::mlock(p, PAGE) } != 0 {
            return Err(format!(
                "mlock: {}",
                errno_text(&std::io::Error::last_os_error())
            ));
        }
        let mut x = seed;
        for i in 0..PAGE {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            page.set(i, (x >> 16) as u8);
        }
        Ok(page)
    }
    fn get(&self, i: usize) -> u8 {
        // SAFETY: `i % PAGE` is inside our one-page mapping; volatile because a foreign
        // mapping aliases it.
        unsafe { self.ptr.as_ptr().add(i % PAGE).read_volatile() }
    }
    fn set(&self, i: usize, v: u8) {
        // SAFETY: as in `get`.
        unsafe { self.ptr.as_ptr().add(i % PAGE).write_volatile(v) }
    }
    fn bytes(&self) -> Vec<u8> {
        (0..PAGE).map(|i| self.get(i)).collect()
    }
    /// The pseudo-physical frame of the page, from /proc/self/pagemap.
    fn pfn(&self) -> Result<u64, String> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, (self.ptr.as_ptr() as u64 / PAGE as u64) * 8)
            .map_err(|e| format!("pagemap read: {e}"))?;
        let e = u64::from_ne_bytes(b);
        if e >> 63 == 0 {
            return Err(format!("page not present (pagemap entry {e:#x})"));
        }
        Ok(e & ((1 << 55) - 1))
    }
}

impl Drop for OwnPage {
    fn drop(&mut self) {
        // SAFETY: exactly our one-page mapping; nothing refers into it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), PAGE) };
    }
}

/// What the M2P search found.
struct M2p {
    /// Machine frames whose M2P entry is the pfn asked for.
    mfns: Vec<u64>,
    /// `XENMEM_maximum_ram_page`.
    max_mfn: u64,
    /// A frame of the M2P table itself: RAM that Xen owns, not dom0.
    xen_frame: u64,
    text: String,
}

/// Machine frames whose M2P entry is `pfn`, and Xen's maximum RAM page.
fn mfns_of(pfn: u64) -> Result<M2p, String> {
    let p = Privcmd::open().map_err(|e| format!("open privcmd: {e}"))?;
    let max_mfn = hypercall(&p, HYPERVISOR_MEMORY_OP, XENMEM_MAXIMUM_RAM_PAGE, 0)?;
    let max_mfn = u64::try_from(max_mfn).map_err(|_| format!("max mfn {max_mfn}"))?;
    let mut ext = vec![0u64; 64];
    let mut ml = MachphysMfnList {
        max_extents: 64,
        extent_start: ext.as_mut_ptr() as u64,
        nr_extents: 0,
    };
    hypercall(
        &p,
        HYPERVISOR_MEMORY_OP,
        XENMEM_MACHPHYS_MFN_LIST,
        std::ptr::addr_of_mut!(ml) as u64,
    )?;
    let nr = ml.nr_extents as usize;
    let pages = ((max_mfn as usize * 8).div_ceil(PAGE)).min(nr * 512);
    if pages == 0 {
        return Err(format!("no M2P: max_mfn {max_mfn}, {nr} extents"));
    }
    let frames: Vec<u64> = (0..pages)
        .map(|i| ext[i / 512] + (i % 512) as u64)
        .collect();
    let mut errs = vec![0i32; pages];
    // SAFETY: a fresh shared read-only reservation of the privcmd fd for `pages` pages;
    // checked for MAP_FAILED, unmapped below.
    let va = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            libc::PROT_READ,
            libc::MAP_SHARED,
            p.as_raw_fd(),
            0,
        )
    };
    if va == libc::MAP_FAILED {
        return Err(format!(
            "mmap privcmd for M2P: {}",
            errno_text(&std::io::Error::last_os_error())
        ));
    }
    let r = p.mmap_batch_v2(DOMID_XEN, va as u64, &frames, &mut errs);
    let mut found = Vec::new();
    if r.is_ok() {
        let m2p = va.cast::<u64>();
        for mfn in 0..max_mfn as usize {
            if found.len() >= 8 {
                break;
            }
            if errs.get(mfn * 8 / PAGE) != Some(&0) {
                continue;
            }
            // SAFETY: entry `mfn` lies in page `mfn * 8 / 4096` < `pages` of the M2P mapping,
            // which mapped without error.
            if unsafe { m2p.add(mfn).read_volatile() } == pfn {
                found.push(mfn as u64);
            }
        }
    }
    // SAFETY: the reservation made above; nothing refers into it any more.
    unsafe { libc::munmap(va, pages * PAGE) };
    r.map_err(|e| format!("MMAPBATCH_V2(DOMID_XEN) of the M2P: {}", errno_text(&e)))?;
    Ok(M2p {
        mfns: found,
        max_mfn,
        xen_frame: frames[0],
        text: format!("M2P {pages} pages in {nr} extents, max mfn {max_mfn:#x}"),
    })
}

/// A FOREIGN region of our own frames. Built by hand: `RegionDescriptor::from_wire` rejects
/// domids above 0x7FEF, and DOMID_SELF (0x7FF0) is one of the special ids a frontend may
/// never send; only this test uses it, to play the guest with dom0's own memory.
fn self_region(gpa: u64, size: u64) -> RegionDescriptor {
    RegionDescriptor {
        guest_phys_addr: gpa,
        size,
        userspace_addr: 0,
        mmap_offset: 0,
        kind: RegionKind::Foreign { domid: DOMID_SELF },
    }
}

fn table(dev: &XenHandle, d: RegionDescriptor) -> Result<RegionTable, RegionError> {
    let r = XenRegion::new(d, None, Some(dev))?;
    Ok(RegionTable::from_regions(vec![r]).unwrap_or_default())
}

/// Maps our own page through the library and checks data both ways.
fn self_map() -> CaseResult {
    // The wire path refuses DOMID_SELF, as it must.
    let wire = WireRegion {
        guest_phys_addr: 0,
        memory_size: PAGE as u64,
        userspace_addr: 0,
        mmap_offset: 0,
        xen_mmap_flags: XenMmapFlags::FOREIGN.bits(),
        xen_mmap_data: u32::from(DOMID_SELF),
    };
    let refused = match RegionDescriptor::from_wire(&wire) {
        Ok(d) => return Err(format!("from_wire accepted DOMID_SELF: {d:?}")),
        Err(e) => e.to_string(),
    };
    let dev = open_dev()?;
    let page = OwnPage::new(std::process::id())?;
    let pfn = page.pfn()?;
    let M2p {
        mfns, text: m2p, ..
    } = mfns_of(pfn)?;
    if mfns.is_empty() {
        return Err(format!("no MFN has M2P entry pfn {pfn:#x} ({m2p})"));
    }
    let want = page.bytes();
    let mut tried = Vec::new();
    for &mfn in &mfns {
        let gpa = mfn << 12;
        let t = match table(&dev, self_region(gpa, PAGE as u64)) {
            Ok(t) => t,
            Err(e) => {
                tried.push(format!("mfn {mfn:#x}: {e}"));
                continue;
            }
        };
        let mut got = vec![0u8; PAGE];
        t.read_slice(&mut got, GuestAddress(gpa))
            .map_err(|e| format!("read region: {e}"))?;
        if got != want {
            tried.push(format!("mfn {mfn:#x}: mapped, other contents"));
            continue;
        }
        // Both ways: region → own page, own page → region.
        t.write_obj(0xeeu8, GuestAddress(gpa + 100))
            .map_err(|e| format!("write region: {e}"))?;
        page.set(200, 0x77);
        let back: u8 = t
            .read_obj(GuestAddress(gpa + 200))
            .map_err(|e| format!("read region: {e}"))?;
        if page.get(100) != 0xee || back != 0x77 {
            return Err(format!(
                "mfn {mfn:#x}: own page[100]={:#x} (want 0xee), region[200]={back:#x} (want 0x77)",
                page.get(100)
            ));
        }
        let live = dev.counters().live_mappings();
        drop(t);
        // A mid-page region on the same frame points at its own bytes.
        let mid = table(&dev, self_region(gpa + 0x100, 0x200))
            .map_err(|e| format!("mid-page region: {e}"))?;
        let mut got = vec![0u8; 0x200];
        mid.read_slice(&mut got, GuestAddress(gpa + 0x100))
            .map_err(|e| format!("read mid-page region: {e}"))?;
        let now = page.bytes();
        if got != now[0x100..0x300] {
            return Err(format!(
                "mid-page region at {:#x} does not read page offset 0x100",
                gpa + 0x100
            ));
        }
        drop(mid);
        let after = dev.counters().live_mappings();
        if live != 1 || after != 0 {
            return Err(format!(
                "live mappings {live} while mapped (want 1), {after} after (want 0)"
            ));
        }
        return Ok(format!(
            "pfn {pfn:#x} -> mfn {mfn:#x} ({m2p}, {} candidate(s)); FOREIGN region domid \
             {DOMID_SELF:#x} gpa {gpa:#x}: 4096 B match, writes seen both ways, mid-page region \
             reads offset 0x100; from_wire refuses it: {refused}",
            mfns.len()
        ));
    }
    Err(format!(
        "pfn {pfn:#x}: no candidate mapped our page: {}",
        tried.join("; ")
    ))
}

/// A bogus frame: the library names it in `BackendError::ForeignFrame` with privcmd's errno.
fn bogus_gfn() -> CaseResult {
    let dev = open_dev()?;
    let page = OwnPage::new(7)?;
    let m2p = mfns_of(page.pfn()?)?;
    let mut out = Vec::new();
    // Beyond RAM is not an error for dom0: the hardware domain may map non-RAM frames (I/O
    // memory) with DOMID_SELF. Recorded, never accessed.
    let mmio = m2p.max_mfn + 0x10_0000;
    match table(&dev, self_region(mmio << 12, PAGE as u64)) {
        Ok(_) => out.push(format!(
            "gfn {mmio:#x} (beyond RAM, max {:#x}) maps: dom0 may map non-RAM frames",
            m2p.max_mfn
        )),
        Err(e) => out.push(format!("gfn {mmio:#x} (beyond RAM): {e}")),
    }
    if dev.counters().live_mappings() != 0 {
        return Err("reservation leaked".into());
    }
    let huge = 0xF_FFFF_F000u64;
    let cases = [
        (
            "a frame of Xen's M2P table (Xen's RAM)",
            m2p.xen_frame << 12,
            PAGE as u64,
            m2p.xen_frame,
        ),
        (
            "beyond the physical address width",
            huge << 12,
            PAGE as u64,
            huge,
        ),
    ];
    for (what, gpa, size, expect_gfn) in cases {
        let before = dev.counters().snapshot();
        match table(&dev, self_region(gpa, size)) {
            Ok(_) => return Err(format!("{what}: region at gpa {gpa:#x} mapped")),
            Err(RegionError::Backend(BackendError::ForeignFrame { domid, gfn, errno }))
                if domid == DOMID_SELF && gfn == expect_gfn =>
            {
                let d = dev.counters().snapshot().since(&before);
                if dev.counters().live_mappings() != 0 {
                    return Err(format!("{what}: reservation leaked: {d:?}"));
                }
                let e = std::io::Error::from_raw_os_error(errno);
                out.push(format!(
                    "{what}: ForeignFrame gfn {gfn:#x}: {} ({} syscalls, reservation released)",
                    errno_text(&e),
                    d.syscalls()
                ));
            }
            Err(e) => {
                return Err(format!(
                    "{what}: expected ForeignFrame naming gfn {expect_gfn:#x}, got {e:?}"
                ))
            }
        }
    }
    Ok(out.join("; "))
}

/// A FOREIGN region of more than one MMAPBATCH chunk (1100 frames, two chunks) on the real
/// privcmd, which insists that the first batch on a mapping covers it whole: each chunk is its
/// own privcmd mapping. The frames are dom0-mappable non-RAM frames past the end of RAM
/// (see `foreign-bogus-gfn`); nothing touches them.
fn large_region() -> CaseResult {
    let dev = open_dev()?;
    let pages = 1100u64;
    let before = dev.counters().snapshot();
    let t = table(&dev, self_region(0x18_0000 << 12, pages * 4096))
        .map_err(|e| format!("1100-frame region: {e}"))?;
    let d = dev.counters().snapshot().since(&before);
    if (d.mmaps, d.ioctls, d.errors, d.pages_mapped) != (2, 2, 0, pages) {
        return Err(format!("expected 2 privcmd mappings and 2 batches: {d:?}"));
    }
    drop(t);
    let live = dev.counters().live_mappings();
    if live != 0 {
        return Err(format!("{live} mappings left"));
    }
    Ok(format!(
        "{pages} frames in 2 chunks: {} mmaps, {} MMAPBATCH ioctls, 0 errors; released",
        d.mmaps, d.ioctls
    ))
}

pub fn run_all(r: &mut Report) {
    r.case("foreign-self-map", self_map);
    r.case("foreign-bogus-gfn", bogus_gfn);
    r.case("foreign-large-region-chunked", large_region);
}
