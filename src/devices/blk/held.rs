//! blk's held path (`--direct`): each request's read, write or flush goes to the queue's
//! io_uring and its chain is held ([`crate::daemon::Batch::hold`]) until the completion
//! arrives through the ring's eventfd, on the queue's worker
//! ([`VhostUserDevice::handle_event`]). A guest at queue depth 32 on a real disk thus has
//! 32 requests at the disk instead of one batch at a time, and what is at the disk when the
//! daemon dies stays marked in the in-flight region for the next daemon to resubmit.
//!
//! Only O_DIRECT: there the kernel really waits for the device. Buffered reads hit the page
//! cache and complete inside the submission, where holding would only add its cost.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, Permissions};

use super::{
    data_iov, flush_outcome, lock, without_last_byte, BlkDevice, Outcome, Prepared, RingState,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use crate::daemon::{Batch, Request};
use crate::devices::iov::{AlignedBuf, GuestIov, IOV_MAX};
use crate::devices::uring::{Op, Ring};

/// A request whose op is at the kernel, and what its completion needs.
pub(super) struct InFlight {
    request: Request,
    writable: Vec<(GuestAddress, usize)>,
    op: HeldOp,
}

enum HeldOp {
    /// Data between the file at `offset` and the request's memory (or `bounce`).
    Io {
        iovs: IovArray,
        offset: u64,
        sector: u64,
        to_guest: bool,
        len: usize,
        bounce: Option<AlignedBuf>,
    },
    Flush,
}

/// The iovec array of an op at the kernel.
struct IovArray(Vec<libc::iovec>);

// SAFETY: the pointers are only handed to the kernel, never dereferenced here; they point
// into the held request's memory (kept by the runtime until the request completes, which
// happens only after the op's completion is reaped, or after `quiesce` waited for it) or
// into the op's own bounce buffer. Nothing about them is tied to the thread that made them.
unsafe impl Send for IovArray {}

/// A queue's ring and the ops it has at the kernel, by `user_data`.
pub(super) struct QueueRing {
    pub(super) ring: Ring,
    in_flight: Vec<Option<InFlight>>,
    free: Vec<usize>,
    live: usize,
    /// Completed, answered when their delay ends ([`super::BlkConfig::completion_delay`]).
    delayed: Vec<(Instant, InFlight, i32)>,
}

impl std::fmt::Debug for QueueRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueRing")
            .field("live", &self.live)
            .finish()
    }
}

impl QueueRing {
    pub(super) fn new(ring: Ring) -> Self {
        QueueRing {
            ring,
            in_flight: Vec::new(),
            free: Vec::new(),
            live: 0,
            delayed: Vec::new(),
        }
    }

    fn insert(&mut self, e: InFlight) -> usize {
        self.live += 1;
        match self.free.pop() {
            Some(k) => {
                if let Some(slot) = self.in_flight.get_mut(k) {
                    *slot = Some(e);
                }
                k
            }
            None => {
                self.in_flight.push(Some(e));
                self.in_flight.len() - 1
            }
        }
    }

    fn remove(&mut self, key: u64) -> Option<InFlight> {
        let k = usize::try_from(key).ok()?;
        let e = self.in_flight.get_mut(k)?.take()?;
        self.free.push(k);
        self.live -= 1;
        Some(e)
    }

    /// Queues the op of entry `key` on `fd`; false when the submission queue is full even
    /// after submitting what it held.
    fn push(&mut self, fd: RawFd, key: usize) -> bool {
        let Some(Some(e)) = self.in_flight.get(key) else {
            return false;
        };
        let op = match &e.op {
            HeldOp::Io {
                iovs,
                offset,
                to_guest: true,
                ..
            } => Op::Readv {
                iov: &iovs.0,
                offset: *offset,
            },
            HeldOp::Io { iovs, offset, .. } => Op::Writev {
                iov: &iovs.0,
                offset: *offset,
            },
            HeldOp::Flush => Op::Flush,
        };
        // SAFETY: the iovec array lives in the entry, which stays in `in_flight` until the
        // op's completion is reaped (`remove`), and the memory it points at is the held
        // request's (kept until that request completes, after the reap) or the entry's
        // bounce buffer.
        if unsafe { self.ring.push(fd, &op, key as u64) } {
            return true;
        }
        let _ = self.ring.submit(0);
        // SAFETY: as above.
        unsafe { self.ring.push(fd, &op, key as u64) }
    }
}

impl BlkDevice {
    /// Serves a batch the held way; false when the queue has no ring (refused, or
    /// [`super::BlkIo::Sync`]), and then nothing was done.
    pub(super) fn serve_held(&self, queue: usize, batch: &mut Batch<'_, '_, '_>) -> bool {
        let Some(slot) = self.rings.get(queue) else {
            return false;
        };
        let mut state = lock(slot);
        let Some(q) = self.ring_of(queue, &mut state) else {
            return false;
        };
        let fd = self.file.as_raw_fd();
        let mut pushed = 0u64;
        for i in 0..batch.len() {
            let request = match batch.hold(i) {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("blk: queue {queue}: {e}");
                    continue;
                }
            };
            let Some(e) = self.start_held(request) else {
                continue;
            };
            self.stats.held.fetch_add(1, Ordering::Relaxed);
            let key = q.insert(e);
            if q.push(fd, key) {
                pushed += 1;
            } else if let Some(e) = q.remove(key as u64) {
                // Cannot queue it: the synchronous way, now (its op, never submitted, first).
                drop(e.op);
                self.serve_request_sync(e.request);
            }
        }
        if pushed > 0 {
            if let Err(e) = q.ring.submit(0) {
                // The ops stay queued; the next submission, or `quiesce`, sends them.
                log::warn!("blk: queue {queue}: io_uring_enter: {e}");
            }
            self.stats.submissions.fetch_add(1, Ordering::Relaxed);
            self.stats.uring_ops.fetch_add(pushed, Ordering::Relaxed);
        }
        true
    }

    /// Parses a held request and resolves its data in its own memory: the op to submit, or
    /// `None` when it was answered at once (an error, GET_ID, DISCARD, a request O_DIRECT
    /// cannot take, more segments than one op takes).
    fn start_held(&self, request: Request) -> Option<InFlight> {
        let started = {
            let scope = request.scope().ok()?;
            let mem = scope.memory()?;
            // The request's pages in one go (one grant copy or map), not one per touch.
            let pages: Vec<_> = request
                .descriptors()
                .iter()
                .map(|d| {
                    let access = if d.is_write_only() {
                        Permissions::Write
                    } else {
                        Permissions::Read
                    };
                    (d.addr(), d.len() as usize, access)
                })
                .collect();
            if let Err(e) = mem.prefetch(&pages) {
                // Best effort: each page that failed says so when it is touched.
                log::debug!("blk: held request {}: {e}", request.head());
            }
            match self.ranges_of(mem, request.descriptors().iter().copied()) {
                Err(used) => Err(used),
                Ok((readable, writable)) => match self.prepare(mem, &readable, &writable) {
                    Prepared::Io {
                        iov,
                        offset,
                        sector,
                        to_guest,
                        bounce,
                    } if data_iov(&iov, bounce.as_ref()).len() <= IOV_MAX => {
                        let iovs = IovArray(data_iov(&iov, bounce.as_ref()).to_vec());
                        let op = HeldOp::Io {
                            iovs,
                            offset,
                            sector,
                            to_guest,
                            len: iov.len(),
                            bounce,
                        };
                        Ok((writable, op))
                    }
                    Prepared::Flush => Ok((writable, HeldOp::Flush)),
                    p => {
                        let outcome = self.run_sync(p);
                        Err(self.end(mem, &writable, outcome))
                    }
                },
            }
        };
        match started {
            Ok((writable, op)) => Some(InFlight {
                request,
                writable,
                op,
            }),
            Err(used) => {
                // Gone only if the queue stopped meanwhile: nothing to write then.
                let _ = request.complete(used);
                None
            }
        }
    }

    /// Completes a request whose op finished with `res` (bytes, or `-errno`).
    fn finish_held(&self, e: InFlight, res: i32) {
        let InFlight {
            request,
            writable,
            op,
        } = e;
        let used = {
            let Ok(scope) = request.scope() else { return };
            let Some(mem) = scope.memory() else { return };
            let outcome = match op {
                HeldOp::Flush => flush_outcome(res),
                HeldOp::Io {
                    to_guest,
                    len,
                    bounce,
                    ..
                } if res >= 0 && res as usize == len => {
                    if let (true, Some(b)) = (to_guest, &bounce) {
                        let mut iov = GuestIov::default();
                        for (addr, l) in without_last_byte(&writable) {
                            if iov.push(mem, addr, l, Permissions::Write).is_err() {
                                break;
                            }
                        }
                        b.empty_into(&iov);
                    }
                    Outcome {
                        status: VIRTIO_BLK_S_OK,
                        written: if to_guest {
                            u32::try_from(len).unwrap_or(u32::MAX)
                        } else {
                            0
                        },
                    }
                }
                HeldOp::Io { .. } if res >= 0 => {
                    // Short: the whole request again, the synchronous way (it finishes or
                    // says why not).
                    match self.ranges_of(mem, request.descriptors().iter().copied()) {
                        Ok((r, w)) => self.run_sync(self.prepare(mem, &r, &w)),
                        Err(_) => Outcome::status(VIRTIO_BLK_S_IOERR),
                    }
                }
                HeldOp::Io {
                    to_guest, sector, ..
                } => {
                    let what = if to_guest { "read" } else { "write" };
                    log::warn!(
                        "blk: {what} at sector {sector}: {}",
                        std::io::Error::from_raw_os_error(-res)
                    );
                    Outcome::status(VIRTIO_BLK_S_IOERR)
                }
            };
            self.end(mem, &writable, outcome)
        };
        let _ = request.complete(used);
    }

    /// Completes the requests whose ops finished; with `all`, waits until none is left at
    /// the kernel (the queue stops: their memory is about to be released).
    pub(super) fn reap_held(&self, queue: usize, all: bool) {
        let Some(slot) = self.rings.get(queue) else {
            return;
        };
        let mut state = lock(slot);
        let RingState::Ready(q) = &mut *state else {
            return;
        };
        if let Some(ev) = self.events.get(queue) {
            // Read before reaping: a completion posted after the reap writes it again.
            let _ = ev.read();
        }
        let delay = self.config.completion_delay.filter(|_| !all);
        let mut done = Vec::new();
        let mut failures = 0u64;
        loop {
            q.ring.reap(|key, res| done.push((key, res)));
            let now = Instant::now();
            for (key, res) in done.drain(..) {
                if let Some(e) = q.remove(key) {
                    match delay {
                        // 1/2 to 2 times the delay, by slot: answered out of order.
                        Some(d) => q
                            .delayed
                            .push((now + d * (1 + (key % 4) as u32) / 2, e, res)),
                        None => self.finish_held(e, res),
                    }
                }
            }
            let mut k = 0;
            while k < q.delayed.len() {
                if all || q.delayed.get(k).is_some_and(|(due, _, _)| *due <= now) {
                    let (_, e, res) = q.delayed.swap_remove(k);
                    self.finish_held(e, res);
                } else {
                    k += 1;
                }
            }
            if !all || q.live == 0 {
                if let (Some(t), Some(next)) = (
                    self.timers.get(queue),
                    q.delayed.iter().map(|(due, _, _)| *due).min(),
                ) {
                    let wait = next
                        .saturating_duration_since(now)
                        .max(Duration::from_micros(1));
                    if let Err(e) = lock(t).reset(wait, None) {
                        log::warn!("blk: queue {queue}: completion delay timer: {e}");
                    }
                }
                return;
            }
            if let Err(e) = q.ring.submit(1) {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) {
                    // Ops at the kernel still run: keep polling, never release early.
                    if failures.is_multiple_of(1000) {
                        log::error!(
                            "blk: queue {queue}: io_uring_enter: {e}; {} ops in flight, polling",
                            q.live
                        );
                    }
                    failures += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }
}
