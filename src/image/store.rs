//! [`Store`]: the content-addressed store of image blobs (manifests, configs, layers),
//! shared by every image that has them, in the cache directory. Modelled on containerd's
//! content store:
//!
//! ```text
//! STORE/blobs/sha256/HEX      verified content, read-only, never changed in place
//! STORE/ingest/sha256-HEX     a blob being written (a download resumes from its length)
//! STORE/locks/sha256-HEX      flock(2)ed by the one writer of that blob
//! STORE/refs/NAME             what a reference (registry/repo:tag) was last resolved to
//! STORE/locks/store           shared by pulls, imports and boots, exclusive for a prune
//! ```
//!
//! A blob appears under `blobs/` only by rename, after its size and digest were checked
//! and its bytes synced: a pull killed at any point leaves nothing there that a later run
//! would trust. Two processes pulling the same image at once take turns per blob (the
//! second finds it present when it gets the lock). A pull, an import or a boot holds a
//! [`Lease`] while the blobs and roots it uses are not yet kept by a reference (or by the
//! open file of a running VM); a prune waits for every lease to end, and holds the
//! others off while it runs.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::digest::{Digest, Hasher};
use crate::error::{Error, Result};

/// A content-addressed blob store in a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// What [`Store::ingest`] found.
#[derive(Debug)]
pub enum Ingest {
    /// The blob is in the store already.
    Present,
    /// The blob is to be written: a writer holding its lock, resuming at
    /// [`BlobWriter::offset`].
    Write(Box<BlobWriter>),
}

impl Store {
    /// The store under `root`, made if missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        for sub in ["blobs/sha256", "blobs/sha512", "ingest", "locks", "refs"] {
            let d = root.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| Error::io("create the image store", &d, e))?;
        }
        Ok(Store { root })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` is (or would be).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join(digest.algorithm().as_str()).join(digest.hex())
    }

    fn name(digest: &Digest) -> String {
        format!("{}-{}", digest.algorithm().as_str(), digest.hex())
    }

    /// Whether the blob is in the store.
    pub fn has(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// The blob's size, if present.
    pub fn size(&self, digest: &Digest) -> Option<u64> {
        std::fs::metadata(self.blob_path(digest)).ok().filter(|m| m.is_file()).map(|m| m.len())
    }

    /// Opens a present blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let p = self.blob_path(digest);
        File::open(&p).map_err(|e| Error::io("open blob", &p, e))
    }

    /// Reads a whole present blob of at most `max` bytes (a manifest, a config).
    pub fn read(&self, digest: &Digest, max: u64) -> Result<Vec<u8>> {
        let f = self.open_blob(digest)?;
        let len = f.metadata().map_err(|e| Error::io("stat blob", self.blob_path(digest), e))?.len();
        if len > max {
            return Err(Error::InvalidArgument {
                op: "read blob".into(),
                message: format!("{digest} is {len} bytes, more than the {max} this blob may have"),
            });
        }
        let mut data = Vec::with_capacity(len as usize);
        f.take(max + 1)
            .read_to_end(&mut data)
            .map_err(|e| Error::io("read blob", self.blob_path(digest), e))?;
        Ok(data)
    }

    /// Starts writing the blob `digest` of `size` bytes (when known), or finds it
    /// present. Blocks while another writer (thread or process) holds the blob's lock.
    pub fn ingest(&self, digest: &Digest, size: Option<u64>) -> Result<Ingest> {
        if self.has(digest) {
            return Ok(Ingest::Present);
        }
        let lock = lock_exclusive(&self.root.join("locks").join(Store::name(digest)))?;
        if self.has(digest) {
            return Ok(Ingest::Present);
        }
        let partial = self.root.join("ingest").join(Store::name(digest));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&partial)
            .map_err(|e| Error::io("open partial blob", &partial, e))?;
        // What an earlier, interrupted writer left: hash it again and go on from its end
        // (unless it is longer than the blob can be).
        let mut hasher = digest.hasher();
        let mut offset = 0u64;
        let have = file.metadata().map_err(|e| Error::io("stat partial blob", &partial, e))?.len();
        if have > 0 && size.is_none_or(|s| have <= s) {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).map_err(|e| Error::io("read partial blob", &partial, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                offset += n as u64;
            }
        } else if have > 0 {
            file.set_len(0).map_err(|e| Error::io("truncate partial blob", &partial, e))?;
        }
        file.seek(SeekFrom::Start(offset)).map_err(|e| Error::io("seek partial blob", &partial, e))?;
        Ok(Ingest::Write(Box::new(BlobWriter {
            digest: digest.clone(),
            size,
            file,
            partial,
            target: self.blob_path(digest),
            hasher,
            offset,
            _lock: lock,
        })))
    }

    /// Stores `data` (small blobs: manifests, configs) and returns its SHA-256 digest.
    pub fn put(&self, data: &[u8]) -> Result<Digest> {
        let digest = Digest::sha256_of(data);
        self.put_verified(&digest, data)?;
        Ok(digest)
    }

    /// Stores `data`, which must have `digest`.
    pub fn put_verified(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        match self.ingest(digest, Some(data.len() as u64))? {
            Ingest::Present => Ok(()),
            Ingest::Write(mut w) => {
                w.reset()?;
                w.write_all(data).map_err(|e| Error::io("write blob", &w.partial, e))?;
                w.commit()
            }
        }
    }

    /// Stores what `data` yields, whose digest is not known before (a `docker save`
    /// layer): written under a temporary name while hashed, then renamed to its SHA-256
    /// digest. At most `max` bytes. Returns the digest and the size.
    pub fn put_stream(&self, data: &mut dyn Read, max: u64) -> Result<(Digest, u64)> {
        let tmp = self.root.join("ingest").join(format!("stream-{}", super::unique_suffix()));
        let mut f = File::create(&tmp).map_err(|e| Error::io("create blob", &tmp, e))?;
        let mut h = Hasher::new(super::digest::Algorithm::Sha256);
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        let written = (|| -> std::io::Result<()> {
            loop {
                let k = data.read(&mut buf)?;
                if k == 0 {
                    return Ok(());
                }
                n += k as u64;
                if n > max {
                    return Err(std::io::Error::other(format!("more than {max} bytes")));
                }
                h.update(&buf[..k]);
                f.write_all(&buf[..k])?;
            }
        })()
        .and_then(|()| f.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io("write blob", &tmp, e));
        }
        let digest = h.finish();
        if self.has(&digest) {
            let _ = std::fs::remove_file(&tmp);
        } else {
            let target = self.blob_path(&digest);
            if let Err(e) = std::fs::rename(&tmp, &target) {
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::io("publish blob", &target, e));
            }
        }
        Ok((digest, n))
    }

    /// Every blob in the store.
    pub fn blobs(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        for alg in ["sha256", "sha512"] {
            let dir = self.root.join("blobs").join(alg);
            let entries = std::fs::read_dir(&dir).map_err(|e| Error::io("list blobs", &dir, e))?;
            for e in entries.flatten() {
                if let Some(d) = e.file_name().to_str().and_then(|h| format!("{alg}:{h}").parse().ok()) {
                    out.push(d);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes a blob (whoever has it open keeps reading it).
    pub fn remove_blob(&self, digest: &Digest) -> Result<()> {
        let p = self.blob_path(digest);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove blob", &p, e)),
        }
    }

    /// A shared hold on the whole store (see the module's documentation): a prune waits
    /// until it is dropped.
    pub fn lease(&self) -> Result<Lease> {
        Ok(Lease { _lock: flock(&self.root.join("locks").join("store"), nix::libc::LOCK_SH)? })
    }

    /// The exclusive hold a prune takes: waits for every [`Lease`] to end.
    pub fn lock_for_prune(&self) -> Result<Lease> {
        Ok(Lease { _lock: flock(&self.root.join("locks").join("store"), nix::libc::LOCK_EX)? })
    }

    /// Records that `name` (a normalised reference) resolved to the manifest `digest`.
    pub fn set_ref(&self, name: &str, digest: &Digest) -> Result<()> {
        let p = self.ref_path(name);
        let body = serde_json::json!({ "reference": name, "digest": digest.to_string() });
        super::write_atomic(&p, body.to_string().as_bytes())
    }

    /// What `name` last resolved to, if anything.
    pub fn get_ref(&self, name: &str) -> Result<Option<Digest>> {
        let p = self.ref_path(name);
        let text = match std::fs::read(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read image reference", &p, e)),
        };
        let bad = |why: String| Error::InvalidArgument { op: "read image reference".into(), message: why };
        let v: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| bad(format!("{}: {e}", p.display())))?;
        let d = v["digest"].as_str().ok_or_else(|| bad(format!("{}: no digest", p.display())))?;
        d.parse().map(Some).map_err(|e| bad(format!("{}: {e}", p.display())))
    }

    /// Every recorded reference and its manifest digest.
    pub fn refs(&self) -> Result<Vec<(String, Digest)>> {
        let dir = self.root.join("refs");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io("list image references", &dir, e))?.flatten() {
            // A reference's file, not a temporary one a killed write left (write_atomic's).
            let Some(name) = e.file_name().to_str().and_then(unescape) else { continue };
            if name.contains(".tmp.") {
                continue;
            }
            match self.get_ref(&name) {
                Ok(Some(d)) => out.push((name, d)),
                Ok(None) => {}
                Err(err) => log::warn!("image reference {name}: {err}; skipped"),
            }
        }
        out.sort();
        Ok(out)
    }

    /// Forgets a reference; whether it was there.
    pub fn remove_ref(&self, name: &str) -> Result<bool> {
        let p = self.ref_path(name);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("remove image reference", &p, e)),
        }
    }

    fn ref_path(&self, name: &str) -> PathBuf {
        self.root.join("refs").join(escape(name))
    }
}

/// A reference as one file name: `%` escapes for `/`, `:`, `@` and `%`.
fn escape(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '/' => s.push_str("%2F"),
            ':' => s.push_str("%3A"),
            '@' => s.push_str("%40"),
            '%' => s.push_str("%25"),
            c => s.push(c),
        }
    }
    s
}

fn unescape(file: &str) -> Option<String> {
    let mut s = String::with_capacity(file.len());
    let mut rest = file;
    while let Some(i) = rest.find('%') {
        s.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3)?;
        s.push(match code {
            "2F" => '/',
            "3A" => ':',
            "40" => '@',
            "25" => '%',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    s.push_str(rest);
    Some(s)
}

/// A hold on the store from [`Store::lease`] or [`Store::lock_for_prune`], released when
/// dropped.
#[derive(Debug)]
pub struct Lease {
    _lock: File,
}

/// An exclusive flock(2) on `path` (made if missing), held until the file is dropped.
pub fn lock_exclusive(path: &Path) -> Result<File> {
    flock(path, nix::libc::LOCK_EX)
}

/// A flock(2) of kind `how` on `path` (made if missing), held until the file is dropped.
fn flock(path: &Path, how: nix::libc::c_int) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open lock", path, e))?;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { nix::libc::flock(f.as_raw_fd(), how) } == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::io("lock", path, e));
        }
    }
}

/// Writes one blob: appends, then [`BlobWriter::commit`] checks and publishes it. Holds
/// the blob's lock until dropped. Dropped without a commit, what was written stays as
/// the partial blob, for the next writer to resume.
#[derive(Debug)]
pub struct BlobWriter {
    digest: Digest,
    size: Option<u64>,
    file: File,
    partial: PathBuf,
    target: PathBuf,
    hasher: Hasher,
    offset: u64,
    _lock: File,
}

impl BlobWriter {
    /// How many bytes are written (the resume point of a download).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The blob being written.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Drops what was written (the source cannot resume from [`BlobWriter::offset`]).
    pub fn reset(&mut self) -> Result<()> {
        self.file.set_len(0).map_err(|e| Error::io("truncate partial blob", &self.partial, e))?;
        self.file.seek(SeekFrom::Start(0)).map_err(|e| Error::io("seek partial blob", &self.partial, e))?;
        self.hasher = self.digest.hasher();
        self.offset = 0;
        Ok(())
    }

    /// Checks the size and the digest, syncs, and moves the blob into the store. A blob
    /// that does not match is deleted, and the error says what came instead.
    pub fn commit(mut self) -> Result<()> {
        if let Some(size) = self.size {
            if self.offset != size {
                let got = self.offset;
                self.discard();
                return Err(Error::InvalidArgument {
                    op: "verify blob".into(),
                    message: format!("{}: {got} bytes came, the descriptor says {size}", self.digest),
                });
            }
        }
        let got = std::mem::replace(&mut self.hasher, Hasher::new(self.digest.algorithm())).finish();
        if got != self.digest {
            self.discard();
            return Err(Error::InvalidArgument {
                op: "verify blob".into(),
                message: format!("expected {}, the content has {got}", self.digest),
            });
        }
        self.file.sync_all().map_err(|e| Error::io("sync blob", &self.partial, e))?;
        std::fs::rename(&self.partial, &self.target)
            .map_err(|e| Error::io("publish blob", &self.target, e))?;
        if let Some(dir) = self.target.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    fn discard(&self) {
        let _ = std::fs::remove_file(&self.partial);
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(size) = self.size {
            if self.offset + buf.len() as u64 > size {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: more than the {size} bytes its descriptor gives", self.digest),
                ));
            }
        }
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.offset += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TempDir;

    #[test]
    fn blobs_are_verified_published_by_rename_and_resumed() {
        let dir = TempDir::new("store");
        let store = Store::open(dir.path()).unwrap();
        let d = store.put(b"hello").unwrap();
        assert_eq!(d, Digest::sha256_of(b"hello"));
        assert_eq!(store.read(&d, 100).unwrap(), b"hello");
        assert!(store.read(&d, 4).is_err(), "a bound below the size refuses");
        assert!(matches!(store.ingest(&d, Some(5)).unwrap(), Ingest::Present));

        // A write interrupted halfway resumes from where it stopped.
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let want = Digest::sha256_of(&data);
        let Ingest::Write(mut w) = store.ingest(&want, Some(data.len() as u64)).unwrap() else { panic!() };
        w.write_all(&data[..40_000]).unwrap();
        drop(w);
        assert!(!store.has(&want), "nothing published before the commit");
        let Ingest::Write(mut w) = store.ingest(&want, Some(data.len() as u64)).unwrap() else { panic!() };
        assert_eq!(w.offset(), 40_000);
        w.write_all(&data[40_000..]).unwrap();
        assert!(w.write_all(b"x").is_err(), "no more than the descriptor's size");
        w.commit().unwrap();
        assert_eq!(std::fs::read(store.blob_path(&want)).unwrap(), data);
        assert!(std::fs::read_dir(dir.join("ingest")).unwrap().next().is_none());

        // Wrong content: refused, and nothing is left to resume from.
        let other = Digest::sha256_of(b"other");
        let Ingest::Write(mut w) = store.ingest(&other, Some(5)).unwrap() else { panic!() };
        w.write_all(b"wrong").unwrap();
        let e = w.commit().unwrap_err();
        assert!(e.to_string().contains(&other.to_string()), "{e}");
        assert!(!store.has(&other));
        let Ingest::Write(w) = store.ingest(&other, Some(5)).unwrap() else { panic!() };
        assert_eq!(w.offset(), 0);
        drop(w);
        // Too short.
        let Ingest::Write(mut w) = store.ingest(&other, Some(5)).unwrap() else { panic!() };
        w.write_all(b"oth").unwrap();
        assert!(w.commit().unwrap_err().to_string().contains("3 bytes came"));

        assert_eq!(store.blobs().unwrap(), {
            let mut v = vec![d.clone(), want.clone()];
            v.sort();
            v
        });
        store.remove_blob(&want).unwrap();
        assert!(!store.has(&want));
    }

    #[test]
    fn two_writers_of_one_blob_take_turns() {
        let dir = TempDir::new("store-lock");
        let store = Store::open(dir.path()).unwrap();
        let data = vec![7u8; 1 << 20];
        let d = Digest::sha256_of(&data);
        let Ingest::Write(mut first) = store.ingest(&d, Some(data.len() as u64)).unwrap() else { panic!() };
        let (s2, d2) = (store.clone(), d.clone());
        let second = std::thread::spawn(move || matches!(s2.ingest(&d2, None).unwrap(), Ingest::Present));
        // Time for the second to reach the lock; it then waits there, and finds the blob
        // published when it gets it (without the lock it would be told to write it).
        std::thread::sleep(std::time::Duration::from_millis(100));
        first.write_all(&data).unwrap();
        first.commit().unwrap();
        assert!(second.join().unwrap(), "and then finds the blob present");
    }

    #[test]
    fn references_are_recorded_by_name() {
        let dir = TempDir::new("store-refs");
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"m");
        let name = "localhost:5000/a/b:v1%x";
        assert_eq!(store.get_ref(name).unwrap(), None);
        store.set_ref(name, &d).unwrap();
        store.set_ref("docker.io/library/busybox:latest", &d).unwrap();
        assert_eq!(store.get_ref(name).unwrap(), Some(d.clone()));
        let names: Vec<String> = store.refs().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["docker.io/library/busybox:latest", name]);
        assert!(store.remove_ref(name).unwrap());
        assert!(!store.remove_ref(name).unwrap());
    }
}
