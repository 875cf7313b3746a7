//! Packets in descriptor chains: a packet is a header then its payload, laid over the chain's
//! readable (tx) or writable (rx) buffers in order, however the guest split them (Linux
//! uses one buffer for both since 6.2, two before).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::packet::{Header, PacketError, HDR_LEN};
use crate::request::RequestMemory;

/// Why a chain could not be read or written as a packet.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The packet itself is malformed.
    #[error(transparent)]
    Packet(#[from] PacketError),
    /// Guest memory refused an access (a ref never granted, an address outside memory).
    #[error("guest memory at {addr:#x}: {err}")]
    Memory {
        /// Guest address of the access.
        addr: u64,
        /// vm-memory's error.
        err: vm_memory::GuestMemoryError,
    },
    /// A receive chain with fewer writable bytes than a header.
    #[error("receive chain holds {0} writable bytes, less than a 44-byte header")]
    NoRoom(usize),
}

/// The buffers of one direction of a chain, as one byte stream.
#[derive(Debug, Default, Clone)]
pub struct Segments(Vec<(u64, usize)>);

impl Segments {
    /// The device-writable buffers of `descs` (`writable`), or the device-readable ones.
    pub fn of<'a>(descs: impl IntoIterator<Item = &'a Descriptor>, writable: bool) -> Self {
        Segments(
            descs
                .into_iter()
                .filter(|d| d.is_write_only() == writable && d.len() > 0)
                .map(|d| (d.addr().0, d.len() as usize))
                .collect(),
        )
    }

    /// Bytes in all the buffers.
    pub fn len(&self) -> usize {
        self.0.iter().map(|s| s.1).sum()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f(guest address, range of buf)` for each piece of `[offset, offset+len)`.
    fn pieces(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), ChainError>,
    ) -> Result<(), ChainError> {
        let (mut skip, mut done) = (offset, 0);
        for &(addr, n) in &self.0 {
            if done == len {
                break;
            }
            if skip >= n {
                skip -= n;
                continue;
            }
            let take = (n - skip).min(len - done);
            // A guest address near the top of the space must not wrap (or panic).
            let at = addr.checked_add(skip as u64).ok_or(ChainError::Memory {
                addr,
                err: vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(addr)),
            })?;
            f(at, done..done + take)?;
            done += take;
            skip = 0;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes from stream offset `offset` (the caller checked the length).
    pub fn read(
        &self,
        mem: &RequestMemory<'_>,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        self.pieces(offset, buf.len(), |addr, r| {
            mem.read_slice(&mut buf[r], GuestAddress(addr))
                .map_err(|err| ChainError::Memory { addr, err })
        })
    }

    /// Writes `data` at stream offset `offset` (the caller checked the room).
    pub fn write(
        &self,
        mem: &RequestMemory<'_>,
        offset: usize,
        data: &[u8],
    ) -> Result<(), ChainError> {
        self.pieces(offset, data.len(), |addr, r| {
            mem.write_slice(&data[r], GuestAddress(addr))
                .map_err(|err| ChainError::Memory { addr, err })
        })
    }
}

/// Reads the header of a tx chain: the header and the readable bytes after it.
pub fn read_header(
    mem: &RequestMemory<'_>,
    segs: &Segments,
) -> Result<(Header, usize), ChainError> {
    let total = segs.len();
    if total < HDR_LEN {
        return Err(PacketError::Short(total).into());
    }
    let mut b = [0u8; HDR_LEN];
    segs.read(mem, 0, &mut b)?;
    Ok((Header::from_bytes(&b), total - HDR_LEN))
}

/// Writes one packet (header, then `payload`) into an rx chain's writable buffers; returns
/// the used length.
pub fn write_packet(
    mem: &RequestMemory<'_>,
    segs: &Segments,
    hdr: &Header,
    payload: &[u8],
) -> Result<u32, ChainError> {
    let room = segs.len();
    if room < HDR_LEN + payload.len() {
        return Err(ChainError::NoRoom(room));
    }
    segs.write(mem, 0, &hdr.to_bytes())?;
    if !payload.is_empty() {
        segs.write(mem, HDR_LEN, payload)?;
    }
    // At most 44 + 64 KiB: the caller sized the payload.
    Ok(u32::try_from(HDR_LEN + payload.len()).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::RegionTable;

    #[test]
    fn an_address_at_the_top_of_the_space_is_an_error_not_a_wrap() {
        let table = RegionTable::from_regions(Vec::new()).expect("empty table");
        let mem = RequestMemory::new(&table);
        let segs = Segments(vec![(u64::MAX - 1, 8), (0x1000, 8)]);
        let mut buf = [0u8; 12];
        // Offset 4 starts past the end of the first buffer's addresses.
        assert!(matches!(
            segs.read(&mem, 4, &mut buf),
            Err(ChainError::Memory { .. })
        ));
        assert!(matches!(
            read_header(&mem, &segs),
            Err(ChainError::Packet(PacketError::Short(16)))
        ));
    }
}
