//! Hostile input at the memory and queue level (the protocol level is tests/daemon_protocol.rs).
//!
//! Every case asserts the exact outcome (error variant and values, or for chains the exact
//! descriptors virtio-queue yields and the used length and status the blk device returns),
//! then that the next good request on the same table is served byte for byte, then that
//! nothing but the ring's own mapping is live (and nothing at all once the table is dropped).

mod common;

use std::io::Write as _;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, Permissions};
use xen_vhost_mem::daemon::VhostUserDevice;
use xen_vhost_mem::descriptor::DescriptorError;
use xen_vhost_mem::device::{GNTST_BAD_GNTREF, GNTST_GENERAL_ERROR};
use xen_vhost_mem::devices::blk::{BlkConfig, BlkDevice, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use xen_vhost_mem::devices::blk::{VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use xen_vhost_mem::request::MAX_SCOPE_PAGES;
use xen_vhost_mem::table::TableError;
use xen_vhost_mem::testing::{Guest as _, GuestBuffer, GuestSim};
use xen_vhost_mem::xen_page::grant_addr;
use xen_vhost_mem::{
    RegionDescriptor, RegionTable, RequestError, RequestMemory, Strategy, WireRegion,
    WritableBuffers, XenRegion,
};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
const QSIZE: u16 = 16;
/// Pages of the on-demand region past the ring (more than are ever granted).
const REGION_PAGES: u64 = 256;
const DISK: u64 = 1 << 20;

/// A guest with its ring in an in-advance grant region and an on-demand region after it.
struct Env {
    sim: GuestSim,
    ring: GuestBuffer,
    table: RegionTable,
    blk: BlkDevice,
    _dir: tempdir::Dir,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn env() -> Env {
    let sim = GuestSim::new(1, 512).unwrap();
    let ring = sim.grant(2, false).unwrap();
    let table = RegionTable::from_regions(vec![
        XenRegion::new(
            sim.in_advance_region(ring.gpa(0), 8192, 0x7000_0000),
            None,
            Some(&sim.dev),
        )
        .unwrap(),
        XenRegion::new(
            sim.on_demand_region(ring.first_ref + 2, REGION_PAGES),
            None,
            Some(&sim.dev),
        )
        .unwrap(),
    ])
    .unwrap();
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "xvm-hostile-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(DISK).unwrap();
    let blk = BlkDevice::open(&img, BlkConfig::default()).unwrap();
    Env {
        sim,
        ring,
        table,
        blk,
        _dir: tempdir::Dir(dir),
    }
}

impl Env {
    /// A granted buffer filled with `fill`.
    fn buf(&self, pages: usize, ro: bool, fill: u8) -> GuestBuffer {
        let b = self.sim.grant(pages, ro).unwrap();
        self.sim.write(&b, 0, &vec![fill; pages * 4096]).unwrap();
        b
    }
    /// The gpa of a ref in the on-demand region that was never granted.
    fn ungranted(&self) -> u64 {
        grant_addr(self.ring.first_ref + 2 + REGION_PAGES as u32 - 1, 0)
    }
    fn queue(&self) -> MockSplitQueue<'_, RegionTable> {
        MockSplitQueue::create(&self.table, GuestAddress(self.ring.gpa(0)), QSIZE)
    }
    /// The next good request: a blk OUT then IN through the device, data checked.
    fn good_request(&self) {
        let q = self.queue();
        let data = self.buf(1, true, 0x3c);
        let hdr = self.header(VIRTIO_BLK_T_OUT, 8);
        let status = self.buf(1, false, 0xff);
        let descs = [
            d(hdr.gpa(0), 16, NEXT, 1),
            d(data.gpa(0), 4096, NEXT, 2),
            d(status.gpa(0), 1, WRITE, 0),
        ];
        assert_eq!(self.serve(&q, &descs, 0), (1, VIRTIO_BLK_S_OK), "good OUT");
        let back = self.buf(1, false, 0);
        let hdr = self.header(VIRTIO_BLK_T_IN, 8);
        let descs = [
            d(hdr.gpa(0), 16, NEXT, 1),
            d(back.gpa(0), 4096, WRITE | NEXT, 2),
            d(status.gpa(0), 1, WRITE, 0),
        ];
        assert_eq!(
            self.serve(&q, &descs, 0),
            (4097, VIRTIO_BLK_S_OK),
            "good IN"
        );
        assert_eq!(self.sim.read(&back, 0, 4096).unwrap(), vec![0x3c; 4096]);
        self.assert_quiet();
    }
    fn header(&self, kind: u32, sector: u64) -> GuestBuffer {
        let h = self.sim.grant(1, true).unwrap();
        let mut b = kind.to_le_bytes().to_vec();
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&sector.to_le_bytes());
        self.sim.write(&h, 0, &b).unwrap();
        h
    }
    /// Only the ring's mapping lives.
    #[track_caller]
    fn assert_quiet(&self) {
        assert_eq!(self.sim.emu.live_mappings(), 1, "emulation mappings");
        assert_eq!(self.sim.emu.live_grant_maps(), 1, "emulation grant maps");
        assert_eq!(
            self.sim.dev.counters().live_mappings(),
            1,
            "counted mappings"
        );
    }
    /// Writes `descs` at the start of the descriptor table, makes `head` available, pops it
    /// through a request scope, has the blk device serve it; returns (used length, status
    /// byte at the last writable descriptor's last byte, or 0xee when there is none).
    fn serve(
        &self,
        q: &MockSplitQueue<'_, RegionTable>,
        descs: &[RawDescriptor],
        head: u16,
    ) -> (u32, u8) {
        for (i, x) in descs.iter().enumerate() {
            q.desc_table().store(i as u16, *x).unwrap();
        }
        let idx = q.avail().idx().load();
        q.avail()
            .ring()
            .ref_at(usize::from(idx % QSIZE))
            .unwrap()
            .store(head);
        q.avail().idx().store(idx.wrapping_add(1));
        let mut queue: Queue = q.create_queue().unwrap();
        queue.set_next_avail(idx);
        let mem = RequestMemory::new(&self.table);
        let mut chains: Vec<_> = queue.pop_descriptor_chain(&mem).into_iter().collect();
        mem.prefetch_chains(&chains).unwrap();
        let mut used = vec![0u32; chains.len()];
        self.blk.serve(0, &mem, &mut chains, &mut used);
        let status_at = chains
            .first()
            .and_then(|c| c.clone().filter(|x| x.is_write_only()).last())
            .map(|x| (x.addr().0 + u64::from(x.len()).max(1) - 1, x.len()));
        drop(chains);
        let _ = mem.finish();
        let status = match status_at {
            Some((a, n)) if n > 0 => {
                let m = RequestMemory::new(&self.table);
                let s = m.read_obj::<u8>(GuestAddress(a)).unwrap_or(0xee);
                m.finish().unwrap();
                s
            }
            _ => 0xee,
        };
        (used.first().copied().unwrap_or(u32::MAX), status)
    }
    /// The descriptors virtio-queue yields for head 0 of `descs`, popped through a scope.
    fn walk(&self, descs: &[RawDescriptor]) -> Vec<(u64, u32, bool)> {
        let q = self.queue();
        q.add_desc_chains(&descs[..1], 0).unwrap();
        for (i, x) in descs.iter().enumerate() {
            q.desc_table().store(i as u16, *x).unwrap();
        }
        let mut queue: Queue = q.create_queue().unwrap();
        let mem = RequestMemory::new(&self.table);
        let got = queue
            .pop_descriptor_chain(&mem)
            .map(|c| {
                c.map(|x| (x.addr().0, x.len(), x.is_write_only()))
                    .collect()
            })
            .unwrap_or_default();
        mem.finish().unwrap();
        got
    }
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Descriptor bytes as the guest writes them into an indirect table.
fn table_bytes(descs: &[RawDescriptor]) -> Vec<u8> {
    descs
        .iter()
        .flat_map(|x| {
            let s = SplitDescriptor::from(*x);
            let mut v = s.addr().0.to_le_bytes().to_vec();
            v.extend_from_slice(&s.len().to_le_bytes());
            v.extend_from_slice(&s.flags().to_le_bytes());
            v.extend_from_slice(&s.next().to_le_bytes());
            v
        })
        .collect()
}

/// The request error inside a vm-memory error, rendered with every value (device errors by
/// errno, which is what identifies them).
fn describe(e: &GuestMemoryError) -> String {
    match RequestError::from_guest_memory_error(e) {
        Some(r) => describe_req(r),
        None => format!("{e:?}"),
    }
}

fn describe_req(r: &RequestError) -> String {
    match r {
        RequestError::Device(d) => format!("Device(errno {:?})", d.errno()),
        RequestError::GrantMap {
            gpa,
            domid,
            gref,
            source,
        } => format!(
            "GrantMap {{ gpa: {gpa:#x}, domid: {domid}, gref: {gref}, errno: {:?} }}",
            source.errno()
        ),
        other => format!("{other:?}"),
    }
}

fn unknown(gpa: u64, gref: u32) -> String {
    format!(
        "{:?}",
        RequestError::UnknownRef {
            gpa,
            domid: 1,
            gref
        }
    )
}

fn read_only(gpa: u64, gref: u32) -> String {
    format!(
        "{:?}",
        RequestError::ReadOnlyGrant {
            gpa,
            domid: 1,
            gref
        }
    )
}

fn gref_of(gpa: u64) -> u32 {
    ((gpa & !(1 << 63)) >> 12) as u32
}

/// Runs one memory-level case: `f` returns what it observed, compared with `want`; then the
/// next good request, then no live mappings.
#[track_caller]
fn case(name: &str, f: impl FnOnce(&Env) -> (String, String)) {
    let e = env();
    let (got, want) = f(&e);
    assert_eq!(got, want, "case {name}");
    e.assert_quiet();
    e.good_request();
    let sim = e.sim.clone();
    drop(e);
    sim.assert_nothing_mapped();
}

fn read_err(e: &Env, strategy: Strategy, gpa: u64, len: usize) -> String {
    let mem = RequestMemory::with_strategy(&e.table, strategy);
    let mut v = vec![0u8; len];
    let r = mem.read_slice(&mut v, GuestAddress(gpa));
    mem.finish().unwrap();
    r.map_or_else(|x| describe(&x), |()| "ok".into())
}

fn write_err(
    e: &Env,
    strategy: Strategy,
    mode: WritableBuffers,
    gpa: u64,
    len: usize,
) -> (String, String) {
    let mem = RequestMemory::with_strategy(&e.table, strategy).writable_buffers(mode);
    let r = mem.write_slice(&vec![0x99; len], GuestAddress(gpa));
    let f = mem.finish();
    (
        r.map_or_else(|x| describe(&x), |()| "ok".into()),
        f.map_or_else(|x| describe_req(&x), |()| "ok".into()),
    )
}

const COPY: Strategy = Strategy::GrantCopy;
const MAP: Strategy = Strategy::Map;
const AUTO: Strategy = Strategy::Auto {
    map_threshold: 4096,
};
const COPY_IN: WritableBuffers = WritableBuffers::CopyIn;
const OVERWRITE: WritableBuffers = WritableBuffers::Overwrite;

// ---------------------------------------------------------------------------------------------
// Memory level: refs, grants, lengths, addresses
// ---------------------------------------------------------------------------------------------

#[test]
fn ref_beyond_the_granted_set_copy() {
    case("ungranted ref, grant copy", |e| {
        let g = e.ungranted();
        (read_err(e, COPY, g + 8, 8), unknown(g + 8, gref_of(g)))
    });
}

#[test]
fn ref_beyond_the_granted_set_map() {
    case("ungranted ref, map", |e| {
        let g = e.ungranted();
        (
            read_err(e, MAP, g, 8),
            format!(
                "GrantMap {{ gpa: {g:#x}, domid: 1, gref: {}, errno: Some({}) }}",
                gref_of(g),
                libc::EINVAL
            ),
        )
    });
}

#[test]
fn ref_beyond_2_pow_32() {
    case("ref beyond 2^32", |e| {
        // An on-demand region whose second page would be ref 2^32.
        let gpa = grant_addr(u32::MAX, 0);
        let od = RegionDescriptor::from_wire(&WireRegion {
            guest_phys_addr: gpa,
            memory_size: 2 * 4096,
            userspace_addr: 0,
            mmap_offset: 0,
            xen_mmap_flags: 2 | 8,
            xen_mmap_data: 1,
        })
        .unwrap();
        let t = e
            .table
            .insert(std::sync::Arc::new(
                XenRegion::new(od, None, Some(&e.sim.dev)).unwrap(),
            ))
            .unwrap();
        let mem = RequestMemory::new(&t);
        let mut v = [0u8; 8];
        let got = describe(
            &mem.read_slice(&mut v, GuestAddress(gpa + 4096 + 16))
                .unwrap_err(),
        );
        mem.finish().unwrap();
        (
            got,
            format!(
                "{:?}",
                RequestError::RefOutOfRange {
                    gpa: gpa + 4096 + 16
                }
            ),
        )
    });
}

#[test]
fn revoked_grant_copy() {
    case("revoked before the request, copy", |e| {
        let b = e.buf(1, false, 1);
        e.sim.end_access(&b).unwrap();
        (
            read_err(e, COPY, b.gpa(100), 4),
            unknown(b.gpa(100), b.first_ref),
        )
    });
}

#[test]
fn revoked_grant_map() {
    case("revoked before the request, map", |e| {
        let b = e.buf(1, false, 1);
        e.sim.end_access(&b).unwrap();
        (
            read_err(e, MAP, b.gpa(0), 4),
            format!(
                "GrantMap {{ gpa: {:#x}, domid: 1, gref: {}, errno: Some({}) }}",
                b.gpa(0),
                b.first_ref,
                libc::EINVAL
            ),
        )
    });
}

#[test]
fn revoked_mid_request_before_copy_back() {
    case("revoked between prefetch and finish", |e| {
        let b = e.buf(1, false, 1);
        let mem = RequestMemory::with_strategy(&e.table, COPY);
        mem.prefetch(&[(GuestAddress(b.gpa(0)), 64, Permissions::Write)])
            .unwrap();
        mem.write_slice(&[7; 64], GuestAddress(b.gpa(0))).unwrap();
        e.sim.end_access(&b).unwrap();
        let got = mem
            .finish()
            .map_or_else(|x| describe_req(&x), |()| "ok".into());
        (
            got,
            format!(
                "{:?}",
                RequestError::CopyBack {
                    failed: 1,
                    gref: b.first_ref,
                    status: GNTST_BAD_GNTREF
                }
            ),
        )
    });
}

#[test]
fn revoked_mid_request_second_page_of_a_buffer() {
    case("second page revoked after the first was fetched", |e| {
        let b = e.buf(2, false, 1);
        let mem = RequestMemory::with_strategy(&e.table, COPY);
        let mut v = [0u8; 16];
        mem.read_slice(&mut v, GuestAddress(b.gpa(0))).unwrap();
        e.sim.emu.end_access(1, b.first_ref + 1).unwrap();
        let mut w = vec![0u8; 8192];
        let got = describe(&mem.read_slice(&mut w, GuestAddress(b.gpa(0))).unwrap_err());
        mem.finish().unwrap();
        (got, unknown(b.gpa(4096), b.first_ref + 1))
    });
}

#[test]
fn read_only_grant_written_copy_in() {
    case("read-only grant written, copy-in", |e| {
        let b = e.buf(1, true, 5);
        let (w, f) = write_err(e, COPY, COPY_IN, b.gpa(10), 4);
        assert_eq!(e.sim.read(&b, 0, 4096).unwrap(), vec![5; 4096]);
        (w + &f, read_only(b.gpa(10), b.first_ref) + "ok")
    });
}

#[test]
fn read_only_grant_written_map() {
    case("read-only grant written, map", |e| {
        let b = e.buf(1, true, 5);
        let (w, f) = write_err(e, MAP, COPY_IN, b.gpa(0), 4096);
        assert_eq!(e.sim.read(&b, 0, 4096).unwrap(), vec![5; 4096]);
        (w + &f, read_only(b.gpa(0), b.first_ref) + "ok")
    });
}

#[test]
fn read_only_grant_written_auto_large() {
    case("read-only grant written, auto (mapped by length)", |e| {
        let b = e.buf(2, true, 5);
        let (w, f) = write_err(e, AUTO, COPY_IN, b.gpa(0), 8192);
        (w + &f, read_only(b.gpa(0), b.first_ref) + "ok")
    });
}

#[test]
fn read_only_grant_written_overwrite_is_reported_at_finish() {
    case("read-only grant written, overwrite", |e| {
        let b = e.buf(1, true, 5);
        let (w, f) = write_err(e, COPY, OVERWRITE, b.gpa(0), 32);
        assert_eq!(e.sim.read(&b, 0, 4096).unwrap(), vec![5; 4096]);
        (
            w + &f,
            "ok".to_string()
                + &format!(
                    "{:?}",
                    RequestError::CopyBack {
                        failed: 1,
                        gref: b.first_ref,
                        status: GNTST_GENERAL_ERROR
                    }
                ),
        )
    });
}

#[test]
fn read_only_grant_read_then_written_in_the_same_scope() {
    case("read-only grant read then written", |e| {
        let b = e.buf(1, true, 5);
        let mem = RequestMemory::with_strategy(&e.table, COPY);
        let mut v = [0u8; 4];
        mem.read_slice(&mut v, GuestAddress(b.gpa(0))).unwrap();
        assert_eq!(v, [5; 4]);
        let got = describe(
            &mem.write_slice(&[1; 4], GuestAddress(b.gpa(0)))
                .unwrap_err(),
        );
        mem.finish().unwrap();
        (got, read_only(b.gpa(0), b.first_ref))
    });
}

#[test]
fn write_across_a_good_and_an_ungranted_page() {
    case("write spanning granted then ungranted page", |e| {
        // The last granted page, then never-granted refs follow.
        let b = e.buf(1, false, 0x11);
        let (w, f) = write_err(e, COPY, COPY_IN, b.gpa(4000), 200);
        assert_eq!(
            e.sim.read(&b, 0, 4096).unwrap(),
            vec![0x11; 4096],
            "untouched"
        );
        (w + &f, unknown(b.gpa(4096), b.first_ref + 1) + "ok")
    });
}

#[test]
fn address_in_no_region() {
    case("no region", |e| {
        let a = 0x1234_5000;
        (
            read_err(e, COPY, a, 8),
            format!(
                "{:?}",
                GuestMemoryError::InvalidGuestAddress(GuestAddress(a))
            ),
        )
    });
}

#[test]
fn access_running_off_the_end_of_the_on_demand_region() {
    case("read past the region's end", |e| {
        let end = grant_addr(e.ring.first_ref + 2 + REGION_PAGES as u32, 0);
        let b = e.buf(1, false, 0);
        let _ = b;
        let mem = RequestMemory::new(&e.table);
        let mut v = [0u8; 32];
        let got = describe(&mem.read_slice(&mut v, GuestAddress(end - 16)).unwrap_err());
        mem.finish().unwrap();
        // The last page of the region is never granted: its ref is reported first.
        (got, unknown(end - 16, gref_of(end - 16)))
    });
}

#[test]
fn gpa_plus_len_overflow() {
    case("gpa + len wraps", |e| {
        let top = u64::MAX - 4095;
        let t = e
            .table
            .insert(std::sync::Arc::new(common::anon_region(top, 4096, 0)))
            .unwrap();
        let mem = RequestMemory::new(&t);
        let mut v = [0u8; 64];
        let got = format!(
            "{:?}",
            mem.read_slice(&mut v, GuestAddress(u64::MAX - 31))
                .unwrap_err()
        );
        // The scope serves the 32 bytes up to the top, then reports the wrap.
        let items: Vec<String> = vm_memory::GuestMemory::get_slices(
            &mem,
            GuestAddress(u64::MAX - 31),
            64,
            Permissions::Read,
        )
        .unwrap()
        .map(|x| x.map_or_else(|e| format!("{e:?}"), |s| s.len().to_string()))
        .collect();
        mem.finish().unwrap();
        (
            format!("{got} {items:?}"),
            format!(
                "{:?} {:?}",
                GuestMemoryError::PartialBuffer {
                    expected: 64,
                    completed: 32
                },
                [
                    "32".to_string(),
                    format!("{:?}", GuestMemoryError::GuestAddressOverflow)
                ]
            ),
        )
    });
}

#[test]
fn access_longer_than_a_scope_may_hold() {
    case("scope limit", |e| {
        // An on-demand region larger than a scope may hold (nothing of it is granted).
        let od = e.sim.on_demand_region(1 << 20, MAX_SCOPE_PAGES as u64 + 8);
        let t = e
            .table
            .insert(std::sync::Arc::new(
                XenRegion::new(od, None, Some(&e.sim.dev)).unwrap(),
            ))
            .unwrap();
        let gpa = od.guest_phys_addr;
        let len = (MAX_SCOPE_PAGES + 1) * 4096;
        let mem = RequestMemory::new(&t);
        let mut v = vec![0u8; len];
        let got = describe(&mem.read_slice(&mut v, GuestAddress(gpa)).unwrap_err());
        mem.finish().unwrap();
        (
            got,
            format!(
                "{:?}",
                RequestError::ScopeFull {
                    gpa,
                    len,
                    pages: MAX_SCOPE_PAGES + 1,
                    max: MAX_SCOPE_PAGES
                }
            ),
        )
    });
}

#[test]
fn failing_grant_copy_ioctl() {
    case("grant-copy ioctl fails", |e| {
        let b = e.buf(1, false, 0);
        e.sim.emu.fail_grant_copies(1);
        (
            read_err(e, COPY, b.gpa(0), 8),
            "Device(errno Some(5))".into(),
        )
    });
}

#[test]
fn failing_grant_copy_ioctl_at_copy_back() {
    case("copy-back ioctl fails", |e| {
        let b = e.buf(1, false, 0);
        let mem = RequestMemory::with_strategy(&e.table, COPY);
        mem.write_slice(&[1; 8], GuestAddress(b.gpa(0))).unwrap();
        e.sim.emu.fail_grant_copies(1);
        let got = mem
            .finish()
            .map_or_else(|x| describe_req(&x), |()| "ok".into());
        assert_eq!(e.sim.read(&b, 0, 8).unwrap(), vec![0; 8]);
        (got, "Device(errno Some(5))".into())
    });
}

#[test]
fn zero_length_accesses_touch_nothing() {
    case("zero-length read and write at an ungranted ref", |e| {
        let g = e.ungranted();
        let before = e.sim.dev.counters().snapshot();
        let r = read_err(e, COPY, g, 0);
        let (w, f) = write_err(e, MAP, COPY_IN, g, 0);
        let calls = e.sim.dev.counters().snapshot().since(&before).syscalls();
        (format!("{r} {w} {f} {calls}"), "ok ok ok 0".into())
    });
}

// ---------------------------------------------------------------------------------------------
// Queue level: chains through virtio-queue, popped through the scope, served by blk
// ---------------------------------------------------------------------------------------------

/// A blk request with `data` as its data descriptor(s) between a good header and status.
fn blk_case(name: &str, build: impl FnOnce(&Env) -> (Vec<RawDescriptor>, (u32, u8))) {
    case(name, |e| {
        let q = e.queue();
        let (descs, want) = build(e);
        let got = e.serve(&q, &descs, 0);
        (format!("{got:?}"), format!("{want:?}"))
    });
}

/// Header (IN at sector 0), then `mid`, then a 1-byte status; returns the chain and the status buffer.
fn blk_chain(e: &Env, kind: u32, mid: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    let hdr = e.header(kind, 0);
    let status = e.buf(1, false, 0xff);
    let mut v = vec![d(hdr.gpa(0), 16, NEXT, 1)];
    for (i, &(a, l, f)) in mid.iter().enumerate() {
        v.push(d(a, l, f | NEXT, i as u16 + 2));
    }
    v.push(d(status.gpa(0), 1, WRITE, 0));
    v
}

#[test]
fn data_at_an_ungranted_ref() {
    blk_case("IN into an ungranted ref", |e| {
        (
            blk_chain(e, VIRTIO_BLK_T_IN, &[(e.ungranted(), 512, WRITE)]),
            (1, VIRTIO_BLK_S_IOERR),
        )
    });
}

#[test]
fn data_in_a_read_only_grant() {
    blk_case("IN into a read-only grant", |e| {
        let b = e.buf(1, true, 7);
        (
            blk_chain(e, VIRTIO_BLK_T_IN, &[(b.gpa(0), 512, WRITE)]),
            (1, VIRTIO_BLK_S_IOERR),
        )
    });
}

#[test]
fn out_from_a_revoked_grant() {
    blk_case("OUT from a revoked grant", |e| {
        let b = e.buf(1, false, 7);
        e.sim.end_access(&b).unwrap();
        (
            blk_chain(e, VIRTIO_BLK_T_OUT, &[(b.gpa(0), 512, 0)]),
            (1, VIRTIO_BLK_S_IOERR),
        )
    });
}

#[test]
fn data_gpa_plus_len_overflows() {
    blk_case("data gpa + len wraps", |e| {
        (
            blk_chain(e, VIRTIO_BLK_T_IN, &[(u64::MAX - 10, 512, WRITE)]),
            (1, VIRTIO_BLK_S_IOERR),
        )
    });
}

#[test]
fn data_longer_than_a_scope_may_hold() {
    blk_case("data longer than the scope limit", |e| {
        let b = e.buf(1, false, 0);
        let len = (MAX_SCOPE_PAGES as u32 + 1) * 4096;
        (
            blk_chain(e, VIRTIO_BLK_T_IN, &[(b.gpa(0), len, WRITE)]),
            (1, VIRTIO_BLK_S_IOERR),
        )
    });
}

#[test]
fn zero_length_data_buffer() {
    blk_case("zero-length data", |e| {
        let b = e.buf(1, false, 0);
        (
            blk_chain(e, VIRTIO_BLK_T_IN, &[(b.gpa(0), 0, WRITE)]),
            (1, VIRTIO_BLK_S_OK),
        )
    });
}

#[test]
fn zero_length_status_buffer() {
    blk_case("zero-length status", |e| {
        let hdr = e.header(VIRTIO_BLK_T_IN, 0);
        let b = e.buf(1, false, 0);
        (
            vec![d(hdr.gpa(0), 16, NEXT, 1), d(b.gpa(0), 0, WRITE, 0)],
            (0, 0xee),
        )
    });
}

#[test]
fn short_header() {
    blk_case("header shorter than 16 bytes", |e| {
        let mut c = blk_chain(e, VIRTIO_BLK_T_IN, &[]);
        let h = SplitDescriptor::from(c[0]);
        c[0] = d(h.addr().0, 8, NEXT, 1);
        (c, (1, VIRTIO_BLK_S_IOERR))
    });
}

#[test]
fn readable_after_writable() {
    case("readable descriptor after a writable one", |e| {
        let q = e.queue();
        let b = e.buf(1, false, 0);
        let c = blk_chain(
            e,
            VIRTIO_BLK_T_IN,
            &[(b.gpa(0), 512, WRITE), (b.gpa(512), 16, 0)],
        );
        let got = e.serve(&q, &c, 0);
        // The device stops at the readable descriptor and writes IOERR into the last byte of
        // the writable ones before it; the real status buffer is untouched.
        let at = e.sim.read(&b, 511, 1).unwrap()[0];
        (
            format!("{got:?} {at}"),
            format!("{:?} {VIRTIO_BLK_S_IOERR}", (1u32, 0xffu8)),
        )
    });
}

#[test]
fn sector_beyond_the_disk() {
    blk_case("sector beyond the disk", |e| {
        let hdr = e.header(VIRTIO_BLK_T_IN, DISK / 512);
        let b = e.buf(1, false, 0);
        let s = e.buf(1, false, 0xff);
        (
            vec![
                d(hdr.gpa(0), 16, NEXT, 1),
                d(b.gpa(0), 512, WRITE | NEXT, 2),
                d(s.gpa(0), 1, WRITE, 0),
            ],
            (1, VIRTIO_BLK_S_IOERR),
        )
    });
}

#[test]
fn unknown_request_type() {
    blk_case("unknown request type", |e| {
        (blk_chain(e, 0x7777, &[]), (1, VIRTIO_BLK_S_UNSUPP))
    });
}

#[test]
fn junk_descriptor_flags_are_ignored() {
    blk_case("junk flag bits", |e| {
        let b = e.buf(1, false, 0);
        // Bits beyond NEXT|WRITE|INDIRECT mean nothing to a split ring.
        (
            blk_chain(e, VIRTIO_BLK_T_IN, &[(b.gpa(0), 512, WRITE | 0xfff0)]),
            (513, VIRTIO_BLK_S_OK),
        )
    });
}

#[test]
fn status_in_a_read_only_grant() {
    blk_case("status byte read-only", |e| {
        let hdr = e.header(VIRTIO_BLK_T_IN, 0);
        let b = e.buf(1, false, 0);
        let s = e.buf(1, true, 0xab);
        (
            vec![
                d(hdr.gpa(0), 16, NEXT, 1),
                d(b.gpa(0), 512, WRITE | NEXT, 2),
                d(s.gpa(0), 1, WRITE, 0),
            ],
            (0, 0xab),
        )
    });
}

#[test]
fn head_index_out_of_range() {
    case("avail head beyond the queue size", |e| {
        let q = e.queue();
        let c = blk_chain(e, VIRTIO_BLK_T_IN, &[]);
        let got = e.serve(&q, &c, QSIZE + 3);
        // virtio-queue pops a chain that yields nothing; blk completes it with used 0.
        (format!("{got:?}"), format!("{:?}", (0u32, 0xeeu8)))
    });
}

#[test]
fn descriptor_loop() {
    case("a descriptor whose next is itself", |e| {
        let b = e.buf(1, false, 0);
        let got = e.walk(&[d(b.gpa(0), 8, NEXT, 0)]);
        // virtio-queue stops after the queue size.
        (
            format!("{got:?}"),
            format!("{:?}", vec![(b.gpa(0), 8u32, false); QSIZE as usize]),
        )
    });
}

#[test]
fn two_descriptor_loop_served() {
    blk_case("a two-descriptor loop at the blk device", |e| {
        let hdr = e.header(VIRTIO_BLK_T_IN, 0);
        let s = e.buf(1, false, 0xff);
        // hdr -> status(W) -> hdr: a readable descriptor after a writable one.
        (
            vec![d(hdr.gpa(0), 16, NEXT, 1), d(s.gpa(0), 1, WRITE | NEXT, 0)],
            (1, VIRTIO_BLK_S_IOERR),
        )
    });
}

#[test]
fn next_out_of_range() {
    case("next beyond the queue size", |e| {
        let b = e.buf(1, false, 0);
        let got = e.walk(&[d(b.gpa(0), 8, NEXT, 200)]);
        (
            format!("{got:?}"),
            format!("{:?}", vec![(b.gpa(0), 8u32, false)]),
        )
    });
}

#[test]
fn chain_length_overflow() {
    case("chain longer than 2^32 bytes", |e| {
        let b = e.buf(1, false, 0);
        let got = e.walk(&[d(b.gpa(0), u32::MAX, NEXT, 1), d(b.gpa(0), 2, 0, 0)]);
        // The descriptor that would take the total past u32 ends the chain.
        (
            format!("{got:?}"),
            format!("{:?}", vec![(b.gpa(0), u32::MAX, false)]),
        )
    });
}

/// Writes `descs` as an indirect table into a granted (on-demand) page at `off`.
fn indirect_page(e: &Env, descs: &[RawDescriptor], off: usize, ro: bool) -> GuestBuffer {
    let t = e.sim.grant(1, ro).unwrap();
    e.sim.write(&t, off, &table_bytes(descs)).unwrap();
    t
}

#[test]
fn indirect_table_in_on_demand_memory_is_served() {
    blk_case("indirect table in on-demand memory", |e| {
        let hdr = e.header(VIRTIO_BLK_T_IN, 0);
        let b = e.buf(1, false, 0);
        let s = e.buf(1, false, 0xff);
        let t = indirect_page(
            e,
            &[
                d(hdr.gpa(0), 16, NEXT, 1),
                d(b.gpa(0), 512, WRITE | NEXT, 2),
                d(s.gpa(0), 1, WRITE, 0),
            ],
            0,
            true,
        );
        (vec![d(t.gpa(0), 48, INDIRECT, 0)], (513, VIRTIO_BLK_S_OK))
    });
}

#[test]
fn indirect_table_at_an_ungranted_ref() {
    case("indirect table not granted", |e| {
        let got = e.walk(&[d(e.ungranted(), 48, INDIRECT, 0)]);
        (format!("{got:?}"), "[]".into())
    });
}

#[test]
fn indirect_table_of_odd_size() {
    case("indirect table of 20 bytes", |e| {
        let b = e.buf(1, false, 0);
        let t = indirect_page(e, &[d(b.gpa(0), 8, 0, 0)], 0, true);
        let got = e.walk(&[d(t.gpa(0), 20, INDIRECT, 0)]);
        (format!("{got:?}"), "[]".into())
    });
}

#[test]
fn indirect_table_of_zero_size() {
    case("indirect table of 0 bytes", |e| {
        let b = e.buf(1, false, 0);
        let t = indirect_page(e, &[d(b.gpa(0), 8, 0, 0)], 0, true);
        let got = e.walk(&[d(t.gpa(0), 0, INDIRECT, 0)]);
        (format!("{got:?}"), "[]".into())
    });
}

#[test]
fn nested_indirect_table() {
    case("indirect inside indirect", |e| {
        let b = e.buf(1, false, 0);
        let inner = indirect_page(e, &[d(b.gpa(0), 8, 0, 0)], 0, true);
        let outer = indirect_page(e, &[d(inner.gpa(0), 16, INDIRECT, 0)], 0, true);
        let got = e.walk(&[d(outer.gpa(0), 16, INDIRECT, 0)]);
        (format!("{got:?}"), "[]".into())
    });
}

#[test]
fn indirect_table_crossing_into_an_ungranted_page() {
    case("indirect table straddling the last granted page", |e| {
        let b = e.buf(1, false, 0);
        // 4 entries from offset 4064: two in the granted page, two in the next (ungranted).
        let t = indirect_page(
            e,
            &[d(b.gpa(0), 8, NEXT, 1), d(b.gpa(8), 8, NEXT, 2)],
            4064,
            true,
        );
        let got = e.walk(&[d(t.gpa(4064), 64, INDIRECT, 0)]);
        // The entries in the granted page are yielded; the third, in the next (ungranted) page,
        // cannot be read and ends the chain.
        (
            format!("{got:?}"),
            format!("{:?}", vec![(b.gpa(0), 8u32, false), (b.gpa(8), 8, false)]),
        )
    });
}

#[test]
fn indirect_table_with_next_out_of_range() {
    case("indirect entry whose next is beyond the table", |e| {
        let b = e.buf(1, false, 0);
        let t = indirect_page(e, &[d(b.gpa(0), 8, NEXT, 9), d(b.gpa(8), 8, 0, 0)], 0, true);
        let got = e.walk(&[d(t.gpa(0), 32, INDIRECT, 0)]);
        (
            format!("{got:?}"),
            format!("{:?}", vec![(b.gpa(0), 8u32, false)]),
        )
    });
}

#[test]
fn indirect_table_revoked_after_pop() {
    case("indirect table revoked before the device reads it", |e| {
        let b = e.buf(1, false, 0);
        let t = indirect_page(e, &[d(b.gpa(0), 8, 0, 0)], 0, true);
        e.sim.end_access(&t).unwrap();
        let got = e.walk(&[d(t.gpa(0), 16, INDIRECT, 0)]);
        (format!("{got:?}"), "[]".into())
    });
}

// ---------------------------------------------------------------------------------------------
// Regions and tables
// ---------------------------------------------------------------------------------------------

fn wire_err(flags: u32, data: u32, gpa: u64, size: u64, offset: u64) -> String {
    RegionDescriptor::from_wire(&WireRegion {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: 0,
        mmap_offset: offset,
        xen_mmap_flags: flags,
        xen_mmap_data: data,
    })
    .map_or_else(|e| format!("{e:?}"), |_| "ok".into())
}

#[test]
fn junk_region_flags() {
    case("unknown flag bits", |_| {
        (
            wire_err(0x2 | 0x40, 1, 0, 4096, 0),
            format!(
                "{:?}",
                DescriptorError::UnknownFlags {
                    flags: 0x42,
                    unknown: 0x40
                }
            ),
        )
    });
}

#[test]
fn foreign_and_grant() {
    case("FOREIGN|GRANT", |_| {
        (
            wire_err(3, 1, 0, 4096, 0),
            format!("{:?}", DescriptorError::ForeignAndGrant { flags: 3 }),
        )
    });
}

#[test]
fn domid_out_of_range() {
    case("domid 0x7ff0 and 0x1_0001", |_| {
        (
            wire_err(2, 0x7ff0, 0, 4096, 0) + &wire_err(1, 0x1_0001, 0, 4096, 0),
            format!("{:?}", DescriptorError::DomidOutOfRange { domid: 0x7ff0 })
                + &format!("{:?}", DescriptorError::DomidOutOfRange { domid: 0x1_0001 }),
        )
    });
}

#[test]
fn grant_region_with_mmap_offset() {
    case("GRANT with mmap_offset", |_| {
        (
            wire_err(2, 1, 0, 4096, 4096),
            format!(
                "{:?}",
                DescriptorError::XenMmapOffset {
                    kind: "GRANT",
                    offset: 4096
                }
            ),
        )
    });
}

#[test]
fn overlapping_regions() {
    case("overlapping on-demand region", |e| {
        let od = e.sim.on_demand_region(e.ring.first_ref + 10, 4);
        let r = XenRegion::new(od, None, Some(&e.sim.dev)).unwrap();
        let got = e
            .table
            .insert(std::sync::Arc::new(r))
            .map_or_else(|x| format!("{x:?}"), |_| "ok".into());
        let mine = e.table.regions()[1].descriptor();
        (
            got,
            format!(
                "{:?}",
                TableError::Overlap {
                    gpa: od.guest_phys_addr,
                    size: 4 * 4096,
                    other_gpa: mine.guest_phys_addr,
                    other_size: mine.size
                }
            ),
        )
    });
}

#[test]
fn region_on_another_device() {
    case("a region on another emulated device", |e| {
        let other = GuestSim::new(1, 8).unwrap();
        let od = other.on_demand_region(1 << 20, 4);
        let r = XenRegion::new(od, None, Some(&other.dev)).unwrap();
        let got = e
            .table
            .insert(std::sync::Arc::new(r))
            .map_or_else(|x| format!("{x:?}"), |_| "ok".into());
        (
            got,
            format!(
                "{:?}",
                TableError::OtherDevice {
                    gpa: od.guest_phys_addr
                }
            ),
        )
    });
}

#[test]
fn removing_a_region_in_use_keeps_in_flight_scopes_working() {
    case("REM of a region an in-flight scope uses", |e| {
        let b = e.buf(1, false, 0x21);
        let old = e.table.clone();
        let mem = RequestMemory::with_strategy(&old, MAP);
        let mut v = [0u8; 4];
        mem.read_slice(&mut v, GuestAddress(b.gpa(0))).unwrap();
        let od = old.regions()[1].descriptor();
        let (without, _) = old.remove(od.guest_phys_addr, od.size).unwrap();
        // The in-flight scope still writes through the region it started with.
        mem.write_slice(&[0x22; 4], GuestAddress(b.gpa(8))).unwrap();
        mem.finish().unwrap();
        // New scopes over the new table see no region there.
        let m2 = RequestMemory::new(&without);
        let got = format!(
            "{:?}",
            m2.read_slice(&mut v, GuestAddress(b.gpa(0))).unwrap_err()
        );
        m2.finish().unwrap();
        assert_eq!(e.sim.read(&b, 8, 4).unwrap(), vec![0x22; 4]);
        (
            got,
            format!(
                "{:?}",
                GuestMemoryError::InvalidGuestAddress(GuestAddress(b.gpa(0)))
            ),
        )
    });
}

#[test]
fn reader_and_writer_over_a_chain_with_a_bad_tail() {
    case(
        "Writer::new over a chain whose second buffer is ungranted",
        |e| {
            let b = e.buf(1, false, 0x55);
            let q = e.queue();
            let chain = q
                .build_desc_chain(&[d(b.gpa(0), 64, WRITE, 0), d(e.ungranted(), 64, WRITE, 0)])
                .unwrap();
            let mem = RequestMemory::new(&e.table);
            let got = match Writer::new(&mem, chain.clone()) {
                Err(virtio_queue::Error::GuestMemoryError(x)) => describe(&x),
                Err(x) => format!("{x:?}"),
                Ok(mut w) => {
                    let _ = w.write(&[0; 1]);
                    "ok".into()
                }
            };
            let r = Reader::new(&mem, chain).map(|r| r.available_bytes());
            mem.finish().unwrap();
            assert_eq!(r.map_err(|x| x.to_string()), Ok(0), "no readable buffers");
            (got, unknown(e.ungranted(), gref_of(e.ungranted())))
        },
    );
}
