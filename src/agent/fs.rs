//! The guest's filesystem, served to the host: the agent end of the helper protocol's
//! Fs* and File* messages.
//!
//! An agent [`FS`](crate::contract::proto::FS) frame carries a helper-protocol message type and
//! that message's request payload, unchanged, except that file handles are this agent's
//! own (the helper keeps the table that maps its handles to them). The answer is the
//! helper protocol's response fields, or an agent error with the helper error code.
//! Decoding is the helper protocol's own ([`RequestRef::from_payload`], which borrows the
//! strings and file data from the frame), so both ends share one definition of every
//! layout.
//!
//! Paths are the guest's, absolute or relative to `/`. Modes are Go `FileMode` bits;
//! open flags are Linux `O_*` values. Times are Unix seconds.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{File, Metadata};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::libc;
use parking_lot::Mutex;

use crate::contract::proto::AgentError;
use crate::contract::MAX_CHUNK;
use crate::wire::{DirEntry, Encoder, ErrorCode, FileInfo, FileMode, RequestRef, Wire};

/// An agent-side failure (see [`AgentError`]).
pub type FsError = AgentError;

/// The error FsReadFile gives for a file larger than [`MAX_CHUNK`]: EFBIG, which the
/// helper takes as "read it through a handle".
fn too_large() -> FsError {
    AgentError {
        code: ErrorCode::InvalidArgument,
        message: "file too large for one agent frame".into(),
        errno: libc::EFBIG,
    }
}

/// The most files one agent keeps open for the host.
pub const MAX_OPEN: usize = 4096;

/// One file opened for the host.
struct OpenFile {
    file: File,
    name: String,
}

/// The files the host has open, by agent handle, and where guest paths lead.
pub struct Files {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<OpenFile>>>,
    /// `/` in the guest; a host directory when the agent's server runs in a test
    /// ([`crate::agent::serve::serve_over`]), paths then resolved lexically below it:
    /// a test root, not a jail (a symlink in it leads out).
    root: PathBuf,
}

impl Default for Files {
    fn default() -> Files {
        Files::new()
    }
}

impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files").finish_non_exhaustive()
    }
}

/// An I/O failure as the host sees it: code IO, the errno and its text (the host adds
/// the operation and the path).
pub(crate) fn io_error(e: io::Error) -> FsError {
    AgentError::from_io(&e)
}

fn invalid(message: impl Into<String>) -> FsError {
    AgentError::new(ErrorCode::InvalidArgument, message.into())
}

/// A guest path from the host: relative ones are taken from `/`, which is `root`.
fn guest_path(root: &Path, p: &str) -> Result<PathBuf, FsError> {
    if p.is_empty() {
        return Err(invalid("empty path"));
    }
    if p.contains('\0') {
        return Err(invalid("NUL byte in path"));
    }
    let p = Path::new("/").join(p);
    if root == Path::new("/") {
        return Ok(p);
    }
    let inside = normalize(&p);
    Ok(root.join(inside.strip_prefix("/").unwrap_or(&inside)))
}

/// `p` with `.` and `..` resolved lexically (symlinks are not followed).
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

fn cpath(p: &Path) -> Result<CString, FsError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| invalid("NUL byte in path"))
}

/// FileInfo the way Go's os.Stat fills it: the base name of `path`.
fn file_info(path: &str, m: &Metadata) -> FileInfo {
    let name =
        Path::new(path).file_name().map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned());
    let mode = FileMode::from_unix(m.mode());
    FileInfo {
        name,
        size: m.size() as i64,
        mode,
        mod_time: m.mtime(),
        is_dir: mode.is_dir(),
        is_symlink: mode.is_symlink(),
    }
}

impl Files {
    /// The table, empty.
    pub fn new() -> Files {
        Files::with_root("/")
    }

    /// The table, empty, with guest paths taken below `root` (see [`Files`]).
    pub fn with_root(root: impl Into<PathBuf>) -> Files {
        Files { next: AtomicU64::new(1), open: Mutex::new(HashMap::new()), root: root.into() }
    }

    fn guest_path(&self, p: &str) -> Result<PathBuf, FsError> {
        guest_path(&self.root, p)
    }

    fn get(&self, h: u64) -> Result<Arc<OpenFile>, FsError> {
        self.open
            .lock()
            .get(&h)
            .cloned()
            .ok_or_else(|| AgentError::new(ErrorCode::InvalidHandle, format!("no open file {h}")))
    }

    /// Takes `file` (a pipe's read end, say) as an open file the host reads and closes
    /// with the File messages, under `name`.
    pub fn adopt(&self, file: File, name: String) -> Result<u64, FsError> {
        self.insert(file, name)
    }

    fn insert(&self, file: File, name: String) -> Result<u64, FsError> {
        let mut open = self.open.lock();
        if open.len() >= MAX_OPEN {
            return Err(AgentError::new(
                ErrorCode::Io,
                format!("the guest agent already holds {MAX_OPEN} open files"),
            ));
        }
        let h = self.next.fetch_add(1, Ordering::Relaxed);
        open.insert(h, Arc::new(OpenFile { file, name }));
        Ok(h)
    }

    fn open(&self, path: &str, flags: i32, perm: u32) -> Result<u64, FsError> {
        let p = cpath(&self.guest_path(path)?)?;
        // SAFETY: open on a NUL-terminated path; the descriptor is owned right after.
        let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, perm as libc::c_uint) };
        if fd < 0 {
            return Err(io_error(io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        self.insert(file, path.to_string())
    }

    /// Serves one Fs*/File* request (helper-protocol type `ty`, agent handles); the
    /// answer is the helper protocol's response fields.
    pub fn serve(&self, ty: u16, payload: &[u8]) -> Result<Vec<u8>, FsError> {
        // Strings and file data are borrowed from the payload, not copied out of it: a
        // copy of FileWrite's or FsWriteFile's data is an allocation the size of the
        // data, which an allocator may map and unmap each time (see `super::buffers`).
        let req = RequestRef::from_payload(ty, payload)
            .map_err(|e| invalid(format!("bad payload: {e}")))?
            .ok_or_else(|| invalid(format!("unknown message type {ty:#06x}")))?;
        let mut out = Encoder::new();
        match req {
            RequestRef::FsOpen { path } => {
                out.u64(self.open(path, libc::O_RDONLY, 0)?);
            }
            RequestRef::FsCreate { path } => {
                out.u64(self.open(path, libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC, 0o666)?);
            }
            RequestRef::FsOpenFile { path, flags, perm } => {
                out.u64(self.open(path, flags, perm.to_unix_perm())?);
            }
            RequestRef::FsWriteFile { path, data, perm } => {
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(perm.to_unix_perm())
                    .open(self.guest_path(path)?)
                    .map_err(io_error)?;
                f.write_all(data).map_err(io_error)?;
            }
            RequestRef::FsReadFile { path } => {
                let mut f = File::open(self.guest_path(path)?).map_err(io_error)?;
                // Its size first (fstat): one larger than a frame is refused unread.
                let size = f.metadata().map_or(0, |m| m.len() as usize);
                if size > MAX_CHUNK {
                    return Err(too_large());
                }
                // Read behind the length field of a kept buffer (see `super::buffers`),
                // which is the answer.
                let mut answer = super::buffers::take(4 + size);
                answer.extend_from_slice(&[0; 4]);
                // A file whose size says nothing (/proc): one byte more than allowed
                // tells "too large" from "exactly the limit".
                let n = (&mut f).take(MAX_CHUNK as u64 + 1).read_to_end(&mut answer).map_err(io_error)?;
                if n > MAX_CHUNK {
                    super::buffers::give(answer);
                    return Err(too_large());
                }
                answer[..4].copy_from_slice(&(n as u32).to_be_bytes());
                return Ok(answer);
            }
            RequestRef::FsStat { path } => {
                let m = std::fs::metadata(self.guest_path(path)?).map_err(io_error)?;
                file_info(path, &m).encode(&mut out);
            }
            RequestRef::FsLstat { path } => {
                let m = std::fs::symlink_metadata(self.guest_path(path)?).map_err(io_error)?;
                file_info(path, &m).encode(&mut out);
            }
            RequestRef::FsRemove { path } => {
                // Go's os.Remove: a file, or else an empty directory.
                let p = self.guest_path(path)?;
                if let Err(e) = std::fs::remove_file(&p) {
                    let is_dir = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
                    if !is_dir {
                        return Err(io_error(e));
                    }
                    std::fs::remove_dir(&p).map_err(io_error)?;
                }
            }
            RequestRef::FsRemoveAll { path } => {
                // Go's os.RemoveAll: everything under it; a missing path is no error.
                let p = self.guest_path(path)?;
                // Go refuses a path ending in "." or ".." (EINVAL); and whatever spelling
                // names the root ("/", "/tmp/..", "a/../") is refused.
                if path
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .is_some_and(|last| last == "." || last == "..")
                {
                    return Err(invalid(format!("{path}: a path ending in . or .. cannot be removed")));
                }
                if normalize(&p) == normalize(&self.root) {
                    return Err(invalid("refusing to remove the guest's whole root"));
                }
                let r = match std::fs::symlink_metadata(&p) {
                    Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
                    Ok(_) => std::fs::remove_file(&p),
                    Err(e) => Err(e),
                };
                match r {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error(e)),
                    _ => {}
                }
            }
            RequestRef::FsMkdir { path, perm } => {
                std::fs::DirBuilder::new()
                    .mode(perm.to_unix_perm())
                    .create(self.guest_path(path)?)
                    .map_err(io_error)?;
            }
            RequestRef::FsMkdirAll { path, perm } => {
                let p = self.guest_path(path)?;
                if !p.is_dir() {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(perm.to_unix_perm())
                        .create(&p)
                        .map_err(io_error)?;
                }
            }
            RequestRef::FsRename { from, to } => {
                std::fs::rename(self.guest_path(from)?, self.guest_path(to)?).map_err(io_error)?;
            }
            RequestRef::FsSymlink { target, link } => {
                if target.is_empty() || target.contains('\0') {
                    return Err(invalid("bad symlink target"));
                }
                std::os::unix::fs::symlink(target, self.guest_path(link)?).map_err(io_error)?;
            }
            RequestRef::FsReadlink { path } => {
                let t = std::fs::read_link(self.guest_path(path)?).map_err(io_error)?;
                out.string(&t.to_string_lossy());
            }
            RequestRef::FsReadDir { path } => {
                let dir = self.guest_path(path)?;
                let mut entries = Vec::new();
                for e in std::fs::read_dir(&dir).map_err(io_error)? {
                    let e = e.map_err(io_error)?;
                    // Full mode (type and permissions), from lstat like Go's Info().
                    let Ok(m) = e.path().symlink_metadata() else { continue }; // raced away
                    let mode = FileMode::from_unix(m.mode());
                    entries.push(DirEntry {
                        name: e.file_name().to_string_lossy().into_owned(),
                        is_dir: mode.is_dir(),
                        mode,
                    });
                    if entries.len() > crate::wire::MAX_LIST as usize {
                        return Err(AgentError::new(
                            ErrorCode::Io,
                            format!("more than {} entries", crate::wire::MAX_LIST),
                        ));
                    }
                }
                entries.sort_by(|a, b| a.name.cmp(&b.name));
                out.u32(entries.len() as u32);
                for e in &entries {
                    e.encode(&mut out);
                }
                if out.as_bytes().len() > MAX_CHUNK {
                    return Err(AgentError::new(
                        ErrorCode::Io,
                        format!("the listing of {path} is too large for one answer"),
                    ));
                }
            }
            RequestRef::FsChmod { path, mode } => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(
                    self.guest_path(path)?,
                    std::fs::Permissions::from_mode(mode.to_unix_perm()),
                )
                .map_err(io_error)?;
            }
            RequestRef::FsChown { path, uid, gid } => {
                // -1 leaves that id unchanged, as with chown(2) and Go's os.Chown.
                let id = |v: i32| (v >= 0).then_some(v as u32);
                std::os::unix::fs::chown(self.guest_path(path)?, id(uid), id(gid)).map_err(io_error)?;
            }
            RequestRef::FsChtimes { path, atime, mtime } => {
                let p = cpath(&self.guest_path(path)?)?;
                let ts = |s: i64| libc::timespec { tv_sec: s as _, tv_nsec: 0 };
                let times = [ts(atime), ts(mtime)];
                // SAFETY: utimensat on a NUL-terminated path with two timespecs.
                if unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) } != 0 {
                    return Err(io_error(io::Error::last_os_error()));
                }
            }
            RequestRef::FileClose { handle } => {
                self.open.lock().remove(&handle).ok_or_else(|| {
                    AgentError::new(ErrorCode::InvalidHandle, format!("no open file {handle}"))
                })?;
            }
            RequestRef::FileRead { handle, max } => {
                // Read straight into the answer, behind its length field: no zeroed
                // buffer and no copy (a 1 MiB memset is milliseconds under TCG).
                let f = self.get(handle)?;
                let want = (max as usize).min(MAX_CHUNK);
                let mut answer = super::buffers::take(4 + want);
                answer.extend_from_slice(&[0; 4]);
                let n = loop {
                    // SAFETY: read(2) writes at most `want` bytes into the spare capacity
                    // (4 + want reserved); exactly the `n` it reports are then in use.
                    let r = unsafe {
                        libc::read(
                            std::os::fd::AsRawFd::as_raw_fd(&f.file),
                            answer.as_mut_ptr().add(4).cast(),
                            want,
                        )
                    };
                    if r >= 0 {
                        break r as usize;
                    }
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(io_error(e));
                    }
                };
                // SAFETY: the first 4 + n bytes are initialised (above and by read).
                unsafe { answer.set_len(4 + n) };
                answer[..4].copy_from_slice(&(n as u32).to_be_bytes());
                return Ok(answer);
            }
            RequestRef::FileWrite { handle, data } => {
                let f = self.get(handle)?;
                (&f.file).write_all(data).map_err(io_error)?;
                out.u32(data.len() as u32);
            }
            RequestRef::FileSeek { handle, offset, whence } => {
                let f = self.get(handle)?;
                let pos = match whence {
                    0 if offset >= 0 => SeekFrom::Start(offset as u64),
                    0 => return Err(invalid(format!("negative offset {offset} from the start"))),
                    1 => SeekFrom::Current(offset),
                    2 => SeekFrom::End(offset),
                    w => return Err(invalid(format!("whence {w} (0 start, 1 current, 2 end)"))),
                };
                out.i64((&f.file).seek(pos).map_err(io_error)? as i64);
            }
            RequestRef::FileSync { handle } => self.get(handle)?.file.sync_all().map_err(io_error)?,
            RequestRef::FileTruncate { handle, size } => {
                if size < 0 {
                    return Err(invalid(format!("negative size {size}")));
                }
                self.get(handle)?.file.set_len(size as u64).map_err(io_error)?;
            }
            RequestRef::FileStat { handle } => {
                let f = self.get(handle)?;
                let m = f.file.metadata().map_err(io_error)?;
                file_info(&f.name, &m).encode(&mut out);
            }
            RequestRef::FileName { handle } => {
                out.string(&self.get(handle)?.name);
            }
            other => return Err(invalid(format!("{} is not a filesystem message", other.name()))),
        }
        Ok(out.into_bytes())
    }
}
