//! A virtio console with one port: queue 0 carries host-to-guest bytes (the driver
//! posts buffers for the device to fill), queue 1 guest-to-host bytes (the driver posts
//! buffers for the device to read). The guest sees `/dev/hvc0`.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use super::{Interrupt, Queue, VirtioDevice, F_VERSION_1};
use crate::vm::kvm::memory::GuestMemory;

/// The virtio device id of a console.
pub const DEVICE_ID: u32 = 3;
/// Queue sizes.
pub const QUEUE_SIZE: u16 = 256;
/// The most host-to-guest bytes kept while the guest has no buffer for them.
pub const INPUT_LIMIT: usize = 1 << 20;

/// The console device.
pub struct Console {
    out: Box<dyn Write + Send>,
    input: VecDeque<u8>,
    mem: Option<Arc<GuestMemory>>,
    interrupt: Option<Interrupt>,
}

impl Console {
    /// A console writing what the guest sends to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Console {
        Console { out, input: VecDeque::new(), mem: None, interrupt: None }
    }

    /// Queues bytes for the guest (dropped past [`INPUT_LIMIT`]); they go out on the
    /// next poll or receive-queue notification.
    pub fn enqueue(&mut self, data: &[u8]) {
        let room = INPUT_LIMIT.saturating_sub(self.input.len());
        self.input.extend(&data[..data.len().min(room)]);
    }

    /// Bytes still waiting for a guest buffer.
    pub fn pending(&self) -> usize {
        self.input.len()
    }

    fn fill_rx(&mut self, queues: &mut [Queue]) {
        let (Some(mem), Some(rx)) = (self.mem.clone(), queues.get_mut(0)) else { return };
        let mut used = false;
        while !self.input.is_empty() {
            let chain = match rx.pop(&mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    log::warn!("virtio console receive queue: {e}");
                    break;
                }
            };
            let mut written = 0u32;
            for d in chain.descriptors.iter().filter(|d| d.writable) {
                let n = (d.len as usize).min(self.input.len());
                let bytes: Vec<u8> = self.input.drain(..n).collect();
                if mem.write(d.addr, &bytes).is_err() {
                    break;
                }
                written += n as u32;
                if self.input.is_empty() {
                    break;
                }
            }
            if rx.add_used(&mem, chain.head, written).is_err() {
                break;
            }
            used = true;
        }
        if used {
            if let Some(i) = &self.interrupt {
                i();
            }
        }
    }

    fn drain_tx(&mut self, queues: &mut [Queue]) {
        let (Some(mem), Some(tx)) = (self.mem.clone(), queues.get_mut(1)) else { return };
        let mut used = false;
        loop {
            let chain = match tx.pop(&mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    log::warn!("virtio console transmit queue: {e}");
                    break;
                }
            };
            for d in chain.descriptors.iter().filter(|d| !d.writable) {
                let mut buf = vec![0u8; (d.len as usize).min(1 << 20)];
                if mem.read(d.addr, &mut buf).is_ok() {
                    let _ = self.out.write_all(&buf);
                }
            }
            let _ = self.out.flush();
            if tx.add_used(&mem, chain.head, 0).is_err() {
                break;
            }
            used = true;
        }
        if used {
            if let Some(i) = &self.interrupt {
                i();
            }
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        F_VERSION_1
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: all 0 (no size, one port).
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, mem: Arc<GuestMemory>, _features: u64, interrupt: Interrupt) {
        self.mem = Some(mem);
        self.interrupt = Some(interrupt);
    }

    fn notify(&mut self, index: usize, queues: &mut [Queue]) {
        match index {
            0 => self.fill_rx(queues),
            1 => self.drain_tx(queues),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.mem = None;
        self.interrupt = None;
    }

    fn poll(&mut self, queues: &mut [Queue]) {
        self.fill_rx(queues);
    }
}
