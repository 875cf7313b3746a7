//! The vhost-user message handler: vhost parses and dispatches, this holds the connection's
//! state, negotiates features and config, and hands each message to its role: memory
//! admission (`memory.rs`: region messages become a new [`RegionTable`] swapped into the
//! vrings' `GuestMemoryAtomic`; ring addresses are accepted only inside regions mapped in
//! advance) and the queue lifecycle (`vring.rs`: workers started, drained and stopped).

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use super::device::{VhostUserDevice, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_RING_F_EVENT_IDX};
use super::error::DaemonError;
use super::inflight::{InflightError, InflightRegion};
use super::notify_fd::check_eventfd;
use super::threads::Sandbox;
use super::worker::{DaemonStats, PlainTableWatch, QueueWorker};
use crate::backend::foreign::ForeignMapping;
use crate::descriptor::WireRegion;
use crate::device::XenHandle;
use crate::region::LazyPin;
use crate::table::RegionTable;

/// Memory slots offered in `GET_MAX_MEM_SLOTS` (QEMU's and vhost-user-backend's limit).
pub const MAX_MEM_SLOTS: usize = 509;

/// The guest memory the vrings and workers share.
pub(crate) type Memory = GuestMemoryAtomic<RegionTable>;
/// One vring, vhost-user-backend's type over our memory.
pub(crate) type Vring = VringRwLock<Memory>;

type VhostResult<T> = vhost::vhost_user::Result<T>;

/// What the connection loop needs to know about the message being handled, to answer the
/// frontend when vhost refuses a message without replying.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MessageTrace {
    /// One of our ack-style methods ran for this message (vhost acks its result itself).
    pub(crate) handled: bool,
}

/// Per-connection protocol state.
pub(crate) struct Handler<D: VhostUserDevice> {
    pub(super) device: Arc<D>,
    pub(super) xen: Option<XenHandle>,
    pub(super) mem: Memory,
    pub(super) vrings: Vec<Vring>,
    pub(super) workers: Vec<Option<QueueWorker>>,
    /// The in-flight region (`INFLIGHT_SHMFD`) the frontend set, if any.
    pub(super) inflight: Option<Arc<InflightRegion>>,
    pub(super) stats: Arc<DaemonStats>,
    /// Logs the first plain-table refusal of this connection (with a Xen handle only).
    pub(super) plain_watch: Option<Arc<PlainTableWatch>>,
    /// Filters of the threads the connection starts.
    pub(super) sandbox: Arc<Sandbox>,
    pub(super) acked_features: u64,
    pub(super) acked_protocol_features: u64,
    pub(super) features_queried: bool,
    /// How FOREIGN regions are mapped.
    pub(super) foreign: ForeignMapping,
    /// Per queue, the lazy FOREIGN buckets its rings sit in, held until the rings move, the
    /// table changes or the connection ends.
    pub(super) ring_pins: Vec<Vec<LazyPin>>,
    pub(crate) trace: MessageTrace,
}

impl<D: VhostUserDevice> std::fmt::Debug for Handler<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler")
            .field("queues", &self.vrings.len())
            .field("acked_features", &self.acked_features)
            .field("acked_protocol_features", &self.acked_protocol_features)
            .finish()
    }
}

impl<D: VhostUserDevice> Handler<D> {
    pub(crate) fn new(
        device: Arc<D>,
        xen: Option<XenHandle>,
        stats: Arc<DaemonStats>,
    ) -> Result<Self, DaemonError> {
        let mem = GuestMemoryAtomic::new(RegionTable::new());
        let max = device.max_queue_size();
        let vrings = (0..device.num_queues())
            .map(|_| {
                Vring::new(mem.clone(), max).map_err(|e| DaemonError::RingAlignment {
                    queue: 0,
                    desc: 0,
                    avail: 0,
                    used: 0,
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let workers = vrings.iter().map(|_| None).collect();
        let ring_pins = vrings.iter().map(|_| Vec::new()).collect();
        let plain_watch = xen
            .as_ref()
            .map(|x| Arc::new(PlainTableWatch::new(x.clone())));
        Ok(Handler {
            device,
            xen,
            mem,
            vrings,
            workers,
            inflight: None,
            stats,
            plain_watch,
            sandbox: Sandbox::off(),
            acked_features: 0,
            acked_protocol_features: 0,
            features_queried: false,
            foreign: ForeignMapping::Eager,
            ring_pins,
            trace: MessageTrace::default(),
        })
    }

    /// Spawns the connection's queue workers through `sandbox`.
    pub(crate) fn with_sandbox(mut self, sandbox: Arc<Sandbox>) -> Self {
        self.sandbox = sandbox;
        self
    }

    /// Maps this connection's FOREIGN regions as `foreign` says (default: eagerly).
    pub(crate) fn with_foreign_mapping(mut self, foreign: ForeignMapping) -> Self {
        self.foreign = foreign;
        self
    }

    /// Whether vhost answers `NEED_REPLY` messages with a REPLY_ACK (its own rule: the
    /// features it saw us offer include PROTOCOL_FEATURES and REPLY_ACK was acked).
    pub(crate) fn reply_ack_enabled(&self) -> bool {
        self.features_queried
            && self.acked_protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// Whether the frontend acked `XEN_MMAP` (as vhost saw it).
    pub(crate) fn xen_mmap_acked(&self) -> bool {
        self.acked_protocol_features & VhostUserProtocolFeatures::XEN_MMAP.bits() != 0
    }

    /// The region table in use now.
    pub(crate) fn table(&self) -> Arc<RegionTable> {
        self.mem.memory().into_inner()
    }

    /// Stops every worker, resets the rings and drops the memory table (its mappings go
    /// when the last in-flight batch holding it ends; all workers are joined, so now).
    pub(crate) fn shutdown(&mut self) {
        self.reset_vrings();
        for v in &self.vrings {
            v.set_kick(None);
            v.set_call(None);
            v.set_err(None);
        }
        if let Ok(guard) = self.mem.lock() {
            guard.replace(RegionTable::new());
        }
    }

    /// An in-flight region no larger than the device's queues need: a frontend cannot make
    /// the daemon create or map more than that.
    fn check_inflight_layout(&self, inflight: &VhostUserInflight) -> Result<(), DaemonError> {
        if usize::from(inflight.num_queues) > self.device.num_queues()
            || inflight.queue_size > self.device.max_queue_size()
        {
            return Err(DaemonError::Inflight(InflightError::Layout {
                queues: inflight.num_queues,
                size: inflight.queue_size,
            }));
        }
        Ok(())
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn offered_protocol_features(&self) -> VhostUserProtocolFeatures {
        let base = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::XEN_MMAP;
        base | self.device.protocol_features()
    }

    fn handled(&mut self) {
        self.trace.handled = true;
    }
}

/// `fd` as vring `index`'s `role` fd, or why not: it must be an eventfd (`notify_fd`).
fn eventfd(index: u8, role: &'static str, fd: &File) -> Result<(), DaemonError> {
    check_eventfd(fd).map_err(|kind| DaemonError::NotAnEventFd {
        queue: index,
        role,
        kind,
    })
}

impl<D: VhostUserDevice> Drop for Handler<D> {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

impl<D: VhostUserDevice> VhostUserBackendReqHandlerMut for Handler<D> {
    fn set_owner(&mut self) -> VhostResult<()> {
        self.handled();
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.handled();
        self.reset_vrings();
        self.acked_features = 0;
        // A reset device has nothing in flight; the frontend sets a region again.
        self.inflight = None;
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.reset_owner()?;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        self.features_queried = true;
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        self.handled();
        let offered = self.offered_features();
        if features & !offered != 0 {
            return Err(DaemonError::Features {
                acked: features,
                offered,
            }
            .into());
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES, rings are enabled as soon as they are started.
        let enable_all = features & VHOST_USER_F_PROTOCOL_FEATURES == 0;
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        for v in &self.vrings {
            v.set_queue_event_idx(event_idx);
            if enable_all {
                v.set_enabled(true);
            }
        }
        for w in self.workers.iter().flatten() {
            w.wake();
        }
        self.device.acked_features(features);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.handled();
        if ctx.len() > MAX_MEM_SLOTS {
            return Err(DaemonError::TooManyRegions {
                count: ctx.len(),
                max: MAX_MEM_SLOTS,
            }
            .into());
        }
        self.admit_table(ctx, files)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        self.handled();
        let max = self.device.max_queue_size();
        let vring = self.vring(index)?;
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            return Err(DaemonError::QueueSize {
                queue: index,
                num,
                max,
            }
            .into());
        }
        vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        self.handled();
        self.set_ring_addresses(index, descriptor, available, used)?;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        self.handled();
        let vring = self.vring(index)?;
        let base =
            u16::try_from(base).map_err(|_| DaemonError::QueueBase { queue: index, base })?;
        vring.set_queue_next_avail(base);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let next_avail = self.stop_queue(index)?;
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.handled();
        let vring = self.vring(u32::from(index))?.clone();
        let Some(fd) = fd else {
            return Err(DaemonError::Unsupported("a vring without a kick fd (polling)").into());
        };
        // Refused before the worker stops: the queue keeps its kick fd and its worker.
        eventfd(index, "kick", &fd)?;
        self.stop_worker(usize::from(index));
        vring.set_kick(Some(fd));
        vring.set_queue_ready(true);
        self.start_worker(usize::from(index))?;
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.handled();
        let vring = self.vring(u32::from(index))?;
        if let Some(fd) = &fd {
            eventfd(index, "call", fd)?;
        }
        vring.set_call(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.handled();
        let vring = self.vring(u32::from(index))?;
        if let Some(fd) = &fd {
            eventfd(index, "err", fd)?;
        }
        vring.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(self.offered_protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        self.handled();
        self.acked_protocol_features = features;
        let offered = self.offered_protocol_features().bits();
        if features & !offered != 0 {
            return Err(DaemonError::Features {
                acked: features,
                offered,
            }
            .into());
        }
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        self.handled();
        self.vring(index)?.set_enabled(enable);
        if let Some(Some(w)) = self.workers.get(index as usize) {
            w.wake();
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        let config = self.device.config();
        let start = offset as usize;
        let window = start
            .checked_add(size as usize)
            .and_then(|end| config.get(start..end));
        match window {
            Some(w) => Ok(w.to_vec()),
            None => Err(DaemonError::ConfigRange {
                offset,
                size,
                len: config.len(),
            }
            .into()),
        }
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        self.handled();
        self.device
            .set_config(offset, buf)
            .map_err(|source| DaemonError::SetConfig { offset, source })?;
        Ok(())
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {
        self.handled();
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        self.handled();
        Err(DaemonError::Unsupported("GPU_SET_SOCKET").into())
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        Err(DaemonError::Unsupported("GET_SHARED_OBJECT").into())
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        self.check_inflight_layout(inflight)?;
        let (region, file) = InflightRegion::create(inflight.num_queues, inflight.queue_size)
            .map_err(DaemonError::Inflight)?;
        let size = (usize::from(inflight.num_queues)
            * super::inflight::queue_bytes(inflight.queue_size)) as u64;
        // Kept mapped: the frontend sets it back (SET_INFLIGHT_FD) before the rings start.
        self.inflight = Some(Arc::new(region));
        Ok((
            VhostUserInflight {
                mmap_size: size,
                mmap_offset: 0,
                num_queues: inflight.num_queues,
                queue_size: inflight.queue_size,
            },
            file,
        ))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostResult<()> {
        self.handled();
        self.check_inflight_layout(inflight)?;
        let region = InflightRegion::open(
            &file,
            inflight.mmap_size,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(DaemonError::Inflight)?;
        log::info!(
            "in-flight region: {} queues of {} ({} bytes)",
            inflight.num_queues,
            inflight.queue_size,
            inflight.mmap_size
        );
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        self.handled();
        let table = self.table();
        let new = self.build_region(&table, 0, &WireRegion::from(region), &fd)?;
        let table = table.insert(Arc::new(new)).map_err(DaemonError::from)?;
        self.swap_table(table)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        self.handled();
        let (table, _removed) = self
            .table()
            .remove_exact(region.guest_phys_addr, region.memory_size, region.user_addr)
            .map_err(DaemonError::from)?;
        self.swap_table(table)?;
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        Err(DaemonError::Unsupported("SET_DEVICE_STATE_FD").into())
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        Err(DaemonError::Unsupported("CHECK_DEVICE_STATE").into())
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        Err(DaemonError::Unsupported("GET_SHMEM_CONFIG").into())
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostResult<()> {
        Err(DaemonError::Unsupported("SET_LOG_BASE").into())
    }
}
