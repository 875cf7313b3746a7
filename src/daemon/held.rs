//! Requests that wait: a device keeps a chain past `serve` and completes it later, from the
//! worker or from any other thread. See `docs/waiting-requests.md`.
//!
//! A held request's memory is an [`OwnedRequestMemory`] in a slot the runtime owns: the
//! device's [`Request`] reaches it through [`Request::scope`], [`Request::complete`] ends it
//! before the used entry is queued, and stopping the queue ends every one still held, whatever
//! the device does with its `Request`s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::desc::split::Descriptor;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::Chain;
use super::worker::DaemonStats;
use crate::request::{OwnedRequestMemory, RequestMemory, Strategy, WritableBuffers};
use crate::table::RegionTable;

/// Default bound on the requests one queue holds at a time ([`super::VhostUserDevice::max_held`]).
pub const DEFAULT_MAX_HELD: usize = 256;

/// Why a held request cannot be reached or completed, or a chain cannot be held.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HoldError {
    /// The queue stopped (GET_VRING_BASE, reset, disconnect) since the request was held: its
    /// memory was released and its completion would be written nowhere.
    #[error("queue {queue}: request {head} was released when the queue stopped")]
    Gone {
        /// Queue.
        queue: usize,
        /// Head descriptor index of the chain.
        head: u16,
    },
    /// `Batch::hold` of an index outside the batch.
    #[error("no chain {index} in a batch of {len}")]
    NoSuchChain {
        /// Index asked for.
        index: usize,
        /// Chains in the batch.
        len: usize,
    },
    /// `Batch::hold` of a chain held already.
    #[error("chain {index} of the batch is held already")]
    HeldTwice {
        /// Index asked for.
        index: usize,
    },
}

type Slot = Mutex<Option<OwnedRequestMemory>>;

/// Locks `m`, also after a thread panicked holding it (the data is a scope or a list, whole
/// at every unlock).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct State {
    /// Bumped at every stop: requests held before it complete into nothing.
    epoch: u64,
    /// Completed `(head, len)`, in completion order, until the worker adds them.
    done: Vec<(u16, u32)>,
    /// Slots of the requests held now, by id.
    held: HashMap<u64, Arc<Slot>>,
    next_id: u64,
}

/// One queue's held requests and completions; shared by its worker and the device's
/// `Request`s, and kept across worker restarts of the queue.
#[derive(Debug)]
pub(crate) struct QueueCompletions {
    queue: usize,
    state: Mutex<State>,
    /// Written at every completion; the worker polls it.
    event: EventFd,
    /// Set while the worker runs the device (`serve_batch`, `handle_event`) and takes the
    /// completions right after: a completion then need not write `event`.
    quiet: AtomicBool,
    stats: Arc<DaemonStats>,
}

impl QueueCompletions {
    pub(crate) fn new(queue: usize, stats: Arc<DaemonStats>) -> std::io::Result<Self> {
        Ok(QueueCompletions {
            queue,
            state: Mutex::new(State::default()),
            event: EventFd::new(EFD_NONBLOCK)?,
            quiet: AtomicBool::new(false),
            stats,
        })
    }

    /// The eventfd completions write.
    pub(crate) fn event(&self) -> &EventFd {
        &self.event
    }

    /// Runs `f` (the device, on the worker) with completions quiet: the worker takes what
    /// they queue right after `f` returns, so they need not wake it. A completion that sees
    /// the flag queued its entry before the flag is cleared, hence before that take.
    pub(crate) fn quietly<R>(&self, f: impl FnOnce() -> R) -> R {
        self.quiet.store(true, Ordering::SeqCst);
        let r = f();
        self.quiet.store(false, Ordering::SeqCst);
        r
    }

    /// Requests held now.
    pub(crate) fn held(&self) -> usize {
        lock(&self.state).held.len()
    }

    /// On-demand pages (bounce pages and mapped pages) the held requests' scopes hold now. A
    /// scope the device is using at this instant (its slot locked) is not counted: the
    /// bound is checked again before every batch.
    pub(crate) fn held_pages(&self) -> usize {
        let slots: Vec<Arc<Slot>> = lock(&self.state).held.values().cloned().collect();
        slots
            .iter()
            .filter_map(|s| s.try_lock().ok())
            .map(|g| g.as_ref().map_or(0, |o| o.memory().held_pages()))
            .sum()
    }

    /// Completions queued and not yet taken by the worker.
    pub(crate) fn pending(&self) -> usize {
        lock(&self.state).done.len()
    }

    /// Takes the completions queued so far, in completion order, into `out` (after the
    /// worker read the eventfd: a completion queued after the read writes it again).
    pub(crate) fn take_done(&self, out: &mut Vec<(u16, u32)>) {
        out.append(&mut lock(&self.state).done);
    }

    /// Ends every held request's scope (0 live mappings after this returns) and forgets
    /// completions not yet added: the queue stopped. Returns how many requests it released.
    pub(crate) fn release_all(&self) -> usize {
        let slots: Vec<Arc<Slot>> = {
            let mut st = lock(&self.state);
            st.epoch += 1;
            st.done.clear();
            st.held.drain().map(|(_, s)| s).collect()
        };
        let mut released = 0;
        for slot in slots {
            // A completion running now holds this lock while it ends its scope: taking it
            // after that completion means nothing of the request is mapped once we return.
            if let Some(scope) = lock(&slot).take() {
                if scope.finish().is_err() {
                    self.stats.scope_errors.fetch_add(1, Ordering::Relaxed);
                }
                released += 1;
            }
        }
        if released > 0 {
            log::info!("vq{}: released {released} held requests", self.queue);
        }
        released
    }

    pub(crate) fn hold(
        self: &Arc<Self>,
        head: u16,
        descs: Vec<Descriptor>,
        scope: OwnedRequestMemory,
    ) -> Request {
        let slot = Arc::new(Mutex::new(Some(scope)));
        let (id, epoch) = {
            let mut st = lock(&self.state);
            st.next_id += 1;
            let id = st.next_id;
            st.held.insert(id, slot.clone());
            (id, st.epoch)
        };
        Request {
            head,
            descs,
            slot,
            completions: self.clone(),
            id,
            epoch,
            completed: false,
        }
    }
}

/// A chain the device keeps past `serve`. `Send`: complete it from any thread. Dropping it
/// without [`Request::complete`] completes it with used length 0, so a chain is never lost
/// while the connection lasts.
#[derive(Debug)]
pub struct Request {
    head: u16,
    descs: Vec<Descriptor>,
    slot: Arc<Slot>,
    completions: Arc<QueueCompletions>,
    id: u64,
    epoch: u64,
    completed: bool,
}

/// A held request's memory, locked for the borrow: [`Request::scope`].
#[derive(Debug)]
pub struct HeldScope<'r>(MutexGuard<'r, Option<OwnedRequestMemory>>);

impl HeldScope<'_> {
    /// The request's memory, for this borrow.
    pub fn memory(&self) -> Option<&RequestMemory<'_>> {
        self.0.as_ref().map(OwnedRequestMemory::memory)
    }
}

impl Request {
    /// The queue the chain came from.
    pub fn queue(&self) -> usize {
        self.completions.queue
    }

    /// The chain's head descriptor index (its used-ring id).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The chain's descriptors, in order (indirect tables resolved), as the batch read them.
    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descs
    }

    /// The request's memory: on-demand pages are fetched on touch, released at `complete`.
    /// Locks the request's slot for the guard's life: do not hold it across `complete`.
    pub fn scope(&self) -> Result<HeldScope<'_>, HoldError> {
        let g = lock(&self.slot);
        if g.is_none() {
            return Err(self.gone());
        }
        Ok(HeldScope(g))
    }

    /// Completes the chain with used length `len`: ends its scope (copy back, unmap), then
    /// queues the used entry and wakes the queue's worker, which adds it (in completion
    /// order) and notifies the frontend. `Gone` if the queue stopped in between (nothing is
    /// written then).
    pub fn complete(mut self, len: u32) -> Result<(), HoldError> {
        self.finish(len)
    }

    fn gone(&self) -> HoldError {
        HoldError::Gone {
            queue: self.completions.queue,
            head: self.head,
        }
    }

    fn finish(&mut self, len: u32) -> Result<(), HoldError> {
        if self.completed {
            return Ok(());
        }
        self.completed = true;
        let c = &self.completions;
        let mut slot = lock(&self.slot);
        let Some(scope) = slot.take() else {
            return Err(self.gone());
        };
        if let Err(e) = scope.finish() {
            log::warn!("vq{}: ending request {}'s scope: {e}", c.queue, self.head);
            c.stats.scope_errors.fetch_add(1, Ordering::Relaxed);
        }
        let queued = {
            let mut st = lock(&c.state);
            let live = st.epoch == self.epoch && st.held.remove(&self.id).is_some();
            if live {
                st.done.push((self.head, len));
            }
            live
        };
        drop(slot);
        if !queued {
            return Err(self.gone());
        }
        if !c.quiet.load(Ordering::SeqCst) {
            // A full counter already means "wake up".
            let _ = c.event.write(1);
        }
        Ok(())
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        let _ = self.finish(0);
    }
}

/// What a worker lends a batch to create held requests.
pub(crate) struct Holder<'b> {
    pub(crate) table: &'b Arc<RegionTable>,
    pub(crate) completions: &'b Arc<QueueCompletions>,
    pub(crate) writable: WritableBuffers,
}

/// One batch of chains popped from a queue, as a device whose requests may wait sees it
/// ([`super::VhostUserDevice::serve_batch`]): set each chain's used length, or hold it.
pub struct Batch<'b, 's, 't> {
    pub(crate) mem: &'s RequestMemory<'t>,
    pub(crate) chains: &'b mut [Chain<'s, 't>],
    pub(crate) used: &'b mut [u32],
    pub(crate) held: &'b mut [bool],
    pub(crate) holder: &'b Holder<'b>,
}

impl std::fmt::Debug for Batch<'_, '_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("chains", &self.chains.len())
            .field("held", &self.held.iter().filter(|&&h| h).count())
            .finish()
    }
}

impl<'s, 't> Batch<'_, 's, 't> {
    /// The batch's memory (every chain's pages prefetched through it).
    pub fn memory(&self) -> &'s RequestMemory<'t> {
        self.mem
    }

    /// Chains in the batch.
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    /// Whether the batch is empty (never, as the worker hands it over).
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Chain `i`.
    pub fn chain(&self, i: usize) -> Option<&Chain<'s, 't>> {
        self.chains.get(i)
    }

    /// The memory, the chains and their used lengths, for serving them all at once
    /// ([`super::VhostUserDevice::serve`]).
    pub fn parts(&mut self) -> (&'s RequestMemory<'t>, &mut [Chain<'s, 't>], &mut [u32]) {
        (self.mem, self.chains, self.used)
    }

    /// Sets chain `i`'s used length (ignored for an index outside the batch or a held chain).
    pub fn set_used(&mut self, i: usize, len: u32) {
        if let Some(u) = self.used.get_mut(i) {
            *u = len;
        }
    }

    /// Keeps chain `i` past `serve`: no used entry is written for it now. What the device
    /// wrote through the batch's memory is copied back when the batch ends; the request's own
    /// memory ([`Request::scope`]) starts empty and fetches on touch.
    pub fn hold(&mut self, i: usize) -> Result<Request, HoldError> {
        self.hold_with(i, Strategy::default())
    }

    /// [`Batch::hold`], the request's memory fetching on-demand pages with `strategy`.
    pub fn hold_with(&mut self, i: usize, strategy: Strategy) -> Result<Request, HoldError> {
        let len = self.chains.len();
        let (Some(chain), Some(held)) = (self.chains.get(i), self.held.get_mut(i)) else {
            return Err(HoldError::NoSuchChain { index: i, len });
        };
        if *held {
            return Err(HoldError::HeldTwice { index: i });
        }
        *held = true;
        let descs: Vec<Descriptor> = chain.clone().collect();
        let h = self.holder;
        let scope = OwnedRequestMemory::new(h.table.clone(), strategy, h.writable);
        Ok(h.completions.hold(chain.head_index(), descs, scope))
    }
}
