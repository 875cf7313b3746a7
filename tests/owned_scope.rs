//! An owned request scope (`OwnedRequestMemory`) over on-demand grants (emulated Xen): made on
//! one thread, written on another, finished there; exact syscalls, real bytes, nothing left
//! mapped, and the table it holds outlives a swap.

mod common;

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};
use xen_vhost_mem::{OwnedRequestMemory, Strategy, WritableBuffers};

#[test]
fn owned_scope_crosses_threads_and_releases_everything() {
    for strategy in [Strategy::GrantCopy, Strategy::Map] {
        let g = common::granted_ring(256);
        let buf = g.sim.grant(1, false).expect("grant");
        let dev = g.sim.dev.clone();
        let table = Arc::new(g.table);
        let owned = OwnedRequestMemory::new(table.clone(), strategy, WritableBuffers::CopyIn);
        let before = dev.counters().snapshot();
        // The ring region is mapped in advance: what the scope maps comes on top.
        let ring_maps = (dev.counters().live_mappings(), g.sim.emu.live_mappings());
        let gpa = GuestAddress(buf.gpa(100));
        let t = std::thread::spawn(move || {
            owned
                .memory()
                .write_slice(b"held past serve", gpa)
                .expect("write through the owned scope");
            let live = owned.memory().live_mappings();
            owned.finish().expect("finish");
            live
        });
        let live_while_held = t.join().expect("thread");
        let used = dev.counters().snapshot().since(&before);
        match strategy {
            // Copy in (the first touch of a writable page) and copy back.
            Strategy::GrantCopy => {
                assert_eq!(live_while_held, 0);
                assert_eq!((used.grant_copies, used.syscalls()), (2, 2));
            }
            // MAP_GRANT_REF + mmap, munmap + UNMAP_GRANT_REF.
            _ => {
                assert_eq!(live_while_held, 1);
                assert_eq!(used.syscalls(), 4);
            }
        }
        let mut back = [0u8; 15];
        back.copy_from_slice(&g.sim.read(&buf, 100, 15).expect("guest read"));
        assert_eq!(&back, b"held past serve");
        assert_eq!(
            (dev.counters().live_mappings(), g.sim.emu.live_mappings()),
            ring_maps
        );
        // The scope gave its snapshot back.
        assert_eq!(Arc::strong_count(&table), 1);
    }
}

#[test]
fn dropped_owned_scope_releases_its_mappings() {
    let g = common::granted_ring(256);
    let buf = g.sim.grant(1, false).expect("grant");
    let dev = g.sim.dev.clone();
    let ring_maps = (dev.counters().live_mappings(), g.sim.emu.live_mappings());
    let owned = OwnedRequestMemory::new(Arc::new(g.table), Strategy::Map, WritableBuffers::CopyIn);
    owned
        .memory()
        .write_obj(7u32, GuestAddress(buf.gpa(0)))
        .expect("write");
    assert_eq!(dev.counters().live_mappings(), ring_maps.0 + 1);
    // The scope held the last reference to the table: its mapping and the ring's are gone.
    drop(owned);
    assert_eq!(
        (dev.counters().live_mappings(), g.sim.emu.live_mappings()),
        (0, 0)
    );
    assert_eq!(g.sim.read(&buf, 0, 4).expect("read"), 7u32.to_le_bytes());
}
