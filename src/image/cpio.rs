//! A cpio "newc" writer: the format the kernel unpacks an initramfs from.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields),
//! the NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes. The
//! archive ends with an entry named `TRAILER!!!`.
//!
//! Hard links come two ways:
//!
//! - A file known to have several names when its first one is written (a directory
//!   image's, by its link count: [`Writer::linked_file_from`]) is archived as the kernel
//!   unpacks hard links: every name an entry with the same inode number and a link count
//!   of two or more, the first carrying the data ([`Writer::hard_link`]). Each later name
//!   costs the kernel a link, an open, a chown, a chmod and a close: busybox's ~270
//!   applet names ~17 ms under TCG. But the kernel unpacks the initramfs as async work,
//!   which on a guest with two vCPUs runs on the second while the first goes on with
//!   its start-up, and ends well before that (40-70 ms): there the links cost nothing.
//!   (With one vCPU they cost about what the agent's link(2) calls would.)
//! - A name given as a link to an entry already written as a plain file (a tar hard
//!   link, [`Writer::hard_link_to`]) cannot be archived so, since the kernel links only
//!   to an entry whose own link count said so. Those are listed in [`crate::contract::LINKS_FILE`]
//!   (`TARGET\0NAME\0` for each, both relative to the root), and the agent makes them
//!   with `link(2)` before anything runs in the guest (`crate::agent::init`).

use std::io::{self, Write};

/// File type bits of `mode`.
pub const S_IFDIR: u32 = 0o040000;
/// Regular file.
pub const S_IFREG: u32 = 0o100000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120000;
/// Character device.
pub const S_IFCHR: u32 = 0o020000;
/// Block device.
pub const S_IFBLK: u32 = 0o060000;
/// FIFO.
pub const S_IFIFO: u32 = 0o010000;

/// Metadata of one archive entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Type and permission bits (POSIX).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, Unix seconds.
    pub mtime: u32,
    /// Device number for device nodes (major, minor).
    pub rdev: (u32, u32),
}

impl Meta {
    /// Root-owned metadata with `mode`.
    pub fn root(mode: u32) -> Meta {
        Meta { mode, uid: 0, gid: 0, mtime: 0, rdev: (0, 0) }
    }
}

/// Writes a newc archive to `W`.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    ino: u32,
    written: u64,
    /// The first entry of each multiply-linked file, by the caller's key for it: its
    /// inode number and metadata, which its other names' entries repeat.
    first_names: std::collections::HashMap<(u64, u64), (u32, Meta)>,
    /// Hard links for the guest to make: (existing name, new name).
    links: Vec<(String, String)>,
    /// Names the caller writes later itself, and the prefix image entries of those
    /// names get instead ([`reserve`](Self::reserve)).
    reserved: Vec<String>,
    alias: String,
    /// The most bytes this archive may take, and what to say when an entry would pass it.
    limit: (u64, String),
}

/// A newc header's fixed part: the magic and 13 fields of 8 hex digits.
const HEADER_LEN: u64 = 110;

/// An archive that would grow past its writer's limit ([`Writer::set_limit`]).
#[derive(Debug)]
pub struct TooLarge {
    /// The entry that would have passed the limit.
    pub name: String,
    /// The limit, in bytes.
    pub limit: u64,
    /// What the limit is and what to do.
    pub why: String,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: the image grows past {} MiB here; {}", self.name, self.limit >> 20, self.why)
    }
}

impl std::error::Error for TooLarge {}

impl<W: Write> Writer<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> Writer<W> {
        Writer {
            out,
            ino: 1,
            written: 0,
            first_names: std::collections::HashMap::new(),
            links: Vec::new(),
            reserved: Vec::new(),
            alias: String::new(),
            limit: (u64::MAX, String::new()),
        }
    }

    /// Bounds the archive to `bytes`: an entry that would pass it fails with
    /// [`TooLarge`] (saying `why`) before any of its data is read, so a member that
    /// claims terabytes, or a compressed archive that expands without end, costs nothing.
    pub fn set_limit(&mut self, bytes: u64, why: impl Into<String>) {
        self.limit = (bytes, why.into());
    }

    /// Fails when `more` bytes for `name` would pass the limit.
    fn room_for(&self, name: &str, more: u64) -> io::Result<()> {
        if self.written.saturating_add(more) <= self.limit.0 {
            return Ok(());
        }
        let e = TooLarge { name: name.to_string(), limit: self.limit.0, why: self.limit.1.clone() };
        Err(io::Error::other(e))
    }

    /// Reserves `names` for entries the caller writes after an image (the agent's
    /// `init`): until [`release`](Self::release), an entry of such a name is written
    /// under `alias` + its name instead (`alias` is a path prefix whose directory must
    /// exist already), and links to or from it follow. Otherwise an image's own `init`,
    /// were it a hard link to busybox, would be linked by the kernel and the caller's
    /// entry then written over busybox and all its names; and dropping it would lose
    /// the data its other names share.
    pub fn reserve(&mut self, names: &[&str], alias: &str) {
        self.reserved = names.iter().map(|n| n.trim_start_matches('/').to_string()).collect();
        self.alias = alias.to_string();
    }

    /// Ends [`reserve`](Self::reserve): the caller writes its own entries now.
    pub fn release(&mut self) {
        self.reserved.clear();
    }

    /// The name an image entry is written under: its own, or its alias when reserved.
    fn name_for<'n>(&self, name: &'n str) -> io::Result<std::borrow::Cow<'n, str>> {
        let name = entry_name(name)?;
        Ok(if self.reserved.iter().any(|r| r == name) {
            format!("{}{name}", self.alias).into()
        } else {
            name.into()
        })
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.room_for("the archive", b.len() as u64)?;
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    fn header(&mut self, name: &str, meta: Meta, nlink: u32, size: u64) -> io::Result<()> {
        let ino = self.ino;
        self.ino += 1;
        self.header_of(ino, name, meta, nlink, size)
    }

    /// A header for inode number `ino`.
    fn header_of(&mut self, ino: u32, name: &str, meta: Meta, nlink: u32, size: u64) -> io::Result<()> {
        let name = self.name_for(name)?;
        // The entry's data is counted before it is read.
        self.room_for(&name, size.saturating_add(HEADER_LEN + name.len() as u64 + 8))?;
        if size > u32::MAX as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: {size} bytes is too large for cpio"),
            ));
        }
        let fields = [
            ino,
            meta.mode,
            meta.uid,
            meta.gid,
            nlink,
            meta.mtime,
            size as u32,
            0,
            0,
            meta.rdev.0,
            meta.rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let mut h = String::with_capacity(HEADER_LEN as usize);
        h.push_str("070701");
        for f in fields {
            h.push_str(&format!("{f:08X}"));
        }
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, meta: Meta) -> io::Result<()> {
        self.header(name, Meta { mode: S_IFDIR | (meta.mode & 0o7777), ..meta }, 2, 0)
    }

    /// A regular file with its contents.
    pub fn file(&mut self, name: &str, meta: Meta, data: &[u8]) -> io::Result<()> {
        self.header(name, Meta { mode: S_IFREG | (meta.mode & 0o7777), ..meta }, 1, data.len() as u64)?;
        self.put(data)?;
        self.pad()
    }

    /// A regular file of `size` bytes copied from `data`.
    pub fn file_from(
        &mut self,
        name: &str,
        meta: Meta,
        size: u64,
        data: &mut dyn io::Read,
    ) -> io::Result<()> {
        self.header(name, Meta { mode: S_IFREG | (meta.mode & 0o7777), ..meta }, 1, size)?;
        self.copy_body(name, size, data)
    }

    fn copy_body(&mut self, name: &str, size: u64, data: &mut dyn io::Read) -> io::Result<()> {
        let copied = io::copy(&mut io::Read::take(&mut *data, size), &mut self.out)?;
        self.written += copied;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: expected {size} bytes, got {copied}"),
            ));
        }
        self.pad()
    }

    /// Another name for a multiply-linked file already written with
    /// [`linked_file_from`](Self::linked_file_from) under `key`: an entry the kernel
    /// links to the first (same inode number, no data), and true; false when `key` was
    /// not seen yet.
    pub fn hard_link(&mut self, name: &str, key: (u64, u64)) -> io::Result<bool> {
        let Some(&(ino, meta)) = self.first_names.get(&key) else { return Ok(false) };
        self.header_of(ino, name, meta, 2, 0)?;
        Ok(true)
    }

    /// `name` as another name of `target`, an entry of the archive (a tar hard link):
    /// listed for the guest to make once everything is unpacked.
    pub fn hard_link_to(&mut self, name: &str, target: &str) -> io::Result<()> {
        let (name, target) = (self.name_for(name)?, self.name_for(target)?);
        self.links.push((target.into_owned(), name.into_owned()));
        Ok(())
    }

    /// The first name of a regular file with several names, identified by `key` (for
    /// instance the source's device and inode), with its `size` bytes from `data`; its
    /// other names follow with [`hard_link`](Self::hard_link).
    pub fn linked_file_from(
        &mut self,
        name: &str,
        meta: Meta,
        key: (u64, u64),
        size: u64,
        data: &mut dyn io::Read,
    ) -> io::Result<()> {
        let meta = Meta { mode: S_IFREG | (meta.mode & 0o7777), ..meta };
        let ino = self.ino;
        self.ino += 1;
        self.first_names.insert(key, (ino, meta));
        // A link count of two or more: the kernel remembers the entry to link to.
        self.header_of(ino, name, meta, 2, size)?;
        self.copy_body(name, size, data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, meta: Meta, target: &str) -> io::Result<()> {
        self.header(name, Meta { mode: S_IFLNK | 0o777, ..meta }, 1, target.len() as u64)?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    /// A device node, FIFO or other data-less entry with `meta.mode` as given.
    pub fn special(&mut self, name: &str, meta: Meta) -> io::Result<()> {
        self.header(name, meta, 1, 0)
    }

    /// Writes the list of hard links (when there are any) and the trailer, and returns
    /// the output.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.links.is_empty() {
            let mut list = Vec::new();
            for (target, name) in std::mem::take(&mut self.links) {
                for part in [target, name] {
                    list.extend_from_slice(part.as_bytes());
                    list.push(0);
                }
            }
            self.file(crate::contract::LINKS_FILE, Meta::root(0o644), &list)?;
        }
        self.header("TRAILER!!!", Meta::root(0), 1, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// An entry's name as the archive holds it: relative to the root, "." for the root itself.
fn entry_name(name: &str) -> io::Result<&str> {
    let name = name.trim_start_matches('/');
    let name = if name.is_empty() { "." } else { name };
    if name.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("NUL in cpio name {name:?}")));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::LINKS_FILE;

    #[test]
    fn newc_layout_by_hand() {
        let mut w = Writer::new(Vec::new());
        w.file("/a", Meta::root(0o644), b"hi").unwrap();
        let out = w.finish().unwrap();
        let mut want = String::from("070701");
        for f in [1u32, 0o100644, 0, 0, 1, 0, 2, 0, 0, 0, 0, 2, 0] {
            want.push_str(&format!("{f:08X}"));
        }
        let mut want = want.into_bytes();
        want.extend_from_slice(b"a\0"); // 110 + 2 = 112: already aligned
        want.extend_from_slice(b"hi\0\0");
        assert_eq!(&out[..want.len()], &want[..]);
        assert_eq!(out.len() % 4, 0);
        let trailer = &out[want.len()..];
        assert!(trailer.starts_with(b"070701"));
        assert_eq!(&trailer[110..121], b"TRAILER!!!\0");
    }

    /// The 13 header fields of each entry, with its name.
    fn entries(mut b: &[u8]) -> Vec<(Vec<u32>, String)> {
        let mut out = Vec::new();
        while b.len() >= 110 {
            let f: Vec<u32> = (0..13)
                .map(|i| {
                    u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
                })
                .collect();
            let name = String::from_utf8(b[110..110 + f[11] as usize - 1].to_vec()).unwrap();
            let body = (110 + f[11] as usize).next_multiple_of(4);
            b = &b[(body + f[6] as usize).next_multiple_of(4)..];
            out.push((f, name));
        }
        out
    }

    #[test]
    fn known_hard_links_are_archived_for_the_kernel_and_later_ones_listed_for_the_guest() {
        let mut w = Writer::new(Vec::new());
        let key = (8, 1234);
        assert!(!w.hard_link("bin/sh", key).unwrap(), "nothing to link to yet");
        w.linked_file_from("/bin/busybox", Meta::root(0o755), key, 4, &mut &b"BBOX"[..]).unwrap();
        w.file("etc/x", Meta::root(0o644), b"x").unwrap();
        assert!(w.hard_link("bin/sh", key).unwrap());
        assert!(w.hard_link("/bin/ls", key).unwrap());
        w.hard_link_to("usr/bin/x2", "/etc/x").unwrap();
        let out = w.finish().unwrap();
        let e = entries(&out);
        let names: Vec<&str> = e.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["bin/busybox", "etc/x", "bin/sh", "bin/ls", LINKS_FILE, "TRAILER!!!"]);
        let (bb, sh, ls) = (&e[0].0, &e[2].0, &e[3].0);
        assert_eq!((bb[1], bb[4], bb[6]), (S_IFREG | 0o755, 2, 4), "the first name: data, two links or more");
        for l in [sh, ls] {
            assert_eq!((l[0], l[1], l[4], l[6]), (bb[0], bb[1], 2, 0), "same inode and mode, no data");
        }
        assert_ne!(e[1].0[0], bb[0], "files keep their own inodes");
        assert_eq!(e[1].0[4], 1, "a plain file has one link");
        let list = b"etc/x\0usr/bin/x2\0";
        let at = out.windows(list.len()).position(|w| w == list);
        assert!(at.is_some(), "the list: (target, name) pairs, NUL-terminated");
        assert_eq!(e[4].0[6] as usize, list.len());
    }

    #[test]
    fn an_image_entry_of_a_reserved_name_goes_under_its_alias_with_its_links() {
        let mut w = Writer::new(Vec::new());
        w.dir("vmhost", Meta::root(0o755)).unwrap();
        w.reserve(&["init"], "vmhost/image-");
        let key = (8, 1);
        // The image's /init is the first name of busybox's links.
        w.linked_file_from("/init", Meta::root(0o755), key, 4, &mut &b"BBOX"[..]).unwrap();
        assert!(w.hard_link("bin/busybox", key).unwrap());
        w.file("etc/x", Meta::root(0o644), b"x").unwrap();
        w.hard_link_to("bin/y", "/init").unwrap();
        w.hard_link_to("init", "etc/x").unwrap();
        w.release();
        w.file("init", Meta::root(0o755), b"AGENT").unwrap();
        let out = w.finish().unwrap();
        let e = entries(&out);
        let names: Vec<&str> = e.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            ["vmhost", "vmhost/image-init", "bin/busybox", "etc/x", "init", LINKS_FILE, "TRAILER!!!"]
        );
        assert_eq!(e[2].0[0], e[1].0[0], "busybox links to the image's init under its alias");
        assert_eq!((e[4].0[4], e[4].0[6]), (1, 5), "the caller's init is a file of its own");
        let list = b"vmhost/image-init\0bin/y\0etc/x\0vmhost/image-init\0";
        assert!(out.windows(list.len()).any(|w| w == list), "listed links follow the alias");
    }

    #[test]
    fn an_entry_past_the_limit_is_refused_before_its_data_is_read() {
        let mut w = Writer::new(Vec::new());
        w.set_limit(4096, "give it more");
        w.file("small", Meta::root(0o644), &[1; 1000]).unwrap();
        // A reader that must not be read: the member's size alone passes the limit.
        struct Never;
        impl io::Read for Never {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                panic!("read past the limit")
            }
        }
        let e = w.file_from("big", Meta::root(0o644), 1 << 40, &mut Never).unwrap_err();
        let inner = e.get_ref().and_then(|i| i.downcast_ref::<TooLarge>()).expect("TooLarge");
        assert_eq!((inner.name.as_str(), inner.limit), ("big", 4096));
        assert_eq!(e.to_string(), "big: the image grows past 0 MiB here; give it more");
        assert!(w.written() < 4096);
        // The trailer counts too.
        let mut w = Writer::new(Vec::new());
        w.set_limit(100, "x");
        assert!(w.finish().is_err());
    }

    #[test]
    fn no_list_without_links() {
        let mut w = Writer::new(Vec::new());
        w.file("a", Meta::root(0o644), b"a").unwrap();
        let names: Vec<String> = entries(&w.finish().unwrap()).into_iter().map(|(_, n)| n).collect();
        assert_eq!(names, ["a", "TRAILER!!!"]);
    }
}
