//! Where the parts of a split virtqueue are, in bytes (virtio 1.2, 2.7): one place for the
//! sizes the handler checks, the worker reads and the test driver writes.

/// The layout of a split virtqueue of `size` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingLayout {
    size: u16,
}

/// Bytes of one descriptor.
pub(crate) const DESC_BYTES: u64 = 16;

impl RingLayout {
    /// A queue of `size` entries.
    pub(crate) fn new(size: u16) -> Self {
        RingLayout { size }
    }

    /// Bytes of the descriptor table: 16 per entry.
    pub(crate) fn desc_table_bytes(self) -> u64 {
        DESC_BYTES * u64::from(self.size)
    }

    /// Bytes of the avail ring: flags, idx, a u16 per entry, `used_event`.
    pub(crate) fn avail_bytes(self) -> u64 {
        6 + 2 * u64::from(self.size)
    }

    /// Bytes of the used ring: flags, idx, an 8-byte element per entry, `avail_event`.
    pub(crate) fn used_bytes(self) -> u64 {
        6 + 8 * u64::from(self.size)
    }

    /// Offset of descriptor `i` in its table.
    pub(crate) fn desc(i: u64) -> u64 {
        DESC_BYTES * i
    }

    /// Offset of the `idx` field in the avail or used ring.
    pub(crate) const IDX: u64 = 2;

    /// Offset of the avail ring's entry for ring position `pos`.
    pub(crate) fn avail_entry(self, pos: u16) -> u64 {
        4 + 2 * u64::from(pos % self.size.max(1))
    }

    /// Offset of the used ring's element for ring position `pos`.
    #[cfg_attr(not(feature = "test-utils"), allow(dead_code))]
    pub(crate) fn used_entry(self, pos: u16) -> u64 {
        4 + 8 * u64::from(pos % self.size.max(1))
    }

    /// Offset of `used_event`, after the avail ring's entries.
    #[cfg_attr(not(feature = "test-utils"), allow(dead_code))]
    pub(crate) fn used_event(self) -> u64 {
        4 + 2 * u64::from(self.size)
    }

    /// Offset of `avail_event`, after the used ring's elements.
    #[cfg_attr(not(feature = "test-utils"), allow(dead_code))]
    pub(crate) fn avail_event(self) -> u64 {
        4 + 8 * u64::from(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::RingLayout;

    #[test]
    fn virtio_split_ring_sizes() {
        let l = RingLayout::new(256);
        assert_eq!(
            (l.desc_table_bytes(), l.avail_bytes(), l.used_bytes()),
            (4096, 518, 2054)
        );
        assert_eq!((l.avail_entry(257), l.used_entry(257)), (6, 12));
        assert_eq!((l.used_event(), l.avail_event()), (516, 2052));
        assert_eq!(RingLayout::desc(3), 48);
    }
}
