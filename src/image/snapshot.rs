//! Snapshots as images: a guest's changes since boot, stored as one OCI layer on top of
//! the image the guest booted, with a content-derived key, persisted with its chain.
//!
//! A snapshot is an image in the store like a pulled one: its manifest lists the
//! parent's layers and then the new one (an uncompressed tar,
//! `application/vnd.oci.image.layer.v1.tar`, as docker keeps a container's diff), its
//! configuration is the parent's with the layer's diff id and a history entry added.
//! So it boots, exports and pushes as any image does. Its record,
//! `<cache>/snapshots/<KEY>`, names that manifest and the parent's key; the image a
//! chain starts from has a record too (its parent: none).
//!
//! **Keys.** An image's key is the first 32 hex digits of SHA-256("vmhost-image", 0,
//! manifest digest). A snapshot's is the first 32 hex digits of SHA-256(parent key, 0,
//! content hash), the content hash being SHA-256 over the layer's members in archive
//! order, each as its path, kind, mode, owner, group, size, link target, device
//! numbers, extended attributes (sorted) and the SHA-256 of its data: everything the
//! layer says but the times, as BuildKit's content checksums leave times out. So the
//! same changes on the same parent give the same key on any run and machine; a change
//! of content, mode, owner or link target gives another. A second snapshot with a key
//! already recorded keeps the first one's image (the same content, other times).
//!
//! Records are kept until a prune: `vmhost image prune` removes the records whose image
//! no name keeps (a snapshot committed under a name stays, with its ancestors' records),
//! with their blobs. A snapshot's manifest carries its key (the annotation
//! [`super::oci::SNAPSHOT_KEY_ANNOTATION`]), so that booting it by a committed name
//! continues its chain.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::digest::Digest;
use super::oci::{media, Descriptor, Document, ImageConfig, Manifest, MAX_CONFIG, MAX_MANIFEST};
use super::pull::StoredImage;
use super::store::Store;
use super::tar;
use crate::error::{Error, Result};

/// The default bound on one snapshot's layer (`VMHOST_SNAPSHOT_MAX_MB` overrides it).
pub const DEFAULT_MAX_LAYER: u64 = 16 << 30;

/// A snapshot's (or a chain's base image's) record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its key (32 hex digits).
    pub key: String,
    /// The parent's key; `None` for the image a chain starts from.
    pub parent: Option<String>,
    /// The manifest of its image in the store.
    pub manifest: Digest,
    /// What it was made from: the image's name, or "snapshot of KEY".
    pub source: String,
}

fn bad(op: &str, message: impl Into<String>) -> Error {
    Error::InvalidArgument { op: op.into(), message: message.into() }
}

/// The directory of records under `cache`.
pub fn records_dir(cache: &Path) -> PathBuf {
    cache.join("snapshots")
}

/// Whether `s` has the form of a key (32 lowercase hex digits).
pub fn is_key(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn key_of(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0u8]);
        }
        h.update(p);
    }
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The key of a chain's base image.
pub fn image_key(manifest: &Digest) -> String {
    key_of(&[b"vmhost-image", manifest.to_string().as_bytes()])
}

/// Reads the record `key` from `cache`.
pub fn load(cache: &Path, key: &str) -> Result<Record> {
    if !is_key(key) {
        return Err(bad("snapshot", format!("{key:?} is not a snapshot key (32 hex digits)")));
    }
    let path = records_dir(cache).join(key);
    let data = std::fs::read(&path).map_err(|e| Error::io("read snapshot record", &path, e))?;
    if data.len() > 64 << 10 {
        return Err(bad("snapshot", format!("{}: not a snapshot record (too large)", path.display())));
    }
    let r: Record = serde_json::from_slice(&data)
        .map_err(|e| bad("snapshot", format!("{}: not a snapshot record: {e}", path.display())))?;
    if r.key != key {
        return Err(bad("snapshot", format!("{}: the record is for {}", path.display(), r.key)));
    }
    Ok(r)
}

fn save(cache: &Path, r: &Record) -> Result<()> {
    let data = serde_json::to_vec_pretty(r).map_err(|e| bad("snapshot", e.to_string()))?;
    super::write_atomic(&records_dir(cache).join(&r.key), &data)
}

/// The record of the image `img` as the base of a chain, made when missing.
pub fn base(cache: &Path, img: &StoredImage) -> Result<Record> {
    // A snapshot booted by another name (committed) is that snapshot.
    if let Some(key) = img.manifest.annotations.get(super::oci::SNAPSHOT_KEY_ANNOTATION) {
        if let Ok(r) = load(cache, key) {
            if r.manifest == img.manifest_digest {
                return Ok(r);
            }
        }
    }
    let key = image_key(&img.manifest_digest);
    if let Ok(r) = load(cache, &key) {
        return Ok(r);
    }
    let r = Record { key, parent: None, manifest: img.manifest_digest.clone(), source: img.name.clone() };
    save(cache, &r)?;
    Ok(r)
}

/// The image of a record, as the store has it; an error that says so when a prune has
/// removed part of it.
pub fn image(store: &Store, r: &Record) -> Result<StoredImage> {
    stored(store, &r.manifest, &r.source)?.ok_or_else(|| {
        bad(
            "snapshot",
            format!(
                "the image of snapshot {} is no longer in the store (pruned); take the snapshot again",
                r.key
            ),
        )
    })
}

/// The image of `manifest` in the store, named `name`; `None` when a part is missing.
fn stored(store: &Store, manifest: &Digest, name: &str) -> Result<Option<StoredImage>> {
    if !store.has(manifest) {
        return Ok(None);
    }
    let data = store.read(manifest, MAX_MANIFEST)?;
    let m = match Document::parse(&data, None).map_err(|e| bad("snapshot", e))? {
        Document::Manifest(m) => m,
        Document::Index(_) => return Err(bad("snapshot", format!("{manifest}: an index, not a manifest"))),
    };
    if !store.has(&m.config.digest) || m.layers.iter().any(|l| !store.has(&l.digest)) {
        return Ok(None);
    }
    let config =
        ImageConfig::parse(&store.read(&m.config.digest, MAX_CONFIG)?).map_err(|e| bad("snapshot", e))?;
    Ok(Some(StoredImage {
        name: name.to_string(),
        resolved: manifest.clone(),
        manifest_digest: manifest.clone(),
        manifest: m,
        config,
    }))
}

/// A root filesystem (the default image, a directory, a tar archive) as a one-layer image
/// in the store: the base of the snapshots of its instances, made once per content (the
/// source's identity: a directory's entries, a tar's size and time, the default image's
/// build) and again if a prune took it. Its configuration says nothing about how to run
/// (a root has no entrypoint); its layer holds the entries as the guest's initramfs had
/// them.
pub fn root_image(
    cache: &Path,
    store: &Store,
    source: &super::rootfs::Source,
    booted: Option<&str>,
    progress: &crate::progress::Progress,
) -> Result<StoredImage> {
    use super::rootfs::Source;
    let (source, id) = resolved_root(cache, source, progress)?;
    let name = match &source {
        Source::Dir(p) | Source::Tar(p) => p.display().to_string(),
        _ => String::new(),
    };
    // The layer is made from the source as it is now: only the source the guest booted.
    if booted != Some(id.hex().as_str()) {
        return Err(bad(
            "snapshot",
            format!(
                "the root {name} changed since the guest booted from it (or its state then is not known): \
                 a snapshot on top of it would mix two roots; boot it again to snapshot it"
            ),
        ));
    }
    let map = records_dir(cache).join("roots").join(id.hex());
    if let Some(d) = std::fs::read_to_string(&map).ok().and_then(|t| t.trim().parse::<Digest>().ok()) {
        if let Some(img) = stored(store, &d, &name)? {
            return Ok(img);
        }
    }
    progress.step(&format!("recording the root {name} as an image, for snapshots"));
    let tmp = records_dir(cache).join(format!(".layer-{}", super::unique_suffix()));
    std::fs::create_dir_all(records_dir(cache)).map_err(|e| Error::io("create", records_dir(cache), e))?;
    let made = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        let mut sink =
            super::tar_writer::LayerSink::new(super::tar_writer::Writer::new(std::io::BufWriter::new(file)));
        source.write_to(&mut sink, cache, progress)?;
        sink.tar
            .finish()
            .and_then(|mut w| std::io::Write::flush(&mut w))
            .map_err(|e| Error::io("write", &tmp, e))?;
        let mut f = std::fs::File::open(&tmp).map_err(|e| Error::io("open", &tmp, e))?;
        store.put_stream(&mut f, u64::MAX)
    })();
    let _ = std::fs::remove_file(&tmp);
    let (diff, size) = made?;
    let platform = super::oci::Platform::host();
    let config = serde_json::json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff.to_string()]},
        "history": [{"created_by": format!("vmhost root {name}"), "comment": "vmhost snapshot base"}],
    });
    let config = serde_json::to_vec(&config).map_err(|e| bad("snapshot", e.to_string()))?;
    let config_digest = store.put(&config)?;
    let manifest =
        Manifest::oci(config_digest, config.len() as u64, vec![Descriptor::of(media::OCI_LAYER, diff, size)]);
    let manifest = serde_json::to_vec(&manifest).map_err(|e| bad("snapshot", e.to_string()))?;
    let digest = store.put(&manifest)?;
    super::write_atomic(&map, digest.to_string().as_bytes())?;
    stored(store, &digest, &name)?
        .ok_or_else(|| bad("snapshot", format!("{digest}: stored and gone at once")))
}

/// The root `source` stands for (the default image: its busybox root) and its identity.
fn resolved_root(
    cache: &Path,
    source: &super::rootfs::Source,
    progress: &crate::progress::Progress,
) -> Result<(super::rootfs::Source, super::CacheKey)> {
    use super::rootfs::Source;
    let source = match source {
        Source::Default => Source::Dir(super::rootfs::busybox_root(cache, progress)?),
        Source::Disk(_) => return Err(bad("snapshot", "an image disk is not a root filesystem")),
        other => other.clone(),
    };
    let mut id = super::CacheKey::new();
    source.identity(&mut id)?;
    Ok((source, id))
}

/// The identity of the root `source` now (a directory's entries, a tar's size and time,
/// the default image's build): taken when a guest boots from it, so that its snapshots
/// are refused once the source has changed.
pub fn root_identity(cache: &Path, source: &super::rootfs::Source) -> Option<String> {
    resolved_root(cache, source, &crate::progress::Progress::quiet()).ok().map(|(_, id)| id.hex())
}

/// The bound on one layer: `VMHOST_SNAPSHOT_MAX_MB`, else [`DEFAULT_MAX_LAYER`].
pub fn max_layer() -> u64 {
    std::env::var("VMHOST_SNAPSHOT_MAX_MB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(DEFAULT_MAX_LAYER, |mb| mb.saturating_mul(1 << 20))
}

/// The content hash of a layer (see the module's documentation).
pub fn content_hash(layer: impl Read) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    tar::read(layer, |e, data| {
        let mut d = Sha256::new();
        loop {
            let n = data.read(&mut buf)?;
            if n == 0 {
                break;
            }
            d.update(&buf[..n]);
        }
        let mut xattrs = e.xattrs.clone();
        xattrs.sort();
        h.update(e.path.as_bytes());
        h.update([0]);
        // Fixed tags, not the enum's names: keys must not change with the code.
        let kind = match e.kind {
            tar::Kind::File => "file",
            tar::Kind::Hardlink => "hardlink",
            tar::Kind::Symlink => "symlink",
            tar::Kind::Char => "char",
            tar::Kind::Block => "block",
            tar::Kind::Dir => "dir",
            tar::Kind::Fifo => "fifo",
        };
        h.update(format!("{kind} {:o} {} {} {} ", e.mode, e.uid, e.gid, e.size).as_bytes());
        h.update(e.link.as_bytes());
        h.update([0]);
        h.update(format!("{}:{} {}", e.dev.0, e.dev.1, xattrs.len()).as_bytes());
        for (k, v) in &xattrs {
            h.update((k.len() as u64).to_be_bytes());
            h.update(k.as_bytes());
            h.update((v.len() as u64).to_be_bytes());
            h.update(v);
        }
        h.update(d.finalize());
        Ok(())
    })
    .map_err(|e| bad("snapshot", format!("the guest's layer is not a valid archive: {e}")))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The OCI media type of a layer of `media_type` (the same bytes).
fn oci_layer_type(media_type: &str) -> String {
    match media_type {
        media::DOCKER_LAYER_GZIP => media::OCI_LAYER_GZIP.to_string(),
        other => other.to_string(),
    }
}

/// A guest's layer in the store, not yet a snapshot ([`record`] makes it one).
#[derive(Debug, Clone)]
pub struct Ingested {
    /// Its digest (its diff id: it is stored uncompressed).
    pub digest: Digest,
    /// Its size.
    pub size: u64,
}

/// Stores `layer` (an uncompressed tar) in the store, at most [`max_layer`] bytes. The
/// caller holds a lease on the store until [`record`] has referenced it.
pub fn ingest(store: &Store, layer: &mut dyn Read) -> Result<Ingested> {
    let max = max_layer();
    let mut counted = Counted { inner: layer, n: 0 };
    match store.put_stream(&mut counted, max) {
        Ok((digest, size)) => Ok(Ingested { digest, size }),
        Err(_) if counted.n > max => Err(bad(
            "snapshot",
            format!(
                "the guest's changes pass {} MiB; set VMHOST_SNAPSHOT_MAX_MB to allow more, or exclude paths",
                max >> 20
            ),
        )),
        Err(e) => Err(e),
    }
}

struct Counted<'a> {
    inner: &'a mut dyn Read,
    n: u64,
}

impl Read for Counted<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(b)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Makes the ingested layer a snapshot on top of `parent` (which the store holds) and
/// returns its record; `what` goes into the image's history. A key already recorded
/// keeps its image (the new blob is left to a prune).
pub fn record(cache: &Path, store: &Store, parent: &Record, layer: &Ingested, what: &str) -> Result<Record> {
    let _lease = store.lease()?;
    let content = content_hash(store.open_blob(&layer.digest)?)?;
    let key = key_of(&[parent.key.as_bytes(), content.as_bytes()]);
    if let Ok(r) = load(cache, &key) {
        if image(store, &r).is_ok() {
            return Ok(r);
        }
    }
    let base = image(store, parent)?;
    // The parent's configuration as it is (every field kept), with the layer added.
    let raw = store.read(&base.manifest.config.digest, MAX_CONFIG)?;
    let mut config: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| bad("snapshot", format!("the parent's configuration: {e}")))?;
    let now = rfc3339(std::time::SystemTime::now());
    let obj = config
        .as_object_mut()
        .ok_or_else(|| bad("snapshot", "the parent's configuration is not a JSON object"))?;
    obj.insert("created".into(), now.clone().into());
    let rootfs = obj.entry("rootfs").or_insert_with(|| serde_json::json!({"type": "layers", "diff_ids": []}));
    match rootfs.get_mut("diff_ids").and_then(|d| d.as_array_mut()) {
        Some(ids) => ids.push(layer.digest.to_string().into()),
        None => rootfs["diff_ids"] = serde_json::json!([layer.digest.to_string()]),
    }
    let history = obj.entry("history").or_insert_with(|| serde_json::json!([]));
    if let Some(h) = history.as_array_mut() {
        h.push(serde_json::json!({"created": now, "created_by": what, "comment": "vmhost snapshot"}));
    }
    let config = serde_json::to_vec(&config).map_err(|e| bad("snapshot", e.to_string()))?;
    let config_digest = store.put(&config)?;
    let mut layers: Vec<Descriptor> = base
        .manifest
        .layers
        .iter()
        .map(|l| Descriptor { media_type: oci_layer_type(&l.media_type), ..l.clone() })
        .collect();
    layers.push(Descriptor::of(media::OCI_LAYER, layer.digest.clone(), layer.size));
    let mut manifest = Manifest::oci(config_digest, config.len() as u64, layers);
    manifest.annotations.insert(super::oci::SNAPSHOT_KEY_ANNOTATION.into(), key.clone());
    let manifest = serde_json::to_vec(&manifest).map_err(|e| bad("snapshot", e.to_string()))?;
    let manifest_digest = store.put(&manifest)?;
    let r = Record {
        key,
        parent: Some(parent.key.clone()),
        manifest: manifest_digest,
        source: format!("snapshot of {}", parent.key),
    };
    save(cache, &r)?;
    Ok(r)
}

/// `t` as RFC 3339 in UTC (`2026-12-07T23:30:13Z`), as image configurations write times.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Keeps the image of `r` under `name` (a reference, as `docker commit` names an image).
pub fn commit(store: &Store, r: &Record, name: &str) -> Result<String> {
    let reference: super::reference::Reference =
        name.parse().map_err(|e: super::reference::ReferenceError| bad("commit", e.to_string()))?;
    if reference.digest().is_some() {
        return Err(bad("commit", format!("{name}: a name with a tag, not a digest")));
    }
    let name = reference.to_string();
    // Held until the name references it: a prune cannot take the image meanwhile.
    let _lease = store.lease()?;
    image(store, r)?;
    store.set_ref(&name, &r.manifest)?;
    Ok(name)
}

/// Removes the records whose image `keep` does not hold (for a prune), but for the
/// ancestors of kept ones: a kept snapshot still names its parents (whose images may be
/// gone).
pub fn forget_unkept(cache: &Path, keep: &std::collections::HashSet<Digest>) -> usize {
    let Ok(entries) = std::fs::read_dir(records_dir(cache)) else { return 0 };
    let mut records = std::collections::HashMap::new();
    let mut unreadable = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_key(&name) {
            continue;
        }
        match load(cache, &name) {
            Ok(r) => {
                records.insert(name, r);
            }
            Err(_) => unreadable.push(e.path()),
        }
    }
    let mut kept = std::collections::HashSet::new();
    for r in records.values().filter(|r| keep.contains(&r.manifest)) {
        let mut at = Some(r);
        while let Some(r) = at {
            if !kept.insert(r.key.clone()) {
                break;
            }
            at = r.parent.as_ref().and_then(|p| records.get(p));
        }
    }
    let mut removed = 0;
    let gone = records.keys().filter(|k| !kept.contains(*k)).map(|k| records_dir(cache).join(k));
    for path in gone.chain(unreadable) {
        if std::fs::remove_file(path).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::tar::{Entry, Kind};
    use crate::image::tar_writer::Writer;

    fn layer(entries: &[(Entry, &[u8])]) -> Vec<u8> {
        let mut w = Writer::new(Vec::new());
        for (e, data) in entries {
            w.entry(e, &mut &data[..]).unwrap();
        }
        w.finish().unwrap()
    }

    fn file<'a>(path: &str, mode: u32, uid: u32, mtime: u64, data: &'a [u8]) -> (Entry, &'a [u8]) {
        let e = Entry {
            path: path.into(),
            kind: Kind::File,
            mode,
            uid,
            gid: 0,
            mtime,
            size: data.len() as u64,
            link: String::new(),
            dev: (0, 0),
            xattrs: vec![],
        };
        (e, data)
    }

    #[test]
    fn the_content_hash_leaves_out_times_and_nothing_else() {
        let h = |entries: &[(Entry, &[u8])]| content_hash(&layer(entries)[..]).unwrap();
        let base = h(&[file("a", 0o644, 0, 1, b"x")]);
        assert_eq!(base, h(&[file("a", 0o644, 0, 999_999, b"x")]), "times are left out");
        assert_ne!(base, h(&[file("a", 0o644, 0, 1, b"y")]), "content");
        assert_ne!(base, h(&[file("a", 0o600, 0, 1, b"x")]), "mode");
        assert_ne!(base, h(&[file("a", 0o644, 1000, 1, b"x")]), "owner");
        assert_ne!(base, h(&[file("b", 0o644, 0, 1, b"x")]), "path");
        let link = |target: &str| {
            let (mut e, _) = file("l", 0o777, 0, 1, b"");
            e.kind = Kind::Symlink;
            e.link = target.into();
            h(&[(e, b"")])
        };
        assert_ne!(link("a"), link("b"), "link target");
        assert!(content_hash(&b"not a tar archive at all, just text"[..]).is_err());
    }

    #[test]
    fn times_are_written_as_rfc3339() {
        let t = |s: u64| rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(t(0), "1970-01-01T00:00:00Z");
        assert_eq!(t(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(t(1_796_686_213), "2026-12-07T23:30:13Z");
    }

    #[test]
    fn keys_chain_and_records_read_back() {
        let dir = crate::test_dir::TempDir::new("snapshot-records");
        let m: Digest = Digest::sha256_of(b"manifest");
        let k = image_key(&m);
        assert!(is_key(&k));
        assert_eq!(k, image_key(&m));
        let r = Record { key: k.clone(), parent: None, manifest: m, source: "busybox".into() };
        save(dir.path(), &r).unwrap();
        assert_eq!(load(dir.path(), &k).unwrap(), r);
        assert!(load(dir.path(), "../../etc/passwd").is_err());
        assert!(load(dir.path(), &"0".repeat(32)).is_err());
        assert_ne!(key_of(&[k.as_bytes(), b"a"]), key_of(&[k.as_bytes(), b"b"]));
    }
}
