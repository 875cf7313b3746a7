//! Wire regions and table building: random insert/remove sequences of `WireRegion`s through
//! `RegionDescriptor::from_wire`, `XenRegion::new` (emulated Xen for FOREIGN and GRANT, a
//! memfd for UNIX) and `RegionTable::insert/remove`. After every input: the table is sorted
//! and non-overlapping, and once it is dropped nothing is mapped.
#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use xen_vhost_mem::testing::GuestSim;
use xen_vhost_mem::xen_page::grant_addr;
use xen_vhost_mem::{RegionDescriptor, RegionTable, WireRegion, XenRegion};

#[derive(Arbitrary, Debug)]
enum Gpa {
    /// Near the emulated frames (gfn 0..32).
    Low { page: u8, off: u16 },
    /// A grant address (bit 63) near the granted refs.
    Grant { gref: u8, off: u16 },
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Size {
    Small { pages: u8, extra: u16 },
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Flags {
    Unix,
    Foreign,
    Grant,
    GrantOnDemand,
    GrantOnDemandSpec,
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Insert {
        gpa: Gpa,
        size: Size,
        uaddr: u64,
        offset: u16,
        raw_offset: Option<u64>,
        flags: Flags,
        domid: Option<u32>,
    },
    /// Removes the `n`th region (exact gpa/size), or a raw pair.
    Remove { n: u8, raw: Option<(u64, u64)> },
}

const FRAMES: usize = 16;
const GRANTS: usize = 16;
const MEMFD_LEN: u64 = 64 * 1024;

fn memfd(len: u64) -> File {
    // SAFETY: a valid NUL-terminated name and plain flags.
    let fd = unsafe { libc::memfd_create(c"fuzz-regions".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size memfd");
    f
}

fn wire(op: &Op) -> Option<WireRegion> {
    let Op::Insert {
        gpa,
        size,
        uaddr,
        offset,
        raw_offset,
        flags,
        domid,
    } = op
    else {
        return None;
    };
    let gpa = match *gpa {
        Gpa::Low { page, off } => u64::from(page % 40) * 4096 + u64::from(off % 4096),
        Gpa::Grant { gref, off } => grant_addr(u32::from(gref % 40), u64::from(off % 4096)),
        Gpa::Raw(v) => v,
    };
    let size = match *size {
        Size::Small { pages, extra } => u64::from(pages % 24) * 4096 + u64::from(extra % 4097),
        Size::Raw(v) => v,
    };
    let flags = match *flags {
        Flags::Unix => 0,
        Flags::Foreign => 1,
        Flags::Grant => 2,
        Flags::GrantOnDemand => 2 | 8,
        Flags::GrantOnDemandSpec => 2 | 0x100,
        Flags::Raw(v) => v,
    };
    Some(WireRegion {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: *uaddr,
        mmap_offset: raw_offset.unwrap_or(u64::from(*offset % 8) * 4096),
        xen_mmap_flags: flags,
        xen_mmap_data: domid.unwrap_or(1),
    })
}

fuzz_target!(|ops: Vec<Op>| {
    let sim = GuestSim::new(1, 2 * (FRAMES + GRANTS)).expect("emulation");
    sim.frames(0, FRAMES).expect("frames");
    for i in 0..GRANTS {
        sim.grant(1, i % 3 == 2).expect("grant");
    }
    let file = memfd(MEMFD_LEN);
    let mut table = RegionTable::new();
    for op in ops.iter().take(64) {
        match op {
            Op::Insert { .. } => {
                let Some(w) = wire(op) else { continue };
                let Ok(d) = RegionDescriptor::from_wire(&w) else {
                    continue;
                };
                assert_eq!(d.to_wire().guest_phys_addr, w.guest_phys_addr);
                let Ok(r) = XenRegion::new(d, Some(&file), Some(&sim.dev)) else {
                    continue;
                };
                if let Ok(t) = table.insert(Arc::new(r)) {
                    table = t;
                }
            }
            Op::Remove { n, raw } => {
                let (gpa, size) = match raw {
                    Some(p) => *p,
                    None => match table.regions().get(usize::from(*n)) {
                        Some(r) => (r.descriptor().guest_phys_addr, r.descriptor().size),
                        None => continue,
                    },
                };
                if let Ok((t, _)) = table.remove(gpa, size) {
                    table = t;
                }
            }
        }
        // Sorted, non-overlapping.
        for w in table.regions().windows(2) {
            let (a, b) = (w[0].descriptor(), w[1].descriptor());
            assert!(a.last_addr() < b.guest_phys_addr, "{a:?} overlaps {b:?}");
        }
    }
    drop(table);
    sim.assert_nothing_mapped();
});
