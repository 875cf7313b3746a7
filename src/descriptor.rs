//! Validated region descriptors: what a `SET_MEM_TABLE` / `ADD_MEM_REG` region says, checked once
//! so that nothing downstream has to trust the frontend.

use crate::xen_flags::XenMmapFlags;
use crate::xen_page::{frame_of, page_offset, pages_spanned, DOMID_MAX};

/// Most pages an in-advance grant region may span: Linux gntdev's default per-map limit
/// (65536 pages, 256 MiB), far above what vrings need.
pub const MAX_IN_ADVANCE_GRANT_PAGES: u64 = 65536;

/// Most pages all in-advance grant regions of one table (one daemon connection) may span
/// together: twice the per-region limit (512 MiB of grant mappings), half of dom0's default
/// maptrack (1024 frames of 256 entries). A frontend sending 509 regions of the largest size
/// gets [`crate::table::TableError::InAdvanceGrantPages`] at this sum, before any mapping.
pub const MAX_IN_ADVANCE_GRANT_PAGES_TOTAL: u64 = 2 * MAX_IN_ADVANCE_GRANT_PAGES;

/// A memory region exactly as the frontend sent it (the 40-byte Xen layout; the Xen fields are
/// zero when `XEN_MMAP` was not negotiated).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireRegion {
    /// Guest physical address (for grants: the guest's grant address, bit 63 set).
    pub guest_phys_addr: u64,
    /// Length in bytes.
    pub memory_size: u64,
    /// Frontend virtual address of the region; used to translate vring addresses.
    pub userspace_addr: u64,
    /// Offset into the fd to map from (UNIX regions only).
    pub mmap_offset: u64,
    /// `xen_mmap_flags`.
    pub xen_mmap_flags: u32,
    /// `xen_mmap_data`: the guest's domid for Xen regions.
    pub xen_mmap_data: u32,
}

/// When an on-demand or in-advance grant region gets its host mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantMapping {
    /// The whole region is mapped when the region is added (vrings).
    InAdvance,
    /// Nothing is mapped up front; request-scoped memory copies or maps what a request touches.
    OnDemand,
}

/// How a region's memory reaches us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Plain `mmap` of a memfd or file.
    Unix,
    /// Foreign frames of `domid` through privcmd.
    Foreign {
        /// The guest's domain id.
        domid: u16,
    },
    /// Grant references of `domid` through gntdev.
    Grant {
        /// The guest's domain id.
        domid: u16,
        /// In advance or on demand.
        mapping: GrantMapping,
    },
}

/// A region whose fields were validated; see [`RegionDescriptor::from_wire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionDescriptor {
    /// First guest address covered (not necessarily page aligned).
    pub guest_phys_addr: u64,
    /// Length in bytes, nonzero; `guest_phys_addr + size` does not overflow.
    pub size: u64,
    /// Frontend virtual address of the region.
    pub userspace_addr: u64,
    /// Offset into the fd (zero for Xen kinds).
    pub mmap_offset: u64,
    /// The kind and its Xen parameters.
    pub kind: RegionKind,
}

/// Why a wire region was refused. Each variant names the offending value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DescriptorError {
    /// Bits we do not know are set.
    #[error("xen_mmap_flags {flags:#x} has unknown bits {unknown:#x}")]
    UnknownFlags {
        /// The whole flags word.
        flags: u32,
        /// The unknown bits.
        unknown: u32,
    },
    /// FOREIGN and GRANT together.
    #[error("xen_mmap_flags {flags:#x} sets both FOREIGN and GRANT")]
    ForeignAndGrant {
        /// The whole flags word.
        flags: u32,
    },
    /// FOREIGN with "do not map in advance": lazy foreign mapping is not supported.
    #[error("xen_mmap_flags {flags:#x}: FOREIGN regions are always mapped in advance")]
    ForeignNoAdvance {
        /// The whole flags word.
        flags: u32,
    },
    /// "Do not map in advance" without GRANT.
    #[error("xen_mmap_flags {flags:#x}: NO_ADVANCE_MAP without GRANT")]
    NoAdvanceWithoutGrant {
        /// The whole flags word.
        flags: u32,
    },
    /// A domid above `0x7FEF` (reserved or not a domid at all).
    #[error("xen_mmap_data {domid:#x} is not a guest domid (max {max:#x})", max = DOMID_MAX)]
    DomidOutOfRange {
        /// The value sent.
        domid: u32,
    },
    /// A UNIX region carrying Xen data.
    #[error("xen_mmap_data {data:#x} set on a region without Xen flags")]
    DataWithoutXen {
        /// The value sent.
        data: u32,
    },
    /// Size zero.
    #[error("region at gpa {gpa:#x} has size 0")]
    ZeroSize {
        /// The region's gpa.
        gpa: u64,
    },
    /// `gpa + size` overflows u64.
    #[error("region gpa {gpa:#x} + size {size:#x} overflows")]
    GpaOverflow {
        /// The region's gpa.
        gpa: u64,
        /// The region's size.
        size: u64,
    },
    /// `userspace_addr + size` overflows u64.
    #[error("region userspace_addr {addr:#x} + size {size:#x} overflows")]
    UserspaceAddrOverflow {
        /// The region's userspace address.
        addr: u64,
        /// The region's size.
        size: u64,
    },
    /// `mmap_offset + size` overflows u64 (UNIX regions).
    #[error("region mmap_offset {offset:#x} + size {size:#x} overflows")]
    MmapOffsetOverflow {
        /// The region's mmap offset.
        offset: u64,
        /// The region's size.
        size: u64,
    },
    /// A Xen region with a nonzero `mmap_offset`.
    #[error("{kind} region has mmap_offset {offset:#x}; Xen regions must use 0")]
    XenMmapOffset {
        /// "FOREIGN" or "GRANT".
        kind: &'static str,
        /// The offset sent.
        offset: u64,
    },
    /// The region is larger than this host can address.
    #[error("region size {size:#x} does not fit the host address space")]
    TooLarge {
        /// The region's size.
        size: u64,
    },
    /// An in-advance grant region with more pages than one gntdev map may hold.
    #[error("grant region gpa {gpa:#x} size {size:#x} spans {pages} pages; at most {max} are mapped in advance")]
    TooManyGrantPages {
        /// The region's gpa.
        gpa: u64,
        /// The region's size.
        size: u64,
        /// Pages it spans.
        pages: u64,
        /// The limit.
        max: u64,
    },
    /// An in-advance grant region whose last page would need a grant ref above `u32::MAX`.
    /// (On-demand regions may reach the top of the address space, as xen-vhost-frontend's do;
    /// an access there fails when it happens.)
    #[error("grant region gpa {gpa:#x} size {size:#x} reaches past the last grant ref")]
    GrantRefOverflow {
        /// The region's gpa.
        gpa: u64,
        /// The region's size.
        size: u64,
    },
}

impl RegionDescriptor {
    /// Validates a wire region. Page alignment is not required: the real frontend sends vrings
    /// as grant regions at their own (mid-page) gpa with odd sizes.
    pub fn from_wire(w: &WireRegion) -> Result<Self, DescriptorError> {
        let desc = RegionDescriptor {
            guest_phys_addr: w.guest_phys_addr,
            size: w.memory_size,
            userspace_addr: w.userspace_addr,
            mmap_offset: w.mmap_offset,
            kind: parse_kind(w.xen_mmap_flags, w.xen_mmap_data)?,
        };
        desc.check()?;
        Ok(desc)
    }

    /// Checks the addresses and sizes (everything but the flags and domid, which `from_wire`
    /// parses). [`crate::XenRegion::new`] runs it again, since the fields are public.
    pub fn check(&self) -> Result<(), DescriptorError> {
        let (gpa, size) = (self.guest_phys_addr, self.size);
        if size == 0 {
            return Err(DescriptorError::ZeroSize { gpa });
        }
        let last = gpa
            .checked_add(size - 1)
            .ok_or(DescriptorError::GpaOverflow { gpa, size })?;
        if self.userspace_addr.checked_add(size).is_none() {
            return Err(DescriptorError::UserspaceAddrOverflow {
                addr: self.userspace_addr,
                size,
            });
        }
        // A mapping can never exceed isize::MAX bytes, and a VolatileSlice length is a usize.
        if size > isize::MAX as u64 {
            return Err(DescriptorError::TooLarge { size });
        }
        match self.kind {
            RegionKind::Unix if self.mmap_offset.checked_add(size).is_none() => {
                Err(DescriptorError::MmapOffsetOverflow {
                    offset: self.mmap_offset,
                    size,
                })
            }
            RegionKind::Foreign { .. } | RegionKind::Grant { .. } if self.mmap_offset != 0 => {
                let kind = if matches!(self.kind, RegionKind::Foreign { .. }) {
                    "FOREIGN"
                } else {
                    "GRANT"
                };
                Err(DescriptorError::XenMmapOffset {
                    kind,
                    offset: self.mmap_offset,
                })
            }
            RegionKind::Grant {
                mapping: GrantMapping::InAdvance,
                ..
            } => {
                // Pages as the mapper counts them (from the size): a range that crosses the
                // grant-address bit would otherwise look small by its frame numbers.
                let pages = pages_spanned(page_offset(gpa), size);
                let last_ref = frame_of(gpa).checked_add(pages - 1);
                if last_ref.is_none_or(|r| r > u64::from(u32::MAX))
                    || frame_of(gpa) > frame_of(last)
                {
                    return Err(DescriptorError::GrantRefOverflow { gpa, size });
                }
                if pages > MAX_IN_ADVANCE_GRANT_PAGES {
                    return Err(DescriptorError::TooManyGrantPages {
                        gpa,
                        size,
                        pages,
                        max: MAX_IN_ADVANCE_GRANT_PAGES,
                    });
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Grant pages the region maps up front: the pages covering its bytes for an in-advance
    /// GRANT region, 0 for every other kind.
    pub fn in_advance_grant_pages(&self) -> u64 {
        match self.kind {
            RegionKind::Grant {
                mapping: GrantMapping::InAdvance,
                ..
            } => pages_spanned(page_offset(self.guest_phys_addr), self.size),
            _ => 0,
        }
    }

    /// The region's last guest address (inclusive).
    pub fn last_addr(&self) -> u64 {
        // Saturating only matters for descriptors that fail `check`.
        self.guest_phys_addr
            .saturating_add(self.size.saturating_sub(1))
    }

    /// The wire form, with "do not map in advance" emitted as `0x8`.
    pub fn to_wire(&self) -> WireRegion {
        let (flags, data) = match self.kind {
            RegionKind::Unix => (XenMmapFlags::empty(), 0),
            RegionKind::Foreign { domid } => (XenMmapFlags::FOREIGN, u32::from(domid)),
            RegionKind::Grant { domid, mapping } => {
                let mut f = XenMmapFlags::GRANT;
                if mapping == GrantMapping::OnDemand {
                    f |= XenMmapFlags::NO_ADVANCE_MAP;
                }
                (f, u32::from(domid))
            }
        };
        WireRegion {
            guest_phys_addr: self.guest_phys_addr,
            memory_size: self.size,
            userspace_addr: self.userspace_addr,
            mmap_offset: self.mmap_offset,
            xen_mmap_flags: flags.bits(),
            xen_mmap_data: data,
        }
    }
}

fn parse_kind(raw: u32, data: u32) -> Result<RegionKind, DescriptorError> {
    let Some(flags) = XenMmapFlags::from_bits(raw) else {
        return Err(DescriptorError::UnknownFlags {
            flags: raw,
            unknown: raw & !XenMmapFlags::all().bits(),
        });
    };
    let foreign = flags.contains(XenMmapFlags::FOREIGN);
    let grant = flags.contains(XenMmapFlags::GRANT);
    let lazy = flags.no_advance_map();
    if foreign && grant {
        return Err(DescriptorError::ForeignAndGrant { flags: raw });
    }
    if foreign && lazy {
        return Err(DescriptorError::ForeignNoAdvance { flags: raw });
    }
    if lazy && !grant {
        return Err(DescriptorError::NoAdvanceWithoutGrant { flags: raw });
    }
    if !foreign && !grant {
        if data != 0 {
            return Err(DescriptorError::DataWithoutXen { data });
        }
        return Ok(RegionKind::Unix);
    }
    if data > DOMID_MAX {
        return Err(DescriptorError::DomidOutOfRange { domid: data });
    }
    let domid = data as u16; // checked above: fits in 15 bits
    Ok(if foreign {
        RegionKind::Foreign { domid }
    } else {
        RegionKind::Grant {
            domid,
            mapping: if lazy {
                GrantMapping::OnDemand
            } else {
                GrantMapping::InAdvance
            },
        }
    })
}
