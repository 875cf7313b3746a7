//! virtio-queue's own mock driver (`MockSplitQueue`) walking descriptor chains over our region
//! table, for the three region kinds, with the bytes checked through the guest's own view.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use common::{
    anon_region, desc, foreign_region, frames, grant, grant_region, guest, memfd, on_demand_region,
    pattern, wire, PAGE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use xen_vhost_mem::testing::EmulatedXen;
use xen_vhost_mem::testing::GuestSim;
use xen_vhost_mem::xen_page::grant_addr;
use xen_vhost_mem::{RegionTable, XenRegion};

const VRING_DESC_F_WRITE: u16 = 2;
const QSIZE: u16 = 16;
/// Bytes the mock's split ring of `QSIZE` entries occupies: descriptor table (16 * 16), avail
/// ring (4 + 2 * 16 + 2), padding to 4, used ring (4 + 8 * 16 + 2).
const RING_SIZE: u64 = 0x100 + 0x26 + 2 + 0x86;
/// The ring starts mid-page so that its descriptor table crosses a page boundary right in the
/// middle of the test chain (descriptor 2 is on the next page).
const RING_OFFSET: u64 = 0xfe0;
const BUF_SIZE: u64 = 0x4000;
const HEADER_OFF: u64 = 0x10;
const DATA_OFF: u64 = 0x800;
const DATA_LEN: usize = 0x2000;
const STATUS_OFF: u64 = 0x3001;
const SENTINEL: u8 = 0xee;

/// How the guest (the test) sees a region's bytes without going through our mappings.
enum View {
    /// Pages of the emulation, from the page holding `base` (page aligned).
    Emu {
        emu: Arc<EmulatedXen>,
        base: u64,
        first_page: usize,
    },
    /// A memfd mapped at `offset` for a region at `base`.
    File { file: File, base: u64, offset: u64 },
    /// Anonymous memory has no other view: through the table.
    Table,
}

struct Setup {
    guest: Option<GuestSim>,
    table: RegionTable,
    ring_gpa: u64,
    ring_view: View,
    buf_gpa: u64,
    buf_view: View,
}

impl Setup {
    fn read(&self, view: &View, gpa: u64, len: usize) -> Vec<u8> {
        match view {
            View::Emu {
                emu,
                base,
                first_page,
            } => {
                let mut out = Vec::with_capacity(len);
                let mut off = (gpa - base) as usize;
                while out.len() < len {
                    let n = (PAGE - off % PAGE).min(len - out.len());
                    out.extend(
                        emu.read_page(first_page + off / PAGE, off % PAGE, n)
                            .unwrap(),
                    );
                    off += n;
                }
                out
            }
            View::File { file, base, offset } => {
                let mut v = vec![0u8; len];
                file.read_exact_at(&mut v, offset + (gpa - base)).unwrap();
                v
            }
            View::Table => {
                let mut v = vec![0u8; len];
                self.table.read_slice(&mut v, GuestAddress(gpa)).unwrap();
                v
            }
        }
    }

    fn write(&self, view: &View, gpa: u64, data: &[u8]) {
        match view {
            View::Emu {
                emu,
                base,
                first_page,
            } => {
                let mut off = (gpa - base) as usize;
                let mut done = 0;
                while done < data.len() {
                    let n = (PAGE - off % PAGE).min(data.len() - done);
                    emu.write_page(first_page + off / PAGE, off % PAGE, &data[done..done + n])
                        .unwrap();
                    off += n;
                    done += n;
                }
            }
            View::File { file, base, offset } => {
                file.write_all_at(data, offset + (gpa - base)).unwrap()
            }
            View::Table => self.table.write_slice(data, GuestAddress(gpa)).unwrap(),
        }
    }

    fn guest_buf(&self, off: u64, len: usize) -> Vec<u8> {
        self.read(&self.buf_view, self.buf_gpa + off, len)
    }

    fn guest_ring(&self, gpa: u64, len: usize) -> Vec<u8> {
        self.read(&self.ring_view, gpa, len)
    }

    fn finish(self) {
        let Setup { guest, table, .. } = self;
        drop(table);
        if let Some(g) = guest {
            g.assert_nothing_mapped();
        }
    }
}

/// (a) UNIX: the ring in anonymous memory, the buffers in a memfd at a nonzero offset.
fn unix_setup() -> Setup {
    let ring_gpa = 0x1_0000 + RING_OFFSET;
    let buf_gpa = 0x10_0000;
    let file = memfd(BUF_SIZE + 0x1000);
    let buffers = XenRegion::new(
        desc(wire(buf_gpa, BUF_SIZE, 0x7f00_0010_0000, 0x1000, 0, 0)),
        Some(&file),
        None,
    )
    .unwrap();
    let table = RegionTable::from_regions(vec![
        anon_region(ring_gpa, RING_SIZE, 0x7f00_0000_0fe0),
        buffers,
    ])
    .unwrap();
    Setup {
        guest: None,
        table,
        ring_gpa,
        ring_view: View::Table,
        buf_gpa,
        buf_view: View::File {
            file,
            base: buf_gpa,
            offset: 0x1000,
        },
    }
}

/// The ring as xen-vhost-frontend sends it: a GRANT region mapped in advance at a mid-page gpa,
/// spanning two grant pages.
fn grant_ring(g: &GuestSim) -> (XenRegion, u64, View) {
    let (page, r) = grant(g, 2, false);
    let gpa = grant_addr(r, RING_OFFSET);
    let region = grant_region(g, gpa, RING_SIZE, 0x7f00_0000_0fe0);
    let view = View::Emu {
        emu: g.emu.clone(),
        base: grant_addr(r, 0),
        first_page: page,
    };
    (region, gpa, view)
}

/// (b) the ring in a GRANT-in-advance region, the buffers in a FOREIGN region.
fn foreign_setup() -> Setup {
    let g = guest(16);
    let (ring, ring_gpa, ring_view) = grant_ring(&g);
    let buf_gpa = 0x10_0000;
    let first_page = frames(&g, 0x100, 4);
    let buffers = foreign_region(&g, buf_gpa, BUF_SIZE);
    emu_setup(g, (ring, ring_gpa, ring_view), buffers, buf_gpa, first_page)
}

/// (c) the ring and the buffers in two GRANT-in-advance regions.
fn grant_setup() -> Setup {
    let g = guest(16);
    let (ring, ring_gpa, ring_view) = grant_ring(&g);
    let (first_page, r) = grant(&g, 4, false);
    let buf_gpa = grant_addr(r, 0);
    let buffers = grant_region(&g, buf_gpa, BUF_SIZE, 0x7f00_0020_0000);
    emu_setup(g, (ring, ring_gpa, ring_view), buffers, buf_gpa, first_page)
}

/// A setup over the emulation: the ring from `grant_ring`, the buffers at `buf_gpa`, seen by
/// the guest from emulated page `first_page` on.
fn emu_setup(
    g: GuestSim,
    (ring, ring_gpa, ring_view): (XenRegion, u64, View),
    buffers: XenRegion,
    buf_gpa: u64,
    first_page: usize,
) -> Setup {
    let table = RegionTable::from_regions(vec![ring, buffers]).unwrap();
    Setup {
        buf_view: View::Emu {
            emu: g.emu.clone(),
            base: buf_gpa,
            first_page,
        },
        guest: Some(g),
        table,
        ring_gpa,
        ring_view,
        buf_gpa,
    }
}

fn raw(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// A block-like request: a 16-byte header the device reads, an 8 KiB data buffer crossing two
/// page boundaries and a 1-byte status the device writes.
fn run_block_request(s: Setup) {
    let t = &s.table;
    // The guest prepares its buffers.
    s.write(&s.buf_view, s.buf_gpa, &vec![SENTINEL; BUF_SIZE as usize]);
    let header = *b"VIRTIO-BLK-HDR!!";
    s.write(&s.buf_view, s.buf_gpa + HEADER_OFF, &header);

    let mock = MockSplitQueue::create(t, GuestAddress(s.ring_gpa), QSIZE);
    // (The mock's `end()` counts ring elements, not bytes, and it places the used ring right
    // after 16 bytes of the avail ring; check only that everything lies inside the region.)
    let used_end = mock.used_addr().0 + 6 + 8 * u64::from(QSIZE);
    let avail_end = mock.avail_addr().0 + 6 + 2 * u64::from(QSIZE);
    assert!(
        used_end.max(avail_end) <= s.ring_gpa + RING_SIZE,
        "ring layout"
    );
    let descs = [
        raw(s.buf_gpa + HEADER_OFF, 16, 0),
        raw(s.buf_gpa + DATA_OFF, DATA_LEN as u32, VRING_DESC_F_WRITE),
        raw(s.buf_gpa + STATUS_OFF, 1, VRING_DESC_F_WRITE),
    ];
    let built = mock.build_desc_chain(&descs).unwrap();
    // The descriptor table, written by the mock through our mapping, is in guest memory at
    // the ring's own (mid-page) address.
    let d0 = s.guest_ring(s.ring_gpa, 16);
    assert_eq!(d0[..8], (s.buf_gpa + HEADER_OFF).to_le_bytes());
    assert_eq!(d0[8..12], 16u32.to_le_bytes());
    // Descriptor 2 sits on the ring's second page.
    let d2 = s.guest_ring(s.ring_gpa + 32, 16);
    assert_eq!(d2[..8], (s.buf_gpa + STATUS_OFF).to_le_bytes());
    assert_eq!(d2[8..12], 1u32.to_le_bytes());
    assert_eq!(d2[12..14], VRING_DESC_F_WRITE.to_le_bytes());

    // The device pops it from a queue of its own.
    let mut q: Queue = mock.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(t).expect("one chain available");
    assert_eq!(chain.head_index(), built.head_index());
    assert!(q.pop_descriptor_chain(t).is_none());

    let mut reader = chain.clone().reader(t).unwrap();
    assert_eq!(reader.available_bytes(), 16);
    let mut got = [0u8; 16];
    reader.read_exact(&mut got).unwrap();
    assert_eq!(got, header);
    assert_eq!(reader.available_bytes(), 0);

    let mut writer = chain.clone().writer(t).unwrap();
    assert_eq!(writer.available_bytes(), DATA_LEN + 1);
    let data = pattern(0x33, DATA_LEN);
    writer.write_all(&data).unwrap();
    writer.write_all(&[0x00]).unwrap();
    assert_eq!(writer.bytes_written(), DATA_LEN + 1);
    assert_eq!(writer.available_bytes(), 0);
    q.add_used(t, chain.head_index(), (DATA_LEN + 1) as u32)
        .unwrap();

    // The guest sees exactly what the device wrote, and nothing around it changed.
    assert_eq!(s.guest_buf(DATA_OFF, DATA_LEN), data);
    assert_eq!(s.guest_buf(STATUS_OFF, 1), [0x00]);
    assert_eq!(s.guest_buf(DATA_OFF - 1, 1), [SENTINEL]);
    assert_eq!(s.guest_buf(DATA_OFF + DATA_LEN as u64, 1), [SENTINEL]);
    assert_eq!(s.guest_buf(STATUS_OFF - 1, 1), [SENTINEL]);
    assert_eq!(s.guest_buf(STATUS_OFF + 1, 1), [SENTINEL]);
    assert_eq!(s.guest_buf(HEADER_OFF, 16), header);
    // And the used ring entry, through the guest's view of the ring.
    let used = mock.used_addr().0;
    assert_eq!(mock.used().idx().load(), 1);
    assert_eq!(s.guest_ring(used + 2, 2), 1u16.to_le_bytes());
    let elem = s.guest_ring(used + 4, 8);
    assert_eq!(elem[..4], u32::from(chain.head_index()).to_le_bytes());
    assert_eq!(elem[4..], ((DATA_LEN + 1) as u32).to_le_bytes());
    let e = mock.used().ring().ref_at(0).unwrap().load();
    assert_eq!(
        (e.id(), e.len()),
        (u32::from(chain.head_index()), (DATA_LEN + 1) as u32)
    );

    s.finish();
}

/// Chains whose buffers are not (wholly) in any region: Reader/Writer creation fails, no panic.
fn run_bad_chains(s: Setup) {
    let t = &s.table;
    let mock = MockSplitQueue::create(t, GuestAddress(s.ring_gpa), QSIZE);
    let nowhere = 0x5000_0000;
    let straddling = s.buf_gpa + BUF_SIZE - 0x10;
    let bad: [(&str, RawDescriptor, bool); 5] = [
        ("readable, outside every region", raw(nowhere, 16, 0), false),
        (
            "writable, outside every region",
            raw(nowhere, 16, VRING_DESC_F_WRITE),
            true,
        ),
        (
            "readable, running past the buffer region",
            raw(straddling, 0x20, 0),
            false,
        ),
        (
            "writable, running past the buffer region",
            raw(straddling, 0x20, VRING_DESC_F_WRITE),
            true,
        ),
        (
            "writable, at the top of the address space",
            raw(u64::MAX - 3, 16, VRING_DESC_F_WRITE),
            true,
        ),
    ];
    for (name, d, writable) in bad {
        // A good descriptor of the other direction first, so only `d` is at fault.
        let good = if writable {
            raw(s.buf_gpa + HEADER_OFF, 16, 0)
        } else {
            raw(s.buf_gpa + DATA_OFF, 16, VRING_DESC_F_WRITE)
        };
        let descs = if writable { [good, d] } else { [d, good] };
        let chain = mock.build_desc_chain(&descs).unwrap();
        if writable {
            assert!(
                chain.clone().reader(t).is_ok(),
                "{name}: good readable part"
            );
            assert!(
                matches!(
                    chain.clone().writer(t),
                    Err(virtio_queue::Error::InvalidChain)
                ),
                "{name}"
            );
        } else {
            assert!(
                matches!(
                    chain.clone().reader(t),
                    Err(virtio_queue::Error::InvalidChain)
                ),
                "{name}"
            );
            assert!(
                chain.clone().writer(t).is_ok(),
                "{name}: good writable part"
            );
        }
    }
    s.finish();
}

#[test]
fn unix_ring_and_unix_buffers() {
    run_block_request(unix_setup());
}

#[test]
fn grant_ring_and_foreign_buffers() {
    run_block_request(foreign_setup());
}

#[test]
fn grant_ring_and_grant_buffers() {
    run_block_request(grant_setup());
}

#[test]
fn unix_chains_outside_every_region_are_errors() {
    run_bad_chains(unix_setup());
}

#[test]
fn foreign_chains_outside_every_region_are_errors() {
    run_bad_chains(foreign_setup());
}

#[test]
fn grant_chains_outside_every_region_are_errors() {
    run_bad_chains(grant_setup());
}

/// A chain pointing into an on-demand grant region cannot be walked with the plain table (it
/// needs request-scoped memory): an error, never a panic or a fake pointer.
#[test]
fn chain_into_an_on_demand_region_is_an_error_on_the_plain_table() {
    let s = grant_setup();
    let g = s.guest.as_ref().unwrap();
    let (_, r) = grant(g, 2, false);
    let od_gpa = grant_addr(r, 0);
    let before = g.dev.counters().snapshot();
    let table = s
        .table
        .insert(Arc::new(on_demand_region(g, od_gpa, 0x10_0000)))
        .unwrap();
    let mock = MockSplitQueue::create(&table, GuestAddress(s.ring_gpa), QSIZE);
    let chain = mock
        .build_desc_chain(&[
            raw(od_gpa + 0x10, 16, 0),
            raw(od_gpa + 0x1000, 0x100, VRING_DESC_F_WRITE),
        ])
        .unwrap();
    assert!(matches!(
        chain.clone().reader(&table),
        Err(virtio_queue::Error::InvalidChain)
    ));
    assert!(matches!(
        chain.clone().writer(&table),
        Err(virtio_queue::Error::InvalidChain)
    ));
    // Nothing was mapped for it; each refused access (the reader's and the writer's) counted.
    let d = g.dev.counters().snapshot().since(&before);
    assert!(d.plain_table_refusals >= 2, "{d:?}");
    assert_eq!(
        d,
        xen_vhost_mem::device::CounterSnapshot {
            plain_table_refusals: d.plain_table_refusals,
            ..Default::default()
        }
    );
    drop(table);
    s.finish();
}
