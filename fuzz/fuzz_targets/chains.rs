//! Descriptor chains over emulated on-demand grant memory through `RequestMemory`: a random
//! split ring (in an in-advance grant region), random descriptors (addresses in and beyond the
//! granted set, raw addresses, any length and flags), indirect tables written into on-demand
//! pages, read-only and revoked grants (before the request and between prefetch and the
//! device's accesses), failing grant-copy ioctls, every `Strategy` and `WritableBuffers` mode.
//! The device reads and writes every chain as a device would. After every input nothing but
//! the ring is mapped, and nothing at all once the table is dropped.
#![no_main]

use std::io::{Read, Write};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use xen_vhost_mem::testing::{Guest as _, GuestBuffer, GuestSim};
use xen_vhost_mem::{RegionTable, RequestMemory, Strategy, WritableBuffers, XenRegion};

const QSIZE: u16 = 16;
/// Pages granted for buffers (one grant each, so each can be read-only or revoked).
const POOL: usize = 16;
/// Pages the on-demand region covers past the ring: more than the pool (ungranted refs).
const REGION_PAGES: u64 = 24;
/// Most bytes the device writes per chain.
const MAX_WRITE: usize = 64 * 1024;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    /// Byte `off` of pool page `page` (page >= POOL: ungranted refs inside the region).
    Pool { page: u8, off: u16 },
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct D {
    addr: Addr,
    len: u32,
    small_len: Option<u16>,
    flags: u16,
    next: u16,
}

#[derive(Arbitrary, Debug)]
struct Indirect {
    page: u8,
    off: u16,
    descs: Vec<D>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    strategy: u8,
    threshold: u16,
    overwrite: bool,
    ro_mask: u16,
    revoke_mask: u16,
    revoke_mid: u16,
    prefetch: bool,
    fail_copies: u8,
    descs: Vec<D>,
    heads: Vec<u8>,
    indirect: Vec<Indirect>,
    fill: u8,
    /// Direct accesses after the chains: (addr, len, write).
    direct: Vec<(Addr, u16, bool)>,
}

fn gpa(pool: &[GuestBuffer], a: Addr) -> u64 {
    match a {
        Addr::Pool { page, off } => {
            let first = pool[0];
            let mut b = first;
            b.first_ref = first.first_ref + u32::from(page) % REGION_PAGES as u32;
            b.gpa(usize::from(off % 4096))
        }
        Addr::Raw(v) => v,
    }
}

fn raw(pool: &[GuestBuffer], d: &D) -> RawDescriptor {
    let len = d.small_len.map_or(d.len, |l| u32::from(l % 8200));
    RawDescriptor::from(SplitDescriptor::new(
        gpa(pool, d.addr),
        len,
        d.flags,
        d.next,
    ))
}

fuzz_target!(|inp: Input| {
    let sim = GuestSim::new(1, 64).expect("emulation");
    let ring = sim.grant(2, false).expect("ring");
    let pool: Vec<GuestBuffer> = (0..POOL)
        .map(|i| sim.grant(1, inp.ro_mask & (1 << i) != 0).expect("grant"))
        .collect();
    for (i, b) in pool.iter().enumerate() {
        assert_eq!(b.first_ref, ring.first_ref + 2 + i as u32, "consecutive refs");
        let _ = sim.write(b, 0, &[inp.fill ^ i as u8; 4096]);
    }
    let table = RegionTable::from_regions(vec![
        XenRegion::new(
            sim.in_advance_region(ring.gpa(0), 8192, 0x7000_0000),
            None,
            Some(&sim.dev),
        )
        .expect("ring region"),
        XenRegion::new(
            sim.on_demand_region(ring.first_ref + 2, REGION_PAGES),
            None,
            Some(&sim.dev),
        )
        .expect("on-demand region"),
    ])
    .expect("table");

    // The ring: descriptors as given, heads in the avail ring.
    let q = MockSplitQueue::create(&table, GuestAddress(ring.gpa(0)), QSIZE);
    for (i, d) in inp.descs.iter().take(QSIZE as usize).enumerate() {
        q.desc_table().store(i as u16, raw(&pool, d)).expect("store");
    }
    let heads: Vec<u16> = inp
        .heads
        .iter()
        .take(8)
        .map(|h| u16::from(*h) % (QSIZE + 2))
        .collect();
    for (i, h) in heads.iter().enumerate() {
        q.avail()
            .ring()
            .ref_at(i)
            .expect("avail slot")
            .store(h.to_le());
    }
    q.avail().idx().store((heads.len() as u16).to_le());
    // Indirect tables, written by the guest into on-demand pages.
    for t in inp.indirect.iter().take(3) {
        let b = pool[usize::from(t.page) % POOL];
        let off = usize::from(t.off % 4096);
        let bytes: Vec<u8> = t
            .descs
            .iter()
            .take(300)
            .flat_map(|d| {
                let r = SplitDescriptor::from(raw(&pool, d));
                let mut v = r.addr().0.to_le_bytes().to_vec();
                v.extend_from_slice(&r.len().to_le_bytes());
                v.extend_from_slice(&r.flags().to_le_bytes());
                v.extend_from_slice(&r.next().to_le_bytes());
                v
            })
            .collect();
        let n = bytes.len().min(4096 - off);
        let _ = sim.write(&b, off, &bytes[..n]);
    }
    for (i, b) in pool.iter().enumerate() {
        if inp.revoke_mask & (1 << i) != 0 {
            let _ = sim.end_access(b);
        }
    }

    let strategy = match inp.strategy % 3 {
        0 => Strategy::GrantCopy,
        1 => Strategy::Map,
        _ => Strategy::Auto {
            map_threshold: usize::from(inp.threshold),
        },
    };
    let mode = if inp.overwrite {
        WritableBuffers::Overwrite
    } else {
        WritableBuffers::CopyIn
    };
    sim.emu.fail_grant_copies(u32::from(inp.fail_copies % 4));
    let mut queue: Queue = q.create_queue().expect("queue");
    {
        let mem = RequestMemory::with_strategy(&table, strategy).writable_buffers(mode);
        let chains: Vec<_> = std::iter::from_fn(|| queue.pop_descriptor_chain(&mem))
            .take(8)
            .collect();
        if inp.prefetch {
            let _ = mem.prefetch_chains(&chains);
        }
        for (i, b) in pool.iter().enumerate() {
            if inp.revoke_mid & (1 << i) != 0 {
                let _ = sim.end_access(b);
            }
        }
        let data = vec![inp.fill; MAX_WRITE];
        for c in &chains {
            // Walk it (bounded by virtio-queue's TTL).
            let _ = c.clone().count();
            if let Ok(mut r) = Reader::new(&mem, c.clone()) {
                let mut sink = vec![0u8; MAX_WRITE];
                let _ = r.read(&mut sink);
            }
            if let Ok(mut w) = Writer::new(&mem, c.clone()) {
                let n = w.available_bytes().min(MAX_WRITE);
                let _ = w.write_all(&data[..n]);
            }
        }
        for &(a, len, write) in inp.direct.iter().take(8) {
            let addr = GuestAddress(gpa(&pool, a));
            let len = usize::from(len);
            let _ = mem.check_range(addr, len, Permissions::Read);
            if write {
                let _ = mem.write_slice(&data[..len.min(MAX_WRITE)], addr);
            } else {
                let mut buf = vec![0u8; len];
                let _ = mem.read_slice(&mut buf, addr);
            }
        }
        let _ = mem.finish();
    }
    // Only the ring's own mapping lives past the request.
    assert_eq!(sim.emu.live_mappings(), 1, "emulation live mappings");
    assert_eq!(sim.emu.live_grant_maps(), 1, "emulation grant maps");
    assert_eq!(sim.dev.counters().live_mappings(), 1, "counted live mappings");
    drop(q);
    drop(table);
    sim.assert_nothing_mapped();
});
