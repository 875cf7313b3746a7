//! `#[repr(C)]` structs of `<xen/privcmd.h>` (`/dev/xen/privcmd`).

use crate::xen::DomId;

/// `struct privcmd_mmapbatch_v2`: map `num` foreign frames at `addr`, which
/// must lie in a mapping of privcmd itself; the kernel writes one error
/// code per frame to `err`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PrivcmdMmapbatchV2 {
    /// Number of frames.
    pub num: u32,
    /// Domain that owns the frames.
    pub dom: DomId,
    /// Virtual address of the first page, inside a privcmd mapping.
    pub addr: u64,
    /// `const xen_pfn_t *`: `num` frame numbers (GFNs for HVM/PVH guests).
    pub arr: *const u64,
    /// `int *`: `num` error codes, written by the kernel.
    pub err: *mut i32,
}

/// `struct privcmd_mmap_resource`: map `num` frames of a domain resource
/// (type 1 is the grant table) at `addr`; with `addr` and `num` both 0 the
/// kernel only writes the resource's size in frames back to `num`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrivcmdMmapResource {
    /// Domain that owns the resource.
    pub dom: DomId,
    /// `XENMEM_resource_*` type.
    pub type_: u32,
    /// Resource id within the type.
    pub id: u32,
    /// First frame of the resource to map.
    pub idx: u32,
    /// Number of frames (in), or the resource size for a size query (out).
    pub num: u64,
    /// Virtual address inside a privcmd mapping, or 0 for a size query.
    pub addr: u64,
}

/// `XENMEM_resource_grant_table`, the resource type of a domain's grant table.
pub const XENMEM_RESOURCE_GRANT_TABLE: u32 = 1;
