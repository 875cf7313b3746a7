//! Batching: fetch the on-demand pages of whole descriptor chains up front, with one
//! grant-copy ioctl, or one MAP_GRANT_REF + mmap per protection (an mmap must cover one whole
//! map, so read-only and writable pages need two).

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, Permissions};

use super::access::{pieces, Piece};
use super::pages::{KeyMap, KeySet};
use super::{RequestError, RequestMemory};

impl RequestMemory<'_> {
    /// Fetches the on-demand pages of `chains` (one grant-copy ioctl, or one map per
    /// protection). Best effort: a page that cannot be fetched is left alone and its error is
    /// reported when the device touches it, so one bad chain does not fail the others.
    #[inline]
    pub fn prefetch_chains<M>(&self, chains: &[DescriptorChain<M>]) -> Result<(), RequestError>
    where
        M: Deref + Clone,
        M::Target: GuestMemory,
    {
        // Fast path: nothing in the table is fetched on demand.
        if !self.table.has_scoped_memory() {
            return Ok(());
        }
        let buffers: Vec<(GuestAddress, usize, Permissions)> = chains
            .iter()
            .flat_map(|c| c.clone())
            .map(|d| {
                let access = if d.is_write_only() {
                    Permissions::Write
                } else {
                    Permissions::Read
                };
                (d.addr(), d.len() as usize, access)
            })
            .collect();
        self.prefetch(&buffers)
    }

    /// Fetches the on-demand pages of `buffers` (`(gpa, len, access)`); see
    /// [`RequestMemory::prefetch_chains`]. Errors only when the device call itself fails.
    pub fn prefetch(
        &self,
        buffers: &[(GuestAddress, usize, Permissions)],
    ) -> Result<(), RequestError> {
        if self.table.has_lazy() {
            self.prefetch_lazy(buffers);
        }
        // Fast path: nothing in the table is fetched on demand.
        if !self.table.has_on_demand() {
            return Ok(());
        }
        let mut copy: Vec<Piece> = Vec::new();
        let mut map: Vec<Piece> = Vec::new();
        let mut dev = None;
        let mut ps = Vec::new();
        let mut decided: KeyMap<bool> = KeyMap::default();
        let mut st = self.state.borrow_mut();
        for &(addr, len, access) in buffers {
            let Some(region) = self.table.find_region(addr) else {
                continue;
            };
            let room = region.len() - (addr.0 - region.start_addr().0);
            // Lazy FOREIGN regions were mapped above; only on-demand grants from here.
            let Some(domid) = region.on_demand_domid() else {
                continue;
            };
            // Only the part inside this region; a buffer crossing regions is rare and is
            // fetched on touch.
            let n = (len as u64).min(room) as usize;
            // Over the scope's limit: leave it to the touch, which reports ScopeFull.
            if st.check_room(addr.0, n, copy.len() + map.len()).is_err() {
                continue;
            }
            ps.clear();
            if pieces(domid, addr.0, n, access.has_write(), &mut ps).is_err() {
                continue;
            }
            // Every region must go through the scope's one device; skip any other.
            match st.device(region) {
                Ok(d) => dev = Some(d),
                Err(_) => continue,
            }
            let copies = self.strategy.copies(len);
            for &p in &ps {
                // The first decision for a page holds: it is bounced or mapped, never both.
                let by_copy = match st.pages.get(&p.key) {
                    Some(s) => s.bounce.is_some(),
                    None => *decided.entry(p.key).or_insert(copies),
                };
                if by_copy {
                    copy.push(p);
                } else {
                    map.push(p);
                }
            }
        }
        let Some(dev) = dev else { return Ok(()) };
        st.fetch_by_copy(&dev, &copy, false)?;
        // A page both read and written in the batch is mapped once, writable.
        let (rw, ro): (Vec<Piece>, Vec<Piece>) = map.iter().partition(|p| p.write);
        let written: KeySet = rw.iter().map(|p| p.key).collect();
        let ro: Vec<Piece> = ro
            .into_iter()
            .filter(|p| !written.contains(&p.key))
            .collect();
        st.fetch_by_map(&dev, &ro, false, false)?;
        st.fetch_by_map(&dev, &rw, true, false)?;
        Ok(())
    }

    /// The lazy FOREIGN part of [`RequestMemory::prefetch`]: maps the buckets the buffers
    /// need (best effort: an error comes back at the touch).
    fn prefetch_lazy(&self, buffers: &[(GuestAddress, usize, Permissions)]) {
        for &(addr, len, _) in buffers {
            let Some(region) = self.table.find_region(addr) else {
                continue;
            };
            let off = addr.0 - region.start_addr().0;
            let n = (len as u64).min(region.len() - off);
            if let (Some(lz), true) = (region.lazy(), n > 0) {
                let _ = lz.ensure(off, n, self.pins());
            }
        }
    }
}
