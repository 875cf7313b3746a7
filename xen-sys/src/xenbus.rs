//! The XenStore wire protocol of `/dev/xen/xenbus` (Xen's `public/io/xs_wire.h`):
//! each message is a 16-byte header then `len` bytes of payload.

/// `XS_DIRECTORY`: list a node's children (payload: path NUL; answer: names, each NUL-ended).
pub const XS_DIRECTORY: u32 = 1;
/// `XS_READ`: a node's value (payload: path NUL; answer: the bytes).
pub const XS_READ: u32 = 2;
/// `XS_ERROR`: the answer is an errno name such as `ENOENT`, NUL-ended.
pub const XS_ERROR: u32 = 16;
/// `XENSTORE_PAYLOAD_MAX`.
pub const XENSTORE_PAYLOAD_MAX: usize = 4096;

/// `struct xsd_sockmsg`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XsdSockmsg {
    /// `XS_*`.
    pub type_: u32,
    /// Echoed in the answer.
    pub req_id: u32,
    /// Transaction, 0 for none.
    pub tx_id: u32,
    /// Payload bytes that follow.
    pub len: u32,
}

impl XsdSockmsg {
    /// The header as sent on the wire (native endianness).
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, v) in [self.type_, self.req_id, self.tx_id, self.len]
            .into_iter()
            .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }
    /// A header read off the wire.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        XsdSockmsg {
            type_: w(0),
            req_id: w(4),
            tx_id: w(8),
            len: w(12),
        }
    }
}
