//! One connection between a guest port and a host Unix stream: its state machine and the
//! bytes in flight towards the host. What the guest may send is bounded by our credit
//! ([`super::credit`]), so the bytes buffered here for a slow host reader never exceed
//! [`super::credit::HOST_BUF_ALLOC`].

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use super::credit::Credit;
use super::host::ok_line;
use super::packet::{Header, Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// A connection's ends: the host-side port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    /// Port on the host side (the destination of the guest's packets).
    pub host_port: u32,
    /// The guest's port (the source of its packets).
    pub guest_port: u32,
}

impl Key {
    /// The connection a guest packet belongs to.
    pub fn of_guest_packet(h: &Header) -> Self {
        Key {
            host_port: h.dst_port,
            guest_port: h.src_port,
        }
    }
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent to the guest, waiting for its RESPONSE.
    Connecting,
    /// Data flows.
    Connected,
    /// The guest closed both ways: flushing what it sent to the host, then RST.
    Closing,
}

/// What the connection asks of the device after a guest packet or host event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to send.
    Quiet,
    /// Send the guest this control packet (no payload).
    Reply(Op),
    /// Send the guest an RST and forget the connection (its host stream closes).
    Reset,
    /// Forget the connection without a word (the guest reset it).
    Drop,
}

/// What a read from the host stream gave.
#[derive(Debug)]
pub enum HostRead {
    /// Bytes read into the buffer.
    Data(usize),
    /// Nothing now: wait for the next readiness edge.
    WouldBlock,
    /// The host will send no more.
    Eof,
    /// The stream failed.
    Failed(std::io::Error),
}

/// One connection.
#[derive(Debug)]
pub struct Conn {
    /// Its ports.
    pub key: Key,
    /// The host stream (non-blocking).
    pub stream: UnixStream,
    /// Its epoll token.
    pub token: u64,
    /// Where it is.
    pub state: State,
    /// Flow control, both ways.
    pub credit: Credit,
    /// Guest bytes the host stream has not taken yet.
    to_host: VecDeque<u8>,
    /// The host stream may have bytes (a readiness edge not yet drained).
    pub readable: bool,
    /// In the device's list of connections with bytes for the guest.
    pub queued: bool,
    /// The host sent EOF (SHUTDOWN(SEND) announced to the guest).
    pub host_eof: bool,
    /// The guest will receive no more.
    pub guest_no_rcv: bool,
    /// The guest will send no more.
    pub guest_no_send: bool,
}

impl Conn {
    /// A connection over `stream` in `state`; the guest announced `peer` = (buf_alloc, fwd_cnt).
    pub fn new(key: Key, stream: UnixStream, token: u64, state: State, peer: (u32, u32)) -> Self {
        Conn {
            key,
            stream,
            token,
            state,
            credit: Credit::new(peer.0, peer.1),
            to_host: VecDeque::new(),
            readable: false,
            queued: false,
            host_eof: false,
            guest_no_rcv: false,
            guest_no_send: false,
        }
    }

    /// A header from the host end of this connection, announcing our credit.
    pub fn header(&mut self, guest_cid: u64, op: Op, len: u32, flags: u32) -> Header {
        let (buf_alloc, fwd_cnt) = self.credit.announce();
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.host_port,
            dst_port: self.key.guest_port,
            len,
            typ: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// Whether host bytes may go to the guest now (something to read, credit to send it).
    pub fn can_send(&self) -> bool {
        self.state == State::Connected
            && self.readable
            && !self.host_eof
            && !self.guest_no_rcv
            && self.credit.peer_free() > 0
    }

    /// Reads host bytes into `buf` (sized by the caller to the guest's credit and buffer).
    pub fn read_host(&mut self, buf: &mut [u8]) -> HostRead {
        loop {
            return match self.stream.read(buf) {
                Ok(0) => {
                    self.host_eof = true;
                    HostRead::Eof
                }
                Ok(n) => {
                    self.credit.sent(n as u32);
                    HostRead::Data(n)
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.readable = false;
                    HostRead::WouldBlock
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => HostRead::Failed(e),
            };
        }
    }

    /// Writes what the host stream takes of the buffered bytes. `Err` if it failed.
    pub fn flush(&mut self) -> std::io::Result<()> {
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.credit.forwarded(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.guest_no_send {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Bytes waiting for the host stream.
    pub fn buffered(&self) -> usize {
        self.to_host.len()
    }

    /// Guest data for the host: written at once as far as the stream takes it, the rest
    /// buffered until it is writable.
    fn data(&mut self, payload: &[u8]) -> Outcome {
        if self.guest_no_send || self.credit.received(payload.len() as u32).is_err() {
            return Outcome::Reset;
        }
        if self.to_host.is_empty() {
            match self.stream.write(payload) {
                Ok(n) => {
                    self.credit.forwarded(n as u32);
                    self.to_host.extend(&payload[n..]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.to_host.extend(payload),
                Err(_) => return Outcome::Reset,
            }
        } else {
            self.to_host.extend(payload);
        }
        self.after_flush()
    }

    /// What to tell the guest once the stream took bytes (a credit update it may wait for,
    /// or the RST that ends a closing connection).
    pub fn after_flush(&mut self) -> Outcome {
        if self.state == State::Closing && self.to_host.is_empty() {
            return Outcome::Reset;
        }
        if self.credit.update_due() {
            return Outcome::Reply(Op::CreditUpdate);
        }
        Outcome::Quiet
    }

    /// A host-stream readiness event: `readable`, `writable`.
    pub fn on_ready(&mut self, readable: bool, writable: bool) -> Outcome {
        if readable {
            self.readable = true;
        }
        if writable && !self.to_host.is_empty() {
            if self.flush().is_err() {
                return Outcome::Reset;
            }
            return self.after_flush();
        }
        Outcome::Quiet
    }

    /// A packet from the guest (header checked, payload read) on this connection.
    pub fn on_guest(&mut self, op: Op, h: &Header, payload: &[u8]) -> Outcome {
        self.credit.update_peer(h.buf_alloc, h.fwd_cnt);
        match (self.state, op) {
            (_, Op::Rst) => Outcome::Drop,
            (State::Connecting, Op::Response) => {
                // A few bytes to a fresh stream: it takes them, or the host is gone.
                let ok = ok_line(self.key.guest_port);
                match self.stream.write(ok.as_bytes()) {
                    Ok(n) if n == ok.len() => {
                        self.state = State::Connected;
                        Outcome::Quiet
                    }
                    _ => Outcome::Reset,
                }
            }
            (State::Connecting, _) => Outcome::Reset,
            (_, Op::Request | Op::Response) => Outcome::Reset,
            (State::Closing, _) => Outcome::Quiet,
            (State::Connected, Op::Rw) => self.data(payload),
            (State::Connected, Op::CreditUpdate) => Outcome::Quiet,
            (State::Connected, Op::CreditRequest) => Outcome::Reply(Op::CreditUpdate),
            (State::Connected, Op::Shutdown) => {
                if h.flags & SHUTDOWN_RCV != 0 {
                    self.guest_no_rcv = true;
                }
                if h.flags & SHUTDOWN_SEND != 0 {
                    self.guest_no_send = true;
                    if self.to_host.is_empty() {
                        let _ = self.stream.shutdown(Shutdown::Write);
                    }
                }
                if self.guest_no_rcv && self.guest_no_send {
                    self.state = State::Closing;
                    return self.after_flush();
                }
                Outcome::Quiet
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::vsock::credit::HOST_BUF_ALLOC;

    fn conn(state: State) -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let key = Key {
            host_port: 1024,
            guest_port: 5000,
        };
        (Conn::new(key, a, 1, state, (4096, 0)), b)
    }

    fn hdr(op: Op, len: u32, flags: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 1024,
            len,
            typ: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn host_initiated_connection_answers_ok_then_carries_data() {
        let (mut c, mut host) = conn(State::Connecting);
        assert_eq!(c.on_guest(Op::Rw, &hdr(Op::Rw, 1, 0), b"x"), Outcome::Reset);
        let (mut c2, mut host2) = conn(State::Connecting);
        assert_eq!(
            c2.on_guest(Op::Response, &hdr(Op::Response, 0, 0), &[]),
            Outcome::Quiet
        );
        assert_eq!(c2.state, State::Connected);
        assert_eq!(
            c2.on_guest(Op::Rw, &hdr(Op::Rw, 5, 0), b"hello"),
            Outcome::Quiet
        );
        let mut got = [0u8; 13];
        host2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"OK 5000\nhello");
        drop(c);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "no OK for a refused connection");
    }

    #[test]
    fn a_slow_host_buffers_within_credit_and_the_guest_hears_when_it_drains() {
        let (mut c, mut host) = conn(State::Connected);
        let free = |c: &Conn| HOST_BUF_ALLOC - c.credit.rx_cnt.wrapping_sub(c.credit.fwd_cnt);
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        while free(&c) as usize >= chunk.len() {
            match c.on_guest(Op::Rw, &hdr(Op::Rw, 65536, 0), &chunk) {
                Outcome::Quiet => {}
                // What the device does with the reply: a header announcing the credit.
                Outcome::Reply(Op::CreditUpdate) => {
                    c.header(3, Op::CreditUpdate, 0, 0);
                }
                o => panic!("{o:?}"),
            }
            sent += chunk.len();
        }
        assert!(c.buffered() > 0, "the socket buffer took everything");
        // Beyond our buffer: a credit violation.
        let over = vec![1u8; free(&c) as usize + 1];
        assert_eq!(
            c.on_guest(Op::Rw, &hdr(Op::Rw, 0, 0), &over),
            Outcome::Reset
        );
        // The host drains; the guest gets its credit back.
        host.set_nonblocking(false).unwrap();
        let mut buf = vec![0u8; sent];
        let (mut got, mut updates) = (0, 0);
        while got < sent {
            got += host.read(&mut buf[got..]).unwrap();
            if c.buffered() > 0 {
                if let Outcome::Reply(Op::CreditUpdate) = c.on_ready(false, true) {
                    c.header(3, Op::CreditUpdate, 0, 0);
                    updates += 1;
                }
            }
        }
        assert!(updates > 0);
        assert!(buf.iter().all(|&b| b == 7));
        assert_eq!(c.credit.fwd_cnt as usize, sent);
    }

    #[test]
    fn guest_shutdown_both_ways_ends_with_rst_after_the_flush() {
        let (mut c, mut host) = conn(State::Connected);
        assert_eq!(
            c.on_guest(Op::Rw, &hdr(Op::Rw, 3, 0), b"abc"),
            Outcome::Quiet
        );
        let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
        assert_eq!(
            c.on_guest(Op::Shutdown, &hdr(Op::Shutdown, 0, both), &[]),
            Outcome::Reset
        );
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"abc", "the host reads the data, then EOF");
    }

    #[test]
    fn host_reads_respect_state() {
        let (mut c, mut host) = conn(State::Connected);
        assert!(!c.can_send());
        host.write_all(b"hi").unwrap();
        c.on_ready(true, false);
        assert!(c.can_send());
        let mut buf = [0u8; 8];
        assert!(matches!(c.read_host(&mut buf), HostRead::Data(2)));
        assert_eq!(c.credit.tx_cnt, 2);
        assert!(matches!(c.read_host(&mut buf), HostRead::WouldBlock));
        assert!(!c.can_send());
        drop(host);
        c.on_ready(true, false);
        assert!(matches!(c.read_host(&mut buf), HostRead::Eof));
        assert!(!c.can_send());
    }
}
