//! A hostile guest on the vsock device: bad operations, socket types, CIDs and lengths,
//! chains too short for a header or pointing outside guest memory, receive buffers too
//! small for a packet, and a flood of bad packets with no receive buffers. Each gets an RST
//! (addressed back to the sender) or an error value, nothing panics, and the device serves
//! a good connection afterwards.

mod common;
mod vsock_guest;

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::Duration;

use vsock_guest::{pattern, Guest, Rig, CID};
use xen_vhost_mem::devices::vsock::packet::{Header, Op, HOST_CID, MAX_PAYLOAD};
use xen_vhost_mem::devices::vsock::{mux::MAX_CONTROL, VsockDevice};
use xen_vhost_mem::testing::driver::{Buf, GuestMode};

const T: Duration = Duration::from_secs(20);

fn malformed(d: &VsockDevice) -> u64 {
    d.stats().malformed.load(Ordering::Relaxed)
}

/// Sends `h` (with `payload`) and expects an RST back to its source port from its
/// destination port.
fn expect_rst(g: &mut Guest, h: Header, payload: &[u8]) {
    let before = g.stray.len();
    g.send(&h, payload);
    assert!(g.until(T, |g| g.stray.len() > before), "no answer to {h:?}");
    let r = g.stray[before];
    assert_eq!(r.op, Op::Rst as u16, "{r:?}");
    assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, CID));
    assert_eq!((r.src_port, r.dst_port), (h.dst_port, h.src_port));
}

fn base(g: &mut Guest, op: Op, len: u32) -> Header {
    g.hdr(op, 777, 888, len, 0)
}

fn hostile(mode: GuestMode) {
    let mut r = Rig::new(&format!("vsock-hostile-{mode:?}"), mode, 1);
    let d = r.dev.clone();
    // Unknown operation, unsupported type (SEQPACKET), wrong CIDs either way.
    let h = Header {
        op: 9,
        ..base(&mut r.g, Op::Rw, 0)
    };
    expect_rst(&mut r.g, h, &[]);
    let h = Header {
        typ: 2,
        ..base(&mut r.g, Op::Request, 0)
    };
    expect_rst(&mut r.g, h, &[]);
    let h = Header {
        src_cid: 42,
        ..base(&mut r.g, Op::Request, 0)
    };
    expect_rst(&mut r.g, h, &[]);
    let h = Header {
        dst_cid: 7,
        ..base(&mut r.g, Op::Request, 0)
    };
    expect_rst(&mut r.g, h, &[]);
    // A length beyond the chain, beyond what a packet may carry, and payload on a REQUEST.
    let h = base(&mut r.g, Op::Rw, 1000);
    expect_rst(&mut r.g, h, &[0u8; 10]);
    let h = base(&mut r.g, Op::Rw, MAX_PAYLOAD + 1);
    expect_rst(&mut r.g, h, &[0u8; 10]);
    let h = base(&mut r.g, Op::Request, 4);
    expect_rst(&mut r.g, h, b"data");
    assert_eq!(malformed(&d), 7);
    // Well-formed but for nobody: data to an unknown connection, a port no host program
    // listens on.
    let h = base(&mut r.g, Op::Rw, 3);
    expect_rst(&mut r.g, h, b"abc");
    let h = base(&mut r.g, Op::Request, 0);
    expect_rst(&mut r.g, h, &[]);
    // An RST for nobody is not answered (no RST storms).
    let h = base(&mut r.g, Op::Rst, 0);
    let before = r.g.stray.len();
    r.g.send(&h, &[]);
    r.g.poll(Duration::from_millis(200));
    assert_eq!(r.g.stray.len(), before);
    assert_eq!(malformed(&d), 7);

    // Chains the device cannot read a header from: counted, returned, no answer.
    r.g.send_bufs(|b| {
        vec![Buf {
            gpa: b.data_out,
            len: 20,
            write: false,
        }]
    });
    r.g.send_bufs(|b| {
        vec![Buf {
            gpa: b.data_in,
            len: 64,
            write: true,
        }]
    });
    // Outside guest memory (UNIX: below the memfd; GRANT: a ref never granted).
    let nowhere = if mode == GuestMode::Unix {
        0x1000
    } else {
        (1 << 63) | (0xf_0000 << 12)
    };
    r.g.send_bufs(|_| {
        vec![Buf {
            gpa: nowhere,
            len: 44,
            write: false,
        }]
    });
    assert!(r.g.until(T, |_| malformed(&d) == 10));
    assert_eq!(r.g.stray.len(), before);

    // A bad packet on a live connection tears it down: RST to the guest, EOF to the host.
    let l = r.listen_host(9000);
    let gp = r.g.connect(9000).expect("connect");
    let (mut s, _) = l.accept().expect("accept");
    let h = r.g.hdr(Op::Rw, gp, 9000, 500, 0);
    r.g.send(&h, &[1u8; 10]);
    assert!(r.g.until(T, |g| g.conns[&(gp, 9000)].rst));
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut b = [0u8; 4];
    assert_eq!(s.read(&mut b).expect("EOF"), 0);
    assert_eq!(d.connections(), 0);

    // Receive buffers too small for a header, or not writable: returned with used length 0.
    r.g.rx_reserve = 2;
    let h = base(&mut r.g, Op::Rw, 1);
    expect_rst(&mut r.g, h, b"x");
    let h = base(&mut r.g, Op::Rw, 1);
    expect_rst(&mut r.g, h, b"x");
    r.g.poll(Duration::from_millis(50));
    r.g.rx_reserve = 0;
    r.g.post_rx_raw(|b| {
        vec![Buf {
            gpa: b.data_in,
            len: 16,
            write: true,
        }]
    });
    r.g.post_rx_raw(|b| {
        vec![Buf {
            gpa: b.header,
            len: 16,
            write: false,
        }]
    });
    // Packets go out until both reach the front of the held list.
    let mut sent = 0;
    assert!(r.g.until(T, |g| {
        if g.short_rx.len() < 2 && sent < 64 {
            let h = g.hdr(Op::Rw, 777, 888, 1, 0);
            g.send(&h, b"x");
            sent += 1;
        }
        g.short_rx.len() == 2
    }));
    assert_eq!(r.g.short_rx, vec![0, 0]);

    // The device serves on: a good connection, data both ways.
    let gp = r.g.connect(9000).expect("connect after all that");
    let (mut s, _) = l.accept().expect("accept");
    let data = pattern(9, 100_000);
    let mut sent = 0;
    assert!(r.g.until(T, |g| {
        sent += g.send_some((gp, 9000), &data[sent..]);
        sent == data.len()
    }));
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got).expect("host read");
    assert_eq!(got, data);
    s.write_all(b"still here").expect("write");
    assert!(r.g.until(T, |g| g.conns[&(gp, 9000)].data == b"still here"));
    let (emu, _) = r.finish();
    if let Some(emu) = emu {
        assert_eq!(emu.live_mappings(), 0);
    }
}

#[test]
fn malformed_packets_get_rst_or_an_error_and_the_device_serves_on_unix() {
    hostile(GuestMode::Unix);
}

#[test]
fn malformed_packets_get_rst_or_an_error_and_the_device_serves_on_grant() {
    hostile(GuestMode::Grant);
}

#[test]
fn a_flood_of_bad_packets_without_receive_buffers_is_bounded() {
    let mut r = Rig::new("vsock-flood", GuestMode::Unix, 1);
    // The 16 posted buffers take the first RSTs; the rest queue up to the bound.
    for _ in 0..MAX_CONTROL + 100 {
        let h = Header {
            op: 9,
            ..base(&mut r.g, Op::Rw, 0)
        };
        r.g.send(&h, &[]);
    }
    let d = r.dev.clone();
    let total = (MAX_CONTROL + 100) as u64;
    let deadline = std::time::Instant::now() + T;
    while malformed(&d) < total && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(malformed(&d), total);
    let dropped = d.stats().dropped_control.load(Ordering::Relaxed);
    assert!(dropped >= 100 - 16, "dropped {dropped}");
    // The guest reads its buffers again: the queued RSTs drain, the device answers.
    assert!(r.g.until(T, |g| g.stray.len() as u64 == total - dropped));
    let l = r.listen_host(9100);
    let gp = r.g.connect(9100).expect("connect");
    let (mut s, _) = l.accept().expect("accept");
    let h = r.g.hdr(Op::Rw, gp, 9100, 2, 0);
    r.g.send(&h, b"hi");
    let mut b = [0u8; 2];
    s.read_exact(&mut b).expect("read");
    assert_eq!(&b, b"hi");
    r.finish();
}

/// Thousands of random packets (ops, types, CIDs, ports, flags, credit fields, lengths that
/// may or may not match the chain, split anywhere), some on live connections to a host
/// program that answers: nothing panics, every packet the device sends is addressed to the
/// guest, and a good connection works afterwards.
#[test]
fn random_packets_do_not_stop_the_device() {
    let mut r = Rig::new("vsock-random", GuestMode::Grant, 1);
    let l = r.listen_host(9200);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n.min(100)]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..3000 {
        let v = next();
        let op = (next() % 9) as u16;
        let payload = if op == Op::Rw as u16 {
            (next() % 700) as usize
        } else {
            0
        };
        // Mostly well-formed (so connections open and carry data), one in five not.
        let len = match v % 5 {
            0 => next() as u32,
            1 => (next() % 700) as u32,
            _ => payload as u32,
        };
        let h = Header {
            src_cid: if v % 10 == 0 { next() } else { CID },
            dst_cid: if v % 11 == 0 { next() } else { HOST_CID },
            src_port: 60000 + (next() % 8) as u32,
            dst_port: if v % 3 == 0 {
                (next() % 4) as u32 * 1000
            } else {
                9200
            },
            len,
            typ: if v % 13 == 0 { (next() % 4) as u16 } else { 1 },
            op,
            flags: (next() % 4) as u32,
            buf_alloc: next() as u32,
            fwd_cnt: next() as u32,
        };
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend((0..payload).map(|i| i as u8));
        if v % 17 == 0 {
            // Cut anywhere, header included.
            let cut = (next() as usize) % bytes.len();
            bytes.truncate(cut.max(1));
        }
        r.g.send_raw(&bytes, v % 2 == 0);
        r.g.poll(Duration::ZERO);
    }
    r.g.poll(Duration::from_millis(200));
    let st = r.dev.stats();
    // The random stream reached the paths: refusals, connections, data to host programs
    // (their answers reach the guest only while a random credit and connection allow).
    assert!(malformed(&r.dev) > 100, "{st:?}");
    assert!(st.connections.load(Ordering::Relaxed) > 0, "{st:?}");
    assert!(st.tx_bytes.load(Ordering::Relaxed) > 0, "{st:?}");
    assert!(st.rsts.load(Ordering::Relaxed) > 100, "{st:?}");
    // Everything the device sent was addressed to the guest (Guest::handle checks each).
    let gp = r.g.connect(9200).expect("a good connection after all that");
    let h = r.g.hdr(Op::Rw, gp, 9200, 5, 0);
    r.g.send(&h, b"hello");
    assert!(r.g.until(T, |g| g.conns[&(gp, 9200)].data == b"hello"));
    let (emu, _) = r.finish();
    assert_eq!(emu.expect("grant").live_mappings(), 0);
}
