//! What the image store keeps alive: the blobs a recorded reference reaches (its manifest
//! or index, the index's manifests that were pulled, their configurations and layers),
//! and the unpacked roots of those manifests. [`prune`] removes the rest, as `docker
//! image prune` does.

use std::collections::HashSet;
use std::path::Path;

use super::digest::Digest;
use super::oci::{Document, MAX_MANIFEST};
use super::store::Store;
use crate::error::Result;

/// What [`prune`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// Blobs removed (half-written streams among them).
    pub blobs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Unpacked roots removed.
    pub roots: usize,
    /// Snapshot records removed (those no name keeps).
    pub snapshots: usize,
}

/// The blobs the store's references reach.
pub fn reachable(store: &Store) -> Result<HashSet<Digest>> {
    let mut keep = HashSet::new();
    let mut todo: Vec<Digest> = store.refs()?.into_iter().map(|(_, d)| d).collect();
    while let Some(d) = todo.pop() {
        if !keep.insert(d.clone()) || !store.has(&d) {
            continue;
        }
        let Ok(data) = store.read(&d, MAX_MANIFEST) else { continue };
        match Document::parse(&data, None) {
            Ok(Document::Index(i)) => todo.extend(i.manifests.into_iter().map(|m| m.digest)),
            Ok(Document::Manifest(m)) => {
                keep.insert(m.config.digest);
                keep.extend(m.layers.into_iter().map(|l| l.digest));
            }
            // A layer or a config reached as a manifest: not one; nothing under it.
            Err(_) => {}
        }
    }
    Ok(keep)
}

/// Removes the blobs no reference reaches, streams a killed process left half-written,
/// the unpacked roots (under `cache/roots`) of manifests no longer kept, and the snapshot
/// records no name keeps. Waits for the pulls, imports and boots in progress (in
/// any process) to finish, and holds new ones off until done.
pub fn prune(store: &Store, cache: &Path) -> Result<Pruned> {
    let _lock = store.lock_for_prune()?;
    let keep = reachable(store)?;
    let mut out = Pruned { snapshots: super::snapshot::forget_unkept(cache, &keep), ..Pruned::default() };
    for d in store.blobs()? {
        if !keep.contains(&d) {
            out.bytes += store.size(&d).unwrap_or(0);
            store.remove_blob(&d)?;
            out.blobs += 1;
        }
    }
    // Streams left by a process killed while it stored one (a snapshot's layer, a
    // `docker save` layer): never resumed, and nobody writes one during a prune.
    if let Ok(entries) = std::fs::read_dir(store.root().join("ingest")) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("stream-") {
                let len = e.metadata().map_or(0, |m| m.len());
                if std::fs::remove_file(e.path()).is_ok() {
                    out.bytes += len;
                    out.blobs += 1;
                }
            }
        }
    }
    // Root layers a killed process left while it wrote them (see snapshot::root_image,
    // which holds a lease meanwhile).
    if let Ok(entries) = std::fs::read_dir(super::snapshot::records_dir(cache)) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".layer-") {
                let len = e.metadata().map_or(0, |m| m.len());
                if std::fs::remove_file(e.path()).is_ok() {
                    out.bytes += len;
                }
            }
        }
    }
    let roots = cache.join("roots");
    if let Ok(entries) = std::fs::read_dir(&roots) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // ALG-HEX (an unpacked root) or ALG-HEX.erofs (its disk); locks and builds
            // in progress have other suffixes.
            let (stem, disk) = match name.strip_suffix(".erofs") {
                Some(s) => (s, true),
                None => (name.as_str(), false),
            };
            let Some((alg, hex)) = stem.split_once('-') else { continue };
            let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() else { continue };
            if keep.contains(&d) {
                continue;
            }
            if disk {
                let _ = std::fs::remove_file(e.path());
            } else if e.path().is_dir() {
                super::unpack::remove_tree(&e.path());
            } else {
                continue;
            }
            out.roots += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TempDir;

    #[test]
    fn prune_keeps_what_references_reach_and_waits_for_leases() {
        let dir = TempDir::new("prune");
        let store = Store::open(dir.join("images")).unwrap();
        let config = store.put(b"{}").unwrap();
        let layer = store.put(b"layer").unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config.to_string(), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer.to_string(), "size": 5}],
        });
        let manifest = store.put(manifest.to_string().as_bytes()).unwrap();
        store.set_ref("r.example/kept:1", &manifest).unwrap();
        let garbage = store.put(b"nobody's").unwrap();
        // What a killed process left while it streamed a blob in.
        std::fs::write(store.root().join("ingest/stream-killed"), b"half").unwrap();

        // A pull in progress (its blobs not yet referenced) holds a lease: the prune
        // waits for it, and removes nothing meanwhile.
        let lease = store.lease().unwrap();
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let (s, cache) = (store.clone(), dir.path().to_path_buf());
        let pruning = std::thread::spawn(move || {
            let r = prune(&s, &cache);
            done_tx.send(()).unwrap();
            r
        });
        assert!(
            done_rx.recv_timeout(std::time::Duration::from_millis(300)).is_err(),
            "the prune ran during a lease"
        );
        assert!(store.has(&garbage));
        drop(lease);
        let pruned = pruning.join().unwrap().unwrap();
        assert_eq!(pruned.blobs, 2);
        assert_eq!(pruned.bytes, 8 + 4);
        assert!(!store.has(&garbage));
        assert!(!store.root().join("ingest/stream-killed").exists());
        for d in [&config, &layer, &manifest] {
            assert!(store.has(d), "{d} is reachable");
        }
        // Leases share: two at once, and a lease after the prune.
        let (_a, _b) = (store.lease().unwrap(), store.lease().unwrap());
    }
}
