//! Soak: the demo workload (blk daemon, GRANT mode over the emulated Xen device, two queues)
//! for a bounded time with faults injected at random: grant-copy ioctls that fail, chains
//! pointing at refs the guest never granted, frontends that disconnect with a batch in flight.
//! Counts requests served and refused, samples the process's RSS and the live mappings
//! between connections, and fails unless both are flat at the end.
//!
//! ```text
//! cargo run --release -p xen-vhost-bench --bin soak -- [--secs 120] [--json]
//! ```

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::ProgressBar;
use xen_vhost_mem::daemon::VhostUserDaemon;
use xen_vhost_mem::devices::blk::{BlkConfig, BlkDevice};
use xen_vhost_mem::testing::blk_workload::pass;
use xen_vhost_mem::testing::driver::{Buf, DriverConfig, GuestMode, VirtioDriver};
use xen_vhost_mem::testing::{EmulatedXen, GuestSim};
use xen_vhost_mem::xen_page::grant_addr;
use xen_vhost_mem::XenHandle;

#[derive(Parser, Debug)]
struct Args {
    /// How long to run.
    #[arg(long, default_value_t = 120)]
    secs: u64,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// One sample, taken between connections.
#[derive(Clone, Copy, Debug)]
struct Sample {
    secs: f64,
    served: u64,
    refused: u64,
    connections: u64,
    rss_kib: u64,
    live: i64,
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A small deterministic generator (xorshift64*), so a failing run can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn main() -> Res<()> {
    let a = Args::parse();
    let dir = std::env::temp_dir().join(format!("xvm-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let r = run(&a, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn run(a: &Args, dir: &std::path::Path) -> Res<()> {
    let cfg = DriverConfig {
        mode: GuestMode::Grant,
        queues: 2,
        depth: 8,
        max_data: 16 * 1024,
        ..DriverConfig::default()
    };
    let emu = Arc::new(EmulatedXen::new(cfg.emulation_pages())?);
    let xen = XenHandle::new(emu.clone());
    let image = dir.join("disk.img");
    std::fs::File::create(&image)?.set_len(8 << 20)?;
    let sock = dir.join("blk.sock");
    let listener = UnixListener::bind(&sock)?;
    let blk = BlkDevice::open(
        &image,
        BlkConfig {
            num_queues: 2,
            ..BlkConfig::default()
        },
    )?;
    let daemon = Arc::new(VhostUserDaemon::new(Arc::new(blk)).with_xen(xen.clone()));
    let d = daemon.clone();
    std::thread::spawn(move || d.serve(&listener, None));

    let start = Instant::now();
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(a.secs)
    };
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let (mut served, mut refused) = (0u64, 0u64);
    let mut samples = Vec::new();
    let mut connections = 0u64;
    // One guest, reconnecting after each disconnect as a VM does after a daemon restart.
    let guest = GuestSim {
        emu: emu.clone(),
        dev: xen.clone(),
        domid: 1,
    };
    let mut drv = VirtioDriver::connect_granting(&sock, cfg.clone(), Box::new(guest))?;
    while start.elapsed() < Duration::from_secs(a.secs) {
        if connections > 0 {
            drv.reconnect(&sock)?;
        }
        for _ in 0..8 {
            match rng.next() % 4 {
                // Failing grant-copy ioctls: the batch's requests fail with IOERR.
                0 => {
                    emu.fail_grant_copies(1 + (rng.next() % 3) as u32);
                    let r = pass(&mut drv, 2, true, 256 << 10, 16 << 10, 5, &mut |_| {})?;
                    emu.fail_grant_copies(0);
                    served += r.requests - r.bad;
                    refused += r.bad;
                }
                // A chain whose data buffer is a ref the guest never granted.
                1 => {
                    let (slot, s) = drv.take_slot(0).ok_or("no free slot")?;
                    let mut header = [0u8; 16];
                    header[8..16].copy_from_slice(&(rng.next() % 1000).to_le_bytes());
                    drv.write(s.header, &header)?;
                    drv.write(s.status, &[0xff])?;
                    let bad = grant_addr(0x00ff_0000 + (rng.next() % 0xffff) as u32, 0);
                    drv.publish(
                        0,
                        slot,
                        &[
                            Buf {
                                gpa: s.header,
                                len: 16,
                                write: false,
                            },
                            Buf {
                                gpa: bad,
                                len: 4096,
                                write: true,
                            },
                            Buf {
                                gpa: s.status,
                                len: 1,
                                write: true,
                            },
                        ],
                    )?;
                    drv.kick(0, 1)?;
                    let done = drv.wait(0, Duration::from_secs(10))?;
                    let mut status = [0u8];
                    drv.read(s.status, &mut status)?;
                    if done.len() != 1 || status[0] != 1 {
                        return Err(format!("bad ref: {done:?} status {}", status[0]).into());
                    }
                    refused += 1;
                }
                // Plain checked I/O.
                _ => {
                    let seed = rng.next();
                    let w = pass(&mut drv, 2, true, 512 << 10, 16 << 10, seed, &mut |_| {})?;
                    let r = pass(&mut drv, 2, false, 512 << 10, 16 << 10, seed, &mut |_| {})?;
                    if w.bad + r.bad != 0 {
                        return Err(
                            format!("{} requests failed without a fault", w.bad + r.bad).into()
                        );
                    }
                    served += w.requests + r.requests;
                }
            }
        }
        // One connection in four ends with a batch in flight.
        if rng.next().is_multiple_of(4) {
            for q in 0..2 {
                let mut n = 0;
                while let Some((slot, s)) = drv.take_slot(q) {
                    drv.write(s.header, &[0u8; 16])?;
                    drv.publish(
                        q,
                        slot,
                        &[
                            Buf {
                                gpa: s.header,
                                len: 16,
                                write: false,
                            },
                            Buf {
                                gpa: s.data_in,
                                len: 4096,
                                write: true,
                            },
                            Buf {
                                gpa: s.status,
                                len: 1,
                                write: true,
                            },
                        ],
                    )?;
                    n += 1;
                }
                drv.kick(q, n)?;
            }
        }
        drv.disconnect();
        connections += 1;
        let deadline = Instant::now() + Duration::from_secs(10);
        while daemon.stats().snapshot().connections < connections {
            if Instant::now() > deadline {
                return Err("the daemon did not end the connection".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = start.elapsed().as_secs_f64();
        if samples
            .last()
            .is_none_or(|s: &Sample| t - s.secs >= a.secs as f64 / 12.0)
        {
            samples.push(Sample {
                secs: t,
                served,
                refused,
                connections,
                rss_kib: rss_kib(),
                live: xen.counters().live_mappings(),
            });
        }
        bar.set_position(start.elapsed().as_secs());
    }
    bar.finish_and_clear();
    samples.push(Sample {
        secs: start.elapsed().as_secs_f64(),
        served,
        refused,
        connections,
        rss_kib: rss_kib(),
        live: xen.counters().live_mappings(),
    });
    // Flat: nothing mapped between connections, and RSS after warm-up (the second sample)
    // grows by less than 8 MiB.
    let warm = samples.get(1).map_or(0, |s| s.rss_kib);
    let last = samples.last().map_or(0, |s| s.rss_kib);
    let live_ok = samples.iter().all(|s| s.live == 0);
    let rss_ok = last <= warm + 8 * 1024;
    if a.json {
        let rows: Vec<String> = samples
            .iter()
            .map(|s| {
                format!(
                    "{{\"secs\":{:.1},\"served\":{},\"refused\":{},\"connections\":{},\"rss_kib\":{},\"live_mappings\":{}}}",
                    s.secs, s.served, s.refused, s.connections, s.rss_kib, s.live
                )
            })
            .collect();
        println!(
            "{{\"samples\":[{}],\"live_flat\":{live_ok},\"rss_flat\":{rss_ok}}}",
            rows.join(",")
        );
    } else {
        println!("| s | served | refused | connections | RSS KiB | live mappings |");
        println!("|---|---|---|---|---|---|");
        for s in &samples {
            println!(
                "| {:.0} | {} | {} | {} | {} | {} |",
                s.secs, s.served, s.refused, s.connections, s.rss_kib, s.live
            );
        }
        println!("\nlive mappings 0 between connections: {live_ok}; RSS flat after warm-up (+{} KiB): {rss_ok}", last.saturating_sub(warm));
    }
    if live_ok && rss_ok {
        Ok(())
    } else {
        Err("soak: not flat".into())
    }
}
