//! UNIX regions: `mmap` of the memfd or file the frontend sent, at its offset.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use super::{BackendError, HostMapping, Release};

/// What the length check needs to know of a file: whether it is a regular file (or memfd),
/// and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileLen {
    is_file: bool,
    len: u64,
    /// Device and inode: the same file behind different descriptors (a frontend sends one fd
    /// per region, even for regions of one memfd).
    pub(crate) id: (u64, u64),
}

impl FileLen {
    /// One `fstat` of `f`.
    pub(crate) fn of(f: &File) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = f.metadata()?;
        Ok(FileLen {
            is_file: meta.is_file(),
            len: meta.len(),
            id: (meta.dev(), meta.ino()),
        })
    }

    /// Whether the regions of this file may share one mapping (a regular file or memfd).
    pub(crate) fn shareable(&self) -> bool {
        self.is_file
    }
}

/// Maps `size` bytes of `file` from `offset` (any alignment), or anonymous zeroed memory when
/// `file` is `None` (tests and demos). `known` is the file's length when the caller looked it
/// up already (one lookup per file for a table of many regions of one file); otherwise it is
/// looked up here.
pub(crate) fn map_unix(
    gpa: u64,
    size: u64,
    file: Option<&File>,
    offset: u64,
    known: Option<FileLen>,
) -> Result<HostMapping, BackendError> {
    let err = |source| BackendError::UnixMmap {
        gpa,
        size,
        offset,
        source,
    };
    if let Some(f) = file {
        let len = match known {
            Some(len) => len,
            None => FileLen::of(f).map_err(err)?,
        };
        check_file_len(len, gpa, size, offset)?;
    }
    let host_page = host_page_size();
    let in_page = (offset % host_page) as usize;
    let aligned = offset - in_page as u64;
    let len = usize::try_from(size)
        .ok()
        .and_then(|s| s.checked_add(in_page))
        .ok_or_else(|| err(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
    let off = libc::off_t::try_from(aligned)
        .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
    let (fd, flags) = match file {
        Some(f) => (f.as_raw_fd(), libc::MAP_SHARED),
        None => (
            -1,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        ),
    };
    // SAFETY: a fresh mapping at a kernel-chosen address; checked for MAP_FAILED below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            if file.is_some() { off } else { 0 },
        )
    };
    if p == libc::MAP_FAILED {
        return Err(err(std::io::Error::last_os_error()));
    }
    let base = NonNull::new(p.cast::<u8>())
        .ok_or_else(|| err(std::io::Error::from_raw_os_error(libc::EFAULT)))?;
    Ok(HostMapping {
        base,
        offset: if file.is_some() { in_page } else { 0 },
        release: Release::Munmap { len },
    })
}

/// Refuses a region that ends past the end of a regular file or memfd (devices such as
/// hugetlbfs or DAX report no useful length and are left to the kernel).
pub(crate) fn check_file_len(
    f: FileLen,
    gpa: u64,
    size: u64,
    offset: u64,
) -> Result<(), BackendError> {
    let end = offset.checked_add(size);
    if f.is_file && end.is_none_or(|e| e > f.len) {
        return Err(BackendError::UnixBeyondFile {
            gpa,
            size,
            offset,
            file_len: f.len,
        });
    }
    Ok(())
}

pub(crate) fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}
