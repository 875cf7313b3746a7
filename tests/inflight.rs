//! INFLIGHT_SHMFD with the vhost crate's `Frontend` over a real socket: GET_INFLIGHT_FD gives a
//! sealed memfd in the split-queue layout; entries are marked at pop and cleared at used in
//! the spec's order; after the connection ends with requests in flight, a frontend that
//! reconnects with the same region (rings kept, base at the used index) gets them resubmitted
//! in counter order before any new chain.

mod common;

use common::ScratchDir;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::Bytes;
use xen_vhost_mem::daemon::{
    Batch, Request, VhostUserDaemon, VhostUserDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use xen_vhost_mem::testing::driver::{Buf, DriverConfig, GuestMode, VirtioDriver};
use xen_vhost_mem::RequestMemory;

enum Event {
    Held(Request),
    Resubmitted(Request),
}

/// Holds every chain; offers INFLIGHT_SHMFD.
struct Tracking {
    tx: Mutex<Sender<Event>>,
}

impl VhostUserDevice for Tracking {
    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }
    fn serve_chain(
        &self,
        _queue: usize,
        _mem: &RequestMemory<'_>,
        _chain: &xen_vhost_mem::daemon::Chain<'_, '_>,
    ) -> u32 {
        unreachable!("serve_batch holds every chain")
    }
    fn serve_batch(&self, _queue: usize, batch: &mut Batch<'_, '_, '_>) {
        for i in 0..batch.len() {
            let req = batch.hold(i).expect("hold");
            self.tx
                .lock()
                .unwrap()
                .send(Event::Held(req))
                .expect("test alive");
        }
    }
    fn resubmit(&self, _queue: usize, request: Request) {
        self.tx
            .lock()
            .unwrap()
            .send(Event::Resubmitted(request))
            .expect("test alive");
    }
}

/// Header reversed into the data buffer, status 0: through the request's own memory.
fn answer(req: Request) {
    let d = req.descriptors().to_vec();
    assert_eq!(d.len(), 3, "header, data, status");
    {
        let scope = req.scope().expect("held");
        let mem = scope.memory().expect("memory");
        let mut hdr = [0u8; 16];
        mem.read_slice(&mut hdr, d[0].addr()).expect("header");
        hdr.reverse();
        mem.write_slice(&hdr, d[1].addr()).expect("data");
        mem.write_obj(0u8, d[2].addr()).expect("status");
    }
    req.complete(17).expect("complete");
}

fn publish(drv: &mut VirtioDriver, tags: &[u8]) -> Vec<usize> {
    let mut slots = Vec::new();
    for &t in tags {
        let (slot, b) = drv.take_slot(0).expect("slot");
        drv.write(b.header, &[t; 16]).expect("header");
        let bufs = [
            Buf {
                gpa: b.header,
                len: 16,
                write: false,
            },
            Buf {
                gpa: b.data_in,
                len: 16,
                write: true,
            },
            Buf {
                gpa: b.status,
                len: 1,
                write: true,
            },
        ];
        drv.publish(0, slot, &bufs).expect("publish");
        slots.push(slot);
    }
    drv.kick(0, tags.len() as u16).expect("kick");
    slots
}

fn held(rx: &Receiver<Event>) -> Request {
    match rx.recv_timeout(Duration::from_secs(10)).expect("event") {
        Event::Held(r) => r,
        Event::Resubmitted(r) => panic!("resubmitted {} where a new chain was due", r.head()),
    }
}

/// The queue's area of the region: header fields and per-descriptor (inflight, counter).
struct View {
    version: u16,
    desc_num: u16,
    last_batch_head: u16,
    used_idx: u16,
}

fn u16_at(f: &File, off: u64) -> u16 {
    let mut b = [0u8; 2];
    f.read_exact_at(&mut b, off).expect("read region");
    u16::from_le_bytes(b)
}

fn view(f: &File) -> View {
    View {
        version: u16_at(f, 8),
        desc_num: u16_at(f, 10),
        last_batch_head: u16_at(f, 12),
        used_idx: u16_at(f, 14),
    }
}

fn desc_state(f: &File, head: u16) -> (u8, u64) {
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, 16 + 16 * u64::from(head))
        .expect("read region");
    let mut c = [0u8; 8];
    c.copy_from_slice(&b[8..]);
    (b[0], u64::from_le_bytes(c))
}

fn data_of(drv: &VirtioDriver, slot: usize) -> [u8; 16] {
    let mut d = [0u8; 16];
    drv.read(drv.slot(0, slot).data_in, &mut d).expect("read");
    d
}

#[test]
fn requests_in_flight_are_tracked_and_resubmitted_in_counter_order_after_a_reconnect() {
    let dir = ScratchDir::new("inflight");
    let path = dir.0.join("inflight.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let (tx, rx) = channel();
    let daemon = Arc::new(VhostUserDaemon::new(Arc::new(Tracking {
        tx: Mutex::new(tx),
    })));
    let d = daemon.clone();
    let t = std::thread::spawn(move || d.serve(&listener, Some(2)).expect("serve"));
    let mut drv = VirtioDriver::connect(
        &path,
        DriverConfig {
            mode: GuestMode::Unix,
            queues: 1,
            depth: 8,
            max_data: 4096,
            inflight: true,
            ..DriverConfig::default()
        },
    )
    .expect("connect");
    let (info, file) = drv.inflight_region().expect("INFLIGHT_SHMFD negotiated");
    let region = file.try_clone().expect("dup");
    // One queue of 256: a 16-byte header and 256 16-byte states, rounded up to 64 bytes.
    assert_eq!((info.mmap_size, info.mmap_offset), (4160, 0));
    assert_eq!((info.num_queues, info.queue_size), (1, 256));
    assert_eq!(region.metadata().expect("stat").len(), 4160);
    // SAFETY: fcntl on a descriptor we own.
    let seals = unsafe { libc::fcntl(region.as_raw_fd(), libc::F_GET_SEALS) };
    assert_eq!(
        seals,
        libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL
    );
    // The queue's worker sets its area up when it starts.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while view(&region).version == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let v = view(&region);
    assert_eq!((v.version, v.desc_num, v.used_idx), (1, 256, 0));

    // Three requests popped: marked in flight, counters in pop order.
    let slots = publish(&mut drv, &[1, 2, 3]);
    let reqs: Vec<Request> = (0..3).map(|_| held(&rx)).collect();
    let heads: Vec<u16> = reqs.iter().map(Request::head).collect();
    assert_eq!(
        heads,
        slots.iter().map(|&s| (s * 3) as u16).collect::<Vec<_>>()
    );
    let states: Vec<(u8, u64)> = heads.iter().map(|&h| desc_state(&region, h)).collect();
    assert_eq!(states, [(1, 1), (1, 2), (1, 3)]);
    // The middle one completes: cleared, and the header says where the used ring is.
    let mut reqs = reqs.into_iter();
    let (r1, r2, r3) = (
        reqs.next().unwrap(),
        reqs.next().unwrap(),
        reqs.next().unwrap(),
    );
    answer(r2);
    let done = drv.wait(0, Duration::from_secs(10)).expect("used");
    assert_eq!(done.iter().map(|c| c.slot).collect::<Vec<_>>(), [slots[1]]);
    let v = view(&region);
    assert_eq!((v.last_batch_head, v.used_idx), (heads[1], 1));
    assert_eq!(desc_state(&region, heads[1]).0, 0);
    assert_eq!(desc_state(&region, heads[0]), (1, 1));
    assert_eq!(desc_state(&region, heads[2]), (1, 3));

    // The connection ends with two in flight (the daemon releases them: nothing mapped, and
    // completing them now writes nothing).
    drv.disconnect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while r1.scope().is_ok() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let gone = |r: Request| r.complete(1).is_err();
    assert!(gone(r1) && gone(r3));
    assert_eq!(
        desc_state(&region, heads[0]).0,
        1,
        "still in flight for the next one"
    );

    // The frontend comes back with the same region and rings: the two are resubmitted, in
    // counter order, before anything new.
    drv.reconnect_keeping(&path).expect("reconnect");
    let mut again = Vec::new();
    for _ in 0..2 {
        match rx.recv_timeout(Duration::from_secs(10)).expect("event") {
            Event::Resubmitted(r) => again.push(r),
            Event::Held(r) => panic!("new chain {} before the resubmitted ones", r.head()),
        }
    }
    assert_eq!(
        again.iter().map(Request::head).collect::<Vec<_>>(),
        [heads[0], heads[2]]
    );
    assert_eq!(daemon.stats().snapshot().resubmitted, 2);
    for r in again {
        answer(r);
    }
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.extend(drv.wait(0, Duration::from_secs(10)).expect("used"));
    }
    assert_eq!(
        seen.iter().map(|c| c.slot).collect::<Vec<_>>(),
        [slots[0], slots[2]]
    );
    assert_eq!(data_of(&drv, slots[0]), [1; 16]);
    assert_eq!(data_of(&drv, slots[2]), [3; 16]);
    // A new chain after them: counter 4 goes on from the region's highest.
    let s4 = publish(&mut drv, &[4]);
    let r4 = held(&rx);
    assert_eq!(desc_state(&region, r4.head()), (1, 4));
    answer(r4);
    let done = drv.wait(0, Duration::from_secs(10)).expect("used");
    assert_eq!(done.iter().map(|c| c.slot).collect::<Vec<_>>(), s4);
    assert_eq!(data_of(&drv, s4[0]), [4; 16]);
    let v = view(&region);
    assert_eq!(v.used_idx, 4);
    assert!((0..256).all(|h| desc_state(&region, h).0 == 0));
    drop(drv);
    t.join().expect("daemon");
}

/// The blk daemon offers INFLIGHT_SHMFD; a write that the region shows in flight when a
/// frontend comes back (the daemon died after popping it) is done then, before new chains.
#[test]
fn blk_resubmits_a_write_found_in_flight() {
    use xen_vhost_mem::devices::blk::{
        BlkConfig, BlkDevice, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    let dir = ScratchDir::new("inflight-blk");
    let image = dir.0.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .expect("image");
    let path = dir.0.join("blk.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let blk = BlkDevice::open(&image, BlkConfig::default()).expect("blk");
    let daemon = Arc::new(VhostUserDaemon::new(Arc::new(blk)));
    let d = daemon.clone();
    let t = std::thread::spawn(move || d.serve(&listener, Some(2)).expect("serve"));
    let mut drv = VirtioDriver::connect(
        &path,
        DriverConfig {
            mode: GuestMode::Unix,
            queues: 1,
            depth: 8,
            max_data: 4096,
            inflight: true,
            ..DriverConfig::default()
        },
    )
    .expect("connect");
    let region = drv
        .inflight_region()
        .expect("blk offers INFLIGHT_SHMFD")
        .1
        .try_clone()
        .expect("dup");
    // One request served first (the area is set up and in use).
    let (slot0, b0) = drv.take_slot(0).expect("slot");
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    drv.write(b0.header, &hdr).expect("header");
    let bufs = [
        Buf {
            gpa: b0.header,
            len: 16,
            write: false,
        },
        Buf {
            gpa: b0.data_in,
            len: 4096,
            write: true,
        },
        Buf {
            gpa: b0.status,
            len: 1,
            write: true,
        },
    ];
    drv.publish(0, slot0, &bufs).expect("publish");
    drv.kick(0, 1).expect("kick");
    let done = drv.wait(0, Duration::from_secs(10)).expect("used");
    assert_eq!(done.iter().map(|c| c.slot).collect::<Vec<_>>(), [slot0]);
    assert_eq!(view(&region).used_idx, 1);
    drv.disconnect();
    // Once the daemon has ended the connection (its workers joined), nothing serves the ring.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while daemon.stats().snapshot().connections < 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    // What a daemon that popped a write and died leaves: the chain in the avail ring, its
    // head marked in flight (counter 2: the read was 1), the used index where it was.
    let (slot, b) = drv.take_slot(0).expect("slot");
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    hdr[8..].copy_from_slice(&16u64.to_le_bytes());
    drv.write(b.header, &hdr).expect("header");
    drv.write(b.data_out, &[0x77; 4096]).expect("data");
    drv.write(b.status, &[0xff]).expect("status");
    let bufs = [
        Buf {
            gpa: b.header,
            len: 16,
            write: false,
        },
        Buf {
            gpa: b.data_out,
            len: 4096,
            write: false,
        },
        Buf {
            gpa: b.status,
            len: 1,
            write: true,
        },
    ];
    drv.publish(0, slot, &bufs).expect("publish");
    let head = (slot * 3) as u64;
    let mut state = [0u8; 16];
    state[0] = 1;
    state[8..].copy_from_slice(&2u64.to_le_bytes());
    region
        .write_all_at(&state, 16 + 16 * head)
        .expect("mark in flight");
    drv.reconnect_keeping(&path).expect("reconnect");
    let done = drv.wait(0, Duration::from_secs(10)).expect("used");
    assert_eq!(
        done.iter().map(|c| (c.slot, c.len)).collect::<Vec<_>>(),
        [(slot, 1)]
    );
    let mut st = [0xffu8];
    drv.read(b.status, &mut st).expect("status");
    assert_eq!(st, [VIRTIO_BLK_S_OK]);
    assert_eq!(daemon.stats().snapshot().resubmitted, 1);
    let img = std::fs::read(&image).expect("image");
    assert!(img[16 * 512..16 * 512 + 4096].iter().all(|&x| x == 0x77));
    assert_eq!(desc_state(&region, head as u16).0, 0);
    assert_eq!(view(&region).used_idx, 2);
    drop(drv);
    t.join().expect("daemon");
}
