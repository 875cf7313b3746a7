//! A virtio-blk workload on [`VirtioDriver`]: write a deterministic pattern, read it back,
//! check every byte and every status, at a chosen queue depth over all queues.

use std::time::{Duration, Instant};

use super::driver::{Buf, DriverError, VirtioDriver};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const SECTOR: u64 = 512;
/// How long one completion may take before the run fails.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The byte at `offset` of the pattern the workload writes (`seed` tells runs apart).
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    let x = (offset / 8)
        .wrapping_add(seed)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> (8 * (offset % 8)) ^ (x >> 57)) as u8
}

/// What a pass did.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassReport {
    /// Requests completed.
    pub requests: u64,
    /// Data bytes moved.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Kicks the driver sent (the device may suppress them).
    pub kicks: u64,
    /// Requests whose status, used length or data was wrong.
    pub bad: u64,
}

/// One request in flight.
#[derive(Clone, Copy, Debug)]
struct Inflight {
    offset: u64,
    len: u32,
}

/// Writes (`write`) or reads and checks `total` bytes from byte 0 in `req` byte requests,
/// `depth` per queue over all queues. `progress` gets the bytes done so far.
pub fn pass(
    driver: &mut VirtioDriver,
    queues: usize,
    write: bool,
    total: u64,
    req: u32,
    seed: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<PassReport, DriverError> {
    let start = Instant::now();
    let mut rep = PassReport::default();
    let mut next = 0u64;
    let mut inflight: Vec<Vec<Option<Inflight>>> = (0..queues).map(|_| Vec::new()).collect();
    let mut outstanding = 0usize;
    let mut data = vec![0u8; req as usize];
    loop {
        // Fill every queue.
        for (q, slots) in inflight.iter_mut().enumerate() {
            let mut published = 0u16;
            while next < total {
                let Some((slot, s)) = driver.take_slot(q) else {
                    break;
                };
                let len = (total - next).min(u64::from(req)) as u32;
                let mut header = [0u8; 16];
                header[0..4].copy_from_slice(&(if write { T_OUT } else { T_IN }).to_le_bytes());
                header[8..16].copy_from_slice(&(next / SECTOR).to_le_bytes());
                driver.write(s.header, &header)?;
                driver.write(s.status, &[0xff])?;
                let data_buf = if write {
                    for (i, b) in data[..len as usize].iter_mut().enumerate() {
                        *b = pattern_byte(seed, next + i as u64);
                    }
                    driver.write(s.data_out, &data[..len as usize])?;
                    Buf {
                        gpa: s.data_out,
                        len,
                        write: false,
                    }
                } else {
                    Buf {
                        gpa: s.data_in,
                        len,
                        write: true,
                    }
                };
                let bufs = [
                    Buf {
                        gpa: s.header,
                        len: 16,
                        write: false,
                    },
                    data_buf,
                    Buf {
                        gpa: s.status,
                        len: 1,
                        write: true,
                    },
                ];
                driver.publish(q, slot, &bufs)?;
                if slots.len() <= slot {
                    slots.resize(slot + 1, None);
                }
                slots[slot] = Some(Inflight { offset: next, len });
                next += u64::from(len);
                published += 1;
                outstanding += 1;
            }
            if published > 0 && driver.kick(q, published)? {
                rep.kicks += 1;
            }
        }
        if outstanding == 0 {
            break;
        }
        // Reap from every queue that has work.
        for (q, slots) in inflight.iter_mut().enumerate() {
            if slots.iter().all(Option::is_none) {
                continue;
            }
            for c in driver.wait(q, TIMEOUT)? {
                let Some(f) = slots.get_mut(c.slot).and_then(Option::take) else {
                    rep.bad += 1;
                    continue;
                };
                outstanding -= 1;
                let s = slot_of(driver, q, c.slot);
                let mut status = [0u8; 1];
                driver.read(s.status, &mut status)?;
                let want_len = if write { 1 } else { f.len + 1 };
                let mut ok = status[0] == 0 && c.len == want_len;
                if ok && !write {
                    driver.read(s.data_in, &mut data[..f.len as usize])?;
                    ok = data[..f.len as usize]
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == pattern_byte(seed, f.offset + i as u64));
                }
                if !ok {
                    rep.bad += 1;
                }
                rep.requests += 1;
                rep.bytes += u64::from(f.len);
            }
        }
        progress(rep.bytes);
    }
    rep.elapsed = start.elapsed();
    Ok(rep)
}

fn slot_of(driver: &mut VirtioDriver, q: usize, slot: usize) -> super::driver::Slot {
    driver.slot(q, slot)
}
