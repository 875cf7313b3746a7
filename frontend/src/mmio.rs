//! The virtio-mmio (version 2) register file of one device window, as the
//! guest sees it (virtio 1.2, 4.2.2). Pure state: a trapped access goes in,
//! the value of a read or an [`Effect`] for the rest of the frontend comes
//! out. Nothing the guest writes can make it fail; a value it must not write
//! (a queue size above the maximum, features the device did not offer) is
//! refused at the point the spec says the device refuses it.

/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Vendor id reported to the guest ("XVHM").
pub const VENDOR_ID: u32 = 0x4d48_5658;

/// Register offsets (virtio 1.2, table 4.1).
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const QUEUE_RESET: u64 = 0x0c0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bit: the device used a buffer.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// One queue's registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueRegs {
    /// Largest size the device accepts (0: no such queue).
    pub max: u16,
    /// Size the driver chose.
    pub num: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (avail) ring address.
    pub driver: u64,
    /// Device (used) ring address.
    pub device: u64,
}

/// What a guest access asks of the rest of the frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond the register change.
    None,
    /// QueueNotify: kick queue `0`.
    Notify(u16),
    /// InterruptStatus changed (an ACK): the line may drop.
    InterruptChanged,
    /// The driver set DRIVER_OK: start the device with these queues.
    DriverOk,
    /// The driver wrote 0 to Status: stop the device, drop the line.
    Reset,
    /// The driver wrote device configuration bytes at this offset.
    ConfigWrite { offset: u32, data: Vec<u8> },
}

/// A virtio-mmio window's registers.
#[derive(Debug, Clone)]
pub struct MmioRegs {
    device_id: u32,
    device_features: u64,
    config: Vec<u8>,
    queues: Vec<QueueRegs>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    status: u32,
    config_generation: u32,
}

impl MmioRegs {
    /// A window for virtio device type `device_id` offering `features`, with
    /// one entry of `queue_max` per queue, and `config` as its configuration
    /// space.
    pub fn new(device_id: u32, features: u64, queue_max: &[u16], config: Vec<u8>) -> Self {
        MmioRegs {
            device_id,
            device_features: features,
            config,
            queues: queue_max
                .iter()
                .map(|&max| QueueRegs {
                    max,
                    ..Default::default()
                })
                .collect(),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            status: 0,
            config_generation: 0,
        }
    }

    /// Replaces the configuration space (a new backend connection) and bumps
    /// the generation, so a driver reading across the change reads again.
    pub fn set_config(&mut self, config: Vec<u8>) {
        if config != self.config {
            self.config = config;
            self.config_generation = self.config_generation.wrapping_add(1);
        }
    }

    /// Features the driver accepted (valid once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }
    /// Device status.
    pub fn status(&self) -> u32 {
        self.status
    }
    /// True between DRIVER_OK and the next reset.
    pub fn driver_ok(&self) -> bool {
        self.status & status::DRIVER_OK != 0
    }
    /// The queues' registers.
    pub fn queues(&self) -> &[QueueRegs] {
        &self.queues
    }
    /// Pending interrupt causes; the line is asserted while non-zero.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }
    /// Raises interrupt causes `bits` (`INT_*`).
    pub fn raise(&mut self, bits: u32) {
        self.interrupt_status |= bits;
    }
    /// Marks the device broken (a backend that cannot serve the queues): the
    /// driver sees DEVICE_NEEDS_RESET with a configuration interrupt.
    pub fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt_status |= INT_CONFIG;
    }

    fn queue(&self) -> Option<&QueueRegs> {
        self.queues.get(self.queue_sel as usize)
    }
    fn queue_mut(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The value of a `size`-byte read at `offset` in the window.
    pub fn read(&self, offset: u64, size: u32) -> u64 {
        if offset >= reg::CONFIG {
            return self.read_config(offset - reg::CONFIG, size);
        }
        let word = offset & !3;
        let v = match word {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.queue().map_or(0, |q| u32::from(q.max)),
            reg::QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            // No shared memory regions: length all ones ("does not exist").
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        let shift = (offset & 3) * 8;
        u64::from(v >> shift) & mask(size)
    }

    fn read_config(&self, off: u64, size: u32) -> u64 {
        let mut v = 0u64;
        for i in 0..u64::from(size.min(8)) {
            let b = usize::try_from(off + i)
                .ok()
                .and_then(|j| self.config.get(j))
                .copied()
                .unwrap_or(0);
            v |= u64::from(b) << (8 * i);
        }
        v
    }

    /// A `size`-byte write of `value` at `offset` in the window.
    pub fn write(&mut self, offset: u64, size: u32, value: u64) -> Effect {
        if offset >= reg::CONFIG {
            let n = size.min(8) as usize;
            return Effect::ConfigWrite {
                offset: u32::try_from(offset - reg::CONFIG).unwrap_or(u32::MAX),
                data: value.to_le_bytes()[..n].to_vec(),
            };
        }
        let v = value as u32;
        let lo = |a: u64, v: u32| (a & !0xffff_ffff) | u64::from(v);
        let hi = |a: u64, v: u32| (a & 0xffff_ffff) | (u64::from(v) << 32);
        // Queue addresses, size and readiness are the driver's only before
        // it sets the queue ready (virtio 1.2, 4.2.3.2).
        let setup = |q: &mut QueueRegs, f: &dyn Fn(&mut QueueRegs)| {
            if !q.ready {
                f(q)
            }
        };
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            // Features are the driver's to choose until FEATURES_OK.
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = lo(self.driver_features, v),
                    1 => self.driver_features = hi(self.driver_features, v),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue_mut() {
                    setup(q, &|q| q.num = v.min(u32::from(u16::MAX)) as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.queue_mut() {
                    q.ready = v & 1 == 1;
                }
            }
            reg::QUEUE_DESC_LOW => self.set_addr(|q, v| q.desc = lo(q.desc, v), v),
            reg::QUEUE_DESC_HIGH => self.set_addr(|q, v| q.desc = hi(q.desc, v), v),
            reg::QUEUE_DRIVER_LOW => self.set_addr(|q, v| q.driver = lo(q.driver, v), v),
            reg::QUEUE_DRIVER_HIGH => self.set_addr(|q, v| q.driver = hi(q.driver, v), v),
            reg::QUEUE_DEVICE_LOW => self.set_addr(|q, v| q.device = lo(q.device, v), v),
            reg::QUEUE_DEVICE_HIGH => self.set_addr(|q, v| q.device = hi(q.device, v), v),
            reg::QUEUE_NOTIFY => {
                // With VIRTIO_F_NOTIFICATION_DATA the low 16 bits are still the queue.
                let q = (v & 0xffff) as u16;
                if usize::from(q) < self.queues.len() {
                    return Effect::Notify(q);
                }
            }
            reg::INTERRUPT_ACK => {
                let before = self.interrupt_status;
                self.interrupt_status &= !v;
                if before != self.interrupt_status {
                    return Effect::InterruptChanged;
                }
            }
            reg::STATUS => return self.write_status(v),
            _ => {}
        }
        Effect::None
    }

    fn set_addr(&mut self, f: impl Fn(&mut QueueRegs, u32), v: u32) {
        if let Some(q) = self.queue_mut() {
            if !q.ready {
                f(q, v)
            }
        }
    }

    fn write_status(&mut self, v: u32) -> Effect {
        if v == 0 {
            let (id, features, config, gen) = (
                self.device_id,
                self.device_features,
                std::mem::take(&mut self.config),
                self.config_generation,
            );
            let max: Vec<u16> = self.queues.iter().map(|q| q.max).collect();
            *self = MmioRegs::new(id, features, &max, config);
            self.config_generation = gen;
            return Effect::Reset;
        }
        let old = self.status;
        let mut new = v;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            // The device refuses features it did not offer by leaving
            // FEATURES_OK clear; the driver reads it back and gives up.
            if self.driver_features & !self.device_features != 0 {
                new &= !status::FEATURES_OK;
            }
        }
        self.status = new | (old & status::DEVICE_NEEDS_RESET);
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            return Effect::DriverOk;
        }
        Effect::None
    }
}

fn mask(size: u32) -> u64 {
    match size {
        0 => 0,
        1..=7 => (1u64 << (size * 8)) - 1,
        _ => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F_V1: u64 = 1 << 32;
    const F_AP: u64 = 1 << 33;

    fn regs() -> MmioRegs {
        MmioRegs::new(4, F_V1 | F_AP | 1 << 28, &[64, 0], vec![1, 2, 3, 4, 5])
    }

    fn w(m: &mut MmioRegs, off: u64, v: u64) -> Effect {
        m.write(off, 4, v)
    }

    #[test]
    fn identity_and_features_by_selector() {
        let mut m = regs();
        assert_eq!(m.read(reg::MAGIC_VALUE, 4), u64::from(MAGIC));
        assert_eq!(m.read(reg::VERSION, 4), 2);
        assert_eq!(m.read(reg::DEVICE_ID, 4), 4);
        assert_eq!(m.read(reg::DEVICE_FEATURES, 4), 1 << 28);
        w(&mut m, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(m.read(reg::DEVICE_FEATURES, 4), 3);
        w(&mut m, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(m.read(reg::DEVICE_FEATURES, 4), 0);
        // Sub-word reads of a register take its bytes.
        assert_eq!(m.read(reg::MAGIC_VALUE + 1, 1), 0x69);
    }

    #[test]
    fn config_bytes_and_beyond() {
        let m = regs();
        assert_eq!(m.read(reg::CONFIG, 4), 0x0403_0201);
        assert_eq!(m.read(reg::CONFIG + 4, 4), 5);
        assert_eq!(m.read(reg::CONFIG + 0x200, 2), 0);
        let mut m = m;
        assert_eq!(
            m.write(reg::CONFIG + 2, 2, 0xabcd),
            Effect::ConfigWrite {
                offset: 2,
                data: vec![0xcd, 0xab]
            }
        );
    }

    #[test]
    fn driver_sets_up_a_queue_then_it_is_locked() {
        let mut m = regs();
        w(&mut m, reg::QUEUE_SEL, 0);
        assert_eq!(m.read(reg::QUEUE_NUM_MAX, 4), 64);
        w(&mut m, reg::QUEUE_NUM, 64);
        w(&mut m, reg::QUEUE_DESC_LOW, 0x8000);
        w(&mut m, reg::QUEUE_DESC_HIGH, 0x8000_0000);
        w(&mut m, reg::QUEUE_DRIVER_LOW, 0x8400);
        w(&mut m, reg::QUEUE_DRIVER_HIGH, 0x8000_0000);
        w(&mut m, reg::QUEUE_DEVICE_LOW, 0x9000);
        w(&mut m, reg::QUEUE_DEVICE_HIGH, 0x8000_0000);
        w(&mut m, reg::QUEUE_READY, 1);
        w(&mut m, reg::QUEUE_DESC_LOW, 0xdead_0000);
        w(&mut m, reg::QUEUE_NUM, 8);
        let q = m.queues()[0];
        assert_eq!(
            (q.num, q.ready, q.desc, q.driver, q.device),
            (
                64,
                true,
                0x8000_0000_0000_8000,
                0x8000_0000_0000_8400,
                0x8000_0000_0000_9000
            )
        );
        // A queue the device does not have reads as absent and takes nothing.
        w(&mut m, reg::QUEUE_SEL, 7);
        assert_eq!(m.read(reg::QUEUE_NUM_MAX, 4), 0);
        w(&mut m, reg::QUEUE_NUM, 8);
        assert_eq!(w(&mut m, reg::QUEUE_NOTIFY, 7), Effect::None);
        assert_eq!(w(&mut m, reg::QUEUE_NOTIFY, 1), Effect::Notify(1));
    }

    #[test]
    fn features_the_device_did_not_offer_are_refused() {
        let mut m = regs();
        w(&mut m, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut m, reg::DRIVER_FEATURES, 1 << 29);
        w(&mut m, reg::STATUS, 1 | 2 | 8);
        assert_eq!(m.read(reg::STATUS, 4) & 8, 0, "FEATURES_OK must stay clear");
        w(&mut m, reg::STATUS, 0);
        w(&mut m, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut m, reg::DRIVER_FEATURES, 1 << 28);
        w(&mut m, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut m, reg::DRIVER_FEATURES, 3);
        w(&mut m, reg::STATUS, 1 | 2 | 8);
        assert_eq!(m.read(reg::STATUS, 4), 11);
        assert_eq!(m.driver_features(), F_V1 | F_AP | 1 << 28);
        assert_eq!(w(&mut m, reg::STATUS, 15), Effect::DriverOk);
        assert!(m.driver_ok());
    }

    #[test]
    fn interrupt_status_and_ack_and_reset() {
        let mut m = regs();
        m.raise(INT_VRING);
        assert_eq!(m.read(reg::INTERRUPT_STATUS, 4), 1);
        assert_eq!(w(&mut m, reg::INTERRUPT_ACK, 2), Effect::None);
        assert_eq!(w(&mut m, reg::INTERRUPT_ACK, 1), Effect::InterruptChanged);
        assert_eq!(m.interrupt_status(), 0);
        w(&mut m, reg::QUEUE_NUM, 32);
        m.raise(INT_VRING);
        assert_eq!(w(&mut m, reg::STATUS, 0), Effect::Reset);
        assert_eq!(m.interrupt_status(), 0);
        assert_eq!(
            m.queues()[0],
            QueueRegs {
                max: 64,
                ..Default::default()
            }
        );
        assert_eq!(m.read(reg::CONFIG, 1), 1, "configuration survives a reset");
    }

    #[test]
    fn needs_reset_is_sticky_until_reset() {
        let mut m = regs();
        w(&mut m, reg::STATUS, 1);
        m.needs_reset();
        w(&mut m, reg::STATUS, 3);
        assert_eq!(m.read(reg::STATUS, 4), 0x43);
        assert_eq!(m.interrupt_status(), INT_CONFIG);
        w(&mut m, reg::STATUS, 0);
        assert_eq!(m.read(reg::STATUS, 4), 0);
    }

    #[test]
    fn config_generation_moves_with_new_config() {
        let mut m = regs();
        let g = m.read(reg::CONFIG_GENERATION, 4);
        m.set_config(vec![1, 2, 3, 4, 5]);
        assert_eq!(m.read(reg::CONFIG_GENERATION, 4), g);
        m.set_config(vec![9]);
        assert_eq!(m.read(reg::CONFIG_GENERATION, 4), g + 1);
    }
}
