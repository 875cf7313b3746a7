//! Guest memory for vhost-user device backends in Xen dom0.
//!
//! Layers, bottom up: [`xen_sys`] (kernel ABI) → [`device`] (the device boundary, real or
//! emulated) → [`backend`] (mapping per region kind) → [`region`] / [`table`] (the guest memory
//! map, a vm-memory `GuestMemoryBackend`) → [`request`] (request-scoped memory for on-demand
//! grants, a vm-memory `GuestMemory`).

pub mod backend;
pub mod block_workload;
pub mod descriptor;
pub mod device;
pub mod guest_sim;
pub mod region;
pub mod request;
pub mod table;
pub mod xen_flags;
pub mod xen_page;

pub use descriptor::{DescriptorError, GrantMapping, RegionDescriptor, RegionKind, WireRegion};
pub use device::{emulated::EmulatedXen, XenDev, XenDevice};
pub use region::XenRegion;
pub use request::{RequestError, RequestMemory, Strategy, WritableBuffers};
pub use table::RegionTable;
pub use xen_flags::XenMmapFlags;
