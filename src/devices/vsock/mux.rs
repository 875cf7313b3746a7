//! The device's connections and the packets waiting for the guest: guest packets from the
//! tx queue are routed to their connection, host sockets are watched through one epoll
//! instance, and held receive buffers are filled (control packets first, then host data
//! round-robin over the connections that have some and credit to send it).

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::chain::{write_packet, Segments};
use super::conn::{Conn, HostRead, Key, Outcome, State};
use super::host::{connect_for_guest, PendingHost};
use super::packet::{
    Header, Op, EVENT_TRANSPORT_RESET, HDR_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_SEND,
};
use crate::daemon::Request;

/// Most connections at a time; a REQUEST or CONNECT beyond is refused. With the guest's
/// credit ([`super::credit::HOST_BUF_ALLOC`] each) this bounds what a guest can make the
/// daemon buffer for host programs that do not read: 1024 x 256 KiB = 256 MiB.
pub const MAX_CONNS: usize = 1024;
/// Most host streams still sending their CONNECT line.
pub const MAX_PENDING_HOST: usize = 256;
/// Most control packets waiting for a receive buffer; a guest that floods bad packets and
/// posts no buffers loses the replies beyond, not the daemon's memory.
pub const MAX_CONTROL: usize = 4096;
/// First host port handed to host-initiated connections; they count up, skipping a port a
/// connection to the same guest port holds (a connection is its pair of ports).
const FIRST_HOST_PORT: u32 = 1024;
/// Epoll token of the listening socket; connections and pending streams count up from 1.
const LISTENER: u64 = 0;

/// Counters of a vsock device, for logs and tests.
#[derive(Debug, Default)]
pub struct VsockStats {
    /// Packets read from the tx queue.
    pub tx_packets: AtomicU64,
    /// Packets written into rx buffers.
    pub rx_packets: AtomicU64,
    /// Payload bytes guest → host (written or buffered for the host stream).
    pub tx_bytes: AtomicU64,
    /// Payload bytes host → guest.
    pub rx_bytes: AtomicU64,
    /// RSTs sent to the guest.
    pub rsts: AtomicU64,
    /// Guest packets refused as malformed (bad op, type, cid or length, unreadable chain).
    pub malformed: AtomicU64,
    /// Connections established (either side initiating).
    pub connections: AtomicU64,
    /// Control packets dropped at [`MAX_CONTROL`].
    pub dropped_control: AtomicU64,
    /// Transport resets announced on the event queue.
    pub transport_resets: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What an epoll token stands for.
#[derive(Clone, Copy, Debug)]
enum Target {
    Pending,
    Conn(Key),
}

/// The connections, the host sockets and the guest's waiting buffers.
#[derive(Debug)]
pub struct Mux {
    guest_cid: u64,
    uds_path: PathBuf,
    epoll: Epoll,
    listener: UnixListener,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Target>,
    next_token: u64,
    pending: HashMap<u64, PendingHost>,
    /// Control packets for the guest, in order.
    control: VecDeque<Header>,
    /// Connections with host bytes and credit, round-robin.
    ready: VecDeque<Key>,
    /// Receive buffers held until a packet is due, oldest first.
    rx: VecDeque<Request>,
    /// Event-queue buffers held until an event is due.
    events: VecDeque<Request>,
    /// The guest must hear that its connections are gone (a new daemon or frontend).
    announce_reset: bool,
    next_host_port: u32,
    scratch: Vec<u8>,
    stats: Arc<VsockStats>,
}

impl Mux {
    /// Watches `listener` (non-blocking) for host programs.
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        stats: Arc<VsockStats>,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, LISTENER),
        )?;
        Ok(Mux {
            guest_cid,
            uds_path,
            epoll,
            listener,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: LISTENER + 1,
            pending: HashMap::new(),
            control: VecDeque::new(),
            ready: VecDeque::new(),
            rx: VecDeque::new(),
            events: VecDeque::new(),
            announce_reset: true,
            next_host_port: FIRST_HOST_PORT,
            scratch: vec![0; MAX_PAYLOAD as usize],
            stats,
        })
    }

    /// The epoll instance's fd: readable when a host socket has something.
    pub fn epoll_fd(&self) -> std::os::fd::RawFd {
        self.epoll.as_raw_fd()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Receive buffers held now.
    pub fn held_rx(&self) -> usize {
        self.rx.len()
    }

    fn token(&mut self, t: Target) -> u64 {
        let tok = self.next_token;
        self.next_token += 1;
        self.tokens.insert(tok, t);
        tok
    }

    fn watch(&self, fd: std::os::fd::RawFd, token: u64) -> std::io::Result<()> {
        let ev = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(ev, token))
    }

    fn push_control(&mut self, h: Header) {
        if self.control.len() >= MAX_CONTROL {
            bump(&self.stats.dropped_control, 1);
            return;
        }
        if h.op == Op::Rst as u16 {
            bump(&self.stats.rsts, 1);
        }
        self.control.push_back(h);
    }

    /// An RST to the guest port `h` came from, whatever `h` claimed as its source CID.
    fn rst_to(&mut self, h: &Header) {
        if h.op == Op::Rst as u16 {
            return; // never answer an RST with one
        }
        let mut r = h.reply(Op::Rst);
        r.src_cid = HOST_CID;
        r.dst_cid = self.guest_cid;
        self.push_control(r);
    }

    fn control_for(&mut self, key: Key, op: Op, flags: u32) {
        let cid = self.guest_cid;
        if let Some(c) = self.conns.get_mut(&key) {
            let h = c.header(cid, op, 0, flags);
            self.push_control(h);
        }
    }

    fn close(&mut self, key: Key, rst: bool) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            if rst {
                let mut c = c;
                let h = c.header(self.guest_cid, Op::Rst, 0, 0);
                self.push_control(h);
            }
            // Dropping the stream closes it, which also takes it out of the epoll set.
        }
    }

    fn apply(&mut self, key: Key, o: Outcome) {
        match o {
            Outcome::Quiet => {}
            Outcome::Reply(op) => self.control_for(key, op, 0),
            Outcome::Reset => self.close(key, true),
            Outcome::Drop => self.close(key, false),
        }
        self.mark_ready(key);
    }

    fn mark_ready(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.can_send() {
                c.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    /// A tx chain too short for a header: nothing to answer, only counted.
    pub fn stats_malformed(&self) {
        bump(&self.stats.malformed, 1);
    }

    /// A guest packet whose header did not pass the checks: an RST to its sender, and its
    /// connection, if it names one, is torn down.
    pub fn refuse(&mut self, h: &Header) {
        bump(&self.stats.malformed, 1);
        let key = Key::of_guest_packet(h);
        if h.src_cid == self.guest_cid && self.conns.contains_key(&key) {
            self.close(key, true);
        } else {
            self.rst_to(h);
        }
    }

    /// A checked guest packet with its payload.
    pub fn on_guest(&mut self, op: Op, h: &Header, payload: &[u8]) {
        bump(&self.stats.tx_packets, 1);
        let key = Key::of_guest_packet(h);
        if let Some(c) = self.conns.get_mut(&key) {
            if op == Op::Rw {
                bump(&self.stats.tx_bytes, payload.len() as u64);
            }
            let o = c.on_guest(op, h, payload);
            self.apply(key, o);
            return;
        }
        match op {
            Op::Request => self.guest_connect(key, h),
            Op::Rst => {}
            _ => self.rst_to(h),
        }
    }

    /// The guest connects to host port `key.host_port`: `<uds-path>_<port>`.
    fn guest_connect(&mut self, key: Key, h: &Header) {
        if self.conns.len() >= MAX_CONNS {
            self.rst_to(h);
            return;
        }
        let stream = match connect_for_guest(&self.uds_path, key.host_port) {
            Ok(s) => s,
            Err(e) => {
                // Nobody listening is the guest's business; anything else (a permission,
                // the sandbox's user) is the operator's.
                let quiet = matches!(&e, super::host::HostError::Connect { err, .. }
                    if matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED)));
                if quiet {
                    log::debug!("vsock: guest port {}: {e}", key.guest_port);
                } else {
                    log::warn!("vsock: guest port {}: {e}", key.guest_port);
                }
                self.rst_to(h);
                return;
            }
        };
        let token = self.token(Target::Conn(key));
        if let Err(e) = self.watch(stream.as_raw_fd(), token) {
            log::warn!("vsock: epoll: {e}");
            self.tokens.remove(&token);
            self.rst_to(h);
            return;
        }
        let c = Conn::new(
            key,
            stream,
            token,
            State::Connected,
            (h.buf_alloc, h.fwd_cnt),
        );
        self.conns.insert(key, c);
        bump(&self.stats.connections, 1);
        self.control_for(key, Op::Response, 0);
    }

    /// Drains the epoll instance without blocking: accepts host programs, reads CONNECT
    /// lines, notes readable and writable streams. Then fills what receive buffers it can.
    pub fn host_events(&mut self) {
        let mut evs = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut evs) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("vsock: epoll: {e}");
                    0
                }
            };
            for ev in evs.iter().take(n) {
                let set = ev.event_set();
                let tok = ev.data();
                if tok == LISTENER {
                    self.accept();
                    continue;
                }
                match self.tokens.get(&tok).copied() {
                    Some(Target::Pending) => self.pending_line(tok),
                    Some(Target::Conn(key)) => {
                        let readable = set.intersects(
                            EventSet::IN
                                | EventSet::READ_HANG_UP
                                | EventSet::HANG_UP
                                | EventSet::ERROR,
                        );
                        let writable = set.intersects(EventSet::OUT | EventSet::ERROR);
                        if let Some(c) = self.conns.get_mut(&key) {
                            let o = c.on_ready(readable, writable);
                            self.apply(key, o);
                        }
                    }
                    None => {}
                }
            }
            if n < evs.len() {
                break;
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.pending.len() >= MAX_PENDING_HOST || self.conns.len() >= MAX_CONNS {
                        continue; // dropped: the host program sees its stream close
                    }
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let tok = self.token(Target::Pending);
                    if self.watch(s.as_raw_fd(), tok).is_err() {
                        self.tokens.remove(&tok);
                        continue;
                    }
                    self.pending.insert(tok, PendingHost::new(s));
                    // The line may be there already (an edge before we watched).
                    self.pending_line(tok);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    /// A pending host stream is readable: once its line is whole, a REQUEST goes to the
    /// guest and the stream becomes a connecting connection.
    fn pending_line(&mut self, tok: u64) {
        let Some(p) = self.pending.get_mut(&tok) else {
            return;
        };
        let port = match p.poll_line() {
            Ok(None) => return,
            Ok(Some(port)) => port,
            Err(e) => {
                log::debug!("vsock: {e}");
                self.pending.remove(&tok);
                self.tokens.remove(&tok);
                return;
            }
        };
        let Some(p) = self.pending.remove(&tok) else {
            return;
        };
        let Some(host_port) = self.free_host_port(port) else {
            self.tokens.remove(&tok);
            return;
        };
        let key = Key {
            host_port,
            guest_port: port,
        };
        self.tokens.insert(tok, Target::Conn(key));
        let mut c = Conn::new(key, p.stream, tok, State::Connecting, (0, 0));
        // The host may have written data behind its line already: read it once connected.
        c.readable = true;
        self.conns.insert(key, c);
        bump(&self.stats.connections, 1);
        self.control_for(key, Op::Request, 0);
    }

    /// A host port no connection to `guest_port` uses.
    fn free_host_port(&mut self, guest_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNS {
            let p = self.next_host_port;
            self.next_host_port = p.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            let key = Key {
                host_port: p,
                guest_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(p);
            }
        }
        None
    }

    /// A receive buffer from the guest, held until a packet is due.
    pub fn add_rx(&mut self, r: Request) {
        self.rx.push_back(r);
    }

    /// An event-queue buffer.
    pub fn add_event(&mut self, r: Request) {
        self.events.push_back(r);
        self.pump_events();
    }

    /// Announces a transport reset if one is due and the guest gave an event buffer.
    fn pump_events(&mut self) {
        if !self.announce_reset {
            return;
        }
        while let Some(r) = self.events.pop_front() {
            let segs = Segments::of(r.descriptors(), true);
            let wrote = match r.scope() {
                Ok(s) => s.memory().is_some_and(|m| {
                    segs.write(m, 0, &EVENT_TRANSPORT_RESET.to_le_bytes())
                        .is_ok()
                }),
                Err(_) => continue, // released: the queue stopped
            };
            if segs.len() >= 4 && wrote {
                let _ = r.complete(4);
                self.announce_reset = false;
                bump(&self.stats.transport_resets, 1);
                return;
            }
            // Too small or unwritable: returned empty, the next buffer is tried.
            let _ = r.complete(0);
        }
    }

    /// Fills held receive buffers with what is due, completing each.
    pub fn pump(&mut self) {
        while let Some(r) = self.rx.pop_front() {
            match self.fill(&r) {
                Fill::Done(len) => {
                    let _ = r.complete(len);
                }
                Fill::Nothing => {
                    self.rx.push_front(r);
                    return;
                }
                Fill::Gone => {}
            }
        }
    }

    fn fill(&mut self, r: &Request) -> Fill {
        let scope = match r.scope() {
            Ok(s) => s,
            Err(_) => return Fill::Gone,
        };
        let Some(mem) = scope.memory() else {
            return Fill::Gone;
        };
        let segs = Segments::of(r.descriptors(), true);
        if segs.len() < HDR_LEN {
            bump(&self.stats.malformed, 1);
            return Fill::Done(0);
        }
        if let Some(h) = self.control.pop_front() {
            return match write_packet(mem, &segs, &h, &[]) {
                Ok(len) => {
                    bump(&self.stats.rx_packets, 1);
                    Fill::Done(len)
                }
                Err(e) => {
                    log::debug!("vsock: rx buffer: {e}");
                    Fill::Done(0)
                }
            };
        }
        let room = (segs.len() - HDR_LEN).min(MAX_PAYLOAD as usize);
        while let Some(key) = self.ready.pop_front() {
            let cid = self.guest_cid;
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            if !c.can_send() {
                continue;
            }
            let max = room.min(c.credit.peer_free() as usize);
            let (h, n) = match c.read_host(&mut self.scratch[..max]) {
                HostRead::Data(n) => (c.header(cid, Op::Rw, n as u32, 0), n),
                HostRead::WouldBlock => continue,
                HostRead::Eof => (c.header(cid, Op::Shutdown, 0, SHUTDOWN_SEND), 0),
                HostRead::Failed(e) => {
                    log::debug!("vsock: host stream {key:?}: {e}");
                    drop(scope);
                    self.close(key, true);
                    return self.fill(r);
                }
            };
            let res = write_packet(mem, &segs, &h, &self.scratch[..n]);
            return match res {
                Ok(len) => {
                    bump(&self.stats.rx_packets, 1);
                    bump(&self.stats.rx_bytes, n as u64);
                    self.mark_ready(key);
                    Fill::Done(len)
                }
                Err(e) => {
                    // The bytes read are lost: the stream cannot go on.
                    log::debug!("vsock: rx buffer: {e}");
                    self.close(key, true);
                    Fill::Done(0)
                }
            };
        }
        Fill::Nothing
    }

    /// Queue `queue` stopped (GET_VRING_BASE, reset, disconnect). Its held buffers are
    /// forgotten (the runtime released them); when the rx or tx queue stops, every
    /// connection is dropped (host streams closed) and the guest hears a transport reset
    /// once it gives an event buffer again.
    pub fn reset(&mut self, queue: usize) {
        match queue {
            super::RX => self.rx.clear(),
            super::EVENT => self.events.clear(),
            _ => {}
        }
        if queue == super::RX || queue == super::TX {
            if !self.conns.is_empty() {
                log::info!(
                    "vsock: queue {queue} stopped: {} connections dropped",
                    self.conns.len()
                );
            }
            self.conns.clear();
            self.pending.clear();
            self.tokens.clear();
            self.control.clear();
            self.ready.clear();
            self.announce_reset = true;
        }
    }
}

enum Fill {
    /// Completed with this used length.
    Done(u32),
    /// Nothing due: keep holding.
    Nothing,
    /// The queue stopped: the request is dead.
    Gone,
}
