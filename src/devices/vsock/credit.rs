//! Credit-based flow control of one connection (virtio 1.2 §5.10.6.3): each side announces
//! its receive buffer (`buf_alloc`) and how much of what it received it has consumed
//! (`fwd_cnt`); a sender keeps what it has sent minus what the peer consumed within the
//! peer's buffer. All counters wrap at 2^32, as on the wire.

/// Receive buffer the host side announces per connection: bytes the guest may have in
/// flight towards a host socket that is slow to read.
pub const HOST_BUF_ALLOC: u32 = 256 * 1024;

/// One connection's counters, both directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credit {
    /// Our receive buffer (guest → host bytes not yet written to the host socket).
    pub buf_alloc: u32,
    /// Guest bytes written to the host socket so far.
    pub fwd_cnt: u32,
    /// Guest bytes received so far.
    pub rx_cnt: u32,
    /// The `fwd_cnt` the guest last heard from us.
    pub sent_fwd_cnt: u32,
    /// The guest's receive buffer.
    pub peer_buf_alloc: u32,
    /// Bytes the guest consumed of what we sent.
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest so far.
    pub tx_cnt: u32,
}

/// The guest sent more than its credit allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("guest sent {len} bytes with {free} bytes of credit left")]
pub struct CreditError {
    /// Payload bytes of the packet.
    pub len: u32,
    /// Credit the guest had.
    pub free: u32,
}

impl Credit {
    /// Counters of a new connection whose peer announced `peer_buf_alloc`/`peer_fwd_cnt`.
    pub fn new(peer_buf_alloc: u32, peer_fwd_cnt: u32) -> Self {
        Credit {
            buf_alloc: HOST_BUF_ALLOC,
            fwd_cnt: 0,
            rx_cnt: 0,
            sent_fwd_cnt: 0,
            peer_buf_alloc,
            peer_fwd_cnt,
            tx_cnt: 0,
        }
    }

    /// Bytes we may still send the guest.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The guest's header fields, carried by every packet it sends.
    pub fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// `n` bytes sent to the guest.
    pub fn sent(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// Accounts `len` payload bytes from the guest, refusing what exceeds its credit.
    pub fn received(&mut self, len: u32) -> Result<(), CreditError> {
        let buffered = self.rx_cnt.wrapping_sub(self.fwd_cnt);
        let free = self.buf_alloc.saturating_sub(buffered);
        if len > free {
            return Err(CreditError { len, free });
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        Ok(())
    }

    /// `n` guest bytes written to the host socket.
    pub fn forwarded(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }

    /// The `(buf_alloc, fwd_cnt)` to put in a header now; the guest hears it.
    pub fn announce(&mut self) -> (u32, u32) {
        self.sent_fwd_cnt = self.fwd_cnt;
        (self.buf_alloc, self.fwd_cnt)
    }

    /// Whether the guest should hear a credit update: it believes less than half our buffer
    /// is free and we consumed more since it last heard. A guest out of credit waits for
    /// exactly this, so it must never stay false while the guest is stalled.
    pub fn update_due(&self) -> bool {
        let believed_free = self
            .buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.sent_fwd_cnt));
        self.fwd_cnt != self.sent_fwd_cnt && believed_free < self.buf_alloc / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sending_stops_at_the_peers_buffer_and_resumes_on_its_update() {
        let mut c = Credit::new(1000, 0);
        assert_eq!(c.peer_free(), 1000);
        c.sent(600);
        assert_eq!(c.peer_free(), 400);
        c.sent(400);
        assert_eq!(c.peer_free(), 0);
        c.update_peer(1000, 700);
        assert_eq!(c.peer_free(), 700);
        // A peer shrinking its buffer below what is in flight: no credit, no underflow.
        c.update_peer(100, 700);
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn the_guest_may_not_exceed_our_buffer() {
        let mut c = Credit::new(0, 0);
        assert_eq!(c.received(HOST_BUF_ALLOC), Ok(()));
        assert_eq!(c.received(1), Err(CreditError { len: 1, free: 0 }));
        c.forwarded(10);
        assert_eq!(c.received(10), Ok(()));
    }

    #[test]
    fn a_stalled_guest_always_gets_an_update() {
        let mut c = Credit::new(0, 0);
        c.received(HOST_BUF_ALLOC).unwrap();
        assert!(!c.update_due(), "nothing consumed yet");
        c.forwarded(1);
        assert!(c.update_due());
        assert_eq!(c.announce(), (HOST_BUF_ALLOC, 1));
        assert!(!c.update_due());
        // Little in flight: no update needed for every byte consumed.
        let mut d = Credit::new(0, 0);
        d.received(100).unwrap();
        d.forwarded(100);
        assert!(!d.update_due());
    }

    #[test]
    fn counters_wrap() {
        let mut c = Credit::new(1000, u32::MAX - 10);
        c.tx_cnt = u32::MAX - 10;
        c.sent(20);
        assert_eq!(c.peer_free(), 980);
        c.rx_cnt = u32::MAX;
        c.fwd_cnt = u32::MAX;
        c.received(5).unwrap();
        c.forwarded(5);
        assert_eq!(c.rx_cnt, c.fwd_cnt);
    }
}
