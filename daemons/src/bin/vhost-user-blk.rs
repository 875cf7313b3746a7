//! vhost-user-blk daemon on xen-vhost-mem: a file-backed virtio-blk device.
//!
//! ```text
//! vhost-user-blk --socket-path /tmp/blk.sock --blk-file disk.img [--num-queues 2] [--read-only]
//! ```
//! Serves one frontend after another; `--xen` maps FOREIGN and GRANT regions through the
//! real `/dev/xen` drivers (dom0, root). Sandboxed by default (`--sandbox auto`): every thread
//! under its seccomp allowlist, and once the image, the socket and /dev/xen are open, no
//! capabilities (Xen mode) or the `nobody` user (UNIX mode started as root; `--user`).
//! Logging through `RUST_LOG`; SIGUSR1 and `--stats-interval` log the counters as one JSON
//! line (the crate's lib).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use xen_vhost_mem::daemon::VhostUserDaemon;
use xen_vhost_mem::device::CounterSnapshot;
use xen_vhost_mem::devices::blk::{BlkConfig, BlkDevice, BlkIo};
use xen_vhost_mem::{ForeignMapping, RealXen, XenHandle};

const NAME: &str = "vhost-user-blk";

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum IoMode {
    Uring,
    Sync,
}

#[derive(Parser, Debug)]
#[command(
    name = NAME,
    version,
    about = "vhost-user-blk backend on xen-vhost-mem: a file-backed virtio-blk device",
    long_about = "vhost-user-blk backend on xen-vhost-mem: a file-backed virtio-blk device.\n\n\
        Listens on --socket-path and serves one vhost-user frontend after another (QEMU's \
        vhost-user-blk-pci with memfd guest RAM, or a Xen frontend that acks XEN_MMAP). With \
        --xen, FOREIGN regions are mapped through /dev/xen/privcmd and GRANT regions through \
        /dev/xen/gntdev (dom0, root).",
    after_help = xen_vhost_daemons::AFTER_HELP
)]
struct Args {
    /// Unix socket to listen on (an existing file there is removed first).
    #[arg(long)]
    socket_path: PathBuf,
    /// Backing file, a regular file (opened read-write unless --read-only); its size,
    /// rounded down to 512-byte sectors, is the disk's capacity.
    #[arg(long)]
    blk_file: PathBuf,
    /// Number of queues (virtio-blk multiqueue; the frontend may use fewer).
    #[arg(long, default_value_t = 1)]
    num_queues: u16,
    /// Largest queue size the frontend may set (a power of two, at least 4).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Refuse writes (VIRTIO_BLK_F_RO).
    #[arg(long)]
    read_only: bool,
    /// How data moves: `uring`, a batch's requests submitted to a per-queue io_uring
    /// together and reaped out of order (where the kernel refuses io_uring, the queue logs it
    /// and falls back to `sync`); `sync`, one preadv/pwritev/fdatasync per request.
    #[arg(long, value_enum, default_value = "uring")]
    io: IoMode,
    /// Open the image with O_DIRECT (no host page cache): aligned guest memory goes straight
    /// to the kernel, unaligned memory through an aligned bounce buffer, and a request the
    /// file cannot take directly (offset or length off its O_DIRECT alignment) through a
    /// second, buffered descriptor.
    #[arg(long)]
    direct: bool,
    /// With --direct: answer each request this many milliseconds (times 1/2 to 2, varied
    /// per request, so out of order) after the disk completed it. Fault injection for crash
    /// tests: a daemon killed meanwhile leaves that many requests in flight.
    #[arg(long, value_name = "MS", requires = "direct")]
    completion_delay_ms: Option<u64>,
    /// Serial number answered to GET_ID.
    #[arg(long, default_value = "xen-vhost-mem")]
    serial: String,
    /// Map Xen regions (FOREIGN, GRANT) through the real /dev/xen drivers: privcmd and
    /// gntdev, opened at start (dom0, root). Without it, only UNIX (memfd) regions are
    /// served and Xen regions are refused.
    #[arg(long)]
    xen: bool,
    /// Map FOREIGN regions lazily, in buckets of this many MiB mapped when a request first
    /// touches them, instead of whole at SET_MEM_TABLE: 1 (QEMU mapcache's bucket size), 2
    /// or 4.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..=4))]
    lazy_foreign: Option<u32>,
    /// With --lazy-foreign: at most this many MiB of guest memory mapped at a time, over all
    /// connections; buckets no request holds are unmapped to make room.
    #[arg(long, value_name = "MIB", requires = "lazy_foreign")]
    lazy_foreign_limit: Option<usize>,
    /// Exit after this many frontends (default: serve forever).
    #[arg(long)]
    connections: Option<usize>,
    /// Also log a stats line (one JSON object, target `stats`) every this many seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    stats_interval: Option<u64>,
    #[command(flatten)]
    sandbox: xen_vhost_daemons::SandboxArgs,
}

fn xen_counters(daemon: &VhostUserDaemon<BlkDevice>) -> CounterSnapshot {
    daemon
        .xen()
        .map(|x| x.counters().snapshot())
        .unwrap_or_default()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let signals = xen_vhost_daemons::Signals::block()?;
    let a = Args::parse();
    xen_vhost_daemons::init_logging();
    let dev = BlkDevice::open(
        &a.blk_file,
        BlkConfig {
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            read_only: a.read_only,
            direct: a.direct,
            completion_delay: a.completion_delay_ms.map(std::time::Duration::from_millis),
            io: match a.io {
                IoMode::Uring => BlkIo::Uring,
                IoMode::Sync => BlkIo::Sync,
            },
            serial: a.serial,
            ..BlkConfig::default()
        },
    )?;
    log::info!(
        "{}: {} sectors, {} queues",
        a.blk_file.display(),
        dev.sectors(),
        a.num_queues
    );
    let mut daemon = VhostUserDaemon::new(Arc::new(dev));
    if a.xen {
        let xen = XenHandle::new(Arc::new(RealXen::open()?));
        if let Some(mib) = a.lazy_foreign {
            if !mib.is_power_of_two() {
                return Err("--lazy-foreign takes 1, 2 or 4 (MiB per bucket)".into());
            }
            let bucket_frames = mib as usize * 256;
            daemon = daemon.with_foreign_mapping(ForeignMapping::Lazy { bucket_frames });
            if let Some(limit) = a.lazy_foreign_limit {
                xen.set_lazy_bucket_limit((limit / mib as usize).max(1))?;
            }
        }
        daemon = daemon.with_xen(xen);
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
    match a.connections {
        None => daemon.serve(&listener, None)?,
        // One at a time, to log what each connection cost (requests, Xen system calls).
        Some(n) => {
            for i in 1..=n {
                let (st0, x0) = (daemon.stats().snapshot(), xen_counters(&daemon));
                daemon.serve(&listener, Some(1))?;
                let (st, x) = (daemon.stats().snapshot(), xen_counters(&daemon));
                let (req, d) = (st.requests - st0.requests, x.since(&x0));
                log::info!(
                    "connection {i}: {req} requests in {} batches; Xen system calls {} \
                     ({:.2} per request: {} ioctls of which {} grant copies, {} mmaps, {} munmaps)",
                    st.batches - st0.batches,
                    d.syscalls(),
                    d.syscalls() as f64 / req.max(1) as f64,
                    d.ioctls,
                    d.grant_copies,
                    d.mmaps,
                    d.munmaps
                );
            }
        }
    }
    // Only reached with --connections: say what was served, and fail if anything leaked.
    let st = daemon.stats().snapshot();
    let live = daemon.xen().map_or(0, |x| x.counters().live_mappings());
    log::info!(
        "{} requests in {} batches over {} connection(s); live mappings {live}",
        st.requests,
        st.batches,
        st.connections
    );
    xen_vhost_daemons::log_stats(NAME, &daemon.reporter(), xen_vhost_daemons::Reason::Exit);
    if live != 0 {
        return Err(format!("{live} mappings still live").into());
    }
    Ok(())
}
