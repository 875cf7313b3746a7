//! blk where the kernel refuses io_uring: a seccomp filter on this whole test process (its
//! own binary, so no other test runs under it) answers `io_uring_setup` with EPERM, as a
//! sandbox or `kernel.io_uring_disabled` would. The queue falls back to one system call per
//! request at run time, and the data is right.

mod common;

use common::ScratchDir;

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use xen_vhost_mem::daemon::VhostUserDaemon;
use xen_vhost_mem::devices::blk::{
    BlkConfig, BlkDevice, BlkIo, BlkIoStats, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use xen_vhost_mem::testing::driver::{Buf, DriverConfig, GuestMode, VirtioDriver};

/// Installs, on every thread of the process, a filter that fails `io_uring_setup` with
/// EPERM and allows everything else.
fn refuse_io_uring() {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
    let arch = if cfg!(target_arch = "x86_64") {
        AUDIT_ARCH_X86_64
    } else {
        AUDIT_ARCH_AARCH64
    };
    let nr = libc::SYS_io_uring_setup as u32;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u16, k: u32, jt: u8, jf: u8| libc::sock_filter { code, jt, jf, k };
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let mut prog = [
        // seccomp_data.arch at 4, .nr at 0.
        stmt(ld, 4),
        jump(jeq, arch, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(ld, 0),
        jump(jeq, nr, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: plain prctl; required before an unprivileged filter (harmless as root).
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(r, 0);
    // SAFETY: a valid filter program that outlives the call; TSYNC applies it to every thread.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &fprog as *const libc::sock_fprog,
        )
    };
    assert_eq!(r, 0, "seccomp: {}", std::io::Error::last_os_error());
}

#[test]
fn refused_io_uring_falls_back_to_one_call_per_request() {
    refuse_io_uring();
    let dir = ScratchDir::new("uring-refused");
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
                io: BlkIo::Uring,
                ..BlkConfig::default()
            },
        )
        .expect("blk"),
    );
    let daemon = Arc::new(VhostUserDaemon::new(blk.clone()));
    let d = daemon.clone();
    let t = std::thread::spawn(move || d.serve(&listener, Some(1)).expect("serve"));
    let mut drv = VirtioDriver::connect(
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
    let mut slots = Vec::new();
    for (i, kind) in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_IN,
    ]
    .into_iter()
    .enumerate()
    {
        let (slot, b) = drv.take_slot(0).expect("slot");
        let sector = 8 * (i as u64 % 2);
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        drv.write(b.header, &hdr).expect("header");
        let data = if kind == VIRTIO_BLK_T_OUT {
            drv.write(b.data_out, &[i as u8 + 1; 4096]).expect("data");
            Buf {
                gpa: b.data_out,
                len: 4096,
                write: false,
            }
        } else {
            Buf {
                gpa: b.data_in,
                len: 4096,
                write: true,
            }
        };
        let bufs = [
            Buf {
                gpa: b.header,
                len: 16,
                write: false,
            },
            data,
            Buf {
                gpa: b.status,
                len: 1,
                write: true,
            },
        ];
        drv.publish(0, slot, &bufs).expect("publish");
        slots.push(slot);
        // Writes first, then the reads in a batch of their own.
        if i == 1 || i == 3 {
            drv.kick(0, 2).expect("kick");
            let mut n = 0;
            while n < 2 {
                n += drv.wait(0, Duration::from_secs(10)).expect("used").len();
            }
        }
    }
    for &slot in &slots {
        let mut st = [0xffu8];
        drv.read(drv.slot(0, slot).status, &mut st).expect("status");
        assert_eq!(st, [VIRTIO_BLK_S_OK]);
    }
    for (k, &slot) in slots[2..].iter().enumerate() {
        let mut back = vec![0u8; 4096];
        drv.read(drv.slot(0, slot).data_in, &mut back)
            .expect("read");
        assert!(back.iter().all(|&x| x == k as u8 + 1), "read {k}");
    }
    // The ring was refused once, and every request took the plain call.
    assert_eq!(
        blk.io_stats(),
        BlkIoStats {
            submissions: 0,
            uring_ops: 0,
            sync_ops: 4,
            rings_refused: 1,
            held: 0,
        }
    );
    drop(drv);
    t.join().expect("daemon");
}
