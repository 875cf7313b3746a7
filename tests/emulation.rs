//! The emulated Xen enforces what Xen enforces, through the counted device handle, and every
//! test ends with nothing mapped.

mod common;

use std::ptr::NonNull;

use common::{frames, grant, guest, DOMID, PAGE};
use xen_vhost_mem::device::{
    CopyDirection, CopySegment, CounterSnapshot, GrantPage, Protection, GNTST_BAD_COPY_ARG,
    GNTST_BAD_GNTREF, GNTST_GENERAL_ERROR, GNTST_OKAY,
};
use xen_vhost_mem::testing::EmulationError;
use xen_vhost_mem::testing::GuestSim;

fn gref(r: u32) -> GrantPage {
    GrantPage {
        domid: DOMID,
        gref: r,
    }
}

/// Copies `len` bytes out of a live mapping.
fn read_mapped(p: NonNull<u8>, offset: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: tests only pass ranges inside a live mapping they own.
    unsafe { std::ptr::copy_nonoverlapping(p.as_ptr().add(offset), v.as_mut_ptr(), len) };
    v
}

/// The permission string ("r--s", "rw-s", ...) of the mapping that starts at `p`.
fn perms_of(p: NonNull<u8>) -> String {
    let want = p.as_ptr() as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let range = fields.next().unwrap();
        let perms = fields.next().unwrap();
        let (start, end) = range.split_once('-').unwrap();
        let start = usize::from_str_radix(start, 16).unwrap();
        let end = usize::from_str_radix(end, 16).unwrap();
        if start <= want && want < end {
            return perms.to_string();
        }
    }
    panic!("no mapping at {want:#x}");
}

fn snap(g: &GuestSim) -> CounterSnapshot {
    g.dev.counters().snapshot()
}

fn counts(
    ioctls: u64,
    mmaps: u64,
    munmaps: u64,
    grant_copies: u64,
    pages_mapped: u64,
    errors: u64,
) -> CounterSnapshot {
    CounterSnapshot {
        ioctls,
        mmaps,
        munmaps,
        grant_copies,
        // The one grant-copy test copies 7 segments in its one call.
        copy_segments: grant_copies * 7,
        pages_mapped,
        errors,
        plain_table_refusals: 0,
        live_mappings: 0,
    }
}

#[test]
fn mmap_of_an_unknown_ref_fails_with_einval() {
    let g = guest(8);
    let (_, first) = grant(&g, 1, false);
    let never = first + 100;
    // MAP_GRANT_REF does not look at the refs; the mmap (the hypercall) does, whatever the
    // protection asked for.
    let mut indexes = Vec::new();
    for prot in [Protection::ReadWrite, Protection::ReadOnly] {
        let index = g.dev.grant_map_refs(&[gref(never)]).unwrap();
        let e = g.dev.grant_mmap(index, 1, prot).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EINVAL), "{prot:?}: {e}");
        indexes.push(index);
    }
    // One unknown ref among known ones fails the whole mmap.
    let mixed = g.dev.grant_map_refs(&[gref(first), gref(never)]).unwrap();
    let e = g
        .dev
        .grant_mmap(mixed, 2, Protection::ReadOnly)
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    indexes.push(mixed);
    // A wrong domid is an unknown ref as well.
    let other = g
        .dev
        .grant_map_refs(&[GrantPage {
            domid: DOMID + 1,
            gref: first,
        }])
        .unwrap();
    let e = g
        .dev
        .grant_mmap(other, 1, Protection::ReadOnly)
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    // An empty map is refused by the ioctl.
    let e = g.dev.grant_map_refs(&[]).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert_eq!(g.emu.live_mappings(), 0);
    assert_eq!(g.emu.live_grant_maps(), 4);
    g.dev.grant_unmap_refs(indexes[0], 1).unwrap();
    g.dev.grant_unmap_refs(indexes[1], 1).unwrap();
    g.dev.grant_unmap_refs(mixed, 2).unwrap();
    g.dev.grant_unmap_refs(other, 1).unwrap();
    // ioctls: 5 maps (one refused) + 4 unmaps; mmaps: 4, all refused.
    assert_eq!(snap(&g), counts(9, 4, 0, 0, 0, 5));
    g.assert_nothing_mapped();
}

/// A writable mmap of a read-only grant is refused. Real gntdev answers EINVAL (not EPERM) and
/// the refused map cannot be mmapped again (the emulation's `poisoned` flag); a fresh map of the
/// same ref mmapped read-only works and shows the guest's bytes.
#[test]
fn read_only_grant_refuses_a_writable_mapping_and_maps_read_only() {
    let g = guest(8);
    let (page, r) = grant(&g, 1, true);
    let data = common::pattern(1, PAGE);
    g.emu.write_page(page, 0, &data).unwrap();

    let refused = g.dev.grant_map_refs(&[gref(r)]).unwrap();
    let e = g
        .dev
        .grant_mmap(refused, 1, Protection::ReadWrite)
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert_eq!(g.emu.live_mappings(), 0);
    // The refused map stays unusable, even read-only, until it is unmapped.
    let e = g
        .dev
        .grant_mmap(refused, 1, Protection::ReadOnly)
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    g.dev.grant_unmap_refs(refused, 1).unwrap();

    let index = g.dev.grant_map_refs(&[gref(r)]).unwrap();
    let p = g.dev.grant_mmap(index, 1, Protection::ReadOnly).unwrap();
    assert_eq!(g.emu.live_mappings(), 1);
    assert_eq!(g.dev.counters().live_mappings(), 1);
    assert_eq!(read_mapped(p, 0, PAGE), data);
    // A write through it is impossible: the host page tables say read-only.
    let perms = perms_of(p);
    assert!(perms.starts_with("r-"), "RO grant mapped as {perms}");
    // Later guest writes are visible (the mapping is shared, not a copy).
    g.emu.write_page(page, 0x10, b"guest wrote").unwrap();
    assert_eq!(read_mapped(p, 0x10, 11), b"guest wrote");

    // SAFETY: exactly the mapping returned above; not used afterwards.
    unsafe { g.dev.grant_munmap(p, 1) }.unwrap();
    g.dev.grant_unmap_refs(index, 1).unwrap();
    // ioctls: 2 maps + 2 unmaps; mmaps: 2 refused + 1 ok; 1 munmap.
    assert_eq!(snap(&g), counts(4, 3, 1, 0, 1, 2));
    g.assert_nothing_mapped();
}

#[test]
fn writable_grant_mapping_writes_guest_memory() {
    let g = guest(8);
    let (page, r) = grant(&g, 2, false);
    let index = g.dev.grant_map_refs(&[gref(r), gref(r + 1)]).unwrap();
    let p = g.dev.grant_mmap(index, 2, Protection::ReadWrite).unwrap();
    assert!(perms_of(p).starts_with("rw"), "{}", perms_of(p));
    let data = common::pattern(2, 0x20);
    // SAFETY: bytes 0xff0..0x1010 lie inside the 2-page mapping.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.as_ptr().add(0xff0), data.len()) };
    assert_eq!(g.emu.read_page(page, 0xff0, 0x10).unwrap(), data[..0x10]);
    assert_eq!(g.emu.read_page(page + 1, 0, 0x10).unwrap(), data[0x10..]);
    // SAFETY: exactly the mapping returned above; not used afterwards.
    unsafe { g.dev.grant_munmap(p, 2) }.unwrap();
    g.dev.grant_unmap_refs(index, 2).unwrap();
    assert_eq!(snap(&g), counts(2, 1, 1, 0, 2, 0));
    g.assert_nothing_mapped();
}

#[test]
fn mmap_must_cover_exactly_one_whole_map() {
    let g = guest(8);
    let (_, r) = grant(&g, 2, false);
    let index = g.dev.grant_map_refs(&[gref(r), gref(r + 1)]).unwrap();
    for pages in [1, 3] {
        let e = g
            .dev
            .grant_mmap(index, pages, Protection::ReadWrite)
            .unwrap_err();
        assert_eq!(e.errno(), Some(libc::EINVAL), "{pages} pages: {e}");
    }
    // An index that was never returned.
    let e = g
        .dev
        .grant_mmap(index + 0x1000, 1, Protection::ReadWrite)
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert_eq!(g.emu.live_mappings(), 0);

    let p = g.dev.grant_mmap(index, 2, Protection::ReadWrite).unwrap();
    // A second mmap of a map that is already mmapped is refused too.
    let e = g
        .dev
        .grant_mmap(index, 2, Protection::ReadWrite)
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    // munmap of part of it is refused and unmaps nothing.
    // SAFETY: the emulation refuses this without touching the mapping.
    let e = unsafe { g.dev.grant_munmap(p, 1) }.unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert_eq!(g.emu.live_mappings(), 1);
    assert_eq!(g.dev.counters().live_mappings(), 1);

    // SAFETY: exactly the mapping returned above; not used afterwards.
    unsafe { g.dev.grant_munmap(p, 2) }.unwrap();
    // The unmap ioctl must name the whole map too.
    let e = g.dev.grant_unmap_refs(index, 1).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    g.dev.grant_unmap_refs(index, 2).unwrap();
    // ioctls: map, bad unmap, unmap; mmaps: 2 bad + 1 bad index + ok + 1 again; munmaps 2.
    assert_eq!(snap(&g), counts(3, 5, 2, 0, 2, 6));
    g.assert_nothing_mapped();
}

#[test]
fn unmap_refs_before_munmap_is_ebusy() {
    let g = guest(8);
    let (_, r) = grant(&g, 1, false);
    let index = g.dev.grant_map_refs(&[gref(r)]).unwrap();
    let p = g.dev.grant_mmap(index, 1, Protection::ReadWrite).unwrap();
    let e = g.dev.grant_unmap_refs(index, 1).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EBUSY), "{e}");
    assert_eq!(g.emu.live_grant_maps(), 1);
    // SAFETY: exactly the mapping returned above; not used afterwards.
    unsafe { g.dev.grant_munmap(p, 1) }.unwrap();
    g.dev.grant_unmap_refs(index, 1).unwrap();
    // A second unmap of the same index: it is gone.
    let e = g.dev.grant_unmap_refs(index, 1).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert_eq!(snap(&g), counts(4, 1, 1, 0, 1, 2));
    g.assert_nothing_mapped();
}

#[test]
fn grant_copy_reports_a_status_per_segment_and_moves_data_both_ways() {
    let g = guest(8);
    let (rw_page, rw) = grant(&g, 1, false);
    let (ro_page, ro) = grant(&g, 1, true);
    let rw_data = common::pattern(3, PAGE);
    let ro_data = common::pattern(4, PAGE);
    g.emu.write_page(rw_page, 0, &rw_data).unwrap();
    g.emu.write_page(ro_page, 0, &ro_data).unwrap();

    let mut bad_in = vec![0xeeu8; 16];
    let mut denied_out = vec![0x11u8; 16];
    let mut ro_in = vec![0u8; 100];
    let mut rw_out = b"device-to-guest!".to_vec();
    let mut rw_in = vec![0u8; 0x20];
    let mut too_long = vec![0u8; 0x20];
    let seg = |grant: GrantPage, offset: u16, buf: &mut Vec<u8>, direction| CopySegment {
        grant,
        offset,
        len: buf.len() as u16,
        local: buf.as_mut_ptr(),
        direction,
        status: 0x7777,
    };
    let mut segs = [
        seg(gref(ro + 50), 0, &mut bad_in, CopyDirection::FromGuest),
        seg(gref(ro), 0x40, &mut denied_out, CopyDirection::ToGuest),
        seg(gref(ro), 0x100, &mut ro_in, CopyDirection::FromGuest),
        seg(gref(rw), 0x800, &mut rw_out, CopyDirection::ToGuest),
        seg(gref(rw), 0xfe0, &mut rw_in, CopyDirection::FromGuest),
        seg(gref(rw), 0xff0, &mut too_long, CopyDirection::FromGuest),
        seg(
            GrantPage {
                domid: DOMID + 1,
                gref: rw,
            },
            0,
            &mut vec![0; 4],
            CopyDirection::FromGuest,
        ),
    ];
    // SAFETY: every `local` points at a live Vec of exactly `len` bytes, untouched during the call.
    unsafe { g.dev.grant_copy(&mut segs) }.unwrap();
    let statuses: Vec<i16> = segs.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [
            GNTST_BAD_GNTREF,
            // Xen 4.17's answer to a write to a read-only grant (measured on the real driver).
            GNTST_GENERAL_ERROR,
            GNTST_OKAY,
            GNTST_OKAY,
            GNTST_OKAY,
            GNTST_BAD_COPY_ARG,
            GNTST_BAD_GNTREF,
        ]
    );
    // Failed segments moved nothing.
    assert_eq!(bad_in, [0xee; 16]);
    assert_eq!(g.emu.read_page(ro_page, 0, PAGE).unwrap(), ro_data);
    assert_eq!(too_long, [0; 0x20]);
    // Successful ones moved exactly their bytes.
    assert_eq!(ro_in, ro_data[0x100..0x164]);
    assert_eq!(
        g.emu.read_page(rw_page, 0x800, 16).unwrap(),
        b"device-to-guest!"
    );
    assert_eq!(
        g.emu.read_page(rw_page, 0x7ff, 1).unwrap(),
        [rw_data[0x7ff]]
    );
    assert_eq!(
        g.emu.read_page(rw_page, 0x810, 1).unwrap(),
        [rw_data[0x810]]
    );
    assert_eq!(rw_in, rw_data[0xfe0..]);
    // One ioctl, no mapping, and the call itself succeeded.
    assert_eq!(snap(&g), counts(1, 0, 0, 1, 0, 0));
    g.assert_nothing_mapped();
}

/// A privcmd mapping of `pages` pages over address space reserved for it.
fn privcmd_mapping(g: &GuestSim, pages: usize) -> std::ptr::NonNull<u8> {
    // SAFETY: a fresh anonymous reservation, checked below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let base = std::ptr::NonNull::new(p.cast()).unwrap();
    // SAFETY: the reservation is ours and unused.
    unsafe { g.dev.foreign_mmap_at(base, pages) }.unwrap();
    base
}

#[test]
fn mmapbatch_reports_unknown_frames_per_frame() {
    let g = guest(8);
    let page = frames(&g, 0x100, 3);
    for i in 0..3 {
        g.emu
            .write_page(page + i, 0, &common::pattern(10 + i as u8, PAGE))
            .unwrap();
    }
    let base = privcmd_mapping(&g, 5);
    assert_eq!(g.emu.live_mappings(), 1);
    // As on Linux privcmd, the first batch must cover the whole mapping.
    let mut errs1 = [0i32; 1];
    // SAFETY: `base` is a fresh 5-page privcmd mapping of this device with no users.
    let e = unsafe { g.dev.foreign_map_batch(DOMID, base, &[0x100], &mut errs1) }.unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    let gfns = [0x100, 0x999, 0x101, 0x102, 0x103];
    let mut errs = [0x55i32; 5];
    // SAFETY: as above.
    unsafe { g.dev.foreign_map_batch(DOMID, base, &gfns, &mut errs) }.unwrap();
    assert_eq!(errs, [0, -libc::EINVAL, 0, 0, -libc::EINVAL]);
    assert_eq!(read_mapped(base, 0, PAGE), common::pattern(10, PAGE));
    assert_eq!(read_mapped(base, 2 * PAGE, PAGE), common::pattern(11, PAGE));
    assert_eq!(read_mapped(base, 3 * PAGE, PAGE), common::pattern(12, PAGE));
    // Foreign mappings are writable and shared with the guest.
    // SAFETY: slot 0 is mapped (errs[0] == 0).
    unsafe { base.as_ptr().add(5).write_volatile(0xa5) };
    assert_eq!(g.emu.read_page(page, 5, 1).unwrap(), [0xa5]);

    // Later batches may only fill holes: slot 0 is mapped, slot 1 (0x999 failed) is not.
    // SAFETY: as above.
    let e = unsafe { g.dev.foreign_map_batch(DOMID, base, &[0x100], &mut errs1) }.unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    // Frames of another domain are unknown; mismatched lengths are refused as a whole.
    // SAFETY: slot 1 is an unmapped page of the mapping.
    unsafe {
        g.dev
            .foreign_map_batch(DOMID + 1, base.add(PAGE), &[0x100], &mut errs1)
    }
    .unwrap();
    assert_eq!(errs1, [-libc::EINVAL]);
    let mut errs2 = [0i32; 2];
    // SAFETY: as above; the emulation refuses before touching anything.
    let e = unsafe { g.dev.foreign_map_batch(DOMID, base, &[0x100], &mut errs2) }.unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");

    // SAFETY: exactly the mapping made above; not used afterwards.
    unsafe { g.dev.foreign_munmap(base, 5) }.unwrap();
    assert_eq!(snap(&g), counts(5, 1, 1, 0, 5, 3));
    g.assert_nothing_mapped();
}

#[test]
fn mmapbatch_reports_paged_out_frames_until_they_come_back() {
    let g = guest(8);
    let page = frames(&g, 0x200, 3);
    g.emu.write_page(page + 1, 0x123, b"paged back in").unwrap();
    g.emu.page_out(DOMID, 0x201, 2);
    let base = privcmd_mapping(&g, 3);
    let gfns = [0x200, 0x201, 0x202];
    let mut errs = [0i32; 3];
    // SAFETY: `base` is a 3-page privcmd mapping of this device with no users.
    let e = unsafe { g.dev.foreign_map_batch(DOMID, base, &gfns, &mut errs) }.unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOENT), "{e}");
    assert_eq!(errs, [0, -libc::ENOENT, 0]);
    // Retries fill the hole only.
    let mut errs = [0i32; 1];
    // SAFETY: slot 1 of the mapping is unmapped, with no users.
    let e = unsafe {
        g.dev
            .foreign_map_batch(DOMID, base.add(PAGE), &gfns[1..2], &mut errs)
    }
    .unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOENT), "{e}");
    assert_eq!(errs, [-libc::ENOENT]);
    // SAFETY: slot 1 of the reservation, with no users.
    unsafe {
        g.dev
            .foreign_map_batch(DOMID, base.add(PAGE), &gfns[1..2], &mut errs)
    }
    .unwrap();
    assert_eq!(errs, [0]);
    assert_eq!(read_mapped(base, PAGE + 0x123, 13), b"paged back in");
    // SAFETY: exactly the reservation made above; not used afterwards.
    unsafe { g.dev.foreign_munmap(base, 3) }.unwrap();
    // A wrong size is refused, and the reservation is gone.
    // SAFETY: the emulation refuses unknown reservations without touching memory.
    let e = unsafe { g.dev.foreign_munmap(base, 3) }.unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert_eq!(snap(&g), counts(3, 1, 2, 0, 3, 3));
    g.assert_nothing_mapped();
}

#[test]
fn end_access_fails_while_mapped_and_succeeds_after_unmapping() {
    let g = guest(8);
    let (_, r) = grant(&g, 2, false);
    let index = g.dev.grant_map_refs(&[gref(r), gref(r + 1)]).unwrap();
    // Registered but not mmapped: not yet mapped by the hypervisor.
    let p = g.dev.grant_mmap(index, 2, Protection::ReadWrite).unwrap();
    for x in [r, r + 1] {
        assert_eq!(
            g.emu.end_access(DOMID, x),
            Err(EmulationError::StillMapped {
                domid: DOMID,
                gref: x
            })
        );
    }
    // SAFETY: exactly the mapping returned above; not used afterwards.
    unsafe { g.dev.grant_munmap(p, 2) }.unwrap();
    g.dev.grant_unmap_refs(index, 2).unwrap();
    g.emu.end_access(DOMID, r).unwrap();
    g.emu.end_access(DOMID, r + 1).unwrap();
    assert_eq!(
        g.emu.end_access(DOMID, r),
        Err(EmulationError::NoSuchGrant {
            domid: DOMID,
            gref: r
        })
    );
    // A revoked grant cannot be mapped again.
    let index = g.dev.grant_map_refs(&[gref(r)]).unwrap();
    let e = g
        .dev
        .grant_mmap(index, 1, Protection::ReadOnly)
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    g.dev.grant_unmap_refs(index, 1).unwrap();
    assert_eq!(snap(&g), counts(4, 2, 1, 0, 2, 1));
    g.assert_nothing_mapped();
}

#[test]
fn two_maps_of_one_grant_keep_it_busy_until_both_are_gone() {
    let g = guest(4);
    let (_, r) = grant(&g, 1, false);
    let a = g.dev.grant_map_refs(&[gref(r)]).unwrap();
    let b = g.dev.grant_map_refs(&[gref(r)]).unwrap();
    assert_ne!(a, b);
    let pa = g.dev.grant_mmap(a, 1, Protection::ReadWrite).unwrap();
    let pb = g.dev.grant_mmap(b, 1, Protection::ReadOnly).unwrap();
    assert_eq!(g.emu.live_mappings(), 2);
    assert_eq!(g.dev.counters().live_mappings(), 2);
    // SAFETY: exactly mapping `pa`; not used afterwards.
    unsafe { g.dev.grant_munmap(pa, 1) }.unwrap();
    assert_eq!(
        g.emu.end_access(DOMID, r),
        Err(EmulationError::StillMapped {
            domid: DOMID,
            gref: r
        })
    );
    // SAFETY: exactly mapping `pb`; not used afterwards.
    unsafe { g.dev.grant_munmap(pb, 1) }.unwrap();
    g.emu.end_access(DOMID, r).unwrap();
    g.dev.grant_unmap_refs(a, 1).unwrap();
    g.dev.grant_unmap_refs(b, 1).unwrap();
    assert_eq!(snap(&g), counts(4, 2, 2, 0, 2, 0));
    g.assert_nothing_mapped();
}

#[test]
fn guest_side_api_refuses_out_of_range_pages() {
    let g = guest(4);
    let first = g.emu.alloc_pages(3).unwrap();
    assert_eq!(first, 0);
    assert_eq!(
        g.emu.alloc_pages(2),
        Err(EmulationError::OutOfPages { asked: 2, left: 1 })
    );
    assert_eq!(
        g.emu.write_page(2, 0xffc, &[0; 8]),
        Err(EmulationError::BadPage {
            page: 2,
            offset: 0xffc,
            len: 8
        })
    );
    assert_eq!(
        g.emu.read_page(3, 0, 1),
        Err(EmulationError::BadPage {
            page: 3,
            offset: 0,
            len: 1
        })
    );
    assert_eq!(
        g.emu.grant_pages(DOMID, 2, 2, false),
        Err(EmulationError::BadPage {
            page: 2,
            offset: 0,
            len: 2 * PAGE
        })
    );
    assert_eq!(
        g.emu.end_access(DOMID, 1234),
        Err(EmulationError::NoSuchGrant {
            domid: DOMID,
            gref: 1234
        })
    );
    // Nothing went through the device.
    assert_eq!(snap(&g), CounterSnapshot::default());
    g.assert_nothing_mapped();
}
