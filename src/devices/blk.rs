//! virtio-blk over a file: IN, OUT, FLUSH and GET_ID; features SEG_MAX, BLK_SIZE, FLUSH, RO
//! and MQ.
//!
//! Data moves between the file and guest memory in one `preadv`/`pwritev` per request,
//! straight into the request scope's mappings or bounce buffers. Every failure of guest
//! memory or of the file becomes `VIRTIO_BLK_S_IOERR` in the request's status byte; a chain
//! without a writable status byte is completed with used length 0.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use vm_memory::{Address, Bytes, GuestAddress, Permissions};

use super::iov::{GuestIov, IOV_MAX};
use crate::daemon::{
    Chain, VhostUserDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::request::RequestMemory;

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
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
}

impl Default for BlkConfig {
    fn default() -> Self {
        BlkConfig {
            num_queues: 1,
            queue_size: 256,
            read_only: false,
            blk_size: 512,
            serial: "xen-vhost-mem".into(),
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
}

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
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(path)
            .map_err(|source| BlkError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Self::from_file(file, config).map_err(|e| match e {
            BlkError::Open { source, .. } => BlkError::Open {
                path: path.display().to_string(),
                source,
            },
            e => e,
        })
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
        Ok(BlkDevice {
            file,
            sectors: len / SECTOR,
            config,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    fn serve_one(&self, mem: &RequestMemory<'_>, chain: &Chain<'_, '_>) -> u32 {
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        for d in chain.clone() {
            if d.is_write_only() {
                writable.push((d.addr(), d.len() as usize));
            } else if writable.is_empty() {
                readable.push((d.addr(), d.len() as usize));
            } else {
                // A readable descriptor after a writable one breaks virtio's ordering.
                return self.complete(mem, &writable, Outcome::status(VIRTIO_BLK_S_IOERR));
            }
        }
        let outcome = self.execute(mem, &readable, &writable);
        if outcome.status != VIRTIO_BLK_S_OK {
            // A failed request leaves the guest's buffers as they were (bounce pages): no
            // zeros of `WritableBuffers::Overwrite`, no half-read data. The status byte,
            // written next, counts again.
            for &(addr, len) in &writable {
                mem.discard_writes(addr, len);
            }
        }
        self.complete(mem, &writable, outcome)
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

    fn execute(
        &self,
        mem: &RequestMemory<'_>,
        readable: &[(GuestAddress, usize)],
        writable: &[(GuestAddress, usize)],
    ) -> Outcome {
        let mut header = [0u8; HEADER_LEN];
        let Some(data_in) = gather(mem, readable, &mut header) else {
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        };
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        // Device-writable bytes before the status byte.
        let data_out = without_last_byte(writable);
        match kind {
            VIRTIO_BLK_T_IN => self.transfer(mem, sector, &data_out, true),
            VIRTIO_BLK_T_OUT if self.config.read_only => Outcome::status(VIRTIO_BLK_S_IOERR),
            VIRTIO_BLK_T_OUT => self.transfer(mem, sector, &data_in, false),
            VIRTIO_BLK_T_FLUSH => {
                // SAFETY: fdatasync on a file descriptor we own.
                let r = unsafe { libc::fdatasync(self.file.as_raw_fd()) };
                Outcome::status(if r == 0 {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                })
            }
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, &data_out),
            _ => Outcome::status(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// Byte offset of `len` bytes at `sector`, when they fit the disk.
    fn offset(&self, sector: u64, len: usize) -> Option<u64> {
        let start = sector.checked_mul(SECTOR)?;
        let end = start.checked_add(len as u64)?;
        (end <= self.sectors * SECTOR).then_some(start)
    }

    /// Moves the data of a request between the disk at `sector` and guest `ranges`: into
    /// the guest for IN (`to_guest`), out of it for OUT, in one positioned system call.
    /// An IN request's used length counts the data it wrote.
    fn transfer(
        &self,
        mem: &RequestMemory<'_>,
        sector: u64,
        ranges: &[(GuestAddress, usize)],
        to_guest: bool,
    ) -> Outcome {
        let access = if to_guest {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let mut iov = GuestIov::default();
        for &(addr, len) in ranges {
            if iov.push(mem, addr, len, access).is_err() {
                return Outcome::status(VIRTIO_BLK_S_IOERR);
            }
        }
        let Some(offset) = self.offset(sector, iov.len()) else {
            return Outcome::status(VIRTIO_BLK_S_IOERR);
        };
        match positioned_io(&self.file, &iov, offset, !to_guest) {
            Ok(()) if to_guest => Outcome {
                status: VIRTIO_BLK_S_OK,
                written: u32::try_from(iov.len()).unwrap_or(u32::MAX),
            },
            Ok(()) => Outcome::status(VIRTIO_BLK_S_OK),
            Err(e) => {
                let what = if to_guest { "read" } else { "write" };
                log::warn!("blk: {what} at sector {sector}: {e}");
                Outcome::status(VIRTIO_BLK_S_IOERR)
            }
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
fn positioned_io(file: &File, iov: &GuestIov<'_>, offset: u64, write: bool) -> std::io::Result<()> {
    let mut offset = offset;
    for chunk in iov.as_slice().chunks(IOV_MAX) {
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
        c
    }

    fn worker_syscalls(&self) -> Vec<crate::daemon::threads::DeviceSyscall> {
        // One positioned vector call per request, and FLUSH.
        vec![
            crate::device_syscall!(SYS_preadv),
            crate::device_syscall!(SYS_pwritev),
            crate::device_syscall!(SYS_fdatasync),
        ]
    }

    fn serve_chain(&self, _queue: usize, mem: &RequestMemory<'_>, chain: &Chain<'_, '_>) -> u32 {
        self.serve_one(mem, chain)
    }
}
