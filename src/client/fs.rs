//! The guest's filesystem, like [`std::fs`]: [`Fs`] from [`Instance::fs`](crate::Instance::fs), a guest
//! [`File`] that implements [`Read`], [`Write`] and [`Seek`], and [`OpenOptions`].
//!
//! Every call is one or a few helper-protocol requests (Fs* and File* messages; see
//! `docs/protocol.md`). Large reads and writes are split under the frame bounds
//! without the caller noticing: [`Fs::read`] of a 100 MiB file reads it in 1 MiB
//! chunks through a handle.
//!
//! ```no_run
//! use std::io::{Read, Seek, SeekFrom, Write};
//! use vmhost::{Image, Instance};
//! let vm = Instance::new(Image::Default, Default::default())?;
//! let fs = vm.fs();
//! fs.create_dir_all("/work/out")?;
//! fs.write("/work/in.txt", b"hello\n")?;
//! assert_eq!(fs.read_to_string("/work/in.txt")?, "hello\n");
//! let mut f = fs.options().read(true).write(true).create(true).open("/work/log")?;
//! f.write_all(b"abc")?;
//! f.seek(SeekFrom::Start(1))?;
//! let mut s = String::new();
//! f.read_to_string(&mut s)?;
//! assert_eq!(s, "bc");
//! assert!(fs.metadata("/work/out")?.is_dir());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::libc;

use super::transport::{answer, unexpected, Transport};
use crate::error::{Error, Result};
use crate::wire::{self, FileInfo, FileMode, Request};

/// The most one FileRead asks for: well within one helper answer (64 MiB), which the
/// helper fills from the guest a frame at a time.
pub const READ_CHUNK: usize = 8 << 20;
/// The most one FileWrite carries (the helper splits it for the guest).
pub const WRITE_CHUNK: usize = 8 << 20;
/// Data up to this size goes in one FsWriteFile; larger data through a handle.
const WHOLE_WRITE: usize = 32 << 20;

/// The guest's filesystem. Paths are the guest's; relative ones start at `/`.
#[derive(Debug, Clone, Copy)]
pub struct Fs<'a> {
    t: &'a Transport,
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str().map(str::to_string).ok_or_else(|| Error::InvalidArgument {
        op: "guest path".into(),
        message: format!("{} is not UTF-8", p.display()),
    })
}

fn secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

impl<'a> Fs<'a> {
    pub(super) fn new(t: &'a Transport) -> Fs<'a> {
        Fs { t }
    }

    /// Sends a request whose answer has no fields.
    fn call(&self, req: Request) -> Result<()> {
        self.t.call(&req)
    }

    fn info(&self, req: Request) -> Result<Metadata> {
        match self.t.answer(&req)? {
            wire::Response::FsStat { info } | wire::Response::FsLstat { info } => Ok(Metadata { info }),
            other => Err(unexpected(&req, &other)),
        }
    }

    /// The whole contents of a file.
    pub fn read(&self, path: impl AsRef<Path>) -> Result<Vec<u8>> {
        let p = path_str(path.as_ref())?;
        match self.t.answer(&Request::FsReadFile { path: p.clone() }) {
            Ok(wire::Response::FsReadFile { data }) => Ok(data),
            Ok(other) => Err(unexpected(&Request::FsReadFile { path: p }, &other)),
            // Larger than one answer: through a handle, chunk by chunk.
            // EFBIG: larger than one answer.
            Err(Error::Remote(ef)) if ef.errno == Some(nix::libc::EFBIG) => {
                let f = self.open(&p)?;
                let mut data = Vec::new();
                loop {
                    let chunk = f.read_some(READ_CHUNK)?;
                    if chunk.is_empty() {
                        break;
                    }
                    data.extend_from_slice(&chunk);
                }
                f.close()?;
                Ok(data)
            }
            Err(e) => Err(e),
        }
    }

    /// The whole contents of a file, which must be UTF-8.
    pub fn read_to_string(&self, path: impl AsRef<Path>) -> Result<String> {
        let p = path.as_ref();
        String::from_utf8(self.read(p)?).map_err(|_| Error::InvalidArgument {
            op: "read_to_string".into(),
            message: format!("{} is not UTF-8", p.display()),
        })
    }

    /// Creates or truncates a file (mode 0666 less the guest's umask) with `data`.
    pub fn write(&self, path: impl AsRef<Path>, data: impl AsRef<[u8]>) -> Result<()> {
        let p = path_str(path.as_ref())?;
        let data = data.as_ref();
        if data.len() <= WHOLE_WRITE {
            let req = Request::FsWriteFile { path: p, data: data.to_vec(), perm: FileMode(0o666) };
            return self.call(req);
        }
        let f = self.create(&p)?;
        for chunk in data.chunks(WRITE_CHUNK) {
            f.write_some(chunk)?;
        }
        f.close()
    }

    /// Metadata, following symbolic links.
    pub fn metadata(&self, path: impl AsRef<Path>) -> Result<Metadata> {
        self.info(Request::FsStat { path: path_str(path.as_ref())? })
    }

    /// Metadata of the path itself (a symbolic link is not followed).
    pub fn symlink_metadata(&self, path: impl AsRef<Path>) -> Result<Metadata> {
        self.info(Request::FsLstat { path: path_str(path.as_ref())? })
    }

    /// Whether the path exists (following symbolic links).
    pub fn exists(&self, path: impl AsRef<Path>) -> Result<bool> {
        match self.metadata(path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The entries of a directory, sorted by name, without `.` and `..`.
    pub fn read_dir(&self, path: impl AsRef<Path>) -> Result<ReadDir> {
        let dir = path.as_ref().to_path_buf();
        let entries = answer!(self.t, Request::FsReadDir { path: path_str(&dir)? }, FsReadDir { entries });
        let entries: Vec<DirEntry> =
            entries.into_iter().map(|e| DirEntry { path: dir.join(&e.name), entry: e }).collect();
        Ok(ReadDir { entries: entries.into_iter() })
    }

    /// Creates a directory (mode 0777 less the guest's umask); its parent must exist.
    pub fn create_dir(&self, path: impl AsRef<Path>) -> Result<()> {
        self.call(Request::FsMkdir { path: path_str(path.as_ref())?, perm: FileMode(0o777) })
    }

    /// Creates a directory and any missing parents; an existing directory is fine.
    pub fn create_dir_all(&self, path: impl AsRef<Path>) -> Result<()> {
        self.call(Request::FsMkdirAll { path: path_str(path.as_ref())?, perm: FileMode(0o777) })
    }

    fn remove_kind(&self, path: &Path, want_dir: bool) -> Result<()> {
        let p = path_str(path)?;
        // FsRemove removes a file or an empty directory (Go's os.Remove): check which
        // first, as std's remove_file and remove_dir each take one kind only.
        let m = self.symlink_metadata(path)?;
        if m.is_dir() != want_dir {
            let msg = if want_dir { "Not a directory" } else { "Is a directory" };
            return Err(Error::Remote(
                wire::ErrorFrame::new(wire::ErrorCode::Io, "FsRemove", msg).with_path(p),
            ));
        }
        self.call(Request::FsRemove { path: p })
    }

    /// Removes a file or symbolic link (not a directory).
    pub fn remove_file(&self, path: impl AsRef<Path>) -> Result<()> {
        self.remove_kind(path.as_ref(), false)
    }

    /// Removes an empty directory.
    pub fn remove_dir(&self, path: impl AsRef<Path>) -> Result<()> {
        self.remove_kind(path.as_ref(), true)
    }

    /// Removes a directory and everything in it.
    pub fn remove_dir_all(&self, path: impl AsRef<Path>) -> Result<()> {
        let p = path_str(path.as_ref())?;
        let m = self.symlink_metadata(&p)?;
        if m.is_symlink() {
            // As std: the link goes, not what it points to.
            return self.call(Request::FsRemove { path: p });
        }
        if !m.is_dir() {
            let ef =
                wire::ErrorFrame::new(wire::ErrorCode::Io, "FsRemoveAll", "Not a directory").with_path(p);
            return Err(Error::Remote(ef));
        }
        self.call(Request::FsRemoveAll { path: p })
    }

    /// Renames a file or directory, replacing `to` if it is a file.
    pub fn rename(&self, from: impl AsRef<Path>, to: impl AsRef<Path>) -> Result<()> {
        self.call(Request::FsRename { from: path_str(from.as_ref())?, to: path_str(to.as_ref())? })
    }

    /// Makes `link` a symbolic link to `original` (as `std::os::unix::fs::symlink`).
    pub fn symlink(&self, original: impl AsRef<Path>, link: impl AsRef<Path>) -> Result<()> {
        let req = Request::FsSymlink { target: path_str(original.as_ref())?, link: path_str(link.as_ref())? };
        self.call(req)
    }

    /// The target of a symbolic link.
    pub fn read_link(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let target =
            answer!(self.t, Request::FsReadlink { path: path_str(path.as_ref())? }, FsReadlink { target });
        Ok(PathBuf::from(target))
    }

    /// Sets the permission bits (and setuid, setgid, sticky) of a path.
    pub fn set_permissions(&self, path: impl AsRef<Path>, perm: std::fs::Permissions) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mode = FileMode::from_unix(perm.mode() & 0o7777);
        self.call(Request::FsChmod { path: path_str(path.as_ref())?, mode })
    }

    /// Changes the owner and/or group (None leaves it), as `std::os::unix::fs::chown`.
    pub fn chown(&self, path: impl AsRef<Path>, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        let id = |v: Option<u32>| v.map_or(-1, |v| v as i32);
        self.call(Request::FsChown { path: path_str(path.as_ref())?, uid: id(uid), gid: id(gid) })
    }

    /// Sets the access and modification times (whole seconds).
    pub fn set_times(
        &self,
        path: impl AsRef<Path>,
        accessed: SystemTime,
        modified: SystemTime,
    ) -> Result<()> {
        let req = Request::FsChtimes {
            path: path_str(path.as_ref())?,
            atime: secs(accessed),
            mtime: secs(modified),
        };
        self.call(req)
    }

    /// Opens a file for reading.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<File<'a>> {
        let p = path_str(path.as_ref())?;
        self.open_with(Request::FsOpen { path: p.clone() }, p)
    }

    /// Creates or truncates a file and opens it for reading and writing.
    pub fn create(&self, path: impl AsRef<Path>) -> Result<File<'a>> {
        let p = path_str(path.as_ref())?;
        self.open_with(Request::FsCreate { path: p.clone() }, p)
    }

    /// Options for opening a file, as [`std::fs::OpenOptions`].
    pub fn options(&self) -> OpenOptions<'a> {
        OpenOptions {
            fs: *self,
            read: false,
            write: false,
            append: false,
            truncate: false,
            create: false,
            create_new: false,
            mode: 0o666,
        }
    }

    fn open_with(&self, req: Request, name: String) -> Result<File<'a>> {
        let handle = match self.t.answer(&req)? {
            wire::Response::FsOpen { handle }
            | wire::Response::FsCreate { handle }
            | wire::Response::FsOpenFile { handle } => handle,
            other => return Err(unexpected(&req, &other)),
        };
        Ok(File { t: self.t, handle, name, closed: false })
    }
}

/// Options for [`Fs::options`], like [`std::fs::OpenOptions`].
#[derive(Debug, Clone)]
pub struct OpenOptions<'a> {
    fs: Fs<'a>,
    read: bool,
    write: bool,
    append: bool,
    truncate: bool,
    create: bool,
    create_new: bool,
    mode: u32,
}

impl<'a> OpenOptions<'a> {
    /// Open for reading.
    pub fn read(&mut self, on: bool) -> &mut Self {
        self.read = on;
        self
    }
    /// Open for writing.
    pub fn write(&mut self, on: bool) -> &mut Self {
        self.write = on;
        self
    }
    /// Every write goes to the end.
    pub fn append(&mut self, on: bool) -> &mut Self {
        self.append = on;
        self
    }
    /// Truncate to 0 on opening.
    pub fn truncate(&mut self, on: bool) -> &mut Self {
        self.truncate = on;
        self
    }
    /// Create it when missing.
    pub fn create(&mut self, on: bool) -> &mut Self {
        self.create = on;
        self
    }
    /// Create it, failing if it exists.
    pub fn create_new(&mut self, on: bool) -> &mut Self {
        self.create_new = on;
        self
    }
    /// Permission bits for a created file (default 0666, less the guest's umask).
    pub fn mode(&mut self, mode: u32) -> &mut Self {
        self.mode = mode;
        self
    }

    /// The Linux `O_*` flags these options stand for.
    pub fn flags(&self) -> Result<i32> {
        let bad = |m: &str| Error::InvalidArgument { op: "open".into(), message: m.into() };
        let write = self.write || self.append;
        let mut f = match (self.read, write) {
            (true, false) => libc::O_RDONLY,
            (false, true) => libc::O_WRONLY,
            (true, true) => libc::O_RDWR,
            (false, false) => return Err(bad("neither read nor write access was asked for")),
        };
        if self.append {
            f |= libc::O_APPEND;
        }
        if self.truncate {
            if !write || self.append {
                return Err(bad("truncate needs write access without append"));
            }
            f |= libc::O_TRUNC;
        }
        if self.create_new {
            if !write {
                return Err(bad("create_new needs write access"));
            }
            f |= libc::O_CREAT | libc::O_EXCL;
        } else if self.create {
            if !write {
                return Err(bad("create needs write access"));
            }
            f |= libc::O_CREAT;
        }
        Ok(f)
    }

    /// Opens `path` with these options.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<File<'a>> {
        let p = path_str(path.as_ref())?;
        let req = Request::FsOpenFile {
            path: p.clone(),
            flags: self.flags()?,
            perm: FileMode::from_unix(self.mode & 0o7777),
        };
        self.fs.open_with(req, p)
    }
}

/// A file open in the guest. Closed on drop (errors then are only logged; call
/// [`File::close`] to see them).
pub struct File<'a> {
    t: &'a Transport,
    handle: u64,
    name: String,
    closed: bool,
}

impl<'a> File<'a> {
    /// A command pipe handle (CmdStdinPipe and friends), read and written like a file.
    pub(super) fn pipe(t: &'a Transport, handle: u64, stream: &str) -> File<'a> {
        File { t, handle, name: format!("|{stream}"), closed: false }
    }

    /// The name it was opened with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The helper's handle for it.
    pub fn handle(&self) -> u64 {
        self.handle
    }

    /// Its metadata.
    pub fn metadata(&self) -> Result<Metadata> {
        let info = answer!(self.t, Request::FileStat { handle: self.handle }, FileStat { info });
        Ok(Metadata { info })
    }

    /// Flushes its data and metadata to the guest's storage.
    pub fn sync_all(&self) -> Result<()> {
        self.t.call(&Request::FileSync { handle: self.handle })
    }

    /// Truncates or extends it to `size` bytes.
    pub fn set_len(&self, size: u64) -> Result<()> {
        self.t.call(&Request::FileTruncate { handle: self.handle, size: size as i64 })
    }

    /// Closes it, reporting any error.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        self.t.call(&Request::FileClose { handle: self.handle })
    }

    fn write_some(&self, data: &[u8]) -> Result<usize> {
        let written = answer!(
            self.t,
            Request::FileWrite { handle: self.handle, data: data.to_vec() },
            FileWrite { written }
        );
        Ok(written as usize)
    }

    fn read_some(&self, max: usize) -> Result<Vec<u8>> {
        let max = max.min(READ_CHUNK) as u32;
        Ok(answer!(self.t, Request::FileRead { handle: self.handle, max }, FileRead { data }))
    }
}

impl Read for File<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let data = self.read_some(buf.len())?;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        Ok(n)
    }

    fn read_to_end(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        // Whole chunks, not the small reads std's default would start with.
        let start = buf.len();
        loop {
            let data = self.read_some(READ_CHUNK)?;
            if data.is_empty() {
                return Ok(buf.len() - start);
            }
            buf.extend_from_slice(&data);
        }
    }
}

impl Write for File<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(self.write_some(&buf[..buf.len().min(WRITE_CHUNK)])?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(()) // writes are not buffered on this side
    }
}

impl Seek for File<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let (offset, whence) = match pos {
            SeekFrom::Start(n) => (n as i64, 0),
            SeekFrom::Current(n) => (n, 1),
            SeekFrom::End(n) => (n, 2),
        };
        let offset =
            answer!(self.t, Request::FileSeek { handle: self.handle, offset, whence }, FileSeek { offset });
        Ok(offset as u64)
    }
}

impl Drop for File<'_> {
    fn drop(&mut self) {
        if !self.closed {
            if let Err(e) = self.t.call(&Request::FileClose { handle: self.handle }) {
                log::debug!("closing guest file {} (handle {}): {e}", self.name, self.handle);
            }
        }
    }
}

impl std::fmt::Debug for File<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("File").field("name", &self.name).field("handle", &self.handle).finish()
    }
}

/// Metadata of a guest file, like [`std::fs::Metadata`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    info: FileInfo,
}

impl Metadata {
    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.info.size.max(0) as u64
    }
    /// Whether the size is 0.
    pub fn is_empty(&self) -> bool {
        self.info.size == 0
    }
    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        self.info.is_dir
    }
    /// Whether it is a regular file.
    pub fn is_file(&self) -> bool {
        self.info.mode.is_regular()
    }
    /// Whether it is a symbolic link (only from [`Fs::symlink_metadata`]).
    pub fn is_symlink(&self) -> bool {
        self.info.is_symlink
    }
    /// Permission bits, as [`std::fs::Permissions`].
    pub fn permissions(&self) -> std::fs::Permissions {
        use std::os::unix::fs::PermissionsExt;
        std::fs::Permissions::from_mode(self.info.mode.to_unix_perm())
    }
    /// The Go `FileMode` bits the protocol carries (type and permissions).
    pub fn file_mode(&self) -> FileMode {
        self.info.mode
    }
    /// Modification time (whole seconds).
    pub fn modified(&self) -> SystemTime {
        let t = self.info.mod_time;
        if t >= 0 {
            UNIX_EPOCH + Duration::from_secs(t as u64)
        } else {
            UNIX_EPOCH - Duration::from_secs(t.unsigned_abs())
        }
    }
    /// The base name of the path it was asked for.
    pub fn name(&self) -> &str {
        &self.info.name
    }
}

/// An entry of [`Fs::read_dir`].
#[derive(Debug, Clone)]
pub struct DirEntry {
    path: PathBuf,
    entry: wire::DirEntry,
}

impl DirEntry {
    /// Its name in the directory.
    pub fn file_name(&self) -> &str {
        &self.entry.name
    }
    /// The directory's path joined with its name.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Whether it is a directory (a symbolic link to one is not).
    pub fn is_dir(&self) -> bool {
        self.entry.is_dir
    }
    /// Whether it is a symbolic link.
    pub fn is_symlink(&self) -> bool {
        self.entry.mode.is_symlink()
    }
    /// Whether it is a regular file.
    pub fn is_file(&self) -> bool {
        self.entry.mode.is_regular()
    }
    /// Its Go `FileMode` bits (type and permissions, of the entry itself).
    pub fn file_mode(&self) -> FileMode {
        self.entry.mode
    }
}

/// The entries of a directory, from [`Fs::read_dir`].
#[derive(Debug)]
pub struct ReadDir {
    entries: std::vec::IntoIter<DirEntry>,
}

impl Iterator for ReadDir {
    type Item = Result<DirEntry>;
    fn next(&mut self) -> Option<Result<DirEntry>> {
        self.entries.next().map(Ok)
    }
}
