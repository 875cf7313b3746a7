//! The daemon runtime: vhost-user messages in, requests served through request-scoped
//! memory.
//!
//! [`VhostUserDaemon`] serves a [`VhostUserDevice`] on a Unix socket. vhost 0.18 parses and
//! dispatches the messages; our handler turns region messages into the [`RegionTable`]
//! (validated per region, each kind mapped the way Xen requires, swapped in atomically) and
//! vring messages into one worker thread per queue. Workers serve each kick in batches
//! through one [`RequestMemory`] scope, finished before the used entries are written.
//!
//! One build for every frontend: a frontend that acks `XEN_MMAP` sends 40-byte regions with
//! Xen flags and a domid; one that does not (stock QEMU, cloud-hypervisor) sends the standard
//! 32-byte layout, which an adapter (`layout.rs`) widens for vhost's parser (UNIX regions). The layout is
//! decided per connection; the memory layer chooses per region.
//!
//! [`RegionTable`]: crate::RegionTable
//! [`RequestMemory`]: crate::RequestMemory

mod connection;
mod device;
mod error;
mod handler;
mod held;
mod inflight;
pub(crate) mod layout;
mod memory;
mod notify_fd;
mod report;
mod ring_mem;
pub mod threads;
mod vring;
mod wire;
mod worker;

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

pub use connection::ConnectionEnd;
pub use device::{
    Chain, VhostUserDevice, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
pub use error::DaemonError;
pub use handler::MAX_MEM_SLOTS;
pub use held::{Batch, HeldScope, HoldError, Request, DEFAULT_MAX_HELD};
pub use inflight::InflightError;
pub use report::{StatsReport, StatsReporter, XenReport};
pub use worker::{DaemonStats, StatsSnapshot, MAX_BATCH};

use crate::device::XenHandle;
use handler::Handler;
pub use threads::{Sandbox, SandboxError, ThreadKind};

use crate::backend::foreign::ForeignMapping;

/// A vhost-user daemon serving one device, one frontend connection at a time.
#[derive(Debug)]
pub struct VhostUserDaemon<D: VhostUserDevice> {
    device: Arc<D>,
    xen: Option<XenHandle>,
    stats: Arc<DaemonStats>,
    adapt_layout: bool,
    foreign: ForeignMapping,
    sandbox: Arc<Sandbox>,
}

impl<D: VhostUserDevice> VhostUserDaemon<D> {
    /// A daemon for `device`. Without [`VhostUserDaemon::with_xen`] it maps UNIX regions only
    /// and refuses Xen regions with `RegionError::NoDevice`.
    pub fn new(device: Arc<D>) -> Self {
        VhostUserDaemon {
            device,
            xen: None,
            stats: Arc::default(),
            adapt_layout: true,
            foreign: ForeignMapping::Eager,
            sandbox: Sandbox::off(),
        }
    }

    /// How FOREIGN regions are mapped (default [`ForeignMapping::Eager`]: whole, at
    /// `SET_MEM_TABLE` / `ADD_MEM_REG`). [`ForeignMapping::Lazy`] only reserves address space
    /// there and maps each bucket when a request first touches it; rings in such a region
    /// have their buckets mapped and pinned at `SET_VRING_ADDR`. Bound the mapped buckets of
    /// all connections with [`XenHandle::set_lazy_bucket_limit`] on the daemon's handle.
    pub fn with_foreign_mapping(mut self, foreign: ForeignMapping) -> Self {
        self.foreign = foreign;
        self
    }

    /// Maps FOREIGN and GRANT regions through `xen` (the real drivers, or the emulation in
    /// tests).
    pub fn with_xen(mut self, xen: XenHandle) -> Self {
        self.xen = Some(xen);
        self
    }

    /// Whether each connection goes through the layout adapter (default: yes). Without it
    /// the daemon speaks only the 40-byte XEN_MMAP layout and refuses a frontend that does
    /// not ack XEN_MMAP; it saves two relay threads and one socket hop per control message,
    /// for a daemon that only ever serves Xen frontends.
    pub fn with_layout_adapter(mut self, on: bool) -> Self {
        self.adapt_layout = on;
        self
    }

    /// Spawns every thread of the daemon (connections, relays, queue workers) under the
    /// seccomp allowlist of its kind (`daemon::threads`), the queue workers' with the
    /// device's own calls ([`VhostUserDevice::worker_syscalls`]) added. A call outside a
    /// thread's list kills the process. Privileges are dropped separately (`threads::drop`
    /// functions), by the binary, once it has opened what it needs.
    pub fn sandboxed(mut self) -> Result<Self, SandboxError> {
        self.sandbox = Sandbox::new(&self.device.worker_syscalls())?;
        Ok(self)
    }

    /// The daemon's sandbox (off unless [`VhostUserDaemon::sandboxed`]): a binary enters its
    /// main thread into it once set up, and spawns its own threads through it.
    pub fn sandbox(&self) -> &Arc<Sandbox> {
        &self.sandbox
    }

    /// The device.
    pub fn device(&self) -> &Arc<D> {
        &self.device
    }

    /// The Xen device handle, when there is one (its counters count every Xen syscall).
    pub fn xen(&self) -> Option<&XenHandle> {
        self.xen.as_ref()
    }

    /// What the workers did so far, over all connections.
    pub fn stats(&self) -> &Arc<DaemonStats> {
        &self.stats
    }

    /// Reads this daemon's counters (the workers' and the Xen handle's) from any thread, for
    /// a [`StatsReport`]: the daemons log one as a JSON line on SIGUSR1.
    pub fn reporter(&self) -> StatsReporter {
        StatsReporter::new(self.stats.clone(), self.xen.clone())
    }

    /// Serves one connected frontend until it closes the socket or the socket breaks. Refused
    /// messages are answered and the connection goes on. At the end every worker is joined
    /// and the memory table dropped: nothing stays mapped.
    pub fn serve_connection(&self, stream: UnixStream) -> Result<ConnectionEnd, DaemonError> {
        let (device, xen, stats) = (self.device.clone(), self.xen.clone(), self.stats.clone());
        let (foreign, sandbox) = (self.foreign, self.sandbox.clone());
        let (stream, relays) = if self.adapt_layout {
            match layout::adapt(stream, &self.sandbox) {
                Ok((s, r)) => (s, r.into_iter().collect()),
                Err(e) => return Ok(ConnectionEnd::Broken(format!("layout adapter: {e}"))),
            }
        } else {
            (stream, Vec::new())
        };
        // The connection runs in a thread of its own kind (its seccomp filter), which also
        // stops the workers and drops the memory table at the end.
        let require_xen_mmap = !self.adapt_layout;
        let thread = self
            .sandbox
            .spawn(ThreadKind::Connection, "vu-conn".into(), move || {
                let h = Arc::new(Mutex::new(
                    Handler::new(device, xen, stats)?
                        .with_foreign_mapping(foreign)
                        .with_sandbox(sandbox),
                ));
                let end = connection::serve_connection(stream, h.clone(), require_xen_mmap);
                let stopped = match h.lock() {
                    Ok(mut h) => {
                        h.shutdown();
                        Ok(end)
                    }
                    Err(_) => Err(DaemonError::Poisoned("handler")),
                };
                stopped
            })?;
        let end = match thread.join() {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(DaemonError::Poisoned("connection thread")),
        };
        for r in relays {
            let _ = r.join();
        }
        let end = end?;
        self.stats
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(x) = &self.xen {
            let live = x.counters().live_mappings();
            if live != 0 {
                log::error!("{live} mappings still live after the connection ended");
            }
        }
        log::info!("connection ended: {end:?}");
        Ok(end)
    }

    /// Accepts frontends on `listener` one after another and serves each; returns after
    /// `connections` of them (`None`: never). A frontend's errors never end the loop.
    pub fn serve(
        &self,
        listener: &UnixListener,
        connections: Option<usize>,
    ) -> std::io::Result<()> {
        let mut served = 0;
        while connections.is_none_or(|n| served < n) {
            let (stream, _) = listener.accept()?;
            log::info!("frontend connected");
            if let Err(e) = self.serve_connection(stream) {
                log::error!("connection: {e}");
            }
            served += 1;
        }
        Ok(())
    }
}
