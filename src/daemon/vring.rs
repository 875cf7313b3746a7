//! Queue lifecycle: ring addresses, starting and stopping a queue's worker, and the reset
//! state. A worker is started by SET_VRING_KICK, stopped (after its batch) by the next kick
//! fd, GET_VRING_BASE (which first waits for the requests the device holds), reset or the
//! end of the connection.

use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use super::device::VhostUserDevice;
use super::error::DaemonError;
use super::handler::{Handler, Vring};
use super::ring_mem::RingMem;
use super::worker::QueueWorker;
use crate::ring_layout::RingLayout;

impl<D: VhostUserDevice> Handler<D> {
    /// SET_VRING_ADDR: the rings at frontend addresses `descriptor`, `available` and `used`,
    /// each inside one region mapped in advance (its lazy buckets pinned).
    pub(super) fn set_ring_addresses(
        &mut self,
        index: u32,
        descriptor: u64,
        available: u64,
        used: u64,
    ) -> Result<(), DaemonError> {
        let vring = self.vring(index)?;
        let layout = RingLayout::new(vring.get_ref().get_queue().size());
        let table = self.table();
        let (desc, p0) = Self::ring_gpa(
            &table,
            index,
            "descriptor table",
            descriptor,
            layout.desc_table_bytes(),
        )?;
        let (avail, p1) =
            Self::ring_gpa(&table, index, "avail ring", available, layout.avail_bytes())?;
        let (used_gpa, p2) = Self::ring_gpa(&table, index, "used ring", used, layout.used_bytes())?;
        vring
            .set_queue_info(desc, avail, used_gpa)
            .map_err(|e| DaemonError::RingAlignment {
                queue: index,
                desc,
                avail,
                used: used_gpa,
                reason: e.to_string(),
            })?;
        // After a driver restart the used index starts where the guest's ring says.
        let used_idx = RingMem::of(&table).used_idx(vring.get_ref().get_queue());
        if let Ok(idx) = used_idx {
            vring.set_queue_next_used(idx.0);
        }
        // Accepted: these rings' buckets stay held, the old rings' are let go.
        if let Some(slot) = self.ring_pins.get_mut(index as usize) {
            *slot = vec![p0, p1, p2];
        }
        Ok(())
    }

    /// GET_VRING_BASE: stops queue `index` after the requests its device holds complete (or
    /// its `drain_timeout`), and returns the next avail index.
    pub(super) fn stop_queue(&mut self, index: u32) -> Result<u16, DaemonError> {
        let vring = self.vring(index)?.clone();
        let i = index as usize;
        if let Some(w) = self.workers.get_mut(i).and_then(Option::take) {
            let left = w.drain_then_stop(self.device.drain_timeout(i));
            if left > 0 {
                log::warn!("vq{i}: {left} held requests released unanswered at GET_VRING_BASE");
            }
        }
        self.device.queue_stopped(index as usize);
        vring.set_queue_ready(false);
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(next_avail)
    }

    /// Stops every worker and puts every ring back to its reset state, disabled.
    pub(super) fn reset_vrings(&mut self) {
        self.stop_workers();
        self.ring_pins.iter_mut().for_each(Vec::clear);
        for v in &self.vrings {
            v.get_mut().get_queue_mut().reset();
            v.set_enabled(false);
        }
    }

    pub(super) fn stop_workers(&mut self) {
        for i in 0..self.workers.len() {
            if self.stop_worker(i) {
                self.device.queue_stopped(i);
            }
        }
    }

    /// Stops the worker of queue `index` after its current batch; false if it had none.
    pub(super) fn stop_worker(&mut self, index: usize) -> bool {
        match self.workers.get_mut(index).and_then(Option::take) {
            Some(w) => {
                w.stop();
                true
            }
            None => false,
        }
    }

    pub(super) fn vring(&self, index: u32) -> Result<&Vring, DaemonError> {
        self.vrings
            .get(index as usize)
            .ok_or(DaemonError::QueueIndex {
                index,
                queues: self.vrings.len(),
            })
    }

    pub(super) fn start_worker(&mut self, index: usize) -> Result<(), DaemonError> {
        self.stop_worker(index);
        let Some(vring) = self.vrings.get(index) else {
            return Ok(());
        };
        let size = vring.get_ref().get_queue().size();
        let inflight = self.inflight.as_ref().and_then(|r| r.queue(index, size));
        let worker = QueueWorker::start(
            index,
            vring.clone(),
            self.mem.clone(),
            self.device.clone(),
            self.stats.clone(),
            inflight,
            self.plain_watch.clone(),
            &self.sandbox,
        )
        .map_err(|source| DaemonError::Worker {
            queue: index,
            source,
        })?;
        if let Some(slot) = self.workers.get_mut(index) {
            *slot = Some(worker);
        }
        Ok(())
    }
}
