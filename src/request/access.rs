//! Fetching on-demand grant pages: grant copy into bounce buffers, or gntdev mappings.

use std::ptr::NonNull;

use vm_memory::{Permissions, VolatileSlice};

use super::pages::{Bounce, BouncePage, KeySet, LiveMap, MapRefusal, PageSlot, Span};
use super::{
    RequestError, RequestMemory, ScopeState, Scratch, SliceBuf, WritableBuffers, MAX_SCOPE_PAGES,
};
use crate::device::{
    CopyDirection, CopySegment, GrantPage, Protection, XenHandle, GNTST_BAD_GNTREF,
    GNTST_GENERAL_ERROR, GNTST_OKAY, GNTST_PERMISSION_DENIED,
};
use crate::region::XenRegion;
use crate::xen_page::XEN_PAGE_SIZE;

/// `GNTST_eagain`: the frame is paged out; worth retrying, so never remembered as bad.
const GNTST_EAGAIN: i16 = -12;
use crate::xen_page::{frame_of, page_offset, pages_spanned};

/// The part of one access that falls in one grant page.
#[derive(Clone, Copy, Debug)]
pub(super) struct Piece {
    pub key: GrantPage,
    /// Guest address of the piece's first byte (for error messages).
    pub gpa: u64,
    pub span: Span,
    pub write: bool,
}

/// Splits `[gpa, gpa + len)` of an on-demand region of `domid` into per-page pieces.
pub(super) fn pieces(
    domid: u16,
    gpa: u64,
    len: usize,
    write: bool,
    out: &mut Vec<Piece>,
) -> Result<(), RequestError> {
    let mut cur = gpa;
    let mut left = len;
    while left > 0 {
        let gref =
            u32::try_from(frame_of(cur)).map_err(|_| RequestError::RefOutOfRange { gpa: cur })?;
        let lo = page_offset(cur) as usize;
        let n = (XEN_PAGE_SIZE - lo).min(left);
        out.push(Piece {
            key: GrantPage { domid, gref },
            gpa: cur,
            span: Span::new(lo, lo + n),
            write,
        });
        left -= n;
        // Cannot overflow: the region holds `[gpa, gpa + len)`.
        cur = cur.wrapping_add(n as u64);
    }
    Ok(())
}

impl RequestMemory<'_> {
    /// Serves `[gpa, gpa + len)` of on-demand region `region`, fetching what is missing.
    pub(super) fn on_demand<'a>(
        &'a self,
        region: &XenRegion,
        domid: u16,
        gpa: u64,
        len: usize,
        access: Permissions,
        out: &mut SliceBuf<'a>,
    ) -> Result<(), RequestError> {
        let write = access.has_write();
        let mut st = self.state.borrow_mut();
        // An access that alone exceeds the limit is refused before its pieces are listed.
        if pages_spanned(page_offset(gpa), len as u64) > MAX_SCOPE_PAGES as u64 {
            return Err(RequestError::ScopeFull {
                gpa,
                len,
                pages: pages_spanned(page_offset(gpa), len as u64) as usize,
                max: MAX_SCOPE_PAGES,
            });
        }
        // The piece list is reused from call to call: most accesses allocate nothing.
        let mut ps = std::mem::take(&mut st.piece_buf);
        ps.clear();
        let r = pieces(domid, gpa, len, write, &mut ps)
            .and_then(|()| self.fetch(&mut st, region, len, &ps))
            .and_then(|()| st.slices_for(&ps, out));
        st.piece_buf = ps;
        r
    }

    /// Fetches what `ps` (one access of `len` bytes) needs and the scope does not hold yet.
    fn fetch(
        &self,
        st: &mut ScopeState,
        region: &XenRegion,
        len: usize,
        ps: &[Piece],
    ) -> Result<(), RequestError> {
        // Prefetched pages are served without a device call or any bookkeeping.
        if ps.iter().all(|p| st.ready(p)) {
            return Ok(());
        }
        // A page whose copy-in Xen refused (ungranted ref, ...) is refused again without a
        // device call: a guest cannot make each access to a bad page cost a system call.
        let known_bad = ps.iter().find_map(|p| match st.bounce(p.key) {
            Some(b) if b.bad != GNTST_OKAY && !st.ready(p) => Some((p, b.bad)),
            _ => None,
        });
        if let Some((p, status)) = known_bad {
            if let Some(d) = &st.dev {
                d.counters().add_errors(1);
            }
            return Err(copy_error(p, status));
        }
        // The same for a page whose map with this access's protection failed at a touch.
        let refused = ps.iter().find_map(|p| match st.pages.get(&p.key) {
            Some(s) if s.bounce.is_none() && !st.ready(p) => s.refused(p.write).map(|r| (p, r)),
            _ => None,
        });
        if let Some((p, r)) = refused {
            if let Some(d) = &st.dev {
                d.counters().add_errors(1);
            }
            return Err(refusal_error(p, r));
        }
        // Only pages new to the scope count against its limit.
        let new = ps.iter().filter(|p| !st.pages.contains_key(&p.key)).count();
        if st.pages.len() + new > MAX_SCOPE_PAGES {
            let gpa = ps.first().map_or(0, |p| p.gpa);
            return Err(RequestError::ScopeFull {
                gpa,
                len,
                pages: st.pages.len() + new,
                max: MAX_SCOPE_PAGES,
            });
        }
        let dev = st.device(region)?;
        let copy_new = self.strategy.copies(len);
        let (copy, map): (Vec<Piece>, Vec<Piece>) =
            ps.iter().partition(|p| match st.pages.get(&p.key) {
                Some(s) => s.bounce.is_some(),
                None => copy_new,
            });
        let write = ps.first().is_some_and(|p| p.write);
        let r = st
            .fetch_by_copy(&dev, &copy, true)
            .and_then(|()| st.fetch_by_map(&dev, &map, write, true));
        if r.is_err() {
            dev.counters().add_errors(1);
        }
        r
    }
}

impl ScopeState {
    /// Refuses an access that could take the scope past [`MAX_SCOPE_PAGES`], before any work.
    /// `planned` counts pages about to be added that are not in the scope yet.
    pub(super) fn check_room(
        &self,
        gpa: u64,
        len: usize,
        planned: usize,
    ) -> Result<(), RequestError> {
        let pages =
            self.pages.len() + planned + pages_spanned(page_offset(gpa), len as u64) as usize;
        if pages > MAX_SCOPE_PAGES {
            return Err(RequestError::ScopeFull {
                gpa,
                len,
                pages,
                max: MAX_SCOPE_PAGES,
            });
        }
        Ok(())
    }

    /// The device of the first on-demand region touched. A table's Xen regions share one handle
    /// ([`RegionTable::insert`](crate::table::RegionTable::insert) refuses others), so the
    /// `NoDevice` arm for a second handle only guards tables built some other way.
    pub(super) fn device(&mut self, region: &XenRegion) -> Result<XenHandle, RequestError> {
        let gpa = region.descriptor().guest_phys_addr;
        let d = region.device().ok_or(RequestError::NoDevice { gpa })?;
        match &self.dev {
            Some(cached) if cached.same_device(d) => Ok(cached.clone()),
            // One scope releases everything through one device.
            Some(_) => Err(RequestError::NoDevice { gpa }),
            None => {
                self.dev = Some(d.clone());
                Ok(d.clone())
            }
        }
    }

    /// Makes every piece's bytes valid in a bounce buffer with one grant-copy ioctl; probes
    /// writability of pages to be written with a 1-byte write-back of bytes just read.
    ///
    /// With `strict`, the first failure is returned; otherwise (prefetch) failed pages are
    /// simply left unfetched, to be retried and reported when touched.
    pub(super) fn fetch_by_copy(
        &mut self,
        dev: &XenHandle,
        pieces: &[Piece],
        strict: bool,
    ) -> Result<(), RequestError> {
        if pieces.is_empty() {
            return Ok(());
        }
        self.alloc_bounces(pieces)?;
        // Scratch lists live in the scope and keep their capacity from call to call.
        let mut t = std::mem::take(&mut self.tmp);
        let r = self.copy_in(dev, pieces, strict, &mut t);
        t.clear();
        self.tmp = t;
        r
    }

    fn copy_in(
        &mut self,
        dev: &XenHandle,
        pieces: &[Piece],
        strict: bool,
        t: &mut Scratch,
    ) -> Result<(), RequestError> {
        let overwrite = self.writable == WritableBuffers::Overwrite;
        // Plan: per page, the bytes to copy in (segments) and the new valid span; probes last.
        for (i, p) in pieces.iter().enumerate() {
            let Some(b) = self.bounce_mut(p.key) else {
                continue;
            };
            let have = match b.pending {
                Some(s) => s,
                None => {
                    t.touched.push(p.key);
                    b.valid
                }
            };
            // A read fetched on touch copies in the rest of its page too: descriptors of an
            // indirect table, read 16 bytes at a time, then cost one copy per page, not one
            // per descriptor. The grant covers the whole page; bytes are cheap, calls are not.
            let want = if strict && !p.write {
                Span::new(usize::from(p.span.lo), XEN_PAGE_SIZE)
            } else {
                p.span
            };
            let need = have.hull(want);
            for part in need.minus(have) {
                // With `Overwrite`, bytes the device asked to write start zeroed (never a
                // previous request's bytes); everything else is copied in.
                let zeroed = if overwrite && p.write {
                    part.intersect(p.span)
                } else {
                    Span::default()
                };
                if !zeroed.is_empty() {
                    // SAFETY: `zeroed` lies in the page's bounce memory, outside `valid`, so no
                    // slice covers it.
                    unsafe { std::ptr::write_bytes(in_page(b.buf, zeroed), 0, zeroed.len()) };
                }
                for copy in part.minus(zeroed) {
                    if !copy.is_empty() {
                        t.segs.push(seg(
                            p.key,
                            copy,
                            in_page(b.buf, copy),
                            CopyDirection::FromGuest,
                        ));
                        t.owners.push(i);
                    }
                }
            }
            b.pending = Some(need);
            if p.write && !overwrite && b.writable.is_none() && !b.probing {
                b.probing = true;
                t.probes.push(i);
            }
        }
        // Probe writability by writing back one byte just read, in the same call: the same
        // value, but Xen checks write permission. The byte lies inside the write access that
        // planned the probe, so no byte outside it is ever written (a concurrent scope writing
        // a neighbouring byte of the page keeps its value). It is the first byte of the access
        // this call copies in, when there is one (the copy-in before the probe fills it);
        // otherwise the access's first byte is read into `bytes` and written back from there,
        // so no stale bounce byte ever reaches the guest.
        t.bytes.resize(t.probes.len(), 0);
        for n in 0..t.probes.len() {
            let i = t.probes[n];
            let p = &pieces[i];
            let key = p.key;
            let Some(b) = self.bounce(key) else { continue };
            if b.pending.is_none() {
                continue;
            }
            let fresh = p
                .span
                .minus(b.valid)
                .into_iter()
                .find(|s| !s.is_empty())
                .map(|s| s.lo);
            match fresh {
                Some(lo) => {
                    let byte = Span { lo, hi: lo + 1 };
                    let local = in_page(b.buf, byte);
                    // The copy-in before it fills this byte; should it fail while the write
                    // succeeds, the guest gets a zero, never a byte of an earlier request.
                    // SAFETY: the byte is in this page's bounce memory, outside `valid`.
                    unsafe { local.write(0) };
                    t.segs.push(seg(key, byte, local, CopyDirection::ToGuest));
                }
                None => {
                    let byte = Span {
                        lo: p.span.lo,
                        hi: p.span.lo + 1,
                    };
                    // In bounds: `bytes` has one byte per probe, and is not resized again
                    // before the call.
                    let local = t.bytes.as_mut_ptr().wrapping_add(n);
                    t.segs.push(seg(key, byte, local, CopyDirection::FromGuest));
                    t.owners.push(i);
                    t.segs.push(seg(key, byte, local, CopyDirection::ToGuest));
                }
            }
            t.owners.push(i);
        }
        if !t.segs.is_empty() {
            // SAFETY: every local range lies in bounce memory this scope owns and that no slice
            // covers yet (copy-ins go to bytes outside `valid`; probes only read), or in
            // `t.bytes`, alive and unmoved until after the call.
            if let Err(e) = unsafe { dev.grant_copy(&mut t.segs) } {
                // The call failed as a whole: no page counts as fetched. (Real gntdev copies in
                // batches of 16 segments, so some bytes may have landed, but only outside
                // `valid`, where nothing reads them.)
                for key in &t.touched {
                    if let Some(b) = self.bounce_mut(*key) {
                        b.failed = true;
                    }
                }
                self.commit(&t.touched);
                return Err(e.into());
            }
        }
        // Statuses: a failed copy-in marks its page (which then keeps its old valid span).
        let mut first_err = None;
        for (s, &i) in t.segs.iter().zip(&t.owners) {
            let p = &pieces[i];
            let Some(b) = self.bounce_mut(p.key) else {
                continue;
            };
            if s.direction == CopyDirection::ToGuest {
                // The probe. The page was readable (its copy-in, earlier in the call, did not
                // fail), so a refused write means a read-only grant: Xen 4.17 answers
                // GNTST_general_error here, not GNTST_permission_denied. Anything else tells
                // nothing; the page stays unprobed.
                b.writable = match s.status {
                    GNTST_OKAY => Some(true),
                    GNTST_GENERAL_ERROR | GNTST_PERMISSION_DENIED if !b.failed => Some(false),
                    _ => b.writable,
                };
            } else if s.status != GNTST_OKAY {
                b.failed = true;
                if s.status != GNTST_EAGAIN {
                    b.bad = s.status;
                }
                first_err.get_or_insert_with(|| copy_error(p, s.status));
            }
        }
        self.commit(&t.touched);
        if !strict {
            return Ok(());
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        for p in pieces.iter().filter(|p| p.write) {
            if self.bounce(p.key).and_then(|b| b.writable) == Some(false) {
                return Err(read_only(p));
            }
        }
        Ok(())
    }

    /// Ends a fetch: pages whose copy-in landed take their planned valid span, the others
    /// keep theirs (their bounce page stays for the next try); transient state is reset.
    fn commit(&mut self, touched: &[GrantPage]) {
        for key in touched {
            let Some(b) = self.bounce_mut(*key) else {
                continue;
            };
            let failed = b.failed;
            if !failed {
                b.valid = b.pending.unwrap_or(b.valid);
            }
            b.pending = None;
            b.probing = false;
            b.failed = false;
        }
    }

    /// Gives every page of `pieces` without a bounce buffer one.
    fn alloc_bounces(&mut self, pieces: &[Piece]) -> Result<(), RequestError> {
        for p in pieces {
            if self.pages.contains_key(&p.key) {
                continue;
            }
            let page = BouncePage::take().ok_or(RequestError::OutOfMemory {
                pages: pieces.len(),
            })?;
            self.pages.insert(
                p.key,
                PageSlot {
                    bounce: Some(Bounce::new(page.ptr())),
                    ..PageSlot::default()
                },
            );
            self.bounce_pages.push(page);
        }
        Ok(())
    }

    fn bounce(&self, key: GrantPage) -> Option<Bounce> {
        self.pages.get(&key).and_then(|s| s.bounce)
    }

    fn bounce_mut(&mut self, key: GrantPage) -> Option<&mut Bounce> {
        self.pages.get_mut(&key).and_then(|s| s.bounce.as_mut())
    }

    /// Maps the pages of `pieces` that lack a mapping good for the access, all in one
    /// MAP_GRANT_REF + one mmap. If that fails, `strict` narrows it down to name the page at
    /// fault (and tells a read-only grant from an ungranted ref); prefetch just leaves them.
    pub(super) fn fetch_by_map(
        &mut self,
        dev: &XenHandle,
        pieces: &[Piece],
        write: bool,
        strict: bool,
    ) -> Result<(), RequestError> {
        let prot = if write {
            Protection::ReadWrite
        } else {
            Protection::ReadOnly
        };
        let mut need: Vec<&Piece> = Vec::new();
        let mut seen = KeySet::default();
        for p in pieces {
            let slot = self.pages.get(&p.key).copied().unwrap_or_default();
            let ok = if write {
                slot.rw.is_some()
            } else {
                slot.is_mapped()
            };
            // A page refused at a touch is not tried again in this scope (the touch that
            // reaches here is refused before, in `fetch`).
            if !ok && slot.refused(write).is_none() && seen.insert(p.key) {
                need.push(p);
            }
        }
        if need.is_empty() {
            return Ok(());
        }
        if strict {
            self.map_or_blame(dev, &need, prot)
        } else {
            let keys: Vec<GrantPage> = need.iter().map(|p| p.key).collect();
            // Prefetch is best effort: a failure is found again, and named, at the touch.
            self.map_halving(dev, &keys, prot);
            Ok(())
        }
    }

    /// Maps `keys` in one map; if gntdev refuses (one bad page fails the whole map), maps each
    /// half the same way, keeping what maps. With k bad pages among n this makes at most
    /// 1 + 2k⌈log2 n⌉ map attempts, so one bad page does not turn a batch into one map per
    /// page (or per access at the touch).
    fn map_halving(&mut self, dev: &XenHandle, keys: &[GrantPage], prot: Protection) {
        if keys.is_empty() || self.map_pages(dev, keys, prot).is_ok() {
            return;
        }
        if keys.len() > 1 {
            let (left, right) = keys.split_at(keys.len() / 2);
            self.map_halving(dev, left, prot);
            self.map_halving(dev, right, prot);
        }
    }

    /// Maps `need` in one map; if gntdev refuses (one bad page fails the whole map), halves
    /// the range until the first bad page is found and named, keeping what mapped: a few
    /// calls per bad page instead of one map per page.
    fn map_or_blame(
        &mut self,
        dev: &XenHandle,
        need: &[&Piece],
        prot: Protection,
    ) -> Result<(), RequestError> {
        let keys: Vec<GrantPage> = need.iter().map(|p| p.key).collect();
        match self.map_pages(dev, &keys, prot) {
            Ok(()) => Ok(()),
            Err(e) => match need {
                [] => Ok(()),
                [p] => {
                    let err = self.blame(dev, p, prot, e);
                    self.remember_refusal(p, prot, &err);
                    Err(err)
                }
                _ => {
                    let (left, right) = need.split_at(need.len() / 2);
                    self.map_or_blame(dev, left, prot)?;
                    self.map_or_blame(dev, right, prot)
                }
            },
        }
    }

    /// One MAP_GRANT_REF + one mmap for `keys`, recorded in the slots.
    fn map_pages(
        &mut self,
        dev: &XenHandle,
        keys: &[GrantPage],
        prot: Protection,
    ) -> Result<(), crate::device::DeviceError> {
        let index = dev.grant_map_refs(keys)?;
        let base = match dev.grant_mmap(index, keys.len(), prot) {
            Ok(b) => b,
            Err(e) => {
                let _ = dev.grant_unmap_refs(index, keys.len());
                return Err(e);
            }
        };
        self.maps.push(LiveMap {
            base,
            index,
            pages: keys.len(),
        });
        for (i, key) in keys.iter().enumerate() {
            // SAFETY: page `i` of a mapping of `keys.len()` pages.
            let page = unsafe { base.add(i * XEN_PAGE_SIZE) };
            let slot = self.pages.entry(*key).or_default();
            match prot {
                Protection::ReadOnly => slot.ro = Some(page),
                Protection::ReadWrite => slot.rw = Some(page),
            }
        }
        Ok(())
    }

    /// Remembers for the rest of the scope that mapping `p`'s page with `prot` failed with
    /// `err` (when the failure is not one that may pass).
    fn remember_refusal(&mut self, p: &Piece, prot: Protection, err: &RequestError) {
        let refusal = match err {
            RequestError::ReadOnlyGrant { .. } => Some(MapRefusal::ReadOnly),
            RequestError::GrantMap { source, .. } => MapRefusal::of(source),
            _ => None,
        };
        let Some(refusal) = refusal else { return };
        let slot = self.pages.entry(p.key).or_default();
        match prot {
            Protection::ReadOnly => slot.ro_refused = Some(refusal),
            Protection::ReadWrite => slot.rw_refused = Some(refusal),
        }
    }

    /// Names the failure of mapping one page: a writable map refused where a read-only one
    /// works means the guest granted it read-only.
    fn blame(
        &mut self,
        dev: &XenHandle,
        p: &Piece,
        prot: Protection,
        e: crate::device::DeviceError,
    ) -> RequestError {
        // gntdev refuses a writable map of a read-only grant with EINVAL; other errnos
        // (ENOMEM, limits) say nothing about the grant.
        let slot = self.pages.get(&p.key).copied().unwrap_or_default();
        if prot == Protection::ReadWrite
            && e.errno() == Some(libc::EINVAL)
            && slot.ro_refused.is_none()
        {
            if slot.ro.is_some() {
                return read_only(p);
            }
            match self.map_pages(dev, &[p.key], Protection::ReadOnly) {
                Ok(()) => return read_only(p),
                Err(ro) => {
                    // Neither protection maps: remember the read-only refusal too.
                    if let Some(r) = MapRefusal::of(&ro) {
                        self.pages.entry(p.key).or_default().ro_refused = Some(r);
                    }
                }
            }
        }
        RequestError::GrantMap {
            gpa: p.gpa,
            domid: p.key.domid,
            gref: p.key.gref,
            source: e,
        }
    }

    /// Whether `p` can be served from what the scope already holds, without a device call.
    fn ready(&self, p: &Piece) -> bool {
        match self.pages.get(&p.key) {
            Some(PageSlot {
                bounce: Some(b), ..
            }) => {
                let may_write = match b.writable {
                    Some(w) => w,
                    // Never probed: only `Overwrite` writes without a probe.
                    None => self.writable == WritableBuffers::Overwrite,
                };
                b.valid.hull(p.span) == b.valid && (!p.write || may_write)
            }
            Some(s) if p.write => s.rw.is_some(),
            Some(s) => s.is_mapped(),
            None => false,
        }
    }

    /// Slices for fetched pieces, appended to `out`, noting written bounce bytes.
    /// Neighbouring pages are merged only inside one mapping (never across allocations).
    fn slices_for<'a>(
        &mut self,
        pieces: &[Piece],
        out: &mut SliceBuf<'a>,
    ) -> Result<(), RequestError> {
        let mut run: Option<(NonNull<u8>, usize, Option<usize>)> = None; // (start, len, map)
        for p in pieces {
            let slot = self.pages.get_mut(&p.key);
            let (page, bounced) = match slot {
                Some(PageSlot {
                    bounce: Some(b), ..
                }) => (Some(b.buf), true),
                Some(s) if p.write => (s.rw, false),
                Some(s) => (s.rw.or(s.ro), false),
                None => (None, false),
            };
            // A fetch that succeeded left every piece served; anything else is our bug, which
            // must become an error, not a short read.
            let page = page.ok_or(RequestError::NotFetched { gpa: p.gpa })?;
            if bounced && p.write {
                self.note_write(p);
            }
            let map = if bounced { None } else { self.map_of(page) };
            let ptr = in_page(page, p.span);
            let len = usize::from(p.span.hi - p.span.lo);
            match &mut run {
                Some((start, n, m))
                    if m.is_some() && *m == map && start.as_ptr().wrapping_add(*n) == ptr =>
                {
                    *n += len
                }
                _ => {
                    if let Some((start, n, _)) = run.take() {
                        out.push(Ok(slice(start, n)));
                    }
                    // In bounds: `in_page` stays inside the page.
                    let start = NonNull::new(ptr).unwrap_or(page);
                    run = Some((start, len, map));
                }
            }
        }
        if let Some((start, n, _)) = run {
            out.push(Ok(slice(start, n)));
        }
        Ok(())
    }

    /// Index of the scope's mapping holding `page`, if it is a mapped page.
    fn map_of(&self, page: NonNull<u8>) -> Option<usize> {
        let a = page.as_ptr() as usize;
        self.maps.iter().position(|m| {
            let base = m.base.as_ptr() as usize;
            a >= base && a < base + m.pages * XEN_PAGE_SIZE
        })
    }
}

/// A slice of `len` bytes at `start`, inside bounce memory or a mapping the scope owns.
fn slice<'a>(start: NonNull<u8>, len: usize) -> VolatileSlice<'a> {
    // SAFETY: `start..start+len` lies in one bounce page or one mapping owned by the scope,
    // which outlives `'a` (the caller ties `'a` to a borrow of the scope; see module docs).
    unsafe { VolatileSlice::new(start.as_ptr(), len) }
}

/// A segment for bytes `part` of grant page `key`, to or from `local`.
fn seg(key: GrantPage, part: Span, local: *mut u8, direction: CopyDirection) -> CopySegment {
    CopySegment {
        grant: key,
        offset: part.lo,
        len: part.hi - part.lo,
        local,
        direction,
        status: GNTST_OKAY,
    }
}

/// Where bytes `part` of a page sit in its bounce page `buf` (`part.lo < 4096`: in bounds).
fn in_page(buf: NonNull<u8>, part: Span) -> *mut u8 {
    buf.as_ptr().wrapping_add(usize::from(part.lo))
}

fn copy_error(p: &Piece, status: i16) -> RequestError {
    match status {
        GNTST_BAD_GNTREF => RequestError::UnknownRef {
            gpa: p.gpa,
            domid: p.key.domid,
            gref: p.key.gref,
        },
        status => RequestError::GrantCopy {
            gpa: p.gpa,
            gref: p.key.gref,
            status,
        },
    }
}

/// The error of a touch of `p` whose map was refused earlier in the scope: the same one the
/// first touch got.
fn refusal_error(p: &Piece, r: MapRefusal) -> RequestError {
    match r {
        MapRefusal::ReadOnly => read_only(p),
        MapRefusal::Failed { call, errno } => RequestError::GrantMap {
            gpa: p.gpa,
            domid: p.key.domid,
            gref: p.key.gref,
            source: crate::device::DeviceError::sys(call, errno),
        },
    }
}

fn read_only(p: &Piece) -> RequestError {
    RequestError::ReadOnlyGrant {
        gpa: p.gpa,
        domid: p.key.domid,
        gref: p.key.gref,
    }
}
