//! Criterion benchmark of memory mapped in advance against vm-memory's `GuestMemoryMmap` over the
//! same memfd ranges (`xen_vhost_bench::in_advance`): the block workload through our table, a
//! request scope as the daemon uses it, vm-memory and a memcpy floor at batch 1, 8 and 64;
//! 8-byte reads over 1 and 509 regions; building 509 regions. The ratios with spread, from
//! interleaved rounds: `cargo run --release -p xen-vhost-bench -- --in-advance`.
//! `cargo bench -p xen-vhost-bench --bench in_advance`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use xen_vhost_bench::in_advance::{read_all, BlockGuest, Floor, ManyRegions, Ring, MANY_REGIONS};

fn block(c: &mut Criterion) {
    let mut g = c.benchmark_group("in_advance/block");
    for batch in [1usize, 8, 64] {
        g.throughput(Throughput::Elements(batch as u64));
        let guest = BlockGuest::new().expect("guest");
        let mut a = Ring::new(&guest.table, 0).expect("ring");
        let mut b = Ring::new(&guest.table, 1).expect("ring");
        let mut v = Ring::new(&guest.vm, 2).expect("ring");
        let mut floor = Floor::new(&guest.vm, 3).expect("floor");
        g.bench_with_input(BenchmarkId::new("table", batch), &batch, |bn, &n| {
            bn.iter(|| a.run_plain(&guest.table, n).expect("request"))
        });
        g.bench_with_input(BenchmarkId::new("scope", batch), &batch, |bn, &n| {
            bn.iter(|| b.run_scope(&guest.table, n).expect("request"))
        });
        g.bench_with_input(BenchmarkId::new("vm-memory", batch), &batch, |bn, &n| {
            bn.iter(|| v.run_plain(&guest.vm, n).expect("request"))
        });
        g.bench_with_input(BenchmarkId::new("memcpy", batch), &batch, |bn, &n| {
            bn.iter(|| floor.run(n))
        });
    }
    g.finish();
}

fn reads(c: &mut Criterion) {
    let mut g = c.benchmark_group("in_advance/read_obj");
    let m = ManyRegions::new().expect("memfd");
    let addrs = ManyRegions::addresses(4096);
    g.throughput(Throughput::Elements(addrs.len() as u64));
    for n in [1, MANY_REGIONS] {
        let ours = m.ours(n).expect("table");
        let vm = m.vm(n).expect("vm-memory");
        g.bench_with_input(BenchmarkId::new("ours", n), &n, |b, _| {
            b.iter(|| black_box(read_all(&ours, &addrs).expect("read")))
        });
        g.bench_with_input(BenchmarkId::new("vm-memory", n), &n, |b, _| {
            b.iter(|| black_box(read_all(&vm, &addrs).expect("read")))
        });
    }
    g.finish();
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("in_advance/build");
    let m = ManyRegions::new().expect("memfd");
    g.throughput(Throughput::Elements(MANY_REGIONS as u64));
    g.bench_function(BenchmarkId::new("ours", MANY_REGIONS), |b| {
        b.iter(|| m.ours(MANY_REGIONS).expect("table"))
    });
    g.bench_function(BenchmarkId::new("vm-memory", MANY_REGIONS), |b| {
        b.iter(|| m.vm(MANY_REGIONS).expect("vm-memory"))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = block, reads, build
}
criterion_main!(benches);
