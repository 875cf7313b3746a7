//! The bound on lazily mapped FOREIGN buckets (`XenHandle::set_lazy_bucket_limit`): buckets no
//! live request scope can be using are unmapped to make room, a bucket a live scope touched
//! never is (its slices keep reading the right bytes), pinned ring buckets never are, and an
//! access that needs more room than the
//! bound leaves gets the exact error.

mod common;

use std::sync::Arc;

use common::{frames, guest, lazy_region, DOMID, PAGE};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use xen_vhost_mem::backend::BackendError;
use xen_vhost_mem::testing::GuestSim;
use xen_vhost_mem::{RegionTable, RequestError, RequestMemory};

/// 4 frames per bucket: 16 KiB.
const BUCKET_FRAMES: usize = 4;
const BUCKET: u64 = (BUCKET_FRAMES * PAGE) as u64;
/// Guest frames 0..PAGES, each holding its gfn in its first 8 bytes.
const PAGES: usize = 64;

fn setup(limit: usize) -> (GuestSim, RegionTable) {
    let g = guest(PAGES);
    let page = frames(&g, 0, PAGES);
    for i in 0..PAGES {
        g.emu
            .write_page(page + i, 0, &(i as u64).to_le_bytes())
            .unwrap();
    }
    g.dev
        .set_lazy_bucket_limit(limit)
        .expect("bound before any region");
    let region = lazy_region(&g, 0, (PAGES * PAGE) as u64, BUCKET_FRAMES);
    let table = RegionTable::from_regions(vec![region]).unwrap();
    (g, table)
}

fn gfn_at(mem: &impl Bytes<GuestAddress, E = vm_memory::GuestMemoryError>, gfn: u64) -> u64 {
    mem.read_obj(GuestAddress(gfn * PAGE as u64)).unwrap()
}

fn limit_error(e: &vm_memory::GuestMemoryError) -> Option<(u16, u64, usize)> {
    match RequestError::from_guest_memory_error(e)? {
        RequestError::Foreign(BackendError::LazyBucketLimit { domid, gfn, max }) => {
            Some((*domid, *gfn, *max))
        }
        _ => None,
    }
}

#[test]
fn buckets_of_finished_scopes_are_evicted_to_stay_within_the_bound() {
    let (g, table) = setup(4);
    // A scope per request, each touching the next bucket, twice round all 16 buckets.
    for round in 0..2 {
        for b in 0..(PAGES / BUCKET_FRAMES) as u64 {
            let mem = RequestMemory::new(&table);
            let gfn = b * BUCKET_FRAMES as u64 + round;
            assert_eq!(gfn_at(&mem, gfn), gfn, "bytes of gfn {gfn:#x}");
            mem.finish().unwrap();
            assert!(g.dev.lazy_buckets_mapped() <= 4, "bound held");
            assert_eq!(
                g.dev.lazy_buckets_mapped(),
                table.regions()[0].lazy_mapped_buckets()
            );
        }
    }
    // 32 first touches, at most 4 buckets mapped: at least 28 evictions, each a single
    // system call (the privcmd mapping replaced by the reservation in one mmap).
    assert!(g.dev.lazy_evictions() >= 28, "{}", g.dev.lazy_evictions());
    let c = g.dev.counters().snapshot();
    assert_eq!(c.munmaps, g.dev.lazy_evictions());
    assert_eq!(c.live_mappings, g.dev.lazy_buckets_mapped() as i64);
    drop(table);
    assert_eq!(g.dev.lazy_buckets_mapped(), 0);
    g.assert_nothing_mapped();
}

#[test]
fn a_bucket_a_live_scope_touched_is_never_evicted() {
    let (g, table) = setup(2);
    let a = RequestMemory::new(&table);
    // Scope A holds a slice of bucket 0.
    let held = a
        .get_slices(GuestAddress(0), 8, Permissions::Read)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let b = RequestMemory::new(&table);
    assert_eq!(gfn_at(&b, 4), 4, "bucket 1");
    // Bucket 2 needs room; buckets 0 (A) and 1 (B) are in live scopes: the exact error.
    let e = b
        .read_obj::<u64>(GuestAddress(8 * PAGE as u64))
        .unwrap_err();
    assert_eq!(limit_error(&e), Some((DOMID, 8, 2)), "{e}");
    // A's slice still reads its frame's bytes (an unmapped bucket would fault here).
    let mut v = [0u8; 8];
    held.copy_to(&mut v[..]);
    assert_eq!(u64::from_le_bytes(v), 0);
    assert_eq!(g.dev.lazy_evictions(), 0);
    b.finish().unwrap();
    a.finish().unwrap();
    // Both done: the next scopes evict their buckets.
    let c = RequestMemory::new(&table);
    assert_eq!(gfn_at(&c, 8), 8);
    assert_eq!(gfn_at(&c, 12), 12);
    c.finish().unwrap();
    assert_eq!(g.dev.lazy_evictions(), 2);
    assert_eq!(g.dev.lazy_buckets_mapped(), 2);
    drop(table);
    g.assert_nothing_mapped();
}

#[test]
fn an_access_needing_more_buckets_than_the_bound_is_refused() {
    let (g, table) = setup(2);
    let mem = RequestMemory::new(&table);
    let mut buf = vec![0u8; 3 * BUCKET as usize];
    let e = mem.read_slice(&mut buf, GuestAddress(BUCKET)).unwrap_err();
    assert_eq!(limit_error(&e), Some((DOMID, 4, 2)), "{e}");
    let errors = g.dev.counters().snapshot().errors;
    assert!(errors >= 1);
    // Within the bound the same scope goes on.
    let mut buf = vec![0u8; 2 * BUCKET as usize];
    mem.read_slice(&mut buf, GuestAddress(BUCKET)).unwrap();
    assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), 4);
    mem.finish().unwrap();
    drop(table);
    g.assert_nothing_mapped();
}

#[test]
fn pinned_ring_buckets_are_never_evicted_until_let_go() {
    let (g, table) = setup(3);
    let region = &table.regions()[0];
    // A ring at gfn 9 + 0x100: bucket 2, held by the pin (mapped now, with no scope open).
    let ring = GuestAddress(9 * PAGE as u64 + 0x100);
    let pin = region.pin_lazy(ring, 0x200).unwrap();
    assert_eq!(g.dev.lazy_buckets_mapped(), 1);
    assert_eq!(region.lazy_mapped_buckets(), 1);
    let mem = RequestMemory::new(&table);
    mem.write_obj(0xfeed_u32, ring).unwrap();
    mem.finish().unwrap();
    // The plain table still never dereferences a lazy region, pinned or not.
    assert!(table.read_obj::<u32>(ring).is_err());
    let churn = |rounds: u64| {
        for round in 0..rounds {
            for b in (0..16u64).filter(|&b| b != 2) {
                let mem = RequestMemory::new(&table);
                let gfn = b * BUCKET_FRAMES as u64 + round;
                assert_eq!(gfn_at(&mem, gfn), gfn);
                mem.finish().unwrap();
            }
        }
    };
    // Scopes churn through every other bucket under a bound of 3.
    churn(3);
    assert!(g.dev.lazy_evictions() >= 40, "{}", g.dev.lazy_evictions());
    // Bucket 2 was never unmapped: its one mapping is still the first one.
    let before = g.dev.counters().snapshot();
    let mem = RequestMemory::new(&table);
    assert_eq!(mem.read_obj::<u32>(ring).unwrap(), 0xfeed);
    assert_eq!(gfn_at(&mem, 9), 9, "the pinned bucket's other frames too");
    mem.finish().unwrap();
    assert_eq!(g.dev.counters().snapshot().since(&before).syscalls(), 0);
    // Let go (the ring moved, or the connection ended): now it is evicted like any other.
    drop(pin);
    churn(1);
    let before = g.dev.counters().snapshot();
    let mem = RequestMemory::new(&table);
    assert_eq!(mem.read_obj::<u32>(ring).unwrap(), 0xfeed);
    mem.finish().unwrap();
    let d = g.dev.counters().snapshot().since(&before);
    assert_eq!(
        (d.munmaps, d.mmaps, d.ioctls),
        (1, 1, 1),
        "one eviction to make room, then mapped again"
    );
    // A pin past the region is an error; an empty one at its very end holds nothing.
    assert!(region
        .pin_lazy(GuestAddress((PAGES * PAGE) as u64 - 4), 8)
        .is_err());
    let end = region
        .pin_lazy(GuestAddress((PAGES * PAGE) as u64), 0)
        .unwrap();
    drop(end);
    drop(table);
    assert_eq!(g.dev.lazy_buckets_mapped(), 0);
    g.assert_nothing_mapped();
}

#[test]
fn threads_churning_under_a_tight_bound_always_read_the_right_frames() {
    const THREADS: u64 = 3;
    let (g, table) = setup(THREADS as usize + 1);
    let table = Arc::new(table);
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let table = table.clone();
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                let mut ok = 0u32;
                for _ in 0..3000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let gfn = x % PAGES as u64;
                    let mem = RequestMemory::new(&table);
                    match mem.read_obj::<u64>(GuestAddress(gfn * PAGE as u64)) {
                        Ok(v) => assert_eq!(v, gfn, "thread {t} read gfn {gfn:#x}"),
                        Err(e) => panic!("thread {t}: gfn {gfn:#x}: {e}"),
                    }
                    ok += 1;
                    drop(mem);
                }
                ok
            })
        })
        .collect();
    let mut served = 0;
    for w in workers {
        served += w.join().unwrap();
    }
    println!("served {served}, {} evictions", g.dev.lazy_evictions());
    // Each live scope holds one bucket: a bound of one more than the threads always has room.
    assert_eq!(served, 3000 * THREADS as u32);
    assert!(g.dev.lazy_buckets_mapped() <= THREADS as usize + 1);
    assert!(g.dev.lazy_evictions() > 100);
    // The count stayed exact through every race: each mapped bucket counted once.
    assert_eq!(
        g.dev.lazy_buckets_mapped(),
        table.regions()[0].lazy_mapped_buckets()
    );
    let table = Arc::into_inner(table).unwrap();
    drop(table);
    assert_eq!(g.dev.lazy_buckets_mapped(), 0);
    g.assert_nothing_mapped();
}

#[test]
fn the_bound_is_set_before_lazy_regions_exist() {
    let (g, table) = setup(4);
    assert_eq!(
        g.dev.set_lazy_bucket_limit(8),
        Err(xen_vhost_mem::device::LazyLimitBusy { regions: 1 })
    );
    assert_eq!(g.dev.lazy_bucket_limit(), 4);
    drop(table);
    assert_eq!(g.dev.set_lazy_bucket_limit(8), Ok(()));
    assert_eq!(g.dev.lazy_bucket_limit(), 8);
}
