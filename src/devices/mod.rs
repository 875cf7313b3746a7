//! Example devices on the daemon runtime: the top layer, what a vhost-device daemon is.
//! `examples/vhost-user-blk.rs` and `examples/vhost-user-rng.rs` give them command lines.

pub mod blk;
mod iov;
pub mod rng;
