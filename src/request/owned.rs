//! A request scope that owns its table snapshot: for a request that outlives the batch it was
//! popped in (a device that completes it later, maybe on another thread). See
//! `docs/waiting-requests.md`.

use std::mem::ManuallyDrop;
use std::sync::Arc;

use super::{RequestError, RequestMemory, Strategy, WritableBuffers};
use crate::table::RegionTable;

/// A [`RequestMemory`] over an `Arc<RegionTable>` it keeps alive (the snapshot of the guest's
/// memory at the time the request was popped; a hot REM_MEM_REG swaps in a new table and
/// this one stays until the request ends). `Send`, so it can go wherever the request goes.
///
/// It starts empty: pages are fetched on touch (or by [`RequestMemory::prefetch`]) and
/// released by [`OwnedRequestMemory::finish`] or drop, as for any scope.
#[derive(Debug)]
pub struct OwnedRequestMemory {
    // Dropped before `table` (see `Drop`): it borrows the table the Arc holds.
    scope: ManuallyDrop<RequestMemory<'static>>,
    table: Arc<RegionTable>,
}

// SAFETY: the scope's state is not `Send` only because of raw pointers: bounce pages and gntdev
// mappings the scope owns alone, and holds on lazy buckets of `LazyForeign`s, which are
// `Sync`, owned by regions this scope's `Arc<RegionTable>` keeps alive. None is tied to a
// thread: the per-thread pools scopes draw from are caches, and memory taken on one thread is
// freed or pooled on another by the global allocator. `RegionTable` is `Sync`, so the
// scope's `&RegionTable` may move too. Not `Sync`: the state is a `RefCell`.
unsafe impl Send for OwnedRequestMemory {}

impl OwnedRequestMemory {
    /// An empty scope over `table`.
    pub fn new(table: Arc<RegionTable>, strategy: Strategy, writable: WritableBuffers) -> Self {
        // SAFETY: the reference points into the Arc's heap allocation, which does not move
        // and lives as long as `self.table`; `scope` is dropped first (`Drop` below) and is
        // lent out only for borrows of `self` (`memory`), `RequestMemory` being covariant in
        // its table lifetime, and its `table()` borrowing the scope; so no use of the
        // reference outlives the Arc.
        let t: &'static RegionTable = unsafe { &*Arc::as_ptr(&table) };
        let scope = RequestMemory::with_strategy(t, strategy).writable_buffers(writable);
        OwnedRequestMemory {
            scope: ManuallyDrop::new(scope),
            table,
        }
    }

    /// The scope, for as long as this borrow.
    #[inline]
    pub fn memory(&self) -> &RequestMemory<'_> {
        &self.scope
    }

    /// The table snapshot.
    pub fn table(&self) -> &Arc<RegionTable> {
        &self.table
    }

    /// Ends the scope (copy back, unmap) and reports what failed; see
    /// [`RequestMemory::finish`].
    pub fn finish(self) -> Result<(), RequestError> {
        let mut this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so the scope is taken exactly once, here.
        let scope = unsafe { ManuallyDrop::take(&mut this.scope) };
        let r = scope.finish();
        // SAFETY: read once out of a shell that is never dropped; the scope borrowing the
        // table has ended above.
        drop(unsafe { std::ptr::read(&this.table) });
        r
    }
}

impl Drop for OwnedRequestMemory {
    fn drop(&mut self) {
        // SAFETY: dropped once, here, before `table` (dropped after this body).
        unsafe { ManuallyDrop::drop(&mut self.scope) };
    }
}
