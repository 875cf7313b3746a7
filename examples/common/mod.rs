//! What the example daemons share: a clean exit on SIGTERM and SIGINT, and the sandbox
//! (`--sandbox`, `--user`).

use std::sync::Arc;

use xen_vhost_mem::daemon::threads::{self, Sandbox, ThreadKind};
use xen_vhost_mem::daemon::{VhostUserDaemon, VhostUserDevice};

/// Blocks SIGTERM and SIGINT in this thread and every thread it starts afterwards (threads
/// inherit the mask): call it first. [`spawn_signal_thread`] then takes them with `sigwait`.
pub fn block_stop_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; the calls only touch it and this thread's mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Exits with status 0 on SIGTERM or SIGINT (blocked by [`block_stop_signals`]), as a service
/// manager expects of a daemon that was asked to stop: one thread of kind
/// [`ThreadKind::Signals`] waits for them.
pub fn spawn_signal_thread(sandbox: &Arc<Sandbox>, set: libc::sigset_t) -> std::io::Result<()> {
    sandbox
        .spawn(ThreadKind::Signals, "signals".into(), move || {
            let mut sig = 0;
            // SAFETY: set and sig are valid for the call.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                log::info!("signal {sig}: exiting");
                std::process::exit(0);
            }
        })
        .map_err(std::io::Error::other)?;
    Ok(())
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

/// Turns the sandbox on for `daemon` as `args` say: compiles its filters, drops privileges
/// (`xen`: the daemon uses /dev/xen, already opened), and starts the signal thread under it.
/// Call it once everything is opened and bound; then enter the main thread
/// ([`ThreadKind::Main`]) and serve.
pub fn lock_down<D: VhostUserDevice>(
    daemon: VhostUserDaemon<D>,
    args: &SandboxArgs,
    xen: bool,
    signals: libc::sigset_t,
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
        spawn_signal_thread(daemon.sandbox(), signals)?;
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
    spawn_signal_thread(daemon.sandbox(), signals)?;
    Ok(daemon)
}
