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

/// An aligned heap buffer for O_DIRECT, standing in for guest memory that is not aligned:
/// filled from the guest before a write, emptied into it after a read.
#[derive(Debug)]
pub(crate) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
    iov: [libc::iovec; 1],
}

// SAFETY: the buffer owns its allocation alone (its iovec points into that allocation),
// and the global allocator frees it from any thread: a held request's bounce may complete on
// another thread than the one that filled it.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` bytes aligned to `align` (a power of two); `None` for a zero length, a bad
    /// alignment or no memory.
    pub(crate) fn new(len: usize, align: usize) -> Option<Self> {
        let layout = std::alloc::Layout::from_size_align(len, align).ok()?;
        if len == 0 {
            return None;
        }
        // SAFETY: the layout has a nonzero size.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(AlignedBuf {
            ptr,
            layout,
            iov: [libc::iovec {
                iov_base: ptr.as_ptr().cast(),
                iov_len: len,
            }],
        })
    }

    /// The buffer as one iovec.
    pub(crate) fn iov(&self) -> &[libc::iovec] {
        &self.iov
    }

    /// Copies the guest's bytes in (before a write).
    pub(crate) fn fill_from(&mut self, guest: &GuestIov<'_>) {
        let mut at = 0usize;
        for v in guest.as_slice() {
            let n = v.iov_len.min(self.layout.size() - at);
            // SAFETY: `v` points at `iov_len` bytes of guest memory the scope keeps alive
            // (see `GuestIov`); `at + n` stays inside our allocation.
            let src = unsafe { vm_memory::VolatileSlice::new(v.iov_base.cast(), n) };
            // SAFETY: `at..at + n` is inside the allocation, which nothing else borrows.
            let dst = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(at), n) };
            src.copy_to(dst);
            at += n;
        }
    }

    /// Copies the buffer out to the guest (after a read).
    pub(crate) fn empty_into(&self, guest: &GuestIov<'_>) {
        let mut at = 0usize;
        for v in guest.as_slice() {
            let n = v.iov_len.min(self.layout.size() - at);
            // SAFETY: as in `fill_from`; the guest range was asked for writing.
            let dst = unsafe { vm_memory::VolatileSlice::new(v.iov_base.cast(), n) };
            // SAFETY: inside the allocation.
            let src = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(at), n) };
            dst.copy_from(src);
            at += n;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Whether every segment of `iovs` starts at a multiple of `mem_align` and is a multiple of
/// `len_align` long (what O_DIRECT asks of memory).
pub(crate) fn aligned(iovs: &[libc::iovec], mem_align: usize, len_align: usize) -> bool {
    iovs.iter().all(|v| {
        (v.iov_base as usize).is_multiple_of(mem_align) && v.iov_len.is_multiple_of(len_align)
    })
}
