//! Every thread of a daemon is spawned here, through [`Sandbox::spawn`], which installs the
//! seccomp allowlist of the thread's [`ThreadKind`] before the thread runs anything else.
//!
//! A daemon in Xen mode runs as root in dom0 and reads hostile guests' memory and a frontend's
//! messages: a compromised daemon must not be able to do more than its threads need. The lists
//! are per kind, because the kinds do very different things: a queue worker only waits on
//! eventfds, moves guest memory (Xen ioctls, mmap) and calls its device's I/O; a layout relay
//! only moves messages between two sockets; the connection thread maps regions and starts
//! workers. A call outside the list kills the process (`SECCOMP_RET_KILL_PROCESS`): a thread
//! doing what it never does is a bug or an exploit, and a daemon half alive after it is worse
//! than one the service manager restarts (QEMU's `reconnect` picks the new one up).
//!
//! Filters stack: a thread starts under its parent's filter and adds its own, so every kind
//! that spawns threads (the connection thread starts queue workers; the accept loop starts
//! connections and relays) also allows what a new thread does before its own filter is in
//! (`clone3`, `set_robust_list`, `rseq`, `sigaltstack`, `prctl(PR_SET_NAME)`, `seccomp`), and
//! what its children need is checked against the parent's list too ([`ThreadKind::parent`]):
//! a child's list must be a subset of its parent's (`child_lists_are_subsets_of_their_parents`).
//!
//! The filters are compiled with rust-vmm's `seccompiler` (pure Rust, no libseccomp to install
//! or link, the compiler Firecracker and cloud-hypervisor use), for the architecture the daemon
//! runs on: x86_64 and aarch64 (the Xen virtio stack with grants runs on Arm64 today).
//!
//! `XVM_SANDBOX=log` in the environment makes a call outside the lists logged by the kernel
//! (`audit: type=1326 ... comm="vq0" ... syscall=N`) instead of fatal: how the lists were
//! derived, and how to extend them for a new device.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why the sandbox could not be built or entered.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The filter of a thread kind could not be compiled.
    #[error("seccomp filter for {kind:?} threads: {reason}")]
    Compile {
        /// The thread kind.
        kind: ThreadKind,
        /// seccompiler's reason.
        reason: String,
    },
    /// The kernel refused the filter (no seccomp, or not allowed).
    #[error("installing the seccomp filter of a {kind:?} thread: {reason}")]
    Install {
        /// The thread kind.
        kind: ThreadKind,
        /// seccompiler's reason (with the errno).
        reason: String,
    },
    /// The architecture has no allowlists.
    #[error("no seccomp allowlists for architecture {0}")]
    Arch(&'static str),
    /// A thread could not be spawned.
    #[error("spawning a {kind:?} thread: {source}")]
    Spawn {
        /// The thread kind.
        kind: ThreadKind,
        /// The error.
        source: std::io::Error,
    },
    /// A privilege could not be dropped.
    #[error("dropping privileges: {step}: {source}")]
    Privileges {
        /// What was being dropped.
        step: String,
        /// The errno.
        source: std::io::Error,
    },
    /// `--user` names no user.
    #[error("no user named {0:?}")]
    NoSuchUser(String),
    /// Privileges were to be dropped while other threads run (capabilities and
    /// `no_new_privs` are per thread: theirs would stay).
    #[error("dropping privileges needs a single-threaded process; it has {0} threads")]
    Threads(usize),
}

/// What a thread of a daemon does, and so which system calls it may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// A daemon binary's main thread once started: accepts frontends and spawns their
    /// connection and relay threads.
    Main,
    /// A daemon binary's signal thread: waits for SIGTERM, SIGINT and SIGUSR1, logs stats
    /// lines (on SIGUSR1, every `--stats-interval`, a last one before exiting) and exits.
    Signals,
    /// One frontend connection: vhost's parser and our handler, which maps the regions
    /// (mmap, Xen ioctls) and starts and stops the queue workers.
    Connection,
    /// The layout relay between the frontend's socket and vhost's (two per connection).
    Relay,
    /// One queue: waits on its kick, serves batches through request-scoped memory (Xen
    /// ioctls, mmap/munmap of grant and lazy FOREIGN pages), calls the device (whose own
    /// calls are added, [`crate::daemon::VhostUserDevice::worker_syscalls`]) and signals.
    QueueWorker,
}

impl ThreadKind {
    /// Every kind, in table order.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Main,
        ThreadKind::Signals,
        ThreadKind::Connection,
        ThreadKind::Relay,
        ThreadKind::QueueWorker,
    ];

    /// The kind that spawns threads of this kind (whose filter they start under), if any.
    pub fn parent(self) -> Option<ThreadKind> {
        match self {
            ThreadKind::Main | ThreadKind::Signals => None,
            ThreadKind::Connection | ThreadKind::Relay => Some(ThreadKind::Main),
            ThreadKind::QueueWorker => Some(ThreadKind::Connection),
        }
    }

    /// The system calls threads of this kind may make, by name, device calls excluded.
    pub fn allowed(self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self.syscalls().iter().map(|s| s.name).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn syscalls(self) -> Vec<Sys> {
        let mut v: Vec<Sys> = COMMON.to_vec();
        match self {
            ThreadKind::Main => {
                v.extend_from_slice(SPAWNS);
                v.extend_from_slice(MAIN);
                // Main spawns connections, which spawn workers: it allows theirs too.
                v.extend_from_slice(CONNECTION);
                v.extend_from_slice(RELAY);
                v.extend_from_slice(WORKER);
            }
            ThreadKind::Signals => v.extend_from_slice(SIGNALS),
            ThreadKind::Connection => {
                v.extend_from_slice(SPAWNS);
                v.extend_from_slice(CONNECTION);
                v.extend_from_slice(WORKER);
            }
            ThreadKind::Relay => v.extend_from_slice(RELAY),
            ThreadKind::QueueWorker => v.extend_from_slice(WORKER),
        }
        v
    }
}

/// The allowlists as a Markdown table (kind, spawned by, system calls), the README's
/// "Sandbox" table on x86_64 (`tests/sandbox.rs` keeps them equal). Argument restrictions
/// are noted after the call; `open`/`openat`/`openat2` fail with EACCES in every kind.
pub fn markdown_table() -> String {
    let mut t =
        String::from("| thread kind | spawned by | allowed system calls |\n|---|---|---|\n");
    for kind in ThreadKind::ALL {
        let mut names: Vec<String> = Vec::new();
        for s in kind.syscalls() {
            let name = s.name.trim_start_matches("SYS_");
            let shown = match (name, s.args) {
                ("ioctl", Some(_)) => "ioctl (Xen requests, FIONBIO, FIOCLEX)".to_string(),
                ("prctl", Some(_)) => "prctl (PR_SET_NAME, PR_SET_NO_NEW_PRIVS)".to_string(),
                ("fcntl", Some(_)) => {
                    "fcntl (F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC, F_ADD_SEALS)"
                        .to_string()
                }
                (n, _) => n.to_string(),
            };
            names.push(shown);
        }
        names.sort();
        names.dedup();
        let parent = kind
            .parent()
            .map_or("the binary".to_string(), |p| format!("{p:?}"));
        let device = if kind == ThreadKind::QueueWorker {
            " + the device's `worker_syscalls`"
        } else {
            ""
        };
        t.push_str(&format!(
            "| {kind:?} | {parent} | {}{device} |\n",
            names.join(", ")
        ));
    }
    t
}

/// A system call by name and number, optionally only with these values of an argument.
#[derive(Clone, Copy, Debug)]
struct Sys {
    name: &'static str,
    nr: i64,
    /// Allowed only when argument `.0` is one of `.1`.
    args: Option<(u8, &'static [u64])>,
}

macro_rules! sys {
    ($name:ident) => {
        Sys {
            name: stringify!($name),
            nr: libc::$name,
            args: None,
        }
    };
    ($name:ident, $arg:expr, $vals:expr) => {
        Sys {
            name: stringify!($name),
            nr: libc::$name,
            args: Some(($arg, $vals)),
        }
    };
}

/// `prctl` options a thread uses: naming itself (std, at thread start) and no_new_privs (set
/// again by seccompiler before each filter).
const PRCTL_OPTIONS: &[u64] = &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64];

/// `fcntl` commands: std's `try_clone` (F_DUPFD_CLOEXEC), flags, and the F_GETFD a debug
/// build makes before closing an fd.
const FCNTL_COMMANDS: &[u64] = &[
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_DUPFD_CLOEXEC as u64,
    // Sealing the in-flight memfd (GET_INFLIGHT_FD, a connection).
    libc::F_ADD_SEALS as u64,
];

/// ioctl requests: the Xen drivers' (one per `XenDriver` method that is an ioctl), and the
/// two std uses on sockets (FIONBIO for `set_nonblocking`, FIOCLEX).
const IOCTLS: &[u64] = &[
    xen_sys::ioctl::IOCTL_PRIVCMD_MMAPBATCH_V2 as u64,
    xen_sys::ioctl::IOCTL_GNTDEV_MAP_GRANT_REF as u64,
    xen_sys::ioctl::IOCTL_GNTDEV_UNMAP_GRANT_REF as u64,
    xen_sys::ioctl::IOCTL_GNTDEV_GRANT_COPY as u64,
    libc::FIONBIO,
    libc::FIOCLEX,
];

/// Every thread: memory allocation and release (malloc's arenas grow with mprotect, large
/// blocks come from mmap), locks and parking (futex, sched_yield), logging to stderr (write),
/// dropping fds (close), time (clock_gettime when the vDSO cannot answer), std's hash keys
/// (getrandom), signal returns, and ending the thread (its alternate signal stack is released:
/// sigaltstack, munmap; glibc blocks signals and frees the stack with madvise) or the
/// process.
const COMMON: &[Sys] = &[
    sys!(SYS_brk),
    sys!(SYS_mmap),
    sys!(SYS_munmap),
    sys!(SYS_mremap),
    sys!(SYS_mprotect),
    sys!(SYS_madvise),
    sys!(SYS_futex),
    sys!(SYS_sched_yield),
    sys!(SYS_write),
    sys!(SYS_close),
    sys!(SYS_fcntl, 1, FCNTL_COMMANDS),
    sys!(SYS_clock_gettime),
    sys!(SYS_getrandom),
    sys!(SYS_rt_sigreturn),
    sys!(SYS_rt_sigprocmask),
    sys!(SYS_sigaltstack),
    sys!(SYS_restart_syscall),
    sys!(SYS_exit),
    sys!(SYS_exit_group),
];

/// What a new thread does under its parent's filter before installing its own: the clone,
/// glibc's per-thread setup, std's name and alternate signal stack, and the filter itself.
const SPAWNS: &[Sys] = &[
    sys!(SYS_clone),
    sys!(SYS_clone3),
    sys!(SYS_set_robust_list),
    sys!(SYS_rseq),
    sys!(SYS_gettid),
    sys!(SYS_sched_getaffinity),
    sys!(SYS_prctl, 0, PRCTL_OPTIONS),
    sys!(SYS_seccomp),
];

/// The accept loop, and the socket pair of each connection's layout relay.
const MAIN: &[Sys] = &[sys!(SYS_accept4), sys!(SYS_socketpair)];

/// The daemons' signal thread: waiting for SIGTERM, SIGINT and SIGUSR1 (with a timeout for
/// `--stats-interval`); its stats lines need only [`COMMON`]'s clock, futex and write.
const SIGNALS: &[Sys] = &[sys!(SYS_rt_sigtimedwait)];

/// A connection: vhost reads and answers messages (recvmsg, sendmsg; our peek and drain,
/// recvfrom), clones the socket (fcntl F_DUPFD_CLOEXEC), checks the fds it gets (fstat of
/// region files, the eventfd check reads /proc/self/fd links, getsockopt of a backend socket),
/// maps regions (mmap, munmap above, Xen ioctls), creates each worker's epoll and wake
/// eventfd, sets up the in-flight memfd (GET_INFLIGHT_FD), waits for held requests at
/// GET_VRING_BASE, and shuts the socket down at the end.
const CONNECTION: &[Sys] = &[
    sys!(SYS_recvmsg),
    sys!(SYS_sendmsg),
    sys!(SYS_recvfrom),
    sys!(SYS_sendto),
    sys!(SYS_read),
    sys!(SYS_fstat),
    sys!(SYS_newfstatat),
    sys!(SYS_statx),
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_readlink),
    sys!(SYS_readlinkat),
    sys!(SYS_getsockopt),
    sys!(SYS_ioctl, 1, IOCTLS),
    sys!(SYS_epoll_create1),
    sys!(SYS_epoll_ctl),
    sys!(SYS_eventfd2),
    sys!(SYS_shutdown),
    // GET_INFLIGHT_FD: a memfd, sized (the seals are an fcntl, above), mapped.
    sys!(SYS_memfd_create),
    sys!(SYS_ftruncate),
    // GET_VRING_BASE polls, a millisecond at a time, for held requests to complete.
    sys!(SYS_clock_nanosleep),
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_nanosleep),
];

/// A relay: whole messages in and out with their fds, and the socket shut down at the end.
const RELAY: &[Sys] = &[sys!(SYS_recvmsg), sys!(SYS_sendmsg), sys!(SYS_shutdown)];

/// A queue worker: epoll on kick and wake eventfds (read), signals the call eventfd (write,
/// above), and fetches guest pages (Xen ioctls: grant copy, gntdev map and unmap, privcmd
/// batches of lazy FOREIGN buckets; mmap and munmap above).
const WORKER: &[Sys] = &[
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_epoll_wait),
    sys!(SYS_epoll_pwait),
    sys!(SYS_read),
    sys!(SYS_ioctl, 1, IOCTLS),
];

/// A system call a device's queue workers make, beyond the runtime's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSyscall {
    /// Its name (for the README's table and error messages).
    pub name: &'static str,
    /// Its number on this architecture (`libc::SYS_*`).
    pub nr: i64,
}

/// Names a system call for [`crate::daemon::VhostUserDevice::worker_syscalls`]:
/// `device_syscall!(SYS_preadv)`.
#[macro_export]
macro_rules! device_syscall {
    ($name:ident) => {
        $crate::daemon::threads::DeviceSyscall {
            name: stringify!($name),
            nr: libc::$name,
        }
    };
}

/// Calls that fail with `EACCES` instead of killing, in every kind: opening files. No thread
/// opens a file once the daemon is set up, but glibc's malloc may open
/// `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread's heap, and does
/// without when it cannot (seen in a queue worker: `XVM_SANDBOX=log`, GRANT mode). A second
/// filter returns the errno; the kernel takes the stricter answer of the two filters, so
/// these calls are refused, not fatal.
const REFUSED: &[Sys] = &[
    #[cfg(target_arch = "x86_64")]
    sys!(SYS_open),
    sys!(SYS_openat),
    sys!(SYS_openat2),
];

/// The compiled filters of a daemon, one pair per thread kind (the allowlist, and `EACCES`
/// for the calls that open files), or none (sandbox off).
#[derive(Debug, Default)]
pub struct Sandbox {
    programs: Option<BTreeMap<ThreadKind, (BpfProgram, BpfProgram)>>,
}

/// What a call outside the lists does: kill the process, or (`XVM_SANDBOX=log`) get logged
/// by the kernel and go through.
fn mismatch_action() -> SeccompAction {
    match std::env::var("XVM_SANDBOX").as_deref() {
        Ok("log") => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    }
}

fn target_arch() -> Result<TargetArch, SandboxError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(TargetArch::x86_64),
        "aarch64" => Ok(TargetArch::aarch64),
        other => Err(SandboxError::Arch(other)),
    }
}

impl Sandbox {
    /// No filters: threads run unconfined.
    pub fn off() -> Arc<Self> {
        Arc::new(Sandbox::default())
    }

    /// Compiles the filter of every kind, the queue workers' with `device` calls added.
    pub fn new(device: &[DeviceSyscall]) -> Result<Arc<Self>, SandboxError> {
        let arch = target_arch()?;
        let action = mismatch_action();
        let mut programs = BTreeMap::new();
        for kind in ThreadKind::ALL {
            let mut calls = kind.syscalls();
            // The device's calls are made by workers, which start under the connection's
            // filter, which starts under main's.
            if matches!(
                kind,
                ThreadKind::QueueWorker | ThreadKind::Connection | ThreadKind::Main
            ) {
                calls.extend(device.iter().map(|d| Sys {
                    name: d.name,
                    nr: d.nr,
                    args: None,
                }));
            }
            // Let through by the allowlist, so that the errno filter's answer stands.
            calls.extend_from_slice(REFUSED);
            let allow = compile(kind, &calls, action.clone(), SeccompAction::Allow, arch)?;
            let refuse = compile(
                kind,
                REFUSED,
                SeccompAction::Allow,
                SeccompAction::Errno(libc::EACCES as u32),
                arch,
            )?;
            programs.insert(kind, (allow, refuse));
        }
        Ok(Arc::new(Sandbox {
            programs: Some(programs),
        }))
    }

    /// Whether filters are installed.
    pub fn is_on(&self) -> bool {
        self.programs.is_some()
    }

    /// Installs the filter of `kind` on the calling thread (for threads the daemon did not
    /// spawn, such as a binary's main thread once it is set up). Nothing when off.
    pub fn enter(&self, kind: ThreadKind) -> Result<(), SandboxError> {
        let Some((allow, refuse)) = self.programs.as_ref().and_then(|p| p.get(&kind)) else {
            return Ok(());
        };
        for prog in [refuse, allow] {
            seccompiler::apply_filter(prog).map_err(|e| SandboxError::Install {
                kind,
                reason: e.to_string(),
            })?;
        }
        CURRENT.with(|c| c.set(Some(kind)));
        Ok(())
    }

    /// Spawns a thread of `kind` named `name` that installs its filter before running `f`.
    /// If the filter cannot be installed, `f` never runs and the thread returns the error.
    pub fn spawn<F, T>(
        self: &Arc<Self>,
        kind: ThreadKind,
        name: String,
        f: F,
    ) -> Result<JoinHandle<Result<T, SandboxError>>, SandboxError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let sandbox = self.clone();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Err(e) = sandbox.enter(kind) {
                    log::error!("{e}");
                    return Err(e);
                }
                CURRENT.with(|c| c.set(Some(kind)));
                Ok(f())
            })
            .map_err(|source| SandboxError::Spawn { kind, source })
    }
}

thread_local! {
    static CURRENT: std::cell::Cell<Option<ThreadKind>> = const { std::cell::Cell::new(None) };
}

/// The kind of the calling thread, when it was spawned (or entered) through a [`Sandbox`],
/// on or off. Tests use it to prove which kinds make which device calls.
pub fn current_kind() -> Option<ThreadKind> {
    CURRENT.with(|c| c.get())
}

fn compile(
    kind: ThreadKind,
    calls: &[Sys],
    mismatch: SeccompAction,
    matched: SeccompAction,
    arch: TargetArch,
) -> Result<BpfProgram, SandboxError> {
    let err = |e: &dyn std::fmt::Display| SandboxError::Compile {
        kind,
        reason: e.to_string(),
    };
    // Per call: `None` allows any arguments (seccompiler: an empty rule list); otherwise the
    // allowed values of one argument.
    let mut allowed: BTreeMap<i64, Option<(u8, Vec<u64>)>> = BTreeMap::new();
    for s in calls {
        match (allowed.get_mut(&s.nr), s.args) {
            (Some(None), _) => {}
            (_, None) => {
                allowed.insert(s.nr, None);
            }
            (Some(Some((_, v))), Some((_, vals))) => v.extend_from_slice(vals),
            (None, Some((arg, vals))) => {
                allowed.insert(s.nr, Some((arg, vals.to_vec())));
            }
        }
    }
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, args) in allowed {
        let mut list = Vec::new();
        if let Some((arg, mut vals)) = args {
            vals.sort_unstable();
            vals.dedup();
            for v in vals {
                let c = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                    .map_err(|e| err(&e))?;
                list.push(SeccompRule::new(vec![c]).map_err(|e| err(&e))?);
            }
        }
        rules.insert(nr, list);
    }
    let filter = SeccompFilter::new(rules, mismatch, matched, arch).map_err(|e| err(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))
}

/// What [`drop_privileges`] left the process with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    /// Real, effective and saved user id now.
    pub uid: u32,
    /// Real, effective and saved group id now.
    pub gid: u32,
    /// Whether capabilities (effective, permitted, inheritable, ambient and the bounding set)
    /// were cleared; false when the process had none to start with.
    pub capabilities_cleared: bool,
}

/// Drops what a daemon no longer needs once it has opened its files, its socket and (Xen
/// mode) `/dev/xen/*`: with `user`, every group and then the user ids become that user's
/// (root's capabilities go with the uid); in any case the capability bounding set, ambient
/// capabilities and the effective, permitted and inheritable sets are cleared (a root daemon
/// that keeps uid 0 in Xen mode keeps no capability), and `no_new_privs` is set, so nothing
/// the daemon executes could gain privileges back. The Xen drivers check nothing past
/// `open`: the ioctls and mmaps on the open fds work without capabilities.
///
/// Capabilities, the bounding set and `no_new_privs` are per thread in Linux, so this must
/// run while the process has one thread (before any other is started, or after they are
/// joined): otherwise [`SandboxError::Threads`], and nothing is dropped.
pub fn drop_privileges(user: Option<&str>) -> Result<Dropped, SandboxError> {
    // A thread just joined can stay listed for a moment.
    for _ in 0..100 {
        match thread_count() {
            Some(n) if n > 1 => std::thread::sleep(std::time::Duration::from_millis(1)),
            _ => break,
        }
    }
    if let Some(n) = thread_count().filter(|&n| n > 1) {
        return Err(SandboxError::Threads(n));
    }
    let fail = |step: &str| SandboxError::Privileges {
        step: step.to_string(),
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cleared = false;
    if root {
        // The bounding set needs CAP_SETPCAP, so it goes while we still have it.
        let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
            .unwrap_or(40);
        for cap in 0..=last {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(fail(&format!("PR_CAPBSET_DROP {cap}")));
            }
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        } != 0
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
        {
            return Err(fail("PR_CAP_AMBIENT_CLEAR_ALL"));
        }
    }
    if let Some(name) = user {
        let (uid, gid) = lookup_user(name)?;
        // SAFETY: setgroups with a null list of length 0; setresgid/setresuid take integers.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(fail("setgroups"));
            }
            if libc::setresgid(gid, gid, gid) != 0 {
                return Err(fail(&format!("setresgid {gid}")));
            }
            if libc::setresuid(uid, uid, uid) != 0 {
                return Err(fail(&format!("setresuid {uid}")));
            }
        }
        // SAFETY: setuid with an integer; it must fail now that no id is 0.
        if uid != 0 && unsafe { libc::setuid(0) } == 0 {
            return Err(SandboxError::Privileges {
                step: "setuid(0) still works after dropping to another user".into(),
                source: std::io::Error::from_raw_os_error(libc::EPERM),
            });
        }
    }
    if root {
        clear_capabilities().map_err(|source| SandboxError::Privileges {
            step: "capset".into(),
            source,
        })?;
        cleared = true;
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(fail("PR_SET_NO_NEW_PRIVS"));
    }
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    Ok(Dropped {
        uid,
        gid,
        capabilities_cleared: cleared,
    })
}

/// Threads of this process, from procfs (`None` without it).
fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Clears the effective, permitted and inheritable capability sets of the calling thread.
fn clear_capabilities() -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a v3 header and two data words, both live for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The uid and gid of `name`, from the passwd database.
fn lookup_user(name: &str) -> Result<(u32, u32), SandboxError> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| SandboxError::NoSuchUser(name.to_string()))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain data; all-zero is a valid value for getpwnam_r to fill.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is live for the call and `buf` is as long as we say.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return Err(SandboxError::NoSuchUser(name.to_string()));
    }
    Ok((pw.pw_uid, pw.pw_gid))
}

/// The user a root daemon in UNIX mode runs as when none is named: `nobody`, if the system
/// has it.
pub fn default_unprivileged_user() -> Option<&'static str> {
    lookup_user("nobody").ok().map(|_| "nobody")
}

/// Whether this kernel lets a thread install a seccomp filter: tried on a throwaway thread
/// (filters are per thread), so the caller's thread stays as it is.
pub fn seccomp_works() -> bool {
    let Ok(sandbox) = Sandbox::new(&[]) else {
        return false;
    };
    match sandbox.spawn(ThreadKind::Relay, "seccomp-probe".into(), || ()) {
        Ok(t) => matches!(t.join(), Ok(Ok(()))),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread starts under its parent's filter, so its calls must be on the parent's list
    /// too (device calls are added to both by `Sandbox::new`).
    #[test]
    fn child_lists_are_subsets_of_their_parents() {
        for kind in ThreadKind::ALL {
            let Some(parent) = kind.parent() else {
                continue;
            };
            let p = parent.allowed();
            for call in kind.allowed() {
                assert!(
                    p.contains(&call),
                    "{kind:?} allows {call}, its parent {parent:?} not"
                );
            }
            for call in SPAWNS {
                assert!(
                    p.contains(&call.name),
                    "{parent:?} spawns but lacks {}",
                    call.name
                );
            }
        }
    }

    #[test]
    fn every_kind_compiles() {
        let s = Sandbox::new(&[crate::device_syscall!(SYS_preadv)]).expect("filters");
        assert!(s.is_on());
        assert!(!Sandbox::off().is_on());
    }
}
