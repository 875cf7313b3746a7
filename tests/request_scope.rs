//! Request-scoped memory over on-demand grants (emulated Xen): real bytes through grant copy
//! and gntdev mappings, exact errors, zero live mappings after every request.

use std::io::Write;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use xen_vhost_mem::testing::{Guest as _, GuestBuffer, GuestSim};
use xen_vhost_mem::{
    RegionTable, RequestError, RequestMemory, Strategy, WritableBuffers, XenRegion,
};

const WRITE: u16 = 2; // VRING_DESC_F_WRITE
const STRATEGIES: [Strategy; 3] = [
    Strategy::GrantCopy,
    Strategy::Map,
    Strategy::Auto {
        map_threshold: 4096,
    },
];

/// A guest with a ring region mapped in advance and an on-demand region for everything else.
struct Setup {
    sim: GuestSim,
    ring: GuestBuffer,
    table: RegionTable,
}

fn setup() -> Setup {
    let sim = GuestSim::new(1, 1 << 14).unwrap();
    let ring = sim.grant(2, false).unwrap();
    let ring_desc = sim.in_advance_region(ring.gpa(0), 8192, 0x7000_0000);
    let od = sim.on_demand_region(ring.first_ref + 2, 1 << 20);
    let table = RegionTable::from_regions(vec![
        XenRegion::new(ring_desc, None, Some(&sim.dev)).unwrap(),
        XenRegion::new(od, None, Some(&sim.dev)).unwrap(),
    ])
    .unwrap();
    Setup { sim, ring, table }
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// Guest side of a block-like request: RO 16-byte header, 4 KiB data and 1-byte status.
struct Block {
    hdr: GuestBuffer,
    data: GuestBuffer,
    status: GuestBuffer,
}

fn block_request(s: &Setup) -> Block {
    let hdr = s.sim.grant(1, true).unwrap();
    s.sim.write(&hdr, 0, b"HEADER-0123456789").unwrap();
    Block {
        hdr,
        data: s.sim.grant(1, false).unwrap(),
        status: s.sim.grant(1, false).unwrap(),
    }
}

fn block_chain<'a>(
    q: &'a MockSplitQueue<'a, RegionTable>,
    b: &Block,
) -> DescriptorChain<&'a RegionTable> {
    q.build_desc_chain(&[
        desc(b.hdr.gpa(0), 16, 0),
        desc(b.data.gpa(0), 4096, WRITE),
        desc(b.status.gpa(0), 1, WRITE),
    ])
    .unwrap()
}

/// The device side: read the header, write data and status.
fn serve(mem: &RequestMemory<'_>, chain: DescriptorChain<&RegionTable>) -> [u8; 16] {
    let mut r = Reader::new(mem, chain.clone()).unwrap();
    let hdr: [u8; 16] = r.read_obj().unwrap();
    let mut w = Writer::new(mem, chain).unwrap();
    w.write_all(&[0xab; 4096]).unwrap();
    w.write_obj(0x5au8).unwrap();
    hdr
}

fn assert_no_live_mappings(s: &Setup) {
    // The ring region's own map and mapping stay for the table's life; nothing else may.
    assert_eq!(s.sim.emu.live_grant_maps(), 1, "grant maps left registered");
    assert_eq!(
        s.sim.emu.live_mappings(),
        1,
        "only the ring mapping may live"
    );
    assert_eq!(s.sim.dev.counters().live_mappings(), 1);
}

fn check_completed(s: &Setup, b: &Block) {
    assert_eq!(s.sim.read(&b.data, 0, 4096).unwrap(), vec![0xab; 4096]);
    assert_eq!(s.sim.read(&b.status, 0, 1).unwrap(), vec![0x5a]);
    // The guest can end foreign access: nothing maps its pages any more.
    s.sim.end_access(&b.hdr).unwrap();
    s.sim.end_access(&b.data).unwrap();
    s.sim.end_access(&b.status).unwrap();
}

#[test]
fn block_request_round_trip_every_strategy() {
    for strategy in STRATEGIES {
        let s = setup();
        let q = MockSplitQueue::create(&s.table, GuestAddress(s.ring.gpa(0)), 16);
        let b = block_request(&s);
        let chain = block_chain(&q, &b);
        let mem = RequestMemory::with_strategy(&s.table, strategy);
        let hdr = serve(&mem, chain);
        assert_eq!(&hdr, b"HEADER-012345678", "{strategy:?}");
        mem.finish().unwrap();
        check_completed(&s, &b);
        assert_no_live_mappings(&s);
    }
}

#[test]
fn batched_syscalls_are_exact() {
    // (strategy, expected syscalls for one prefetched block request)
    for (strategy, expected) in [(Strategy::GrantCopy, 2), (Strategy::Map, 8)] {
        let s = setup();
        let q = MockSplitQueue::create(&s.table, GuestAddress(s.ring.gpa(0)), 16);
        let b = block_request(&s);
        let chain = block_chain(&q, &b);
        let before = s.sim.dev.counters().snapshot();
        let mem = RequestMemory::with_strategy(&s.table, strategy);
        mem.prefetch_chains(std::slice::from_ref(&chain)).unwrap();
        serve(&mem, chain);
        mem.finish().unwrap();
        let d = s.sim.dev.counters().snapshot().since(&before);
        assert_eq!(d.syscalls(), expected, "{strategy:?}: {d:?}");
        assert_eq!(d.errors, 0);
        check_completed(&s, &b);
        assert_no_live_mappings(&s);
    }
}

#[test]
fn batch_of_eight_costs_the_same_as_one() {
    for (strategy, expected) in [(Strategy::GrantCopy, 2), (Strategy::Map, 8)] {
        let s = setup();
        let q = MockSplitQueue::create(&s.table, GuestAddress(s.ring.gpa(0)), 32);
        let blocks: Vec<Block> = (0..8).map(|_| block_request(&s)).collect();
        let mut raw = Vec::new();
        for b in &blocks {
            raw.push(desc(b.hdr.gpa(0), 16, 1));
            raw.push(desc(b.data.gpa(0), 4096, WRITE | 1));
            raw.push(desc(b.status.gpa(0), 1, WRITE));
        }
        for (i, d) in raw.iter_mut().enumerate() {
            let sd = SplitDescriptor::from(*d);
            let next = if sd.flags() & 1 != 0 { i as u16 + 1 } else { 0 };
            *d = RawDescriptor::from(SplitDescriptor::new(
                sd.addr().0,
                sd.len(),
                sd.flags(),
                next,
            ));
        }
        q.add_desc_chains(&raw, 0).unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let chains: Vec<_> = std::iter::from_fn(|| queue.pop_descriptor_chain(&s.table)).collect();
        assert_eq!(chains.len(), 8);
        let before = s.sim.dev.counters().snapshot();
        let mem = RequestMemory::with_strategy(&s.table, strategy);
        mem.prefetch_chains(&chains).unwrap();
        for c in chains {
            serve(&mem, c);
        }
        mem.finish().unwrap();
        let d = s.sim.dev.counters().snapshot().since(&before);
        assert_eq!(d.syscalls(), expected, "{strategy:?}: {d:?}");
        for b in &blocks {
            check_completed(&s, b);
        }
        assert_no_live_mappings(&s);
    }
}

fn request_error(e: &vm_memory::GuestMemoryError) -> &RequestError {
    RequestError::from_guest_memory_error(e).unwrap_or_else(|| panic!("not a request error: {e}"))
}

#[test]
fn writing_a_read_only_grant_is_an_error() {
    for strategy in STRATEGIES {
        let s = setup();
        let ro = s.sim.grant(1, true).unwrap();
        s.sim.write(&ro, 0, &[7; 64]).unwrap();
        let gpa = ro.gpa(0x10);
        let mem = RequestMemory::with_strategy(&s.table, strategy);
        // Reading works...
        let mut buf = [0u8; 8];
        mem.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
        assert_eq!(buf, [7; 8]);
        // ...writing is refused with the gpa and the ref, and the guest's bytes are intact.
        let e = mem.write_slice(&[1; 8], GuestAddress(gpa)).unwrap_err();
        match request_error(&e) {
            RequestError::ReadOnlyGrant {
                gpa: g,
                domid,
                gref,
            } => {
                assert_eq!((*g, *domid, *gref), (gpa, 1, ro.first_ref), "{strategy:?}");
            }
            other => panic!("{strategy:?}: {other:?}"),
        }
        mem.finish().unwrap();
        assert_eq!(s.sim.read(&ro, 0x10, 8).unwrap(), vec![7; 8]);
        s.sim.end_access(&ro).unwrap();
        assert_no_live_mappings(&s);
    }
}

#[test]
fn unknown_ref_is_an_error_and_the_caller_carries_on() {
    for strategy in STRATEGIES {
        let s = setup();
        let good = s.sim.grant(1, false).unwrap();
        s.sim.write(&good, 0, b"fine").unwrap();
        let never = good.first_ref + 100; // inside the on-demand region, never granted
        let gpa = xen_vhost_mem::xen_page::grant_addr(never, 0x20);
        let mem = RequestMemory::with_strategy(&s.table, strategy);
        let mut buf = [0u8; 4];
        let e = mem.read_slice(&mut buf, GuestAddress(gpa)).unwrap_err();
        match (strategy, request_error(&e)) {
            (
                Strategy::Map,
                RequestError::GrantMap {
                    gpa: g,
                    gref,
                    source,
                    ..
                },
            ) => {
                assert_eq!((*g, *gref), (gpa, never));
                assert_eq!(source.errno(), Some(libc::EINVAL));
            }
            (_, RequestError::UnknownRef { gpa: g, gref, .. }) => {
                assert_eq!((*g, *gref), (gpa, never), "{strategy:?}");
            }
            (_, other) => panic!("{strategy:?}: {other:?}"),
        }
        // The same scope goes on serving good pages.
        mem.read_slice(&mut buf, GuestAddress(good.gpa(0))).unwrap();
        assert_eq!(&buf, b"fine");
        mem.finish().unwrap();
        assert!(s.sim.dev.counters().snapshot().errors > 0);
        assert_no_live_mappings(&s);
    }
}

#[test]
fn multi_page_buffer_uses_consecutive_refs_and_names_the_missing_one() {
    for strategy in STRATEGIES {
        let s = setup();
        let buf = s.sim.grant(3, false).unwrap();
        let pattern: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        s.sim.write(&buf, 0, &pattern).unwrap();
        let mem = RequestMemory::with_strategy(&s.table, strategy);
        // Mid-page start, crossing two page boundaries.
        let mut got = vec![0u8; 8000];
        mem.read_slice(&mut got, GuestAddress(buf.gpa(100)))
            .unwrap();
        assert_eq!(got, pattern[100..8100], "{strategy:?}");
        // A buffer that runs past the granted pages into ref first_ref + 3.
        let mut long = vec![0u8; 3 * 4096];
        let e = mem
            .read_slice(&mut long, GuestAddress(buf.gpa(4096)))
            .unwrap_err();
        let missing = buf.first_ref + 3;
        match request_error(&e) {
            RequestError::UnknownRef { gpa, gref, .. }
            | RequestError::GrantMap { gpa, gref, .. } => {
                assert_eq!((*gpa, *gref), (buf.gpa(3 * 4096), missing), "{strategy:?}");
            }
            other => panic!("{strategy:?}: {other:?}"),
        }
        mem.finish().unwrap();
        assert_no_live_mappings(&s);
    }
}

#[test]
fn read_then_write_remaps_writable_and_data_lands() {
    let s = setup();
    let buf = s.sim.grant(1, false).unwrap();
    s.sim.write(&buf, 0, &[1; 32]).unwrap();
    let mem = RequestMemory::with_strategy(&s.table, Strategy::Map);
    let mut got = [0u8; 32];
    mem.read_slice(&mut got, GuestAddress(buf.gpa(0))).unwrap();
    assert_eq!(mem.live_mappings(), 1);
    mem.write_slice(&[9; 16], GuestAddress(buf.gpa(8))).unwrap();
    assert_eq!(mem.live_mappings(), 2, "a second, writable mapping");
    // Reads now see the write through either mapping.
    mem.read_slice(&mut got, GuestAddress(buf.gpa(0))).unwrap();
    assert_eq!(&got[8..24], &[9; 16]);
    mem.finish().unwrap();
    assert_eq!(s.sim.read(&buf, 0, 32).unwrap()[8..24], [9; 16]);
    assert_no_live_mappings(&s);
}

#[test]
fn grant_copy_writes_back_only_what_was_touched_and_keeps_the_rest() {
    let s = setup();
    let buf = s.sim.grant(1, false).unwrap();
    s.sim.write(&buf, 0, &[3; 4096]).unwrap();
    let mem = RequestMemory::with_strategy(&s.table, Strategy::GrantCopy);
    mem.write_slice(&[4; 10], GuestAddress(buf.gpa(100)))
        .unwrap();
    mem.write_slice(&[5; 10], GuestAddress(buf.gpa(200)))
        .unwrap();
    // The guest changes a byte outside anything the device touched meanwhile.
    s.sim.write(&buf, 3000, &[6]).unwrap();
    mem.finish().unwrap();
    let got = s.sim.read(&buf, 0, 4096).unwrap();
    assert_eq!(&got[100..110], &[4; 10]);
    assert_eq!(&got[200..210], &[5; 10]);
    assert_eq!(
        &got[110..200],
        &[3; 90],
        "bytes between writes go back unchanged"
    );
    assert_eq!(
        got[3000], 6,
        "bytes outside the touched span are not written back"
    );
    assert_eq!(got[0], 3);
}

#[test]
fn mappings_are_gone_when_the_device_panics() {
    for strategy in STRATEGIES {
        let s = setup();
        let buf = s.sim.grant(2, false).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mem = RequestMemory::with_strategy(&s.table, strategy);
            mem.write_slice(&[8; 6000], GuestAddress(buf.gpa(0)))
                .unwrap();
            panic!("device bug");
        }));
        assert!(r.is_err());
        assert_no_live_mappings(&s);
        // Written bytes still reached the guest (copy-back on unwind).
        assert_eq!(
            s.sim.read(&buf, 0, 6000).unwrap(),
            vec![8; 6000],
            "{strategy:?}"
        );
        s.sim.end_access(&buf).unwrap();
    }
}

#[test]
fn ring_and_plain_regions_pass_through_without_device_calls() {
    let s = setup();
    let before = s.sim.dev.counters().snapshot();
    let mem = RequestMemory::new(&s.table);
    mem.write_obj(0x1234u16, GuestAddress(s.ring.gpa(6)))
        .unwrap();
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(s.ring.gpa(6))).unwrap(),
        0x1234
    );
    assert!(mem.check_range(GuestAddress(s.ring.gpa(0)), 8192, Permissions::ReadWrite));
    assert!(!mem.check_range(GuestAddress(0x1000), 1, Permissions::Read));
    // On-demand memory is reachable through the scope, so it is in range too.
    let od = xen_vhost_mem::xen_page::grant_addr(s.ring.first_ref + 2, 0);
    assert!(mem.check_range(GuestAddress(od), 3 * 4096, Permissions::Write));
    // A range running from the ring region into the on-demand one has no gap.
    assert!(mem.check_range(GuestAddress(s.ring.gpa(8000)), 1000, Permissions::Read));
    assert!(!mem.check_range(GuestAddress(s.ring.gpa(0) - 1), 2, Permissions::Read));
    let e = mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap_err();
    assert!(matches!(
        e,
        vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(0x1000))
    ));
    mem.finish().unwrap();
    assert_eq!(s.sim.dev.counters().snapshot().since(&before).syscalls(), 0);
}

#[test]
fn the_writability_probe_never_writes_a_stale_byte_back() {
    for strategy in [Strategy::GrantCopy, Strategy::default()] {
        let s = setup();
        let buf = s.sim.grant(1, false).unwrap();
        s.sim.write(&buf, 0, &[0x11; 200]).unwrap();
        let mem = RequestMemory::with_strategy(&s.table, strategy);
        let mut hdr = [0u8; 16];
        mem.read_slice(&mut hdr, GuestAddress(buf.gpa(0))).unwrap();
        // The guest changes byte 0 after the device read it; the device then writes elsewhere
        // in the same page, twice (the second write finds the page already fetched).
        s.sim.write(&buf, 0, &[0x55]).unwrap();
        mem.write_slice(&[0xee], GuestAddress(buf.gpa(100)))
            .unwrap();
        s.sim.write(&buf, 150, &[0x66]).unwrap();
        mem.write_slice(&[0xdd], GuestAddress(buf.gpa(8))).unwrap();
        mem.finish().unwrap();
        let got = s.sim.read(&buf, 0, 200).unwrap();
        assert_eq!(
            got[0], 0x55,
            "{strategy:?}: byte 0 was never written by the device"
        );
        assert_eq!((got[8], got[100]), (0xdd, 0xee), "{strategy:?}");
        assert_eq!(got[150], 0x66, "{strategy:?}: outside every written span");
        assert_no_live_mappings(&s);
    }
}

#[test]
fn a_guest_cannot_make_a_scope_hold_unbounded_pages() {
    use xen_vhost_mem::request::MAX_SCOPE_PAGES;
    for strategy in STRATEGIES {
        let s = setup();
        let buf = s.sim.grant(1, false).unwrap();
        let mem = RequestMemory::with_strategy(&s.table, strategy);
        // 4 GiB at refs nobody granted: refused before any allocation or device call.
        let before = s.sim.dev.counters().snapshot();
        let huge = u32::MAX as usize;
        let e = mem
            .get_slices(GuestAddress(buf.gpa(0)), huge, Permissions::Read)
            .map(|it| it.collect::<Vec<_>>());
        let err = match e {
            Err(e) => e,
            Ok(v) => v.into_iter().find_map(Result::err).expect("an error"),
        };
        match request_error(&err) {
            RequestError::ScopeFull { gpa, len, max, .. } => {
                assert_eq!((*gpa, *len, *max), (buf.gpa(0), huge, MAX_SCOPE_PAGES));
            }
            other => panic!("{strategy:?}: {other:?}"),
        }
        assert_eq!(s.sim.dev.counters().snapshot().since(&before).syscalls(), 0);
        // Prefetch skips what does not fit, and the scope still serves normal accesses.
        mem.prefetch(&[(GuestAddress(buf.gpa(0)), huge, Permissions::Write)])
            .unwrap();
        mem.write_slice(&[1; 8], GuestAddress(buf.gpa(0))).unwrap();
        mem.finish().unwrap();
        assert_eq!(s.sim.read(&buf, 0, 8).unwrap(), vec![1; 8]);
        assert_no_live_mappings(&s);
    }
}

/// Grant-copy segments for one prefetched block request: with `CopyIn`, 3 copy-ins (header,
/// data, status), 2 one-byte write probes and 2 copy-backs; with `Overwrite`, the header
/// copy-in and the 2 copy-backs only. Same bytes in the guest either way.
#[test]
fn overwrite_mode_needs_three_segments_instead_of_seven() {
    for (mode, segments) in [
        (WritableBuffers::CopyIn, 7),
        (WritableBuffers::Overwrite, 3),
    ] {
        let s = setup();
        let q = MockSplitQueue::create(&s.table, GuestAddress(s.ring.gpa(0)), 16);
        let b = block_request(&s);
        let chain = block_chain(&q, &b);
        let before = s.sim.dev.counters().snapshot();
        let mem =
            RequestMemory::with_strategy(&s.table, Strategy::GrantCopy).writable_buffers(mode);
        mem.prefetch_chains(std::slice::from_ref(&chain)).unwrap();
        assert_eq!(&serve(&mem, chain), b"HEADER-012345678");
        mem.finish().unwrap();
        let d = s.sim.dev.counters().snapshot().since(&before);
        assert_eq!(
            (d.syscalls(), d.copy_segments),
            (2, segments),
            "{mode:?}: {d:?}"
        );
        check_completed(&s, &b);
        assert_no_live_mappings(&s);
    }
}

/// `Overwrite` zero-fills what the device is to write: a bounce page reused from an earlier
/// request never shows that request's bytes, and bytes between two writes that the device
/// never asked for are still copied in and go back unchanged.
#[test]
fn overwrite_mode_never_shows_stale_bytes_and_keeps_unasked_bytes() {
    let s = setup();
    let first = s.sim.grant(1, false).unwrap();
    let mem = RequestMemory::with_strategy(&s.table, Strategy::GrantCopy);
    mem.write_slice(&[0xaa; 4096], GuestAddress(first.gpa(0)))
        .unwrap();
    mem.finish().unwrap();
    let second = s.sim.grant(1, false).unwrap();
    s.sim.write(&second, 0, &[0x77; 4096]).unwrap();
    let mem = RequestMemory::with_strategy(&s.table, Strategy::GrantCopy)
        .writable_buffers(WritableBuffers::Overwrite);
    // What the device sees in a buffer it is about to write: zeros, not 0xaa, not 0x77.
    let slices: Vec<_> = mem
        .get_slices(GuestAddress(second.gpa(100)), 16, Permissions::Write)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut seen = [0xffu8; 16];
    slices[0].copy_to(&mut seen[..]);
    assert_eq!(seen, [0; 16]);
    slices[0].copy_from(&[1u8; 16]);
    mem.write_slice(&[2; 16], GuestAddress(second.gpa(300)))
        .unwrap();
    mem.finish().unwrap();
    let got = s.sim.read(&second, 0, 4096).unwrap();
    assert_eq!(&got[100..116], &[1; 16]);
    assert_eq!(&got[300..316], &[2; 16]);
    assert_eq!(
        &got[116..300],
        &[0x77; 184][..],
        "bytes between the writes are unchanged"
    );
    assert_eq!(got[0], 0x77);
    assert_no_live_mappings(&s);
}

/// With `Overwrite` there is no probe: a read-only grant the device wrote is reported by
/// `finish`, naming the ref and Xen's status, and the guest's bytes are untouched.
#[test]
fn overwrite_mode_reports_a_read_only_grant_at_finish() {
    let s = setup();
    let ro = s.sim.grant(1, true).unwrap();
    s.sim.write(&ro, 0, &[5; 32]).unwrap();
    let mem = RequestMemory::with_strategy(&s.table, Strategy::GrantCopy)
        .writable_buffers(WritableBuffers::Overwrite);
    mem.write_slice(&[6; 32], GuestAddress(ro.gpa(0))).unwrap();
    match mem.finish() {
        Err(RequestError::CopyBack {
            failed,
            gref,
            status,
        }) => assert_eq!(
            (failed, gref, status),
            (1, ro.first_ref, xen_vhost_mem::device::GNTST_GENERAL_ERROR)
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.sim.read(&ro, 0, 32).unwrap(), vec![5; 32]);
    s.sim.end_access(&ro).unwrap();
    assert_no_live_mappings(&s);
}

/// A grant-copy ioctl that fails as a whole leaves nothing half-fetched: the access reports
/// the device error, and the next access copies the page afresh and sees the guest's bytes.
#[test]
fn a_failed_grant_copy_ioctl_leaves_no_half_fetched_page() {
    for mode in [WritableBuffers::CopyIn, WritableBuffers::Overwrite] {
        let s = setup();
        let buf = s.sim.grant(1, false).unwrap();
        s.sim.write(&buf, 0, &[0x42; 64]).unwrap();
        let mem =
            RequestMemory::with_strategy(&s.table, Strategy::GrantCopy).writable_buffers(mode);
        s.sim.emu.fail_grant_copies(1);
        let mut got = [0u8; 32];
        let e = mem
            .read_slice(&mut got, GuestAddress(buf.gpa(0)))
            .unwrap_err();
        match request_error(&e) {
            RequestError::Device(d) => assert_eq!(d.errno(), Some(libc::EIO)),
            other => panic!("{mode:?}: {other:?}"),
        }
        s.sim.emu.fail_grant_copies(1);
        assert!(mem
            .prefetch(&[(GuestAddress(buf.gpa(0)), 64, Permissions::Read)])
            .is_err());
        mem.read_slice(&mut got, GuestAddress(buf.gpa(0))).unwrap();
        assert_eq!(got, [0x42; 32], "{mode:?}");
        // And writes still go through and back.
        mem.write_slice(&[7; 8], GuestAddress(buf.gpa(40))).unwrap();
        mem.finish().unwrap();
        assert_eq!(s.sim.read(&buf, 40, 8).unwrap(), vec![7; 8]);
        assert_eq!(s.sim.read(&buf, 0, 40).unwrap(), vec![0x42; 40]);
        assert_no_live_mappings(&s);
    }
}

/// A scope filled to its page limit by one prefetch still serves every page it holds (only new
/// pages are refused), and a page whose fetch keeps failing reuses one bounce page.
#[test]
fn a_full_scope_serves_what_it_holds_and_failed_pages_do_not_pile_up() {
    use xen_vhost_mem::request::MAX_SCOPE_PAGES;
    let sim = GuestSim::new(1, MAX_SCOPE_PAGES + 64).unwrap();
    let big = sim.grant(MAX_SCOPE_PAGES, false).unwrap();
    let extra = sim.grant(1, false).unwrap();
    sim.write(&big, (MAX_SCOPE_PAGES - 1) * 4096, b"last page")
        .unwrap();
    let od = sim.on_demand_region(big.first_ref, 1 << 20);
    let table =
        RegionTable::from_regions(vec![XenRegion::new(od, None, Some(&sim.dev)).unwrap()]).unwrap();
    let mem = RequestMemory::with_strategy(&table, Strategy::GrantCopy);
    mem.prefetch(&[(
        GuestAddress(big.gpa(0)),
        MAX_SCOPE_PAGES * 4096,
        Permissions::Read,
    )])
    .unwrap();
    assert_eq!(mem.held_pages(), MAX_SCOPE_PAGES);
    let mut got = [0u8; 9];
    mem.read_slice(
        &mut got,
        GuestAddress(big.gpa((MAX_SCOPE_PAGES - 1) * 4096)),
    )
    .unwrap();
    assert_eq!(&got, b"last page");
    let e = mem
        .read_slice(&mut got, GuestAddress(extra.gpa(0)))
        .unwrap_err();
    assert!(
        matches!(request_error(&e), RequestError::ScopeFull { pages, .. } if *pages == MAX_SCOPE_PAGES + 1)
    );
    mem.finish().unwrap();

    // The same ungranted ref, touched again and again in one scope: one bounce page.
    let mem = RequestMemory::with_strategy(&table, Strategy::GrantCopy);
    let never = xen_vhost_mem::xen_page::grant_addr(extra.first_ref + 10, 0);
    for _ in 0..100 {
        assert!(mem.read_slice(&mut got, GuestAddress(never)).is_err());
    }
    assert_eq!(mem.held_pages(), 1);
    mem.finish().unwrap();
    assert_eq!(sim.emu.live_mappings(), 0);
}

/// One prefetch never both bounces and maps a page: a page in a short (copied) and a long
/// (mapped) buffer keeps the first decision.
#[test]
fn prefetch_bounces_or_maps_a_page_never_both() {
    let s = setup();
    let buf = s.sim.grant(3, false).unwrap();
    s.sim.write(&buf, 0, b"abc").unwrap();
    let mem = RequestMemory::with_strategy(
        &s.table,
        Strategy::Auto {
            map_threshold: 8192,
        },
    );
    mem.prefetch(&[
        (GuestAddress(buf.gpa(0)), 16, Permissions::Read),
        (GuestAddress(buf.gpa(0)), 3 * 4096, Permissions::Read),
    ])
    .unwrap();
    // Page 0 bounced, pages 1 and 2 mapped in one map.
    assert_eq!((mem.held_pages(), mem.live_mappings()), (3, 1));
    let mut got = [0u8; 3];
    mem.read_slice(&mut got, GuestAddress(buf.gpa(0))).unwrap();
    assert_eq!(&got, b"abc");
    mem.finish().unwrap();
    assert_no_live_mappings(&s);
}

/// A big mapped buffer with one ungranted page at its end: gntdev refuses the whole map, and
/// halving finds the bad page in a few calls (not one map per page) while the good pages stay
/// mapped and served.
#[test]
fn a_bad_page_in_a_big_mapped_buffer_is_found_by_halving() {
    let s = setup();
    let buf = s.sim.grant(63, false).unwrap();
    s.sim.write(&buf, 62 * 4096, b"page 62").unwrap();
    let mem = RequestMemory::with_strategy(&s.table, Strategy::Map);
    let before = s.sim.dev.counters().snapshot();
    let mut all = vec![0u8; 64 * 4096];
    let e = mem
        .read_slice(&mut all, GuestAddress(buf.gpa(0)))
        .unwrap_err();
    match request_error(&e) {
        RequestError::GrantMap { gpa, gref, .. } => {
            assert_eq!((*gpa, *gref), (buf.gpa(63 * 4096), buf.first_ref + 63))
        }
        other => panic!("{other:?}"),
    }
    let d = s.sim.dev.counters().snapshot().since(&before);
    // One map of 64, then a map of each left half and one of each right half: 13 mmaps.
    assert_eq!(d.mmaps, 13, "{d:?}");
    // The 63 good pages are mapped and served without another call.
    let before = s.sim.dev.counters().snapshot();
    let mut got = [0u8; 7];
    mem.read_slice(&mut got, GuestAddress(buf.gpa(62 * 4096)))
        .unwrap();
    assert_eq!(&got, b"page 62");
    assert_eq!(s.sim.dev.counters().snapshot().since(&before).syscalls(), 0);
    mem.finish().unwrap();
    assert_no_live_mappings(&s);
}

/// Linux's grant DMA puts indirect descriptor tables in granted memory too, so they sit in the
/// on-demand region, and virtio-queue reads an indirect table through the memory the chain
/// was popped with. Popped with the plain table, the chain yields no descriptor; popped with
/// the request scope, it yields the table's descriptors and the device serves the request.
#[test]
fn indirect_table_in_on_demand_memory_needs_the_chain_popped_through_the_scope() {
    const NEXT: u16 = 1; // VRING_DESC_F_NEXT
    const INDIRECT: u16 = 4; // VRING_DESC_F_INDIRECT
    for strategy in STRATEGIES {
        let s = setup();
        let q = MockSplitQueue::create(&s.table, GuestAddress(s.ring.gpa(0)), 16);
        let b = block_request(&s);
        // The indirect table, granted read-only like any buffer the device only reads.
        let entries = [
            (b.hdr.gpa(0), 16u32, NEXT, 1u16),
            (b.data.gpa(0), 4096, WRITE | NEXT, 2),
            (b.status.gpa(0), 1, WRITE, 0),
        ];
        let mut bytes = Vec::new();
        for (addr, len, flags, next) in entries {
            bytes.extend_from_slice(&addr.to_le_bytes());
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&flags.to_le_bytes());
            bytes.extend_from_slice(&next.to_le_bytes());
        }
        let indirect = s.sim.grant(1, true).unwrap();
        s.sim.write(&indirect, 0, &bytes).unwrap();
        q.add_desc_chains(&[desc(indirect.gpa(0), 48, INDIRECT)], 0)
            .unwrap();

        // Popped with the plain table: the head is there, its indirect table out of reach.
        // The refused read is counted on the handle: such a chain is visible, not silent.
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let before = s.sim.dev.counters().snapshot();
        let plain = queue.pop_descriptor_chain(&s.table).unwrap();
        assert_eq!(plain.count(), 0, "{strategy:?}");
        let refused = s.sim.dev.counters().snapshot().since(&before);
        assert_eq!(refused.plain_table_refusals, 1, "{strategy:?}: {refused:?}");

        // Popped (again, by a fresh queue) with the request scope.
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let mem = RequestMemory::with_strategy(&s.table, strategy);
        let head = {
            let chain = queue.pop_descriptor_chain(&mem).unwrap();
            let got: Vec<(u64, u32, bool)> = chain
                .clone()
                .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                .collect();
            assert_eq!(
                got,
                [
                    (b.hdr.gpa(0), 16, false),
                    (b.data.gpa(0), 4096, true),
                    (b.status.gpa(0), 1, true)
                ],
                "{strategy:?}"
            );
            mem.prefetch_chains(std::slice::from_ref(&chain)).unwrap();
            let mut r = Reader::new(&mem, chain.clone()).unwrap();
            let hdr: [u8; 16] = r.read_obj().unwrap();
            assert_eq!(&hdr, b"HEADER-012345678", "{strategy:?}");
            let mut w = Writer::new(&mem, chain.clone()).unwrap();
            w.write_all(&[0xab; 4096]).unwrap();
            w.write_obj(0x5au8).unwrap();
            chain.head_index()
        };
        mem.finish().unwrap();
        queue.add_used(&s.table, head, 4097).unwrap();
        check_completed(&s, &b);
        s.sim.end_access(&indirect).unwrap();
        assert_no_live_mappings(&s);
    }
}
