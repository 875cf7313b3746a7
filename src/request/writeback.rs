//! Exact write-back: which bytes of bounce pages go back to the guest when a scope ends.
//!
//! # The rule
//!
//! Only bytes the device wrote are copied back, as one grant-copy segment per written span
//! (still one ioctl per scope). The scope cannot see a write through a `VolatileSlice` (it is
//! `Copy`, without `Drop`), so "written" means:
//!
//! - every byte of a slice handed out by an access with `Permissions::Write` (one
//!   `get_slices` call, as `write_slice`, `write_obj`, `Writer::new` make) **that succeeded**:
//!   the access returned no error. Bytes between two written spans of a page are not written
//!   back, so two scopes alive at once (two queues) that write disjoint bytes of one page both
//!   land, whatever order they finish in;
//! - an access that reports an error (its buffer runs into an ungranted or read-only page, off
//!   its region, ...) counts as writing nothing: none of its slices' bytes go back, even those
//!   before the bad page that vm-memory may already have written;
//! - [`RequestMemory::discard_writes`] un-writes a range: a device calls it for the
//!   device-writable buffers of a request it fails after having asked for them (a `Writer`
//!   whose chain turned out bad further on, a backend read that failed). This matters with
//!   [`WritableBuffers::Overwrite`](super::WritableBuffers::Overwrite), whose writable bytes
//!   start zeroed instead of copied in: without it, those zeros would replace the guest's
//!   bytes. With `CopyIn` the bytes hold what was copied in, so writing them back is harmless
//!   unless another scope writes the same bytes meanwhile.
//!
//! Pages fetched by mapping ([`Strategy::Map`](super::Strategy::Map), or `Auto` for large
//! buffers) are outside this: writes go straight to the guest.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::access::{pieces, Piece};
use super::pages::Span;
use super::{RequestMemory, ScopeState};
use crate::device::{CopyDirection, CopySegment, GrantPage, GNTST_OKAY};

/// Written spans a page holds inline before they move to the scope's spill map.
const DIRTY_INLINE: usize = 4;

/// The written spans of one bounce page: sorted, disjoint and not touching (neighbours are
/// merged). Up to [`DIRTY_INLINE`] live here; more move to [`ScopeState::spill`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Dirty {
    spans: [Span; DIRTY_INLINE],
    n: u8,
    /// The spans live in the scope's spill map instead.
    spilled: bool,
}

impl Dirty {
    /// Nothing written.
    pub(crate) fn is_empty(&self) -> bool {
        self.n == 0 && !self.spilled
    }

    fn inline(&self) -> &[Span] {
        &self.spans[..usize::from(self.n)]
    }

    /// Sets the inline spans to `new`, if they fit.
    fn set(&mut self, new: &[Span]) -> bool {
        if new.len() > DIRTY_INLINE {
            return false;
        }
        self.spans[..new.len()].copy_from_slice(new);
        self.n = new.len() as u8;
        true
    }
}

/// `spans` (sorted, disjoint, not touching) with `s` added, merging what overlaps or touches.
fn insert(spans: &[Span], s: Span, mut push: impl FnMut(Span)) {
    let mut s = s;
    let mut emitted = false;
    for &x in spans {
        if x.hi < s.lo {
            push(x);
        } else if x.lo > s.hi {
            if !emitted {
                push(s);
                emitted = true;
            }
            push(x);
        } else {
            s = s.hull(x);
        }
    }
    if !emitted {
        push(s);
    }
}

/// `spans` without the bytes of `r`.
fn remove(spans: &[Span], r: Span, mut push: impl FnMut(Span)) {
    for &x in spans {
        for part in x.minus(r) {
            if !part.is_empty() {
                push(part);
            }
        }
    }
}

/// Applies `op` to a page's spans, inline when the result fits, in the spill map otherwise.
fn update(
    st: &mut ScopeState,
    key: GrantPage,
    op: impl Fn(&[Span], &mut dyn FnMut(Span)),
) -> Option<()> {
    let b = st.pages.get_mut(&key)?.bounce.as_mut()?;
    if b.dirty.spilled {
        let old = st.spill.get(&key)?;
        let mut new = Vec::with_capacity(old.len() + 1);
        op(old, &mut |s| new.push(s));
        st.spill.insert(key, new);
        return Some(());
    }
    let mut buf = [Span::default(); DIRTY_INLINE + 2];
    let mut k = 0;
    op(b.dirty.inline(), &mut |s| {
        if let Some(slot) = buf.get_mut(k) {
            *slot = s;
        }
        k += 1;
    });
    if k <= buf.len() && b.dirty.set(&buf[..k]) {
        return Some(());
    }
    // More than fit inline: recompute into the spill map (rare: a device writing many
    // separate pieces of one page).
    let mut new = Vec::with_capacity(k);
    op(b.dirty.inline(), &mut |s| new.push(s));
    b.dirty = Dirty {
        spilled: true,
        ..Dirty::default()
    };
    st.spill.insert(key, new);
    Some(())
}

impl ScopeState {
    /// Notes that the current access hands out `p` for writing (bounce pages only); it
    /// counts as written once the access ends without error ([`ScopeState::end_access`]).
    pub(super) fn note_write(&mut self, p: &Piece) {
        self.written.push((p.key, p.span));
    }

    /// Ends an access: its noted writes become written spans if it succeeded, and are
    /// forgotten otherwise.
    pub(super) fn end_access(&mut self, ok: bool) {
        let mut w = std::mem::take(&mut self.written);
        if ok {
            for &(key, span) in &w {
                update(self, key, |old, push| insert(old, span, push));
            }
        }
        w.clear();
        self.written = w;
    }

    /// Forgets writes to `span` of page `key`.
    fn discard(&mut self, key: GrantPage, span: Span) {
        let dirty = self
            .pages
            .get(&key)
            .and_then(|s| s.bounce)
            .is_some_and(|b| !b.dirty.is_empty());
        if dirty {
            update(self, key, |old, push| remove(old, span, push));
        }
    }

    /// Appends one copy-back segment per written span of every writable bounce page.
    pub(super) fn copy_back_segments(&self, segs: &mut Vec<CopySegment>) {
        for (&grant, slot) in &self.pages {
            let Some(b) = slot.bounce else { continue };
            if b.dirty.is_empty() || b.writable == Some(false) {
                continue;
            }
            let spans = if b.dirty.spilled {
                self.spill.get(&grant).map_or(&[][..], Vec::as_slice)
            } else {
                b.dirty.inline()
            };
            for s in spans {
                segs.push(CopySegment {
                    grant,
                    offset: s.lo,
                    len: s.hi - s.lo,
                    // In bounds: a span lies within the page's 4 KiB of bounce memory.
                    local: b.buf.as_ptr().wrapping_add(usize::from(s.lo)),
                    direction: CopyDirection::ToGuest,
                    status: GNTST_OKAY,
                });
            }
        }
    }
}

impl RequestMemory<'_> {
    /// Forgets the device's writes to `[addr, addr + len)` in bounce pages: they will not be
    /// copied back, and the guest keeps its bytes there. A device calls it for the writable
    /// buffers of a request it fails after asking for them (see the module docs of
    /// `request::writeback`); it writes the status byte afterwards, which then counts again.
    ///
    /// Later reads through this scope still see what the device wrote. Mapped pages, regions
    /// mapped in advance and addresses outside every region are left alone (writes there
    /// reached the guest already, or never happened).
    pub fn discard_writes(&self, addr: GuestAddress, len: usize) {
        if !self.table.has_on_demand() {
            return;
        }
        let mut st = self.state.borrow_mut();
        let mut ps = Vec::new();
        let mut cur = addr.0;
        let mut left = len as u64;
        while left > 0 {
            let Some(region) = self.table.find_region(GuestAddress(cur)) else {
                return;
            };
            let off = cur - region.start_addr().0;
            let n = (region.len() - off).min(left);
            if let Some(domid) = region.on_demand_domid() {
                ps.clear();
                // Only pages the scope holds matter; an address past the last ref holds none.
                let _ = pieces(domid, cur, n as usize, true, &mut ps);
                for p in &ps {
                    st.discard(p.key, p.span);
                }
            }
            left -= n;
            match cur.checked_add(n) {
                Some(c) => cur = c,
                None => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{insert, remove, Span};

    fn ins(spans: &[Span], s: Span) -> Vec<Span> {
        let mut v = Vec::new();
        insert(spans, s, |x| v.push(x));
        v
    }

    #[test]
    fn spans_merge_when_they_overlap_or_touch_and_stay_apart_otherwise() {
        let a = ins(&[], Span::new(0, 16));
        let a = ins(&a, Span::new(100, 116));
        assert_eq!(a, [Span::new(0, 16), Span::new(100, 116)]);
        let b = ins(&a, Span::new(50, 66));
        assert_eq!(b.len(), 3);
        assert_eq!(
            ins(&b, Span::new(16, 50)),
            [Span::new(0, 66), Span::new(100, 116)]
        );
        assert_eq!(ins(&b, Span::new(10, 110)), [Span::new(0, 116)]);
        assert_eq!(ins(&b, Span::new(200, 300))[3], Span::new(200, 300));
        let mut r = Vec::new();
        remove(&b, Span::new(8, 60), |x| r.push(x));
        assert_eq!(r, [Span::new(0, 8), Span::new(60, 66), Span::new(100, 116)]);
    }
}
