//! Lazily mapped FOREIGN regions ([`super::foreign::ForeignMapping::Lazy`]): address space is
//! reserved when the region is added; each bucket of frames is mapped (one privcmd mapping +
//! one MMAPBATCH) the first time a request scope touches it, and may be unmapped again when
//! the handle's bound on mapped buckets needs room (`crate::device::budget`), once no live
//! scope holds it.
//!
//! Each bucket has one state word: its state (unmapped, mapped clean, mapped with missing
//! frames, being evicted, dead), how many live scopes and ring pins hold it, and the id of the
//! last holder (cleared by the last holder to let go). A scope takes one hold per
//! bucket it touches ([`ScopePins`]) and gives them all back when it ends; an evictor claims
//! only a bucket with no hold, by one compare-and-swap on the word, which a new hold (also a
//! compare-and-swap on that word) races against, so exactly one of them wins. A warm touch by
//! the scope that took the last hold is one load.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use super::foreign::{fill_chunk, reserve, Fault, BATCH_FRAMES};
use super::BackendError;
use crate::device::budget::BucketOwner;
use crate::device::{DeviceError, XenHandle};
use crate::xen_page::{page_offset, pages_spanned, XEN_PAGE_SHIFT, XEN_PAGE_SIZE};

/// The state bits of a bucket word.
const STATE: u64 = 3;
const UNMAPPED: u64 = 0;
/// Mapped, every frame present.
const CLEAN: u64 = 1;
/// Mapped, some frames missing (listed in `Inner::faults`), or the batch failed as a whole.
const FAULTY: u64 = 2;
/// Claimed by an evictor, which unmaps it (without the region's lock) and then marks it
/// unmapped.
const EVICTING: u64 = 3;
/// With EVICTING: the kernel refused to unmap it, so its address range is in an unknown state;
/// every access to it fails from then on.
const DEAD: u64 = 4;
/// Holds of live scopes (and of ring pins): 16 bits above the state and dead bits.
const HOLD_SHIFT: u32 = 3;
const HOLD_ONE: u64 = 1 << HOLD_SHIFT;
const HOLDS: u64 = 0xffff << HOLD_SHIFT;
/// The id of the scope that took the last hold: the 45 bits above.
const HOLDER_SHIFT: u32 = 19;
const LOW: u64 = (1 << HOLDER_SHIFT) - 1;

fn holder(w: u64) -> u64 {
    w >> HOLDER_SHIFT
}

/// The next block of scope ids (45 bits: 3.5e13 scopes before they wrap).
static NEXT_SCOPE: AtomicU64 = AtomicU64::new(1);
/// Scope ids a thread takes from [`NEXT_SCOPE`] at a time.
const ID_BLOCK: u64 = 1024;

thread_local! {
    /// This thread's next scope id and the end of its block.
    static SCOPE_IDS: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// A scope id no other scope has (no shared atomic per scope: a block per thread).
fn next_scope_id() -> u64 {
    let mask = u64::MAX >> HOLDER_SHIFT;
    let fresh = || loop {
        let start = NEXT_SCOPE.fetch_add(ID_BLOCK, SeqCst) & mask;
        // Skip a block holding id 0 (0 means no holder) or wrapping.
        if start != 0 && start + ID_BLOCK <= mask {
            break (start, start + ID_BLOCK);
        }
    };
    SCOPE_IDS
        .try_with(|c| {
            let (mut next, mut end) = c.get();
            if next == end {
                (next, end) = fresh();
            }
            c.set((next + 1, end));
            next
        })
        .unwrap_or_else(|_| fresh().0)
}

/// The buckets one request scope holds, each once: counted in the bucket's word while the
/// scope lives, given back by [`ScopePins::release`] when it ends.
#[derive(Debug, Default)]
pub(crate) struct ScopePins {
    /// Unique among scopes (never 0).
    id: u64,
    held: RefCell<Vec<(NonNull<LazyForeign>, usize)>>,
}

thread_local! {
    /// Emptied hold lists, kept with their capacity for the next scope on this thread.
    #[allow(clippy::vec_box)]
    static FREE_PINS: RefCell<Vec<Box<ScopePins>>> = const { RefCell::new(Vec::new()) };
}

impl ScopePins {
    /// An empty list with a fresh id (reused from this thread when it has one).
    pub(crate) fn take() -> Box<ScopePins> {
        let mut p = FREE_PINS
            .try_with(|f| f.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        p.id = next_scope_id();
        p
    }

    /// Gives back every hold (the scope ends; no slice of it is alive) and keeps the list
    /// for the next scope.
    ///
    /// # Safety
    /// Every region whose bucket this list holds is still alive: the scope borrows the table
    /// that owns them, and releases before that borrow ends.
    pub(crate) unsafe fn release(mut self: Box<Self>) {
        let id = self.id;
        for (lz, b) in self.held.get_mut().drain(..) {
            // SAFETY: alive per the contract.
            let lz = unsafe { lz.as_ref() };
            // Give the hold back, and the holder field too if it is ours: the last holder
            // always clears it, so a bucket nobody holds names no holder, and an id that
            // comes round again can never find a bucket it seems to hold already.
            let _ = lz.words[b].fetch_update(SeqCst, SeqCst, |w| {
                let w = w - HOLD_ONE;
                Some(if holder(w) == id { w & LOW } else { w })
            });
        }
        let _ = FREE_PINS.try_with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < 4 && self.held.get_mut().capacity() <= 1024 {
                f.push(self);
            }
        });
    }

    fn holds(&self, lz: &LazyForeign, b: usize) -> bool {
        let lz = NonNull::from(lz);
        self.held.borrow().iter().any(|&(l, x)| l == lz && x == b)
    }

    fn add(&self, lz: &LazyForeign, b: usize) {
        self.held.borrow_mut().push((NonNull::from(lz), b));
    }
}

/// What a caller of [`LazyForeign::ensure_slow`] takes of the buckets.
#[derive(Clone, Copy, Debug)]
enum Claim<'a> {
    /// A hold for the scope of these pins (the handle has a bound).
    Hold(&'a ScopePins),
    /// Nothing: the handle has no bound, so no bucket is ever evicted.
    Use,
}

/// A lazily mapped FOREIGN region: a reservation whose buckets are mapped on first touch.
#[derive(Debug)]
pub(crate) struct LazyForeign {
    dev: XenHandle,
    domid: u16,
    /// Gfn of the reservation's first page.
    first_gfn: u64,
    /// The reservation, `pages` pages.
    base: NonNull<u8>,
    pages: usize,
    /// Offset of the region's first byte in the reservation.
    offset: usize,
    /// log2 of frames per bucket.
    shift: u32,
    /// One word per bucket (see the module docs). It goes from unmapped to mapped only under
    /// `inner`'s lock; holds and evictors' claims are compare-and-swaps without it.
    words: Box<[AtomicU64]>,
    /// Where the next eviction sweep of this region starts (evictors are serialized by the
    /// budget).
    hand: AtomicUsize,
    /// Mapping (and the fault lists) under this lock; eviction does not take it.
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Pages of mapped buckets that stayed unmapped, by page index in the reservation (entries
    /// of an evicted bucket stay until it is mapped again; only mapped buckets are asked).
    faults: BTreeMap<usize, Fault>,
    /// Buckets whose MMAPBATCH failed as a whole: the errno (until the bucket is evicted).
    broken: BTreeMap<usize, i32>,
    /// Reused per-frame error buffer.
    errs: Vec<i32>,
}

// SAFETY: `base` is a reservation owned by this value, released only in Drop; the bucket
// words are atomics and the rest is behind a mutex.
unsafe impl Send for LazyForeign {}
// SAFETY: as above.
unsafe impl Sync for LazyForeign {}

impl LazyForeign {
    /// Reserves `[gpa, gpa + size)` of `domid` (one anonymous `mmap`, no device call) and
    /// registers the region with the handle's bucket budget.
    pub(crate) fn reserve(
        dev: &XenHandle,
        domid: u16,
        gpa: u64,
        size: u64,
        bucket_frames: usize,
    ) -> Result<Arc<Self>, BackendError> {
        let map_err = |source| BackendError::ForeignMap {
            domid,
            gpa,
            size,
            source,
        };
        if !bucket_frames.is_power_of_two() || bucket_frames > BATCH_FRAMES {
            return Err(map_err(DeviceError::sys("lazy bucket size", libc::EINVAL)));
        }
        let pages = pages_spanned(page_offset(gpa), size) as usize;
        let base = reserve(pages).map_err(map_err)?;
        let shift = bucket_frames.trailing_zeros();
        let buckets = pages.div_ceil(bucket_frames);
        let lazy = Arc::new(LazyForeign {
            dev: dev.clone(),
            domid,
            first_gfn: gpa >> XEN_PAGE_SHIFT,
            base,
            pages,
            offset: page_offset(gpa) as usize,
            shift,
            words: (0..buckets).map(|_| AtomicU64::new(UNMAPPED)).collect(),
            hand: AtomicUsize::new(0),
            inner: Mutex::new(Inner::default()),
        });
        let weak = Arc::downgrade(&lazy);
        dev.budget().register(weak);
        Ok(lazy)
    }

    /// The domain.
    pub(crate) fn domid(&self) -> u16 {
        self.domid
    }

    /// Host address of the region's first byte (inside the reservation; only the bytes that
    /// [`LazyForeign::ensure`] accepted may be accessed, while the scope that asked lives).
    pub(crate) fn host(&self) -> *mut u8 {
        self.base.as_ptr().wrapping_add(self.offset)
    }

    /// Counts a refused access on the device (as the grant path does).
    pub(crate) fn count_error(&self) {
        self.dev.counters().add_errors(1);
    }

    /// Buckets mapped now.
    pub(crate) fn mapped_buckets(&self) -> usize {
        self.words
            .iter()
            .filter(|w| w.load(SeqCst) & STATE != UNMAPPED)
            .count()
    }

    /// Reservation pages and buckets of region bytes `[off, off + len)` (`len > 0`).
    #[inline(always)]
    fn span(&self, off: u64, len: u64) -> (usize, usize, usize, usize) {
        let first = (self.offset as u64 + off) as usize / XEN_PAGE_SIZE;
        let last = (self.offset as u64 + off + len - 1) as usize / XEN_PAGE_SIZE;
        (first, last, first >> self.shift, last >> self.shift)
    }

    /// Warm touch of bucket `b` by a scope: true if it is mapped with every frame and stays
    /// mapped while that scope lives: held by the scope (`pins`), or pinned, or (no `pins`: the
    /// handle has no bound, so nothing is ever evicted) simply mapped.
    #[inline(always)]
    fn touch(&self, b: usize, pins: Option<&ScopePins>) -> bool {
        let Some(word) = self.words.get(b) else {
            return false;
        };
        let w = word.load(SeqCst);
        if w & STATE != CLEAN {
            return false;
        }
        match pins {
            None => true,
            Some(p) if holder(w) == p.id => true,
            Some(p) => self.hold(b, p, false),
        }
    }

    /// Takes the hold of the scope of `pins` on mapped bucket `b` (clean only, unless
    /// `faulty_too`); false if the bucket is not mapped so (or is being evicted).
    #[inline(never)]
    fn hold(&self, b: usize, pins: &ScopePins, faulty_too: bool) -> bool {
        let word = &self.words[b];
        let mine = pins.holds(self, b);
        let mut w = word.load(SeqCst);
        loop {
            let state = w & STATE;
            if !(state == CLEAN || (faulty_too && state == FAULTY)) {
                return false;
            }
            if holder(w) == pins.id {
                return true;
            }
            let new = if mine {
                (w & LOW) | (pins.id << HOLDER_SHIFT)
            } else if w & HOLDS == HOLDS {
                // 65535 live scopes on one bucket: no room to count one more.
                return false;
            } else {
                ((w & LOW) + HOLD_ONE) | (pins.id << HOLDER_SHIFT)
            };
            match word.compare_exchange(w, new, SeqCst, SeqCst) {
                Ok(_) => {
                    if !mine {
                        pins.add(self, b);
                    }
                    return true;
                }
                Err(now) => w = now,
            }
        }
    }

    /// Maps the buckets holding region bytes `[off, off + len)` (`len > 0`, inside the region)
    /// that are not mapped yet and, when the handle has a bound, takes the hold of the scope of
    /// `pins` on each (no `pins` only without a bound: see [`crate::XenHandle::set_lazy_bucket_limit`]).
    /// Then checks that every frame of the range is present: on success those bytes are
    /// accessible at `host() + off` until that scope ends. Otherwise the error names the lowest
    /// missing frame of the range.
    #[inline(always)]
    pub(crate) fn ensure(
        &self,
        off: u64,
        len: u64,
        pins: Option<&ScopePins>,
    ) -> Result<(), BackendError> {
        let (first, last, b0, b1) = self.span(off, len);
        if (b0..=b1).all(|b| self.touch(b, pins)) {
            return Ok(());
        }
        let claim = match pins {
            Some(p) => Claim::Hold(p),
            None => Claim::Use,
        };
        self.ensure_slow(first, last, claim)
    }

    /// Maps the buckets holding region bytes `[off, off + len)` (`len > 0`, inside the
    /// region) and, when the handle has a bound, holds them with a list of their own (a ring
    /// pin: never evicted until the list is released). Without a bound nothing is evicted and
    /// no list is needed.
    pub(crate) fn pin(&self, off: u64, len: u64) -> Result<Option<Box<ScopePins>>, BackendError> {
        let (first, last, _, _) = self.span(off, len);
        if !self.dev.budget().bounded() {
            return self.ensure_slow(first, last, Claim::Use).map(|()| None);
        }
        let pins = ScopePins::take();
        match self.ensure_slow(first, last, Claim::Hold(&pins)) {
            Ok(()) => Ok(Some(pins)),
            Err(e) => {
                // SAFETY: the list only holds buckets of `self`, alive here.
                unsafe { pins.release() };
                Err(e)
            }
        }
    }

    /// The rest of [`LazyForeign::ensure`] and of [`LazyForeign::pin`]: make room, map what
    /// is missing, hold (or pin) under the lock, check the frames.
    #[cold]
    #[inline(never)]
    fn ensure_slow(&self, first: usize, last: usize, claim: Claim<'_>) -> Result<(), BackendError> {
        let (b0, b1) = (first >> self.shift, last >> self.shift);
        let budget = self.dev.budget();
        let limit = |max| BackendError::LazyBucketLimit {
            domid: self.domid,
            gfn: self.first_gfn + first as u64,
            max,
        };
        // Buckets that need mapping: unmapped, or being unmapped.
        let unmapped = || {
            (b0..=b1)
                .filter(|&b| matches!(self.words[b].load(SeqCst) & STATE, UNMAPPED | EVICTING))
                .count()
        };
        // Room first, without our lock (making room may unmap buckets of this region too);
        // a bucket an evictor takes after this count gets its room under the lock below.
        let want = unmapped();
        budget.reserve(want).map_err(|f| limit(f.max))?;
        let mut reserved = want;
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *guard;
        let mut result = Ok(());
        for b in b0..=b1 {
            let word = &self.words[b];
            loop {
                let w = word.load(SeqCst);
                match w & STATE {
                    EVICTING if w & DEAD != 0 => {
                        result = Err(self.bucket_error(
                            b,
                            DeviceError::sys("unmap of an evicted bucket", libc::EIO),
                        ));
                        break;
                    }
                    // An evictor is unmapping it (without our lock): wait for the end.
                    EVICTING => std::thread::yield_now(),
                    UNMAPPED => {
                        // Counted in `reserved`, unless an evictor took it after we counted
                        // (between our look and our hold): then room is made now (evictors
                        // take no region lock, so holding ours is fine).
                        if reserved > 0 {
                            reserved -= 1;
                        } else if let Err(f) = budget.reserve(1) {
                            result = Err(limit(f.max));
                            break;
                        }
                        if let Err(err) = self.map_bucket(inner, b, claim) {
                            budget.release(1);
                            result = Err(err);
                        }
                        break;
                    }
                    _ => match claim {
                        Claim::Hold(p) => {
                            if self.hold(b, p, true) {
                                break;
                            }
                            // Claimed by an evictor meanwhile, or 65535 holds: look again.
                            if word.load(SeqCst) & HOLDS == HOLDS {
                                result = Err(limit(budget.max()));
                                break;
                            }
                        }
                        Claim::Use => break,
                    },
                }
            }
            if result.is_err() {
                break;
            }
        }
        budget.release(reserved);
        result?;
        for b in b0..=b1 {
            if let Some(&errno) = inner.broken.get(&b) {
                return Err(
                    self.bucket_error(b, DeviceError::sys("IOCTL_PRIVCMD_MMAPBATCH_V2", errno))
                );
            }
        }
        match inner.faults.range(first..=last).next() {
            Some((_, fault)) => Err(fault.error(self.domid)),
            None => Ok(()),
        }
    }

    /// `source`, for bucket `b` as a whole.
    fn bucket_error(&self, b: usize, source: DeviceError) -> BackendError {
        let (start, n) = self.bucket_range(b);
        BackendError::ForeignMap {
            domid: self.domid,
            gpa: (self.first_gfn + start as u64) << XEN_PAGE_SHIFT,
            size: (n * XEN_PAGE_SIZE) as u64,
            source,
        }
    }

    /// First page and pages of bucket `b`.
    fn bucket_range(&self, b: usize) -> (usize, usize) {
        let start = b << self.shift;
        (start, (1usize << self.shift).min(self.pages - start))
    }

    /// The first byte of bucket `b`'s pages in the reservation.
    fn bucket_addr(&self, b: usize) -> Result<NonNull<u8>, DeviceError> {
        let (start, _) = self.bucket_range(b);
        // In bounds: `start < pages`, the size of the reservation.
        NonNull::new(self.base.as_ptr().wrapping_add(start * XEN_PAGE_SIZE))
            .ok_or(DeviceError::sys("mmap(privcmd)", libc::EFAULT))
    }

    /// Maps bucket `b` (unmapped; `inner` locked), held, used or pinned as `claim` says.
    fn map_bucket(
        &self,
        inner: &mut Inner,
        b: usize,
        claim: Claim<'_>,
    ) -> Result<(), BackendError> {
        let (start, n) = self.bucket_range(b);
        let map_err = |source| self.bucket_error(b, source);
        // What an earlier mapping of this bucket left (evictors do not take our lock).
        let stale: Vec<usize> = inner
            .faults
            .range(start..start + n)
            .map(|(&p, _)| p)
            .collect();
        for p in stale {
            inner.faults.remove(&p);
        }
        inner.broken.remove(&b);
        let chunk = self.bucket_addr(b).map_err(map_err)?;
        // SAFETY: the bucket's pages are still the reservation's (its state is UNMAPPED and we
        // hold the lock), which nothing refers into.
        unsafe { self.dev.foreign_mmap_at(chunk, n) }.map_err(map_err)?;
        // From here the bucket holds a privcmd mapping, released by eviction or Drop.
        let mut errs = std::mem::take(&mut inner.errs);
        // SAFETY: `chunk` is the fresh privcmd mapping of `n` pages made above.
        let r = unsafe {
            fill_chunk(
                &self.dev,
                self.domid,
                chunk,
                self.first_gfn + start as u64,
                n,
                &mut errs,
                false,
            )
        };
        inner.errs = errs;
        let state = match r {
            Ok(faults) if faults.is_empty() => CLEAN,
            Ok(faults) => {
                inner
                    .faults
                    .extend(faults.into_iter().map(|(slot, f)| (start + slot, f)));
                FAULTY
            }
            Err(err) => {
                inner.broken.insert(b, err.errno().unwrap_or(libc::EIO));
                FAULTY
            }
        };
        let word = match claim {
            Claim::Hold(p) => {
                p.add(self, b);
                state | HOLD_ONE | (p.id << HOLDER_SHIFT)
            }
            Claim::Use => state,
        };
        self.words[b].store(word, SeqCst);
        Ok(())
    }

    /// Unmaps bucket `b`, claimed (EVICTING) by the caller: back to UNMAPPED, or dead if the
    /// kernel refused. Without the lock: the claim keeps mappers off the bucket, and the next
    /// mapping clears what the old one left in `inner`.
    fn unmap_bucket(&self, b: usize) -> bool {
        let (_, n) = self.bucket_range(b);
        let done = match self.bucket_addr(b) {
            // SAFETY: bucket `b` holds the privcmd mapping `map_bucket` made; no live scope or
            // ring pin holds it (the claim needed a hold count of 0 and stops new holds).
            Ok(addr) => unsafe { self.dev.foreign_unmap_to_reserve(addr, n) }.is_ok(),
            Err(_) => false,
        };
        // Refused: the kernel may have unmapped part of it, so it is neither mapped nor safely
        // reusable; it stays claimed, and accesses to it fail.
        self.words[b].store(if done { UNMAPPED } else { EVICTING | DEAD }, SeqCst);
        done
    }
}

impl BucketOwner for LazyForeign {
    fn evict(&self, want: usize) -> usize {
        let n = self.words.len();
        let hand = self.hand.load(SeqCst);
        let mut got = 0;
        for i in 0..n {
            if got == want {
                break;
            }
            let b = (hand + i) % n;
            let word = &self.words[b];
            let w = word.load(SeqCst);
            let state = w & STATE;
            if (state == CLEAN || state == FAULTY)
                && w & HOLDS == 0
                && word.compare_exchange(w, EVICTING, SeqCst, SeqCst).is_ok()
                && self.unmap_bucket(b)
            {
                got += 1;
                self.hand.store((b + 1) % n, SeqCst);
            }
        }
        got
    }
}

impl Drop for LazyForeign {
    fn drop(&mut self) {
        let mut mapped = 0;
        for b in 0..self.words.len() {
            if self.words[b].load(SeqCst) & STATE == UNMAPPED {
                continue;
            }
            mapped += 1;
            let (_, n) = self.bucket_range(b);
            if let Ok(addr) = self.bucket_addr(b) {
                // SAFETY: exactly the privcmd mapping made for bucket `b`; nothing refers into
                // it any more (slices borrow the region).
                let _ = unsafe { self.dev.foreign_munmap(addr, n) };
            }
        }
        self.dev.budget().release(mapped);
        // SAFETY: our own reservation; nothing refers into it any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.pages * XEN_PAGE_SIZE) };
    }
}
