//! virtio-vsock over Unix sockets, with vhost-device-vsock's hybrid conventions
//! ([`host`]): host programs connect to `--uds-path` and write `CONNECT <port>\n`; guest
//! connections to host port P go to `<uds-path>_P`.
//!
//! Three queues: rx (0) carries packets to the guest, tx (1) packets from it, event (2)
//! transport resets. Receive buffers wait for host data: they are held
//! ([`crate::daemon::Batch::hold`]) and completed when a packet is due, on the thread that
//! saw it: the tx worker for replies, the rx worker for host data (the host sockets' epoll
//! fd joins its loop through [`VhostUserDevice::queue_events`]). tx chains are served at
//! once.

pub mod chain;
pub mod conn;
pub mod credit;
pub mod host;
pub mod mux;
pub mod packet;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::daemon::{
    Batch, Chain, VhostUserDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::request::RequestMemory;
use chain::{read_header, Segments};
use mux::{Mux, VsockStats};
use packet::HDR_LEN;

pub use mux::VsockStats as Stats;

/// The receive queue.
pub const RX: usize = 0;
/// The transmit queue.
pub const TX: usize = 1;
/// The event queue.
pub const EVENT: usize = 2;

/// Why a vsock device cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 are reserved (hypervisor, local, host) and `u32::MAX` means "any".
    #[error("guest CID {0} is reserved (it must be at least 3 and below 2^32 - 1)")]
    BadCid(u64),
    /// The host-side listening socket.
    #[error("listening on {path}: {err}")]
    Listen {
        /// `--uds-path`.
        path: PathBuf,
        /// What bind or listen said.
        err: std::io::Error,
    },
    /// The epoll instance for host sockets.
    #[error("epoll: {0}")]
    Epoll(std::io::Error),
}

/// A virtio-vsock device.
#[derive(Debug)]
pub struct VsockDevice {
    guest_cid: u64,
    mux: Mutex<Mux>,
    stats: Arc<VsockStats>,
    epoll_fd: std::os::fd::RawFd,
}

impl VsockDevice {
    /// A device for the guest `guest_cid`, listening for host programs on `uds_path` (a file
    /// there is removed first) and connecting guest connections to `<uds_path>_<port>`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::BadCid(guest_cid));
        }
        let _ = std::fs::remove_file(uds_path);
        let listener = UnixListener::bind(uds_path).map_err(|err| VsockError::Listen {
            path: uds_path.to_path_buf(),
            err,
        })?;
        let stats = Arc::new(VsockStats::default());
        let mux = Mux::new(guest_cid, uds_path.to_path_buf(), listener, stats.clone())
            .map_err(VsockError::Epoll)?;
        let epoll_fd = mux.epoll_fd();
        Ok(VsockDevice {
            guest_cid,
            mux: Mutex::new(mux),
            stats,
            epoll_fd,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The device's counters.
    pub fn stats(&self) -> &VsockStats {
        &self.stats
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.mux().connections()
    }

    /// Receive buffers held now (waiting for host data).
    pub fn held_rx(&self) -> usize {
        self.mux().held_rx()
    }

    /// The fd that is readable when a host socket needs attention
    /// ([`VsockDevice::host_events`]).
    pub fn host_fd(&self) -> std::os::fd::RawFd {
        self.epoll_fd
    }

    /// Handles what the host sockets have (new host programs, CONNECT lines, data, room to
    /// write) and fills the receive buffers that can be filled. Never blocks.
    pub fn host_events(&self) {
        let mut m = self.mux();
        m.host_events();
        m.pump();
    }

    fn mux(&self) -> MutexGuard<'_, Mux> {
        self.mux
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads one tx chain's packet and hands it to the connections.
    fn transmit(
        &self,
        m: &mut Mux,
        mem: &RequestMemory<'_>,
        chain: &Chain<'_, '_>,
        buf: &mut Vec<u8>,
    ) {
        let descs: Vec<_> = chain.clone().collect();
        let segs = Segments::of(&descs, false);
        let (hdr, room) = match read_header(mem, &segs) {
            Ok(x) => x,
            Err(e) => {
                // No header to answer: the chain is returned and counted.
                log::debug!("vsock: tx chain {}: {e}", chain.head_index());
                m.stats_malformed();
                return;
            }
        };
        let op = match hdr.check_from_guest(self.guest_cid, room) {
            Ok(op) => op,
            Err(e) => {
                log::debug!("vsock: tx packet refused: {e}");
                m.refuse(&hdr);
                return;
            }
        };
        buf.resize(hdr.len as usize, 0);
        if let Err(e) = segs.read(mem, HDR_LEN, buf) {
            log::debug!("vsock: tx payload: {e}");
            m.refuse(&hdr);
            return;
        }
        m.on_guest(op, &hdr, buf);
    }
}

impl VhostUserDevice for VsockDevice {
    fn num_queues(&self) -> usize {
        3
    }

    fn max_queue_size(&self) -> u16 {
        1024
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
    }

    /// `struct virtio_vsock_config { le64 guest_cid; }`.
    fn config(&self) -> Vec<u8> {
        self.guest_cid.to_le_bytes().to_vec()
    }

    fn serve_chain(&self, queue: usize, mem: &RequestMemory<'_>, chain: &Chain<'_, '_>) -> u32 {
        if queue == TX {
            let mut m = self.mux();
            self.transmit(&mut m, mem, chain, &mut Vec::new());
            m.pump();
        }
        0
    }

    fn serve(
        &self,
        queue: usize,
        mem: &RequestMemory<'_>,
        chains: &mut [Chain<'_, '_>],
        used: &mut [u32],
    ) {
        used.fill(0);
        if queue != TX {
            return;
        }
        let mut m = self.mux();
        let mut buf = Vec::new();
        for c in chains.iter() {
            self.transmit(&mut m, mem, c, &mut buf);
        }
        // Replies and credit updates go out in the buffers held so far.
        m.pump();
    }

    fn serve_batch(&self, queue: usize, batch: &mut Batch<'_, '_, '_>) {
        if queue == TX {
            let (mem, chains, used) = batch.parts();
            self.serve(queue, mem, chains, used);
            return;
        }
        let mut m = self.mux();
        for i in 0..batch.len() {
            // An rx or event buffer waits for something to say (held, completed later).
            match batch.hold(i) {
                Ok(r) if queue == RX => m.add_rx(r),
                Ok(r) => m.add_event(r),
                Err(e) => log::warn!("vsock: queue {queue}: {e}"),
            }
        }
        if queue == RX {
            m.pump();
        }
    }

    /// Receive and event buffers wait for the host, not for work in progress: stopping the
    /// queue does not wait for them.
    fn drain_timeout(&self, queue: usize) -> std::time::Duration {
        if queue == TX {
            std::time::Duration::from_secs(1)
        } else {
            std::time::Duration::ZERO
        }
    }

    /// The host sockets' epoll fd, watched by the rx worker: host data lands in held
    /// receive buffers on that thread, with one notification per round.
    fn queue_events(&self, queue: usize) -> Vec<(std::os::fd::RawFd, u64)> {
        if queue == RX {
            vec![(self.epoll_fd, 0)]
        } else {
            Vec::new()
        }
    }

    fn handle_event(&self, queue: usize, _token: u64) {
        if queue == RX {
            self.host_events();
        }
    }

    fn queue_stopped(&self, queue: usize) {
        self.mux().reset(queue);
    }

    fn worker_syscalls(&self) -> Vec<crate::daemon::threads::DeviceSyscall> {
        // Host streams beyond the runtime's worker list (which has epoll_wait, read, write,
        // close, and ioctl limited to FIONBIO/FIOCLEX and Xen's: not widened here): connect
        // for guest connections (tx worker); accept, CONNECT lines, data (std sends and
        // receives on sockets with sendto/recvfrom) and watching them (rx worker, and the tx
        // worker's replies); half-close.
        vec![
            crate::device_syscall!(SYS_socket),
            crate::device_syscall!(SYS_connect),
            crate::device_syscall!(SYS_accept4),
            crate::device_syscall!(SYS_sendto),
            crate::device_syscall!(SYS_recvfrom),
            crate::device_syscall!(SYS_epoll_ctl),
            crate::device_syscall!(SYS_shutdown),
        ]
    }
}
