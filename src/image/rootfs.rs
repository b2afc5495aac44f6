//! Image root filesystems: a directory, a tar archive (optionally compressed), or the
//! default root made from Debian's `busybox-static`.

use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::cpio::{self, Meta};
use super::tar;
use super::CacheKey;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Where an image's root comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A root filesystem directory (helper source type 1).
    Dir(PathBuf),
    /// A tar archive, plain or gzip/xz/zstd/bzip2-compressed (source type 0).
    Tar(PathBuf),
    /// The default busybox root, provisioned into the cache.
    Default,
    /// A read-only root filesystem image (a container image's erofs) that the guest
    /// mounts from a disk: the initramfs then holds the agent alone.
    Disk(PathBuf),
}

impl Source {
    /// `--image PATH`: a directory, else a tar file. A missing path is an error.
    pub fn from_path(path: &Path) -> Result<Source> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io("open image", path, e))?;
        Ok(if meta.is_dir() { Source::Dir(path.to_path_buf()) } else { Source::Tar(path.to_path_buf()) })
    }

    /// A key that changes when the image's content may have changed: for a directory
    /// every entry's path, type, mode, owner, size, mtime and link target; for a tar
    /// file its path, size and mtime.
    pub fn identity(&self, d: &mut CacheKey) -> Result<()> {
        match self {
            Source::Default => {
                d.field(b"default");
            }
            // Not in the initramfs: all such images share one.
            Source::Disk(_) => {
                d.field(b"disk");
            }
            Source::Tar(p) => {
                let m = std::fs::metadata(p).map_err(|e| Error::io("open image", p, e))?;
                d.field(b"tar").field(p.as_os_str().as_encoded_bytes());
                d.field(&m.size().to_le_bytes())
                    .field(&m.mtime().to_le_bytes())
                    .field(&m.mtime_nsec().to_le_bytes());
            }
            Source::Dir(root) => {
                d.field(b"dir");
                walk(root, &mut |rel, path, m| {
                    d.field(rel.as_bytes()).field(&m.mode().to_le_bytes()).field(&m.uid().to_le_bytes());
                    d.field(&m.gid().to_le_bytes()).field(&m.size().to_le_bytes());
                    d.field(&m.mtime().to_le_bytes()).field(&m.mtime_nsec().to_le_bytes());
                    if m.file_type().is_symlink() {
                        let t = std::fs::read_link(path).map_err(|e| Error::io("readlink", path, e))?;
                        d.field(t.as_os_str().as_encoded_bytes());
                    }
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    /// Writes the image's entries into an initramfs, or into another [`RootSink`] (a
    /// layer: [`crate::image::tar_writer::LayerSink`]).
    pub fn write_to(&self, out: &mut dyn RootSink, cache: &Path, progress: &Progress) -> Result<()> {
        match self {
            Source::Default => Source::Dir(busybox_root(cache, progress)?).write_to(out, cache, progress),
            Source::Dir(root) => write_dir(root, out),
            Source::Tar(path) => write_tar(path, out),
            Source::Disk(_) => Ok(()),
        }
    }
}

/// Where a root's entries go: an initramfs ([`cpio::Writer`]) or an image layer. The
/// methods are the cpio writer's (see there).
pub trait RootSink {
    /// A directory.
    fn dir(&mut self, name: &str, meta: Meta) -> io::Result<()>;
    /// A regular file of `size` bytes from `data`.
    fn file_from(&mut self, name: &str, meta: Meta, size: u64, data: &mut dyn Read) -> io::Result<()>;
    /// Another name for a file written with [`RootSink::linked_file_from`] under `key`;
    /// false when `key` was not seen yet.
    fn hard_link(&mut self, name: &str, key: (u64, u64)) -> io::Result<bool>;
    /// `name` as another name of the entry `target`.
    fn hard_link_to(&mut self, name: &str, target: &str) -> io::Result<()>;
    /// The first name of a file with several, identified by `key`.
    fn linked_file_from(
        &mut self,
        name: &str,
        meta: Meta,
        key: (u64, u64),
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<()>;
    /// A symbolic link.
    fn symlink(&mut self, name: &str, meta: Meta, target: &str) -> io::Result<()>;
    /// A device node or FIFO (`meta.mode` has its type).
    fn special(&mut self, name: &str, meta: Meta) -> io::Result<()>;
}

impl<W: io::Write> RootSink for cpio::Writer<W> {
    fn dir(&mut self, name: &str, meta: Meta) -> io::Result<()> {
        cpio::Writer::dir(self, name, meta)
    }
    fn file_from(&mut self, name: &str, meta: Meta, size: u64, data: &mut dyn Read) -> io::Result<()> {
        cpio::Writer::file_from(self, name, meta, size, data)
    }
    fn hard_link(&mut self, name: &str, key: (u64, u64)) -> io::Result<bool> {
        cpio::Writer::hard_link(self, name, key)
    }
    fn hard_link_to(&mut self, name: &str, target: &str) -> io::Result<()> {
        cpio::Writer::hard_link_to(self, name, target)
    }
    fn linked_file_from(
        &mut self,
        name: &str,
        meta: Meta,
        key: (u64, u64),
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        cpio::Writer::linked_file_from(self, name, meta, key, size, data)
    }
    fn symlink(&mut self, name: &str, meta: Meta, target: &str) -> io::Result<()> {
        cpio::Writer::symlink(self, name, meta, target)
    }
    fn special(&mut self, name: &str, meta: Meta) -> io::Result<()> {
        cpio::Writer::special(self, name, meta)
    }
}

/// Visits every entry under `root`, parents before children, in name order.
fn walk(root: &Path, f: &mut dyn FnMut(&str, &Path, &std::fs::Metadata) -> Result<()>) -> Result<()> {
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io("read image directory", &dir, e))?
            .collect::<io::Result<_>>()
            .map_err(|e| Error::io("read image directory", &dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in entries {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let m = std::fs::symlink_metadata(&path).map_err(|e| Error::io("stat", &path, e))?;
            f(&rel, &path, &m)?;
            if m.is_dir() {
                subdirs.push((path, rel));
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

fn write_dir(root: &Path, out: &mut dyn RootSink) -> Result<()> {
    let as_root = nix::unistd::geteuid().is_root();
    walk(root, &mut |rel, path, m| {
        let meta = Meta {
            mode: m.mode(),
            uid: if as_root { m.uid() } else { 0 },
            gid: if as_root { m.gid() } else { 0 },
            mtime: m.mtime().clamp(0, u32::MAX as i64) as u32,
            rdev: (nix::sys::stat::major(m.rdev()) as u32, nix::sys::stat::minor(m.rdev()) as u32),
        };
        let ft = m.file_type();
        let io = |e| Error::io("add to initramfs", path, e);
        if ft.is_dir() {
            out.dir(rel, meta).map_err(io)
        } else if ft.is_symlink() {
            let t = std::fs::read_link(path).map_err(|e| Error::io("readlink", path, e))?;
            out.symlink(rel, meta, &t.to_string_lossy()).map_err(io)
        } else if ft.is_file() && m.nlink() > 1 {
            // Hard links stay hard links: one copy of the data in the guest.
            let key = (m.dev(), m.ino());
            if out.hard_link(rel, key).map_err(io)? {
                return Ok(());
            }
            let mut f = std::fs::File::open(path).map_err(|e| Error::io("read image file", path, e))?;
            out.linked_file_from(rel, meta, key, m.size(), &mut f).map_err(io)
        } else if ft.is_file() {
            let mut f = std::fs::File::open(path).map_err(|e| Error::io("read image file", path, e))?;
            out.file_from(rel, meta, m.size(), &mut f).map_err(io)
        } else {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_socket() {
                return Ok(()); // sockets are runtime objects
            }
            out.special(rel, meta).map_err(io)
        }
    })
}

/// Opens a tar file, decompressing by its magic through the standard tools.
fn open_tar(path: &Path) -> Result<Box<dyn Read>> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("open image", path, e))?;
    let mut magic = [0u8; 6];
    let n = f.read(&mut magic).map_err(|e| Error::io("read image", path, e))?;
    let tool: Option<&[&str]> = match &magic[..n] {
        [0x1f, 0x8b, ..] => Some(&["gzip", "-dc"]),
        [0xfd, b'7', b'z', b'X', b'Z', 0] => Some(&["xz", "-dc"]),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some(&["zstd", "-dcq"]),
        [b'B', b'Z', b'h', ..] => Some(&["bzip2", "-dc"]),
        _ => None,
    };
    let Some(tool) = tool else {
        return Ok(Box::new(std::fs::File::open(path).map_err(|e| Error::io("open image", path, e))?));
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io("open image", path, e))?;
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::io("decompress image (is the tool installed?)", tool[0], e))?;
    let stdout = child.stdout.take().expect("piped");
    Ok(Box::new(ChildReader { child, stdout, tool: tool[0] }))
}

/// Reads a decompressor's output and reports its failure at the end.
struct ChildReader {
    child: std::process::Child,
    stdout: std::process::ChildStdout,
    tool: &'static str,
}

impl Read for ChildReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stdout.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let status = self.child.wait()?;
            if !status.success() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} failed: {status} (corrupt archive?)", self.tool),
                ));
            }
        }
        Ok(n)
    }
}

impl Drop for ChildReader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_tar(path: &Path, out: &mut dyn RootSink) -> Result<()> {
    let reader = open_tar(path)?;
    tar::read(reader, |e, data| {
        let meta = Meta {
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime.min(u32::MAX as u64) as u32,
            rdev: e.dev,
        };
        match e.kind {
            tar::Kind::Dir => out.dir(&e.path, meta),
            tar::Kind::File => out.file_from(&e.path, meta, e.size, data),
            tar::Kind::Symlink => out.symlink(&e.path, meta, &e.link),
            // Made in the guest once the archive is unpacked (see cpio::LINKS_FILE).
            tar::Kind::Hardlink => out.hard_link_to(&e.path, e.link.trim_start_matches("./")),
            tar::Kind::Char => out.special(&e.path, Meta { mode: cpio::S_IFCHR | e.mode, ..meta }),
            tar::Kind::Block => out.special(&e.path, Meta { mode: cpio::S_IFBLK | e.mode, ..meta }),
            tar::Kind::Fifo => out.special(&e.path, Meta { mode: cpio::S_IFIFO | e.mode, ..meta }),
        }
    })
    .map_err(|e| Error::InvalidArgument {
        op: "read image".into(),
        message: format!("{}: {e}", path.display()),
    })
}

/// The default root: busybox with its applets as hard links and a minimal /etc,
/// provisioned once into `<cache>/rootfs/`.
///
/// Its busybox is, in order: the static binary `VMHOST_BUSYBOX` names; the one vmhost
/// builds from Debian's source with wget's timeout on (see `busybox_build`); when that
/// build cannot run here (no compiler, no network), Debian's `busybox-static`, with a
/// warning that its `wget -T` crashes.
///
/// Hard links, not the usual symbolic links: the kernel makes them while it unpacks the
/// initramfs, beside the rest of boot when the guest has two vCPUs (see `cpio`), where
/// a symbolic link would cost it an inode and a page too, for each of busybox's ~270
/// applets.
pub fn busybox_root(cache: &Path, progress: &Progress) -> Result<PathBuf> {
    if let Some(b) = std::env::var_os("VMHOST_BUSYBOX").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(b);
        let data = std::fs::read(&bin).map_err(|e| Error::io("read VMHOST_BUSYBOX", &bin, e))?;
        let sum = <sha2::Sha256 as sha2::Digest>::digest(&data);
        let hex: String = sum.iter().take(6).map(|b| format!("{b:02x}")).collect();
        return provision(cache, &format!("busybox-given-{hex}"), |_| Ok(bin.clone()));
    }
    let built = format!("busybox-3-{}", super::busybox_build::key());
    if ready(&cache.join("rootfs").join(&built)) {
        return Ok(cache.join("rootfs").join(&built));
    }
    match super::busybox_build::build(cache, progress) {
        Ok(bin) => provision(cache, &built, |_| Ok(bin.clone())),
        Err(e) => {
            log::warn!(
                "the default image uses Debian's busybox-static, whose `wget -T` crashes: \
                 building busybox failed: {e}"
            );
            provision(cache, "busybox-2", |work| debian_busybox(work, progress))
        }
    }
}

fn ready(root: &Path) -> bool {
    root.join("bin/busybox").is_file()
}

/// Debian's `busybox-static`, downloaded with apt-get into `work`.
fn debian_busybox(work: &Path, progress: &Progress) -> Result<PathBuf> {
    progress.step("downloading busybox-static for the default image");
    let ok = Command::new("apt-get")
        .args(["download", "busybox-static"])
        .current_dir(work)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let deb = std::fs::read_dir(work)
        .ok()
        .and_then(|d| d.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "deb")));
    let (true, Some(deb)) = (ok, deb) else {
        return Err(Error::InvalidArgument {
            op: "default image".into(),
            message: "cannot download busybox-static with apt-get; pass --image DIR|TAR, \
                      or set VMHOST_BUSYBOX to a static busybox binary"
                .into(),
        });
    };
    let x = work.join("x");
    let st = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x).status();
    if !st.is_ok_and(|s| s.success()) {
        return Err(Error::InvalidArgument {
            op: "default image".into(),
            message: "dpkg-deb -x busybox-static failed".into(),
        });
    }
    Ok(x.join("bin/busybox"))
}

/// Makes `<cache>/rootfs/<name>` from the busybox `get` gives (it may use its scratch
/// directory), once: a root already there is used as it is.
fn provision(cache: &Path, name: &str, get: impl FnOnce(&Path) -> Result<PathBuf>) -> Result<PathBuf> {
    let root = cache.join("rootfs").join(name);
    if ready(&root) {
        return Ok(root);
    }
    let _built_once = super::BUILD_LOCK.lock();
    if ready(&root) {
        return Ok(root);
    }
    let work = cache.join(format!("rootfs/.busybox-{}", super::unique_suffix()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io("create", &work, e))?;
    let result = (|| {
        let bin = get(&work)?;
        let staged = work.join("root");
        for d in [
            "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev", "run",
            "var/tmp",
        ] {
            std::fs::create_dir_all(staged.join(d)).map_err(|e| Error::io("create", staged.join(d), e))?;
        }
        std::fs::copy(&bin, staged.join("bin/busybox")).map_err(|e| Error::io("copy busybox", &bin, e))?;
        std::fs::set_permissions(staged.join("bin/busybox"), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::io("chmod", staged.join("bin/busybox"), e))?;
        let list = Command::new(staged.join("bin/busybox"))
            .arg("--list-full")
            .output()
            .map_err(|e| Error::io("run busybox --list-full", &bin, e))?;
        for applet in String::from_utf8_lossy(&list.stdout).lines().map(str::trim).filter(|l| !l.is_empty()) {
            let link = staged.join(applet);
            if link.exists() || applet.contains("..") {
                continue;
            }
            if let Some(parent) = link.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            std::fs::hard_link(staged.join("bin/busybox"), &link)
                .map_err(|e| Error::io("link applet", &link, e))?;
        }
        let files: &[(&str, &str)] = &[
            (
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            ),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
            ("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
            ("etc/hostname", "vmhost\n"),
        ];
        for (p, content) in files {
            std::fs::write(staged.join(p), content).map_err(|e| Error::io("write", staged.join(p), e))?;
        }
        std::fs::set_permissions(staged.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .map_err(|e| Error::io("chmod", staged.join("tmp"), e))?;
        if let Err(e) = std::fs::rename(&staged, &root) {
            // Another process installed it first: use theirs.
            if !ready(&root) {
                return Err(Error::io("install default image", &root, e));
            }
        }
        Ok(root.clone())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}
