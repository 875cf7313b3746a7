//! The device a daemon serves: what a vhost-device daemon implements, reduced to what the
//! protocol and the queue workers need.
//!
//! Porting from vhost-user-backend's `VhostUserBackend`: `num_queues`, `max_queue_size`,
//! `features`, `protocol_features`, `get_config` and `set_config` keep their meaning;
//! `handle_event` (which pops chains itself over `GuestMemoryMmap`) becomes
//! [`VhostUserDevice::serve_chain`] (or [`VhostUserDevice::serve`] for a whole batch), which
//! receives the chains the worker popped and the request-scoped memory to read and write
//! them through.

use std::os::fd::RawFd;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_queue::DescriptorChain;

use super::held::{Batch, DEFAULT_MAX_HELD};
use crate::request::{RequestMemory, WritableBuffers};

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// A chain as the device sees it: popped through the batch's request-scoped memory, so its
/// descriptors (indirect tables in on-demand grant memory included) and buffers are reached
/// through the same scope.
pub type Chain<'s, 't> = DescriptorChain<&'s RequestMemory<'t>>;

/// A virtio device served over vhost-user. Shared by the queue workers (one thread per
/// queue), hence `Sync`; per-queue state belongs behind the queue index.
pub trait VhostUserDevice: Send + Sync + 'static {
    /// Number of queues.
    fn num_queues(&self) -> usize;

    /// Largest queue size the device accepts (`SET_VRING_NUM` above it is refused).
    fn max_queue_size(&self) -> u16;

    /// Virtio feature bits offered, device-specific and transport ones
    /// (`VIRTIO_F_VERSION_1`, `VIRTIO_RING_F_*`). The daemon adds
    /// `VHOST_USER_F_PROTOCOL_FEATURES`.
    fn features(&self) -> u64;

    /// Protocol features beyond those the daemon always offers (`REPLY_ACK`, `MQ`,
    /// `CONFIGURE_MEM_SLOTS`, `CONFIG`, `RESET_DEVICE`, and `XEN_MMAP` in the `xen` build).
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::empty()
    }

    /// The features the frontend acked.
    fn acked_features(&self, _features: u64) {}

    /// The device's config space (`GET_CONFIG` reads a window of it).
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }

    /// `SET_CONFIG`; refused unless the device has writable config fields.
    fn set_config(&self, _offset: u32, _data: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }

    /// Whether the device overwrites every byte of the device-writable buffers it asks to
    /// write ([`WritableBuffers::Overwrite`] saves copying them in from the guest).
    fn writable_buffers(&self) -> WritableBuffers {
        WritableBuffers::CopyIn
    }

    /// Serves one chain popped from queue `queue` through `mem`; returns the bytes written
    /// into it (the used length). A chain whose memory fails is completed with the device's
    /// error status where it has one, or with used length 0. Nothing here may panic on guest
    /// input.
    fn serve_chain(&self, queue: usize, mem: &RequestMemory<'_>, chain: &Chain<'_, '_>) -> u32;

    /// Serves one batch of chains popped from queue `queue`, all through `mem`, setting
    /// `used[i]` to the used length of `chains[i]`; one bad chain must not stop the others.
    /// By default one [`VhostUserDevice::serve_chain`] each; a device that can do better
    /// with the whole batch (merging adjacent block requests, say) overrides it.
    fn serve(
        &self,
        queue: usize,
        mem: &RequestMemory<'_>,
        chains: &mut [Chain<'_, '_>],
        used: &mut [u32],
    ) {
        for (chain, used) in chains.iter().zip(used.iter_mut()) {
            *used = self.serve_chain(queue, mem, chain);
        }
    }

    /// Serves one batch, where a device whose requests wait may keep chains past the call
    /// ([`Batch::hold`] gives a [`super::Request`] to complete later, from any thread). By
    /// default [`VhostUserDevice::serve`] over the whole batch, holding nothing: synchronous
    /// devices implement `serve_chain` or `serve` and never see this.
    fn serve_batch(&self, queue: usize, batch: &mut Batch<'_, '_, '_>) {
        let (mem, chains, used) = batch.parts();
        self.serve(queue, mem, chains, used);
    }

    /// Most requests queue `queue` may hold at a time. At the bound the worker stops popping
    /// (the chains wait in the avail ring; nothing fails) until a completion makes room.
    fn max_held(&self, _queue: usize) -> usize {
        DEFAULT_MAX_HELD
    }

    /// Most on-demand guest pages (grant-copy bounce pages plus mapped pages, 4 KiB each)
    /// the requests queue `queue` holds may hold between them; at the bound the worker stops
    /// popping, as at [`VhostUserDevice::max_held`]. 16384 pages (64 MiB) by default.
    fn max_held_pages(&self, _queue: usize) -> usize {
        crate::request::MAX_SCOPE_PAGES
    }

    /// How long `GET_VRING_BASE` waits for the requests queue `queue` holds to complete
    /// (their used entries are then written, so the frontend's view of the ring is whole)
    /// before it releases the rest. Reset and disconnect do not wait.
    fn drain_timeout(&self, _queue: usize) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }

    /// A request that was in flight when the previous daemon (or connection) ended, found in
    /// the in-flight region (`INFLIGHT_SHMFD`, which a device offers by returning it from
    /// [`VhostUserDevice::protocol_features`]). Called in counter order when the queue
    /// starts, before any new chain is popped; serve it and complete it like a held request
    /// ([`super::Request::descriptors`], [`super::Request::scope`]). By default it is dropped,
    /// which completes it with used length 0: a device that offers `INFLIGHT_SHMFD`
    /// implements this.
    fn resubmit(&self, _queue: usize, _request: super::Request) {}

    /// Fds the worker of queue `queue` watches for the device besides the kick, each with a
    /// token of the device's choosing (below 2^32): an io_uring's completion eventfd, the
    /// epoll fd of a device's host sockets. Asked once per worker start; the fds must stay
    /// open while the queue runs. When one is readable the worker calls
    /// [`VhostUserDevice::handle_event`] on its own thread, so the device needs no thread of
    /// its own to complete the requests it holds.
    fn queue_events(&self, _queue: usize) -> Vec<(RawFd, u64)> {
        Vec::new()
    }

    /// One of [`VhostUserDevice::queue_events`]'s fds is readable (level-triggered: read or
    /// drain it here). Runs on the queue's worker; the requests completed in here get their
    /// used entries right after it returns, with one notification for them all.
    fn handle_event(&self, _queue: usize, _token: u64) {}

    /// The queue stops (reset, disconnect, GET_VRING_BASE after its drain): called on its
    /// worker before the requests it still holds are released (their memory unmapped or
    /// freed). A device whose kernel I/O still targets a held request's memory (io_uring
    /// reads into it) waits for that I/O here; completing the requests is allowed.
    fn quiesce(&self, _queue: usize) {}

    /// The queue stopped (`GET_VRING_BASE`, reset or disconnect). Requests it held were
    /// released already: their memory is gone and completing them does nothing.
    fn queue_stopped(&self, _queue: usize) {}

    /// System calls the device makes in [`VhostUserDevice::serve`] beyond the runtime's
    /// (a block device's `preadv`/`pwritev`/`fdatasync`): added to the queue workers'
    /// seccomp allowlist when the daemon is sandboxed
    /// ([`VhostUserDaemon::sandboxed`](super::VhostUserDaemon::sandboxed)). A call missing here
    /// kills the sandboxed daemon at the first request that makes it.
    fn worker_syscalls(&self) -> Vec<super::threads::DeviceSyscall> {
        Vec::new()
    }
}
