//! The daemon's stats report (what the daemons log on SIGUSR1) against real traffic: the
//! blk daemon over emulated Xen memory, the report read from another thread while a frontend
//! is connected and after it left.

mod common;

use common::ScratchDir;

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use xen_vhost_mem::daemon::{StatsReport, VhostUserDaemon};
use xen_vhost_mem::devices::blk::{BlkConfig, BlkDevice};
use xen_vhost_mem::testing::blk_workload::pass;
use xen_vhost_mem::testing::driver::{DriverConfig, GuestMode, VirtioDriver};
use xen_vhost_mem::testing::{EmulatedXen, GuestSim};
use xen_vhost_mem::{ForeignMapping, XenHandle};

/// Serves one frontend in `mode` (lazy FOREIGN buckets of 256 frames, at most 38, for
/// `Foreign`), writes and reads 1 MiB on two queues; returns the reports taken before any
/// traffic, with the frontend connected after the traffic, and after it left.
fn reports(mode: GuestMode) -> [StatsReport; 3] {
    let cfg = DriverConfig {
        mode,
        queues: 2,
        depth: 8,
        ..DriverConfig::default()
    };
    let emu = Arc::new(EmulatedXen::new(cfg.emulation_pages()).expect("emulation"));
    let dev = XenHandle::new(emu.clone());
    let dir = ScratchDir::new(&format!("stats-{mode:?}"));
    let image = dir.0.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(4 << 20))
        .expect("image");
    let path = dir.0.join("blk.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let blk = BlkDevice::open(
        &image,
        BlkConfig {
            num_queues: 2,
            ..BlkConfig::default()
        },
    )
    .expect("blk");
    let mut daemon = VhostUserDaemon::new(Arc::new(blk)).with_xen(dev.clone());
    if mode == GuestMode::Foreign {
        daemon = daemon.with_foreign_mapping(ForeignMapping::Lazy { bucket_frames: 256 });
        dev.set_lazy_bucket_limit(38).expect("bound");
    }
    let reporter = daemon.reporter();
    let before = reporter.report();
    let t = std::thread::spawn(move || daemon.serve(&listener, Some(1)).expect("serve"));
    let mut drv = if mode == GuestMode::Grant {
        let guest = GuestSim {
            emu: emu.clone(),
            dev: dev.clone(),
            domid: 1,
        };
        VirtioDriver::connect_granting(&path, cfg, Box::new(guest)).expect("connect")
    } else {
        let cfg = DriverConfig {
            emulation: Some(emu.clone()),
            ..cfg
        };
        VirtioDriver::connect(&path, cfg).expect("connect")
    };
    let w = pass(&mut drv, 2, true, 1 << 20, 4096, 5, &mut |_| {}).expect("write");
    let r = pass(&mut drv, 2, false, 1 << 20, 4096, 5, &mut |_| {}).expect("read");
    assert_eq!((w.requests, w.bad, r.requests, r.bad), (256, 0, 256, 0));
    let during = reporter.report();
    drop(drv);
    t.join().expect("daemon");
    [before, during, reporter.report()]
}

/// `"key":value` as the report's JSON line writes it.
fn field(line: &str, key: &str) -> String {
    let at = line
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} in {line}"));
    line[at + key.len() + 3..]
        .split([',', '}'])
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn grant_traffic_moves_the_daemon_and_grant_copy_counters() {
    let [before, during, after] = reports(GuestMode::Grant);
    assert_eq!(
        before,
        StatsReport {
            xen: before.xen,
            ..StatsReport::default()
        }
    );
    let x0 = before.xen.expect("xen part");
    assert_eq!(x0.calls.syscalls(), 0);
    let d = during.daemon;
    assert_eq!(d.requests, 512);
    assert!(d.batches > 0 && d.batches <= d.requests);
    assert!(d.kicks > 0 && d.calls > 0);
    assert_eq!((d.scope_errors, d.connections), (0, 0));
    let x = during.xen.expect("xen part");
    assert!(x.calls.grant_copies > 0, "{x:?}");
    assert!(x.calls.copy_segments >= x.calls.grant_copies);
    assert_eq!(x.calls.errors, 0);
    assert_eq!(x.lazy_bucket_limit, None);
    // The line carries exactly the report's numbers.
    let line = during.to_string();
    for (key, want) in [
        ("requests", d.requests),
        ("batches", d.batches),
        ("kicks", d.kicks),
        ("calls", d.calls),
        ("grant_copies", x.calls.grant_copies),
        ("copy_segments", x.calls.copy_segments),
        ("syscalls", x.calls.syscalls()),
    ] {
        assert_eq!(field(&line, key), want.to_string(), "{key} in {line}");
    }
    assert_eq!(field(&line, "lazy_bucket_limit"), "null");
    // After the frontend left: one connection, nothing mapped.
    assert_eq!(after.daemon.connections, 1);
    assert_eq!(after.xen.expect("xen part").calls.live_mappings, 0);
}

#[test]
fn lazy_foreign_traffic_shows_buckets_mapped_while_connected_and_none_after() {
    let [before, during, after] = reports(GuestMode::Foreign);
    let x0 = before.xen.expect("xen part");
    assert_eq!(
        (x0.lazy_buckets_mapped, x0.lazy_bucket_limit),
        (0, Some(38))
    );
    let x = during.xen.expect("xen part");
    assert!(
        x.lazy_buckets_mapped > 0 && x.lazy_buckets_mapped <= 38,
        "{x:?}"
    );
    // Each bucket: one privcmd mmap and one MMAPBATCH ioctl; eviction one munmap.
    assert!(x.calls.mmaps >= x.lazy_buckets_mapped);
    assert!(x.calls.ioctls >= x.lazy_buckets_mapped);
    assert!(x.calls.live_mappings > 0);
    let line = during.to_string();
    assert_eq!(field(&line, "lazy_bucket_limit"), "38");
    assert_eq!(
        field(&line, "lazy_buckets_mapped"),
        x.lazy_buckets_mapped.to_string()
    );
    assert_eq!(field(&line, "mmaps"), x.calls.mmaps.to_string());
    let xa = after.xen.expect("xen part");
    assert_eq!((xa.lazy_buckets_mapped, xa.calls.live_mappings), (0, 0));
    assert_eq!(after.daemon.requests, 512);
}
