//! `/dev/xen/xenbus`: XenStore requests from dom0 userspace, one message
//! at a time (a header, then its payload).

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

use super::{fd_handle, invalid_input, FdIo};
use crate::xenbus::{XsdSockmsg, XENSTORE_PAYLOAD_MAX, XS_DIRECTORY, XS_ERROR, XS_READ};

/// An open xenbus device.
#[derive(Debug)]
pub struct Xenbus(OwnedFd);

fd_handle!(Xenbus, "/dev/xen/xenbus");

impl Xenbus {
    /// `XS_READ`: the value of `path`. `NotFound` when the node does not exist.
    pub fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        self.request(XS_READ, path)
    }

    /// `XS_DIRECTORY`: the names of `path`'s children.
    pub fn directory(&self, path: &str) -> io::Result<Vec<String>> {
        let body = self.request(XS_DIRECTORY, path)?;
        Ok(body
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect())
    }

    fn request(&self, type_: u32, path: &str) -> io::Result<Vec<u8>> {
        let mut payload = path.as_bytes().to_vec();
        payload.push(0);
        if payload.len() > XENSTORE_PAYLOAD_MAX || path.contains('\0') {
            return Err(invalid_input(format!("xenstore path {path:?}")));
        }
        let hdr = XsdSockmsg {
            type_,
            req_id: 1,
            tx_id: 0,
            len: payload.len() as u32,
        };
        let mut msg = hdr.to_bytes().to_vec();
        msg.extend_from_slice(&payload);
        let mut f = &FdIo(&self.0);
        // The device takes a whole message per write and answers per read.
        f.write_all(&msg)?;
        let mut h = [0u8; 16];
        f.read_exact(&mut h)?;
        let reply = XsdSockmsg::from_bytes(h);
        if reply.len as usize > XENSTORE_PAYLOAD_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("xenstore answer of {} bytes", reply.len),
            ));
        }
        let mut body = vec![0u8; reply.len as usize];
        f.read_exact(&mut body)?;
        if reply.type_ == XS_ERROR {
            let name =
                String::from_utf8_lossy(body.split(|b| *b == 0).next().unwrap_or(&[])).into_owned();
            let kind = if name == "ENOENT" {
                io::ErrorKind::NotFound
            } else {
                io::ErrorKind::Other
            };
            return Err(io::Error::new(kind, format!("xenstore {path}: {name}")));
        }
        Ok(body)
    }
}
