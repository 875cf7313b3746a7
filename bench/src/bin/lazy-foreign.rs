//! Lazy FOREIGN mapping (issue 12 item 4) on the emulated device: creating a large FOREIGN
//! region eagerly against lazily, in interleaved rounds (median and spread of per-round
//! ratios), with the device's system calls beside them; then the cost of a first touch (one
//! bucket mapped) and of a warm 8-byte read through `RequestMemory`.
//!
//! Emulated only: the emulation maps one page per frame with its own `mmap`, so the eager
//! figure is not real Xen's; the system-call counts are exact. `--mib N` sets the region size
//! (default 256), `--rounds N` the rounds (default 5).

use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};
use xen_vhost_mem::testing::GuestSim;
use xen_vhost_mem::{
    ForeignMapping, RegionDescriptor, RegionTable, RequestMemory, WireRegion, XenMmapFlags,
    XenRegion,
};

const DOMID: u16 = 1;
const PAGE: usize = xen_vhost_mem::xen_page::XEN_PAGE_SIZE;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn region(g: &GuestSim, size: u64, policy: ForeignMapping) -> XenRegion {
    let desc = RegionDescriptor::from_wire(&WireRegion {
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: 0,
        mmap_offset: 0,
        xen_mmap_flags: XenMmapFlags::FOREIGN.bits(),
        xen_mmap_data: DOMID.into(),
    })
    .expect("descriptor");
    XenRegion::with_foreign_mapping(desc, None, Some(&g.dev), policy).expect("region")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mib = arg("--mib", 256);
    let rounds = arg("--rounds", 5).max(1);
    let size = (mib as u64) << 20;
    let pages = size as usize / PAGE;
    let g = GuestSim::new(DOMID, pages).expect("emulation");
    g.frames(0, pages).expect("frames");

    let (mut eager_t, mut lazy_t, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut eager_calls, mut lazy_calls) = (0, 0);
    for _ in 0..rounds {
        let c0 = g.dev.counters().snapshot();
        let t = Instant::now();
        let r = region(&g, size, ForeignMapping::Eager);
        let e = t.elapsed();
        eager_calls = g.dev.counters().snapshot().since(&c0).syscalls();
        drop(r);
        let c0 = g.dev.counters().snapshot();
        let t = Instant::now();
        let r = region(&g, size, ForeignMapping::lazy());
        let l = t.elapsed();
        lazy_calls = g.dev.counters().snapshot().since(&c0).syscalls();
        drop(r);
        eager_t.push(e.as_secs_f64());
        lazy_t.push(l.as_secs_f64());
        ratios.push(l.as_secs_f64() / e.as_secs_f64());
    }
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        (lo, hi)
    };
    let (rlo, rhi) = spread(&ratios);
    let eager_med = median(&mut eager_t);
    let lazy_med = median(&mut lazy_t);
    let ratio_med = median(&mut ratios);

    let warm_reads = |table: &RegionTable| {
        let mem = RequestMemory::new(table);
        let _: u64 = mem.read_obj(GuestAddress(0)).expect("first touch");
        let n = 1_000_000u32;
        let t = Instant::now();
        let mut sum = 0u64;
        for i in 0..n {
            let v: u64 = mem
                .read_obj(GuestAddress(u64::from(i % 512) * 8))
                .expect("warm read");
            sum = sum.wrapping_add(v);
        }
        std::hint::black_box(sum);
        t.elapsed() / n
    };
    let eager_table =
        RegionTable::from_regions(vec![region(&g, size, ForeignMapping::Eager)]).expect("table");
    let eager_warm = warm_reads(&eager_table);
    drop(eager_table);

    // First touch and warm reads through a lazy region.
    let table =
        RegionTable::from_regions(vec![region(&g, size, ForeignMapping::lazy())]).expect("table");
    let mem = RequestMemory::new(&table);
    let c0 = g.dev.counters().snapshot();
    let t = Instant::now();
    let _: u64 = mem.read_obj(GuestAddress(0)).expect("first touch");
    let first = t.elapsed();
    let first_calls = g.dev.counters().snapshot().since(&c0).syscalls();
    drop(mem);
    let warm = warm_reads(&table);
    drop(table);

    let ms = |s: f64| s * 1e3;
    println!("lazy FOREIGN, emulated, {mib} MiB region, {rounds} interleaved rounds");
    println!("| row | median | syscalls |");
    println!("|---|---|---|");
    println!("| create eager | {:.3} ms | {eager_calls} |", ms(eager_med));
    println!("| create lazy | {:.3} ms | {lazy_calls} |", ms(lazy_med));
    println!("| lazy/eager (per-round ratio) | {ratio_med:.5}x (spread {rlo:.5}..{rhi:.5}) | |");
    println!(
        "| first touch (1 bucket, 8-byte read) | {:?} | {first_calls} |",
        first
    );
    println!("| warm 8-byte read_obj via RequestMemory, lazy | {warm:?} | 0 |");
    println!("| warm 8-byte read_obj via RequestMemory, eager | {eager_warm:?} | 0 |");
    println!(
        "{{\"mib\":{mib},\"rounds\":{rounds},\"eager_ms\":{:.4},\"lazy_ms\":{:.4},\"ratio_median\":{ratio_med:.6},\"ratio_min\":{rlo:.6},\"ratio_max\":{rhi:.6},\"eager_syscalls\":{eager_calls},\"lazy_syscalls\":{lazy_calls},\"first_touch_us\":{:.2},\"first_touch_syscalls\":{first_calls},\"warm_read_ns\":{},\"eager_warm_read_ns\":{}}}",
        ms(eager_med),
        ms(lazy_med),
        first.as_secs_f64() * 1e6,
        warm.as_nanos(),
        eager_warm.as_nanos()
    );
}
