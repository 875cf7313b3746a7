//! vhost-user-rng daemon on xen-vhost-mem: virtio-rng from an entropy file.
//!
//! ```text
//! vhost-user-rng --socket-path /tmp/rng.sock [--rng-file /dev/urandom]
//! ```
//! Sandboxed by default, as `vhost-user-blk` (`--sandbox`, `--user`).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;

mod common;
use xen_vhost_mem::daemon::{ThreadKind, VhostUserDaemon};
use xen_vhost_mem::devices::rng::RngDevice;
use xen_vhost_mem::{RealXen, XenHandle};

#[derive(Parser, Debug)]
#[command(version, about = "vhost-user-rng backend on xen-vhost-mem")]
struct Args {
    /// Unix socket to listen on.
    #[arg(long)]
    socket_path: PathBuf,
    /// Entropy source.
    #[arg(long, default_value = "/dev/urandom")]
    rng_file: PathBuf,
    /// Map Xen regions through the real /dev/xen drivers.
    #[arg(long)]
    xen: bool,
    /// Exit after this many frontends (default: serve forever).
    #[arg(long)]
    connections: Option<usize>,
    #[command(flatten)]
    sandbox: common::SandboxArgs,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let signals = common::block_stop_signals()?;
    let a = Args::parse();
    let mut daemon = VhostUserDaemon::new(Arc::new(RngDevice::open(&a.rng_file)?));
    if a.xen {
        daemon = daemon.with_xen(XenHandle::new(Arc::new(RealXen::open()?)));
    }
    let _ = std::fs::remove_file(&a.socket_path);
    let listener = UnixListener::bind(&a.socket_path)?;
    let daemon = common::lock_down(daemon, &a.sandbox, a.xen, signals)?;
    daemon.sandbox().enter(ThreadKind::Main)?;
    daemon.serve(&listener, a.connections)?;
    Ok(())
}
