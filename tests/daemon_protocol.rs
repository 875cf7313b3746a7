//! The daemon against malformed and hostile vhost-user traffic, over a real Unix socket.
//!
//! Every malformed message must be answered with an error (a REPLY_ACK of 1, or the empty
//! reply a `GET_*` gets), and the SAME connection must then serve good requests: each case
//! ends with a blk write+read pass whose data is checked byte for byte. Messages the vhost
//! crate's `Frontend` can send (well formed but invalid) go through it, with `NEED_REPLY` on
//! (the driver sets it once REPLY_ACK is negotiated), so a refusal comes back as
//! `Err(BackendInternalError)`. Messages it cannot send (unknown codes, stray fds, counts that
//! do not match, more descriptors than a message may carry, a body sent in two parts) are written as raw bytes on a socket negotiated by
//! hand, then the socket is handed to a `Frontend` for the I/O that follows.
//!
//! Two `GET_*` refusals are only tested raw: vhost 0.18's `Frontend` reads a reply as a
//! fixed-size struct (`recv_into_iovec_all`) and never returns on a short one, so the empty
//! reply QEMU treats as an error (GET_VRING_BASE) or the zero-size config the spec mandates
//! (GET_CONFIG) would leave it waiting.
//!
//! Also: regions hot plugged (ADD_MEM_REG/REM_MEM_REG) while I/O runs on two queues, and a
//! frontend that disconnects with a batch in flight followed by a new one, with nothing left
//! mapped in between (emulated Xen, GRANT mode).

mod common;

use common::{memfd, ScratchDir};

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures};
use vhost::vhost_user::{Error as VuError, Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

use xen_vhost_mem::daemon::{VhostUserDaemon, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1};
use xen_vhost_mem::devices::blk::{BlkConfig, BlkDevice};
use xen_vhost_mem::testing::blk_workload::pass;
use xen_vhost_mem::testing::driver::{Buf, DriverConfig, GuestMode, VirtioDriver};
use xen_vhost_mem::XenHandle;

/// Queues of the device (the driver uses both).
const QUEUES: usize = 2;
/// Queue indexes the test frontends accept, so that out-of-range ones reach the daemon
/// instead of being refused by the `Frontend` itself.
const FRONTEND_MAX_QUEUES: u64 = 8;
/// How long any one reply may take before the test fails.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// A gpa no driver layout uses (UNIX RAM is at 0x10_0000 and a few MiB long; GRANT
/// addresses have bit 63 set).
const FREE_GPA: u64 = 0x1_0000_0000;

// ---------------------------------------------------------------------------------------------
// Daemon and driver setup
// ---------------------------------------------------------------------------------------------

/// A blk daemon serving a fixed number of connections on a scratch socket.
struct Served {
    _dir: ScratchDir,
    path: PathBuf,
    daemon: Arc<VhostUserDaemon<BlkDevice>>,
    thread: Option<JoinHandle<()>>,
}

impl Served {
    fn start(tag: &str, connections: usize, xen: Option<XenHandle>) -> Self {
        Self::start_with(tag, connections, xen, true)
    }

    /// `adapter`: whether connections go through the layout relay (the default).
    fn start_with(tag: &str, connections: usize, xen: Option<XenHandle>, adapter: bool) -> Self {
        let dir = ScratchDir::new(&format!("proto-{tag}"));
        let image = dir.0.join("disk.img");
        File::create(&image)
            .and_then(|f| f.set_len(4 << 20))
            .expect("image");
        let path = dir.0.join("blk.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let blk = BlkDevice::open(
            &image,
            BlkConfig {
                num_queues: QUEUES as u16,
                ..BlkConfig::default()
            },
        )
        .expect("blk");
        let mut daemon = VhostUserDaemon::new(Arc::new(blk)).with_layout_adapter(adapter);
        if let Some(x) = xen {
            daemon = daemon.with_xen(x);
        }
        let daemon = Arc::new(daemon);
        let d = daemon.clone();
        let thread =
            std::thread::spawn(move || d.serve(&listener, Some(connections)).expect("serve"));
        Served {
            _dir: dir,
            path,
            daemon,
            thread: Some(thread),
        }
    }

    /// Waits for the serve loop to return (all its connections served).
    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            t.join().expect("daemon thread panicked");
        }
    }

    /// Polls until `n` connections have ended.
    fn wait_connections(&self, n: u64) {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while self.daemon.stats().snapshot().connections < n {
            assert!(
                Instant::now() < deadline,
                "connection {n} did not end within {REPLY_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn driver_config(mode: GuestMode) -> DriverConfig {
    DriverConfig {
        mode,
        queues: QUEUES,
        queue_size: 256,
        depth: 8,
        max_data: 64 * 1024,
        ..DriverConfig::default()
    }
}

/// Connects a driver whose `Frontend` lets any queue index below 8 through.
fn connect(path: &Path, cfg: DriverConfig) -> VirtioDriver {
    let fe = Frontend::connect(path, FRONTEND_MAX_QUEUES).expect("frontend connect");
    VirtioDriver::with_frontend(fe, cfg, None).expect("driver setup")
}

/// Ends a hang: if not disarmed within the timeout, shuts the socket down so that whatever
/// waits on it returns an error (vhost's `Frontend` retries EAGAIN forever, so a receive
/// timeout would not do).
struct Watchdog {
    tx: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn arm(fd: RawFd, after: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(after) {
                eprintln!("watchdog: no progress within {after:?}, shutting the socket down");
                // SAFETY: shutdown on a socket fd the armed test still owns.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        });
        Watchdog {
            tx: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A short write+read pass on every queue, every byte and status checked.
fn verify_io(drv: &mut VirtioDriver, seed: u64) {
    let total = 128 * 1024;
    let w = pass(drv, QUEUES, true, total, 4096, seed, &mut |_| {}).expect("write pass");
    assert_eq!((w.requests, w.bad), (32, 0), "write pass (seed {seed})");
    let r = pass(drv, QUEUES, false, total, 4096, seed, &mut |_| {}).expect("read pass");
    assert_eq!((r.requests, r.bad), (32, 0), "read pass (seed {seed})");
}

/// The refusal of a message sent with NEED_REPLY, as vhost's `Frontend` reports it: the
/// daemon's REPLY_ACK carried a nonzero value.
fn assert_nack<T: std::fmt::Debug>(what: &str, r: Result<T, vhost::Error>) {
    match r {
        Err(vhost::Error::VhostUserProtocol(VuError::BackendInternalError)) => {}
        other => panic!("{what}: expected a REPLY_ACK error (BackendInternalError), got {other:?}"),
    }
}

/// A region to announce. `flags`/`domid` are the Xen fields (ignored without `xen`).
fn region(
    gpa: u64,
    size: u64,
    uaddr: u64,
    fd: &File,
    flags: u32,
    domid: u32,
) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: uaddr,
        mmap_offset: 0,
        mmap_handle: fd.as_raw_fd(),
        xen_mmap_flags: flags,
        xen_mmap_data: domid,
    }
}

fn ring_at(uaddr: u64) -> VringConfigData {
    VringConfigData {
        queue_max_size: 256,
        queue_size: 256,
        flags: 0,
        desc_table_addr: uaddr,
        used_ring_addr: uaddr + 0x2000,
        avail_ring_addr: uaddr + 0x1000,
        log_addr: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Well-formed but invalid messages, through vhost's Frontend
// ---------------------------------------------------------------------------------------------

type Case = (
    &'static str,
    Box<dyn Fn(&mut VirtioDriver) -> Result<(), vhost::Error>>,
);

/// `fd` typed as the `EventFd` vhost's `Frontend` sends, without taking it over (the wrapper
/// never closes it).
fn not_an_eventfd(fd: &impl AsRawFd) -> std::mem::ManuallyDrop<vmm_sys_util::eventfd::EventFd> {
    // SAFETY: the fd stays open while the borrow lives, and ManuallyDrop keeps the EventFd
    // from closing it; the Frontend only reads its number to send it.
    std::mem::ManuallyDrop::new(unsafe {
        vmm_sys_util::eventfd::EventFd::from_raw_fd(fd.as_raw_fd())
    })
}

/// Cases every build and guest mode refuses.
fn common_cases() -> Vec<Case> {
    let extra = Arc::new(memfd(2 << 20));
    let e1 = extra.clone();
    let e2 = extra.clone();
    let e3 = extra.clone();
    vec![
        (
            "SET_VRING_NUM index 7 (2 queues)",
            Box::new(|d| d.frontend().set_vring_num(7, 256)),
        ),
        (
            "SET_VRING_NUM 0",
            Box::new(|d| d.frontend().set_vring_num(1, 0)),
        ),
        (
            "SET_VRING_NUM 100 (not a power of two)",
            Box::new(|d| d.frontend().set_vring_num(1, 100)),
        ),
        (
            "SET_VRING_NUM 1024 (max 256)",
            Box::new(|d| d.frontend().set_vring_num(1, 1024)),
        ),
        (
            "SET_VRING_BASE index 7",
            Box::new(|d| d.frontend().set_vring_base(7, 0)),
        ),
        (
            "SET_VRING_ADDR index 7",
            Box::new(|d| {
                let uaddr = d.uaddr_of(d.slot(0, 0).header);
                d.frontend().set_vring_addr(7, &ring_at(uaddr))
            }),
        ),
        (
            "SET_VRING_ENABLE index 7",
            Box::new(|d| d.frontend().set_vring_enable(7, true)),
        ),
        (
            "SET_VRING_CALL index 7",
            Box::new(|d| {
                let ev = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
                d.frontend().set_vring_call(7, &ev)
            }),
        ),
        (
            "SET_VRING_KICK index 7",
            Box::new(|d| {
                let ev = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
                d.frontend().set_vring_kick(7, &ev)
            }),
        ),
        (
            "SET_VRING_KICK queue 1 with a socket (not an eventfd)",
            Box::new(|d| {
                let (a, _b) = UnixStream::pair().expect("socketpair");
                d.frontend().set_vring_kick(1, &not_an_eventfd(&a))
            }),
        ),
        (
            "SET_VRING_CALL queue 1 with a pipe (not an eventfd)",
            Box::new(|d| {
                let (r, _w) = std::io::pipe().expect("pipe");
                d.frontend().set_vring_call(1, &not_an_eventfd(&r))
            }),
        ),
        (
            "SET_VRING_ERR queue 0 with /dev/null (not an eventfd)",
            Box::new(|d| {
                let null = File::open("/dev/null").expect("/dev/null");
                d.frontend().set_vring_err(0, &not_an_eventfd(&null))
            }),
        ),
        (
            "SET_VRING_ADDR at an address in no region",
            Box::new(|d| d.frontend().set_vring_addr(1, &ring_at(0x10))),
        ),
        (
            "SET_FEATURES with a bit not offered (1 << 55)",
            Box::new(|d| {
                let f = d.features() | 1 << 55;
                d.frontend().set_features(f)
            }),
        ),
        (
            "SET_MEM_TABLE with overlapping regions",
            Box::new(move |d| {
                let a = region(FREE_GPA, 1 << 20, 0x5000_0000_0000, &e1, 0, 0);
                let b = region(FREE_GPA + 0x8_0000, 1 << 20, 0x5100_0000_0000, &e1, 0, 0);
                d.frontend().set_mem_table(&[a, b]).map(|_| ())
            }),
        ),
        (
            "REM_MEM_REG of an absent region",
            Box::new(move |d| {
                let r = region(FREE_GPA + (64 << 20), 1 << 20, 0x5200_0000_0000, &e2, 0, 0);
                d.frontend().remove_mem_region(&r)
            }),
        ),
        (
            "ADD_MEM_REG overlapping guest RAM",
            Box::new(move |d| {
                // A page of the memory the requests live in, whatever the layout.
                let gpa = d.slot(0, 0).header & !0xfff;
                let r = region(gpa, 0x1000, 0x5300_0000_0000, &e3, 0, 0);
                d.frontend().add_mem_region(&r).map(|_| ())
            }),
        ),
    ]
}

/// Cases of the UNIX layout only (guest RAM is one memfd region).
fn unix_cases() -> Vec<Case> {
    vec![(
        "SET_VRING_ADDR with the descriptor table past the end of RAM",
        Box::new(|d| {
            let fd_len = d.memfd().expect("memfd").metadata().expect("stat").len();
            // The last 16 bytes of RAM: a 256-entry table needs 4 KiB.
            let end = 0x10_0000 + fd_len;
            let mut r = ring_at(d.uaddr_of(d.slot(0, 0).header));
            r.desc_table_addr = d.uaddr_of(end - 16);
            d.frontend().set_vring_addr(1, &r)
        }),
    )]
}

/// Runs `cases` on one connection, each followed by a checked I/O pass.
fn run_cases(drv: &mut VirtioDriver, cases: &[Case], seed0: u64) {
    for (i, (name, case)) in cases.iter().enumerate() {
        eprintln!("case: {name}");
        assert_nack(name, case(drv));
        verify_io(drv, seed0 + i as u64);
    }
}

#[test]
fn frontend_invalid_messages_unix() {
    let mut s = Served::start("fe-unix", 1, None);
    let mut drv = connect(&s.path, driver_config(GuestMode::Unix));
    let _wd = Watchdog::arm(drv.frontend().as_raw_fd(), Duration::from_secs(120));
    verify_io(&mut drv, 1);
    let mut cases = common_cases();
    cases.extend(unix_cases());
    assert!(cases.len() >= 13);
    run_cases(&mut drv, &cases, 100);
    // A good control request after all that.
    assert_eq!(
        drv.frontend().get_features().expect("GET_FEATURES") & VIRTIO_F_VERSION_1,
        VIRTIO_F_VERSION_1
    );
    drop(_wd);
    drop(drv);
    s.join();
    assert_eq!(s.daemon.stats().snapshot().connections, 1);
}

/// Region counts past the slot limit: ADD_MEM_REG fills the table up to `MAX_MEM_SLOTS`
/// (509) regions; the 510th is refused (before it is mapped) and the connection serves on;
/// after a REM_MEM_REG the slot is free again.
#[test]
fn add_mem_reg_past_the_slot_limit_is_refused() {
    use xen_vhost_mem::daemon::MAX_MEM_SLOTS;
    let mut s = Served::start("slots", 1, None);
    let mut drv = connect(&s.path, driver_config(GuestMode::Unix));
    let _wd = Watchdog::arm(drv.frontend().as_raw_fd(), Duration::from_secs(120));
    verify_io(&mut drv, 1);
    let extra = memfd(0x1000);
    let r = |i: u64| {
        region(
            FREE_GPA + i * 0x1000,
            0x1000,
            0x5000_0000_0000 + i * 0x1000,
            &extra,
            0,
            0,
        )
    };
    // The driver's layout is one RAM region; everything else up to the limit is ours.
    let room = MAX_MEM_SLOTS as u64 - 1;
    for i in 0..room {
        drv.frontend()
            .add_mem_region(&r(i))
            .unwrap_or_else(|e| panic!("ADD_MEM_REG {i}: {e}"));
    }
    assert_nack(
        "ADD_MEM_REG of region 510",
        drv.frontend().add_mem_region(&r(room)),
    );
    verify_io(&mut drv, 2);
    drv.frontend()
        .remove_mem_region(&r(0))
        .expect("REM_MEM_REG");
    drv.frontend()
        .add_mem_region(&r(room))
        .expect("ADD_MEM_REG into the freed slot");
    assert_nack(
        "ADD_MEM_REG past the limit again",
        drv.frontend().add_mem_region(&r(0)),
    );
    verify_io(&mut drv, 3);
    drop(_wd);
    drop(drv);
    s.join();
}

// ---------------------------------------------------------------------------------------------
// Raw bytes: what vhost's Frontend cannot send
// ---------------------------------------------------------------------------------------------

const V1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;

/// A frontend socket driven by hand.
struct Raw {
    sock: UnixStream,
}

/// A reply: header words and body.
#[derive(Debug)]
struct Reply {
    code: u32,
    flags: u32,
    size: u32,
    body: Vec<u8>,
}

impl Reply {
    fn u64(&self) -> u64 {
        assert_eq!(
            self.size, 8,
            "reply to {} is not a u64: {self:?}",
            self.code
        );
        u64::from_le_bytes(self.body[..8].try_into().expect("8 bytes"))
    }
}

impl Raw {
    fn connect(path: &Path) -> Self {
        let sock = UnixStream::connect(path).expect("connect");
        sock.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
        Raw { sock }
    }

    /// Sends one message: a header saying `size` (the body may be shorter or longer), with
    /// `fds` attached in one `sendmsg`.
    fn send(&self, code: u32, flags: u32, size: u32, body: &[u8], fds: &[RawFd]) {
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(body);
        let mut iov = libc::iovec {
            iov_base: msg.as_mut_ptr().cast(),
            iov_len: msg.len(),
        };
        // Room for 64 descriptors: more than a message may carry, for the cases past the limit.
        let mut cmsg = [0u64; 40];
        // SAFETY: msghdr is plain data; all-zero is a valid empty value.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if !fds.is_empty() {
            let bytes = std::mem::size_of_val(fds);
            // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
            let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
            assert!(space <= std::mem::size_of_val(&cmsg));
            mh.msg_control = cmsg.as_mut_ptr().cast();
            mh.msg_controllen = space as _;
            // SAFETY: the control buffer is live, aligned and large enough for one cmsghdr
            // carrying `fds` (checked above).
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
        let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
        assert_eq!(
            n,
            msg.len() as isize,
            "sendmsg: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Sends one well-formed message in two writes: the header and the first `split` bytes of
    /// the body (with `fds`), then, `gap` later, the rest, as a stream socket may deliver it.
    fn send_in_two_parts(
        &self,
        code: u32,
        body: &[u8],
        fds: &[RawFd],
        split: usize,
        gap: Duration,
    ) {
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&(V1 | NEED_REPLY).to_le_bytes());
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        let (first, rest) = msg.split_at(12 + split);
        // The first part goes out as a message with the header only in its size: `send`
        // writes exactly the bytes it is given.
        self.send_bytes(first, fds);
        std::thread::sleep(gap);
        (&self.sock).write_all(rest).expect("second part");
    }

    /// Writes `bytes` as they are, with `fds` attached, in one `sendmsg`.
    fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) {
        let w = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        self.send(w(0), w(4), w(8), &bytes[12..], fds);
    }

    /// Reads one reply (a read timeout turns a daemon that does not answer into a failure).
    fn recv(&self) -> Reply {
        let mut hdr = [0u8; 12];
        (&self.sock)
            .read_exact(&mut hdr)
            .unwrap_or_else(|e| panic!("no reply header within {REPLY_TIMEOUT:?}: {e}"));
        let w = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().expect("4 bytes"));
        let (code, flags, size) = (w(0), w(4), w(8));
        let mut body = vec![0u8; size as usize];
        (&self.sock).read_exact(&mut body).expect("reply body");
        Reply {
            code,
            flags,
            size,
            body,
        }
    }

    /// Sends a message asking for a REPLY_ACK and returns the ack's value.
    fn ack(&self, code: u32, size: u32, body: &[u8], fds: &[RawFd]) -> u64 {
        self.send(code, V1 | NEED_REPLY, size, body, fds);
        let r = self.recv();
        assert_eq!(
            (r.code, r.flags),
            (code, V1 | REPLY),
            "REPLY_ACK header: {r:?}"
        );
        r.u64()
    }

    fn get_u64(&self, req: FrontendReq) -> u64 {
        self.send(req as u32, V1, 0, &[], &[]);
        let r = self.recv();
        assert_eq!(
            (r.code, r.flags),
            (req as u32, V1 | REPLY),
            "reply header: {r:?}"
        );
        r.u64()
    }

    /// The VMM's negotiation, by hand, ending with REPLY_ACK on; `xen`: ack XEN_MMAP (the
    /// 40-byte region layout) or not (the standard one).
    fn negotiate(&self, xen: bool) -> u64 {
        self.send(FrontendReq::SET_OWNER as u32, V1, 0, &[], &[]);
        let offered = self.get_u64(FrontendReq::GET_FEATURES);
        assert_ne!(offered & VHOST_USER_F_PROTOCOL_FEATURES, 0);
        let want = offered & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES);
        self.send(
            FrontendReq::SET_FEATURES as u32,
            V1,
            8,
            &want.to_le_bytes(),
            &[],
        );
        let proto = self.get_u64(FrontendReq::GET_PROTOCOL_FEATURES);
        let ack = proto
            & (VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
                .bits();
        assert_ne!(proto & VhostUserProtocolFeatures::XEN_MMAP.bits(), 0);
        let ack = if xen {
            ack | VhostUserProtocolFeatures::XEN_MMAP.bits()
        } else {
            ack
        };
        assert_ne!(ack & VhostUserProtocolFeatures::REPLY_ACK.bits(), 0);
        let v = self.ack(
            FrontendReq::SET_PROTOCOL_FEATURES as u32,
            8,
            &ack.to_le_bytes(),
            &[],
        );
        assert_eq!(v, 0, "SET_PROTOCOL_FEATURES refused");
        offered
    }

    /// Hands the socket to vhost's Frontend and the virtio driver: the whole setup again,
    /// then checked I/O, on the same connection.
    fn into_driver(self, seed: u64) {
        let fd = self.sock.as_raw_fd();
        let _wd = Watchdog::arm(fd, Duration::from_secs(60));
        let fe = Frontend::from_stream(self.sock, FRONTEND_MAX_QUEUES);
        let mut drv = VirtioDriver::with_frontend(fe, driver_config(GuestMode::Unix), None)
            .expect("driver setup");
        verify_io(&mut drv, seed);
    }
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

/// One wire region (32 bytes, or 40 with the Xen fields when the connection acked XEN_MMAP).
fn wire_region(gpa: u64, size: u64, uaddr: u64, xen: bool) -> Vec<u8> {
    let mut r = Vec::new();
    for v in [gpa, size, uaddr, 0] {
        r.extend_from_slice(&v.to_le_bytes());
    }
    if xen {
        r.extend_from_slice(&[0u8; 8]);
    }
    r
}

/// `SET_MEM_TABLE` body announcing `count` regions and carrying `regions`.
fn mem_table(count: u32, regions: &[Vec<u8>]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        b.extend_from_slice(r);
    }
    b
}

/// What a raw case expects back.
enum Expect {
    /// A REPLY_ACK of 1 with this request code.
    Nack,
    /// A reply with this code and an empty body (size 0).
    Empty,
    /// A GET_CONFIG reply whose config window has size 0 (the spec's error).
    ConfigError,
}

struct RawCase {
    name: &'static str,
    code: u32,
    flags: u32,
    size: u32,
    body: Vec<u8>,
    fds: usize,
    expect: Expect,
}

fn raw_cases(xen: bool) -> Vec<RawCase> {
    let set_mem = FrontendReq::SET_MEM_TABLE as u32;
    let num = FrontendReq::SET_VRING_NUM as u32;
    let r1 = wire_region(FREE_GPA, 1 << 20, 0x5000_0000_0000, xen);
    let r2 = wire_region(FREE_GPA + (1 << 20), 1 << 20, 0x5100_0000_0000, xen);
    let two = mem_table(2, &[r1.clone(), r2]);
    let short_table = mem_table(2, &[r1]);
    let mut get_config = Vec::new();
    // offset 100, size 16, flags 0: valid for vhost (inside 256 bytes), outside blk's 96.
    for v in [100u32, 16, 0] {
        get_config.extend_from_slice(&v.to_le_bytes());
    }
    get_config.extend_from_slice(&[0u8; 16]);
    let nr = V1 | NEED_REPLY;
    vec![
        RawCase {
            name: "SET_MEM_TABLE: 2 regions, 1 fd",
            code: set_mem,
            flags: nr,
            size: two.len() as u32,
            body: two.clone(),
            fds: 1,
            expect: Expect::Nack,
        },
        RawCase {
            name: "SET_MEM_TABLE: 2 regions, 3 fds",
            code: set_mem,
            flags: nr,
            size: two.len() as u32,
            body: two,
            fds: 3,
            expect: Expect::Nack,
        },
        RawCase {
            name: "SET_MEM_TABLE: count 2, body holds 1 region",
            code: set_mem,
            flags: nr,
            size: short_table.len() as u32,
            body: short_table,
            fds: 2,
            expect: Expect::Nack,
        },
        RawCase {
            name: "SET_VRING_NUM: 12-byte body (struct is 8)",
            code: num,
            flags: nr,
            size: 12,
            body: [vring_state(0, 256), vec![0; 4]].concat(),
            fds: 0,
            expect: Expect::Nack,
        },
        RawCase {
            name: "SET_VRING_NUM with an fd attached",
            code: num,
            flags: nr,
            size: 8,
            body: vring_state(0, 256),
            fds: 1,
            expect: Expect::Nack,
        },
        RawCase {
            name: "unknown request 999 with NEED_REPLY and a body",
            code: 999,
            flags: nr,
            size: 8,
            body: vec![0xaa; 8],
            fds: 0,
            expect: Expect::Nack,
        },
        RawCase {
            name: "SET_VRING_BASE 0x10000 (above 16 bits)",
            code: FrontendReq::SET_VRING_BASE as u32,
            flags: nr,
            size: 8,
            body: vring_state(0, 0x1_0000),
            fds: 0,
            expect: Expect::Nack,
        },
        RawCase {
            name: "GET_VRING_BASE index 7",
            code: FrontendReq::GET_VRING_BASE as u32,
            flags: V1,
            size: 8,
            body: vring_state(7, 0),
            fds: 0,
            expect: Expect::Empty,
        },
        RawCase {
            name: "GET_CONFIG offset 100 size 16 (config space is 96 bytes)",
            code: FrontendReq::GET_CONFIG as u32,
            flags: V1,
            size: get_config.len() as u32,
            body: get_config,
            fds: 0,
            expect: Expect::ConfigError,
        },
    ]
}

#[test]
fn raw_malformed_messages_standard_layout() {
    raw_malformed_messages(false);
}

#[test]
fn raw_malformed_messages_xen_layout() {
    raw_malformed_messages(true);
}

/// Every raw case on its own connection, in the standard region layout (XEN_MMAP not acked)
/// or the Xen one.
fn raw_malformed_messages(xen: bool) {
    let cases = raw_cases(xen);
    let mut s = Served::start(if xen { "raw-xen" } else { "raw-std" }, cases.len(), None);
    let fd_src = memfd(4 << 20);
    for (i, c) in cases.iter().enumerate() {
        eprintln!(
            "raw case ({}): {}",
            if xen { "xen" } else { "standard" },
            c.name
        );
        let raw = Raw::connect(&s.path);
        let offered = raw.negotiate(xen);
        let fds: Vec<RawFd> = (0..c.fds).map(|_| fd_src.as_raw_fd()).collect();
        raw.send(c.code, c.flags, c.size, &c.body, &fds);
        let r = raw.recv();
        match c.expect {
            Expect::Nack => {
                assert_eq!((r.code, r.flags), (c.code, V1 | REPLY), "{}: {r:?}", c.name);
                assert_eq!(r.u64(), 1, "{}: REPLY_ACK value", c.name);
            }
            Expect::Empty => {
                assert_eq!(
                    (r.code, r.flags, r.size),
                    (c.code, V1 | REPLY, 0),
                    "{}: {r:?}",
                    c.name
                );
            }
            Expect::ConfigError => {
                assert_eq!(
                    (r.code, r.flags, r.size),
                    (c.code, V1 | REPLY, 12),
                    "{}: {r:?}",
                    c.name
                );
                let w = |i: usize| u32::from_le_bytes(r.body[i..i + 4].try_into().expect("4"));
                assert_eq!((w(0), w(4)), (100, 0), "{}: config window {r:?}", c.name);
            }
        }
        // The next good request on the same connection: a control one ...
        assert_eq!(
            raw.get_u64(FrontendReq::GET_FEATURES),
            offered,
            "{}",
            c.name
        );
        // ... and the whole setup plus checked I/O.
        raw.into_driver(200 + i as u64);
        s.wait_connections(i as u64 + 1);
    }
    s.join();
    assert_eq!(s.daemon.stats().snapshot().connections, cases.len() as u64);
}

/// `ADD_MEM_REG` / `REM_MEM_REG` body: 8 bytes of padding, then the region.
fn single_region(region: Vec<u8>) -> Vec<u8> {
    [vec![0u8; 8], region].concat()
}

#[test]
fn more_fds_than_a_message_may_carry_are_refused_and_the_connection_serves_on() {
    more_fds_than_a_message_may_carry(false);
    more_fds_than_a_message_may_carry(true);
}

/// The same without the layout relay (`with_layout_adapter(false)`, XEN_MMAP acked): vhost
/// would read the header, fail on the descriptors (ENOBUFS) and lose the stream; the
/// connection loop takes such a message out itself and refuses it.
#[test]
fn more_fds_than_a_message_may_carry_without_the_layout_adapter() {
    let mut s = Served::start_with("fds-direct", 1, None, false);
    let src = memfd(0x1000);
    let raw = Raw::connect(&s.path);
    let offered = raw.negotiate(true);
    let regions: Vec<Vec<u8>> = (0..33)
        .map(|i| {
            wire_region(
                FREE_GPA + i * 0x1000,
                0x1000,
                0x5000_0000_0000 + i * 0x1000,
                true,
            )
        })
        .collect();
    let table = mem_table(33, &regions);
    let one = single_region(wire_region(FREE_GPA, 0x1000, 0x5000_0000_0000, true));
    for n in [33, 40] {
        let fds: Vec<RawFd> = (0..n).map(|_| src.as_raw_fd()).collect();
        let set_mem = FrontendReq::SET_MEM_TABLE as u32;
        assert_eq!(
            raw.ack(set_mem, table.len() as u32, &table, &fds),
            1,
            "{n} fds"
        );
        assert_eq!(raw.get_u64(FrontendReq::GET_FEATURES), offered, "{n} fds");
    }
    let add = FrontendReq::ADD_MEM_REG as u32;
    assert_eq!(raw.ack(add, one.len() as u32, &one, &[src.as_raw_fd()]), 0);
    drop(raw);
    s.join();
}

/// Messages carrying more descriptors than vhost takes (32): 33 and 40 (more than the relay's
/// control buffer holds, so the kernel drops some and sets MSG_CTRUNC). Each is refused with a
/// REPLY_ACK of 1 and the same connection serves on; GET_MAX_MEM_SLOTS still says 509, which
/// ADD_MEM_REG honours (`add_mem_reg_past_the_slot_limit_is_refused`).
fn more_fds_than_a_message_may_carry(xen: bool) {
    use xen_vhost_mem::daemon::MAX_MEM_SLOTS;
    let mut s = Served::start(if xen { "fds-xen" } else { "fds-std" }, 1, None);
    let src = memfd(0x1000);
    let raw = Raw::connect(&s.path);
    let offered = raw.negotiate(xen);
    let table = |n: u64| {
        let regions: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                wire_region(
                    FREE_GPA + i * 0x1000,
                    0x1000,
                    0x5000_0000_0000 + i * 0x1000,
                    xen,
                )
            })
            .collect();
        mem_table(n as u32, &regions)
    };
    let one = single_region(wire_region(FREE_GPA, 0x1000, 0x5000_0000_0000, xen));
    let cases: Vec<(&str, FrontendReq, Vec<u8>, usize)> = vec![
        (
            "SET_MEM_TABLE: 33 regions, 33 fds",
            FrontendReq::SET_MEM_TABLE,
            table(33),
            33,
        ),
        (
            "SET_MEM_TABLE: 40 regions, 40 fds",
            FrontendReq::SET_MEM_TABLE,
            table(40),
            40,
        ),
        (
            "ADD_MEM_REG with 33 fds",
            FrontendReq::ADD_MEM_REG,
            one.clone(),
            33,
        ),
        (
            "SET_VRING_CALL with 33 fds",
            FrontendReq::SET_VRING_CALL,
            0u64.to_le_bytes().to_vec(),
            33,
        ),
    ];
    for (name, code, body, n) in cases {
        eprintln!("fd case ({}): {name}", if xen { "xen" } else { "standard" });
        let fds: Vec<RawFd> = (0..n).map(|_| src.as_raw_fd()).collect();
        assert_eq!(
            raw.ack(code as u32, body.len() as u32, &body, &fds),
            1,
            "{name}"
        );
        assert_eq!(raw.get_u64(FrontendReq::GET_FEATURES), offered, "{name}");
    }
    // What we announce is unchanged, and one region with its one fd is taken.
    assert_eq!(
        raw.get_u64(FrontendReq::GET_MAX_MEM_SLOTS),
        MAX_MEM_SLOTS as u64
    );
    let add = FrontendReq::ADD_MEM_REG as u32;
    assert_eq!(raw.ack(add, one.len() as u32, &one, &[src.as_raw_fd()]), 0);
    raw.into_driver(300);
    s.join();
}

#[test]
fn rem_mem_reg_names_a_region_by_guest_address_user_address_and_size() {
    rem_mem_reg_names_a_region(false);
    rem_mem_reg_names_a_region(true);
}

/// A REM_MEM_REG whose user address (or size) differs from the region's is refused and the
/// region stays: an ADD of the same region still overlaps it, and the exact REM removes it.
fn rem_mem_reg_names_a_region(xen: bool) {
    let mut s = Served::start(if xen { "rem-xen" } else { "rem-std" }, 1, None);
    let src = memfd(0x2000);
    let raw = Raw::connect(&s.path);
    raw.negotiate(xen);
    let (add, rem) = (
        FrontendReq::ADD_MEM_REG as u32,
        FrontendReq::REM_MEM_REG as u32,
    );
    let uaddr = 0x5000_0000_0000;
    let region = |size: u64, uaddr: u64| single_region(wire_region(FREE_GPA, size, uaddr, xen));
    let it = region(0x1000, uaddr);
    let fd = [src.as_raw_fd()];
    assert_eq!(raw.ack(add, it.len() as u32, &it, &fd), 0, "ADD_MEM_REG");
    for (name, wrong) in [
        ("another user address", region(0x1000, uaddr + 0x1000)),
        ("user address 0", region(0x1000, 0)),
        ("another size", region(0x2000, uaddr)),
    ] {
        assert_eq!(
            raw.ack(rem, wrong.len() as u32, &wrong, &[]),
            1,
            "REM_MEM_REG, {name}"
        );
        assert_eq!(
            raw.ack(add, it.len() as u32, &it, &fd),
            1,
            "ADD_MEM_REG after a refused REM ({name}) must overlap the region that stayed"
        );
    }
    assert_eq!(
        raw.ack(rem, it.len() as u32, &it, &[]),
        0,
        "exact REM_MEM_REG"
    );
    assert_eq!(
        raw.ack(add, it.len() as u32, &it, &fd),
        0,
        "ADD_MEM_REG into the freed slot"
    );
    raw.into_driver(310);
    s.join();
}

#[test]
fn a_message_body_in_two_reads_is_served_whole() {
    message_body_in_two_reads(false);
    message_body_in_two_reads(true);
}

/// Messages whose body arrives in two parts 20 ms apart (the descriptor with the first):
/// each is answered as if it had come in one piece, and the connection stays in step.
fn message_body_in_two_reads(xen: bool) {
    let mut s = Served::start(if xen { "split-xen" } else { "split-std" }, 1, None);
    let src = memfd(0x1000);
    let raw = Raw::connect(&s.path);
    let offered = raw.negotiate(xen);
    let gap = Duration::from_millis(20);
    let it = single_region(wire_region(FREE_GPA, 0x1000, 0x5000_0000_0000, xen));
    let cases: Vec<(&str, FrontendReq, Vec<u8>, usize, usize)> = vec![
        (
            "SET_VRING_NUM, 4 + 4 bytes",
            FrontendReq::SET_VRING_NUM,
            vring_state(0, 256),
            4,
            0,
        ),
        (
            "ADD_MEM_REG, 12 + the rest, fd first",
            FrontendReq::ADD_MEM_REG,
            it.clone(),
            12,
            1,
        ),
        // Proves the ADD above took effect whole: the exact region can be removed.
        (
            "REM_MEM_REG, 30 + the rest",
            FrontendReq::REM_MEM_REG,
            it,
            30,
            0,
        ),
    ];
    for (name, code, body, split, nfds) in cases {
        eprintln!(
            "split case ({}): {name}",
            if xen { "xen" } else { "standard" }
        );
        let fds: Vec<RawFd> = (0..nfds).map(|_| src.as_raw_fd()).collect();
        raw.send_in_two_parts(code as u32, &body, &fds, split, gap);
        let r = raw.recv();
        assert_eq!(
            (r.code, r.flags),
            (code as u32, V1 | REPLY),
            "{name}: {r:?}"
        );
        assert_eq!(r.u64(), 0, "{name}: REPLY_ACK value");
        assert_eq!(raw.get_u64(FrontendReq::GET_FEATURES), offered, "{name}");
    }
    raw.into_driver(320);
    s.join();
}

// ---------------------------------------------------------------------------------------------
// Hot plug while I/O runs
// ---------------------------------------------------------------------------------------------

/// Adds and removes extra regions, between passes and from inside them (the progress
/// callback runs with requests of both queues in flight), checking data every pass.
fn hot_plug(drv: &mut VirtioDriver, regions: &[VhostUserMemoryRegionInfo], rounds: u64) {
    let mut fe = drv.frontend().clone();
    for round in 0..rounds {
        let r = &regions[round as usize % regions.len()];
        // Between passes: in, proven in (a second ADD overlaps), out, proven out.
        fe.add_mem_region(r).expect("ADD_MEM_REG");
        assert_nack(
            "second ADD_MEM_REG of the same region",
            fe.add_mem_region(r),
        );
        verify_io(drv, 300 + round);
        fe.remove_mem_region(r).expect("REM_MEM_REG");
        assert_nack(
            "second REM_MEM_REG of the same region",
            fe.remove_mem_region(r),
        );
        // While requests are in flight.
        let mut plugged = false;
        let mut toggles = 0u32;
        let mut cb = |_done: u64| {
            if plugged {
                fe.remove_mem_region(r).expect("REM_MEM_REG in flight");
            } else {
                fe.add_mem_region(r).expect("ADD_MEM_REG in flight");
            }
            plugged = !plugged;
            toggles += 1;
        };
        let total = 512 * 1024;
        let w = pass(drv, QUEUES, true, total, 4096, 400 + round, &mut cb).expect("write pass");
        assert_eq!((w.requests, w.bad), (128, 0));
        let rd = pass(drv, QUEUES, false, total, 4096, 400 + round, &mut cb).expect("read pass");
        assert_eq!((rd.requests, rd.bad), (128, 0));
        assert!(
            toggles >= 2,
            "only {toggles} hot-plug messages while I/O ran"
        );
        if plugged {
            fe.remove_mem_region(r)
                .expect("REM_MEM_REG after the passes");
        }
    }
}

#[test]
fn hot_plug_unix_while_io_runs() {
    let mut s = Served::start("hotplug-unix", 1, None);
    let mut drv = connect(&s.path, driver_config(GuestMode::Unix));
    let _wd = Watchdog::arm(drv.frontend().as_raw_fd(), Duration::from_secs(120));
    let a = memfd(1 << 20);
    let b = memfd(2 << 20);
    let regions = [
        region(FREE_GPA, 1 << 20, 0x5000_0000_0000, &a, 0, 0),
        region(FREE_GPA + (16 << 20), 2 << 20, 0x5100_0000_0000, &b, 0, 0),
    ];
    hot_plug(&mut drv, &regions, 6);
    drop(_wd);
    drop(drv);
    s.join();
}

// ---------------------------------------------------------------------------------------------
// Disconnect with a batch in flight, then a new frontend
// ---------------------------------------------------------------------------------------------

/// Publishes a full window of 64 KiB writes on every queue, kicks, and returns without
/// waiting for any of them.
fn publish_and_abandon(drv: &mut VirtioDriver) {
    let data = vec![0x5au8; 64 * 1024];
    for q in 0..QUEUES {
        let mut n = 0u16;
        while let Some((slot, s)) = drv.take_slot(q) {
            let mut header = [0u8; 16];
            header[0..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
            header[8..16].copy_from_slice(&(u64::from(n) * 128 + 2048).to_le_bytes());
            drv.write(s.header, &header).expect("header");
            drv.write(s.data_out, &data).expect("data");
            drv.write(s.status, &[0xff]).expect("status");
            let bufs = [
                Buf {
                    gpa: s.header,
                    len: 16,
                    write: false,
                },
                Buf {
                    gpa: s.data_out,
                    len: data.len() as u32,
                    write: false,
                },
                Buf {
                    gpa: s.status,
                    len: 1,
                    write: true,
                },
            ];
            drv.publish(q, slot, &bufs).expect("publish");
            n += 1;
        }
        drv.kick(q, n).expect("kick");
    }
}

/// Returns the daemon's and the emulation's live mappings (0, 0 without Xen).
type LiveCheck = Box<dyn Fn() -> (i64, usize)>;

fn disconnect_then_new_frontend(
    tag: &str,
    cfg: DriverConfig,
    xen: Option<XenHandle>,
    live: LiveCheck,
) {
    let mut s = Served::start(tag, 2, xen);
    {
        let mut first = connect(&s.path, cfg.clone());
        verify_io(&mut first, 500);
        publish_and_abandon(&mut first);
        // Dropped here: the socket closes with up to 16 requests not completed.
    }
    s.wait_connections(1);
    assert_eq!(
        live(),
        (0, 0),
        "live mappings (daemon, emulation) after the first frontend left"
    );
    let mut second = connect(&s.path, cfg);
    let _wd = Watchdog::arm(second.frontend().as_raw_fd(), Duration::from_secs(120));
    verify_io(&mut second, 501);
    drop(_wd);
    drop(second);
    s.join();
    assert_eq!(s.daemon.stats().snapshot().connections, 2);
    assert_eq!(
        live(),
        (0, 0),
        "live mappings (daemon, emulation) at the end"
    );
}

#[test]
fn disconnect_mid_batch_then_new_frontend_unix() {
    disconnect_then_new_frontend(
        "disc-unix",
        driver_config(GuestMode::Unix),
        None,
        Box::new(|| (0, 0)),
    );
}

/// A frontend that does not ack XEN_MMAP sends 32-byte regions; the daemon maps them as UNIX
/// regions, and region errors are still answered.
#[test]
fn standard_layout_regions_from_a_frontend_without_xen_mmap() {
    let mut s = Served::start("std-layout", 1, None);
    let raw = Raw::connect(&s.path);
    raw.negotiate(false);
    let ram = memfd(2 << 20);
    let table = mem_table(
        1,
        &[wire_region(FREE_GPA, 2 << 20, 0x6000_0000_0000, false)],
    );
    let set_mem = FrontendReq::SET_MEM_TABLE as u32;
    assert_eq!(
        raw.ack(set_mem, table.len() as u32, &table, &[ram.as_raw_fd()]),
        0
    );
    let extra = memfd(1 << 20);
    let mut add = vec![0u8; 8];
    add.extend(wire_region(
        FREE_GPA + (4 << 20),
        1 << 20,
        0x6100_0000_0000,
        false,
    ));
    let add_code = FrontendReq::ADD_MEM_REG as u32;
    let rem_code = FrontendReq::REM_MEM_REG as u32;
    assert_eq!(
        raw.ack(add_code, 40, &add, &[extra.as_raw_fd()]),
        0,
        "ADD_MEM_REG"
    );
    assert_eq!(
        raw.ack(add_code, 40, &add, &[extra.as_raw_fd()]),
        1,
        "overlapping ADD"
    );
    assert_eq!(raw.ack(rem_code, 40, &add, &[]), 0, "REM_MEM_REG");
    assert_eq!(
        raw.ack(rem_code, 40, &add, &[]),
        1,
        "REM of an absent region"
    );
    raw.into_driver(77);
    s.wait_connections(1);
    s.join();
}

// ---------------------------------------------------------------------------------------------
// Emulated Xen: GRANT memory
// ---------------------------------------------------------------------------------------------

mod xen {
    use super::*;
    use xen_vhost_mem::testing::EmulatedXen;
    use xen_vhost_mem::xen_page::GRANT_ADDR_BIT;

    const GRANT: u32 = 0x2;
    const NO_ADVANCE: u32 = 0x8;
    const FOREIGN: u32 = 0x1;
    const DOMID: u32 = 1;
    /// A grant address no layout uses (refs of the small emulation stay far below).
    const FREE_GRANT_GPA: u64 = GRANT_ADDR_BIT | 0x1000_0000;

    fn emulated(connections: usize) -> (Arc<EmulatedXen>, XenHandle, DriverConfig) {
        let cfg = driver_config(GuestMode::Grant);
        let emu =
            Arc::new(EmulatedXen::new(connections * cfg.emulation_pages()).expect("emulation"));
        let dev = XenHandle::new(emu.clone());
        let cfg = DriverConfig {
            emulation: Some(emu.clone()),
            ..cfg
        };
        (emu, dev, cfg)
    }

    /// Cases of the Xen wire format.
    fn xen_cases() -> Vec<Case> {
        let null = Arc::new(File::open("/dev/null").expect("/dev/null"));
        let (n1, n2, n3, n4) = (null.clone(), null.clone(), null.clone(), null.clone());
        vec![
            (
                "ADD_MEM_REG with unknown Xen flags 0x40",
                Box::new(move |d| {
                    let r = region(FREE_GRANT_GPA, 0x1000, 0, &n1, 0x40 | GRANT, DOMID);
                    d.frontend().add_mem_region(&r).map(|_| ())
                }),
            ),
            (
                "ADD_MEM_REG with domid 0x8000",
                Box::new(move |d| {
                    let r = region(FREE_GRANT_GPA, 0x1000, 0, &n2, GRANT | NO_ADVANCE, 0x8000);
                    d.frontend().add_mem_region(&r).map(|_| ())
                }),
            ),
            (
                "ADD_MEM_REG FOREIGN + NO_ADVANCE_MAP",
                Box::new(move |d| {
                    let r = region(FREE_GPA, 0x1000, 0, &n3, FOREIGN | NO_ADVANCE, DOMID);
                    d.frontend().add_mem_region(&r).map(|_| ())
                }),
            ),
            (
                "SET_VRING_ADDR with rings in on-demand memory",
                Box::new(move |d| {
                    // An on-demand GRANT region that does translate (nonzero userspace_addr): the
                    // rings would be in memory not mapped in advance.
                    let uaddr = 0x6000_0000_0000;
                    let r = region(
                        FREE_GRANT_GPA,
                        0x10_0000,
                        uaddr,
                        &n4,
                        GRANT | NO_ADVANCE,
                        DOMID,
                    );
                    d.frontend().add_mem_region(&r).expect("on-demand region");
                    let res = d.frontend().set_vring_addr(1, &ring_at(uaddr));
                    d.frontend()
                        .remove_mem_region(&r)
                        .expect("remove on-demand region");
                    res
                }),
            ),
            (
                "SET_VRING_ADDR inside an on-demand region announced with userspace_addr 0",
                Box::new(|d| {
                    // The driver's on-demand regions start at bit 63 with userspace_addr 0: an
                    // address inside [0, size) must not translate through them.
                    d.frontend().set_vring_addr(1, &ring_at(0x1000))
                }),
            ),
        ]
    }

    #[test]
    fn frontend_invalid_messages_grant() {
        let (emu, dev, cfg) = emulated(1);
        let mut s = Served::start("fe-grant", 1, Some(dev.clone()));
        let mut drv = connect(&s.path, cfg);
        let wd = Watchdog::arm(drv.frontend().as_raw_fd(), Duration::from_secs(120));
        verify_io(&mut drv, 1);
        let mut cases = common_cases();
        cases.extend(xen_cases());
        run_cases(&mut drv, &cases, 600);
        drop(wd);
        drop(drv);
        s.join();
        assert_eq!(dev.counters().live_mappings(), 0);
        assert_eq!(emu.live_mappings(), 0);
        assert_eq!(emu.live_grant_maps(), 0);
    }

    #[test]
    fn xen_region_without_xen_device() {
        let mut s = Served::start("no-xen-dev", 1, None);
        let mut drv = connect(&s.path, driver_config(GuestMode::Unix));
        let wd = Watchdog::arm(drv.frontend().as_raw_fd(), Duration::from_secs(60));
        let null = File::open("/dev/null").expect("/dev/null");
        let cases = [
            region(
                FREE_GRANT_GPA,
                0x10_0000,
                0,
                &null,
                GRANT | NO_ADVANCE,
                DOMID,
            ),
            region(
                FREE_GRANT_GPA,
                0x1000,
                0x6000_0000_0000,
                &null,
                GRANT,
                DOMID,
            ),
            region(FREE_GPA, 0x1000, 0x6000_0000_0000, &null, FOREIGN, DOMID),
        ];
        for (i, r) in cases.iter().enumerate() {
            assert_nack(
                "Xen region without a Xen device",
                drv.frontend().add_mem_region(r),
            );
            verify_io(&mut drv, 700 + i as u64);
        }
        drop(wd);
        drop(drv);
        s.join();
    }

    #[test]
    fn hot_plug_grant_while_io_runs() {
        let (emu, dev, cfg) = emulated(1);
        let mut s = Served::start("hotplug-grant", 1, Some(dev.clone()));
        let mut drv = connect(&s.path, cfg);
        let wd = Watchdog::arm(drv.frontend().as_raw_fd(), Duration::from_secs(120));
        let a = memfd(1 << 20);
        let null = File::open("/dev/null").expect("/dev/null");
        let regions = [
            region(FREE_GPA, 1 << 20, 0x5000_0000_0000, &a, 0, 0),
            region(
                FREE_GRANT_GPA,
                0x10_0000,
                0,
                &null,
                GRANT | NO_ADVANCE,
                DOMID,
            ),
        ];
        hot_plug(&mut drv, &regions, 4);
        drop(wd);
        drop(drv);
        s.join();
        assert_eq!(dev.counters().live_mappings(), 0);
        assert_eq!(emu.live_mappings(), 0);
    }

    #[test]
    fn disconnect_mid_batch_then_new_frontend_grant() {
        let (emu, dev, cfg) = emulated(2);
        let d = dev.clone();
        let e = emu.clone();
        disconnect_then_new_frontend(
            "disc-grant",
            cfg,
            Some(dev),
            Box::new(move || (d.counters().live_mappings(), e.live_mappings())),
        );
        assert_eq!(emu.live_grant_maps(), 0);
    }
}
