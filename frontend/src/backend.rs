//! The vhost-user side of one device: a connection to its daemon with
//! XEN_MMAP, and the guest memory table built from what Linux's grant DMA
//! put in the queue registers ([`Memory::Grant`]), or, for a guest kernel
//! without grant DMA, from the guest's RAM as FOREIGN regions
//! ([`Memory::Foreign`]).
//!
//! Under grant DMA every address the guest gives the device is a grant
//! address, `1 << 63 | ref << 12 | offset`. The rings are long-lived grants:
//! each ring piece (descriptor table, avail, used) goes to the daemon as a
//! GRANT region mapped in advance at its own address and exact size; the
//! rest of the grant space is covered by on-demand GRANT regions (flags
//! `GRANT | NO_ADVANCE`) that start at the next page boundary after each
//! piece, so buffers and indirect tables are mapped or copied per request and
//! released before it completes.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use xen_sys::xen::DomId;

use crate::mmio::QueueRegs;

/// Bit 63 of a grant DMA address.
pub const GRANT_BIT: u64 = 1 << 63;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_ACCESS_PLATFORM`: Linux's grant DMA requires the device to offer it.
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
/// Xen region flags (DESIGN.md §2): GRANT, and "do not map in advance" as rust-vmm spells it.
const XEN_FOREIGN: u32 = 0x1;
const XEN_GRANT: u32 = 0x2;
const XEN_NO_ADVANCE: u32 = 0x8;
/// The on-demand space announced: this many grant refs from ref 0 (Linux's
/// grant table holds far fewer; regions cost nothing until touched).
const GRANT_SPACE_REFS: u64 = 1 << 20;
/// Frontend "virtual addresses" of the ring regions: only their relation to
/// `userspace_addr` matters to the daemon (SET_VRING_ADDR is translated
/// through it), and this frontend never maps the rings itself.
const RING_VA: u64 = 0x7f00_0000_0000;
/// The same for FOREIGN regions: frontend address = this + guest-physical address.
const FOREIGN_VA: u64 = 0x7e00_0000_0000;
const PAGE: u64 = 4096;

/// Errors of the backend connection, naming the step and the socket.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A vhost-user request failed.
    #[error("{step} on {socket}: {source}")]
    Vhost {
        step: &'static str,
        socket: PathBuf,
        source: vhost::Error,
    },
    /// The daemon lacks something this frontend needs.
    #[error("{socket}: the daemon does not offer {what}")]
    Missing { socket: PathBuf, what: String },
    /// An eventfd or the grant device failed.
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// A ring the guest set up is not at a grant address.
    #[error("queue {queue}: {which} ring at {addr:#x} is not a grant address (is the guest kernel built with XEN_VIRTIO_FORCE_GRANT?)")]
    NotGrant {
        queue: usize,
        which: &'static str,
        addr: u64,
    },
    /// Two queues' ring pieces overlap.
    #[error("ring pieces overlap at {0:#x}")]
    Overlap(u64),
    /// FOREIGN mode: a ring outside the guest's RAM.
    #[error("queue {queue}: {which} ring at {addr:#x} is outside the guest RAM announced")]
    NotRam {
        queue: usize,
        which: &'static str,
        addr: u64,
    },
}

/// How the daemon reaches the guest's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Memory {
    /// Grant DMA (`XEN_VIRTIO_FORCE_GRANT`): rings in advance, the rest on demand.
    Grant,
    /// Guest-physical DMA: the guest's RAM ranges `(gpa, bytes)`, mapped as
    /// FOREIGN frames through privcmd.
    Foreign(Vec<(u64, u64)>),
}

impl Memory {
    /// The guest RAM of an HVM domain of `ram` bytes: below the VGA hole, and
    /// from 1 MiB up to the MMIO hole below 4 GiB (`mmio_hole` bytes, libxl's
    /// default 256 MiB), the rest from 4 GiB up (hvmloader's layout).
    pub fn hvm_ram(ram: u64, mmio_hole: u64) -> Vec<(u64, u64)> {
        const VGA: u64 = 0xa0000;
        const MIB: u64 = 1 << 20;
        const FOUR_G: u64 = 1 << 32;
        let low_end = ram.min(FOUR_G - mmio_hole);
        let mut out = vec![(0, VGA.min(ram))];
        if low_end > MIB {
            out.push((MIB, low_end - MIB));
        }
        if ram > low_end {
            out.push((FOUR_G, ram - low_end));
        }
        out
    }
}

/// The regions of a FOREIGN guest: its RAM, each range in advance.
pub fn foreign_regions(
    ram: &[(u64, u64)],
    queues: &[QueueRegs],
) -> Result<Vec<Region>, BackendError> {
    for (i, q) in queues.iter().enumerate().filter(|(_, q)| q.ready) {
        for (which, addr, len) in ring_spans(q) {
            let inside = ram
                .iter()
                .any(|&(g, l)| addr >= g && addr.checked_add(len).is_some_and(|e| e <= g + l));
            if !inside {
                return Err(BackendError::NotRam {
                    queue: i,
                    which,
                    addr,
                });
            }
        }
    }
    Ok(ram
        .iter()
        .map(|&(gpa, size)| Region {
            gpa,
            size,
            uaddr: FOREIGN_VA + gpa,
            flags: XEN_FOREIGN,
        })
        .collect())
}

/// One ring piece in guest (grant) address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Piece {
    gpa: u64,
    len: u64,
}

/// A region announced to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Guest address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Frontend address (0 for on-demand regions).
    pub uaddr: u64,
    /// Xen flags.
    pub flags: u32,
}

/// A queue's three ring pieces with virtio's sizes, the event-index fields
/// included whether or not EVENT_IDX is negotiated: drivers allocate them
/// (Linux's `vring_size`) and the daemon's queue checks ring sizes with them.
fn ring_spans(q: &QueueRegs) -> [(&'static str, u64, u64); 3] {
    let n = u64::from(q.num);
    [
        ("descriptor", q.desc, 16 * n),
        ("avail", q.driver, 6 + 2 * n),
        ("used", q.device, 6 + 8 * n),
    ]
}

/// The ring pieces of the ready queues.
fn ring_pieces(queues: &[QueueRegs]) -> Result<Vec<Piece>, BackendError> {
    let mut out = Vec::new();
    for (i, q) in queues.iter().enumerate().filter(|(_, q)| q.ready) {
        for (which, addr, len) in ring_spans(q) {
            if addr & GRANT_BIT == 0 || addr.checked_add(len).is_none() {
                return Err(BackendError::NotGrant {
                    queue: i,
                    which,
                    addr,
                });
            }
            out.push(Piece { gpa: addr, len });
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The regions for the ring pieces: each in advance at its own address,
/// on-demand regions between them from the next page boundary after each.
pub fn grant_regions(queues: &[QueueRegs]) -> Result<Vec<Region>, BackendError> {
    let pieces = ring_pieces(queues)?;
    let mut out = Vec::new();
    let mut cursor = GRANT_BIT;
    let mut prev_end = GRANT_BIT;
    for p in pieces {
        if p.gpa < prev_end {
            return Err(BackendError::Overlap(p.gpa));
        }
        if cursor < p.gpa {
            out.push(Region {
                gpa: cursor,
                size: p.gpa - cursor,
                uaddr: 0,
                flags: XEN_GRANT | XEN_NO_ADVANCE,
            });
        }
        out.push(Region {
            gpa: p.gpa,
            size: p.len,
            uaddr: RING_VA + (p.gpa - GRANT_BIT),
            flags: XEN_GRANT,
        });
        prev_end = p.gpa + p.len;
        cursor = cursor.max(prev_end.next_multiple_of(PAGE));
    }
    let end = GRANT_BIT + GRANT_SPACE_REFS * PAGE;
    if cursor < end {
        out.push(Region {
            gpa: cursor,
            size: end - cursor,
            uaddr: 0,
            flags: XEN_GRANT | XEN_NO_ADVANCE,
        });
    }
    Ok(out)
}

/// A connected daemon.
pub struct Backend {
    fe: Frontend,
    socket: PathBuf,
    /// Features the daemon offers (virtio bits and PROTOCOL_FEATURES).
    pub features: u64,
    protocol: VhostUserProtocolFeatures,
    /// Queues the daemon serves.
    pub queues: usize,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    /// Queues started by the last `start`.
    started: Vec<usize>,
    domid: DomId,
}

impl Backend {
    /// Connects to the daemon at `socket` and negotiates: XEN_MMAP is
    /// required; MQ, CONFIG, REPLY_ACK and CONFIGURE_MEM_SLOTS are taken when
    /// offered. `want_queues` caps the queues used.
    pub fn connect(socket: &Path, domid: DomId, want_queues: usize) -> Result<Self, BackendError> {
        let v = |step| {
            let socket = socket.to_path_buf();
            move |source| BackendError::Vhost {
                step,
                socket,
                source,
            }
        };
        let mut fe = Frontend::connect(socket, want_queues as u64).map_err(v("connect"))?;
        fe.set_owner().map_err(v("SET_OWNER"))?;
        let features = fe.get_features().map_err(v("GET_FEATURES"))?;
        if features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Err(BackendError::Missing {
                socket: socket.into(),
                what: "protocol features".into(),
            });
        }
        let offered = fe
            .get_protocol_features()
            .map_err(v("GET_PROTOCOL_FEATURES"))?;
        if !offered.contains(VhostUserProtocolFeatures::XEN_MMAP) {
            return Err(BackendError::Missing {
                socket: socket.into(),
                what: format!("XEN_MMAP (it offers {offered:?})"),
            });
        }
        let protocol = offered
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | VhostUserProtocolFeatures::XEN_MMAP);
        fe.set_protocol_features(protocol)
            .map_err(v("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            (fe.get_queue_num().map_err(v("GET_QUEUE_NUM"))? as usize).min(want_queues)
        } else {
            1
        };
        let ev = |what: &str| {
            EventFd::new(EFD_NONBLOCK).map_err(|source| BackendError::Io {
                what: format!("{what} eventfd"),
                source,
            })
        };
        let kicks = (0..queues).map(|_| ev("kick")).collect::<Result<_, _>>()?;
        let calls = (0..queues).map(|_| ev("call")).collect::<Result<_, _>>()?;
        Ok(Backend {
            fe,
            socket: socket.to_path_buf(),
            features,
            protocol,
            queues,
            kicks,
            calls,
            started: Vec::new(),
            domid,
        })
    }

    fn v(&self, step: &'static str) -> impl FnOnce(vhost::Error) -> BackendError {
        let socket = self.socket.clone();
        move |source| BackendError::Vhost {
            step,
            socket,
            source,
        }
    }

    /// The device configuration space, `len` bytes (empty without CONFIG).
    pub fn config(&mut self, len: u32) -> Result<Vec<u8>, BackendError> {
        if len == 0 || !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(Vec::new());
        }
        let buf = vec![0u8; len as usize];
        let (_, data) = self
            .fe
            .get_config(0, len, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(self.v("GET_CONFIG"))?;
        Ok(data)
    }

    /// Forwards a guest write of configuration bytes.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), BackendError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(());
        }
        self.fe
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(self.v("SET_CONFIG"))
    }

    /// Starts the ready queues: features the driver accepted (the virtio
    /// bits the daemon offers), the memory table, and each ready queue from
    /// `bases[i]` (where its avail index resumes). The regions' fd is
    /// `/dev/xen/gntdev` (GRANT) or `/dev/xen/privcmd` (FOREIGN).
    pub fn start(
        &mut self,
        memory: &Memory,
        driver_features: u64,
        queues: &[QueueRegs],
        bases: &[u16],
    ) -> Result<(), BackendError> {
        let device = match memory {
            Memory::Grant => "/dev/xen/gntdev",
            Memory::Foreign(_) => "/dev/xen/privcmd",
        };
        let fd = File::options()
            .read(true)
            .write(true)
            .open(device)
            .map_err(|source| BackendError::Io {
                what: format!("open {device}"),
                source,
            })?;
        self.start_with_fd(memory, &fd, driver_features, queues, bases)
    }

    /// [`Self::start`] sending `fd` with the regions (a daemon on an
    /// emulated Xen device ignores it; tests use that).
    pub fn start_with_fd(
        &mut self,
        memory: &Memory,
        fd: &File,
        driver_features: u64,
        queues: &[QueueRegs],
        bases: &[u16],
    ) -> Result<(), BackendError> {
        let features = (driver_features & self.features) | VHOST_USER_F_PROTOCOL_FEATURES;
        self.fe
            .set_features(features)
            .map_err(self.v("SET_FEATURES"))?;
        let regions = match memory {
            Memory::Grant => grant_regions(queues)?,
            Memory::Foreign(ram) => foreign_regions(ram, queues)?,
        };
        let infos: Vec<VhostUserMemoryRegionInfo> = regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.uaddr,
                mmap_offset: 0,
                mmap_handle: fd.as_raw_fd(),
                xen_mmap_flags: r.flags,
                xen_mmap_data: u32::from(self.domid),
            })
            .collect();
        self.fe
            .set_mem_table(&infos)
            .map_err(self.v("SET_MEM_TABLE"))?;
        let va = |gpa: u64| match memory {
            Memory::Grant => RING_VA + (gpa - GRANT_BIT),
            Memory::Foreign(_) => FOREIGN_VA + gpa,
        };
        self.started.clear();
        for (i, q) in queues.iter().enumerate().take(self.queues) {
            if !q.ready {
                continue;
            }
            let cfg = VringConfigData {
                queue_max_size: q.max,
                queue_size: q.num,
                flags: 0,
                desc_table_addr: va(q.desc),
                used_ring_addr: va(q.device),
                avail_ring_addr: va(q.driver),
                log_addr: None,
            };
            self.fe
                .set_vring_num(i, q.num)
                .map_err(self.v("SET_VRING_NUM"))?;
            self.fe
                .set_vring_addr(i, &cfg)
                .map_err(self.v("SET_VRING_ADDR"))?;
            self.fe
                .set_vring_base(i, bases.get(i).copied().unwrap_or(0))
                .map_err(self.v("SET_VRING_BASE"))?;
            self.fe
                .set_vring_call(i, &self.calls[i])
                .map_err(self.v("SET_VRING_CALL"))?;
            self.fe
                .set_vring_kick(i, &self.kicks[i])
                .map_err(self.v("SET_VRING_KICK"))?;
            self.fe
                .set_vring_enable(i, true)
                .map_err(self.v("SET_VRING_ENABLE"))?;
            self.started.push(i);
        }
        // A guest kicks as soon as DRIVER_OK is written, while the daemon may still be
        // reading the messages above: a daemon that reads that kick before it has taken
        // SET_VRING_ENABLE drops it (vhost-user-backend does), and the guest's first
        // request then waits for ever. So, as QEMU does: without REPLY_ACK, a request with
        // a reply (GET_FEATURES) marks the point where the daemon has taken every message
        // (a daemon serves them in order); then each started queue is kicked once.
        if !self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) && !self.started.is_empty()
        {
            self.fe
                .get_features()
                .map_err(self.v("GET_FEATURES (after the queues are enabled)"))?;
        }
        for &i in &self.started {
            self.kick(i)?;
        }
        Ok(())
    }

    /// Stops the started queues (GET_VRING_BASE waits for the daemon to stop
    /// each) and returns where each stopped.
    pub fn stop(&mut self) -> Result<Vec<(usize, u32)>, BackendError> {
        let mut out = Vec::new();
        for i in std::mem::take(&mut self.started) {
            let base = self
                .fe
                .get_vring_base(i)
                .map_err(self.v("GET_VRING_BASE"))?;
            out.push((i, base));
        }
        Ok(out)
    }

    /// Queues started and not stopped.
    pub fn started(&self) -> &[usize] {
        &self.started
    }

    /// Kicks queue `q`.
    pub fn kick(&self, q: usize) -> Result<(), BackendError> {
        match self.kicks.get(q) {
            Some(k) => k.write(1).map_err(|source| BackendError::Io {
                what: format!("kick of queue {q}"),
                source,
            }),
            None => Ok(()),
        }
    }

    /// The call eventfds, to poll.
    pub fn call_fds(&self) -> Vec<RawFd> {
        self.calls.iter().map(|c| c.as_raw_fd()).collect()
    }

    /// Consumes call `q`; true if the daemon had signalled it.
    pub fn take_call(&self, q: usize) -> bool {
        self.calls.get(q).is_some_and(|c| c.read().is_ok())
    }

    /// The socket, to poll for the daemon going away.
    pub fn socket_fd(&self) -> RawFd {
        self.fe.as_raw_fd()
    }

    /// Where the daemon listens.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(desc: u64, driver: u64, device: u64, num: u16) -> QueueRegs {
        QueueRegs {
            max: 256,
            num,
            ready: true,
            desc: GRANT_BIT | desc,
            driver: GRANT_BIT | driver,
            device: GRANT_BIT | device,
        }
    }

    #[test]
    fn linux_split_ring_layout() {
        // What the spike saw: Q=64, desc at ref 8, avail right after it, used on the next page.
        let r = grant_regions(&[q(0x8000, 0x8400, 0x9000, 64)]).unwrap();
        let g = |o: u64| GRANT_BIT | o;
        assert_eq!(
            r.iter()
                .map(|r| (r.gpa, r.size, r.flags))
                .collect::<Vec<_>>(),
            vec![
                (g(0), 0x8000, 0xa),
                (g(0x8000), 1024, 0x2),
                (g(0x8400), 6 + 128, 0x2),
                (g(0x9000), 6 + 512, 0x2),
                (g(0xa000), GRANT_SPACE_REFS * PAGE - 0xa000, 0xa),
            ]
        );
        assert_eq!(r[1].uaddr, RING_VA + 0x8000);
        assert_eq!(r[0].uaddr, 0);
    }

    #[test]
    fn two_queues_sorted_and_not_ready_ones_skipped() {
        let mut idle = q(0x1000, 0x1100, 0x2000, 16);
        idle.ready = false;
        let r = grant_regions(&[
            q(0x20000, 0x20400, 0x21000, 64),
            q(0x8000, 0x8400, 0x9000, 64),
            idle,
        ])
        .unwrap();
        let in_advance: Vec<u64> = r
            .iter()
            .filter(|r| r.flags == 0x2)
            .map(|r| r.gpa & !GRANT_BIT)
            .collect();
        assert_eq!(
            in_advance,
            vec![0x8000, 0x8400, 0x9000, 0x20000, 0x20400, 0x21000]
        );
        // Regions cover the grant space without overlap.
        for w in r.windows(2) {
            assert!(w[0].gpa + w[0].size <= w[1].gpa, "{w:x?}");
        }
    }

    #[test]
    fn hvm_ram_layout() {
        const MIB: u64 = 1 << 20;
        assert_eq!(
            Memory::hvm_ram(128 * MIB, 256 * MIB),
            vec![(0, 0xa0000), (MIB, 127 * MIB)]
        );
        assert_eq!(
            Memory::hvm_ram(5 << 30, 256 * MIB),
            vec![
                (0, 0xa0000),
                (MIB, (4 << 30) - 257 * MIB),
                (1 << 32, (5 << 30) - ((4 << 30) - 256 * MIB))
            ]
        );
    }

    #[test]
    fn foreign_regions_are_the_ram_and_hold_the_rings() {
        let ram = Memory::hvm_ram(128 << 20, 256 << 20);
        let mut qr = q(0, 0, 0, 64);
        (qr.desc, qr.driver, qr.device) = (0x10_0000, 0x10_0400, 0x10_1000);
        let r = foreign_regions(&ram, &[qr]).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[1].gpa, r[1].flags, r[1].uaddr),
            (1 << 20, 0x1, FOREIGN_VA + (1 << 20))
        );
        qr.device = 0xa0000; // the VGA hole
        assert!(matches!(
            foreign_regions(&ram, &[qr]),
            Err(BackendError::NotRam {
                queue: 0,
                which: "used",
                addr: 0xa0000
            })
        ));
    }

    #[test]
    fn non_grant_and_overlapping_rings_are_refused() {
        let mut bad = q(0x8000, 0x8400, 0x9000, 64);
        bad.driver = 0x8400;
        assert!(matches!(
            grant_regions(&[bad]),
            Err(BackendError::NotGrant {
                queue: 0,
                which: "avail",
                addr: 0x8400
            })
        ));
        let e = grant_regions(&[
            q(0x8000, 0x8400, 0x9000, 64),
            q(0x8100, 0x30000, 0x31000, 8),
        ])
        .unwrap_err();
        assert!(
            matches!(e, BackendError::Overlap(a) if a == GRANT_BIT | 0x8100),
            "{e}"
        );
    }
}
