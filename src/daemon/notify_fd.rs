//! Kick, call and error fds must be eventfds. The worker reads 8 bytes from the kick fd once
//! epoll says it is readable and writes 8 bytes to the call fd after a batch: on an eventfd
//! neither can block. A socket or pipe sent instead can: a read another reader won blocks the
//! worker, so the connection can never end (it joins the worker), and a write into a full pipe
//! does the same; a write to a socket whose peer is gone raises SIGPIPE, which kills a process
//! that does not ignore it. So the handler refuses anything else before it touches the queue.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;

/// What procfs calls an eventfd.
const EVENTFD_LINK: &str = "anon_inode:[eventfd]";

/// `Ok` for an eventfd; otherwise what the fd is instead (procfs's name for it, such as
/// `socket:[1234]` or `pipe:[99]`). Without procfs the type cannot be told exactly, so only
/// what can block or raise SIGPIPE (sockets, pipes, devices, directories) is refused.
pub(crate) fn check_eventfd(fd: &File) -> Result<(), String> {
    match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(target) => {
            let target = target.to_string_lossy();
            if target == EVENTFD_LINK {
                Ok(())
            } else {
                Err(target.into_owned())
            }
        }
        Err(_) => {
            let t = fd
                .metadata()
                .map_err(|e| format!("an fd fstat refuses ({e})"))?
                .file_type();
            let kind = if t.is_socket() {
                "a socket"
            } else if t.is_fifo() {
                "a pipe"
            } else if t.is_char_device() || t.is_block_device() {
                "a device"
            } else if t.is_dir() {
                "a directory"
            } else {
                return Ok(());
            };
            Err(kind.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::FromRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn only_an_eventfd_passes() {
        // SAFETY: eventfd(2) returns a new fd this File then owns, or -1 (checked).
        let ev = unsafe {
            let fd = libc::eventfd(0, libc::EFD_CLOEXEC);
            assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
            File::from_raw_fd(fd)
        };
        assert_eq!(check_eventfd(&ev), Ok(()));

        let (a, _b) = UnixStream::pair().expect("socketpair");
        let sock = File::from(std::os::fd::OwnedFd::from(a));
        let kind = check_eventfd(&sock).expect_err("a socket is no eventfd");
        assert!(kind.starts_with("socket:["), "{kind}");

        let (r, _w) = std::io::pipe().expect("pipe");
        let r = File::from(std::os::fd::OwnedFd::from(r));
        let kind = check_eventfd(&r).expect_err("a pipe is no eventfd");
        assert!(kind.starts_with("pipe:["), "{kind}");

        let null = File::open("/dev/null").expect("/dev/null");
        assert_eq!(check_eventfd(&null), Err("/dev/null".to_string()));
    }
}
