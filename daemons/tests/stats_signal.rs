//! The installed programs as an operator sees them: `vhost-user-blk` started as a process,
//! SIGUSR1 before and after traffic from a vhost-user frontend and virtio driver (the
//! library's test kit), `--stats-interval` ticks, SIGTERM; each stats line parsed as JSON.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;
use xen_vhost_mem::testing::blk_workload::pass;
use xen_vhost_mem::testing::driver::{DriverConfig, GuestMode, VirtioDriver};

const WAIT: Duration = Duration::from_secs(20);

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("xen-vhost-daemons-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon process and its stderr, line by line.
struct Daemon {
    child: Child,
    lines: Receiver<String>,
}

impl Daemon {
    fn start(bin: &str, args: &[&str]) -> Self {
        let mut child = Command::new(bin)
            .args(args)
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the daemon");
        let err = child.stderr.take().expect("stderr");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon { child, lines };
        d.line_with("listening on");
        d
    }

    /// The next stderr line containing `text` (the default RUST_LOG is info).
    fn line_with(&mut self, text: &str) -> String {
        let end = Instant::now() + WAIT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(text) => return l,
                Ok(_) => {}
                Err(e) => panic!("no line with {text:?} from the daemon: {e}"),
            }
        }
    }

    /// The next stats line with this reason, its JSON object parsed.
    fn stats(&mut self, reason: &str) -> Value {
        let l = self.line_with(&format!("\"reason\":\"{reason}\""));
        assert!(l.contains(" stats]"), "logged with target stats: {l}");
        let json = &l[l.find('{').expect("a JSON object")..];
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill has no memory effects; pid is our own child, still running (not reaped).
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    fn sigusr1(&mut self) -> Value {
        self.signal(libc::SIGUSR1);
        self.stats("signal")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `v[key]` as an unsigned number, failing the test if it is anything else.
fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

const COUNTERS: [&str; 7] = [
    "requests",
    "batches",
    "kicks",
    "calls",
    "scope_errors",
    "connections",
    "resubmitted",
];

fn image(dir: &Path, mib: u64) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(mib << 20))
        .expect("image");
    p
}

#[test]
fn sigusr1_logs_the_counters_as_json_and_they_move_with_traffic() {
    let dir = Scratch::new("sigusr1");
    let img = image(&dir.0, 4);
    let sock = dir.0.join("blk.sock");
    let mut d = Daemon::start(
        env!("CARGO_BIN_EXE_vhost-user-blk"),
        &[
            "--socket-path",
            sock.to_str().expect("utf-8 path"),
            "--blk-file",
            img.to_str().expect("utf-8 path"),
            "--num-queues",
            "2",
        ],
    );
    let v0 = d.sigusr1();
    assert_eq!(v0["daemon"], "vhost-user-blk");
    assert_eq!(v0["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(num(&v0, "pid"), u64::from(d.child.id()));
    let c0 = &v0["counters"];
    for k in COUNTERS {
        assert_eq!(num(c0, k), 0, "{k} before any frontend: {v0}");
    }
    assert!(c0["xen"].is_null(), "no --xen: {v0}");

    // A frontend writes and reads 2 MiB on two queues, and stays connected.
    let mut drv = VirtioDriver::connect(
        &sock,
        DriverConfig {
            mode: GuestMode::Unix,
            queues: 2,
            depth: 8,
            ..DriverConfig::default()
        },
    )
    .expect("connect");
    let w = pass(&mut drv, 2, true, 2 << 20, 4096, 9, &mut |_| {}).expect("write");
    let r = pass(&mut drv, 2, false, 2 << 20, 4096, 9, &mut |_| {}).expect("read");
    assert_eq!((w.requests, w.bad, r.requests, r.bad), (512, 0, 512, 0));
    let v1 = d.sigusr1();
    let c1 = &v1["counters"];
    assert_eq!(num(c1, "requests"), 1024, "{v1}");
    let batches = num(c1, "batches");
    assert!((1..=1024).contains(&batches), "{v1}");
    assert!(num(c1, "kicks") >= 1 && num(c1, "calls") >= 1, "{v1}");
    assert_eq!(num(c1, "scope_errors"), 0, "{v1}");
    assert_eq!(num(c1, "connections"), 0, "still connected: {v1}");
    assert!(num(&v1, "uptime_ms") >= num(&v0, "uptime_ms"));

    // The frontend leaves: the connection is counted once the daemon is done with it.
    drop(drv);
    d.line_with("connection ended");
    let v2 = d.sigusr1();
    assert_eq!(num(&v2["counters"], "connections"), 1, "{v2}");
    assert_eq!(num(&v2["counters"], "requests"), 1024, "{v2}");

    // SIGTERM: a last line, then exit status 0.
    d.signal(libc::SIGTERM);
    let v3 = d.stats("exit");
    assert_eq!(v3["daemon"], "vhost-user-blk", "{v3}");
    assert_eq!(num(&v3["counters"], "requests"), 1024);
    let status = d.child.wait().expect("wait");
    assert!(status.success(), "{status}");
}

#[test]
fn a_daemon_done_with_its_connections_logs_a_last_line() {
    let dir = Scratch::new("connections");
    let img = image(&dir.0, 1);
    let sock = dir.0.join("blk.sock");
    let mut d = Daemon::start(
        env!("CARGO_BIN_EXE_vhost-user-blk"),
        &[
            "--socket-path",
            sock.to_str().expect("utf-8 path"),
            "--blk-file",
            img.to_str().expect("utf-8 path"),
            "--connections",
            "1",
        ],
    );
    let mut drv = VirtioDriver::connect(&sock, DriverConfig::default()).expect("connect");
    let w = pass(&mut drv, 1, true, 64 << 10, 4096, 2, &mut |_| {}).expect("write");
    assert_eq!((w.requests, w.bad), (16, 0));
    drop(drv);
    let v = d.stats("exit");
    assert_eq!(v["daemon"], "vhost-user-blk", "{v}");
    assert_eq!(num(&v["counters"], "requests"), 16, "{v}");
    assert_eq!(num(&v["counters"], "connections"), 1, "{v}");
    let status = d.child.wait().expect("wait");
    assert!(status.success(), "{status}");
}

#[test]
fn stats_interval_logs_a_line_each_period_and_the_rng_daemon_has_one_too() {
    let dir = Scratch::new("interval");
    let sock = dir.0.join("rng.sock");
    let started = Instant::now();
    let mut d = Daemon::start(
        env!("CARGO_BIN_EXE_vhost-user-rng"),
        &[
            "--socket-path",
            sock.to_str().expect("utf-8 path"),
            "--stats-interval",
            "1",
        ],
    );
    let a = d.stats("interval");
    let b = d.stats("interval");
    assert_eq!(a["daemon"], "vhost-user-rng");
    let (ta, tb) = (num(&a, "uptime_ms"), num(&b, "uptime_ms"));
    // One second apart, give or take a loaded machine.
    assert!((900..=5000).contains(&(tb - ta)), "{ta} then {tb}");
    assert!(started.elapsed() >= Duration::from_millis(1900));
    for k in COUNTERS {
        num(&b["counters"], k);
    }
    // SIGUSR1 between ticks still answers at once.
    assert_eq!(d.sigusr1()["daemon"], "vhost-user-rng");
}

#[test]
fn help_names_every_flag_rust_log_and_the_signals() {
    for (bin, flags) in [
        (
            env!("CARGO_BIN_EXE_vhost-user-blk"),
            &[
                "--socket-path",
                "--blk-file",
                "--num-queues",
                "--queue-size",
                "--read-only",
                "--serial",
                "--xen",
                "--lazy-foreign",
                "--lazy-foreign-limit",
                "--connections",
                "--stats-interval",
                "--version",
            ][..],
        ),
        (
            env!("CARGO_BIN_EXE_vhost-user-rng"),
            &[
                "--socket-path",
                "--rng-file",
                "--xen",
                "--connections",
                "--stats-interval",
                "--version",
            ][..],
        ),
    ] {
        let out = Command::new(bin).arg("--help").output().expect("--help");
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        for f in flags.iter().chain(&["RUST_LOG", "SIGUSR1", "SIGTERM"]) {
            assert!(help.contains(f), "{bin} --help lacks {f}:\n{help}");
        }
        let out = Command::new(bin)
            .arg("--version")
            .output()
            .expect("--version");
        let name = Path::new(bin).file_name().and_then(|n| n.to_str());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{} {}", name.unwrap_or_default(), env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn an_interval_past_the_clock_leaves_the_signals_working() {
    let dir = Scratch::new("huge-interval");
    let sock = dir.0.join("rng.sock");
    let mut d = Daemon::start(
        env!("CARGO_BIN_EXE_vhost-user-rng"),
        &[
            "--socket-path",
            sock.to_str().expect("utf-8 path"),
            "--stats-interval",
            &u64::MAX.to_string(),
        ],
    );
    assert_eq!(d.sigusr1()["reason"], "signal");
    d.signal(libc::SIGTERM);
    d.stats("exit");
    let status = d.child.wait().expect("wait");
    assert!(status.success(), "{status}");
}
