//! Guest buffers as `iovec`s, so a device moves a whole chain's data between a file and
//! guest memory in one `preadv`/`pwritev`/`readv` instead of a copy per segment.

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use crate::request::RequestMemory;

/// Most segments one system call takes (Linux's `IOV_MAX`).
pub(crate) const IOV_MAX: usize = 1024;

/// The host `iovec`s of guest ranges, valid while the scope they come from lives.
///
/// The slices come from `get_slices` on the request scope, which keeps every mapping and
/// bounce buffer alive until it ends; the scope outlives this value (the `'s` borrow).
#[derive(Debug, Default)]
pub(crate) struct GuestIov<'s> {
    iovs: Vec<libc::iovec>,
    len: usize,
    _scope: std::marker::PhantomData<&'s ()>,
}

impl<'s> GuestIov<'s> {
    /// Adds `len` bytes at `addr`, accessed with `access`.
    pub(crate) fn push(
        &mut self,
        mem: &'s RequestMemory<'_>,
        addr: GuestAddress,
        len: usize,
        access: Permissions,
    ) -> Result<(), GuestMemoryError> {
        for s in mem.get_slices(addr, len, access)? {
            let s = s?;
            let ptr = if access.has_write() {
                s.ptr_guard_mut().as_ptr()
            } else {
                s.ptr_guard().as_ptr().cast_mut()
            };
            self.iovs.push(libc::iovec {
                iov_base: ptr.cast(),
                iov_len: s.len(),
            });
            self.len += s.len();
        }
        Ok(())
    }

    /// Total bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The iovecs, in order.
    pub(crate) fn as_slice(&self) -> &[libc::iovec] {
        &self.iovs
    }
}
