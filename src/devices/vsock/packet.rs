//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, virtio 1.2 §5.10.6): 44 bytes,
//! little-endian, in front of every packet on the rx and tx queues.

/// Bytes of a header on the wire.
pub const HDR_LEN: usize = 44;

/// The host's CID: where every packet the guest sends must go.
pub const HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type served (SEQPACKET is not offered).
pub const TYPE_STREAM: u16 = 1;

/// Shutdown flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the event-queue message telling the guest that every
/// connection it had is gone (the device restarted).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Largest payload of one packet, as Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`: a header
/// announcing more is malformed.
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// The operation a packet carries (`VIRTIO_VSOCK_OP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connect.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection refused or torn down.
    Rst = 3,
    /// Half or full close (flags [`SHUTDOWN_RCV`], [`SHUTDOWN_SEND`]).
    Shutdown = 4,
    /// Stream data.
    Rw = 5,
    /// The sender's receive credit changed.
    CreditUpdate = 6,
    /// Asks the receiver for a credit update.
    CreditRequest = 7,
}

impl TryFrom<u16> for Op {
    type Error = PacketError;
    fn try_from(v: u16) -> Result<Self, PacketError> {
        Ok(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return Err(PacketError::BadOp(v)),
        })
    }
}

/// Why a packet the guest sent is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// Fewer readable bytes in the chain than a header.
    #[error("chain holds {0} readable bytes, less than a 44-byte header")]
    Short(usize),
    /// An operation outside `VIRTIO_VSOCK_OP_*`.
    #[error("unknown operation {0}")]
    BadOp(u16),
    /// A socket type other than STREAM.
    #[error("unsupported socket type {0}")]
    BadType(u16),
    /// The header announces more payload than the chain carries, or than a packet may.
    #[error("header announces {len} payload bytes, the chain carries {room}")]
    BadLength {
        /// `hdr.len`.
        len: u32,
        /// Readable bytes after the header (or [`MAX_PAYLOAD`]).
        room: usize,
    },
    /// Not from the guest's CID or not to the host's.
    #[error("packet from cid {src} to cid {dst}; the guest is cid {guest}")]
    BadCid {
        /// `hdr.src_cid`.
        src: u64,
        /// `hdr.dst_cid`.
        dst: u64,
        /// The guest's configured CID.
        guest: u64,
    },
}

/// A decoded header. Ports are `u32`, CIDs `u64`, as on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes after the header.
    pub len: u32,
    /// Socket type (`TYPE_STREAM`).
    pub typ: u16,
    /// Operation (raw: [`Op::try_from`] checks it).
    pub op: u16,
    /// Operation flags (shutdown bits).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed of what it received on this connection.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes 44 little-endian bytes.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            typ: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes as 44 little-endian bytes.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.typ.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks a header the guest sent with `room` payload bytes readable after it: the
    /// operation, the type, the CIDs and the length. Returns the operation.
    pub fn check_from_guest(&self, guest_cid: u64, room: usize) -> Result<Op, PacketError> {
        let op = Op::try_from(self.op)?;
        if self.typ != TYPE_STREAM {
            return Err(PacketError::BadType(self.typ));
        }
        if self.src_cid != guest_cid || self.dst_cid != HOST_CID {
            return Err(PacketError::BadCid {
                src: self.src_cid,
                dst: self.dst_cid,
                guest: guest_cid,
            });
        }
        let limit = room.min(MAX_PAYLOAD as usize);
        if self.len as usize > limit || (op != Op::Rw && self.len != 0) {
            return Err(PacketError::BadLength {
                len: self.len,
                room: limit,
            });
        }
        Ok(op)
    }

    /// The reply header to this one from the host: ports and CIDs swapped, `op`, no payload.
    pub fn reply(&self, op: Op) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            typ: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1234_5678,
            dst_port: 52,
            len: 100,
            typ: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn layout_is_the_linux_struct() {
        let b = sample().to_bytes();
        // Offsets of struct virtio_vsock_hdr (packed, 44 bytes).
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1234_5678u32.to_le_bytes());
        assert_eq!(&b[24..28], &100u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[36..40], &(256u32 * 1024).to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), sample());
    }

    #[test]
    fn guest_headers_are_checked() {
        let h = sample();
        assert_eq!(h.check_from_guest(3, 100), Ok(Op::Rw));
        assert_eq!(
            h.check_from_guest(3, 99),
            Err(PacketError::BadLength { len: 100, room: 99 })
        );
        assert_eq!(
            h.check_from_guest(4, 100),
            Err(PacketError::BadCid {
                src: 3,
                dst: 2,
                guest: 4
            })
        );
        let bad_op = Header { op: 9, ..h };
        assert_eq!(bad_op.check_from_guest(3, 100), Err(PacketError::BadOp(9)));
        let seq = Header { typ: 2, ..h };
        assert_eq!(seq.check_from_guest(3, 100), Err(PacketError::BadType(2)));
        let req_with_data = Header {
            op: Op::Request as u16,
            ..h
        };
        assert!(req_with_data.check_from_guest(3, 100).is_err());
        let huge = Header {
            len: MAX_PAYLOAD + 1,
            ..h
        };
        assert!(huge.check_from_guest(3, usize::MAX).is_err());
    }

    #[test]
    fn reply_swaps_the_ends() {
        let r = sample().reply(Op::Rst);
        assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, 3));
        assert_eq!((r.src_port, r.dst_port), (52, 0x1234_5678));
        assert_eq!((r.op, r.len), (Op::Rst as u16, 0));
    }
}
