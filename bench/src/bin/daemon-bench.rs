//! Our blk daemon against the peer a user would pick instead (vhost-user-backend 0.24 over
//! stock `GuestMemoryMmap`, `bench/peer-blk`, its own workspace: built here on first use),
//! both served the same workload by the same frontend and driver over a real socket, UNIX
//! memory, at queue depth 1, 8 and 64.
//!
//! Each daemon runs in its own process (ours: this binary with `--serve`), so `perf stat`
//! can count its system calls; rounds interleave the two (order flipped every round) and
//! the table reports the median and spread of the per-round ratios. Our GRANT mode on the
//! emulated Xen device runs beside them, with its Xen system calls counted exactly.
//!
//! ```text
//! cargo run --release -p xen-vhost-bench --bin daemon-bench -- [--rounds 5] [--mib 16] [--json]
//! ```

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::ProgressBar;
use xen_vhost_mem::daemon::VhostUserDaemon;
use xen_vhost_mem::devices::blk::{BlkConfig, BlkDevice, BlkIo};
use xen_vhost_mem::testing::blk_workload::pass;
use xen_vhost_mem::testing::driver::{DriverConfig, GuestMode, VirtioDriver};
use xen_vhost_mem::testing::{EmulatedXen, GuestSim};
use xen_vhost_mem::XenHandle;

#[derive(Parser, Debug)]
struct Args {
    /// Interleaved rounds per depth.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// MiB written then read per daemon per round.
    #[arg(long, default_value_t = 16)]
    mib: u64,
    /// Queue depths.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    depths: Vec<usize>,
    /// Bytes per request.
    #[arg(long, default_value_t = 4096)]
    request_size: u32,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Measure the control path instead: SET_MEM_TABLE and ADD_MEM_REG + REM_MEM_REG latency
    /// with and without the per-connection layout adapter.
    #[arg(long)]
    control: bool,
    /// The peer daemon (default: bench/peer-blk, built on first use).
    #[arg(long)]
    peer_bin: Option<PathBuf>,
    /// Our daemon without its sandbox (by default it runs sandboxed, as the binaries do:
    /// every thread under its seccomp allowlist).
    #[arg(long)]
    no_sandbox: bool,
    /// Internal: serve one frontend with our daemon and exit.
    #[arg(long, hide = true)]
    serve: bool,
    #[arg(long, hide = true)]
    socket_path: Option<PathBuf>,
    #[arg(long, hide = true)]
    blk_file: Option<PathBuf>,
    /// With `--serve`: one preadv/pwritev per request instead of io_uring (for comparing
    /// the two through `--peer-bin`, a script running `daemon-bench --serve --sync-io`).
    #[arg(long, hide = true)]
    sync_io: bool,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let a = Args::parse();
    if let (true, Some(sock), Some(file)) = (a.serve, &a.socket_path, &a.blk_file) {
        let io = if a.sync_io { BlkIo::Sync } else { BlkIo::Uring };
        let dev = BlkDevice::open(
            file,
            BlkConfig {
                io,
                ..BlkConfig::default()
            },
        )?;
        let listener = UnixListener::bind(sock)?;
        let mut daemon = VhostUserDaemon::new(Arc::new(dev));
        if !a.no_sandbox {
            daemon = daemon.sandboxed()?;
        }
        daemon.serve(&listener, Some(1))?;
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("xvm-daemon-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let r = if a.control {
        control(&a, &dir)
    } else {
        run(&a, &dir)
    };
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// One measurement: requests/s, daemon syscalls per request (None without perf), and the
/// daemon's CPU time per request (µs, all its threads, from `/proc/PID/task/*/schedstat`).
/// Throughput is the frontend's and the daemon's together; CPU per request is the daemon's
/// alone, which is what a cheaper submission path changes when the driver is the bottleneck.
#[derive(Clone, Copy, Debug)]
struct Sample {
    rps: f64,
    syscalls: Option<f64>,
    cpu_us: f64,
}

/// Nanoseconds `pid`'s live threads have run so far.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The peer binary: `--peer-bin`, or bench/peer-blk built (once) into target/peer-blk.
fn peer_bin(a: &Args) -> Res<PathBuf> {
    if let Some(p) = &a.peer_bin {
        return Ok(p.clone());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("../target/peer-blk");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-q", "--manifest-path"])
        .arg(root.join("peer-blk/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()?;
    if !status.success() {
        return Err("building bench/peer-blk failed".into());
    }
    Ok(target.join("release/peer-blk"))
}

fn run(a: &Args, dir: &Path) -> Res<()> {
    let peer_exe = peer_bin(a)?;
    let image = dir.join("disk.img");
    std::fs::File::create(&image)?.set_len(a.mib << 20)?;
    let perf = Command::new("perf")
        .args(["stat", "-e", "raw_syscalls:sys_enter", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((a.depths.len() * a.rounds * 3) as u64)
    };
    let mut rows = Vec::new();
    for &depth in &a.depths {
        let (mut ours, mut peer, mut ratios, mut grant) = (vec![], vec![], vec![], vec![]);
        let mut cpu_ratios = vec![];
        for round in 0..a.rounds {
            bar.set_message(format!("depth {depth} round {}", round + 1));
            let order = if round % 2 == 0 {
                ["ours", "peer"]
            } else {
                ["peer", "ours"]
            };
            let mut got = [None, None];
            for kind in order {
                let s = measure_process(a, dir, &image, kind, &peer_exe, depth, perf)?;
                got[usize::from(kind == "peer")] = Some(s);
                bar.inc(1);
            }
            if let [Some(o), Some(p)] = got {
                ratios.push(o.rps / p.rps);
                cpu_ratios.push(p.cpu_us / o.cpu_us);
                ours.push(o);
                peer.push(p);
            }
            grant.push(measure_grant(a, dir, depth)?);
            bar.inc(1);
        }
        rows.push((depth, ours, peer, ratios, grant, cpu_ratios));
    }
    bar.finish_and_clear();
    let med = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let span = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let syscalls = |v: &[Sample]| {
        let s: Vec<f64> = v.iter().filter_map(|s| s.syscalls).collect();
        (!s.is_empty()).then(|| med(s))
    };
    let fmt = |x: Option<f64>| x.map_or("n/a".to_string(), |x| format!("{x:.2}"));
    if a.json {
        let items: Vec<String> = rows
            .iter()
            .map(|(d, o, p, r, g, c)| {
                let (lo, hi) = span(r);
                let (clo, chi) = span(c);
                format!(
                    "{{\"depth\":{d},\"ours_rps\":{:.0},\"peer_rps\":{:.0},\"ratio_median\":{:.3},\"ratio_min\":{lo:.3},\"ratio_max\":{hi:.3},\"ours_cpu_us_per_request\":{:.3},\"peer_cpu_us_per_request\":{:.3},\"cpu_ratio_median\":{:.3},\"cpu_ratio_min\":{clo:.3},\"cpu_ratio_max\":{chi:.3},\"ours_syscalls_per_request\":{},\"peer_syscalls_per_request\":{},\"grant_rps\":{:.0},\"grant_xen_syscalls_per_request\":{:.4}}}",
                    med(o.iter().map(|s| s.rps).collect()),
                    med(p.iter().map(|s| s.rps).collect()),
                    med(r.clone()),
                    med(o.iter().map(|s| s.cpu_us).collect()),
                    med(p.iter().map(|s| s.cpu_us).collect()),
                    med(c.clone()),
                    fmt(syscalls(o)).replace("n/a", "null"),
                    fmt(syscalls(p)).replace("n/a", "null"),
                    med(g.iter().map(|s: &(f64, f64)| s.0).collect()),
                    med(g.iter().map(|s| s.1).collect()),
                )
            })
            .collect();
        println!(
            "{{\"rounds\":{},\"mib\":{},\"request_size\":{},\"rows\":[{}]}}",
            a.rounds,
            a.mib,
            a.request_size,
            items.join(",")
        );
        return Ok(());
    }
    println!(
        "blk daemons, UNIX memory, {} B requests, {} MiB written + read per run, {} interleaved rounds\n",
        a.request_size, a.mib, a.rounds
    );
    println!("| depth | ours req/s | vhost-user-backend req/s | ours/peer (median) | spread (min-max) | ours daemon CPU µs/req | peer daemon CPU µs/req | peer/ours CPU (median) | spread | ours syscalls/req | peer syscalls/req | ours GRANT (emulated) req/s | GRANT Xen syscalls/req |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (d, o, p, r, g, c) in &rows {
        let (lo, hi) = span(r);
        let (clo, chi) = span(c);
        println!(
            "| {d} | {:.0} | {:.0} | {:.2}x | {lo:.2}-{hi:.2} | {:.2} | {:.2} | {:.2}x | {clo:.2}-{chi:.2} | {} | {} | {:.0} | {:.3} |",
            med(o.iter().map(|s| s.rps).collect()),
            med(p.iter().map(|s| s.rps).collect()),
            med(r.clone()),
            med(o.iter().map(|s| s.cpu_us).collect()),
            med(p.iter().map(|s| s.cpu_us).collect()),
            med(c.clone()),
            fmt(syscalls(o)),
            fmt(syscalls(p)),
            med(g.iter().map(|s| s.0).collect()),
            med(g.iter().map(|s| s.1).collect()),
        );
    }
    if !perf {
        println!("\n(perf not available: daemon syscalls not counted)");
    }

    Ok(())
}

/// Runs `kind` in a child process and measures one write + read pass against it.
fn measure_process(
    a: &Args,
    dir: &Path,
    image: &Path,
    kind: &str,
    peer: &Path,
    depth: usize,
    perf: bool,
) -> Res<Sample> {
    let sock = dir.join(format!("{kind}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = if kind == "ours" {
        let mut c = Command::new(std::env::current_exe()?);
        c.arg("--serve");
        if a.no_sandbox {
            c.arg("--no-sandbox");
        }
        c
    } else {
        Command::new(peer)
    };
    let mut child = cmd
        .arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(image)
        .spawn()?;
    let r = (|| -> Res<Sample> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if Instant::now() > deadline {
                return Err(format!("{kind} did not listen").into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut drv = VirtioDriver::connect(&sock, config(a, depth, GuestMode::Unix))?;
        let counter = perf
            .then(|| start_perf(child.id(), dir, kind))
            .transpose()?;
        let cpu0 = cpu_ns(child.id());
        let (rps, requests) = workload(&mut drv, a)?;
        let cpu_us = cpu_ns(child.id()).saturating_sub(cpu0) as f64 / 1e3 / requests as f64;
        let syscalls = match counter {
            Some((p, out)) => Some(stop_perf(p, &out)? as f64 / requests as f64),
            None => None,
        };
        Ok(Sample {
            rps,
            syscalls,
            cpu_us,
        })
    })();
    let _ = child.kill();
    let _ = child.wait();
    r
}

fn config(a: &Args, depth: usize, mode: GuestMode) -> DriverConfig {
    DriverConfig {
        mode,
        queues: 1,
        queue_size: 256,
        depth,
        max_data: a.request_size as usize,
        ..DriverConfig::default()
    }
}

/// Writes then reads `mib`; returns requests/s over both passes and the request count.
fn workload(drv: &mut VirtioDriver, a: &Args) -> Res<(f64, u64)> {
    let total = a.mib << 20;
    let w = pass(drv, 1, true, total, a.request_size, 11, &mut |_| {})?;
    let r = pass(drv, 1, false, total, a.request_size, 11, &mut |_| {})?;
    if w.bad + r.bad != 0 {
        return Err(format!("{} requests failed verification", w.bad + r.bad).into());
    }
    let n = w.requests + r.requests;
    Ok((n as f64 / (w.elapsed + r.elapsed).as_secs_f64(), n))
}

/// Our daemon in GRANT mode over the emulated Xen, in this process (the emulation's grant
/// table lives here): requests/s and Xen syscalls per request, exact.
fn measure_grant(a: &Args, dir: &Path, depth: usize) -> Res<(f64, f64)> {
    let cfg = config(a, depth, GuestMode::Grant);
    let emu = Arc::new(EmulatedXen::new(cfg.emulation_pages())?);
    let xen = XenHandle::new(emu.clone());
    let image = dir.join("grant.img");
    std::fs::File::create(&image)?.set_len(a.mib << 20)?;
    let sock = dir.join("grant.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    let daemon = Arc::new(
        VhostUserDaemon::new(Arc::new(BlkDevice::open(&image, BlkConfig::default())?))
            .with_xen(xen.clone()),
    );
    let d = daemon.clone();
    let t = std::thread::spawn(move || d.serve(&listener, Some(1)));
    let guest = GuestSim {
        emu,
        dev: xen.clone(),
        domid: 1,
    };
    let mut drv = VirtioDriver::connect_granting(&sock, cfg, Box::new(guest))?;
    let before = xen.counters().snapshot();
    let (rps, n) = workload(&mut drv, a)?;
    let calls = xen.counters().snapshot().since(&before).syscalls();
    drop(drv);
    t.join().map_err(|_| "daemon thread panicked")??;
    if xen.counters().live_mappings() != 0 {
        return Err("mappings left after the GRANT run".into());
    }
    Ok((rps, calls as f64 / n as f64))
}

fn start_perf(pid: u32, dir: &Path, kind: &str) -> Res<(Child, PathBuf)> {
    let out = dir.join(format!("perf-{kind}.csv"));
    let p = Command::new("perf")
        .args([
            "stat",
            "-x,",
            "-e",
            "raw_syscalls:sys_enter",
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // perf needs a moment to attach before the measured work starts.
    std::thread::sleep(Duration::from_millis(300));
    Ok((p, out))
}

fn stop_perf(mut p: Child, out: &Path) -> Res<u64> {
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
    p.wait()?;
    let text = std::fs::read_to_string(out)?;
    text.lines()
        .find(|l| l.contains("raw_syscalls:sys_enter"))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("no count in perf output: {text}").into())
}

/// Control-path latency (µs per message, median of 200) through a daemon with or without the
/// layout adapter: (SET_MEM_TABLE, ADD_MEM_REG + REM_MEM_REG).
fn control_round(dir: &Path, adapter: bool) -> Res<(f64, f64)> {
    use std::os::fd::AsRawFd;
    use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo};

    let image = dir.join("control.img");
    std::fs::File::create(&image)?.set_len(1 << 20)?;
    let sock = dir.join("control.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    let daemon = Arc::new(
        VhostUserDaemon::new(Arc::new(BlkDevice::open(&image, BlkConfig::default())?))
            .with_layout_adapter(adapter),
    );
    let d = daemon.clone();
    let t = std::thread::spawn(move || d.serve(&listener, Some(1)));
    let mut fe = Frontend::connect(&sock, 1)?;
    fe.set_owner()?;
    let f = fe.get_features()?;
    fe.set_features(f & (1 << 32 | 1 << 30))?;
    let p = fe.get_protocol_features()?;
    fe.set_protocol_features(
        p & (VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::XEN_MMAP),
    )?;
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let ram = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&image)?;
    let region = |gpa: u64| VhostUserMemoryRegionInfo {
        guest_phys_addr: gpa,
        memory_size: 1 << 20,
        userspace_addr: 0x7000_0000_0000 + gpa,
        mmap_offset: 0,
        mmap_handle: ram.as_raw_fd(),
        xen_mmap_flags: 0,
        xen_mmap_data: 0,
    };
    let (mut table, mut hot) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        let t0 = Instant::now();
        fe.set_mem_table(&[region(0x10_0000)])?;
        table.push(t0.elapsed().as_secs_f64() * 1e6);
        let t0 = Instant::now();
        fe.add_mem_region(&region(0x100_0000))?;
        fe.remove_mem_region(&region(0x100_0000))?;
        hot.push(t0.elapsed().as_secs_f64() * 1e6 / 2.0);
    }
    drop(fe);
    t.join().map_err(|_| "daemon thread panicked")??;
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((med(table), med(hot)))
}

fn control(a: &Args, dir: &Path) -> Res<()> {
    let (mut with, mut without, mut r_table, mut r_hot) = (vec![], vec![], vec![], vec![]);
    for round in 0..a.rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let mut got = [(0.0, 0.0); 2];
        for adapter in order {
            got[usize::from(adapter)] = control_round(dir, adapter)?;
        }
        r_table.push(got[1].0 / got[0].0);
        r_hot.push(got[1].1 / got[0].1);
        with.push(got[1]);
        without.push(got[0]);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let span = |v: &[f64]| {
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        )
    };
    println!(
        "control path, µs per message (median of 200 per round), {} interleaved rounds\n",
        a.rounds
    );
    println!("| message | without adapter | with adapter | with/without (median) | spread |");
    println!("|---|---|---|---|---|");
    let (lo, hi) = span(&r_table);
    println!(
        "| SET_MEM_TABLE (1 region) | {:.1} | {:.1} | {:.2}x | {lo:.2}-{hi:.2} |",
        med(without.iter().map(|x| x.0).collect()),
        med(with.iter().map(|x| x.0).collect()),
        med(r_table.clone())
    );
    let (lo, hi) = span(&r_hot);
    println!(
        "| ADD_MEM_REG / REM_MEM_REG | {:.1} | {:.1} | {:.2}x | {lo:.2}-{hi:.2} |",
        med(without.iter().map(|x| x.1).collect()),
        med(with.iter().map(|x| x.1).collect()),
        med(r_hot.clone())
    );
    Ok(())
}
