//! The daemon's message stream: random vhost-user messages (codes, header flags and sizes,
//! bodies, attached fds: memfds, eventfds, /dev/null) written on a socket to a
//! `VhostUserDaemon` serving a blk device (with an emulated Xen). After the bytes the
//! frontend closes the socket; the daemon must end that connection (no hang), never panic,
//! and its serve loop must accept the next connection (the next input).
//!
//! Input format (raw bytes, easy to seed): records of
//! `code u8, hflags u8, fdspec u8, len u16le, body[len]`. `hflags`: bits 0-1 are the header's
//! version bits, bit 2 asks NEED_REPLY, bit 3 takes the header's size field from the first
//! four body bytes (a lie) instead of the body length, bit 4 makes the code
//! `code | 0x100 << (bits 5-6)` (unknown codes). `fdspec`: bits 0-1 the fd count, bits 2-3 the
//! fd kind (memfd, eventfd, /dev/null, the socket itself), bits 4-7 the memfd size in MiB.
//! Inputs of odd length go to a second daemon that maps FOREIGN regions lazily (4-frame
//! buckets, at most 8 mapped), so rings and buffers in lazy regions are fuzzed too.
//! Both daemons are sandboxed as the binaries are (`VhostUserDaemon::sandboxed`: every
//! connection, relay and queue worker thread under its seccomp allowlist), so an input that
//! drives a thread to a call outside its list kills the process: a finding.
#![no_main]

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use xen_vhost_mem::daemon::VhostUserDaemon;
use xen_vhost_mem::devices::blk::{BlkConfig, BlkDevice};
use xen_vhost_mem::testing::EmulatedXen;
use xen_vhost_mem::{ForeignMapping, XenHandle};

struct Served {
    path: PathBuf,
    daemon: Arc<VhostUserDaemon<BlkDevice>>,
}

fn served(lazy: bool) -> &'static Served {
    static EAGER: OnceLock<Served> = OnceLock::new();
    static LAZY: OnceLock<Served> = OnceLock::new();
    let s = if lazy { &LAZY } else { &EAGER };
    s.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!(
            "xvm-fuzz-daemon-{}-{}",
            std::process::id(),
            if lazy { "lazy" } else { "eager" }
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let image = dir.join("disk.img");
        File::create(&image)
            .and_then(|f| f.set_len(1 << 20))
            .expect("image");
        let path = dir.join("blk.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let blk = BlkDevice::open(
            &image,
            BlkConfig {
                num_queues: 2,
                ..BlkConfig::default()
            },
        )
        .expect("blk");
        let emu = Arc::new(EmulatedXen::new(64).expect("emulation"));
        let xen = XenHandle::new(emu);
        let mut daemon = VhostUserDaemon::new(Arc::new(blk)).with_xen(xen.clone());
        if lazy {
            daemon = daemon.with_foreign_mapping(ForeignMapping::Lazy { bucket_frames: 4 });
            xen.set_lazy_bucket_limit(8).expect("bound before any region");
        }
        let daemon = Arc::new(daemon.sandboxed().expect("sandbox"));
        let d = daemon.clone();
        std::thread::spawn(move || {
            d.serve(&listener, None).expect("serve loop ended");
            panic!("serve loop returned");
        });
        Served { path, daemon }
    })
}

fn memfd(mib: u64) -> OwnedFd {
    // SAFETY: a valid NUL-terminated name and plain flags.
    let fd = unsafe { libc::memfd_create(c"fuzz-daemon".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(mib << 20).expect("size memfd");
    f.into()
}

fn eventfd() -> OwnedFd {
    // SAFETY: plain flags.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: a fresh fd owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn send(sock: &UnixStream, msg: &[u8], fds: &[RawFd]) -> bool {
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut _,
        iov_len: msg.len(),
    };
    let mut cmsg = [0u64; 16];
    // SAFETY: msghdr is plain data; all-zero is a valid empty value.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds);
        // SAFETY: pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
        mh.msg_control = cmsg.as_mut_ptr().cast();
        mh.msg_controllen = space as _;
        // SAFETY: the control buffer is live, aligned and large enough for one cmsghdr with
        // at most 3 fds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    // SAFETY: mh points at live buffers of the sizes given.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
    n == msg.len() as isize
}

fuzz_target!(|data: &[u8]| {
    let s = served(data.len() % 2 == 1);
    let before = s.daemon.stats().snapshot().connections;
    let sock = UnixStream::connect(&s.path).expect("connect: the serve loop must accept");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut rest = data;
    let mut msgs = 0;
    while rest.len() >= 5 && msgs < 64 {
        let (code, hflags, fdspec) = (rest[0], rest[1], rest[2]);
        let len = usize::from(u16::from_le_bytes([rest[3], rest[4]])).min(rest.len() - 5);
        let body = &rest[5..5 + len];
        rest = &rest[5 + len..];
        msgs += 1;
        let mut code = u32::from(code);
        if hflags & 0x10 != 0 {
            code |= 0x100 << ((hflags >> 5) & 3);
        }
        let mut flags = u32::from(hflags & 3);
        if hflags & 4 != 0 {
            flags |= 0x8;
        }
        let (size, body) = if hflags & 8 != 0 && body.len() >= 4 {
            (
                u32::from_le_bytes([body[0], body[1], body[2], body[3]]),
                &body[4..],
            )
        } else {
            (body.len() as u32, body)
        };
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(body);
        let owned: Vec<OwnedFd> = (0..fdspec & 3)
            .filter_map(|_| match (fdspec >> 2) & 3 {
                0 => Some(memfd(u64::from(fdspec >> 4).max(1))),
                1 => Some(eventfd()),
                2 => File::open("/dev/null").ok().map(OwnedFd::from),
                _ => sock.try_clone().ok().map(OwnedFd::from),
            })
            .collect();
        let fds: Vec<RawFd> = owned.iter().map(|f| f.as_raw_fd()).collect();
        if !send(&sock, &msg, &fds) {
            break;
        }
    }
    // Close our side; the daemon must end the connection (EOF on our read side).
    let _ = sock.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    loop {
        match (&sock).read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The daemon closed with our bytes still unread (it ended the connection early).
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("daemon did not end the connection: {e}"),
        }
    }
    drop(sock);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.daemon.stats().snapshot().connections <= before {
        assert!(Instant::now() < deadline, "connection did not end");
        std::thread::sleep(Duration::from_micros(50));
    }
    if let Some(x) = s.daemon.xen() {
        assert_eq!(x.counters().live_mappings(), 0, "mappings left after the connection");
    }
});
