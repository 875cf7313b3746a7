//! Exact write-back (issue 11, item 3): a scope copies back exactly the bytes the device wrote.
//! Two scopes alive at once that write disjoint bytes of one page both land, in either finish
//! order; a write access or request that fails part-way writes nothing it did not write, under
//! every strategy and writable-buffer mode. See `request::writeback` for the rule.

mod common;

use std::io::Write as _;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{QueueT, Writer};
use vm_memory::{Bytes, GuestAddress};
use xen_vhost_mem::daemon::VhostUserDevice;
use xen_vhost_mem::devices::blk::{BlkConfig, BlkDevice, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_IN};
use xen_vhost_mem::testing::GuestBuffer;
use xen_vhost_mem::{RequestError, RequestMemory, Strategy, WritableBuffers};

const NEXT: u16 = 1;
/// A guest address in no region of the test's table.
const NO_REGION: u64 = 0x10_0000;
const WRITE: u16 = 2;
const STRATEGIES: [Strategy; 3] = [
    Strategy::GrantCopy,
    Strategy::Map,
    Strategy::Auto {
        map_threshold: 4096,
    },
];
const MODES: [WritableBuffers; 2] = [WritableBuffers::CopyIn, WritableBuffers::Overwrite];

use common::GrantedRing as Setup;

fn setup() -> Setup {
    common::granted_ring(256)
}

impl Setup {
    fn buf(&self, pages: usize, ro: bool, fill: u8) -> GuestBuffer {
        let b = self.sim.grant(pages, ro).unwrap();
        self.sim.write(&b, 0, &vec![fill; pages * 4096]).unwrap();
        b
    }
    fn scope(&self, strategy: Strategy, mode: WritableBuffers) -> RequestMemory<'_> {
        RequestMemory::with_strategy(&self.table, strategy).writable_buffers(mode)
    }
    #[track_caller]
    fn assert_quiet(&self) {
        // The ring region's own mapping stays for the table's life; nothing else may.
        assert_eq!(self.sim.emu.live_mappings(), 1, "emulation mappings");
        assert_eq!(self.sim.emu.live_grant_maps(), 1, "emulation grant maps");
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Whether `strategy` fetches a buffer of `len` bytes by grant copy.
fn copies(strategy: Strategy, len: usize) -> bool {
    match strategy {
        Strategy::Map => false,
        Strategy::GrantCopy => true,
        Strategy::Auto { map_threshold } => len < map_threshold,
    }
}

/// Expected page: `fill` everywhere but the given ranges.
fn page_with(fill: u8, ranges: &[(usize, &[u8])]) -> Vec<u8> {
    let mut v = vec![fill; 4096];
    for (at, bytes) in ranges {
        v[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    v
}

/// Scope A writes bytes 0..16 and 100..116 of a page, scope B (another queue) 50..66, both
/// alive at once; A has also read the whole stretch first, so its bounce page holds a copy of
/// B's bytes. Whatever order they finish in, all three ranges land and nothing else changes.
#[test]
fn two_scopes_writing_disjoint_bytes_of_one_page_both_land() {
    for strategy in STRATEGIES {
        for mode in MODES {
            for a_first in [true, false] {
                let s = setup();
                let page = s.buf(1, false, 0x11);
                let a = s.scope(strategy, mode);
                let b = s.scope(strategy, mode);
                let mut seen = [0u8; 200];
                a.read_slice(&mut seen, GuestAddress(page.gpa(0))).unwrap();
                assert_eq!(seen, [0x11; 200]);
                a.write_slice(&[0xa0; 16], GuestAddress(page.gpa(0)))
                    .unwrap();
                b.write_slice(&[0xb0; 16], GuestAddress(page.gpa(50)))
                    .unwrap();
                a.write_slice(&[0xa1; 16], GuestAddress(page.gpa(100)))
                    .unwrap();
                // The guest changes a byte nobody writes meanwhile.
                s.sim.write(&page, 3000, &[0x66]).unwrap();
                if a_first {
                    a.finish().unwrap();
                    b.finish().unwrap();
                } else {
                    b.finish().unwrap();
                    a.finish().unwrap();
                }
                let want = page_with(
                    0x11,
                    &[
                        (0, &[0xa0; 16]),
                        (50, &[0xb0; 16]),
                        (100, &[0xa1; 16]),
                        (3000, &[0x66]),
                    ],
                );
                assert_eq!(
                    s.sim.read(&page, 0, 4096).unwrap(),
                    want,
                    "{strategy:?} {mode:?} a_first={a_first}"
                );
                s.assert_quiet();
            }
        }
    }
}

/// Many separate writes to one page (more spans than a page keeps inline), with merges of
/// touching and overlapping spans: exactly the written bytes go back.
#[test]
fn many_separate_writes_to_one_page_go_back_exactly() {
    for mode in MODES {
        let s = setup();
        let page = s.buf(1, false, 0x22);
        let mem = s.scope(Strategy::GrantCopy, mode);
        let mut want = vec![0x22u8; 4096];
        // 20 spans of 8 bytes, 100 apart, written in a scrambled order; then two that join
        // neighbours (touching at 308, overlapping 500..512).
        let mut order: Vec<usize> = (0..20).collect();
        order.reverse();
        order.swap(3, 11);
        for i in order {
            let at = i * 100;
            mem.write_slice(&[i as u8; 8], GuestAddress(page.gpa(at)))
                .unwrap();
            want[at..at + 8].fill(i as u8);
        }
        mem.write_slice(&[0xcc; 92], GuestAddress(page.gpa(308)))
            .unwrap();
        want[308..400].fill(0xcc);
        mem.write_slice(&[0xdd; 8], GuestAddress(page.gpa(504)))
            .unwrap();
        want[504..512].fill(0xdd);
        // Written behind the device's back: must survive.
        s.sim.write(&page, 50, &[0x77]).unwrap();
        want[50] = 0x77;
        let before = s.sim.dev.counters().snapshot();
        mem.finish().unwrap();
        let d = s.sim.dev.counters().snapshot().since(&before);
        // One ioctl; one segment per span: 20 - 1 (300 and 400 joined by 308..400) spans.
        assert_eq!((d.grant_copies, d.copy_segments), (1, 19), "{mode:?}");
        assert_eq!(s.sim.read(&page, 0, 4096).unwrap(), want, "{mode:?}");
        s.assert_quiet();
    }
}

/// A write access whose buffer runs from a good page into an ungranted one. `CopyIn` and
/// mapping find the bad page at the access, which fails and writes back nothing: not the bytes
/// before the bad page (which vm-memory may already have written). `Overwrite` neither copies
/// in nor probes, so the access succeeds: the device wrote the good page, which gets its bytes,
/// and `finish` reports the bad page.
#[test]
fn a_write_access_into_an_ungranted_page() {
    for strategy in STRATEGIES {
        for mode in MODES {
            for prefetch in [false, true] {
                let s = setup();
                // The next ref after `good` is never granted in this test.
                let good = s.buf(1, false, 0x33);
                let at = GuestAddress(good.gpa(16));
                let mem = s.scope(strategy, mode);
                if prefetch {
                    mem.prefetch(&[(at, 4096 + 16, vm_memory::Permissions::Write)])
                        .unwrap();
                }
                let r = mem.write_slice(&[0xee; 4096 + 16], at);
                let what = format!("{strategy:?} {mode:?} prefetch={prefetch}");
                if mode == WritableBuffers::Overwrite && copies(strategy, 4096 + 16) {
                    r.unwrap();
                    match mem.finish() {
                        Err(RequestError::CopyBack { failed, gref, .. }) => {
                            assert_eq!((failed, gref), (1, good.first_ref + 1), "{what}")
                        }
                        other => panic!("{what}: {other:?}"),
                    }
                    assert_eq!(
                        s.sim.read(&good, 0, 4096).unwrap(),
                        page_with(0x33, &[(16, &[0xee; 4080])]),
                        "{what}"
                    );
                } else {
                    let e = r.unwrap_err();
                    let r = RequestError::from_guest_memory_error(&e).expect("a request error");
                    assert!(
                        matches!(
                            r,
                            RequestError::UnknownRef { gref, .. }
                                | RequestError::GrantMap { gref, .. }
                                if *gref == good.first_ref + 1
                        ),
                        "{what}: {r:?}"
                    );
                    mem.finish().unwrap();
                    assert_eq!(
                        s.sim.read(&good, 0, 4096).unwrap(),
                        vec![0x33; 4096],
                        "{what}"
                    );
                }
                s.assert_quiet();
            }
        }
    }
}

/// A write access running from a writable page into a read-only one. `CopyIn` and mapping find
/// the read-only grant at the access, which then writes nothing back. `Overwrite` does not
/// probe, so the access succeeds: the device did write both pages, the writable page gets its
/// bytes, and `finish` reports the read-only one, whose bytes are untouched.
#[test]
fn a_write_access_into_a_read_only_page() {
    for strategy in STRATEGIES {
        for mode in MODES {
            let s = setup();
            let good = s.buf(1, false, 0x44);
            let ro = s.buf(1, true, 0x55);
            assert_eq!(ro.first_ref, good.first_ref + 1);
            let at = GuestAddress(good.gpa(4000));
            let mem = s.scope(strategy, mode);
            let r = mem.write_slice(&[0xee; 200], at);
            if mode == WritableBuffers::Overwrite && copies(strategy, 200) {
                r.unwrap();
                match mem.finish() {
                    Err(RequestError::CopyBack { failed, gref, .. }) => {
                        assert_eq!((failed, gref), (1, ro.first_ref))
                    }
                    other => panic!("{strategy:?}: {other:?}"),
                }
                assert_eq!(
                    s.sim.read(&good, 0, 4096).unwrap(),
                    page_with(0x44, &[(4000, &[0xee; 96])])
                );
            } else {
                let e = r.unwrap_err();
                assert!(
                    matches!(
                        RequestError::from_guest_memory_error(&e),
                        Some(RequestError::ReadOnlyGrant { gref, .. }) if *gref == ro.first_ref
                    ),
                    "{strategy:?} {mode:?}: {e}"
                );
                mem.finish().unwrap();
                assert_eq!(
                    s.sim.read(&good, 0, 4096).unwrap(),
                    vec![0x44; 4096],
                    "{strategy:?} {mode:?}"
                );
            }
            assert_eq!(s.sim.read(&ro, 0, 4096).unwrap(), vec![0x55; 4096]);
            s.assert_quiet();
        }
    }
}

/// A chain whose second writable descriptor is bad (outside every region, found in every
/// mode): `Writer::new` asks for the first (good) buffer, then fails. The device gives up on the request and calls `discard_writes` for its
/// writable buffers, as blk does: the guest's bytes stay as they were, zeros of `Overwrite`
/// included, with and without prefetch; a status byte written afterwards lands.
#[test]
fn a_chain_that_fails_at_a_later_descriptor_writes_nothing_back() {
    for strategy in STRATEGIES {
        for mode in MODES {
            for prefetch in [false, true] {
                let s = setup();
                let data = s.buf(2, false, 0x66);
                let status = s.buf(1, false, 0xff);
                let bad = NO_REGION;
                let q = MockSplitQueue::create(&s.table, GuestAddress(s.ring.gpa(0)), 16);
                q.add_desc_chains(
                    &[
                        desc(data.gpa(0), 8192, WRITE | NEXT, 1),
                        desc(bad, 512, WRITE | NEXT, 2),
                        desc(status.gpa(0), 1, WRITE, 0),
                    ],
                    0,
                )
                .unwrap();
                let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
                let mem = s.scope(strategy, mode);
                {
                    let chain = queue.pop_descriptor_chain(&mem).unwrap();
                    if prefetch {
                        mem.prefetch_chains(std::slice::from_ref(&chain)).unwrap();
                    }
                    assert!(Writer::new(&mem, chain.clone()).is_err());
                    for d in chain.clone().writable() {
                        mem.discard_writes(d.addr(), d.len() as usize);
                    }
                    mem.write_obj(0x01u8, GuestAddress(status.gpa(0))).unwrap();
                }
                mem.finish().unwrap();
                assert_eq!(
                    s.sim.read(&data, 0, 8192).unwrap(),
                    vec![0x66; 8192],
                    "{strategy:?} {mode:?} prefetch={prefetch}"
                );
                assert_eq!(s.sim.read(&status, 0, 2).unwrap(), [0x01, 0xff]);
                s.assert_quiet();
            }
        }
    }
}

/// `discard_writes` forgets exactly the range it names: writes before and after it in the same
/// page still land, and a write after the discard counts again.
#[test]
fn discard_writes_forgets_exactly_its_range() {
    for mode in MODES {
        let s = setup();
        let page = s.buf(1, false, 0x12);
        let mem = s.scope(Strategy::GrantCopy, mode);
        let mut w = Writer::new(&mem, {
            let q = MockSplitQueue::create(&s.table, GuestAddress(s.ring.gpa(0)), 16);
            q.add_desc_chains(&[desc(page.gpa(0), 1000, WRITE, 0)], 0)
                .unwrap();
            let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
            queue.pop_descriptor_chain(&s.table).unwrap()
        })
        .unwrap();
        w.write_all(&[0x34; 1000]).unwrap();
        mem.discard_writes(GuestAddress(page.gpa(100)), 200);
        mem.discard_writes(GuestAddress(page.gpa(600)), 10);
        mem.write_slice(&[0x56; 4], GuestAddress(page.gpa(150)))
            .unwrap();
        mem.finish().unwrap();
        let want = page_with(
            0x12,
            &[
                (0, &[0x34; 100]),
                (150, &[0x56; 4]),
                (300, &[0x34; 300]),
                (610, &[0x34; 390]),
            ],
        );
        assert_eq!(s.sim.read(&page, 0, 4096).unwrap(), want, "{mode:?}");
        s.assert_quiet();
    }
}

/// blk: an IN request whose second data buffer lies outside every region fails with IOERR and leaves the
/// first data buffer as the guest had it, in both modes (with `Overwrite` it would otherwise
/// get the zeros it started with).
#[test]
fn blk_in_request_that_fails_leaves_the_data_buffers_alone() {
    for mode in MODES {
        let s = setup();
        let dir = std::env::temp_dir().join(format!("xvm-write-back-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join(format!("disk-{mode:?}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let blk = BlkDevice::open(&img, BlkConfig::default()).unwrap();
        let hdr = s.sim.grant(1, true).unwrap();
        let mut h = VIRTIO_BLK_T_IN.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 12]);
        s.sim.write(&hdr, 0, &h).unwrap();
        let data = s.buf(1, false, 0x77);
        let status = s.buf(1, false, 0xff);
        let bad = NO_REGION;
        let q = MockSplitQueue::create(&s.table, GuestAddress(s.ring.gpa(0)), 16);
        q.add_desc_chains(
            &[
                desc(hdr.gpa(0), 16, NEXT, 1),
                desc(data.gpa(0), 4096, WRITE | NEXT, 2),
                desc(bad, 512, WRITE | NEXT, 3),
                desc(status.gpa(0), 1, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let mem = s.scope(Strategy::GrantCopy, mode);
        let mut used = [0u32];
        {
            let mut chains: Vec<_> = queue.pop_descriptor_chain(&mem).into_iter().collect();
            mem.prefetch_chains(&chains).unwrap();
            blk.serve(0, &mem, &mut chains, &mut used);
        }
        mem.finish().unwrap();
        assert_eq!(used, [1], "{mode:?}");
        assert_eq!(
            s.sim.read(&status, 0, 1).unwrap(),
            [VIRTIO_BLK_S_IOERR],
            "{mode:?}"
        );
        assert_eq!(
            s.sim.read(&data, 0, 4096).unwrap(),
            vec![0x77; 4096],
            "{mode:?}"
        );
        s.assert_quiet();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// CopyIn's writability probe writes back one byte it just read; that byte must lie inside
/// the write access that planned the probe. A byte outside it may be another scope's to write
/// (or the guest's), and a write-back of the value read a moment before would undo that write.
/// Cases: the page's bounce already holds bytes before the access (a read on touch copied in
/// 100..4096), and a prefetch whose first copied byte belongs to a readable buffer of the same
/// page. Every grant-copy write to the guest is recorded and must lie inside the access.
#[test]
fn copy_in_probe_writes_only_inside_the_access() {
    use vm_memory::Permissions;
    // (read before, or readable buffer in the same prefetch) and the write access, in page bytes.
    for (prefetch, read, write) in [
        (false, (100, 16), (200, 10)),
        (false, (100, 16), (150, 10)),
        (true, (0, 16), (50, 10)),
        (true, (0, 16), (2000, 100)),
    ] {
        let s = setup();
        let page = s.buf(1, false, 0x33);
        let mem = s.scope(Strategy::GrantCopy, WritableBuffers::CopyIn);
        let (w_at, w_len) = write;
        let mut seen = vec![0u8; read.1];
        if prefetch {
            s.sim.emu.record_guest_writes(true);
            mem.prefetch(&[
                (GuestAddress(page.gpa(read.0)), read.1, Permissions::Read),
                (GuestAddress(page.gpa(w_at)), w_len, Permissions::Write),
            ])
            .unwrap();
            mem.read_slice(&mut seen, GuestAddress(page.gpa(read.0)))
                .unwrap();
        } else {
            mem.read_slice(&mut seen, GuestAddress(page.gpa(read.0)))
                .unwrap();
            s.sim.emu.record_guest_writes(true);
        }
        mem.write_slice(&vec![0xee; w_len], GuestAddress(page.gpa(w_at)))
            .unwrap();
        mem.finish().unwrap();
        let writes = s.sim.emu.guest_writes();
        s.sim.emu.record_guest_writes(false);
        assert!(
            !writes.is_empty(),
            "{prefetch} {read:?} {write:?}: nothing written"
        );
        for w in &writes {
            let (lo, hi) = (usize::from(w.offset), usize::from(w.offset + w.len));
            assert!(
                w.grant.gref == page.first_ref && lo >= w_at && hi <= w_at + w_len,
                "prefetch={prefetch} read {read:?} write {write:?}: grant copy wrote \
                 {lo}..{hi} of ref {}: {writes:?}",
                w.grant.gref
            );
        }
        assert_eq!(
            s.sim.read(&page, 0, 4096).unwrap(),
            page_with(0x33, &[(w_at, &vec![0xee; w_len])]),
        );
        s.assert_quiet();
    }
}
