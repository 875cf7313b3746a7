//! Counts of device calls: exact syscall figures on a noisy machine, and leak checks.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Live counters, shared by every user of one [`super::XenHandle`].
#[derive(Debug, Default)]
pub struct Counters {
    ioctls: AtomicU64,
    mmaps: AtomicU64,
    munmaps: AtomicU64,
    grant_copies: AtomicU64,
    copy_segments: AtomicU64,
    pages_mapped: AtomicU64,
    errors: AtomicU64,
    plain_table_refusals: AtomicU64,
    live_mappings: AtomicI64,
}

/// A copy of the counters at one moment; subtract two to measure a stretch of work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// ioctl calls (map/unmap grant refs, MMAPBATCH, grant copy included).
    pub ioctls: u64,
    /// mmap calls.
    pub mmaps: u64,
    /// munmap calls.
    pub munmaps: u64,
    /// Grant-copy ioctls (also counted in `ioctls`).
    pub grant_copies: u64,
    /// Segments in those ioctls (each costs the hypervisor a page lookup and a copy).
    pub copy_segments: u64,
    /// Xen pages mapped by successful mmaps.
    pub pages_mapped: u64,
    /// Failed calls.
    pub errors: u64,
    /// Accesses to on-demand (or lazily mapped) memory through the plain
    /// [`RegionTable`](crate::RegionTable) instead of a request scope, refused. virtio-queue
    /// turns such a refused descriptor read into a chain that silently ends; this count (and
    /// the daemon's log of the first per connection) makes it visible.
    pub plain_table_refusals: u64,
    /// Mappings made and not yet unmapped.
    pub live_mappings: i64,
}

impl CounterSnapshot {
    /// System calls: ioctls + mmaps + munmaps.
    pub fn syscalls(&self) -> u64 {
        self.ioctls + self.mmaps + self.munmaps
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        CounterSnapshot {
            ioctls: self.ioctls - earlier.ioctls,
            mmaps: self.mmaps - earlier.mmaps,
            munmaps: self.munmaps - earlier.munmaps,
            grant_copies: self.grant_copies - earlier.grant_copies,
            copy_segments: self.copy_segments - earlier.copy_segments,
            pages_mapped: self.pages_mapped - earlier.pages_mapped,
            errors: self.errors - earlier.errors,
            plain_table_refusals: self.plain_table_refusals - earlier.plain_table_refusals,
            live_mappings: self.live_mappings - earlier.live_mappings,
        }
    }
}

impl Counters {
    /// Reads all counters.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            ioctls: self.ioctls.load(Relaxed),
            mmaps: self.mmaps.load(Relaxed),
            munmaps: self.munmaps.load(Relaxed),
            grant_copies: self.grant_copies.load(Relaxed),
            copy_segments: self.copy_segments.load(Relaxed),
            pages_mapped: self.pages_mapped.load(Relaxed),
            errors: self.errors.load(Relaxed),
            plain_table_refusals: self.plain_table_refusals.load(Relaxed),
            live_mappings: self.live_mappings.load(Relaxed),
        }
    }

    /// See [`CounterSnapshot::plain_table_refusals`].
    pub fn plain_table_refusals(&self) -> u64 {
        self.plain_table_refusals.load(Relaxed)
    }

    /// Mappings made through this device and not yet unmapped.
    pub fn live_mappings(&self) -> i64 {
        self.live_mappings.load(Relaxed)
    }

    pub(crate) fn add_ioctl(&self) {
        self.ioctls.fetch_add(1, Relaxed);
    }
    pub(crate) fn add_mmap(&self) {
        self.mmaps.fetch_add(1, Relaxed);
    }
    pub(crate) fn add_munmap(&self) {
        self.munmaps.fetch_add(1, Relaxed);
    }
    pub(crate) fn add_grant_copy(&self, segments: usize) {
        self.ioctls.fetch_add(1, Relaxed);
        self.grant_copies.fetch_add(1, Relaxed);
        self.copy_segments.fetch_add(segments as u64, Relaxed);
    }
    pub(crate) fn add_error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }
    /// Counts an error found above the device (a failed segment, a refused access).
    pub(crate) fn add_errors(&self, n: u64) {
        self.errors.fetch_add(n, Relaxed);
    }
    pub(crate) fn add_plain_table_refusal(&self) {
        self.plain_table_refusals.fetch_add(1, Relaxed);
    }
    pub(crate) fn mapped(&self, pages: usize) {
        self.pages_mapped.fetch_add(pages as u64, Relaxed);
        self.live_mappings.fetch_add(1, Relaxed);
    }
    pub(crate) fn unmapped(&self) {
        self.live_mappings.fetch_sub(1, Relaxed);
    }
}
