//! The block-like workload over emulated Xen for every strategy, at batch 1 and 8: a table of
//! syscalls per request (exact, from the device counters) and ns per request.
//!
//! `cargo run --release -p xen-vhost-bench [-- --json] [--requests N]`; `-- --sweep` compares
//! grant copy and mapping by buffer size; `-- --in-advance [--rounds R] [--requests N]
//! [--in-process]` compares memory mapped in advance with vm-memory's `GuestMemoryMmap`
//! (interleaved rounds, ratios with spread; each side in its own worker process, built by
//! `cargo build --release -p xen-vhost-bench --bins`, unless `--in-process`; see
//! `xen_vhost_bench::in_advance`).

use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, Permissions};
use xen_vhost_bench::{emulated_block_guest, BenchRow, BlockWorkload, DRAIN_BATCH, QUEUE_SIZE};
use xen_vhost_mem::testing::{Guest as _, GuestSim};
use xen_vhost_mem::{RegionTable, RequestMemory, Strategy, XenRegion};

struct Row {
    strategy: &'static str,
    batch: usize,
    syscalls_per_request: f64,
    ns_per_request: f64,
}

fn measure(
    row: BenchRow,
    batch: usize,
    requests: usize,
) -> Result<Row, Box<dyn std::error::Error>> {
    let mode = row.mode;
    let sim = GuestSim::new(1, 8192)?;
    let (table, ring, bufs) = emulated_block_guest(&sim, DRAIN_BATCH, row.premapped)?;
    let mut w = BlockWorkload::new(&table, ring, QUEUE_SIZE, &bufs)?;
    for _ in 0..(64 / batch).max(2) {
        w.run_batch(mode, batch)?; // warm up
    }
    let rounds = requests.div_ceil(batch);
    let before = sim.dev.counters().snapshot();
    let t = Instant::now();
    for _ in 0..rounds {
        w.run_batch(mode, batch)?;
    }
    let ns = t.elapsed().as_nanos() as f64;
    let d = sim.dev.counters().snapshot().since(&before);
    // Only the table's own in-advance mappings may outlive the requests.
    let own = table
        .regions()
        .iter()
        .filter(|r| r.host_address().is_some())
        .count() as i64;
    if d.errors != 0 || sim.dev.counters().live_mappings() != own {
        return Err(format!(
            "{}: {} errors, {} live mappings",
            row.label,
            d.errors,
            sim.dev.counters().live_mappings()
        )
        .into());
    }
    let n = (rounds * batch) as f64;
    Ok(Row {
        strategy: row.label,
        batch,
        syscalls_per_request: d.syscalls() as f64 / n,
        ns_per_request: ns / n,
    })
}

/// ns to fetch, fill and release one on-demand buffer of `size` bytes with `strategy`.
fn buffer_ns(
    strategy: Strategy,
    size: usize,
    rounds: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let sim = GuestSim::new(1, 1024)?;
    let pages = size.div_ceil(4096);
    let buf = sim.grant(pages, false)?;
    let table = RegionTable::from_regions(vec![XenRegion::new(
        sim.on_demand_region(buf.first_ref, pages as u64),
        None,
        Some(&sim.dev),
    )?])?;
    let data = vec![0x3cu8; size];
    let t = Instant::now();
    for _ in 0..rounds {
        let mem = RequestMemory::with_strategy(&table, strategy);
        mem.prefetch(&[(GuestAddress(buf.gpa(0)), size, Permissions::Write)])?;
        mem.write_slice(&data, GuestAddress(buf.gpa(0)))?;
        mem.finish()?;
    }
    Ok(t.elapsed().as_nanos() as f64 / rounds as f64)
}

/// Copy against map by buffer size: where mapping starts to win sets `DEFAULT_MAP_THRESHOLD`.
fn sweep(json: bool) -> Result<(), Box<dyn std::error::Error>> {
    if !json {
        println!("| buffer | grant-copy ns | map ns | copy/map |");
        println!("|---|---|---|---|");
    }
    for kib in [4usize, 16, 64, 256, 1024] {
        let rounds = (4096 / kib).max(50);
        let copy = buffer_ns(Strategy::GrantCopy, kib * 1024, rounds)?;
        let map = buffer_ns(Strategy::Map, kib * 1024, rounds)?;
        if json {
            println!("{{\"bench\":\"buffer\",\"kib\":{kib},\"grant_copy_ns\":{copy:.0},\"map_ns\":{map:.0}}}");
        } else {
            println!("| {kib} KiB | {copy:.0} | {map:.0} | {:.2} |", copy / map);
        }
    }
    Ok(())
}

/// The in-advance rows: ns per operation, and the per-round ratio `reference / ours` (above 1:
/// ours is faster) as median and min-max.
fn in_advance(
    json: bool,
    in_process: bool,
    rounds: usize,
    requests: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    use xen_vhost_bench::in_advance::{all_rows, all_rows_processes};
    let rows = if in_process {
        all_rows(rounds, requests)
    } else {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().ok_or("no directory of the executable")?;
        all_rows_processes(dir, rounds, requests)
    }
    .map_err(|e| e.to_string())?;
    if !json {
        println!("| bench | ours | reference | batch/regions | ours ns/op | reference ns/op | reference/ours median | min-max |");
        println!("|---|---|---|---|---|---|---|---|");
    }
    for r in &rows {
        if json {
            println!(
                "{{\"bench\":\"in_advance/{}\",\"ours\":\"{}\",\"reference\":\"{}\",\"n\":{},\"rounds\":{rounds},\"ours_ns\":{:.1},\"reference_ns\":{:.1},\"ratio_median\":{:.3},\"ratio_min\":{:.3},\"ratio_max\":{:.3}}}",
                r.bench, r.ours, r.reference, r.n, r.ours_ns, r.reference_ns, r.ratio.median, r.ratio.min, r.ratio.max
            );
        } else {
            println!(
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.2}x | {:.2}-{:.2} |",
                r.bench,
                r.ours,
                r.reference,
                r.n,
                r.ours_ns,
                r.reference_ns,
                r.ratio.median,
                r.ratio.min,
                r.ratio.max
            );
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--sweep") {
        return sweep(args.iter().any(|a| a == "--json"));
    }
    let json = args.iter().any(|a| a == "--json");
    if args.iter().any(|a| a == "--in-advance") {
        let num = |name: &str, default: usize| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let in_process = args.iter().any(|a| a == "--in-process");
        return in_advance(
            json,
            in_process,
            num("--rounds", 15),
            num("--requests", 8192),
        );
    }
    let requests = args
        .iter()
        .position(|a| a == "--requests")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000usize);
    // `--only LABEL` (and `--batch N`) run one row, e.g. under a profiler.
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let only = arg("--only");
    let batches: Vec<usize> = match arg("--batch").and_then(|b| b.parse().ok()) {
        Some(b) => vec![b],
        None => vec![1, 8, DRAIN_BATCH],
    };
    let mut rows = Vec::new();
    for &batch in &batches {
        for row in BenchRow::all() {
            if only.is_none_or(|o| o == row.label) {
                rows.push(measure(row, batch, requests)?);
            }
        }
    }
    let base = |batch: usize| {
        rows.iter()
            .find(|r| r.strategy == "per-access" && r.batch == batch)
            .map(|r| r.ns_per_request)
            .unwrap_or(f64::NAN)
    };
    if json {
        for r in &rows {
            println!(
                "{{\"strategy\":\"{}\",\"batch\":{},\"syscalls_per_request\":{:.3},\"ns_per_request\":{:.0},\"speedup_vs_per_access\":{:.2}}}",
                r.strategy, r.batch, r.syscalls_per_request, r.ns_per_request, base(r.batch) / r.ns_per_request
            );
        }
    } else {
        println!("| strategy | batch | syscalls/request | ns/request | speed-up vs per-access |");
        println!("|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {} | {:.2} | {:.0} | {:.1}x |",
                r.strategy,
                r.batch,
                r.syscalls_per_request,
                r.ns_per_request,
                base(r.batch) / r.ns_per_request
            );
        }
    }
    Ok(())
}
