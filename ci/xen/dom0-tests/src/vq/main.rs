//! xen-vq: the dom0 frontend for the CI domU's virtqueue (`ci/xen/domu/domu-vq.c`), playing
//! xen-vhost-frontend's role in front of our `vhost-user-blk --xen` daemon, run by `ci/xen/run`.
//!
//! It waits for the domU's layout line (`XVM-DOMU-VQ ...` on its console), starts the daemon
//! as its own process, connects with the vhost crate's `Frontend`, negotiates XEN_MMAP, sends
//! each ring piece (descriptor table, avail, used) as a GRANT region mapped in advance at the
//! ring's own grant address with xen-vhost-frontend's sizes (+2 bytes past avail and used),
//! and everything else from `1 << 63` up as on-demand GRANT regions (flags 0x2|0x8) with the
//! domU's domid, the fd being `/dev/xen/gntdev`; SET_VRING_ADDR with frontend virtual
//! addresses that translate through the regions' `userspace_addr`. Then it bridges
//! notifications: an event from the domU's interdomain event channel becomes a write to the
//! daemon's kick eventfd, a call from the daemon becomes an event to the domU. When the domU
//! printed its verdict, the frontend disconnects; the daemon (`--connections 1`) exits, with
//! a nonzero status if any mapping is still live.
//!
//! Prints `XVM-TEST xen-vq/<case> PASS|FAIL ...`: setup, one case per domU result line (each
//! queue depth, the fault cases: `fault-ungranted`, `fault-revoked` (the domU revokes a data
//! grant between publishing its request and notifying; the frontend does nothing special, the
//! daemon's failed map or copy of the revoked ref is the case), `fault-reconnect`), the domU's
//! verdict, and the daemon's exit (nonzero if any mapping is still live: covers the faults too).
//!
//! `xen-vq [--host] [--daemon-bin PATH] [--console FILE] [--domid N] [--work DIR]`
//! `--host`: the domU driver runs on this machine (`domu-vq --host DIR`): one UNIX region over
//! its memfd (through /proc/PID/fd), FIFOs as doorbells; for tests without Xen.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;
use xen_vhost_mem::daemon::{VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1};

const PAGE: u64 = 4096;
const GRANT_BIT: u64 = 1 << 63;
const XEN_GRANT: u32 = 0x2;
const XEN_NO_ADVANCE: u32 = 0x8;
const XEN_FOREIGN: u32 = 0x1;
/// Where the FOREIGN regions are announced (their own range of frontend addresses).
const FAKE_VA_FOREIGN: u64 = 0x7e00_0000_0000;
/// Frontend virtual address the rings are announced at: only its relation to the regions'
/// `userspace_addr` matters.
const FAKE_VA: u64 = 0x7f00_0000_0000;
/// On-demand space: this many grant refs from ref 0.
const GRANT_SPACE_REFS: u64 = 1 << 20;
/// `_IOC(_IOC_NONE, 'E', 1, 8)` and `_IOC(_IOC_NONE, 'E', 4, 4)`, /usr/include/xen/evtchn.h.
const IOCTL_EVTCHN_BIND_INTERDOMAIN: libc::c_ulong = 0x0008_4501;
const IOCTL_EVTCHN_NOTIFY: libc::c_ulong = 0x0004_4504;

type Res<T> = Result<T, String>;

struct Report {
    binary: String,
    failed: usize,
}

impl Report {
    fn case(&mut self, name: &str, r: Res<String>) {
        match r {
            Ok(d) => println!("XVM-TEST {}/{name} PASS {d}", self.binary),
            Err(d) => {
                self.failed += 1;
                println!("XVM-TEST {}/{name} FAIL {d}", self.binary);
            }
        }
    }
}

/// The domU's layout line, `key=value` pairs.
struct Layout(Vec<(String, String)>);

impl Layout {
    fn parse(line: &str) -> Self {
        Layout(
            line.split_whitespace()
                .filter_map(|t| t.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
    fn get(&self, k: &str) -> Res<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| format!("no {k}= in the domU's layout line"))
    }
    fn num(&self, k: &str) -> Res<u64> {
        let s = self.get(k)?;
        match s.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => s.parse(),
        }
        .map_err(|e| format!("{k}={s}: {e}"))
    }
}

/// A doorbell pair with the domU: an interdomain event channel, or in host mode two FIFOs.
enum Bell {
    /// `fd` is /dev/xen/evtchn (one per channel), `port` our end.
    Evtchn { fd: File, port: u32 },
    /// Host mode: the driver writes `rx`, we write `tx`.
    Fifo { rx: File, tx: File },
}

impl Bell {
    fn evtchn(domid: u32, remote_port: u32) -> Res<Self> {
        let fd = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/xen/evtchn")
            .map_err(|e| format!("open /dev/xen/evtchn: {e}"))?;
        let arg: [u32; 2] = [domid, remote_port];
        // SAFETY: BIND_INTERDOMAIN reads an 8-byte struct {remote_domain, remote_port}.
        let port = unsafe { libc::ioctl(fd.as_raw_fd(), IOCTL_EVTCHN_BIND_INTERDOMAIN, &arg) };
        if port < 0 {
            return Err(format!(
                "EVTCHN_BIND_INTERDOMAIN(domid {domid}, port {remote_port}): {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut bell = Bell::Evtchn {
            fd,
            port: port as u32,
        };
        // Xen sets the new local port pending on BIND_INTERDOMAIN (notifications lost while
        // the remote port was unbound): consume that one, it is not from the domU.
        bell.wait(Duration::ZERO)?;
        Ok(bell)
    }

    fn fifos(dir: &Path, rx: &str, tx: &str) -> Res<Self> {
        let open = |n: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join(n))
                .map_err(|e| format!("{n} fifo: {e}"))
        };
        Ok(Bell::Fifo {
            rx: open(rx)?,
            tx: open(tx)?,
        })
    }

    fn fd(&self) -> RawFd {
        match self {
            Bell::Evtchn { fd, .. } => fd.as_raw_fd(),
            Bell::Fifo { rx, .. } => rx.as_raw_fd(),
        }
    }

    /// Consumes the pending events (and unmasks the port).
    fn ack(&mut self) -> Res<()> {
        let mut buf = [0u8; 64];
        match self {
            Bell::Evtchn { fd, port } => {
                let n = fd.read(&mut buf).map_err(|e| format!("read evtchn: {e}"))?;
                if n >= 4 {
                    fd.write_all(&port.to_ne_bytes())
                        .map_err(|e| format!("unmask evtchn: {e}"))?;
                }
            }
            Bell::Fifo { rx, .. } => {
                let _ = rx.read(&mut buf).map_err(|e| format!("read fifo: {e}"))?;
            }
        }
        Ok(())
    }

    fn notify(&mut self) -> Res<()> {
        match self {
            Bell::Evtchn { fd, port } => {
                // SAFETY: NOTIFY reads a 4-byte struct {port}.
                let r = unsafe { libc::ioctl(fd.as_raw_fd(), IOCTL_EVTCHN_NOTIFY, &*port) };
                if r < 0 {
                    return Err(format!(
                        "EVTCHN_NOTIFY: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            }
            Bell::Fifo { tx, .. } => {
                tx.write_all(&[1]).map_err(|e| format!("write fifo: {e}"))?;
            }
        }
        Ok(())
    }

    /// Waits up to `wait` for an event and consumes it; false on timeout.
    fn wait(&mut self, wait: Duration) -> Res<bool> {
        let mut p = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) };
        if r < 0 {
            return Err(format!("poll: {}", std::io::Error::last_os_error()));
        }
        if r == 0 {
            return Ok(false);
        }
        self.ack()?;
        Ok(true)
    }
}

/// A region to announce.
struct Region {
    gpa: u64,
    size: u64,
    uaddr: u64,
    flags: u32,
}

/// The regions xen-vhost-frontend would send for rings at `rings` (gpa, bytes): each piece in
/// advance at its own address and size, on-demand regions around them from the next page
/// boundary after each piece.
fn grant_regions(rings: &[(u64, u64)]) -> Vec<Region> {
    let mut pieces = rings.to_vec();
    pieces.sort_unstable();
    let mut out = Vec::new();
    let mut cursor = GRANT_BIT;
    let on_demand = |gpa, size| Region {
        gpa,
        size,
        uaddr: 0,
        flags: XEN_GRANT | XEN_NO_ADVANCE,
    };
    for (gpa, len) in pieces {
        if cursor < gpa {
            out.push(on_demand(cursor, gpa - cursor));
        }
        out.push(Region {
            gpa,
            size: len,
            uaddr: FAKE_VA + (gpa - GRANT_BIT),
            flags: XEN_GRANT,
        });
        cursor = cursor.max((gpa + len).next_multiple_of(PAGE));
    }
    let end = GRANT_BIT + GRANT_SPACE_REFS * PAGE;
    if cursor < end {
        out.push(on_demand(cursor, end - cursor));
    }
    out
}

/// The vhost-user frontend, connected and set up; dropping it disconnects.
struct Vq {
    _frontend: Option<Frontend>,
    kick: EventFd,
    call: EventFd,
    _fd: Option<File>,
    regions: usize,
    /// FOREIGN regions added for the benchmark.
    foreign: usize,
}

impl Vq {
    /// No connection: stands in while the frontend reconnects.
    fn placeholder() -> Res<Self> {
        Ok(Vq {
            _frontend: None,
            kick: EventFd::new(0).map_err(|e| format!("eventfd: {e}"))?,
            call: EventFd::new(0).map_err(|e| format!("eventfd: {e}"))?,
            _fd: None,
            regions: 0,
            foreign: 0,
        })
    }
}

fn ve(what: &'static str) -> impl Fn(vhost::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// Connects and waits for the daemon's first reply (it serves one connection at a time, so
/// a reply means the previous connection is over).
fn connect(socket: &Path) -> Res<(Frontend, u64)> {
    // The socket file exists once the daemon bound it; retry until it listens.
    let t = Instant::now();
    let fe = loop {
        match Frontend::connect(socket, 1) {
            Ok(fe) => break fe,
            Err(e) if t.elapsed() > Duration::from_secs(5) => return Err(format!("connect: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    fe.set_owner().map_err(ve("SET_OWNER"))?;
    let offered = fe.get_features().map_err(ve("GET_FEATURES"))?;
    Ok((fe, offered))
}

/// The rest of the setup over a connected frontend.
/// `ring`: "" for the domU's first (mid-page) vring, "2" for its page-aligned one.
fn setup(
    mut fe: Frontend,
    offered: u64,
    lay: &Layout,
    host: bool,
    domid: u32,
    ring: &str,
) -> Res<Vq> {
    let qsize = lay.num("qsize")? as u16;
    let (desc, avail, used) = (
        lay.num(&format!("desc{ring}"))?,
        lay.num(&format!("avail{ring}"))?,
        lay.num(&format!("used{ring}"))?,
    );
    if offered & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
        return Err("the daemon offers no protocol features".into());
    }
    let p = fe
        .get_protocol_features()
        .map_err(ve("GET_PROTOCOL_FEATURES"))?;
    let proto = p
        & (VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::XEN_MMAP);
    if !host && !proto.contains(VhostUserProtocolFeatures::XEN_MMAP) {
        return Err(format!("the daemon does not offer XEN_MMAP ({p:?})"));
    }
    fe.set_protocol_features(proto)
        .map_err(ve("SET_PROTOCOL_FEATURES"))?;
    if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    // What the domU's driver implements: VERSION_1, no EVENT_IDX, no indirect descriptors.
    let features = offered & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES);
    fe.set_features(features).map_err(ve("SET_FEATURES"))?;
    let (fd, regions, domid) = if host {
        let path = format!("/proc/{}/fd/{}", lay.get("pid")?, lay.get("memfd")?);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("open {path}: {e}"))?;
        let r = Region {
            gpa: 0,
            size: lay.num("size")?,
            uaddr: FAKE_VA,
            flags: 0,
        };
        (f, vec![r], 0)
    } else {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/xen/gntdev")
            .map_err(|e| format!("open /dev/xen/gntdev: {e}"))?;
        let q = u64::from(qsize);
        let rings = [
            (desc, 16 * q),
            (avail, 6 + 2 * q + 2),
            (used, 6 + 8 * q + 2),
        ];
        (f, grant_regions(&rings), domid)
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
            xen_mmap_data: domid,
        })
        .collect();
    fe.set_mem_table(&infos).map_err(ve("SET_MEM_TABLE"))?;
    // The same buffers at their guest-physical addresses, as FOREIGN regions (one per run of
    // contiguous gfns; ADD_MEM_REG, since there are more than SET_MEM_TABLE carries): the
    // benchmark's ceiling. Disjoint from the grant space, so both live in one table.
    let mut foreign = 0;
    let slots = proto.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
    if let (false, true, Ok(list)) = (host, slots, lay.get("gfns")) {
        let privcmd = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/xen/privcmd")
            .map_err(|e| format!("open /dev/xen/privcmd: {e}"))?;
        let mut gfns = list
            .split(',')
            .map(|g| u64::from_str_radix(g.trim_start_matches("0x"), 16))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(|e| format!("gfns: {e}"))?;
        gfns.sort_unstable();
        gfns.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for g in gfns {
            match runs.last_mut() {
                Some((start, n)) if *start + *n == g => *n += 1,
                _ => runs.push((g, 1)),
            }
        }
        for (g, n) in &runs {
            let info = VhostUserMemoryRegionInfo {
                guest_phys_addr: g * PAGE,
                memory_size: n * PAGE,
                userspace_addr: FAKE_VA_FOREIGN + g * PAGE,
                mmap_offset: 0,
                mmap_handle: privcmd.as_raw_fd(),
                xen_mmap_flags: XEN_FOREIGN,
                xen_mmap_data: domid,
            };
            fe.add_mem_region(&info)
                .map_err(|e| format!("ADD_MEM_REG FOREIGN gfn {g:#x} x{n}: {e}"))?;
        }
        foreign = runs.len();
    }
    // Rings as frontend virtual addresses, through the regions' userspace_addr.
    let uaddr = |gpa: u64| -> Res<u64> {
        regions
            .iter()
            .find(|r| r.uaddr != 0 && gpa >= r.gpa && gpa < r.gpa + r.size)
            .map(|r| r.uaddr + (gpa - r.gpa))
            .ok_or_else(|| format!("ring at {gpa:#x} in no region mapped in advance"))
    };
    let kick = EventFd::new(0).map_err(|e| format!("eventfd: {e}"))?;
    let call = EventFd::new(0).map_err(|e| format!("eventfd: {e}"))?;
    let cfg = VringConfigData {
        queue_max_size: qsize,
        queue_size: qsize,
        flags: 0,
        desc_table_addr: uaddr(desc)?,
        used_ring_addr: uaddr(used)?,
        avail_ring_addr: uaddr(avail)?,
        log_addr: None,
    };
    fe.set_vring_num(0, qsize).map_err(ve("SET_VRING_NUM"))?;
    fe.set_vring_addr(0, &cfg).map_err(ve("SET_VRING_ADDR"))?;
    fe.set_vring_base(0, 0).map_err(ve("SET_VRING_BASE"))?;
    fe.set_vring_call(0, &call).map_err(ve("SET_VRING_CALL"))?;
    fe.set_vring_kick(0, &kick).map_err(ve("SET_VRING_KICK"))?;
    fe.set_vring_enable(0, true)
        .map_err(ve("SET_VRING_ENABLE"))?;
    Ok(Vq {
        _frontend: Some(fe),
        kick,
        call,
        _fd: Some(fd),
        regions: infos.len(),
        foreign,
    })
}

fn read_text(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default()
}

/// The first line of `path` holding `tag`, from the tag on, waiting up to `wait`.
fn wait_line(path: &Path, tag: &str, wait: Duration) -> Res<String> {
    let t = Instant::now();
    loop {
        if let Some(l) = read_text(path)
            .lines()
            .find_map(|l| l.find(tag).map(|i| &l[i..]))
        {
            return Ok(l.to_string());
        }
        if t.elapsed() > wait {
            let text = read_text(path);
            let tail: String = text
                .chars()
                .skip(text.chars().count().saturating_sub(300))
                .collect();
            return Err(format!(
                "no {tag} in {} after {} s; its tail: {tail:?}",
                path.display(),
                wait.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Connects to the daemon named (`ours`, `peer`; `None`: the current one again).
type Reconnect<'a> = dyn FnMut(Option<&str>) -> Res<(Frontend, u64)> + 'a;

/// What the bridge did.
#[derive(Default)]
struct Bridged {
    kicks: u64,
    calls: u64,
    reconnects: u64,
    switches: u64,
}

/// Bridges notifications until the domU's verdict shows up on `console`. When the domU
/// announces the reconnect fault (`XVM-DOMU-VQ-PHASE reconnect`), the next kick is forwarded
/// and the frontend disconnects at once (mid-batch), reconnects, has the domU reset its queue
/// over the control channel, sets the queue up again from index 0 and says ready.
fn bridge(
    vq: &mut Vq,
    data: &mut Bell,
    ctl: &mut Bell,
    reconnect: &mut Reconnect<'_>,
    finish: &mut dyn FnMut(Frontend, u64, &str) -> Res<Vq>,
    console: &Path,
    wait: Duration,
) -> Res<Bridged> {
    let mut b = Bridged::default();
    let t = Instant::now();
    let mut last_check = Instant::now();
    let mut armed = false;
    let mut ring = "";
    data.notify()?; // ready: the domU starts
    loop {
        let mut fds = [
            libc::pollfd {
                fd: data.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: vq.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: ctl.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: three valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 3, 100) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("poll: {e}"));
            }
        }
        if fds[0].revents & libc::POLLIN != 0 {
            data.ack()?;
            vq.kick.write(1).map_err(|e| format!("kick: {e}"))?;
            b.kicks += 1;
            if armed {
                armed = false;
                b.reconnects += 1;
                // Mid-batch: the daemon has the kick; the socket closes now.
                drop(std::mem::replace(vq, Vq::placeholder()?));
                let (fe, offered) = reconnect(None)?;
                ctl.notify()?; // reset your queue
                if !ctl.wait(Duration::from_secs(30))? {
                    return Err("the domU did not acknowledge the queue reset in 30 s".into());
                }
                *vq = finish(fe, offered, ring)?;
                ctl.notify()?; // ready
                continue;
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let _ = vq.call.read();
            data.notify()?;
            b.calls += 1;
        }
        if fds[2].revents & libc::POLLIN != 0 {
            // The domU asks for another daemon (`XVM-DOMU-VQ-SWITCH seq=N to=ours|peer`).
            ctl.ack()?;
            b.switches += 1;
            let tag = format!("XVM-DOMU-VQ-SWITCH seq={} ", b.switches);
            let line = wait_line(console, &tag, Duration::from_secs(10))?;
            let to = Layout::parse(&line).get("to")?.to_string();
            drop(std::mem::replace(vq, Vq::placeholder()?));
            let (fe, offered) = reconnect(Some(&to))?;
            ctl.notify()?; // reset your queue
            if !ctl.wait(Duration::from_secs(30))? {
                return Err(format!(
                    "switch {}: no reset from the domU in 30 s",
                    b.switches
                ));
            }
            ring = "2";
            *vq = finish(fe, offered, ring)?;
            ctl.notify()?; // ready
        }
        if last_check.elapsed() > Duration::from_millis(200) || r == 0 {
            last_check = Instant::now();
            let text = read_text(console);
            if text.contains("XVM-DOMU-VQ-VERDICT") {
                return Ok(b);
            }
            if b.reconnects == 0 && text.contains("XVM-DOMU-VQ-PHASE reconnect") {
                armed = true;
            }
            if t.elapsed() > wait {
                return Err(format!(
                    "no verdict from the domU in {} s ({} kicks, {} calls bridged)",
                    wait.as_secs(),
                    b.kicks,
                    b.calls
                ));
            }
        }
    }
}

fn wait_child(child: &mut Child, wait: Duration) -> Res<std::process::ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().map_err(|e| format!("wait: {e}"))? {
            return Ok(st);
        }
        if t.elapsed() > wait {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("did not exit within {} s; killed", wait.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Args {
    host: bool,
    daemon_bin: PathBuf,
    peer_bin: PathBuf,
    console: Option<PathBuf>,
    domid: Option<u32>,
    work: PathBuf,
}

fn args() -> Res<Args> {
    let mut a = Args {
        host: false,
        daemon_bin: PathBuf::from("/tests/vhost-user-blk"),
        peer_bin: PathBuf::from("/tests/peer-blk-xen"),
        console: None,
        domid: None,
        work: PathBuf::from("/tmp/xen-vq"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--host" => a.host = true,
            "--daemon-bin" => a.daemon_bin = val()?.into(),
            "--peer-bin" => a.peer_bin = val()?.into(),
            "--console" => a.console = Some(val()?.into()),
            "--work" => a.work = val()?.into(),
            "--domid" => a.domid = Some(val()?.parse().map_err(|e| format!("--domid: {e}"))?),
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    Ok(a)
}

/// The domU's domid and console log from init's `/tmp/domu.info`.
fn domu_info() -> Res<(u32, PathBuf)> {
    let t = Instant::now();
    loop {
        if let Ok(f) = std::fs::read_to_string("/tmp/domu.failed") {
            return Err(format!("no domU: {}", f.trim()));
        }
        if let Ok(text) = std::fs::read_to_string("/tmp/domu.info") {
            let l = Layout::parse(&text);
            return Ok((l.num("domid")? as u32, l.get("log")?.into()));
        }
        if t.elapsed() > Duration::from_secs(240) {
            return Err("no /tmp/domu.info after 240 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(r: &mut Report) -> Res<()> {
    let a = args()?;
    let (domid, console) = match (a.domid, a.console.clone()) {
        (Some(d), Some(c)) => (d, c),
        (d, c) if a.host => (d.unwrap_or(0), c.ok_or("--host needs --console")?),
        (d, c) => {
            let (id, log) = domu_info()?;
            (d.unwrap_or(id), c.unwrap_or(log))
        }
    };
    let line = wait_line(&console, "XVM-DOMU-VQ ", Duration::from_secs(120))?;
    let mut lay = Layout::parse(&line);
    if !a.host {
        // The domU's buffer pages by gfn, for the FOREIGN regions of the benchmark: the GFNS
        // line of the run that announced itself, the last one before its XVM-DOMU-VQ line (the
        // domU's init runs domu-vq again if a run dies before announcing itself).
        let text = read_text(&console);
        let before = text.find("XVM-DOMU-VQ ").unwrap_or(text.len());
        let g = text[..before]
            .lines()
            .filter_map(|l| l.split_once("XVM-DOMU-VQ-GFNS ").map(|(_, g)| g.trim()))
            .next_back()
            .ok_or("no XVM-DOMU-VQ-GFNS line before the XVM-DOMU-VQ line")?;
        lay.0.push(("gfns".into(), g.into()));
    }
    std::fs::create_dir_all(&a.work).map_err(|e| format!("{}: {e}", a.work.display()))?;
    let disk = a.work.join("vq.img");
    let bytes = (lay.num("blocks")? * lay.num("data")?).max(1 << 20);
    File::create(&disk)
        .and_then(|f| f.set_len(bytes))
        .map_err(|e| format!("{}: {e}", disk.display()))?;
    let faults = lay.num("faults")? != 0;
    let peer_rounds = lay.num("peer_rounds").unwrap_or(0);
    let connections = 1 + u64::from(faults) + peer_rounds;
    let socket = a.work.join("vq.sock");
    let _ = std::fs::remove_file(&socket);
    let log_path = a.work.join("daemon.log");
    let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut cmd = Command::new(&a.daemon_bin);
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--blk-file")
        .arg(&disk)
        .args(["--num-queues", "1", "--connections"])
        .arg(connections.to_string())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(log);
    if !a.host {
        cmd.arg("--xen");
    }
    let mut daemon = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", a.daemon_bin.display()))?;
    let t = Instant::now();
    // Not a probe connection: the daemon counts every accepted socket against --connections.
    while !socket.exists() {
        if t.elapsed() > Duration::from_secs(20) {
            let _ = daemon.kill();
            return Err(format!(
                "the daemon never listened on {}: {}",
                socket.display(),
                read_text(&log_path)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut data, mut ctl) = if a.host {
        let dir = PathBuf::from(lay.get("dir")?);
        (
            Bell::fifos(&dir, "kick", "call")?,
            Bell::fifos(&dir, "ctl-up", "ctl-down")?,
        )
    } else {
        (
            Bell::evtchn(domid, lay.num("port")? as u32)?,
            Bell::evtchn(domid, lay.num("ctl_port")? as u32)?,
        )
    };
    let host = a.host;
    let setup_all = || connect(&socket).and_then(|(fe, f)| setup(fe, f, &lay, host, domid, ""));
    let mut vq = match setup_all() {
        Ok(vq) => vq,
        Err(e) => {
            let _ = daemon.kill();
            r.case("setup", Err(e));
            return Ok(());
        }
    };
    r.case(
        "setup",
        Ok(format!(
            "domid {domid}: {} GRANT regions (rings in advance, the rest on demand) and {} \
             FOREIGN regions over the buffers' gfns; {line}",
            vq.regions, vq.foreign
        )),
    );
    // The peer daemon: one process per turn of the domU's peer benchmark.
    let mut peer: Option<(Child, PathBuf)> = None;
    let mut peer_logs: Vec<String> = Vec::new();
    let mut peers = 0;
    let mut current = "ours".to_string();
    let mut reconnect = |to: Option<&str>| -> Res<(Frontend, u64)> {
        if let Some((mut child, log)) = peer.take() {
            let st = wait_child(&mut child, Duration::from_secs(20));
            let text = read_text(&log);
            let line = text.lines().rfind(|l| l.contains("peer-blk-xen:"));
            peer_logs.push(format!("{st:?}: {}", line.unwrap_or(text.trim())));
        }
        let to = to.unwrap_or(&current).to_string();
        current = to.clone();
        if to != "peer" {
            return connect(&socket);
        }
        peers += 1;
        let sock = a.work.join(format!("peer-{peers}.sock"));
        let log = a.work.join(format!("peer-{peers}.log"));
        let _ = std::fs::remove_file(&sock);
        let f = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(&a.peer_bin)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--blk-file")
            .arg(&disk)
            .stdin(Stdio::null())
            .stderr(f)
            .spawn()
            .map_err(|e| format!("{}: {e}", a.peer_bin.display()))?;
        peer = Some((child, log.clone()));
        let t = Instant::now();
        while !sock.exists() {
            if t.elapsed() > Duration::from_secs(20) {
                return Err(format!("the peer never listened: {}", read_text(&log)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        connect(&sock)
    };
    let bridged = bridge(
        &mut vq,
        &mut data,
        &mut ctl,
        &mut reconnect,
        &mut |fe, f, ring| setup(fe, f, &lay, host, domid, ring),
        &console,
        Duration::from_secs(270),
    );
    if let Some((mut child, log)) = peer.take() {
        let _ = child.kill();
        let _ = child.wait();
        peer_logs.push(read_text(&log));
    }
    let text = read_text(&console);
    for l in text.lines() {
        let Some(i) = l.find("XVM-DOMU-VQ-RESULT ") else {
            continue;
        };
        let rest = &l[i + "XVM-DOMU-VQ-RESULT ".len()..];
        let (name, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let name = name.replace('=', "-");
        match rest.split_once(' ') {
            Some(("PASS", d)) => r.case(&name, Ok(d.to_string())),
            Some((_, d)) => r.case(&name, Err(d.to_string())),
            None => r.case(&name, Err(rest.to_string())),
        }
    }
    let verdict = match bridged {
        Ok(b) => {
            let v = wait_line(&console, "XVM-DOMU-VQ-VERDICT ", Duration::from_secs(1))?;
            let v = &v["XVM-DOMU-VQ-VERDICT ".len()..];
            match v.strip_prefix("PASS ") {
                Some(d) => Ok(format!(
                    "domU says: {d}; {} events bridged to kicks, {} calls to events, {} \
                     reconnect(s), {} switch(es) of daemon",
                    b.kicks, b.calls, b.reconnects, b.switches
                )),
                None => Err(format!("domU says: {v}")),
            }
        }
        Err(e) => Err(e),
    };
    r.case("verdict", verdict);
    drop(vq);
    let st = wait_child(&mut daemon, Duration::from_secs(20));
    let dlog = read_text(&log_path);
    // The daemon's own account: per connection (requests, Xen system calls), then the total.
    let last = dlog
        .lines()
        .filter(|l| l.contains("] connection ") && l.contains("requests in"))
        .chain(dlog.lines().last())
        .map(|l| l.split_once("] ").map_or(l, |(_, m)| m))
        .collect::<Vec<_>>()
        .join("; ");
    if peer_rounds > 0 {
        // System calls per request, each daemon's own count: ours from its per-connection
        // lines (the connections after the fault cases are the benchmark's), the peer's by
        // interposition.
        let per_req = |l: &str| -> Option<f64> {
            let i = l.find(" per request")?;
            l[..i].rsplit('(').next()?.trim().parse().ok()
        };
        let mut ours: Vec<f64> = dlog
            .lines()
            .filter(|l| l.contains("] connection ") && l.contains("requests in"))
            .skip(1 + usize::from(faults))
            .filter_map(per_req)
            .collect();
        let mut theirs: Vec<f64> = peer_logs.iter().filter_map(|l| per_req(l)).collect();
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied()
        };
        r.case(
            "peer-syscalls",
            match (med(&mut ours), med(&mut theirs)) {
                (Some(o), Some(p)) => Ok(format!(
                    "system calls per request in the peer benchmark (median over {} turns \
                     each): ours {o:.2}, peer {p:.2}; peer turns: {}",
                    ours.len(),
                    peer_logs.join(" | ")
                )),
                _ => Err(format!(
                    "no counts: ours {ours:?}, peer {}",
                    peer_logs.join(" | ")
                )),
            },
        );
    }
    r.case(
        "daemon-exit",
        match st {
            Ok(s) if s.success() => Ok(format!("exit 0, no mapping left: {last}")),
            Ok(s) => Err(format!("{s}: {last}")),
            Err(e) => Err(format!("{e}: {last}")),
        },
    );
    Ok(())
}

fn main() {
    let mut r = Report {
        binary: std::env::var("XVM_BINARY").unwrap_or_else(|_| "xen-vq".into()),
        failed: 0,
    };
    if let Err(e) = run(&mut r) {
        r.case("setup", Err(e));
    }
    std::process::exit(i32::from(r.failed > 0));
}
