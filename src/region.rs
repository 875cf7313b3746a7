//! One guest memory region: its validated descriptor and, unless it is an on-demand grant
//! region, its host mapping. Implements vm-memory's `GuestMemoryRegion`.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;

use vm_memory::bitmap::BS;
use vm_memory::{
    GuestAddress, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes, GuestUsize,
    MemoryRegionAddress, VolatileSlice,
};

use crate::backend::foreign::{map_foreign_region, ForeignMapping};
use crate::backend::grant::map_grant_region;
use crate::backend::lazy::{LazyForeign, ScopePins};
use crate::backend::unix::{check_file_len, host_page_size, map_unix, FileLen};
use crate::backend::{BackendError, HostMapping};
use crate::descriptor::{GrantMapping, RegionDescriptor, RegionKind};
use crate::device::XenHandle;

/// Why a region could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The backend failed to map it.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The descriptor's addresses or sizes are invalid (hand-built descriptors).
    #[error(transparent)]
    Descriptor(#[from] crate::descriptor::DescriptorError),
    /// A Xen region was added to a table that has no Xen device.
    #[error("region at gpa {gpa:#x} needs a Xen device and none was given")]
    NoDevice {
        /// Region gpa.
        gpa: u64,
    },
}

/// Error returned (inside vm-memory's `IOError`) by a plain-table access to an on-demand grant
/// region or a lazily mapped FOREIGN region: those bytes are only reachable through
/// request-scoped memory.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("gpa {gpa:#x} is in an on-demand region (domain {domid}); access it through RequestMemory")]
pub struct OnDemandAccess {
    /// The address accessed.
    pub gpa: u64,
    /// The region's domain.
    pub domid: u16,
}

/// The lengths of the files regions are built from, each looked up once
/// ([`XenRegion::new_with_files`]). It borrows the files, so none of them can be closed (and
/// its descriptor number reused for another file) while it holds their lengths; a file
/// truncated after its lookup is caught no better or worse than after a lookup per region.
#[derive(Debug, Default)]
pub struct FileLengths<'f> {
    seen: Vec<(&'f File, FileLen)>,
}

impl<'f> FileLengths<'f> {
    /// No file looked up yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `f`'s length: looked up the first time, remembered after.
    fn of(&mut self, f: &'f File) -> std::io::Result<FileLen> {
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        if let Some(&(_, len)) = self.seen.iter().find(|(g, _)| g.as_raw_fd() == fd) {
            return Ok(len);
        }
        let len = FileLen::of(f)?;
        self.seen.push((f, len));
        Ok(len)
    }
}

/// A region of the guest memory map.
#[derive(Debug)]
pub struct XenRegion {
    desc: RegionDescriptor,
    /// `mapping`'s first byte, null for on-demand grant regions: the hot accessors read this
    /// one word instead of matching the mapping's release kind.
    host: HostPtr,
    /// Bytes reachable through `host`: the region's size, 0 for on-demand grant regions (so
    /// one bounds check also refuses them).
    mapped_len: u64,
    /// Owns the mapping (or a share of one several regions of a file use), released when the
    /// region (the last of them) is dropped.
    _mapping: Option<Mapping>,
    /// A lazily mapped FOREIGN region's reservation and buckets (then `host` is null).
    lazy: Option<Arc<LazyForeign>>,
    dev: Option<XenHandle>,
}

/// Buckets of a lazy FOREIGN region held for a ring ([`XenRegion::pin_lazy`]) until dropped.
#[derive(Debug, Default)]
pub struct LazyPin {
    /// The region (kept alive while its buckets are held) and the holds; none without a
    /// bound or outside lazy regions, so that a pin never keeps a removed region mapped for
    /// nothing.
    held: Option<(Arc<XenRegion>, Box<ScopePins>)>,
}

impl Drop for LazyPin {
    fn drop(&mut self) {
        if let Some((_region, pins)) = self.held.take() {
            // SAFETY: the list only holds buckets of `_region`'s lazy part, which the `Arc`
            // keeps alive until after this.
            unsafe { pins.release() };
        }
    }
}

/// A region's own mapping, or its share of one mapping of a file several regions use. Only
/// held, for its Drop.
#[derive(Debug)]
#[allow(dead_code)]
enum Mapping {
    Own(HostMapping),
    Shared(Arc<HostMapping>),
}

/// The host address of a region's mapping (null when it has none).
#[derive(Clone, Copy, Debug)]
struct HostPtr(*mut u8);

// SAFETY: a plain address into the mapping owned by the same `XenRegion` (which is `Send` and
// `Sync` through `HostMapping`); it is only dereferenced through slices that borrow the region.
unsafe impl Send for HostPtr {}
// SAFETY: as above.
unsafe impl Sync for HostPtr {}

impl XenRegion {
    /// Builds and, except for on-demand grants, maps a region.
    ///
    /// `file` is the fd the frontend sent, used for UNIX regions (`None` maps anonymous memory,
    /// for tests). Xen regions go through `dev` (the frontend's privcmd/gntdev fd adds nothing
    /// the device handle does not have).
    pub fn new(
        desc: RegionDescriptor,
        file: Option<&File>,
        dev: Option<&XenHandle>,
    ) -> Result<Self, RegionError> {
        Self::build(desc, file, dev, None, ForeignMapping::Eager)
    }

    /// As [`XenRegion::new`], with `policy` for a FOREIGN region (other kinds ignore it).
    /// [`ForeignMapping::Lazy`] reserves address space only: the region's bytes are then
    /// reachable through [`crate::RequestMemory`] alone, which maps buckets on first touch.
    pub fn with_foreign_mapping(
        desc: RegionDescriptor,
        file: Option<&File>,
        dev: Option<&XenHandle>,
        policy: ForeignMapping,
    ) -> Result<Self, RegionError> {
        Self::build(desc, file, dev, None, policy)
    }

    /// As [`XenRegion::new`], looking the file's length up in `files` (once per file for all
    /// the regions built with the same `files`), for a table of many regions of one file:
    /// the check that a UNIX region fits its file stays, without one system call per region.
    pub fn new_with_files<'f>(
        desc: RegionDescriptor,
        file: Option<&'f File>,
        dev: Option<&XenHandle>,
        files: &mut FileLengths<'f>,
    ) -> Result<Self, RegionError> {
        Self::build(desc, file, dev, Some(files), ForeignMapping::Eager)
    }

    fn build<'f>(
        desc: RegionDescriptor,
        file: Option<&'f File>,
        dev: Option<&XenHandle>,
        files: Option<&mut FileLengths<'f>>,
        policy: ForeignMapping,
    ) -> Result<Self, RegionError> {
        desc.check()?;
        let (gpa, size) = (desc.guest_phys_addr, desc.size);
        let need_dev = || dev.ok_or(RegionError::NoDevice { gpa });
        let mut lazy = None;
        let mapping = match desc.kind {
            RegionKind::Unix => {
                let known = match (file, files) {
                    (Some(f), Some(files)) => {
                        Some(files.of(f).map_err(|source| BackendError::UnixMmap {
                            gpa,
                            size,
                            offset: desc.mmap_offset,
                            source,
                        })?)
                    }
                    _ => None,
                };
                Some(map_unix(gpa, size, file, desc.mmap_offset, known)?)
            }
            RegionKind::Foreign { domid } => match policy {
                ForeignMapping::Eager => Some(map_foreign_region(need_dev()?, domid, gpa, size)?),
                ForeignMapping::Lazy { bucket_frames } => {
                    lazy = Some(LazyForeign::reserve(
                        need_dev()?,
                        domid,
                        gpa,
                        size,
                        bucket_frames,
                    )?);
                    None
                }
            },
            RegionKind::Grant {
                domid,
                mapping: GrantMapping::InAdvance,
            } => Some(map_grant_region(need_dev()?, domid, gpa, size)?),
            RegionKind::Grant {
                mapping: GrantMapping::OnDemand,
                ..
            } => {
                need_dev()?;
                None
            }
        };
        let host = HostPtr(
            mapping
                .as_ref()
                .map_or(std::ptr::null_mut(), HostMapping::as_ptr),
        );
        let mapped_len = if host.0.is_null() { 0 } else { desc.size };
        Ok(XenRegion {
            desc,
            host,
            mapped_len,
            _mapping: mapping.map(Mapping::Own),
            lazy,
            dev: dev.cloned(),
        })
    }

    /// Builds the regions of `items` (each a descriptor and the fd the frontend sent with it)
    /// as [`XenRegion::with_foreign_mapping`] would one by one, except that UNIX regions of
    /// one file (told by device and inode: a frontend sends a new fd per region) share one
    /// mapping of the file's span when the span is at most twice their bytes: one `fstat` per
    /// fd and one `mmap` per file, where a region each costs an `mmap` (and a `munmap` when it
    /// goes). The error names the index of the first item that failed.
    pub fn new_many(
        items: &[(RegionDescriptor, Option<&File>)],
        dev: Option<&XenHandle>,
        policy: ForeignMapping,
    ) -> Result<Vec<Self>, (usize, RegionError)> {
        let mut files = FileLengths::new();
        // Per item: the file's identity and length, for UNIX regions with a shareable file.
        let mut info: Vec<Option<FileLen>> = Vec::with_capacity(items.len());
        for (i, (desc, file)) in items.iter().enumerate() {
            let len = match (desc.kind, file) {
                (RegionKind::Unix, Some(f)) => {
                    desc.check().map_err(|e| (i, e.into()))?;
                    let len = files.of(f).map_err(|source| {
                        (
                            i,
                            RegionError::Backend(BackendError::UnixMmap {
                                gpa: desc.guest_phys_addr,
                                size: desc.size,
                                offset: desc.mmap_offset,
                                source,
                            }),
                        )
                    })?;
                    check_file_len(len, desc.guest_phys_addr, desc.size, desc.mmap_offset)
                        .map_err(|e| (i, e.into()))?;
                    len.shareable().then_some(len)
                }
                _ => None,
            };
            info.push(len);
        }
        // Per file: its regions' span and bytes, then one mapping of the span for a file
        // with more than one region and a dense enough span.
        #[derive(Debug)]
        struct Span {
            first: usize,
            regions: usize,
            start: u64,
            end: u64,
            bytes: u64,
            len: FileLen,
            mapping: Option<Arc<HostMapping>>,
        }
        let mut spans: BTreeMap<(u64, u64), Span> = BTreeMap::new();
        for (i, (len, (d, _))) in info.iter().zip(items).enumerate() {
            let Some(len) = *len else { continue };
            let end = d.mmap_offset.saturating_add(d.size);
            let s = spans.entry(len.id).or_insert(Span {
                first: i,
                regions: 0,
                start: d.mmap_offset,
                end,
                bytes: 0,
                len,
                mapping: None,
            });
            s.regions += 1;
            s.start = s.start.min(d.mmap_offset);
            s.end = s.end.max(end);
            s.bytes = s.bytes.saturating_add(d.size);
        }
        let page = host_page_size();
        for s in spans.values_mut() {
            s.start = s.start / page * page;
            let (Some(f), true) = (items[s.first].1, s.regions > 1) else {
                continue;
            };
            if s.end - s.start > s.bytes.saturating_mul(2) {
                continue;
            }
            let d = &items[s.first].0;
            let m = map_unix(
                d.guest_phys_addr,
                s.end - s.start,
                Some(f),
                s.start,
                Some(s.len),
            )
            .map_err(|e| (s.first, e.into()))?;
            s.mapping = Some(Arc::new(m));
        }
        items
            .iter()
            .zip(&info)
            .enumerate()
            .map(|(i, ((desc, file), len))| {
                let span = len.and_then(|l| spans.get(&l.id));
                match span.and_then(|s| Some((s.start, s.mapping.as_ref()?))) {
                    Some((start, m)) => Ok(Self::in_shared(*desc, m, desc.mmap_offset - start)),
                    None => Self::build(*desc, *file, dev, Some(&mut files), policy),
                }
                .map_err(|e| (i, e))
            })
            .collect()
    }

    /// A UNIX region (checked) whose bytes are `at` bytes into mapping `m` of its file.
    fn in_shared(desc: RegionDescriptor, m: &Arc<HostMapping>, at: u64) -> Self {
        XenRegion {
            desc,
            // In bounds: `m` maps the file from at most the region's offset to at least its
            // end.
            host: HostPtr(m.as_ptr().wrapping_add(at as usize)),
            mapped_len: desc.size,
            _mapping: Some(Mapping::Shared(m.clone())),
            lazy: None,
            dev: None,
        }
    }

    /// The validated descriptor.
    #[inline]
    pub fn descriptor(&self) -> &RegionDescriptor {
        &self.desc
    }

    /// The device this region's Xen memory goes through (None for UNIX regions built without).
    #[inline]
    pub fn device(&self) -> Option<&XenHandle> {
        self.dev.as_ref()
    }

    /// The domid, when this region is an on-demand grant region.
    #[inline]
    pub fn on_demand_domid(&self) -> Option<u16> {
        match self.desc.kind {
            RegionKind::Grant {
                domid,
                mapping: GrantMapping::OnDemand,
            } => Some(domid),
            _ => None,
        }
    }

    /// Whether this is a lazily mapped FOREIGN region ([`ForeignMapping::Lazy`]): like an
    /// on-demand grant region, only request-scoped memory reaches its bytes.
    #[inline]
    pub fn is_lazy_foreign(&self) -> bool {
        self.lazy.is_some()
    }

    /// Buckets of a lazy FOREIGN region mapped so far (0 for other regions).
    pub fn lazy_mapped_buckets(&self) -> usize {
        self.lazy.as_deref().map_or(0, LazyForeign::mapped_buckets)
    }

    #[inline]
    pub(crate) fn lazy(&self) -> Option<&LazyForeign> {
        self.lazy.as_deref()
    }

    /// Maps the buckets of a lazy FOREIGN region that hold `[gpa, gpa + len)` and, when the
    /// handle has a bound, holds them until the returned pin is dropped: never evicted, so ring
    /// accesses (through a request scope, as for every lazy byte) cannot fail for want of room.
    /// The daemon pins each vring at `SET_VRING_ADDR` and lets go when the ring moves or the
    /// connection ends. Holds nothing for other regions. The range must lie inside the region.
    pub fn pin_lazy(
        self: &Arc<Self>,
        gpa: GuestAddress,
        len: u64,
    ) -> Result<LazyPin, BackendError> {
        let Some(lz) = &self.lazy else {
            return Ok(LazyPin::default());
        };
        let off = gpa.0.wrapping_sub(self.desc.guest_phys_addr);
        if gpa.0 < self.desc.guest_phys_addr || len > self.desc.size || off > self.desc.size - len {
            return Err(BackendError::ForeignFrame {
                domid: lz.domid(),
                gfn: gpa.0 >> crate::xen_page::XEN_PAGE_SHIFT,
                errno: libc::EFAULT,
            });
        }
        if len == 0 {
            return Ok(LazyPin::default());
        }
        Ok(LazyPin {
            held: lz.pin(off, len)?.map(|pins| (self.clone(), pins)),
        })
    }

    /// Host address of the region's first byte, when the region is mapped in advance (None
    /// for on-demand grant regions and lazy FOREIGN regions).
    #[inline]
    pub fn host_address(&self) -> Option<*mut u8> {
        (!self.host.0.is_null()).then_some(self.host.0)
    }
}

impl GuestMemoryRegion for XenRegion {
    type B = ();

    #[inline]
    fn len(&self) -> GuestUsize {
        self.desc.size
    }

    #[inline]
    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.desc.guest_phys_addr)
    }

    #[inline]
    fn bitmap(&self) -> BS<'_, ()> {}

    #[inline]
    fn get_host_address(
        &self,
        addr: MemoryRegionAddress,
    ) -> vm_memory::guest_memory::Result<*mut u8> {
        let host = self.host.0;
        if host.is_null() {
            return Err(self.on_demand_error(addr));
        }
        self.check_address(addr)
            .ok_or(GuestMemoryError::InvalidBackendAddress)?;
        Ok(host.wrapping_add(addr.0 as usize))
    }

    #[inline]
    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BS<'_, ()>>> {
        match offset.0.checked_add(count as u64) {
            Some(end) if end <= self.mapped_len && self.mapped_len != 0 => {}
            _ => return Err(self.slice_error(offset)),
        }
        // SAFETY: `mapped_len` is not 0, so the region is mapped and `host` is the first byte
        // of its mapping, which covers `mapped_len` bytes and lives as long as `self`;
        // `offset..offset+count` lies inside them (checked above); the returned slice borrows
        // `self`. Guest memory is accessed volatilely by everyone who touches it.
        Ok(unsafe { VolatileSlice::new(self.host.0.add(offset.0 as usize), count) })
    }
}

impl XenRegion {
    /// Where `get_slice(offset, count)` points, None exactly where it fails: for callers that
    /// build the slice themselves and the error out of line (the request scope's slice
    /// iterator), so that the fast path passes two words in registers.
    #[inline(always)]
    pub(crate) fn host_range(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> Option<std::ptr::NonNull<u8>> {
        match offset.0.checked_add(count as u64) {
            Some(end) if end <= self.mapped_len && self.mapped_len != 0 => {}
            _ => return None,
        }
        // In bounds of the mapping (checked above), which is not null.
        std::ptr::NonNull::new(self.host.0.wrapping_add(offset.0 as usize))
    }

    /// Why `get_slice` at `offset` failed: an on-demand region, or out of bounds.
    #[cold]
    #[inline(never)]
    fn slice_error(&self, offset: MemoryRegionAddress) -> GuestMemoryError {
        if self.host.0.is_null() {
            self.on_demand_error(offset)
        } else {
            GuestMemoryError::InvalidBackendAddress
        }
    }

    /// Every plain-table access to on-demand or lazy memory ends here (out of line, off the
    /// fast path), so it is counted here, on the region's device handle.
    #[cold]
    #[inline(never)]
    fn on_demand_error(&self, addr: MemoryRegionAddress) -> GuestMemoryError {
        if let Some(d) = self.device() {
            d.counters().add_plain_table_refusal();
        }
        GuestMemoryError::IOError(std::io::Error::other(OnDemandAccess {
            gpa: self.desc.guest_phys_addr.wrapping_add(addr.0),
            domid: self
                .on_demand_domid()
                .or(self.lazy.as_deref().map(LazyForeign::domid))
                .unwrap_or_default(),
        }))
    }
}

impl GuestMemoryRegionBytes for XenRegion {}
