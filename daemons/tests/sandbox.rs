//! The sandbox as the installed programs run it (`--sandbox on`, `--user`): the privilege
//! drop in every thread of a running `vhost-user-blk`, and both daemons' signal threads
//! writing stats lines and exiting under their seccomp allowlist (a call outside it would
//! kill the daemon with SIGSYS). The filters themselves are proven in the library's
//! `tests/sandbox.rs`.

use std::io::Read as _;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xen_vhost_mem::daemon::threads;

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "xen-vhost-daemons-sbx-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Scratch(p)
    }

    fn image(&self) -> PathBuf {
        let image = self.0.join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(1 << 20))
            .expect("image");
        image
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until `sock` exists, then a little longer (listening means set up: privileges
/// dropped, main thread filtered, the signal thread started).
fn wait_listening(sock: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(sock.exists(), "{} never appeared", sock.display());
    std::thread::sleep(Duration::from_millis(200));
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill has no memory effects; pid is our own child, not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// SIGTERM, then the daemon's exit status (code or signal) and its stderr.
fn stop(mut child: Child) -> (Option<i32>, Option<i32>, String) {
    signal(&child, libc::SIGTERM);
    let mut log = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut log);
    }
    let st = child.wait().expect("wait");
    (st.code(), st.signal(), log)
}

/// The privilege drop of `vhost-user-blk` started as root in UNIX mode with `--sandbox on`:
/// once listening, every thread of it runs as `nobody` with no capability (effective,
/// permitted, inheritable, bounding, ambient), `no_new_privs` and seccomp filters; with
/// `--user root` (uid kept, as in Xen mode) the same but uid 0. SIGUSR1 then logs a stats
/// line and SIGTERM a last one and ends it with status 0. Skipped (with a line saying so)
/// unless run as root on a system with a `nobody` user.
#[test]
fn the_blk_daemon_drops_its_privileges_in_every_thread() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || threads::default_unprivileged_user().is_none() {
        println!("skipped: needs root and a `nobody` user");
        return;
    }
    let nobody = {
        let c = std::ffi::CString::new("nobody").expect("name");
        // SAFETY: getpwnam returns a pointer into static storage or null (checked).
        let pw = unsafe { libc::getpwnam(c.as_ptr()) };
        assert!(!pw.is_null());
        // SAFETY: non-null, points at a passwd entry.
        unsafe { (*pw).pw_uid }
    };
    for (user, uid) in [(None, nobody), (Some("root"), 0)] {
        let dir = Scratch::new(&format!("drop-{uid}"));
        let image = dir.image();
        let sock = dir.0.join("blk.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"));
        cmd.arg("--socket-path")
            .arg(&sock)
            .arg("--blk-file")
            .arg(&image)
            .args(["--sandbox", "on"])
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped());
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        let child = cmd.spawn().expect("start the daemon");
        let pid = child.id();
        wait_listening(&sock);
        let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("tasks")
            .filter_map(|e| e.ok())
            .collect();
        assert!(tasks.len() >= 2, "main and signal threads: {}", tasks.len());
        for t in &tasks {
            let status = std::fs::read_to_string(t.path().join("status")).expect("status");
            let field = |k: &str| {
                status
                    .lines()
                    .find(|l| l.starts_with(k))
                    .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                    .unwrap_or_default()
            };
            let name = field("Name:");
            assert_eq!(
                field("Uid:"),
                format!("Uid: {uid} {uid} {uid} {uid}"),
                "{name}"
            );
            for k in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
                assert_eq!(field(k), format!("{k} 0000000000000000"), "{name} {user:?}");
            }
            assert_eq!(field("NoNewPrivs:"), "NoNewPrivs: 1", "{name}");
            assert_eq!(field("Seccomp:"), "Seccomp: 2", "{name}");
        }
        signal(&child, libc::SIGUSR1);
        std::thread::sleep(Duration::from_millis(200));
        let (code, sig, log) = stop(child);
        assert_eq!((code, sig), (Some(0), None), "{log}");
        assert!(log.contains("sandbox on: "), "{log}");
        for reason in ["signal", "exit"] {
            assert!(log.contains(&format!("\"reason\":\"{reason}\"")), "{log}");
        }
    }
}

/// Both daemons with `--sandbox on`, as any user: the signal thread, under the `Signals`
/// allowlist, writes interval lines (`--stats-interval 1`), a SIGUSR1 line and, on SIGTERM,
/// a last line, and the daemon exits with status 0, not SIGSYS. Skipped (with a line saying
/// so) where seccomp filters do not work.
#[test]
fn sandboxed_signal_threads_log_stats_and_exit_cleanly() {
    if !threads::seccomp_works() {
        println!("skipped: seccomp filters do not work here");
        return;
    }
    let dir = Scratch::new("signals");
    let image = dir.image();
    let image = image.to_str().expect("utf-8 path");
    let blk_sock = dir.0.join("blk.sock");
    let rng_sock = dir.0.join("rng.sock");
    let runs: [(&str, &PathBuf, Vec<&str>); 2] = [
        (
            env!("CARGO_BIN_EXE_vhost-user-blk"),
            &blk_sock,
            vec!["--blk-file", image],
        ),
        (env!("CARGO_BIN_EXE_vhost-user-rng"), &rng_sock, vec![]),
    ];
    for (bin, sock, extra) in runs {
        let mut cmd = Command::new(bin);
        cmd.arg("--socket-path")
            .arg(sock)
            .args(extra)
            .args(["--sandbox", "on", "--stats-interval", "1"])
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Root in UNIX mode stays root here (its capabilities still go): the scratch
            // directory is root's.
            cmd.args(["--user", "root"]);
        }
        let child = cmd.spawn().expect("start the daemon");
        wait_listening(sock);
        std::thread::sleep(Duration::from_millis(1300));
        signal(&child, libc::SIGUSR1);
        std::thread::sleep(Duration::from_millis(200));
        let (code, sig, log) = stop(child);
        assert_eq!((code, sig), (Some(0), None), "{bin}: {log}");
        assert!(log.contains("sandbox on: "), "{bin}: {log}");
        for reason in ["interval", "signal", "exit"] {
            assert!(
                log.contains(&format!("\"reason\":\"{reason}\"")),
                "{bin}: no {reason} line: {log}"
            );
        }
    }
}
