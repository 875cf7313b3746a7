//! In-flight tracking across reconnects (vhost-user `INFLIGHT_SHMFD`, split queues).
//!
//! `GET_INFLIGHT_FD` gives the frontend a sealed memfd; `SET_INFLIGHT_FD` maps the one it
//! keeps across daemon restarts. Per queue, the spec's split-queue region: a 16-byte header
//! (`features` u64, `version` u16, `desc_num` u16, `last_batch_head` u16, `used_idx` u16)
//! then one 16-byte `DescStateSplit` per descriptor (`inflight` u8, 5 bytes padding, `next`
//! u16, `counter` u64), inline. (vhost 0.18's `QueueRegionSplit` declares `desc` as a
//! pointer; the offsets here are computed.) Each queue's area is rounded up to 64 bytes, as
//! libvhost-user does.
//!
//! The worker marks an entry when it pops the chain and clears it when the chain is used, in
//! the spec's order (`last_batch_head`, the used entry and index, `inflight = 0`,
//! `used_idx`); a queue started over a region in use resubmits what was in flight, in
//! counter order, before popping new chains.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// Bytes of a queue's header.
const HEADER: usize = 16;
/// Bytes of one descriptor's state.
const DESC: usize = 16;
/// Version written into a region this daemon set up.
const VERSION: u16 = 1;

/// Why an in-flight region could not be made or mapped.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// A queue count or size of zero, a size that is not a power of two, or more queues or a
    /// larger size than the device has.
    #[error("in-flight region for {queues} queues of size {size}: invalid layout")]
    Layout {
        /// Queues asked for.
        queues: u16,
        /// Queue size asked for.
        size: u16,
    },
    /// `SET_INFLIGHT_FD` with a size smaller than the queues need.
    #[error("in-flight region of {got} bytes; {queues} queues of size {size} need {need}")]
    TooSmall {
        /// `mmap_size` sent.
        got: u64,
        /// Bytes needed.
        need: u64,
        /// Queues.
        queues: u16,
        /// Queue size.
        size: u16,
    },
    /// memfd_create, ftruncate, sealing or mmap failed.
    #[error("in-flight region: {what}: {source}")]
    Os {
        /// The step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

fn os(what: &'static str) -> InflightError {
    InflightError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// Bytes of one queue's area.
pub(crate) fn queue_bytes(size: u16) -> usize {
    (HEADER + DESC * usize::from(size)).next_multiple_of(64)
}

/// A mapped in-flight region.
#[derive(Debug)]
pub(crate) struct InflightRegion {
    ptr: NonNull<u8>,
    len: usize,
    queues: u16,
    size: u16,
}

// SAFETY: the pointer is a shared mapping this value owns (unmapped on drop); all access goes
// through volatile reads and writes of plain integers, each queue's area by that queue's one
// worker at a time.
unsafe impl Send for InflightRegion {}
// SAFETY: as above.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// A fresh region for `queues` queues of `size` descriptors in a sealed memfd (zeroed),
    /// and the memfd to send.
    pub(crate) fn create(queues: u16, size: u16) -> Result<(Self, File), InflightError> {
        if queues == 0 || size == 0 || !size.is_power_of_two() {
            return Err(InflightError::Layout { queues, size });
        }
        let len = usize::from(queues) * queue_bytes(size);
        // SAFETY: a NUL-terminated name and plain flags.
        let fd = unsafe {
            libc::memfd_create(
                c"vhost-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `fd` was just returned by memfd_create and nobody else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)
            .map_err(|source| InflightError::Os {
                what: "ftruncate",
                source,
            })?;
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(os("F_ADD_SEALS"));
        }
        let region = Self::map(&file, 0, len, queues, size)?;
        Ok((region, file))
    }

    /// Maps the region the frontend sent (`SET_INFLIGHT_FD`).
    pub(crate) fn open(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        queues: u16,
        size: u16,
    ) -> Result<Self, InflightError> {
        if queues == 0 || size == 0 || !size.is_power_of_two() {
            return Err(InflightError::Layout { queues, size });
        }
        let need = (usize::from(queues) * queue_bytes(size)) as u64;
        if mmap_size < need {
            return Err(InflightError::TooSmall {
                got: mmap_size,
                need,
                queues,
                size,
            });
        }
        Self::map(file, mmap_offset, need as usize, queues, size)
    }

    fn map(
        file: &File,
        offset: u64,
        len: usize,
        queues: u16,
        size: u16,
    ) -> Result<Self, InflightError> {
        let off = libc::off_t::try_from(offset).map_err(|_| InflightError::Os {
            what: "mmap offset",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // SAFETY: a fresh shared mapping of `len` bytes of a file we hold; the kernel checks
        // the offset and the file's size (an access past its end would fault, so the caller's
        // file is checked below).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let region = InflightRegion {
            ptr: NonNull::new(p.cast()).ok_or_else(|| os("mmap"))?,
            len,
            queues,
            size,
        };
        // A file shorter than the mapping would fault (SIGBUS) at the first access.
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if file_len < offset.saturating_add(len as u64) {
            return Err(InflightError::TooSmall {
                got: file_len.saturating_sub(offset),
                need: len as u64,
                queues,
                size,
            });
        }
        Ok(region)
    }

    /// Queue `q`'s area, if the region has one that size.
    pub(crate) fn queue(self: &Arc<Self>, q: usize, size: u16) -> Option<InflightQueue> {
        if q >= usize::from(self.queues) || size != self.size {
            return None;
        }
        Some(InflightQueue {
            region: self.clone(),
            offset: q * queue_bytes(self.size),
            size,
        })
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One queue's area of an in-flight region.
#[derive(Debug, Clone)]
pub(crate) struct InflightQueue {
    region: Arc<InflightRegion>,
    offset: usize,
    size: u16,
}

/// What a queue started over an in-flight region must do first.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovery {
    /// Heads in flight, in counter order: resubmit them.
    pub(crate) heads: Vec<u16>,
    /// The counter to continue from.
    pub(crate) next_counter: u64,
}

impl InflightQueue {
    fn at(&self, off: usize, n: usize) -> Option<*mut u8> {
        let start = self.offset.checked_add(off)?;
        (start.checked_add(n)? <= self.region.len && off + n <= queue_bytes(self.size))
            // SAFETY: inside the mapping (checked).
            .then(|| unsafe { self.region.ptr.as_ptr().add(start) })
    }

    fn read16(&self, off: usize) -> u16 {
        let Some(p) = self.at(off, 2) else { return 0 };
        // SAFETY: `at` checked the bounds; offsets are even and the mapping page aligned; a
        // volatile read of a shared mapping.
        u16::from_le(unsafe { p.cast::<u16>().read_volatile() })
    }

    fn write16(&self, off: usize, v: u16) {
        if let Some(p) = self.at(off, 2) {
            // SAFETY: as in `read16`; offsets are even, the mapping page aligned.
            unsafe { p.cast::<u16>().write_volatile(v.to_le()) };
        }
    }

    fn read64(&self, off: usize) -> u64 {
        let Some(p) = self.at(off, 8) else { return 0 };
        // SAFETY: as in `read16`; offsets are multiples of 8.
        u64::from_le(unsafe { p.cast::<u64>().read_volatile() })
    }

    fn write64(&self, off: usize, v: u64) {
        if let Some(p) = self.at(off, 8) {
            // SAFETY: as in `read64`.
            unsafe { p.cast::<u64>().write_volatile(v.to_le()) };
        }
    }

    fn inflight(&self, head: u16) -> bool {
        // SAFETY: as in `read16`.
        self.at(HEADER + DESC * usize::from(head), 1)
            .is_some_and(|p| unsafe { p.read_volatile() } == 1)
    }

    fn set_inflight(&self, head: u16, on: bool) {
        if let Some(p) = self.at(HEADER + DESC * usize::from(head), 1) {
            // SAFETY: as in `read16`.
            unsafe { p.write_volatile(u8::from(on)) };
        }
    }

    /// Sets the queue up, given the used index the guest's ring shows now: a fresh area is
    /// initialised; one in use is repaired (a crash between a used index update and its
    /// `inflight = 0` leaves `used_idx` behind: the last batch head is then done) and its
    /// in-flight heads returned in counter order.
    pub(crate) fn recover(&self, used_now: u16) -> Recovery {
        let version = self.read16(8);
        let desc_num = self.read16(10);
        if version != VERSION || desc_num != self.size {
            self.write64(0, 0);
            for d in 0..self.size {
                let o = HEADER + DESC * usize::from(d);
                self.write64(o, 0);
                self.write64(o + 8, 0);
            }
            self.write16(10, self.size);
            self.write16(12, 0);
            self.write16(14, used_now);
            fence(Ordering::SeqCst);
            self.write16(8, VERSION);
            return Recovery {
                heads: Vec::new(),
                next_counter: 1,
            };
        }
        if self.read16(14) != used_now {
            let last = self.read16(12);
            self.set_inflight(last, false);
            fence(Ordering::SeqCst);
            self.write16(14, used_now);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.size)
            .filter(|&d| self.inflight(d))
            .map(|d| (self.read64(HEADER + DESC * usize::from(d) + 8), d))
            .collect();
        heads.sort_unstable();
        let next_counter = heads.last().map_or(1, |&(c, _)| c.saturating_add(1));
        Recovery {
            heads: heads.into_iter().map(|(_, d)| d).collect(),
            next_counter,
        }
    }

    /// A chain with head `head` was popped (counter `counter`).
    pub(crate) fn mark(&self, head: u16, counter: u64) {
        self.write64(HEADER + DESC * usize::from(head) + 8, counter);
        fence(Ordering::Release);
        self.set_inflight(head, true);
    }

    /// Before the used entry of `head` is written.
    pub(crate) fn pre_used(&self, head: u16) {
        self.write16(12, head);
        fence(Ordering::Release);
    }

    /// After the used entry of `head` and the used index `used_idx` are written.
    pub(crate) fn post_used(&self, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        self.set_inflight(head, false);
        fence(Ordering::Release);
        self.write16(14, used_idx);
    }
}
