//! One virtio-mmio window served by a vhost-user daemon: the register file,
//! the connection (gone while the daemon restarts), and what to do on each
//! guest access, call and reconnect.

use std::path::PathBuf;
use std::str::FromStr;

use xen_sys::xen::DomId;

use crate::backend::{
    Backend, BackendError, Memory, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
};
use crate::mmio::{Effect, MmioRegs, INT_VRING};
use crate::ring_peek::RingPeek;

/// Size of a virtio-mmio window.
pub const WINDOW: u64 = 0x1000;

/// Virtio device types this frontend knows by name, with the bytes of
/// configuration space their Linux drivers read.
const TYPES: &[(&str, u32, u32)] = &[
    ("net", 1, 12),
    ("blk", 2, 60),
    ("console", 3, 12),
    ("rng", 4, 0),
    ("scsi", 8, 36),
    ("input", 18, 136),
    ("vsock", 19, 8),
    ("sound", 25, 16),
    ("scmi", 32, 0),
    ("i2c", 34, 0),
    ("can", 36, 8),
    ("gpio", 41, 48),
];

/// Errors of a `--device` specification.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A `key=value` item is malformed or unknown.
    #[error("{0:?}: expected type=,socket=,addr=,irq= and optional queues=,qsize=,config=")]
    Item(String),
    /// A value does not parse or is out of range.
    #[error("{key}={value:?}: {why}")]
    Value {
        key: &'static str,
        value: String,
        why: String,
    },
    /// A required key is missing.
    #[error("missing {0}=")]
    Missing(&'static str),
}

/// A `--device` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Virtio device id.
    pub device_id: u32,
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Guest-physical base of the 4 KiB window (page aligned).
    pub addr: u64,
    /// ISA IRQ.
    pub irq: u8,
    /// Queues to offer at most.
    pub queues: usize,
    /// Largest queue size offered.
    pub qsize: u16,
    /// Configuration bytes read from the daemon.
    pub config_len: u32,
}

fn num(key: &'static str, v: &str) -> Result<u64, SpecError> {
    let r = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    r.map_err(|e| SpecError::Value {
        key,
        value: v.into(),
        why: e.to_string(),
    })
}

impl FromStr for DeviceSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let (mut ty, mut socket, mut addr, mut irq) = (None, None, None, None);
        let (mut queues, mut qsize, mut config) = (None, 256u16, None);
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| SpecError::Item(item.into()))?;
            let bad = |key: &'static str, why: &str| SpecError::Value {
                key,
                value: v.into(),
                why: why.into(),
            };
            match k {
                "type" => {
                    let t = TYPES
                        .iter()
                        .find(|(n, _, _)| *n == v)
                        .map(|&(_, id, len)| (id, len))
                        .or_else(|| num("type", v).ok().map(|id| (id as u32, 0)))
                        .ok_or_else(|| {
                            bad("type", "a virtio device name (blk, rng, vsock, ...) or id")
                        })?;
                    ty = Some(t);
                }
                "socket" => socket = Some(PathBuf::from(v)),
                "addr" => {
                    let a = num("addr", v)?;
                    if a % WINDOW != 0 || a == 0 || a.checked_add(WINDOW).is_none() {
                        return Err(bad("addr", "a non-zero 4 KiB-aligned guest address"));
                    }
                    addr = Some(a);
                }
                "irq" => {
                    let i = num("irq", v)?;
                    irq = Some(
                        crate::irq::isa_irq(u32::try_from(i).unwrap_or(u32::MAX))
                            .map_err(|e| bad("irq", &e.to_string()))?,
                    );
                }
                "queues" => {
                    let n = num("queues", v)?;
                    if !(1..=64).contains(&n) {
                        return Err(bad("queues", "1 to 64"));
                    }
                    queues = Some(n as usize);
                }
                "qsize" => {
                    let n = num("qsize", v)?;
                    if !n.is_power_of_two() || n > 32768 {
                        return Err(bad("qsize", "a power of two up to 32768"));
                    }
                    qsize = n as u16;
                }
                "config" => {
                    let n = num("config", v)?;
                    if n > 0xf00 {
                        return Err(bad("config", "at most 3840 bytes (the window)"));
                    }
                    config = Some(n as u32);
                }
                _ => return Err(SpecError::Item(item.into())),
            }
        }
        let (device_id, default_config) = ty.ok_or(SpecError::Missing("type"))?;
        Ok(DeviceSpec {
            device_id,
            socket: socket.ok_or(SpecError::Missing("socket"))?,
            addr: addr.ok_or(SpecError::Missing("addr"))?,
            irq: irq.ok_or(SpecError::Missing("irq"))?,
            queues: queues.unwrap_or(1),
            qsize,
            config_len: config.unwrap_or(default_config),
        })
    }
}

/// Counters of one device.
#[derive(Debug, Default, Clone, Copy)]
pub struct DeviceStats {
    /// Trapped reads and writes of the window.
    pub reads: u64,
    pub writes: u64,
    /// QueueNotify writes forwarded as kicks.
    pub kicks: u64,
    /// Calls from the daemon turned into interrupt causes.
    pub calls: u64,
    /// Daemon connections after the first.
    pub reconnects: u64,
    /// Queues restarted at the used index after a reconnect.
    pub resumed_queues: u64,
}

/// A served window.
pub struct Device {
    /// Its specification.
    pub spec: DeviceSpec,
    /// Registers.
    pub regs: MmioRegs,
    /// The daemon, while connected.
    pub backend: Option<Backend>,
    /// Counters.
    pub stats: DeviceStats,
    domid: DomId,
    memory: Memory,
}

impl Device {
    /// Connects to the daemon and presents what it offers: its virtio
    /// features plus VERSION_1 (and ACCESS_PLATFORM under grant DMA, which
    /// Linux requires then), its queues (at most `spec.queues`), its
    /// configuration space.
    pub fn connect(spec: DeviceSpec, domid: DomId, memory: Memory) -> Result<Self, BackendError> {
        let mut b = Backend::connect(&spec.socket, domid, spec.queues)?;
        let config = b.config(spec.config_len)?;
        let platform = match memory {
            Memory::Grant => VIRTIO_F_ACCESS_PLATFORM,
            Memory::Foreign(_) => 0,
        };
        let features =
            (b.features & !VHOST_USER_F_PROTOCOL_FEATURES) | VIRTIO_F_VERSION_1 | platform;
        let max = vec![spec.qsize; b.queues];
        Ok(Device {
            regs: MmioRegs::new(spec.device_id, features, &max, config),
            spec,
            backend: Some(b),
            stats: DeviceStats::default(),
            domid,
            memory,
        })
    }

    /// True if guest-physical `addr` is in this window.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.spec.addr && addr - self.spec.addr < WINDOW
    }

    /// A trapped read.
    pub fn read(&mut self, addr: u64, size: u32) -> u64 {
        self.stats.reads += 1;
        self.regs.read(addr - self.spec.addr, size)
    }

    /// A trapped write; errors of the daemon are logged and mark the device
    /// as needing a reset, never fail the frontend.
    pub fn write(&mut self, addr: u64, size: u32, value: u64) {
        self.stats.writes += 1;
        match self.regs.write(addr - self.spec.addr, size, value) {
            Effect::None | Effect::InterruptChanged => {}
            Effect::Notify(q) => {
                self.stats.kicks += 1;
                if let Some(b) = &self.backend {
                    if let Err(e) = b.kick(usize::from(q)) {
                        log::warn!("{}: {e}", self.name());
                    }
                }
            }
            Effect::DriverOk => {
                let bases = vec![0; self.regs.queues().len()];
                self.start(&bases);
            }
            Effect::Reset => {
                if let Some(b) = &mut self.backend {
                    match b.stop() {
                        Ok(stopped) => {
                            log::info!("{}: reset; queues stopped at {stopped:?}", self.name())
                        }
                        Err(e) => log::warn!("{}: reset: {e}", self.name()),
                    }
                }
            }
            Effect::ConfigWrite { offset, data } => {
                if let Some(b) = &mut self.backend {
                    if let Err(e) = b.set_config(offset, &data) {
                        log::warn!("{}: {e}", self.name());
                    }
                }
            }
        }
    }

    fn start(&mut self, bases: &[u16]) {
        let name = self.name();
        let Some(b) = &mut self.backend else {
            return; // started when the daemon comes back
        };
        let q = self.regs.queues().to_vec();
        match b.start(&self.memory, self.regs.driver_features(), &q, bases) {
            Ok(()) => {
                let rings: Vec<String> = b
                    .started()
                    .iter()
                    .filter_map(|&i| q.get(i))
                    .map(|r| {
                        format!(
                            "size {} desc {:#x} avail {:#x} used {:#x}",
                            r.num, r.desc, r.driver, r.device
                        )
                    })
                    .collect();
                log::info!(
                    "{name}: started queues {:?} (features {:#x}, bases {bases:?}; {})",
                    b.started(),
                    self.regs.driver_features(),
                    rings.join("; ")
                )
            }
            Err(e) => {
                log::error!("{name}: {e}");
                self.regs.needs_reset();
            }
        }
    }

    /// Takes the daemon's calls; true if any came (the caller updates the line).
    pub fn take_calls(&mut self) -> bool {
        let Some(b) = &self.backend else {
            return false;
        };
        let mut any = false;
        for q in 0..b.queues {
            if b.take_call(q) {
                self.stats.calls += 1;
                any = true;
            }
        }
        if any {
            self.regs.raise(INT_VRING);
        }
        any
    }

    /// The daemon went away: forget the connection (its mappings go with it).
    pub fn disconnected(&mut self) {
        if self.backend.take().is_some() {
            log::warn!("{}: the daemon went away; reconnecting", self.name());
        }
    }

    /// Tries once to reconnect; when the driver is running, resumes each
    /// ready queue at the used index read from the guest's ring and kicks it,
    /// so what the old daemon popped and never completed is served again.
    pub fn try_reconnect(&mut self, peek: Option<&RingPeek>) -> Result<bool, BackendError> {
        if self.backend.is_some() {
            return Ok(true);
        }
        let mut b = match Backend::connect(&self.spec.socket, self.domid, self.spec.queues) {
            Ok(b) => b,
            Err(BackendError::Vhost {
                step: "connect", ..
            }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let config = b.config(self.spec.config_len)?;
        self.regs.set_config(config);
        self.backend = Some(b);
        self.stats.reconnects += 1;
        if self.regs.driver_ok() {
            let mut bases = Vec::new();
            for (i, q) in self.regs.queues().iter().enumerate() {
                let base = match (q.ready, peek) {
                    (true, Some(p)) => {
                        p.read_u16(self.domid, q.device + 2)
                            .map_err(|e| BackendError::Io {
                                what: format!("queue {i}'s used index"),
                                source: std::io::Error::other(e.to_string()),
                            })?
                    }
                    _ => 0,
                };
                bases.push(base);
            }
            self.stats.resumed_queues += bases.len() as u64;
            self.start(&bases); // kicks each queue it starts
            log::info!(
                "{}: reconnected, queues resumed at used indices {bases:?}",
                self.name()
            );
        } else {
            log::info!("{}: reconnected", self.name());
        }
        Ok(true)
    }

    /// A short name for logs.
    pub fn name(&self) -> String {
        format!(
            "device {:#x} ({})",
            self.spec.addr,
            self.spec.socket.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_and_defaults() {
        let s: DeviceSpec = "type=blk,socket=/run/blk.sock,addr=0xfeb01000,irq=5,queues=2"
            .parse()
            .unwrap();
        assert_eq!(
            s,
            DeviceSpec {
                device_id: 2,
                socket: "/run/blk.sock".into(),
                addr: 0xfeb0_1000,
                irq: 5,
                queues: 2,
                qsize: 256,
                config_len: 60,
            }
        );
        let s: DeviceSpec = "type=41,socket=s,addr=4096,irq=11,config=8,qsize=64"
            .parse()
            .unwrap();
        assert_eq!((s.device_id, s.config_len, s.qsize), (41, 8, 64));
    }

    #[test]
    fn spec_errors_name_the_value() {
        let e = |s: &str| s.parse::<DeviceSpec>().unwrap_err();
        assert_eq!(e("type=blk,socket=s,irq=5"), SpecError::Missing("addr"));
        assert!(matches!(
            e("type=blk,socket=s,addr=0xfeb00800,irq=5"),
            SpecError::Value { key: "addr", .. }
        ));
        assert!(matches!(
            e("type=blk,socket=s,addr=0x1000,irq=16"),
            SpecError::Value { key: "irq", .. }
        ));
        assert!(matches!(
            e("type=floppy,socket=s,addr=0x1000,irq=5"),
            SpecError::Value { key: "type", .. }
        ));
        assert!(matches!(
            e("type=blk,socket=s,addr=0x1000,irq=5,qsize=100"),
            SpecError::Value { key: "qsize", .. }
        ));
        assert_eq!(
            e("type=blk,colour=red"),
            SpecError::Item("colour=red".into())
        );
    }
}
