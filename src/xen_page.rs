//! Xen page arithmetic and the guest's encoding of grant addresses.
//!
//! Xen pages are 4 KiB whatever the host page size. A guest using Linux's grant DMA ops hands
//! the device `1 << 63 | ref << 12 | offset`; a buffer of n pages uses n consecutive refs.

/// Size of a Xen page (and of one grant), and its log2: `xen_sys`'s, the one definition.
pub use xen_sys::xen::{XEN_PAGE_SHIFT, XEN_PAGE_SIZE};

/// Bit that marks a guest DMA address as a grant address.
pub const GRANT_ADDR_BIT: u64 = 1 << 63;
/// Largest domid a region may name; values above are reserved (`DOMID_FIRST_RESERVED - 1`).
pub const DOMID_MAX: u32 = xen_sys::xen::DOMID_FIRST_RESERVED as u32 - 1;

/// Offset of `addr` inside its Xen page.
pub const fn page_offset(addr: u64) -> u64 {
    addr & (XEN_PAGE_SIZE as u64 - 1)
}

/// Xen frame number of `addr` (for grant addresses: the grant ref, marker bit dropped).
pub const fn frame_of(addr: u64) -> u64 {
    (addr & !GRANT_ADDR_BIT) >> XEN_PAGE_SHIFT
}

/// The grant address of byte `offset` of the page granted as `gref`.
pub const fn grant_addr(gref: u32, offset: u64) -> u64 {
    GRANT_ADDR_BIT | ((gref as u64) << XEN_PAGE_SHIFT) | page_offset(offset)
}

/// Number of Xen pages covering `[addr, addr + len)`; `len` must not overflow `addr`.
pub const fn pages_spanned(addr: u64, len: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    let first = addr >> XEN_PAGE_SHIFT;
    let last = (addr + (len - 1)) >> XEN_PAGE_SHIFT;
    last - first + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_addresses_round_trip() {
        let a = grant_addr(0x1234, 0x840);
        assert_eq!(a, 0x8000_0000_0123_4840);
        assert_eq!(frame_of(a), 0x1234);
        assert_eq!(page_offset(a), 0x840);
    }

    #[test]
    fn pages_spanned_counts_partial_pages() {
        assert_eq!(pages_spanned(0, 0), 0);
        assert_eq!(pages_spanned(0, 4096), 1);
        assert_eq!(pages_spanned(0xfff, 2), 2);
        assert_eq!(pages_spanned(0xb840, 0x1002), 2);
        assert_eq!(pages_spanned(0x1000, 0x2001), 3);
    }
}
