//! Worker of `xen-vhost-bench --in-advance`: our side (RegionTable and RequestMemory over UNIX
//! regions) alone in its process. See `xen_vhost_bench::in_advance::Worker`.

use xen_vhost_bench::in_advance::{
    arg, block_table, build_ns, memfd, read_ns, time_ns, worker_loop, ManyRegions, Ring,
    BLOCK_MEMFD, MANY_REGIONS,
};

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Each variant on its own memfd, at the same place in it: which pages a variant writes
    // changed its 4 KiB copy by up to 1.4x.
    let (f1, f2) = (memfd(BLOCK_MEMFD)?, memfd(BLOCK_MEMFD)?);
    let (table, table2) = (block_table(&f1)?, block_table(&f2)?);
    let mut plain = Ring::new(&table, 0)?;
    let mut scoped = Ring::new(&table2, 0)?;
    let many = ManyRegions::new()?;
    let (one, all) = (many.ours(1)?, many.ours(MANY_REGIONS)?);
    worker_loop(|w| match w {
        ["block", variant, ..] => {
            let (batch, requests) = (arg(w, 2)?, arg(w, 3)?);
            let iters = requests.div_ceil(batch).max(1);
            time_ns(iters * batch, || match *variant {
                "table" => Ok((0..iters).try_for_each(|_| plain.run_plain(&table, batch))?),
                "scope" => Ok((0..iters).try_for_each(|_| scoped.run_scope(&table2, batch))?),
                v => Err(format!("no block variant {v}").into()),
            })
        }
        ["read", ..] => match arg(w, 1)? {
            1 => read_ns(&one, arg(w, 2)?),
            _ => read_ns(&all, arg(w, 2)?),
        },
        ["build"] => build_ns(|| many.ours(MANY_REGIONS)),
        _ => Err(format!("unknown command {w:?}").into()),
    })
}
