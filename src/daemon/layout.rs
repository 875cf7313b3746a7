//! The wire layout of memory regions, decided per connection.
//!
//! vhost 0.18 fixes the layout at build time: its `xen` build parses every region in the
//! 40-byte `XEN_MMAP` layout (flags and domid after the standard 32 bytes) and refuses a
//! frontend that does not ack `XEN_MMAP`. We always build it that way and put this adapter
//! between the frontend's socket and vhost's handler: a frontend that acks `XEN_MMAP` is passed
//! through untouched; for one that does not (stock QEMU, cloud-hypervisor, any KVM-style
//! frontend), `SET_PROTOCOL_FEATURES` reaches vhost with `XEN_MMAP` added, and each region of
//! `SET_MEM_TABLE`, `ADD_MEM_REG` and `REM_MEM_REG` is widened from 32 to 40 bytes with flags
//! 0 and domid 0: UNIX regions. Until `SET_PROTOCOL_FEATURES` settles it, the layout is the
//! standard one.
//!
//! Control path only: every message is read whole (file descriptors included, passed on
//! untouched) and written on; kicks and calls are eventfds the worker uses directly, so the
//! data path never crosses the adapter.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::threads::{Sandbox, SandboxError, ThreadKind};

use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures, MAX_MSG_SIZE};

/// Bytes of a message header.
const HDR: usize = 12;
/// A standard region and a Xen one.
const STD_REGION: usize = 32;
const XEN_REGION: usize = 40;
/// vhost accepts at most this many file descriptors per message.
pub(super) const MAX_FDS: usize = 32;

/// One message as read from a socket.
struct Message {
    hdr: [u8; HDR],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn code(&self) -> u32 {
        u32::from_le_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]])
    }

    fn size(&self) -> usize {
        u32::from_le_bytes([self.hdr[8], self.hdr[9], self.hdr[10], self.hdr[11]]) as usize
    }

    fn set_size(&mut self, size: usize) {
        self.hdr[8..12].copy_from_slice(&(size as u32).to_le_bytes());
    }
}

/// Which way region messages are rewritten for a connection that does not ack XEN_MMAP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rewrite {
    /// Daemon side: standard regions from the frontend become Xen ones for vhost's parser,
    /// and vhost sees XEN_MMAP acked.
    Widen,
    /// Frontend side (the test kit's driver on vhost's `Frontend`, which always writes the
    /// Xen layout): Xen regions become standard ones for a daemon that did not offer
    /// XEN_MMAP, such as a stock vhost-user-backend daemon. Only the test kit uses it.
    #[cfg_attr(not(feature = "test-utils"), allow(dead_code))]
    Narrow,
}

/// Starts the adapter for one connection: returns the socket to give vhost's handler and the
/// two relay threads (frontend to daemon, daemon to frontend), which end with the connection.
pub(crate) fn adapt(
    frontend: UnixStream,
    sandbox: &Arc<Sandbox>,
) -> io::Result<(UnixStream, [Relay; 2])> {
    relay(frontend, Rewrite::Widen, sandbox)
}

/// A relay thread (it ends with the connection).
pub(crate) type Relay = JoinHandle<Result<(), SandboxError>>;

/// Relays between `outer` (the peer's socket) and the returned socket, rewriting region
/// messages that travel towards the daemon as `rewrite` says.
pub(crate) fn relay(
    outer: UnixStream,
    rewrite: Rewrite,
    sandbox: &Arc<Sandbox>,
) -> io::Result<(UnixStream, [Relay; 2])> {
    let frontend = outer;
    let (ours, theirs) = UnixStream::pair()?;
    // Towards the daemon: from `frontend` to `ours` (Widen), or from `ours` to `frontend`
    // (Narrow: the socket handed out is the frontend's side).
    let ((down_in, down_out), (up_in, up_out)) = match rewrite {
        Rewrite::Widen => ((frontend.try_clone()?, ours.try_clone()?), (ours, frontend)),
        Rewrite::Narrow => ((ours.try_clone()?, frontend.try_clone()?), (frontend, ours)),
    };
    let to_daemon = sandbox
        .spawn(ThreadKind::Relay, "vu-layout-in".into(), move || {
            if let Err(e) = relay_to_daemon(&down_in, &down_out, rewrite) {
                log::debug!("frontend to daemon: {e}");
            }
            let _ = down_out.shutdown(std::net::Shutdown::Write);
        })
        .map_err(io::Error::other)?;
    let to_frontend = sandbox
        .spawn(ThreadKind::Relay, "vu-layout-out".into(), move || {
            while let Ok(Some(m)) = recv_message(&up_in) {
                if send_message(&up_out, &m).is_err() {
                    break;
                }
            }
            let _ = up_out.shutdown(std::net::Shutdown::Both);
        })
        .map_err(io::Error::other)?;
    Ok((theirs, [to_daemon, to_frontend]))
}

fn relay_to_daemon(frontend: &UnixStream, daemon: &UnixStream, rewrite: Rewrite) -> io::Result<()> {
    let mut xen_layout = false;
    while let Some(mut m) = recv_message(frontend)? {
        let code = m.code();
        if code == FrontendReq::SET_PROTOCOL_FEATURES as u32 && m.body.len() == 8 {
            let mut v = [0u8; 8];
            v.copy_from_slice(&m.body);
            let acked = u64::from_le_bytes(v);
            let bit = VhostUserProtocolFeatures::XEN_MMAP.bits();
            xen_layout = acked & bit != 0;
            if rewrite == Rewrite::Widen {
                m.body.copy_from_slice(&(acked | bit).to_le_bytes());
            }
        } else if !xen_layout {
            match rewrite {
                Rewrite::Widen => widen(&mut m),
                Rewrite::Narrow => narrow(&mut m),
            }
        }
        let oversized = m.size() > MAX_MSG_SIZE;
        send_message(daemon, &m)?;
        if oversized {
            // The daemon cannot follow this stream any more; it ends the connection.
            return Ok(());
        }
    }
    Ok(())
}

/// The region prefix and count of a region message, or `None` for other messages.
fn regions_of(m: &Message) -> Option<(usize, usize)> {
    let code = m.code();
    if code == FrontendReq::SET_MEM_TABLE as u32 {
        let n = m.body.get(0..4)?;
        Some((8, u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize))
    } else if code == FrontendReq::ADD_MEM_REG as u32 || code == FrontendReq::REM_MEM_REG as u32 {
        Some((8, 1))
    } else {
        None
    }
}

/// Narrows the regions of a Xen-layout region message to the standard layout (dropping
/// flags and domid, zero for the memory such a connection sends).
fn narrow(m: &mut Message) {
    let Some((prefix, count)) = regions_of(m) else {
        return;
    };
    if m.body.len() != prefix + count * XEN_REGION {
        return;
    }
    let mut body = Vec::with_capacity(prefix + count * STD_REGION);
    body.extend_from_slice(&m.body[..prefix]);
    for r in m.body[prefix..].chunks_exact(XEN_REGION) {
        body.extend_from_slice(&r[..STD_REGION]);
    }
    m.set_size(body.len());
    m.body = body;
}

/// Widens the regions of a standard-layout region message to the Xen layout (flags and
/// domid 0). A body of the wrong size is left alone for vhost to refuse.
fn widen(m: &mut Message) {
    let code = m.code();
    let (prefix, count) = if code == FrontendReq::SET_MEM_TABLE as u32 {
        let Some(n) = m.body.get(0..4) else { return };
        let n = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
        (8, n)
    } else if code == FrontendReq::ADD_MEM_REG as u32 || code == FrontendReq::REM_MEM_REG as u32 {
        (8, 1)
    } else {
        return;
    };
    let Some(want) = count
        .checked_mul(STD_REGION)
        .and_then(|r| r.checked_add(prefix))
    else {
        return;
    };
    if m.body.len() != want || m.size() != want || prefix + count * XEN_REGION > MAX_MSG_SIZE {
        return;
    }
    let mut body = Vec::with_capacity(prefix + count * XEN_REGION);
    body.extend_from_slice(&m.body[..prefix]);
    for r in m.body[prefix..].chunks_exact(STD_REGION) {
        body.extend_from_slice(r);
        body.extend_from_slice(&[0u8; XEN_REGION - STD_REGION]);
    }
    m.set_size(body.len());
    m.body = body;
}

/// Reads one whole message: the header (waiting for all of it) with any file descriptors, then
/// exactly `size` bytes of body, however many reads they arrive in (one in the common case,
/// as vhost would do; a stream socket may deliver a body in parts, and vhost's own single
/// read would then refuse it and take its rest for the next header). `None` at the end of
/// the stream, also in the middle of a message (nothing can follow it).
///
/// A message carrying more descriptors than vhost takes ([`MAX_FDS`]), or more than the
/// control buffer holds (the kernel closes those and sets `MSG_CTRUNC`), has all of them
/// closed here and goes on without any: vhost then refuses it like any message whose
/// descriptors do not match its body (a REPLY_ACK of 1), and the connection serves on.
fn recv_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; HDR];
    let mut fds = Vec::new();
    let (n, mut truncated) = recv_fds(sock, &mut hdr, libc::MSG_WAITALL, &mut fds)?;
    if n < HDR {
        return Ok(None);
    }
    let mut m = Message {
        hdr,
        body: Vec::new(),
        fds,
    };
    let size = m.size();
    if size > 0 && size <= MAX_MSG_SIZE {
        let mut body = vec![0u8; size];
        let mut got = 0;
        while got < size {
            let (n, t) = recv_fds(sock, &mut body[got..], 0, &mut m.fds)?;
            truncated |= t;
            if n == 0 {
                return Ok(None);
            }
            got += n;
        }
        m.body = body;
    }
    if truncated || m.fds.len() > MAX_FDS {
        log::warn!(
            "request {}: {} file descriptors{}, more than the {MAX_FDS} a message may carry; \
             passed on without any",
            m.code(),
            m.fds.len(),
            if truncated {
                " and more the kernel dropped"
            } else {
                ""
            },
        );
        m.fds.clear();
    }
    Ok(Some(m))
}

/// One `recvmsg` into `buf`, collecting any file descriptors into `fds` (owned, so a peek's
/// duplicates close when dropped); retried on EINTR.
pub(super) fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    flags: libc::c_int,
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    recv_fds(sock, buf, flags, fds).map(|(n, _)| n)
}

/// [`recv_with_fds`], also telling whether the kernel dropped descriptors that did not fit
/// the control buffer (`MSG_CTRUNC`).
pub(super) fn recv_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    flags: libc::c_int,
    fds: &mut Vec<OwnedFd>,
) -> io::Result<(usize, bool)> {
    // Room for MAX_FDS descriptors (CMSG_SPACE of 32 ints, rounded up).
    let mut cmsg = [0u64; 3 + MAX_FDS / 2];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; all-zero is a valid empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
        // SAFETY: the iovec and control buffer point into live buffers of the given sizes.
        let n =
            unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: msg was filled by recvmsg; the CMSG_* macros stay within msg_controllen,
        // and each SCM_RIGHTS entry is a descriptor now owned by this process.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        return Ok((n as usize, msg.msg_flags & libc::MSG_CTRUNC != 0));
    }
}

/// Writes one message (header and body in one `sendmsg`, descriptors attached).
fn send_message(sock: &UnixStream, m: &Message) -> io::Result<()> {
    let iov = [IoSlice::new(&m.hdr), IoSlice::new(&m.body)];
    let raw: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut cmsg = [0u64; 3 + MAX_FDS / 2];
    // SAFETY: msghdr is plain data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len() as _;
    if !raw.is_empty() {
        let bytes = std::mem::size_of_val(raw.as_slice());
        // SAFETY: the control buffer holds CMSG_SPACE of up to MAX_FDS descriptors (checked
        // below); the header and data are written inside it.
        unsafe {
            let space = libc::CMSG_SPACE(bytes as u32) as usize;
            if raw.len() > MAX_FDS || space > std::mem::size_of_val(&cmsg) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                raw.len(),
            );
        }
    }
    let total = HDR + m.body.len();
    // SAFETY: msg points at live buffers (iov, cmsg) for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < total {
        // A stream socket sends part only when its buffer is full; the rest follows (the
        // descriptors went with the first byte).
        let all = [&m.hdr[..], &m.body[..]].concat();
        io::Write::write_all(&mut &*sock, &all[n..])?;
    }
    Ok(())
}
