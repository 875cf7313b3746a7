//! The fast path of a request scope over a table without on-demand regions: `get_slices`
//! walks the table lazily, region by region, as `RequestMemory::slices` would, without the
//! scope's state, a slice buffer or an allocation.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion};

use super::SliceResult;
use crate::table::RegionTable;

/// The slices of `[addr, addr + count)` of a table whose regions are all mapped in advance.
/// Yields what `RequestMemory::slices` collects for such a table, in order: a slice per
/// region, then at most one error, after which it is exhausted.
#[derive(Debug)]
pub(crate) struct DirectSlices<'a> {
    table: &'a RegionTable,
    /// Next address; None once it overflowed with bytes left.
    cur: Option<u64>,
    /// Bytes left; 0 when done.
    left: u64,
}

impl<'a> DirectSlices<'a> {
    #[inline]
    pub(crate) fn new(table: &'a RegionTable, addr: GuestAddress, count: usize) -> Self {
        DirectSlices {
            table,
            cur: Some(addr.0),
            left: count as u64,
        }
    }
}

impl<'a> Iterator for DirectSlices<'a> {
    type Item = SliceResult<'a>;

    #[inline]
    fn next(&mut self) -> Option<SliceResult<'a>> {
        if self.left == 0 {
            return None;
        }
        let Some(cur) = self.cur else {
            self.left = 0;
            return Some(Err(GuestMemoryError::GuestAddressOverflow));
        };
        // A call, as in vm-memory's own iterator (see `RegionTable::to_region_addr`).
        let Some((region, off)) = self.table.to_region_addr(GuestAddress(cur)) else {
            self.left = 0;
            return Some(Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(
                cur,
            ))));
        };
        let n = (region.len() - off.0).min(self.left);
        match region.get_slice(off, n as usize) {
            Ok(s) => {
                self.left -= n;
                if self.left > 0 {
                    self.cur = cur.checked_add(n);
                }
                Some(Ok(s))
            }
            Err(e) => {
                self.left = 0;
                Some(Err(e))
            }
        }
    }
}
