//! Just enough ELF reading for kernels and kernel modules: the section holding a
//! module's `.modinfo` strings, and whether a file is an ELF at all. Every offset is
//! bounds-checked; nothing panics on garbage.

use byteorder::{ByteOrder, LittleEndian as LE};

/// Whether `data` starts like a 64-bit little-endian ELF.
pub fn is_elf64(data: &[u8]) -> bool {
    data.len() >= 64 && &data[..4] == b"\x7fELF" && data[4] == 2 && data[5] == 1
}

/// Whether a 64-bit ELF has a program interpreter (is dynamically linked).
pub fn has_interp(data: &[u8]) -> bool {
    if !is_elf64(data) {
        return false;
    }
    let phoff = LE::read_u64(&data[32..40]) as usize;
    let phentsize = LE::read_u16(&data[54..56]) as usize;
    let phnum = LE::read_u16(&data[56..58]) as usize;
    (0..phnum).any(|i| {
        let off = phoff.saturating_add(i.saturating_mul(phentsize));
        data.get(off..off.saturating_add(4)).is_some_and(|t| LE::read_u32(t) == 3)
        // PT_INTERP
    })
}

/// A loadable segment (PT_LOAD) of a 64-bit ELF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Where the file bytes start.
    pub offset: u64,
    /// How many bytes the file holds for it.
    pub file_size: u64,
    /// Its physical load address.
    pub paddr: u64,
    /// Its size in memory (the rest past `file_size` is zeros).
    pub mem_size: u64,
}

/// The program headers of a 64-bit ELF: (type, offset, file size, paddr, mem size);
/// None when they do not lie within `data`.
fn program_headers(data: &[u8]) -> Option<Vec<(u32, Segment)>> {
    if !is_elf64(data) {
        return None;
    }
    let phoff = LE::read_u64(&data[32..40]) as usize;
    let phentsize = LE::read_u16(&data[54..56]) as usize;
    let phnum = LE::read_u16(&data[56..58]) as usize;
    if phentsize < 56 {
        return None;
    }
    let mut out = Vec::with_capacity(phnum);
    for i in 0..phnum {
        let off = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let h = data.get(off..off.checked_add(56)?)?;
        let seg = Segment {
            offset: LE::read_u64(&h[8..16]),
            paddr: LE::read_u64(&h[24..32]),
            file_size: LE::read_u64(&h[32..40]),
            mem_size: LE::read_u64(&h[40..48]),
        };
        out.push((LE::read_u32(&h[0..4]), seg));
    }
    Some(out)
}

/// The loadable segments, each checked to lie within `data` and to fit its memory
/// size; None for anything else.
pub fn load_segments(data: &[u8]) -> Option<Vec<Segment>> {
    let mut out = Vec::new();
    for (ty, seg) in program_headers(data)? {
        if ty != 1 {
            continue; // PT_LOAD only
        }
        let end = seg.offset.checked_add(seg.file_size)?;
        if end > data.len() as u64
            || seg.file_size > seg.mem_size
            || seg.paddr.checked_add(seg.mem_size).is_none()
        {
            return None;
        }
        out.push(seg);
    }
    Some(out)
}

/// The 32-bit PVH entry point of a kernel: the Xen ELF note
/// `XEN_ELFNOTE_PHYS32_ENTRY` (type 18, name "Xen") in a PT_NOTE segment.
pub fn pvh_entry(data: &[u8]) -> Option<u32> {
    for (ty, seg) in program_headers(data)? {
        if ty != 4 {
            continue; // PT_NOTE
        }
        let notes = data.get(seg.offset as usize..(seg.offset.checked_add(seg.file_size)? as usize))?;
        let mut at = 0usize;
        while at + 12 <= notes.len() {
            let namesz = LE::read_u32(&notes[at..at + 4]) as usize;
            let descsz = LE::read_u32(&notes[at + 4..at + 8]) as usize;
            let nty = LE::read_u32(&notes[at + 8..at + 12]);
            let name_at = at + 12;
            let desc_at = name_at.checked_add(namesz.checked_add(3)? & !3)?;
            let next = desc_at.checked_add(descsz.checked_add(3)? & !3)?;
            let name = notes.get(name_at..name_at.checked_add(namesz)?)?;
            if nty == 18 && name.strip_suffix(b"\0").unwrap_or(name) == b"Xen" {
                let desc = notes.get(desc_at..desc_at.checked_add(descsz)?)?;
                return match descsz {
                    4 => Some(LE::read_u32(desc)),
                    8 => u32::try_from(LE::read_u64(desc)).ok(),
                    _ => None,
                };
            }
            at = next;
        }
    }
    None
}

/// The contents of the section named `name`, if present.
pub fn section<'a>(data: &'a [u8], name: &str) -> Option<&'a [u8]> {
    if !is_elf64(data) {
        return None;
    }
    let shoff = LE::read_u64(&data[40..48]) as usize;
    let shentsize = LE::read_u16(&data[58..60]) as usize;
    let shnum = LE::read_u16(&data[60..62]) as usize;
    let shstrndx = LE::read_u16(&data[62..64]) as usize;
    if shentsize < 64 {
        return None;
    }
    let header = |i: usize| -> Option<&[u8]> {
        let off = shoff.checked_add(i.checked_mul(shentsize)?)?;
        data.get(off..off.checked_add(64)?)
    };
    let range = |h: &[u8]| -> Option<(usize, usize)> {
        let off = LE::read_u64(&h[24..32]) as usize;
        let size = LE::read_u64(&h[32..40]) as usize;
        Some((off, off.checked_add(size)?))
    };
    let (s0, s1) = range(header(shstrndx)?)?;
    let names = data.get(s0..s1)?;
    for i in 0..shnum {
        let h = header(i)?;
        let name_off = LE::read_u32(&h[0..4]) as usize;
        let n = names.get(name_off..)?;
        let end = n.iter().position(|&b| b == 0)?;
        if &n[..end] == name.as_bytes() {
            let (a, b) = range(h)?;
            return data.get(a..b);
        }
    }
    None
}

/// The `key=value` strings of a module's `.modinfo` section.
pub fn modinfo(data: &[u8]) -> Vec<(String, String)> {
    let Some(sec) = section(data, ".modinfo") else { return Vec::new() };
    sec.split(|&b| b == 0)
        .filter_map(|kv| {
            let s = std::str::from_utf8(kv).ok()?;
            let (k, v) = s.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// The smallest static x86-64 program: `exit(0)`, 129 bytes. As a guest's `/init` it
/// gives a bare boot (the kernel reaches init, which ends at once) to measure against,
/// and a guest that fails to boot (the kernel panics: "Attempted to kill init").
pub fn exit_program() -> Vec<u8> {
    let code: [u8; 9] = [0xb8, 0x3c, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05]; // mov eax,60; xor edi,edi; syscall
    let base: u64 = 0x400000;
    let size = (64 + 56 + code.len()) as u64;
    let mut e = Vec::with_capacity(size as usize);
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(base + 64 + 56).to_le_bytes()); // entry: the code
    e.extend_from_slice(&64u64.to_le_bytes()); // program headers right after
    e.extend_from_slice(&0u64.to_le_bytes()); // no sections
    e.extend_from_slice(&0u32.to_le_bytes());
    e.extend_from_slice(&64u16.to_le_bytes());
    e.extend_from_slice(&56u16.to_le_bytes());
    e.extend_from_slice(&1u16.to_le_bytes());
    e.extend_from_slice(&[0; 6]);
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    e.extend_from_slice(&0u64.to_le_bytes());
    e.extend_from_slice(&base.to_le_bytes());
    e.extend_from_slice(&base.to_le_bytes());
    e.extend_from_slice(&size.to_le_bytes());
    e.extend_from_slice(&size.to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(&code);
    e
}

/// A 64-bit ELF "kernel" for tests and benchmarks of the kvm backend: one PT_LOAD of
/// `code` at `paddr` (with 4 KiB of bss after it), and the PVH entry note pointing at
/// its first byte, where the vCPU starts in 32-bit protected mode.
pub fn pvh_program(code: &[u8], paddr: u64) -> Vec<u8> {
    let (phoff, note_off, code_off) = (64u64, 176u64, 200u64);
    let mut f = vec![0u8; code_off as usize];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little-endian
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes());
    f[32..40].copy_from_slice(&phoff.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&2u16.to_le_bytes());
    let ph = |ty: u32, off: u64, addr: u64, size: u64, mem_size: u64| {
        let mut h = vec![0u8; 56];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[4..8].copy_from_slice(&5u32.to_le_bytes());
        h[8..16].copy_from_slice(&off.to_le_bytes());
        h[16..24].copy_from_slice(&addr.to_le_bytes());
        h[24..32].copy_from_slice(&addr.to_le_bytes());
        h[32..40].copy_from_slice(&size.to_le_bytes());
        h[40..48].copy_from_slice(&mem_size.to_le_bytes());
        h[48..56].copy_from_slice(&4u64.to_le_bytes()); // alignment (QEMU's loader divides by it)
        h
    };
    let len = code.len() as u64;
    f[64..120].copy_from_slice(&ph(1, code_off, paddr, len, len + 4096)); // and some bss
    f[120..176].copy_from_slice(&ph(4, note_off, 0, 20, 20));
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&18u32.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(paddr as u32).to_le_bytes());
    f[note_off as usize..note_off as usize + 20].copy_from_slice(&note);
    f.extend_from_slice(code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pvh_program_has_its_entry_note_and_one_segment() {
        let p = pvh_program(&[0xF4, 0x90], 0x20_0000);
        assert_eq!(pvh_entry(&p), Some(0x20_0000));
        let segs = load_segments(&p).unwrap();
        assert_eq!(segs.len(), 1);
        let s = segs[0];
        assert_eq!((s.paddr, s.file_size, s.mem_size), (0x20_0000, 2, 2 + 4096));
        assert_eq!(&p[s.offset as usize..], &[0xF4, 0x90]);
    }

    #[test]
    fn garbage_is_not_elf_and_never_panics() {
        assert!(!is_elf64(b"hello"));
        assert!(section(b"\x7fELF", ".modinfo").is_none());
        let mut fake = vec![0u8; 64];
        fake[..6].copy_from_slice(b"\x7fELF\x02\x01");
        fake[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        fake[58..60].copy_from_slice(&64u16.to_le_bytes());
        fake[60..62].copy_from_slice(&3u16.to_le_bytes());
        assert!(section(&fake, ".modinfo").is_none());
        assert!(modinfo(&fake).is_empty());
        assert!(!has_interp(&fake));
    }
}
