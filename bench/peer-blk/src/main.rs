//! `peer-blk --socket-path PATH --blk-file FILE [--num-queues N]`: serves one frontend with
//! the peer device of `peer.rs` and exits.

mod peer;

use std::sync::{Arc, RwLock};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let socket = arg("--socket-path").ok_or("--socket-path missing")?;
    let file = arg("--blk-file").ok_or("--blk-file missing")?;
    let queues: usize = arg("--num-queues").map_or(Ok(1), |q| q.parse())?;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(file)?;
    let backend = Arc::new(RwLock::new(peer::PeerBlk::new(f, queues, false)?));
    let mut d = vhost_user_backend::VhostUserDaemon::new(
        "peer-blk".into(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| format!("{e:?}"))?;
    d.serve(&socket).map_err(|e| format!("{e:?}"))?;
    Ok(())
}
