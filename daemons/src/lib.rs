//! What the daemons share: a clean exit on SIGTERM and SIGINT.

/// Exits with status 0 on SIGTERM or SIGINT, as a service manager expects of a daemon that
/// was asked to stop. The signals are blocked here, before any thread starts (threads inherit
/// the mask), and taken by one thread with `sigwait`.
pub fn exit_on_stop_signals() -> std::io::Result<()> {
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
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: set and sig are valid for the call.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                log::info!("signal {sig}: exiting");
                std::process::exit(0);
            }
        })?;
    Ok(())
}
