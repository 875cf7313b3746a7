//! The host side's Unix-socket conventions, those of vhost-device-vsock's hybrid mode (and
//! Firecracker's): a host program connects to the listening socket `<uds-path>` and writes
//! `CONNECT <port>\n` to reach the guest's port; once the guest accepts, it reads
//! `OK <port>\n` (the port it asked for, as vhost-device-vsock answers) and the stream
//! carries the connection. A guest connecting to host port P reaches whoever listens on
//! `<uds-path>_P`.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Longest `CONNECT` line accepted (`CONNECT 4294967295\n` is 19 bytes).
pub const MAX_LINE: usize = 32;

/// Why a host-side stream or socket is refused.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The first line was not `CONNECT <u32>`.
    #[error("host stream sent {0:?}, not \"CONNECT <port>\\n\"")]
    BadLine(String),
    /// No newline within [`MAX_LINE`] bytes.
    #[error("host stream sent {0} bytes without a newline")]
    LongLine(usize),
    /// The host closed before its line was whole.
    #[error("host stream closed after {0} bytes of its CONNECT line")]
    Closed(usize),
    /// Nobody listens for the guest's connection.
    #[error("connecting to {path}: {err}")]
    Connect {
        /// `<uds-path>_<port>`.
        path: PathBuf,
        /// What connect said.
        err: std::io::Error,
    },
    /// A read or write on a host stream.
    #[error("host stream: {0}")]
    Io(#[from] std::io::Error),
}

/// Where a guest connection to host port `port` goes: `<uds_path>_<port>`.
pub fn guest_target(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_os_string();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects to the host program listening for guest connections to `port`, without
/// blocking: a Unix connect completes at once or fails (`EAGAIN` when the program's accept
/// queue is full), so a host program that stopped accepting cannot stall the tx queue.
pub fn connect_for_guest(uds_path: &Path, port: u32) -> Result<UnixStream, HostError> {
    let path = guest_target(uds_path, port);
    nonblocking_connect(&path).map_err(|err| HostError::Connect { path, err })
}

fn nonblocking_connect(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: an all-zero sockaddr_un is valid (family set below, path NUL-terminated).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: plain socket creation; the fd is owned by the UnixStream right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns; dropping the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes that outlives the call.
    let r = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast::<libc::sockaddr>(), len) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// The reply to a host program whose connection to guest port `guest_port` the guest
/// accepted: vhost-device-vsock answers with the guest's port (Firecracker with the host
/// port it allocated); we answer as the peer we replace.
pub fn ok_line(guest_port: u32) -> String {
    format!("OK {guest_port}\n")
}

/// A host stream still sending its `CONNECT` line.
#[derive(Debug)]
pub struct PendingHost {
    /// The stream (non-blocking).
    pub stream: UnixStream,
    line: Vec<u8>,
}

impl PendingHost {
    /// A stream just accepted.
    pub fn new(stream: UnixStream) -> Self {
        PendingHost {
            stream,
            line: Vec::new(),
        }
    }

    /// Reads what the stream sent, one byte at a time so nothing after the newline is taken
    /// from the stream (the host may write data right behind its line). `Ok(Some(port))`
    /// once the line is whole, `Ok(None)` while it is not.
    pub fn poll_line(&mut self) -> Result<Option<u32>, HostError> {
        let mut b = [0u8; 1];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return Err(HostError::Closed(self.line.len())),
                Ok(_) if b[0] == b'\n' => return parse_connect(&self.line).map(Some),
                Ok(_) => {
                    self.line.push(b[0]);
                    if self.line.len() > MAX_LINE {
                        return Err(HostError::LongLine(self.line.len()));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect(line: &[u8]) -> Result<u32, HostError> {
    let text = String::from_utf8_lossy(line);
    let bad = || HostError::BadLine(text.to_string());
    let rest = text.strip_prefix("CONNECT ").ok_or_else(bad)?;
    rest.trim_end_matches('\r')
        .parse::<u32>()
        .map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    #[test]
    fn guest_connections_do_not_block_on_a_full_accept_queue() {
        let dir = std::env::temp_dir().join(format!("xvm-vsock-host-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        assert!(matches!(
            connect_for_guest(&uds, 9),
            Err(HostError::Connect { .. })
        ));
        // A listener that never accepts, with the smallest backlog.
        let path = guest_target(&uds, 9);
        let l = UnixListener::bind(&path).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        // SAFETY: listen on our own listening socket; no memory involved.
        let r = unsafe { libc::listen(fd, 0) };
        assert_eq!(r, 0);
        let mut ok = Vec::new();
        let full = loop {
            match connect_for_guest(&uds, 9) {
                Ok(s) => ok.push(s),
                Err(HostError::Connect { err, .. }) => break err,
                Err(e) => panic!("{e}"),
            }
            assert!(ok.len() < 64, "the accept queue never filled");
        };
        assert_eq!(full.kind(), ErrorKind::WouldBlock);
        let (mut a, _) = l.accept().unwrap();
        ok[0].write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        a.read_exact(&mut b).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52").unwrap(), 52);
        assert_eq!(parse_connect(b"CONNECT 4294967295").unwrap(), u32::MAX);
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT -1",
            b"connect 5",
            b"CONNECT 4294967296",
            b"",
        ] {
            assert!(
                matches!(parse_connect(bad), Err(HostError::BadLine(_))),
                "{bad:?}"
            );
        }
        assert_eq!(ok_line(1024), "OK 1024\n");
        assert_eq!(
            guest_target(Path::new("/run/v.sock"), 52),
            PathBuf::from("/run/v.sock_52")
        );
    }

    #[test]
    fn the_line_is_read_without_taking_the_data_behind_it() {
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut p = PendingHost::new(b);
        a.write_all(b"CONN").unwrap();
        assert_eq!(p.poll_line().unwrap(), None);
        a.write_all(b"ECT 7\nhello").unwrap();
        assert_eq!(p.poll_line().unwrap(), Some(7));
        let mut rest = [0u8; 5];
        p.stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello");
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut p = PendingHost::new(b);
        a.write_all(&[b'x'; 40]).unwrap();
        assert!(matches!(p.poll_line(), Err(HostError::LongLine(33))));
    }
}
