//! A guest's first request is not lost to a daemon that reads kicks before it has taken
//! SET_VRING_ENABLE, without Xen.
//!
//! Found in the HVM lab: Linux's virtio-rng asks for bytes the moment DRIVER_OK is written,
//! while a daemon without REPLY_ACK (vhost-device-rng 0.1.0 on vhost-user-backend 0.10) is
//! still reading the start messages. Its worker read that kick while the queue was not yet
//! enabled and dropped it, and the guest's request waited for ever. The daemon here does
//! the same on purpose: no REPLY_ACK, every message handled 30 ms late, and a worker that
//! drops a kick it reads while the queue is disabled. The frontend must still get a kick to
//! it once the queue is enabled.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xen_mmio_frontend::backend::{Backend, Memory, VIRTIO_F_VERSION_1};
use xen_mmio_frontend::mmio::QueueRegs;

const GET_FEATURES: u32 = 1;
const SET_VRING_KICK: u32 = 12;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_VRING_ENABLE: u32 = 18;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const XEN_MMAP: u64 = 1 << 17;

/// One message: request, body and the fds that came with it.
struct Msg {
    req: u32,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

fn recv(sock: &mut UnixStream) -> Option<Msg> {
    let mut hdr = [0u8; 12];
    let mut iov = libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    };
    let mut cmsg = [0u64; 32];
    // SAFETY: a zeroed msghdr is valid; its pointers are set to live buffers below.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cmsg.as_mut_ptr().cast();
    mh.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: `mh` points at `iov` (12 writable bytes) and `cmsg`, both live for the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_WAITALL) };
    if n != 12 {
        return None;
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `cmsg`, as CMSG_* define.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let mut body = vec![0u8; word(8) as usize];
    sock.read_exact(&mut body).ok()?;
    Some(Msg {
        req: word(0),
        body,
        fds,
    })
}

fn reply_u64(sock: &mut UnixStream, req: u32, value: u64) {
    let mut m = Vec::new();
    m.extend_from_slice(&req.to_le_bytes());
    m.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes()); // version 1, reply
    m.extend_from_slice(&8u32.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    sock.write_all(&m).expect("reply");
}

/// What the slow daemon's worker saw: kicks read while the queue was disabled (dropped) and
/// while it was enabled (served).
#[derive(Default)]
struct Seen {
    enabled: AtomicBool,
    dropped: AtomicU32,
    served: AtomicU32,
    stop: AtomicBool,
}

fn worker(kick: OwnedFd, seen: Arc<Seen>) {
    while !seen.stop.load(Ordering::Acquire) {
        let mut p = libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        if unsafe { libc::poll(&mut p, 1, 50) } != 1 {
            continue;
        }
        let mut v = [0u8; 8];
        // SAFETY: reading 8 bytes from an eventfd into a live 8-byte buffer.
        unsafe { libc::read(kick.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        if seen.enabled.load(Ordering::Acquire) {
            seen.served.fetch_add(1, Ordering::AcqRel);
        } else {
            seen.dropped.fetch_add(1, Ordering::AcqRel);
        }
    }
}

fn slow_daemon(listener: UnixListener, seen: Arc<Seen>) {
    let (mut sock, _) = listener.accept().expect("accept");
    let mut workers = Vec::new();
    while let Some(m) = recv(&mut sock) {
        std::thread::sleep(Duration::from_millis(30));
        match m.req {
            GET_FEATURES => reply_u64(&mut sock, m.req, VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES),
            GET_PROTOCOL_FEATURES => reply_u64(&mut sock, m.req, XEN_MMAP),
            SET_VRING_KICK => {
                let kick = m.fds.into_iter().next().expect("kick fd");
                let s = seen.clone();
                workers.push(std::thread::spawn(move || worker(kick, s)));
            }
            SET_VRING_ENABLE => {
                let num = u32::from_le_bytes([m.body[4], m.body[5], m.body[6], m.body[7]]);
                seen.enabled.store(num != 0, Ordering::Release);
            }
            _ => {}
        }
    }
    seen.stop.store(true, Ordering::Release);
    for w in workers {
        let _ = w.join();
    }
}

#[test]
fn a_kick_reaches_the_daemon_after_it_has_enabled_the_queue() {
    let dir = std::env::temp_dir().join(format!("xmf-kick-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let sock = dir.join("slow.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let daemon = std::thread::spawn(move || slow_daemon(listener, s));

    let mut b = Backend::connect(&sock, 3, 1).expect("connect");
    // The guest's QueueNotify right after DRIVER_OK: here before the start messages are sent,
    // so the daemon's worker reads it the moment it gets the kick fd, queue still disabled.
    b.kick(0).expect("early kick");
    let g = 1u64 << 63;
    let q = QueueRegs {
        max: 256,
        num: 16,
        ready: true,
        desc: g | 0x8000,
        driver: g | 0x9000,
        device: g | 0xa000,
    };
    let fd = std::fs::File::open("/dev/null").expect("/dev/null");
    b.start_with_fd(&Memory::Grant, &fd, VIRTIO_F_VERSION_1, &[q], &[0])
        .expect("start");

    let until = Instant::now() + Duration::from_secs(3);
    while seen.served.load(Ordering::Acquire) == 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        seen.dropped.load(Ordering::Acquire),
        1,
        "the early kick was read while the queue was disabled (the race this test sets up)"
    );
    assert_eq!(
        seen.served.load(Ordering::Acquire),
        1,
        "one kick reached the daemon after it had enabled the queue"
    );
    drop(b);
    daemon.join().expect("daemon thread");
    let _ = std::fs::remove_dir_all(&dir);
}
