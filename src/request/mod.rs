//! Request-scoped memory: the guest memory a device sees while it serves one request (or one
//! batch of requests).
//!
//! [`RequestMemory`] borrows the [`RegionTable`] and implements vm-memory's `GuestMemory`.
//! Regions mapped in advance are served directly. Pages of on-demand grant regions are
//! fetched on first touch, by grant copy into bounce buffers the scope owns or by gntdev
//! mapping in the protection the access asks for ([`Strategy`]);
//! [`RequestMemory::prefetch_chains`] fetches the pages of whole descriptor chains (and
//! [`RequestMemory::prefetch`] those of a list of buffers) with one ioctl per direction or
//! protection.
//! When the scope ends ([`RequestMemory::finish`], or drop, on error paths and unwinding
//! too) written bytes are copied back and every mapping is gone, before the daemon writes the
//! used-ring entry: a guest ends foreign access to its buffers when a request completes.
//!
//! # Soundness
//!
//! `get_slices(&'a self, ..)` returns `VolatileSlice<'a>`s pointing into mappings and bounce
//! buffers owned by the scope. `VolatileSlice` is `Copy` and has no `Drop`, so the scope never
//! learns when an access ends; instead every slice borrows the scope, and the borrow checker
//! forbids `finish(self)` or drop while any slice (or a `Reader`/`Writer` built from one) is
//! alive. Nothing the scope owns is released or moved before then: bounce buffers are raw heap
//! pages that never move, mappings are never replaced (a page first mapped read-only and
//! then written gets a second, writable mapping; both live until the end), and new pages are
//! copied only into bytes no slice covers yet.

mod access;
mod batch;
mod direct;
mod error;
mod owned;
mod pages;
mod writeback;

use std::cell::RefCell;

use direct::RequestSlices;
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    MemoryRegionAddress, Permissions, VolatileSlice,
};

pub use error::RequestError;
pub use owned::OwnedRequestMemory;
use pages::{BouncePage, KeyMap, LiveMap, PageSlot};

use crate::backend::lazy::ScopePins;
use crate::device::{CopySegment, CounterSnapshot, XenHandle, GNTST_OKAY};
use crate::region::XenRegion;
use crate::table::RegionTable;

/// Length (of a prefetched descriptor, or of an access on first touch) at and above which
/// [`Strategy::Auto`] maps instead of copying, set from the
/// real-Xen buffer sweep (`ci/xen`, `bench/buffer-sweep`): grant copy was faster up to 256 KiB
/// (1.5 ms against 2.2 ms), mapping from 512 KiB (2.3 ms against 3.0 ms); the switch sits
/// between the two.
pub const DEFAULT_MAP_THRESHOLD: usize = 384 * 1024;

/// Most on-demand pages (bounce buffers plus mapped pages) one scope may hold: 64 MiB, far
/// above any one virtio request, well below gntdev's per-map and the kernel's map-count limits.
pub const MAX_SCOPE_PAGES: usize = 16384;

/// How on-demand grant pages are fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// gntdev mapping, read-only or writable as the access asks.
    Map,
    /// Grant copy through bounce buffers: no mapping, no TLB shootdown.
    GrantCopy,
    /// Grant copy or mapping by length, decided per page the first time the scope fetches it
    /// and kept for the scope's life: by the descriptor's length when
    /// [`RequestMemory::prefetch_chains`] (or the buffer's in [`RequestMemory::prefetch`])
    /// fetches it, by the length of the access (one `get_slices` call, which a `Reader` or
    /// `Writer` may split) when it is fetched on first touch. Shorter than `map_threshold`:
    /// grant copy; otherwise mapping.
    Auto {
        /// Lengths of at least this many bytes are mapped.
        map_threshold: usize,
    },
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy::Auto {
            map_threshold: DEFAULT_MAP_THRESHOLD,
        }
    }
}

impl Strategy {
    /// Whether a page first fetched for a descriptor or access of `len` bytes is fetched by
    /// grant copy.
    fn copies(self, len: usize) -> bool {
        match self {
            Strategy::Map => false,
            Strategy::GrantCopy => true,
            Strategy::Auto { map_threshold } => len < map_threshold,
        }
    }
}

/// What the device may assume about buffers it writes (device-writable descriptors).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WritableBuffers {
    /// Bytes are copied in from the guest before the device sees them, so bytes the device
    /// does not write go back unchanged; a read-only grant is refused at the access
    /// ([`RequestError::ReadOnlyGrant`]), found by a one-byte write-back in the same call.
    #[default]
    CopyIn,
    /// The device overwrites every byte it asks to write (virtio lets a driver rely only on
    /// the bytes the used length counts): those bytes start zeroed, are not copied in and
    /// not probed. Three grant-copy segments for a block request instead of seven. A
    /// read-only grant is then reported by [`RequestMemory::finish`]
    /// ([`RequestError::CopyBack`]) instead of at the access.
    Overwrite,
}

/// Lists a fetch fills and empties; kept in the scope so their capacity is reused.
#[derive(Debug, Default)]
struct Scratch {
    segs: Vec<CopySegment>,
    /// Piece index of each segment.
    owners: Vec<usize>,
    /// Pieces whose page gets a writability probe.
    probes: Vec<usize>,
    /// Pages with transient fetch state to commit.
    touched: Vec<crate::device::GrantPage>,
    /// One byte per probe that reads its byte first.
    bytes: Vec<u8>,
}

impl Scratch {
    fn clear(&mut self) {
        self.segs.clear();
        self.owners.clear();
        self.probes.clear();
        self.touched.clear();
        self.bytes.clear();
    }
}

#[derive(Debug, Default)]
struct ScopeState {
    dev: Option<XenHandle>,
    writable: WritableBuffers,
    pages: KeyMap<PageSlot>,
    bounce_pages: Vec<BouncePage>,
    /// Scratch list of pieces, reused by every access of the scope.
    piece_buf: Vec<access::Piece>,
    maps: Vec<LiveMap>,
    tmp: Scratch,
    /// Written spans of pages with more than a few (see `writeback::Dirty`).
    spill: KeyMap<Vec<pages::Span>>,
    /// Pieces the current access hands out for writing, written once it succeeds.
    written: Vec<(crate::device::GrantPage, pages::Span)>,
    /// Slices `get_slices` collected, until their iterators take them.
    collected: direct::Collected,
}

/// Guest memory for the life of one request or batch. See the module docs.
#[derive(Debug)]
pub struct RequestMemory<'t> {
    table: &'t RegionTable,
    strategy: Strategy,
    /// The on-demand machinery's state; none over a table without on-demand regions.
    state: StateBox,
    /// The lazy FOREIGN buckets this scope holds; none over a table without lazy regions or
    /// whose handle has no bound (nothing is evicted then).
    pins: Option<PinGuard>,
}

/// A scope's state, boxed: a scope over a table without on-demand regions never needs one,
/// and without it the scope is three words that move and drop for free (the state inline
/// was 300 bytes, copied whole when the scope was made and again into `finish`).
#[derive(Debug, Default)]
struct StateBox(Option<Box<RefCell<ScopeState>>>);

impl std::ops::Deref for StateBox {
    type Target = RefCell<ScopeState>;

    /// Only the on-demand paths use the state, and only over a table with on-demand
    /// regions, whose scope always has one.
    fn deref(&self) -> &RefCell<ScopeState> {
        self.0
            .as_deref()
            .expect("scope state used over a table without on-demand regions")
    }
}

impl std::ops::DerefMut for StateBox {
    fn deref_mut(&mut self) -> &mut RefCell<ScopeState> {
        self.0
            .as_deref_mut()
            .expect("scope state used over a table without on-demand regions")
    }
}

impl<'t> RequestMemory<'t> {
    /// A scope over `table` with the default strategy.
    #[inline]
    pub fn new(table: &'t RegionTable) -> Self {
        Self::with_strategy(table, Strategy::default())
    }

    /// A scope over `table` fetching on-demand pages with `strategy`.
    #[inline]
    pub fn with_strategy(table: &'t RegionTable, strategy: Strategy) -> Self {
        RequestMemory {
            table,
            strategy,
            state: ScopeState::fresh(table),
            pins: table
                .lazy_holds()
                .then(|| PinGuard(Some(ScopePins::take()))),
        }
    }

    /// The scope's holds on lazy FOREIGN buckets, when the table has lazy regions.
    #[inline(always)]
    fn pins(&self) -> Option<&ScopePins> {
        self.pins.as_ref().and_then(|g| g.0.as_deref())
    }

    /// Sets what the device may assume about buffers it writes (default
    /// [`WritableBuffers::CopyIn`]).
    pub fn writable_buffers(mut self, w: WritableBuffers) -> Self {
        // Only on-demand pages are copied in; without them there is nothing to set.
        if let Some(st) = self.state.0.as_deref_mut() {
            st.get_mut().writable = w;
        }
        self
    }

    /// The table this scope reads through (borrowed from the scope: an
    /// [`OwnedRequestMemory`] lends its scope out only for a borrow of itself, so no
    /// reference to its table may outlive that borrow).
    pub fn table(&self) -> &RegionTable {
        self.table
    }

    /// The device counters (ioctls, mmaps, munmaps, grant copies, pages mapped, errors, live
    /// mappings) of the table's Xen device; zero when the table has none.
    pub fn counters(&self) -> CounterSnapshot {
        self.table
            .xen_device()
            .map(|d| d.counters().snapshot())
            .unwrap_or_default()
    }

    /// On-demand pages this scope holds right now (bounce pages plus mapped pages); at most
    /// [`MAX_SCOPE_PAGES`] (plus one bounce page per page whose fetch failed, reused on retry).
    pub fn held_pages(&self) -> usize {
        let Some(st) = self.state.0.as_deref() else {
            return 0;
        };
        let st = st.borrow();
        st.bounce_pages.len() + st.maps.iter().map(|m| m.pages).sum::<usize>()
    }

    /// Mappings this scope holds right now.
    pub fn live_mappings(&self) -> usize {
        self.state
            .0
            .as_deref()
            .map_or(0, |st| st.borrow().maps.len())
    }

    /// Ends the scope: copies written bytes back (one grant-copy ioctl) and unmaps everything.
    /// Call it before `add_used`; dropping the scope does the same but cannot report errors.
    #[inline]
    pub fn finish(mut self) -> Result<(), RequestError> {
        if !self.table.has_on_demand() {
            // Nothing fetched, nothing to release (see `fast path` below).
            return Ok(());
        }
        self.release()
    }

    fn release(&mut self) -> Result<(), RequestError> {
        let st = self.state.get_mut();
        let mut first_err = None;
        let mut segs = std::mem::take(&mut st.tmp.segs);
        segs.clear();
        st.copy_back_segments(&mut segs);
        if let (false, Some(dev)) = (segs.is_empty(), st.dev.as_ref()) {
            // SAFETY: every segment's local range is inside bounce memory this scope owns, and
            // no slice into it can be alive (we hold `&mut self`).
            match unsafe { dev.grant_copy(&mut segs) } {
                Ok(()) => {
                    let failed = segs.iter().filter(|s| s.status != GNTST_OKAY).count();
                    // Name the lowest failing ref, so the error does not depend on map order.
                    let first = segs
                        .iter()
                        .filter(|s| s.status != GNTST_OKAY)
                        .min_by_key(|s| (s.grant.domid, s.grant.gref));
                    if let Some(f) = first {
                        dev.counters().add_errors(failed as u64);
                        first_err = Some(RequestError::CopyBack {
                            failed,
                            gref: f.grant.gref,
                            status: f.status,
                        });
                    }
                }
                Err(e) => first_err = Some(RequestError::Device(e)),
            }
        }
        if let Some(dev) = st.dev.as_ref() {
            for m in st.maps.drain(..) {
                // SAFETY: `m` is a whole mapping this scope made; no slice into it is alive.
                let unmapped = unsafe { dev.grant_munmap(m.base, m.pages) };
                // Unregister the map even if munmap failed, as `HostMapping` does.
                let unregistered = dev.grant_unmap_refs(m.index, m.pages);
                if let (Err(e), None) = (unmapped.and(unregistered), &first_err) {
                    first_err = Some(RequestError::Device(e));
                }
            }
        }
        segs.clear();
        st.tmp.segs = segs;
        st.pages.clear();
        st.spill.clear();
        st.written.clear();
        st.bounce_pages.clear();
        first_err.map_or(Ok(()), Err)
    }

    /// Resolves `[addr, addr + count)` into slices, fetching on-demand pages as needed.
    fn slices(&self, addr: GuestAddress, count: usize, access: Permissions) -> SliceBuf<'_> {
        let mut out = SliceBuf::Empty;
        let mut cur = addr.0;
        let mut left = count as u64;
        let mut ok = true;
        while left > 0 {
            let Some(region) = self.table.find_region(GuestAddress(cur)) else {
                out.push(Err(GuestMemoryError::InvalidGuestAddress(GuestAddress(
                    cur,
                ))));
                ok = false;
                break;
            };
            let off = cur - region.start_addr().0;
            let n = (region.len() - off).min(left);
            let r = match region.on_demand_domid() {
                Some(domid) => self
                    .on_demand(region, domid, cur, n as usize, access, &mut out)
                    .map_err(RequestError::into_guest_memory_error),
                None if region.is_lazy_foreign() => {
                    lazy_slice(region, off, n as usize, self.pins())
                        .map(|s| out.push(Ok(s)))
                        .map_err(RequestError::into_guest_memory_error)
                }
                None => region
                    .get_slice(MemoryRegionAddress(off), n as usize)
                    .map(|s| out.push(Ok(s))),
            };
            if let Err(e) = r {
                out.push(Err(e));
                ok = false;
                break;
            }
            left -= n;
            if left > 0 {
                match cur.checked_add(n) {
                    Some(c) => cur = c,
                    None => {
                        out.push(Err(GuestMemoryError::GuestAddressOverflow));
                        ok = false;
                        break;
                    }
                }
            }
        }
        if access.has_write() {
            // A failed access writes nothing back (see `writeback`).
            self.state.borrow_mut().end_access(ok);
        }
        out
    }
}

/// The slice of `count` bytes at `off` in lazy FOREIGN region `region`, its buckets mapped
/// first.
fn lazy_slice<'a>(
    region: &'a XenRegion,
    off: u64,
    count: usize,
    pins: Option<&ScopePins>,
) -> Result<VolatileSlice<'a>, RequestError> {
    let not_fetched = RequestError::NotFetched {
        gpa: region.start_addr().0 + off,
    };
    let Some(lz) = region.lazy() else {
        return Err(not_fetched);
    };
    lz.ensure(off, count as u64, pins)
        .inspect_err(|_| lz.count_error())?;
    // SAFETY: `ensure` accepted `off..off+count` (inside the region: the caller clipped it)
    // and the scope holds its buckets (or the handle has no bound and nothing is evicted), so
    // those bytes stay mapped until that scope ends; the slice borrows the scope (see the module docs). Guest memory is accessed
    // volatilely by everyone who touches it.
    Ok(unsafe { VolatileSlice::new(lz.host().add(off as usize), count) })
}

/// A scope's holds on lazy FOREIGN buckets, given back when the scope ends: after
/// `RequestMemory`'s own drop (its slices are gone by then), while its table, which owns the
/// regions held, is still borrowed.
#[derive(Debug)]
struct PinGuard(Option<Box<ScopePins>>);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            // SAFETY: the guard is a field of a `RequestMemory<'t>`, dropped with it while
            // `'t`, the borrow of the table owning every region held, still lasts.
            unsafe { p.release() };
        }
    }
}

impl RequestMemory<'_> {
    /// `get_slices` over a table with on-demand regions: collects the slices in the scope's
    /// list and returns where (first entry, count). Out of line and returning two words in
    /// registers, so that the direct path stays as small as vm-memory's.
    #[inline(never)]
    fn collect_slices(&self, addr: GuestAddress, count: usize, access: Permissions) -> (u64, u64) {
        let buf = self.slices(addr, count, access);
        self.state.borrow_mut().collected.add(buf)
    }
}

impl Drop for RequestMemory<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.table.has_on_demand() {
            self.end_on_demand();
        }
    }
}

impl RequestMemory<'_> {
    /// Drop of a scope over a table with on-demand regions.
    fn end_on_demand(&mut self) {
        // Errors here were counted by the device; `finish` is the way to see them.
        let _ = self.release();
        if let Some(st) = self.state.0.take() {
            ScopeState::recycle(st);
        }
    }
}

thread_local! {
    /// Emptied scope states, whose maps and lists keep their capacity for the next scope:
    /// a daemon opens one scope per request or batch, and allocating them afresh each time
    /// was a large part of a request's own cost.
    // Boxes, kept whole: a scope holds its state boxed, and taking one from here costs no
    // allocation.
    #[allow(clippy::vec_box)]
    static STATES: RefCell<Vec<Box<RefCell<ScopeState>>>> = const { RefCell::new(Vec::new()) };
}

impl ScopeState {
    /// An empty state, reused if this thread has one; none over a table without on-demand
    /// regions.
    ///
    /// Fast path: a table without on-demand regions never gives the scope anything to hold, so
    /// its scope has no state (no allocation) and leaves the per-thread states alone; `finish`
    /// and drop then skip the release.
    #[inline]
    fn fresh(table: &RegionTable) -> StateBox {
        if table.has_on_demand() {
            StateBox(Some(Self::reused()))
        } else {
            StateBox(None)
        }
    }

    fn reused() -> Box<RefCell<ScopeState>> {
        STATES
            .try_with(|s| s.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Empties `state` (released already) and keeps it for the next scope on this thread.
    fn recycle(mut state: Box<RefCell<ScopeState>>) {
        let st = state.get_mut();
        st.dev = None;
        st.writable = WritableBuffers::default();
        st.pages.clear();
        st.bounce_pages.clear();
        st.piece_buf.clear();
        st.maps.clear();
        st.tmp.clear();
        st.spill.clear();
        st.written.clear();
        st.collected.clear();
        let ordinary = st.pages.capacity() <= 4096;
        let _ = STATES.try_with(|s| {
            let mut s = s.borrow_mut();
            // Keep a few ordinary ones; a scope that grew huge gives its memory back.
            if s.len() < 4 && ordinary {
                s.push(state);
            }
        });
    }
}

type SliceResult<'a> = Result<VolatileSlice<'a>, GuestMemoryError>;

/// Slices collected for one access.
#[derive(Debug)]
pub(crate) enum SliceBuf<'a> {
    /// None (yet).
    Empty,
    /// Exactly one.
    One(SliceResult<'a>),
    /// More.
    Many(std::collections::VecDeque<SliceResult<'a>>),
}

impl<'a> SliceBuf<'a> {
    #[inline]
    pub(crate) fn push(&mut self, s: SliceResult<'a>) {
        *self = match std::mem::replace(self, SliceBuf::Empty) {
            SliceBuf::Empty => SliceBuf::One(s),
            SliceBuf::One(first) => SliceBuf::Many([first, s].into()),
            SliceBuf::Many(mut v) => {
                v.push_back(s);
                SliceBuf::Many(v)
            }
        }
    }
}

impl GuestMemory for RequestMemory<'_> {
    type PhysicalMemory = RegionTable;
    type Bitmap = ();

    /// Whether regions cover the range; on-demand pages count (whether the guest granted them,
    /// and how, is only known by touching them).
    #[inline]
    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        self.table.covers(addr, count)
    }

    #[inline(always)]
    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::guest_memory::Result<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        if !self.table.has_on_demand() {
            return Ok(RequestSlices::direct(self.table, self.pins(), addr, count));
        }
        let at = self.collect_slices(addr, count, access);
        Ok(RequestSlices::collected(self.table, &self.state, at))
    }
}
