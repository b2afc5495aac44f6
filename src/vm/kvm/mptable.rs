//! The Intel MultiProcessor Specification (1.4) table: how a guest without ACPI learns
//! its CPUs, its I/O APIC and how ISA interrupts are wired to it.
//!
//! Linux finds the floating pointer by scanning the last KiB of base memory
//! (0x9FC00), where [`write()`] puts it, followed by the configuration table: one
//! processor entry per vCPU, the ISA bus, the in-kernel I/O APIC, interrupts 0..=23
//! routed one to one to its pins, and the local interrupts (ExtINT on LINT0, NMI on
//! LINT1). Both structures carry checksums that make their bytes sum to zero.

use byteorder::{ByteOrder, LE};

use super::memory::GuestMemory;
use super::{Error, Result};

/// Where the floating pointer goes: the start of the last KiB of base memory, which
/// the e820 map leaves reserved (see [`super::boot::EBDA_START`]).
pub const START: u64 = 0x9_fc00;
/// The local APICs' address.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// The I/O APIC's address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The I/O APIC's pins, 0..=23 (KVM's in-kernel I/O APIC has 24).
pub const IRQ_MAX: u8 = 23;
/// The most vCPUs the table describes: it must fit in the last KiB below 640 KiB
/// (20 bytes a processor; Firecracker stops at 32 too).
pub const MAX_CPUS: u8 = 32;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = 0x201; // FPU and APIC
const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// The floating pointer and the configuration table for `cpus` vCPUs, as they go at
/// [`START`]: (bytes, number of entries in the configuration table).
pub fn build(cpus: u8) -> Result<(Vec<u8>, u16)> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::Memory {
            message: format!("MP table: {cpus} vCPUs (1 to {MAX_CPUS} are possible)"),
        });
    }
    let ioapic_id = cpus; // after the local APIC ids 0..cpus
    let mut t: Vec<u8> = vec![0; HEADER_LEN];
    let mut entries = 0u16;
    for id in 0..cpus {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = APIC_VERSION;
        e[3] = 1 | if id == 0 { 2 } else { 0 }; // enabled, bootstrap processor
        LE::write_u32(&mut e[4..8], CPU_SIGNATURE);
        LE::write_u32(&mut e[8..12], CPU_FEATURES);
        t.extend_from_slice(&e);
        entries += 1;
    }
    t.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0: ISA
    entries += 1;
    let mut io = [2, ioapic_id, IOAPIC_VERSION, 1, 0, 0, 0, 0]; // I/O APIC, enabled
    LE::write_u32(&mut io[4..8], IOAPIC_ADDR);
    t.extend_from_slice(&io);
    entries += 1;
    for irq in 0..=IRQ_MAX {
        // I/O interrupt: type INT, polarity and trigger as the bus says (ISA: edge,
        // active high), from ISA irq `irq` to I/O APIC pin `irq`.
        t.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        entries += 1;
    }
    // Local interrupts: ExtINT (the PIC) on every LAPIC's LINT0, NMI on LINT1.
    t.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    t.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    entries += 2;

    let len = t.len() as u16;
    t[0..4].copy_from_slice(b"PCMP");
    LE::write_u16(&mut t[4..6], len);
    t[6] = 4; // spec revision 1.4
    t[8..16].copy_from_slice(b"VMHOST  ");
    t[16..28].copy_from_slice(b"MICROVM     ");
    LE::write_u16(&mut t[34..36], entries);
    LE::write_u32(&mut t[36..40], APIC_ADDR);
    t[7] = checksum(&t);

    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    LE::write_u32(&mut fp[4..8], (START + 16) as u32);
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4; // spec revision 1.4
               // Feature bytes 0: the configuration table is present; no IMCR (virtual wire mode).
    fp[10] = checksum(&fp);

    let mut out = fp.to_vec();
    out.extend_from_slice(&t);
    Ok((out, entries))
}

/// Writes the MP table for `cpus` vCPUs at [`START`].
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<()> {
    let (bytes, _) = build(cpus)?;
    mem.write(START, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_and_table_byte_for_byte() {
        let (b, entries) = build(2).unwrap();
        // Floating pointer.
        assert_eq!(&b[0..4], b"_MP_");
        assert_eq!(LE::read_u32(&b[4..8]), 0x9_fc10, "points at the table right after it");
        assert_eq!((b[8], b[9]), (1, 4));
        assert_eq!(&b[11..16], &[0; 5], "no default configuration, no IMCR");
        assert_eq!(sum(&b[0..16]), 0, "floating pointer checksum");
        // Header.
        let t = &b[16..];
        assert_eq!(&t[0..4], b"PCMP");
        let len = LE::read_u16(&t[4..6]) as usize;
        assert_eq!(len, t.len());
        assert_eq!(len, 44 + 2 * 20 + 8 + 8 + 24 * 8 + 2 * 8);
        assert_eq!(t[6], 4);
        assert_eq!(sum(&t[..len]), 0, "table checksum");
        assert_eq!(LE::read_u16(&t[34..36]), entries);
        assert_eq!(entries, 2 + 1 + 1 + 24 + 2);
        assert_eq!(LE::read_u32(&t[36..40]), APIC_ADDR);
        // Processors: ids 0 and 1, the first one the bootstrap processor.
        assert_eq!(&t[44..48], &[0, 0, 0x14, 3]);
        assert_eq!(&t[64..68], &[0, 1, 0x14, 1]);
        // Bus, then the I/O APIC with the id after the CPUs.
        assert_eq!(&t[84..92], b"\x01\x00ISA   ");
        assert_eq!(&t[92..96], &[2, 2, 0x11, 1]);
        assert_eq!(LE::read_u32(&t[96..100]), IOAPIC_ADDR);
        // ISA irq 4 (the UART) goes to pin 4 of I/O APIC 2.
        let irq4 = &t[100 + 4 * 8..100 + 5 * 8];
        assert_eq!(irq4, &[3, 0, 0, 0, 0, 4, 2, 4]);
        // Local interrupts last.
        assert_eq!(&t[len - 16..len - 8], &[4, 3, 0, 0, 0, 0, 0xff, 0]);
        assert_eq!(&t[len - 8..], &[4, 1, 0, 0, 0, 0, 0xff, 1]);
    }

    #[test]
    fn vcpu_counts_are_bounded_and_the_table_ends_below_640_kib() {
        assert!(build(0).is_err());
        assert!(build(MAX_CPUS + 1).is_err());
        let (b, _) = build(MAX_CPUS).unwrap();
        assert!(START + b.len() as u64 <= 0xA_0000, "{} bytes run past 640 KiB", b.len());
        assert_eq!(sum(&b[16..]), 0);
    }
}
