//! A bounded, streaming tar reader: ustar, GNU long names and pax extended headers.
//!
//! Every field is checked: header checksums, octal and base-256 numbers, name lengths
//! (at most [`MAX_NAME`]), pax records (at most [`MAX_PAX`] bytes); paths are normalised
//! and `..` components refused. Nothing panics on garbage; errors name the byte offset.

use std::io::{self, Read};

/// Longest path or link target accepted.
pub const MAX_NAME: usize = 4096;
/// Largest pax extended header accepted.
pub const MAX_PAX: u64 = 1 << 20;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Hard link to `link`.
    Hardlink,
    /// Symbolic link to `link`.
    Symlink,
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Directory.
    Dir,
    /// FIFO.
    Fifo,
}

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Normalised relative path (no leading `/` or `./`, no `..`).
    pub path: String,
    /// Kind.
    pub kind: Kind,
    /// Permission and special bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: u64,
    /// Data size (regular files).
    pub size: u64,
    /// Link target (links).
    pub link: String,
    /// Device numbers.
    pub dev: (u32, u32),
    /// Extended attributes (pax `SCHILY.xattr.NAME` records), name and raw value.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

fn bad(offset: u64, msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("tar: at byte {offset}: {}", msg.into()))
}

/// A sparse member, refused: an image holds its files whole (the initramfs has no
/// holes), and expanding one is what a bomb of holes asks for.
fn sparse(offset: u64, name: &str) -> io::Error {
    bad(
        offset,
        format!(
            "{name:?} is a sparse file, which vmhost does not take from an archive; \
             re-create the archive without --sparse (-S)"
        ),
    )
}

/// Parses a numeric header field: octal text, or base-256 when the top bit is set.
fn number(field: &[u8], offset: u64, what: &str) -> io::Result<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = (field[0] & 0x7F) as u64;
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(b as u64))
                .ok_or_else(|| bad(offset, format!("{what} overflows")))?;
        }
        return Ok(v);
    }
    let text: Vec<u8> = field.iter().copied().take_while(|&b| b != 0).filter(|&b| b != b' ').collect();
    if text.is_empty() {
        return Ok(0);
    }
    let s = std::str::from_utf8(&text).map_err(|_| bad(offset, format!("{what} is not text")))?;
    u64::from_str_radix(s, 8).map_err(|_| bad(offset, format!("{what} {s:?} is not octal")))
}

fn text(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Checks a header's checksum (its bytes summed with the checksum field as spaces).
fn check_sum(h: &[u8; 512], offset: u64) -> io::Result<()> {
    let want = number(&h[148..156], offset, "checksum")?;
    let sum: u64 =
        h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { b as u64 }).sum();
    if want != sum {
        return Err(bad(offset, "header checksum mismatch (not a tar archive, or corrupt)"));
    }
    Ok(())
}

/// Normalises a member path; `None` for the archive root itself.
fn clean(path: &str, offset: u64) -> io::Result<Option<String>> {
    if path.len() > MAX_NAME {
        return Err(bad(offset, format!("path of {} bytes is too long", path.len())));
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(bad(offset, format!("path {path:?} escapes the archive"))),
            c => parts.push(c),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// The member paths of an uncompressed tar file as its ustar headers give them (long
/// names of GNU and pax headers are not followed), read header by header with a seek
/// over each member's data: a few reads per member whatever the archive's size, for
/// telling what an archive is without reading it. `f` returns false to stop early.
pub fn member_paths<R: Read + io::Seek>(
    r: &mut io::BufReader<R>,
    mut f: impl FnMut(&str) -> bool,
) -> io::Result<()> {
    let mut offset = io::Seek::stream_position(r)?;
    loop {
        let mut h = [0u8; 512];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        if h.iter().all(|&b| b == 0) {
            return Ok(());
        }
        check_sum(&h, offset)?;
        let size = number(&h[124..136], offset, "size")?;
        let mut name = text(&h[0..100]);
        if &h[257..263] == b"ustar\0" && h[345] != 0 {
            name = format!("{}/{}", text(&h[345..500]), name);
        }
        // Links, devices, directories and FIFOs have no data; everything else (files,
        // GNU and pax headers, GNU sparse members' stored parts) has `size` bytes.
        let data = if matches!(h[156], b'1'..=b'6') { 0 } else { size };
        if let Ok(Some(path)) = clean(&name, offset) {
            if !f(&path) {
                return Ok(());
            }
        }
        let skip = data.div_ceil(512).saturating_mul(512);
        offset = offset.saturating_add(512).saturating_add(skip);
        // Within the buffer when the member is small: no system call.
        r.seek_relative(i64::try_from(skip).map_err(|_| bad(offset, "member size out of range"))?)?;
    }
}

/// A hard link's target as a member path (normalised as member paths are); `None` when
/// it names the root or leaves the archive.
pub fn normalise_link(link: &str) -> Option<String> {
    clean(link, 0).ok().flatten()
}

struct Counting<R> {
    r: R,
    pos: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tar: archive ends inside a member"));
    }
    Ok(())
}

fn read_small(r: &mut impl Read, size: u64, limit: u64, offset: u64, what: &str) -> io::Result<Vec<u8>> {
    if size > limit {
        return Err(bad(offset, format!("{what} of {size} bytes is larger than {limit}")));
    }
    let mut v = vec![0u8; size as usize];
    r.read_exact(&mut v).map_err(|_| bad(offset, format!("archive ends inside a {what}")))?;
    skip(r, (512 - size % 512) % 512)?;
    Ok(v)
}

/// Reads every member, calling `f` with its metadata and a reader over its data
/// (regular files only; others get an empty reader). Unread data is skipped.
pub fn read(r: impl Read, mut f: impl FnMut(&Entry, &mut dyn Read) -> io::Result<()>) -> io::Result<()> {
    let mut r = Counting { r, pos: 0 };
    let mut long_name: Option<String> = None;
    let mut long_link: Option<String> = None;
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let mut zero_blocks = 0;
    loop {
        let offset = r.pos;
        let mut h = [0u8; 512];
        let mut got = 0;
        while got < 512 {
            match r.read(&mut h[got..])? {
                0 if got == 0 && offset > 0 => return Ok(()), // no end marker: tolerated
                0 => return Err(bad(offset, "archive ends inside a header")),
                n => got += n,
            }
        }
        if h.iter().all(|&b| b == 0) {
            zero_blocks += 1;
            if zero_blocks == 2 {
                return Ok(());
            }
            continue;
        }
        zero_blocks = 0;
        check_sum(&h, offset)?;
        let size = number(&h[124..136], offset, "size")?;
        let typeflag = h[156];
        match typeflag {
            b'L' => {
                long_name = Some(text(&read_small(&mut r, size, MAX_NAME as u64 + 1, offset, "long name")?));
                continue;
            }
            b'K' => {
                long_link = Some(text(&read_small(&mut r, size, MAX_NAME as u64 + 1, offset, "long link")?));
                continue;
            }
            b'x' => {
                pax = parse_pax(&read_small(&mut r, size, MAX_PAX, offset, "pax header")?, offset)?;
                continue;
            }
            b'g' => {
                read_small(&mut r, size, MAX_PAX, offset, "pax global header")?;
                continue;
            }
            _ => {}
        }
        let ustar = &h[257..263] == b"ustar\0" || &h[257..263] == b"ustar ";
        let mut name = text(&h[0..100]);
        if ustar && h[345] != 0 && &h[257..263] == b"ustar\0" {
            name = format!("{}/{}", text(&h[345..500]), name);
        }
        let mut link = text(&h[157..257]);
        let mut size = size;
        let mut mtime = number(&h[136..148], offset, "mtime")?;
        let mut uid = number(&h[108..116], offset, "uid")?.min(u32::MAX as u64) as u32;
        let mut gid = number(&h[116..124], offset, "gid")?.min(u32::MAX as u64) as u32;
        let mut xattrs = Vec::new();
        if let Some(n) = long_name.take() {
            name = n;
        }
        if let Some(l) = long_link.take() {
            link = l;
        }
        for (k, v) in pax.drain(..) {
            // PAX sparse members (GNU tar --sparse --format=pax): their data starts with
            // a map and holds only the non-hole parts. Taken as they are they would be
            // files with the wrong name and content.
            if k.starts_with("GNU.sparse.") {
                return Err(sparse(offset, &name));
            }
            let text = || String::from_utf8_lossy(&v).into_owned();
            let num = |what: &str| -> io::Result<u64> {
                String::from_utf8_lossy(&v)
                    .parse()
                    .map_err(|_| bad(offset, format!("pax {what} is not a number")))
            };
            match k.as_str() {
                "path" => name = text(),
                "linkpath" => link = text(),
                "size" => size = num("size")?,
                "mtime" => mtime = text().split('.').next().and_then(|s| s.parse().ok()).unwrap_or(mtime),
                "uid" => uid = num("uid")?.min(u32::MAX as u64) as u32,
                "gid" => gid = num("gid")?.min(u32::MAX as u64) as u32,
                _ => {
                    if let Some(attr) = k.strip_prefix("SCHILY.xattr.") {
                        xattrs.push((attr.to_string(), v));
                    }
                }
            }
        }
        let kind = match typeflag {
            b'0' | 0 | b'7' => Kind::File,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            b'S' => return Err(sparse(offset, &name)),
            other => {
                log::warn!("tar: skipping member {name:?} of unknown type {:?}", other as char);
                skip(&mut r, size.div_ceil(512) * 512)?;
                continue;
            }
        };
        let kind = if kind == Kind::File && name.ends_with('/') { Kind::Dir } else { kind };
        let data_size = if kind == Kind::File { size } else { 0 };
        let Some(path) = clean(&name, offset)? else {
            skip(&mut r, data_size.div_ceil(512) * 512)?;
            continue;
        };
        if link.len() > MAX_NAME {
            return Err(bad(offset, "link target too long"));
        }
        let entry = Entry {
            path,
            kind,
            mode: number(&h[100..108], offset, "mode")? as u32 & 0o7777,
            uid,
            gid,
            mtime,
            size: data_size,
            link,
            dev: (
                number(&h[329..337], offset, "devmajor")? as u32,
                number(&h[337..345], offset, "devminor")? as u32,
            ),
            xattrs,
        };
        let mut data = (&mut r).take(data_size);
        f(&entry, &mut data)?;
        let left = data.limit();
        skip(&mut r, left + (512 - data_size % 512) % 512)?;
    }
}

/// Parses pax records: `"<len> <key>=<value>\n"`.
fn parse_pax(mut b: &[u8], offset: u64) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    while !b.is_empty() && b[0] != 0 {
        let sp = b.iter().position(|&c| c == b' ').ok_or_else(|| bad(offset, "bad pax record"))?;
        let len: usize = std::str::from_utf8(&b[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(offset, "bad pax record length"))?;
        if len <= sp + 1 || len > b.len() {
            return Err(bad(offset, "pax record length out of range"));
        }
        let rec = &b[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(eq) = rec.iter().position(|&c| c == b'=') {
            out.push((String::from_utf8_lossy(&rec[..eq]).into_owned(), rec[eq + 1..].to_vec()));
        }
        b = &b[len..];
    }
    Ok(out)
}

/// A ustar header for tests that write archives by hand.
#[cfg(test)]
pub(crate) fn ustar_header(
    name: &str,
    flag: u8,
    mode: u32,
    size: u64,
    link: &str,
    uid: u32,
    mtime: u64,
) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let mut oct = |at: usize, len: usize, v: u64| {
        h[at..at + len].copy_from_slice(format!("{v:0width$o}\0", width = len - 1).as_bytes());
    };
    oct(100, 8, mode as u64);
    oct(108, 8, uid as u64);
    oct(116, 8, uid as u64);
    oct(124, 12, size);
    oct(136, 12, mtime);
    h[156] = flag;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, typeflag: u8, size: u64, link: &str) -> [u8; 512] {
        ustar_header(name, typeflag, 0o644, size, link, 0, 0)
    }

    #[test]
    fn reads_members_and_refuses_garbage() {
        let mut t = Vec::new();
        t.extend_from_slice(&header("./etc/", b'5', 0, ""));
        t.extend_from_slice(&header("etc/hostname", b'0', 3, ""));
        t.extend_from_slice(b"vm\n");
        t.extend_from_slice(&[0u8; 509]);
        t.extend_from_slice(&header("bin/sh", b'2', 0, "busybox"));
        t.extend_from_slice(&[0u8; 1024]);
        let mut seen = Vec::new();
        read(&t[..], |e, data| {
            let mut s = String::new();
            data.read_to_string(&mut s)?;
            seen.push((e.path.clone(), e.kind, s, e.link.clone()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen[0], ("etc".into(), Kind::Dir, String::new(), String::new()));
        assert_eq!(seen[1], ("etc/hostname".into(), Kind::File, "vm\n".into(), String::new()));
        assert_eq!(seen[2], ("bin/sh".into(), Kind::Symlink, String::new(), "busybox".into()));

        let mut corrupt = t.clone();
        corrupt[600] ^= 0xFF; // inside the second header
        assert!(read(&corrupt[..], |_, _| Ok(())).is_err());
        assert!(read(&b"this is not a tar file at all"[..], |_, _| Ok(())).is_err());
        assert!(read(&t[..700], |_, _| Ok(())).is_err());
        let evil = header("../../etc/passwd", b'0', 0, "");
        assert!(read(&evil[..], |_, _| Ok(())).is_err());
    }

    #[test]
    fn sparse_members_are_refused_not_dropped() {
        // Old GNU sparse ('S').
        let mut t = header("big", b'S', 0, "").to_vec();
        t.extend_from_slice(&[0u8; 1024]);
        let e = read(&t[..], |_, _| Ok(())).unwrap_err().to_string();
        assert!(e.contains("\"big\" is a sparse file") && e.contains("without --sparse"), "{e}");
        // PAX 1.0 sparse: an 'x' header with GNU.sparse.* keys, then a '0' member.
        let rec = |k: &str, v: &str| {
            let body = format!(" {k}={v}\n");
            let mut n = body.len() + 1;
            while body.len() + n.to_string().len() != n {
                n = body.len() + n.to_string().len();
            }
            format!("{n}{body}")
        };
        let pax = format!("{}{}", rec("GNU.sparse.major", "1"), rec("GNU.sparse.name", "big"));
        let mut t = header("./GNUSparseFile.1/big", b'x', pax.len() as u64, "").to_vec();
        t.extend_from_slice(pax.as_bytes());
        t.resize(1024, 0);
        t.extend_from_slice(&header("./GNUSparseFile.1/big", b'0', 0, ""));
        t.extend_from_slice(&[0u8; 1024]);
        let e = read(&t[..], |_, _| Ok(())).unwrap_err().to_string();
        assert!(e.contains("is a sparse file"), "{e}");
    }
}
