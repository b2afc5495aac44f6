//! Guest memory: anonymous shared mappings, one KVM memory slot each, addressed by
//! guest physical address. Accesses are bounds-checked and never span two regions.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use super::{kvm_err, Error, Result};

/// One contiguous range of guest RAM.
struct Region {
    gpa: u64,
    size: u64,
    host: *mut u8,
}

/// Guest RAM: ranges from 0 up to a size, with holes left for MMIO.
pub struct GuestMemory {
    regions: Vec<Region>,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory").finish_non_exhaustive()
    }
}

// SAFETY: the mappings live as long as the GuestMemory and are only reached through
// its bounds-checked, copying accessors; the guest writes them concurrently anyway,
// as with any VMM's memory.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; no accessor hands out references into the mappings.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps `size` bytes from guest physical 0, leaving out the `holes` (base, len),
    /// which must be page-aligned.
    pub fn new(size: u64, holes: &[(u64, u64)]) -> Result<GuestMemory> {
        const PAGE: u64 = 4096;
        let bad = |m: String| Error::Memory { message: m };
        if size == 0 || size % PAGE != 0 {
            return Err(bad(format!("size {size:#x} is not a positive multiple of 4 KiB")));
        }
        let mut holes: Vec<(u64, u64)> = holes.iter().copied().filter(|&(b, _)| b < size).collect();
        holes.sort_unstable();
        let mut ranges = Vec::new();
        let mut at = 0;
        for (base, len) in holes {
            if base % PAGE != 0 || len % PAGE != 0 || base < at {
                return Err(bad(format!("hole {base:#x}+{len:#x} is unaligned or overlaps another")));
            }
            if base > at {
                ranges.push((at, base - at));
            }
            at = base.saturating_add(len);
        }
        if at < size {
            ranges.push((at, size - at));
        }
        let mut regions = Vec::with_capacity(ranges.len());
        for (gpa, len) in ranges {
            // SAFETY: a fresh anonymous mapping; checked for failure below.
            let host = unsafe {
                nix::libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    nix::libc::PROT_READ | nix::libc::PROT_WRITE,
                    nix::libc::MAP_ANONYMOUS | nix::libc::MAP_SHARED | nix::libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if host == nix::libc::MAP_FAILED {
                return Err(bad(format!("mmap {len:#x} bytes: {}", std::io::Error::last_os_error())));
            }
            regions.push(Region { gpa, size: len, host: host.cast() });
        }
        Ok(GuestMemory { regions })
    }

    /// Registers every region with the VM as a memory slot.
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        for (slot, r) in self.regions.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.host as u64,
            };
            // SAFETY: the mapping is valid for `size` bytes and outlives the VM's use
            // of it (the GuestMemory is kept by the Vmm, dropped after its vCPUs).
            unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err(format!("memory slot {slot}")))?;
        }
        Ok(())
    }

    /// The total RAM size.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The host address of `len` bytes at `gpa`, if they lie in one region.
    fn locate(&self, gpa: u64, len: usize) -> Result<*mut u8> {
        for r in &self.regions {
            if gpa >= r.gpa && gpa.checked_add(len as u64).is_some_and(|end| end <= r.gpa + r.size) {
                // SAFETY: the offset is within the region, as just checked.
                return Ok(unsafe { r.host.add((gpa - r.gpa) as usize) });
            }
        }
        Err(Error::Memory { message: format!("{len} bytes at {gpa:#x} are not in guest RAM") })
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let p = self.locate(gpa, data.len())?;
        // SAFETY: `locate` checked the whole range lies in one live mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let p = self.locate(gpa, buf.len())?;
        // SAFETY: as for write.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: each region is a mapping this value made and still owns.
            unsafe { nix::libc::munmap(r.host.cast(), r.size as usize) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_split_the_regions_and_accesses_are_bounded() {
        let m = GuestMemory::new(0x10_0000, &[(0xA_0000, 0x2_0000)]).unwrap();
        assert_eq!(m.size(), 0x10_0000 - 0x2_0000);
        m.write(0x1000, b"abc").unwrap();
        let mut b = [0u8; 3];
        m.read(0x1000, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert!(m.write(0xA_0000, b"x").is_err(), "in the hole");
        assert!(m.write(0x9_FFFF, b"xy").is_err(), "across the hole");
        assert!(m.write(0xF_FFFF, b"xy").is_err(), "past the end");
        assert!(m.read(u64::MAX, &mut b).is_err(), "overflowing address");
        m.write(0xC_0000, b"z").unwrap();
        assert!(GuestMemory::new(0x1001, &[]).is_err());
        assert!(GuestMemory::new(0x10_0000, &[(0x123, 0x1000)]).is_err());
    }
}
