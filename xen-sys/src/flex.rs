//! Heap buffers for C structs that end in a flexible array.
//!
//! `ioctl_gntdev_map_grant_ref` and `ioctl_gntalloc_alloc_gref` are a header
//! followed by `count` elements that the kernel reads or writes past the end
//! of the declared struct. Rust cannot express such a type, so the argument
//! lives in a `Vec<u64>` (8-byte aligned, so every field is aligned) sized for
//! the header and all elements, and is viewed through typed accessors.

use std::io;

use core::marker::PhantomData;
use core::mem::{align_of, size_of};
use core::slice;

/// A `#[repr(C)]` header whose last field is a C flexible array of `Elem`.
///
/// # Safety
///
/// Implementors must be `#[repr(C)]`, valid when all-zero and for every bit
/// pattern the kernel may write, with `ARRAY_OFFSET` the byte offset of the
/// flexible array and `Elem` the same (plain-data) type as its elements.
pub unsafe trait FlexHeader: Copy {
    /// Element type of the flexible array.
    type Elem: Copy;
    /// Byte offset of the flexible array in `Self`.
    const ARRAY_OFFSET: usize;
}

/// A zero-initialised, 8-byte aligned `H` followed by `len` elements.
#[derive(Debug, Clone)]
pub struct FlexBuf<H: FlexHeader> {
    words: Vec<u64>,
    len: usize,
    _header: PhantomData<H>,
}

impl<H: FlexHeader> FlexBuf<H> {
    /// Checked once per type at compile time: everything fits an 8-aligned buffer.
    const LAYOUT_OK: () = assert!(
        align_of::<H>() <= 8
            && align_of::<H::Elem>() <= 8
            && H::ARRAY_OFFSET % align_of::<H::Elem>() == 0
            && H::ARRAY_OFFSET + size_of::<H::Elem>() <= size_of::<H>()
    );

    /// A zeroed header and `len` zeroed elements; `OutOfMemory` rather than
    /// an abort when `len` is too large to allocate.
    pub fn zeroed(len: usize) -> io::Result<Self> {
        let () = Self::LAYOUT_OK;
        let too_big = || io::Error::new(io::ErrorKind::OutOfMemory, format!("{len} elements"));
        let bytes = size_of::<H::Elem>()
            .checked_mul(len)
            .and_then(|b| b.checked_add(H::ARRAY_OFFSET))
            .ok_or_else(too_big)?
            .max(size_of::<H>());
        let mut words = Vec::new();
        words
            .try_reserve_exact(bytes.div_ceil(8))
            .map_err(|_| too_big())?;
        words.resize(bytes.div_ceil(8), 0);
        Ok(Self {
            words,
            len,
            _header: PhantomData,
        })
    }

    /// Number of elements after the header.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no elements after the header.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The header.
    pub fn header(&self) -> &H {
        // SAFETY: the buffer is 8-aligned, at least size_of::<H>() bytes
        // (zeroed() guarantees it), and every bit pattern is a valid H
        // (FlexHeader contract); the borrow ties it to &self.
        unsafe { &*self.words.as_ptr().cast::<H>() }
    }

    /// The header, mutably.
    pub fn header_mut(&mut self) -> &mut H {
        // SAFETY: as in header(); the exclusive borrow of self makes it unique.
        unsafe { &mut *self.words.as_mut_ptr().cast::<H>() }
    }

    /// The elements of the flexible array.
    pub fn elems(&self) -> &[H::Elem] {
        // SAFETY: zeroed() sized the buffer for ARRAY_OFFSET + len elements;
        // the offset is aligned for Elem (LAYOUT_OK) and any bits are valid.
        unsafe {
            let first = self.words.as_ptr().cast::<u8>().add(H::ARRAY_OFFSET);
            slice::from_raw_parts(first.cast::<H::Elem>(), self.len)
        }
    }

    /// The elements of the flexible array, mutably.
    pub fn elems_mut(&mut self) -> &mut [H::Elem] {
        // SAFETY: as in elems(); the exclusive borrow of self makes it unique.
        unsafe {
            let first = self.words.as_mut_ptr().cast::<u8>().add(H::ARRAY_OFFSET);
            slice::from_raw_parts_mut(first.cast::<H::Elem>(), self.len)
        }
    }

    /// Pointer to pass to the ioctl; valid for header and elements.
    pub fn as_mut_ptr(&mut self) -> *mut H {
        self.words.as_mut_ptr().cast()
    }

    /// The whole buffer as bytes, as the kernel sees it.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: u64 words have no padding, so every byte is initialised;
        // the length is the Vec's in bytes.
        unsafe { slice::from_raw_parts(self.words.as_ptr().cast(), self.words.len() * 8) }
    }
}
