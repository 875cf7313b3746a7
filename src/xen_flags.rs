//! The `xen_mmap_flags` bits of a vhost-user memory region (`VHOST_USER_PROTOCOL_F_XEN_MMAP`).

use bitflags::bitflags;

bitflags! {
    /// Xen mapping flags as they arrive on the wire.
    ///
    /// "Do not map in advance" has two encodings: `0x8`, used by rust-vmm (vm-memory, vhost) and by
    /// xen-vhost-frontend, the one frontend that sends it; and `0x100` (bit 8), which the QEMU
    /// vhost-user spec text names. We accept both and emit `0x8`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct XenMmapFlags: u32 {
        /// Map foreign guest frames through `/dev/xen/privcmd`.
        const FOREIGN = 0x1;
        /// Map grant references through `/dev/xen/gntdev`.
        const GRANT = 0x2;
        /// Do not map in advance (rust-vmm encoding; the one we emit).
        const NO_ADVANCE_MAP = 0x8;
        /// Do not map in advance (vhost-user spec text encoding, bit 8).
        const NO_ADVANCE_MAP_SPEC = 0x100;
    }
}

impl XenMmapFlags {
    /// True when either encoding of "do not map in advance" is set.
    pub fn no_advance_map(self) -> bool {
        self.intersects(Self::NO_ADVANCE_MAP | Self::NO_ADVANCE_MAP_SPEC)
    }
}

/// The vhost-user protocol feature bit that adds the Xen fields to memory regions.
pub const VHOST_USER_PROTOCOL_F_XEN_MMAP: u64 = 1 << 17;
