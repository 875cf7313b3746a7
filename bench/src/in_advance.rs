//! The path of memory mapped in advance (UNIX regions, as every KVM-style frontend sends them),
//! side by side with vm-memory's `GuestMemoryMmap` over the same memfd ranges:
//!
//! - the block workload (pop a chain, read a 16-byte header, write 4 KiB and a status byte,
//!   add_used) through (a) [`RegionTable`], (b) [`RequestMemory`] as the daemon uses it (one
//!   scope per batch, chains popped through the scope, `prefetch_chains`, serve, `finish`), (c)
//!   `GuestMemoryMmap`, and a plain memcpy of the same bytes as the floor;
//! - 8-byte `read_obj`s spread over a table of 1 and of [`MANY_REGIONS`] regions;
//! - building a table of [`MANY_REGIONS`] regions (ours against `from_ranges_with_files`).
//!
//! The machines are noisy, so every comparison runs in interleaved rounds (the order flipped
//! each round) and reports the median and the spread of the per-round ratios
//! ([`Ratio`]). Table and JSON: `cargo run --release -p xen-vhost-bench -- --in-advance`;
//! criterion: `cargo bench -p xen-vhost-bench --bench in_advance`.

use std::fs::File;
use std::hint::black_box;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap,
};
use xen_vhost_mem::{
    ForeignMapping, RegionDescriptor, RegionKind, RegionTable, RequestMemory, XenRegion,
};

use crate::{BlockWorkload, WorkloadError, DATA_LEN, HEADER_LEN};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Regions in the many-region table: the most a vhost-user frontend may send.
pub const MANY_REGIONS: usize = 509;
/// Bytes per region of the many-region table.
pub const SMALL_REGION: u64 = 64 * 1024;
/// Requests each variant of the block workload keeps published round-robin.
pub const REQUESTS: usize = 64;
/// Queue size of the block workload.
pub const QUEUE: u16 = 256;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const PAGE: u64 = 4096;
/// Low region (rings): gpa 0, 1 MiB, file offset 0.
const LOW: (u64, u64, u64) = (0, 1 << 20, 0);
/// High region (buffers): gpa 1 GiB, 4 MiB, file offset 1 MiB.
const HIGH: (u64, u64, u64) = (1 << 30, 4 << 20, 1 << 20);
/// Ring and buffer area of variant `k`: each variant drives its own queue over the same ranges.
fn ring_gpa(k: usize) -> u64 {
    LOW.0 + k as u64 * 0x1_0000
}
fn buffers_gpa(k: usize) -> u64 {
    HIGH.0 + k as u64 * (1 << 20)
}

/// A memfd of `size` bytes.
pub fn memfd(size: u64) -> Result<File, BoxError> {
    // SAFETY: the name is a NUL-terminated string; the result is checked below.
    let fd = unsafe { libc::memfd_create(c"xen-vhost-bench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size)?;
    Ok(f)
}

/// The descriptor of a UNIX region at `gpa` of `size` bytes, from `offset` of its file.
pub fn unix_desc(gpa: u64, size: u64, offset: u64) -> RegionDescriptor {
    RegionDescriptor {
        guest_phys_addr: gpa,
        size,
        userspace_addr: 0x7f00_0000_0000 + gpa,
        mmap_offset: offset,
        kind: RegionKind::Unix,
    }
}

/// A UNIX region of `file`.
pub fn unix_region(file: &File, gpa: u64, size: u64, offset: u64) -> Result<XenRegion, BoxError> {
    Ok(XenRegion::new(
        unix_desc(gpa, size, offset),
        Some(file),
        None,
    )?)
}

/// The block guest: one memfd, a low region for the rings and a high one for the buffers,
/// mapped by us and by vm-memory.
#[derive(Debug)]
pub struct BlockGuest {
    /// Our table.
    pub table: RegionTable,
    /// vm-memory's.
    pub vm: GuestMemoryMmap,
}

/// Bytes of the block guest's memfd.
pub const BLOCK_MEMFD: u64 = HIGH.2 + HIGH.1;

/// Our table of the block guest's two ranges of `file` (a memfd of [`BLOCK_MEMFD`] bytes).
pub fn block_table(file: &File) -> Result<RegionTable, BoxError> {
    Ok(RegionTable::from_regions(
        [LOW, HIGH]
            .iter()
            .map(|&(g, s, o)| unix_region(file, g, s, o))
            .collect::<Result<_, _>>()?,
    )?)
}

/// vm-memory's map of the same ranges.
pub fn block_vm(file: &Arc<File>) -> Result<GuestMemoryMmap, BoxError> {
    Ok(GuestMemoryMmap::from_ranges_with_files(
        [LOW, HIGH].iter().map(|&(g, s, o)| {
            (
                GuestAddress(g),
                s as usize,
                Some(FileOffset::from_arc(file.clone(), o)),
            )
        }),
    )?)
}

impl BlockGuest {
    /// Maps the two ranges both ways.
    pub fn new() -> Result<Self, BoxError> {
        let file = Arc::new(memfd(BLOCK_MEMFD)?);
        Ok(BlockGuest {
            table: block_table(&file)?,
            vm: block_vm(&file)?,
        })
    }
}

/// A split virtqueue with [`REQUESTS`] block requests published round-robin, over any memory.
#[derive(Debug)]
pub struct Ring {
    queue: Queue,
    avail: GuestAddress,
    next: usize,
    avail_idx: u16,
    heads: Vec<u16>,
    /// (header, data, status) gpas of each request.
    pub requests: Vec<(u64, u64, u64)>,
}

impl Ring {
    /// Writes variant `k`'s descriptor table through `mem` and sets up its queue.
    pub fn new<M: GuestMemory>(mem: &M, k: usize) -> Result<Self, WorkloadError> {
        let gpa = ring_gpa(k);
        let size = QUEUE;
        let desc = GuestAddress(gpa);
        let avail = GuestAddress(gpa + 16 * u64::from(size));
        let used = GuestAddress((avail.0 + 6 + 2 * u64::from(size)).next_multiple_of(4));
        debug_assert!(BlockWorkload::ring_bytes(size) <= 0x1_0000);
        let mut requests = Vec::with_capacity(REQUESTS);
        for i in 0..REQUESTS {
            let base = buffers_gpa(k) + 3 * PAGE * i as u64;
            let r = (base, base + PAGE, base + 2 * PAGE);
            mem.write_slice(&[0x11; HEADER_LEN as usize], GuestAddress(r.0))?;
            let head = (3 * i) as u16;
            let descs = [
                (r.0, HEADER_LEN, F_NEXT),
                (r.1, DATA_LEN, F_NEXT | F_WRITE),
                (r.2, 1, F_WRITE),
            ];
            for (j, (addr, len, flags)) in descs.into_iter().enumerate() {
                let next = if flags & F_NEXT != 0 {
                    head + j as u16 + 1
                } else {
                    0
                };
                let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
                mem.write_obj(d, desc.unchecked_add(16 * u64::from(head + j as u16)))?;
            }
            requests.push(r);
        }
        mem.write_obj(0u16, avail)?;
        mem.write_obj(0u16, avail.unchecked_add(2))?;
        mem.write_obj(0u32, used)?;
        let mut queue = Queue::new(size)?;
        queue.try_set_desc_table_address(desc)?;
        queue.try_set_avail_ring_address(avail)?;
        queue.try_set_used_ring_address(used)?;
        queue.set_ready(true);
        Ok(Ring {
            queue,
            avail,
            next: 0,
            avail_idx: 0,
            heads: Vec::with_capacity(usize::from(size)),
            requests,
        })
    }

    /// The driver's side: publish `batch` requests.
    fn publish<M: GuestMemory>(&mut self, mem: &M, batch: usize) -> Result<(), WorkloadError> {
        for _ in 0..batch {
            let head = (3 * self.next) as u16;
            self.next = (self.next + 1) % REQUESTS;
            let slot = u64::from(self.avail_idx % QUEUE);
            mem.write_obj(head, self.avail.unchecked_add(4 + 2 * slot))?;
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        mem.write_obj(self.avail_idx, self.avail.unchecked_add(2))?;
        Ok(())
    }

    /// Publishes and serves `batch` requests straight on `mem` (a [`RegionTable`] or a
    /// `GuestMemoryMmap`).
    pub fn run_plain<M: GuestMemory<Bitmap = ()>>(
        &mut self,
        mem: &M,
        batch: usize,
    ) -> Result<(), WorkloadError> {
        self.publish(mem, batch)?;
        self.heads.clear();
        while let Some(c) = self.queue.pop_descriptor_chain(mem) {
            self.heads.push(c.head_index());
            serve_chain(mem, c)?;
        }
        self.complete(mem, batch)
    }

    /// Publishes and serves `batch` requests as the daemon's worker does: one request scope
    /// per batch, chains popped through it, `prefetch_chains`, serve, `finish`, add_used.
    pub fn run_scope(&mut self, table: &RegionTable, batch: usize) -> Result<(), WorkloadError> {
        self.publish(table, batch)?;
        let scope = RequestMemory::new(table);
        let mut chains = Vec::with_capacity(batch);
        while let Some(c) = self.queue.pop_descriptor_chain(&scope) {
            chains.push(c);
        }
        self.heads.clear();
        self.heads.extend(chains.iter().map(|c| c.head_index()));
        scope.prefetch_chains(&chains)?;
        for c in chains {
            serve_chain(&scope, c)?;
        }
        scope.finish()?;
        self.complete(table, batch)
    }

    fn complete<M: GuestMemory>(&mut self, mem: &M, batch: usize) -> Result<(), WorkloadError> {
        if self.heads.len() != batch {
            return Err(WorkloadError::Short {
                popped: self.heads.len(),
                expected: batch,
            });
        }
        for &h in &self.heads {
            self.queue.add_used(mem, h, DATA_LEN + 1)?;
        }
        Ok(())
    }
}

/// The data every variant writes: one static buffer, so that where the source sits relative to
/// the destination pages (4 KiB aliasing) is the same for all of them; a copy on each
/// variant's stack made one variant's 4 KiB copy 1.7x slower than another's.
static DATA: [u8; DATA_LEN as usize] = [0xd5; DATA_LEN as usize];

/// The device's work on one chain: read the header, write the data and the status.
fn serve_chain<M, T>(mem: &M, chain: DescriptorChain<T>) -> Result<(), WorkloadError>
where
    M: GuestMemory<Bitmap = ()>,
    T: std::ops::Deref + Clone,
    T::Target: GuestMemory + Sized,
{
    use std::io::Write as _;
    let mut r = Reader::new(mem, chain.clone())?;
    let _header: [u8; HEADER_LEN as usize] = r.read_obj()?;
    let mut w = Writer::new(mem, chain)?;
    w.write_all(black_box(&DATA))?;
    w.write_obj(0u8)?;
    Ok(())
}

/// The floor: the same bytes moved by plain memcpy to and from host addresses.
#[derive(Debug)]
pub struct Floor {
    bufs: Vec<(*const u8, *mut u8, *mut u8)>,
    next: usize,
}

impl Floor {
    /// Host addresses of variant `k`'s requests in `vm`.
    pub fn new(vm: &GuestMemoryMmap, k: usize) -> Result<Self, BoxError> {
        let host = |gpa: u64| vm.get_host_address(GuestAddress(gpa));
        let mut bufs = Vec::with_capacity(REQUESTS);
        for i in 0..REQUESTS {
            let base = buffers_gpa(k) + 3 * PAGE * i as u64;
            bufs.push((
                host(base)?.cast_const(),
                host(base + PAGE)?,
                host(base + 2 * PAGE)?,
            ));
        }
        Ok(Floor { bufs, next: 0 })
    }

    /// Moves the bytes of `batch` requests.
    pub fn run(&mut self, batch: usize) {
        let data = black_box(&DATA);
        for _ in 0..batch {
            let (h, d, s) = self.bufs[self.next];
            self.next = (self.next + 1) % self.bufs.len();
            let mut header = [0u8; HEADER_LEN as usize];
            // SAFETY: the pointers are into `vm`'s mapping of whole pages (which outlives the
            // benchmark), at the starts of three distinct pages; 16, 4096 and 1 bytes fit.
            unsafe {
                std::ptr::copy_nonoverlapping(h, header.as_mut_ptr(), header.len());
                std::ptr::copy_nonoverlapping(data.as_ptr(), black_box(d), data.len());
                std::ptr::write_volatile(s, 0);
            }
            black_box(header);
        }
    }
}

/// Median and spread of per-round ratios.
#[derive(Clone, Copy, Debug)]
pub struct Ratio {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Ratio {
    /// Of `ratios` (not empty).
    pub fn of(mut ratios: Vec<f64>) -> Self {
        ratios.sort_by(f64::total_cmp);
        let n = ratios.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            ratios[n / 2]
        } else {
            (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0
        };
        Ratio {
            median,
            min: ratios.first().copied().unwrap_or(f64::NAN),
            max: ratios.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// One reported row: ns per operation of ours and of the reference, and the per-round ratio
/// `reference / ours` (above 1: ours is faster).
#[derive(Clone, Debug)]
pub struct Row {
    /// What is measured.
    pub bench: &'static str,
    /// Which of ours.
    pub ours: &'static str,
    /// Against what.
    pub reference: &'static str,
    /// Batch (block rows) or region count.
    pub n: usize,
    /// Median ns per operation, ours.
    pub ours_ns: f64,
    /// Median ns per operation, reference.
    pub reference_ns: f64,
    /// Per-round `reference / ours`.
    pub ratio: Ratio,
}

fn median(mut v: Vec<f64>) -> f64 {
    Ratio::of(std::mem::take(&mut v)).median
}

/// Runs `variants` in `rounds` interleaved rounds (order reversed every other round); returns
/// each variant's ns per operation for every round.
fn interleave(
    rounds: usize,
    variants: &mut [&mut dyn FnMut() -> Result<f64, BoxError>],
) -> Result<Vec<Vec<f64>>, BoxError> {
    let n = variants.len();
    let mut out = vec![Vec::with_capacity(rounds); n];
    for r in 0..rounds {
        for j in 0..n {
            let i = if r % 2 == 0 { j } else { n - 1 - j };
            out[i].push(variants[i]()?);
        }
    }
    Ok(out)
}

fn row(
    bench: &'static str,
    ours: &'static str,
    reference: &'static str,
    n: usize,
    ours_t: &[f64],
    ref_t: &[f64],
) -> Row {
    Row {
        bench,
        ours,
        reference,
        n,
        ours_ns: median(ours_t.to_vec()),
        reference_ns: median(ref_t.to_vec()),
        ratio: Ratio::of(ours_t.iter().zip(ref_t).map(|(o, r)| r / o).collect()),
    }
}

pub fn time_ns(ops: usize, f: impl FnOnce() -> Result<(), BoxError>) -> Result<f64, BoxError> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_nanos() as f64 / ops as f64)
}

/// The block workload at `batch`: (a) table, (b) scope, (c) vm-memory, memcpy floor, each
/// `requests` requests per round. Rows: table, scope and memcpy against vm-memory.
pub fn block_rows(batch: usize, rounds: usize, requests: usize) -> Result<Vec<Row>, BoxError> {
    let g = BlockGuest::new()?;
    let (mut a, mut b, mut c) = (
        Ring::new(&g.table, 0)?,
        Ring::new(&g.table, 1)?,
        Ring::new(&g.vm, 2)?,
    );
    let mut floor = Floor::new(&g.vm, 3)?;
    let iters = requests.div_ceil(batch).max(1);
    let ops = iters * batch;
    // Warm up: every buffer page faulted in, every scope state ready.
    for _ in 0..(2 * REQUESTS).div_ceil(batch) {
        a.run_plain(&g.table, batch)?;
        b.run_scope(&g.table, batch)?;
        c.run_plain(&g.vm, batch)?;
        floor.run(batch);
    }
    let t = interleave(
        rounds,
        &mut [
            &mut || {
                time_ns(ops, || {
                    Ok((0..iters).try_for_each(|_| a.run_plain(&g.table, batch))?)
                })
            },
            &mut || {
                time_ns(ops, || {
                    Ok((0..iters).try_for_each(|_| b.run_scope(&g.table, batch))?)
                })
            },
            &mut || {
                time_ns(ops, || {
                    Ok((0..iters).try_for_each(|_| c.run_plain(&g.vm, batch))?)
                })
            },
            &mut || {
                time_ns(ops, || {
                    (0..iters).for_each(|_| floor.run(batch));
                    Ok(())
                })
            },
        ],
    )?;
    Ok(vec![
        row("block", "table", "vm-memory", batch, &t[0], &t[2]),
        row("block", "scope", "vm-memory", batch, &t[1], &t[2]),
        row("block", "memcpy", "vm-memory", batch, &t[3], &t[2]),
    ])
}

/// One memfd cut into [`MANY_REGIONS`] adjacent regions of [`SMALL_REGION`] bytes.
#[derive(Debug)]
pub struct ManyRegions {
    /// The memfd.
    pub file: Arc<File>,
}

impl ManyRegions {
    /// The memfd.
    pub fn new() -> Result<Self, BoxError> {
        Ok(ManyRegions {
            file: Arc::new(memfd(MANY_REGIONS as u64 * SMALL_REGION)?),
        })
    }

    /// Our table of `n` regions covering the same bytes (1 or [`MANY_REGIONS`]), built as
    /// `SET_MEM_TABLE` builds it ([`XenRegion::new_many`]: regions of one file share one
    /// mapping), as vm-memory's `from_ranges_with_files` takes them all at once.
    pub fn ours(&self, n: usize) -> Result<RegionTable, BoxError> {
        let size = MANY_REGIONS as u64 * SMALL_REGION / n as u64;
        let items: Vec<(RegionDescriptor, Option<&std::fs::File>)> = (0..n as u64)
            .map(|i| (unix_desc(i * size, size, i * size), Some(&*self.file)))
            .collect();
        let regions = XenRegion::new_many(&items, None, ForeignMapping::Eager)
            .map_err(|(i, e)| format!("region {i}: {e}"))?;
        Ok(RegionTable::from_regions(regions)?)
    }

    /// vm-memory's.
    pub fn vm(&self, n: usize) -> Result<GuestMemoryMmap, BoxError> {
        let size = MANY_REGIONS as u64 * SMALL_REGION / n as u64;
        Ok(GuestMemoryMmap::from_ranges_with_files((0..n as u64).map(
            |i| {
                (
                    GuestAddress(i * size),
                    size as usize,
                    Some(FileOffset::from_arc(self.file.clone(), i * size)),
                )
            },
        ))?)
    }

    /// `count` 8-aligned addresses spread pseudo-randomly over the whole range.
    pub fn addresses(count: usize) -> Vec<GuestAddress> {
        let span = MANY_REGIONS as u64 * SMALL_REGION / 8;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..count)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                GuestAddress((x % span) * 8)
            })
            .collect()
    }
}

/// Sums the u64s at `addrs` (8-byte `read_obj` each).
pub fn read_all<M: Bytes<GuestAddress>>(mem: &M, addrs: &[GuestAddress]) -> Result<u64, BoxError>
where
    M::E: std::error::Error + Send + Sync + 'static,
{
    let mut sum = 0u64;
    for &a in addrs {
        sum = sum.wrapping_add(mem.read_obj::<u64>(a)?);
    }
    Ok(sum)
}

/// 8-byte reads over 1 and [`MANY_REGIONS`] regions, ours and vm-memory's, interleaved: `reads`
/// addresses read `passes` times per round. Rows: ours against vm-memory at 1 and at many
/// regions, and many regions against 1 (ours, then vm-memory's).
pub fn read_rows(rounds: usize, reads: usize, passes: usize) -> Result<Vec<Row>, BoxError> {
    let m = ManyRegions::new()?;
    let (o1, om, v1, vm) = (
        m.ours(1)?,
        m.ours(MANY_REGIONS)?,
        m.vm(1)?,
        m.vm(MANY_REGIONS)?,
    );
    let addrs = ManyRegions::addresses(reads);
    // Warm up: every page touched through every mapping.
    for _ in 0..2 {
        for mem in [&o1, &om] {
            black_box(read_all(mem, &addrs)?);
        }
        for mem in [&v1, &vm] {
            black_box(read_all(mem, &addrs)?);
        }
    }
    let addrs = addrs.repeat(passes.max(1));
    let n = addrs.len();
    let t = interleave(
        rounds,
        &mut [
            &mut || {
                time_ns(n, || {
                    read_all(&o1, &addrs).map(|s| {
                        black_box(s);
                    })
                })
            },
            &mut || {
                time_ns(n, || {
                    read_all(&om, &addrs).map(|s| {
                        black_box(s);
                    })
                })
            },
            &mut || {
                time_ns(n, || {
                    read_all(&v1, &addrs).map(|s| {
                        black_box(s);
                    })
                })
            },
            &mut || {
                time_ns(n, || {
                    read_all(&vm, &addrs).map(|s| {
                        black_box(s);
                    })
                })
            },
        ],
    )?;
    Ok(vec![
        row("read_obj", "ours", "vm-memory", 1, &t[0], &t[2]),
        row("read_obj", "ours", "vm-memory", MANY_REGIONS, &t[1], &t[3]),
        row("read_obj", "ours-509", "ours-1", MANY_REGIONS, &t[1], &t[0]),
        row("read_obj", "vm-509", "vm-1", MANY_REGIONS, &t[3], &t[2]),
    ])
}

/// Building (mapping included, drop not timed) a table of [`MANY_REGIONS`] regions, ours
/// against `GuestMemoryMmap::from_ranges_with_files`, interleaved. ns per region.
pub fn build_rows(rounds: usize) -> Result<Vec<Row>, BoxError> {
    let m = ManyRegions::new()?;
    let timed = |f: &mut dyn FnMut() -> Result<Box<dyn std::any::Any>, BoxError>| {
        let t = Instant::now();
        let built = f()?;
        let ns = t.elapsed().as_nanos() as f64 / MANY_REGIONS as f64;
        drop(built);
        Ok::<f64, BoxError>(ns)
    };
    let t = interleave(
        rounds,
        &mut [
            &mut || timed(&mut || Ok(Box::new(m.ours(MANY_REGIONS)?))),
            &mut || timed(&mut || Ok(Box::new(m.vm(MANY_REGIONS)?))),
        ],
    )?;
    Ok(vec![row(
        "build",
        "ours",
        "vm-memory",
        MANY_REGIONS,
        &t[0],
        &t[1],
    )])
}

/// Every row, each side in its own process (see [`Worker`]): the block workload at batch 1, 8
/// and 64, reads, building. `dir` holds the worker binaries.
pub fn all_rows_processes(
    dir: &std::path::Path,
    rounds: usize,
    requests: usize,
) -> Result<Vec<Row>, BoxError> {
    let mut ours = Worker::spawn(&dir.join("in-advance-ours"))?;
    let mut vm = Worker::spawn(&dir.join("in-advance-vm"))?;
    let mut rows = Vec::new();
    for batch in [1, 8, 64] {
        let cmd = |v: &str| format!("block {v} {batch} {requests}");
        let asks = [
            (Side::Ours, cmd("table")),
            (Side::Ours, cmd("scope")),
            (Side::Vm, cmd("vm")),
            (Side::Vm, cmd("memcpy")),
        ];
        let t = ask_interleaved(&mut ours, &mut vm, rounds, 2, &asks)?;
        rows.push(row("block", "table", "vm-memory", batch, &t[0], &t[2]));
        rows.push(row("block", "scope", "vm-memory", batch, &t[1], &t[2]));
        rows.push(row("block", "memcpy", "vm-memory", batch, &t[3], &t[2]));
    }
    let (r1, rm) = ("read 1 16".to_string(), format!("read {MANY_REGIONS} 16"));
    let asks = [
        (Side::Ours, r1.clone()),
        (Side::Ours, rm.clone()),
        (Side::Vm, r1),
        (Side::Vm, rm),
    ];
    let t = ask_interleaved(&mut ours, &mut vm, rounds, 2, &asks)?;
    let many = MANY_REGIONS;
    rows.push(row("read_obj", "ours", "vm-memory", 1, &t[0], &t[2]));
    rows.push(row("read_obj", "ours", "vm-memory", many, &t[1], &t[3]));
    rows.push(row("read_obj", "ours-509", "ours-1", many, &t[1], &t[0]));
    rows.push(row("read_obj", "vm-509", "vm-1", many, &t[3], &t[2]));
    let asks = [
        (Side::Ours, "build".to_string()),
        (Side::Vm, "build".to_string()),
    ];
    let t = ask_interleaved(&mut ours, &mut vm, rounds, 0, &asks)?;
    rows.push(row("build", "ours", "vm-memory", many, &t[0], &t[1]));
    Ok(rows)
}

/// Which worker a command goes to.
#[derive(Clone, Copy, Debug)]
enum Side {
    Ours,
    Vm,
}

/// Asks each command of `asks` `warm` times untimed, then in `rounds` interleaved rounds.
fn ask_interleaved(
    ours: &mut Worker,
    vm: &mut Worker,
    rounds: usize,
    warm: usize,
    asks: &[(Side, String)],
) -> Result<Vec<Vec<f64>>, BoxError> {
    let (ours, vm) = (std::cell::RefCell::new(ours), std::cell::RefCell::new(vm));
    let ask = |side: Side, cmd: &str| match side {
        Side::Ours => ours.borrow_mut().ask(cmd),
        Side::Vm => vm.borrow_mut().ask(cmd),
    };
    for _ in 0..warm {
        for (side, cmd) in asks {
            ask(*side, cmd)?;
        }
    }
    let mut variants: Vec<Box<dyn FnMut() -> Result<f64, BoxError> + '_>> = asks
        .iter()
        .map(|(side, cmd)| Box::new(move || ask(*side, cmd)) as Box<dyn FnMut() -> _>)
        .collect();
    let mut refs: Vec<&mut dyn FnMut() -> Result<f64, BoxError>> =
        variants.iter_mut().map(|v| &mut **v as _).collect();
    interleave(rounds, &mut refs)
}

/// A worker process holding one side's memory (ours or vm-memory's), so that each side's
/// code is compiled and inlined as in a program that uses only it: measured in one binary, the
/// same source gave ratios from 0.55x to 2x depending on which generic instantiations the
/// compiler inlined where. Protocol: one command per line on stdin, the answer (ns per
/// operation) on stdout.
#[derive(Debug)]
pub struct Worker {
    child: std::process::Child,
    input: std::process::ChildStdin,
    output: std::io::BufReader<std::process::ChildStdout>,
}

impl Worker {
    /// Starts the worker binary at `path`.
    pub fn spawn(path: &std::path::Path) -> Result<Self, BoxError> {
        use std::process::{Command, Stdio};
        let mut child = Command::new(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!(
                    "{}: {e} (build the workers: cargo build --release -p xen-vhost-bench --bins)",
                    path.display()
                )
            })?;
        let input = child.stdin.take().ok_or("worker stdin")?;
        let output = std::io::BufReader::new(child.stdout.take().ok_or("worker stdout")?);
        Ok(Worker {
            child,
            input,
            output,
        })
    }

    /// Sends `cmd`, returns the worker's answer.
    pub fn ask(&mut self, cmd: &str) -> Result<f64, BoxError> {
        use std::io::{BufRead, Write};
        writeln!(self.input, "{cmd}")?;
        self.input.flush()?;
        let mut line = String::new();
        self.output.read_line(&mut line)?;
        line.trim()
            .parse()
            .map_err(|e| format!("worker answered {line:?} to {cmd:?}: {e}").into())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = std::io::Write::write_all(&mut self.input, b"quit\n");
        let _ = self.child.wait();
    }
}

/// A worker's loop: runs `run` on each command's words, answers its result.
pub fn worker_loop(mut run: impl FnMut(&[&str]) -> Result<f64, BoxError>) -> Result<(), BoxError> {
    use std::io::{BufRead, Write};
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"quit") {
            break;
        }
        let ns = run(&words)?;
        writeln!(out, "{ns}")?;
        out.flush()?;
    }
    Ok(())
}

/// Parses a worker command's number.
pub fn arg(words: &[&str], i: usize) -> Result<usize, BoxError> {
    Ok(words.get(i).ok_or("missing argument")?.parse::<usize>()?)
}

/// ns per read of `passes` passes over the standard 4096 addresses of [`ManyRegions`].
pub fn read_ns<M: Bytes<GuestAddress>>(mem: &M, passes: usize) -> Result<f64, BoxError>
where
    M::E: std::error::Error + Send + Sync + 'static,
{
    let addrs = ManyRegions::addresses(4096).repeat(passes.max(1));
    time_ns(addrs.len(), || {
        black_box(read_all(mem, &addrs)?);
        Ok(())
    })
}

/// ns per region to build (then drop, untimed) a table of [`MANY_REGIONS`] regions.
pub fn build_ns<T>(build: impl FnOnce() -> Result<T, BoxError>) -> Result<f64, BoxError> {
    let t = Instant::now();
    let built = build()?;
    let ns = t.elapsed().as_nanos() as f64 / MANY_REGIONS as f64;
    drop(built);
    Ok(ns)
}

/// Every row, in this one process.
pub fn all_rows(rounds: usize, requests: usize) -> Result<Vec<Row>, BoxError> {
    let mut rows = Vec::new();
    for batch in [1, 8, 64] {
        rows.extend(block_rows(batch, rounds, requests)?);
    }
    rows.extend(read_rows(rounds, 4096, 16)?);
    rows.extend(build_rows(rounds)?);
    Ok(rows)
}
