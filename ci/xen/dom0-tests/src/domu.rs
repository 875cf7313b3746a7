//! The library against ANOTHER domain's memory: a real domU that `ci/xen/init` creates with
//! `xl` (PVH by default, `XEN_DOMU`), running `ci/xen/domu/domu-grant.c`.
//!
//! The domU fills 4 pages with a pattern ([`pat`]), grants pages 0-1 read-only and 2-3
//! writable to dom0, and prints their refs and gfns on its console; init copies that line to
//! [`INFO`] (or why it failed to [`FAILED`]). Every region here comes from the wire
//! (`RegionDescriptor::from_wire`) with the domU's real domid. dom0 writes 16 bytes at each
//! place of [`WRITES`], then the done marker; the domU checks that exactly those bytes changed
//! and prints its verdict, which the last case reads from the domU's console log.
//!
//! The cases run only when the initramfs has a domU (`/domu`) or init left a result file.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use xen_vhost_mem::xen_page::grant_addr;
use xen_vhost_mem::{
    RegionDescriptor, RegionTable, RequestError, RequestMemory, Strategy, WireRegion, XenHandle,
    XenMmapFlags,
};

use crate::cases::{build_table, open_dev, own_mappings, request_error};
use crate::{CaseResult, Report};

const PAGE: usize = 4096;
const NPAGES: usize = 4;
/// Written by `ci/xen/init` once the domU printed its refs and gfns.
pub const INFO: &str = "/tmp/domu.info";
/// Written by `ci/xen/init` when the domU could not be created or never reported.
pub const FAILED: &str = "/tmp/domu.failed";
/// How long to wait for the domU to boot and report.
const BOOT_WAIT: Duration = Duration::from_secs(180);
/// The done marker (page 3, offset 4000), as in domu-grant.c.
const DONE_OFF: usize = 3 * PAGE + 4000;
const DONE: &[u8; 8] = b"XVMDONE!";
/// dom0's writes into the writable pages: (page, offset, value of 16 bytes), as in domu-grant.c.
const WRITES: [(usize, usize, u8); 4] = [
    (2, 0x100, 0xc1), // on demand, grant copy
    (2, 0x200, 0xc2), // on demand, map
    (3, 0x300, 0xc3), // in advance
    (3, 0x400, 0xc4), // FOREIGN
];
const GRANT: u32 = XenMmapFlags::GRANT.bits();
const NO_ADVANCE_MAP: u32 = XenMmapFlags::NO_ADVANCE_MAP.bits();
const FOREIGN: u32 = XenMmapFlags::FOREIGN.bits();

/// The pattern of byte `j` of page `pg`, as in domu-grant.c.
fn pat(pg: usize, j: usize) -> u8 {
    (j * 7 + 13 + pg * 31) as u8
}

/// What the domU reported.
struct Domu {
    /// `xen_mmap_data` as a frontend sends it.
    domid: u32,
    log: String,
    kind: String,
    /// Page `i` is granted with ref `refs[i]` (0-1 read-only, 2-3 writable).
    refs: [u32; NPAGES],
    /// Page `i` is guest frame `gfns[i]`.
    gfns: [u64; NPAGES],
}

impl Domu {
    fn parse(text: &str) -> Result<Self, String> {
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|t| t.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                .ok_or_else(|| format!("no {k}= in {text:?}"))
        };
        let num = |s: &str| -> Result<u64, String> {
            let r = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            r.map_err(|e| format!("{s:?}: {e}"))
        };
        let list =
            |k: &str| -> Result<Vec<u64>, String> { field(k)?.split(',').map(num).collect() };
        let mut refs = list("ro")?;
        refs.extend(list("rw")?);
        let gfns = list("gfns")?;
        let refs: Vec<u32> = refs
            .into_iter()
            .map(|r| u32::try_from(r).map_err(|_| format!("ref {r}")))
            .collect::<Result<_, _>>()?;
        Ok(Domu {
            domid: u32::try_from(num(field("domid")?)?).map_err(|_| "domid".to_string())?,
            log: field("log")?.to_string(),
            kind: field("type")?.to_string(),
            refs: refs
                .try_into()
                .map_err(|r| format!("want 4 refs, got {r:?}"))?,
            gfns: gfns
                .try_into()
                .map_err(|g| format!("want 4 gfns, got {g:?}"))?,
        })
    }

    /// "0x5a33,0x5a51,...": one line, unlike `{:#x?}`.
    fn gfn_list(&self) -> String {
        self.gfns
            .iter()
            .map(|g| format!("{g:#x}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn gaddr(&self, pg: usize, off: usize) -> GuestAddress {
        GuestAddress(grant_addr(self.refs[pg], off as u64))
    }

    /// The domU's console log, without carriage returns.
    fn console(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }
}

/// What the 4 pages hold: the pattern plus dom0's writes so far.
struct Model(Vec<u8>);

impl Model {
    fn new() -> Self {
        Model(
            (0..NPAGES * PAGE)
                .map(|i| pat(i / PAGE, i % PAGE))
                .collect(),
        )
    }
    fn page(&self, pg: usize) -> &[u8] {
        &self.0[pg * PAGE..(pg + 1) * PAGE]
    }
    fn write(&mut self, pg: usize, off: usize, data: &[u8]) {
        let at = pg * PAGE + off;
        self.0[at..at + data.len()].copy_from_slice(data);
    }
    fn check(&self, pg: usize, got: &[u8], how: &str) -> Result<(), String> {
        match got.iter().zip(self.page(pg)).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(j) => Err(format!(
                "{how}: page {pg} byte {j:#x} is {:#x}, want {:#x}",
                got[j],
                self.page(pg)[j]
            )),
        }
    }
}

fn wire(gpa: u64, size: u64, uaddr: u64, flags: u32, domid: u32) -> WireRegion {
    WireRegion {
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: uaddr,
        mmap_offset: 0,
        xen_mmap_flags: flags,
        xen_mmap_data: domid,
    }
}

/// A table built from wire regions, through `from_wire` and `XenRegion::new`.
fn wire_table(dev: &XenHandle, regions: &[WireRegion]) -> Result<RegionTable, String> {
    let descs = regions
        .iter()
        .map(|w| RegionDescriptor::from_wire(w).map_err(|e| format!("from_wire({w:?}): {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    build_table(dev, descs)
}

/// One GRANT|NO_ADVANCE_MAP region over every grant address of the domU.
fn on_demand(dev: &XenHandle, d: &Domu) -> Result<RegionTable, String> {
    wire_table(
        dev,
        &[wire(
            grant_addr(0, 0),
            (1 << 20) * PAGE as u64,
            0,
            GRANT | NO_ADVANCE_MAP,
            d.domid,
        )],
    )
}

fn check_live(dev: &XenHandle, t: &RegionTable, when: &str) -> Result<(), String> {
    let (live, own) = (dev.counters().live_mappings(), own_mappings(t));
    if live == own {
        Ok(())
    } else {
        Err(format!(
            "{when}: {live} live mappings, the table's own are {own}"
        ))
    }
}

/// Waits for init's result file and parses it.
fn setup() -> Result<(Domu, String), String> {
    let t = Instant::now();
    loop {
        if let Ok(f) = std::fs::read_to_string(FAILED) {
            return Err(format!("no domU: {}", f.trim()));
        }
        if let Ok(text) = std::fs::read_to_string(INFO) {
            let d = Domu::parse(text.trim())?;
            if d.domid == 0 || d.domid >= 0x7ff0 {
                return Err(format!("domid {} is not a domU's", d.domid));
            }
            if d.gfns.contains(&0) {
                return Err(format!("the domU found no gfn for a page: {text}"));
            }
            let msg = format!(
                "{} domU {}: ro refs {:?}, rw refs {:?}, gfns {} (waited {:.1} s for it)",
                d.kind,
                d.domid,
                &d.refs[..2],
                &d.refs[2..],
                d.gfn_list(),
                t.elapsed().as_secs_f64()
            );
            return Ok((d, msg));
        }
        if t.elapsed() > BOOT_WAIT {
            return Err(format!(
                "neither {INFO} nor {FAILED} after {} s",
                BOOT_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// GRANT on demand with `strategy`: the pattern of all 4 pages, a write into a writable grant
/// (read back in a new request), a write into a read-only grant refused with `ReadOnlyGrant`;
/// after each request only the table's own mappings (none) live.
fn grant_on_demand(d: &Domu, m: &mut Model, strategy: Strategy, w: usize) -> CaseResult {
    let dev = open_dev()?;
    let t = on_demand(&dev, d)?;
    let mem = RequestMemory::with_strategy(&t, strategy);
    for pg in 0..NPAGES {
        let mut got = vec![0u8; PAGE];
        mem.read_slice(&mut got, d.gaddr(pg, 0))
            .map_err(|e| format!("read page {pg} (ref {}): {e}", d.refs[pg]))?;
        m.check(pg, &got, "read")?;
    }
    let (pg, off, val) = WRITES[w];
    mem.write_slice(&[val; 16], d.gaddr(pg, off))
        .map_err(|e| format!("write page {pg} offset {off:#x}: {e}"))?;
    m.write(pg, off, &[val; 16]);
    let ro_gpa = d.gaddr(0, 0x10);
    let refused = match mem.write_slice(&[0xee; 8], ro_gpa) {
        Ok(()) => return Err("write to a read-only grant succeeded".into()),
        Err(e) => e,
    };
    let re = request_error(&refused)?;
    let ok = matches!(re, RequestError::ReadOnlyGrant { gpa, domid, gref }
        if (*gpa, u32::from(*domid), *gref) == (ro_gpa.0, d.domid, d.refs[0]));
    if !ok {
        return Err(format!(
            "write to read-only ref {}: expected ReadOnlyGrant naming gpa {:#x} domid {}, got {re:?}",
            d.refs[0], ro_gpa.0, d.domid
        ));
    }
    mem.finish().map_err(|e| format!("finish: {e}"))?;
    check_live(&dev, &t, "after the request")?;
    // Read back in a new request: the write landed, the read-only page did not change.
    let mem = RequestMemory::with_strategy(&t, strategy);
    for p in [0, pg] {
        let mut got = vec![0u8; PAGE];
        mem.read_slice(&mut got, d.gaddr(p, 0))
            .map_err(|e| format!("read back page {p}: {e}"))?;
        m.check(p, &got, "read back")?;
    }
    mem.finish().map_err(|e| format!("finish: {e}"))?;
    check_live(&dev, &t, "after the read-back request")?;
    let c = dev.counters().snapshot();
    Ok(format!(
        "domid {}: 4 pages (refs {:?}) match the pattern; 16 B {val:#x} written at page {pg} \
         offset {off:#x} and read back; write to RO ref {} refused: {re}; no mapping left \
         ({} ioctls, {} grant copies, {} mmaps in all)",
        d.domid, d.refs, d.refs[0], c.ioctls, c.grant_copies, c.mmaps
    ))
}

/// GRANT in advance over the writable pages (one region if their refs are consecutive).
fn grant_in_advance(d: &Domu, m: &mut Model) -> CaseResult {
    let dev = open_dev()?;
    let regions: Vec<WireRegion> = if d.refs[3] == d.refs[2] + 1 {
        vec![wire(
            grant_addr(d.refs[2], 0),
            2 * PAGE as u64,
            0x7000_0000,
            GRANT,
            d.domid,
        )]
    } else {
        (2..4)
            .map(|pg| {
                wire(
                    grant_addr(d.refs[pg], 0),
                    PAGE as u64,
                    0x7000_0000 + (pg * PAGE) as u64,
                    GRANT,
                    d.domid,
                )
            })
            .collect()
    };
    let t = wire_table(&dev, &regions)?;
    let live = dev.counters().live_mappings();
    for pg in 2..4 {
        let mut got = vec![0u8; PAGE];
        t.read_slice(&mut got, d.gaddr(pg, 0))
            .map_err(|e| format!("read page {pg}: {e}"))?;
        m.check(pg, &got, "read")?;
    }
    let (pg, off, val) = WRITES[2];
    t.write_slice(&[val; 16], d.gaddr(pg, off))
        .map_err(|e| format!("write: {e}"))?;
    m.write(pg, off, &[val; 16]);
    let mut got = vec![0u8; PAGE];
    t.read_slice(&mut got, d.gaddr(pg, 0))
        .map_err(|e| format!("read back: {e}"))?;
    m.check(pg, &got, "read back")?;
    let n = regions.len();
    drop(t);
    let after = dev.counters().live_mappings();
    if live != n as i64 || after != 0 {
        return Err(format!(
            "{live} live mappings with the table (want {n}), {after} after dropping it"
        ));
    }
    Ok(format!(
        "{n} region(s) over refs {:?}: 8192 B match; 16 B {val:#x} written at page {pg} offset \
         {off:#x}; {n} mapping(s) while the table lives, none after",
        &d.refs[2..]
    ))
}

/// FOREIGN over the pages' gfns: the table reads them, and a write through the mapping is
/// seen through the grant view.
fn foreign(d: &Domu, m: &mut Model) -> CaseResult {
    let dev = open_dev()?;
    let regions: Vec<WireRegion> = (0..NPAGES)
        .map(|pg| {
            wire(
                d.gfns[pg] << 12,
                PAGE as u64,
                0x6000_0000 + (pg * PAGE) as u64,
                FOREIGN,
                d.domid,
            )
        })
        .collect();
    let t = wire_table(&dev, &regions)?;
    check_live(&dev, &t, "with the table")?;
    for pg in 0..NPAGES {
        let mut got = vec![0u8; PAGE];
        t.read_slice(&mut got, GuestAddress(d.gfns[pg] << 12))
            .map_err(|e| format!("read gfn {:#x}: {e}", d.gfns[pg]))?;
        m.check(pg, &got, &format!("FOREIGN read of gfn {:#x}", d.gfns[pg]))?;
    }
    let (pg, off, val) = WRITES[3];
    t.write_slice(&[val; 16], GuestAddress((d.gfns[pg] << 12) + off as u64))
        .map_err(|e| format!("write: {e}"))?;
    m.write(pg, off, &[val; 16]);
    let own = own_mappings(&t);
    drop(t);
    let after = dev.counters().live_mappings();
    if after != 0 {
        return Err(format!("{after} live mappings after dropping the table"));
    }
    // The write, seen through the grant.
    let g = on_demand(&dev, d)?;
    let mem = RequestMemory::with_strategy(&g, Strategy::GrantCopy);
    let mut got = vec![0u8; PAGE];
    mem.read_slice(&mut got, d.gaddr(pg, 0))
        .map_err(|e| format!("grant read back: {e}"))?;
    mem.finish().map_err(|e| format!("finish: {e}"))?;
    m.check(pg, &got, "grant view after the FOREIGN write")?;
    Ok(format!(
        "{own} FOREIGN regions (domid {}) at gfns {}: 16 KiB match the pattern and dom0's \
         grant writes; 16 B {val:#x} written at gfn {:#x} offset {off:#x}, seen through ref {}",
        d.domid,
        d.gfn_list(),
        d.gfns[pg],
        d.refs[pg]
    ))
}

/// The done marker, then the domU's own verdict from its console log.
fn guest_verdict(d: &Domu, m: &mut Model) -> CaseResult {
    let dev = open_dev()?;
    let t = on_demand(&dev, d)?;
    let mem = RequestMemory::with_strategy(&t, Strategy::GrantCopy);
    let (pg, off) = (DONE_OFF / PAGE, DONE_OFF % PAGE);
    mem.write_slice(DONE, d.gaddr(pg, off))
        .map_err(|e| format!("write the done marker: {e}"))?;
    mem.finish().map_err(|e| format!("finish: {e}"))?;
    m.write(pg, off, DONE);
    let t0 = Instant::now();
    let verdict = loop {
        if let Some(l) = d.console().lines().find(|l| l.contains("XVM-DOMU-VERDICT")) {
            break l.to_string();
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "no verdict from the domU 60 s after the done marker; console tail: {:?}",
                d.console().chars().rev().take(300).collect::<String>()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Let it power off before the benchmarks run.
    while !d.console().contains("XVM-DOMU-EXIT") && t0.elapsed() < Duration::from_secs(70) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = verdict
        .split_once("XVM-DOMU-VERDICT ")
        .map_or(verdict.as_str(), |(_, v)| v);
    match v.strip_prefix("PASS ") {
        Some(rest) => Ok(format!("domU says: {rest}")),
        None => Err(format!("domU says: {v}")),
    }
}

/// Whether this boot has a domU: the initramfs holds one (`/domu`) or init left a result file.
pub fn integrated() -> bool {
    std::path::Path::new("/domu").exists()
        || std::path::Path::new(INFO).exists()
        || std::path::Path::new(FAILED).exists()
}

/// The domU's domid (as a frontend sends it) and the path of its console log, once init
/// reported them (waits as `domu/setup` does).
pub fn domid_and_console() -> Result<(u32, String), String> {
    let (d, _) = setup()?;
    Ok((d.domid, d.log))
}

pub fn run_all(r: &mut Report) {
    if !integrated() || !r.wants("domu/") {
        return;
    }
    let mut domu = None;
    r.case("domu/setup", || {
        let (d, msg) = setup()?;
        domu = Some(d);
        Ok(msg)
    });
    let Some(d) = domu else { return };
    let mut m = Model::new();
    r.case("domu/grant-on-demand/grant-copy", || {
        grant_on_demand(&d, &mut m, Strategy::GrantCopy, 0)
    });
    r.case("domu/grant-on-demand/map", || {
        grant_on_demand(&d, &mut m, Strategy::Map, 1)
    });
    r.case("domu/grant-in-advance", || grant_in_advance(&d, &mut m));
    r.case("domu/foreign", || foreign(&d, &mut m));
    r.case("domu/guest-verdict", || guest_verdict(&d, &mut m));
}
