//! Requests that wait (emulated GRANT, the vhost crate's `Frontend` over a real socket): a
//! device holds every chain past `serve` and another thread completes them later; used
//! entries in completion order with the bytes written after `serve`, exact Xen syscall counts,
//! backpressure at the per-queue bound, and 0 live mappings after a disconnect with requests
//! still held.

mod common;

use common::ScratchDir;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use xen_vhost_mem::daemon::{
    Batch, HoldError, Request, VhostUserDaemon, VhostUserDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use xen_vhost_mem::testing::driver::{Buf, DriverConfig, GuestMode, VirtioDriver};
use xen_vhost_mem::testing::{EmulatedXen, GuestSim};
use xen_vhost_mem::{RequestMemory, Strategy, XenHandle};

/// Holds every chain, after reading its 16-byte header through the batch's memory.
struct Holding {
    tx: Mutex<Sender<([u8; 16], Request)>>,
    strategy: Strategy,
    max_held: usize,
    max_pages: usize,
    drain: Duration,
}

impl VhostUserDevice for Holding {
    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
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
            let mut hdr = [0u8; 16];
            if let Some(d) = batch.chain(i).and_then(|c| c.clone().next()) {
                batch
                    .memory()
                    .read_slice(&mut hdr, d.addr())
                    .expect("header through the batch scope");
            }
            let req = batch.hold_with(i, self.strategy).expect("hold");
            assert_eq!(
                batch.hold(i).unwrap_err(),
                HoldError::HeldTwice { index: i }
            );
            self.tx
                .lock()
                .unwrap()
                .send((hdr, req))
                .expect("test alive");
        }
    }
    fn max_held(&self, _queue: usize) -> usize {
        self.max_held
    }
    fn drain_timeout(&self, _queue: usize) -> Duration {
        self.drain
    }
    fn max_held_pages(&self, _queue: usize) -> usize {
        self.max_pages
    }
}

struct Setup<D: VhostUserDevice = Holding> {
    _dir: ScratchDir,
    emu: Arc<EmulatedXen>,
    dev: XenHandle,
    daemon: Arc<VhostUserDaemon<D>>,
    thread: Option<std::thread::JoinHandle<()>>,
    drv: VirtioDriver,
    held: Receiver<([u8; 16], Request)>,
}

fn setup(tag: &str, strategy: Strategy, max_held: usize) -> Setup {
    setup_draining(tag, strategy, max_held, Duration::from_secs(1))
}

fn setup_draining(tag: &str, strategy: Strategy, max_held: usize, drain: Duration) -> Setup {
    setup_with(tag, strategy, max_held, usize::MAX, drain)
}

fn setup_with(
    tag: &str,
    strategy: Strategy,
    max_held: usize,
    max_pages: usize,
    drain: Duration,
) -> Setup {
    let (tx, held) = channel();
    let device = Holding {
        tx: Mutex::new(tx),
        strategy,
        max_held,
        max_pages,
        drain,
    };
    start(tag, device, held)
}

/// Serves `device` on one connection of a driver over emulated GRANT memory.
fn start<D: VhostUserDevice>(
    tag: &str,
    device: D,
    held: Receiver<([u8; 16], Request)>,
) -> Setup<D> {
    let cfg = DriverConfig {
        mode: GuestMode::Grant,
        queues: 1,
        depth: 16,
        max_data: 4096,
        ..DriverConfig::default()
    };
    let emu = Arc::new(EmulatedXen::new(cfg.emulation_pages()).expect("emulation"));
    let dev = XenHandle::new(emu.clone());
    let dir = ScratchDir::new(tag);
    let path = dir.0.join("held.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let daemon = Arc::new(VhostUserDaemon::new(Arc::new(device)).with_xen(dev.clone()));
    let d = daemon.clone();
    let thread = std::thread::spawn(move || d.serve(&listener, Some(1)).expect("serve"));
    let guest = GuestSim {
        emu: emu.clone(),
        dev: dev.clone(),
        domid: 1,
    };
    let drv = VirtioDriver::connect_granting(&path, cfg, Box::new(guest)).expect("connect");
    Setup {
        _dir: dir,
        emu,
        dev,
        daemon,
        thread: Some(thread),
        drv,
        held,
    }
}

/// Publishes `n` requests (header `i` repeated, 16 bytes to write, 1 status byte) and kicks
/// once; returns their slots.
fn publish<D: VhostUserDevice>(s: &mut Setup<D>, n: usize) -> Vec<usize> {
    let mut slots = Vec::new();
    for i in 0..n {
        let (slot, b) = s.drv.take_slot(0).expect("free slot");
        s.drv.write(b.header, &[i as u8; 16]).expect("header");
        s.drv.write(b.data_in, &[0xee; 16]).expect("clear");
        s.drv
            .publish(
                0,
                slot,
                &[
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
                ],
            )
            .expect("publish");
        slots.push(slot);
    }
    s.drv.kick(0, n as u16).expect("kick");
    slots
}

/// What a device does when a held request's data arrives: header reversed into the data
/// buffer, status 0, through the request's own memory.
fn answer(hdr: [u8; 16], req: &Request) -> u32 {
    let d = req.descriptors();
    let scope = req.scope().expect("held");
    let mem = scope.memory().expect("memory");
    // Both written buffers fetched in one go (one grant copy, or one map).
    mem.prefetch(&[
        (d[1].addr(), d[1].len() as usize, Permissions::Write),
        (d[2].addr(), d[2].len() as usize, Permissions::Write),
    ])
    .expect("prefetch");
    let mut out = hdr;
    out.reverse();
    mem.write_slice(&out, d[1].addr()).expect("data");
    mem.write_obj(0u8, d[2].addr()).expect("status");
    17
}

fn recv(s: &Setup) -> ([u8; 16], Request) {
    s.held
        .recv_timeout(Duration::from_secs(10))
        .expect("a held request")
}

#[test]
fn held_requests_complete_later_from_another_thread_in_completion_order() {
    let mut s = setup("held-order", Strategy::GrantCopy, 64);
    let before = s.dev.counters().snapshot();
    let slots = publish(&mut s, 8);
    let held: Vec<_> = (0..8).map(|_| recv(&s)).collect();
    // Served: nothing used yet.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.daemon.stats().snapshot().requests, 0);
    // Completed on another thread, last held first.
    let completer = std::thread::spawn(move || {
        for (hdr, req) in held.into_iter().rev() {
            let len = answer(hdr, &req);
            req.complete(len).expect("complete");
        }
    });
    completer.join().expect("completer");
    let mut seen = Vec::new();
    while seen.len() < 8 {
        seen.extend(s.drv.wait(0, Duration::from_secs(10)).expect("used"));
    }
    // Used entries in completion order: the slots in reverse.
    let order: Vec<usize> = seen.iter().map(|c| c.slot).collect();
    let expect: Vec<usize> = slots.iter().rev().copied().collect();
    assert_eq!(order, expect);
    for (i, &slot) in slots.iter().enumerate() {
        let b = s.drv.slot(0, slot);
        let mut data = [0u8; 16];
        s.drv.read(b.data_in, &mut data).expect("read");
        assert_eq!(data, [i as u8; 16], "slot {slot}");
        let mut st = [9u8];
        s.drv.read(b.status, &mut st).expect("status");
        assert_eq!(st, [0]);
    }
    assert!(seen.iter().all(|c| c.len == 17));
    let used = s.dev.counters().snapshot().since(&before);
    let stats = s.daemon.stats().snapshot();
    // One batch, unless the worker woke while the eight were being published.
    assert_eq!(stats.requests, 8);
    assert!((1..=8).contains(&stats.batches));
    // Each batch: one grant copy bringing in its chains' pages (headers read in `serve`);
    // nothing written through it, so no copy back. Each held request: its two written pages
    // copied in by its prefetch (one ioctl: the bytes it does not write must reach the guest
    // unchanged) and back at `complete` (one ioctl).
    assert_eq!(used.grant_copies, stats.batches + 2 * 8);
    assert_eq!(used.syscalls(), stats.batches + 2 * 8);
    assert_eq!(s.emu.live_mappings(), RING_MAPS);
    drop(s.drv);
    s.thread.take().expect("daemon").join().expect("daemon");
    assert_eq!(s.dev.counters().live_mappings(), 0);
    assert_eq!(s.emu.live_mappings(), 0);
    assert_eq!(s.emu.live_grant_maps(), 0);
}

/// Mappings a connection keeps between requests: its one queue's descriptor table, avail
/// and used rings, each a GRANT region mapped in advance.
const RING_MAPS: usize = 3;

#[test]
fn disconnect_releases_held_requests_with_nothing_mapped() {
    let mut s = setup("held-disconnect", Strategy::Map, 64);
    publish(&mut s, 6);
    let held: Vec<_> = (0..6).map(|_| recv(&s)).collect();
    // Four of them touch their memory (mapped: gntdev maps live while held).
    let before = s.dev.counters().snapshot();
    for (hdr, req) in &held[..4] {
        answer(*hdr, req);
    }
    let used = s.dev.counters().snapshot().since(&before);
    // Per request: data and status pages in one writable map (MAP_GRANT_REF + mmap).
    assert_eq!((used.ioctls, used.mmaps, used.munmaps), (4, 4, 0));
    assert_eq!(s.dev.counters().live_mappings() as usize, RING_MAPS + 4);
    assert_eq!(s.emu.live_mappings(), RING_MAPS + 4);
    // The frontend goes away with six requests held by the device.
    drop(s.drv);
    s.thread.take().expect("daemon").join().expect("daemon");
    assert_eq!(s.dev.counters().live_mappings(), 0);
    assert_eq!(s.emu.live_mappings(), 0);
    assert_eq!(s.emu.live_grant_maps(), 0);
    // The device completes them afterwards: nothing is written, nothing fetched.
    let before = s.dev.counters().snapshot();
    for (_, req) in held {
        let head = req.head();
        assert!(matches!(req.scope(), Err(HoldError::Gone { queue: 0, head: h }) if h == head));
        assert_eq!(req.complete(1), Err(HoldError::Gone { queue: 0, head }));
    }
    assert_eq!(s.dev.counters().snapshot().since(&before).syscalls(), 0);
    assert_eq!(s.daemon.stats().snapshot().requests, 0);
}

#[test]
fn at_the_bound_the_worker_stops_popping_and_resumes_on_completion() {
    let mut s = setup("held-bound", Strategy::GrantCopy, 4);
    let slots = publish(&mut s, 10);
    let first: Vec<_> = (0..4).map(|_| recv(&s)).collect();
    // Four held, the bound: the other six wait in the avail ring.
    std::thread::sleep(Duration::from_millis(100));
    assert!(s.held.try_recv().is_err(), "popped past the bound");
    // Completing two makes room for two more, and so on; nothing fails.
    let mut done = 0;
    let mut pending = first;
    let mut seen = Vec::new();
    while done < 10 {
        let (hdr, req) = pending.remove(0);
        let len = answer(hdr, &req);
        req.complete(len).expect("complete");
        done += 1;
        while let Ok(r) =
            s.held
                .recv_timeout(Duration::from_millis(if pending.is_empty() && done < 10 {
                    10_000
                } else {
                    20
                }))
        {
            pending.push(r);
        }
        assert!(pending.len() <= 4, "{} held", pending.len());
    }
    while seen.len() < 10 {
        seen.extend(s.drv.wait(0, Duration::from_secs(10)).expect("used"));
    }
    let order: Vec<usize> = seen.iter().map(|c| c.slot).collect();
    assert_eq!(order, slots);
    for (i, &slot) in slots.iter().enumerate() {
        let mut data = [0u8; 16];
        s.drv
            .read(s.drv.slot(0, slot).data_in, &mut data)
            .expect("read");
        assert_eq!(data, [i as u8; 16]);
    }
    assert_eq!(s.daemon.stats().snapshot().requests, 10);
    drop(s.drv);
    s.thread.take().expect("daemon").join().expect("daemon");
    assert_eq!(s.emu.live_mappings(), 0);
}

#[test]
fn get_vring_base_waits_for_held_requests_to_complete() {
    use vhost::VhostBackend;
    let mut s = setup("held-drain", Strategy::GrantCopy, 64);
    let slots = publish(&mut s, 4);
    let held: Vec<_> = (0..4).map(|_| recv(&s)).collect();
    let completer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        for (hdr, req) in held {
            let len = answer(hdr, &req);
            req.complete(len).expect("complete before the queue stops");
        }
    });
    // Answered only once the four completed: the base is after them and their used entries
    // are in the ring.
    let base = s.drv.frontend().get_vring_base(0).expect("GET_VRING_BASE");
    completer.join().expect("completer");
    assert_eq!(base, 4);
    let seen = s.drv.wait(0, Duration::from_secs(1)).expect("used");
    let order: Vec<usize> = seen.iter().map(|c| c.slot).collect();
    assert_eq!(order, slots);
    assert_eq!(s.daemon.stats().snapshot().requests, 4);
    drop(s.drv);
    s.thread.take().expect("daemon").join().expect("daemon");
    assert_eq!(s.emu.live_mappings(), 0);
}

#[test]
fn get_vring_base_releases_what_does_not_complete_in_time() {
    use vhost::VhostBackend;
    let mut s = setup_draining(
        "held-drain-timeout",
        Strategy::Map,
        64,
        Duration::from_millis(50),
    );
    publish(&mut s, 3);
    let held: Vec<_> = (0..3).map(|_| recv(&s)).collect();
    for (hdr, req) in &held {
        answer(*hdr, req);
    }
    assert_eq!(s.dev.counters().live_mappings() as usize, RING_MAPS + 3);
    let base = s.drv.frontend().get_vring_base(0).expect("GET_VRING_BASE");
    // The three were popped; none completed: released, nothing of them mapped.
    assert_eq!(base, 3);
    assert_eq!(s.dev.counters().live_mappings() as usize, RING_MAPS);
    for (_, req) in held {
        let head = req.head();
        assert_eq!(req.complete(1), Err(HoldError::Gone { queue: 0, head }));
    }
    assert_eq!(s.daemon.stats().snapshot().requests, 0);
    drop(s.drv);
    s.thread.take().expect("daemon").join().expect("daemon");
    assert_eq!(s.emu.live_mappings(), 0);
}

#[test]
fn pages_held_bound_popping_too() {
    let mut s = setup_with("held-pages", Strategy::Map, 64, 4, Duration::from_secs(1));
    publish(&mut s, 2);
    let first: Vec<_> = (0..2).map(|_| recv(&s)).collect();
    // Each maps its data and status pages (2 pages): 4 held, the bound.
    for (hdr, req) in &first {
        answer(*hdr, req);
    }
    assert_eq!(s.dev.counters().live_mappings() as usize, RING_MAPS + 2);
    let later = publish(&mut s, 2);
    std::thread::sleep(Duration::from_millis(100));
    assert!(s.held.try_recv().is_err(), "popped past the page bound");
    // One completes: 2 pages held, room again; the two waiting chains are popped.
    let mut first = first.into_iter();
    let (_, r0) = first.next().expect("first");
    r0.complete(17).expect("complete");
    let next: Vec<_> = (0..2).map(|_| recv(&s)).collect();
    let heads: Vec<u16> = next.iter().map(|(_, r)| r.head()).collect();
    assert_eq!(
        heads,
        later.iter().map(|&sl| (sl * 3) as u16).collect::<Vec<_>>()
    );
    for (hdr, req) in first.chain(next) {
        let len = answer(hdr, &req);
        req.complete(len).expect("complete");
    }
    let mut seen = Vec::new();
    while seen.len() < 4 {
        seen.extend(s.drv.wait(0, Duration::from_secs(10)).expect("used"));
    }
    drop(s.drv);
    s.thread.take().expect("daemon").join().expect("daemon");
    assert_eq!(s.emu.live_mappings(), 0);
}

/// Holds every chain and completes them on its worker when its eventfd (one of the queue's
/// device events) is written: how an io_uring or a host-socket device runs without a thread
/// of its own.
struct EventDriven {
    event: EventFd,
    held: Mutex<Vec<([u8; 16], Request)>>,
    /// Threads `handle_event` ran on, and how many times `quiesce` was called.
    ran_on: Mutex<Vec<String>>,
    quiesced: AtomicUsize,
}

impl VhostUserDevice for EventDriven {
    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
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
            let mut hdr = [0u8; 16];
            if let Some(d) = batch.chain(i).and_then(|c| c.clone().next()) {
                batch
                    .memory()
                    .read_slice(&mut hdr, d.addr())
                    .expect("header through the batch scope");
            }
            let req = batch.hold_with(i, Strategy::GrantCopy).expect("hold");
            self.held.lock().unwrap().push((hdr, req));
        }
    }
    fn queue_events(&self, _queue: usize) -> Vec<(RawFd, u64)> {
        vec![(self.event.as_raw_fd(), 7)]
    }
    fn handle_event(&self, queue: usize, token: u64) {
        assert_eq!((queue, token), (0, 7));
        let _ = self.event.read();
        let name = std::thread::current().name().unwrap_or("").to_string();
        self.ran_on.lock().unwrap().push(name);
        for (hdr, req) in self.held.lock().unwrap().drain(..).rev() {
            let len = answer(hdr, &req);
            req.complete(len).expect("complete");
        }
    }
    fn quiesce(&self, _queue: usize) {
        self.quiesced.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_device_event_completes_held_requests_on_the_queue_worker() {
    let device = EventDriven {
        event: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        held: Mutex::new(Vec::new()),
        ran_on: Mutex::new(Vec::new()),
        quiesced: AtomicUsize::new(0),
    };
    let (_tx, rx) = channel();
    let mut s = start("held-event", device, rx);
    let slots = publish(&mut s, 8);
    let dev = s.daemon.device().clone();
    let t0 = std::time::Instant::now();
    while dev.held.lock().unwrap().len() < 8 {
        assert!(t0.elapsed() < Duration::from_secs(10), "not held");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.daemon.stats().snapshot().requests, 0);
    let calls = s.daemon.stats().snapshot().calls;
    dev.event.write(1).expect("event");
    let mut seen = Vec::new();
    while seen.len() < 8 {
        seen.extend(s.drv.wait(0, Duration::from_secs(10)).expect("used"));
    }
    // Completed in reverse on the worker thread, added in that order, one call for all.
    let order: Vec<usize> = seen.iter().map(|c| c.slot).collect();
    assert_eq!(order, slots.iter().rev().copied().collect::<Vec<_>>());
    assert_eq!(dev.ran_on.lock().unwrap().as_slice(), ["vq0"]);
    // The call is counted after it is signalled; the driver may see the entries first.
    let t0 = std::time::Instant::now();
    while s.daemon.stats().snapshot().calls == calls && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = s.daemon.stats().snapshot();
    assert_eq!(stats.requests, 8);
    assert_eq!(stats.calls, calls + 1);
    for (i, &slot) in slots.iter().enumerate() {
        let mut data = [0u8; 16];
        s.drv
            .read(s.drv.slot(0, slot).data_in, &mut data)
            .expect("read");
        assert_eq!(data, [i as u8; 16]);
    }
    // Two more held at the disconnect: quiesced once, then released, nothing mapped.
    publish(&mut s, 2);
    let t0 = std::time::Instant::now();
    while dev.held.lock().unwrap().len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "not held");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(dev.quiesced.load(Ordering::SeqCst), 0);
    drop(s.drv);
    s.thread.take().expect("daemon").join().expect("daemon");
    assert_eq!(dev.quiesced.load(Ordering::SeqCst), 1);
    assert_eq!(s.emu.live_mappings(), 0);
    assert_eq!(s.emu.live_grant_maps(), 0);
    for (_, req) in dev.held.lock().unwrap().drain(..) {
        let head = req.head();
        assert_eq!(req.complete(1), Err(HoldError::Gone { queue: 0, head }));
    }
}
