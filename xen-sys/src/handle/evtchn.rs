//! `/dev/xen/evtchn`: interdomain event channels. Each bound port fires by
//! becoming readable on the fd (`pending`), stays masked until written back
//! (`unmask`), and signals the other end with `notify`.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use super::{fd_handle, ioctl, FdIo};
use crate::evtchn::{IoctlEvtchnBindInterdomain, IoctlEvtchnNotify, IoctlEvtchnUnbind};
use crate::ioctl::{IOCTL_EVTCHN_BIND_INTERDOMAIN, IOCTL_EVTCHN_NOTIFY, IOCTL_EVTCHN_UNBIND};

/// An open evtchn device.
#[derive(Debug)]
pub struct Evtchn(OwnedFd);

fd_handle!(Evtchn, "/dev/xen/evtchn");

impl Evtchn {
    /// `IOCTL_EVTCHN_BIND_INTERDOMAIN`: binds a new local port to
    /// `remote_port` of `remote_domain` and returns it. Linux sets the new
    /// port pending once (events lost while unbound), so expect one event.
    pub fn bind_interdomain(&self, remote_domain: u32, remote_port: u32) -> io::Result<u32> {
        let mut arg = IoctlEvtchnBindInterdomain {
            remote_domain,
            remote_port,
        };
        // SAFETY: `arg` is the struct this request takes, with no pointers.
        let port = unsafe { ioctl(self.as_fd(), IOCTL_EVTCHN_BIND_INTERDOMAIN, &mut arg) }?;
        Ok(port as u32)
    }

    /// `IOCTL_EVTCHN_UNBIND`: releases a local port bound through this fd.
    pub fn unbind(&self, port: u32) -> io::Result<()> {
        let mut arg = IoctlEvtchnUnbind { port };
        // SAFETY: `arg` is the struct this request takes, with no pointers.
        unsafe { ioctl(self.as_fd(), IOCTL_EVTCHN_UNBIND, &mut arg) }.map(drop)
    }

    /// `IOCTL_EVTCHN_NOTIFY`: signals the remote end of local `port`.
    pub fn notify(&self, port: u32) -> io::Result<()> {
        let mut arg = IoctlEvtchnNotify { port };
        // SAFETY: `arg` is the struct this request takes, with no pointers.
        unsafe { ioctl(self.as_fd(), IOCTL_EVTCHN_NOTIFY, &mut arg) }.map(drop)
    }

    /// Reads the ports that fired into `ports` (each now masked) and returns
    /// how many; blocks unless the fd is non-blocking or readable.
    pub fn pending(&self, ports: &mut [u32]) -> io::Result<usize> {
        let mut buf = vec![0u8; ports.len() * 4];
        let n = (&FdIo(&self.0)).read(&mut buf)?;
        for (p, c) in ports.iter_mut().zip(buf[..n].chunks_exact(4)) {
            *p = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(n / 4)
    }

    /// Unmasks `port` so that it can fire again.
    pub fn unmask(&self, port: u32) -> io::Result<()> {
        (&FdIo(&self.0)).write_all(&port.to_ne_bytes())
    }
}
