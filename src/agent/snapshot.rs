//! FsSnapshot's guest side: what changed in the root since boot, as an OCI layer.
//!
//! The root is an overlay (see [`super::init`]: over the image's disk, or over the
//! initramfs as unpacked) whose upper directory holds every change: a new or changed file whole (overlayfs copies a file up before its first
//! change), a deletion as a whiteout (a character device 0:0), a directory removed and
//! made again as an opaque one (the xattr `trusted.overlay.opaque`). The walk turns them
//! into an OCI image layer (the image-spec's "changesets"): a whiteout becomes an empty
//! `.wh.NAME`, an opaque directory gets `.wh..wh..opq`, overlayfs's own xattrs are
//! dropped, and a file with several names in the layer is written once and linked.
//! Entries come parents first, each directory's in byte order of their names, so the
//! same changes always give the same archive but for the times.
//!
//! Never captured: the kernel's filesystems and what is mounted on them (`/dev`, `/proc`,
//! `/sys`, `/tmp`, `/run`), vmhost's `/vmhost`, and the files vmhost writes for the guest
//! (`/etc/hosts`, `/etc/resolv.conf`), as docker leaves them out of `docker commit`.
//!
//! Excludes: each is a guest path, absolute or relative to `/`; an entry is left out when
//! its path, component by component, matches the exclude or starts with it: so `/var/log`
//! leaves out the directory and everything under it. In a component `*` matches any run
//! of characters and `?` any one character (never a `/`).
//!
//! Also left out: the directories vmhost made for host shares (`/mnt/TAG`, and `/mnt`
//! when the image had none), though not what guest programs put beside them. Refused,
//! failing the snapshot: a name starting with `.wh.` (in a layer it means a deletion) and
//! a file name or link target that is not UTF-8.
//!
//! While the walk runs the guest's processes are stopped (SIGSTOP, then SIGCONT to the
//! ones this stopped, children first), as `docker commit` pauses a container: the layer
//! is the root at one instant, as a crash would leave it (a file a program was rewriting
//! may be cut between its truncation and its data), not a mix of moments; without the
//! pause each file is taken as it is when read. No process starts while they
//! are being stopped; one started later runs through the walk. A parent that waits for
//! its children's stops (a job-control shell) may see one. The archive goes through a
//! pipe that the host reads as a file handle ([`super::fs::Files::adopt`]); SnapshotEnd
//! gives the walk's result.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::libc;

use crate::contract::proto::AgentError;
use crate::image::tar::{Entry, Kind};
use crate::image::tar_writer::Writer;
use crate::wire::ErrorCode;

/// The overlay's writable directory (it holds `upper/`), kept open by init before the
/// root moved onto the overlay: no path in the guest's root leads to it.
static RW_DIR: OnceLock<OwnedFd> = OnceLock::new();

/// Opens `dir` (the overlay's writable directory, which holds `upper/`) for
/// [`keep_rw_dir`].
pub(super) fn open_rw_dir(dir: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: open on a NUL-terminated path; the descriptor is owned right after.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Keeps the overlay's writable directory for snapshots, once the root is the overlay.
pub(super) fn keep_rw_dir(fd: OwnedFd) {
    let _ = RW_DIR.set(fd);
}

/// Directories vmhost made in the root (mount points of host shares), as layer paths.
static MADE_BY_VMHOST: parking_lot::Mutex<Vec<String>> = parking_lot::const_mutex(Vec::new());

/// Notes that vmhost made the directory `path` (absolute): a snapshot leaves the entry
/// out (what a guest program puts under it is still taken).
pub(super) fn made_by_vmhost(path: &str) {
    MADE_BY_VMHOST.lock().push(path.trim_start_matches('/').to_string());
}

/// Top-level names never captured.
const NEVER_TOP: &[&str] = &["dev", "proc", "sys", "tmp", "run", "vmhost"];
/// Files vmhost writes for the guest, never captured.
const NEVER_FILES: &[&str] = &["etc/hosts", "etc/resolv.conf"];
/// overlayfs's own xattrs, not the files'.
const OVERLAY_XATTR: &str = "trusted.overlay.";
/// The largest xattr value Linux keeps.
const MAX_XATTR: usize = 64 << 10;

/// What a snapshot wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Archive members (whiteouts and opaque markers among them).
    pub entries: u64,
    /// Bytes of the archive.
    pub bytes: u64,
}

/// A started snapshot: the archive's read end, and the walk writing it.
#[derive(Debug)]
pub struct Started {
    /// The archive, as the host reads it.
    pub reader: File,
    /// The walk; its result once the archive is written (or broke off).
    pub walk: std::thread::JoinHandle<Result<Summary, String>>,
}

/// Starts a snapshot of the root's changes, leaving out `excludes`, pausing the guest's
/// processes while it runs when `pause`.
pub fn start(excludes: Vec<String>, pause: bool) -> Result<Started, AgentError> {
    let Some(rw) = RW_DIR.get() else {
        return Err(AgentError::new(
            ErrorCode::InvalidArgument,
            "this guest's root is not an overlay, so nothing records its changes: its kernel lacks \
             overlayfs (a stock kernel has it as a module); snapshots need vmhost's own kernel \
             (`vmhost kernel build`)",
        ));
    };
    let upper = PathBuf::from(format!("/proc/self/fd/{}/upper", rw.as_raw_fd()));
    let excludes = excludes.iter().map(|e| Pattern::new(e)).collect::<Result<Vec<_>, _>>()?;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| AgentError::new(ErrorCode::Io, format!("pipe for the snapshot: {e}")))?;
    let walk = std::thread::Builder::new()
        .name("snapshot".into())
        .spawn(move || {
            let paused = if pause { pause_processes() } else { Vec::new() };
            let result = write_layer(&upper, &excludes, File::from(w));
            // Children (later pids) first: a parent that runs again finds them running,
            // not stopped (a shell would otherwise take a stopped job from its terminal).
            for pid in paused.into_iter().rev() {
                // SAFETY: kill with a pid this stopped and a valid signal.
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
            result.map_err(|e| format!("snapshot of the root's changes: {e}"))
        })
        .map_err(|e| AgentError::new(ErrorCode::Io, format!("start the snapshot: {e}")))?;
    Ok(Started { reader: File::from(r), walk })
}

fn write_layer(upper: &Path, excludes: &[Pattern], out: File) -> io::Result<Summary> {
    let mut w = Walk {
        tar: Writer::new(BufWriter::with_capacity(256 << 10, out)),
        excludes,
        links: HashMap::new(),
        entries: 0,
        made: MADE_BY_VMHOST.lock().clone(),
    };
    w.dir(upper, "")?;
    let entries = w.entries;
    let bytes = w.tar.written() + 1024;
    w.tar.finish()?;
    Ok(Summary { entries, bytes })
}

struct Walk<'a, W: Write> {
    tar: Writer<W>,
    excludes: &'a [Pattern],
    /// The first name of each file with several links: (device, inode) -> path.
    links: HashMap<(u64, u64), String>,
    entries: u64,
    /// Directories vmhost made ([`made_by_vmhost`]).
    made: Vec<String>,
}

impl<W: Write> Walk<'_, W> {
    fn emit(&mut self, e: &Entry, data: &mut dyn io::Read) -> io::Result<()> {
        self.entries += 1;
        self.tar.entry(e, data)
    }

    /// Writes the entries of the upper directory `dir` (the layer path `rel`).
    fn dir(&mut self, dir: &Path, rel: &str) -> io::Result<()> {
        let mut names: Vec<_> =
            std::fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>()?;
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        for name in names {
            let Some(name) = name.to_str() else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{rel}/{}: a file name that is not UTF-8 cannot go into the layer",
                        name.to_string_lossy()
                    ),
                ));
            };
            let path = if rel.is_empty() { name.to_string() } else { format!("{rel}/{name}") };
            if (rel.is_empty() && NEVER_TOP.contains(&name)) || NEVER_FILES.contains(&path.as_str()) {
                continue;
            }
            if self.excludes.iter().any(|p| p.covers(&path)) {
                continue;
            }
            let full = dir.join(name);
            let m = std::fs::symlink_metadata(&full)?;
            let ft = m.file_type();
            let mut e = Entry {
                path: path.clone(),
                kind: Kind::File,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                mtime: m.mtime().max(0) as u64,
                size: 0,
                link: String::new(),
                dev: (0, 0),
                xattrs: Vec::new(),
            };
            if ft.is_char_device() && m.rdev() == 0 {
                // A whiteout: the name is gone from the layers below.
                e.path = if rel.is_empty() { format!(".wh.{name}") } else { format!("{rel}/.wh.{name}") };
                e.mode = 0;
                self.emit(&e, &mut io::empty())?;
                continue;
            }
            if name.starts_with(".wh.") {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{path}: a name starting with .wh. means a deletion in an image layer; rename it"
                    ),
                ));
            }
            e.xattrs = xattrs(&full)?;
            let opaque = take_opaque(&mut e.xattrs);
            // Renamed directories and metadata-only copies keep their content in the
            // layers below, which one layer cannot say: refused rather than taken wrong
            // (vmhost's overlay has neither feature on).
            if let Some((k, _)) = e
                .xattrs
                .iter()
                .find(|(k, _)| k == "trusted.overlay.redirect" || k == "trusted.overlay.metacopy")
            {
                return Err(io::Error::other(format!("{path}: overlayfs {k} cannot go into a layer")));
            }
            e.xattrs.retain(|(k, _)| !k.starts_with(OVERLAY_XATTR));
            if ft.is_dir() {
                e.kind = Kind::Dir;
                if !self.made.contains(&path) || opaque {
                    self.emit(&e, &mut io::empty())?;
                }
                if opaque {
                    let marker = Entry {
                        path: format!("{path}/.wh..wh..opq"),
                        mode: 0,
                        xattrs: Vec::new(),
                        ..e.clone()
                    };
                    let marker = Entry { kind: Kind::File, ..marker };
                    self.emit(&marker, &mut io::empty())?;
                }
                self.dir(&full, &path)?;
            } else if ft.is_file() {
                if m.nlink() > 1 {
                    if let Some(first) = self.links.get(&(m.dev(), m.ino())) {
                        e.kind = Kind::Hardlink;
                        e.link = first.clone();
                        e.xattrs.clear();
                        self.emit(&e, &mut io::empty())?;
                        continue;
                    }
                    self.links.insert((m.dev(), m.ino()), path.clone());
                }
                let f = open_nofollow(&full)?;
                // The size when opened: a file that grows meanwhile (no pause) is taken
                // to that size, one that shrinks is an error.
                e.size = f.metadata()?.len();
                self.emit(&e, &mut &f)?;
            } else if ft.is_symlink() {
                e.kind = Kind::Symlink;
                let target = std::fs::read_link(&full)?;
                e.link = target.to_str().map(str::to_string).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{path}: a link target that is not UTF-8"),
                    )
                })?;
                self.emit(&e, &mut io::empty())?;
            } else if ft.is_char_device() || ft.is_block_device() {
                e.kind = if ft.is_char_device() { Kind::Char } else { Kind::Block };
                let rdev = m.rdev();
                e.dev = (libc::major(rdev), libc::minor(rdev));
                self.emit(&e, &mut io::empty())?;
            } else if ft.is_fifo() {
                e.kind = Kind::Fifo;
                self.emit(&e, &mut io::empty())?;
            }
            // Sockets are not kept (as in docker's layers).
        }
        Ok(())
    }
}

fn open_nofollow(p: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(p)
}

/// Removes overlayfs's opaque marker from `xattrs`, saying whether it was set.
fn take_opaque(xattrs: &mut Vec<(String, Vec<u8>)>) -> bool {
    let key = "trusted.overlay.opaque";
    let opaque = xattrs.iter().any(|(k, v)| k == key && v.as_slice() == b"y");
    xattrs.retain(|(k, _)| k != key);
    opaque
}

/// The extended attributes of `p` (not following a link), name and value.
fn xattrs(p: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut names = vec![0u8; 4096];
    let n = loop {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if names.len() < (1 << 20) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let Ok(text) = std::str::from_utf8(name) else { continue };
        let cname = CString::new(name).map_err(io::Error::other)?;
        let mut value = vec![0u8; MAX_XATTR];
        // SAFETY: both strings are NUL-terminated; the buffer is valid for its length.
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if len < 0 {
            let e = io::Error::last_os_error();
            // Gone since it was listed.
            if e.raw_os_error() == Some(libc::ENODATA) {
                continue;
            }
            return Err(e);
        }
        value.truncate(len as usize);
        out.push((text.to_string(), value));
    }
    out.sort();
    Ok(out)
}

/// An exclude: path components, each a pattern with `*` and `?`.
#[derive(Debug, Clone)]
pub struct Pattern(Vec<String>);

impl Pattern {
    /// Parses an exclude (see the module's documentation).
    pub fn new(text: &str) -> Result<Pattern, AgentError> {
        let parts: Vec<String> =
            text.split('/').filter(|c| !c.is_empty() && *c != ".").map(str::to_string).collect();
        if parts.is_empty() || parts.iter().any(|c| c == "..") {
            return Err(AgentError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "exclude {text:?}: give a path below / (\"..\" and the root itself are not excludes)"
                ),
            ));
        }
        Ok(Pattern(parts))
    }

    /// Whether the layer path `path` is the excluded path or lies under it.
    pub fn covers(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        parts.len() >= self.0.len()
            && self.0.iter().zip(&parts).all(|(p, c)| glob(p.as_bytes(), c.as_bytes()))
    }
}

/// Matches `name` against `pat` (`*`: any run, `?`: any one byte).
fn glob(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while n < name.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some(p);
            mark = n;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            n = mark;
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// Stops every guest process but PID 1 and the kernel's threads, and those already
/// stopped; returns the ones it stopped, once they have (or after a bound).
fn pause_processes() -> Vec<i32> {
    const PF_KTHREAD: u64 = 0x0020_0000;
    // No process is started meanwhile, so none is stopped between fork and exec.
    let _no_starts = super::spawn::hold_starts();
    let mut stopped: Vec<i32> = Vec::new();
    // Again until a pass stops nothing: a process may fork while the first pass runs.
    for _ in 0..8 {
        let mut more = false;
        for (pid, state, flags) in processes() {
            if pid == 1 || flags & PF_KTHREAD != 0 || matches!(state, 'T' | 't' | 'Z' | 'X') {
                continue;
            }
            if stopped.contains(&pid) {
                continue;
            }
            // SAFETY: kill with a pid read from /proc and a valid signal.
            if unsafe { libc::kill(pid, libc::SIGSTOP) } == 0 {
                stopped.push(pid);
                more = true;
            }
        }
        if !more {
            break;
        }
    }
    // SIGSTOP takes effect when the process next leaves the kernel: wait for that (a
    // process in an uninterruptible wait may take a while; the walk goes on after 2 s).
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let running = processes()
            .iter()
            .any(|(pid, state, _)| stopped.contains(pid) && !matches!(state, 'T' | 't' | 'Z' | 'X'));
        if !running {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    stopped
}

/// Every process: pid, state, flags (from /proc/PID/stat).
fn processes() -> Vec<(i32, char, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // "pid (comm) state ppid pgrp session tty_nr tpgid flags ...": comm may hold
        // anything, so the fields are counted from its closing parenthesis.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(flags)) =
            (f.first().and_then(|s| s.chars().next()), f.get(6).and_then(|s| s.parse().ok()))
        else {
            continue;
        };
        out.push((pid, state, flags));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_cover_a_path_and_what_is_under_it() {
        let p = Pattern::new("/var/log").unwrap();
        assert!(p.covers("var/log"));
        assert!(p.covers("var/log/syslog"));
        assert!(!p.covers("var/logs"));
        assert!(!p.covers("var"));
        let p = Pattern::new("root/*.tmp").unwrap();
        assert!(p.covers("root/a.tmp"));
        assert!(p.covers("root/.tmp/x"));
        assert!(!p.covers("root/a.tmpx"));
        assert!(!p.covers("root/sub/a.tmp"));
        let p = Pattern::new("home/?ob").unwrap();
        assert!(p.covers("home/bob/x") && !p.covers("home/bobby"));
        assert!(Pattern::new("/").is_err());
        assert!(Pattern::new("../etc").is_err());
    }

    #[test]
    fn the_upper_directory_becomes_a_layer_with_whiteouts_and_links() {
        let dir = crate::test_dir::TempDir::new("snapshot-walk");
        let up = dir.join("upper");
        std::fs::create_dir_all(up.join("etc/sub")).unwrap();
        std::fs::create_dir_all(up.join("proc")).unwrap();
        std::fs::create_dir_all(up.join("var/log")).unwrap();
        std::fs::write(up.join("etc/a"), b"alpha").unwrap();
        std::fs::hard_link(up.join("etc/a"), up.join("etc/sub/b")).unwrap();
        std::fs::write(up.join("etc/hosts"), b"never").unwrap();
        std::fs::write(up.join("var/log/x"), b"excluded").unwrap();
        std::os::unix::fs::symlink("a", up.join("etc/link")).unwrap();
        // vmhost made /mnt: left out, what a program put in it kept.
        std::fs::create_dir_all(up.join("mnt")).unwrap();
        std::fs::write(up.join("mnt/note"), b"n").unwrap();
        let excludes = vec![Pattern::new("/var/log").unwrap()];
        let mut w = Walk {
            tar: Writer::new(Vec::new()),
            excludes: &excludes,
            links: HashMap::new(),
            entries: 0,
            made: vec!["mnt".into()],
        };
        w.dir(&up, "").unwrap();
        let archive = w.tar.finish().unwrap();
        let mut seen = Vec::new();
        crate::image::tar::read(&archive[..], |e, data| {
            let mut s = String::new();
            io::Read::read_to_string(data, &mut s)?;
            seen.push(format!("{} {:?} {} {}", e.path, e.kind, e.link, s));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                "etc Dir  ",
                "etc/a File  alpha",
                "etc/link Symlink a ",
                "etc/sub Dir  ",
                "etc/sub/b Hardlink etc/a ",
                "mnt/note File  n",
                "var Dir  ",
            ]
        );
    }
}
