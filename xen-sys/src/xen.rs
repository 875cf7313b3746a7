//! Constants and types of Xen's public interface (`xen/interface/xen.h`,
//! `grant_table.h`) that the Linux uapi headers use but do not ship.

/// `domid_t`: domain ids are 16 bits wide everywhere in Xen.
pub type DomId = u16;
/// `grant_ref_t`.
pub type GrantRef = u32;

/// Xen pages are 4 KiB whatever the host page size, so grant and frame
/// arithmetic must use these, not the host's.
pub const XEN_PAGE_SHIFT: u32 = 12;
/// See [`XEN_PAGE_SHIFT`].
pub const XEN_PAGE_SIZE: usize = 1 << XEN_PAGE_SHIFT;

/// First id that is not a real domain: ids from here up are special.
pub const DOMID_FIRST_RESERVED: DomId = 0x7FF0;
/// The calling domain; dom0 foreign-maps its own frames with it.
pub const DOMID_SELF: DomId = 0x7FF0;
/// The hypervisor itself (e.g. to map the M2P table).
pub const DOMID_XEN: DomId = 0x7FF2;

/// `GNTCOPY_source_gref`: the segment's source is a grant ref, not a local address.
pub const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
/// `GNTCOPY_dest_gref`: the segment's destination is a grant ref, not a local address.
pub const GNTCOPY_DEST_GREF: u16 = 1 << 1;

/// `GNTST_okay`: per-segment success in a grant copy.
pub const GNTST_OKAY: i16 = 0;
/// `GNTST_general_error`.
pub const GNTST_GENERAL_ERROR: i16 = -1;
/// `GNTST_bad_domain`: the domid does not exist.
pub const GNTST_BAD_DOMAIN: i16 = -2;
/// `GNTST_bad_gntref`: the ref is not granted to us.
pub const GNTST_BAD_GNTREF: i16 = -3;
/// `GNTST_permission_denied`: e.g. writing to a read-only grant.
pub const GNTST_PERMISSION_DENIED: i16 = -8;
/// `GNTST_bad_copy_arg`: offset/length cross a page or are otherwise invalid.
pub const GNTST_BAD_COPY_ARG: i16 = -10;
/// `GNTST_eagain`: the frame is paged out or busy; retry.
pub const GNTST_EAGAIN: i16 = -12;
