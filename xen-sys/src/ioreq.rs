//! `#[repr(C)]` mirror of Xen's `public/hvm/ioreq.h`: the per-vCPU request
//! slot an ioreq server shares with Xen. The guest's access to an emulated
//! address stops its vCPU; Xen fills the slot, sets `state` to
//! `STATE_IOREQ_READY` and signals the vCPU's event channel; the server
//! answers in `data`, sets `STATE_IORESP_READY` and signals back.

/// `IOREQ_READ`: the guest reads; the server answers in `data`.
pub const IOREQ_READ: u8 = 1;
/// `IOREQ_WRITE`.
pub const IOREQ_WRITE: u8 = 0;

/// `STATE_IOREQ_NONE`.
pub const STATE_IOREQ_NONE: u8 = 0;
/// `STATE_IOREQ_READY`: Xen filled the slot.
pub const STATE_IOREQ_READY: u8 = 1;
/// `STATE_IOREQ_INPROCESS`: the server took it.
pub const STATE_IOREQ_INPROCESS: u8 = 2;
/// `STATE_IORESP_READY`: the server answered.
pub const STATE_IORESP_READY: u8 = 3;

/// `IOREQ_TYPE_PIO`: an I/O port access.
pub const IOREQ_TYPE_PIO: u8 = 0;
/// `IOREQ_TYPE_COPY`: an MMIO access.
pub const IOREQ_TYPE_COPY: u8 = 1;
/// `IOREQ_TYPE_PCI_CONFIG`.
pub const IOREQ_TYPE_PCI_CONFIG: u8 = 2;
/// `IOREQ_TYPE_TIMEOFFSET`.
pub const IOREQ_TYPE_TIMEOFFSET: u8 = 7;
/// `IOREQ_TYPE_INVALIDATE`: drop cached guest mappings (sent to every server).
pub const IOREQ_TYPE_INVALIDATE: u8 = 8;

/// `struct ioreq` (32 bytes). The C bitfield byte (`state:4, data_is_ptr:1,
/// dir:1, df:1`) is `bits`; use the accessors.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ioreq {
    /// Guest-physical address (or port).
    pub addr: u64,
    /// The value written, or the answer to a read (or, with `data_is_ptr`,
    /// the guest-physical address of the data).
    pub data: u64,
    /// Repetitions (rep string instructions).
    pub count: u32,
    /// Access size in bytes.
    pub size: u32,
    /// The vCPU's event channel port in the guest's domain.
    pub vp_eport: u32,
    /// `_pad0`.
    pub pad0: u16,
    /// `state:4, data_is_ptr:1, dir:1, df:1, _pad1:1`.
    pub bits: u8,
    /// `IOREQ_TYPE_*`.
    pub type_: u8,
}

impl Ioreq {
    /// `state` (`STATE_*`).
    pub fn state(&self) -> u8 {
        self.bits & 0xf
    }
    /// `data_is_ptr`.
    pub fn data_is_ptr(&self) -> bool {
        self.bits & 0x10 != 0
    }
    /// `dir` (`IOREQ_READ` or `IOREQ_WRITE`).
    pub fn dir(&self) -> u8 {
        (self.bits >> 5) & 1
    }
    /// `df`: the direction flag of a rep string access.
    pub fn df(&self) -> bool {
        self.bits & 0x40 != 0
    }
    /// The bitfield byte for the given fields (`pad1` zero).
    pub fn pack_bits(state: u8, data_is_ptr: bool, dir: u8, df: bool) -> u8 {
        (state & 0xf) | (u8::from(data_is_ptr) << 4) | ((dir & 1) << 5) | (u8::from(df) << 6)
    }
}

/// Byte offset of the bitfield byte within `struct ioreq`: a server updates
/// `state` there with one atomic byte store.
pub const IOREQ_BITS_OFFSET: usize = 30;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip() {
        let b = Ioreq::pack_bits(STATE_IOREQ_READY, true, IOREQ_READ, false);
        let r = Ioreq {
            bits: b,
            ..Default::default()
        };
        assert_eq!(r.state(), STATE_IOREQ_READY);
        assert!(r.data_is_ptr());
        assert_eq!(r.dir(), IOREQ_READ);
        assert!(!r.df());
        assert_eq!(core::mem::offset_of!(Ioreq, bits), IOREQ_BITS_OFFSET);
    }
}
