//! One io_uring per queue for the blk device: a batch's file operations are submitted with one
//! `io_uring_enter` and reaped as they complete, in any order.
//!
//! Why io_uring (the `io-uring` crate) and not Linux AIO or a thread pool: buffered and
//! O_DIRECT I/O alike, vectored reads and writes, fsync and fallocate in one submission, and
//! page-cache hits completed inline at submit, so a batch of n requests costs one system call
//! instead of n `preadv`/`pwritev`.

use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types, IoUring};

/// One file operation of a batch.
#[derive(Debug)]
pub(crate) enum Op<'a> {
    /// `preadv` at `offset` into the iovecs.
    Readv {
        /// Where the bytes go.
        iov: &'a [libc::iovec],
        /// File offset.
        offset: u64,
    },
    /// `pwritev` at `offset` from the iovecs.
    Writev {
        /// Where the bytes come from.
        iov: &'a [libc::iovec],
        /// File offset.
        offset: u64,
    },
    /// `fdatasync`, started only once every operation submitted before it has completed.
    Flush,
    /// `fallocate(mode, offset, len)` (DISCARD, WRITE_ZEROES).
    Fallocate {
        /// `FALLOC_FL_*`.
        mode: i32,
        /// File offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

/// A ring of [`Ring::ENTRIES`] entries.
pub(crate) struct Ring(IoUring);

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ring")
    }
}

impl Ring {
    /// Entries per ring: a worker's largest batch.
    pub(crate) const ENTRIES: u32 = crate::daemon::MAX_BATCH as u32;

    /// A ring, or why the kernel refused one (`ENOSYS` on old kernels, `EPERM` under
    /// seccomp or `kernel.io_uring_disabled`).
    pub(crate) fn new() -> std::io::Result<Self> {
        IoUring::new(Self::ENTRIES).map(Ring)
    }

    /// Tells the kernel to write `fd` (an eventfd) at every completion, so a queue worker
    /// waiting in epoll learns of them ([`crate::daemon::VhostUserDevice::queue_events`]).
    pub(crate) fn register_eventfd(&self, fd: RawFd) -> std::io::Result<()> {
        self.0.submitter().register_eventfd(fd)
    }

    /// Queues `op` on `fd` with `user_data`, to be submitted by the next
    /// [`Ring::submit`]; false when the submission queue is full.
    ///
    /// # Safety
    /// The op's iovec array and the memory it points at stay valid until its completion has
    /// been reaped.
    pub(crate) unsafe fn push(&mut self, fd: RawFd, op: &Op<'_>, user_data: u64) -> bool {
        let fd = types::Fd(fd);
        let e = match *op {
            Op::Readv { iov, offset } => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(offset)
                .build(),
            Op::Writev { iov, offset } => opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(offset)
                .build(),
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
            Op::Fallocate { mode, offset, len } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(mode)
                .build(),
        };
        // SAFETY: the caller keeps the iovecs and their memory valid until the completion.
        unsafe { self.0.submission().push(&e.user_data(user_data)) }.is_ok()
    }

    /// Submits what [`Ring::push`] queued, waiting for `wait` completions (0: none).
    pub(crate) fn submit(&mut self, wait: usize) -> std::io::Result<usize> {
        self.0.submit_and_wait(wait)
    }

    /// Takes every completion posted so far: `f(user_data, result)` each, in posting order.
    pub(crate) fn reap(&mut self, mut f: impl FnMut(u64, i32)) {
        for cqe in self.0.completion() {
            f(cqe.user_data(), cqe.result());
        }
    }

    /// Runs `ops` on `fd`: submits them all with one system call and waits until every one
    /// has completed; `results[i]` is op `i`'s result (bytes, or `-errno`). At most
    /// [`Ring::ENTRIES`] ops.
    ///
    /// # Safety
    /// Every iovec of `ops` points at memory valid for the access for the whole call. (The
    /// call returns only once the kernel has completed every submitted op, so no op outlives
    /// it.)
    pub(crate) unsafe fn run(&mut self, fd: RawFd, ops: &[Op<'_>], results: &mut Vec<i32>) {
        results.clear();
        results.resize(ops.len(), -libc::ECANCELED);
        let mut submitted = 0usize;
        for (i, op) in ops.iter().enumerate() {
            // SAFETY: the caller's contract, and we reap every op before returning.
            if !unsafe { self.push(fd, op, i as u64) } {
                // Full: the rest keep -ECANCELED and go the synchronous way.
                break;
            }
            submitted += 1;
        }
        let mut reaped = 0usize;
        let mut failures = 0u32;
        while reaped < submitted {
            if let Err(e) = self.0.submit_and_wait(1) {
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
                    _ => {
                        // Submitted ops may still run: keep reaping, never return early.
                        failures += 1;
                        if failures == 1 {
                            log::error!("blk: io_uring_enter: {e}; polling the completions");
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
            for cqe in self.0.completion() {
                if let Some(r) = results.get_mut(cqe.user_data() as usize) {
                    *r = cqe.result();
                }
                reaped += 1;
            }
        }
    }
}
