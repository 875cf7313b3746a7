//! Lazy FOREIGN mapping (issue 12 item 4) on the emulated device: creating a large FOREIGN
//! region eagerly against lazily, in interleaved rounds (median and spread of per-round
//! ratios), with the device's system calls beside them; then the cost of a first touch (one
//! bucket mapped), and, interleaved against an eager region over the same frames, warm 8-byte
//! reads in one scope and warm 4 KiB requests with a scope each (every bucket touched before).
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

    // Warm accesses, both tables alive, every lazy bucket touched once before.
    let eager_table =
        RegionTable::from_regions(vec![region(&g, size, ForeignMapping::Eager)]).expect("table");
    let table =
        RegionTable::from_regions(vec![region(&g, size, ForeignMapping::lazy())]).expect("table");
    let mem = RequestMemory::new(&table);
    let c0 = g.dev.counters().snapshot();
    let t = Instant::now();
    let _: u64 = mem.read_obj(GuestAddress(0)).expect("first touch");
    let first = t.elapsed();
    let first_calls = g.dev.counters().snapshot().since(&c0).syscalls();
    for b in 0..size >> 20 {
        let _: u64 = mem.read_obj(GuestAddress(b << 20)).expect("touch");
    }
    drop(mem);
    // The same region on a handle with a bound (above its buckets: no eviction, but scopes
    // take holds): what the bound costs a warm request.
    let gb = GuestSim::new(DOMID, pages).expect("emulation");
    gb.frames(0, pages).expect("frames");
    gb.dev
        .set_lazy_bucket_limit(pages)
        .expect("bound before regions");
    let bounded =
        RegionTable::from_regions(vec![region(&gb, size, ForeignMapping::lazy())]).expect("table");

    // 8-byte reads in one scope.
    let reads = |table: &RegionTable| {
        let mem = RequestMemory::new(table);
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
        t.elapsed().as_secs_f64() / f64::from(n)
    };
    // Block-sized requests: a scope each, 4 KiB read and a status byte written, at addresses
    // spread over the whole region (every bucket).
    let requests = |table: &RegionTable| {
        let n = 100_000u64;
        let mut buf = vec![0u8; 4096];
        let t = Instant::now();
        for i in 0..n {
            let at = (i.wrapping_mul(0x9e37_79b9) % (size / 4096 - 1)) * 4096;
            let mem = RequestMemory::new(table);
            mem.read_slice(&mut buf, GuestAddress(at)).expect("read");
            mem.write_obj(0u8, GuestAddress(at + 4096)).expect("status");
            mem.finish().expect("finish");
        }
        std::hint::black_box(&buf);
        t.elapsed().as_secs_f64() / n as f64
    };
    // One untimed pass each: the eager region's pages fault in on first use too.
    requests(&table);
    requests(&eager_table);
    requests(&bounded);
    let c0 = g.dev.counters().snapshot();
    let (mut read_l, mut read_e, mut read_r) = (Vec::new(), Vec::new(), Vec::new());
    let (mut req_l, mut req_e, mut req_r) = (Vec::new(), Vec::new(), Vec::new());
    let (mut req_b, mut req_br) = (Vec::new(), Vec::new());
    for round in 0..rounds.max(5) {
        let (l, e, lq, eq, bq) = if round % 2 == 0 {
            let l = reads(&table);
            let e = reads(&eager_table);
            let eq = requests(&eager_table);
            let lq = requests(&table);
            let bq = requests(&bounded);
            (l, e, lq, eq, bq)
        } else {
            let e = reads(&eager_table);
            let l = reads(&table);
            let bq = requests(&bounded);
            let lq = requests(&table);
            let eq = requests(&eager_table);
            (l, e, lq, eq, bq)
        };
        req_b.push(bq);
        req_br.push(bq / eq);
        read_l.push(l);
        read_e.push(e);
        read_r.push(l / e);
        req_l.push(lq);
        req_e.push(eq);
        req_r.push(lq / eq);
    }
    let warm_calls = g.dev.counters().snapshot().since(&c0).syscalls();
    let (read_rlo, read_rhi) = spread(&read_r);
    let (req_rlo, req_rhi) = spread(&req_r);
    let (warm, eager_warm, read_ratio) = (
        median(&mut read_l),
        median(&mut read_e),
        median(&mut read_r),
    );
    let (req, eager_req, req_ratio) = (median(&mut req_l), median(&mut req_e), median(&mut req_r));
    let (breq_lo, breq_hi) = spread(&req_br);
    let (breq, breq_ratio) = (median(&mut req_b), median(&mut req_br));
    drop(bounded);
    drop(table);
    drop(eager_table);

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
    let ns = |s: f64| s * 1e9;
    println!(
        "| warm 8-byte read_obj in one scope, lazy | {:.1} ns | 0 |",
        ns(warm)
    );
    println!(
        "| warm 8-byte read_obj in one scope, eager | {:.1} ns | 0 |",
        ns(eager_warm)
    );
    println!("| lazy/eager read_obj (per-round ratio) | {read_ratio:.3}x (spread {read_rlo:.3}..{read_rhi:.3}) | |");
    println!(
        "| warm 4 KiB request (scope each), lazy | {:.1} ns | {warm_calls} in all warm rounds |",
        ns(req)
    );
    println!(
        "| warm 4 KiB request (scope each), eager | {:.1} ns | |",
        ns(eager_req)
    );
    println!("| lazy/eager request (per-round ratio) | {req_ratio:.3}x (spread {req_rlo:.3}..{req_rhi:.3}) | |");
    println!(
        "| warm 4 KiB request, lazy under a bound (scopes hold buckets) | {:.1} ns | |",
        ns(breq)
    );
    println!("| bounded lazy/eager request (per-round ratio) | {breq_ratio:.3}x (spread {breq_lo:.3}..{breq_hi:.3}) | |");
    println!(
        "{{\"mib\":{mib},\"rounds\":{rounds},\"eager_ms\":{:.4},\"lazy_ms\":{:.4},\"ratio_median\":{ratio_med:.6},\"ratio_min\":{rlo:.6},\"ratio_max\":{rhi:.6},\"eager_syscalls\":{eager_calls},\"lazy_syscalls\":{lazy_calls},\"first_touch_us\":{:.2},\"first_touch_syscalls\":{first_calls},\"warm_read_ns\":{:.2},\"eager_warm_read_ns\":{:.2},\"read_ratio\":{read_ratio:.4},\"read_ratio_min\":{read_rlo:.4},\"read_ratio_max\":{read_rhi:.4},\"warm_request_ns\":{:.1},\"eager_request_ns\":{:.1},\"request_ratio\":{req_ratio:.4},\"request_ratio_min\":{req_rlo:.4},\"request_ratio_max\":{req_rhi:.4},\"warm_syscalls\":{warm_calls},\"bounded_request_ns\":{:.1},\"bounded_request_ratio\":{breq_ratio:.4},\"bounded_request_ratio_min\":{breq_lo:.4},\"bounded_request_ratio_max\":{breq_hi:.4}}}",
        ms(eager_med),
        ms(lazy_med),
        first.as_secs_f64() * 1e6,
        ns(warm),
        ns(eager_warm),
        ns(req),
        ns(eager_req),
        ns(breq),
    );
}
