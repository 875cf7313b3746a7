//! vhost-user-vsock daemon on xen-vhost-mem: virtio-vsock to host programs over Unix
//! sockets, with vhost-device-vsock's hybrid conventions.
//!
//! ```text
//! vhost-user-vsock --guest-cid 3 --uds-path /tmp/vm.vsock --socket-path /tmp/vsock.sock
//! ```
//! A host program connects to `--uds-path` and writes `CONNECT <port>\n` to reach the guest's
//! port; it reads `OK <port>\n` once the guest accepts. A guest connecting to host port P
//! reaches whoever listens on `<uds-path>_P`. Serves one frontend after another; after each
//! reconnect the guest's event queue hears a transport reset (its connections are gone).
//! `--xen` maps FOREIGN and GRANT regions through the real `/dev/xen` drivers (dom0, root).
//! Sandboxed by default, as `vhost-user-blk` (`--sandbox`, `--user`: the user must be allowed
//! to connect to the `<uds-path>_P` sockets). Logging through `RUST_LOG`; SIGUSR1 and
//! `--stats-interval` log the counters as one JSON line (the crate's lib).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use xen_vhost_mem::daemon::VhostUserDaemon;
use xen_vhost_mem::devices::vsock::VsockDevice;
use xen_vhost_mem::{RealXen, XenHandle};

const NAME: &str = "vhost-user-vsock";

#[derive(Parser, Debug)]
#[command(
    name = NAME,
    version,
    about = "vhost-user-vsock backend on xen-vhost-mem: virtio-vsock to host Unix sockets",
    long_about = "vhost-user-vsock backend on xen-vhost-mem: virtio-vsock to host Unix sockets \
        (vhost-device-vsock's hybrid conventions).\n\n\
        Listens on --socket-path and serves one vhost-user frontend after another (QEMU's \
        vhost-user-vsock-pci with memfd guest RAM, or a Xen frontend that acks XEN_MMAP). Host \
        programs connect to --uds-path and write \"CONNECT <port>\\n\", answered \
        \"OK <port>\\n\"; guest connections to host port P go to <uds-path>_P. With --xen, \
        FOREIGN regions are mapped through /dev/xen/privcmd and GRANT regions through \
        /dev/xen/gntdev (dom0, root).",
    after_help = xen_vhost_daemons::AFTER_HELP
)]
struct Args {
    /// The guest's CID (3 or more).
    #[arg(long, value_parser = clap::value_parser!(u64).range(3..u64::from(u32::MAX)))]
    guest_cid: u64,
    /// Unix socket host programs connect to (an existing file there is removed first); guest
    /// connections to port P go to `<uds-path>_P`.
    #[arg(long)]
    uds_path: PathBuf,
    /// vhost-user socket to listen on (an existing file there is removed first).
    #[arg(long)]
    socket_path: PathBuf,
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
    let dev = Arc::new(VsockDevice::new(a.guest_cid, &a.uds_path)?);
    let mut daemon = VhostUserDaemon::new(dev.clone());
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
    log::info!(
        "guest cid {}; host programs on {}; listening on {}",
        a.guest_cid,
        a.uds_path.display(),
        a.socket_path.display()
    );
    daemon.serve(&listener, a.connections)?;
    // Only reached with --connections.
    let st = dev.stats();
    log::info!(
        "vsock: {} connections, {} packets to the guest ({} bytes), {} from it ({} bytes), \
         {} RSTs, {} malformed",
        st.connections.load(Ordering::Relaxed),
        st.rx_packets.load(Ordering::Relaxed),
        st.rx_bytes.load(Ordering::Relaxed),
        st.tx_packets.load(Ordering::Relaxed),
        st.tx_bytes.load(Ordering::Relaxed),
        st.rsts.load(Ordering::Relaxed),
        st.malformed.load(Ordering::Relaxed),
    );
    xen_vhost_daemons::log_stats(NAME, &daemon.reporter(), xen_vhost_daemons::Reason::Exit);
    Ok(())
}
