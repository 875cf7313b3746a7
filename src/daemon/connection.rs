//! One frontend connection: vhost's `BackendReqHandler` parses and dispatches each message;
//! this loop tells a refused message from a broken socket, keeps serving after the former,
//! and makes sure a refused message is answered.
//!
//! vhost 0.18 answers most refusals itself (a REPLY_ACK of 1), but not all: a message whose
//! body fails its size check, a request code it does not know, or file descriptors on a
//! message that takes none return `Err` with no reply, and the last two leave the body
//! unread in the socket. A frontend waiting for that reply would hang, and the next header
//! would be read from the middle of a body. So before each message the loop peeks at its
//! header (one `recvmsg(MSG_PEEK)`, control path only), and after a refusal it drains what
//! vhost left unread and sends the reply vhost did not: a REPLY_ACK of 1 for a message that
//! asked for one, an empty reply (size 0, which frontends reject) for a `GET_*`.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag, MAX_MSG_SIZE};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use super::device::VhostUserDevice;
use super::handler::Handler;
use super::layout::{recv_fds, recv_with_fds, MAX_FDS};

/// How a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The frontend closed the socket.
    Closed,
    /// The socket broke or the stream could not be followed any more.
    Broken(String),
}

/// A message header as it is on the wire (vhost keeps its own header type private).
#[derive(Clone, Copy, Debug)]
struct Header {
    code: u32,
    flags: u32,
    size: u32,
}

impl Header {
    fn parse(b: &[u8; HDR]) -> Self {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            code: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    /// vhost's own header check: a known request, version 1, no reserved flag, a body
    /// within the protocol maximum. vhost reads only the header of a message failing it.
    fn is_valid(&self) -> bool {
        FrontendReq::try_from(self.code).is_ok()
            && self.flags & 0x3 == 0x1
            && self.flags & !0xf == 0
            && self.size as usize <= MAX_MSG_SIZE
    }

    fn need_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }
}

/// What the loop learnt from peeking at a message before vhost reads it.
struct Peeked {
    hdr: Header,
    /// File descriptors attached (peeking duplicates them; the duplicates are closed).
    fds: usize,
    /// More descriptors than the peek could hold were attached (`MSG_CTRUNC`).
    fds_truncated: bool,
    /// Bytes of header and body already in the socket.
    available: usize,
}

/// Bytes of a message header.
const HDR: usize = 12;

/// Messages vhost accepts file descriptors with (`check_attached_files`).
fn takes_fds(code: u32) -> bool {
    [
        FrontendReq::SET_MEM_TABLE,
        FrontendReq::SET_VRING_CALL,
        FrontendReq::SET_VRING_KICK,
        FrontendReq::SET_VRING_ERR,
        FrontendReq::SET_LOG_BASE,
        FrontendReq::SET_LOG_FD,
        FrontendReq::SET_BACKEND_REQ_FD,
        FrontendReq::SET_INFLIGHT_FD,
        FrontendReq::ADD_MEM_REG,
        FrontendReq::REM_MEM_REG,
        FrontendReq::SET_DEVICE_STATE_FD,
        FrontendReq::GPU_SET_SOCKET,
    ]
    .iter()
    .any(|&r| r as u32 == code)
}

/// Messages answered with a message of their own rather than a REPLY_ACK.
fn has_reply(code: u32) -> bool {
    [
        FrontendReq::GET_FEATURES,
        FrontendReq::GET_PROTOCOL_FEATURES,
        FrontendReq::GET_VRING_BASE,
        FrontendReq::GET_QUEUE_NUM,
        FrontendReq::GET_CONFIG,
        FrontendReq::GET_MAX_MEM_SLOTS,
        FrontendReq::GET_INFLIGHT_FD,
        FrontendReq::GET_SHARED_OBJECT,
        FrontendReq::GET_SHMEM_CONFIG,
        FrontendReq::SET_LOG_BASE,
        FrontendReq::SET_DEVICE_STATE_FD,
        FrontendReq::CHECK_DEVICE_STATE,
    ]
    .iter()
    .any(|&r| r as u32 == code)
}

fn is_connection_error(e: &VhostError) -> bool {
    matches!(
        e,
        VhostError::Disconnected
            | VhostError::PartialMessage
            | VhostError::SocketBroken(_)
            | VhostError::SocketError(_)
            | VhostError::InvalidSocketFd(_)
            | VhostError::NotUnixSocket
            | VhostError::NotStreamSocket
    )
}

/// Peeks at the next message: waits for a whole header, then looks (without waiting) at how
/// much of the body is there. `None` when the frontend closed the socket.
fn peek(sock: &UnixStream) -> std::io::Result<Option<Peeked>> {
    let mut buf = vec![0u8; HDR + MAX_MSG_SIZE];
    // A peek duplicates the attached descriptors; they are counted and closed on drop.
    let mut fds = Vec::new();
    let peek = libc::MSG_PEEK;
    let (n, fds_truncated) = recv_fds(sock, &mut buf[..HDR], peek | libc::MSG_WAITALL, &mut fds)?;
    if n < HDR {
        // End of stream (a partial header only comes before the end).
        return Ok(None);
    }
    let mut head = [0u8; HDR];
    head.copy_from_slice(&buf[..HDR]);
    let hdr = Header::parse(&head);
    let size = (hdr.size as usize).min(MAX_MSG_SIZE);
    // Now the whole message, without waiting for a body that may never come.
    let available = if size == 0 {
        HDR
    } else {
        fds.clear();
        match recv_with_fds(
            sock,
            &mut buf[..HDR + size],
            peek | libc::MSG_DONTWAIT,
            &mut fds,
        ) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => HDR,
            Err(e) => return Err(e),
        }
    };
    Ok(Some(Peeked {
        hdr,
        fds: fds.len(),
        fds_truncated,
        available,
    }))
}

/// Reads and drops up to `len` bytes that are already in the socket.
fn drain(sock: &UnixStream, len: usize) {
    let mut buf = vec![0u8; len];
    // SAFETY: buf is a live buffer of len bytes.
    let _ = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            len,
            libc::MSG_DONTWAIT,
        )
    };
}

/// Sends the reply vhost did not: `body` is a REPLY_ACK value, or `None` for an empty reply.
fn reply(sock: &UnixStream, code: u32, body: Option<u64>) {
    let size = if body.is_some() { 8u32 } else { 0 };
    let flags = 0x1 | VhostUserHeaderFlag::REPLY.bits();
    let mut msg = Vec::with_capacity(HDR + 8);
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&size.to_le_bytes());
    if let Some(v) = body {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    if let Err(e) = std::io::Write::write_all(&mut &*sock, &msg) {
        log::warn!("cannot answer request {code}: {e}");
    }
}

/// Serves one frontend until it goes away. `require_xen_mmap`: the stream reaches vhost without
/// the layout adapter, so a frontend that does not ack XEN_MMAP cannot be followed.
pub(crate) fn serve_connection<D: VhostUserDevice>(
    stream: UnixStream,
    handler: Arc<Mutex<Handler<D>>>,
    require_xen_mmap: bool,
) -> ConnectionEnd {
    let peek_sock = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => return ConnectionEnd::Broken(format!("cannot clone the socket: {e}")),
    };
    let mut req = BackendReqHandler::from_stream(stream, handler.clone());
    loop {
        let p = match peek(&peek_sock) {
            Ok(Some(p)) => p,
            Ok(None) => return ConnectionEnd::Closed,
            Err(e) => return ConnectionEnd::Broken(e.to_string()),
        };
        let code = p.hdr.code;
        // vhost consumes only the header (and fds) of a message it refuses this early.
        let header_ok = p.hdr.is_valid();
        let fds_ok = p.fds == 0 || takes_fds(code);
        let size = p.hdr.size as usize;
        let body_complete = p.available == HDR + size;
        if p.fds > MAX_FDS || p.fds_truncated {
            // More descriptors than vhost takes: its read would fail (ENOBUFS) after taking the
            // header, and the stream could not be followed. Without the layout relay (which
            // drops them itself) the loop takes the message out and refuses it here.
            log::warn!("request {code}: {} or more file descriptors refused", p.fds);
            let mut fds = Vec::new();
            let mut buf = vec![0u8; p.available];
            if let Err(e) = recv_fds(&peek_sock, &mut buf, libc::MSG_DONTWAIT, &mut fds) {
                return ConnectionEnd::Broken(e.to_string());
            }
            drop(fds);
            let reply_ack = handler
                .lock()
                .map(|h| h.reply_ack_enabled())
                .unwrap_or(false);
            if has_reply(code) {
                reply(&peek_sock, code, None);
            } else if p.hdr.need_reply() && reply_ack {
                reply(&peek_sock, code, Some(1));
            }
            continue;
        }
        if let Ok(mut h) = handler.lock() {
            h.trace = Default::default();
        }
        let err = match req.handle_request() {
            Ok(()) => continue,
            Err(e) if is_connection_error(&e) => return ConnectionEnd::Broken(e.to_string()),
            Err(e) => e,
        };
        log::warn!("request {code} refused: {err}");
        if !header_ok {
            if size > MAX_MSG_SIZE {
                return ConnectionEnd::Broken(format!(
                    "request {code}: body of {size} bytes exceeds the protocol maximum"
                ));
            }
            drain(&peek_sock, size);
        } else if !fds_ok {
            drain(&peek_sock, size);
        }
        let Ok(h) = handler.lock() else {
            return ConnectionEnd::Broken("handler lock poisoned".into());
        };
        if require_xen_mmap
            && code == FrontendReq::SET_PROTOCOL_FEATURES as u32
            && !h.xen_mmap_acked()
        {
            return ConnectionEnd::Broken(
                "the frontend did not ack XEN_MMAP and the layout adapter is off".into(),
            );
        }
        if has_reply(code) {
            reply(&peek_sock, code, None);
            continue;
        }
        let vhost_acked = h.trace.handled
            || (code == FrontendReq::SET_MEM_TABLE as u32 && header_ok && fds_ok && body_complete);
        if p.hdr.need_reply() && h.reply_ack_enabled() && !vhost_acked {
            reply(&peek_sock, code, Some(1));
        }
    }
}
