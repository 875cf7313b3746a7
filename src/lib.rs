//! Guest memory for vhost-user device backends in Xen dom0.
//!
//! Layers, bottom up:
//!
//! - [`xen_sys`] (its own crate): the kernel ABI, and the one [`xen_page::XEN_PAGE_SIZE`].
//! - [`device`]: the device boundary. [`XenDriver`] is the trait of system calls, one method
//!   each, with [`RealXen`] on xen-sys; [`XenHandle`] is the counting handle every region and
//!   request scope holds.
//! - [`backend`]: how each region kind (UNIX, FOREIGN, GRANT in advance) is mapped; the
//!   mappings themselves are crate-private, their errors public.
//! - [`descriptor`], [`xen_flags`], [`xen_page`]: wire regions validated into descriptors.
//! - [`region`] / [`table`]: the guest memory map, a vm-memory `GuestMemoryBackend`; the
//!   table's Xen regions share one [`XenHandle`].
//! - [`request`]: request-scoped memory for on-demand grants, a vm-memory `GuestMemory`. Pop
//!   chains through it: indirect descriptor tables may live in on-demand grant memory too.
//!
//! Beside them, `testing` (feature `test-utils`) is the test kit: an emulated Xen and guests
//! to play on it (or, in dom0, on real Xen). The benchmarks live in the workspace's `bench/`
//! crate, not here.
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress};
//! # #[cfg(feature = "test-utils")] {
//! use xen_vhost_mem::testing::{Guest as _, GuestSim};
//! use xen_vhost_mem::{RegionTable, RequestMemory, XenRegion};
//!
//! // A guest on the emulated device grants a page and fills it.
//! let guest = GuestSim::new(1, 64)?;
//! let buf = guest.grant(1, false)?;
//! guest.write(&buf, 0, b"hello")?;
//! // The frontend sent an on-demand grant region covering it.
//! let region = guest.on_demand_region(buf.first_ref, 16);
//! let table = RegionTable::from_regions(vec![XenRegion::new(region, None, Some(&guest.dev))?])?;
//! // One request: read, write, finish (copied back, nothing mapped), then add_used.
//! let mem = RequestMemory::new(&table);
//! let mut got = [0u8; 5];
//! mem.read_slice(&mut got, GuestAddress(buf.gpa(0)))?;
//! assert_eq!(&got, b"hello");
//! mem.write_slice(b"world", GuestAddress(buf.gpa(0)))?;
//! mem.finish()?;
//! assert_eq!(guest.read(&buf, 0, 5)?, b"world");
//! assert_eq!(guest.dev.counters().live_mappings(), 0);
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
// docs.rs (nightly, `--cfg docsrs`): label what needs a feature (`testing`: test-utils).
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
pub mod daemon;
pub mod descriptor;
pub mod device;
pub mod devices;
pub mod region;
pub mod request;
pub(crate) mod ring_layout;
pub mod table;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod xen_flags;
pub mod xen_page;

pub use backend::foreign::ForeignMapping;
pub use descriptor::{DescriptorError, GrantMapping, RegionDescriptor, RegionKind, WireRegion};
pub use device::{real::RealXen, XenDriver, XenHandle};
pub use region::{FileLengths, XenRegion};
pub use request::{OwnedRequestMemory, RequestError, RequestMemory, Strategy, WritableBuffers};
pub use table::RegionTable;
pub use xen_flags::XenMmapFlags;
