//! What the daemons share: logging, their signals, the stats line, and the sandbox
//! (`--sandbox`, `--user`).
//!
//! Each daemon is one file in `src/bin/`; `main` calls [`Signals::block`] first, before any
//! thread starts, then [`init_logging`], builds its [`VhostUserDaemon`], opens and binds what
//! it needs, and calls [`lock_down`]: the sandbox goes on as `--sandbox` says (seccomp
//! allowlists per thread kind, privileges dropped while the process has one thread), and the
//! signal thread starts ([`Signals::spawn`], a [`ThreadKind::Signals`] thread under its own
//! allowlist, with the daemon's [`StatsReporter`]). `main` then enters its own filter
//! ([`ThreadKind::Main`]) and serves. From then on one thread takes the signals with
//! `sigtimedwait` (no signal handler runs, so nothing has to be async-signal-safe; signals
//! that arrived before are taken first):
//!
//! - SIGTERM, SIGINT: a last stats line (`"reason":"exit"`), then exit status 0, as a service
//!   manager expects of a daemon it asked to stop;
//! - SIGUSR1: a stats line (`"reason":"signal"`);
//! - every `--stats-interval` seconds, when given: a stats line (`"reason":"interval"`).
//!
//! A daemon that returns after `--connections` frontends logs a last line too
//! ([`log_stats`], `"reason":"exit"`).
//!
//! A stats line is one JSON object logged at level info with target `stats`:
//!
//! ```text
//! {"daemon":"vhost-user-blk","version":"0.1.0","pid":4242,"reason":"signal","uptime_ms":5012,
//!  "counters":{"requests":512,"batches":70,"kicks":70,"calls":70,"scope_errors":0,
//!  "connections":1,"resubmitted":0,"xen":null}}
//! ```
//!
//! (on one line); `counters` is [`StatsReport`]'s JSON, with a `xen` object of system calls
//! by kind, live mappings and lazy buckets when the daemon runs with `--xen`.
//!
//! [`VhostUserDaemon`]: xen_vhost_mem::daemon::VhostUserDaemon
//! [`StatsReport`]: xen_vhost_mem::daemon::StatsReport

use std::io;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xen_vhost_mem::daemon::threads::{self, Sandbox, SandboxError, ThreadKind};
use xen_vhost_mem::daemon::{StatsReporter, VhostUserDaemon, VhostUserDevice};

/// The log target of the stats lines (`RUST_LOG=warn,stats=info` keeps only them and the
/// warnings).
pub const STATS_TARGET: &str = "stats";

/// What every daemon's `--help` ends with: its environment and signals.
pub const AFTER_HELP: &str = "\
Environment:
  RUST_LOG  log filter, env_logger syntax (default: info). The log goes to stderr.
            Stats lines have target `stats`: RUST_LOG=warn,stats=info keeps only them
            and the warnings.

Signals:
  SIGUSR1          log one JSON line of the daemon's counters (target `stats`)
  SIGTERM, SIGINT  log a last stats line and exit with status 0";

/// Logs to stderr with env_logger, filtered by `RUST_LOG` (`info` when unset, so that
/// connections and stats lines show under a service manager without configuration).
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
}

/// When the daemon started ([`Signals::block`]): the stats lines' `uptime_ms`.
static STARTED: OnceLock<Instant> = OnceLock::new();
/// The daemon's pid, read once in [`Signals::block`]: a stats line then needs no system call
/// beyond the clock and the write to stderr (what a sandboxed signal thread may make).
static PID: OnceLock<u32> = OnceLock::new();

/// The signals the daemons take on their signal thread, blocked everywhere else.
#[derive(Debug)]
pub struct Signals {
    set: libc::sigset_t,
}

/// Why a stats line was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// SIGUSR1.
    Signal,
    /// `--stats-interval`.
    Interval,
    /// SIGTERM or SIGINT, or the last of `--connections` served: just before the exit.
    Exit,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Signal => "signal",
            Reason::Interval => "interval",
            Reason::Exit => "exit",
        }
    }
}

impl Signals {
    /// Blocks SIGTERM, SIGINT and SIGUSR1 in the calling thread, and so in every thread it
    /// starts afterwards (threads inherit the mask). Call it first in `main`, before any
    /// thread exists: a thread started earlier would keep the default action (SIGUSR1
    /// kills) and could be the one a signal is delivered to.
    pub fn block() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: set is a valid sigset_t; the calls only touch it and this thread's mask.
        let rc = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        STARTED.get_or_init(Instant::now);
        PID.get_or_init(std::process::id);
        Ok(Signals { set })
    }

    /// Starts a thread named `signals` of kind [`ThreadKind::Signals`] through `sandbox`
    /// (under that kind's seccomp allowlist when the sandbox is on) that runs
    /// [`Signals::serve`]. With the sandbox on, spawn it before the calling thread enters a
    /// filter of its own (a thread starts under its parent's filter; `Main`'s has no
    /// `rt_sigtimedwait`): [`lock_down`] does.
    pub fn spawn(
        self,
        sandbox: &Arc<Sandbox>,
        name: &'static str,
        reporter: StatsReporter,
        interval: Option<Duration>,
    ) -> io::Result<JoinHandle<Result<(), SandboxError>>> {
        sandbox
            .spawn(ThreadKind::Signals, "signals".into(), move || {
                self.serve(name, reporter, interval)
            })
            .map_err(io::Error::other)
    }

    /// Takes the blocked signals on the calling thread, for good, for daemon `name` (its
    /// stats lines say it), reading the counters through `reporter`; with `interval`, it also
    /// writes a stats line that often. Signals that arrived since [`Signals::block`] are taken
    /// first. For a thread of one's own (e.g. one spawned under a seccomp filter): its system
    /// calls are `rt_sigtimedwait`, `clock_gettime` (when the vDSO cannot answer), `write` to
    /// stderr, `futex` (the log's lock) and `exit_group`.
    pub fn serve(self, name: &'static str, reporter: StatsReporter, interval: Option<Duration>) {
        let run = std::panic::AssertUnwindSafe(|| self.run(name, &reporter, interval));
        if std::panic::catch_unwind(run).is_err() {
            // Nobody else takes SIGTERM: a daemon left running could not be stopped.
            log::error!("the signal thread panicked: exiting");
            std::process::exit(1);
        }
    }

    fn run(&self, name: &'static str, reporter: &StatsReporter, interval: Option<Duration>) {
        // An interval too long for the clock (`checked_add` fails) is no interval: this thread
        // must never panic, or SIGTERM, blocked everywhere else, would be ignored.
        let mut next = interval.and_then(|i| Instant::now().checked_add(i));
        loop {
            let wait = next.map(|n| n.saturating_duration_since(Instant::now()));
            match self.wait(wait) {
                Ok(Some(libc::SIGUSR1)) => log_stats(name, reporter, Reason::Signal),
                Ok(Some(sig)) => {
                    let signal = if sig == libc::SIGINT {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    };
                    log::info!("{signal}: exiting");
                    log_stats(name, reporter, Reason::Exit);
                    std::process::exit(0);
                }
                Ok(None) => {}
                Err(e) => {
                    // Only EINVAL (a bad timeout) is possible here; say so and go on
                    // without the interval rather than spin.
                    log::error!("signal thread: sigtimedwait: {e}");
                    next = None;
                    continue;
                }
            }
            if let (Some(n), Some(i)) = (next, interval) {
                let now = Instant::now();
                if now >= n {
                    log_stats(name, reporter, Reason::Interval);
                    next = now.checked_add(i);
                }
            }
        }
    }

    /// Waits for one of the signals, at most `timeout` (`None`: no limit). `Ok(None)`: the
    /// time ran out, or the wait was interrupted.
    fn wait(&self, timeout: Option<Duration>) -> io::Result<Option<libc::c_int>> {
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_nsec: t.subsec_nanos().into(),
        });
        let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: set is a valid sigset_t; the info pointer may be null; tsp is null or
        // points at ts, which outlives the call.
        let sig = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), tsp) };
        if sig >= 0 {
            return Ok(Some(sig));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(e),
        }
    }
}

/// Logs one stats line for daemon `name` (level info, target [`STATS_TARGET`]). The signal
/// thread calls it; so does a daemon's `main` when it returns after `--connections`.
pub fn log_stats(name: &'static str, reporter: &StatsReporter, reason: Reason) {
    let uptime = STARTED.get().map(Instant::elapsed).unwrap_or_default();
    log::info!(
        target: STATS_TARGET,
        "{}",
        stats_line(name, reason, uptime, reporter)
    );
}

/// One stats line: the daemon's name (a plain program name: it is not escaped), version,
/// pid, the reason, its uptime and its counters, as one JSON object.
pub fn stats_line(
    name: &'static str,
    reason: Reason,
    uptime: Duration,
    r: &StatsReporter,
) -> String {
    format!(
        "{{\"daemon\":\"{}\",\"version\":\"{}\",\"pid\":{},\"reason\":\"{}\",\"uptime_ms\":{},\
         \"counters\":{}}}",
        name,
        env!("CARGO_PKG_VERSION"),
        PID.get().copied().unwrap_or_else(std::process::id),
        reason.as_str(),
        uptime.as_millis(),
        r.report()
    )
}

/// `--sandbox`: seccomp allowlists per thread and the privilege drop.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxMode {
    /// On where the kernel has seccomp filters, off (with a warning) where it has not.
    Auto,
    /// On; fail to start where it cannot be.
    On,
    /// Off: no filters, no privilege drop.
    Off,
}

/// The sandbox options both daemons take.
#[derive(clap::Args, Debug)]
pub struct SandboxArgs {
    /// Seccomp allowlists per thread kind (README, "Sandbox") and dropped privileges after
    /// startup.
    #[arg(long, value_enum, default_value = "auto")]
    pub sandbox: SandboxMode,
    /// With the sandbox on: run as this user once started (socket bound, files and
    /// /dev/xen opened). Default: `nobody` when started as root in UNIX mode; in Xen mode
    /// the uid stays and every capability goes.
    #[arg(long)]
    pub user: Option<String>,
}

/// Turns the sandbox on for `daemon` as `args` say (compiles its filters, drops privileges;
/// `xen`: the daemon uses /dev/xen, already opened), then starts the signal thread under it
/// ([`Signals::spawn`] for daemon `name`, with its stats `interval`). Call it once everything
/// is opened and bound, before any other thread exists (privileges are per thread); then
/// enter the main thread ([`ThreadKind::Main`]) and serve.
pub fn lock_down<D: VhostUserDevice>(
    daemon: VhostUserDaemon<D>,
    args: &SandboxArgs,
    xen: bool,
    signals: Signals,
    name: &'static str,
    interval: Option<Duration>,
) -> Result<VhostUserDaemon<D>, Box<dyn std::error::Error>> {
    let on = match args.sandbox {
        SandboxMode::Off => false,
        SandboxMode::On => true,
        SandboxMode::Auto => {
            let works = threads::seccomp_works();
            if !works {
                log::warn!("seccomp filters do not work here: running without the sandbox");
            }
            works
        }
    };
    if !on {
        signals.spawn(daemon.sandbox(), name, daemon.reporter(), interval)?;
        return Ok(daemon);
    }
    let daemon = daemon.sandboxed()?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let user = match &args.user {
        Some(u) => Some(u.as_str()),
        None if root && !xen => threads::default_unprivileged_user(),
        None => None,
    };
    let d = threads::drop_privileges(user)?;
    log::info!(
        "sandbox on: seccomp allowlists per thread kind; uid {} gid {}{}",
        d.uid,
        d.gid,
        if d.capabilities_cleared {
            ", no capabilities"
        } else {
            ""
        }
    );
    signals.spawn(daemon.sandbox(), name, daemon.reporter(), interval)?;
    Ok(daemon)
}

/// Binds the vhost-user socket at `socket_path` (a file there is removed first), turns the
/// sandbox on and drops privileges ([`lock_down`], one thread so far), starts the signal
/// thread, and enters the main thread's filter: the daemon and its listener, ready to serve.
pub fn listen_locked_down<D: VhostUserDevice>(
    daemon: VhostUserDaemon<D>,
    socket_path: &std::path::Path,
    args: &SandboxArgs,
    xen: bool,
    signals: Signals,
    name: &'static str,
    interval: Option<Duration>,
) -> Result<(VhostUserDaemon<D>, std::os::unix::net::UnixListener), Box<dyn std::error::Error>> {
    let _ = std::fs::remove_file(socket_path);
    let listener = std::os::unix::net::UnixListener::bind(socket_path)?;
    let daemon = lock_down(daemon, args, xen, signals, name, interval)?;
    daemon.sandbox().enter(ThreadKind::Main)?;
    Ok((daemon, listener))
}
