//! `XenRegion::new_many` (what `SET_MEM_TABLE` builds with): UNIX regions of one file, even
//! through different descriptors as a frontend sends them, share one mapping of the file's
//! span; each still reads and writes exactly its own bytes of the file, outlives the others,
//! and is refused exactly as alone when it does not fit the file.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;

use common::{desc, memfd, wire};
use vm_memory::{Bytes, GuestAddress, GuestMemoryRegion};
use xen_vhost_mem::backend::BackendError;
use xen_vhost_mem::region::RegionError;
use xen_vhost_mem::{ForeignMapping, RegionDescriptor, RegionTable, XenRegion};

const MIB: u64 = 1 << 20;

fn dup(f: &File) -> File {
    f.try_clone().expect("dup")
}

fn build(items: &[(RegionDescriptor, Option<&File>)]) -> Vec<XenRegion> {
    XenRegion::new_many(items, None, ForeignMapping::Eager).expect("regions")
}

#[test]
fn regions_of_one_memfd_through_separate_fds_share_one_mapping() {
    let f = memfd(8 * MIB);
    for i in 0..8u64 {
        f.write_all_at(&[i as u8 + 1; 16], i * MIB).unwrap();
    }
    let fds: Vec<File> = (0..4).map(|_| dup(&f)).collect();
    // Four regions at scattered guest addresses over file offsets 1, 3, 5 and 7 MiB (not in
    // order), one fd each.
    let offsets = [3u64, 1, 7, 5];
    let items: Vec<(RegionDescriptor, Option<&File>)> = offsets
        .iter()
        .zip(&fds)
        .enumerate()
        .map(|(i, (&o, fd))| {
            (
                desc(wire((i as u64) << 32, MIB, 0, o * MIB, 0, 0)),
                Some(fd),
            )
        })
        .collect();
    let regions = build(&items);
    // One mapping: each region's bytes sit at its file offset's distance from the others'.
    let base = regions[1].host_address().unwrap() as u64;
    for (r, &o) in regions.iter().zip(&offsets) {
        assert_eq!(r.host_address().unwrap() as u64 - base, (o - 1) * MIB);
    }
    let table = RegionTable::from_regions(regions).unwrap();
    for (i, &o) in offsets.iter().enumerate() {
        let v: [u8; 16] = table.read_obj(GuestAddress((i as u64) << 32)).unwrap();
        assert_eq!(v, [o as u8 + 1; 16], "region {i} reads file offset {o} MiB");
    }
    table
        .write_obj(0xabcd_u16, GuestAddress((2 << 32) + 10))
        .unwrap();
    let mut b = [0u8; 2];
    f.read_exact_at(&mut b, 7 * MIB + 10).unwrap();
    assert_eq!(u16::from_le_bytes(b), 0xabcd);
    // Dropping all but one region keeps the last one's bytes mapped.
    let (t2, last) = table.remove(3 << 32, MIB).unwrap();
    drop(table);
    drop(t2);
    let mut v = [0u8; 16];
    last.as_volatile_slice().unwrap().copy_to(&mut v[..]);
    assert_eq!(v, [6; 16]);
}

#[test]
fn a_sparse_span_is_mapped_region_by_region() {
    // Two 1 MiB regions 64 MiB apart in one file: the span is 65 MiB for 2 MiB of regions.
    let f = memfd(66 * MIB);
    f.write_all_at(b"far", 65 * MIB).unwrap();
    let items = [
        (desc(wire(0, MIB, 0, 0, 0, 0)), Some(&f)),
        (desc(wire(MIB, MIB, 0, 65 * MIB, 0, 0)), Some(&f)),
    ];
    let regions = build(&items);
    let (a, b) = (
        regions[0].host_address().unwrap() as u64,
        regions[1].host_address().unwrap() as u64,
    );
    assert_ne!(b.wrapping_sub(a), 65 * MIB, "not one span mapping");
    let table = RegionTable::from_regions(regions).unwrap();
    let mut v = [0u8; 3];
    table.read_slice(&mut v, GuestAddress(MIB)).unwrap();
    assert_eq!(&v, b"far");
}

#[test]
fn a_region_past_its_file_is_refused_with_its_index() {
    let f = memfd(4 * MIB);
    let items = [
        (desc(wire(0, MIB, 0, 0, 0, 0)), Some(&f)),
        (desc(wire(MIB, MIB, 0, MIB, 0, 0)), Some(&f)),
        (desc(wire(2 * MIB, 2 * MIB, 0, 3 * MIB, 0, 0)), Some(&f)),
    ];
    let err = XenRegion::new_many(&items, None, ForeignMapping::Eager).unwrap_err();
    match err {
        (
            2,
            RegionError::Backend(BackendError::UnixBeyondFile {
                gpa,
                size,
                offset,
                file_len,
            }),
        ) => assert_eq!(
            (gpa, size, offset, file_len),
            (2 * MIB, 2 * MIB, 3 * MIB, 4 * MIB)
        ),
        other => panic!("unexpected {other:?}"),
    }
}
