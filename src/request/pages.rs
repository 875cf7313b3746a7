//! Per-page bookkeeping of a request scope: which on-demand grant pages it holds, as a bounce
//! buffer or as mappings, and which bytes are valid or dirty.

use std::alloc::Layout;
use std::ptr::NonNull;

use crate::xen_page::XEN_PAGE_SIZE;

use crate::device::GrantPage;

/// Hash maps keyed by grant page. SipHash was a third of the grant-copy path's instructions;
/// this hasher is a murmur3 finaliser over the key, seeded once per process so that a guest
/// choosing refs cannot predict collisions.
pub(crate) type KeyMap<V> = std::collections::HashMap<GrantPage, V, BuildKeyHasher>;
/// Sets of grant pages; see [`KeyMap`].
pub(crate) type KeySet = std::collections::HashSet<GrantPage, BuildKeyHasher>;

/// Builds [`KeyHasher`]s with the process's seed.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BuildKeyHasher;

impl std::hash::BuildHasher for BuildKeyHasher {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let seed = *SEED
            .get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64));
        KeyHasher(seed)
    }
}

/// See [`KeyMap`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        // murmur3's fmix64.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u16(&mut self, n: u16) {
        self.0 = self.0.rotate_left(16) ^ u64::from(n);
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = self.0.rotate_left(32) ^ u64::from(n);
    }
}

/// A half-open byte range inside one page, `lo..hi`; empty when `lo >= hi`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Span {
    pub lo: u16,
    pub hi: u16,
}

impl Span {
    pub(crate) fn new(lo: usize, hi: usize) -> Self {
        // Callers pass in-page offsets (<= 4096), which fit in u16.
        Span {
            lo: lo as u16,
            hi: hi as u16,
        }
    }
    pub(crate) fn is_empty(self) -> bool {
        self.lo >= self.hi
    }
    pub(crate) fn len(self) -> usize {
        usize::from(self.hi.saturating_sub(self.lo))
    }
    /// Smallest span covering both.
    pub(crate) fn hull(self, other: Span) -> Span {
        if self.is_empty() {
            return other;
        }
        if other.is_empty() {
            return self;
        }
        Span {
            lo: self.lo.min(other.lo),
            hi: self.hi.max(other.hi),
        }
    }
    /// The bytes in both.
    pub(crate) fn intersect(self, other: Span) -> Span {
        Span {
            lo: self.lo.max(other.lo),
            hi: self.hi.min(other.hi),
        }
    }
    /// The parts of `self` not covered by `have` (at most two).
    pub(crate) fn minus(self, have: Span) -> [Span; 2] {
        if have.is_empty() {
            return [self, Span::default()];
        }
        [
            Span {
                lo: self.lo,
                hi: self.hi.min(have.lo),
            },
            Span {
                lo: self.lo.max(have.hi),
                hi: self.hi,
            },
        ]
    }
}

/// A page held as a bounce buffer (grant copy).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounce {
    /// Start of this page's 4 KiB in a bounce allocation.
    pub buf: NonNull<u8>,
    /// Bytes copied in from the guest.
    pub valid: Span,
    /// Bytes the device wrote; copied back when the scope ends (see `request::writeback`).
    pub dirty: super::writeback::Dirty,
    /// Whether the grant accepts writes: unknown until probed.
    pub writable: Option<bool>,
    /// During one fetch: the valid span once the planned copy-ins land.
    pub pending: Option<Span>,
    /// During one fetch: a writability probe is planned.
    pub probing: bool,
    /// During one fetch: a copy-in failed.
    pub failed: bool,
    /// Xen's status of a failed copy-in of this page (`GNTST_OKAY` while none failed): the
    /// page fails again at once, without a device call (see `access::ScopeState::fetch`).
    pub bad: i16,
}

impl Bounce {
    /// A bounce page at `buf` with nothing valid yet.
    pub(crate) fn new(buf: NonNull<u8>) -> Self {
        Bounce {
            buf,
            valid: Span::default(),
            dirty: super::writeback::Dirty::default(),
            writable: None,
            pending: None,
            probing: false,
            failed: false,
            bad: crate::device::GNTST_OKAY,
        }
    }
}

/// What a scope holds of one grant page. A page is bounced (`bounce`) or mapped (`ro`, `rw`,
/// and the refusals), never both: a slot without a bounce buffer is a mapped page's.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PageSlot {
    pub bounce: Option<Bounce>,
    /// Read-only mapping of the page.
    pub ro: Option<NonNull<u8>>,
    /// Writable mapping of the page.
    pub rw: Option<NonNull<u8>>,
    /// A read-only map of the page failed at a touch: later touches fail at once.
    pub ro_refused: Option<MapRefusal>,
    /// A writable map of the page failed at a touch: later touches fail at once.
    pub rw_refused: Option<MapRefusal>,
}

impl PageSlot {
    /// True once the page is represented by mappings (so it must never be bounced too).
    pub(crate) fn is_mapped(&self) -> bool {
        self.ro.is_some() || self.rw.is_some()
    }

    /// The refusal remembered for a map with this protection (`write`: writable).
    pub(crate) fn refused(&self, write: bool) -> Option<MapRefusal> {
        if write {
            self.rw_refused
        } else {
            self.ro_refused
        }
    }
}

/// Why a map of one page failed, remembered for the rest of the scope so that a guest cannot
/// make every touch of a bad page cost map attempts (as a failed copy-in is, by `Bounce::bad`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapRefusal {
    /// The grant is read-only and the access writes.
    ReadOnly,
    /// The map failed with this call and errno.
    Failed {
        /// Which device call.
        call: &'static str,
        /// Its errno.
        errno: i32,
    },
}

impl MapRefusal {
    /// The refusal worth remembering for `e`: not one that may pass (EAGAIN, EINTR, ENOMEM)
    /// or has no errno.
    pub(crate) fn of(e: &crate::device::DeviceError) -> Option<Self> {
        let crate::device::DeviceError::Syscall { call, .. } = e else {
            return None;
        };
        match e.errno()? {
            libc::EAGAIN | libc::EINTR | libc::ENOMEM => None,
            errno => Some(MapRefusal::Failed { call, errno }),
        }
    }
}

/// One page of bounce memory, page aligned, taken from a per-thread pool and given back when
/// dropped: a scope of a 64-request batch needs ~200 pages, and fresh allocations of that size
/// come from `mmap` and page faults every time. Raw memory (not a `Box`) because slices handed
/// to the device alias it for the scope's whole life. Its bytes are never read before being
/// copied in from the guest, so it is not zeroed.
#[derive(Debug)]
pub(crate) struct BouncePage(NonNull<u8>);

/// Pages kept per thread for reuse (16 MiB).
const POOL_PAGES: usize = 4096;

/// Free bounce pages of one thread; freed for real when the thread exits.
struct Pool(Vec<NonNull<u8>>);

impl Drop for Pool {
    fn drop(&mut self) {
        for p in self.0.drain(..) {
            // SAFETY: every pooled page was allocated with `page_layout()` and is owned by the
            // pool alone.
            unsafe { std::alloc::dealloc(p.as_ptr(), page_layout()) };
        }
    }
}

thread_local! {
    static POOL: std::cell::RefCell<Pool> = const { std::cell::RefCell::new(Pool(Vec::new())) };
}

fn page_layout() -> Layout {
    // XEN_PAGE_SIZE is a nonzero power of two.
    Layout::from_size_align(XEN_PAGE_SIZE, XEN_PAGE_SIZE)
        .unwrap_or(Layout::new::<[u8; XEN_PAGE_SIZE]>())
}

impl BouncePage {
    /// A page from the pool, or freshly allocated; `None` when memory is exhausted.
    pub(crate) fn take() -> Option<Self> {
        if let Some(p) = POOL
            .try_with(|pool| pool.borrow_mut().0.pop())
            .ok()
            .flatten()
        {
            return Some(BouncePage(p));
        }
        // SAFETY: the layout has nonzero size.
        NonNull::new(unsafe { std::alloc::alloc(page_layout()) }).map(BouncePage)
    }

    /// Start of the page.
    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.0
    }
}

impl Drop for BouncePage {
    fn drop(&mut self) {
        let p = self.0;
        let kept = POOL
            .try_with(|pool| {
                let mut pool = pool.borrow_mut();
                (pool.0.len() < POOL_PAGES)
                    .then(|| pool.0.push(p))
                    .is_some()
            })
            .unwrap_or(false);
        if !kept {
            // SAFETY: allocated with this layout in `take` (or pooled after that); freed once.
            unsafe { std::alloc::dealloc(p.as_ptr(), page_layout()) };
        }
    }
}

/// A gntdev mapping owned by a scope.
#[derive(Debug)]
pub(crate) struct LiveMap {
    pub base: NonNull<u8>,
    pub index: u64,
    pub pages: usize,
}

#[cfg(test)]
mod tests {
    use super::Span;

    #[test]
    fn span_algebra() {
        let a = Span::new(10, 20);
        assert_eq!(a.hull(Span::new(30, 40)), Span::new(10, 40));
        assert_eq!(
            Span::new(0, 40).minus(a),
            [Span::new(0, 10), Span::new(20, 40)]
        );
        assert!(Span::new(12, 18).minus(a).iter().all(|s| s.is_empty()));
        assert_eq!(a.intersect(Span::new(15, 40)), Span::new(15, 20));
        assert!(a.intersect(Span::new(30, 40)).is_empty());
    }
}
