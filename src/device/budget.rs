//! The budget of lazily mapped FOREIGN buckets that a handle's clones share (one daemon: every
//! connection's tables), and the epochs that tell which buckets no request scope can be using.
//!
//! Why epochs: a warm access to a lazy bucket must cost about what an access to an eager
//! region costs (one load), so a scope does not pin each bucket it touches. Instead every
//! scope over a table with lazy regions enters the current epoch when it starts and leaves it
//! when it ends (two atomic operations per scope), and stamps each bucket it touches with its
//! epoch (a store only when the stamp is older). The epoch only advances when no scope of the
//! epoch before it is left, so while a scope of epoch `e` lives the epoch stays at most
//! `e + 1`: a bucket stamped at most `epoch - 2` is in no live scope's hands and may be
//! unmapped. The evictor claims such a bucket with one compare-and-swap on its state word,
//! which a toucher's stamp (also a compare-and-swap on that word) races against, so exactly
//! one of them wins. This is epoch-based reclamation; see the lazy FOREIGN design in
//! `docs/lazy-foreign.md`.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, Weak};

/// Something holding lazily mapped buckets that the budget may ask to give some back: a lazy
/// FOREIGN region.
pub(crate) trait BucketOwner: Send + Sync + Debug {
    /// Unmaps up to `want` buckets that are not pinned and stamped at most `stamp`; returns
    /// how many. Takes no lock a mapper may hold: the budget calls it while mappers of
    /// the owner wait for room.
    fn evict(&self, stamp: u64, want: usize) -> usize;
}

/// Shared by the clones of one [`crate::XenHandle`].
#[derive(Debug)]
pub(crate) struct LazyBudget {
    /// Current epoch; starts at 2 so that `epoch - 2` never wraps.
    epoch: AtomicU64,
    /// Live scopes per epoch parity.
    readers: [AtomicUsize; 2],
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
            epoch: AtomicU64::new(2),
            readers: [AtomicUsize::new(0), AtomicUsize::new(0)],
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
    /// Enters the current epoch (a scope starts); returns it for [`LazyBudget::exit`].
    #[inline]
    pub(crate) fn enter(&self) -> u64 {
        // Under pressure, let time move on so that buckets of finished scopes become
        // evictable (two scopes later) instead of every bucket of the long current epoch
        // staying in use.
        if self.under_pressure() {
            self.try_advance();
        }
        loop {
            let e = self.epoch.load(SeqCst);
            self.readers[(e & 1) as usize].fetch_add(1, SeqCst);
            if self.epoch.load(SeqCst) == e {
                return e;
            }
            // The epoch moved between the load and the count: count in the new one.
            self.readers[(e & 1) as usize].fetch_sub(1, SeqCst);
        }
    }

    /// Leaves epoch `e` (the scope that entered it ends).
    #[inline]
    pub(crate) fn exit(&self, e: u64) {
        self.readers[(e & 1) as usize].fetch_sub(1, SeqCst);
    }

    /// Advances the epoch if no scope of the previous one is left.
    fn try_advance(&self) {
        let e = self.epoch.load(SeqCst);
        if self.readers[((e + 1) & 1) as usize].load(SeqCst) == 0 {
            let _ = self.epoch.compare_exchange(e, e + 1, SeqCst, SeqCst);
        }
    }

    fn under_pressure(&self) -> bool {
        let max = self.max.load(SeqCst);
        max != usize::MAX && self.mapped.load(SeqCst) >= max - max / 4
    }

    /// Counts `n` new buckets, evicting unused ones first if the bound would be passed.
    pub(crate) fn reserve(&self, n: usize) -> Result<(), BudgetFull> {
        loop {
            let (m, max) = (self.mapped.load(SeqCst), self.max.load(SeqCst));
            match m.checked_add(n) {
                Some(t) if t <= max => {
                    if self.mapped.compare_exchange(m, t, SeqCst, SeqCst).is_ok() {
                        return Ok(());
                    }
                }
                _ => {
                    if n > max || self.evict((m + n).saturating_sub(max)) == 0 {
                        return Err(BudgetFull { max });
                    }
                }
            }
        }
    }

    /// Gives back `n` buckets' worth (unmapped, or reserved and not mapped).
    pub(crate) fn release(&self, n: usize) {
        self.mapped.fetch_sub(n, SeqCst);
    }

    /// Unmaps up to `want` buckets no live scope can be using; returns how many.
    fn evict(&self, want: usize) -> usize {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        self.try_advance();
        let stamp = self.epoch.load(SeqCst) - 2;
        owners.list.retain(|w| w.strong_count() > 0);
        let n = owners.list.len();
        let mut got = 0;
        for i in 0..n {
            let at = (owners.hand + i) % n;
            if let Some(o) = owners.list[at].upgrade() {
                got += o.evict(stamp, want - got);
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

    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, SeqCst);
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

/// A scope's stay in an epoch: entered when made, left when dropped.
#[derive(Debug)]
pub(crate) struct EpochGuard<'a> {
    budget: &'a LazyBudget,
    epoch: u64,
}

impl<'a> EpochGuard<'a> {
    pub(crate) fn enter(budget: &'a LazyBudget) -> Self {
        EpochGuard {
            epoch: budget.enter(),
            budget,
        }
    }

    /// The epoch this scope stamps the buckets it touches with.
    #[inline]
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl Drop for EpochGuard<'_> {
    fn drop(&mut self) {
        self.budget.exit(self.epoch);
    }
}
