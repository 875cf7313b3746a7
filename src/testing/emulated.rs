//! An emulated Xen: a grant table and a foreign-frame table over the pages of one memfd.
//!
//! It enforces what the hypervisor and the drivers enforce (unknown refs and frames fail, a
//! read-only grant refuses a writable mapping and grant-copy writes, an mmap must cover exactly
//! one whole grant map, unmap ioctls come after munmap) and it counts live mappings, so tests
//! can prove that nothing leaks. Mappings are real: each guest page is `mmap`ed from the memfd
//! with the requested protection, so a write through a read-only mapping faults as it would on
//! Xen, and the test (playing the guest) sees the device's writes through its own view.

use crate::daemon::threads::ThreadKind;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

use crate::device::reserve::{reserve, reserve_fixed};
use crate::device::{
    CopyDirection, CopySegment, DeviceError, GrantPage, Protection, XenDriver, GNTST_BAD_COPY_ARG,
    GNTST_BAD_GNTREF, GNTST_GENERAL_ERROR, GNTST_OKAY,
};
use crate::xen_page::XEN_PAGE_SIZE;

/// Errors of the guest-side API (what the test, playing the guest, asks of the emulation).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum EmulationError {
    /// Creating or sizing the memfd failed.
    #[error("memfd setup failed: errno {0}")]
    Setup(i32),
    /// The memfd has no room for more pages.
    #[error("out of emulated guest pages: asked {asked}, {left} left")]
    OutOfPages {
        /// Pages asked for.
        asked: usize,
        /// Pages left.
        left: usize,
    },
    /// A page index or byte range outside the allocated pages.
    #[error("guest page {page} offset {offset} len {len} is outside the allocated pages")]
    BadPage {
        /// Page index.
        page: usize,
        /// Byte offset in the page.
        offset: usize,
        /// Length.
        len: usize,
    },
    /// No such grant.
    #[error("domain {domid} has no grant ref {gref}")]
    NoSuchGrant {
        /// Granting domain.
        domid: u16,
        /// The ref.
        gref: u32,
    },
    /// Ending foreign access while the backend still maps the grant: on Xen, Linux would mark
    /// the device broken.
    #[error("grant ref {gref} of domain {domid} is still mapped by the backend")]
    StillMapped {
        /// Granting domain.
        domid: u16,
        /// The ref.
        gref: u32,
    },
}

#[derive(Clone, Copy, Debug)]
struct Grant {
    page: usize,
    readonly: bool,
    /// Live host mappings of this grant.
    mapped: u32,
}

#[derive(Clone, Copy, Debug)]
struct Frame {
    page: usize,
    /// How many more MMAPBATCH attempts report this frame as paged out.
    paged_out: u32,
}

#[derive(Debug)]
struct GrantMap {
    refs: Vec<GrantPage>,
    mmapped: Option<usize>,
    /// A failed mmap leaves the map unusable until UNMAP_GRANT_REF (as on real gntdev).
    poisoned: bool,
}

#[derive(Debug)]
enum Live {
    Grant {
        index: u64,
        pages: usize,
    },
    /// A privcmd mapping; `mapped` is per page, empty until the first (whole) MMAPBATCH.
    Foreign {
        pages: usize,
        mapped: Vec<bool>,
    },
}

#[derive(Debug, Default)]
struct State {
    next_page: usize,
    next_ref: HashMap<u16, u32>,
    grants: HashMap<(u16, u32), Grant>,
    frames: HashMap<(u16, u64), Frame>,
    maps: HashMap<u64, GrantMap>,
    next_index: u64,
    live: HashMap<usize, Live>,
}

/// The emulated hypervisor plus drivers. See the module docs.
#[derive(Debug)]
pub struct EmulatedXen {
    memfd: OwnedFd,
    /// The whole memfd mapped read-write: the guest's own view and the "hypervisor" copy path.
    base: NonNull<u8>,
    capacity: usize,
    state: Mutex<State>,
    /// Grant-copy ioctls still to fail as a whole (error-path tests).
    failing_copies: std::sync::atomic::AtomicU32,
    /// Grant-copy writes to guest pages, recorded while on (`record_guest_writes`).
    guest_writes: Mutex<Option<Vec<GuestWrite>>>,
    /// Which driver methods threads of which kinds called (`calls_by_thread_kind`).
    calls: Mutex<std::collections::BTreeSet<(Option<ThreadKind>, &'static str)>>,
}

/// One grant-copy segment that wrote to a guest page: which page and which bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestWrite {
    /// Domain and ref of the page.
    pub grant: crate::device::GrantPage,
    /// First byte written, in the page.
    pub offset: u16,
    /// Bytes written.
    pub len: u16,
}

// SAFETY: `base` points to a shared mapping owned by this value for its whole life; all
// mutable bookkeeping is behind the mutex, and accesses through `base` are to guest memory,
// which is shared memory by nature (the device and the "guest" may both touch it).
unsafe impl Send for EmulatedXen {}
// SAFETY: as above.
unsafe impl Sync for EmulatedXen {}

impl EmulatedXen {
    /// First grant ref handed out per domain (Linux's gntalloc started at 8 on real Xen).
    pub const FIRST_REF: u32 = 8;

    /// An emulation with room for `capacity_pages` guest pages (sparse: untouched pages cost
    /// nothing).
    pub fn new(capacity_pages: usize) -> Result<Self, EmulationError> {
        // SAFETY: a valid NUL-terminated name; flags are plain constants.
        let fd = unsafe { libc::memfd_create(c"xen-emulated-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(EmulationError::Setup(errno()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = capacity_pages.max(1) * XEN_PAGE_SIZE;
        // SAFETY: ftruncate on an fd we own.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(EmulationError::Setup(errno()));
        }
        // SAFETY: a fresh shared mapping of the whole file; checked for MAP_FAILED below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(EmulationError::Setup(errno()));
        }
        Ok(EmulatedXen {
            memfd,
            base: NonNull::new(p.cast()).ok_or(EmulationError::Setup(libc::EFAULT))?,
            capacity: capacity_pages.max(1),
            state: Mutex::new(State {
                next_index: 0,
                ..State::default()
            }),
            failing_copies: Default::default(),
            guest_writes: Mutex::new(None),
            calls: Mutex::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the tables consistent (no multi-step
        // invariants are broken mid-update), so poisoning is not fatal here.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- the guest's side -------------------------------------------------------------

    /// Allocates `n` consecutive guest pages (zeroed) and returns the first page index.
    pub fn alloc_pages(&self, n: usize) -> Result<usize, EmulationError> {
        let mut st = self.state();
        let left = self.capacity - st.next_page;
        if n > left {
            return Err(EmulationError::OutOfPages { asked: n, left });
        }
        let first = st.next_page;
        st.next_page += n;
        Ok(first)
    }

    /// Grants `n` pages starting at `first_page` from domain `domid`, on consecutive refs (as
    /// Linux's grant DMA ops do for a multi-page buffer); returns the first ref.
    pub fn grant_pages(
        &self,
        domid: u16,
        first_page: usize,
        n: usize,
        readonly: bool,
    ) -> Result<u32, EmulationError> {
        let mut st = self.state();
        self.check_pages(&st, first_page, 0, n * XEN_PAGE_SIZE)?;
        let first = *st.next_ref.get(&domid).unwrap_or(&Self::FIRST_REF);
        for i in 0..n {
            st.grants.insert(
                (domid, first + i as u32),
                Grant {
                    page: first_page + i,
                    readonly,
                    mapped: 0,
                },
            );
        }
        st.next_ref.insert(domid, first + n as u32);
        Ok(first)
    }

    /// Ends foreign access to a grant, as the guest does when a request completes. Fails while
    /// the backend still maps it.
    pub fn end_access(&self, domid: u16, gref: u32) -> Result<(), EmulationError> {
        let mut st = self.state();
        match st.grants.get(&(domid, gref)) {
            None => Err(EmulationError::NoSuchGrant { domid, gref }),
            Some(g) if g.mapped > 0 => Err(EmulationError::StillMapped { domid, gref }),
            Some(_) => {
                st.grants.remove(&(domid, gref));
                Ok(())
            }
        }
    }

    /// Makes `n` pages from `first_page` visible as frames `first_gfn..` of domain `domid`.
    pub fn add_frames(
        &self,
        domid: u16,
        first_gfn: u64,
        first_page: usize,
        n: usize,
    ) -> Result<(), EmulationError> {
        let mut st = self.state();
        self.check_pages(&st, first_page, 0, n * XEN_PAGE_SIZE)?;
        for i in 0..n {
            st.frames.insert(
                (domid, first_gfn + i as u64),
                Frame {
                    page: first_page + i,
                    paged_out: 0,
                },
            );
        }
        Ok(())
    }

    /// Makes the next `attempts` MMAPBATCH calls report `gfn` as paged out (`-ENOENT`).
    pub fn page_out(&self, domid: u16, gfn: u64, attempts: u32) {
        if let Some(f) = self.state().frames.get_mut(&(domid, gfn)) {
            f.paged_out = attempts;
        }
    }

    /// Writes guest bytes (the guest filling a buffer).
    pub fn write_page(
        &self,
        page: usize,
        offset: usize,
        data: &[u8],
    ) -> Result<(), EmulationError> {
        self.check_pages(&self.state(), page, offset, data.len())?;
        // SAFETY: the range is inside the allocated part of our mapping (checked above).
        unsafe {
            std::ptr::copy(data.as_ptr(), self.page_ptr(page).add(offset), data.len());
        }
        Ok(())
    }

    /// Reads guest bytes (the guest looking at what the device wrote).
    pub fn read_page(
        &self,
        page: usize,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, EmulationError> {
        self.check_pages(&self.state(), page, offset, len)?;
        let mut v = vec![0u8; len];
        // SAFETY: the range is inside the allocated part of our mapping (checked above).
        unsafe { std::ptr::copy(self.page_ptr(page).add(offset), v.as_mut_ptr(), len) };
        Ok(v)
    }

    /// Makes the next `n` grant-copy ioctls fail as a whole with `EIO`, copying nothing (as a
    /// kernel refusing the call would), to test the callers' error paths.
    pub fn fail_grant_copies(&self, n: u32) {
        self.failing_copies
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Starts (`true`) or stops recording the bytes grant copies write to guest pages; starting
    /// clears what was recorded. Tests use it to prove that nothing outside an access is
    /// written, not even with the value just read (a concurrent writer could lose its byte).
    pub fn record_guest_writes(&self, on: bool) {
        if let Ok(mut w) = self.guest_writes.lock() {
            *w = on.then(Vec::new);
        }
    }

    /// The grant-copy writes to guest pages recorded since `record_guest_writes(true)`.
    pub fn guest_writes(&self) -> Vec<GuestWrite> {
        self.guest_writes
            .lock()
            .ok()
            .and_then(|w| w.clone())
            .unwrap_or_default()
    }

    /// Every (thread kind, driver method) pair called so far: the kind of a thread the daemon
    /// spawned ([`crate::daemon::threads::current_kind`]), `None` for any other thread. Each
    /// method is one system call on the real drivers
    /// ([`crate::device::DRIVER_SYSCALLS`]), so this proves what a kind's seccomp allowlist
    /// needs.
    pub fn calls_by_thread_kind(&self) -> Vec<(Option<ThreadKind>, &'static str)> {
        self.calls
            .lock()
            .map(|c| c.iter().copied().collect())
            .unwrap_or_default()
    }

    fn record(&self, method: &'static str) {
        if let Ok(mut c) = self.calls.lock() {
            c.insert((crate::daemon::threads::current_kind(), method));
        }
    }

    /// Host mappings (grant mmaps and privcmd reservations) currently alive.
    pub fn live_mappings(&self) -> usize {
        self.state().live.len()
    }

    /// Grant maps registered with MAP_GRANT_REF and not yet removed with UNMAP_GRANT_REF.
    pub fn live_grant_maps(&self) -> usize {
        self.state().maps.len()
    }

    fn check_pages(
        &self,
        st: &State,
        page: usize,
        offset: usize,
        len: usize,
    ) -> Result<(), EmulationError> {
        let bad = EmulationError::BadPage { page, offset, len };
        let start = page
            .checked_mul(XEN_PAGE_SIZE)
            .and_then(|b| b.checked_add(offset))
            .ok_or(bad.clone())?;
        let end = start.checked_add(len).ok_or(bad.clone())?;
        if end > st.next_page * XEN_PAGE_SIZE {
            return Err(bad);
        }
        Ok(())
    }

    fn page_ptr(&self, page: usize) -> *mut u8 {
        // Callers only pass allocated pages, which lie inside the mapping.
        self.base.as_ptr().wrapping_add(page * XEN_PAGE_SIZE)
    }

    /// Maps memfd page `page` at `addr` with `prot`, replacing what was there.
    ///
    /// # Safety
    /// `addr` must be page aligned and inside a reservation this emulation owns.
    unsafe fn map_page_at(&self, addr: *mut u8, page: usize, prot: libc::c_int) -> Result<(), i32> {
        // SAFETY: per the contract, `addr` is inside our own reservation, so MAP_FIXED replaces
        // only memory we own; the memfd page exists (allocated pages are inside the file).
        let p = unsafe {
            libc::mmap(
                addr.cast(),
                XEN_PAGE_SIZE,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.memfd.as_raw_fd(),
                (page * XEN_PAGE_SIZE) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            Err(errno())
        } else {
            Ok(())
        }
    }
}

impl Drop for EmulatedXen {
    fn drop(&mut self) {
        // SAFETY: `base` is our own mapping of `capacity` pages, unmapped once, here.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.capacity * XEN_PAGE_SIZE) };
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl XenDriver for EmulatedXen {
    fn grant_map_refs(&self, refs: &[GrantPage]) -> Result<u64, DeviceError> {
        self.record("grant_map_refs");
        if refs.is_empty() {
            return Err(DeviceError::sys("IOCTL_GNTDEV_MAP_GRANT_REF", libc::EINVAL));
        }
        let mut st = self.state();
        let index = st.next_index;
        st.next_index += (refs.len() * XEN_PAGE_SIZE) as u64;
        st.maps.insert(
            index,
            GrantMap {
                refs: refs.to_vec(),
                mmapped: None,
                poisoned: false,
            },
        );
        Ok(index)
    }

    fn grant_mmap(
        &self,
        index: u64,
        pages: usize,
        prot: Protection,
    ) -> Result<NonNull<u8>, DeviceError> {
        self.record("grant_mmap");
        const CALL: &str = "mmap(gntdev)";
        let mut st = self.state();
        let st = &mut *st;
        let map = st
            .maps
            .get(&index)
            .ok_or(DeviceError::sys(CALL, libc::EINVAL))?;
        // The real driver refuses an mmap that does not cover exactly one whole map.
        if map.refs.len() != pages || map.mmapped.is_some() || map.poisoned {
            return Err(DeviceError::sys(CALL, libc::EINVAL));
        }
        // The hypercall runs at mmap time: every ref must be a grant of that domain, and a
        // read-only grant refuses a writable mapping. Real gntdev answers EINVAL for both and
        // the map cannot be mmapped again.
        let mut grants = Vec::with_capacity(pages);
        let mut refused = false;
        for r in &map.refs {
            match st.grants.get(&(r.domid, r.gref)) {
                Some(g) if !(g.readonly && prot == Protection::ReadWrite) => grants.push(g.page),
                _ => refused = true,
            }
        }
        if refused {
            if let Some(m) = st.maps.get_mut(&index) {
                m.poisoned = true;
            }
            return Err(DeviceError::sys(CALL, libc::EINVAL));
        }
        let base = reserve(CALL, pages)?;
        for (i, page) in grants.iter().enumerate() {
            // SAFETY: `base + i` pages is inside the reservation just made.
            let r = unsafe {
                self.map_page_at(base.as_ptr().add(i * XEN_PAGE_SIZE), *page, prot.bits())
            };
            if let Err(e) = r {
                // SAFETY: the reservation is ours and nothing refers into it yet.
                unsafe { libc::munmap(base.as_ptr().cast(), pages * XEN_PAGE_SIZE) };
                return Err(DeviceError::sys(CALL, e));
            }
        }
        for r in &map.refs {
            if let Some(g) = st.grants.get_mut(&(r.domid, r.gref)) {
                g.mapped += 1;
            }
        }
        if let Some(m) = st.maps.get_mut(&index) {
            m.mmapped = Some(base.as_ptr() as usize);
        }
        st.live
            .insert(base.as_ptr() as usize, Live::Grant { index, pages });
        Ok(base)
    }

    unsafe fn grant_munmap(&self, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError> {
        self.record("grant_munmap");
        const CALL: &str = "munmap(gntdev)";
        let mut st = self.state();
        let st = &mut *st;
        let key = addr.as_ptr() as usize;
        let index = match st.live.get(&key) {
            Some(Live::Grant { index, pages: p }) if *p == pages => *index,
            _ => return Err(DeviceError::sys(CALL, libc::EINVAL)),
        };
        // SAFETY: `addr`/`pages` is exactly a live grant mapping we made (checked above); the
        // caller promises nothing uses it any more.
        if unsafe { libc::munmap(addr.as_ptr().cast(), pages * XEN_PAGE_SIZE) } != 0 {
            return Err(DeviceError::sys(CALL, errno()));
        }
        st.live.remove(&key);
        if let Some(m) = st.maps.get_mut(&index) {
            m.mmapped = None;
            for r in &m.refs {
                if let Some(g) = st.grants.get_mut(&(r.domid, r.gref)) {
                    g.mapped = g.mapped.saturating_sub(1);
                }
            }
        }
        Ok(())
    }

    fn grant_unmap_refs(&self, index: u64, pages: usize) -> Result<(), DeviceError> {
        self.record("grant_unmap_refs");
        const CALL: &str = "IOCTL_GNTDEV_UNMAP_GRANT_REF";
        let mut st = self.state();
        match st.maps.get(&index) {
            Some(m) if m.refs.len() == pages && m.mmapped.is_none() => {
                st.maps.remove(&index);
                Ok(())
            }
            // Stricter than Linux (which defers the unmap to the last munmap): catches a
            // backend that forgets to munmap first.
            Some(m) if m.mmapped.is_some() => Err(DeviceError::sys(CALL, libc::EBUSY)),
            _ => Err(DeviceError::sys(CALL, libc::EINVAL)),
        }
    }

    unsafe fn grant_copy(&self, segments: &mut [CopySegment]) -> Result<(), DeviceError> {
        self.record("grant_copy");
        use std::sync::atomic::Ordering::Relaxed;
        let failing = self.failing_copies.load(Relaxed);
        if failing > 0 {
            self.failing_copies.store(failing - 1, Relaxed);
            return Err(DeviceError::sys("IOCTL_GNTDEV_GRANT_COPY", libc::EIO));
        }
        let st = self.state();
        for seg in segments.iter_mut() {
            seg.status = match st.grants.get(&(seg.grant.domid, seg.grant.gref)) {
                None => GNTST_BAD_GNTREF,
                Some(_) if usize::from(seg.offset) + usize::from(seg.len) > XEN_PAGE_SIZE => {
                    GNTST_BAD_COPY_ARG
                }
                // What Xen 4.17 answers for a write to a read-only grant.
                Some(g) if g.readonly && seg.direction == CopyDirection::ToGuest => {
                    GNTST_GENERAL_ERROR
                }
                Some(g) => {
                    let guest = self.page_ptr(g.page).wrapping_add(usize::from(seg.offset));
                    let len = usize::from(seg.len);
                    // SAFETY: `guest..guest+len` lies in an allocated page of our mapping
                    // (offset + len <= XEN_PAGE_SIZE checked above); the caller promises `local` is
                    // valid for `len` bytes and unaliased during the call.
                    unsafe {
                        match seg.direction {
                            CopyDirection::FromGuest => std::ptr::copy(guest, seg.local, len),
                            CopyDirection::ToGuest => std::ptr::copy(seg.local, guest, len),
                        }
                    }
                    if seg.direction == CopyDirection::ToGuest {
                        if let Ok(mut w) = self.guest_writes.lock() {
                            if let Some(w) = w.as_mut() {
                                w.push(GuestWrite {
                                    grant: seg.grant,
                                    offset: seg.offset,
                                    len: seg.len,
                                });
                            }
                        }
                    }
                    GNTST_OKAY
                }
            };
        }
        Ok(())
    }

    unsafe fn foreign_mmap_at(&self, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError> {
        self.record("foreign_mmap_at");
        // SAFETY: the caller owns `addr..` with no references into it; an inaccessible
        // anonymous mapping stands for the empty privcmd VMA.
        unsafe { reserve_fixed("mmap(privcmd)", addr, pages) }?;
        self.state().live.insert(
            addr.as_ptr() as usize,
            Live::Foreign {
                pages,
                mapped: Vec::new(),
            },
        );
        Ok(())
    }

    unsafe fn foreign_map_batch(
        &self,
        domid: u16,
        addr: NonNull<u8>,
        gfns: &[u64],
        errs: &mut [i32],
    ) -> Result<(), DeviceError> {
        self.record("foreign_map_batch");
        const CALL: &str = "IOCTL_PRIVCMD_MMAPBATCH_V2";
        if gfns.len() != errs.len() || gfns.is_empty() {
            return Err(DeviceError::sys(CALL, libc::EINVAL));
        }
        let mut st = self.state();
        let st = &mut *st;
        let a = addr.as_ptr() as usize;
        // The privcmd VMA holding `addr`, and the page index of `addr` in it.
        let found = st.live.iter_mut().find_map(|(&base, l)| match l {
            Live::Foreign { pages, mapped } if a >= base && a < base + *pages * XEN_PAGE_SIZE => {
                Some((
                    (a - base) / XEN_PAGE_SIZE,
                    *pages,
                    mapped,
                    (a - base) % XEN_PAGE_SIZE,
                ))
            }
            _ => None,
        });
        let Some((first, pages, mapped, 0)) = found else {
            return Err(DeviceError::sys(CALL, libc::EINVAL));
        };
        let n = gfns.len();
        // Linux privcmd: the first call must cover the whole VMA; later calls may only fill
        // pages that are still unmapped.
        if mapped.is_empty() {
            if first != 0 || n != pages {
                return Err(DeviceError::sys(CALL, libc::EINVAL));
            }
            *mapped = vec![false; pages];
        } else if first + n > pages || mapped[first..first + n].iter().any(|&m| m) {
            return Err(DeviceError::sys(CALL, libc::EINVAL));
        }
        let mut paged_out = false;
        for (i, gfn) in gfns.iter().enumerate() {
            errs[i] = match st.frames.get_mut(&(domid, *gfn)) {
                None => -libc::EINVAL,
                Some(f) if f.paged_out > 0 => {
                    f.paged_out -= 1;
                    paged_out = true;
                    -libc::ENOENT
                }
                Some(f) => {
                    // SAFETY: the target page is inside a live privcmd mapping of ours (found
                    // above); the caller promises no references into it.
                    let r = unsafe {
                        self.map_page_at(
                            addr.as_ptr().add(i * XEN_PAGE_SIZE),
                            f.page,
                            libc::PROT_READ | libc::PROT_WRITE,
                        )
                    };
                    match r {
                        Ok(()) => {
                            mapped[first + i] = true;
                            0
                        }
                        Err(e) => -e,
                    }
                }
            };
        }
        if paged_out {
            return Err(DeviceError::sys(CALL, libc::ENOENT));
        }
        Ok(())
    }

    unsafe fn foreign_munmap(&self, addr: NonNull<u8>, pages: usize) -> Result<(), DeviceError> {
        self.record("foreign_munmap");
        self.release_foreign("munmap(privcmd)", addr, pages, |call| {
            // SAFETY: exactly a live privcmd reservation of ours; the caller promises no users.
            if unsafe { libc::munmap(addr.as_ptr().cast(), pages * XEN_PAGE_SIZE) } != 0 {
                return Err(DeviceError::sys(call, errno()));
            }
            Ok(())
        })
    }

    unsafe fn foreign_unmap_to_reserve(
        &self,
        addr: NonNull<u8>,
        pages: usize,
    ) -> Result<(), DeviceError> {
        self.record("foreign_unmap_to_reserve");
        self.release_foreign("mmap(reserve over privcmd)", addr, pages, |call| {
            // SAFETY: exactly a live privcmd mapping of ours; the caller promises no users.
            unsafe { reserve_fixed(call, addr, pages) }
        })
    }
}

impl EmulatedXen {
    /// Ends the emulated privcmd mapping of `pages` pages at `addr` with `release`, refusing
    /// (EINVAL) anything that is not exactly one.
    fn release_foreign(
        &self,
        call: &'static str,
        addr: NonNull<u8>,
        pages: usize,
        release: impl FnOnce(&'static str) -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let mut st = self.state();
        let key = addr.as_ptr() as usize;
        match st.live.get(&key) {
            Some(Live::Foreign { pages: p, .. }) if *p == pages => {}
            _ => return Err(DeviceError::sys(call, libc::EINVAL)),
        }
        release(call)?;
        st.live.remove(&key);
        Ok(())
    }
}
