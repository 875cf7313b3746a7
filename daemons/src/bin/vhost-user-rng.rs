//! vhost-user-rng daemon on xen-vhost-mem: virtio-rng from an entropy file.
//!
//! ```text
//! vhost-user-rng --socket-path /tmp/rng.sock [--rng-file /dev/urandom]
//! ```

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;

use xen_vhost_mem::daemon::VhostUserDaemon;
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
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    xen_vhost_daemons::exit_on_stop_signals()?;
    let a = Args::parse();
    let mut daemon = VhostUserDaemon::new(Arc::new(RngDevice::open(&a.rng_file)?));
    if a.xen {
        daemon = daemon.with_xen(XenHandle::new(Arc::new(RealXen::open()?)));
    }
    let _ = std::fs::remove_file(&a.socket_path);
    let listener = UnixListener::bind(&a.socket_path)?;
    daemon.serve(&listener, a.connections)?;
    Ok(())
}
