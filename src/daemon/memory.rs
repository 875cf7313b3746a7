//! Memory admission: SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG become a new
//! [`RegionTable`] swapped into the vrings' `GuestMemoryAtomic` (a worker's in-flight batch
//! keeps the old one until its scope ends), and ring addresses become guest addresses inside
//! regions mapped in advance (or lazily mapped FOREIGN regions, whose buckets are pinned).

use std::fs::File;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestUsize};

use super::device::VhostUserDevice;
use super::error::DaemonError;
use super::handler::{Handler, MAX_MEM_SLOTS};
use crate::descriptor::{RegionDescriptor, WireRegion};
use crate::region::{LazyPin, XenRegion};
use crate::ring_layout::RingLayout;
use crate::table::{add_in_advance_pages, RegionTable};

impl<D: VhostUserDevice> Handler<D> {
    /// SET_MEM_TABLE: validates every descriptor first (and the in-advance grant budget,
    /// before anything is mapped), then maps them all, then sorts and builds the table once.
    pub(super) fn admit_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), DaemonError> {
        let mut items = Vec::with_capacity(ctx.len());
        let mut in_advance = 0;
        for (index, (r, file)) in ctx.iter().zip(&files).enumerate() {
            let desc = RegionDescriptor::from_wire(&WireRegion::from(r))
                .map_err(|source| DaemonError::Descriptor { index, source })?;
            in_advance = add_in_advance_pages(in_advance, &desc).map_err(DaemonError::from)?;
            items.push((desc, Some(file)));
        }
        let regions = XenRegion::new_many(&items, self.xen.as_ref(), self.foreign).map_err(
            |(index, source)| DaemonError::Region {
                index,
                gpa: items[index].0.guest_phys_addr,
                source,
            },
        )?;
        let table = RegionTable::from_regions(regions).map_err(DaemonError::from)?;
        self.swap_table(table)
    }

    /// Maps one wire region that is to join `table`. The limits a frontend could otherwise
    /// use to make the daemon map without bound (memory slots, in-advance grant pages) are
    /// checked first, so nothing is mapped past them.
    pub(super) fn build_region(
        &self,
        table: &RegionTable,
        index: usize,
        wire: &WireRegion,
        file: &File,
    ) -> Result<XenRegion, DaemonError> {
        if table.num_regions() >= MAX_MEM_SLOTS {
            return Err(DaemonError::TooManyRegions {
                count: table.num_regions() + 1,
                max: MAX_MEM_SLOTS,
            });
        }
        let desc = RegionDescriptor::from_wire(wire)
            .map_err(|source| DaemonError::Descriptor { index, source })?;
        table.check_in_advance_room(&desc)?;
        XenRegion::with_foreign_mapping(desc, Some(file), self.xen.as_ref(), self.foreign).map_err(
            |source| DaemonError::Region {
                index,
                gpa: desc.guest_phys_addr,
                source,
            },
        )
    }

    pub(super) fn swap_table(&mut self, table: RegionTable) -> Result<(), DaemonError> {
        if table.num_regions() > MAX_MEM_SLOTS {
            return Err(DaemonError::TooManyRegions {
                count: table.num_regions(),
                max: MAX_MEM_SLOTS,
            });
        }
        // Ring pins follow the table: held in its lazy regions, let go of in the old one.
        self.pin_rings(&table);
        let guard = self
            .mem
            .lock()
            .map_err(|_| DaemonError::Poisoned("memory"))?;
        guard.replace(table);
        Ok(())
    }

    /// Holds the ring buckets of every queue whose rings are set in lazy FOREIGN regions of a
    /// new table (its regions may be new mappings of the same guest memory), letting go of
    /// those in the old one. A ring that cannot be pinned is logged; its accesses then report
    /// their errors as they happen.
    fn pin_rings(&mut self, table: &RegionTable) {
        for (queue, vring) in self.vrings.iter().enumerate() {
            let state = vring.get_ref();
            let q = state.get_queue();
            let layout = RingLayout::new(q.size());
            let mut pins = Vec::new();
            for (ring, gpa, len) in [
                (
                    "descriptor table",
                    q.desc_table(),
                    layout.desc_table_bytes(),
                ),
                ("avail ring", q.avail_ring(), layout.avail_bytes()),
                ("used ring", q.used_ring(), layout.used_bytes()),
            ] {
                if gpa == 0 {
                    continue;
                }
                let Some(region) = table.region_at(GuestAddress(gpa)) else {
                    continue;
                };
                let room = region.last_addr().0 - gpa + 1;
                match region.pin_lazy(GuestAddress(gpa), len.min(room)) {
                    Ok(p) => pins.push(p),
                    Err(e) => log::warn!("vq{queue}: {ring} at gpa {gpa:#x}: {e}"),
                }
            }
            if let Some(slot) = self.ring_pins.get_mut(queue) {
                *slot = pins;
            }
        }
    }

    /// Translates one ring address and checks that `len` bytes from it lie in one region
    /// mapped in advance or lazily mapped FOREIGN region, whose buckets it then pins.
    pub(super) fn ring_gpa(
        table: &RegionTable,
        queue: u32,
        ring: &'static str,
        uaddr: u64,
        len: u64,
    ) -> Result<(u64, LazyPin), DaemonError> {
        let gpa =
            table
                .uaddr_to_gpa(uaddr)
                .ok_or(DaemonError::RingAddress { queue, ring, uaddr })?;
        let not_mapped = DaemonError::RingNotMapped {
            queue,
            ring,
            gpa: gpa.0,
            len,
        };
        let Some(region) = table.region_at(gpa) else {
            return Err(not_mapped);
        };
        let room: GuestUsize = region.last_addr().0 - gpa.0 + 1;
        if len > room || (region.host_address().is_none() && !region.is_lazy_foreign()) {
            return Err(not_mapped);
        }
        // A ring in a lazy FOREIGN region: its buckets are mapped now and held.
        let pin = region
            .pin_lazy(gpa, len)
            .map_err(|source| DaemonError::RingPin {
                queue,
                ring,
                gpa: gpa.0,
                source,
            })?;
        Ok((gpa.0, pin))
    }
}
