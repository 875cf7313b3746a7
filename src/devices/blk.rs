//! virtio-blk over a file: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES (`fallocate`);
//! features SEG_MAX, BLK_SIZE, FLUSH, RO, MQ, DISCARD and WRITE_ZEROES (the last two not on a
//! read-only disk).
//!
//! Data moves between the file and guest memory straight into the request scope's mappings
//! or bounce buffers: a batch's reads, writes and flushes are submitted to the queue's
//! io_uring together (one system call) and reaped as they complete, out of order; a FLUSH
//! starts only once everything submitted before it has completed (`IOSQE_IO_DRAIN`). Where
//! the kernel refuses io_uring (old kernel, seccomp, `kernel.io_uring_disabled`), or with
//! [`BlkIo::Sync`], each request is one `preadv`/`pwritev`/`fdatasync`, chosen at run time
//! per queue and logged. Every failure of guest
//! memory or of the file becomes `VIRTIO_BLK_S_IOERR` in the request's status byte; a chain
//! without a writable status byte is completed with used length 0.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use vm_memory::{Address, Bytes, GuestAddress, Permissions};

use super::iov::{aligned, AlignedBuf, GuestIov, IOV_MAX};
use super::uring::{Op, Ring};
use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::daemon::{
    Chain, Request, VhostUserDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::request::RequestMemory;

mod held;
use held::QueueRing;

/// How the device moves data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BlkIo {
    /// A batch submitted to a per-queue io_uring in one system call, reaped out of order;
    /// the synchronous path where the kernel refuses io_uring.
    #[default]
    Uring,
    /// One `preadv`/`pwritev`/`fdatasync` per request.
    Sync,
}

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Discard sectors (the file's blocks are deallocated).
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Write zeroes (deallocated too when the driver allows unmapping).
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Feature bits.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Read-only device.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// `blk_size` in config.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// FLUSH supported.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// `num_queues` in config.
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// DISCARD supported (`max_discard_sectors`, `max_discard_seg`, `discard_sector_alignment`
/// in config).
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
/// WRITE_ZEROES supported (`max_write_zeroes_sectors`, `max_write_zeroes_seg`,
/// `write_zeroes_may_unmap` in config).
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
/// Most sectors one DISCARD or WRITE_ZEROES segment may cover (the config fields): 1 GiB.
pub const MAX_ZERO_SECTORS: u32 = 1 << 21;
/// The `unmap` flag of a WRITE_ZEROES segment.
const WRITE_ZEROES_UNMAP: u32 = 1;

/// Sector size of the protocol (offsets are in 512-byte sectors whatever `blk_size` says).
pub const SECTOR: u64 = 512;
/// Bytes of a request header.
const HEADER_LEN: usize = 16;
/// Length of the GET_ID string.
const ID_LEN: usize = 20;
/// Config space size offered (Linux's `struct virtio_blk_config` with zoned fields).
const CONFIG_LEN: usize = 96;

/// How a block device is set up.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    /// Number of queues.
    pub num_queues: u16,
    /// Largest queue size.
    pub queue_size: u16,
    /// Refuse writes (`VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// Logical block size reported to the guest.
    pub blk_size: u32,
    /// The GET_ID serial (at most 20 bytes are sent).
    pub serial: String,
    /// How data moves.
    pub io: BlkIo,
    /// Open the image with O_DIRECT (no page cache): aligned guest memory goes straight to
    /// the kernel, unaligned memory through an aligned bounce buffer, and a request whose
    /// offset or length the file cannot take directly through a second, buffered descriptor.
    /// Only [`BlkDevice::open`] honours it.
    pub direct: bool,
    /// With `direct`: hold each completed request this long (times 1/2 to 2, varied by
    /// request so they complete out of order) before answering it. Fault injection for crash
    /// tests: a daemon killed meanwhile has that many requests in flight.
    pub completion_delay: Option<std::time::Duration>,
}

impl Default for BlkConfig {
    fn default() -> Self {
        BlkConfig {
            num_queues: 1,
            queue_size: 256,
            read_only: false,
            blk_size: 512,
            serial: "xen-vhost-mem".into(),
            io: BlkIo::default(),
            direct: false,
            completion_delay: None,
        }
    }
}

/// Why a block device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The backing file.
    #[error("{path}: {source}")]
    Open {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A setting out of range.
    #[error("invalid setting: {0}")]
    Config(String),
}

/// A virtio-blk device backed by a file.
#[derive(Debug)]
pub struct BlkDevice {
    file: File,
    sectors: u64,
    config: BlkConfig,
    /// Per queue: its io_uring, made by the queue's worker on first use.
    rings: Vec<Mutex<RingState>>,
    /// The file is open with O_DIRECT: writes go through the ring too, and requests are
    /// held until their completions (`blk/held.rs`).
    direct: Option<Direct>,
    /// Per queue, with O_DIRECT on io_uring: the eventfd its ring writes at every
    /// completion, which the queue's worker watches.
    events: Vec<EventFd>,
    /// Per queue, with a completion delay: the timer that ends the earliest delay.
    timers: Vec<Mutex<TimerFd>>,
    stats: IoCounters,
}

#[derive(Debug, Default)]
struct IoCounters {
    submissions: AtomicU64,
    uring_ops: AtomicU64,
    sync_ops: AtomicU64,
    rings_refused: AtomicU64,
    held: AtomicU64,
}

/// How a block device moved its data so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkIoStats {
    /// Batches submitted to an io_uring (one `io_uring_enter` each when nothing waits).
    pub submissions: u64,
    /// Reads, writes and flushes done through io_uring.
    pub uring_ops: u64,
    /// Reads, writes and flushes done with a system call each.
    pub sync_ops: u64,
    /// Queues whose io_uring the kernel refused.
    pub rings_refused: u64,
    /// Requests held past `serve` until their io_uring completion (O_DIRECT).
    pub held: u64,
}

/// What O_DIRECT needs: the file's alignments, and a buffered descriptor for requests that
/// cannot meet them.
#[derive(Debug)]
struct Direct {
    /// Alignment of memory (`stx_dio_mem_align`).
    mem_align: usize,
    /// Alignment of offsets and lengths (`stx_dio_offset_align`).
    offset_align: u64,
    buffered: File,
}

/// A queue's io_uring.
#[derive(Debug)]
enum RingState {
    /// Not tried yet.
    Untried,
    /// In use.
    Ready(Box<QueueRing>),
    /// Refused by the kernel, or not wanted ([`BlkIo::Sync`]): synchronous I/O.
    Off,
}

/// A request parsed and checked, its data ranges resolved into host iovecs.
enum Prepared<'s> {
    /// Answered already (GET_ID, an error, an unsupported type).
    Done(Outcome),
    /// Data between the file at `offset` and `iov` (through `bounce` when the guest's
    /// memory is not aligned for O_DIRECT).
    Io {
        iov: GuestIov<'s>,
        offset: u64,
        sector: u64,
        to_guest: bool,
        bounce: Option<AlignedBuf>,
    },
    /// FLUSH.
    Flush,
    /// DISCARD or WRITE_ZEROES: `fallocate(mode, offset, len)`.
    Fallocate { mode: i32, offset: u64, len: u64 },
}

/// A chain split into the readable ranges and the writable ones (status byte last).
type Ranges = (Vec<(GuestAddress, usize)>, Vec<(GuestAddress, usize)>);

/// What one request came to: its status and the bytes written into the chain.
struct Outcome {
    status: u8,
    written: u32,
}

impl Outcome {
    fn status(status: u8) -> Self {
        Outcome { status, written: 0 }
    }
}

impl BlkDevice {
    /// Opens `path` (read-write unless `config.read_only`).
    pub fn open(path: &Path, config: BlkConfig) -> Result<Self, BlkError> {
        use std::os::unix::fs::OpenOptionsExt;
        let open = |flags: i32| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(!config.read_only)
                .custom_flags(flags)
                .open(path)
                .map_err(|source| BlkError::Open {
                    path: path.display().to_string(),
                    source,
                })
        };
        let direct = config.direct;
        let file = open(if direct { libc::O_DIRECT } else { 0 })?;
        let direct = if direct {
            let (mem_align, offset_align) = dio_align(&file).map_err(|source| BlkError::Open {
                path: path.display().to_string(),
                source,
            })?;
            Some(Direct {
                mem_align,
                offset_align,
                buffered: open(0)?,
            })
        } else {
            None
        };
        let mut dev = Self::from_file(file, config).map_err(|e| match e {
            BlkError::Open { source, .. } => BlkError::Open {
                path: path.display().to_string(),
                source,
            },
            e => e,
        })?;
        if direct.is_some() && dev.config.io == BlkIo::Uring {
            dev.events = (0..dev.config.num_queues)
                .map(|_| EventFd::new(EFD_NONBLOCK))
                .collect::<std::io::Result<_>>()
                .map_err(|source| BlkError::Open {
                    path: path.display().to_string(),
                    source,
                })?;
        }
        if !dev.events.is_empty() && dev.config.completion_delay.is_some() {
            dev.timers = (0..dev.config.num_queues)
                .map(|_| nonblocking_timer().map(Mutex::new))
                .collect::<std::io::Result<_>>()
                .map_err(|source| BlkError::Open {
                    path: path.display().to_string(),
                    source,
                })?;
        }
        dev.direct = direct;
        Ok(dev)
    }

    /// A device over an open file.
    pub fn from_file(file: File, config: BlkConfig) -> Result<Self, BlkError> {
        if config.num_queues == 0 || !config.queue_size.is_power_of_two() || config.queue_size < 4 {
            return Err(BlkError::Config(format!(
                "{} queues of size {} (need at least one queue, a power-of-two size >= 4)",
                config.num_queues, config.queue_size
            )));
        }
        if config.blk_size < 512 || !config.blk_size.is_power_of_two() {
            return Err(BlkError::Config(format!(
                "block size {} (a power of two >= 512)",
                config.blk_size
            )));
        }
        let len = file
            .metadata()
            .map_err(|source| BlkError::Open {
                path: String::new(),
                source,
            })?
            .len();
        let rings = (0..config.num_queues)
            .map(|_| {
                Mutex::new(match config.io {
                    BlkIo::Uring => RingState::Untried,
                    BlkIo::Sync => RingState::Off,
                })
            })
            .collect();
        Ok(BlkDevice {
            file,
            sectors: len / SECTOR,
            config,
            rings,
            direct: None,
            events: Vec::new(),
            timers: Vec::new(),
            stats: IoCounters::default(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// How data moved so far.
    pub fn io_stats(&self) -> BlkIoStats {
        let c = &self.stats;
        BlkIoStats {
            submissions: c.submissions.load(Ordering::Relaxed),
            uring_ops: c.uring_ops.load(Ordering::Relaxed),
            sync_ops: c.sync_ops.load(Ordering::Relaxed),
            rings_refused: c.rings_refused.load(Ordering::Relaxed),
            held: c.held.load(Ordering::Relaxed),
        }
    }

    /// The chain's readable and writable ranges, or the used length of a chain refused
    /// for breaking virtio's ordering.
    fn ranges(&self, mem: &RequestMemory<'_>, chain: &Chain<'_, '_>) -> Result<Ranges, u32> {
        self.ranges_of(mem, chain.clone())
    }

    /// [`BlkDevice::ranges`] of a list of descriptors.
    fn ranges_of(
        &self,
        mem: &RequestMemory<'_>,
        descs: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    ) -> Result<Ranges, u32> {
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        for d in descs {
            if d.is_write_only() {
                writable.push((d.addr(), d.len() as usize));
            } else if writable.is_empty() {
                readable.push((d.addr(), d.len() as usize));
            } else {
                // A readable descriptor after a writable one breaks virtio's ordering.
                return Err(self.complete(mem, &writable, Outcome::status(VIRTIO_BLK_S_IOERR)));
            }
        }
        Ok((readable, writable))
    }

    fn serve_one(&self, mem: &RequestMemory<'_>, chain: &Chain<'_, '_>) -> u32 {
        let (readable, writable) = match self.ranges(mem, chain) {
            Ok(r) => r,
            Err(used) => return used,
        };
        let outcome = self.run_sync(self.prepare(mem, &readable, &writable));
        self.end(mem, &writable, outcome)
    }

    /// Completes a request with `outcome`.
    fn end(
        &self,
        mem: &RequestMemory<'_>,
        writable: &[(GuestAddress, usize)],
        outcome: Outcome,
    ) -> u32 {
        if outcome.status != VIRTIO_BLK_S_OK {
            // A failed request leaves the guest's buffers as they were (bounce pages): no
            // zeros of `WritableBuffers::Overwrite`, no half-read data. The status byte,
            // written next, counts again.
            for &(addr, len) in writable {
                mem.discard_writes(addr, len);
            }
        }
        self.complete(mem, writable, outcome)
    }

    /// Serves a batch through the queue's io_uring: every read, write and flush submitted
    /// with one system call, completions taken as they come. False when the queue has no
    /// ring (refused, or [`BlkIo::Sync`]): then nothing was done.
    fn serve_uring(
        &self,
        queue: usize,
        mem: &RequestMemory<'_>,
        chains: &[Chain<'_, '_>],
        used: &mut [u32],
    ) -> bool {
        // One request: one plain system call costs less than a submission.
        if chains.len() < 2 {
            return false;
        }
        let Some(slot) = self.rings.get(queue) else {
            return false;
        };
        let mut state = lock(slot);
        let Some(q) = self.ring_of(queue, &mut state) else {
            return false;
        };
        let ring = &mut q.ring;
        let mut reqs = Vec::with_capacity(chains.len());
        for (chain, used) in chains.iter().zip(used.iter_mut()) {
            match self.ranges(mem, chain) {
                Ok((readable, writable)) => {
                    let p = self.prepare(mem, &readable, &writable);
                    reqs.push((writable, p, used));
                }
                Err(u) => *used = u,
            }
        }
        // Buffered writes and fallocate: done here, before the ring's submission (so a FLUSH
        // in the batch still follows them). The kernel cannot do them without blocking
        // (ext4 on 6.18: every buffered write went to an io-wq worker thread,
        // `io_uring:io_uring_queue_async_work`), and the hand-off cost more than the
        // `pwritev` it saves.
        for (_, p, _) in reqs.iter_mut() {
            let inline = match p {
                Prepared::Io { to_guest, .. } => !*to_guest && self.direct.is_none(),
                Prepared::Fallocate { .. } => true,
                _ => false,
            };
            if inline {
                let taken =
                    std::mem::replace(p, Prepared::Done(Outcome::status(VIRTIO_BLK_S_IOERR)));
                *p = Prepared::Done(self.run_sync(taken));
            }
        }
        let mut ops = Vec::with_capacity(reqs.len());
        let mut op_of = Vec::with_capacity(reqs.len());
        for (_, p, _) in &reqs {
            let op = match p {
                Prepared::Io {
                    iov,
                    offset,
                    to_guest,
                    bounce,
                    ..
                } if data_iov(iov, bounce.as_ref()).len() <= IOV_MAX => {
                    let iov = data_iov(iov, bounce.as_ref());
                    if *to_guest {
                        Op::Readv {
                            iov,
                            offset: *offset,
                        }
                    } else {
                        Op::Writev {
                            iov,
                            offset: *offset,
                        }
                    }
                }
                Prepared::Flush => Op::Flush,
                Prepared::Fallocate { mode, offset, len } => Op::Fallocate {
                    mode: *mode,
                    offset: *offset,
                    len: *len,
                },
                // Answered, or more segments than one op takes: the synchronous way.
                _ => {
                    op_of.push(None);
                    continue;
                }
            };
            op_of.push(Some(ops.len()));
            ops.push(op);
        }
        let mut results = Vec::new();
        // SAFETY: every iovec points into guest memory `mem` keeps mapped (or bounced) for its
        // whole life, which outlasts this call; the access was asked with the permission the
        // op needs (written for reads into the guest).
        unsafe { ring.run(self.file.as_raw_fd(), &ops, &mut results) };
        if !ops.is_empty() {
            let done = results.iter().filter(|&&r| r != -libc::ECANCELED).count();
            self.stats.submissions.fetch_add(1, Ordering::Relaxed);
            self.stats
                .uring_ops
                .fetch_add(done as u64, Ordering::Relaxed);
        }
        drop(ops);
        for ((writable, p, used), op) in reqs.into_iter().zip(op_of) {
            // Not submitted (or cancelled): the synchronous way.
            let r = op
                .and_then(|i| results.get(i).copied())
                .filter(|&r| r != -libc::ECANCELED);
            let outcome = match (p, r) {
                (p, None) => self.run_sync(p),
                (Prepared::Fallocate { mode, offset, len }, Some(r)) => {
                    Outcome::status(if r == 0 {
                        VIRTIO_BLK_S_OK
                    } else {
                        log::warn!(
                            "blk: fallocate({mode:#x}) at byte {offset}, {len} bytes: {}",
                            std::io::Error::from_raw_os_error(-r)
                        );
                        VIRTIO_BLK_S_IOERR
                    })
                }
                (Prepared::Flush, Some(r)) => flush_outcome(r),
                (
                    Prepared::Io {
                        iov,
                        offset,
                        sector,
                        to_guest,
                        bounce,
                    },
                    Some(r),
                ) => {
                    if r >= 0 && r as usize == iov.len() {
                        transferred(&iov, to_guest, bounce.as_ref())
                    } else if r >= 0 {
                        // Short: the whole request again, the synchronous way (it finishes
                        // or says why not).
                        self.run_sync(Prepared::Io {
                            iov,
                            offset,
                            sector,
                            to_guest,
                            bounce,
                        })
                    } else {
                        let what = if to_guest { "read" } else { "write" };
                        log::warn!(
                            "blk: {what} at sector {sector}: {}",
                            std::io::Error::from_raw_os_error(-r)
                        );
                        Outcome::status(VIRTIO_BLK_S_IOERR)
                    }
                }
                (Prepared::Done(o), Some(_)) => o,
            };
            *used = self.end(mem, &writable, outcome);
        }
        true
    }

    /// The queue's ring, made on first use (by the queue's worker, so under its seccomp
    /// allowlist); `None` where the kernel refuses io_uring or with [`BlkIo::Sync`].
    fn ring_of<'a>(&self, queue: usize, state: &'a mut RingState) -> Option<&'a mut QueueRing> {
        if let RingState::Untried = *state {
            *state = match Ring::new().and_then(|r| {
                if let Some(ev) = self.events.get(queue) {
                    r.register_eventfd(ev.as_raw_fd())?;
                }
                Ok(r)
            }) {
                Ok(r) => {
                    log::info!(
                        "blk: queue {queue}: io_uring{}",
                        if self.events.is_empty() {
                            ""
                        } else {
                            ", requests held until their completions"
                        }
                    );
                    RingState::Ready(Box::new(QueueRing::new(r)))
                }
                Err(e) => {
                    self.stats.rings_refused.fetch_add(1, Ordering::Relaxed);
                    log::warn!("blk: queue {queue}: io_uring refused ({e}): synchronous I/O");
                    RingState::Off
                }
            };
        }
        match state {
            RingState::Ready(q) => Some(q),
            _ => None,
        }
    }

    /// Serves a held request with plain system calls and completes it (a resubmitted one, or
    /// one the queue's io_uring could not take).
    fn serve_request_sync(&self, request: Request) {
        let used = {
            let Ok(scope) = request.scope() else { return };
            let Some(mem) = scope.memory() else { return };
            match self.ranges_of(mem, request.descriptors().iter().copied()) {
                Ok((readable, writable)) => {
                    let outcome = self.run_sync(self.prepare(mem, &readable, &writable));
                    self.end(mem, &writable, outcome)
                }
                Err(used) => used,
            }
        };
        let _ = request.complete(used);
    }

    /// Writes the status byte (the last writable byte); the used length counts it.
    fn complete(
        &self,
        mem: &RequestMemory<'_>,
        writable: &[(GuestAddress, usize)],
        outcome: Outcome,
    ) -> u32 {
        let Some(&(addr, len)) = writable.last() else {
            return 0;
        };
        let Some(status_addr) = len
            .checked_sub(1)
            .and_then(|off| addr.0.checked_add(off as u64))
        else {
            return 0;
        };
        match mem.write_obj(outcome.status, GuestAddress(status_addr)) {
            Ok(()) => outcome.written.saturating_add(1),
            Err(e) => {
                log::debug!("blk: status byte at {status_addr:#x}: {e}");
                0
            }
        }
    }

    /// Parses the request and resolves its data into host iovecs.
    fn prepare<'s>(
        &self,
        mem: &'s RequestMemory<'_>,
        readable: &[(GuestAddress, usize)],
        writable: &[(GuestAddress, usize)],
    ) -> Prepared<'s> {
        let mut header = [0u8; HEADER_LEN];
        let Some(data_in) = gather(mem, readable, &mut header) else {
            return Prepared::Done(Outcome::status(VIRTIO_BLK_S_IOERR));
        };
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        // Device-writable bytes before the status byte.
        let data_out = without_last_byte(writable);
        match kind {
            VIRTIO_BLK_T_IN => self.transfer(mem, sector, &data_out, true),
            VIRTIO_BLK_T_OUT if self.config.read_only => {
                Prepared::Done(Outcome::status(VIRTIO_BLK_S_IOERR))
            }
            VIRTIO_BLK_T_OUT => self.transfer(mem, sector, &data_in, false),
            VIRTIO_BLK_T_FLUSH => Prepared::Flush,
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if self.config.read_only => {
                Prepared::Done(Outcome::status(VIRTIO_BLK_S_IOERR))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                self.zero_range(mem, kind, &data_in)
            }
            VIRTIO_BLK_T_GET_ID => Prepared::Done(self.get_id(mem, &data_out)),
            _ => Prepared::Done(Outcome::status(VIRTIO_BLK_S_UNSUPP)),
        }
    }

    /// A DISCARD or WRITE_ZEROES request: one 16-byte segment (`max_*_seg` is 1) of sector,
    /// sector count and flags, checked against the disk and the config's limits.
    fn zero_range<'s>(
        &self,
        mem: &RequestMemory<'_>,
        kind: u32,
        data: &[(GuestAddress, usize)],
    ) -> Prepared<'s> {
        let mut seg = [0u8; 16];
        let total: usize = data.iter().map(|&(_, l)| l).sum();
        if total != seg.len() || gather(mem, data, &mut seg).is_none() {
            // No segment, or more than the one the config allows.
            return Prepared::Done(Outcome::status(VIRTIO_BLK_S_IOERR));
        }
        let mut w = [0u8; 8];
        w.copy_from_slice(&seg[..8]);
        let sector = u64::from_le_bytes(w);
        let count = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        let allowed = if kind == VIRTIO_BLK_T_DISCARD {
            0
        } else {
            WRITE_ZEROES_UNMAP
        };
        if flags & !allowed != 0 {
            return Prepared::Done(Outcome::status(VIRTIO_BLK_S_UNSUPP));
        }
        let len = u64::from(count) * SECTOR;
        let offset = match self.offset(sector, len as usize) {
            Some(o) if count <= MAX_ZERO_SECTORS => o,
            _ => return Prepared::Done(Outcome::status(VIRTIO_BLK_S_IOERR)),
        };
        // Discarding, or zeroing where unmapping is allowed, deallocates: the range reads
        // back as zeroes either way.
        let mode = if kind == VIRTIO_BLK_T_DISCARD || flags & WRITE_ZEROES_UNMAP != 0 {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        Prepared::Fallocate { mode, offset, len }
    }

    /// Does a prepared request with plain system calls.
    fn run_sync(&self, p: Prepared<'_>) -> Outcome {
        if !matches!(p, Prepared::Done(_)) {
            self.stats.sync_ops.fetch_add(1, Ordering::Relaxed);
        }
        match p {
            Prepared::Done(o) => o,
            Prepared::Flush => {
                // SAFETY: fdatasync on a file descriptor we own.
                let r = unsafe { libc::fdatasync(self.file.as_raw_fd()) };
                Outcome::status(if r == 0 {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                })
            }
            Prepared::Fallocate { mode, offset, len } => {
                let r = match (i64::try_from(offset), i64::try_from(len)) {
                    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
                    (Ok(o), Ok(l)) => unsafe { libc::fallocate(self.file.as_raw_fd(), mode, o, l) },
                    _ => -1,
                };
                if r == 0 {
                    Outcome::status(VIRTIO_BLK_S_OK)
                } else {
                    log::warn!(
                        "blk: fallocate({mode:#x}) at byte {offset}, {len} bytes: {}",
                        std::io::Error::last_os_error()
                    );
                    Outcome::status(VIRTIO_BLK_S_IOERR)
                }
            }
            Prepared::Io {
                iov,
                offset,
                sector,
                to_guest,
                bounce,
            } => self.sync_io(&self.file, &iov, bounce.as_ref(), offset, sector, to_guest),
        }
    }

    /// One positioned transfer on `file`, through `bounce` if there is one.
    fn sync_io(
        &self,
        file: &File,
        iov: &GuestIov<'_>,
        bounce: Option<&AlignedBuf>,
        offset: u64,
        sector: u64,
        to_guest: bool,
    ) -> Outcome {
        match positioned_io(file, data_iov(iov, bounce), offset, !to_guest) {
            Ok(()) => transferred(iov, to_guest, bounce),
            Err(e) => {
                let what = if to_guest { "read" } else { "write" };
                log::warn!("blk: {what} at sector {sector}: {e}");
                Outcome::status(VIRTIO_BLK_S_IOERR)
            }
        }
    }

    /// Byte offset of `len` bytes at `sector`, when they fit the disk.
    fn offset(&self, sector: u64, len: usize) -> Option<u64> {
        let start = sector.checked_mul(SECTOR)?;
        let end = start.checked_add(len as u64)?;
        (end <= self.sectors * SECTOR).then_some(start)
    }

    /// Resolves the data of a request between the disk at `sector` and guest `ranges`: into
    /// the guest for IN (`to_guest`), out of it for OUT.
    fn transfer<'s>(
        &self,
        mem: &'s RequestMemory<'_>,
        sector: u64,
        ranges: &[(GuestAddress, usize)],
        to_guest: bool,
    ) -> Prepared<'s> {
        let access = if to_guest {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let mut iov = GuestIov::default();
        for &(addr, len) in ranges {
            if iov.push(mem, addr, len, access).is_err() {
                return Prepared::Done(Outcome::status(VIRTIO_BLK_S_IOERR));
            }
        }
        let Some(offset) = self.offset(sector, iov.len()) else {
            return Prepared::Done(Outcome::status(VIRTIO_BLK_S_IOERR));
        };
        let mut bounce = None;
        if let Some(d) = &self.direct {
            let len = iov.len();
            if !offset.is_multiple_of(d.offset_align)
                || !(len as u64).is_multiple_of(d.offset_align)
                || len == 0
            {
                // O_DIRECT cannot take it: the buffered descriptor, now.
                self.stats.sync_ops.fetch_add(1, Ordering::Relaxed);
                return Prepared::Done(self.sync_io(
                    &d.buffered,
                    &iov,
                    None,
                    offset,
                    sector,
                    to_guest,
                ));
            }
            let align = d.offset_align as usize;
            if !aligned(iov.as_slice(), d.mem_align, align) {
                let Some(mut b) = AlignedBuf::new(len, d.mem_align.max(align)) else {
                    return Prepared::Done(Outcome::status(VIRTIO_BLK_S_IOERR));
                };
                if !to_guest {
                    b.fill_from(&iov);
                }
                bounce = Some(b);
            }
        }
        Prepared::Io {
            iov,
            offset,
            sector,
            to_guest,
            bounce,
        }
    }

    fn get_id(&self, mem: &RequestMemory<'_>, ranges: &[(GuestAddress, usize)]) -> Outcome {
        let mut id = [0u8; ID_LEN];
        let serial = self.config.serial.as_bytes();
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial[..n]);
        let mut left: &[u8] = &id;
        let mut written = 0u32;
        for &(addr, len) in ranges {
            if left.is_empty() {
                break;
            }
            let k = len.min(left.len());
            if mem.write_slice(&left[..k], addr).is_err() {
                return Outcome::status(VIRTIO_BLK_S_IOERR);
            }
            left = &left[k..];
            written += k as u32;
        }
        Outcome {
            status: VIRTIO_BLK_S_OK,
            written,
        }
    }
}

/// A timer whose read never blocks: the worker reads it when epoll says it fired, and a
/// re-arm in between may have cleared it.
fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let t = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let r = unsafe { libc::fcntl(t.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(t)
}

/// The outcome of a FLUSH whose `fdatasync` returned `r` (0, or `-errno`) through io_uring.
fn flush_outcome(r: i32) -> Outcome {
    if r == 0 {
        return Outcome::status(VIRTIO_BLK_S_OK);
    }
    log::warn!("blk: flush: {}", std::io::Error::from_raw_os_error(-r));
    Outcome::status(VIRTIO_BLK_S_IOERR)
}

/// Locks `m`, also after a thread panicked holding it (a ring's state is whole at every
/// unlock).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The iovecs the kernel moves data through: the bounce buffer's, or the guest's.
fn data_iov<'a>(iov: &'a GuestIov<'_>, bounce: Option<&'a AlignedBuf>) -> &'a [libc::iovec] {
    match bounce {
        Some(b) => b.iov(),
        None => iov.as_slice(),
    }
}

/// The outcome of a whole transfer (a read through a bounce buffer emptied into the guest):
/// an IN request's used length counts the data it wrote.
fn transferred(iov: &GuestIov<'_>, to_guest: bool, bounce: Option<&AlignedBuf>) -> Outcome {
    if let (true, Some(b)) = (to_guest, bounce) {
        b.empty_into(iov);
    }
    Outcome {
        status: VIRTIO_BLK_S_OK,
        written: if to_guest {
            u32::try_from(iov.len()).unwrap_or(u32::MAX)
        } else {
            0
        },
    }
}

/// The file's O_DIRECT alignments (memory, offset and length), from `statx`.
fn dio_align(file: &File) -> std::io::Result<(usize, u64)> {
    // SAFETY: all-zero is a valid `statx`.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, an empty C path with AT_EMPTY_PATH, and a `statx` we own.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (mem, off) = (st.stx_dio_mem_align, st.stx_dio_offset_align);
    if st.stx_mask & libc::STATX_DIOALIGN == 0 || mem == 0 || off == 0 {
        // The kernel or the file system does not say: the page size covers every device.
        return Ok((4096, 4096));
    }
    if !mem.is_power_of_two() || !off.is_power_of_two() {
        return Err(std::io::Error::other(format!(
            "O_DIRECT alignment {mem}/{off} is not a power of two"
        )));
    }
    Ok((mem as usize, u64::from(off)))
}

/// Reads the first `header.len()` bytes of `ranges` into `header`; returns the ranges after
/// them, or `None` when the header is short or unreadable.
fn gather(
    mem: &RequestMemory<'_>,
    ranges: &[(GuestAddress, usize)],
    header: &mut [u8],
) -> Option<Vec<(GuestAddress, usize)>> {
    let mut filled = 0;
    let mut rest = Vec::new();
    for &(addr, len) in ranges {
        if filled < header.len() {
            let k = len.min(header.len() - filled);
            mem.read_slice(header.get_mut(filled..filled + k)?, addr)
                .ok()?;
            filled += k;
            if k < len {
                rest.push((addr.checked_add(k as u64)?, len - k));
            }
        } else {
            rest.push((addr, len));
        }
    }
    (filled == header.len()).then_some(rest)
}

/// `ranges` without their last byte (the status byte).
fn without_last_byte(ranges: &[(GuestAddress, usize)]) -> Vec<(GuestAddress, usize)> {
    let mut v = ranges.to_vec();
    if let Some(last) = v.last_mut() {
        last.1 = last.1.saturating_sub(1);
        if last.1 == 0 {
            v.pop();
        }
    }
    v
}

/// Moves all of `iov` from or to the file at `offset`, `IOV_MAX` segments per call.
fn positioned_io(
    file: &File,
    iov: &[libc::iovec],
    offset: u64,
    write: bool,
) -> std::io::Result<()> {
    let mut offset = offset;
    for chunk in iov.chunks(IOV_MAX) {
        let want: usize = chunk.iter().map(|v| v.iov_len).sum();
        let off =
            i64::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec points into guest memory held alive by the request scope that
        // `iov` borrows, with the permission the access asked for; the kernel checks the rest.
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), chunk.as_ptr(), chunk.len() as i32, off)
            } else {
                libc::preadv(file.as_raw_fd(), chunk.as_ptr(), chunk.len() as i32, off)
            }
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n as usize != want {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{n} of {want} bytes at offset {offset}"),
            ));
        }
        offset += want as u64;
    }
    Ok(())
}

impl VhostUserDevice for BlkDevice {
    fn num_queues(&self) -> usize {
        usize::from(self.config.num_queues)
    }

    fn max_queue_size(&self) -> u16 {
        self.config.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_MQ;
        if self.config.read_only {
            f |= VIRTIO_BLK_F_RO;
        } else {
            f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        // seg_max: descriptors of a chain less header and status.
        let seg_max = u32::from(self.config.queue_size) - 2;
        c[12..16].copy_from_slice(&seg_max.to_le_bytes());
        c[20..24].copy_from_slice(&self.config.blk_size.to_le_bytes());
        c[34..36].copy_from_slice(&self.config.num_queues.to_le_bytes());
        // DISCARD: max_discard_sectors, max_discard_seg, discard_sector_alignment (in
        // sectors: the block size).
        let align = self.config.blk_size / SECTOR as u32;
        c[36..40].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&align.to_le_bytes());
        // WRITE_ZEROES: max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap.
        c[48..52].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        c[56] = 1;
        c
    }

    fn worker_syscalls(&self) -> Vec<crate::daemon::threads::DeviceSyscall> {
        // One positioned vector call per request, and FLUSH (the synchronous path, buffered
        // writes, resubmitted requests); the queue's io_uring (set up on first use, entered
        // once per batch; register is the crate's); DISCARD and WRITE_ZEROES; the pause
        // between polls if io_uring_enter ever fails while ops are in flight.
        vec![
            crate::device_syscall!(SYS_preadv),
            crate::device_syscall!(SYS_pwritev),
            crate::device_syscall!(SYS_fdatasync),
            crate::device_syscall!(SYS_io_uring_setup),
            crate::device_syscall!(SYS_io_uring_enter),
            crate::device_syscall!(SYS_io_uring_register),
            crate::device_syscall!(SYS_fallocate),
            crate::device_syscall!(SYS_clock_nanosleep),
            // The completion delay's timer.
            crate::device_syscall!(SYS_timerfd_settime),
        ]
    }

    fn serve_chain(&self, _queue: usize, mem: &RequestMemory<'_>, chain: &Chain<'_, '_>) -> u32 {
        self.serve_one(mem, chain)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    /// A request in flight when the last daemon or connection ended: served again, the
    /// synchronous way (reads and writes are idempotent, FLUSH too).
    fn resubmit(&self, _queue: usize, request: Request) {
        self.serve_request_sync(request);
    }

    /// With O_DIRECT on io_uring, requests are held until their completions (`blk/held.rs`).
    fn serve_batch(&self, queue: usize, batch: &mut crate::daemon::Batch<'_, '_, '_>) {
        if !self.events.is_empty() && self.serve_held(queue, batch) {
            return;
        }
        let (mem, chains, used) = batch.parts();
        self.serve(queue, mem, chains, used);
    }

    /// The ring's eventfd (token 0) and, with a completion delay, its timer (token 1).
    fn queue_events(&self, queue: usize) -> Vec<(std::os::fd::RawFd, u64)> {
        let mut v: Vec<_> = self
            .events
            .get(queue)
            .map(|e| (e.as_raw_fd(), 0))
            .into_iter()
            .collect();
        if let Some(t) = self.timers.get(queue) {
            v.push((lock(t).as_raw_fd(), 1));
        }
        v
    }

    fn handle_event(&self, queue: usize, token: u64) {
        if let (1, Some(t)) = (token, self.timers.get(queue)) {
            // Fired (or re-armed since: then the read finds nothing and says so).
            let _ = lock(t).wait();
        }
        self.reap_held(queue, false);
    }

    fn quiesce(&self, queue: usize) {
        self.reap_held(queue, true);
    }

    /// As many as the ring's completion queue holds (twice its submission queue), so no
    /// completion waits for room.
    fn max_held(&self, _queue: usize) -> usize {
        2 * Ring::ENTRIES as usize
    }

    fn serve(
        &self,
        queue: usize,
        mem: &RequestMemory<'_>,
        chains: &mut [Chain<'_, '_>],
        used: &mut [u32],
    ) {
        if self.serve_uring(queue, mem, chains, used) {
            return;
        }
        for (chain, used) in chains.iter().zip(used.iter_mut()) {
            *used = self.serve_one(mem, chain);
        }
    }
}
