//! The whole path end to end: our vhost-user-blk daemon on a temporary socket, the vhost
//! crate's own `Frontend` and a small virtio driver playing the VMM and the guest, N MiB
//! written and read back at a chosen queue depth, every byte checked.
//!
//! ```text
//! cargo run --release --features test-utils --example demo [-- --mib 64 --depth 8 --queues 2]
//! cargo run --release --features test-utils --example demo -- --mode grant   # or foreign
//! ```
//! `--mode grant` sends what xen-vhost-frontend sends (rings GRANT in advance at mid-page
//! addresses, buffers GRANT on demand from `1 << 63` up, read-only where the device only
//! reads) and the daemon serves them over the emulated Xen device; `--mode foreign` sends the
//! guest's frames. In a Xen dom0, as root, `--xen --mode grant` runs the same on the real
//! drivers, dom0 granting its own pages to itself through gntalloc. `--daemon-bin` runs the
//! daemon as that program (`vhost-user-blk` of the `xen-vhost-daemons` crate: `cargo build
//! --release -p xen-vhost-daemons` puts it at `target/release/vhost-user-blk`) instead of in
//! this process (unix mode, or `--xen`).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use xen_vhost_mem::daemon::{StatsSnapshot, VhostUserDaemon};
use xen_vhost_mem::device::CounterSnapshot;
use xen_vhost_mem::devices::blk::{BlkConfig, BlkDevice};
use xen_vhost_mem::testing::blk_workload::{pass, PassReport};
use xen_vhost_mem::testing::driver::{DriverConfig, GuestMode, VirtioDriver};
use xen_vhost_mem::testing::{EmulatedXen, GntallocGuest, GuestSim};
use xen_vhost_mem::{ForeignMapping, RealXen, XenHandle};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// A memfd, as QEMU sends.
    Unix,
    /// Xen grants: rings in advance, buffers on demand (`xen` build).
    Grant,
    /// Xen foreign frames (`xen` build).
    Foreign,
}

#[derive(Parser, Debug)]
#[command(about = "vhost-user-blk daemon on xen-vhost-mem, driven end to end")]
struct Args {
    /// How the guest's memory reaches the daemon.
    #[arg(long, value_enum, default_value = "unix")]
    mode: Mode,
    /// MiB to write, then read back.
    #[arg(long, default_value_t = 64)]
    mib: u64,
    /// Bytes per request.
    #[arg(long, default_value_t = 4096)]
    request_size: u32,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 8)]
    depth: usize,
    /// Queues.
    #[arg(long, default_value_t = 2)]
    queues: u16,
    /// Chains in indirect descriptor tables.
    #[arg(long)]
    indirect: bool,
    /// Real Xen drivers (dom0, root; --mode grant).
    #[arg(long)]
    xen: bool,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Run the daemon as this program (vhost-user-blk of xen-vhost-daemons, e.g.
    /// target/release/vhost-user-blk) instead of in-process.
    #[arg(long)]
    daemon_bin: Option<PathBuf>,
    /// The in-process daemon's threads run under their seccomp allowlists (a binary from
    /// --daemon-bin is sandboxed by its own default).
    #[arg(long)]
    sandbox: bool,
    /// --mode foreign: the daemon maps FOREIGN lazily, in buckets of 1 MiB mapped when a
    /// request first touches them, at most this many buckets at a time (0: no bound).
    #[arg(long, value_name = "BUCKETS")]
    lazy_foreign: Option<usize>,
}

struct Row {
    name: &'static str,
    rep: PassReport,
    xen: CounterSnapshot,
    daemon: StatsSnapshot,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let a = Args::parse();
    if a.xen && a.mode != Mode::Grant {
        return Err("--xen runs --mode grant (FOREIGN needs a guest domain's frames)".into());
    }
    if a.lazy_foreign.is_some() && a.mode != Mode::Foreign {
        return Err("--lazy-foreign needs --mode foreign".into());
    }
    if a.daemon_bin.is_some() && a.mode != Mode::Unix && !a.xen {
        return Err(
            "--daemon-bin serves unix mode, or --xen (the emulation lives in this process)".into(),
        );
    }
    let dir = std::env::temp_dir().join(format!("xvm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&a, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(a: &Args, dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let total = a.mib << 20;
    let image = dir.join("disk.img");
    std::fs::File::create(&image)?.set_len(total)?;
    let socket: PathBuf = dir.join("blk.sock");
    let cfg = DriverConfig {
        mode: match a.mode {
            Mode::Unix => GuestMode::Unix,
            Mode::Grant => GuestMode::Grant,
            Mode::Foreign => GuestMode::Foreign,
        },
        queues: usize::from(a.queues),
        depth: a.depth,
        queue_size: 256,
        max_data: a.request_size as usize,
        indirect: a.indirect,
        ..DriverConfig::default()
    };
    // The Xen device the daemon maps through: real drivers, or an emulation the driver's
    // guest lives in.
    let emu = (a.mode != Mode::Unix && !a.xen)
        .then(|| EmulatedXen::new(cfg.emulation_pages()).map(Arc::new))
        .transpose()?;
    let xen = if a.xen {
        Some(XenHandle::new(Arc::new(RealXen::open()?)))
    } else {
        emu.clone().map(|e| XenHandle::new(e))
    };
    let blk = BlkDevice::open(
        &image,
        BlkConfig {
            num_queues: a.queues,
            ..BlkConfig::default()
        },
    )?;
    let mut daemon = VhostUserDaemon::new(Arc::new(blk));
    if let Some(x) = &xen {
        daemon = daemon.with_xen(x.clone());
    }
    if let (Some(limit), Some(x)) = (a.lazy_foreign, &xen) {
        daemon = daemon.with_foreign_mapping(ForeignMapping::lazy());
        if limit > 0 {
            x.set_lazy_bucket_limit(limit)?;
        }
    }
    if a.sandbox {
        daemon = daemon.sandboxed()?;
    }
    let daemon = Arc::new(daemon);
    let server = match &a.daemon_bin {
        Some(bin) => Server::Process(spawn_daemon(bin, &socket, &image, a)?),
        None => {
            let listener = UnixListener::bind(&socket)?;
            let served = daemon.clone();
            Server::Thread(std::thread::spawn(move || served.serve(&listener, Some(1))))
        }
    };
    // An external daemon's counters are its own: ours stay at zero.
    let xen = if a.daemon_bin.is_some() { None } else { xen };

    let mut driver = match (a.mode, a.xen, &emu, &xen) {
        (Mode::Grant, true, _, _) => {
            VirtioDriver::connect_granting(&socket, cfg, Box::new(GntallocGuest::new()?))?
        }
        (Mode::Grant, false, Some(e), Some(x)) => {
            let guest = GuestSim {
                emu: e.clone(),
                dev: x.clone(),
                domid: 1,
            };
            VirtioDriver::connect_granting(&socket, cfg, Box::new(guest))?
        }
        (Mode::Foreign, _, Some(e), _) => VirtioDriver::connect(
            &socket,
            DriverConfig {
                emulation: Some(e.clone()),
                ..cfg
            },
        )?,
        _ => VirtioDriver::connect(&socket, cfg)?,
    };
    if !a.json {
        println!(
            "vhost-user-blk on {} ({} mode{}): {} MiB in {} B requests, {} queue(s) x depth {}",
            socket.display(),
            format!("{:?}", a.mode).to_lowercase(),
            if a.xen {
                ", real Xen"
            } else if a.mode == Mode::Unix {
                ""
            } else {
                ", emulated Xen"
            },
            a.mib,
            a.request_size,
            a.queues,
            a.depth
        );
    }
    let seed = 0x5eed;
    let mut rows = Vec::new();
    for (name, write) in [("write", true), ("read+verify", false)] {
        let bar = if a.json {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(total)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
            )?
            .progress_chars("=> "),
        );
        bar.set_message(name);
        let x0 = xen
            .as_ref()
            .map(|x| x.counters().snapshot())
            .unwrap_or_default();
        let d0 = daemon.stats().snapshot();
        let rep = pass(
            &mut driver,
            usize::from(a.queues),
            write,
            total,
            a.request_size,
            seed,
            &mut |done| bar.set_position(done),
        )?;
        bar.finish();
        let x1 = xen
            .as_ref()
            .map(|x| x.counters().snapshot())
            .unwrap_or_default();
        let d1 = daemon.stats().snapshot();
        rows.push(Row {
            name,
            rep,
            xen: x1.since(&x0),
            daemon: StatsSnapshot {
                requests: d1.requests - d0.requests,
                batches: d1.batches - d0.batches,
                kicks: d1.kicks - d0.kicks,
                calls: d1.calls - d0.calls,
                scope_errors: d1.scope_errors - d0.scope_errors,
                connections: 0,
                resubmitted: d1.resubmitted - d0.resubmitted,
            },
        });
    }
    drop(driver);
    match server {
        Server::Thread(t) => match t.join() {
            Ok(r) => r?,
            Err(_) => return Err("daemon thread panicked".into()),
        },
        // It exits 0 after the connection only if nothing stayed mapped.
        Server::Process(mut c) => {
            let status = c.wait()?;
            if !status.success() {
                return Err(format!("daemon exited with {status}").into());
            }
        }
    }
    // The image as the host sees it: exactly the pattern.
    let img = std::fs::read(&image)?;
    let image_ok = img
        .iter()
        .enumerate()
        .all(|(i, &b)| b == xen_vhost_mem::testing::blk_workload::pattern_byte(seed, i as u64));
    let live = xen.as_ref().map_or(0, |x| x.counters().live_mappings());
    let verified = image_ok && rows.iter().all(|r| r.rep.bad == 0) && live == 0;
    let per = |n: u64, r: &Row| n as f64 / r.rep.requests.max(1) as f64;
    if a.json {
        let rows_json: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"pass\":\"{}\",\"requests\":{},\"requests_per_s\":{:.0},\"mib_per_s\":{:.1},\"xen_syscalls_per_request\":{:.4},\"kicks_per_request\":{:.4},\"calls_per_request\":{:.4},\"batches\":{},\"bad\":{}}}",
                    r.name,
                    r.rep.requests,
                    r.rep.requests as f64 / secs(r.rep.elapsed),
                    r.rep.bytes as f64 / secs(r.rep.elapsed) / 1048576.0,
                    per(r.xen.syscalls(), r),
                    per(r.daemon.kicks, r),
                    per(r.daemon.calls, r),
                    r.daemon.batches,
                    r.rep.bad
                )
            })
            .collect();
        println!(
            "{{\"mode\":\"{:?}\",\"real_xen\":{},\"mib\":{},\"request_size\":{},\"queues\":{},\"depth\":{},\"passes\":[{}],\"live_mappings_after\":{},\"verified\":{}}}",
            a.mode,
            a.xen,
            a.mib,
            a.request_size,
            a.queues,
            a.depth,
            rows_json.join(","),
            live,
            verified
        );
    } else {
        println!();
        println!("| pass | requests | requests/s | MiB/s | Xen syscalls/request | kicks/request | calls/request | requests/batch |");
        println!("|---|---|---|---|---|---|---|---|");
        for r in &rows {
            // A daemon in another process keeps its counters to itself.
            let counters = if a.daemon_bin.is_some() {
                "- | - | - | -".to_string()
            } else {
                format!(
                    "{:.3} | {:.3} | {:.3} | {:.1}",
                    per(r.xen.syscalls(), r),
                    per(r.daemon.kicks, r),
                    per(r.daemon.calls, r),
                    r.daemon.requests as f64 / r.daemon.batches.max(1) as f64
                )
            };
            println!(
                "| {} | {} | {:.0} | {:.1} | {counters} |",
                r.name,
                r.rep.requests,
                r.rep.requests as f64 / secs(r.rep.elapsed),
                r.rep.bytes as f64 / secs(r.rep.elapsed) / 1048576.0,
            );
        }
        println!();
        println!(
            "verified: {verified} (every status and byte read back; the image holds exactly the pattern: {image_ok}); live mappings after the run: {live}"
        );
        if let (Some(_), Some(x)) = (a.lazy_foreign, &xen) {
            println!(
                "lazy FOREIGN: {} buckets unmapped to stay within the bound (1 MiB buckets, bound {})",
                x.lazy_evictions(),
                match x.lazy_bucket_limit() {
                    usize::MAX => "none".to_string(),
                    n => n.to_string(),
                }
            );
        }
    }
    if verified {
        Ok(())
    } else {
        Err("verification failed".into())
    }
}

/// Where the daemon runs.
enum Server {
    Thread(std::thread::JoinHandle<std::io::Result<()>>),
    Process(std::process::Child),
}

/// Starts `bin` as the daemon for one connection and waits for its socket.
fn spawn_daemon(
    bin: &std::path::Path,
    socket: &std::path::Path,
    image: &std::path::Path,
    a: &Args,
) -> Result<std::process::Child, Box<dyn std::error::Error>> {
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("--socket-path")
        .arg(socket)
        .arg("--blk-file")
        .arg(image)
        .args(["--num-queues", &a.queues.to_string(), "--connections", "1"]);
    if a.xen {
        cmd.arg("--xen");
    }
    let mut child = cmd.spawn()?;
    for _ in 0..1000 {
        if listening(socket) {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            return Err(format!("{} exited with {status}", bin.display()).into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    Err(format!("{} did not listen on {}", bin.display(), socket.display()).into())
}

/// Whether a socket listens at `path`: the file appears at `bind`, before `listen`, and the
/// daemon serves one connection only, so a probe connection is no way to ask. Linux lists
/// listening Unix sockets in `/proc/net/unix` with flag `__SO_ACCEPTCON` (0x10000).
fn listening(path: &std::path::Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return path.exists();
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7] == path
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}
