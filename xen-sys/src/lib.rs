//! The Linux ABI of the Xen devices a dom0 vhost-user backend uses:
//! `privcmd` (foreign mapping), `gntdev` (grant mapping and copy) and
//! `gntalloc` (granting our own pages), and for device models `evtchn`
//! (event channels), privcmd's DM_OP (ioreq servers) and `xenbus` (XenStore): ioctl numbers, `#[repr(C)]` structs
//! checked against the uapi headers (`tests/layout.rs`), and owned-fd
//! handles with one method per ioctl. No policy: callers decide what to map
//! and own `mmap`/`munmap`.

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
compile_error!("xen-sys supports 64-bit Linux only (xen_pfn_t and pointer widths)");

pub mod dm_op;
pub mod evtchn;
pub mod flex;
pub mod gntalloc;
pub mod gntdev;
mod handle;
pub mod ioctl;
pub mod ioreq;
pub mod privcmd;
pub mod xen;
pub mod xenbus;

pub use handle::{Evtchn, Gntalloc, Gntdev, Privcmd, Xenbus};
