//! The region table: the guest memory map, sorted and non-overlapping, implementing
//! vm-memory's `GuestMemoryBackend` (and so `GuestMemory` and `Bytes`).
//!
//! Tables are immutable; `ADD_MEM_REG` / `REM_MEM_REG` build a new table sharing the untouched
//! regions (`Arc`), which the daemon swaps in (e.g. with `GuestMemoryAtomic`) so readers never
//! block. On-demand grant regions are in the table but have no mapping: a plain-table access
//! to them returns [`crate::region::OnDemandAccess`] inside `GuestMemoryError::IOError`.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::descriptor::{RegionDescriptor, RegionKind};
use crate::device::XenHandle;
use crate::region::XenRegion;

/// The handle of a Xen region (UNIX regions may carry one, unused).
fn xen_handle(r: &XenRegion) -> Option<&XenHandle> {
    match r.descriptor().kind {
        RegionKind::Unix => None,
        _ => r.device(),
    }
}

/// `so_far` in-advance grant pages plus `desc`'s, refused as
/// [`TableError::InAdvanceGrantPages`] past
/// [`MAX_IN_ADVANCE_GRANT_PAGES_TOTAL`](crate::descriptor::MAX_IN_ADVANCE_GRANT_PAGES_TOTAL):
/// the running check of a whole `SET_MEM_TABLE`, before anything is mapped.
pub fn add_in_advance_pages(so_far: u64, desc: &RegionDescriptor) -> Result<u64, TableError> {
    let max = crate::descriptor::MAX_IN_ADVANCE_GRANT_PAGES_TOTAL;
    let pages = desc.in_advance_grant_pages();
    if pages == 0 {
        return Ok(so_far);
    }
    let total = so_far.saturating_add(pages);
    if total > max {
        return Err(TableError::InAdvanceGrantPages {
            gpa: desc.guest_phys_addr,
            pages,
            total,
            max,
        });
    }
    Ok(total)
}

/// Why a table could not be built or changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    /// Two regions share guest addresses.
    #[error("region gpa {gpa:#x} size {size:#x} overlaps region gpa {other_gpa:#x} size {other_size:#x}")]
    Overlap {
        /// The new region.
        gpa: u64,
        /// Its size.
        size: u64,
        /// The region already there.
        other_gpa: u64,
        /// Its size.
        other_size: u64,
    },
    /// A Xen region on another device handle than the table's other Xen regions: a request
    /// scope fetches and releases all its pages through one handle, and the counters of one
    /// handle count the whole table.
    #[error("Xen region at gpa {gpa:#x} uses another device handle than the table's Xen regions")]
    OtherDevice {
        /// The new region.
        gpa: u64,
    },
    /// The in-advance grant regions would together map more pages than a table may.
    #[error(
        "in-advance grant region at gpa {gpa:#x} ({pages} pages) would bring the table's \
         in-advance grant pages to {total}, limit {max}"
    )]
    InAdvanceGrantPages {
        /// The new region.
        gpa: u64,
        /// Its pages.
        pages: u64,
        /// The table's in-advance grant pages with it.
        total: u64,
        /// The limit ([`crate::descriptor::MAX_IN_ADVANCE_GRANT_PAGES_TOTAL`]).
        max: u64,
    },
    /// `REM_MEM_REG` named a region that is not in the table.
    #[error("no region at gpa {gpa:#x} size {size:#x}")]
    NotFound {
        /// Gpa asked for.
        gpa: u64,
        /// Size asked for.
        size: u64,
    },
    /// `REM_MEM_REG` named a region's guest address and size but another user address: the
    /// spec identifies a region by all three, so it is not removed.
    #[error(
        "region at gpa {gpa:#x} size {size:#x} has user address {region_uaddr:#x}, not {uaddr:#x}"
    )]
    UserAddrMismatch {
        /// Gpa asked for.
        gpa: u64,
        /// Size asked for.
        size: u64,
        /// User address asked for.
        uaddr: u64,
        /// User address of the region at that gpa and size.
        region_uaddr: u64,
    },
}

/// The guest memory map. Cheap to clone (regions are shared).
#[derive(Clone, Debug, Default)]
pub struct RegionTable {
    regions: Vec<Arc<XenRegion>>,
    /// `(first, last)` guest address of each region, in the same order: the lookup searches
    /// this flat list instead of dereferencing each region's separate allocation.
    /// Followed by [`SENTINELS`] entries starting at `u64::MAX`, so a lookup can always read
    /// the two spans after a candidate.
    spans: Vec<(u64, u64)>,
    /// Narrows the search in tables of many regions.
    buckets: Buckets,
    /// Whether any region is an on-demand grant region (the kind a request scope keeps state
    /// for).
    on_demand: bool,
    /// Whether any region is a lazily mapped FOREIGN region.
    lazy: bool,
    /// Whether a request scope must hold the lazy buckets it touches: lazy regions on a
    /// handle with a bound (which cannot change while they exist).
    lazy_holds: bool,
}

impl RegionTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The table of `regions`, already sorted, non-overlapping and on one device.
    fn build(regions: Vec<Arc<XenRegion>>) -> Self {
        let mut spans: Vec<(u64, u64)> = Vec::with_capacity(regions.len() + SENTINELS);
        spans.extend(
            regions
                .iter()
                .map(|r| (r.descriptor().guest_phys_addr, r.descriptor().last_addr())),
        );
        let buckets = Buckets::new(&spans);
        spans.extend([(u64::MAX, 0); SENTINELS]);
        let on_demand = regions.iter().any(|r| r.on_demand_domid().is_some());
        let lazy = regions.iter().any(|r| r.is_lazy_foreign());
        let lazy_holds = lazy
            && regions
                .iter()
                .find_map(|r| xen_handle(r))
                .is_some_and(|d| d.budget().bounded());
        RegionTable {
            regions,
            spans,
            buckets,
            on_demand,
            lazy,
            lazy_holds,
        }
    }

    /// A table of `regions`, which must not overlap. Sorts once and builds once (O(n log n));
    /// when the regions overlap, mix devices or map too many in-advance grant pages, the error
    /// is the one inserting them one by
    /// one in the given order reports ([`RegionTable::insert`]).
    pub fn from_regions(regions: Vec<XenRegion>) -> Result<Self, TableError> {
        let input: Vec<Arc<XenRegion>> = regions.into_iter().map(Arc::new).collect();
        let disjoint = |rs: &[Arc<XenRegion>]| {
            rs.windows(2)
                .all(|w| w[0].descriptor().last_addr() < w[1].descriptor().guest_phys_addr)
        };
        let mut devices = input.iter().filter_map(|r| xen_handle(r));
        let one_device = devices
            .next()
            .is_none_or(|first| devices.all(|d| d.same_device(first)));
        let in_advance: u64 = input
            .iter()
            .map(|r| r.descriptor().in_advance_grant_pages())
            .sum();
        let ok = one_device && in_advance <= crate::descriptor::MAX_IN_ADVANCE_GRANT_PAGES_TOTAL;
        // Given sorted (as a frontend sends them, or a table's own list): built as given.
        if ok && disjoint(&input) {
            return Ok(Self::build(input));
        }
        let mut sorted = input.clone();
        sorted.sort_by_key(|r| r.descriptor().guest_phys_addr);
        if ok && disjoint(&sorted) {
            drop(input);
            return Ok(Self::build(sorted));
        }
        drop(sorted);
        input
            .into_iter()
            .try_fold(RegionTable::new(), |t, r| t.insert(r))
    }

    /// Whether any region is an on-demand grant region. A request scope over a table without
    /// one keeps no state: no system call, no allocation, no per-thread state (lazily mapped
    /// FOREIGN regions only make it keep a list of the buckets it holds, see [`RegionTable::has_lazy`]).
    #[inline]
    pub fn has_on_demand(&self) -> bool {
        self.on_demand
    }

    /// Whether a request scope over this table holds the lazy buckets it touches.
    #[inline]
    pub(crate) fn lazy_holds(&self) -> bool {
        self.lazy_holds
    }

    /// The region holding `addr`, shared (to keep it alive beyond the table, e.g. for
    /// [`XenRegion::pin_lazy`]).
    pub fn region_at(&self, addr: GuestAddress) -> Option<&Arc<XenRegion>> {
        self.regions.get(self.index_of(addr.0)?)
    }

    /// Whether any region is a lazily mapped FOREIGN region ([`crate::ForeignMapping::Lazy`]):
    /// only request scopes (and pinned ring buckets) reach its bytes.
    #[inline]
    pub fn has_lazy(&self) -> bool {
        self.lazy
    }

    /// Whether some of the guest's memory is reached only through request scopes (an
    /// on-demand grant or a lazily mapped FOREIGN region): the one case where a request's
    /// memory costs anything to fetch or holds pages.
    #[inline]
    pub(crate) fn has_scoped_memory(&self) -> bool {
        self.on_demand || self.lazy
    }

    /// A new table with `region` added (hot add). Refused when it overlaps a region
    /// ([`TableError::Overlap`]) or when it is a Xen region on another device handle than the
    /// table's Xen regions ([`TableError::OtherDevice`]; see [`XenHandle::same_device`]).
    pub fn insert(&self, region: Arc<XenRegion>) -> Result<Self, TableError> {
        let d = *region.descriptor();
        self.check_in_advance_room(&d)?;
        let pos = self
            .regions
            .partition_point(|r| r.descriptor().guest_phys_addr < d.guest_phys_addr);
        let overlaps = |o: &Arc<XenRegion>| {
            let od = o.descriptor();
            od.guest_phys_addr <= d.last_addr() && d.guest_phys_addr <= od.last_addr()
        };
        for o in [pos.checked_sub(1), Some(pos)]
            .into_iter()
            .flatten()
            .filter_map(|i| self.regions.get(i))
        {
            if overlaps(o) {
                return Err(TableError::Overlap {
                    gpa: d.guest_phys_addr,
                    size: d.size,
                    other_gpa: o.descriptor().guest_phys_addr,
                    other_size: o.descriptor().size,
                });
            }
        }
        if let (Some(new), Some(have)) = (xen_handle(&region), self.xen_device()) {
            if !new.same_device(have) {
                return Err(TableError::OtherDevice {
                    gpa: d.guest_phys_addr,
                });
            }
        }
        let mut regions = self.regions.clone();
        regions.insert(pos, region);
        Ok(Self::build(regions))
    }

    /// Grant pages all in-advance grant regions of the table map.
    pub fn in_advance_grant_pages(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.descriptor().in_advance_grant_pages())
            .sum()
    }

    /// Refuses `desc` when adding it would take the table's in-advance grant pages past
    /// [`MAX_IN_ADVANCE_GRANT_PAGES_TOTAL`](crate::descriptor::MAX_IN_ADVANCE_GRANT_PAGES_TOTAL)
    /// ([`TableError::InAdvanceGrantPages`]). The daemon asks before mapping the region;
    /// [`RegionTable::insert`] checks again.
    pub fn check_in_advance_room(&self, desc: &RegionDescriptor) -> Result<(), TableError> {
        add_in_advance_pages(self.in_advance_grant_pages(), desc).map(|_| ())
    }

    /// A new table without the region at exactly `gpa`/`size` (hot remove), and that region.
    /// Its mapping goes away when the last table holding it is dropped.
    pub fn remove(&self, gpa: u64, size: u64) -> Result<(Self, Arc<XenRegion>), TableError> {
        let i = self
            .regions
            .iter()
            .position(|r| r.descriptor().guest_phys_addr == gpa && r.descriptor().size == size)
            .ok_or(TableError::NotFound { gpa, size })?;
        let mut regions = self.regions.clone();
        let r = regions.remove(i);
        Ok((Self::build(regions), r))
    }

    /// [`RegionTable::remove`] for `REM_MEM_REG`: the region must also have `userspace_addr`
    /// `uaddr` (the spec names a region by guest address, user address and size, as
    /// libvhost-user checks); otherwise [`TableError::UserAddrMismatch`] and the region stays.
    pub fn remove_exact(
        &self,
        gpa: u64,
        size: u64,
        uaddr: u64,
    ) -> Result<(Self, Arc<XenRegion>), TableError> {
        let found = self
            .regions
            .iter()
            .find(|r| r.descriptor().guest_phys_addr == gpa && r.descriptor().size == size)
            .ok_or(TableError::NotFound { gpa, size })?;
        let region_uaddr = found.descriptor().userspace_addr;
        if region_uaddr != uaddr {
            return Err(TableError::UserAddrMismatch {
                gpa,
                size,
                uaddr,
                region_uaddr,
            });
        }
        self.remove(gpa, size)
    }

    /// Translates a frontend virtual address (as in `SET_VRING_ADDR`) to a guest address,
    /// through the regions' `userspace_addr`. An on-demand grant region whose `userspace_addr`
    /// is 0 (the frontend has no mapping of it) never matches; one with a nonzero
    /// `userspace_addr` translates like any other region.
    pub fn uaddr_to_gpa(&self, uaddr: u64) -> Option<GuestAddress> {
        self.regions.iter().find_map(|r| {
            let d = r.descriptor();
            if d.userspace_addr == 0 && r.on_demand_domid().is_some() {
                return None;
            }
            let off = uaddr.checked_sub(d.userspace_addr)?;
            (off < d.size).then(|| GuestAddress(d.guest_phys_addr + off))
        })
    }

    /// True when regions cover `[addr, addr + len)` without a gap (mapped or on demand).
    #[inline]
    pub fn covers(&self, addr: GuestAddress, len: usize) -> bool {
        let mut cur = addr.0;
        let mut left = len as u64;
        while left > 0 {
            let Some(r) = self.find_region(GuestAddress(cur)) else {
                return false;
            };
            let n = (r.last_addr().0 - cur).saturating_add(1).min(left);
            left -= n;
            match cur.checked_add(n) {
                Some(c) => cur = c,
                None => return left == 0,
            }
        }
        true
    }

    /// The device handle of the table's Xen (FOREIGN or GRANT) regions: [`RegionTable::insert`]
    /// refuses a Xen region on another handle, so they all share one. None when the table has
    /// no Xen region.
    pub fn xen_device(&self) -> Option<&XenHandle> {
        self.regions.iter().find_map(|r| xen_handle(r))
    }

    /// The regions, sorted by guest address.
    pub fn regions(&self) -> &[Arc<XenRegion>] {
        &self.regions
    }
}

impl RegionTable {
    /// Index of the region holding `addr`.
    #[inline]
    fn index_of(&self, addr: u64) -> Option<usize> {
        let n = self.regions.len();
        let (lo, hi) = self.buckets.range(addr, n);
        // The last candidate starting at or before `addr`.
        let i = if self.buckets.is_empty() && n <= 4 {
            // A small table (one to four regions, as most frontends send): stepped through;
            // its accesses go to a few regions in patterns the branch predictor learns.
            let mut i = lo;
            while i + 1 < hi
                && self
                    .spans
                    .get(i + 1)
                    .is_some_and(|&(first, _)| first <= addr)
            {
                i += 1;
            }
            i
        } else if hi - lo <= 3 {
            // A bucket leaves one to three candidates: counted without a branch, as the two
            // spans after `lo` that start at or before `addr` (spans past `hi` start past
            // `addr`; the sentinels past the last region never do). A branch here mispredicted
            // on every other access spread over many regions.
            let starts = |j: usize| self.spans.get(j).is_some_and(|&(first, _)| first <= addr);
            lo + usize::from(starts(lo + 1)) + usize::from(starts(lo + 2))
        } else {
            // Skewed buckets, tables of 5 to 8 regions.
            lo + self
                .spans
                .get(lo..hi)?
                .partition_point(|&(first, _)| first <= addr)
                .checked_sub(1)?
        };
        let &(first, last) = self.spans.get(i)?;
        (i < n && first <= addr && addr <= last).then_some(i)
    }
}

/// Entries past the last span (see `RegionTable::spans`).
const SENTINELS: usize = 2;

/// Tables of more than this many regions get [`Buckets`]; smaller ones are searched whole.
const BUCKETS_FROM: usize = 8;

/// Splits the guest addresses a table spans into equal power-of-two buckets (about two per
/// region) and records, for each bucket boundary, which region holds (or precedes) it: an
/// address's region is then among the few between its bucket's two boundaries, so a lookup
/// in 509 regions costs about what it costs in 2 instead of a 9-step binary search. Skewed
/// tables (many small regions in one bucket) fall back to a binary search within the bucket.
#[derive(Clone, Debug, Default)]
struct Buckets {
    /// Address of bucket 0.
    base: u64,
    /// log2 of the bucket size.
    shift: u32,
    /// For each boundary `b` (address `base + (b << shift)`), the index of the last region
    /// starting at or before it (0 if none); one more entry than there are buckets. Empty for
    /// small tables.
    first: Vec<u32>,
}

impl Buckets {
    fn new(spans: &[(u64, u64)]) -> Self {
        let (Some(&(base, _)), Some(&(_, end))) = (spans.first(), spans.last()) else {
            return Buckets::default();
        };
        if spans.len() <= BUCKETS_FROM || u32::try_from(spans.len()).is_err() {
            return Buckets::default();
        }
        let span = end - base;
        let want = (2 * spans.len()).next_power_of_two().trailing_zeros();
        let bits = u64::BITS - span.leading_zeros();
        let shift = bits.saturating_sub(want);
        let buckets = (span >> shift) as usize + 1;
        // Boundaries rise with `b`, so one sweep finds them all (as a partition point each).
        let mut p = 0;
        let first = (0..=buckets)
            .map(|b| {
                let at = base.saturating_add((b as u64) << shift);
                while spans.get(p).is_some_and(|&(first, _)| first <= at) {
                    p += 1;
                }
                p.saturating_sub(1) as u32
            })
            .collect();
        Buckets { base, shift, first }
    }

    /// Whether the table is small enough to go without buckets.
    #[inline]
    fn is_empty(&self) -> bool {
        self.first.is_empty()
    }

    /// The index range of `spans` (of `len` regions) that can hold `addr`.
    #[inline]
    fn range(&self, addr: u64, len: usize) -> (usize, usize) {
        let b = (addr.wrapping_sub(self.base) >> self.shift) as usize;
        match (self.first.get(b), self.first.get(b.wrapping_add(1))) {
            (Some(&lo), Some(&hi)) => (lo as usize, (hi as usize + 1).min(len)),
            _ => (0, len),
        }
    }
}

impl GuestMemoryBackend for RegionTable {
    type R = XenRegion;

    #[inline]
    fn num_regions(&self) -> usize {
        self.regions.len()
    }

    #[inline]
    fn find_region(&self, addr: GuestAddress) -> Option<&XenRegion> {
        let i = self.index_of(addr.0)?;
        self.regions.get(i).map(|r| &**r)
    }

    /// Not `#[inline]` on purpose: vm-memory's slice iterator calls this once per slice, and
    /// kept as a call it leaves that iterator small enough for the compiler to inline the
    /// whole access path into its caller (as it does for `GuestMemoryMmap`); inlined here it
    /// did not, and every 8-byte access paid four calls (measured: 33 ns against 7).
    fn to_region_addr(&self, addr: GuestAddress) -> Option<(&XenRegion, MemoryRegionAddress)> {
        let i = self.index_of(addr.0)?;
        let &(first, _) = self.spans.get(i)?;
        let r = self.regions.get(i)?;
        Some((&**r, MemoryRegionAddress(addr.0 - first)))
    }

    #[inline]
    fn iter(&self) -> impl Iterator<Item = &XenRegion> {
        self.regions.iter().map(|r| &**r)
    }
}
