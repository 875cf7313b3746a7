//! Regions of every kind through `XenRegion::new` and the `RegionTable`, with real bytes through
//! real mappings, and nothing left mapped afterwards.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::{
    anon_region, desc, foreign_region, frames, grant, grant_region, guest, memfd, on_demand_region,
    pattern, wire, DOMID, FLAG_FOREIGN, FLAG_GRANT, FLAG_NO_ADVANCE, PAGE,
};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    Permissions,
};
use xen_vhost_mem::backend::foreign::PAGED_OUT_ATTEMPTS;
use xen_vhost_mem::backend::BackendError;
use xen_vhost_mem::device::CounterSnapshot;
use xen_vhost_mem::region::{OnDemandAccess, RegionError};
use xen_vhost_mem::table::TableError;
use xen_vhost_mem::xen_page::grant_addr;
use xen_vhost_mem::{RegionTable, XenRegion};

fn table(regions: Vec<XenRegion>) -> RegionTable {
    RegionTable::from_regions(regions).expect("non-overlapping test regions")
}

fn read(t: &RegionTable, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    t.read_slice(&mut v, GuestAddress(gpa))
        .unwrap_or_else(|e| panic!("read {len} bytes at {gpa:#x}: {e}"));
    v
}

/// The `OnDemandAccess` carried by a plain-table access error, if that is what it is.
fn on_demand_of(e: &GuestMemoryError) -> Option<&OnDemandAccess> {
    match e {
        GuestMemoryError::IOError(io) => io.get_ref()?.downcast_ref::<OnDemandAccess>(),
        _ => None,
    }
}

fn unix_region_at_offset(offset: u64) {
    let gpa = 0x10_0000;
    let size = 0x2800u64;
    let f = memfd(0x10000);
    let data = pattern(7, size as usize);
    // Bytes before the offset must not show up in the region.
    f.write_all_at(&pattern(99, offset as usize), 0).unwrap();
    f.write_all_at(&data, offset).unwrap();
    let r = XenRegion::new(
        desc(wire(gpa, size, 0x7f00_0000_0000, offset, 0, 0)),
        Some(&f),
        None,
    )
    .unwrap();
    let t = table(vec![r]);
    assert_eq!(read(&t, gpa, size as usize), data, "offset {offset:#x}");
    assert_eq!(read(&t, gpa + 0x1ffe, 4), data[0x1ffe..0x2002]);
    // Writes through the table land in the file at the offset.
    t.write_slice(b"through the table", GuestAddress(gpa + 0x100))
        .unwrap();
    let mut back = [0u8; 17];
    f.read_exact_at(&mut back, offset + 0x100).unwrap();
    assert_eq!(&back, b"through the table");
    // Writes to the file show through the mapping.
    f.write_all_at(b"via fd", offset + size - 6).unwrap();
    assert_eq!(read(&t, gpa + size - 6, 6), b"via fd");
    // A read running past the end stops there.
    let mut buf = vec![0u8; 0x10];
    assert!(matches!(
        t.read_slice(&mut buf, GuestAddress(gpa + size - 8)),
        Err(GuestMemoryError::PartialBuffer {
            expected: 0x10,
            completed: 8
        })
    ));
    assert!(matches!(
        t.read_slice(&mut buf, GuestAddress(gpa + size)),
        Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(a))) if a == gpa + size
    ));
}

#[test]
fn unix_region_from_memfd_at_page_aligned_offset() {
    unix_region_at_offset(0x3000);
}

#[test]
fn unix_region_from_memfd_at_unaligned_offset() {
    unix_region_at_offset(0x1234);
}

#[test]
fn foreign_region_reads_and_writes_guest_frames() {
    let g = guest(16);
    let page = frames(&g, 0x100, 4);
    for i in 0..4 {
        g.emu
            .write_page(page + i, 0, &pattern(i as u8, PAGE))
            .unwrap();
    }
    let before = g.dev.counters().snapshot();
    let gpa = 0x10_0000;
    let t = table(vec![foreign_region(&g, gpa, 0x4000)]);
    assert_eq!(g.emu.live_mappings(), 1);
    assert_eq!(g.dev.counters().live_mappings(), 1);
    // One reservation, one MMAPBATCH for the whole region.
    assert_eq!(
        g.dev.counters().snapshot().since(&before),
        CounterSnapshot {
            ioctls: 1,
            mmaps: 1,
            pages_mapped: 4,
            live_mappings: 1,
            ..Default::default()
        }
    );
    for i in 0..4u64 {
        assert_eq!(
            read(&t, gpa + i * 0x1000, PAGE),
            pattern(i as u8, PAGE),
            "frame {i}"
        );
    }
    // Guest writes, device reads across a frame boundary.
    g.emu.write_page(page + 1, 0xff8, b"12345678").unwrap();
    g.emu.write_page(page + 2, 0, b"abcdefgh").unwrap();
    assert_eq!(read(&t, gpa + 0x1ff8, 16), b"12345678abcdefgh");
    // Device writes, guest reads.
    let out = pattern(42, 0x1800);
    t.write_slice(&out, GuestAddress(gpa + 0x2800)).unwrap();
    assert_eq!(
        g.emu.read_page(page + 2, 0x800, 0x800).unwrap(),
        out[..0x800]
    );
    assert_eq!(g.emu.read_page(page + 3, 0, PAGE).unwrap(), out[0x800..]);
    assert_eq!(g.emu.read_page(page + 2, 0, 8).unwrap(), b"abcdefgh");
    drop(t);
    g.assert_nothing_mapped();
}

#[test]
fn mid_page_foreign_region_starts_at_its_page_offset() {
    let g = guest(8);
    let page = frames(&g, 0x200, 2);
    g.emu.write_page(page, 0, &pattern(1, PAGE)).unwrap();
    g.emu.write_page(page + 1, 0, &pattern(2, PAGE)).unwrap();
    let gpa = 0x20_0a00;
    let t = table(vec![foreign_region(&g, gpa, 0x1000)]);
    let got = read(&t, gpa, 0x1000);
    assert_eq!(got[..0x600], pattern(1, PAGE)[0xa00..]);
    assert_eq!(got[0x600..], pattern(2, PAGE)[..0xa00]);
    assert_eq!(g.dev.counters().snapshot().pages_mapped, 2);
    drop(t);
    g.assert_nothing_mapped();
}

#[test]
fn foreign_frame_paged_out_within_the_retry_budget_is_mapped_at_its_own_slot() {
    let g = guest(8);
    let page = frames(&g, 0x300, 4);
    for i in 0..4 {
        g.emu
            .write_page(page + i, 0, &pattern(20 + i as u8, PAGE))
            .unwrap();
    }
    // Paged out for every attempt but the last one allowed.
    g.emu.page_out(DOMID, 0x302, PAGED_OUT_ATTEMPTS - 1);
    let gpa = 0x30_0000;
    let t = table(vec![foreign_region(&g, gpa, 0x4000)]);
    for i in 0..4u64 {
        assert_eq!(
            read(&t, gpa + i * 0x1000, PAGE),
            pattern(20 + i as u8, PAGE),
            "frame {i}"
        );
    }
    let s = g.dev.counters().snapshot();
    // One batch, then one single-frame retry per further attempt; every paged-out answer is
    // a failed call.
    assert_eq!(s.ioctls, u64::from(PAGED_OUT_ATTEMPTS));
    assert_eq!(s.errors, u64::from(PAGED_OUT_ATTEMPTS - 1));
    assert_eq!(s.live_mappings, 1);
    drop(t);
    g.assert_nothing_mapped();
}

#[test]
fn large_foreign_region_is_batched_in_chunks_and_retries_land_in_the_right_chunk() {
    use xen_vhost_mem::backend::foreign::BATCH_FRAMES;
    let n = BATCH_FRAMES + 6;
    let g = guest(n + 1);
    let page = frames(&g, 0x1_0000, n);
    for i in [
        0,
        1,
        BATCH_FRAMES - 1,
        BATCH_FRAMES,
        BATCH_FRAMES + 3,
        n - 1,
    ] {
        g.emu
            .write_page(page + i, 0, &(i as u64).to_le_bytes())
            .unwrap();
    }
    // One frame in the second chunk is paged out for two attempts.
    g.emu.page_out(DOMID, 0x1_0000 + BATCH_FRAMES as u64 + 3, 2);
    let gpa = 0x1_0000 * 0x1000;
    let t = table(vec![foreign_region(&g, gpa, (n * PAGE) as u64)]);
    for i in [
        0,
        1,
        BATCH_FRAMES - 1,
        BATCH_FRAMES,
        BATCH_FRAMES + 3,
        n - 1,
    ] {
        assert_eq!(
            read(&t, gpa + (i * PAGE) as u64, 8),
            (i as u64).to_le_bytes(),
            "frame {i}"
        );
    }
    let s = g.dev.counters().snapshot();
    // Two chunks, each its own privcmd mapping filled by one call, then two single-frame
    // retries.
    assert_eq!(
        (s.ioctls, s.mmaps, s.errors, s.pages_mapped),
        (4, 2, 2, n as u64)
    );
    drop(t);
    g.assert_nothing_mapped();
}

#[test]
fn foreign_frame_that_stays_paged_out_is_an_error_naming_it() {
    let g = guest(8);
    frames(&g, 0x400, 4);
    g.emu.page_out(DOMID, 0x402, PAGED_OUT_ATTEMPTS);
    let r = XenRegion::new(
        desc(wire(0x40_0000, 0x4000, 0, 0, FLAG_FOREIGN, DOMID.into())),
        None,
        Some(&g.dev),
    );
    assert!(
        matches!(
            r,
            Err(RegionError::Backend(BackendError::ForeignPagedOut {
                domid: DOMID,
                gfn: 0x402,
                attempts: PAGED_OUT_ATTEMPTS
            }))
        ),
        "{r:?}"
    );
    let s = g.dev.counters().snapshot();
    assert_eq!((s.mmaps, s.munmaps), (1, 1));
    g.assert_nothing_mapped();
}

#[test]
fn unknown_foreign_frame_is_an_error_naming_it() {
    let g = guest(8);
    frames(&g, 0x500, 2);
    // The region asks for 3 frames; 0x502 does not exist.
    let r = XenRegion::new(
        desc(wire(0x50_0000, 0x3000, 0, 0, FLAG_FOREIGN, DOMID.into())),
        None,
        Some(&g.dev),
    );
    match r {
        Err(RegionError::Backend(BackendError::ForeignFrame { domid, gfn, errno })) => {
            assert_eq!((domid, gfn, errno), (DOMID, 0x502, libc::EINVAL));
        }
        other => panic!("expected ForeignFrame, got {other:?}"),
    }
    // Frames of another domain are unknown too.
    let r = XenRegion::new(
        desc(wire(0x50_0000, 0x1000, 0, 0, FLAG_FOREIGN, 7)),
        None,
        Some(&g.dev),
    );
    assert!(
        matches!(
            r,
            Err(RegionError::Backend(BackendError::ForeignFrame { domid: 7, gfn: 0x500, errno }))
                if errno == libc::EINVAL
        ),
        "{r:?}"
    );
    g.assert_nothing_mapped();
}

#[test]
fn xen_regions_without_a_device_are_refused() {
    for (gpa, flags) in [
        (0x10_0000, FLAG_FOREIGN),
        (grant_addr(8, 0x40), FLAG_GRANT),
        (grant_addr(8, 0), FLAG_GRANT | FLAG_NO_ADVANCE),
    ] {
        let r = XenRegion::new(desc(wire(gpa, 0x1000, 0, 0, flags, 1)), None, None);
        assert!(
            matches!(r, Err(RegionError::NoDevice { gpa: g }) if g == gpa),
            "flags {flags:#x}: {r:?}"
        );
    }
}

#[test]
fn unmapped_grant_refs_fail_the_region_and_release_the_map() {
    let g = guest(8);
    let (_, r) = grant(&g, 1, false);
    // Two pages needed, only the first is granted.
    let gpa = grant_addr(r, 0x800);
    let res = XenRegion::new(
        desc(wire(gpa, 0x1000, 0, 0, FLAG_GRANT, DOMID.into())),
        None,
        Some(&g.dev),
    );
    match res {
        Err(RegionError::Backend(BackendError::GrantMap {
            domid,
            gpa: got,
            first_ref,
            pages,
            source,
        })) => {
            assert_eq!(
                (domid, got, first_ref, pages),
                (DOMID, gpa, u64::from(r), 2)
            );
            assert_eq!(source.errno(), Some(libc::EINVAL));
        }
        other => panic!("expected GrantMap, got {other:?}"),
    }
    g.assert_nothing_mapped();
}

#[test]
fn mid_page_grant_region_reads_its_own_offset_not_the_page_start() {
    let g = guest(8);
    let (page, r) = grant(&g, 3, false);
    let p0 = pattern(0xa0, PAGE);
    let p1 = pattern(0xb0, PAGE);
    let p2 = pattern(0xc0, PAGE);
    g.emu.write_page(page, 0, &p0).unwrap();
    g.emu.write_page(page + 1, 0, &p1).unwrap();
    g.emu.write_page(page + 2, 0, &p2).unwrap();

    let gpa = grant_addr(r, 0x840);
    let size = 0x1002u64;
    let before = g.dev.counters().snapshot();
    let region = grant_region(&g, gpa, size, 0x7f00_0000_0840);
    // Exactly the 2 pages the bytes span, in one map and one mmap.
    assert_eq!(
        g.dev.counters().snapshot().since(&before),
        CounterSnapshot {
            ioctls: 1,
            mmaps: 1,
            pages_mapped: 2,
            live_mappings: 1,
            ..Default::default()
        }
    );
    let host = region.host_address().expect("mapped in advance") as usize;
    assert_eq!(
        host % PAGE,
        0x840,
        "host pointer must sit at the in-page offset"
    );
    let t = table(vec![region]);

    // The vm-memory defect: the region's first byte is page offset 0x840, not offset 0.
    let head = read(&t, gpa, 16);
    assert_eq!(head, p0[0x840..0x850]);
    assert_ne!(
        head,
        p0[..16],
        "read the page start instead of offset 0x840"
    );
    let all = read(&t, gpa, size as usize);
    assert_eq!(all[..0x7c0], p0[0x840..]);
    assert_eq!(all[0x7c0..], p1[..0x842]);

    // Writes land at the offset too, and nothing before it or past the region changes.
    t.write_slice(b"RING", GuestAddress(gpa)).unwrap();
    assert_eq!(g.emu.read_page(page, 0x840, 4).unwrap(), b"RING");
    assert_eq!(g.emu.read_page(page, 0, 0x840).unwrap(), p0[..0x840]);
    t.write_slice(b"END", GuestAddress(gpa + size - 3)).unwrap();
    assert_eq!(g.emu.read_page(page + 1, 0x83f, 3).unwrap(), b"END");
    assert_eq!(
        g.emu.read_page(page + 1, 0x842, PAGE - 0x842).unwrap(),
        p1[0x842..]
    );
    assert_eq!(g.emu.read_page(page + 2, 0, PAGE).unwrap(), p2);
    // Atomic access (as virtio-queue does for ring indexes) works on the mapped ring.
    t.store(0xbeefu16, GuestAddress(gpa + 2), Ordering::Release)
        .unwrap();
    assert_eq!(
        t.load::<u16>(GuestAddress(gpa + 2), Ordering::Acquire)
            .unwrap(),
        0xbeef
    );
    assert_eq!(
        g.emu.read_page(page, 0x842, 2).unwrap(),
        0xbeefu16.to_le_bytes()
    );
    // Past the end is a hole.
    let mut buf = [0u8; 8];
    assert!(matches!(
        t.read_slice(&mut buf, GuestAddress(gpa + size - 4)),
        Err(GuestMemoryError::PartialBuffer {
            expected: 8,
            completed: 4
        })
    ));
    drop(t);
    g.assert_nothing_mapped();
}

#[test]
fn plain_access_to_an_on_demand_region_is_an_error_not_a_panic() {
    let g = guest(8);
    let (_, r) = grant(&g, 4, false);
    // The frontend's layout: a mid-page ring mapped in advance, and on-demand memory from the
    // next page boundary.
    let ring_gpa = grant_addr(r, 0x840);
    let od_gpa = grant_addr(r + 2, 0);
    let od_size = 0x10_0000;
    let ring = grant_region(&g, ring_gpa, 0x1002, 0x7f00_0000_0840);
    let before = g.dev.counters().snapshot();
    let od = on_demand_region(&g, od_gpa, od_size);
    assert!(od.host_address().is_none());
    assert_eq!(od.on_demand_domid(), Some(DOMID));
    let t = table(vec![ring, od]);
    assert_eq!(t.num_regions(), 2);

    let at = od_gpa + 0x10;
    let want = OnDemandAccess {
        gpa: at,
        domid: DOMID,
    };
    let mut buf = [0u8; 16];
    let e = t.read_slice(&mut buf, GuestAddress(at)).unwrap_err();
    assert_eq!(on_demand_of(&e), Some(&want), "{e:?}");
    let e = t.write_slice(&buf, GuestAddress(at)).unwrap_err();
    assert_eq!(on_demand_of(&e), Some(&want), "{e:?}");
    let e = t
        .load::<u32>(GuestAddress(at), Ordering::Acquire)
        .unwrap_err();
    assert_eq!(on_demand_of(&e), Some(&want), "{e:?}");
    let e = t
        .store(1u16, GuestAddress(at), Ordering::Release)
        .unwrap_err();
    assert_eq!(on_demand_of(&e), Some(&want), "{e:?}");
    let e = GuestMemoryBackend::get_host_address(&t, GuestAddress(at)).unwrap_err();
    assert_eq!(on_demand_of(&e), Some(&want), "{e:?}");
    let e = GuestMemoryBackend::get_slice(&t, GuestAddress(at), 4).unwrap_err();
    assert_eq!(on_demand_of(&e), Some(&want), "{e:?}");
    let first = GuestMemory::get_slices(&t, GuestAddress(at), 4, Permissions::Read)
        .unwrap()
        .next()
        .unwrap();
    assert_eq!(on_demand_of(&first.unwrap_err()), Some(&want));
    assert!(!GuestMemory::check_range(
        &t,
        GuestAddress(at),
        4,
        Permissions::Read
    ));
    // The first and the very last byte of the region.
    let e = t
        .read_slice(&mut buf[..1], GuestAddress(od_gpa))
        .unwrap_err();
    assert_eq!(
        on_demand_of(&e),
        Some(&OnDemandAccess {
            gpa: od_gpa,
            domid: DOMID
        })
    );
    let last = od_gpa + od_size - 1;
    let e = t.read_slice(&mut buf[..1], GuestAddress(last)).unwrap_err();
    assert_eq!(
        on_demand_of(&e),
        Some(&OnDemandAccess {
            gpa: last,
            domid: DOMID
        })
    );
    // The ring next to it still works.
    t.write_slice(b"ok", GuestAddress(ring_gpa)).unwrap();
    assert_eq!(read(&t, ring_gpa, 2), b"ok");
    // The on-demand region and the failed accesses never touched the device; each refusal
    // was counted (the rule is loud).
    let d = g.dev.counters().snapshot().since(&before);
    assert!(d.plain_table_refusals >= 10, "{d:?}");
    assert_eq!(
        d,
        CounterSnapshot {
            plain_table_refusals: d.plain_table_refusals,
            ..Default::default()
        }
    );
    drop(t);
    g.assert_nothing_mapped();
}

#[test]
fn on_demand_region_reaching_the_top_of_the_address_space() {
    let g = guest(4);
    let gpa = (1u64 << 63) | 0x10000;
    let t = table(vec![on_demand_region(&g, gpa, u64::MAX - gpa + 1)]);
    let r = t
        .find_region(GuestAddress(u64::MAX))
        .expect("top byte is in the region");
    assert_eq!(r.last_addr(), GuestAddress(u64::MAX));
    let mut buf = [0u8; 4];
    let e = t
        .read_slice(&mut buf, GuestAddress(u64::MAX - 1))
        .unwrap_err();
    assert_eq!(
        on_demand_of(&e),
        Some(&OnDemandAccess {
            gpa: u64::MAX - 1,
            domid: DOMID
        }),
        "{e:?}"
    );
    assert!(t.find_region(GuestAddress(gpa - 1)).is_none());
    drop(t);
    g.assert_nothing_mapped();
}

#[test]
fn overlapping_regions_are_refused_with_both_regions_named() {
    let a = || anon_region(0x10_0000, 0x2000, 0);
    let b = || anon_region(0x20_0000, 0x1000, 0);
    let t = table(vec![b(), a()]);
    assert_eq!(
        t.regions()
            .iter()
            .map(|r| r.descriptor().guest_phys_addr)
            .collect::<Vec<_>>(),
        [0x10_0000, 0x20_0000],
        "sorted by gpa"
    );
    let cases: [(u64, u64, u64, u64); 5] = [
        // (new gpa, new size, other gpa, other size)
        (0x10_1000, 0x2000, 0x10_0000, 0x2000), // over a's tail
        (0x0f_f000, 0x1001, 0x10_0000, 0x2000), // one byte into a's head
        (0x10_0000, 0x2000, 0x10_0000, 0x2000), // a itself
        (0x1f_f000, 0x3000, 0x20_0000, 0x1000), // covers b entirely
        (0x20_0fff, 1, 0x20_0000, 0x1000),      // b's last byte
    ];
    for (gpa, size, other_gpa, other_size) in cases {
        assert_eq!(
            t.insert(Arc::new(anon_region(gpa, size, 0))).unwrap_err(),
            TableError::Overlap {
                gpa,
                size,
                other_gpa,
                other_size
            },
            "new region {gpa:#x}+{size:#x}"
        );
    }
    // Adjacent regions on both sides are fine.
    let t2 = t
        .insert(Arc::new(anon_region(0x0f_f000, 0x1000, 0)))
        .and_then(|t| t.insert(Arc::new(anon_region(0x10_2000, 0x1000, 0))))
        .unwrap();
    assert_eq!(t2.num_regions(), 4);
    assert_eq!(t.num_regions(), 2);
    assert!(matches!(
        RegionTable::from_regions(vec![a(), anon_region(0x10_1fff, 0x10, 0)]),
        Err(TableError::Overlap {
            gpa: 0x10_1fff,
            size: 0x10,
            other_gpa: 0x10_0000,
            other_size: 0x2000
        })
    ));
}

#[test]
fn insert_and_remove_build_new_tables_and_leave_the_old_ones_alone() {
    let g = guest(8);
    let (page, r) = grant(&g, 2, false);
    g.emu.write_page(page, 0, &pattern(5, PAGE)).unwrap();
    let frames = frames(&g, 0x100, 1);
    g.emu.write_page(frames, 0, &pattern(6, PAGE)).unwrap();

    let t0 = RegionTable::new();
    let t1 = t0
        .insert(Arc::new(foreign_region(&g, 0x10_0000, 0x1000)))
        .unwrap();
    let ring_gpa = grant_addr(r, 0);
    let t2 = t1
        .insert(Arc::new(grant_region(
            &g,
            ring_gpa,
            0x2000,
            0x7f00_0000_0000,
        )))
        .unwrap();
    assert_eq!(
        (t0.num_regions(), t1.num_regions(), t2.num_regions()),
        (0, 1, 2)
    );
    assert_eq!(g.dev.counters().live_mappings(), 2);
    assert!(t1.find_region(GuestAddress(ring_gpa)).is_none());
    assert_eq!(read(&t2, ring_gpa, PAGE), pattern(5, PAGE));

    // Removing names the exact gpa and size.
    assert_eq!(
        t2.remove(ring_gpa, 0x1000).unwrap_err(),
        TableError::NotFound {
            gpa: ring_gpa,
            size: 0x1000
        }
    );
    assert_eq!(
        t2.remove(0x99_0000, 0x1000).unwrap_err(),
        TableError::NotFound {
            gpa: 0x99_0000,
            size: 0x1000
        }
    );
    let (t3, removed) = t2.remove(ring_gpa, 0x2000).unwrap();
    assert_eq!(removed.descriptor().guest_phys_addr, ring_gpa);
    assert_eq!((t2.num_regions(), t3.num_regions()), (2, 1));
    assert!(t3.find_region(GuestAddress(ring_gpa)).is_none());
    assert_eq!(read(&t3, 0x10_0000, PAGE), pattern(6, PAGE));
    // The old table still reads the removed region: the mapping lives while anyone holds it.
    assert_eq!(read(&t2, ring_gpa, PAGE), pattern(5, PAGE));
    drop(t2);
    assert_eq!(
        g.dev.counters().live_mappings(),
        2,
        "`removed` still holds the ring"
    );
    drop(removed);
    assert_eq!(g.dev.counters().live_mappings(), 1);
    assert_eq!(g.emu.live_grant_maps(), 0);
    drop((t0, t1, t3));
    g.assert_nothing_mapped();
}

#[test]
fn frontend_addresses_translate_through_userspace_addr() {
    let g = guest(8);
    let (_, r) = grant(&g, 2, false);
    let ring_gpa = grant_addr(r, 0x840);
    let ring_uaddr = 0x7f00_1234_5840;
    let t = table(vec![
        anon_region(0x10_0000, 0x4000, 0x7e00_0000_0000),
        grant_region(&g, ring_gpa, 0x1002, ring_uaddr),
        on_demand_region(&g, grant_addr(r + 2, 0), 0x10_0000),
    ]);
    assert_eq!(t.uaddr_to_gpa(ring_uaddr), Some(GuestAddress(ring_gpa)));
    assert_eq!(
        t.uaddr_to_gpa(ring_uaddr + 0x1001),
        Some(GuestAddress(ring_gpa + 0x1001))
    );
    assert_eq!(t.uaddr_to_gpa(ring_uaddr + 0x1002), None);
    assert_eq!(t.uaddr_to_gpa(ring_uaddr - 1), None);
    assert_eq!(
        t.uaddr_to_gpa(0x7e00_0000_0000),
        Some(GuestAddress(0x10_0000))
    );
    assert_eq!(
        t.uaddr_to_gpa(0x7e00_0000_3fff),
        Some(GuestAddress(0x10_3fff))
    );
    assert_eq!(t.uaddr_to_gpa(0x7e00_0000_4000), None);
    // The on-demand region has userspace_addr 0: low addresses never translate into it.
    assert_eq!(t.uaddr_to_gpa(0), None);
    assert_eq!(t.uaddr_to_gpa(0x10), None);
    // A translated ring address reads the ring's bytes.
    t.write_slice(b"vring", t.uaddr_to_gpa(ring_uaddr + 0x10).unwrap())
        .unwrap();
    assert_eq!(read(&t, ring_gpa + 0x10, 5), b"vring");
    drop(t);
    g.assert_nothing_mapped();
}

/// A FOREIGN region's gpa is a plain guest physical address: its first frame is `gpa >> 12`.
/// Using `xen_page::frame_of` there would drop bit 63 (the *grant* marker), so a FOREIGN region
/// at `1 << 63 | 0x10_0000` would silently map frames `0x100..`, aliasing the region at
/// `0x10_0000`, instead of failing on gfn `0x8_0000_0000_0100`.
#[test]
fn foreign_region_with_bit_63_does_not_alias_low_frames() {
    let g = guest(4);
    let page = frames(&g, 0x100, 1);
    g.emu.write_page(page, 0, b"frame 0x100").unwrap();
    let gpa = (1u64 << 63) | 0x10_0000;
    let r = XenRegion::new(
        desc(wire(gpa, 0x1000, 0, 0, FLAG_FOREIGN, DOMID.into())),
        None,
        Some(&g.dev),
    );
    match r {
        Err(RegionError::Backend(BackendError::ForeignFrame { domid, gfn, errno })) => {
            assert_eq!((domid, gfn, errno), (DOMID, gpa >> 12, libc::EINVAL));
        }
        other => panic!(
            "expected ForeignFrame for gfn {:#x}, got {other:?}",
            gpa >> 12
        ),
    }
    g.assert_nothing_mapped();
}

/// A UNIX region larger than its file would map fine (vm-memory maps it) but the first access
/// past EOF raises SIGBUS, killing the daemon: the frontend controls both the fd and the size.
/// `backend::unix::map_unix` compares `mmap_offset + size` with the file's length and refuses. (This test only builds the region; it never touches the bytes.)
#[test]
fn unix_region_past_the_end_of_its_file_is_refused() {
    let f = memfd(0x1000);
    let r = XenRegion::new(
        desc(wire(0x10_0000, 0x3000, 0, 0x800, 0, 0)),
        Some(&f),
        None,
    );
    assert!(
        matches!(
            r,
            Err(RegionError::Backend(BackendError::UnixBeyondFile {
                gpa: 0x10_0000,
                size: 0x3000,
                offset: 0x800,
                file_len: 0x1000,
            }))
        ),
        "{r:?}"
    );
}

/// `RegionDescriptor`'s fields are public, so `XenRegion::new` checks them again: a
/// hand-built zero-size or overflowing region is an error, never a later panic.
#[test]
fn hand_built_descriptors_are_checked_again() {
    use xen_vhost_mem::descriptor::{DescriptorError, GrantMapping, RegionKind};
    let g = guest(4);
    let od = |gpa: u64, size: u64| xen_vhost_mem::RegionDescriptor {
        guest_phys_addr: gpa,
        size,
        userspace_addr: 0,
        mmap_offset: 0,
        kind: RegionKind::Grant {
            domid: DOMID,
            mapping: GrantMapping::OnDemand,
        },
    };
    let cases = [
        (od(1 << 63, 0), DescriptorError::ZeroSize { gpa: 1 << 63 }),
        (
            od(u64::MAX - 0xfff, 0x2000),
            DescriptorError::GpaOverflow {
                gpa: u64::MAX - 0xfff,
                size: 0x2000,
            },
        ),
    ];
    for (d, want) in cases {
        match XenRegion::new(d, None, Some(&g.dev)) {
            Err(RegionError::Descriptor(e)) => assert_eq!(e, want),
            other => panic!("{d:?}: {other:?}"),
        }
    }
    g.assert_nothing_mapped();
}

/// Hot plug by swap, as a daemon does on ADD_MEM_REG / REM_MEM_REG: the table lives in vm-memory's
/// `GuestMemoryAtomic`; a reader holding the old snapshot keeps reading its regions while the
/// new table is swapped in, and a removed region's mapping goes away when the last snapshot
/// holding it is dropped.
#[test]
fn hot_add_and_remove_by_swapping_tables() {
    use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
    let g = guest(8);
    let page = frames(&g, 0x200, 2);
    g.emu.write_page(page, 0, b"foreign").unwrap();
    let mem = GuestMemoryAtomic::new(table(vec![anon_region(0x10_0000, 0x1000, 0)]));
    // ADD_MEM_REG: build the new table from the current one, swap it in.
    let added = Arc::new(foreign_region(&g, 0x20_0000, 0x2000));
    let next = mem.memory().insert(added).unwrap();
    mem.lock().unwrap().replace(next);
    let snapshot = mem.memory();
    assert_eq!(read(&snapshot, 0x20_0000, 7), b"foreign");
    // REM_MEM_REG: the reader's snapshot still has the region and its mapping.
    let (without, removed) = mem.memory().remove(0x20_0000, 0x2000).unwrap();
    mem.lock().unwrap().replace(without);
    drop(removed);
    assert!(mem.memory().find_region(GuestAddress(0x20_0000)).is_none());
    assert_eq!(read(&snapshot, 0x20_0000, 7), b"foreign");
    assert_eq!(g.emu.live_mappings(), 1);
    drop(snapshot);
    assert_eq!(
        g.emu.live_mappings(),
        0,
        "the last holder released the mapping"
    );
    g.assert_nothing_mapped();
}

/// All Xen regions of a table go through one device handle: `insert` refuses a Xen region on
/// another handle with the region's gpa, and leaves the table as it was. UNIX regions carry no
/// Xen memory and are not checked; a clone of the table's handle is the same handle.
#[test]
fn xen_regions_of_a_table_share_one_device_handle() {
    let g = guest(8);
    let other = guest(8);
    frames(&g, 0x100, 1);
    let (_, r) = grant(&other, 1, false);
    let t = RegionTable::new()
        .insert(Arc::new(foreign_region(&g, 0x10_0000, 0x1000)))
        .unwrap();

    let od_gpa = grant_addr(r, 0);
    let refused = t.insert(Arc::new(on_demand_region(&other, od_gpa, 0x1000)));
    assert_eq!(
        refused.unwrap_err(),
        TableError::OtherDevice { gpa: od_gpa }
    );
    assert_eq!(
        RegionTable::from_regions(vec![
            foreign_region(&g, 0x10_0000, 0x1000),
            on_demand_region(&other, od_gpa, 0x1000),
        ])
        .unwrap_err(),
        TableError::OtherDevice { gpa: od_gpa }
    );
    assert_eq!(t.num_regions(), 1);
    assert!(t.xen_device().unwrap().same_device(&g.dev));

    // A UNIX region built with the other handle is fine; so is a clone of the table's handle.
    let unix = XenRegion::new(
        desc(wire(0x20_0000, 0x1000, 0, 0, 0, 0)),
        None,
        Some(&other.dev),
    )
    .unwrap();
    let clone = g.dev.clone();
    let od = XenRegion::new(
        desc(wire(
            grant_addr(0x40, 0),
            0x1000,
            0,
            0,
            FLAG_GRANT | FLAG_NO_ADVANCE,
            DOMID.into(),
        )),
        None,
        Some(&clone),
    )
    .unwrap();
    let t2 = t
        .insert(Arc::new(unix))
        .and_then(|t| t.insert(Arc::new(od)))
        .unwrap();
    assert_eq!(t2.num_regions(), 3);
    assert!(t2.xen_device().unwrap().same_device(&g.dev));

    drop((t, t2));
    g.assert_nothing_mapped();
    other.assert_nothing_mapped();
}

/// Lookups in tables of many regions (evenly spread, with gaps, and skewed: many small regions
/// then a few far apart) find exactly the region a linear scan finds, for addresses inside,
/// between, before and after the regions; and `from_regions` sorts whatever order it is given.
#[test]
fn many_region_lookup_matches_a_linear_scan() {
    let layouts: [Vec<(u64, u64)>; 3] = [
        (0..509).map(|i| (i * 0x1_0000, 0x1_0000)).collect(),
        (0..300).map(|i| (0x10_0000 + i * 0x3000, 0x1000)).collect(),
        (0..200)
            .map(|i| (0x1000 + i * 0x1000, 0x1000))
            .chain((0..20).map(|i| ((1 << 40) + i * (1 << 32), 0x2000)))
            .collect(),
    ];
    for layout in layouts {
        let mut regions: Vec<XenRegion> = layout
            .iter()
            .map(|&(gpa, size)| anon_region(gpa, size, 0x7f00_0000_0000 + gpa))
            .collect();
        regions.reverse();
        let t = table(regions);
        assert_eq!(t.num_regions(), layout.len());
        let starts: Vec<u64> = t.iter().map(|r| r.start_addr().0).collect();
        assert!(starts.windows(2).all(|w| w[0] < w[1]), "sorted");
        let mut probes = vec![0, u64::MAX, u64::MAX / 2];
        for &(gpa, size) in &layout {
            probes.extend([gpa.wrapping_sub(1), gpa, gpa + size / 2, gpa + size - 1]);
            probes.extend([gpa + size, gpa + 3 * size / 2]);
        }
        for a in probes {
            let want = layout
                .iter()
                .position(|&(gpa, size)| gpa <= a && a - gpa < size)
                .map(|i| layout[i].0);
            let got = t.find_region(GuestAddress(a)).map(|r| r.start_addr().0);
            assert_eq!(got, want, "address {a:#x}");
            let via = t
                .to_region_addr(GuestAddress(a))
                .map(|(r, off)| r.start_addr().0 + off.0);
            assert_eq!(via, want.map(|_| a), "to_region_addr {a:#x}");
        }
    }
}
