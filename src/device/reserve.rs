//! Address-space reservations: inaccessible anonymous mappings that hold a range for the
//! device's mappings to land in (privcmd's `MAP_FIXED` over a bucket or chunk, an emulated
//! page), and that take a mapping's place again when it goes, so that the range never has a
//! hole another mapping could fill.

use std::ptr::NonNull;

use super::DeviceError;
use crate::xen_page::XEN_PAGE_SIZE;

/// One `mmap(PROT_NONE)` of `pages` pages, at `at` (replacing what is there) or where the
/// kernel chooses.
///
/// # Safety
/// With `at`, the caller owns that range and nothing refers into it.
unsafe fn map_none(
    call: &'static str,
    at: Option<NonNull<u8>>,
    pages: usize,
) -> Result<NonNull<u8>, DeviceError> {
    let len = pages
        .checked_mul(XEN_PAGE_SIZE)
        .ok_or(DeviceError::sys(call, libc::EOVERFLOW))?;
    let (addr, fixed) = match at {
        Some(a) => (a.as_ptr().cast(), libc::MAP_FIXED),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: an anonymous inaccessible mapping; with MAP_FIXED it replaces only a range the
    // caller owns and nobody uses (contract); the result is checked.
    let p = unsafe {
        libc::mmap(
            addr,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | fixed,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(DeviceError::last(call));
    }
    NonNull::new(p.cast()).ok_or(DeviceError::sys(call, libc::EFAULT))
}

/// Reserves `pages` pages of address space where the kernel chooses.
pub(crate) fn reserve(call: &'static str, pages: usize) -> Result<NonNull<u8>, DeviceError> {
    // SAFETY: no fixed address: nothing of anyone's is replaced.
    unsafe { map_none(call, None, pages) }
}

/// Puts a reservation over `pages` pages at `addr`, replacing what was there in the same call.
///
/// # Safety
/// The caller owns `addr..addr + pages` pages and nothing refers into them.
pub(crate) unsafe fn reserve_fixed(
    call: &'static str,
    addr: NonNull<u8>,
    pages: usize,
) -> Result<(), DeviceError> {
    // SAFETY: forwarded contract.
    unsafe { map_none(call, Some(addr), pages) }.map(|_| ())
}
