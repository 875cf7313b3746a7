//! Example devices on the daemon runtime: the top layer, what a vhost-device daemon is.
//! The `vhost-user-blk`, `vhost-user-rng` and `vhost-user-vsock` daemons (crate
//! `xen-vhost-daemons`, `daemons/`) give them command lines.

pub mod blk;
mod iov;
pub mod rng;
mod uring;
pub mod vsock;
