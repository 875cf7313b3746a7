//! The in-advance fast path keeps behaviour: the request scope's slice iterator over a table
//! without on-demand regions yields what the table's own (vm-memory's) iterator yields; over
//! on-demand regions its slices stay right when iterators interleave or are dropped half-way,
//! however many accesses a scope makes; regions built with one file-length lookup per file
//! are refused past the end of their file as with a lookup each.

use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, Permissions};
use xen_vhost_mem::testing::{Guest as _, GuestSim};
use xen_vhost_mem::{RegionDescriptor, RegionKind, RegionTable, RequestMemory, XenRegion};

fn unix(gpa: u64, size: u64) -> XenRegion {
    let desc = RegionDescriptor {
        guest_phys_addr: gpa,
        size,
        userspace_addr: 0x7f00_0000_0000 + (gpa & 0xffff_ffff),
        mmap_offset: 0,
        kind: RegionKind::Unix,
    };
    XenRegion::new(desc, None, None).expect("unix region")
}

/// (length, error) of each item.
fn shape<'a, I>(it: I) -> Vec<Result<usize, String>>
where
    I: Iterator<Item = vm_memory::guest_memory::Result<vm_memory::VolatileSlice<'a>>>,
{
    it.map(|r| r.map(|s| s.len()).map_err(|e| format!("{e:?}")))
        .collect()
}

#[test]
fn direct_slices_match_the_tables_own() {
    // Adjacent, gapped and last-before-the-top regions.
    let top = u64::MAX - 0xfff;
    let table = RegionTable::from_regions(vec![
        unix(0, 0x1000),
        unix(0x1000, 0x2000),
        unix(0x10000, 0x1000),
        unix(top, 0x1000),
    ])
    .expect("table");
    let scope = RequestMemory::new(&table);
    let cases: [(u64, usize); 9] = [
        (0, 0),
        (0x10, 8),
        (0xff8, 16),
        (0, 0x3000),
        (0x800, 0x3000),
        (0x2f00, 0x1000),
        (0x8000, 4),
        (0x10ff0, 0x20),
        (top + 0x10, 0x100),
    ];
    for (addr, len) in cases {
        let a = GuestAddress(addr);
        let ours = shape(
            scope
                .get_slices(a, len, Permissions::Read)
                .expect("get_slices"),
        );
        let theirs = shape(GuestMemoryBackend::get_slices(&table, a, len));
        assert_eq!(ours, theirs, "{addr:#x}+{len:#x}");
        // stop_on_error: an error first is returned, later ones end the slices.
        let ours = scope
            .get_slices(a, len, Permissions::Read)
            .expect("get_slices")
            .stop_on_error()
            .map(|it| it.map(|s| s.len()).collect::<Vec<_>>())
            .map_err(|e| format!("{e:?}"));
        let theirs = GuestMemoryBackend::get_slices(&table, a, len)
            .stop_on_error()
            .map(|it| it.map(|s| s.len()).collect::<Vec<_>>())
            .map_err(|e| format!("{e:?}"));
        assert_eq!(ours, theirs, "stop_on_error {addr:#x}+{len:#x}");
    }
    // Past the top of the address space: the last slice, then the overflow error, as the
    // collected path has always reported it.
    let over = shape(
        scope
            .get_slices(GuestAddress(top + 0xff0), 0x20, Permissions::Read)
            .expect("get_slices"),
    );
    assert_eq!(
        over,
        vec![
            Ok(0x10),
            Err(format!(
                "{:?}",
                vm_memory::GuestMemoryError::GuestAddressOverflow
            ))
        ]
    );
    // Exhausted stays exhausted.
    let mut it = scope
        .get_slices(GuestAddress(0x8000), 4, Permissions::Read)
        .expect("get_slices");
    assert!(matches!(it.next(), Some(Err(_))));
    assert!(it.next().is_none());
    assert!(it.next().is_none());
    drop(it);
    scope.finish().expect("finish");
}

#[test]
fn on_demand_slices_survive_interleaving_and_early_drops() {
    let sim = GuestSim::new(1, 64).expect("emulated guest");
    let buf = sim.grant(4, false).expect("grant");
    let bytes: Vec<u8> = (0..4 * 4096).map(|i| (i % 251) as u8).collect();
    sim.write(&buf, 0, &bytes).expect("guest write");
    let od = sim.on_demand_region(buf.first_ref, 4);
    let table = RegionTable::from_regions(vec![
        XenRegion::new(od, None, Some(&sim.dev)).expect("region")
    ])
    .expect("table");
    let base = buf.gpa(0);
    let scope = RequestMemory::new(&table);
    // Two iterators over three pages each, taken in turns.
    let mut a = scope
        .get_slices(GuestAddress(base + 100), 3 * 4096, Permissions::Read)
        .expect("get_slices");
    let mut b = scope
        .get_slices(
            GuestAddress(base + 4096 + 7),
            3 * 4096 - 7,
            Permissions::Read,
        )
        .expect("get_slices");
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    loop {
        let (x, y) = (a.next(), b.next());
        if x.is_none() && y.is_none() {
            break;
        }
        for (s, got) in [(x, &mut got_a), (y, &mut got_b)] {
            if let Some(s) = s {
                let s = s.expect("slice");
                let mut v = vec![0u8; s.len()];
                s.copy_to(&mut v[..]);
                got.extend(v);
            }
        }
    }
    assert_eq!(got_a, bytes[100..100 + 3 * 4096]);
    assert_eq!(got_b, bytes[4096 + 7..]);
    drop((a, b));
    // Many accesses, most dropped after their first slice (as `load` does), then whole reads.
    for i in 0..20_000u64 {
        let off = (i * 61) % (3 * 4096);
        let mut it = scope
            .get_slices(GuestAddress(base + off), 4096, Permissions::Read)
            .expect("get_slices");
        let first = it.next().expect("a slice").expect("no error");
        assert_eq!(first.len(), (4096 - off as usize % 4096).min(4096));
    }
    let mut all = vec![0u8; 4 * 4096];
    scope
        .read_slice(&mut all, GuestAddress(base))
        .expect("read");
    assert_eq!(all, bytes);
    // An error after slices: the slices, then the error, then nothing.
    let items = shape(
        scope
            .get_slices(GuestAddress(base + 3 * 4096), 2 * 4096, Permissions::Read)
            .expect("get_slices"),
    );
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0], Ok(4096));
    assert!(items[1].is_err(), "{items:?}");
    scope.finish().expect("finish");
    sim.assert_nothing_mapped();
}

fn memfd(len: u64) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fast-path".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor nobody else owns.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).expect("set_len");
    f
}

#[test]
fn file_lengths_looked_up_once_still_refuse_regions_past_the_end() {
    use xen_vhost_mem::backend::BackendError;
    use xen_vhost_mem::region::RegionError;
    use xen_vhost_mem::FileLengths;
    let (a, b) = (memfd(0x4000), memfd(0x1000));
    let mut files = FileLengths::new();
    let desc = |gpa: u64, size: u64, offset: u64| RegionDescriptor {
        guest_phys_addr: gpa,
        size,
        userspace_addr: 0x7f00_0000_0000 + gpa,
        mmap_offset: offset,
        kind: RegionKind::Unix,
    };
    let r0 =
        XenRegion::new_with_files(desc(0, 0x2000, 0), Some(&a), None, &mut files).expect("fits");
    let r1 = XenRegion::new_with_files(desc(0x2000, 0x2000, 0x2000), Some(&a), None, &mut files)
        .expect("fits");
    // Each file's own length, however the lookups interleave.
    let past =
        XenRegion::new_with_files(desc(0x10_0000, 0x3000, 0x800), Some(&b), None, &mut files);
    assert!(
        matches!(
            past,
            Err(RegionError::Backend(BackendError::UnixBeyondFile {
                gpa: 0x10_0000,
                size: 0x3000,
                offset: 0x800,
                file_len: 0x1000,
            }))
        ),
        "{past:?}"
    );
    let past = XenRegion::new_with_files(desc(0x8000, 0x1000, 0x3800), Some(&a), None, &mut files);
    assert!(
        matches!(
            past,
            Err(RegionError::Backend(BackendError::UnixBeyondFile {
                file_len: 0x4000,
                ..
            }))
        ),
        "{past:?}"
    );
    let table = RegionTable::from_regions(vec![r0, r1]).expect("table");
    table
        .write_slice(b"both halves", GuestAddress(0x1ffa))
        .expect("write");
    let mut back = [0u8; 11];
    table
        .read_slice(&mut back, GuestAddress(0x1ffa))
        .expect("read");
    assert_eq!(&back, b"both halves");
}
