//! `SET_MEM_TABLE` through the protocol on real Xen: our blk daemon (in this process, on the real
//! drivers) mapping FOREIGN regions eagerly against one mapping them lazily, each sent the 1 GiB
//! FOREIGN region of the domU that `lazy_foreign` uses by a vhost `Frontend` with REPLY_ACK, and
//! timed until the daemon's reply: what a frontend such as xen-vhost-frontend waits for. Rounds
//! interleaved (order flipped each round), a new connection each, so every round maps afresh
//! (the region is torn down when its connection ends, before the next round).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use xen_vhost_mem::daemon::{VhostUserDaemon, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1};
use xen_vhost_mem::devices::blk::{BlkConfig, BlkDevice};
use xen_vhost_mem::{ForeignMapping, XenMmapFlags};

use crate::cases::open_dev;
use crate::lazy_foreign::{GPA, SIZE};
use crate::stats::{median, min_max};
use crate::CaseResult;

/// Rounds per side.
const ROUNDS: usize = 5;
/// A frontend virtual address for the region (FOREIGN regions are mapped by gfn; the daemon
/// only translates ring addresses through it).
const FAKE_VA: u64 = 0x7e00_0000_0000;

struct Side {
    name: &'static str,
    socket: PathBuf,
    daemon: Arc<VhostUserDaemon<BlkDevice>>,
    thread: Option<std::thread::JoinHandle<()>>,
    ms: Vec<f64>,
    syscalls: Option<u64>,
}

fn start(dir: &Path, name: &'static str, policy: ForeignMapping) -> Result<Side, String> {
    let image = dir.join(format!("{name}.img"));
    File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .map_err(|e| format!("{}: {e}", image.display()))?;
    let blk = BlkDevice::open(&image, BlkConfig::default()).map_err(|e| format!("blk: {e}"))?;
    let daemon = Arc::new(
        VhostUserDaemon::new(Arc::new(blk))
            .with_xen(open_dev()?)
            .with_foreign_mapping(policy),
    );
    let socket = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| format!("bind: {e}"))?;
    let d = daemon.clone();
    let thread = std::thread::spawn(move || {
        if let Err(e) = d.serve(&listener, Some(ROUNDS)) {
            eprintln!("set-mem-table: {name} daemon: {e}");
        }
    });
    Ok(Side {
        name,
        socket,
        daemon,
        thread: Some(thread),
        ms: Vec::new(),
        syscalls: None,
    })
}

/// One connection: negotiate XEN_MMAP and REPLY_ACK, time SET_MEM_TABLE, hang up and wait
/// until the daemon has torn the connection down.
fn round(side: &mut Side, domid: u32) -> Result<(), String> {
    let ve = |what: &'static str| move |e: vhost::Error| format!("{what}: {e}");
    let xen = side
        .daemon
        .xen()
        .cloned()
        .ok_or("the daemon has no Xen handle")?;
    let ended = side.daemon.stats().snapshot().connections;
    let mut fe = Frontend::connect(&side.socket, 1).map_err(|e| format!("connect: {e}"))?;
    fe.set_owner().map_err(ve("SET_OWNER"))?;
    let offered = fe.get_features().map_err(ve("GET_FEATURES"))?;
    if offered & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
        return Err("no protocol features offered".into());
    }
    let want = VhostUserProtocolFeatures::XEN_MMAP | VhostUserProtocolFeatures::REPLY_ACK;
    let proto = fe
        .get_protocol_features()
        .map_err(ve("GET_PROTOCOL_FEATURES"))?;
    if !proto.contains(want) {
        return Err(format!("protocol features offered: {proto:?}"));
    }
    fe.set_protocol_features(want)
        .map_err(ve("SET_PROTOCOL_FEATURES"))?;
    fe.set_features(offered & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES))
        .map_err(ve("SET_FEATURES"))?;
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let privcmd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/xen/privcmd")
        .map_err(|e| format!("open /dev/xen/privcmd: {e}"))?;
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: GPA,
        memory_size: SIZE,
        userspace_addr: FAKE_VA,
        mmap_offset: 0,
        mmap_handle: privcmd.as_raw_fd(),
        xen_mmap_flags: XenMmapFlags::FOREIGN.bits(),
        xen_mmap_data: domid,
    };
    let c0 = xen.counters().snapshot();
    let t = Instant::now();
    fe.set_mem_table(&[region]).map_err(ve("SET_MEM_TABLE"))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let d = xen.counters().snapshot().since(&c0);
    drop(fe);
    let deadline = Instant::now() + Duration::from_secs(30);
    while side.daemon.stats().snapshot().connections <= ended {
        if Instant::now() > deadline {
            return Err(format!("{}: the connection did not end", side.name));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if d.errors != 0 || xen.counters().live_mappings() != 0 {
        return Err(format!(
            "{}: errors {} or {} mappings left",
            side.name,
            d.errors,
            xen.counters().live_mappings()
        ));
    }
    match side.syscalls {
        Some(n) if n != d.syscalls() => {
            return Err(format!("{}: {n} then {} syscalls", side.name, d.syscalls()))
        }
        _ => side.syscalls = Some(d.syscalls()),
    }
    side.ms.push(ms);
    Ok(())
}

/// `bench/lazy-foreign/set-mem-table`.
pub fn bench(domid: u32) -> CaseResult {
    let dir = std::env::temp_dir().join("xvm-set-mem-table");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut eager = start(&dir, "eager", ForeignMapping::Eager)?;
    let mut lazy = start(&dir, "lazy", ForeignMapping::lazy())?;
    let mut ratios = Vec::new();
    let mut result = Ok(());
    for r in 0..ROUNDS {
        let step = if r % 2 == 0 {
            round(&mut eager, domid).and_then(|()| round(&mut lazy, domid))
        } else {
            round(&mut lazy, domid).and_then(|()| round(&mut eager, domid))
        };
        if let Err(e) = step {
            result = Err(e);
            break;
        }
        ratios.push(lazy.ms[r] / eager.ms[r]);
    }
    for side in [&mut eager, &mut lazy] {
        if result.is_err() {
            // Unblock a daemon still waiting for its remaining connections.
            for _ in side.ms.len()..ROUNDS {
                let _ = std::os::unix::net::UnixStream::connect(&side.socket);
            }
        }
        if let Some(t) = side.thread.take() {
            let _ = t.join();
        }
    }
    result?;
    let (em, lm, rm) = (median(&eager.ms), median(&lazy.ms), median(&ratios));
    let (lo, hi) = min_max(&ratios);
    let (es, ls) = (eager.syscalls.unwrap_or(0), lazy.syscalls.unwrap_or(0));
    let goal = 1.0 / 50.0;
    let met = rm <= goal;
    println!(
        "XVM-JSON {{\"bench\":\"lazy-foreign\",\"row\":\"set-mem-table\",\"mib\":{},\"rounds\":{ROUNDS},\
         \"eager_ms\":{em:.3},\"lazy_ms\":{lm:.4},\"ratio_median\":{rm:.7},\"ratio_min\":{lo:.7},\
         \"ratio_max\":{hi:.7},\"eager_syscalls\":{es},\"lazy_syscalls\":{ls},\"goal_ratio_max\":{goal},\
         \"goal_met\":{met}}}",
        SIZE >> 20
    );
    Ok(format!(
        "SET_MEM_TABLE of a 1 GiB FOREIGN region through the protocol (REPLY_ACK), {ROUNDS} \
         interleaved rounds: eager daemon {em:.1} ms ({es} device syscalls), lazy daemon {lm:.3} ms \
         ({ls}); lazy/eager median {rm:.6} ({lo:.6}-{hi:.6}), goal <= {goal} {}",
        if met { "met" } else { "NOT met" }
    ))
}
