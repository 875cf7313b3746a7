//! The memory a worker reads and writes a vring through.
//!
//! Rings live in regions mapped in advance, reached through the plain table, or in lazily
//! mapped FOREIGN regions, whose buckets only a request scope reaches (the plain table never
//! dereferences a lazy region; the handler pins ring buckets at `SET_VRING_ADDR` so that they
//! are never evicted). A scope costs little there (its list of holds), so it is used only for
//! tables with lazy regions: over a table with on-demand grants a scope would take the slower
//! collected-slices path for every ring access.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Error, Queue, QueueT};

use crate::request::RequestMemory;
use crate::table::RegionTable;

/// The plain table, or a scope over it.
#[derive(Debug)]
pub(crate) enum RingMem<'a> {
    Table(&'a RegionTable),
    Scope(RequestMemory<'a>),
}

impl<'a> RingMem<'a> {
    /// The ring memory of `table`.
    pub(crate) fn of(table: &'a RegionTable) -> Self {
        if table.has_lazy() {
            RingMem::Scope(RequestMemory::new(table))
        } else {
            RingMem::Table(table)
        }
    }

    pub(crate) fn add_used(&self, q: &mut Queue, head: u16, len: u32) -> Result<(), Error> {
        match self {
            RingMem::Table(t) => q.add_used(*t, head, len),
            RingMem::Scope(s) => q.add_used(s, head, len),
        }
    }

    pub(crate) fn needs_notification(&self, q: &mut Queue) -> Result<bool, Error> {
        match self {
            RingMem::Table(t) => q.needs_notification(*t),
            RingMem::Scope(s) => q.needs_notification(s),
        }
    }

    pub(crate) fn enable_notification(&self, q: &mut Queue) -> Result<bool, Error> {
        match self {
            RingMem::Table(t) => q.enable_notification(*t),
            RingMem::Scope(s) => q.enable_notification(s),
        }
    }

    pub(crate) fn disable_notification(&self, q: &mut Queue) -> Result<(), Error> {
        match self {
            RingMem::Table(t) => q.disable_notification(*t),
            RingMem::Scope(s) => q.disable_notification(s),
        }
    }

    pub(crate) fn used_idx(&self, q: &Queue) -> Result<Wrapping<u16>, Error> {
        match self {
            RingMem::Table(t) => q.used_idx(*t, Ordering::Acquire),
            RingMem::Scope(s) => q.used_idx(s, Ordering::Acquire),
        }
    }
}
