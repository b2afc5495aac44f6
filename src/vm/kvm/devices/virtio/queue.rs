//! A split virtqueue (virtio 1.x, section 2.7) over guest memory: the descriptor table,
//! the driver's (available) ring and the device's (used) ring.
//!
//! Everything the guest wrote is untrusted: ring indices are taken modulo the queue
//! size, descriptor addresses and lengths are checked by the memory accessors, and a
//! chain longer than the queue (a loop) ends with an error instead of a hang.

use super::super::super::memory::GuestMemory;
use super::super::super::{Error, Result};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (else reads it).
pub const DESC_F_WRITE: u16 = 2;

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it.
    pub writable: bool,
}

/// A chain the driver made available: its head index and its buffers in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The head descriptor's index (what goes back in the used ring).
    pub head: u16,
    /// The buffers.
    pub descriptors: Vec<Descriptor>,
}

/// A queue as the driver configured it through the transport.
#[derive(Debug, Clone, Default)]
pub struct Queue {
    /// The largest size the device allows.
    pub max_size: u16,
    /// The size the driver chose (a power of two, at most `max_size`).
    pub size: u16,
    /// Whether the driver marked it ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Driver (available) ring address.
    pub avail_ring: u64,
    /// Device (used) ring address.
    pub used_ring: u64,
    next_avail: u16,
    next_used: u16,
}

fn read_u16(mem: &GuestMemory, gpa: u64) -> Result<u16> {
    let mut b = [0u8; 2];
    mem.read(gpa, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

impl Queue {
    /// A queue of at most `max_size` entries, not configured yet.
    pub fn new(max_size: u16) -> Queue {
        Queue { max_size, size: max_size, ..Default::default() }
    }

    /// Whether the driver's configuration can be used.
    pub fn is_valid(&self) -> bool {
        self.ready && self.size > 0 && self.size <= self.max_size && self.size.is_power_of_two()
    }

    /// Back to the reset state (the device was reset).
    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    /// Like [`Queue::pop`], for a device's processing loop: a broken queue (the driver's
    /// error) is logged with `what` and ends the loop like an empty one.
    pub fn next_chain(&mut self, mem: &GuestMemory, what: std::fmt::Arguments<'_>) -> Option<Chain> {
        match self.pop(mem) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("{what}: {e}");
                None
            }
        }
    }

    /// The next chain the driver made available, if any.
    pub fn pop(&mut self, mem: &GuestMemory) -> Result<Option<Chain>> {
        if !self.is_valid() {
            return Ok(None);
        }
        let avail_idx = read_u16(mem, self.avail_ring + 2)?;
        if avail_idx == self.next_avail {
            return Ok(None);
        }
        if avail_idx.wrapping_sub(self.next_avail) > self.size {
            return Err(Error::Memory {
                message: format!(
                    "virtqueue: the driver made {} chains available in a queue of {}",
                    avail_idx.wrapping_sub(self.next_avail),
                    self.size
                ),
            });
        }
        let slot = self.next_avail % self.size;
        let head = read_u16(mem, self.avail_ring + 4 + 2 * slot as u64)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        let mut descriptors = Vec::new();
        let mut index = head;
        loop {
            if index >= self.size || descriptors.len() >= self.size as usize {
                return Err(Error::Memory {
                    message: format!("virtqueue: descriptor chain from {head} is out of range or loops"),
                });
            }
            let mut d = [0u8; 16];
            mem.read(self.desc_table + 16 * index as u64, &mut d)?;
            let addr = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"));
            let flags = u16::from_le_bytes([d[12], d[13]]);
            let next = u16::from_le_bytes([d[14], d[15]]);
            descriptors.push(Descriptor { addr, len, writable: flags & DESC_F_WRITE != 0 });
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            index = next;
        }
        Ok(Some(Chain { head, descriptors }))
    }

    /// Returns a chain to the driver with `len` bytes written into it.
    pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<()> {
        let slot = self.next_used % self.size;
        let mut e = [0u8; 8];
        e[0..4].copy_from_slice(&(head as u32).to_le_bytes());
        e[4..8].copy_from_slice(&len.to_le_bytes());
        mem.write(self.used_ring + 4 + 8 * slot as u64, &e)?;
        self.next_used = self.next_used.wrapping_add(1);
        // The entry first, then the index the driver polls.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        mem.write(self.used_ring + 2, &self.next_used.to_le_bytes())
    }
}
