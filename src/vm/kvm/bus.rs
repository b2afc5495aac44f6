//! The port-I/O and MMIO buses: address ranges mapped to devices.
//!
//! A vCPU exit for an address goes to the device whose range holds it, with the offset
//! into that range. An access no device claims reads as all ones and is otherwise
//! ignored (as on a PC), and is counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::{Error, Result};

/// A device on a bus.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device as the bus holds it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// One bus: non-overlapping ranges, each with its device.
#[derive(Default)]
pub struct Bus {
    /// By base address: (length, device).
    ranges: RwLock<BTreeMap<u64, (u64, SharedDevice)>>,
    unclaimed: AtomicU64,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Puts `device` at `base` for `len` bytes.
    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<()> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(Error::BusOverlap { base, len })?;
        let mut ranges = self.ranges.write();
        let before = ranges.range(..end).next_back();
        if before.is_some_and(|(&b, &(l, _))| b + l > base) {
            return Err(Error::BusOverlap { base, len });
        }
        ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read();
        let (&base, (len, dev)) = ranges.range(..=addr).next_back()?;
        (addr < base + len).then(|| (addr - base, dev.clone()))
    }

    /// Routes a read; false when no device claims `addr` (`data` is then all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock().read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Routes a write; false when no device claims `addr` (it is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock().write(off, data);
                true
            }
            None => {
                self.unclaimed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// How many accesses no device claimed.
    pub fn unclaimed(&self) -> u64 {
        self.unclaimed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_refuses_overlaps() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder(Vec::new())));
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x400, 4, Arc::new(Mutex::new(Recorder(Vec::new())))).unwrap();
        assert!(bus.insert(0x3fc, 8, a.clone()).is_err(), "overlaps the end of 0x3f8");
        assert!(bus.insert(0x3f0, 9, a.clone()).is_err(), "overlaps the start of 0x3f8");
        assert!(bus.insert(0x3f0, 0, a.clone()).is_err(), "empty");
        assert!(bus.insert(u64::MAX, 2, a.clone()).is_err(), "wraps");
        bus.insert(0x3f0, 8, a.clone()).unwrap(); // adjacent is fine
        assert!(bus.write(0x3f9, &[7]));
        let mut b = [0u8; 2];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5, 5]);
        assert!(!bus.read(0x500, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        assert!(!bus.write(0x400 + 4, &[1]));
        assert_eq!(bus.unclaimed(), 2);
        assert_eq!(a.lock().0, vec![(1, vec![7])]);
    }
}
