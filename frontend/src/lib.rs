//! An x86 Xen frontend for virtio-mmio devices served by vhost-user daemons.
//!
//! Linux in an HVM domU, built with `XEN_VIRTIO_FORCE_GRANT` and
//! `VIRTIO_MMIO_CMDLINE_DEVICES`, probes `virtio_mmio.device=4K@<addr>:<irq>`
//! windows and gives every device grant DMA addresses with dom0 as backend.
//! This frontend runs in dom0, one process per domU: it claims the windows
//! with an ioreq server of its own beside the domain's QEMU ([`ioreq_server`]),
//! answers the register accesses ([`mmio`]), connects each window to a
//! vhost-user daemon with XEN_MMAP ([`backend`]), turns QueueNotify writes
//! into kicks and the daemon's calls into a level ISA interrupt ([`irq`]),
//! and reconnects when a daemon restarts ([`device`]).
//!
//! Layers: `xen-sys` (kernel ABI) → [`ioreq_server`], [`irq`], [`domain`],
//! [`ring_peek`] (Xen calls) → [`mmio`] (pure register state) and
//! [`backend`] (vhost-user) → [`device`] → [`frontend`] (the event loop).

pub mod backend;
pub mod device;
pub mod domain;
pub mod frontend;
pub mod ioreq_server;
pub mod irq;
pub mod mmio;
pub mod ring_peek;
