//! A second ioreq server for an HVM domain: Xen sends it the guest's accesses
//! to the MMIO ranges it claims (the virtio-mmio windows), one synchronous
//! request slot per vCPU in a page shared with Xen, signalled per vCPU over
//! an interdomain event channel. QEMU, the domain's device model, keeps its
//! own server for everything else.
//!
//! Xen calls: `XEN_DMOP_create_ioreq_server`, `map_io_range_to_ioreq_server`,
//! `set_ioreq_server_state`, `destroy_ioreq_server` (privcmd DM_OP), the
//! ioreq page through privcmd's resource mapping, and the evtchn device.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU8, Ordering};

use xen_sys::dm_op::*;
use xen_sys::ioreq::{Ioreq, IOREQ_BITS_OFFSET, STATE_IOREQ_READY, STATE_IORESP_READY};
use xen_sys::privcmd::PrivcmdMmapResource;
use xen_sys::xen::{DomId, XEN_PAGE_SIZE};
use xen_sys::{Evtchn, Privcmd};

/// Errors of the ioreq server, each naming the step and domain.
#[derive(Debug, thiserror::Error)]
pub enum IoreqError {
    /// A DM_OP failed.
    #[error("{op} for domain {domid}: {source}")]
    DmOp {
        op: &'static str,
        domid: DomId,
        source: io::Error,
    },
    /// Mapping the ioreq page failed.
    #[error("mapping ioreq server {id}'s page of domain {domid}: {source}")]
    MapPage {
        id: IoServId,
        domid: DomId,
        source: io::Error,
    },
    /// Binding a vCPU's event channel failed.
    #[error(
        "binding vCPU {vcpu}'s event channel (remote port {port}) of domain {domid}: {source}"
    )]
    Bind {
        vcpu: u32,
        port: u32,
        domid: DomId,
        source: io::Error,
    },
    /// More vCPUs than one ioreq page has slots for.
    #[error("domain {domid} has {vcpus} vCPUs; one ioreq page serves at most {max}")]
    TooManyVcpus {
        domid: DomId,
        vcpus: u32,
        max: usize,
    },
    /// Reading or unmasking the event channel device failed.
    #[error("event channel: {0}")]
    Evtchn(io::Error),
}

/// One request taken from a vCPU's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The vCPU that made it.
    pub vcpu: u32,
    /// Its slot as Xen wrote it.
    pub ioreq: Ioreq,
}

/// An ioreq server, created, with its page mapped and its event channels
/// bound; dropped, it disables and destroys the server.
pub struct IoreqServer {
    privcmd: Privcmd,
    evtchn: Evtchn,
    domid: DomId,
    id: IoServId,
    page: NonNull<Ioreq>,
    /// vCPUs of the domain (one slot each).
    vcpus: u32,
    /// Local port per vCPU, bound once the server is enabled.
    ports: Vec<u32>,
    enabled: bool,
}

/// `ioreq_t` slots in one page.
const SLOTS_PER_PAGE: usize = XEN_PAGE_SIZE / std::mem::size_of::<Ioreq>();

fn dm(
    privcmd: &Privcmd,
    domid: DomId,
    op: &'static str,
    code: u32,
    args: XenDmOpArgs,
) -> Result<XenDmOp, IoreqError> {
    let mut d = XenDmOp::new(code, args);
    privcmd
        .dm_op(domid, &mut d)
        .map_err(|source| IoreqError::DmOp { op, domid, source })?;
    Ok(d)
}

/// `XEN_DMOP_nr_vcpus`: also how the frontend learns that the domain is gone
/// (`ESRCH`).
pub fn nr_vcpus(privcmd: &Privcmd, domid: DomId) -> Result<u32, IoreqError> {
    let d = dm(
        privcmd,
        domid,
        "XEN_DMOP_nr_vcpus",
        XEN_DMOP_NR_VCPUS,
        XenDmOpArgs { raw: [0; 3] },
    )?;
    // SAFETY: Xen wrote `nr_vcpus` for this op; every union member is plain integers.
    Ok(unsafe { d.u.nr_vcpus.vcpus })
}

impl IoreqServer {
    /// Creates a server for `domid` (no buffered requests) and maps its
    /// request page. Not yet enabled: see [`Self::set_enabled`].
    pub fn create(domid: DomId) -> Result<Self, IoreqError> {
        let privcmd = Privcmd::open().map_err(|source| IoreqError::DmOp {
            op: "open /dev/xen/privcmd",
            domid,
            source,
        })?;
        let evtchn = Evtchn::open().map_err(IoreqError::Evtchn)?;
        // Served only when poll says so; a read must never block the loop.
        // SAFETY: F_SETFL on an fd we own changes only its status flags.
        if unsafe { libc::fcntl(evtchn.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(IoreqError::Evtchn(io::Error::last_os_error()));
        }
        let vcpus = nr_vcpus(&privcmd, domid)?;
        if vcpus as usize > SLOTS_PER_PAGE {
            return Err(IoreqError::TooManyVcpus {
                domid,
                vcpus,
                max: SLOTS_PER_PAGE,
            });
        }
        let d = dm(
            &privcmd,
            domid,
            "XEN_DMOP_create_ioreq_server",
            XEN_DMOP_CREATE_IOREQ_SERVER,
            XenDmOpArgs {
                create_ioreq_server: XenDmOpCreateIoreqServer {
                    handle_bufioreq: HVM_IOREQSRV_BUFIOREQ_OFF,
                    ..Default::default()
                },
            },
        )?;
        // SAFETY: Xen wrote the new server's id into this member.
        let id = unsafe { d.u.create_ioreq_server.id };
        // From here on, Drop destroys the server (and unmaps what is mapped).
        let mut s = IoreqServer {
            privcmd,
            evtchn,
            domid,
            id,
            page: NonNull::dangling(),
            vcpus,
            ports: Vec::new(),
            enabled: false,
        };
        s.page = s.map_page()?;
        Ok(s)
    }

    fn map_page(&self) -> Result<NonNull<Ioreq>, IoreqError> {
        let err = |source| IoreqError::MapPage {
            id: self.id,
            domid: self.domid,
            source,
        };
        // SAFETY: a fresh shared mapping of privcmd; nothing else points there.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                XEN_PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.privcmd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(err(io::Error::last_os_error()));
        }
        let mut res = PrivcmdMmapResource {
            dom: self.domid,
            type_: XENMEM_RESOURCE_IOREQ_SERVER,
            id: u32::from(self.id),
            idx: XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ0,
            num: 1,
            addr: addr as u64,
        };
        // SAFETY: `addr` starts a one-page mmap of this privcmd fd that no
        // Rust reference points into.
        if let Err(e) = unsafe { self.privcmd.mmap_resource(&mut res) } {
            // SAFETY: unmapping the page mapped just above.
            unsafe { libc::munmap(addr, XEN_PAGE_SIZE) };
            return Err(err(e));
        }
        NonNull::new(addr.cast()).ok_or_else(|| err(io::Error::other("mmap returned null")))
    }

    /// The server's id.
    pub fn id(&self) -> IoServId {
        self.id
    }
    /// vCPUs served.
    pub fn vcpus(&self) -> usize {
        self.vcpus as usize
    }
    /// The privcmd handle, for the domain's other DM_OPs (interrupts).
    pub fn privcmd(&self) -> &Privcmd {
        &self.privcmd
    }

    /// Claims guest-physical `[start, end]` (inclusive) for this server.
    pub fn map_mmio(&self, start: u64, end: u64) -> Result<(), IoreqError> {
        dm(
            &self.privcmd,
            self.domid,
            "XEN_DMOP_map_io_range_to_ioreq_server",
            XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER,
            XenDmOpArgs {
                ioreq_server_range: XenDmOpIoreqServerRange {
                    id: self.id,
                    pad: 0,
                    type_: XEN_DMOP_IO_RANGE_MEMORY,
                    start,
                    end,
                },
            },
        )
        .map(drop)
    }

    /// Starts (or stops) the delivery of requests. The first start binds one
    /// event channel per vCPU: Xen writes each vCPU's port into its slot
    /// when the server is enabled, not before (seen on Xen 4.17: port 0).
    pub fn set_enabled(&mut self, on: bool) -> Result<(), IoreqError> {
        dm(
            &self.privcmd,
            self.domid,
            "XEN_DMOP_set_ioreq_server_state",
            XEN_DMOP_SET_IOREQ_SERVER_STATE,
            XenDmOpArgs {
                set_ioreq_server_state: XenDmOpSetIoreqServerState {
                    id: self.id,
                    enabled: u8::from(on),
                    pad: 0,
                },
            },
        )?;
        self.enabled = on;
        if on && self.ports.is_empty() {
            self.bind_ports()?;
        }
        Ok(())
    }

    fn bind_ports(&mut self) -> Result<(), IoreqError> {
        for vcpu in 0..self.vcpus {
            // SAFETY: `page` maps one page of `SLOTS_PER_PAGE` slots and `vcpu`
            // is below that (checked at creation); the field is read volatile
            // since Xen writes the page.
            let port = unsafe {
                std::ptr::read_volatile(
                    &raw const (*self.page.as_ptr().add(vcpu as usize)).vp_eport,
                )
            };
            let local = self
                .evtchn
                .bind_interdomain(u32::from(self.domid), port)
                .map_err(|source| IoreqError::Bind {
                    vcpu,
                    port,
                    domid: self.domid,
                    source,
                })?;
            self.ports.push(local);
        }
        Ok(())
    }

    /// The fd to poll for requests.
    pub fn fd(&self) -> RawFd {
        self.evtchn.as_raw_fd()
    }

    fn bits(&self, vcpu: usize) -> &AtomicU8 {
        // SAFETY: `vcpu` < `ports.len()` <= SLOTS_PER_PAGE, inside the mapped
        // page; the byte is shared with Xen, so it is only accessed atomically.
        unsafe {
            AtomicU8::from_ptr(
                self.page
                    .as_ptr()
                    .add(vcpu)
                    .cast::<u8>()
                    .add(IOREQ_BITS_OFFSET),
            )
        }
    }

    /// Serves every request waiting now: for each vCPU whose port fired and
    /// whose slot is READY, `handle` gets the request and returns the value
    /// for a read (ignored for a write); the answer goes back with
    /// IORESP_READY and a notification. Returns the number served.
    pub fn serve_pending(
        &mut self,
        mut handle: impl FnMut(&Request) -> u64,
    ) -> Result<usize, IoreqError> {
        let mut fired = [0u32; 64];
        let n = match self.evtchn.pending(&mut fired) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(IoreqError::Evtchn(e)),
        };
        let mut served = 0;
        for &port in &fired[..n] {
            self.evtchn.unmask(port).map_err(IoreqError::Evtchn)?;
            let Some(vcpu) = self.ports.iter().position(|&p| p == port) else {
                continue;
            };
            let bits = self.bits(vcpu);
            if bits.load(Ordering::Acquire) & 0xf != STATE_IOREQ_READY {
                continue;
            }
            fence(Ordering::Acquire);
            // SAFETY: inside the mapped page (see `bits`); Xen does not touch
            // a READY slot until we answer, so a volatile copy reads it whole.
            let ioreq = unsafe { std::ptr::read_volatile(self.page.as_ptr().add(vcpu)) };
            let req = Request {
                vcpu: vcpu as u32,
                ioreq,
            };
            let data = handle(&req);
            if ioreq.dir() == xen_sys::ioreq::IOREQ_READ && !ioreq.data_is_ptr() {
                // SAFETY: as above; only our answer's field is written.
                unsafe {
                    std::ptr::write_volatile(&raw mut (*self.page.as_ptr().add(vcpu)).data, data)
                };
            }
            fence(Ordering::Release);
            let b = bits.load(Ordering::Relaxed);
            bits.store((b & !0xf) | STATE_IORESP_READY, Ordering::Release);
            self.evtchn.notify(port).map_err(IoreqError::Evtchn)?;
            served += 1;
        }
        Ok(served)
    }
}

impl Drop for IoreqServer {
    fn drop(&mut self) {
        if self.enabled {
            let _ = self.set_enabled(false);
        }
        for &p in &self.ports {
            let _ = self.evtchn.unbind(p);
        }
        if self.page != NonNull::dangling() {
            // SAFETY: the one page mapped in `map_page`; nothing borrows it
            // past this point.
            unsafe { libc::munmap(self.page.as_ptr().cast(), XEN_PAGE_SIZE) };
        }
        // Gone with the domain already: ESRCH, nothing to do.
        let _ = dm(
            &self.privcmd,
            self.domid,
            "XEN_DMOP_destroy_ioreq_server",
            XEN_DMOP_DESTROY_IOREQ_SERVER,
            XenDmOpArgs {
                destroy_ioreq_server: XenDmOpDestroyIoreqServer {
                    id: self.id,
                    pad: 0,
                },
            },
        );
    }
}
