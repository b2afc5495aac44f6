//! Linux boot on the kvm backend: the PVH entry of an uncompressed vmlinux.
//!
//! PVH (the Xen/x86 "direct boot" protocol that QEMU's microvm and Firecracker use):
//! the kernel's PT_LOAD segments are copied to their physical addresses, and the vCPU
//! starts at the ELF note's 32-bit entry in flat 32-bit protected mode with paging off,
//! `ebx` holding the address of an `hvm_start_info`. That structure names the command
//! line, the modules (the initramfs is module 0) and the memory map. No page tables
//! are needed: the kernel builds its own before it turns paging on.
//!
//! Guest physical layout (below 1 MiB, as Firecracker's):
//!
//! ```text
//! 0x0500  GDT: null, 32-bit flat code (0x08), 32-bit flat data (0x10), TSS (0x18)
//! 0x6000  hvm_start_info (56 bytes)
//! 0x6040  hvm_modlist_entry[1] (32 bytes): the initramfs
//! 0x7000  hvm_memmap_table_entry[] (24 bytes each): the e820 map
//! 0x20000 the command line, NUL-terminated (at most 4 KiB)
//! 1 MiB+  the kernel; the initramfs at the top of RAM below 4 GiB, page-aligned
//! ```
//!
//! 64-bit entry (what a bzImage's 64-bit boot protocol and small 64-bit programs need)
//! is here too: [`setup_long_mode`] writes identity-mapping page tables for the first
//! GiB (PML4 at 0x9000, PDPT at 0xA000, one page directory of 2 MiB pages at 0xB000, as
//! Firecracker lays them out) and a GDT with a 64-bit code segment, and
//! [`long_mode_vcpu`] gives the vCPU state: paging and PAE on, EFER.LME/LMA set.

use byteorder::{ByteOrder, LittleEndian as LE};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::memory::GuestMemory;
use super::vcpu::VcpuSetup;
use super::{Error, Result};

/// The GDT's guest physical address.
pub const GDT_ADDR: u64 = 0x500;
/// hvm_start_info's address.
pub const START_INFO_ADDR: u64 = 0x6000;
/// The module list's address.
pub const MODLIST_ADDR: u64 = 0x6040;
/// The memory map's address.
pub const MEMMAP_ADDR: u64 = 0x7000;
/// The command line's address.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The longest command line, with its NUL: x86 Linux copies `COMMAND_LINE_SIZE`
/// (2048) bytes of it, so a longer one is refused rather than cut.
pub const CMDLINE_MAX: usize = 2048;
/// Where the PC's extended BIOS data area starts: RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where high memory starts.
pub const HIGH_MEMORY: u64 = 0x10_0000;
/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The GDT's entries: null, flat 32-bit code, flat 32-bit data, a TSS.
pub const GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff, // code: base 0, limit 4 GiB, 32-bit, execute/read, accessed
    0x00cf_9300_0000_ffff, // data: base 0, limit 4 GiB, 32-bit, read/write, accessed
    0x0000_8b00_0000_0067, // TSS: present, busy 32-bit TSS, limit 0x67
];

/// The GDT for 64-bit entry: null, 64-bit code (0x08), data (0x10), a TSS (0x18).
pub const GDT64: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // code: 64-bit (L), execute/read, accessed
    0x00cf_9300_0000_ffff, // data: read/write, accessed
    0x0000_8b00_0000_0067, // TSS: present, busy, limit 0x67
];
/// The page-map level 4 table's address.
pub const PML4_ADDR: u64 = 0x9000;
/// The page directory pointer table's address.
pub const PDPT_ADDR: u64 = 0xa000;
/// The page directory's address (512 entries of 2 MiB: the first GiB).
pub const PD_ADDR: u64 = 0xb000;

/// Page-table entry bits: present, writable, a 2 MiB page.
const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 2;
const PTE_HUGE: u64 = 0x80;

/// Writes the 64-bit GDT and page tables identity-mapping the first GiB.
pub fn setup_long_mode(mem: &GuestMemory) -> Result<()> {
    let mut gdt = [0u8; 32];
    for (i, e) in GDT64.iter().enumerate() {
        LE::write_u64(&mut gdt[i * 8..i * 8 + 8], *e);
    }
    mem.write(GDT_ADDR, &gdt)?;
    let mut pml4 = [0u8; 4096];
    LE::write_u64(&mut pml4[..8], PDPT_ADDR | PTE_PRESENT | PTE_WRITE);
    mem.write(PML4_ADDR, &pml4)?;
    let mut pdpt = [0u8; 4096];
    LE::write_u64(&mut pdpt[..8], PD_ADDR | PTE_PRESENT | PTE_WRITE);
    mem.write(PDPT_ADDR, &pdpt)?;
    let mut pd = [0u8; 4096];
    for i in 0..512u64 {
        LE::write_u64(
            &mut pd[i as usize * 8..i as usize * 8 + 8],
            (i << 21) | PTE_PRESENT | PTE_WRITE | PTE_HUGE,
        );
    }
    mem.write(PD_ADDR, &pd)
}

/// The vCPU state of 64-bit entry at `entry` (with [`setup_long_mode`]'s tables):
/// long mode, paging on, the 64-bit GDT loaded, interrupts off, `rsi` = `rsi` (the
/// boot protocol passes its boot_params there).
pub fn long_mode_vcpu(entry: u64, rsi: u64) -> VcpuSetup {
    let regs = kvm_regs { rip: entry, rsi, rflags: 0x2, ..Default::default() };
    VcpuSetup {
        regs,
        sregs: std::sync::Arc::new(|s: &mut kvm_sregs| {
            load_gdt(s, &GDT64);
            s.cr3 = PML4_ADDR;
            s.cr4 = 0x20; // PAE
            s.cr0 = 0x8000_0011; // PG, ET, PE
            s.efer = 0x500; // LME, LMA
        }),
    }
}

/// The kernel as loaded: where it ends, and its PVH entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The 32-bit PVH entry point.
    pub entry: u32,
    /// The first byte past the highest segment.
    pub end: u64,
}

/// Copies a vmlinux's PT_LOAD segments to their physical addresses (zeroing the rest
/// of each segment's memory size) and returns its PVH entry.
pub fn load_kernel(mem: &GuestMemory, vmlinux: &[u8]) -> Result<LoadedKernel> {
    let bad = |m: &str| Error::Memory { message: format!("kernel: {m}") };
    let entry = crate::image::elf::pvh_entry(vmlinux)
        .ok_or_else(|| bad("no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH"))?;
    let segments =
        crate::image::elf::load_segments(vmlinux).ok_or_else(|| bad("not a well-formed 64-bit ELF"))?;
    if segments.is_empty() {
        return Err(bad("no loadable segment"));
    }
    let mut end = 0;
    for s in &segments {
        if s.paddr < HIGH_MEMORY {
            return Err(bad(&format!("a segment at {:#x} below 1 MiB", s.paddr)));
        }
        if s.paddr.saturating_add(s.mem_size) > mem.size() {
            return Err(bad(&format!(
                "a segment at {:#x} of {:#x} bytes does not fit in {} MiB of memory",
                s.paddr,
                s.mem_size,
                mem.size() >> 20
            )));
        }
        let file = &vmlinux[s.offset as usize..(s.offset + s.file_size) as usize];
        mem.write(s.paddr, file)?;
        let zeros = vec![0u8; (s.mem_size - s.file_size) as usize];
        mem.write(s.paddr + s.file_size, &zeros)?;
        end = end.max(s.paddr + s.mem_size);
    }
    Ok(LoadedKernel { entry, end })
}

/// The e820 map for `mem_size` bytes of RAM with MMIO `holes`: low RAM up to the EBDA,
/// then RAM from 1 MiB, split around the holes (which are left out).
pub fn memory_map(mem_size: u64, holes: &[(u64, u64)]) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    let mut at = HIGH_MEMORY;
    let mut holes: Vec<(u64, u64)> = holes.iter().copied().filter(|&(b, l)| b + l > HIGH_MEMORY).collect();
    holes.sort_unstable();
    for (base, len) in holes {
        if base >= mem_size {
            break;
        }
        if base > at {
            map.push((at, base - at, E820_RAM));
        }
        at = at.max(base + len);
    }
    if at < mem_size {
        map.push((at, mem_size - at, E820_RAM));
    }
    map
}

/// Writes the GDT, the command line, the initramfs, the module list, the memory map and
/// hvm_start_info; returns where the initramfs went (address, size), if any.
pub fn setup_pvh(
    mem: &GuestMemory,
    mem_size: u64,
    holes: &[(u64, u64)],
    kernel: &LoadedKernel,
    cmdline: &str,
    initramfs: Option<&[u8]>,
) -> Result<Option<(u64, u64)>> {
    let bad = |m: String| Error::Memory { message: m };
    let mut gdt = [0u8; 32];
    for (i, e) in GDT.iter().enumerate() {
        LE::write_u64(&mut gdt[i * 8..i * 8 + 8], *e);
    }
    mem.write(GDT_ADDR, &gdt)?;

    if cmdline.len() + 1 > CMDLINE_MAX || cmdline.contains('\0') {
        return Err(bad(format!("a command line of {} bytes (at most {})", cmdline.len(), CMDLINE_MAX - 1)));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write(CMDLINE_ADDR, &c)?;

    // The initramfs: page-aligned at the top of the highest RAM range below 4 GiB that
    // holds it above the kernel.
    let map = memory_map(mem_size, holes);
    let placed = match initramfs {
        None => None,
        Some(data) => {
            let size = data.len() as u64;
            let spot = map.iter().rev().find_map(|&(base, len, ty)| {
                let top = (base + len).min(1 << 32);
                let addr = top.checked_sub(size)? & !0xfff;
                (ty == E820_RAM && addr >= base.max(kernel.end)).then_some(addr)
            });
            let addr =
                spot.ok_or_else(|| bad(format!("no room for a {size}-byte initramfs above the kernel")))?;
            mem.write(addr, data)?;
            Some((addr, size))
        }
    };

    let mut modlist = [0u8; 32];
    if let Some((addr, size)) = placed {
        LE::write_u64(&mut modlist[0..8], addr);
        LE::write_u64(&mut modlist[8..16], size);
    }
    mem.write(MODLIST_ADDR, &modlist)?;

    let mut memmap = Vec::with_capacity(map.len() * 24);
    for (addr, size, ty) in &map {
        let mut e = [0u8; 24];
        LE::write_u64(&mut e[0..8], *addr);
        LE::write_u64(&mut e[8..16], *size);
        LE::write_u32(&mut e[16..20], *ty);
        memmap.extend_from_slice(&e);
    }
    mem.write(MEMMAP_ADDR, &memmap)?;

    let mut info = [0u8; 56];
    LE::write_u32(&mut info[0..4], START_INFO_MAGIC);
    LE::write_u32(&mut info[4..8], 1); // version
    LE::write_u32(&mut info[8..12], 0); // flags
    LE::write_u32(&mut info[12..16], placed.is_some() as u32); // nr_modules
    LE::write_u64(&mut info[16..24], MODLIST_ADDR);
    LE::write_u64(&mut info[24..32], CMDLINE_ADDR);
    LE::write_u64(&mut info[32..40], 0); // rsdp: no ACPI
    LE::write_u64(&mut info[40..48], MEMMAP_ADDR);
    LE::write_u32(&mut info[48..52], map.len() as u32);
    mem.write(START_INFO_ADDR, &info)?;
    Ok(placed)
}

/// Loads `gdt` (at [`GDT_ADDR`]) into the vCPU state: code 0x08, data 0x10 in every
/// data segment register, the TSS 0x18.
fn load_gdt(s: &mut kvm_sregs, gdt: &[u64; 4]) {
    let code = segment(0x08, gdt[1]);
    let data = segment(0x10, gdt[2]);
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    let mut tr = segment(0x18, gdt[3]);
    tr.limit = 0x67;
    tr.g = 0;
    s.tr = tr;
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (gdt.len() * 8 - 1) as u16;
}

fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    let flags = (descriptor >> 40) as u16;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The vCPU state PVH asks for: flat 32-bit protected mode, paging off, the GDT
/// above loaded, `ebx` = hvm_start_info, `eip` = the entry.
pub fn pvh_vcpu(entry: u32) -> VcpuSetup {
    let regs = kvm_regs { rip: entry as u64, rbx: START_INFO_ADDR, rflags: 0x2, ..Default::default() };
    VcpuSetup {
        regs,
        sregs: std::sync::Arc::new(|s: &mut kvm_sregs| {
            load_gdt(s, &GDT);
            s.cr0 = 0x11; // PE, ET: protected mode, paging off
            s.cr4 = 0;
            s.efer = 0;
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_leaves_out_the_ebda_and_the_holes() {
        assert_eq!(
            memory_map(256 << 20, &[]),
            vec![(0, EBDA_START, E820_RAM), (HIGH_MEMORY, (256 << 20) - HIGH_MEMORY, E820_RAM)]
        );
        let holes = [(0xA_0000, 0x6_0000), (0x800_0000, 0x100_0000)];
        assert_eq!(
            memory_map(0x1000_0000, &holes),
            vec![
                (0, EBDA_START, E820_RAM),
                (HIGH_MEMORY, 0x800_0000 - HIGH_MEMORY, E820_RAM),
                (0x900_0000, 0x1000_0000 - 0x900_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn start_info_modules_memmap_cmdline_and_gdt_byte_for_byte() {
        let size = 64 << 20;
        let mem = GuestMemory::new(size, &[]).unwrap();
        let kernel = LoadedKernel { entry: 0x100_0000, end: 0x200_0000 };
        let initrd = vec![0xabu8; 5000];
        let placed = setup_pvh(&mem, size, &[], &kernel, "console=ttyS0 quiet", Some(&initrd)).unwrap();
        let (addr, len) = placed.unwrap();
        assert_eq!((addr % 4096, len), (0, 5000));
        assert!(addr >= kernel.end && addr + len <= size, "{addr:#x}");
        assert_eq!(addr, (size - 5000) & !0xfff, "at the top of RAM");

        let mut info = [0u8; 56];
        mem.read(START_INFO_ADDR, &mut info).unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&0x336e_c578u32.to_le_bytes());
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&0u32.to_le_bytes());
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&0x6040u64.to_le_bytes());
        want.extend_from_slice(&0x2_0000u64.to_le_bytes());
        want.extend_from_slice(&0u64.to_le_bytes());
        want.extend_from_slice(&0x7000u64.to_le_bytes());
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(&info[..], &want[..]);

        let mut m = [0u8; 32];
        mem.read(MODLIST_ADDR, &mut m).unwrap();
        assert_eq!(LE::read_u64(&m[0..8]), addr);
        assert_eq!(LE::read_u64(&m[8..16]), 5000);
        assert_eq!(&m[16..], &[0u8; 16], "no module command line, reserved zero");

        let mut e = [0u8; 48];
        mem.read(MEMMAP_ADDR, &mut e).unwrap();
        assert_eq!((LE::read_u64(&e[0..]), LE::read_u64(&e[8..]), LE::read_u32(&e[16..])), (0, 0x9fc00, 1));
        assert_eq!(
            (LE::read_u64(&e[24..]), LE::read_u64(&e[32..]), LE::read_u32(&e[40..])),
            (0x10_0000, size - 0x10_0000, 1)
        );

        let mut c = [0u8; 20];
        mem.read(CMDLINE_ADDR, &mut c).unwrap();
        assert_eq!(&c, b"console=ttyS0 quiet\0");

        let mut g = [0u8; 32];
        mem.read(GDT_ADDR, &mut g).unwrap();
        assert_eq!(&g[8..16], &[0xff, 0xff, 0, 0, 0, 0x9b, 0xcf, 0], "flat 32-bit code");
        assert_eq!(&g[16..24], &[0xff, 0xff, 0, 0, 0, 0x93, 0xcf, 0], "flat 32-bit data");

        let mut b = [0u8; 2];
        mem.read(addr, &mut b).unwrap();
        assert_eq!(b, [0xab, 0xab]);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mem = GuestMemory::new(4 << 20, &[]).unwrap();
        let k = LoadedKernel { entry: 0x10_0000, end: 0x30_0000 };
        assert!(setup_pvh(&mem, 4 << 20, &[], &k, &"x".repeat(CMDLINE_MAX), None).is_err());
        assert!(setup_pvh(&mem, 4 << 20, &[], &k, "a\0b", None).is_err());
        assert!(
            setup_pvh(&mem, 4 << 20, &[], &k, "", Some(&vec![0; 2 << 20])).is_err(),
            "no room above the kernel"
        );
        assert!(load_kernel(&mem, b"not an elf").is_err());
        assert!(load_kernel(&mem, &crate::image::elf::exit_program()).is_err(), "no PVH note");
    }

    #[test]
    fn long_mode_page_tables_identity_map_the_first_gib_byte_for_byte() {
        let mem = GuestMemory::new(2 << 20, &[]).unwrap();
        setup_long_mode(&mem).unwrap();
        let q = |gpa: u64| {
            let mut b = [0u8; 8];
            mem.read(gpa, &mut b).unwrap();
            u64::from_le_bytes(b)
        };
        assert_eq!(q(PML4_ADDR), 0xa003);
        assert_eq!(q(PML4_ADDR + 8), 0, "one PML4 entry");
        assert_eq!(q(PDPT_ADDR), 0xb003);
        assert_eq!(q(PDPT_ADDR + 8), 0, "one GiB");
        assert_eq!(q(PD_ADDR), 0x83);
        assert_eq!(q(PD_ADDR + 8), 0x20_0083);
        assert_eq!(q(PD_ADDR + 511 * 8), 0x3fe0_0083, "the last 2 MiB page below 1 GiB");
        assert_eq!(q(GDT_ADDR + 8), 0x00af_9b00_0000_ffff);
        let v = long_mode_vcpu(0x10_0000, 0x7000);
        let mut s = kvm_sregs::default();
        (v.sregs)(&mut s);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x08, 1, 0), "64-bit code segment");
        assert_eq!((s.cr0 >> 31, s.cr4 & 0x20, s.efer, s.cr3), (1, 0x20, 0x500, PML4_ADDR));
        assert_eq!((v.regs.rip, v.regs.rsi), (0x10_0000, 0x7000));
    }

    #[test]
    fn pvh_vcpu_state_is_flat_protected_mode() {
        let setup = pvh_vcpu(0x100_0000);
        assert_eq!((setup.regs.rip, setup.regs.rbx), (0x100_0000, START_INFO_ADDR));
        let mut s = kvm_sregs::default();
        (setup.sregs)(&mut s);
        assert_eq!((s.cs.selector, s.cs.db, s.cs.l, s.cs.type_, s.cs.g), (0x08, 1, 0, 0xb, 1));
        assert_eq!((s.ds.selector, s.ds.type_, s.ss.selector), (0x10, 0x3, 0x10));
        assert_eq!((s.cr0 & 1, s.cr0 & 0x8000_0000, s.gdt.base, s.gdt.limit), (1, 0, 0x500, 31));
    }
}
