//! Owned file descriptors of the Xen devices, with one safe method per ioctl.

mod evtchn;
mod gntalloc;
mod gntdev;
mod privcmd;
mod xenbus;

pub use evtchn::Evtchn;
pub use gntalloc::Gntalloc;
pub use gntdev::Gntdev;
pub use privcmd::Privcmd;
pub use xenbus::Xenbus;

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens a device read-write and close-on-exec (the fd must not leak into
/// children, which could keep grants and foreign mappings alive).
fn open_device(path: &Path) -> io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    Ok(file.into())
}

/// Issues ioctl `request` with argument `arg`, keeping errno on failure.
///
/// # Safety
///
/// `arg` must point to the argument type `request` expects, valid for the
/// kernel to read and write for the call, and every pointer inside it must be
/// valid for what that ioctl does with it.
unsafe fn ioctl<T>(fd: BorrowedFd<'_>, request: u32, arg: *mut T) -> io::Result<libc::c_int> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is open for the borrow; the caller vouches for `arg`.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `Read`/`Write` over a handle's fd without owning it: no `dup` per call
/// (the frontend reads XenStore and its event channels in its loop).
struct FdIo<'a>(&'a OwnedFd);

impl io::Read for &FdIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes for the call.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl io::Write for &FdIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        // SAFETY: `buf` is valid for `buf.len()` bytes of reads for the call.
        let n = unsafe { libc::write(self.0.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An `InvalidInput` error naming the offending value.
fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// `AsFd`, `AsRawFd`, `From<OwnedFd>`, `From<Self> for OwnedFd`, `from_fd` for a
/// device handle that is a newtype around `OwnedFd`.
macro_rules! fd_handle {
    ($ty:ident, $path:literal) => {
        impl $ty {
            /// Where the device lives in a Xen dom0.
            pub const PATH: &'static str = $path;

            /// Opens the device at [`Self::PATH`] (read-write, close-on-exec).
            /// `NotFound` when not running on Xen or the driver is not loaded.
            pub fn open() -> std::io::Result<Self> {
                Self::open_path(std::path::Path::new(Self::PATH))
            }

            /// Opens the device at another path (a container, a test).
            pub fn open_path(path: &std::path::Path) -> std::io::Result<Self> {
                super::open_device(path).map(Self)
            }

            /// Adopts a descriptor received from elsewhere, typically the
            /// vhost-user frontend; it is not checked to be this device.
            pub fn from_fd(fd: std::os::fd::OwnedFd) -> Self {
                Self(fd)
            }
        }

        impl std::os::fd::AsFd for $ty {
            fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
                self.0.as_fd()
            }
        }

        impl std::os::fd::AsRawFd for $ty {
            fn as_raw_fd(&self) -> std::os::fd::RawFd {
                self.0.as_raw_fd()
            }
        }

        impl From<std::os::fd::OwnedFd> for $ty {
            fn from(fd: std::os::fd::OwnedFd) -> Self {
                Self(fd)
            }
        }

        impl From<$ty> for std::os::fd::OwnedFd {
            fn from(dev: $ty) -> Self {
                dev.0
            }
        }
    };
}
use fd_handle;

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn dev_null() -> OwnedFd {
        File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn open_missing_device_is_not_found() {
        let missing =
            std::env::temp_dir().join(format!("xen-sys-no-such-dev-{}", std::process::id()));
        assert_eq!(
            Gntdev::open_path(&missing).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        if !Path::new(Privcmd::PATH).exists() {
            assert_eq!(Privcmd::open().unwrap_err().kind(), io::ErrorKind::NotFound);
        }
    }

    #[test]
    fn open_sets_close_on_exec() {
        use std::os::fd::AsRawFd;
        let dev = Gntalloc::open_path(Path::new("/dev/null")).unwrap();
        // SAFETY: F_GETFD on an fd we own reads its flags and changes nothing.
        let flags = unsafe { libc::fcntl(dev.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }

    #[test]
    fn mmap_batch_rejects_mismatched_lengths_before_the_kernel() {
        let err = Privcmd::from_fd(dev_null())
            .mmap_batch_v2(1, 0, &[1, 2, 3], &mut [0; 2])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("3 frames but 2"), "{err}");
    }

    #[test]
    fn errno_is_preserved() {
        // /dev/null knows no Xen ioctl: the kernel's ENOTTY must come back.
        let gntdev = Gntdev::from_fd(dev_null());
        let err = gntdev.unmap_grant_ref(0, 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
        let err = gntdev.map_grant_refs(&[(0, 8)]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
        let err = Privcmd::from_fd(dev_null())
            .mmap_batch_v2(0, 0, &[1], &mut [0])
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
        let gntalloc = Gntalloc::from_fd(dev_null());
        assert_eq!(
            gntalloc.alloc_gref(0, 1, true).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
    }

    #[test]
    fn fd_round_trips() {
        use std::os::fd::AsRawFd;
        let fd = dev_null();
        let raw = fd.as_raw_fd();
        let dev = Privcmd::from(fd);
        assert_eq!(dev.as_raw_fd(), raw);
        assert_eq!(OwnedFd::from(dev).as_raw_fd(), raw);
    }
}
