//! The test kit (cargo feature `test-utils`): what a vhost-user daemon needs to test its Xen
//! paths on a machine without Xen, and to play a guest on one with Xen.
//!
//! - [`EmulatedXen`]: a [`XenDriver`](crate::device::XenDriver) over a memfd-backed grant
//!   table and frame table that enforces what Xen enforces (unknown refs fail, read-only
//!   grants refuse writable mappings and grant-copy writes, an mmap covers one whole grant
//!   map) and counts live mappings, so a test can prove that nothing leaks.
//! - [`Guest`]: a guest as a test plays it: it grants buffers on consecutive refs (as Linux's
//!   grant DMA ops do), reads and writes its own view of them and describes the regions a
//!   frontend would send for them. [`GuestSim`] plays it on the emulation;
//!   [`GntallocGuest`] has dom0 grant its own pages to itself through `/dev/xen/gntalloc` on
//!   real Xen.
//!
//! Grant two pages read-only, build an on-demand region, serve a request, check that nothing
//! is mapped:
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress};
//! use xen_vhost_mem::testing::{Guest as _, GuestSim};
//! use xen_vhost_mem::{RegionTable, RequestMemory, XenRegion};
//!
//! let guest = GuestSim::new(1, 16)?; // domain 1, room for 16 pages
//! let buf = guest.grant(2, true)?; // two pages on consecutive refs, read-only
//! guest.write(&buf, 0, b"request header")?;
//! // The region a frontend sends for them: GRANT, not mapped in advance.
//! let region = guest.on_demand_region(buf.first_ref, 2);
//! let table = RegionTable::from_regions(vec![XenRegion::new(region, None, Some(&guest.dev))?])?;
//!
//! let mem = RequestMemory::new(&table); // one request
//! let mut header = [0u8; 14];
//! mem.read_slice(&mut header, GuestAddress(buf.gpa(0)))?;
//! assert_eq!(&header, b"request header");
//! assert!(mem.write_slice(b"!", GuestAddress(buf.gpa(0))).is_err()); // read-only grant
//! mem.finish()?;
//!
//! guest.assert_nothing_mapped(); // in the emulation and in the handle's counters
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod blk_workload;
pub mod driver;
mod emulated;
mod gntalloc;
mod guest_sim;

pub use emulated::{EmulatedXen, EmulationError, GuestWrite};
pub use gntalloc::{GntallocGuest, GntallocGuestError};
pub use guest_sim::{Guest, GuestBuffer, GuestSim};
