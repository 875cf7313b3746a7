//! Test kit (feature `test-utils`): what a daemon's own test suite needs to exercise its Xen
//! paths on a machine without Xen.

pub mod blk_workload;
pub mod driver;
pub mod emulated {
    //! The emulated Xen device (moving here from `device::emulated`).
    pub use crate::device::emulated::*;
}
