//! The budget of lazily mapped FOREIGN buckets that a handle's clones share (one daemon: every
//! connection's tables): how many are mapped, the bound, and the owners to evict from when a
//! new bucket would pass it.
//!
//! Which buckets may go is the owners' business: a bucket a live request scope holds (see
//! `backend::lazy`) or a pinned ring bucket never does.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, Weak};

/// Something holding lazily mapped buckets that the budget may ask to give some back: a lazy
/// FOREIGN region.
pub(crate) trait BucketOwner: Send + Sync + Debug {
    /// Unmaps up to `want` buckets that no live scope holds and that are not pinned; returns
    /// how many. Takes no lock a mapper may hold: the budget calls it while mappers of the
    /// owner wait for room.
    fn evict(&self, want: usize) -> usize;
}

/// Shared by the clones of one [`crate::XenHandle`].
#[derive(Debug)]
pub(crate) struct LazyBudget {
    /// Buckets mapped now, over every owner.
    mapped: AtomicUsize,
    /// The bound on `mapped`.
    max: AtomicUsize,
    /// Buckets unmapped to make room so far.
    evictions: AtomicU64,
    owners: Mutex<Owners>,
}

#[derive(Debug, Default)]
struct Owners {
    list: Vec<Weak<dyn BucketOwner>>,
    /// Where the next sweep starts (a clock hand over owners).
    hand: usize,
}

impl Default for LazyBudget {
    fn default() -> Self {
        LazyBudget {
            mapped: AtomicUsize::new(0),
            max: AtomicUsize::new(usize::MAX),
            evictions: AtomicU64::new(0),
            owners: Mutex::new(Owners::default()),
        }
    }
}

/// Why room for new buckets could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BudgetFull {
    /// The bound.
    pub(crate) max: usize,
}

impl LazyBudget {
    /// Counts `n` new buckets, evicting unused ones first if the bound would be passed.
    pub(crate) fn reserve(&self, n: usize) -> Result<(), BudgetFull> {
        if n == 0 {
            return Ok(());
        }
        loop {
            let (m, max) = (self.mapped.load(SeqCst), self.max.load(SeqCst));
            match m.checked_add(n) {
                Some(t) if t <= max => {
                    if self.mapped.compare_exchange(m, t, SeqCst, SeqCst).is_ok() {
                        return Ok(());
                    }
                }
                _ => {
                    if n > max || self.evict(m.saturating_add(n).saturating_sub(max)) == 0 {
                        return Err(BudgetFull { max });
                    }
                }
            }
        }
    }

    /// Gives back `n` buckets' worth (unmapped, or reserved and not mapped).
    pub(crate) fn release(&self, n: usize) {
        let was = self.mapped.fetch_sub(n, SeqCst);
        debug_assert!(was >= n, "lazy bucket count underflow: {was} - {n}");
    }

    /// Unmaps up to `want` buckets no live scope holds; returns how many.
    fn evict(&self, want: usize) -> usize {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners.list.retain(|w| w.strong_count() > 0);
        let n = owners.list.len();
        let mut got = 0;
        for i in 0..n {
            let at = (owners.hand + i) % n;
            if let Some(o) = owners.list[at].upgrade() {
                got += o.evict(want - got);
            }
            if got >= want {
                owners.hand = (at + 1) % n;
                break;
            }
        }
        self.mapped.fetch_sub(got, SeqCst);
        self.evictions.fetch_add(got as u64, SeqCst);
        got
    }

    /// Registers a new owner of buckets.
    pub(crate) fn register(&self, owner: Weak<dyn BucketOwner>) {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners.list.retain(|w| w.strong_count() > 0);
        owners.list.push(owner);
    }

    /// Sets the bound, unless a lazy region is alive: scopes over its tables decided at their
    /// start whether to hold what they touch (only under a bound), so the bound may not
    /// appear under them. Returns how many lazy regions are alive when refused.
    pub(crate) fn set_max(&self, max: usize) -> Result<(), usize> {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners.list.retain(|w| w.strong_count() > 0);
        if !owners.list.is_empty() {
            return Err(owners.list.len());
        }
        self.max.store(max, SeqCst);
        Ok(())
    }

    /// Whether a bound is set (then scopes hold the buckets they touch).
    #[inline]
    pub(crate) fn bounded(&self) -> bool {
        self.max.load(SeqCst) != usize::MAX
    }

    pub(crate) fn max(&self) -> usize {
        self.max.load(SeqCst)
    }

    pub(crate) fn mapped(&self) -> usize {
        self.mapped.load(SeqCst)
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.evictions.load(SeqCst)
    }
}
