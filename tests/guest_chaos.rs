//! Whatever a guest puts in its descriptors — any address, any length, refs it never granted,
//! read-only grants written, buffers across region ends — request-scoped memory answers with
//! data or an error value, never a panic, and nothing stays mapped. Random but reproducible:
//! a fixed-seed xorshift drives every choice.

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use xen_vhost_mem::testing::{Guest as _, GuestSim};
use xen_vhost_mem::xen_page::grant_addr;
use xen_vhost_mem::{RegionTable, RequestMemory, Strategy, WritableBuffers, XenRegion};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn random_guest_accesses_never_panic_and_never_leak() {
    let sim = GuestSim::new(3, 4096).unwrap();
    let ring = sim.grant(1, false).unwrap();
    // Granted pages, some read-only, with holes of never-granted refs between them.
    let mut granted = Vec::new();
    for i in 0..40 {
        let b = sim.grant(1 + (i % 3), i % 4 == 0).unwrap();
        sim.write(&b, 0, &[i as u8; 16]).unwrap();
        granted.push(b);
    }
    let first = ring.first_ref + 1;
    let table = RegionTable::from_regions(vec![
        XenRegion::new(
            sim.in_advance_region(ring.gpa(0x100), 0x800, 0x1000),
            None,
            Some(&sim.dev),
        )
        .unwrap(),
        XenRegion::new(sim.on_demand_region(first, 256), None, Some(&sim.dev)).unwrap(),
    ])
    .unwrap();
    let strategies = [
        Strategy::GrantCopy,
        Strategy::Map,
        Strategy::Auto {
            map_threshold: 8192,
        },
    ];
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
    let mut rng = Rng(seed);
    let (mut ok, mut err) = (0u32, 0u32);
    for round in 0..300 {
        let strategy = strategies[round % 3];
        let writable = if round % 2 == 0 {
            WritableBuffers::CopyIn
        } else {
            WritableBuffers::Overwrite
        };
        let mem = RequestMemory::with_strategy(&table, strategy).writable_buffers(writable);
        let mut bufs = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let addr = match rng.below(5) {
                // Somewhere in the granted area (granted or not, any offset).
                0 | 1 => grant_addr(first + rng.below(120) as u32, rng.below(4096)),
                // Anywhere near the ring region, inside or just outside.
                2 => ring.gpa(0) + rng.below(0x1000),
                // The far end of the on-demand region and beyond.
                3 => grant_addr(first + 250 + rng.below(12) as u32, rng.below(4096)),
                // Any address at all.
                _ => rng.next(),
            };
            let len = match rng.below(4) {
                0 => rng.below(32) as usize,
                1 => rng.below(3 * 4096) as usize,
                2 => rng.below(1 << 20) as usize,
                _ => rng.next() as usize,
            };
            let access = if rng.below(2) == 0 {
                Permissions::Read
            } else {
                Permissions::Write
            };
            bufs.push((GuestAddress(addr), len, access));
        }
        if rng.below(2) == 0 {
            let _ = mem.prefetch(&bufs);
        }
        for &(addr, len, access) in &bufs {
            let _ = mem.check_range(addr, len, access);
            match mem.get_slices(addr, len.min(1 << 20), access) {
                Ok(it) => {
                    for s in it {
                        match s {
                            Ok(s) if access == Permissions::Write => {
                                s.write_slice(&[0xee; 8][..s.len().min(8)], 0).unwrap();
                                ok += 1;
                            }
                            Ok(_) => ok += 1,
                            Err(_) => {
                                err += 1;
                                break;
                            }
                        }
                    }
                }
                Err(_) => err += 1,
            }
            let mut small = [0u8; 16];
            match mem.read_slice(&mut small, addr) {
                Ok(()) => ok += 1,
                Err(_) => err += 1,
            }
        }
        // Errors at the end of the scope are values too.
        let _ = mem.finish();
        // Only the ring region's own mapping may outlive a scope.
        assert_eq!(sim.dev.counters().live_mappings(), 1, "round {round}");
        assert_eq!(sim.emu.live_grant_maps(), 1, "round {round}");
    }
    eprintln!("seed {seed:#x}: {ok} slices and reads served, {err} errors");
    // The mix really exercised both outcomes.
    assert!(ok > 100 && err > 100, "ok {ok}, errors {err}");
    drop(table);
    assert_eq!(sim.emu.live_mappings(), 0);
}

/// Any 40 bytes a frontend sends as a region parse to a descriptor or an error, and every
/// descriptor accepted keeps the invariants the layers above rely on.
#[test]
fn random_wire_regions_parse_or_fail_cleanly() {
    use xen_vhost_mem::{RegionDescriptor, RegionKind, WireRegion};
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut accepted = 0;
    for _ in 0..200_000 {
        // Mostly plausible values, sometimes anything.
        let small = |r: &mut Rng| {
            if r.below(2) == 0 {
                r.below(1 << 24)
            } else {
                r.next()
            }
        };
        let w = WireRegion {
            guest_phys_addr: small(&mut rng) | (rng.below(2) << 63),
            memory_size: small(&mut rng),
            userspace_addr: small(&mut rng),
            mmap_offset: if rng.below(3) == 0 {
                small(&mut rng)
            } else {
                0
            },
            xen_mmap_flags: if rng.below(4) == 0 {
                rng.next() as u32
            } else {
                [0, 1, 2, 0xa, 0x102, 9, 3][rng.below(7) as usize]
            },
            xen_mmap_data: if rng.below(4) == 0 {
                rng.next() as u32
            } else {
                rng.below(0x8000) as u32
            },
        };
        if let Ok(d) = RegionDescriptor::from_wire(&w) {
            accepted += 1;
            assert!(d.size > 0);
            assert!(d.guest_phys_addr.checked_add(d.size - 1).is_some());
            assert!(d.userspace_addr.checked_add(d.size).is_some());
            if let RegionKind::Foreign { domid } | RegionKind::Grant { domid, .. } = d.kind {
                assert!(u32::from(domid) <= 0x7FEF && u32::from(domid) == w.xen_mmap_data);
                assert_eq!(d.mmap_offset, 0);
            }
            assert_eq!(d.check(), Ok(()));
        }
    }
    assert!(accepted > 10_000, "only {accepted} accepted");
}
