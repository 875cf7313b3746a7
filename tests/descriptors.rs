//! Table-driven validation of wire regions: every invalid combination is refused with the exact
//! error and its values; every valid one parses to the right kind and round-trips.

mod common;

use common::{wire, FLAG_FOREIGN, FLAG_GRANT, FLAG_NO_ADVANCE, FLAG_NO_ADVANCE_SPEC};
use xen_vhost_mem::xen_page::grant_addr;
use xen_vhost_mem::{DescriptorError, GrantMapping, RegionDescriptor, RegionKind, WireRegion};

struct Invalid {
    name: &'static str,
    wire: WireRegion,
    expected: DescriptorError,
}

/// A well-formed base: 2 pages at 1 MiB.
const GPA: u64 = 0x10_0000;
const SIZE: u64 = 0x2000;

fn invalid_cases() -> Vec<Invalid> {
    use DescriptorError::*;
    let grant_top = grant_addr(u32::MAX, 0);
    vec![
        Invalid {
            name: "unknown bit 0x4",
            wire: wire(GPA, SIZE, 0, 0, 0x4, 0),
            expected: UnknownFlags {
                flags: 0x4,
                unknown: 0x4,
            },
        },
        Invalid {
            name: "unknown bit 0x200 with GRANT",
            wire: wire(GPA, SIZE, 0, 0, FLAG_GRANT | 0x200, 1),
            expected: UnknownFlags {
                flags: 0x202,
                unknown: 0x200,
            },
        },
        Invalid {
            name: "unknown bit 0x8000_0000 with FOREIGN",
            wire: wire(GPA, SIZE, 0, 0, FLAG_FOREIGN | 0x8000_0000, 1),
            expected: UnknownFlags {
                flags: 0x8000_0001,
                unknown: 0x8000_0000,
            },
        },
        Invalid {
            name: "several unknown bits next to known ones",
            wire: wire(GPA, SIZE, 0, 0, 0xffff_ffff, 1),
            expected: UnknownFlags {
                flags: 0xffff_ffff,
                unknown: 0xffff_fef4,
            },
        },
        Invalid {
            name: "FOREIGN|GRANT",
            wire: wire(GPA, SIZE, 0, 0, FLAG_FOREIGN | FLAG_GRANT, 1),
            expected: ForeignAndGrant { flags: 0x3 },
        },
        Invalid {
            name: "FOREIGN|NO_ADVANCE (0x8)",
            wire: wire(GPA, SIZE, 0, 0, FLAG_FOREIGN | FLAG_NO_ADVANCE, 1),
            expected: ForeignNoAdvance { flags: 0x9 },
        },
        Invalid {
            name: "FOREIGN|NO_ADVANCE (0x100)",
            wire: wire(GPA, SIZE, 0, 0, FLAG_FOREIGN | FLAG_NO_ADVANCE_SPEC, 1),
            expected: ForeignNoAdvance { flags: 0x101 },
        },
        Invalid {
            name: "NO_ADVANCE (0x8) without GRANT",
            wire: wire(GPA, SIZE, 0, 0, FLAG_NO_ADVANCE, 1),
            expected: NoAdvanceWithoutGrant { flags: 0x8 },
        },
        Invalid {
            name: "NO_ADVANCE (0x100) without GRANT",
            wire: wire(GPA, SIZE, 0, 0, FLAG_NO_ADVANCE_SPEC, 0),
            expected: NoAdvanceWithoutGrant { flags: 0x100 },
        },
        Invalid {
            name: "zero size UNIX",
            wire: wire(GPA, 0, 0, 0, 0, 0),
            expected: ZeroSize { gpa: GPA },
        },
        Invalid {
            name: "zero size on-demand GRANT",
            wire: wire(
                grant_addr(8, 0x10),
                0,
                0,
                0,
                FLAG_GRANT | FLAG_NO_ADVANCE,
                1,
            ),
            expected: ZeroSize {
                gpa: grant_addr(8, 0x10),
            },
        },
        Invalid {
            name: "gpa + size overflows",
            wire: wire(u64::MAX - 0xfff, 0x1001, 0, 0, 0, 0),
            expected: GpaOverflow {
                gpa: u64::MAX - 0xfff,
                size: 0x1001,
            },
        },
        Invalid {
            name: "userspace_addr + size overflows",
            wire: wire(GPA, SIZE, u64::MAX - 0x800, 0, 0, 0),
            expected: UserspaceAddrOverflow {
                addr: u64::MAX - 0x800,
                size: SIZE,
            },
        },
        Invalid {
            name: "mmap_offset + size overflows (UNIX)",
            wire: wire(GPA, SIZE, 0, u64::MAX - 0x800, 0, 0),
            expected: MmapOffsetOverflow {
                offset: u64::MAX - 0x800,
                size: SIZE,
            },
        },
        Invalid {
            name: "nonzero mmap_offset on FOREIGN",
            wire: wire(GPA, SIZE, 0, 0x1000, FLAG_FOREIGN, 1),
            expected: XenMmapOffset {
                kind: "FOREIGN",
                offset: 0x1000,
            },
        },
        Invalid {
            name: "nonzero mmap_offset on GRANT (in advance)",
            wire: wire(
                grant_addr(8, 0),
                SIZE,
                0x7f00_0000_0000,
                0x10,
                FLAG_GRANT,
                1,
            ),
            expected: XenMmapOffset {
                kind: "GRANT",
                offset: 0x10,
            },
        },
        Invalid {
            name: "nonzero mmap_offset on GRANT (on demand)",
            wire: wire(
                grant_addr(8, 0),
                SIZE,
                0,
                0x2000,
                FLAG_GRANT | FLAG_NO_ADVANCE,
                1,
            ),
            expected: XenMmapOffset {
                kind: "GRANT",
                offset: 0x2000,
            },
        },
        Invalid {
            name: "domid 0x7FF0 (DOMID_FIRST_RESERVED) on FOREIGN",
            wire: wire(GPA, SIZE, 0, 0, FLAG_FOREIGN, 0x7FF0),
            expected: DomidOutOfRange { domid: 0x7FF0 },
        },
        Invalid {
            name: "domid 0xFFFF on GRANT",
            wire: wire(grant_addr(8, 0), SIZE, 0, 0, FLAG_GRANT, 0xFFFF),
            expected: DomidOutOfRange { domid: 0xFFFF },
        },
        Invalid {
            // Truncating to u16 would give domid 0 (dom0 itself).
            name: "domid 0x1_0000 on on-demand GRANT (would truncate to 0)",
            wire: wire(
                grant_addr(8, 0),
                SIZE,
                0,
                0,
                FLAG_GRANT | FLAG_NO_ADVANCE,
                0x1_0000,
            ),
            expected: DomidOutOfRange { domid: 0x1_0000 },
        },
        Invalid {
            name: "domid 0x1_0001 on FOREIGN (would truncate to 1)",
            wire: wire(GPA, SIZE, 0, 0, FLAG_FOREIGN, 0x1_0001),
            expected: DomidOutOfRange { domid: 0x1_0001 },
        },
        Invalid {
            name: "xen_mmap_data on a UNIX region",
            wire: wire(GPA, SIZE, 0, 0, 0, 1),
            expected: DataWithoutXen { data: 1 },
        },
        Invalid {
            name: "in-advance grant one byte past ref u32::MAX",
            wire: wire(grant_top, 0x1001, 0, 0, FLAG_GRANT, 1),
            expected: GrantRefOverflow {
                gpa: grant_top,
                size: 0x1001,
            },
        },
        Invalid {
            // 1 TiB mapped in advance would mean 2^28 refs in one gntdev map (and a vector of
            // them): refused up front.
            name: "in-advance grant of more pages than one gntdev map holds",
            wire: wire(grant_addr(8, 0), 1 << 40, 0, 0, FLAG_GRANT, 1),
            expected: TooManyGrantPages {
                gpa: grant_addr(8, 0),
                size: 1 << 40,
                pages: 1 << 28,
                max: xen_vhost_mem::descriptor::MAX_IN_ADVANCE_GRANT_PAGES,
            },
        },
        Invalid {
            name: "mid-page in-advance grant crossing past ref u32::MAX",
            wire: wire(grant_addr(u32::MAX, 0xff0), 0x20, 0, 0, FLAG_GRANT, 1),
            expected: GrantRefOverflow {
                gpa: grant_addr(u32::MAX, 0xff0),
                size: 0x20,
            },
        },
        Invalid {
            name: "size > isize::MAX",
            wire: wire(0, isize::MAX as u64 + 1, 0, 0, 0, 0),
            expected: TooLarge {
                size: isize::MAX as u64 + 1,
            },
        },
        Invalid {
            name: "size > isize::MAX on an on-demand grant region",
            wire: wire(1 << 63, 1 << 63, 0, 0, FLAG_GRANT | FLAG_NO_ADVANCE, 1),
            expected: TooLarge { size: 1 << 63 },
        },
    ]
}

#[test]
fn invalid_wire_regions_are_refused_with_the_exact_error() {
    let cases = invalid_cases();
    assert!(cases.len() >= 18, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        match RegionDescriptor::from_wire(&c.wire) {
            Err(e) if e == c.expected => {
                // The message names the offending value too.
                assert!(!e.to_string().is_empty());
            }
            other => failures.push(format!(
                "{}: expected Err({:?}), got {:?}",
                c.name, c.expected, other
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn error_messages_name_the_offending_values() {
    let e = RegionDescriptor::from_wire(&wire(GPA, SIZE, 0, 0, 0x200, 0)).unwrap_err();
    assert!(e.to_string().contains("0x200"), "{e}");
    let e =
        RegionDescriptor::from_wire(&wire(GPA, SIZE, 0, 0, FLAG_FOREIGN, 0x1_0000)).unwrap_err();
    assert!(e.to_string().contains("0x10000"), "{e}");
    let e = RegionDescriptor::from_wire(&wire(GPA, SIZE, 0, 0x1000, FLAG_FOREIGN, 1)).unwrap_err();
    assert!(
        e.to_string().contains("FOREIGN") && e.to_string().contains("0x1000"),
        "{e}"
    );
}

struct Valid {
    name: &'static str,
    wire: WireRegion,
    kind: RegionKind,
}

fn valid_cases() -> Vec<Valid> {
    let on_demand = GrantMapping::OnDemand;
    let top_gpa = (1u64 << 63) | 0x10000;
    vec![
        Valid {
            name: "UNIX at a nonzero mmap_offset",
            wire: wire(GPA, SIZE, 0x7f00_0000_0000, 0x3000, 0, 0),
            kind: RegionKind::Unix,
        },
        Valid {
            name: "FOREIGN",
            wire: wire(GPA, SIZE, 0x7f00_0010_0000, 0, FLAG_FOREIGN, 1),
            kind: RegionKind::Foreign { domid: 1 },
        },
        Valid {
            name: "FOREIGN of dom0",
            wire: wire(GPA, SIZE, 0, 0, FLAG_FOREIGN, 0),
            kind: RegionKind::Foreign { domid: 0 },
        },
        Valid {
            name: "GRANT in advance",
            wire: wire(grant_addr(8, 0), SIZE, 0x7f00_0020_0000, 0, FLAG_GRANT, 1),
            kind: RegionKind::Grant {
                domid: 1,
                mapping: GrantMapping::InAdvance,
            },
        },
        Valid {
            name: "GRANT on demand (0x8)",
            wire: wire(
                grant_addr(0x100, 0),
                SIZE,
                0,
                0,
                FLAG_GRANT | FLAG_NO_ADVANCE,
                1,
            ),
            kind: RegionKind::Grant {
                domid: 1,
                mapping: on_demand,
            },
        },
        Valid {
            name: "GRANT on demand (0x100)",
            wire: wire(
                grant_addr(0x100, 0),
                SIZE,
                0,
                0,
                FLAG_GRANT | FLAG_NO_ADVANCE_SPEC,
                1,
            ),
            kind: RegionKind::Grant {
                domid: 1,
                mapping: on_demand,
            },
        },
        Valid {
            name: "GRANT on demand (0x8 | 0x100)",
            wire: wire(
                grant_addr(0x100, 0),
                SIZE,
                0,
                0,
                FLAG_GRANT | FLAG_NO_ADVANCE | FLAG_NO_ADVANCE_SPEC,
                1,
            ),
            kind: RegionKind::Grant {
                domid: 1,
                mapping: on_demand,
            },
        },
        Valid {
            name: "mid-page ring region, odd size, no alignment demanded",
            wire: wire(
                0x8000_0000_0000_b840,
                0x1002,
                0x7f00_0030_0840,
                0,
                FLAG_GRANT,
                1,
            ),
            kind: RegionKind::Grant {
                domid: 1,
                mapping: GrantMapping::InAdvance,
            },
        },
        Valid {
            name: "on-demand region reaching the top of the address space",
            wire: wire(
                top_gpa,
                u64::MAX - top_gpa + 1,
                0,
                0,
                FLAG_GRANT | FLAG_NO_ADVANCE,
                1,
            ),
            kind: RegionKind::Grant {
                domid: 1,
                mapping: on_demand,
            },
        },
        Valid {
            name: "in-advance grant ending exactly at the last byte of ref u32::MAX",
            wire: wire(grant_addr(u32::MAX - 1, 0x800), 0x1800, 0, 0, FLAG_GRANT, 1),
            kind: RegionKind::Grant {
                domid: 1,
                mapping: GrantMapping::InAdvance,
            },
        },
        Valid {
            name: "domid 0x7FEF (the largest) on GRANT",
            wire: wire(grant_addr(8, 0), SIZE, 0, 0, FLAG_GRANT, 0x7FEF),
            kind: RegionKind::Grant {
                domid: 0x7FEF,
                mapping: GrantMapping::InAdvance,
            },
        },
        Valid {
            name: "domid 0x7FEF (the largest) on FOREIGN",
            wire: wire(GPA, SIZE, 0, 0, FLAG_FOREIGN, 0x7FEF),
            kind: RegionKind::Foreign { domid: 0x7FEF },
        },
        Valid {
            name: "one-byte region at the last address",
            wire: wire(u64::MAX, 1, 0, 0, 0, 0),
            kind: RegionKind::Unix,
        },
    ]
}

#[test]
fn valid_wire_regions_parse_to_their_kind_and_keep_their_fields() {
    let mut failures = Vec::new();
    for c in valid_cases() {
        match RegionDescriptor::from_wire(&c.wire) {
            Ok(d) => {
                let want = RegionDescriptor {
                    guest_phys_addr: c.wire.guest_phys_addr,
                    size: c.wire.memory_size,
                    userspace_addr: c.wire.userspace_addr,
                    mmap_offset: c.wire.mmap_offset,
                    kind: c.kind,
                };
                if d != want {
                    failures.push(format!("{}: got {d:?}, want {want:?}", c.name));
                }
                let last = c.wire.guest_phys_addr + (c.wire.memory_size - 1);
                if d.last_addr() != last {
                    failures.push(format!(
                        "{}: last_addr {:#x} != {last:#x}",
                        c.name,
                        d.last_addr()
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: refused with {e:?}", c.name)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn mid_page_ring_region_keeps_its_exact_gpa_and_size() {
    let d = RegionDescriptor::from_wire(&wire(
        0x8000_0000_0000_b840,
        0x1002,
        0x7f00_0030_0840,
        0,
        FLAG_GRANT,
        1,
    ))
    .unwrap();
    assert_eq!(d.guest_phys_addr, 0x8000_0000_0000_b840);
    assert_eq!(d.size, 0x1002);
    assert_eq!(d.last_addr(), 0x8000_0000_0000_c841);
}

#[test]
fn top_of_address_space_on_demand_region_ends_at_u64_max() {
    let gpa = (1u64 << 63) | 0x10000;
    let size = u64::MAX - gpa + 1;
    let d = RegionDescriptor::from_wire(&wire(gpa, size, 0, 0, FLAG_GRANT | FLAG_NO_ADVANCE, 1))
        .unwrap();
    assert_eq!(d.last_addr(), u64::MAX);
    assert_eq!(
        d.kind,
        RegionKind::Grant {
            domid: 1,
            mapping: GrantMapping::OnDemand
        }
    );
    // The same range mapped in advance would need refs far past u32::MAX.
    assert_eq!(
        RegionDescriptor::from_wire(&wire(gpa, size, 0, 0, FLAG_GRANT, 1)),
        Err(DescriptorError::GrantRefOverflow { gpa, size })
    );
}

#[test]
fn to_wire_emits_0x8_for_on_demand_and_round_trips() {
    for flags in [
        FLAG_GRANT | FLAG_NO_ADVANCE,
        FLAG_GRANT | FLAG_NO_ADVANCE_SPEC,
    ] {
        let w = wire(grant_addr(0x20, 0), 0x3000, 0, 0, flags, 5);
        let d = RegionDescriptor::from_wire(&w).unwrap();
        let back = d.to_wire();
        assert_eq!(back.xen_mmap_flags, 0x2 | 0x8, "flags {flags:#x}");
        assert_eq!(back, wire(grant_addr(0x20, 0), 0x3000, 0, 0, 0xa, 5));
        assert_eq!(RegionDescriptor::from_wire(&back), Ok(d));
    }
    // Every valid case round-trips through its wire form.
    for c in valid_cases() {
        let d = RegionDescriptor::from_wire(&c.wire).unwrap();
        let back = d.to_wire();
        assert_eq!(RegionDescriptor::from_wire(&back), Ok(d), "{}", c.name);
        assert_eq!(back.guest_phys_addr, c.wire.guest_phys_addr, "{}", c.name);
        assert_eq!(back.memory_size, c.wire.memory_size, "{}", c.name);
        assert_eq!(back.userspace_addr, c.wire.userspace_addr, "{}", c.name);
        assert_eq!(back.mmap_offset, c.wire.mmap_offset, "{}", c.name);
        assert_eq!(back.xen_mmap_data, c.wire.xen_mmap_data, "{}", c.name);
        let expect_flags = match c.kind {
            RegionKind::Unix => 0,
            RegionKind::Foreign { .. } => 0x1,
            RegionKind::Grant {
                mapping: GrantMapping::InAdvance,
                ..
            } => 0x2,
            RegionKind::Grant {
                mapping: GrantMapping::OnDemand,
                ..
            } => 0xa,
        };
        assert_eq!(back.xen_mmap_flags, expect_flags, "{}", c.name);
    }
}

/// An in-advance grant region whose gpa lacks the grant bit but whose end crosses into it: its
/// first page would be ref `0x7_FFFF_FFFF_FFFF`, which does not fit a u32 grant ref.
/// Checking only the *last* page's ref would pass it (`frame_of(last)` strips bit 63, so it is
/// 0) and the mapping would truncate the refs.
#[test]
fn in_advance_grant_crossing_bit_63_is_refused() {
    let gpa = 0x7FFF_FFFF_FFFF_F000;
    assert_eq!(
        RegionDescriptor::from_wire(&wire(gpa, 0x2000, 0, 0, FLAG_GRANT, 1)),
        Err(DescriptorError::GrantRefOverflow { gpa, size: 0x2000 })
    );
}

/// An in-advance GRANT region whose range crosses the grant-address bit looked like one page
/// by its frame numbers (the marker bit dropped) while the mapper counts pages from its size:
/// the fuzzer's `regions` target made it collect refs until 2 GiB ran out. Refused now.
#[test]
fn in_advance_grant_region_crossing_the_grant_address_bit_is_refused() {
    let (gpa, size) = (0xfffu64, isize::MAX as u64);
    assert_eq!(
        RegionDescriptor::from_wire(&wire(gpa, size, 0, 0, FLAG_GRANT, 1)),
        Err(DescriptorError::GrantRefOverflow { gpa, size })
    );
}
