//! A guest played by dom0 itself on real Xen: dom0 grants its own pages to itself (domid 0)
//! through `/dev/xen/gntalloc`, and the backend maps or grant-copies them like any guest's
//! grants. For demos and tests in a dom0 with no domU. A buffer needs consecutive refs, as a
//! Linux guest's does; gntalloc usually hands out a consecutive set (else the guest tries
//! again), but freed refs come back in reverse order, so page `i` of the gntalloc mapping is
//! found by its ref.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use xen_sys::Gntalloc;

use super::guest_sim::{Guest, GuestBuffer};
use crate::xen_page::XEN_PAGE_SIZE;

/// What can go wrong on the gntalloc guest's side.
#[derive(Debug, thiserror::Error)]
pub enum GntallocGuestError {
    /// A gntalloc call failed.
    #[error("{call}: {source}")]
    Gntalloc {
        /// Which call.
        call: &'static str,
        /// The errno.
        source: std::io::Error,
    },
    /// gntalloc handed out refs that are not a consecutive set.
    #[error("gntalloc gave refs {refs:?}, not a consecutive set")]
    NotConsecutive {
        /// The refs.
        refs: Vec<u32>,
    },
    /// A byte range outside the buffer.
    #[error("offset {offset} len {len} is outside a {pages}-page buffer")]
    OutOfRange {
        /// Offset.
        offset: usize,
        /// Length.
        len: usize,
        /// Buffer pages.
        pages: usize,
    },
    /// A buffer this guest did not grant, or whose grant has ended.
    #[error("no live grant in slot {slot}")]
    NoSuchGrant {
        /// The buffer's slot.
        slot: usize,
    },
}

#[derive(Debug)]
struct Grant {
    index: u64,
    /// The refs, in the order of the pages of `view`.
    refs: Vec<u32>,
    pages: usize,
    /// dom0's own view of the granted pages (the gntalloc mapping).
    view: NonNull<u8>,
    /// For ref `first_ref + k`, the page of `view` that holds it.
    page_of: Vec<usize>,
}

/// dom0 playing a guest of itself. Grants are ended (munmap + DEALLOC) by
/// [`GntallocGuest::end_all`] or when it is dropped.
#[derive(Debug)]
pub struct GntallocGuest {
    gntalloc: Gntalloc,
    /// One slot per grant made; `None` once ended, so a stale buffer is refused.
    grants: RefCell<Vec<Option<Grant>>>,
}

impl GntallocGuest {
    /// Opens `/dev/xen/gntalloc`.
    pub fn new() -> Result<Self, GntallocGuestError> {
        let gntalloc = Gntalloc::open().map_err(|source| GntallocGuestError::Gntalloc {
            call: "open /dev/xen/gntalloc",
            source,
        })?;
        Ok(GntallocGuest {
            gntalloc,
            grants: RefCell::new(Vec::new()),
        })
    }

    /// Ends every grant: unmaps the guest's views and deallocates one page at a time, highest
    /// ref first. Linux pushes freed refs on the head of its free list, so the next grants get
    /// them back in ascending order, as on a fresh boot. Returns the refs ended and the
    /// failures, if any (a DEALLOC succeeds even while a grantee still maps the page: Linux
    /// defers the end; checking that is the caller's business).
    pub fn end_all(&self) -> (Vec<u32>, Vec<GntallocGuestError>) {
        let mut problems = Vec::new();
        let mut pages = Vec::new();
        for g in self.grants.borrow_mut().iter_mut().filter_map(Option::take) {
            // SAFETY: the view mapping made in `grant`, of exactly this size; its slot is
            // emptied, so no buffer reaches it any more.
            if unsafe { libc::munmap(g.view.as_ptr().cast(), g.pages * XEN_PAGE_SIZE) } != 0 {
                problems.push(GntallocGuestError::Gntalloc {
                    call: "munmap(gntalloc)",
                    source: std::io::Error::last_os_error(),
                });
            }
            for (i, &r) in g.refs.iter().enumerate() {
                pages.push((r, g.index + (i * XEN_PAGE_SIZE) as u64));
            }
        }
        pages.sort_unstable_by_key(|&(r, _)| std::cmp::Reverse(r));
        for &(_, index) in &pages {
            if let Err(source) = self.gntalloc.dealloc_gref(index, 1) {
                problems.push(GntallocGuestError::Gntalloc {
                    call: "IOCTL_GNTALLOC_DEALLOC_GREF",
                    source,
                });
            }
        }
        (pages.into_iter().map(|(r, _)| r).collect(), problems)
    }

    /// Runs `f(view_ptr, buffer_offset, len)` for each page-sized piece of
    /// `[offset, offset + len)` of `buf`, in order.
    fn each_piece(
        &self,
        buf: &GuestBuffer,
        offset: usize,
        len: usize,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), GntallocGuestError> {
        let grants = self.grants.borrow();
        let g = grants
            .get(buf.backing)
            .and_then(Option::as_ref)
            .ok_or(GntallocGuestError::NoSuchGrant { slot: buf.backing })?;
        match offset.checked_add(len) {
            Some(end) if end <= g.pages * XEN_PAGE_SIZE => {}
            _ => {
                return Err(GntallocGuestError::OutOfRange {
                    offset,
                    len,
                    pages: g.pages,
                })
            }
        }
        let (mut at, mut done) = (offset, 0);
        while done < len {
            let n = (XEN_PAGE_SIZE - at % XEN_PAGE_SIZE).min(len - done);
            let page = g.page_of.get(at / XEN_PAGE_SIZE).copied().unwrap_or(0);
            // In bounds: `page < pages` and `at % XEN_PAGE_SIZE + n <= XEN_PAGE_SIZE`.
            f(
                g.view
                    .as_ptr()
                    .wrapping_add(page * XEN_PAGE_SIZE + at % XEN_PAGE_SIZE),
                done,
                n,
            );
            at += n;
            done += n;
        }
        Ok(())
    }
}

impl Guest for GntallocGuest {
    type Error = GntallocGuestError;

    fn domid(&self) -> u16 {
        0
    }

    fn grant(&self, pages: usize, readonly: bool) -> Result<GuestBuffer, GntallocGuestError> {
        let count = u32::try_from(pages).map_err(|_| GntallocGuestError::OutOfRange {
            offset: 0,
            len: pages * XEN_PAGE_SIZE,
            pages,
        })?;
        // gntalloc takes refs off the grant table's free list, which after frees (some
        // deferred while a backend still maps them) need not hold a consecutive run: keep a
        // set that is not one allocated while trying again (so the next try gets other
        // refs), then give them all back.
        let mut held = Vec::new();
        let got = loop {
            let (index, refs) = match self.gntalloc.alloc_gref(0, count, !readonly) {
                Ok(r) => r,
                Err(source) => {
                    break Err(GntallocGuestError::Gntalloc {
                        call: "IOCTL_GNTALLOC_ALLOC_GREF",
                        source,
                    })
                }
            };
            let first = refs.iter().copied().min().unwrap_or_default();
            let mut page_of = vec![usize::MAX; pages];
            let consecutive = refs.iter().enumerate().all(|(page, r)| {
                match page_of.get_mut((r - first) as usize) {
                    Some(slot) if *slot == usize::MAX => {
                        *slot = page;
                        true
                    }
                    _ => false,
                }
            });
            if consecutive {
                break Ok((index, refs, first, page_of));
            }
            held.push(index);
            if held.len() >= 8 {
                break Err(GntallocGuestError::NotConsecutive { refs });
            }
        };
        for i in held {
            let _ = self.gntalloc.dealloc_gref(i, count);
        }
        let (index, refs, first, page_of) = got?;
        let dealloc = || {
            let _ = self.gntalloc.dealloc_gref(index, count);
        };
        let off = libc::off_t::try_from(index).unwrap_or(libc::off_t::MAX);
        // SAFETY: a fresh shared mapping of our own granted pages at a kernel-chosen address;
        // checked for MAP_FAILED below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * XEN_PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.gntalloc.as_raw_fd(),
                off,
            )
        };
        let Some(view) = NonNull::new(p.cast::<u8>()).filter(|_| p != libc::MAP_FAILED) else {
            let source = std::io::Error::last_os_error();
            dealloc();
            return Err(GntallocGuestError::Gntalloc {
                call: "mmap(gntalloc)",
                source,
            });
        };
        let mut grants = self.grants.borrow_mut();
        grants.push(Some(Grant {
            index,
            refs,
            pages,
            view,
            page_of,
        }));
        Ok(GuestBuffer {
            backing: grants.len() - 1,
            first_ref: first,
            pages,
        })
    }

    fn write(
        &self,
        buf: &GuestBuffer,
        offset: usize,
        data: &[u8],
    ) -> Result<(), GntallocGuestError> {
        self.each_piece(buf, offset, data.len(), |p, at, n| {
            // SAFETY: `p..p+n` is inside our gntalloc mapping and `at..at+n` inside `data`
            // (both checked by `each_piece`).
            unsafe { std::ptr::copy(data.as_ptr().add(at), p, n) }
        })
    }

    fn read(
        &self,
        buf: &GuestBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, GntallocGuestError> {
        let mut v = vec![0u8; len];
        let out = v.as_mut_ptr();
        self.each_piece(buf, offset, len, |p, at, n| {
            // SAFETY: `p..p+n` is inside our gntalloc mapping and `at..at+n` inside `v`
            // (both checked by `each_piece`).
            unsafe { std::ptr::copy(p, out.add(at), n) }
        })?;
        Ok(v)
    }
}

impl Drop for GntallocGuest {
    fn drop(&mut self) {
        // Failures here have no one to go to; `end_all` reports them.
        let _ = self.end_all();
    }
}
