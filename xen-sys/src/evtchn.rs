//! `#[repr(C)]` structs of `<xen/evtchn.h>` (`/dev/xen/evtchn`): binding
//! interdomain event channels and signalling them. Reading the device gives
//! the ports that fired (u32 each, masked until written back).

/// `struct ioctl_evtchn_bind_interdomain`: binds a local port to
/// `remote_port` of `remote_domain`; the ioctl returns the local port.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlEvtchnBindInterdomain {
    /// The other domain.
    pub remote_domain: u32,
    /// Its port.
    pub remote_port: u32,
}

/// `struct ioctl_evtchn_unbind`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlEvtchnUnbind {
    /// A local port bound through this fd.
    pub port: u32,
}

/// `struct ioctl_evtchn_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlEvtchnNotify {
    /// A local port bound through this fd.
    pub port: u32,
}
