//! End to end: a guest posts a block request on a virtqueue, the device serves it through the
//! region table and request-scoped memory, and the guest checks the bytes.
//!
//! `cargo run --example demo --features test-utils -- [--mode grant|foreign|unix]` plays the guest on the emulated
//! device. With `--xen` (in dom0, as root) it runs on the real drivers: dom0 grants its own
//! pages to itself through gntalloc and the request goes through gntdev (`--mode grant`).

use std::error::Error;
use std::io::Write;
use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vm_memory::{Address, Bytes, GuestAddress};
use xen_vhost_mem::descriptor::{RegionDescriptor, RegionKind};
use xen_vhost_mem::testing::GntallocGuest;
use xen_vhost_mem::testing::{Guest, GuestBuffer, GuestSim};
use xen_vhost_mem::{RealXen, RegionTable, RequestMemory, XenHandle, XenRegion};

const QSIZE: u16 = 16;
const DOMID: u16 = 1;
/// Guest RAM for the foreign and unix modes.
const RAM: u64 = 0x10_0000;

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args
        .iter()
        .position(|a| a == "--mode")
        .and_then(|i| args.get(i + 1))
        .map_or("grant", String::as_str);
    if args.iter().any(|a| a == "--xen") {
        if mode != "grant" {
            // FOREIGN needs a guest domain's frames; ci/xen's dom0 tests map dom0's own.
            return Err(format!("--xen runs --mode grant, not {mode}").into());
        }
        let dev = XenHandle::new(Arc::new(RealXen::open()?));
        println!("real Xen: dom0 grants its own pages to itself (domid 0)");
        return run(&GntallocGuest::new()?, &dev, mode, None);
    }
    let sim = GuestSim::new(DOMID, 1024)?;
    run(&sim, &sim.dev, mode, Some(&sim))
}

/// One block request in `mode` from `guest`, served through `dev`; `sim` is the emulated guest
/// (for its frames and UNIX memory).
fn run<G: Guest>(
    guest: &G,
    dev: &XenHandle,
    mode: &str,
    sim: Option<&GuestSim>,
) -> Result<(), Box<dyn Error>> {
    // The ring lives in a region mapped in advance; buffers per mode.
    let ring = guest.grant(2, false)?;
    let ring_gpa = ring.gpa(0);
    let mut regions = vec![XenRegion::new(
        guest.in_advance_region(ring_gpa, 8192, 0x7000_0000),
        None,
        Some(dev),
    )?];
    // Guest buffers (header, data, status): grants in an on-demand region, or guest RAM at
    // 1 MiB as foreign frames of the domain or as a plain UNIX region.
    let grants: Option<[GuestBuffer; 3]> = match (mode, sim) {
        ("grant", _) => {
            let bufs = [
                guest.grant(1, true)?,
                guest.grant(1, false)?,
                guest.grant(1, false)?,
            ];
            // Everything but the ring is on demand, below and above it (refs need not come
            // in order), as xen-vhost-frontend sends it.
            if ring.first_ref > 0 {
                let below = guest.on_demand_region(0, u64::from(ring.first_ref));
                regions.push(XenRegion::new(below, None, Some(dev))?);
            }
            let above = guest.on_demand_region(ring.first_ref + ring.pages as u32, 1 << 16);
            regions.push(XenRegion::new(above, None, Some(dev))?);
            Some(bufs)
        }
        ("foreign" | "unix", Some(sim)) => {
            let kind = if mode == "foreign" {
                let page = sim.emu.alloc_pages(16)?;
                sim.emu.add_frames(DOMID, RAM >> 12, page, 16)?;
                RegionKind::Foreign { domid: DOMID }
            } else {
                RegionKind::Unix
            };
            let desc = RegionDescriptor {
                guest_phys_addr: RAM,
                size: 16 * 4096,
                userspace_addr: 0x6000_0000,
                mmap_offset: 0,
                kind,
            };
            regions.push(XenRegion::new(desc, None, Some(dev))?);
            None
        }
        (other, _) => {
            return Err(format!("unknown mode {other}; use grant, foreign or unix").into())
        }
    };
    let [hdr, data, status] = match &grants {
        Some(b) => [b[0].gpa(0), b[1].gpa(0), b[2].gpa(0)],
        None => [RAM, RAM + 0x1000, RAM + 0x2000],
    };
    let table = RegionTable::from_regions(regions)?;
    println!("mode {mode}: {} regions", table.regions().len());
    for r in table.regions() {
        let d = r.descriptor();
        println!(
            "  gpa {:#018x} size {:#8x} {:?}",
            d.guest_phys_addr, d.size, d.kind
        );
    }

    // Driver side: write the header, a 3-descriptor chain, publish it.
    let header = *b"demo request 001";
    match &grants {
        Some(b) => guest.write(&b[0], 0, &header)?,
        None => table.write_slice(&header, GuestAddress(hdr))?,
    }
    let desc_table = GuestAddress(ring_gpa);
    let avail = desc_table.unchecked_add(16 * u64::from(QSIZE));
    let used = GuestAddress((avail.0 + 6 + 2 * u64::from(QSIZE)).next_multiple_of(4));
    for (i, (addr, len, flags)) in [(hdr, 16u32, 1u16), (data, 4096, 3), (status, 1, 2)]
        .into_iter()
        .enumerate()
    {
        let next = if flags & 1 != 0 { i as u16 + 1 } else { 0 };
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        table.write_obj(d, desc_table.unchecked_add(16 * i as u64))?;
    }
    table.write_obj(0u16, avail.unchecked_add(4))?;
    table.write_obj(1u16, avail.unchecked_add(2))?;

    // Device side.
    let mut q = Queue::new(QSIZE)?;
    q.try_set_desc_table_address(desc_table)?;
    q.try_set_avail_ring_address(avail)?;
    q.try_set_used_ring_address(used)?;
    q.set_ready(true);
    let before = dev.counters().snapshot();
    let chain = q.pop_descriptor_chain(&table).ok_or("no chain")?;
    let head = chain.head_index();
    let mem = RequestMemory::new(&table);
    mem.prefetch_chains(std::slice::from_ref(&chain))?;
    let got: [u8; 16] = Reader::new(&mem, chain.clone())?.read_obj()?;
    let mut w = Writer::new(&mem, chain)?;
    w.write_all(&[0x42; 4096])?;
    w.write_obj(0u8)?;
    drop(w);
    mem.finish()?; // copies back and unmaps before the used entry is written
    q.add_used(&table, head, 4097)?;
    let d = dev.counters().snapshot().since(&before);
    println!("device read header {:?}", String::from_utf8_lossy(&got));
    println!(
        "device calls for the request: {} ioctls ({} grant copies), {} mmaps, {} munmaps",
        d.ioctls, d.grant_copies, d.mmaps, d.munmaps
    );

    // Guest side: check the data, and that nothing but the table's own mappings lives.
    let data_back = match &grants {
        Some(b) => guest.read(&b[1], 0, 4096)?,
        None => {
            let mut v = vec![0; 4096];
            table.read_slice(&mut v, GuestAddress(data))?;
            v
        }
    };
    if let (Some(sim), Some(b)) = (sim, &grants) {
        // The emulation refuses to end foreign access to a page that is still mapped.
        b.iter().try_for_each(|b| sim.end_access(b))?;
    }
    let ok = got == header && data_back == vec![0x42; 4096];
    let own = table
        .regions()
        .iter()
        .filter(|r| r.host_address().is_some() && !matches!(r.descriptor().kind, RegionKind::Unix))
        .count() as i64;
    let extra = dev.counters().live_mappings() - own;
    println!(
        "guest sees data {}, used idx {}, live mappings besides the table's own: {extra}",
        if ok { "intact" } else { "WRONG" },
        table.read_obj::<u16>(used.unchecked_add(2))?
    );
    if !ok || extra != 0 {
        return Err("the request did not complete cleanly".into());
    }
    println!("demo {mode}: OK");
    Ok(())
}
