//! Large buffers kept for reuse: the payloads of big frames and file-read answers (up
//! to [`proto::MAX_FRAME`](crate::contract::proto::MAX_FRAME) each; at most eight of them,
//! ~8 MiB, stay for the guest's life).
//!
//! Allocated once and reused, not allocated per frame: an allocator may map and unmap
//! every block this size (musl's does for blocks over 128 KiB, glibc's until its
//! threshold adapts), and under emulation each fresh mapping is page faults and each
//! unmapping a TLB shootdown across vCPUs. With musl that made guest file transfers
//! ~40 % slower (BENCHMARKS.md, session 6).

use parking_lot::Mutex;

/// Buffers at least this large are worth keeping; smaller ones come from the allocator.
pub const BIG: usize = 64 << 10;
/// At most this many are kept (one per concurrent large request is plenty: the fs pool
/// has at most 32 workers, and large requests are usually one stream at a time).
const KEEP: usize = 8;

/// A set of kept buffers.
struct Kept(Mutex<Vec<Vec<u8>>>);

impl Kept {
    const fn new() -> Kept {
        Kept(parking_lot::const_mutex(Vec::new()))
    }

    fn take(&self, capacity: usize) -> Vec<u8> {
        let mut v = self.0.lock().pop().unwrap_or_default();
        v.clear();
        v.reserve(capacity);
        v
    }

    fn give(&self, v: Vec<u8>) {
        if v.capacity() < BIG {
            return;
        }
        let mut free = self.0.lock();
        if free.len() < KEEP {
            free.push(v);
            // Largest last, so that `take` pops one that needs no growth.
            free.sort_unstable_by_key(Vec::capacity);
        }
    }
}

/// The agent's kept buffers.
static KEPT: Kept = Kept::new();

/// An empty buffer with room for at least `capacity` bytes: a kept one when there is
/// one (the largest, so it needs no growth), else a new one.
pub fn take(capacity: usize) -> Vec<u8> {
    KEPT.take(capacity)
}

/// Gives a buffer back for reuse; a small one is just dropped, as is one when eight
/// (`KEEP`) are kept already.
pub fn give(v: Vec<u8>) {
    KEPT.give(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_buffers_come_back_empty_and_small_ones_are_dropped() {
        let kept = Kept::new();
        let mut big = kept.take(BIG * 2);
        big.extend_from_slice(b"used");
        let ptr = big.as_ptr();
        kept.give(big);
        let again = kept.take(16);
        assert!(again.is_empty(), "a reused buffer comes back empty");
        assert!(again.capacity() >= BIG * 2);
        assert_eq!(again.as_ptr(), ptr, "the kept buffer is reused");
        kept.give(again);
        kept.give(Vec::with_capacity(16));
        assert_eq!(kept.0.lock().len(), 1, "small buffers are not kept");
        for _ in 0..KEEP + 2 {
            kept.give(Vec::with_capacity(BIG));
        }
        assert_eq!(kept.0.lock().len(), KEEP, "at most KEEP are kept");
        let largest = kept.take(0);
        assert!(largest.capacity() >= BIG * 2, "the largest is taken first");
    }
}
