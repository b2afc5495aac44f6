//! `vmhost image export`: a stored image (pulled, imported, or a committed snapshot) as an
//! OCI image layout directory (`oci-layout`, `index.json`, `blobs/ALG/HEX`), as
//! `skopeo copy ... oci:DIR:TAG` and `podman save --format oci-dir` write one: what
//! skopeo, umoci, buildah and containerd take, and what `vmhost run --image DIR` boots.
//!
//! Blobs are copied out of the store (an edit of the layout must not reach it) and
//! checked against their digests, under a lease (a prune waits). An existing layout
//! gains the image (its index keeps the others, one per tag); any other non-empty
//! directory is refused.

use std::path::Path;

use super::digest::Digest;
use super::oci::{media, Descriptor, Index, MAX_MANIFEST};
use super::pull::StoredImage;
use super::store::Store;
use crate::error::{Error, Result};

fn bad(dir: &Path, message: impl Into<String>) -> Error {
    Error::InvalidArgument { op: format!("export to {}", dir.display()), message: message.into() }
}

/// Writes `img` into the OCI layout `dir` under the tag `tag`
/// (`org.opencontainers.image.ref.name`).
pub fn export(store: &Store, img: &StoredImage, dir: &Path, tag: &str) -> Result<()> {
    // A prune waits until every blob is out.
    let _lease = store.lease()?;
    let existing_layout = dir.join("oci-layout").is_file();
    if !existing_layout && std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(bad(dir, "the directory is neither empty nor an OCI layout"));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    let mut blobs: Vec<Digest> = vec![img.manifest_digest.clone(), img.manifest.config.digest.clone()];
    blobs.extend(img.manifest.layers.iter().map(|l| l.digest.clone()));
    for d in &blobs {
        let to = dir.join("blobs").join(d.algorithm().as_str()).join(d.hex());
        if to.is_file() {
            continue;
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
        }
        let from = store.blob_path(d);
        // Copied, not linked: an edit of the layout must not reach the store.
        {
            let tmp = to.with_extension(super::unique_suffix());
            let copied =
                std::fs::copy(&from, &tmp).map_err(|e| Error::io("copy blob", &from, e)).and_then(|_| {
                    let mut f = std::fs::File::open(&tmp).map_err(|e| Error::io("open", &tmp, e))?;
                    let mut h = d.hasher();
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n =
                            std::io::Read::read(&mut f, &mut buf).map_err(|e| Error::io("read", &tmp, e))?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                    let got = h.finish();
                    if &got != d {
                        return Err(bad(dir, format!("the store's blob {d} reads as {got}")));
                    }
                    std::fs::rename(&tmp, &to).map_err(|e| Error::io("publish blob", &to, e))
                });
            if copied.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            copied?;
        }
    }
    super::write_atomic(&dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut index = if existing_layout {
        let data = std::fs::read(dir.join("index.json"))
            .map_err(|e| Error::io("read", dir.join("index.json"), e))?;
        if data.len() as u64 > MAX_MANIFEST {
            return Err(bad(dir, "its index.json is too large"));
        }
        serde_json::from_slice::<Index>(&data).map_err(|e| bad(dir, format!("its index.json: {e}")))?
    } else {
        Index { schema_version: 2, media_type: Some(media::OCI_INDEX.into()), manifests: Vec::new() }
    };
    const REF_NAME: &str = "org.opencontainers.image.ref.name";
    index.manifests.retain(|m| m.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
    let size = store.size(&img.manifest_digest).unwrap_or(0);
    let media_type = img.manifest.media_type.clone().unwrap_or_else(|| media::OCI_MANIFEST.into());
    let mut desc = Descriptor::of(&media_type, img.manifest_digest.clone(), size);
    desc.annotations.insert(REF_NAME.into(), tag.into());
    index.manifests.push(desc);
    let data = serde_json::to_vec(&index).map_err(|e| bad(dir, e.to_string()))?;
    super::write_atomic(&dir.join("index.json"), &data)
}
