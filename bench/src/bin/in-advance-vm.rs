//! Worker of `xen-vhost-bench --in-advance`: vm-memory's `GuestMemoryMmap` (and the memcpy
//! floor) alone in its process. See `xen_vhost_bench::in_advance::Worker`.

use std::sync::Arc;

use xen_vhost_bench::in_advance::{
    arg, block_vm, build_ns, memfd, read_ns, time_ns, worker_loop, Floor, ManyRegions, Ring,
    BLOCK_MEMFD, MANY_REGIONS,
};

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Each variant on its own memfd, at the same place in it (as in the other worker).
    let (f1, f2) = (Arc::new(memfd(BLOCK_MEMFD)?), Arc::new(memfd(BLOCK_MEMFD)?));
    let (vm, vm2) = (block_vm(&f1)?, block_vm(&f2)?);
    let mut ring = Ring::new(&vm, 0)?;
    let mut floor = Floor::new(&vm2, 0)?;
    let many = ManyRegions::new()?;
    let (one, all) = (many.vm(1)?, many.vm(MANY_REGIONS)?);
    worker_loop(|w| match w {
        ["block", variant, ..] => {
            let (batch, requests) = (arg(w, 2)?, arg(w, 3)?);
            let iters = requests.div_ceil(batch).max(1);
            time_ns(iters * batch, || match *variant {
                "vm" => Ok((0..iters).try_for_each(|_| ring.run_plain(&vm, batch))?),
                "memcpy" => {
                    (0..iters).for_each(|_| floor.run(batch));
                    Ok(())
                }
                v => Err(format!("no block variant {v}").into()),
            })
        }
        ["read", ..] => match arg(w, 1)? {
            1 => read_ns(&one, arg(w, 2)?),
            _ => read_ns(&all, arg(w, 2)?),
        },
        ["build"] => build_ns(|| many.vm(MANY_REGIONS)),
        _ => Err(format!("unknown command {w:?}").into()),
    })
}
