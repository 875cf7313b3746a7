//! Lazy FOREIGN mapping (issue 12 item 4) on the emulated device: a region reserves address
//! space only, request-scoped memory maps a bucket on first touch, per-frame errors name the
//! gfn touched, and nothing outlives the table.

mod common;

use common::{desc, frames, guest, lazy_region, wire, DOMID, FLAG_FOREIGN, PAGE};
use vm_memory::{Bytes, GuestAddress};
use xen_vhost_mem::backend::BackendError;
use xen_vhost_mem::device::CounterSnapshot;
use xen_vhost_mem::region::OnDemandAccess;
use xen_vhost_mem::testing::GuestSim;
use xen_vhost_mem::{ForeignMapping, RegionTable, RequestError, RequestMemory, XenRegion};

const GIB: u64 = 1 << 30;
const BUCKET: usize = 256;

fn snap(g: &GuestSim) -> CounterSnapshot {
    g.dev.counters().snapshot()
}

fn gpa_of(gfn: u64) -> u64 {
    gfn * PAGE as u64
}

fn request_error(e: &vm_memory::GuestMemoryError) -> &RequestError {
    RequestError::from_guest_memory_error(e).unwrap_or_else(|| panic!("not a request error: {e}"))
}

#[test]
fn one_gib_region_costs_no_device_call_and_first_touch_maps_one_bucket() {
    let g = guest(64);
    // Frames 0x1000..0x1010 exist; the rest of the 1 GiB is sparse (unknown to Xen).
    let page = frames(&g, 0x1000, 16);
    g.emu.write_page(page + 3, 5, b"lazy hello").unwrap();

    let before = snap(&g);
    let table = RegionTable::from_regions(vec![lazy_region(&g, 0, GIB, BUCKET)]).unwrap();
    assert_eq!(snap(&g).since(&before), CounterSnapshot::default());
    assert!(table.has_lazy() && !table.has_on_demand());
    assert!(table.regions()[0].is_lazy_foreign());
    assert_eq!(table.regions()[0].lazy_mapped_buckets(), 0);

    let before = snap(&g);
    let mem = RequestMemory::new(&table);
    let mut buf = [0u8; 10];
    mem.read_slice(&mut buf, GuestAddress(gpa_of(0x1003) + 5))
        .unwrap();
    assert_eq!(&buf, b"lazy hello");
    assert_eq!(
        snap(&g).since(&before),
        CounterSnapshot {
            ioctls: 1,
            mmaps: 1,
            pages_mapped: BUCKET as u64,
            live_mappings: 1,
            ..Default::default()
        },
        "first touch: one privcmd mapping + one MMAPBATCH for one bucket"
    );
    assert_eq!(table.regions()[0].lazy_mapped_buckets(), 1);

    // Warm: the same bucket again, through this scope and a new one, costs nothing.
    let before = snap(&g);
    mem.write_slice(b"written", GuestAddress(gpa_of(0x100f) + 100))
        .unwrap();
    mem.finish().unwrap();
    let mem = RequestMemory::new(&table);
    let v: u64 = mem.read_obj(GuestAddress(gpa_of(0x1000))).unwrap();
    assert_eq!(v, 0);
    drop(mem);
    assert_eq!(snap(&g).since(&before), CounterSnapshot::default());
    // The guest sees the bytes written through the mapping.
    assert_eq!(g.emu.read_page(page + 15, 100, 7).unwrap(), b"written");

    drop(table);
    let after = snap(&g);
    assert_eq!(after.mmaps, after.munmaps);
    g.assert_nothing_mapped();
}

#[test]
fn access_across_buckets_maps_each_once() {
    let g = guest(1024);
    let page = frames(&g, 0x2000, 512);
    let data: Vec<u8> = (0..3 * PAGE).map(|i| (i % 251) as u8).collect();
    // Pages 0x20ff..0x2102: the last page of bucket 0x20 and the first two of bucket 0x21.
    for (i, chunk) in data.chunks(PAGE).enumerate() {
        g.emu.write_page(page + 0xff + i, 0, chunk).unwrap();
    }
    let table = RegionTable::from_regions(vec![lazy_region(&g, 0, GIB, BUCKET)]).unwrap();
    let before = snap(&g);
    let mem = RequestMemory::new(&table);
    let mut buf = vec![0u8; 3 * PAGE];
    mem.read_slice(&mut buf, GuestAddress(gpa_of(0x20ff)))
        .unwrap();
    assert_eq!(buf, data);
    let d = snap(&g).since(&before);
    assert_eq!(
        (d.mmaps, d.ioctls, d.pages_mapped),
        (2, 2, 2 * BUCKET as u64)
    );
    mem.finish().unwrap();
    assert_eq!(table.regions()[0].lazy_mapped_buckets(), 2);
    drop(table);
    g.assert_nothing_mapped();
}

#[test]
fn unknown_frame_inside_a_bucket_is_an_error_naming_it() {
    let g = guest(256);
    // Bucket 0x30 (gfns 0x3000..0x3100) has only its first half.
    let page = frames(&g, 0x3000, 0x80);
    g.emu.write_page(page + 0x7f, 0, b"good").unwrap();
    let table = RegionTable::from_regions(vec![lazy_region(&g, 0, GIB, BUCKET)]).unwrap();
    let mem = RequestMemory::new(&table);

    let before = snap(&g);
    let e = mem
        .read_obj::<u32>(GuestAddress(gpa_of(0x3080) + 8))
        .unwrap_err();
    match request_error(&e) {
        RequestError::Foreign(BackendError::ForeignFrame { domid, gfn, errno }) => {
            assert_eq!((*domid, *gfn, *errno), (DOMID, 0x3080, libc::EINVAL));
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(e.to_string().contains("0x3080"), "{e}");
    // The bucket was mapped once; its good frames are served, a span reaching a bad frame
    // names the lowest bad one, and no further device call is made.
    let mut buf = [0u8; 4];
    mem.read_slice(&mut buf, GuestAddress(gpa_of(0x307f)))
        .unwrap();
    assert_eq!(&buf, b"good");
    let mut two = vec![0u8; 3 * PAGE];
    let e = mem
        .read_slice(&mut two, GuestAddress(gpa_of(0x307f)))
        .unwrap_err();
    match request_error(&e) {
        RequestError::Foreign(BackendError::ForeignFrame { gfn, .. }) => assert_eq!(*gfn, 0x3080),
        other => panic!("unexpected error {other}"),
    }
    let d = snap(&g).since(&before);
    assert_eq!((d.mmaps, d.ioctls, d.errors), (1, 1, 2));
    mem.finish().unwrap();
    drop(table);
    g.assert_nothing_mapped();
}

#[test]
fn paged_out_frames_are_retried_at_first_touch() {
    let g = guest(256);
    let page = frames(&g, 0x4000, 256);
    g.emu.write_page(page + 7, 0, b"back").unwrap();
    g.emu.page_out(DOMID, 0x4007, 2);
    g.emu.page_out(DOMID, 0x4009, 99);
    let table = RegionTable::from_regions(vec![lazy_region(&g, 0, GIB, BUCKET)]).unwrap();
    let mem = RequestMemory::new(&table);
    let mut buf = [0u8; 4];
    mem.read_slice(&mut buf, GuestAddress(gpa_of(0x4007)))
        .unwrap();
    assert_eq!(&buf, b"back");
    let e = mem
        .read_obj::<u8>(GuestAddress(gpa_of(0x4009)))
        .unwrap_err();
    match request_error(&e) {
        RequestError::Foreign(BackendError::ForeignPagedOut { gfn, .. }) => {
            assert_eq!(*gfn, 0x4009)
        }
        other => panic!("unexpected error {other}"),
    }
    mem.finish().unwrap();
    drop(table);
    g.assert_nothing_mapped();
}

#[test]
fn plain_table_access_to_a_lazy_region_is_an_error() {
    let g = guest(256);
    frames(&g, 0x5000, 256);
    let table = RegionTable::from_regions(vec![lazy_region(&g, 0, GIB, BUCKET)]).unwrap();
    let region = &table.regions()[0];
    assert!(region.host_address().is_none());
    let on_demand = |e: vm_memory::GuestMemoryError| match e {
        vm_memory::GuestMemoryError::IOError(io) => {
            let a = io
                .get_ref()
                .and_then(|x| x.downcast_ref::<OnDemandAccess>())
                .expect("OnDemandAccess");
            OnDemandAccess {
                gpa: a.gpa,
                domid: a.domid,
            }
        }
        other => panic!("unexpected error {other}"),
    };
    let e = table
        .read_obj::<u64>(GuestAddress(gpa_of(0x5000)))
        .unwrap_err();
    assert_eq!(
        on_demand(e),
        OnDemandAccess {
            gpa: gpa_of(0x5000),
            domid: DOMID
        }
    );
    // Still refused once the bucket is mapped through a scope: the plain table never
    // dereferences a lazy region.
    let mem = RequestMemory::new(&table);
    let _: u64 = mem.read_obj(GuestAddress(gpa_of(0x5000))).unwrap();
    mem.finish().unwrap();
    let e = table
        .read_obj::<u64>(GuestAddress(gpa_of(0x5000)))
        .unwrap_err();
    assert_eq!(on_demand(e).gpa, gpa_of(0x5000));
    drop(table);
    g.assert_nothing_mapped();
}

#[test]
fn prefetch_maps_the_buckets_of_the_buffers() {
    let g = guest(512);
    frames(&g, 0x6000, 512);
    let table = RegionTable::from_regions(vec![lazy_region(&g, 0, GIB, BUCKET)]).unwrap();
    let mem = RequestMemory::new(&table);
    let before = snap(&g);
    mem.prefetch(&[
        (
            GuestAddress(gpa_of(0x6010)),
            64,
            vm_memory::Permissions::Read,
        ),
        (
            GuestAddress(gpa_of(0x6110)),
            64,
            vm_memory::Permissions::Write,
        ),
    ])
    .unwrap();
    let d = snap(&g).since(&before);
    assert_eq!((d.mmaps, d.ioctls), (2, 2));
    let before = snap(&g);
    mem.write_obj(7u64, GuestAddress(gpa_of(0x6110))).unwrap();
    assert_eq!(snap(&g).since(&before), CounterSnapshot::default());
    mem.finish().unwrap();
    drop(table);
    g.assert_nothing_mapped();
}

#[test]
fn eager_stays_the_default_and_bad_bucket_sizes_are_refused() {
    assert_eq!(ForeignMapping::default(), ForeignMapping::Eager);
    let g = guest(16);
    frames(&g, 0, 16);
    let before = snap(&g);
    let eager = XenRegion::new(
        desc(wire(0, 16 * PAGE as u64, 0, 0, FLAG_FOREIGN, DOMID.into())),
        None,
        Some(&g.dev),
    )
    .unwrap();
    assert!(!eager.is_lazy_foreign());
    assert!(eager.host_address().is_some());
    assert_eq!(snap(&g).since(&before).mmaps, 1);
    drop(eager);
    for bucket_frames in [0, 3, 2048] {
        let r = XenRegion::with_foreign_mapping(
            desc(wire(0, GIB, 0, 0, FLAG_FOREIGN, DOMID.into())),
            None,
            Some(&g.dev),
            ForeignMapping::Lazy { bucket_frames },
        );
        assert!(r.is_err(), "bucket of {bucket_frames} frames accepted");
    }
    g.assert_nothing_mapped();
}
