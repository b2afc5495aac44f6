//! A cpio "newc" writer: the format the kernel unpacks an initramfs from.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields),
//! the NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes. The
//! archive ends with an entry named `TRAILER!!!`.

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
pub struct Writer<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Writer<W> {
    /// A writer over `out`.
    pub fn new(out: W) -> Writer<W> {
        Writer { out, ino: 1, written: 0 }
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

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    fn header(&mut self, name: &str, meta: Meta, nlink: u32, size: u64) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        if name.contains('\0') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("NUL in cpio name {name:?}")));
        }
        if size > u32::MAX as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: {size} bytes is too large for cpio"),
            ));
        }
        let ino = self.ino;
        self.ino += 1;
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
        let mut h = String::with_capacity(110);
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

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", Meta::root(0), 1, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
