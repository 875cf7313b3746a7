//! The slice iterator of a request scope (`RequestMemory::get_slices`), shaped for the fast
//! path.
//!
//! Over a table without on-demand regions it walks the table lazily, region by region, as
//! vm-memory's own iterator walks a `GuestMemoryMmap`: three words of state (where the
//! slices come from, next address, bytes left), one table lookup and one bounds check per
//! slice, no drop glue. Everything else (slices collected by `RequestMemory::slices` for a
//! table with on-demand regions, the overflow error) sits behind one out-of-line call.
//!
//! Why it matters: vm-memory's access chain (`read_obj` → `read_slice` → `stop_on_error`'s
//! `Peekable` → this `next`) only inlines into one tight function when the iterator is as
//! small as vm-memory's. With the collected slices held in the iterator (an enum with a
//! `VecDeque` and its drop) the chain did not inline: `Peekable::next_if` stayed a call
//! returning its 40-byte item through memory, and the block workload through a scope ran at
//! 0.8x of vm-memory.

use std::cell::{Cell, RefCell};
use std::ptr::NonNull;

use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion, VolatileSlice,
};

use super::{RequestError, ScopeState, SliceBuf, SliceResult};
use crate::backend::lazy::ScopePins;
use crate::backend::BackendError;
use crate::region::XenRegion;
use crate::table::RegionTable;

/// The slices of one `get_slices` call: a slice per region (or per run of on-demand pages),
/// then at most one error, after which it is exhausted.
///
/// Plain scalar fields, no enum: moved around whole (into [`OkSlices`], through vm-memory's
/// adapters), an enum's payload went through the stack with mismatched load and store widths
/// (store-forwarding stalls were the hottest instructions of `read_slice` over a scope).
#[derive(Debug)]
pub(crate) struct RequestSlices<'a> {
    table: &'a RegionTable,
    /// The scope's state, when the slices were collected there (a table with on-demand
    /// regions); None: straight from `table`.
    collected: Option<&'a RefCell<ScopeState>>,
    /// From the table: next guest address. Collected: index of the next entry.
    cur: u64,
    /// From the table: bytes left below the top of the address space. Collected: entries
    /// left. 0 when done.
    left: u64,
    /// The range runs past the top of the address space: once `left` is 0, one
    /// `GuestAddressOverflow`.
    overflow: bool,
    /// From the table: the scope's holds on lazy FOREIGN buckets (none: the table has no
    /// lazy region, or its handle no bound, so that nothing is ever evicted).
    pins: Option<&'a ScopePins>,
}

impl<'a> RequestSlices<'a> {
    /// The slices of `[addr, addr + count)` of `table`, whose regions are all mapped in
    /// advance or lazily mapped FOREIGN regions whose buckets the scope of `pins` maps and
    /// holds as it goes (computed as they are taken).
    #[inline(always)]
    pub(crate) fn direct(
        table: &'a RegionTable,
        pins: Option<&'a ScopePins>,
        addr: GuestAddress,
        count: usize,
    ) -> Self {
        let count = count as u64;
        let (left, overflow) = match addr.0.checked_add(count) {
            Some(_) => (count, false),
            // Bytes up to the top (`addr` is not 0 here); ending exactly at the top is fine.
            None => (addr.0.wrapping_neg(), count != addr.0.wrapping_neg()),
        };
        RequestSlices {
            table,
            collected: None,
            cur: addr.0,
            left,
            overflow,
            pins,
        }
    }

    /// The slices collected in `state` at entries `first..first + count` (see
    /// [`Collected::add`]).
    #[inline(always)]
    pub(crate) fn collected(
        table: &'a RegionTable,
        state: &'a RefCell<ScopeState>,
        (first, count): (u64, u64),
    ) -> Self {
        RequestSlices {
            table,
            collected: Some(state),
            cur: first,
            left: count,
            overflow: false,
            pins: None,
        }
    }

    /// Whether [`RequestSlices::next_ok`]'s None was an error (for
    /// [`RequestSlices::take_error`]) rather than the end.
    #[inline(always)]
    fn error_pending(&self) -> bool {
        self.left != 0 || self.overflow
    }

    /// The next slice; None at the end, or (then [`RequestSlices::error_pending`]) at an
    /// error, which [`RequestSlices::take_error`] returns.
    #[inline(always)]
    fn next_ok(&mut self) -> Option<VolatileSlice<'a>> {
        self.next_raw().map(slice)
    }

    /// [`RequestSlices::next_ok`] as (address, length). The fast path builds no error: a
    /// lookup either yields a range or leaves the state as it was, so the error can be found
    /// again out of line, and the range stays in registers.
    #[inline(always)]
    fn next_raw(&mut self) -> Option<Raw> {
        if self.left == 0 {
            return None;
        }
        if let Some(state) = self.collected {
            let r = next_collected(state, self.cur)?;
            self.cur += 1;
            self.left -= 1;
            return Some(r);
        }
        let cur = self.cur;
        // A call, as in vm-memory's own iterator (see `RegionTable::to_region_addr`).
        let (region, off) = self.table.to_region_addr(GuestAddress(cur))?;
        let n = (region.len() - off.0).min(self.left);
        let p = match region.host_range(off, n as usize) {
            Some(p) => p,
            None => lazy_range(region, off.0, n, self.pins)?,
        };
        self.left -= n;
        // Wraps only to 0, at the end of the range (see `direct`).
        self.cur = cur.wrapping_add(n);
        Some((p, n as usize))
    }

    /// The error that stopped [`RequestSlices::next_ok`]; ends the iteration. Inline, with
    /// the work in functions taking the fields by value: a `&mut self` call, even a cold
    /// one, puts the iterator in memory, and every move of it then stalls on store
    /// forwarding.
    #[inline(always)]
    fn take_error(&mut self) -> GuestMemoryError {
        let e = match self.collected {
            _ if self.left == 0 => GuestMemoryError::GuestAddressOverflow,
            Some(state) => collected_error(state, self.cur, self.left),
            None => table_error(self.table, self.cur, self.left),
        };
        self.left = 0;
        self.overflow = false;
        e
    }

    /// Ends the iteration, giving back the collected entries not taken.
    #[inline(always)]
    fn stop(&mut self) {
        if let Some(state) = self.collected {
            discard(state, self.cur, self.left);
        }
        self.left = 0;
        self.overflow = false;
    }
}

/// [`RequestSlices::next_raw`] for collected slices: entry `i`, None if it is an error (left
/// in the list for [`collected_error`]).
#[cold]
#[inline(never)]
fn next_collected(state: &RefCell<ScopeState>, i: u64) -> Option<Raw> {
    let s = state.borrow_mut().collected.take_slice(i)?;
    Some((NonNull::new(s.ptr_guard_mut().as_ptr())?, s.len()))
}

/// The error at collected entry `i`, giving back the `left - 1` entries after it.
#[cold]
#[inline(never)]
fn collected_error(state: &RefCell<ScopeState>, i: u64, left: u64) -> GuestMemoryError {
    let mut st = state.borrow_mut();
    let e = st.collected.take(i);
    st.collected.discard(i + 1, left - 1);
    match e {
        Some(Err(e)) => e,
        // Not reached: a missing entry would be our bug.
        _ => GuestMemoryError::InvalidGuestAddress(GuestAddress(0)),
    }
}

thread_local! {
    /// The error of the last failed `lazy_range` on this thread, until `table_error` takes it
    /// (an iterator that yields no slice asks for its error before anything else runs).
    static LAZY_ERROR: Cell<Option<BackendError>> = const { Cell::new(None) };
}

/// Where `n` bytes at `off` of `region` are, if it is a lazy FOREIGN region and the scope
/// (holding with `pins` when the handle has a bound) could map them.
#[inline(always)]
fn lazy_range(
    region: &XenRegion,
    off: u64,
    n: u64,
    pins: Option<&ScopePins>,
) -> Option<NonNull<u8>> {
    let lz = region.lazy()?;
    if let Err(e) = lz.ensure(off, n, pins) {
        // Kept for `table_error`: asking again could answer otherwise (the bound has room
        // once another scope ended).
        LAZY_ERROR.with(|c| c.set(Some(e)));
        return None;
    }
    // Inside the reservation: the caller clipped `off + n` to the region.
    NonNull::new(lz.host().wrapping_add(off as usize))
}

/// Why the table yields no slice at `cur` (`left` bytes asked for).
#[cold]
#[inline(never)]
fn table_error(table: &RegionTable, cur: u64, left: u64) -> GuestMemoryError {
    match table.to_region_addr(GuestAddress(cur)) {
        None => GuestMemoryError::InvalidGuestAddress(GuestAddress(cur)),
        Some((region, off)) => {
            let n = (region.len() - off.0).min(left);
            if let Some(lz) = region.lazy() {
                // The error `lazy_range` just met on this thread (a frame missing, the bound
                // reached), counted.
                let e = match LAZY_ERROR.with(Cell::take) {
                    Some(e) => RequestError::from(e),
                    None => RequestError::NotFetched { gpa: cur },
                };
                lz.count_error();
                return e.into_guest_memory_error();
            }
            match region.get_slice(off, n as usize) {
                Err(e) => e,
                // Not reached: `next_raw` failed on this very lookup.
                Ok(_) => GuestMemoryError::InvalidGuestAddress(GuestAddress(cur)),
            }
        }
    }
}

/// Gives back `n` collected entries from `i` that their iterator did not take.
#[cold]
#[inline(never)]
fn discard(state: &RefCell<ScopeState>, i: u64, n: u64) {
    if let Ok(mut st) = state.try_borrow_mut() {
        st.collected.discard(i, n);
    }
}

/// A slice's address and length.
type Raw = (NonNull<u8>, usize);

/// The slice of a [`Raw`] range from [`RequestSlices::next_raw`].
#[inline(always)]
fn slice<'a>((p, n): Raw) -> VolatileSlice<'a> {
    // SAFETY: `next_raw` returns only ranges of `'a` slices: `n` bytes inside a region's
    // mapping (bounds checked by `XenRegion::host_range`), which lives as long as the table
    // the iterator borrows for `'a`, or the range of a slice the scope collected for `'a`.
    unsafe { VolatileSlice::new(p.as_ptr(), n) }
}

impl<'a> Iterator for RequestSlices<'a> {
    type Item = SliceResult<'a>;

    #[inline(always)]
    fn next(&mut self) -> Option<SliceResult<'a>> {
        match self.next_ok() {
            Some(s) => Some(Ok(s)),
            None if !self.error_pending() => None,
            None => Some(Err(self.take_error())),
        }
    }
}

impl std::iter::FusedIterator for RequestSlices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, ()> for RequestSlices<'a> {
    /// As the provided method (an error first is returned, otherwise the slices up to the
    /// first error), without its `Peekable` of 40-byte results: vm-memory's `Bytes` methods
    /// all go through here, and this shape keeps the slices in registers.
    #[inline(always)]
    fn stop_on_error(
        mut self,
    ) -> Result<impl Iterator<Item = VolatileSlice<'a>>, GuestMemoryError> {
        let first = self.next_raw();
        if first.is_none() && self.error_pending() {
            return Err(self.take_error());
        }
        Ok(OkSlices { first, rest: self })
    }
}

/// The slices of a [`RequestSlices`] up to its first error.
struct OkSlices<'a> {
    /// The first slice, taken to see whether it is an error (two words, not a slice: kept
    /// in registers where vm-memory's loops run).
    first: Option<Raw>,
    rest: RequestSlices<'a>,
}

impl<'a> Iterator for OkSlices<'a> {
    type Item = VolatileSlice<'a>;

    #[inline(always)]
    fn next(&mut self) -> Option<VolatileSlice<'a>> {
        if let Some(r) = self.first.take() {
            return Some(slice(r));
        }
        let r = self.rest.next_raw();
        if r.is_none() && self.rest.error_pending() {
            self.rest.stop();
        }
        r.map(slice)
    }
}

/// The slices `get_slices` collected for a table with on-demand regions, until their
/// iterators take them: one list per scope, whose capacity the scope's state keeps, so that
/// an iterator is three words without drop glue and an access allocates nothing once the list
/// has grown.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    /// Entries of live iterators; `None` once taken.
    entries: Vec<Option<SliceResult<'static>>>,
    /// Entries taken or discarded; when it reaches `entries.len()`, no iterator holds an
    /// entry and the list starts again.
    taken: usize,
}

impl Collected {
    /// Appends the slices of `buf`; returns their first index and count.
    pub(crate) fn add(&mut self, buf: SliceBuf<'_>) -> (u64, u64) {
        if self.taken == self.entries.len() {
            self.entries.clear();
            self.taken = 0;
        }
        let start = self.entries.len();
        let mut push = |s: SliceResult<'_>| {
            // SAFETY: only the lifetime changes (`VolatileSlice` is covariant in it). The
            // slice points into memory the scope owns until it ends; the entry is only handed
            // out again through an iterator that borrows the scope as long as the original
            // slice did, and the list is emptied before the scope's memory is released
            // (`clear`, from the scope's state recycling, with the scope borrowed mutably).
            let s: SliceResult<'static> = unsafe { std::mem::transmute(s) };
            self.entries.push(Some(s));
        };
        match buf {
            SliceBuf::Empty => {}
            SliceBuf::One(s) => push(s),
            SliceBuf::Many(v) => v.into_iter().for_each(push),
        }
        (start as u64, (self.entries.len() - start) as u64)
    }

    /// Takes entry `i` if it is a slice.
    fn take_slice<'a>(&mut self, i: u64) -> Option<VolatileSlice<'a>> {
        let e = self.entries.get_mut(i as usize)?;
        match e.take()? {
            Ok(s) => {
                self.taken += 1;
                Some(s)
            }
            Err(err) => {
                *e = Some(Err(err));
                None
            }
        }
    }

    /// Takes entry `i`.
    fn take<'a>(&mut self, i: u64) -> Option<SliceResult<'a>> {
        let s = self.entries.get_mut(i as usize)?.take()?;
        self.taken += 1;
        Some(s)
    }

    /// Drops the `n` entries from `i` that their iterator did not take.
    fn discard(&mut self, i: u64, n: u64) {
        let (i, n) = (i as usize, n as usize);
        if let Some(rest) = self.entries.get_mut(i..i.saturating_add(n)) {
            for e in rest {
                if e.take().is_some() {
                    self.taken += 1;
                }
            }
        }
    }

    /// Drops every entry (no iterator is alive).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.taken = 0;
    }
}
