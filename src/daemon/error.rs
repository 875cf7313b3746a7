//! Errors of the daemon runtime: why a frontend message was refused. Each carries the
//! offending value; the frontend gets an error reply and the daemon keeps serving.

use crate::descriptor::DescriptorError;
use crate::region::RegionError;
use crate::table::TableError;

/// Why a vhost-user message was refused.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// `GET_INFLIGHT_FD` or `SET_INFLIGHT_FD` could not set the region up.
    #[error(transparent)]
    Inflight(#[from] super::inflight::InflightError),
    /// A thread of the daemon could not be spawned or sandboxed.
    #[error("sandbox: {0}")]
    Sandbox(#[from] super::threads::SandboxError),
    /// A vring index beyond the device's queues.
    #[error("vring index {index} out of range: the device has {queues} queues")]
    QueueIndex {
        /// Index sent.
        index: u32,
        /// Queues the device has.
        queues: usize,
    },
    /// `SET_VRING_NUM` with a size that is zero, not a power of two, or above the maximum.
    #[error("vring {queue}: size {num} invalid (a power of two from 1 to {max})")]
    QueueSize {
        /// Queue.
        queue: u32,
        /// Size sent.
        num: u32,
        /// Device maximum.
        max: u16,
    },
    /// A ring address (frontend virtual address) in no region.
    #[error("vring {queue}: {ring} address {uaddr:#x} is in no memory region")]
    RingAddress {
        /// Queue.
        queue: u32,
        /// Which part of the ring.
        ring: &'static str,
        /// Address sent.
        uaddr: u64,
    },
    /// A ring that is not wholly inside one region mapped in advance (on-demand memory, a
    /// gap, or past a region's end).
    #[error("vring {queue}: {ring} at gpa {gpa:#x} ({len:#x} bytes) is not inside a region mapped in advance or lazily mapped FOREIGN region")]
    RingNotMapped {
        /// Queue.
        queue: u32,
        /// Which part of the ring.
        ring: &'static str,
        /// Its guest address.
        gpa: u64,
        /// Its length for the current queue size.
        len: u64,
    },
    /// A ring in a lazily mapped FOREIGN region whose buckets could not be mapped (a frame
    /// missing, the handle's bucket bound reached).
    #[error("vring {queue}: {ring} at gpa {gpa:#x}: {source}")]
    RingPin {
        /// Queue.
        queue: u32,
        /// Which part of the ring.
        ring: &'static str,
        /// Its guest address.
        gpa: u64,
        /// Why its buckets could not be mapped.
        source: crate::backend::BackendError,
    },
    /// The ring addresses were refused by virtio-queue (alignment).
    #[error("vring {queue}: ring addresses desc {desc:#x} avail {avail:#x} used {used:#x} refused: {reason}")]
    RingAlignment {
        /// Queue.
        queue: u32,
        /// Descriptor table gpa.
        desc: u64,
        /// Avail ring gpa.
        avail: u64,
        /// Used ring gpa.
        used: u64,
        /// virtio-queue's reason.
        reason: String,
    },
    /// A kick, call or error fd that is not an eventfd (a socket, a pipe, a file...): the
    /// worker could block on it or get SIGPIPE from it.
    #[error("vring {queue}: the {role} fd is not an eventfd but {kind}")]
    NotAnEventFd {
        /// Queue.
        queue: u8,
        /// `kick`, `call` or `err`.
        role: &'static str,
        /// What it is instead (procfs's name for it, e.g. `socket:[1234]`).
        kind: String,
    },
    /// `SET_VRING_BASE` with a base beyond 16 bits.
    #[error("vring {queue}: base {base:#x} does not fit a split ring index")]
    QueueBase {
        /// Queue.
        queue: u32,
        /// Base sent.
        base: u32,
    },
    /// A wire region failed validation.
    #[error("memory region {index}: {source}")]
    Descriptor {
        /// Position in the message.
        index: usize,
        /// What was wrong.
        source: DescriptorError,
    },
    /// A region could not be mapped.
    #[error("memory region {index} at gpa {gpa:#x}: {source}")]
    Region {
        /// Position in the message.
        index: usize,
        /// Its gpa.
        gpa: u64,
        /// Why.
        source: RegionError,
    },
    /// Regions overlap, or `REM_MEM_REG` named an absent one.
    #[error(transparent)]
    Table(#[from] TableError),
    /// More regions than memory slots.
    #[error("{count} memory regions exceed the {max} memory slots")]
    TooManyRegions {
        /// Regions the table would hold.
        count: usize,
        /// Slots offered in `GET_MAX_MEM_SLOTS`.
        max: usize,
    },
    /// `SET_FEATURES` with bits the daemon did not offer.
    #[error("features {acked:#x} include bits not offered ({offered:#x})")]
    Features {
        /// Bits acked.
        acked: u64,
        /// Bits offered.
        offered: u64,
    },
    /// `GET_CONFIG`/`SET_CONFIG` outside the config space.
    #[error("config window offset {offset} size {size} is outside the {len}-byte config space")]
    ConfigRange {
        /// Offset asked for.
        offset: u32,
        /// Size asked for.
        size: u32,
        /// Config space size.
        len: usize,
    },
    /// The device refused `SET_CONFIG`.
    #[error("SET_CONFIG at offset {offset}: {source}")]
    SetConfig {
        /// Offset.
        offset: u32,
        /// The device's reason.
        source: std::io::Error,
    },
    /// A queue worker thread could not be started.
    #[error("vring {queue}: cannot start its worker: {source}")]
    Worker {
        /// Queue.
        queue: usize,
        /// Why.
        source: std::io::Error,
    },
    /// A message the daemon does not implement.
    #[error("{0} is not supported")]
    Unsupported(&'static str),
    /// A lock was poisoned by a panicking thread.
    #[error("{0} lock poisoned")]
    Poisoned(&'static str),
}

impl From<DaemonError> for vhost::vhost_user::Error {
    fn from(e: DaemonError) -> Self {
        log::warn!("refused: {e}");
        vhost::vhost_user::Error::ReqHandlerError(std::io::Error::other(e))
    }
}
