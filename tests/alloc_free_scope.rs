//! A request scope over a table without on-demand regions is a plain wrapper: no system call
//! (the Xen device's counters do not move) and no allocation (a counting global allocator in
//! this test binary). No warm-up: the very first scope on the thread is measured, since such a
//! scope takes no per-thread state at all.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use xen_vhost_mem::testing::{Guest as _, GuestSim};
use xen_vhost_mem::{RegionDescriptor, RegionKind, RegionTable, RequestMemory, XenRegion};

/// Counts allocations (alloc, alloc_zeroed, realloc) per thread, so the test harness's other
/// threads do not disturb the count.
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // Const-initialised and without destructor: no allocation or registration on access.
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

fn allocations() -> u64 {
    ALLOCS.with(Cell::get)
}

// SAFETY: every method forwards to the system allocator with the caller's arguments; counting
// touches only a thread-local `Cell`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded as received; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` came from this allocator, i.e. from `System`; forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn unix(gpa: u64, size: u64) -> RegionDescriptor {
    RegionDescriptor {
        guest_phys_addr: gpa,
        size,
        userspace_addr: 0x7f00_0000_0000 + gpa,
        mmap_offset: 0,
        kind: RegionKind::Unix,
    }
}

#[test]
fn scope_without_on_demand_regions_makes_no_syscall_and_no_allocation() {
    // Two UNIX regions and, so that the table has a Xen device whose counters can be
    // watched, a GRANT region mapped in advance.
    let sim = GuestSim::new(1, 16).expect("emulated guest");
    let granted = sim.grant(2, false).expect("grant");
    sim.write(&granted, 0, b"granted").expect("guest write");
    let grant_gpa = granted.gpa(0);
    let table = RegionTable::from_regions(vec![
        XenRegion::new(unix(0, 1 << 20), None, None).expect("unix region"),
        XenRegion::new(unix(1 << 30, 1 << 20), None, None).expect("unix region"),
        XenRegion::new(
            sim.in_advance_region(grant_gpa, 2 * 4096, 0x6000_0000),
            None,
            Some(&sim.dev),
        )
        .expect("grant region"),
    ])
    .expect("table");
    assert!(!table.has_on_demand());
    assert!(table.xen_device().is_some());
    let before = sim.dev.counters().snapshot();
    let data = [0x5au8; 4096];
    let mut back = [0u8; 4096];
    let buffers = [
        (GuestAddress(0x1000), 4096, Permissions::Read),
        (GuestAddress((1 << 30) + 0x2000), 4096, Permissions::Write),
    ];

    let allocs_before = allocations();
    let mut got = [0u8; 7];
    let (a, b, c, d);
    {
        let scope = RequestMemory::new(&table);
        scope.prefetch(&buffers).expect("prefetch");
        scope
            .write_slice(&data, GuestAddress(0x1000))
            .expect("write low");
        scope
            .write_obj(0xdead_beef_u64, GuestAddress((1 << 30) + 8))
            .expect("write high");
        scope
            .read_slice(&mut back, GuestAddress(0x1000))
            .expect("read low");
        a = scope
            .read_obj::<u64>(GuestAddress((1 << 30) + 8))
            .expect("read high");
        scope
            .read_slice(&mut got, GuestAddress(grant_gpa))
            .expect("read grant");
        b = scope.check_range(GuestAddress(0x1000), 4096, Permissions::Write);
        c = scope.held_pages();
        d = scope.live_mappings();
        scope.finish().expect("finish");
    }
    let allocs = allocations() - allocs_before;

    assert_eq!(
        allocs, 0,
        "allocations by a scope over memory mapped in advance"
    );
    assert_eq!(
        sim.dev.counters().snapshot(),
        before,
        "device calls by a scope over memory mapped in advance"
    );
    assert_eq!(back, data);
    assert_eq!(a, 0xdead_beef);
    assert_eq!(&got, b"granted");
    assert!(b);
    assert_eq!((c, d), (0, 0));
}
