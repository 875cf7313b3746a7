//! A vhost-user frontend and a virtio driver in one process: what a daemon's test suite, a
//! demo or a benchmark needs to drive a daemon over a real Unix socket.
//!
//! [`VirtioDriver::connect`] plays the VMM (the vhost crate's own `Frontend` negotiates,
//! sends the memory table and the vrings) and the guest driver (split virtqueues in guest
//! memory it writes itself, kicks and calls through eventfds). Guest memory is a memfd
//! ([`GuestMode::Unix`], what QEMU sends) or, in the `xen` build, an emulated Xen guest:
//! [`GuestMode::Grant`] sends each ring as a GRANT region mapped in advance at its own
//! mid-page address and everything else from `1 << 63` up as on-demand GRANT regions, as
//! xen-vhost-frontend does; [`GuestMode::Foreign`] sends the guest's frames as one FOREIGN
//! region. Buffers the device only reads are granted read-only.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};

use crate::ring_layout::RingLayout;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::desc::split::Descriptor;
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use super::EmulatedXen;
use super::{Guest, GuestBuffer, GuestSim};
use crate::daemon::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::device::XenHandle;
use crate::xen_page::{GRANT_ADDR_BIT, XEN_PAGE_SIZE};

const PAGE: u64 = XEN_PAGE_SIZE as u64;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// Where each ring piece starts inside its page in GRANT mode (mid-page, as vrings are).
const RING_PAGE_OFFSET: u64 = 0x840;
/// Domain id of the emulated guest.
pub const GUEST_DOMID: u16 = 1;
/// Frontend virtual address the rings are announced at (any nonzero value; only its
/// relation to the regions' `userspace_addr` matters).
const FAKE_VA: u64 = 0x7f00_0000_0000;
/// Xen flags on the wire.
const XEN_FOREIGN: u32 = 0x1;
const XEN_GRANT: u32 = 0x2;
const XEN_NO_ADVANCE: u32 = 0x8;

/// How the driver's guest memory reaches the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMode {
    /// A memfd (UNIX region), as QEMU sends.
    Unix,
    /// Emulated Xen: rings GRANT in advance, buffers GRANT on demand (`xen` build).
    Grant,
    /// Emulated Xen: all memory as FOREIGN frames (`xen` build).
    Foreign,
}

/// Why driving the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The vhost-user conversation.
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    /// A system call (memfd, mmap, eventfd, poll).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The emulated Xen guest.
    #[error("emulated guest: {0}")]
    Emulation(#[from] super::EmulationError),
    /// The guest's grants.
    #[error("guest: {0}")]
    Guest(String),
    /// The daemon did not complete a request in time.
    #[error("queue {queue}: no completion within {secs} s")]
    Timeout {
        /// Queue.
        queue: usize,
        /// Seconds waited.
        secs: u64,
    },
    /// The daemon returned something impossible.
    #[error("queue {queue}: {what}")]
    Protocol {
        /// Queue.
        queue: usize,
        /// What.
        what: String,
    },
    /// The layout asked for does not fit.
    #[error("layout: {0}")]
    Layout(String),
}

/// How the driver sets itself up.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Guest memory kind.
    pub mode: GuestMode,
    /// Queues to set up (at most what the device has).
    pub queues: usize,
    /// Queue size (a power of two, at most the device's).
    pub queue_size: u16,
    /// Requests in flight per queue.
    pub depth: usize,
    /// Largest data buffer of one request, in bytes.
    pub max_data: usize,
    /// Put each chain in an indirect descriptor table (in on-demand memory in GRANT mode).
    pub indirect: bool,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX`.
    pub event_idx: bool,
    /// The emulated Xen the guest lives in: its frames (FOREIGN mode) or, unless a guest is
    /// given to [`VirtioDriver::connect_granting`], its grants (GRANT mode, domain
    /// [`GUEST_DOMID`]); the daemon maps through a handle on the same emulation. [`DriverConfig::emulation_pages`] pages suffice.
    pub emulation: Option<Arc<EmulatedXen>>,
    /// Negotiate `INFLIGHT_SHMFD` when offered: GET_INFLIGHT_FD at the first connection,
    /// SET_INFLIGHT_FD (the same memfd) at every one, before the rings start, as QEMU does.
    pub inflight: bool,
}

impl DriverConfig {
    /// Pages the emulation needs for this layout.
    pub fn emulation_pages(&self) -> usize {
        let data = (self.max_data as u64).next_multiple_of(PAGE);
        let slots = (self.queues * self.depth) as u64;
        let l = RingLayout::new(self.queue_size);
        let rings: u64 = [l.desc_table_bytes(), l.avail_bytes(), l.used_bytes()]
            .iter()
            .map(|&b| (RING_PAGE_OFFSET + b).div_ceil(PAGE))
            .sum();
        (2 * slots * (data / PAGE + 1) + 8 + rings * self.queues as u64) as usize + 16
    }
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            mode: GuestMode::Unix,
            queues: 1,
            queue_size: 256,
            depth: 8,
            max_data: 64 * 1024,
            indirect: false,
            event_idx: true,
            emulation: None,
            inflight: false,
        }
    }
}

/// One buffer of a chain: guest address, length, whether the device writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Guest address.
    pub gpa: u64,
    /// Bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// The guest's memory as the driver sees it.
enum Memory {
    /// A memfd mapped here; gpa `base + off` is byte `off`.
    Unix {
        file: File,
        ptr: *mut u8,
        len: usize,
        base: u64,
    },
    /// Grants of a guest (emulated, or dom0 through gntalloc on real Xen): spans of guest
    /// addresses onto granted buffers.
    Granted {
        guest: Box<dyn GrantingGuest>,
        /// (first gpa, bytes, the buffer) of each span; page-aligned gpas.
        spans: Vec<(u64, u64, GuestBuffer)>,
    },
    /// Frames of the emulated Xen: spans of guest addresses onto emulation pages.
    Emulated {
        emu: Arc<EmulatedXen>,
        /// (first gpa, bytes, first emulation page) of each span; page-aligned gpas.
        spans: Vec<(u64, u64, usize)>,
    },
}

/// A guest that grants pages, as the driver needs it: [`Guest`] without its error type, so
/// that the emulated guest and dom0's gntalloc guest fit one field.
pub trait GrantingGuest {
    /// The granting domain.
    fn domid(&self) -> u16;
    /// Grants `pages` pages on consecutive refs.
    fn grant(&self, pages: usize, readonly: bool) -> Result<GuestBuffer, DriverError>;
    /// Writes the guest's own view of `buf`.
    fn write(&self, buf: &GuestBuffer, offset: usize, data: &[u8]) -> Result<(), DriverError>;
    /// Reads the guest's own view of `buf`.
    fn read(&self, buf: &GuestBuffer, offset: usize, len: usize) -> Result<Vec<u8>, DriverError>;
}

impl<G: Guest> GrantingGuest for G {
    fn domid(&self) -> u16 {
        Guest::domid(self)
    }
    fn grant(&self, pages: usize, readonly: bool) -> Result<GuestBuffer, DriverError> {
        Guest::grant(self, pages, readonly).map_err(|e| DriverError::Guest(e.to_string()))
    }
    fn write(&self, buf: &GuestBuffer, offset: usize, data: &[u8]) -> Result<(), DriverError> {
        Guest::write(self, buf, offset, data).map_err(|e| DriverError::Guest(e.to_string()))
    }
    fn read(&self, buf: &GuestBuffer, offset: usize, len: usize) -> Result<Vec<u8>, DriverError> {
        Guest::read(self, buf, offset, len).map_err(|e| DriverError::Guest(e.to_string()))
    }
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Memory::Unix { .. } => "Memory::Unix",
            Memory::Granted { .. } => "Memory::Granted",
            Memory::Emulated { .. } => "Memory::Emulated",
        })
    }
}

impl Memory {
    fn unix(len: usize, base: u64) -> Result<Self, DriverError> {
        // SAFETY: memfd_create with a valid C string.
        let fd = unsafe { libc::memfd_create(c"xvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: fd is a new descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // SAFETY: mapping a file we own, shared, whole length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Memory::Unix {
            file,
            ptr: ptr.cast(),
            len,
            base,
        })
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DriverError> {
        match self {
            Memory::Unix { ptr, len, base, .. } => {
                let off = unix_offset(gpa, data.len(), *base, *len)?;
                // SAFETY: off..off+len is inside the mapping (checked above).
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.add(off), data.len()) };
                Ok(())
            }
            Memory::Emulated { emu, spans, .. } => {
                let (page, off) = emu_offset(spans, gpa, data.len())?;
                Ok(emu.write_page(page, off, data)?)
            }
            Memory::Granted { guest, spans } => {
                let (buf, off) = emu_offset(spans, gpa, data.len())?;
                guest.write(&buf, off, data)
            }
        }
    }

    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), DriverError> {
        match self {
            Memory::Unix { ptr, len, base, .. } => {
                let off = unix_offset(gpa, out.len(), *base, *len)?;
                // SAFETY: off..off+len is inside the mapping (checked above).
                unsafe { std::ptr::copy_nonoverlapping(ptr.add(off), out.as_mut_ptr(), out.len()) };
                Ok(())
            }
            Memory::Emulated { emu, spans, .. } => {
                let (page, off) = emu_offset(spans, gpa, out.len())?;
                out.copy_from_slice(&emu.read_page(page, off, out.len())?);
                Ok(())
            }
            Memory::Granted { guest, spans } => {
                let (buf, off) = emu_offset(spans, gpa, out.len())?;
                out.copy_from_slice(&guest.read(&buf, off, out.len())?);
                Ok(())
            }
        }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Memory::Unix { ptr, len, .. } = self {
            // SAFETY: the mapping made in `unix`, unmapped once.
            unsafe { libc::munmap(ptr.cast(), *len) };
        }
    }
}

fn unix_offset(gpa: u64, n: usize, base: u64, len: usize) -> Result<usize, DriverError> {
    gpa.checked_sub(base)
        .and_then(|o| usize::try_from(o).ok())
        .filter(|o| o.checked_add(n).is_some_and(|e| e <= len))
        .ok_or_else(|| DriverError::Layout(format!("gpa {gpa:#x} (+{n}) outside guest RAM")))
}

fn emu_offset<T: Copy>(
    spans: &[(u64, u64, T)],
    gpa: u64,
    n: usize,
) -> Result<(T, usize), DriverError> {
    spans
        .iter()
        .find(|&&(start, len, _)| gpa >= start && gpa + n as u64 <= start + len)
        .map(|&(start, _, page)| (page, (gpa - start) as usize))
        .ok_or_else(|| DriverError::Layout(format!("gpa {gpa:#x} (+{n}) in no span")))
}

/// A bump allocator over one span of guest addresses.
#[derive(Debug)]
struct Pool {
    next: u64,
    end: u64,
}

impl Pool {
    fn alloc(&mut self, len: u64, align: u64) -> Result<u64, DriverError> {
        let at = self.next.next_multiple_of(align);
        if at + len > self.end {
            return Err(DriverError::Layout(format!("pool exhausted ({len} bytes)")));
        }
        self.next = at + len;
        Ok(at)
    }
}

/// Where a driver's guest memory is and what the frontend announces for it.
struct Layout {
    mem: Memory,
    /// Buffers the device only reads (granted read-only in GRANT mode).
    ro: Pool,
    /// Buffers the device writes.
    rw: Pool,
    /// Descriptor table, avail and used ring of each queue.
    rings: Vec<[u64; 3]>,
    regions: Vec<RegionSpec>,
    /// Descriptors the region messages refer to, kept open for the connection.
    fds: Vec<File>,
}

/// A region to announce, with the fd to send.
#[derive(Debug)]
struct RegionSpec {
    gpa: u64,
    size: u64,
    uaddr: u64,
    offset: u64,
    flags: u32,
    domid: u16,
    fd: i32,
}

/// The driver side of one split virtqueue.
#[derive(Debug)]
struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_idx: u16,
    kick: EventFd,
    call: EventFd,
    /// Per slot: header, data (device reads), data (device writes), status, indirect table.
    slots: Vec<Slot>,
    free: Vec<usize>,
}

/// Fixed buffers of one request slot.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    /// 16 bytes, device-readable (granted read-only).
    pub header: u64,
    /// `max_data` bytes the device reads (granted read-only).
    pub data_out: u64,
    /// `max_data` bytes the device writes.
    pub data_in: u64,
    /// 1 byte the device writes.
    pub status: u64,
    /// Room for an indirect table of 4 descriptors (device-readable).
    pub table: u64,
}

/// A completed chain: the slot it used and the used length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Slot index.
    pub slot: usize,
    /// Bytes the device wrote.
    pub len: u32,
}

/// A frontend plus a virtio driver, connected to a daemon.
pub struct VirtioDriver {
    frontend: Frontend,
    mem: Memory,
    queues: Vec<DriverQueue>,
    features: u64,
    config: DriverConfig,
    regions: Vec<RegionSpec>,
    rings: Vec<[u64; 3]>,
    _region_fds: Vec<File>,
    /// The in-flight region the daemon gave (`INFLIGHT_SHMFD`).
    inflight: Option<(VhostUserInflight, File)>,
}

impl std::fmt::Debug for VirtioDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioDriver")
            .field("mode", &self.config.mode)
            .field("queues", &self.queues.len())
            .field("features", &self.features)
            .finish()
    }
}

impl VirtioDriver {
    /// Connects to the daemon at `path` and sets everything up (features, memory table,
    /// vrings, enable). UNIX and FOREIGN modes.
    pub fn connect(path: &Path, config: DriverConfig) -> Result<Self, DriverError> {
        let frontend = connect_frontend(path, config.queues)?;
        Self::with_frontend(frontend, config, None)
    }

    /// Connects in GRANT mode: `guest` grants the rings and buffers (an emulated guest, or
    /// dom0's gntalloc guest on real Xen).
    pub fn connect_granting(
        path: &Path,
        config: DriverConfig,
        guest: Box<dyn GrantingGuest>,
    ) -> Result<Self, DriverError> {
        let frontend = connect_frontend(path, config.queues)?;
        Self::with_frontend(frontend, config, Some(guest))
    }

    /// Sets up over an already connected frontend.
    pub fn with_frontend(
        frontend: Frontend,
        config: DriverConfig,
        guest: Option<Box<dyn GrantingGuest>>,
    ) -> Result<Self, DriverError> {
        // GRANT mode over `emulation` without a guest of its own: the emulated guest.
        let guest = match (guest, config.mode, &config.emulation) {
            (None, GuestMode::Grant, Some(emu)) => Some(Box::new(GuestSim {
                emu: emu.clone(),
                dev: XenHandle::new(emu.clone()),
                domid: GUEST_DOMID,
            }) as Box<dyn GrantingGuest>),
            (g, _, _) => g,
        };
        let qs = u64::from(config.queue_size);
        if !config.queue_size.is_power_of_two() || 3 * config.depth > usize::from(config.queue_size)
        {
            return Err(DriverError::Layout(format!(
                "queue size {} must be a power of two holding 3 descriptors per slot for depth {}",
                config.queue_size, config.depth
            )));
        }
        let data = (config.max_data as u64).next_multiple_of(PAGE);
        let small_per_slot = 16 + 1 + 64;
        let slots_total = (config.queues * config.depth) as u64;
        let l = RingLayout::new(config.queue_size);
        let ring_bytes = [l.desc_table_bytes(), l.avail_bytes(), l.used_bytes()];
        let Layout {
            mem,
            mut ro,
            mut rw,
            rings,
            regions,
            fds,
        } = match config.mode {
            GuestMode::Unix => {
                let rings_len: u64 = config.queues as u64 * 3 * (16 * qs + PAGE);
                let len = rings_len + slots_total * (2 * data + 4 * PAGE) + 4 * PAGE;
                let len = len.next_multiple_of(PAGE);
                let base = 0x10_0000;
                let mem = Memory::unix(len as usize, base)?;
                let (fd, ptr) = match &mem {
                    Memory::Unix { file, ptr, .. } => (file.as_raw_fd(), *ptr as u64),
                    _ => (-1, 0),
                };
                let mut pool = Pool {
                    next: base,
                    end: base + len,
                };
                let mut rings = Vec::new();
                for _ in 0..config.queues {
                    let d = pool.alloc(ring_bytes[0], 16)?;
                    let a = pool.alloc(ring_bytes[1], 2)?;
                    let u = pool.alloc(ring_bytes[2], 4)?;
                    rings.push([d, a, u]);
                }
                let regions = vec![RegionSpec {
                    gpa: base,
                    size: len,
                    uaddr: ptr,
                    offset: 0,
                    flags: 0,
                    domid: 0,
                    fd,
                }];
                let rest = Pool {
                    next: pool.next,
                    end: base + len,
                };
                // One pool serves both directions in UNIX memory.
                let split = rest.next + (rest.end - rest.next) / 2;
                let ro = Pool {
                    next: rest.next,
                    end: split,
                };
                let rw = Pool {
                    next: split,
                    end: rest.end,
                };
                Layout {
                    mem,
                    ro,
                    rw,
                    rings,
                    regions,
                    fds: Vec::new(),
                }
            }
            GuestMode::Grant | GuestMode::Foreign => {
                Self::emulated_layout(&config, guest, &ring_bytes, data, small_per_slot)?
            }
        };
        let mut queues = Vec::new();
        for ring in rings.iter().take(config.queues) {
            let mut slots = Vec::new();
            for _ in 0..config.depth {
                slots.push(Slot {
                    header: ro.alloc(16, 16)?,
                    data_out: ro.alloc(data, PAGE)?,
                    data_in: rw.alloc(data, PAGE)?,
                    status: rw.alloc(1, 1)?,
                    table: ro.alloc(64, 16)?,
                });
            }
            queues.push(DriverQueue {
                size: config.queue_size,
                desc: ring[0],
                avail: ring[1],
                used: ring[2],
                avail_idx: 0,
                used_idx: 0,
                kick: EventFd::new(0)?,
                call: EventFd::new(0)?,
                free: (0..config.depth).rev().collect(),
                slots,
            });
        }

        let mut driver = VirtioDriver {
            frontend,
            mem,
            queues,
            features: 0,
            config,
            regions,
            rings,
            _region_fds: fds,
            inflight: None,
        };
        driver.negotiate()?;
        Ok(driver)
    }

    /// The VMM's side of the conversation, in QEMU's order: features, memory table, vrings.
    fn negotiate(&mut self) -> Result<(), DriverError> {
        let frontend = &mut self.frontend;
        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        if offered & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let p = frontend.get_protocol_features()?;
            let proto = p
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                    | VhostUserProtocolFeatures::XEN_MMAP
                    | if self.config.inflight {
                        VhostUserProtocolFeatures::INFLIGHT_SHMFD
                    } else {
                        VhostUserProtocolFeatures::empty()
                    });
            frontend.set_protocol_features(proto)?;
            if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let mut want = VIRTIO_F_VERSION_1
            | VHOST_USER_F_PROTOCOL_FEATURES
            | (offered & 0xffff_ffff & !(VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC));
        if self.config.event_idx {
            want |= VIRTIO_RING_F_EVENT_IDX;
        }
        if self.config.indirect {
            want |= VIRTIO_RING_F_INDIRECT_DESC;
        }
        self.features = offered & want;
        frontend.set_features(self.features)?;
        let infos: Vec<VhostUserMemoryRegionInfo> = self.regions.iter().map(region_info).collect();
        frontend.set_mem_table(&infos)?;
        if self.config.inflight
            && frontend
                .get_protocol_features()?
                .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            if self.inflight.is_none() {
                let ask = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: self.queues.len() as u16,
                    queue_size: self.config.queue_size,
                };
                self.inflight = Some(frontend.get_inflight_fd(&ask)?);
            }
            if let Some((info, file)) = &self.inflight {
                frontend.set_inflight_fd(info, file.as_raw_fd())?;
            }
        }
        let rings = self.rings.clone();
        for q in 0..self.queues.len() {
            self.start_queue(q, &rings)?;
        }
        Ok(())
    }

    /// Closes the connection (the daemon sees the frontend go away); the guest memory stays,
    /// for [`VirtioDriver::reconnect`].
    pub fn disconnect(&mut self) {
        if let Ok(s) = UnixStream::pair() {
            // Replace the frontend by one on a dead socket; the old one closes its socket.
            self.frontend = Frontend::from_stream(s.0, self.config.queues as u64);
        }
    }

    /// Connects again to a daemon at `path` with the same guest memory, as a VM does after a
    /// daemon restart: the rings start over empty (requests in flight are forgotten).
    pub fn reconnect(&mut self, path: &Path) -> Result<(), DriverError> {
        self.frontend = connect_frontend(path, self.config.queues)?;
        for q in 0..self.queues.len() {
            let queue = &self.queues[q];
            // Empty rings: avail and used indices back to 0.
            self.mem.write(queue.avail + 2, &0u16.to_le_bytes())?;
            self.mem.write(queue.used + 2, &0u16.to_le_bytes())?;
            let queue = &mut self.queues[q];
            queue.avail_idx = 0;
            queue.used_idx = 0;
            queue.free = (0..queue.slots.len()).rev().collect();
        }
        self.negotiate()
    }

    /// Connects again to a daemon at `path` keeping the rings as they are (requests in
    /// flight stay published), as QEMU does after a backend crash: the queues restart at the
    /// used index, and with `INFLIGHT_SHMFD` the daemon resubmits what was in flight.
    pub fn reconnect_keeping(&mut self, path: &Path) -> Result<(), DriverError> {
        self.frontend = connect_frontend(path, self.config.queues)?;
        self.negotiate()
    }

    /// The in-flight region the daemon gave (`INFLIGHT_SHMFD` negotiated), and its layout.
    pub fn inflight_region(&self) -> Option<(&VhostUserInflight, &File)> {
        self.inflight.as_ref().map(|(i, f)| (i, f))
    }

    /// GRANT or FOREIGN layout over a fresh emulated Xen guest.
    fn emulated_layout(
        config: &DriverConfig,
        guest: Option<Box<dyn GrantingGuest>>,
        ring_bytes: &[u64; 3],
        data: u64,
        small_per_slot: u64,
    ) -> Result<Layout, DriverError> {
        let slots = (config.queues * config.depth) as u64;
        // Page-aligned data buffers; the small buffers of a slot share the page after them.
        let ro_pages = slots * (data / PAGE + 1) + small_per_slot.div_ceil(PAGE) + 2;
        let rw_pages = slots * (data / PAGE + 1) + 2;
        let ring_pages: Vec<u64> = ring_bytes
            .iter()
            .map(|&b| (RING_PAGE_OFFSET + b).div_ceil(PAGE))
            .collect();
        let all_ring_pages: u64 = ring_pages.iter().sum::<u64>() * config.queues as u64;
        let total = (ro_pages + rw_pages + all_ring_pages) as usize;
        // Any fd will do: the daemon maps Xen regions through its own device handle.
        let dummy = File::open("/dev/null")?;
        let mut spans = Vec::new();
        let mut regions = Vec::new();
        let mut rings = Vec::new();
        let mut gspans = Vec::new();
        let (ro, rw) = if let Some(guest) = &guest {
            let domid = guest.domid();
            let mut grant = |pages: u64, readonly: bool| -> Result<u64, DriverError> {
                let buf = guest.grant(pages as usize, readonly)?;
                let gpa = buf.gpa(0);
                gspans.push((gpa, pages * PAGE, buf));
                Ok(gpa)
            };
            for _ in 0..config.queues {
                let mut ring = [0u64; 3];
                for (i, &pages) in ring_pages.iter().enumerate() {
                    ring[i] = grant(pages, false)? + RING_PAGE_OFFSET;
                }
                rings.push(ring);
            }
            let ro_gpa = grant(ro_pages, true)?;
            let rw_gpa = grant(rw_pages, false)?;
            // Rings in advance at their own address and size (+2 bytes past avail and used,
            // as xen-vhost-frontend sends them); on-demand regions between, from the next
            // page boundary after each ring.
            let mut pieces: Vec<(u64, u64)> = rings
                .iter()
                .flat_map(|r| {
                    [
                        (r[0], ring_bytes[0]),
                        (r[1], ring_bytes[1] + 2),
                        (r[2], ring_bytes[2] + 2),
                    ]
                })
                .collect();
            pieces.sort_unstable();
            let end = gspans
                .iter()
                .map(|s| s.0 + s.1)
                .max()
                .unwrap_or(GRANT_ADDR_BIT);
            let mut cursor = GRANT_ADDR_BIT;
            for (gpa, len) in pieces {
                if cursor < gpa {
                    regions.push(on_demand(cursor, gpa - cursor, dummy.as_raw_fd(), domid));
                }
                regions.push(RegionSpec {
                    gpa,
                    size: len,
                    uaddr: FAKE_VA + (gpa - GRANT_ADDR_BIT),
                    offset: 0,
                    flags: XEN_GRANT,
                    domid,
                    fd: dummy.as_raw_fd(),
                });
                cursor = (gpa + len).next_multiple_of(PAGE);
            }
            if cursor < end {
                regions.push(on_demand(cursor, end - cursor, dummy.as_raw_fd(), domid));
            }
            (
                Pool {
                    next: ro_gpa,
                    end: ro_gpa + ro_pages * PAGE,
                },
                Pool {
                    next: rw_gpa,
                    end: rw_gpa + rw_pages * PAGE,
                },
            )
        } else {
            let emu = config.emulation.clone().ok_or_else(|| {
                DriverError::Layout("FOREIGN mode needs DriverConfig::emulation".into())
            })?;
            let first_gfn = 0x100u64;
            let page = emu.alloc_pages(total)?;
            emu.add_frames(GUEST_DOMID, first_gfn, page, total)?;
            let base = first_gfn * PAGE;
            spans.push((base, total as u64 * PAGE, page));
            regions.push(RegionSpec {
                gpa: base,
                size: total as u64 * PAGE,
                uaddr: FAKE_VA,
                offset: 0,
                flags: XEN_FOREIGN,
                domid: GUEST_DOMID,
                fd: dummy.as_raw_fd(),
            });
            let mut pool = Pool {
                next: base,
                end: base + total as u64 * PAGE,
            };
            for _ in 0..config.queues {
                let d = pool.alloc(ring_bytes[0], 16)?;
                let a = pool.alloc(ring_bytes[1], 2)?;
                let u = pool.alloc(ring_bytes[2], 4)?;
                rings.push([d, a, u]);
            }
            let split = pool.next + (pool.end - pool.next) / 2;
            (
                Pool {
                    next: pool.next,
                    end: split,
                },
                Pool {
                    next: split,
                    end: pool.end,
                },
            )
        };
        let mem = match (guest, config.emulation.clone()) {
            (Some(guest), _) => Memory::Granted {
                guest,
                spans: gspans,
            },
            (None, Some(emu)) => Memory::Emulated { emu, spans },
            (None, None) => return Err(DriverError::Layout("no guest memory".into())),
        };
        Ok(Layout {
            mem,
            ro,
            rw,
            rings,
            regions,
            fds: vec![dummy],
        })
    }

    fn start_queue(&mut self, q: usize, rings: &[[u64; 3]]) -> Result<(), DriverError> {
        let uaddr = |gpa: u64| self.uaddr_of(gpa);
        let ring = rings[q];
        let cfg = VringConfigData {
            queue_max_size: self.config.queue_size,
            queue_size: self.config.queue_size,
            flags: 0,
            desc_table_addr: uaddr(ring[0]),
            used_ring_addr: uaddr(ring[2]),
            avail_ring_addr: uaddr(ring[1]),
            log_addr: None,
        };
        let queue = &self.queues[q];
        // The used index the ring shows (0 on a fresh ring): where the device starts over,
        // as QEMU restores it after a backend restart.
        let mut used = [0u8; 2];
        self.mem.read(queue.used + 2, &mut used)?;
        self.frontend.set_vring_num(q, self.config.queue_size)?;
        self.frontend.set_vring_addr(q, &cfg)?;
        self.frontend.set_vring_base(q, u16::from_le_bytes(used))?;
        self.frontend.set_vring_call(q, &queue.call)?;
        self.frontend.set_vring_kick(q, &queue.kick)?;
        self.frontend.set_vring_enable(q, true)?;
        Ok(())
    }

    /// The frontend virtual address the daemon translates `gpa` from.
    pub fn uaddr_of(&self, gpa: u64) -> u64 {
        match (&self.mem, self.config.mode) {
            (Memory::Unix { ptr, base, .. }, _) => *ptr as u64 + (gpa - base),
            (_, GuestMode::Grant) => FAKE_VA + (gpa - GRANT_ADDR_BIT),
            (_, _) => FAKE_VA + (gpa - 0x100 * PAGE),
        }
    }

    /// The vhost frontend, to send further messages (hot plug, malformed ones in tests).
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Features negotiated.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The guest RAM memfd (UNIX mode).
    pub fn memfd(&self) -> Option<&File> {
        match &self.mem {
            Memory::Unix { file, .. } => Some(file),
            _ => None,
        }
    }

    /// Writes guest memory (the guest filling a buffer).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DriverError> {
        self.mem.write(gpa, data)
    }

    /// Reads guest memory (the guest reading what the device wrote).
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), DriverError> {
        self.mem.read(gpa, out)
    }

    /// A free slot of queue `q`, if any.
    pub fn take_slot(&mut self, q: usize) -> Option<(usize, Slot)> {
        let queue = self.queues.get_mut(q)?;
        let s = queue.free.pop()?;
        Some((s, queue.slots[s]))
    }

    /// The buffers of slot `slot` of queue `q`.
    pub fn slot(&self, q: usize, slot: usize) -> Slot {
        self.queues[q].slots[slot]
    }

    /// Publishes `bufs` as one chain using slot `slot`'s descriptors (or its indirect table).
    /// Call [`VirtioDriver::kick`] after publishing a batch.
    pub fn publish(&mut self, q: usize, slot: usize, bufs: &[Buf]) -> Result<(), DriverError> {
        let indirect = self.config.indirect;
        let queue = self
            .queues
            .get(q)
            .ok_or_else(|| DriverError::Layout(format!("no queue {q}")))?;
        if bufs.is_empty() || bufs.len() > 3 {
            return Err(DriverError::Layout(format!(
                "{} buffers per chain",
                bufs.len()
            )));
        }
        let first = (slot * 3) as u16;
        let desc_at = |i: u16| queue.desc + RingLayout::desc(u64::from(i));
        if indirect {
            let table = queue.slots[slot].table;
            for (i, b) in bufs.iter().enumerate() {
                let next = (i + 1 < bufs.len()).then_some(i as u16 + 1);
                self.mem.write(
                    table + RingLayout::desc(i as u64),
                    desc(b.gpa, b.len, b.write, next).as_slice(),
                )?;
            }
            let d = Descriptor::new(table, 16 * bufs.len() as u32, F_INDIRECT, 0);
            self.mem.write(desc_at(first), d.as_slice())?;
        } else {
            for (i, b) in bufs.iter().enumerate() {
                let next = (i + 1 < bufs.len()).then_some(first + i as u16 + 1);
                self.mem.write(
                    desc_at(first + i as u16),
                    desc(b.gpa, b.len, b.write, next).as_slice(),
                )?;
            }
        }
        let idx = queue.avail_idx;
        let ring_slot = queue.avail + RingLayout::new(queue.size).avail_entry(idx);
        self.mem.write(ring_slot, &first.to_le_bytes())?;
        fence(Ordering::Release);
        let new = idx.wrapping_add(1);
        self.mem.write(queue.avail + 2, &new.to_le_bytes())?;
        self.queues[q].avail_idx = new;
        Ok(())
    }

    /// Notifies the device of queue `q`, unless it said it does not need it (used ring
    /// flag, or `avail_event` with EVENT_IDX). Returns whether it kicked.
    pub fn kick(&mut self, q: usize, published: u16) -> Result<bool, DriverError> {
        fence(Ordering::SeqCst);
        let queue = &self.queues[q];
        let need = if self.features & VIRTIO_RING_F_EVENT_IDX != 0 {
            let mut ev = [0u8; 2];
            self.mem.read(
                queue.used + RingLayout::new(queue.size).avail_event(),
                &mut ev,
            )?;
            let event = u16::from_le_bytes(ev);
            let new = queue.avail_idx;
            let old = new.wrapping_sub(published);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let mut fl = [0u8; 2];
            self.mem.read(queue.used, &mut fl)?;
            u16::from_le_bytes(fl) & 1 == 0
        };
        if need {
            queue.kick.write(1)?;
        }
        Ok(need)
    }

    /// Completions of queue `q`, waiting up to `timeout` for at least one. Returns the
    /// slots to the free list.
    pub fn wait(&mut self, q: usize, timeout: Duration) -> Result<Vec<Completion>, DriverError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let done = self.reap(q)?;
            if !done.is_empty() {
                return Ok(done);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout {
                    queue: q,
                    secs: timeout.as_secs(),
                });
            }
            // Ask for a call at the next used entry, then re-check before sleeping.
            if self.features & VIRTIO_RING_F_EVENT_IDX != 0 {
                let queue = &self.queues[q];
                let at = queue.avail + RingLayout::new(queue.size).used_event();
                self.mem.write(at, &queue.used_idx.to_le_bytes())?;
                fence(Ordering::SeqCst);
                let again = self.reap(q)?;
                if !again.is_empty() {
                    return Ok(again);
                }
            }
            let queue = &self.queues[q];
            let mut pfd = libc::pollfd {
                fd: queue.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                let _ = queue.call.read();
            }
        }
    }

    /// Used entries not seen yet.
    fn reap(&mut self, q: usize) -> Result<Vec<Completion>, DriverError> {
        let queue = &self.queues[q];
        let mut idx = [0u8; 2];
        self.mem.read(queue.used + 2, &mut idx)?;
        fence(Ordering::Acquire);
        let used = u16::from_le_bytes(idx);
        let mut out = Vec::new();
        let mut cur = queue.used_idx;
        while cur != used {
            let mut e = [0u8; 8];
            self.mem.read(
                queue.used + RingLayout::new(queue.size).used_entry(cur),
                &mut e,
            )?;
            let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            if id % 3 != 0 || (id / 3) as usize >= queue.slots.len() {
                return Err(DriverError::Protocol {
                    queue: q,
                    what: format!("used id {id} is no chain head"),
                });
            }
            out.push(Completion {
                slot: (id / 3) as usize,
                len,
            });
            cur = cur.wrapping_add(1);
        }
        let queue = &mut self.queues[q];
        queue.used_idx = cur;
        for c in &out {
            queue.free.push(c.slot);
        }
        Ok(out)
    }

    /// Reads the device's config space.
    pub fn config_space(&mut self, len: u32) -> Result<Vec<u8>, DriverError> {
        let buf = vec![0u8; len as usize];
        let (_, data) = self.frontend.get_config(
            0,
            len,
            vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
            &buf,
        )?;
        Ok(data)
    }
}

/// vhost's `Frontend` (built with `xen`, as this crate builds it) writes every region in the
/// 40-byte layout; through the layout relay it speaks the standard one to a daemon that does
/// not offer XEN_MMAP (a stock vhost-user-backend daemon) and passes Xen regions through to
/// one that does.
fn connect_frontend(path: &Path, queues: usize) -> Result<Frontend, DriverError> {
    let sock = UnixStream::connect(path)?;
    let (ours, _relays) = crate::daemon::layout::relay(
        sock,
        crate::daemon::layout::Rewrite::Narrow,
        &crate::daemon::threads::Sandbox::off(),
    )?;
    Ok(Frontend::from_stream(ours, queues as u64))
}

fn on_demand(gpa: u64, size: u64, fd: i32, domid: u16) -> RegionSpec {
    RegionSpec {
        gpa,
        size,
        uaddr: 0,
        offset: 0,
        flags: XEN_GRANT | XEN_NO_ADVANCE,
        domid,
        fd,
    }
}

fn region_info(r: &RegionSpec) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: r.gpa,
        memory_size: r.size,
        userspace_addr: r.uaddr,
        mmap_offset: r.offset,
        mmap_handle: r.fd,
        xen_mmap_flags: r.flags,
        xen_mmap_data: u32::from(r.domid),
    }
}

/// A descriptor of one buffer, chained to `next` if any.
fn desc(addr: u64, len: u32, write: bool, next: Option<u16>) -> Descriptor {
    let flags = if write { F_WRITE } else { 0 } | if next.is_some() { F_NEXT } else { 0 };
    Descriptor::new(addr, len, flags, next.unwrap_or(0))
}
