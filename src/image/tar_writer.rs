//! A streaming tar writer: ustar headers, with pax extended headers for what ustar cannot
//! hold (long paths and link targets, large sizes and ids, extended attributes), as
//! docker and BuildKit write image layers. It takes the reader's [`Entry`], so what
//! [`super::tar::read`] reads back is what was written.
//!
//! ```
//! use vmhost::image::tar::{self, Entry, Kind};
//! use vmhost::image::tar_writer::Writer;
//!
//! let mut w = Writer::new(Vec::new());
//! let file = Entry { path: "etc/motd".into(), kind: Kind::File, mode: 0o644, uid: 0, gid: 0,
//!     mtime: 0, size: 3, link: String::new(), dev: (0, 0), xattrs: vec![] };
//! w.entry(&file, &mut &b"hi\n"[..]).unwrap();
//! let archive = w.finish().unwrap();
//! tar::read(&archive[..], |e, _| { assert_eq!(e.path, "etc/motd"); Ok(()) }).unwrap();
//! ```

use std::io::{self, Read, Write};

use super::tar::{Entry, Kind};

/// Writes tar members to `W`; [`Writer::finish`] writes the end marker.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    written: u64,
}

/// The largest value a ustar octal field of `len` bytes holds (`len - 1` digits).
fn octal_max(len: usize) -> u64 {
    (1u64 << (3 * (len - 1) as u32)) - 1
}

fn put_octal(h: &mut [u8; 512], at: usize, len: usize, v: u64) {
    let s = format!("{v:0width$o}\0", width = len - 1);
    h[at..at + len].copy_from_slice(s.as_bytes());
}

/// One pax record: `"<len> <key>=<value>\n"`, the length counting itself.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

impl<W: Write> Writer<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> Writer<W> {
        Writer { out, written: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let pad = ((512 - size % 512) % 512) as usize;
        self.put(&[0u8; 512][..pad])
    }

    /// Writes one member. A regular file's data is `e.size` bytes of `data`; a reader
    /// that ends early is an error (the archive is then unusable), more is not read.
    pub fn entry(&mut self, e: &Entry, data: &mut dyn Read) -> io::Result<()> {
        let mut path = e.path.clone();
        if e.kind == Kind::Dir && !path.ends_with('/') {
            path.push('/');
        }
        let size = if e.kind == Kind::File { e.size } else { 0 };
        let mut pax = Vec::new();
        let mut h = [0u8; 512];
        // The name in ustar's two fields where it fits (prefix / name), else in pax.
        let (prefix, name) = split_name(&path);
        match (prefix, name) {
            (Some(p), n) => {
                h[345..345 + p.len()].copy_from_slice(p.as_bytes());
                h[..n.len()].copy_from_slice(n.as_bytes());
            }
            (None, _) => {
                pax_record(&mut pax, "path", path.as_bytes());
                let cut = floor_char_boundary(&path, 99);
                h[..cut].copy_from_slice(&path.as_bytes()[..cut]);
            }
        }
        put_octal(&mut h, 100, 8, (e.mode & 0o7777) as u64);
        for (at, v, key) in [(108, e.uid as u64, "uid"), (116, e.gid as u64, "gid")] {
            if v > octal_max(8) {
                pax_record(&mut pax, key, v.to_string().as_bytes());
                put_octal(&mut h, at, 8, 0);
            } else {
                put_octal(&mut h, at, 8, v);
            }
        }
        if size > octal_max(12) {
            pax_record(&mut pax, "size", size.to_string().as_bytes());
            put_octal(&mut h, 124, 12, 0);
        } else {
            put_octal(&mut h, 124, 12, size);
        }
        if e.mtime > octal_max(12) {
            pax_record(&mut pax, "mtime", e.mtime.to_string().as_bytes());
            put_octal(&mut h, 136, 12, 0);
        } else {
            put_octal(&mut h, 136, 12, e.mtime);
        }
        h[156] = match e.kind {
            Kind::File => b'0',
            Kind::Hardlink => b'1',
            Kind::Symlink => b'2',
            Kind::Char => b'3',
            Kind::Block => b'4',
            Kind::Dir => b'5',
            Kind::Fifo => b'6',
        };
        if matches!(e.kind, Kind::Hardlink | Kind::Symlink) {
            if e.link.len() > 100 {
                pax_record(&mut pax, "linkpath", e.link.as_bytes());
            } else {
                h[157..157 + e.link.len()].copy_from_slice(e.link.as_bytes());
            }
        }
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        if matches!(e.kind, Kind::Char | Kind::Block) {
            put_octal(&mut h, 329, 8, e.dev.0 as u64);
            put_octal(&mut h, 337, 8, e.dev.1 as u64);
        }
        let mut xattrs = e.xattrs.clone();
        xattrs.sort();
        for (k, v) in &xattrs {
            pax_record(&mut pax, &format!("SCHILY.xattr.{k}"), v);
        }
        if !pax.is_empty() {
            let mut x = [0u8; 512];
            let name = "PaxHeaders/entry";
            x[..name.len()].copy_from_slice(name.as_bytes());
            put_octal(&mut x, 100, 8, 0o644);
            put_octal(&mut x, 108, 8, 0);
            put_octal(&mut x, 116, 8, 0);
            put_octal(&mut x, 124, 12, pax.len() as u64);
            put_octal(&mut x, 136, 12, 0);
            x[156] = b'x';
            x[257..263].copy_from_slice(b"ustar\0");
            x[263..265].copy_from_slice(b"00");
            checksum(&mut x);
            self.put(&x)?;
            self.put(&pax)?;
            self.pad(pax.len() as u64)?;
        }
        checksum(&mut h);
        self.put(&h)?;
        if size > 0 {
            let copied = io::copy(&mut data.take(size), &mut CountingWrite(self))?;
            if copied != size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{}: {copied} bytes of data, the header said {size}", e.path),
                ));
            }
            self.pad(size)?;
        }
        Ok(())
    }

    /// Writes the end marker (two zero blocks) and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.put(&[0u8; 1024])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Counts what goes through to the writer.
struct CountingWrite<'a, W: Write>(&'a mut Writer<W>);

impl<W: Write> Write for CountingWrite<'_, W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.0.out.write(b)?;
        self.0.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.out.flush()
    }
}

/// A tar writer as the sink of a root's entries ([`crate::image::rootfs::RootSink`]):
/// a root filesystem (a directory, a tar, the default image) as an image layer.
#[derive(Debug)]
pub struct LayerSink<W: Write> {
    /// The writer.
    pub tar: Writer<W>,
    first_names: std::collections::HashMap<(u64, u64), String>,
}

impl<W: Write> LayerSink<W> {
    /// A sink writing to `tar`.
    pub fn new(tar: Writer<W>) -> LayerSink<W> {
        LayerSink { tar, first_names: Default::default() }
    }

    fn entry(name: &str, kind: Kind, meta: &super::cpio::Meta) -> Entry {
        Entry {
            path: name.trim_start_matches('/').to_string(),
            kind,
            mode: meta.mode & 0o7777,
            uid: meta.uid,
            gid: meta.gid,
            mtime: meta.mtime as u64,
            size: 0,
            link: String::new(),
            dev: meta.rdev,
            xattrs: Vec::new(),
        }
    }

    fn link(&mut self, name: &str, target: &str) -> io::Result<()> {
        let mut e = Self::entry(name, Kind::Hardlink, &super::cpio::Meta::root(0));
        e.link = target.trim_start_matches("./").trim_start_matches('/').to_string();
        self.tar.entry(&e, &mut io::empty())
    }
}

impl<W: Write> super::rootfs::RootSink for LayerSink<W> {
    fn dir(&mut self, name: &str, meta: super::cpio::Meta) -> io::Result<()> {
        self.tar.entry(&Self::entry(name, Kind::Dir, &meta), &mut io::empty())
    }
    fn file_from(
        &mut self,
        name: &str,
        meta: super::cpio::Meta,
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        let e = Entry { size, ..Self::entry(name, Kind::File, &meta) };
        self.tar.entry(&e, data)
    }
    fn hard_link(&mut self, name: &str, key: (u64, u64)) -> io::Result<bool> {
        let Some(first) = self.first_names.get(&key).cloned() else { return Ok(false) };
        self.link(name, &first)?;
        Ok(true)
    }
    fn hard_link_to(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.link(name, target)
    }
    fn linked_file_from(
        &mut self,
        name: &str,
        meta: super::cpio::Meta,
        key: (u64, u64),
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        self.first_names.insert(key, name.trim_start_matches('/').to_string());
        self.file_from(name, meta, size, data)
    }
    fn symlink(&mut self, name: &str, meta: super::cpio::Meta, target: &str) -> io::Result<()> {
        let e = Entry { link: target.to_string(), ..Self::entry(name, Kind::Symlink, &meta) };
        self.tar.entry(&e, &mut io::empty())
    }
    fn special(&mut self, name: &str, meta: super::cpio::Meta) -> io::Result<()> {
        use super::cpio::{S_IFBLK, S_IFCHR, S_IFIFO};
        let kind = match meta.mode & 0o170000 {
            m if m == S_IFCHR => Kind::Char,
            m if m == S_IFBLK => Kind::Block,
            m if m == S_IFIFO => Kind::Fifo,
            _ => return Ok(()), // sockets and the like are not kept
        };
        self.tar.entry(&Self::entry(name, kind, &meta), &mut io::empty())
    }
}

/// The largest index at most `max` that is a char boundary of `s`.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut i = max.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Splits `path` into ustar's prefix (at most 155 bytes) and name (at most 100), at a
/// `/`; `(None, _)` when it cannot be split so.
fn split_name(path: &str) -> (Option<&str>, &str) {
    if path.len() <= 100 {
        return (Some(""), path);
    }
    // The name part may end with the `/` of a directory: split before it.
    let body = path.strip_suffix('/').unwrap_or(path);
    for (i, _) in body.match_indices('/') {
        let (p, n) = (&path[..i], &path[i + 1..]);
        if p.len() <= 155 && n.len() <= 100 && !n.is_empty() {
            return (Some(p), n);
        }
    }
    (None, path)
}

fn checksum(h: &mut [u8; 512]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::tar;

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            size: 0,
            link: String::new(),
            dev: (0, 0),
            xattrs: vec![],
        }
    }

    #[test]
    fn what_is_written_reads_back_whole() {
        let long_dir = "d".repeat(120);
        let long_name = format!("{long_dir}/{}", "f".repeat(90));
        let very_long = format!("{}/{}", "a".repeat(200), "b".repeat(150));
        let mut file = entry("etc/motd", Kind::File);
        file.size = 5;
        file.mode = 0o4644;
        file.uid = 3_000_000; // past ustar's 7 octal digits
        file.gid = 1000;
        file.xattrs = vec![
            ("user.note".into(), b"a\nb=c".to_vec()),
            ("security.capability".into(), vec![0, 1, 2, 255]),
        ];
        let mut link = entry("etc/motd.link", Kind::Symlink);
        link.link = "x".repeat(300);
        let mut hard = entry("etc/motd.hard", Kind::Hardlink);
        hard.link = "etc/motd".into();
        let mut dev = entry("dev/null", Kind::Char);
        dev.dev = (1, 3);
        let mut big = entry(&long_name, Kind::File);
        big.size = 1000;
        let entries = vec![
            entry("etc", Kind::Dir),
            file,
            link,
            hard,
            dev,
            entry("fifo", Kind::Fifo),
            big,
            entry(&very_long, Kind::Dir),
        ];
        let mut w = Writer::new(Vec::new());
        for e in &entries {
            let data = vec![7u8; e.size as usize];
            w.entry(e, &mut &data[..]).unwrap();
        }
        let written = w.written();
        let archive = w.finish().unwrap();
        assert_eq!(archive.len() as u64, written + 1024);
        assert_eq!(archive.len() % 512, 0);
        let mut back = Vec::new();
        tar::read(&archive[..], |e, data| {
            let mut d = Vec::new();
            data.read_to_end(&mut d)?;
            assert_eq!(d, vec![7u8; e.size as usize]);
            let mut e = e.clone();
            e.xattrs.sort();
            back.push(e);
            Ok(())
        })
        .unwrap();
        let mut want = entries.clone();
        for e in &mut want {
            e.xattrs.sort();
        }
        assert_eq!(back, want);
    }

    #[test]
    fn a_short_reader_is_an_error_not_a_bad_archive() {
        let mut e = entry("f", Kind::File);
        e.size = 10;
        let mut w = Writer::new(Vec::new());
        let err = w.entry(&e, &mut &b"abc"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn pax_record_lengths_count_themselves() {
        for n in [0, 1, 5, 6, 7, 90, 95, 96, 97, 98, 990, 995] {
            let mut out = Vec::new();
            pax_record(&mut out, "k", &vec![b'v'; n]);
            let sp = out.iter().position(|&b| b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&out[..sp]).unwrap().parse().unwrap();
            assert_eq!(len, out.len(), "value of {n}");
        }
    }
}
