//! virtio-rng: fills the device-writable buffers of each chain from an entropy source
//! (`/dev/urandom` by default), one `readv` per chain.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use vm_memory::Permissions;

use super::iov::{GuestIov, IOV_MAX};
use crate::daemon::{
    Chain, VhostUserDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::request::{RequestMemory, WritableBuffers};

/// Most bytes given per request (vhost-device-rng's default period budget is of this order).
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// A virtio-rng device.
#[derive(Debug)]
pub struct RngDevice {
    source: File,
    queue_size: u16,
}

impl RngDevice {
    /// Reads entropy from `path`.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(RngDevice {
            source: File::open(path)?,
            queue_size: 256,
        })
    }

    fn serve_one(&self, mem: &RequestMemory<'_>, chain: &Chain<'_, '_>) -> u32 {
        let mut iov = GuestIov::default();
        let mut budget = MAX_BYTES_PER_REQUEST;
        for d in chain.clone().filter(|d| d.is_write_only()) {
            let len = (d.len() as usize).min(budget);
            if len == 0 {
                break;
            }
            if iov.push(mem, d.addr(), len, Permissions::Write).is_err() {
                break;
            }
            budget -= len;
        }
        let chunk = &iov.as_slice()[..iov.as_slice().len().min(IOV_MAX)];
        if chunk.is_empty() {
            return 0;
        }
        // SAFETY: the iovecs point into writable guest memory held alive by the scope.
        let n = unsafe { libc::readv(self.source.as_raw_fd(), chunk.as_ptr(), chunk.len() as i32) };
        if n < 0 {
            log::warn!("rng: {}", std::io::Error::last_os_error());
            return 0;
        }
        u32::try_from(n).unwrap_or(0)
    }
}

impl VhostUserDevice for RngDevice {
    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
    }

    /// Every byte handed out is overwritten with entropy: nothing to copy in.
    fn writable_buffers(&self) -> WritableBuffers {
        WritableBuffers::Overwrite
    }

    fn worker_syscalls(&self) -> Vec<crate::daemon::threads::DeviceSyscall> {
        // One vector read of the entropy file per request.
        vec![crate::device_syscall!(SYS_readv)]
    }

    fn serve_chain(&self, _queue: usize, mem: &RequestMemory<'_>, chain: &Chain<'_, '_>) -> u32 {
        self.serve_one(mem, chain)
    }
}
