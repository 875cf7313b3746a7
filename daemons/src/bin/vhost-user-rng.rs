//! vhost-user-rng daemon on xen-vhost-mem: virtio-rng from an entropy file.
//!
//! ```text
//! vhost-user-rng --socket-path /tmp/rng.sock [--rng-file /dev/urandom]
//! ```
//! Serves one frontend after another; `--xen` maps FOREIGN and GRANT regions through the
//! real `/dev/xen` drivers (dom0, root). Sandboxed by default, as `vhost-user-blk`
//! (`--sandbox`, `--user`). Logging through `RUST_LOG`; SIGUSR1 and `--stats-interval` log
//! the counters as one JSON line (the crate's lib).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use xen_vhost_mem::daemon::VhostUserDaemon;
use xen_vhost_mem::devices::rng::RngDevice;
use xen_vhost_mem::{RealXen, XenHandle};

const NAME: &str = "vhost-user-rng";

#[derive(Parser, Debug)]
#[command(
    name = NAME,
    version,
    about = "vhost-user-rng backend on xen-vhost-mem: virtio-rng from an entropy file",
    long_about = "vhost-user-rng backend on xen-vhost-mem: virtio-rng from an entropy file.\n\n\
        Listens on --socket-path and serves one vhost-user frontend after another (QEMU's \
        vhost-user-rng-pci with memfd guest RAM, or a Xen frontend that acks XEN_MMAP). With \
        --xen, FOREIGN regions are mapped through /dev/xen/privcmd and GRANT regions through \
        /dev/xen/gntdev (dom0, root).",
    after_help = xen_vhost_daemons::AFTER_HELP
)]
struct Args {
    /// Unix socket to listen on (an existing file there is removed first).
    #[arg(long)]
    socket_path: PathBuf,
    /// Entropy source, read for each request.
    #[arg(long, default_value = "/dev/urandom")]
    rng_file: PathBuf,
    /// Map Xen regions (FOREIGN, GRANT) through the real /dev/xen drivers: privcmd and
    /// gntdev, opened at start (dom0, root). Without it, only UNIX (memfd) regions are
    /// served and Xen regions are refused.
    #[arg(long)]
    xen: bool,
    /// Exit after this many frontends (default: serve forever).
    #[arg(long)]
    connections: Option<usize>,
    /// Also log a stats line (one JSON object, target `stats`) every this many seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    stats_interval: Option<u64>,
    #[command(flatten)]
    sandbox: xen_vhost_daemons::SandboxArgs,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let signals = xen_vhost_daemons::Signals::block()?;
    let a = Args::parse();
    xen_vhost_daemons::init_logging();
    let mut daemon = VhostUserDaemon::new(Arc::new(RngDevice::open(&a.rng_file)?));
    if a.xen {
        daemon = daemon.with_xen(XenHandle::new(Arc::new(RealXen::open()?)));
    }
    let (daemon, listener) = xen_vhost_daemons::listen_locked_down(
        daemon,
        &a.socket_path,
        &a.sandbox,
        a.xen,
        signals,
        NAME,
        a.stats_interval.map(Duration::from_secs),
    )?;
    log::info!("listening on {}", a.socket_path.display());
    daemon.serve(&listener, a.connections)?;
    // Only reached with --connections.
    xen_vhost_daemons::log_stats(NAME, &daemon.reporter(), xen_vhost_daemons::Reason::Exit);
    Ok(())
}
