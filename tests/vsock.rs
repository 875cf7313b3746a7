//! The vsock device end to end without QEMU: the test kit's driver plays the guest's
//! virtio driver over memfd (UNIX) and emulated GRANT memory, `vsock_guest` plays the guest's
//! vsock stack, and host programs are real Unix sockets. Data both ways checksummed, many
//! connections at once, host-initiated `CONNECT`/`OK`, credit exhaustion, peers closing
//! mid-stream, held receive buffers across a disconnect, transport reset after reconnect.

mod common;
mod vsock_guest;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use vsock_guest::{fnv, pattern, Rig};
use xen_vhost_mem::devices::vsock::packet::{Op, SHUTDOWN_RCV, SHUTDOWN_SEND};
use xen_vhost_mem::testing::driver::GuestMode;

const T: Duration = Duration::from_secs(20);

/// A host program for guest connections to `port`: reads `n` bytes, answers their
/// checksum (8 bytes LE) followed by `reply` bytes of pattern `seed`, then closes.
fn host_echo_sum(
    l: std::os::unix::net::UnixListener,
    conns: usize,
    n: usize,
    reply: usize,
) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let mut handles = Vec::new();
        for i in 0..conns {
            let (mut s, _) = l.accept().expect("accept");
            handles.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; n];
                s.read_exact(&mut buf).expect("host read");
                let sum = fnv(&buf);
                s.write_all(&sum.to_le_bytes()).expect("sum");
                s.write_all(&pattern(1000 + i as u64, reply))
                    .expect("host write");
                sum
            }));
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("host conn"))
            .collect()
    })
}

fn data_both_ways(mode: GuestMode, split_rx: bool) {
    let mut r = Rig::open(
        &format!("vsock-data-{mode:?}-{split_rx}"),
        mode,
        1,
        split_rx,
    );
    let n = 1 << 20;
    let host = host_echo_sum(r.listen_host(1234), 1, n, n);
    let gp = r.g.connect(1234).expect("connect");
    let key = (gp, 1234);
    let data = pattern(7, n);
    let mut sent = 0;
    assert!(r.g.until(T, |g| {
        sent += g.send_some(key, &data[sent..]);
        g.conns[&key].data.len() == 8 + n
    }));
    let c = &r.g.conns[&key];
    let sum = u64::from_le_bytes(c.data[..8].try_into().expect("8 bytes"));
    assert_eq!(sum, fnv(&data), "guest → host bytes");
    assert_eq!(
        fnv(&c.data[8..]),
        fnv(&pattern(1000, n)),
        "host → guest bytes"
    );
    assert_eq!(&c.data[8..], &pattern(1000, n)[..]);
    assert_eq!(host.join().expect("host"), vec![fnv(&data)]);
    // The host closed after its reply: the guest hears SHUTDOWN(SEND).
    assert!(r
        .g
        .until(T, |g| g.conns[&key].peer_shutdown & SHUTDOWN_SEND != 0));
    let st = r.dev.stats();
    assert_eq!(st.tx_bytes.load(Ordering::Relaxed), n as u64);
    assert_eq!(st.rx_bytes.load(Ordering::Relaxed), n as u64 + 8);
    assert_eq!(st.malformed.load(Ordering::Relaxed), 0);
    assert!(r.g.short_rx.is_empty());
    // The guest closes: SHUTDOWN both ways, answered by RST, the connection is gone.
    let h =
        r.g.hdr(Op::Shutdown, gp, 1234, 0, SHUTDOWN_RCV | SHUTDOWN_SEND);
    r.g.send(&h, &[]);
    assert!(r.g.until(T, |g| g.conns[&key].rst));
    assert_eq!(r.dev.connections(), 0);
    let (emu, _) = r.finish();
    if let Some(emu) = emu {
        assert_eq!(emu.live_mappings(), 0);
    }
}

#[test]
fn data_both_ways_checksummed_unix() {
    data_both_ways(GuestMode::Unix, false);
}

#[test]
fn data_both_ways_checksummed_grant_split_buffers() {
    data_both_ways(GuestMode::Grant, true);
}

#[test]
fn host_connect_line_is_answered_ok_with_the_host_port() {
    let mut r = Rig::new("vsock-hostconn", GuestMode::Unix, 1);
    r.g.listening.insert(5000);
    let mut s = UnixStream::connect(&r.uds).expect("connect uds");
    s.write_all(b"CONNECT 5000\n").expect("line");
    assert!(r.g.until(T, |g| g.conns.keys().any(|k| k.0 == 5000)));
    let key = *r.g.conns.keys().find(|k| k.0 == 5000).expect("conn");
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    s.set_read_timeout(Some(T)).expect("timeout");
    while b[0] != b'\n' {
        s.read_exact(&mut b).expect("OK line");
        line.push(b[0]);
    }
    // vhost-device-vsock's answer: the port the host program asked for.
    assert_eq!(line, b"OK 5000\n");
    s.write_all(b"from host").expect("write");
    assert!(r.g.until(T, |g| g.conns[&key].data == b"from host"));
    let h = r.g.hdr(Op::Rw, key.0, key.1, 9, 0);
    r.g.send(&h, b"to host!!");
    let mut got = [0u8; 9];
    s.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"to host!!");
    // A port the guest does not listen on: the guest answers RST, the host sees EOF.
    let mut s2 = UnixStream::connect(&r.uds).expect("connect uds");
    s2.write_all(b"CONNECT 5001\n").expect("line");
    s2.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    assert!(r.g.until(T, |_| {
        let mut b = [0u8; 8];
        matches!(s2.read(&mut b), Ok(0))
    }));
    // A bad line: the stream is closed.
    let mut s3 = UnixStream::connect(&r.uds).expect("connect uds");
    s3.write_all(b"HELLO\n").expect("line");
    s3.set_read_timeout(Some(T)).expect("timeout");
    let mut b = [0u8; 8];
    assert_eq!(s3.read(&mut b).expect("EOF"), 0);
    assert_eq!(r.dev.connections(), 1);
    r.finish();
}

#[test]
fn sixty_four_connections_both_ways_at_once() {
    let mut r = Rig::new("vsock-many", GuestMode::Unix, 1);
    let n = 64 * 1024;
    // 32 guest-initiated connections to one host program.
    let host = host_echo_sum(r.listen_host(2000), 32, n, n);
    let mut gkeys = Vec::new();
    for _ in 0..32 {
        gkeys.push((r.g.start_connect(2000), 2000));
    }
    // 32 host-initiated connections to a guest listener, all opened before any completes.
    r.g.listening.insert(6000);
    let mut streams: Vec<UnixStream> = (0..32)
        .map(|_| {
            let mut s = UnixStream::connect(&r.uds).expect("connect uds");
            s.write_all(b"CONNECT 6000\n").expect("line");
            s
        })
        .collect();
    assert!(r.g.until(T, |g| {
        g.conns
            .iter()
            .filter(|(k, c)| k.1 == 2000 && c.connected)
            .count()
            == 32
            && g.conns.keys().filter(|k| k.0 == 6000).count() == 32
    }));
    // Everything in flight at once: guest data to the host program, host data to the guest.
    let writers: Vec<_> = streams
        .iter_mut()
        .enumerate()
        .map(|(i, s)| {
            let mut s = s.try_clone().expect("clone");
            std::thread::spawn(move || {
                let mut ok = Vec::new();
                let mut b = [0u8; 1];
                while b[0] != b'\n' {
                    s.read_exact(&mut b).expect("OK");
                    ok.push(b[0]);
                }
                s.write_all(&pattern(5000 + i as u64, n))
                    .expect("host data");
                String::from_utf8(ok).expect("utf8")
            })
        })
        .collect();
    let payloads: Vec<Vec<u8>> = (0..32).map(|i| pattern(i, n)).collect();
    let mut sent = vec![0usize; 32];
    assert!(r.g.until(T, |g| {
        for (i, k) in gkeys.iter().enumerate() {
            sent[i] += g.send_some(*k, &payloads[i][sent[i]..]);
        }
        let guest_done = gkeys.iter().all(|k| g.conns[k].data.len() == 8 + n);
        let host_done = g
            .conns
            .iter()
            .filter(|(k, _)| k.0 == 6000)
            .all(|(_, c)| c.data.len() == n);
        guest_done && host_done
    }));
    let oks: Vec<String> = writers
        .into_iter()
        .map(|w| w.join().expect("writer"))
        .collect();
    // Each host stream was answered OK with the port it asked for, and each guest
    // connection carried exactly one host stream's bytes.
    assert!(oks.iter().all(|ok| ok == "OK 6000\n"), "{oks:?}");
    let mut got: Vec<u64> =
        r.g.conns
            .iter()
            .filter(|(k, _)| k.0 == 6000)
            .map(|(_, c)| fnv(&c.data))
            .collect();
    let mut want: Vec<u64> = (0..32).map(|i| fnv(&pattern(5000 + i, n))).collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "host → guest streams");
    let sums = host.join().expect("host");
    let mut want: Vec<u64> = payloads.iter().map(|p| fnv(p)).collect();
    let mut got = sums.clone();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want);
    for k in &gkeys {
        let c = &r.g.conns[k];
        let sum = u64::from_le_bytes(c.data[..8].try_into().expect("8"));
        assert!(want.contains(&sum));
    }
    assert_eq!(r.dev.stats().connections.load(Ordering::Relaxed), 64);
    drop(streams);
    r.finish();
}

#[test]
fn credit_exhaustion_holds_host_data_until_the_guest_consumes() {
    let mut r = Rig::new("vsock-credit", GuestMode::Grant, 1);
    r.g.buf_alloc = 8192;
    r.g.auto_consume = false;
    let l = r.listen_host(3000);
    let gp = r.g.connect(3000).expect("connect");
    let key = (gp, 3000);
    let (s, _) = l.accept().expect("accept");
    let data = pattern(3, 64 * 1024);
    let w = {
        let mut s = s.try_clone().expect("clone");
        let data = data.clone();
        std::thread::spawn(move || s.write_all(&data).expect("host write"))
    };
    // Exactly the guest's buffer arrives, then nothing: the host bytes wait in the socket,
    // the guest's receive buffers stay held.
    assert!(r.g.until(T, |g| g.conns[&key].data.len() == 8192));
    r.g.poll(Duration::from_millis(300));
    assert_eq!(r.g.conns[&key].data.len(), 8192);
    assert!(
        r.dev.held_rx() > 0,
        "receive buffers held while credit is out"
    );
    // Consuming gives credit back, chunk by chunk, until everything is there.
    assert!(r.g.until(T, |g| {
        g.consume(key);
        g.conns[&key].data.len() == data.len()
    }));
    w.join().expect("writer");
    assert_eq!(r.g.conns[&key].data, data);
    // The other way: the guest sending beyond the host's credit is reset.
    let free = r.g.conns[&key].peer_free();
    assert_eq!(free, 256 * 1024);
    let chunk = vec![1u8; vsock_guest::TX_CHUNK];
    // The host program reads nothing: after its buffer and ours fill, we push on anyway.
    for _ in 0..((free as usize + 512 * 1024) / chunk.len()) {
        let h = r.g.hdr(Op::Rw, key.0, key.1, chunk.len() as u32, 0);
        r.g.send(&h, &chunk);
        r.g.poll(Duration::from_millis(1));
        if r.g.conns[&key].rst {
            break;
        }
    }
    assert!(
        r.g.until(T, |g| g.conns[&key].rst),
        "credit violation reset"
    );
    drop(s.shutdown(std::net::Shutdown::Both));
    assert_eq!(r.dev.connections(), 0);
    let (emu, _) = r.finish();
    assert_eq!(emu.expect("grant").live_mappings(), 0);
}

#[test]
fn peers_closing_mid_stream() {
    let mut r = Rig::new("vsock-close", GuestMode::Unix, 1);
    let l = r.listen_host(4000);
    // The host program writes half and closes.
    let gp = r.g.connect(4000).expect("connect");
    let key = (gp, 4000);
    let (mut s, _) = l.accept().expect("accept");
    s.write_all(&pattern(4, 10_000)).expect("write");
    drop(s);
    assert!(r
        .g
        .until(T, |g| g.conns[&key].peer_shutdown & SHUTDOWN_SEND != 0));
    assert_eq!(r.g.conns[&key].data, pattern(4, 10_000));
    // The guest still writes: the stream is gone, the guest is reset.
    let h = r.g.hdr(Op::Rw, key.0, key.1, 5, 0);
    r.g.send(&h, b"hello");
    assert!(r.g.until(T, |g| g.conns[&key].rst));
    assert_eq!(r.dev.connections(), 0);
    // The guest resets mid-stream: the host program sees EOF after what arrived.
    let gp = r.g.connect(4000).expect("connect");
    let key = (gp, 4000);
    let (mut s, _) = l.accept().expect("accept");
    let h = r.g.hdr(Op::Rw, key.0, key.1, 4, 0);
    r.g.send(&h, b"part");
    let h = r.g.hdr(Op::Rst, key.0, key.1, 0, 0);
    r.g.send(&h, &[]);
    let mut got = Vec::new();
    s.set_read_timeout(Some(T)).expect("timeout");
    s.read_to_end(&mut got).expect("EOF");
    assert_eq!(got, b"part");
    assert!(r.g.until(T, |_| true));
    assert_eq!(r.dev.connections(), 0);
    r.finish();
}

#[test]
fn held_receive_buffers_across_a_disconnect_leave_nothing_mapped() {
    let r = Rig::new("vsock-held", GuestMode::Grant, 1);
    // Every receive buffer the guest posted is held: nothing to say yet.
    let depth = r.cfg.depth;
    let mut r = r;
    assert!(r.g.until(T, |_| true));
    let deadline = std::time::Instant::now() + T;
    while r.dev.held_rx() < depth && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(r.dev.held_rx(), depth);
    // A connection with data flowing, then the frontend goes away.
    let l = r.listen_host(4100);
    let gp = r.g.connect(4100).expect("connect");
    let (mut s, _) = l.accept().expect("accept");
    s.write_all(b"abc").expect("write");
    assert!(r.g.until(T, |g| g.conns[&(gp, 4100)].data == b"abc"));
    let emu = r.emu.clone().expect("grant");
    let (_, dev) = r.finish();
    assert_eq!(emu.live_mappings(), 0);
    assert_eq!(emu.live_grant_maps(), 0);
    // The connection was dropped with the queues: the host program sees EOF.
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut b = [0u8; 4];
    assert_eq!(s.read(&mut b).expect("EOF"), 0);
    assert_eq!(dev.connections(), 0);
}

#[test]
fn transport_reset_is_announced_after_a_reconnect() {
    let mut r = Rig::new("vsock-reset", GuestMode::Unix, 2);
    // A new device: the guest hears that whatever it had is gone.
    r.g.post_events(2);
    assert_eq!(r.g.wait_events(T), vec![(0, 4)]);
    // Only once: the second buffer stays held.
    assert!(r.g.wait_events(Duration::from_millis(200)).is_empty());
    let l = r.listen_host(4200);
    let gp = r.g.connect(4200).expect("connect");
    let (mut s, _) = l.accept().expect("accept");
    // The frontend reconnects (a VMM restarting its backend connection).
    r.g.drv.disconnect();
    s.set_read_timeout(Some(T)).expect("timeout");
    let mut b = [0u8; 4];
    assert_eq!(
        s.read(&mut b).expect("EOF"),
        0,
        "host stream closed with the queues"
    );
    r.g.drv.reconnect(&r.sock).expect("reconnect");
    r.g.conns.clear();
    r.g.post_rx();
    r.g.post_events(1);
    assert_eq!(r.g.wait_events(T), vec![(0, 4)]);
    // And the device serves the new session.
    let _ = gp;
    let gp = r.g.connect(4200).expect("connect after reset");
    let (mut s, _) = l.accept().expect("accept");
    let h = r.g.hdr(Op::Rw, gp, 4200, 2, 0);
    r.g.send(&h, b"ok");
    let mut b = [0u8; 2];
    s.read_exact(&mut b).expect("read");
    assert_eq!(&b, b"ok");
    assert_eq!(r.dev.stats().transport_resets.load(Ordering::Relaxed), 2);
    r.finish();
}
