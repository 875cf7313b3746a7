//! The sandbox (`daemon::threads`): per-thread seccomp allowlists, proven in child processes.
//!
//! A call outside a thread's allowlist kills the process (`SECCOMP_RET_KILL_PROCESS`), so
//! each case runs in a child: this test binary again, with `XVM_SANDBOX_CHILD` naming the
//! case. The parent checks how the child ended: killed by SIGSYS exactly when a sandboxed
//! thread made a call its kind does not allow, and only then; threads the sandbox did not
//! spawn (the child's main thread) are untouched; opening a file fails with EACCES instead of
//! killing; and a whole sandboxed blk daemon serves checked I/O in UNIX, GRANT (indirect
//! tables in on-demand memory included) and FOREIGN (eager and lazy) memory without being
//! killed, the emulation recording which thread kinds called which Xen driver methods, each
//! of whose system calls the kind's list allows.

mod common;

use std::io::Write as _;
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::Arc;

use common::ScratchDir;
use xen_vhost_mem::daemon::threads::{Sandbox, ThreadKind};
use xen_vhost_mem::daemon::VhostUserDaemon;
use xen_vhost_mem::devices::blk::{BlkConfig, BlkDevice};
use xen_vhost_mem::testing::blk_workload::{pass, pattern_byte};
use xen_vhost_mem::testing::driver::{DriverConfig, GuestMode, VirtioDriver};
use xen_vhost_mem::testing::{EmulatedXen, GuestSim};
use xen_vhost_mem::{ForeignMapping, XenHandle};

const CHILD: &str = "XVM_SANDBOX_CHILD";

/// How a child ended, and what it printed.
struct Ended {
    signal: Option<i32>,
    code: Option<i32>,
    out: String,
}

/// Runs test `test` of this binary in a child with `XVM_SANDBOX_CHILD=case`.
fn child(test: &str, case: &str) -> Ended {
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, case)
        .env_remove("XVM_SANDBOX")
        .output()
        .expect("run the child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ended {
        signal: out.status.signal(),
        code: out.status.code(),
        out: text,
    }
}

/// Prints a line at once (the child may be killed right after).
fn say(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{s}");
    let _ = o.flush();
}

/// In the child: runs `f` in a thread of `kind` under the sandbox, and waits for it.
fn in_thread(kind: ThreadKind, f: impl FnOnce() + Send + 'static) {
    let sandbox = Sandbox::new(&[]).expect("compile the filters");
    let t = sandbox
        .spawn(kind, "sandboxed".into(), f)
        .expect("spawn a sandboxed thread");
    t.join().expect("thread").expect("filter installed");
}

fn inet_socket() -> i32 {
    // SAFETY: socket(2) with constant arguments; the fd is closed by the caller or leaks
    // into a child about to exit.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }
}

/// A queue worker may not open a network socket: the process is killed by SIGSYS, though
/// the child's main thread (not spawned by the sandbox) opened one just before.
#[test]
fn a_queue_worker_opening_a_socket_kills_the_daemon_process() {
    const T: &str = "a_queue_worker_opening_a_socket_kills_the_daemon_process";
    if std::env::var(CHILD).is_ok() {
        let fd = inet_socket();
        say(&format!("main thread: socket -> {fd}"));
        assert!(fd >= 0);
        in_thread(ThreadKind::QueueWorker, || {
            say("worker: socket()");
            let fd = inet_socket();
            say(&format!("worker survived: socket -> {fd}"));
        });
        say("child: done");
        return;
    }
    let e = child(T, "worker-socket");
    assert_eq!(e.signal, Some(libc::SIGSYS), "{}", e.out);
    assert!(e.out.contains("main thread: socket -> "), "{}", e.out);
    assert!(e.out.contains("worker: socket()"), "{}", e.out);
    assert!(!e.out.contains("worker survived"), "{}", e.out);
    assert!(!e.out.contains("child: done"), "{}", e.out);
}

/// The same thread kind making only calls its list allows (an eventfd read and write, a
/// write to stdout, FIONBIO, memory) runs to the end, and the process exits normally.
#[test]
fn a_queue_worker_making_allowed_calls_runs_on() {
    const T: &str = "a_queue_worker_making_allowed_calls_runs_on";
    if std::env::var(CHILD).is_ok() {
        let ev = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        in_thread(ThreadKind::QueueWorker, move || {
            ev.write(3).expect("eventfd write");
            assert_eq!(ev.read().expect("eventfd read"), 3);
            a.set_nonblocking(true).expect("FIONBIO");
            let v: Vec<u8> = vec![7; 1 << 20];
            say(&format!("worker: allowed calls made ({})", v.len()));
        });
        say("child: done");
        return;
    }
    let e = child(T, "worker-allowed");
    assert_eq!((e.signal, e.code), (None, Some(0)), "{}", e.out);
    assert!(e.out.contains("worker: allowed calls made"), "{}", e.out);
    assert!(e.out.contains("child: done"), "{}", e.out);
}

/// ioctl is allowed only with the Xen drivers' requests and FIONBIO/FIOCLEX: a terminal
/// ioctl from a queue worker kills the process.
#[test]
fn a_queue_worker_ioctl_outside_the_xen_requests_kills() {
    const T: &str = "a_queue_worker_ioctl_outside_the_xen_requests_kills";
    if std::env::var(CHILD).is_ok() {
        in_thread(ThreadKind::QueueWorker, || {
            say("worker: TIOCGWINSZ");
            let mut ws: libc::winsize = unsafe_zeroed();
            // SAFETY: TIOCGWINSZ writes one winsize into `ws`.
            let r = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) };
            say(&format!("worker survived: {r}"));
        });
        return;
    }
    let e = child(T, "worker-ioctl");
    assert_eq!(e.signal, Some(libc::SIGSYS), "{}", e.out);
    assert!(e.out.contains("worker: TIOCGWINSZ"), "{}", e.out);
    assert!(!e.out.contains("worker survived"), "{}", e.out);
}

fn unsafe_zeroed<T: Copy>() -> T {
    // SAFETY: used for plain C structs only, for which all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// A layout relay only moves messages: accepting a connection (which the main thread's kind
/// may) kills the process when a relay does it.
#[test]
fn a_relay_accepting_kills_where_main_may() {
    const T: &str = "a_relay_accepting_kills_where_main_may";
    if let Ok(case) = std::env::var(CHILD) {
        let dir = ScratchDir::new("sbx-accept");
        let path = dir.0.join("s.sock");
        let l = UnixListener::bind(&path).expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let kind = if case == "main" {
            ThreadKind::Main
        } else {
            ThreadKind::Relay
        };
        in_thread(kind, move || {
            say("thread: accept");
            let r = l.accept().map(|_| ()).map_err(|e| e.kind());
            say(&format!("thread survived: {r:?}"));
        });
        say("child: done");
        return;
    }
    let e = child(T, "relay");
    assert_eq!(e.signal, Some(libc::SIGSYS), "relay: {}", e.out);
    assert!(!e.out.contains("thread survived"), "{}", e.out);
    let e = child(T, "main");
    assert_eq!((e.signal, e.code), (None, Some(0)), "main: {}", e.out);
    assert!(
        e.out.contains("thread survived: Err(WouldBlock)"),
        "{}",
        e.out
    );
}

/// Opening a file fails with EACCES in every kind (glibc's malloc may try one, and copes)
/// and does not kill.
#[test]
fn opening_a_file_fails_with_eacces_in_every_kind() {
    const T: &str = "opening_a_file_fails_with_eacces_in_every_kind";
    if std::env::var(CHILD).is_ok() {
        for kind in ThreadKind::ALL {
            in_thread(kind, move || {
                let r = std::fs::File::open("/proc/self/status").map_err(|e| e.raw_os_error());
                say(&format!("{kind:?}: {:?}", r.map(|_| ())));
            });
        }
        say("child: done");
        return;
    }
    let e = child(T, "open");
    assert_eq!((e.signal, e.code), (None, Some(0)), "{}", e.out);
    for kind in ThreadKind::ALL {
        assert!(
            e.out
                .contains(&format!("{kind:?}: Err(Some({}))", libc::EACCES)),
            "{kind:?}: {}",
            e.out
        );
    }
}

/// A sandboxed blk daemon in every memory mode: 512 KiB written and read back on two queues,
/// every byte checked; prints the (thread kind, Xen driver method) pairs the emulation saw.
fn serve_sandboxed(mode: GuestMode, indirect: bool, lazy: bool) {
    let cfg = DriverConfig {
        mode,
        queues: 2,
        depth: 8,
        indirect,
        // As QEMU's vhost-user-blk does: GET_INFLIGHT_FD and SET_INFLIGHT_FD in the
        // connection thread, the region marked and cleared by the queue workers.
        inflight: true,
        ..DriverConfig::default()
    };
    let emu = Arc::new(EmulatedXen::new(cfg.emulation_pages()).expect("emulation"));
    let dev = XenHandle::new(emu.clone());
    let dir = ScratchDir::new(&format!("sbx-{mode:?}-{indirect}-{lazy}"));
    let image = dir.0.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(4 << 20))
        .expect("image");
    let path = dir.0.join("blk.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let blk = BlkDevice::open(
        &image,
        BlkConfig {
            num_queues: 2,
            ..BlkConfig::default()
        },
    )
    .expect("blk");
    let mut daemon = VhostUserDaemon::new(Arc::new(blk)).with_xen(dev.clone());
    if lazy {
        daemon = daemon.with_foreign_mapping(ForeignMapping::lazy());
    }
    let daemon = Arc::new(daemon.sandboxed().expect("sandbox"));
    let d = daemon.clone();
    let t = std::thread::spawn(move || d.serve(&listener, Some(1)).expect("serve"));
    let mut drv = if mode == GuestMode::Grant {
        let guest = GuestSim {
            emu: emu.clone(),
            dev: dev.clone(),
            domid: 1,
        };
        VirtioDriver::connect_granting(&path, cfg, Box::new(guest)).expect("connect")
    } else {
        let cfg = DriverConfig {
            emulation: Some(emu.clone()),
            ..cfg
        };
        VirtioDriver::connect(&path, cfg).expect("connect")
    };
    let total = 512 << 10;
    assert!(drv.inflight_region().is_some(), "INFLIGHT_SHMFD negotiated");
    let w = pass(&mut drv, 2, true, total, 4096, 5, &mut |_| {}).expect("write");
    let r = pass(&mut drv, 2, false, total, 4096, 5, &mut |_| {}).expect("read");
    assert_eq!((w.bad, r.bad), (0, 0));
    drop(drv);
    t.join().expect("daemon");
    let img = std::fs::read(&image).expect("image");
    assert!(img[..total as usize]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern_byte(5, i as u64)));
    assert_eq!(emu.live_mappings(), 0);
    for (kind, method) in emu.calls_by_thread_kind() {
        say(&format!("call {kind:?} {method}"));
    }
    say(&format!("served {mode:?} indirect={indirect} lazy={lazy}"));
}

/// The whole daemon sandboxed, each mode in its own child: never killed, data checked, and
/// every Xen driver method a daemon thread called is one system call its kind's list allows.
#[test]
fn a_sandboxed_daemon_serves_every_memory_mode() {
    const T: &str = "a_sandboxed_daemon_serves_every_memory_mode";
    if let Ok(case) = std::env::var(CHILD) {
        match case.as_str() {
            "unix" => serve_sandboxed(GuestMode::Unix, false, false),
            "grant" => serve_sandboxed(GuestMode::Grant, false, false),
            "grant-indirect" => serve_sandboxed(GuestMode::Grant, true, false),
            "foreign" => serve_sandboxed(GuestMode::Foreign, false, false),
            "foreign-lazy" => serve_sandboxed(GuestMode::Foreign, false, true),
            other => panic!("unknown case {other}"),
        }
        return;
    }
    let mut seen = std::collections::BTreeSet::new();
    for case in ["unix", "grant", "grant-indirect", "foreign", "foreign-lazy"] {
        let e = child(T, case);
        assert_eq!(
            (e.signal, e.code),
            (None, Some(0)),
            "{case}: the sandboxed daemon was killed or failed (SIGSYS: a call missing from \
             an allowlist; XVM_SANDBOX=log and the kernel log name it):\n{}",
            e.out
        );
        assert!(e.out.contains("served "), "{case}: {}", e.out);
        // (libtest prints "test ... " before the child's first line, on the same line.)
        for l in e
            .out
            .lines()
            .filter_map(|l| l.split_once("call ").map(|(_, c)| c))
        {
            seen.insert(l.to_string());
        }
    }
    // Every pair a daemon thread made: its real system call is on its kind's list.
    let mut daemon_pairs = 0;
    for pair in &seen {
        let (kind, method) = pair.split_once(' ').expect("kind method");
        let kind = ThreadKind::ALL
            .into_iter()
            .find(|k| kind == format!("Some({k:?})"));
        let Some(kind) = kind else {
            continue; // the test's own guest side (gntalloc-like grants, frame setup)
        };
        daemon_pairs += 1;
        let (_, sys) = xen_vhost_mem::device::DRIVER_SYSCALLS
            .iter()
            .find(|(m, _)| *m == method)
            .unwrap_or_else(|| panic!("{method} missing from DRIVER_SYSCALLS"));
        assert!(
            kind.allowed().contains(sys),
            "{kind:?} threads call {method} ({sys}), which their allowlist lacks"
        );
    }
    // The data path's calls come from queue workers, region setup from connections.
    assert!(
        seen.iter().any(|p| p == "Some(QueueWorker) grant_copy"),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|p| p == "Some(Connection) grant_map_refs"),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|p| p == "Some(QueueWorker) foreign_map_batch"),
        "{seen:?}"
    );
    assert!(daemon_pairs >= 5, "{seen:?}");
}

/// README's table of allowed calls per thread kind is the one the code builds (x86_64).
#[test]
#[cfg(target_arch = "x86_64")]
fn readme_lists_the_allowed_calls_per_thread_kind() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let table = xen_vhost_mem::daemon::threads::markdown_table();
    assert!(
        readme.contains(&table),
        "README.md's sandbox table is out of date; it should read:\n{table}"
    );
}
