//! `xen-mmio-frontend`: serves an HVM domU's virtio-mmio windows from dom0 and
//! connects each to a vhost-user daemon with XEN_MMAP. See `--help`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use xen_mmio_frontend::device::DeviceSpec;
use xen_mmio_frontend::domain;
use xen_mmio_frontend::frontend::{self, Exit, MemoryChoice, Options, Stats};

const LONG_ABOUT: &str = "\
Serves virtio-mmio windows of an x86 HVM domU from dom0 and connects each one to a vhost-user
daemon (vhost-user-blk, vhost-user-rng, vhost-device-*) over its Unix socket, with XEN_MMAP:
the guest's rings are sent as GRANT regions mapped in advance, everything else as on-demand
GRANT regions, so buffers are mapped or copied per request by the daemon.

The guest kernel needs XEN_VIRTIO + XEN_VIRTIO_FORCE_GRANT (grant DMA with dom0 as backend)
and VIRTIO_MMIO_CMDLINE_DEVICES, and one `virtio_mmio.device=4K@<addr>:<irq>` per window on
its command line, matching the --device options here. Use ISA IRQ 5, 10 or 11 (hvmloader
routes them level-triggered); windows may share one. A good place for windows is
0xfeb00000 upwards (hvmloader's reserved range).

Start the daemons, create the domU paused (`xl create -p`), start this frontend with its
domid, then `xl unpause`: a guest that probes its windows before the frontend claims them
reads all ones and gives up on the device. Only HVM domains are served (checked through
XenStore before anything else: an ISA interrupt raised on a PVH domain crashes Xen 4.17).
Needs root in dom0: /dev/xen/privcmd, /dev/xen/evtchn, /dev/xen/gntdev, /dev/xen/xenbus.

When a daemon exits, its window keeps answering and the frontend reconnects every
--reconnect-ms; running queues resume at the used index read from the guest's ring and are
kicked, so requests the daemon had taken and not completed are served again. The frontend
exits when the domain is destroyed (closing the daemons' connections, which releases their
grant mappings) or on SIGTERM/SIGINT/SIGHUP, and prints its counters as one JSON line on
stdout (also on SIGUSR1, serving on): ioreqs, interrupt assertions and DM_OPs, and per window
trapped reads and writes, kicks, calls, reconnects. Logging through RUST_LOG (default: info).";

#[derive(Parser, Debug)]
#[command(version, about = "x86 Xen virtio-mmio frontend for vhost-user daemons", long_about = LONG_ABOUT)]
struct Args {
    /// Domain id of the HVM guest.
    #[arg(long)]
    domid: u32,
    /// One virtio-mmio window, repeatable:
    /// `type=<blk|rng|vsock|...|id>,socket=<path>,addr=<4 KiB-aligned gpa>,irq=<1-15>`,
    /// optionally `,queues=<n>` (default 1), `,qsize=<power of two>` (default 256),
    /// `,config=<bytes of config space>` (default per type).
    #[arg(long = "device", value_name = "SPEC", required = true)]
    devices: Vec<DeviceSpec>,
    /// Seconds to wait for each daemon's socket at startup.
    #[arg(long, default_value_t = 30)]
    connect_timeout: u64,
    /// Milliseconds between reconnect attempts (and checks that the domain still exists).
    #[arg(long, default_value_t = 200)]
    reconnect_ms: u64,
    /// How the daemons reach the guest's memory: `grant` for a guest kernel with
    /// XEN_VIRTIO_FORCE_GRANT (rings mapped in advance, buffers per request), `foreign` for one
    /// without (all its RAM as FOREIGN frames through /dev/xen/privcmd; size from XenStore).
    #[arg(long, value_enum, default_value = "grant")]
    memory: MemoryArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum MemoryArg {
    Grant,
    Foreign,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let a = Args::parse();
    let domid = match domain::guest_domid(a.domid) {
        Ok(d) => d,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let opts = Options {
        domid,
        devices: a.devices,
        connect_timeout: Duration::from_secs(a.connect_timeout),
        reconnect_every: Duration::from_millis(a.reconnect_ms.max(10)),
        memory: match a.memory {
            MemoryArg::Grant => MemoryChoice::Grant,
            MemoryArg::Foreign => MemoryChoice::Foreign,
        },
    };
    let mut stats = Stats::default();
    let r = frontend::run(&opts, &mut stats);
    println!("xen-mmio-frontend stats {}", stats.json());
    match r {
        Ok(Exit::DomainGone) => {
            log::info!("domain {domid} is gone");
            ExitCode::SUCCESS
        }
        Ok(Exit::Signal(s)) => {
            log::info!("signal {s}: stopping");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
