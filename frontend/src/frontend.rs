//! The event loop of one domU's frontend: guest accesses from the ioreq
//! server, calls and hang-ups from the daemons, signals, and a tick for
//! reconnects and for noticing that the domain is gone.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use xen_sys::ioreq::{IOREQ_READ, IOREQ_TYPE_COPY};
use xen_sys::xen::DomId;
use xen_sys::Xenbus;

use crate::backend::{BackendError, Memory};
use crate::device::{Device, DeviceSpec, DeviceStats, WINDOW};
use crate::domain::{self, DomainError};
use crate::ioreq_server::{self, IoreqError, IoreqServer, Request};
use crate::irq::{IrqError, IrqLines};
use crate::ring_peek::RingPeek;

/// Errors that end the frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The domain cannot be served.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The ioreq server failed.
    #[error(transparent)]
    Ioreq(#[from] IoreqError),
    /// A daemon could not be reached or refused the setup.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Raising an interrupt failed.
    #[error(transparent)]
    Irq(#[from] IrqError),
    /// Two windows overlap.
    #[error("windows at {0:#x} and {1:#x} overlap")]
    Overlap(u64, u64),
    /// A system call of the loop failed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM, SIGINT or SIGHUP.
    Signal(i32),
    /// The domain was destroyed.
    DomainGone,
}

/// Counters of the whole frontend.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Ioreqs served.
    pub ioreqs: u64,
    /// Ioreqs outside every window or of a kind not emulated.
    pub unhandled: u64,
    /// Interrupt assertions per ISA IRQ, and DM_OPs on the lines.
    pub irq_asserts: Vec<(u8, u64)>,
    pub irq_dm_ops: u64,
    /// Per device, in `--device` order.
    pub devices: Vec<DeviceStats>,
    /// Seconds served.
    pub seconds: f64,
}

impl Stats {
    /// One JSON object.
    pub fn json(&self) -> String {
        let devs: Vec<String> = self
            .devices
            .iter()
            .map(|d| {
                format!(
                    "{{\"reads\":{},\"writes\":{},\"kicks\":{},\"calls\":{},\"reconnects\":{},\"resumed_queues\":{}}}",
                    d.reads, d.writes, d.kicks, d.calls, d.reconnects, d.resumed_queues
                )
            })
            .collect();
        let asserts: Vec<String> = self
            .irq_asserts
            .iter()
            .map(|(irq, n)| format!("\"{irq}\":{n}"))
            .collect();
        format!(
            "{{\"ioreqs\":{},\"unhandled\":{},\"irq_asserts\":{{{}}},\"irq_dm_ops\":{},\"seconds\":{:.3},\"devices\":[{}]}}",
            self.ioreqs,
            self.unhandled,
            asserts.join(","),
            self.irq_dm_ops,
            self.seconds,
            devs.join(",")
        )
    }
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The HVM guest.
    pub domid: DomId,
    /// Its windows.
    pub devices: Vec<DeviceSpec>,
    /// How long to wait for each daemon at startup.
    pub connect_timeout: Duration,
    /// Between reconnect attempts.
    pub reconnect_every: Duration,
    /// How the daemons reach guest memory.
    pub memory: MemoryChoice,
}

/// `--memory`: grant DMA, or FOREIGN frames of the guest's RAM (its size
/// read from XenStore).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryChoice {
    /// The guest kernel uses grant DMA (`XEN_VIRTIO_FORCE_GRANT`).
    Grant,
    /// It does not: DMA addresses are guest-physical.
    Foreign,
}

/// Blocks SIGTERM, SIGINT, SIGHUP and SIGUSR1 and returns a signalfd for them.
fn signal_fd() -> Result<OwnedFd, FrontendError> {
    let io = |what| move |source| FrontendError::Io { what, source };
    // SAFETY: a zeroed sigset is valid storage for sigemptyset/sigaddset,
    // which only write it; the mask change affects this thread, and the
    // frontend is one thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io("sigprocmask")(io::Error::last_os_error()));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io("signalfd")(io::Error::last_os_error()));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn read_signal(fd: &OwnedFd) -> Option<i32> {
    let mut info = [0u8; 128];
    // SAFETY: reading one signalfd_siginfo (128 bytes) into a buffer of that size.
    let n = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
    (n == 128).then(|| i32::from_ne_bytes([info[0], info[1], info[2], info[3]]))
}

/// Connects to a daemon, retrying while its socket is not there yet.
fn connect_device(
    spec: &DeviceSpec,
    domid: DomId,
    memory: &Memory,
    wait: Duration,
) -> Result<Device, BackendError> {
    let t = Instant::now();
    loop {
        match Device::connect(spec.clone(), domid, memory.clone()) {
            Ok(d) => return Ok(d),
            Err(BackendError::Vhost {
                step: "connect", ..
            }) if t.elapsed() < wait => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(e),
        }
    }
}

/// Serves `opts.devices` for `opts.domid` until a signal or the domain's end.
pub fn run(opts: &Options, stats_out: &mut Stats) -> Result<Exit, FrontendError> {
    let domid = opts.domid;
    let xs: Xenbus = domain::xenstore()?;
    // Before anything touches the domain: interrupts reach only HVM guests.
    domain::require_hvm(&xs, domid)?;
    let mut specs = opts.devices.clone();
    specs.sort_by_key(|s| s.addr);
    for w in specs.windows(2) {
        if w[0].addr + WINDOW > w[1].addr {
            return Err(FrontendError::Overlap(w[0].addr, w[1].addr));
        }
    }
    let memory = match opts.memory {
        MemoryChoice::Grant => Memory::Grant,
        MemoryChoice::Foreign => {
            let ram = domain::ram_bytes(&xs, domid)?;
            let ranges = Memory::hvm_ram(ram, 256 << 20);
            log::info!("FOREIGN memory: {} MiB of RAM in {ranges:x?}", ram >> 20);
            Memory::Foreign(ranges)
        }
    };
    let mut devices = Vec::new();
    for s in &opts.devices {
        let d = connect_device(s, domid, &memory, opts.connect_timeout)?;
        log::info!(
            "{}: virtio device {} with {} queue(s), features {:#x}, {} config bytes",
            d.name(),
            s.device_id,
            d.regs.queues().len(),
            d.backend.as_ref().map_or(0, |b| b.features),
            s.config_len
        );
        devices.push(d);
    }
    let mut server = IoreqServer::create(domid)?;
    for d in &devices {
        server.map_mmio(d.spec.addr, d.spec.addr + WINDOW - 1)?;
    }
    server.set_enabled(true)?;
    log::info!(
        "ioreq server {} for domain {domid}: {} window(s), {} vCPU(s)",
        server.id(),
        devices.len(),
        server.vcpus()
    );
    let peek = RingPeek::open(&memory).ok();
    let sig = signal_fd()?;
    let mut lines = IrqLines::new(domid);
    let irqs: BTreeSet<u8> = devices.iter().map(|d| d.spec.irq).collect();
    let started = Instant::now();
    let mut last_tick = Instant::now();
    let mut ioreqs = 0u64;
    let mut unhandled = 0u64;
    let mut warned = false;
    let exit = loop {
        // The poll set: ioreqs, signals, then per device its socket and calls.
        let mut fds: Vec<libc::pollfd> = vec![pollfd(server.fd()), pollfd(sig.as_raw_fd())];
        let mut owners: Vec<(usize, bool)> = Vec::new(); // (device, is socket)
        for (i, d) in devices.iter().enumerate() {
            if let Some(b) = &d.backend {
                fds.push(pollfd(b.socket_fd()));
                owners.push((i, true));
                for fd in b.call_fds() {
                    fds.push(pollfd(fd));
                    owners.push((i, false));
                }
            }
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(FrontendError::Io {
                what: "poll",
                source: e,
            });
        }
        if fds[1].revents != 0 {
            match read_signal(&sig) {
                // SIGUSR1: the counters so far, and serve on.
                Some(libc::SIGUSR1) => println!(
                    "xen-mmio-frontend stats {}",
                    snapshot(&devices, &lines, ioreqs, unhandled, started).json()
                ),
                Some(s) => break Exit::Signal(s),
                None => {}
            }
        }
        let mut touched = false;
        if fds[0].revents != 0 {
            let r = server.serve_pending(|req: &Request| {
                ioreqs += 1;
                let io = req.ioreq;
                if io.type_ != IOREQ_TYPE_COPY || io.data_is_ptr() || io.count != 1 {
                    unhandled += 1;
                    if !warned {
                        warned = true;
                        log::warn!("ioreq not emulated (logged once): {io:x?}");
                    }
                    return u64::MAX;
                }
                match devices.iter_mut().find(|d| d.contains(io.addr)) {
                    Some(d) if io.dir() == IOREQ_READ => d.read(io.addr, io.size),
                    Some(d) => {
                        d.write(io.addr, io.size, io.data);
                        0
                    }
                    None => {
                        unhandled += 1;
                        u64::MAX
                    }
                }
            });
            match r {
                Ok(_) => touched = true,
                Err(e) => {
                    if !domain::alive(&xs, domid)
                        || ioreq_server::nr_vcpus(server.privcmd(), domid).is_err()
                    {
                        break Exit::DomainGone;
                    }
                    return Err(e.into());
                }
            }
        }
        for (k, &(i, is_socket)) in owners.iter().enumerate() {
            let ev = fds[k + 2].revents;
            if ev == 0 {
                continue;
            }
            if is_socket {
                // The daemon sends nothing unasked on this socket: readable
                // means end of file.
                devices[i].disconnected();
            } else if devices[i].take_calls() {
                touched = true;
            }
        }
        if touched {
            for &irq in &irqs {
                let high = devices
                    .iter()
                    .any(|d| d.spec.irq == irq && d.regs.interrupt_status() != 0);
                lines.set(server.privcmd(), irq, high)?;
            }
        }
        if last_tick.elapsed() >= opts.reconnect_every {
            last_tick = Instant::now();
            if !domain::alive(&xs, domid) {
                break Exit::DomainGone;
            }
            for d in devices.iter_mut().filter(|d| d.backend.is_none()) {
                if let Err(e) = d.try_reconnect(peek.as_ref()) {
                    log::warn!("{}: reconnect: {e}", d.name());
                    d.disconnected();
                }
            }
        }
    };
    if exit != Exit::DomainGone {
        for &irq in &irqs {
            let _ = lines.set(server.privcmd(), irq, false);
        }
    }
    *stats_out = snapshot(&devices, &lines, ioreqs, unhandled, started);
    // Close the daemons' connections before the server goes: their grant
    // mappings end with them, so a destroyed domain is not held as a zombie.
    drop(devices);
    drop(server);
    Ok(exit)
}

fn snapshot(
    devices: &[Device],
    lines: &IrqLines,
    ioreqs: u64,
    unhandled: u64,
    started: Instant,
) -> Stats {
    Stats {
        ioreqs,
        unhandled,
        irq_asserts: lines.asserts.iter().map(|(&i, &n)| (i, n)).collect(),
        irq_dm_ops: lines.dm_ops,
        devices: devices.iter().map(|d| d.stats).collect(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}
