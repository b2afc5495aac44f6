//! The snapshot family: FsSnapshot (0x0212) and SnapshotCacheKey, SnapshotParent,
//! SnapshotClose, SnapshotAsSource (0x0600-0x0603).
//!
//! FsSnapshot stores the guest root's changes since boot as a layer on top of the
//! image the instance booted ([`crate::image::snapshot`]) and answers a handle. The
//! handles belong to the helper, not to the instance: they stay valid after
//! InstanceClose, so that SnapshotAsSource's answer boots the next instance of the same
//! helper (InstanceNew source type 3), and closing one never touches a running
//! instance or another handle. A handle is a name for a stored record: SnapshotClose
//! forgets the name, the layers stay until a prune.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{frame, HandlerResult};
use crate::error::Error;
use crate::image::snapshot::{self, Record};
use crate::image::store::Store;
use crate::vm::agent_link::AgentLink;
use crate::wire::{ErrorCode, ErrorFrame, Request, Response, SourceType};

/// A snapshot handle: a record in a cache.
#[derive(Debug)]
pub(super) struct Snap {
    pub(super) cache: PathBuf,
    pub(super) record: Record,
}

/// What an instance's snapshots start from, in its cache.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub(crate) cache: PathBuf,
    pub(crate) base: Base,
}

/// The base of an instance's snapshots.
#[derive(Debug, Clone)]
pub(crate) enum Base {
    /// A container image or a snapshot, recorded.
    Image(Record),
    /// A root filesystem (the default image, a directory, a tar), recorded as an image at
    /// its first snapshot ([`snapshot::root_image`]), with its identity when the guest
    /// booted ([`snapshot::root_identity`]).
    Root(crate::image::rootfs::Source, Option<String>),
}

/// Whether `req` is one of the handle messages (served with or without an instance).
pub(super) fn is_handle_message(req: &Request) -> bool {
    matches!(
        req,
        Request::SnapshotCacheKey { .. }
            | Request::SnapshotParent { .. }
            | Request::SnapshotClose { .. }
            | Request::SnapshotAsSource { .. }
    )
}

/// Serves SnapshotCacheKey, SnapshotParent, SnapshotClose, SnapshotAsSource.
pub(super) fn serve_handle(
    table: &parking_lot::Mutex<super::table::Table<Arc<Snap>>>,
    handle: &dyn Fn() -> u64,
    req: Request,
) -> HandlerResult {
    let op = req.name();
    match req {
        Request::SnapshotCacheKey { handle: h } => {
            let s = table.lock().get(h, "snapshot")?;
            Ok(Response::SnapshotCacheKey { key: s.record.key.clone() }.into())
        }
        Request::SnapshotParent { handle: h } => {
            let s = table.lock().get(h, "snapshot")?;
            let Some(parent) = &s.record.parent else {
                return Ok(Response::SnapshotParent { handle: 0 }.into());
            };
            let record = snapshot::load(&s.cache, parent).map_err(|e| frame(&e, ""))?;
            let h = handle();
            table.lock().insert(h, Arc::new(Snap { cache: s.cache.clone(), record }));
            Ok(Response::SnapshotParent { handle: h }.into())
        }
        Request::SnapshotClose { handle: h } => {
            table.lock().remove(h, "snapshot")?;
            Ok(Response::SnapshotClose {}.into())
        }
        Request::SnapshotAsSource { handle: h } => {
            let s = table.lock().get(h, "snapshot")?;
            let path = snapshot::records_dir(&s.cache).join(&s.record.key);
            Ok(Response::SnapshotAsSource {
                source_type: SourceType::Snapshot as u8,
                source_path: path.to_string_lossy().into_owned(),
            }
            .into())
        }
        other => Err(ErrorFrame::new(
            ErrorCode::InvalidArgument,
            op,
            format!("{} is not a snapshot message", other.name()),
        )),
    }
}

/// Serves FsSnapshot on a running instance whose snapshots start from `origin`; gives
/// up when `cancelled` says so.
pub(super) fn take(
    agent: &AgentLink,
    origin: Option<&Origin>,
    excludes: &[String],
    cache_dir: &str,
    cancelled: &dyn Fn() -> bool,
) -> Result<Snap, Error> {
    let Some(origin) = origin else {
        return Err(Error::InvalidArgument {
            op: "FsSnapshot".into(),
            message: "this instance's root has no recorded source to snapshot on top of".into(),
        });
    };
    let base = match &origin.base {
        Base::Image(r) => r.clone(),
        Base::Root(source, booted) => {
            let store = Store::open(origin.cache.join("images"))?;
            let _lease = store.lease()?;
            let quiet = crate::progress::Progress::quiet();
            let img = snapshot::root_image(&origin.cache, &store, source, booted.as_deref(), &quiet)?;
            snapshot::base(&origin.cache, &img)?
        }
    };
    let cache = if cache_dir.is_empty() {
        origin.cache.clone()
    } else {
        // Absolute, so that the record's path (SnapshotAsSource) means the same anywhere.
        std::fs::create_dir_all(cache_dir).map_err(|e| Error::io("create the cache", cache_dir, e))?;
        std::fs::canonicalize(cache_dir).map_err(|e| Error::io("find the cache", cache_dir, e))?
    };
    let parent = if cache == origin.cache { base } else { carry(&origin.cache, &cache, &base)? };
    let store = Store::open(cache.join("images"))?;
    // Held from before the guest pauses until the record references the layer: a prune
    // waits, rather than the guest waiting on a prune. The parent is checked first too.
    let _lease = store.lease()?;
    snapshot::image(&store, &parent)?;
    let mut layer = crate::vm::snapshot::GuestLayer::start(agent, excludes, true, cancelled)?;
    let ingested = snapshot::ingest(&store, &mut layer);
    let walk = layer.finish();
    // A host that stopped reading (the size bound, a full disk, a cancel) ended the walk
    // with a broken pipe: its own error says why. Else the walk's: a layer the guest
    // could not finish is no snapshot, whatever the archive looks like.
    let ingested = ingested?;
    walk?;
    let record = snapshot::record(&cache, &store, &parent, &ingested, "vmhost snapshot")?;
    Ok(Snap { cache, record })
}

/// Copies `record`'s chain and image from the cache `from` into the cache `to` (hard
/// links where they share a filesystem), so that a snapshot stored in `to` has its
/// parent there. Returns the record as `to` has it.
fn carry(from: &Path, to: &Path, record: &Record) -> Result<Record, Error> {
    let from_store = Store::open(from.join("images"))?;
    let to_store = Store::open(to.join("images"))?;
    let _lease = to_store.lease()?;
    let mut r = Some(record.clone());
    while let Some(rec) = r {
        let img = snapshot::image(&from_store, &rec)?;
        let mut blobs = vec![rec.manifest.clone(), img.manifest.config.digest.clone()];
        blobs.extend(img.manifest.layers.iter().map(|l| l.digest.clone()));
        for d in blobs {
            if to_store.has(&d) {
                continue;
            }
            let (src, dst) = (from_store.blob_path(&d), to_store.blob_path(&d));
            if std::fs::hard_link(&src, &dst).is_err() {
                let tmp = dst.with_extension(crate::image::unique_suffix());
                std::fs::copy(&src, &tmp).map_err(|e| Error::io("copy blob", &src, e))?;
                std::fs::rename(&tmp, &dst).map_err(|e| Error::io("publish blob", &dst, e))?;
            }
        }
        let (src, dst) =
            (snapshot::records_dir(from).join(&rec.key), snapshot::records_dir(to).join(&rec.key));
        if !dst.exists() {
            let data = std::fs::read(&src).map_err(|e| Error::io("read snapshot record", &src, e))?;
            crate::image::write_atomic(&dst, &data)?;
        }
        // An ancestor a prune took is not needed to boot this one (its image lists
        // every layer): the chain stops there.
        r = rec.parent.as_ref().and_then(|p| snapshot::load(from, p).ok());
    }
    Ok(record.clone())
}
