//! The peer: a minimal virtio-blk daemon as a user would write it today on
//! vhost-user-backend 0.24 over vm-memory's `GuestMemoryMmap` (the shape of the vhost-device
//! daemons): chains popped and served per kick, data copied through a buffer with virtio-queue's
//! `Reader`/`Writer` and `pread`/`pwrite`, one notification per batch. `ci/xen/peer-blk-xen`
//! builds this same file with vm-memory's `xen` and has it offer XEN_MMAP, as a vhost-device
//! daemon serving xen-vhost-frontend does.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;

/// Chains served (the Xen peer reports it).
pub static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// The peer device.
#[derive(Debug)]
pub struct PeerBlk {
    file: Arc<File>,
    sectors: u64,
    queues: usize,
    xen_mmap: bool,
    event_idx: bool,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
}

impl PeerBlk {
    /// A device over `file` with `queues` queues; `xen_mmap`: offer XEN_MMAP (only in a build
    /// whose vhost parses the Xen region layout).
    pub fn new(file: File, queues: usize, xen_mmap: bool) -> std::io::Result<Self> {
        let sectors = file.metadata()?.len() / 512;
        Ok(PeerBlk {
            file: Arc::new(file),
            sectors,
            queues,
            xen_mmap,
            event_idx: false,
            mem: None,
        })
    }

    fn serve_chain(
        &self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap>>,
    ) -> u32 {
        let (Ok(mut r), Ok(mut w)) = (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
        else {
            return 0;
        };
        let Ok(h) = r.read_obj::<[u8; 16]>() else {
            return 0;
        };
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let off = sector * 512;
        let status = match kind {
            T_OUT => {
                let mut data = vec![0u8; r.available_bytes()];
                match r.read_exact(&mut data) {
                    Ok(()) if off + data.len() as u64 <= self.sectors * 512 => {
                        u8::from(self.file.write_all_at(&data, off).is_err())
                    }
                    _ => 1,
                }
            }
            T_IN => {
                let len = w.available_bytes().saturating_sub(1);
                let mut data = vec![0u8; len];
                if off + len as u64 <= self.sectors * 512
                    && self.file.read_exact_at(&mut data, off).is_ok()
                {
                    u8::from(w.write_all(&data).is_err())
                } else {
                    1
                }
            }
            _ => 2,
        };
        if w.write_all(&[status]).is_err() {
            return 0;
        }
        w.bytes_written() as u32
    }

    fn process(&self, vring: &VringRwLock) -> std::io::Result<()> {
        let Some(atomic) = &self.mem else {
            return Ok(());
        };
        let mem = atomic.memory();
        let chains: Vec<_> = vring
            .get_mut()
            .get_queue_mut()
            .iter(atomic.memory())
            .map_err(std::io::Error::other)?
            .collect();
        for chain in chains {
            let head = chain.head_index();
            let len = self.serve_chain(&mem, chain);
            REQUESTS.fetch_add(1, Ordering::Relaxed);
            vring.add_used(head, len).map_err(std::io::Error::other)?;
        }
        if vring.needs_notification().map_err(std::io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackendMut for PeerBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        // VERSION_1, INDIRECT_DESC, EVENT_IDX, PROTOCOL_FEATURES, SEG_MAX, BLK_SIZE, FLUSH, MQ.
        1 << 32 | 1 << 28 | 1 << 29 | 1 << 30 | 1 << 2 | 1 << 6 | 1 << 9 | 1 << 12
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let base = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ;
        if self.xen_mmap {
            base | VhostUserProtocolFeatures::XEN_MMAP
        } else {
            base
        }
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut c = [0u8; 96];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&254u32.to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        c[34..36].copy_from_slice(&(self.queues as u16).to_le_bytes());
        let (o, s) = (offset as usize, size as usize);
        c.get(o..o + s).map(<[u8]>::to_vec).unwrap_or_default()
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(std::io::Error::other("unexpected event set"));
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        if self.event_idx {
            loop {
                vring
                    .disable_notification()
                    .map_err(std::io::Error::other)?;
                self.process(vring)?;
                if !vring.enable_notification().map_err(std::io::Error::other)? {
                    break;
                }
            }
        } else {
            self.process(vring)?;
        }
        Ok(())
    }
}
