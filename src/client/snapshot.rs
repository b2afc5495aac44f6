//! Snapshots of a guest's root ([`Instance::snapshot`](super::instance::Instance::snapshot)):
//! values, not handles. A [`Snapshot`] names a record the image store keeps (see
//! [`crate::image::snapshot`]): it outlives the instance it was taken of, boots other
//! instances ([`Snapshot::image`]), in this process or any other, and is kept under a
//! name with [`Snapshot::commit`].

use std::path::{Path, PathBuf};

use super::transport::{answer, Transport};
use crate::error::{Error, Result};
use crate::image::snapshot::{self, Record};
use crate::wire::{self, Request, SnapshotOptions as WireOptions};

/// What [`Instance::snapshot`](super::instance::Instance::snapshot) leaves out, and where
/// it stores the layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Guest paths left out, with what lies under them; `*` and `?` match within one
    /// path component (`/var/cache`, `/root/*.tmp`).
    pub excludes: Vec<String>,
    /// The cache (its `images/` store and `snapshots/` records) to keep it in; `None`:
    /// the instance's.
    pub cache_dir: Option<PathBuf>,
}

/// A stored snapshot: the changes of a guest's root as a layer on top of its parent
/// (another snapshot, or the image a chain starts from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    cache: PathBuf,
    record: Record,
}

impl Snapshot {
    pub(super) fn take(t: &Transport, opts: &SnapshotOptions) -> Result<Snapshot> {
        let cache_dir = opts.cache_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let req = Request::FsSnapshot { opts: WireOptions { excludes: opts.excludes.clone(), cache_dir } };
        let handle = answer!(t, req, FsSnapshot { handle });
        let located = (|| {
            let (_, path) = answer!(
                t,
                Request::SnapshotAsSource { handle },
                SnapshotAsSource { source_type, source_path }
            );
            Snapshot::at(Path::new(&path))
        })();
        let _ = t.call(&Request::SnapshotClose { handle });
        located
    }

    /// The snapshot whose record is at `path` (`CACHE/snapshots/KEY`).
    pub fn at(path: &Path) -> Result<Snapshot> {
        let bad = || Error::InvalidArgument {
            op: "snapshot".into(),
            message: format!("{}: not a snapshot record path (CACHE/snapshots/KEY)", path.display()),
        };
        let key = path.file_name().and_then(|k| k.to_str()).ok_or_else(bad)?;
        let dir =
            path.parent().filter(|d| d.file_name().is_some_and(|n| n == "snapshots")).ok_or_else(bad)?;
        let cache = dir.parent().ok_or_else(bad)?;
        Snapshot::open(cache, key)
    }

    /// The snapshot `key` in `cache` (the default cache: [`crate::image::cache_dir`]).
    pub fn open(cache: &Path, key: &str) -> Result<Snapshot> {
        Ok(Snapshot { cache: cache.to_path_buf(), record: snapshot::load(cache, key)? })
    }

    /// Its key: 32 hex digits derived from its content and its parent's key, the same
    /// for the same changes on the same parent, on any run and machine.
    pub fn cache_key(&self) -> &str {
        &self.record.key
    }

    /// Its parent: the snapshot it was taken on top of, or the image a chain starts
    /// from; `None` past that image.
    pub fn parent(&self) -> Result<Option<Snapshot>> {
        match &self.record.parent {
            Some(p) => Snapshot::open(&self.cache, p).map(Some),
            None => Ok(None),
        }
    }

    /// Where its record is: what InstanceNew takes as source type 3.
    pub fn path(&self) -> PathBuf {
        snapshot::records_dir(&self.cache).join(&self.record.key)
    }

    /// It as an image to boot: the parent's root with its changes, and the
    /// configuration (entrypoint, environment, ...) of the image the chain starts from.
    pub fn image(&self) -> super::instance::Image {
        super::instance::Image::Snapshot(self.path())
    }

    /// Keeps it in the image store as `name` (`app`, `app:2`, `localhost:5000/app:2`),
    /// as `docker commit` names an image: `vmhost run --image NAME` boots it, and the
    /// store's export and push take it. Returns the name as stored.
    pub fn commit(&self, name: &str) -> Result<String> {
        let store = crate::image::store::Store::open(self.cache.join("images"))?;
        snapshot::commit(&store, &self.record, name)
    }
}
