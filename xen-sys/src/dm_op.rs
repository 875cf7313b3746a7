//! `#[repr(C)]` structs of Xen's `public/hvm/dm_op.h` and `<xen/privcmd.h>`'s
//! `privcmd_dm_op`: device-model operations (ioreq servers, interrupt lines)
//! that a dom0 program issues for a guest through `IOCTL_PRIVCMD_DM_OP`.
//!
//! Only the operations an MMIO device model needs are mirrored. The union of
//! `struct xen_dm_op` is kept at its full C size, so Xen's copy-in and copy-out
//! of the whole struct stay inside our buffer.

use crate::xen::DomId;

/// `ioservid_t`: an ioreq server's id within its domain.
pub type IoServId = u16;

/// `XEN_DMOP_create_ioreq_server`.
pub const XEN_DMOP_CREATE_IOREQ_SERVER: u32 = 1;
/// `XEN_DMOP_map_io_range_to_ioreq_server`.
pub const XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER: u32 = 3;
/// `XEN_DMOP_unmap_io_range_from_ioreq_server`.
pub const XEN_DMOP_UNMAP_IO_RANGE_FROM_IOREQ_SERVER: u32 = 4;
/// `XEN_DMOP_set_ioreq_server_state`.
pub const XEN_DMOP_SET_IOREQ_SERVER_STATE: u32 = 5;
/// `XEN_DMOP_destroy_ioreq_server`.
pub const XEN_DMOP_DESTROY_IOREQ_SERVER: u32 = 6;
/// `XEN_DMOP_set_isa_irq_level`: HVM guests only (emulated PIC/IOAPIC).
pub const XEN_DMOP_SET_ISA_IRQ_LEVEL: u32 = 9;
/// `XEN_DMOP_nr_vcpus`.
pub const XEN_DMOP_NR_VCPUS: u32 = 20;

/// `HVM_IOREQSRV_BUFIOREQ_OFF`: the server takes no buffered ioreqs.
pub const HVM_IOREQSRV_BUFIOREQ_OFF: u8 = 0;
/// `XEN_DMOP_IO_RANGE_PORT`.
pub const XEN_DMOP_IO_RANGE_PORT: u32 = 0;
/// `XEN_DMOP_IO_RANGE_MEMORY`.
pub const XEN_DMOP_IO_RANGE_MEMORY: u32 = 1;

/// `XENMEM_resource_ioreq_server`: the resource type of an ioreq server's pages.
pub const XENMEM_RESOURCE_IOREQ_SERVER: u32 = 0;
/// `XENMEM_resource_ioreq_server_frame_ioreq(0)`: the first synchronous ioreq
/// page (one `struct ioreq` per vCPU).
pub const XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ0: u32 = 1;

/// `struct xen_dm_op_create_ioreq_server`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpCreateIoreqServer {
    /// In: `HVM_IOREQSRV_BUFIOREQ_*`.
    pub handle_bufioreq: u8,
    /// Zero.
    pub pad: [u8; 3],
    /// Out: the new server's id.
    pub id: IoServId,
}

/// `struct xen_dm_op_ioreq_server_range`: an inclusive range sent to a server.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpIoreqServerRange {
    /// The server.
    pub id: IoServId,
    /// Zero.
    pub pad: u16,
    /// `XEN_DMOP_IO_RANGE_*`.
    pub type_: u32,
    /// First address.
    pub start: u64,
    /// Last address (inclusive).
    pub end: u64,
}

/// `struct xen_dm_op_set_ioreq_server_state`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpSetIoreqServerState {
    /// The server.
    pub id: IoServId,
    /// 1: deliver requests; 0: stop.
    pub enabled: u8,
    /// Zero.
    pub pad: u8,
}

/// `struct xen_dm_op_destroy_ioreq_server`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpDestroyIoreqServer {
    /// The server.
    pub id: IoServId,
    /// Zero.
    pub pad: u16,
}

/// `struct xen_dm_op_set_isa_irq_level`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpSetIsaIrqLevel {
    /// ISA IRQ, 0-15.
    pub isa_irq: u8,
    /// 1: asserted, 0: deasserted.
    pub level: u8,
}

/// `struct xen_dm_op_nr_vcpus`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpNrVcpus {
    /// Out: vCPU objects of the domain, fixed at creation.
    pub vcpus: u32,
}

/// The union of `struct xen_dm_op`, with the members mirrored here; `raw`
/// keeps it at the C union's size (24 bytes, 8-aligned).
#[repr(C)]
#[derive(Clone, Copy)]
pub union XenDmOpArgs {
    /// `XEN_DMOP_create_ioreq_server`.
    pub create_ioreq_server: XenDmOpCreateIoreqServer,
    /// `XEN_DMOP_map_io_range_to_ioreq_server` / `unmap_io_range_from_ioreq_server`.
    pub ioreq_server_range: XenDmOpIoreqServerRange,
    /// `XEN_DMOP_set_ioreq_server_state`.
    pub set_ioreq_server_state: XenDmOpSetIoreqServerState,
    /// `XEN_DMOP_destroy_ioreq_server`.
    pub destroy_ioreq_server: XenDmOpDestroyIoreqServer,
    /// `XEN_DMOP_set_isa_irq_level`.
    pub set_isa_irq_level: XenDmOpSetIsaIrqLevel,
    /// `XEN_DMOP_nr_vcpus`.
    pub nr_vcpus: XenDmOpNrVcpus,
    /// The union's full size.
    pub raw: [u64; 3],
}

/// `struct xen_dm_op`: one operation, its arguments in `u`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct XenDmOp {
    /// `XEN_DMOP_*`.
    pub op: u32,
    /// Zero.
    pub pad: u32,
    /// Arguments (and results) of `op`.
    pub u: XenDmOpArgs,
}

impl XenDmOp {
    /// Operation `op` with arguments `u`.
    pub fn new(op: u32, u: XenDmOpArgs) -> Self {
        XenDmOp { op, pad: 0, u }
    }
}

impl std::fmt::Debug for XenDmOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SAFETY: every member is plain integers and `raw` covers the union
        // whole, so reading it is always defined.
        let raw = unsafe { self.u.raw };
        f.debug_struct("XenDmOp")
            .field("op", &self.op)
            .field("u", &raw)
            .finish()
    }
}

/// `struct privcmd_dm_op_buf`: one buffer of a DM_OP.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PrivcmdDmOpBuf {
    /// Start of the buffer.
    pub uptr: *mut core::ffi::c_void,
    /// Its length.
    pub size: usize,
}

/// `struct privcmd_dm_op`: the argument of `IOCTL_PRIVCMD_DM_OP`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PrivcmdDmOp {
    /// Target domain.
    pub dom: DomId,
    /// Number of buffers; the first holds the `struct xen_dm_op`.
    pub num: u16,
    /// The buffers.
    pub ubufs: *const PrivcmdDmOpBuf,
}
