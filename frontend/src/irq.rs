//! Level-triggered ISA interrupt lines of an HVM guest, raised through
//! `XEN_DMOP_set_isa_irq_level`. virtio-mmio devices request their IRQ as
//! shared, so several windows may use one line: it is asserted while any of
//! them has InterruptStatus != 0, and a DM_OP is issued only when the level
//! changes. hvmloader routes IRQs 5, 10 and 11 as level-triggered PCI links
//! (its MADT overrides); those are the ones to give a window.

use std::collections::BTreeMap;
use std::io;

use xen_sys::dm_op::{XenDmOp, XenDmOpArgs, XenDmOpSetIsaIrqLevel, XEN_DMOP_SET_ISA_IRQ_LEVEL};
use xen_sys::xen::DomId;
use xen_sys::Privcmd;

/// Errors of interrupt delivery.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// The IRQ is not an ISA IRQ.
    #[error("IRQ {0} is not an ISA IRQ (1-15)")]
    NotIsa(u32),
    /// The DM_OP failed.
    #[error("XEN_DMOP_set_isa_irq_level(irq {irq}, level {level}) for domain {domid}: {source}")]
    Set {
        irq: u8,
        level: u8,
        domid: DomId,
        source: io::Error,
    },
}

/// An ISA IRQ number, checked.
pub fn isa_irq(v: u32) -> Result<u8, IrqError> {
    match u8::try_from(v) {
        Ok(i) if (1..=15).contains(&i) => Ok(i),
        _ => Err(IrqError::NotIsa(v)),
    }
}

/// The lines of one HVM domain. Construct only after the domain was checked
/// to be HVM ([`crate::domain::require_hvm`]).
#[derive(Debug)]
pub struct IrqLines {
    domid: DomId,
    /// Current level per line.
    level: BTreeMap<u8, bool>,
    /// Assertions made (0 → 1 transitions), per line.
    pub asserts: BTreeMap<u8, u64>,
    /// DM_OPs issued.
    pub dm_ops: u64,
}

impl IrqLines {
    /// Lines of HVM domain `domid`, all low.
    pub fn new(domid: DomId) -> Self {
        IrqLines {
            domid,
            level: BTreeMap::new(),
            asserts: BTreeMap::new(),
            dm_ops: 0,
        }
    }

    /// Sets `irq` to `high`; issues the DM_OP only when the level changes.
    pub fn set(&mut self, privcmd: &Privcmd, irq: u8, high: bool) -> Result<(), IrqError> {
        let cur = self.level.entry(irq).or_insert(false);
        if *cur == high {
            return Ok(());
        }
        let level = u8::from(high);
        let mut op = XenDmOp::new(
            XEN_DMOP_SET_ISA_IRQ_LEVEL,
            XenDmOpArgs {
                set_isa_irq_level: XenDmOpSetIsaIrqLevel {
                    isa_irq: irq,
                    level,
                },
            },
        );
        self.dm_ops += 1;
        privcmd
            .dm_op(self.domid, &mut op)
            .map_err(|source| IrqError::Set {
                irq,
                level,
                domid: self.domid,
                source,
            })?;
        *cur = high;
        if high {
            *self.asserts.entry(irq).or_default() += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isa_range() {
        assert_eq!(isa_irq(5).unwrap(), 5);
        assert!(matches!(isa_irq(0), Err(IrqError::NotIsa(0))));
        assert!(matches!(isa_irq(16), Err(IrqError::NotIsa(16))));
    }

    #[test]
    fn level_changes_only_issue_a_call() {
        // /dev/null is no privcmd: a call that reaches the kernel fails with ENOTTY.
        let f: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let p = Privcmd::from_fd(f);
        let mut l = IrqLines::new(7);
        l.set(&p, 5, false).unwrap();
        assert_eq!(l.dm_ops, 0, "already low: no call");
        let e = l.set(&p, 5, true).unwrap_err();
        assert!(
            matches!(&e, IrqError::Set { irq: 5, level: 1, domid: 7, source } if source.raw_os_error() == Some(libc::ENOTTY)),
            "{e}"
        );
        assert_eq!(l.dm_ops, 1);
        assert!(l.asserts.is_empty(), "a failed call changes no level");
        // Still low: the next call is tried again.
        assert!(l.set(&p, 5, true).is_err());
        assert_eq!(l.dm_ops, 2);
    }
}
