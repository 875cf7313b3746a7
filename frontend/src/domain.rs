//! What the frontend must know about the guest before it touches it: that
//! it is an HVM domain. `XEN_DMOP_set_isa_irq_level` on a PVH domain crashed
//! Xen 4.17 (a general protection fault in `hvm_vcpu_has_pending_irq`), and
//! PVH has no emulated PIC or IOAPIC to take the interrupt anyway, so the type
//! is checked before any ioreq server exists. libxl records it in XenStore at
//! `/libxl/<domid>/type`; Xen's own flag (`XEN_DOMINF_hvm_guest`) is set for
//! PVH too.

use std::io;

use xen_sys::xen::DomId;
use xen_sys::Xenbus;

/// Errors of the domain checks.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// XenStore could not be opened.
    #[error("opening XenStore (/dev/xen/xenbus, /proc/xen/xenbus): {0}")]
    Xenstore(io::Error),
    /// The type node is missing or unreadable.
    #[error("reading /libxl/{domid}/type: {source} (is domain {domid} running, created by xl?)")]
    Type { domid: DomId, source: io::Error },
    /// The domain is not HVM.
    #[error("domain {domid} is {kind:?}, not \"hvm\": interrupts reach only HVM guests (an ISA IRQ on a PVH guest crashes Xen 4.17)")]
    NotHvm { domid: DomId, kind: String },
    /// A node could not be read.
    #[error("reading {path}: {source}")]
    Node { path: String, source: io::Error },
    /// A node holds something else than expected.
    #[error("{path} holds {value:?}")]
    BadValue { path: String, value: String },
    /// The domid is reserved or dom0.
    #[error("domid {0} cannot be a guest served here (0 is dom0; {first}.. are reserved)", first = xen_sys::xen::DOMID_FIRST_RESERVED)]
    BadDomid(u32),
}

/// Opens XenStore through the kernel device, or through xenfs.
pub fn xenstore() -> Result<Xenbus, DomainError> {
    Xenbus::open()
        .or_else(|_| Xenbus::open_path(std::path::Path::new("/proc/xen/xenbus")))
        .map_err(DomainError::Xenstore)
}

/// A domid from the command line: a guest, not dom0, not reserved.
pub fn guest_domid(v: u32) -> Result<DomId, DomainError> {
    match DomId::try_from(v) {
        Ok(d) if d != 0 && d < xen_sys::xen::DOMID_FIRST_RESERVED => Ok(d),
        _ => Err(DomainError::BadDomid(v)),
    }
}

/// Checks through XenStore that `domid` is an HVM domain.
pub fn require_hvm(xs: &Xenbus, domid: DomId) -> Result<(), DomainError> {
    let raw = xs
        .read(&format!("/libxl/{domid}/type"))
        .map_err(|source| DomainError::Type { domid, source })?;
    check_type(domid, &raw)
}

fn check_type(domid: DomId, raw: &[u8]) -> Result<(), DomainError> {
    let kind = String::from_utf8_lossy(raw)
        .trim_end_matches('\0')
        .trim()
        .to_string();
    if kind == "hvm" {
        Ok(())
    } else {
        Err(DomainError::NotHvm { domid, kind })
    }
}

/// The domain's RAM in bytes: `memory/static-max` (KiB), what libxl gave it.
pub fn ram_bytes(xs: &Xenbus, domid: DomId) -> Result<u64, DomainError> {
    let path = format!("/local/domain/{domid}/memory/static-max");
    let raw = xs.read(&path).map_err(|source| DomainError::Node {
        path: path.clone(),
        source,
    })?;
    let text = String::from_utf8_lossy(&raw);
    text.trim_end_matches('\0')
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|kib| kib.checked_mul(1024))
        .ok_or(DomainError::BadValue {
            path,
            value: text.into_owned(),
        })
}

/// True while XenStore still has the domain's home (`/local/domain/<domid>`):
/// xl removes it when it destroys the domain.
pub fn alive(xs: &Xenbus, domid: DomId) -> bool {
    !matches!(xs.read(&format!("/local/domain/{domid}/domid")), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hvm_passes() {
        assert!(check_type(3, b"hvm").is_ok());
        let e = check_type(3, b"pvh").unwrap_err();
        assert!(matches!(&e, DomainError::NotHvm { domid: 3, kind } if kind == "pvh"));
        assert!(e.to_string().contains("crashes Xen 4.17"), "{e}");
        assert!(matches!(
            check_type(3, b""),
            Err(DomainError::NotHvm { .. })
        ));
    }

    #[test]
    fn domids() {
        assert_eq!(guest_domid(5).unwrap(), 5);
        for bad in [0, 0x7ff0, 0x7ff2, 0x10000, u32::MAX] {
            assert!(matches!(guest_domid(bad), Err(DomainError::BadDomid(v)) if v == bad));
        }
    }
}
