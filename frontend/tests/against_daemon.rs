//! The frontend's vhost-user side against our rng daemon, without Xen: the daemon runs on the
//! library's emulated Xen device, and the test plays Linux's virtio-rng driver under grant DMA
//! (a split ring laid out as Linux lays it out, every address a grant address). What it
//! proves: the regions `grant_regions` builds from the queue registers are accepted by the
//! daemon (rings in advance at mid-page addresses, the rest on demand), a kick is served
//! into an on-demand buffer, the call arrives, and nothing stays mapped once the frontend
//! disconnects.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use xen_mmio_frontend::backend::{Backend, Memory, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use xen_mmio_frontend::mmio::QueueRegs;
use xen_vhost_mem::daemon::VhostUserDaemon;
use xen_vhost_mem::devices::rng::RngDevice;
use xen_vhost_mem::testing::GuestSim;

const Q: u16 = 16;

fn wait_readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

#[test]
fn linux_like_grant_ring_is_served_by_the_daemon() {
    let domid = 3;
    let guest = GuestSim::new(domid, 64).expect("emulation");
    // Linux's split ring in one DMA allocation: descriptor table at the start of ref R,
    // avail right after it (mid-page), used on the next page: two consecutive refs.
    let ring = guest.grant(2, false).expect("ring");
    let buf = guest.grant(1, false).expect("buffer");
    let q = QueueRegs {
        max: 256,
        num: Q,
        ready: true,
        desc: ring.gpa(0),
        driver: ring.gpa(16 * Q as usize),
        device: ring.gpa(4096),
    };

    let dir = std::env::temp_dir().join(format!("xmf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let sock = dir.join("rng.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let rng = RngDevice::open(Path::new("/dev/urandom")).expect("rng");
    let daemon = Arc::new(VhostUserDaemon::new(Arc::new(rng)).with_xen(guest.dev.clone()));
    let d = daemon.clone();
    let t = std::thread::spawn(move || d.serve(&listener, Some(1)));

    let mut b = Backend::connect(&sock, domid, 1).expect("connect");
    let fd = std::fs::File::open("/dev/null").expect("/dev/null");
    let features = VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM;
    b.start_with_fd(&Memory::Grant, &fd, features, &[q], &[0])
        .expect("the daemon takes the grant regions and the ring");
    assert_eq!(b.started(), &[0]);

    // One device-writable descriptor of 64 bytes at an on-demand grant address.
    let mut desc = Vec::new();
    desc.extend_from_slice(&buf.gpa(0x100).to_le_bytes());
    desc.extend_from_slice(&64u32.to_le_bytes());
    desc.extend_from_slice(&2u16.to_le_bytes()); // VRING_DESC_F_WRITE
    desc.extend_from_slice(&0u16.to_le_bytes());
    guest.write(&ring, 0, &desc).expect("desc");
    // avail: flags 0, idx 1, ring[0] = 0.
    guest
        .write(&ring, 16 * Q as usize, &[0, 0, 1, 0, 0, 0])
        .expect("avail");
    b.kick(0).expect("kick");

    let call = b.call_fds()[0];
    assert!(wait_readable(call, 10_000), "no call from the daemon");
    assert!(b.take_call(0));
    let used = guest.read(&ring, 4096, 12).expect("used");
    assert_eq!(u16::from_le_bytes([used[2], used[3]]), 1, "used idx");
    assert_eq!(
        u32::from_le_bytes([used[4], used[5], used[6], used[7]]),
        0,
        "used id"
    );
    assert_eq!(
        u32::from_le_bytes([used[8], used[9], used[10], used[11]]),
        64,
        "used len"
    );
    let bytes = guest.read(&buf, 0x100, 64).expect("buffer");
    assert!(
        bytes.iter().any(|&x| x != 0),
        "the daemon wrote random bytes"
    );
    assert_eq!(
        guest.read(&buf, 0xf0, 16).expect("before"),
        vec![0; 16],
        "nothing before the buffer"
    );

    // Stopping the queue answers its base; the frontend going away ends the connection
    // and the daemon lets go of every mapping.
    assert_eq!(b.stop().expect("stop"), vec![(0, 1)]);
    drop(b);
    let served = t.join().expect("daemon thread");
    assert!(served.is_ok(), "{served:?}");
    guest.assert_nothing_mapped();
    let _ = std::fs::remove_dir_all(&dir);
}
