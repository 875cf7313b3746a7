//! The block-like virtio workload the benchmarks run (here, on emulated Xen, and on real Xen):
//! per request, pop a chain, read a 16-byte header, write 4 KiB of data and a 1-byte status,
//! add_used. The "driver" side republishes a fixed set of pre-granted requests.
//!
//! Not part of the library: this crate (`bench/`, `publish = false`) holds the workload and
//! the rows ([`BenchRow::all`]) that the emulated table (`cargo run --release -p
//! xen-vhost-bench`), criterion (`cargo bench -p xen-vhost-bench`) and the real-Xen bench in
//! `ci/xen/dom0-tests` all report.

pub mod in_advance;

use std::io::Write;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError};

use xen_vhost_mem::xen_page::XEN_PAGE_SIZE;
use xen_vhost_mem::{RegionTable, RequestError, RequestMemory, Strategy, WritableBuffers};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Header bytes the device reads.
pub const HEADER_LEN: u32 = 16;
/// Data bytes the device writes.
pub const DATA_LEN: u32 = 4096;

/// How the device side reaches on-demand grant buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// vm-memory `xen`'s behaviour: every access maps and unmaps its pages.
    PerAccess,
    /// One request scope per request, pages mapped on first touch.
    Request,
    /// One request scope per batch, every page mapped up front (one map per protection).
    Batched,
    /// One request scope per batch, grant copy (one ioctl each way).
    GrantCopy,
    /// The default strategy ([`Strategy::default`]), batched.
    Default,
    /// Grant copy, batched, with [`WritableBuffers::Overwrite`]: the device declares that it
    /// overwrites the buffers it writes.
    Overwrite,
}

impl Mode {
    /// All modes, in table order.
    pub const ALL: [Mode; 6] = [
        Mode::PerAccess,
        Mode::Request,
        Mode::Batched,
        Mode::GrantCopy,
        Mode::Default,
        Mode::Overwrite,
    ];

    /// The label used in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Mode::PerAccess => "per-access",
            Mode::Request => "request",
            Mode::Batched => "batched",
            Mode::GrantCopy => "grant-copy",
            Mode::Default => "default",
            Mode::Overwrite => "overwrite",
        }
    }
}

/// One benchmark row: a label, the mode, and whether the buffers are mapped in advance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchRow {
    /// `Mode::label`, or "premapped" for the ceiling.
    pub label: &'static str,
    /// How the device reaches on-demand buffers.
    pub mode: Mode,
    /// Buffers in a region mapped in advance: zero syscalls per request, the ceiling.
    pub premapped: bool,
}

impl BenchRow {
    /// Every mode on on-demand buffers, then the premapped ceiling: the rows every benchmark
    /// of the block workload reports.
    pub fn all() -> impl Iterator<Item = BenchRow> {
        Mode::ALL
            .iter()
            .map(|&mode| BenchRow {
                label: mode.label(),
                mode,
                premapped: false,
            })
            .chain([BenchRow {
                label: "premapped",
                mode: Mode::Batched,
                premapped: true,
            }])
    }
}

/// Guest addresses of one request's three buffers.
#[derive(Clone, Copy, Debug)]
pub struct BlockBuffers {
    /// 16-byte header (device reads).
    pub header: u64,
    /// 4 KiB data (device writes).
    pub data: u64,
    /// 1-byte status (device writes).
    pub status: u64,
}

/// Why a workload step failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// Queue setup or ring access failed.
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// A guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
    /// Ending a request scope failed.
    #[error("request scope: {0}")]
    Request(#[from] RequestError),
    /// Reading or writing a chain failed.
    #[error("chain I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Fewer chains were available than published.
    #[error("popped {popped} chains, expected {expected}")]
    Short {
        /// Popped.
        popped: usize,
        /// Published.
        expected: usize,
    },
    /// More requests or a larger batch than the ring holds.
    #[error("{requests} requests need a queue of {needed} descriptors; the ring has {size}")]
    TooMany {
        /// Requests asked for.
        requests: usize,
        /// Descriptors needed.
        needed: usize,
        /// Queue size.
        size: u16,
    },
}

/// A split virtqueue at `ring_gpa` over `table` with `requests` published round-robin.
#[derive(Debug)]
pub struct BlockWorkload<'t> {
    table: &'t RegionTable,
    queue: Queue,
    size: u16,
    avail: GuestAddress,
    requests: usize,
    next: usize,
    avail_idx: u16,
}

impl<'t> BlockWorkload<'t> {
    /// Bytes of ring memory a queue of `size` needs (descriptors, avail, used).
    pub fn ring_bytes(size: u16) -> u64 {
        let s = u64::from(size);
        let used = (16 * s + 6 + 2 * s).next_multiple_of(4);
        used + 6 + 8 * s
    }

    /// Writes the descriptor table for `requests` (3 descriptors each) and sets up the queue.
    pub fn new(
        table: &'t RegionTable,
        ring_gpa: u64,
        size: u16,
        requests: &[BlockBuffers],
    ) -> Result<Self, WorkloadError> {
        let needed = requests.len() * 3;
        if needed > usize::from(size) {
            return Err(WorkloadError::TooMany {
                requests: requests.len(),
                needed,
                size,
            });
        }
        let desc = GuestAddress(ring_gpa);
        let avail = GuestAddress(ring_gpa + 16 * u64::from(size));
        let used = GuestAddress((avail.0 + 6 + 2 * u64::from(size)).next_multiple_of(4));
        for (i, r) in requests.iter().enumerate() {
            let head = (3 * i) as u16;
            let descs = [
                (r.header, HEADER_LEN, F_NEXT),
                (r.data, DATA_LEN, F_NEXT | F_WRITE),
                (r.status, 1, F_WRITE),
            ];
            for (j, (addr, len, flags)) in descs.into_iter().enumerate() {
                let next = if flags & F_NEXT != 0 {
                    head + j as u16 + 1
                } else {
                    0
                };
                let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
                table.write_obj(d, desc.unchecked_add(16 * u64::from(head + j as u16)))?;
            }
        }
        table.write_obj(0u16, avail)?;
        table.write_obj(0u16, avail.unchecked_add(2))?;
        table.write_obj(0u32, used)?;
        let mut queue = Queue::new(size)?;
        queue.try_set_desc_table_address(desc)?;
        queue.try_set_avail_ring_address(avail)?;
        queue.try_set_used_ring_address(used)?;
        queue.set_ready(true);
        Ok(BlockWorkload {
            table,
            queue,
            size,
            avail,
            requests: requests.len(),
            next: 0,
            avail_idx: 0,
        })
    }

    /// The driver publishes `batch` requests; the device serves them in `mode`.
    pub fn run_batch(&mut self, mode: Mode, batch: usize) -> Result<(), WorkloadError> {
        for _ in 0..batch {
            let head = (3 * self.next) as u16;
            self.next = (self.next + 1) % self.requests.max(1);
            let slot = u64::from(self.avail_idx % self.size);
            self.table
                .write_obj(head, self.avail.unchecked_add(4 + 2 * slot))?;
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.table
            .write_obj(self.avail_idx, self.avail.unchecked_add(2))?;
        let table = self.table;
        let chains: Vec<DescriptorChain<&RegionTable>> =
            std::iter::from_fn(|| self.queue.pop_descriptor_chain(table)).collect();
        if chains.len() != batch {
            return Err(WorkloadError::Short {
                popped: chains.len(),
                expected: batch,
            });
        }
        let heads: Vec<u16> = chains.iter().map(|c| c.head_index()).collect();
        match mode {
            Mode::PerAccess => chains
                .into_iter()
                .try_for_each(|c| serve_per_access(table, c))?,
            Mode::Request => {
                for c in chains {
                    let mem = RequestMemory::with_strategy(table, Strategy::Map);
                    serve(&mem, c)?;
                    mem.finish()?;
                }
            }
            Mode::Batched | Mode::GrantCopy | Mode::Default | Mode::Overwrite => {
                let strategy = match mode {
                    Mode::Batched => Strategy::Map,
                    Mode::GrantCopy | Mode::Overwrite => Strategy::GrantCopy,
                    _ => Strategy::default(),
                };
                let writable = if mode == Mode::Overwrite {
                    WritableBuffers::Overwrite
                } else {
                    WritableBuffers::CopyIn
                };
                let mem = RequestMemory::with_strategy(table, strategy).writable_buffers(writable);
                mem.prefetch_chains(&chains)?;
                for c in chains {
                    serve(&mem, c)?;
                }
                mem.finish()?;
            }
        }
        // Every mapping of these requests is gone before their used entries are written.
        for h in heads {
            self.queue.add_used(table, h, DATA_LEN + 1)?;
        }
        Ok(())
    }
}

/// The device's work on one chain, through request-scoped memory.
fn serve(
    mem: &RequestMemory<'_>,
    chain: DescriptorChain<&RegionTable>,
) -> Result<(), WorkloadError> {
    let mut r = Reader::new(mem, chain.clone())?;
    let _header: [u8; HEADER_LEN as usize] = r.read_obj()?;
    let mut w = Writer::new(mem, chain)?;
    w.write_all(&[0xd5; DATA_LEN as usize])?;
    w.write_obj(0u8)?;
    Ok(())
}

/// The same work with a map/unmap around every access, as vm-memory's `xen` feature does.
fn serve_per_access(
    table: &RegionTable,
    chain: DescriptorChain<&RegionTable>,
) -> Result<(), WorkloadError> {
    let data = [0xd5u8; DATA_LEN as usize];
    for d in chain {
        let mem = RequestMemory::with_strategy(table, Strategy::Map);
        if d.is_write_only() {
            let n = (d.len() as usize).min(data.len());
            mem.write_slice(&data[..n], d.addr())?;
        } else {
            let mut h = [0u8; HEADER_LEN as usize];
            let n = (d.len() as usize).min(h.len());
            mem.read_slice(&mut h[..n], d.addr())?;
        }
        mem.finish()?;
    }
    Ok(())
}

/// Queue size used by the benchmarks.
pub const QUEUE_SIZE: u16 = 256;
/// Requests a daemon finds per kick when it drains the whole avail ring in the benchmarks.
pub const DRAIN_BATCH: usize = 64;

/// A guest on emulated Xen ready for [`BlockWorkload`]: a ring region mapped in advance and
/// `requests` pre-granted requests (header read-only with content, data and status writable),
/// in an on-demand region or, with `premapped`, in a region mapped in advance (the ceiling).
pub fn emulated_block_guest(
    sim: &xen_vhost_mem::testing::GuestSim,
    requests: usize,
    premapped: bool,
) -> Result<(RegionTable, u64, Vec<BlockBuffers>), Box<dyn std::error::Error>> {
    use xen_vhost_mem::testing::Guest as _;
    use xen_vhost_mem::XenRegion;
    let ring_pages = BlockWorkload::ring_bytes(QUEUE_SIZE).div_ceil(XEN_PAGE_SIZE as u64) as usize;
    let ring = sim.grant(ring_pages, false)?;
    let mut bufs = Vec::with_capacity(requests);
    let mut first = None;
    for _ in 0..requests {
        // A region mapped in advance is mapped writable, so the ceiling grants headers
        // writable too; on demand, they are read-only as Linux grants them.
        let h = sim.grant(1, !premapped)?;
        sim.write(&h, 0, &[0x11; HEADER_LEN as usize])?;
        let d = sim.grant(1, false)?;
        let s = sim.grant(1, false)?;
        first.get_or_insert(h);
        bufs.push(BlockBuffers {
            header: h.gpa(0),
            data: d.gpa(0),
            status: s.gpa(0),
        });
    }
    let ring_gpa = ring.gpa(0);
    let ring_region = sim.in_advance_region(
        ring_gpa,
        ring_pages as u64 * XEN_PAGE_SIZE as u64,
        0x7000_0000,
    );
    let first_ref = ring.first_ref + ring_pages as u32;
    let buffers = if premapped {
        let gpa = xen_vhost_mem::xen_page::grant_addr(first_ref, 0);
        sim.in_advance_region(gpa, requests as u64 * 3 * XEN_PAGE_SIZE as u64, 0x8000_0000)
    } else {
        sim.on_demand_region(first_ref, 1 << 20)
    };
    let table = RegionTable::from_regions(vec![
        XenRegion::new(ring_region, None, Some(&sim.dev))?,
        XenRegion::new(buffers, None, Some(&sim.dev))?,
    ])?;
    Ok((table, ring_gpa, bufs))
}
