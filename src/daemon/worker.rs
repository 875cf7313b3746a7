//! One worker thread per queue. The unit of work is the kick: drain the avail ring in
//! bounded batches; pop each batch's chains through one request scope (so descriptor tables
//! in on-demand grant memory are fetched through it too), prefetch their on-demand pages in
//! one go, let the device serve them, finish the scope (copy back, unmap), and only then add
//! the used entries and notify once: a guest ends foreign access to its buffers when it sees
//! them used, so nothing of the batch may still be mapped by then.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost_user_backend::VringT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, Permissions};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::VhostUserDevice;
use super::handler::{Memory, Vring};
use super::ring_mem::RingMem;
use super::threads::{Sandbox, SandboxError, ThreadKind};
use crate::device::{Counters, XenHandle};
use crate::request::RequestMemory;
use crate::table::RegionTable;

/// Most chains served in one request scope. Bounds what one scope holds (pages, mappings)
/// and how long used entries wait; a deeper queue is served in several batches per kick.
pub const MAX_BATCH: usize = 64;

const KICK: u64 = 0;
const WAKE: u64 = 1;

/// Counters of what the workers did, shared by all connections of a daemon.
#[derive(Debug, Default)]
pub struct DaemonStats {
    /// Chains served (used entries added).
    pub requests: AtomicU64,
    /// Request scopes (batches) served.
    pub batches: AtomicU64,
    /// Kicks read from the frontend.
    pub kicks: AtomicU64,
    /// Calls signalled to the frontend.
    pub calls: AtomicU64,
    /// Request scopes whose `finish` reported an error (copy-back or unmap).
    pub scope_errors: AtomicU64,
    /// Connections served to the end.
    pub connections: AtomicU64,
}

impl DaemonStats {
    /// A plain copy of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            kicks: self.kicks.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            scope_errors: self.scope_errors.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }
}

/// A copy of [`DaemonStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Chains served.
    pub requests: u64,
    /// Batches served.
    pub batches: u64,
    /// Kicks read.
    pub kicks: u64,
    /// Calls signalled.
    pub calls: u64,
    /// Scopes whose finish failed.
    pub scope_errors: u64,
    /// Connections ended.
    pub connections: u64,
}

/// Makes plain-table refusals loud: an access to on-demand memory through the plain
/// [`RegionTable`] (a chain popped with it whose indirect table is in on-demand memory,
/// which virtio-queue turns into an empty chain) is counted on the Xen handle
/// ([`crate::device::CounterSnapshot::plain_table_refusals`]); the first of a connection is
/// logged. Checked after each batch over a table with on-demand or lazy regions: one relaxed
/// load, and nothing at all for other tables.
#[derive(Debug)]
pub(crate) struct PlainTableWatch {
    xen: XenHandle,
    /// The handle's count when the connection started.
    start: u64,
    logged: AtomicBool,
}

impl PlainTableWatch {
    pub(crate) fn new(xen: XenHandle) -> Self {
        let start = xen.counters().plain_table_refusals();
        PlainTableWatch {
            xen,
            start,
            logged: AtomicBool::new(false),
        }
    }

    /// Logs the first refusal since the connection started; true when this call logged it.
    pub(crate) fn check(&self, queue: usize) -> bool {
        check_first(self.xen.counters(), self.start, &self.logged, queue)
    }
}

fn check_first(counters: &Counters, start: u64, logged: &AtomicBool, queue: usize) -> bool {
    if logged.load(Ordering::Relaxed) {
        return false;
    }
    let n = counters.plain_table_refusals().saturating_sub(start);
    if n == 0 || logged.swap(true, Ordering::Relaxed) {
        return false;
    }
    log::warn!(
        "vq{queue}: {n} access(es) to on-demand memory through the plain RegionTable refused on \
         this connection (logged once): pop chains and read buffers through the request scope, \
         or chains with indirect tables in on-demand memory come out empty"
    );
    true
}

/// A running queue worker; stopping it joins the thread after its current batch.
#[derive(Debug)]
pub(crate) struct QueueWorker {
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<Result<(), SandboxError>>>,
}

impl QueueWorker {
    /// Starts the worker of queue `index`, whose kick fd is already set.
    pub(crate) fn start<D: VhostUserDevice>(
        index: usize,
        vring: Vring,
        mem: Memory,
        device: Arc<D>,
        stats: Arc<DaemonStats>,
        plain_watch: Option<Arc<PlainTableWatch>>,
        sandbox: &Arc<Sandbox>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        let kick_fd = vring.get_ref().get_kick().as_ref().map(|k| k.as_raw_fd());
        if let Some(fd) = kick_fd {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, KICK),
            )?;
        }
        let worker = Worker {
            index,
            vring,
            mem,
            device,
            stats,
            plain_watch,
            stop: stop.clone(),
            wake: wake.clone(),
            epoll,
        };
        let thread = sandbox
            .spawn(ThreadKind::QueueWorker, format!("vq{index}"), move || {
                worker.run()
            })
            .map_err(std::io::Error::other)?;
        Ok(QueueWorker {
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// Makes the worker look at its ring again (enabled, features changed).
    pub(crate) fn wake(&self) {
        // A full eventfd counter already means "wake up".
        let _ = self.wake.write(1);
    }

    /// Stops the worker after its current batch and waits for it.
    pub(crate) fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.wake();
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::error!("a queue worker did not start: {e}"),
                Err(_) => log::error!("a queue worker panicked"),
            }
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        self.halt();
    }
}

struct Worker<D: VhostUserDevice> {
    index: usize,
    vring: Vring,
    mem: Memory,
    device: Arc<D>,
    stats: Arc<DaemonStats>,
    plain_watch: Option<Arc<PlainTableWatch>>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    epoll: Epoll,
}

impl<D: VhostUserDevice> Worker<D> {
    fn run(self) {
        let mut events = [EpollEvent::default(); 2];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("vq{}: epoll: {e}", self.index);
                    return;
                }
            };
            for ev in events.iter().take(n) {
                match ev.data() {
                    KICK => match self.vring.read_kick() {
                        Ok(_) => {
                            self.stats.kicks.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            log::error!("vq{}: kick: {e}", self.index);
                            return;
                        }
                    },
                    _ => {
                        let _ = self.wake.read();
                    }
                }
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if self.vring.get_ref().is_enabled() {
                self.process_queue();
            }
        }
    }

    /// Serves until the ring is empty with notifications re-enabled (the usual
    /// disable / drain / enable-and-recheck loop, which also honours EVENT_IDX).
    ///
    /// A ring whose avail index says "more" while nothing can be popped (an index further
    /// ahead than the queue size, a ring outside guest memory) would make that loop spin
    /// forever, burning a core and never seeing `stop`: after two rounds that served nothing
    /// the worker waits for the next kick instead.
    fn process_queue(&self) {
        let mut idle_rounds = 0;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if let Err(e) = self.ring(|q, m| m.disable_notification(q)) {
                log::warn!("vq{}: disable notification: {e}", self.index);
                return;
            }
            let mut served = self.serve_batch();
            while served == MAX_BATCH {
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                served = self.serve_batch();
            }
            idle_rounds = if served == 0 { idle_rounds + 1 } else { 0 };
            match self.ring(|q, m| m.enable_notification(q)) {
                Ok(true) if idle_rounds >= 2 => {
                    log::warn!(
                        "vq{}: the avail ring announces chains that cannot be popped",
                        self.index
                    );
                    return;
                }
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    log::warn!("vq{}: enable notification: {e}", self.index);
                    return;
                }
            }
        }
    }

    /// Fetches the indirect descriptor tables of the chains about to be popped in one go.
    /// Linux's grant DMA puts them in on-demand grant memory; popping would otherwise fetch
    /// each table on its own (one grant copy or map per chain). Best effort: the pop reads
    /// every descriptor again, so anything skipped here is fetched there. Returns how many
    /// chains it looked at: the batch pops no more, so that a chain the driver publishes in
    /// between waits for the next batch instead of costing a fetch of its own.
    fn prefetch_indirect_tables(&self, table: &RegionTable, scope: &RequestMemory<'_>) -> usize {
        let (avail, desc, size, next) = {
            let st = self.vring.get_ref();
            let q = st.get_queue();
            (q.avail_ring(), q.desc_table(), q.size(), q.next_avail())
        };
        if size == 0 {
            return MAX_BATCH;
        }
        let Some(idx) = avail
            .checked_add(2)
            .and_then(|a| table.read_obj::<u16>(GuestAddress(a)).ok())
        else {
            return MAX_BATCH;
        };
        let pending = u16::from_le(idx)
            .wrapping_sub(next)
            .min(size)
            .min(MAX_BATCH as u16);
        let mut tables = Vec::new();
        for i in 0..pending {
            let slot = u64::from(next.wrapping_add(i) % size);
            let Some(head) = avail
                .checked_add(4 + 2 * slot)
                .and_then(|a| table.read_obj::<u16>(GuestAddress(a)).ok())
            else {
                break;
            };
            let head = u16::from_le(head);
            if head >= size {
                continue;
            }
            let Some(d) = desc
                .checked_add(16 * u64::from(head))
                .and_then(|a| table.read_obj::<Descriptor>(GuestAddress(a)).ok())
            else {
                continue;
            };
            if d.refers_to_indirect_table() {
                // No more than a queue's worth of descriptors: a guest claiming a huge table
                // (virtio-queue walks up to 65535 entries) gets only what it uses fetched,
                // one page per touch, not the size it claims.
                let len = (d.len() as usize).min(usize::from(size) * 16);
                tables.push((d.addr(), len, Permissions::Read));
            }
        }
        if !tables.is_empty() {
            if let Err(e) = scope.prefetch(&tables) {
                log::debug!("vq{}: indirect tables: {e}", self.index);
            }
        }
        // At least one: a chain that raced the read above costs at most one fetch.
        usize::from(pending).max(1)
    }

    /// Runs a ring operation on the queue, over the ring memory of the current table.
    fn ring<R>(
        &self,
        op: impl FnOnce(&mut virtio_queue::Queue, &RingMem<'_>) -> Result<R, virtio_queue::Error>,
    ) -> Result<R, virtio_queue::Error> {
        let table = self.mem.memory();
        let ring = RingMem::of(&table);
        let mut state = self.vring.get_mut();
        op(state.get_queue_mut(), &ring)
    }

    /// Pops, serves and completes up to [`MAX_BATCH`] chains; returns how many.
    fn serve_batch(&self) -> usize {
        let table = self.mem.memory();
        let scope = RequestMemory::new(&table).writable_buffers(self.device.writable_buffers());
        let limit = if table.has_on_demand() {
            self.prefetch_indirect_tables(&table, &scope)
        } else {
            MAX_BATCH
        };
        let mut chains = Vec::with_capacity(limit);
        {
            let mut state = self.vring.get_mut();
            let queue = state.get_queue_mut();
            while chains.len() < limit {
                match queue.pop_descriptor_chain(&scope) {
                    Some(c) => chains.push(c),
                    None => break,
                }
            }
        }
        let n = chains.len();
        if n == 0 {
            return 0;
        }
        let heads: Vec<u16> = chains.iter().map(|c| c.head_index()).collect();
        if let Err(e) = scope.prefetch_chains(&chains) {
            // Best effort: each page that failed reports its error when the device touches it.
            log::debug!("vq{}: prefetch: {e}", self.index);
        }
        let mut used = vec![0u32; n];
        self.device
            .serve(self.index, &scope, &mut chains, &mut used);
        drop(chains);
        if let Err(e) = scope.finish() {
            log::warn!("vq{}: ending the request scope: {e}", self.index);
            self.stats.scope_errors.fetch_add(1, Ordering::Relaxed);
        }
        let ring = RingMem::of(&table);
        let mut state = self.vring.get_mut();
        for (&head, &len) in heads.iter().zip(&used) {
            if let Err(e) = ring.add_used(state.get_queue_mut(), head, len) {
                log::warn!("vq{}: add_used({head}): {e}", self.index);
            }
        }
        self.stats.requests.fetch_add(n as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if let Some(w) = &self.plain_watch {
            if table.has_on_demand() || table.has_lazy() {
                w.check(self.index);
            }
        }
        match ring.needs_notification(state.get_queue_mut()) {
            Ok(true) => match state.signal_used_queue() {
                Ok(()) => {
                    self.stats.calls.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => log::warn!("vq{}: call: {e}", self.index),
            },
            Ok(false) => {}
            Err(e) => log::warn!("vq{}: used event: {e}", self.index),
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_plain_table_refusal_of_a_connection_is_logged_once() {
        let c = Counters::default();
        c.add_plain_table_refusal();
        // Refusals before the connection started do not count.
        let start = c.plain_table_refusals();
        let logged = AtomicBool::new(false);
        assert!(!check_first(&c, start, &logged, 0));
        c.add_plain_table_refusal();
        assert!(check_first(&c, start, &logged, 0));
        c.add_plain_table_refusal();
        assert!(!check_first(&c, start, &logged, 1));
        assert_eq!(c.plain_table_refusals(), start + 2);
    }
}
