//! Criterion benchmark of the block-like workload over emulated Xen: every strategy at batch 1,
//! 8 and a drained ring, plus the premapped ceiling. Syscall counts: `bench/src/main.rs`. `cargo bench -p xen-vhost-bench`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use xen_vhost_bench::{emulated_block_guest, BenchRow, BlockWorkload, DRAIN_BATCH, QUEUE_SIZE};
use xen_vhost_mem::testing::GuestSim;

fn block(c: &mut Criterion) {
    let mut g = c.benchmark_group("block");
    for batch in [1usize, 8, DRAIN_BATCH] {
        g.throughput(Throughput::Elements(batch as u64));
        for BenchRow {
            label,
            mode,
            premapped,
        } in BenchRow::all()
        {
            let sim = GuestSim::new(1, 8192).expect("emulated guest");
            let (table, ring, bufs) =
                emulated_block_guest(&sim, DRAIN_BATCH, premapped).expect("guest setup");
            let mut w = BlockWorkload::new(&table, ring, QUEUE_SIZE, &bufs).expect("queue");
            g.bench_with_input(BenchmarkId::new(label, batch), &batch, |b, &batch| {
                b.iter(|| w.run_batch(mode, batch).expect("request"))
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = block
}
criterion_main!(benches);
