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
use super::held::{Batch, Holder, QueueCompletions};
use super::inflight::InflightQueue;
use super::ring_mem::RingMem;
use super::threads::{Sandbox, SandboxError, ThreadKind};
use crate::device::{Counters, XenHandle};
use crate::request::{OwnedRequestMemory, RequestMemory};
use crate::ring_layout::RingLayout;
use crate::table::RegionTable;

/// Most chains served in one request scope. Bounds what one scope holds (pages, mappings)
/// and how long used entries wait; a deeper queue is served in several batches per kick.
pub const MAX_BATCH: usize = 64;

const KICK: u64 = 0;
const WAKE: u64 = 1;
const COMPLETE: u64 = 2;
/// Device tokens ([`VhostUserDevice::queue_events`]) sit above this, clear of the worker's.
const DEVICE_BASE: u64 = 1 << 32;

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
    /// Requests found in flight at a queue's start (`INFLIGHT_SHMFD`) and resubmitted.
    pub resubmitted: AtomicU64,
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
            resubmitted: self.resubmitted.load(Ordering::Relaxed),
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
    /// Requests resubmitted from the in-flight region.
    pub resubmitted: u64,
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
    /// Set while the queue stops: pop nothing more, keep adding completions.
    draining: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    completions: Arc<QueueCompletions>,
    thread: Option<JoinHandle<Result<(), SandboxError>>>,
}

impl QueueWorker {
    /// Starts the worker of queue `index`, whose kick fd is already set.
    // What a queue worker needs, each from its own owner (the handler's vring, table,
    // device, counters, in-flight region, refusal watch and sandbox): a struct for them would
    // be built once, here.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start<D: VhostUserDevice>(
        index: usize,
        vring: Vring,
        mem: Memory,
        device: Arc<D>,
        stats: Arc<DaemonStats>,
        inflight: Option<InflightQueue>,
        plain_watch: Option<Arc<PlainTableWatch>>,
        sandbox: &Arc<Sandbox>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let draining = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        let completions = Arc::new(QueueCompletions::new(index, stats.clone())?);
        epoll.ctl(
            ControlOperation::Add,
            completions.event().as_raw_fd(),
            EpollEvent::new(EventSet::IN, COMPLETE),
        )?;
        let device_events = device.queue_events(index);
        for &(fd, token) in &device_events {
            let token = token.checked_add(DEVICE_BASE).ok_or_else(|| {
                std::io::Error::other(format!("vq{index}: device event token {token} too large"))
            })?;
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
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
            draining: draining.clone(),
            wake: wake.clone(),
            completions: completions.clone(),
            inflight,
            counter: std::cell::Cell::new(1),
            epoll,
            events: 3 + device_events.len(),
        };
        let thread = sandbox
            .spawn(ThreadKind::QueueWorker, format!("vq{index}"), move || {
                worker.run()
            })
            .map_err(std::io::Error::other)?;
        Ok(QueueWorker {
            stop,
            draining,
            wake,
            completions,
            thread: Some(thread),
        })
    }

    /// Makes the worker look at its ring again (enabled, features changed).
    pub(crate) fn wake(&self) {
        // A full eventfd counter already means "wake up".
        let _ = self.wake.write(1);
    }

    /// Stops the worker after its current batch and waits for it, then releases the requests
    /// the device still holds (nothing of them is mapped when this returns).
    pub(crate) fn stop(mut self) {
        self.halt();
    }

    /// Stops the queue the way GET_VRING_BASE wants it: pop nothing more, wait up to
    /// `timeout` for the requests the device holds to complete (their used entries are
    /// added and signalled), then [`QueueWorker::stop`]. Returns how many were still held.
    pub(crate) fn drain_then_stop(self, timeout: std::time::Duration) -> usize {
        self.draining.store(true, Ordering::Release);
        self.wake();
        let deadline = std::time::Instant::now() + timeout;
        while self.completions.held() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Completions queued but not added yet: the worker adds them on its next wake.
        while self.completions.pending() > 0 && std::time::Instant::now() < deadline {
            self.wake();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let left = self.completions.held();
        self.stop();
        left
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
        self.completions.release_all();
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
    draining: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    completions: Arc<QueueCompletions>,
    /// The queue's in-flight area (`INFLIGHT_SHMFD`), if the frontend set one.
    inflight: Option<InflightQueue>,
    /// Counter of the next chain popped (in-flight order).
    counter: std::cell::Cell<u64>,
    epoll: Epoll,
    /// Fds the epoll watches: the worker's three and the device's.
    events: usize,
}

impl<D: VhostUserDevice> Worker<D> {
    fn run(self) {
        self.resubmit();
        self.serve_loop();
        // Nothing the device started may still touch a held request's memory when the
        // requests are released (`QueueWorker::halt`, after this thread ends).
        self.device.quiesce(self.index);
    }

    fn serve_loop(&self) {
        let mut events = vec![EpollEvent::default(); self.events];
        let mut done = Vec::new();
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
                    WAKE => {
                        let _ = self.wake.read();
                    }
                    COMPLETE => {
                        let _ = self.completions.event().read();
                    }
                    token => {
                        // Completions made in there are taken just below.
                        self.completions
                            .quietly(|| self.device.handle_event(self.index, token - DEVICE_BASE));
                    }
                }
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            // Completions of held requests first: they make room to pop.
            self.completions.take_done(&mut done);
            if !done.is_empty() {
                self.complete(&self.mem.memory(), &done);
                done.clear();
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
            if self.room() == 0 || self.draining.load(Ordering::Acquire) {
                // Backpressure: the chains wait in the avail ring until a completion (which
                // wakes this worker) makes room.
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
        let layout = RingLayout::new(size);
        let Some(idx) = avail
            .checked_add(RingLayout::IDX)
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
            let Some(head) = avail
                .checked_add(layout.avail_entry(next.wrapping_add(i)))
                .and_then(|a| table.read_obj::<u16>(GuestAddress(a)).ok())
            else {
                break;
            };
            let head = u16::from_le(head);
            if head >= size {
                continue;
            }
            let Some(d) = desc
                .checked_add(RingLayout::desc(u64::from(head)))
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

    /// How many more requests the queue may hold now: none while the held ones hold
    /// [`VhostUserDevice::max_held_pages`] pages or more.
    fn room(&self) -> usize {
        let held = self.completions.held();
        // Pages are held only over on-demand or lazy memory: over plain memory, counting
        // them (a walk over every held request) would find none, at every wake.
        if held > 0
            && self.mem.memory().has_scoped_memory()
            && self.completions.held_pages() >= self.device.max_held_pages(self.index)
        {
            return 0;
        }
        self.device.max_held(self.index).saturating_sub(held)
    }

    /// Pops, serves and completes up to [`MAX_BATCH`] chains (fewer when the room for held
    /// requests is smaller: every chain popped could be held); returns how many.
    fn serve_batch(&self) -> usize {
        let table = self.mem.memory().into_inner();
        let writable = self.device.writable_buffers();
        let scope = RequestMemory::new(&table).writable_buffers(writable);
        let limit = if table.has_on_demand() {
            self.prefetch_indirect_tables(&table, &scope)
        } else {
            MAX_BATCH
        }
        .min(self.room());
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
        if let Some(inf) = &self.inflight {
            for &h in &heads {
                let c = self.counter.get();
                inf.mark(h, c);
                self.counter.set(c.wrapping_add(1));
            }
        }
        if let Err(e) = scope.prefetch_chains(&chains) {
            // Best effort: each page that failed reports its error when the device touches it.
            log::debug!("vq{}: prefetch: {e}", self.index);
        }
        let mut used = vec![0u32; n];
        let mut held = vec![false; n];
        {
            let holder = Holder {
                table: &table,
                completions: &self.completions,
                writable,
            };
            let mut batch = Batch {
                mem: &scope,
                chains: &mut chains,
                used: &mut used,
                held: &mut held,
                holder: &holder,
            };
            self.completions
                .quietly(|| self.device.serve_batch(self.index, &mut batch));
        }
        drop(chains);
        if let Err(e) = scope.finish() {
            log::warn!("vq{}: ending the request scope: {e}", self.index);
            self.stats.scope_errors.fetch_add(1, Ordering::Relaxed);
        }
        // Held chains get their used entry when the device completes them; those it
        // completed already, inside `serve_batch`, go with this batch's.
        let mut done: Vec<(u16, u32)> = heads
            .into_iter()
            .zip(used)
            .zip(held)
            .filter_map(|(d, held)| (!held).then_some(d))
            .collect();
        self.completions.take_done(&mut done);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.complete(&table, &done);
        if let Some(w) = &self.plain_watch {
            if table.has_scoped_memory() {
                w.check(self.index);
            }
        }
        n
    }

    /// Over an in-flight area in use (the frontend reconnected after the daemon or the
    /// connection ended): resubmits the requests it shows in flight, in counter order, to
    /// the device, and sets the queue's indices after them, before anything new is popped.
    fn resubmit(&self) {
        let Some(inf) = &self.inflight else {
            log::debug!("vq{}: no in-flight area", self.index);
            return;
        };
        let table = self.mem.memory().into_inner();
        let (desc, used, size) = {
            let st = self.vring.get_ref();
            let q = st.get_queue();
            (q.desc_table(), q.used_ring(), q.size())
        };
        let Some(used_now) = used
            .checked_add(RingLayout::IDX)
            .and_then(|a| table.read_obj::<u16>(GuestAddress(a)).ok())
            .map(u16::from_le)
        else {
            log::warn!(
                "vq{}: used ring unreadable: in-flight region left alone",
                self.index
            );
            return;
        };
        let rec = inf.recover(used_now);
        log::debug!(
            "vq{}: in-flight area: used index {used_now}, {} in flight",
            self.index,
            rec.heads.len()
        );
        self.counter.set(rec.next_counter);
        {
            let mut st = self.vring.get_mut();
            let q = st.get_queue_mut();
            // Used entries continue where the guest's ring is; the chains popped so far are
            // the used ones plus those in flight (the frontend's base is the used index).
            q.set_next_used(used_now);
            if !rec.heads.is_empty() {
                q.set_next_avail(used_now.wrapping_add(rec.heads.len() as u16));
            }
        }
        if rec.heads.is_empty() {
            return;
        }
        log::info!(
            "vq{}: resubmitting {} requests in flight",
            self.index,
            rec.heads.len()
        );
        self.stats
            .resubmitted
            .fetch_add(rec.heads.len() as u64, Ordering::Relaxed);
        let writable = self.device.writable_buffers();
        for head in rec.heads {
            let scope = OwnedRequestMemory::new(
                table.clone(),
                crate::request::Strategy::default(),
                writable,
            );
            let descs = walk_chain(scope.memory(), desc, size, head);
            let req = self.completions.hold(head, descs, scope);
            self.device.resubmit(self.index, req);
        }
    }

    /// The one completion path: adds a used entry for each `(head, len)` in order, counts
    /// them, and notifies the frontend once if it asked to be (EVENT_IDX honoured). Every
    /// request's scope has ended before it gets here.
    fn complete(&self, table: &RegionTable, done: &[(u16, u32)]) {
        if done.is_empty() {
            return;
        }
        let ring = RingMem::of(table);
        let mut state = self.vring.get_mut();
        for &(head, len) in done {
            if let Some(inf) = &self.inflight {
                inf.pre_used(head);
            }
            if let Err(e) = ring.add_used(state.get_queue_mut(), head, len) {
                log::warn!("vq{}: add_used({head}): {e}", self.index);
            }
            if let Some(inf) = &self.inflight {
                inf.post_used(head, state.get_queue().next_used());
            }
        }
        self.stats
            .requests
            .fetch_add(done.len() as u64, Ordering::Relaxed);
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
    }
}

/// The descriptors of the chain at `head` of the table at `desc` (queue size `size`), indirect
/// tables followed, read through `mem`. Stops at the first descriptor it cannot read, at a
/// loop (more descriptors than the table holds), or at a nested indirect table: what it
/// returns is what can be served; an empty list completes with used length 0.
fn walk_chain(mem: &RequestMemory<'_>, desc: u64, size: u16, head: u16) -> Vec<Descriptor> {
    const F_NEXT: u16 = 1;
    const F_INDIRECT: u16 = 4;
    let read = |table: u64, i: u64| -> Option<Descriptor> {
        table
            .checked_add(RingLayout::desc(i))
            .and_then(|a| mem.read_obj::<Descriptor>(GuestAddress(a)).ok())
    };
    let mut out = Vec::new();
    let (mut table, mut len, mut i) = (desc, u64::from(size), u64::from(head));
    let mut indirect = false;
    let mut budget = u64::from(size);
    while i < len && budget > 0 {
        budget -= 1;
        let Some(d) = read(table, i) else { break };
        if d.flags() & F_INDIRECT != 0 {
            if indirect || !out.is_empty() {
                break;
            }
            indirect = true;
            table = d.addr().0;
            len = u64::from(d.len() / 16);
            budget = len;
            i = 0;
            continue;
        }
        out.push(d);
        if d.flags() & F_NEXT == 0 {
            break;
        }
        i = u64::from(d.next());
    }
    out
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
