//! Bounded resources per frontend (issue 11, item 5): the limits of the README's "Limits"
//! section, each reached and answered with its error.

use std::sync::Arc;

use xen_vhost_mem::descriptor::{MAX_IN_ADVANCE_GRANT_PAGES, MAX_IN_ADVANCE_GRANT_PAGES_TOTAL};
use xen_vhost_mem::table::TableError;
use xen_vhost_mem::testing::{Guest as _, GuestSim};
use xen_vhost_mem::{RegionTable, XenRegion};

/// In-advance grant pages per table: regions of the largest size are mapped until the sum
/// reaches the limit; the next one is refused, naming its pages, the sum and the limit,
/// before it is mapped (`check_in_advance_room`, which the daemon asks first) and by
/// `insert`. Live mappings stay those of the regions accepted.
#[test]
fn in_advance_grant_pages_per_table_are_bounded() {
    let per = MAX_IN_ADVANCE_GRANT_PAGES as usize;
    let fit = (MAX_IN_ADVANCE_GRANT_PAGES_TOTAL / MAX_IN_ADVANCE_GRANT_PAGES) as usize;
    let sim = GuestSim::new(1, per * (fit + 1)).unwrap();
    let mut table = RegionTable::new();
    for i in 0..fit {
        let buf = sim.grant(per, false).unwrap();
        let d = sim.in_advance_region(
            buf.gpa(0),
            per as u64 * 4096,
            0x7000_0000 + ((i as u64) << 32),
        );
        table.check_in_advance_room(&d).unwrap();
        table = table
            .insert(Arc::new(XenRegion::new(d, None, Some(&sim.dev)).unwrap()))
            .unwrap();
    }
    assert_eq!(
        table.in_advance_grant_pages(),
        MAX_IN_ADVANCE_GRANT_PAGES_TOTAL
    );
    let live = sim.emu.live_mappings();
    // One more page, in a region of its own.
    let one = sim.grant(1, false).unwrap();
    let d = sim.in_advance_region(one.gpa(0), 4096, 0x6000_0000);
    let want = format!(
        "in-advance grant region at gpa {:#x} (1 pages) would bring the table's in-advance \
         grant pages to {}, limit {}",
        one.gpa(0),
        MAX_IN_ADVANCE_GRANT_PAGES_TOTAL + 1,
        MAX_IN_ADVANCE_GRANT_PAGES_TOTAL
    );
    let e = table.check_in_advance_room(&d).unwrap_err();
    assert!(matches!(
        e,
        TableError::InAdvanceGrantPages { pages: 1, .. }
    ));
    assert_eq!(e.to_string(), want);
    assert_eq!(
        sim.emu.live_mappings(),
        live,
        "nothing mapped for the refused region"
    );
    // `insert` refuses it too (a table built some other way).
    let region = Arc::new(XenRegion::new(d, None, Some(&sim.dev)).unwrap());
    assert_eq!(table.insert(region).unwrap_err().to_string(), want);
    // On-demand regions map nothing up front and do not count.
    let od = sim.on_demand_region(one.first_ref + 1, 1 << 20);
    table.check_in_advance_room(&od).unwrap();
    drop(table);
    assert_eq!(sim.emu.live_mappings(), 0);
}
