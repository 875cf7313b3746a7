//! The blk device on io_uring, over a real socket with the vhost crate's `Frontend`: a batch's
//! requests go to the kernel in one submission, a FLUSH in the batch orders after the writes
//! before it, `--read-only` still refuses writes, and `BlkIo::Sync` is one system call per
//! request. Counts are the device's own (`BlkDevice::io_stats`).

mod common;

use common::ScratchDir;

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use xen_vhost_mem::daemon::VhostUserDaemon;
use xen_vhost_mem::daemon::VhostUserDevice;
use xen_vhost_mem::devices::blk::{
    BlkConfig, BlkDevice, BlkIo, BlkIoStats, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use xen_vhost_mem::testing::driver::{Buf, DriverConfig, GuestMode, VirtioDriver};
use xen_vhost_mem::testing::{EmulatedXen, GuestSim};
use xen_vhost_mem::XenHandle;

struct Setup {
    _dir: ScratchDir,
    image: std::path::PathBuf,
    blk: Arc<BlkDevice>,
    daemon: Arc<VhostUserDaemon<BlkDevice>>,
    thread: Option<std::thread::JoinHandle<()>>,
    drv: VirtioDriver,
}

fn setup(tag: &str, io: BlkIo, read_only: bool) -> Setup {
    let dir = ScratchDir::new(tag);
    let image = dir.0.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .expect("image");
    let path = dir.0.join("blk.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let blk = Arc::new(
        BlkDevice::open(
            &image,
            BlkConfig {
                io,
                read_only,
                ..BlkConfig::default()
            },
        )
        .expect("blk"),
    );
    let daemon = Arc::new(VhostUserDaemon::new(blk.clone()));
    let d = daemon.clone();
    let thread = std::thread::spawn(move || d.serve(&listener, Some(1)).expect("serve"));
    let drv = VirtioDriver::connect(
        &path,
        DriverConfig {
            mode: GuestMode::Unix,
            queues: 1,
            depth: 16,
            max_data: 4096,
            ..DriverConfig::default()
        },
    )
    .expect("connect");
    Setup {
        _dir: dir,
        image,
        blk,
        daemon,
        thread: Some(thread),
        drv,
    }
}

/// Publishes one request per `(type, sector, fill)`: OUT writes 4 KiB of `fill`, IN reads 4
/// KiB, FLUSH moves nothing, DISCARD and WRITE_ZEROES send one segment of 8 sectors at
/// `sector` with flags `fill`; one kick for all. Returns their slots.
fn publish(s: &mut Setup, reqs: &[(u32, u64, u8)]) -> Vec<usize> {
    let mut slots = Vec::new();
    for &(kind, sector, fill) in reqs {
        let (slot, b) = s.drv.take_slot(0).expect("slot");
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        s.drv.write(b.header, &hdr).expect("header");
        s.drv.write(b.status, &[0xff]).expect("status");
        let data = match kind {
            VIRTIO_BLK_T_OUT => {
                s.drv.write(b.data_out, &[fill; 4096]).expect("data");
                Some(Buf {
                    gpa: b.data_out,
                    len: 4096,
                    write: false,
                })
            }
            VIRTIO_BLK_T_IN => Some(Buf {
                gpa: b.data_in,
                len: 4096,
                write: true,
            }),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let mut seg = [0u8; 16];
                seg[..8].copy_from_slice(&sector.to_le_bytes());
                seg[8..12].copy_from_slice(&8u32.to_le_bytes());
                seg[12..].copy_from_slice(&u32::from(fill).to_le_bytes());
                s.drv.write(b.data_out, &seg).expect("segment");
                Some(Buf {
                    gpa: b.data_out,
                    len: 16,
                    write: false,
                })
            }
            _ => None,
        };
        let mut bufs = vec![Buf {
            gpa: b.header,
            len: 16,
            write: false,
        }];
        bufs.extend(data);
        bufs.push(Buf {
            gpa: b.status,
            len: 1,
            write: true,
        });
        s.drv.publish(0, slot, &bufs).expect("publish");
        slots.push(slot);
    }
    s.drv.kick(0, reqs.len() as u16).expect("kick");
    slots
}

/// Waits for `n` completions; returns (slot, used length) in used-ring order.
fn wait(s: &mut Setup, n: usize) -> Vec<(usize, u32)> {
    let mut seen = Vec::new();
    while seen.len() < n {
        for c in s.drv.wait(0, Duration::from_secs(10)).expect("used") {
            seen.push((c.slot, c.len));
        }
    }
    seen
}

fn status(s: &Setup, slot: usize) -> u8 {
    let mut b = [0u8];
    s.drv
        .read(s.drv.slot(0, slot).status, &mut b)
        .expect("status");
    b[0]
}

fn end(mut s: Setup) {
    drop(s.drv);
    s.thread.take().expect("daemon").join().expect("daemon");
}

#[test]
fn a_batch_is_one_submission_and_flush_orders_after_its_writes() {
    let mut s = setup("uring-batch", BlkIo::Uring, false);
    let writes: Vec<(u32, u64, u8)> = (0..8)
        .map(|i| (VIRTIO_BLK_T_OUT, 8 * i, i as u8 + 1))
        .collect();
    let slots = publish(&mut s, &writes);
    let done = wait(&mut s, 8);
    assert!(slots.iter().all(|&sl| status(&s, sl) == VIRTIO_BLK_S_OK));
    assert!(done.iter().all(|&(_, len)| len == 1));
    // Buffered writes are plain `pwritev`s (the kernel would hand them to a worker thread).
    assert_eq!(
        s.blk.io_stats(),
        BlkIoStats {
            submissions: 0,
            uring_ops: 0,
            sync_ops: 8,
            rings_refused: 0,
            held: 0,
        }
    );
    let batches = s.daemon.stats().snapshot().batches;
    // Eight reads: one submission per batch carrying all of its reads.
    let reads: Vec<(u32, u64, u8)> = (0..8).map(|i| (VIRTIO_BLK_T_IN, 8 * i, 0)).collect();
    let slots = publish(&mut s, &reads);
    let done = wait(&mut s, 8);
    assert!(done.iter().all(|&(_, len)| len == 4097));
    for (i, &slot) in slots.iter().enumerate() {
        let mut back = vec![0u8; 4096];
        s.drv
            .read(s.drv.slot(0, slot).data_in, &mut back)
            .expect("read");
        assert!(back.iter().all(|&b| b == i as u8 + 1), "read {i}");
    }
    let st = s.blk.io_stats();
    assert_eq!(st.rings_refused, 0, "io_uring refused here");
    assert_eq!(
        st,
        BlkIoStats {
            submissions: s.daemon.stats().snapshot().batches - batches,
            uring_ops: 8,
            sync_ops: 8,
            rings_refused: 0,
            held: 0,
        }
    );
    let img = std::fs::read(&s.image).expect("image");
    for i in 0..8usize {
        assert!(img[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
    // One batch: write sector 0, flush, read it back.
    let slots = publish(
        &mut s,
        &[
            (VIRTIO_BLK_T_OUT, 0, 0xab),
            (VIRTIO_BLK_T_FLUSH, 0, 0),
            (VIRTIO_BLK_T_IN, 0, 0),
        ],
    );
    let done = wait(&mut s, 3);
    assert!(slots.iter().all(|&sl| status(&s, sl) == VIRTIO_BLK_S_OK));
    let read_len = done
        .iter()
        .find(|&&(sl, _)| sl == slots[2])
        .expect("read")
        .1;
    assert_eq!(read_len, 4097);
    let mut back = vec![0u8; 4096];
    s.drv
        .read(s.drv.slot(0, slots[2]).data_in, &mut back)
        .expect("read");
    assert!(back.iter().all(|&b| b == 0xab));
    // The write went first, synchronously; the flush and the read in one submission.
    let st2 = s.blk.io_stats();
    assert_eq!(
        (
            st2.submissions - st.submissions,
            st2.uring_ops - st.uring_ops,
            st2.sync_ops - st.sync_ops
        ),
        (1, 2, 1)
    );
    end(s);
}

#[test]
fn sync_io_is_one_call_per_request() {
    let mut s = setup("uring-sync", BlkIo::Sync, false);
    let writes: Vec<(u32, u64, u8)> = (0..8).map(|i| (VIRTIO_BLK_T_OUT, 8 * i, 7)).collect();
    let slots = publish(&mut s, &writes);
    wait(&mut s, 8);
    assert!(slots.iter().all(|&sl| status(&s, sl) == VIRTIO_BLK_S_OK));
    assert_eq!(
        s.blk.io_stats(),
        BlkIoStats {
            submissions: 0,
            uring_ops: 0,
            sync_ops: 8,
            rings_refused: 0,
            held: 0,
        }
    );
    end(s);
}

#[test]
fn read_only_refuses_writes_on_io_uring_too() {
    let mut s = setup("uring-ro", BlkIo::Uring, true);
    let slots = publish(&mut s, &[(VIRTIO_BLK_T_OUT, 0, 1), (VIRTIO_BLK_T_IN, 0, 0)]);
    wait(&mut s, 2);
    assert_eq!(status(&s, slots[0]), VIRTIO_BLK_S_IOERR);
    assert_eq!(status(&s, slots[1]), VIRTIO_BLK_S_OK);
    let img = std::fs::read(&s.image).expect("image");
    assert!(img.iter().all(|&b| b == 0));
    // Only the read reached the file.
    assert_eq!(s.blk.io_stats().uring_ops, 1);
    end(s);
}

#[test]
fn discard_and_write_zeroes_deallocate_and_zero_through_fallocate() {
    for io in [BlkIo::Uring, BlkIo::Sync] {
        let mut s = setup(&format!("uring-zero-{io:?}"), io, false);
        let f = s.blk.features();
        assert_ne!(f & VIRTIO_BLK_F_DISCARD, 0);
        assert_ne!(f & VIRTIO_BLK_F_WRITE_ZEROES, 0);
        let c = s.blk.config();
        // max_discard_sectors, max_discard_seg, discard_sector_alignment, then the same for
        // WRITE_ZEROES and write_zeroes_may_unmap.
        let word = |o: usize| u32::from_le_bytes([c[o], c[o + 1], c[o + 2], c[o + 3]]);
        assert_eq!((word(36), word(40), word(44)), (1 << 21, 1, 1));
        assert_eq!((word(48), word(52), c[56]), (1 << 21, 1, 1));
        let writes: Vec<(u32, u64, u8)> = (0..4).map(|i| (VIRTIO_BLK_T_OUT, 8 * i, 0x5a)).collect();
        publish(&mut s, &writes);
        wait(&mut s, 4);
        // Discard sectors 0-7, zero 8-15 (no unmap) and 16-23 (unmap), and a discard with the
        // unmap flag, which discard does not take.
        let slots = publish(
            &mut s,
            &[
                (VIRTIO_BLK_T_DISCARD, 0, 0),
                (VIRTIO_BLK_T_WRITE_ZEROES, 8, 0),
                (VIRTIO_BLK_T_WRITE_ZEROES, 16, 1),
                (VIRTIO_BLK_T_DISCARD, 24, 1),
            ],
        );
        wait(&mut s, 4);
        let st: Vec<u8> = slots.iter().map(|&sl| status(&s, sl)).collect();
        assert_eq!(
            st,
            [
                VIRTIO_BLK_S_OK,
                VIRTIO_BLK_S_OK,
                VIRTIO_BLK_S_OK,
                VIRTIO_BLK_S_UNSUPP
            ]
        );
        let img = std::fs::read(&s.image).expect("image");
        assert!(img[..3 * 4096].iter().all(|&b| b == 0), "{io:?}");
        assert!(img[3 * 4096..4 * 4096].iter().all(|&b| b == 0x5a));
        // Past the end of the disk: refused.
        let slots = publish(
            &mut s,
            &[(VIRTIO_BLK_T_WRITE_ZEROES, (1 << 20) / 512 - 4, 0)],
        );
        wait(&mut s, 1);
        assert_eq!(status(&s, slots[0]), VIRTIO_BLK_S_IOERR);
        end(s);
    }
}

/// One request with its data buffer at `gpa`, `len` bytes, published and kicked alone... or
/// with others: `reqs` of (type, sector, data gpa, len); one kick.
fn publish_at(s: &mut Setup, reqs: &[(u32, u64, u64, u32)]) -> Vec<usize> {
    let mut slots = Vec::new();
    for &(kind, sector, gpa, len) in reqs {
        let (slot, b) = s.drv.take_slot(0).expect("slot");
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        s.drv.write(b.header, &hdr).expect("header");
        s.drv.write(b.status, &[0xff]).expect("status");
        let bufs = [
            Buf {
                gpa: b.header,
                len: 16,
                write: false,
            },
            Buf {
                gpa,
                len,
                write: kind == VIRTIO_BLK_T_IN,
            },
            Buf {
                gpa: b.status,
                len: 1,
                write: true,
            },
        ];
        s.drv.publish(0, slot, &bufs).expect("publish");
        slots.push(slot);
    }
    s.drv.kick(0, reqs.len() as u16).expect("kick");
    slots
}

/// Our blk daemon over a 1 MiB image opened with O_DIRECT (the file system must take it) and
/// `completion_delay`, one connection of a driver over UNIX memory, or over emulated GRANT memory
/// (then the emulation and the handle too, to count what stays mapped).
fn setup_direct(
    tag: &str,
    completion_delay: Option<Duration>,
    mode: GuestMode,
    max_data: usize,
) -> (Setup, Option<(Arc<EmulatedXen>, XenHandle)>) {
    let dir = ScratchDir::new(tag);
    let image = dir.0.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .expect("image");
    let path = dir.0.join("blk.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let blk = Arc::new(
        BlkDevice::open(
            &image,
            BlkConfig {
                direct: true,
                completion_delay,
                ..BlkConfig::default()
            },
        )
        .expect("O_DIRECT open (the test directory's file system must support it)"),
    );
    let cfg = DriverConfig {
        mode,
        queues: 1,
        depth: 16,
        max_data,
        ..DriverConfig::default()
    };
    let mut daemon = VhostUserDaemon::new(blk.clone());
    let xen = (mode == GuestMode::Grant).then(|| {
        let emu = Arc::new(EmulatedXen::new(cfg.emulation_pages()).expect("emulation"));
        let dev = XenHandle::new(emu.clone());
        (emu, dev)
    });
    if let Some((_, dev)) = &xen {
        daemon = daemon.with_xen(dev.clone());
    }
    let daemon = Arc::new(daemon);
    let d = daemon.clone();
    let thread = std::thread::spawn(move || d.serve(&listener, Some(1)).expect("serve"));
    let drv = match &xen {
        Some((emu, dev)) => {
            let guest = GuestSim {
                emu: emu.clone(),
                dev: dev.clone(),
                domid: 1,
            };
            VirtioDriver::connect_granting(&path, cfg, Box::new(guest))
        }
        None => VirtioDriver::connect(&path, cfg),
    }
    .expect("connect");
    let s = Setup {
        _dir: dir,
        image,
        blk,
        daemon,
        thread: Some(thread),
        drv,
    };
    (s, xen)
}

#[test]
fn direct_io_aligned_bounced_and_buffered() {
    let (mut s, _) = setup_direct("uring-direct", None, GuestMode::Unix, 3 * 4096);
    // Two writes in one batch: one from page-aligned memory (straight to the kernel), one
    // from memory one byte off (through an aligned bounce buffer).
    let a = s.drv.slot(0, 14).data_out;
    let b = s.drv.slot(0, 15).data_out + 1;
    s.drv.write(a, &[0x11; 4096]).expect("fill");
    s.drv.write(b, &[0x22; 4096]).expect("fill");
    let slots = publish_at(
        &mut s,
        &[
            (VIRTIO_BLK_T_OUT, 0, a, 4096),
            (VIRTIO_BLK_T_OUT, 8, b, 4096),
        ],
    );
    wait(&mut s, 2);
    assert!(slots.iter().all(|&sl| status(&s, sl) == VIRTIO_BLK_S_OK));
    // O_DIRECT writes go through the ring, held until their completions.
    assert_eq!(
        s.blk.io_stats(),
        BlkIoStats {
            submissions: 1,
            uring_ops: 2,
            sync_ops: 0,
            rings_refused: 0,
            held: 2,
        }
    );
    // Read both back into memory one byte off: bounced reads, emptied into the guest.
    let ra = s.drv.slot(0, 14).data_in + 1;
    let rb = s.drv.slot(0, 15).data_in + 1;
    let slots = publish_at(
        &mut s,
        &[
            (VIRTIO_BLK_T_IN, 0, ra, 4096),
            (VIRTIO_BLK_T_IN, 8, rb, 4096),
        ],
    );
    let done = wait(&mut s, 2);
    assert!(done.iter().all(|&(_, len)| len == 4097));
    assert!(slots.iter().all(|&sl| status(&s, sl) == VIRTIO_BLK_S_OK));
    let mut back = vec![0u8; 4096];
    s.drv.read(ra, &mut back).expect("read");
    assert!(back.iter().all(|&x| x == 0x11));
    s.drv.read(rb, &mut back).expect("read");
    assert!(back.iter().all(|&x| x == 0x22));
    // 100 bytes at sector 16: no O_DIRECT file takes that length; the buffered descriptor
    // does, and the O_DIRECT reads after it see it.
    s.drv.write(a, &[0x33; 100]).expect("fill");
    let slots = publish_at(&mut s, &[(VIRTIO_BLK_T_OUT, 16, a, 100)]);
    wait(&mut s, 1);
    assert_eq!(status(&s, slots[0]), VIRTIO_BLK_S_OK);
    let st = s.blk.io_stats();
    assert_eq!((st.uring_ops, st.sync_ops), (4, 1));
    let img = std::fs::read(&s.image).expect("image");
    assert!(img[..4096].iter().all(|&x| x == 0x11));
    assert!(img[4096..8192].iter().all(|&x| x == 0x22));
    assert!(img[8192..8292].iter().all(|&x| x == 0x33));
    assert!(img[8292..].iter().all(|&x| x == 0));
    end(s);
}

/// O_DIRECT over emulated GRANT memory: every request is held past `serve` with its own
/// memory (fetched in one grant copy per request), completed from the ring's eventfd on the
/// worker, and nothing stays mapped after the frontend goes away.
#[test]
fn direct_io_over_grant_memory_is_held_until_its_completion() {
    let (mut s, xen) = setup_direct("uring-direct-grant", None, GuestMode::Grant, 4096);
    let (emu, dev) = xen.expect("GRANT mode");
    let writes: Vec<(u32, u64, u8)> = (0..8)
        .map(|i| (VIRTIO_BLK_T_OUT, 8 * i as u64, 0x40 + i as u8))
        .chain([(VIRTIO_BLK_T_FLUSH, 0, 0)])
        .collect();
    let slots = publish(&mut s, &writes);
    wait(&mut s, writes.len());
    assert!(slots.iter().all(|&sl| status(&s, sl) == VIRTIO_BLK_S_OK));
    let reads: Vec<(u32, u64, u8)> = (0..8).map(|i| (VIRTIO_BLK_T_IN, 8 * i, 0)).collect();
    let slots = publish(&mut s, &reads);
    let done = wait(&mut s, reads.len());
    assert!(done.iter().all(|&(_, len)| len == 4097));
    for (i, &slot) in slots.iter().enumerate() {
        assert_eq!(status(&s, slot), VIRTIO_BLK_S_OK);
        let mut back = vec![0u8; 4096];
        s.drv
            .read(s.drv.slot(0, slot).data_in, &mut back)
            .expect("read");
        assert!(back.iter().all(|&x| x == 0x40 + i as u8), "read {i}");
    }
    let st = s.blk.io_stats();
    assert_eq!((st.held, st.uring_ops, st.sync_ops), (17, 17, 0));
    assert_eq!(s.daemon.stats().snapshot().requests, 17);
    let img = std::fs::read(&s.image).expect("image");
    for i in 0..8 {
        assert!(img[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&x| x == 0x40 + i as u8));
    }
    end(s);
    assert_eq!(dev.counters().live_mappings(), 0);
    assert_eq!(emu.live_mappings(), 0);
    assert_eq!(emu.live_grant_maps(), 0);
}

/// With a completion delay (fault injection for crash tests), held requests are answered out
/// of order: the delay is 1/2 to 2 times the setting by ring slot, so the eight reads come
/// back in four pairs, the ring's slots 0 and 4 first and 3 and 7 last.
#[test]
fn a_completion_delay_answers_held_requests_out_of_order() {
    let (mut s, _) = setup_direct(
        "uring-delay",
        Some(Duration::from_millis(60)),
        GuestMode::Unix,
        4096,
    );
    let reads: Vec<(u32, u64, u8)> = (0..8).map(|i| (VIRTIO_BLK_T_IN, 8 * i, 0)).collect();
    let slots = publish(&mut s, &reads);
    let done = wait(&mut s, reads.len());
    let order: Vec<usize> = done
        .iter()
        .map(|&(slot, _)| slots.iter().position(|&x| x == slot).expect("ours"))
        .collect();
    // Pairs by delay; within a pair either order.
    let pairs: Vec<[usize; 2]> = order
        .chunks(2)
        .map(|c| {
            let mut p = [c[0], c[1]];
            p.sort();
            p
        })
        .collect();
    assert_eq!(pairs, [[0, 4], [1, 5], [2, 6], [3, 7]], "{order:?}");
    assert_eq!(s.blk.io_stats().held, 8);
    end(s);
}
