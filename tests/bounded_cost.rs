//! Bounded cost under hostile input (issue 11, item 4), with the device's exact counters.
//!
//! Bounds, for a batch of N requests prefetched in one scope, k of whose pages are bad
//! (ungranted, revoked):
//! - grant copy: 2 ioctls for the whole batch (one copy-in, one copy-back), whatever N and k:
//!   Xen reports a status per segment, and a page whose copy-in failed fails again at every
//!   touch without a call.
//! - map: per protection, at most 1 + 2k⌈log2 n⌉ map attempts over its n pages (halving keeps
//!   what maps), each a MAP_GRANT_REF ioctl and an mmap (plus an UNMAP_GRANT_REF ioctl when the
//!   mmap fails); every map made is released with one munmap and one ioctl; each bad page the
//!   device then touches costs at most two more attempts (the writable one, and a read-only
//!   one telling a read-only grant from an ungranted ref).
//! - indirect tables in on-demand memory: one grant copy per page of table the chain walks
//!   (not one per descriptor); a claimed length past 65535 descriptors is refused by
//!   virtio-queue before any read, and a long claimed length costs only the pages walked.

mod common;

use std::io::Write as _;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::GuestAddress;
use xen_vhost_mem::device::CounterSnapshot;
use xen_vhost_mem::testing::GuestBuffer;
use xen_vhost_mem::{RegionTable, RequestMemory, Strategy};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

use common::GrantedRing as Setup;

fn setup() -> Setup {
    common::granted_ring(512)
}

impl Setup {
    fn counters(&self) -> CounterSnapshot {
        self.sim.dev.counters().snapshot()
    }
    /// A ref in the on-demand region nobody granted.
    fn ungranted(&self, i: u32) -> u64 {
        xen_vhost_mem::xen_page::grant_addr(self.ring.first_ref + 2 + 60_000 + i, 0)
    }
    #[track_caller]
    fn assert_quiet(&self) {
        assert_eq!(
            self.sim.emu.live_mappings(),
            1,
            "only the ring mapping lives"
        );
        assert_eq!(self.sim.emu.live_grant_maps(), 1);
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Guest side of a block-like request: RO 16-byte header, 4 KiB data (or a bad address) and
/// a 1-byte status.
struct Block {
    hdr: GuestBuffer,
    data: Option<GuestBuffer>,
    data_gpa: u64,
    status: GuestBuffer,
}

/// N block requests, those in `bad` with their data page at an ungranted ref, popped as one
/// batch.
fn batch<'a>(
    s: &'a Setup,
    q: &'a MockSplitQueue<'a, RegionTable>,
    n: usize,
    bad: &[usize],
) -> (Vec<Block>, Vec<DescriptorChain<&'a RegionTable>>) {
    let mut blocks = Vec::new();
    let mut raw = Vec::new();
    for i in 0..n {
        let hdr = s.sim.grant(1, true).unwrap();
        s.sim.write(&hdr, 0, &[i as u8; 16]).unwrap();
        let (data, data_gpa) = if bad.contains(&i) {
            (None, s.ungranted(i as u32))
        } else {
            let d = s.sim.grant(1, false).unwrap();
            let g = d.gpa(0);
            (Some(d), g)
        };
        let status = s.sim.grant(1, false).unwrap();
        let base = raw.len() as u16;
        raw.push(desc(hdr.gpa(0), 16, NEXT, base + 1));
        raw.push(desc(data_gpa, 4096, WRITE | NEXT, base + 2));
        raw.push(desc(status.gpa(0), 1, WRITE, 0));
        blocks.push(Block {
            hdr,
            data,
            data_gpa,
            status,
        });
    }
    q.add_desc_chains(&raw, 0).unwrap();
    let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
    let chains: Vec<_> = std::iter::from_fn(|| queue.pop_descriptor_chain(&s.table)).collect();
    assert_eq!(chains.len(), n);
    (blocks, chains)
}

/// The device: read the header, write data and status; a request whose memory fails is
/// dropped (as blk would, with an error status).
fn serve(mem: &RequestMemory<'_>, chain: DescriptorChain<&RegionTable>) -> bool {
    let Ok(mut r) = Reader::new(mem, chain.clone()) else {
        return false;
    };
    let Ok(hdr) = r.read_obj::<[u8; 16]>() else {
        return false;
    };
    let Ok(mut w) = Writer::new(mem, chain) else {
        return false;
    };
    w.write_all(&[hdr[0] ^ 0xff; 4096]).is_ok() && w.write_obj(0x5au8).is_ok()
}

fn check(s: &Setup, blocks: &[Block]) {
    for (i, b) in blocks.iter().enumerate() {
        match &b.data {
            Some(d) => {
                assert_eq!(s.sim.read(d, 0, 4096).unwrap(), vec![i as u8 ^ 0xff; 4096]);
                assert_eq!(s.sim.read(&b.status, 0, 1).unwrap(), [0x5a]);
            }
            None => assert!(b.data_gpa != 0),
        }
        let _ = &b.hdr;
    }
}

/// Runs a batch of `n` with `bad` data pages through one prefetched scope; returns the counts.
fn run(strategy: Strategy, n: usize, bad: &[usize]) -> CounterSnapshot {
    let s = setup();
    let q = MockSplitQueue::create(&s.table, GuestAddress(s.ring.gpa(0)), 256);
    let (blocks, chains) = batch(&s, &q, n, bad);
    let before = s.counters();
    let mem = RequestMemory::with_strategy(&s.table, strategy);
    mem.prefetch_chains(&chains).unwrap();
    let served = chains
        .into_iter()
        .filter(|c| serve(&mem, c.clone()))
        .count();
    let _ = mem.finish();
    let d = s.counters().since(&before);
    assert_eq!(served, n - bad.len(), "{strategy:?}");
    check(&s, &blocks);
    s.assert_quiet();
    d
}

/// Grant copy: 2 ioctls for the batch, with 0, 1 or 3 bad pages among 8 or 64 requests (the
/// device touches every bad page once; a touch of a page Xen refused costs nothing).
#[test]
fn grant_copy_batch_costs_two_ioctls_whatever_its_bad_pages() {
    for (n, bad) in [
        (8, &[][..]),
        (8, &[3][..]),
        (8, &[0, 4, 7][..]),
        (64, &[1, 30, 63][..]),
    ] {
        let d = run(Strategy::GrantCopy, n, bad);
        assert_eq!(
            (d.grant_copies, d.syscalls()),
            (2, 2),
            "n={n} bad={bad:?}: {d:?}"
        );
        // One error per bad page, at its touch (prefetch failures are left to the touch).
        assert_eq!(d.errors as usize, bad.len(), "n={n} bad={bad:?}: {d:?}");
    }
}

/// The same bad page touched again and again in one scope costs one failed segment, no call.
#[test]
fn touching_a_refused_page_again_costs_no_call() {
    let s = setup();
    let mem = RequestMemory::with_strategy(&s.table, Strategy::GrantCopy);
    let mut b = [0u8; 8];
    use vm_memory::Bytes;
    assert!(mem
        .read_slice(&mut b, GuestAddress(s.ungranted(0)))
        .is_err());
    let before = s.counters();
    for _ in 0..100 {
        assert!(mem
            .read_slice(&mut b, GuestAddress(s.ungranted(0)))
            .is_err());
    }
    assert_eq!(s.counters().since(&before).syscalls(), 0);
    mem.finish().unwrap();
}

/// Map: a bad data page among the 2N writable pages is found by halving; the batch costs a
/// logarithmic number of calls more than a clean one, not one map per page or request.
#[test]
fn mapped_batch_with_one_bad_page_costs_a_logarithmic_number_of_maps() {
    // Clean batch: one read-only and one writable map, each MAP_GRANT_REF + mmap, released by
    // munmap + UNMAP_GRANT_REF: 8 calls, whatever N.
    for n in [8, 64] {
        let d = run(Strategy::Map, n, &[]);
        assert_eq!((d.mmaps, d.syscalls()), (2, 8), "n={n}: {d:?}");
    }
    // n = 16 writable pages (8 data + 8 status), data page of request 3 bad (the 4th page):
    // attempts on 16, 8, 4, 2 and 1 pages fail down to it (5 × 3 calls), their other halves
    // map (4 × 2 calls, released 4 × 2); the read-only map as before (4 calls). The touch of
    // the bad page tries it writable (3 calls) then read-only (3 calls). 15+16+4+6 = 41.
    let d = run(Strategy::Map, 8, &[3]);
    assert_eq!((d.mmaps, d.syscalls()), (12, 41), "{d:?}");
    // The bound: per protection 1 + 2k⌈log2 n⌉ attempts, at most 4 calls each, plus 2
    // attempts per bad page touched.
    for (n, bad) in [(8, &[3][..]), (64, &[5][..]), (64, &[0, 33, 63][..])] {
        let d = run(Strategy::Map, n, bad);
        let k = bad.len() as u64;
        let log = (2 * n as u64).next_power_of_two().trailing_zeros() as u64;
        let attempts = (1 + 2 * k * log) + 1 + 2 * k;
        assert!(d.mmaps <= attempts, "n={n} bad={bad:?}: {d:?}");
        assert!(d.syscalls() <= 4 * attempts, "n={n} bad={bad:?}: {d:?}");
        // Far from one map per page (3 pages a request, 4 calls a map).
        assert!(d.syscalls() < 12 * n as u64 / 2, "n={n} bad={bad:?}: {d:?}");
    }
}

/// The descriptors of an indirect table of `entries` entries: a chain of readable buffers at
/// `buf` (16 bytes each).
fn indirect_table(buf: &GuestBuffer, entries: u16) -> Vec<u8> {
    let mut bytes = Vec::new();
    for i in 0..entries {
        let last = i + 1 == entries;
        let (flags, next) = if last { (0, 0) } else { (NEXT, i + 1) };
        bytes.extend_from_slice(&buf.gpa(16 * usize::from(i)).to_le_bytes());
        bytes.extend_from_slice(&16u32.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&next.to_le_bytes());
    }
    bytes
}

/// Walks the chain of head 0 (one indirect descriptor at `table_gpa`, claiming `len` bytes)
/// popped through a scope without prefetch; returns the descriptors seen and the counts.
fn walk_indirect(s: &Setup, table_gpa: u64, len: u32) -> (usize, CounterSnapshot, usize) {
    let q = MockSplitQueue::create(&s.table, GuestAddress(s.ring.gpa(0)), 16);
    q.add_desc_chains(&[desc(table_gpa, len, INDIRECT, 0)], 0)
        .unwrap();
    let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
    let before = s.counters();
    let mem = RequestMemory::with_strategy(&s.table, Strategy::GrantCopy);
    let (n, held) = {
        let chain = queue.pop_descriptor_chain(&mem).unwrap();
        // Walked three times, as a device does (prefetch, reader, writer).
        let n = chain.clone().count();
        assert_eq!(chain.clone().count(), n);
        assert_eq!(chain.count(), n);
        (n, mem.held_pages())
    };
    mem.finish().unwrap();
    (n, s.counters().since(&before), held)
}

/// An indirect table in on-demand memory, walked descriptor by descriptor: one grant copy per
/// page of table, not one per descriptor.
#[test]
fn an_indirect_table_costs_one_fetch_per_page_not_per_descriptor() {
    let s = setup();
    let bufs = s.sim.grant(1, true).unwrap();
    // 32 descriptors in one page.
    let t = s.sim.grant(1, true).unwrap();
    s.sim.write(&t, 0, &indirect_table(&bufs, 32)).unwrap();
    let (n, d, held) = walk_indirect(&s, t.gpa(0), 32 * 16);
    assert_eq!(
        (n, d.grant_copies, d.syscalls(), held),
        (32, 1, 1, 1),
        "{d:?}"
    );
    // 100 descriptors from 64 bytes before a page boundary: two pages, two copies.
    let t2 = s.sim.grant(2, true).unwrap();
    s.sim
        .write(&t2, 4096 - 64, &indirect_table(&bufs, 100))
        .unwrap();
    let (n, d, held) = walk_indirect(&s, t2.gpa(4096 - 64), 100 * 16);
    assert_eq!((n, d.grant_copies, held), (100, 2, 2), "{d:?}");
    s.assert_quiet();
}

/// A huge claimed indirect length is refused cheaply: past 65535 descriptors virtio-queue
/// refuses the table before reading it (the chain is empty, no call, nothing held); just
/// under, only the page the chain walks is fetched, not the megabyte claimed.
#[test]
fn a_huge_claimed_indirect_table_costs_only_what_is_walked() {
    let s = setup();
    let bufs = s.sim.grant(1, true).unwrap();
    let t = s.sim.grant(1, true).unwrap();
    s.sim.write(&t, 0, &indirect_table(&bufs, 3)).unwrap();
    let (n, d, held) = walk_indirect(&s, t.gpa(0), 0xFFFF_FFF0);
    assert_eq!((n, d.syscalls(), held), (0, 0, 0), "{d:?}");
    let (n, d, held) = walk_indirect(&s, t.gpa(0), 65535 * 16);
    assert_eq!((n, d.grant_copies, held), (3, 1, 1), "{d:?}");
    s.assert_quiet();
}

/// Map: a page whose map failed at a touch is not tried again in that scope. The first touch
/// of an ungranted page costs its map attempts and gets `GrantMap` with EINVAL; 100 more
/// touches get the same error with no device call. A write touch then tries the writable map
/// once (the read-only one is known to fail), and its repeats cost nothing either. A new scope
/// starts afresh.
#[test]
fn touching_a_page_that_failed_to_map_again_costs_no_call() {
    use vm_memory::Bytes;
    use xen_vhost_mem::RequestError;
    let s = setup();
    let gpa = s.ungranted(0);
    let gref = u32::try_from((gpa & !(1 << 63)) >> 12).unwrap();
    let mem = RequestMemory::with_strategy(&s.table, Strategy::Map);
    let expect = |e: vm_memory::GuestMemoryError| match RequestError::from_guest_memory_error(&e) {
        Some(RequestError::GrantMap {
            gpa: g,
            domid: 1,
            gref: r,
            source,
        }) if *g == gpa && *r == gref => assert_eq!(source.errno(), Some(libc::EINVAL)),
        other => panic!("want GrantMap at {gpa:#x} ref {gref}, got {other:?} ({e})"),
    };
    let mut b = [0u8; 8];
    let before = s.counters();
    expect(mem.read_slice(&mut b, GuestAddress(gpa)).unwrap_err());
    let first = s.counters().since(&before);
    assert!(first.syscalls() > 0, "{first:?}");
    let before = s.counters();
    for _ in 0..100 {
        expect(mem.read_slice(&mut b, GuestAddress(gpa)).unwrap_err());
    }
    let again = s.counters().since(&before);
    assert_eq!(again.syscalls(), 0, "{again:?}");
    assert_eq!(again.errors, 100, "each refusal is counted: {again:?}");
    // A write needs the writable map: one attempt (MAP_GRANT_REF, mmap, UNMAP_GRANT_REF), no
    // read-only retry; then nothing.
    let before = s.counters();
    expect(mem.write_slice(&b, GuestAddress(gpa)).unwrap_err());
    assert_eq!(s.counters().since(&before).mmaps, 1);
    let before = s.counters();
    for _ in 0..100 {
        expect(mem.write_slice(&b, GuestAddress(gpa)).unwrap_err());
    }
    assert_eq!(s.counters().since(&before).syscalls(), 0);
    mem.finish().unwrap();
    // The next scope tries again (the guest may have granted the page since).
    let mem = RequestMemory::with_strategy(&s.table, Strategy::Map);
    let before = s.counters();
    expect(mem.read_slice(&mut b, GuestAddress(gpa)).unwrap_err());
    assert_eq!(s.counters().since(&before), first);
    mem.finish().unwrap();
    s.assert_quiet();
}
