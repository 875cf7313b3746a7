//! The daemon end to end over a real Unix socket, with the vhost crate's `Frontend` as the
//! peer and a virtio driver over guest memory: data written, read back and checked.

mod common;

use common::ScratchDir;

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::thread::JoinHandle;

use xen_vhost_mem::daemon::VhostUserDaemon;
use xen_vhost_mem::devices::blk::{BlkConfig, BlkDevice};
use xen_vhost_mem::testing::blk_workload::{pass, pattern_byte};
use xen_vhost_mem::testing::driver::{DriverConfig, GuestMode, VirtioDriver};

struct Served {
    _dir: ScratchDir,
    path: std::path::PathBuf,
    image: std::path::PathBuf,
    thread: Option<JoinHandle<Arc<VhostUserDaemon<BlkDevice>>>>,
}

fn serve_blk(tag: &str, mib: u64, queues: u16, connections: usize) -> Served {
    let dir = ScratchDir::new(tag);
    let image = dir.0.join("disk.img");
    let f = std::fs::File::create(&image).expect("image");
    f.set_len(mib << 20).expect("size");
    let path = dir.0.join("blk.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let dev = BlkDevice::open(
        &image,
        BlkConfig {
            num_queues: queues,
            ..BlkConfig::default()
        },
    )
    .expect("blk");
    let daemon = Arc::new(VhostUserDaemon::new(Arc::new(dev)));
    let d = daemon.clone();
    let thread = std::thread::spawn(move || {
        d.serve(&listener, Some(connections)).expect("serve");
        d
    });
    Served {
        _dir: dir,
        path,
        image,
        thread: Some(thread),
    }
}

#[test]
fn unix_blk_write_then_read_two_queues() {
    let mut s = serve_blk("unix-rw", 4, 2, 1);
    let mut drv = VirtioDriver::connect(
        &s.path,
        DriverConfig {
            mode: GuestMode::Unix,
            queues: 2,
            depth: 8,
            ..DriverConfig::default()
        },
    )
    .expect("connect");
    let total = 2 << 20;
    let w = pass(&mut drv, 2, true, total, 4096, 7, &mut |_| {}).expect("write pass");
    assert_eq!((w.requests, w.bad), (512, 0));
    let r = pass(&mut drv, 2, false, total, 4096, 7, &mut |_| {}).expect("read pass");
    assert_eq!((r.requests, r.bad), (512, 0));
    // The host sees exactly the pattern in the image.
    let img = std::fs::read(&s.image).expect("image");
    assert!(img[..total as usize]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern_byte(7, i as u64)));
    assert!(img[total as usize..].iter().all(|&b| b == 0));
    drop(drv);
    let daemon = s.thread.take().expect("thread").join().expect("daemon");
    let st = daemon.stats().snapshot();
    assert_eq!(st.requests, 1024);
    assert_eq!(st.connections, 1);
}

mod xen {
    use super::*;
    use xen_vhost_mem::testing::EmulatedXen;
    use xen_vhost_mem::testing::GuestSim;
    use xen_vhost_mem::{ForeignMapping, XenHandle};

    fn run(mode: GuestMode, indirect: bool) {
        run_with(mode, indirect, None);
    }

    /// With `lazy`: the daemon maps FOREIGN lazily in buckets of that many frames, at most
    /// half the guest's buckets mapped at a time.
    fn run_with(mode: GuestMode, indirect: bool, lazy: Option<usize>) {
        let cfg = DriverConfig {
            mode,
            queues: 2,
            depth: 8,
            indirect,
            ..DriverConfig::default()
        };
        let emu = Arc::new(EmulatedXen::new(cfg.emulation_pages()).expect("emulation"));
        let dev = XenHandle::new(emu.clone());
        let dir = ScratchDir::new(&format!("{mode:?}-{indirect}"));
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
        let mut limit = usize::MAX;
        if let Some(bucket_frames) = lazy {
            daemon = daemon.with_foreign_mapping(ForeignMapping::Lazy { bucket_frames });
            // Below the 40 buckets the driver's buffers and rings span, above what two
            // batches of 8 in flight (2 buckets per chain at most) and the pinned rings hold.
            limit = 38;
            dev.set_lazy_bucket_limit(limit)
                .expect("bound before any region");
        }
        let daemon = Arc::new(daemon);
        let d = daemon.clone();
        let t = std::thread::spawn(move || d.serve(&listener, Some(1)).expect("serve"));
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
        let total = 1 << 20;
        let before = dev.counters().snapshot();
        let mapped_before = dev.lazy_buckets_mapped();
        let w = pass(&mut drv, 2, true, total, 4096, 3, &mut |_| {}).expect("write");
        assert_eq!((w.requests, w.bad), (256, 0));
        let r = pass(&mut drv, 2, false, total, 4096, 3, &mut |_| {}).expect("read");
        assert_eq!((r.requests, r.bad), (256, 0));
        let used = dev.counters().snapshot().since(&before);
        let mapped_after = dev.lazy_buckets_mapped();
        assert!(mapped_after <= limit);
        let img = std::fs::read(&image).expect("image");
        assert!(img[..total as usize]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(3, i as u64)));
        drop(drv);
        t.join().expect("daemon");
        // Nothing stays mapped once the frontend is gone.
        assert_eq!(dev.counters().live_mappings(), 0);
        assert_eq!(emu.live_mappings(), 0);
        assert_eq!(emu.live_grant_maps(), 0);
        assert_eq!(dev.lazy_buckets_mapped(), 0);
        if lazy.is_some() {
            // Every system call is a bucket mapped on first touch (one mmap + one
            // MMAPBATCH) or evicted under the bound (one mmap), and no request failed for
            // want of room (checked above).
            let evicted = dev.lazy_evictions() as usize;
            let maps = mapped_after + evicted - mapped_before;
            println!(
                "lazy: {} syscalls for 512 requests, {maps} buckets mapped, {evicted} evicted, bound {limit}",
                used.syscalls()
            );
            assert!(evicted > 0, "the bound made room");
            assert_eq!(used.syscalls() as usize, 2 * maps + evicted);
        } else if mode == GuestMode::Grant {
            // Batched: one grant copy for the indirect tables, one for the buffers, one
            // copy-back per batch, never one per request.
            let batches = daemon.stats().snapshot().batches;
            let per_batch = if indirect { 3 } else { 2 };
            assert!(
                used.syscalls() <= per_batch * batches,
                "{} syscalls for {batches} batches",
                used.syscalls()
            );
            assert!(used.syscalls() > 0);
        } else {
            assert_eq!(used.syscalls(), 0, "FOREIGN is mapped at SET_MEM_TABLE");
        }
    }

    #[test]
    fn grant_blk_write_then_read() {
        run(GuestMode::Grant, false);
    }

    #[test]
    fn grant_blk_indirect_tables_in_on_demand_memory() {
        run(GuestMode::Grant, true);
    }

    #[test]
    fn foreign_blk_write_then_read() {
        run(GuestMode::Foreign, false);
    }

    #[test]
    fn lazy_foreign_blk_write_then_read_under_a_bucket_bound() {
        run_with(GuestMode::Foreign, false, Some(4));
    }
}
