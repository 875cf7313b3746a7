//! A guest's vsock stack in a test: the test kit's driver plays the virtio driver (rx, tx
//! and event queues over memfd or emulated GRANT memory), this plays Linux's
//! `virtio_transport_common` on top, just enough to connect, listen, send within the
//! host's credit, receive and grant credit back.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xen_vhost_mem::daemon::VhostUserDaemon;
use xen_vhost_mem::devices::vsock::packet::{Header, Op, HDR_LEN, HOST_CID, TYPE_STREAM};
use xen_vhost_mem::devices::vsock::{VsockDevice, EVENT, RX, TX};
use xen_vhost_mem::testing::driver::{Buf, DriverConfig, GuestMode, VirtioDriver};
use xen_vhost_mem::testing::{EmulatedXen, GuestSim};
use xen_vhost_mem::XenHandle;

use crate::common::ScratchDir;

/// The guest's CID in every test.
pub const CID: u64 = 3;
/// Bytes of one receive buffer after its header (Linux's default).
pub const RX_PAYLOAD: u32 = 4096;
/// Largest payload the guest puts in one packet (its tx buffers hold 16 KiB).
pub const TX_CHUNK: usize = 16 * 1024 - HDR_LEN;

/// One guest connection, keyed by (guest port, host port).
#[derive(Debug, Default)]
pub struct GConn {
    /// Everything received, in order.
    pub data: Vec<u8>,
    /// Bytes of `data` the application consumed (what `fwd_cnt` announces).
    pub fwd_cnt: u32,
    announced_fwd: u32,
    /// The host's credit.
    pub peer_buf_alloc: u32,
    /// The host's consumed count.
    pub peer_fwd_cnt: u32,
    /// Bytes sent so far.
    pub tx_cnt: u32,
    /// RESPONSE seen (or sent, for a connection the host made).
    pub connected: bool,
    /// RST seen.
    pub rst: bool,
    /// SHUTDOWN flags the host sent.
    pub peer_shutdown: u32,
}

impl GConn {
    /// Bytes the host's credit allows now.
    pub fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A daemon serving a [`VsockDevice`], and the guest talking to it.
pub struct Rig {
    pub dir: ScratchDir,
    pub uds: PathBuf,
    pub dev: Arc<VsockDevice>,
    pub daemon: Arc<VhostUserDaemon<VsockDevice>>,
    pub thread: Option<std::thread::JoinHandle<()>>,
    pub emu: Option<Arc<EmulatedXen>>,
    pub xen: Option<XenHandle>,
    pub sock: PathBuf,
    pub cfg: DriverConfig,
    pub g: Guest,
}

/// Driver layout for vsock: three queues, 16 buffers each.
pub fn config(mode: GuestMode) -> DriverConfig {
    DriverConfig {
        mode,
        queues: 3,
        queue_size: 64,
        depth: 16,
        max_data: 16 * 1024,
        ..DriverConfig::default()
    }
}

impl Rig {
    /// A daemon on a fresh device serving `connections` frontends, and a guest connected.
    pub fn new(tag: &str, mode: GuestMode, connections: usize) -> Rig {
        Self::open(tag, mode, connections, false)
    }

    /// [`Rig::new`], the guest's receive buffers split in two descriptors if `split_rx`.
    pub fn open(tag: &str, mode: GuestMode, connections: usize, split_rx: bool) -> Rig {
        let dir = ScratchDir::new(tag);
        let uds = dir.0.join("v.sock");
        let dev = Arc::new(VsockDevice::new(CID, &uds).expect("vsock device"));
        let cfg = config(mode);
        let (emu, xen) = if mode == GuestMode::Unix {
            (None, None)
        } else {
            let emu = Arc::new(EmulatedXen::new(cfg.emulation_pages()).expect("emulation"));
            let xen = XenHandle::new(emu.clone());
            (Some(emu), Some(xen))
        };
        let mut daemon = VhostUserDaemon::new(dev.clone());
        if let Some(x) = &xen {
            daemon = daemon.with_xen(x.clone());
        }
        let daemon = Arc::new(daemon);
        let sock = dir.0.join("vhost.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let d = daemon.clone();
        let thread =
            std::thread::spawn(move || d.serve(&listener, Some(connections)).expect("serve"));
        let drv = connect(&sock, &cfg, &emu, &xen);
        Rig {
            dir,
            uds,
            dev,
            daemon,
            thread: Some(thread),
            emu,
            xen,
            sock,
            cfg,
            g: Guest::new(drv, split_rx),
        }
    }

    /// The host program's socket for guest connections to `port`.
    pub fn listen_host(&self, port: u32) -> UnixListener {
        let mut p = self.uds.as_os_str().to_os_string();
        p.push(format!("_{port}"));
        UnixListener::bind(PathBuf::from(p)).expect("bind host port")
    }

    /// Drops the frontend and waits for the daemon to finish serving it.
    pub fn finish(mut self) -> (Option<Arc<EmulatedXen>>, Arc<VsockDevice>) {
        drop(self.g);
        self.thread.take().expect("daemon").join().expect("daemon");
        (self.emu, self.dev)
    }
}

/// A new frontend and driver on the daemon at `sock`.
pub fn connect(
    sock: &std::path::Path,
    cfg: &DriverConfig,
    emu: &Option<Arc<EmulatedXen>>,
    xen: &Option<XenHandle>,
) -> VirtioDriver {
    match (emu, xen) {
        (Some(emu), Some(xen)) => {
            let guest = GuestSim {
                emu: emu.clone(),
                dev: xen.clone(),
                domid: 1,
            };
            VirtioDriver::connect_granting(sock, cfg.clone(), Box::new(guest)).expect("connect")
        }
        _ => VirtioDriver::connect(sock, cfg.clone()).expect("connect"),
    }
}

/// The guest's vsock stack over a driver.
pub struct Guest {
    pub drv: VirtioDriver,
    /// The guest's receive buffer per connection.
    pub buf_alloc: u32,
    /// Whether received bytes count as consumed at once (the application reads them).
    pub auto_consume: bool,
    /// Receive buffers as two descriptors (header, payload), as Linux before 6.2.
    pub split_rx: bool,
    pub conns: HashMap<(u32, u32), GConn>,
    pub listening: HashSet<u32>,
    /// Packets that matched no connection (RSTs for bad packets).
    pub stray: Vec<Header>,
    /// Event ids received.
    pub events: Vec<u32>,
    /// Free rx slots kept back from [`Guest::post_rx`] for [`Guest::post_rx_raw`].
    pub rx_reserve: usize,
    reserved: Vec<(usize, xen_vhost_mem::testing::driver::Slot)>,
    /// Receive buffers returned with less than a header (used length, as the device gave).
    pub short_rx: Vec<u32>,
    next_port: u32,
    rx_posted: bool,
}

impl Guest {
    pub fn new(drv: VirtioDriver, split_rx: bool) -> Guest {
        let mut g = Guest {
            drv,
            buf_alloc: 256 * 1024,
            auto_consume: true,
            split_rx,
            conns: HashMap::new(),
            listening: HashSet::new(),
            stray: Vec::new(),
            events: Vec::new(),
            short_rx: Vec::new(),
            rx_reserve: 0,
            reserved: Vec::new(),
            next_port: 40000,
            rx_posted: false,
        };
        g.post_rx();
        g
    }

    /// Publishes every free rx slot as a receive buffer.
    pub fn post_rx(&mut self) {
        let mut n = 0;
        while let Some((slot, b)) = self.drv.take_slot(RX) {
            if self.reserved.len() < self.rx_reserve {
                self.reserved.push((slot, b));
                continue;
            }
            let bufs: Vec<Buf> = if self.split_rx {
                vec![
                    Buf {
                        gpa: b.data_in,
                        len: HDR_LEN as u32,
                        write: true,
                    },
                    Buf {
                        gpa: b.data_in + 4096,
                        len: RX_PAYLOAD,
                        write: true,
                    },
                ]
            } else {
                vec![Buf {
                    gpa: b.data_in,
                    len: HDR_LEN as u32 + RX_PAYLOAD,
                    write: true,
                }]
            };
            self.drv.publish(RX, slot, &bufs).expect("publish rx");
            n += 1;
        }
        if n > 0 {
            self.drv.kick(RX, n).expect("kick rx");
        }
        self.rx_posted = true;
    }

    /// Publishes one receive chain of the given buffers (hostile layouts).
    pub fn post_rx_raw(&mut self, bufs: impl Fn(xen_vhost_mem::testing::driver::Slot) -> Vec<Buf>) {
        let (slot, b) = self.reserved.pop().expect("a reserved rx slot");
        self.drv.publish(RX, slot, &bufs(b)).expect("publish rx");
        self.drv.kick(RX, 1).expect("kick rx");
    }

    /// Puts one chain of the given buffers on the tx queue (hostile layouts).
    pub fn send_bufs(&mut self, bufs: impl Fn(xen_vhost_mem::testing::driver::Slot) -> Vec<Buf>) {
        let (slot, b) = loop {
            if let Some(s) = self.drv.take_slot(TX) {
                break s;
            }
            self.drv
                .wait(TX, Duration::from_secs(10))
                .expect("tx completions");
        };
        self.drv.publish(TX, slot, &bufs(b)).expect("publish tx");
        self.drv.kick(TX, 1).expect("kick tx");
    }

    /// Publishes `n` event buffers (4 bytes each).
    pub fn post_events(&mut self, n: usize) {
        for _ in 0..n {
            let (slot, b) = self.drv.take_slot(EVENT).expect("event slot");
            self.drv
                .publish(
                    EVENT,
                    slot,
                    &[Buf {
                        gpa: b.data_in,
                        len: 4,
                        write: true,
                    }],
                )
                .expect("publish event");
        }
        self.drv.kick(EVENT, n as u16).expect("kick event");
    }

    /// Events completed within `timeout`.
    pub fn wait_events(&mut self, timeout: Duration) -> Vec<(u32, u32)> {
        let done = match self.drv.wait(EVENT, timeout) {
            Ok(d) => d,
            Err(_) => return Vec::new(),
        };
        done.iter()
            .map(|c| {
                let mut id = [0u8; 4];
                let b = self.drv.slot(EVENT, c.slot);
                self.drv.read(b.data_in, &mut id).expect("read event");
                let id = u32::from_le_bytes(id);
                self.events.push(id);
                (id, c.len)
            })
            .collect()
    }

    /// A header from the guest for connection (gp, hp).
    pub fn hdr(&mut self, op: Op, gp: u32, hp: u32, len: u32, flags: u32) -> Header {
        let fwd = self
            .conns
            .get_mut(&(gp, hp))
            .map(|c| {
                c.announced_fwd = c.fwd_cnt;
                c.fwd_cnt
            })
            .unwrap_or(0);
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: gp,
            dst_port: hp,
            len,
            typ: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: fwd,
        }
    }

    /// Puts raw bytes on the tx queue as one chain (header descriptor, payload descriptor).
    pub fn send_raw(&mut self, bytes: &[u8], split: bool) {
        let (slot, b) = loop {
            if let Some(s) = self.drv.take_slot(TX) {
                break s;
            }
            self.drv
                .wait(TX, Duration::from_secs(10))
                .expect("tx completions");
        };
        self.drv.write(b.data_out, bytes).expect("write tx");
        let bufs: Vec<Buf> = if split && bytes.len() > HDR_LEN {
            vec![
                Buf {
                    gpa: b.data_out,
                    len: HDR_LEN as u32,
                    write: false,
                },
                Buf {
                    gpa: b.data_out + HDR_LEN as u64,
                    len: (bytes.len() - HDR_LEN) as u32,
                    write: false,
                },
            ]
        } else {
            vec![Buf {
                gpa: b.data_out,
                len: bytes.len() as u32,
                write: false,
            }]
        };
        self.drv.publish(TX, slot, &bufs).expect("publish tx");
        self.drv.kick(TX, 1).expect("kick tx");
    }

    /// Sends a packet.
    pub fn send(&mut self, h: &Header, payload: &[u8]) {
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes, true);
        if h.op == Op::Rw as u16 {
            if let Some(c) = self.conns.get_mut(&(h.src_port, h.dst_port)) {
                c.tx_cnt = c.tx_cnt.wrapping_add(payload.len() as u32);
            }
        }
    }

    /// Connects to host port `hp`; returns the guest port. Waits for the answer.
    pub fn connect(&mut self, hp: u32) -> Result<u32, String> {
        let gp = self.start_connect(hp);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            self.poll(Duration::from_millis(50));
            let c = &self.conns[&(gp, hp)];
            if c.connected {
                return Ok(gp);
            }
            if c.rst {
                return Err("refused".into());
            }
        }
        Err("no answer".into())
    }

    /// Sends a REQUEST to host port `hp` without waiting; returns the guest port.
    pub fn start_connect(&mut self, hp: u32) -> u32 {
        let gp = self.next_port;
        self.next_port += 1;
        self.conns.insert((gp, hp), GConn::default());
        let h = self.hdr(Op::Request, gp, hp, 0, 0);
        self.send(&h, &[]);
        gp
    }

    /// Sends as much of `data` as the host's credit allows now, in packets of at most
    /// [`TX_CHUNK`]; returns the bytes sent.
    pub fn send_some(&mut self, key: (u32, u32), data: &[u8]) -> usize {
        let mut sent = 0;
        while sent < data.len() {
            let Some(c) = self.conns.get(&key) else { break };
            if c.rst {
                break;
            }
            let n = (c.peer_free() as usize)
                .min(TX_CHUNK)
                .min(data.len() - sent);
            if n == 0 {
                break;
            }
            let h = self.hdr(Op::Rw, key.0, key.1, n as u32, 0);
            self.send(&h, &data[sent..sent + n]);
            sent += n;
        }
        sent
    }

    /// Handles what arrived on rx within `timeout`; returns the packets seen.
    pub fn poll(&mut self, timeout: Duration) -> usize {
        let done = match self.drv.wait(RX, timeout) {
            Ok(d) => d,
            Err(_) => return 0,
        };
        let n = done.len();
        for c in done {
            let b = self.drv.slot(RX, c.slot);
            let mut hb = [0u8; HDR_LEN];
            if (c.len as usize) < HDR_LEN {
                self.short_rx.push(c.len);
                continue;
            }
            self.drv.read(b.data_in, &mut hb).expect("read rx");
            let h = Header::from_bytes(&hb);
            assert_eq!(
                c.len as usize,
                HDR_LEN + h.len as usize,
                "used length vs header"
            );
            let mut payload = vec![0u8; h.len as usize];
            let at = if self.split_rx {
                b.data_in + 4096
            } else {
                b.data_in + HDR_LEN as u64
            };
            self.drv.read(at, &mut payload).expect("read payload");
            self.handle(&h, payload);
        }
        self.post_rx();
        self.give_credit();
        n
    }

    fn handle(&mut self, h: &Header, payload: Vec<u8>) {
        assert_eq!(
            (h.src_cid, h.dst_cid),
            (HOST_CID, CID),
            "addressing of {h:?}"
        );
        let key = (h.dst_port, h.src_port);
        let op = Op::try_from(h.op).expect("the device sends valid ops");
        if op == Op::Request {
            if self.listening.contains(&h.dst_port) && !self.conns.contains_key(&key) {
                let c = GConn {
                    connected: true,
                    peer_buf_alloc: h.buf_alloc,
                    peer_fwd_cnt: h.fwd_cnt,
                    ..GConn::default()
                };
                self.conns.insert(key, c);
                let r = self.hdr(Op::Response, key.0, key.1, 0, 0);
                self.send(&r, &[]);
            } else {
                let r = self.hdr(Op::Rst, key.0, key.1, 0, 0);
                self.send(&r, &[]);
            }
            return;
        }
        let auto = self.auto_consume;
        let Some(c) = self.conns.get_mut(&key) else {
            self.stray.push(*h);
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match op {
            Op::Response => c.connected = true,
            Op::Rst => c.rst = true,
            Op::Shutdown => c.peer_shutdown |= h.flags,
            Op::Rw => {
                let free = self.buf_alloc - (c.data.len() as u32 - c.fwd_cnt);
                assert!(
                    h.len <= free,
                    "host sent {} bytes with {free} of credit",
                    h.len
                );
                c.data.extend_from_slice(&payload);
                if auto {
                    c.fwd_cnt = c.data.len() as u32;
                }
            }
            Op::CreditUpdate | Op::CreditRequest | Op::Request => {}
        }
        if op == Op::CreditRequest {
            let r = self.hdr(Op::CreditUpdate, key.0, key.1, 0, 0);
            self.send(&r, &[]);
        }
    }

    /// The application consumed everything received on `key` (a credit update follows).
    pub fn consume(&mut self, key: (u32, u32)) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_cnt = c.data.len() as u32;
        }
        self.give_credit();
    }

    /// Credit updates for connections whose consumed count moved by a quarter buffer.
    fn give_credit(&mut self) {
        let due: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                !c.rst && c.fwd_cnt.wrapping_sub(c.announced_fwd) >= self.buf_alloc / 4
            })
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            let h = self.hdr(Op::CreditUpdate, k.0, k.1, 0, 0);
            self.send(&h, &[]);
        }
    }

    /// Polls until `done(self)` or `timeout`; returns whether it got there.
    pub fn until(&mut self, timeout: Duration, mut done: impl FnMut(&mut Guest) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done(self) {
                return true;
            }
            self.poll(Duration::from_millis(20));
        }
        done(self)
    }
}

/// Deterministic bytes for stream `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, the checksum both ends compare.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
