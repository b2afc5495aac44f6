//! Container images from local files, recognised by their content and imported into the
//! [`Store`] like pulled ones:
//!
//! - an **OCI image layout** directory (`oci-layout`, `index.json`, `blobs/`), as
//!   `skopeo copy ... oci:DIR` and `umoci` write it;
//! - an **OCI archive**: the same layout in a tar file (`skopeo copy ... oci-archive:F`);
//! - a **`docker save` archive** (`manifest.json` with `Config`, `RepoTags` and `Layers`,
//!   also `skopeo copy ... docker-archive:F`).
//!
//! Anything else is a root filesystem: a directory, or a tar archive of one. Blobs named
//! by digest are checked against it; a `docker save` layer is named by what it hashes
//! to. Documents are bounded as pulled ones are.

use std::collections::HashMap;
use std::io::{Read, Seek};

use std::path::Path;

use super::digest::Digest;
use super::oci::{media, Compression, Descriptor, Document, ImageConfig, Index, Manifest, Platform};
use super::oci::{MAX_CONFIG, MAX_MANIFEST};
use super::pull::StoredImage;
use super::store::{Ingest, Store};
use super::tar::{self, Kind};
use crate::error::{Error, Result};

/// What a local image path holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// A root filesystem directory.
    RootDir,
    /// A tar archive of a root filesystem (perhaps compressed).
    RootTar,
    /// An OCI image layout directory.
    OciLayout,
    /// An OCI image layout in a tar file.
    OciArchive,
    /// A `docker save` archive.
    DockerArchive,
}

/// The largest `docker save` layer accepted (the unpacking bound applies after).
const MAX_LAYER: u64 = 64 << 30;

fn bad(path: &Path, m: impl Into<String>) -> Error {
    Error::InvalidArgument { op: format!("read image {}", path.display()), message: m.into() }
}

/// Tells what `path` holds: a directory with `oci-layout` is a layout; an uncompressed
/// tar whose top level has `oci-layout` (with `index.json`) or `manifest.json` is an
/// image archive; anything else is a root filesystem.
pub fn recognise(path: &Path) -> Result<Local> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("open image", path, e))?;
    if meta.is_dir() {
        return Ok(if path.join("oci-layout").is_file() { Local::OciLayout } else { Local::RootDir });
    }
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("open image", path, e))?;
    let mut magic = [0u8; 512];
    let n = f.read(&mut magic).map_err(|e| Error::io("read image", path, e))?;
    // A tar header has "ustar" at 257; compressed archives are root tarballs.
    if n < 512 || &magic[257..262] != b"ustar" {
        return Ok(Local::RootTar);
    }
    f.rewind().map_err(|e| Error::io("read image", path, e))?;
    // Headers only, seeking over the data: this runs at every boot of a root tarball.
    // One this walk cannot follow (GNU sparse extensions, garbage) is no image archive:
    // the root tarball reader then says what is wrong with it.
    let (mut oci_layout, mut index, mut manifest) = (false, false, false);
    let walked = tar::member_paths(&mut std::io::BufReader::with_capacity(64 << 10, f), |p| {
        match p {
            "oci-layout" => oci_layout = true,
            "index.json" => index = true,
            "manifest.json" => manifest = true,
            _ => {}
        }
        true
    });
    if let Err(e) = walked {
        log::debug!("{}: not an image archive ({e})", path.display());
        return Ok(Local::RootTar);
    }
    Ok(match (oci_layout && index, manifest) {
        (true, _) => Local::OciArchive,
        (false, true) => Local::DockerArchive,
        _ => Local::RootTar,
    })
}

/// Imports the image at `path` (a layout or an archive, as [`recognise`] says) into
/// `store`, for `platform`.
pub fn import(store: &Store, path: &Path, kind: Local, platform: &Platform) -> Result<StoredImage> {
    let name = path.display().to_string();
    match kind {
        Local::OciLayout => {
            let index = read_bounded(&path.join("index.json"), MAX_MANIFEST)?;
            let blob = |d: &Digest| path.join("blobs").join(d.algorithm().as_str()).join(d.hex());
            let put = |d: &Digest, size: u64| -> Result<()> {
                let f = std::fs::File::open(blob(d)).map_err(|e| Error::io("open blob", blob(d), e))?;
                put_verified(store, d, size, f)
            };
            let top = choose(path, &index, platform, &|d| read_bounded(&blob(d), MAX_MANIFEST), &put)?;
            finish(store, name, top)
        }
        Local::OciArchive => {
            let mut index = None;
            let f = std::fs::File::open(path).map_err(|e| Error::io("open image", path, e))?;
            tar::read(std::io::BufReader::new(f), |e, data| {
                if e.kind != Kind::File {
                    return Ok(());
                }
                if e.path == "index.json" {
                    index = Some(read_max(data, MAX_MANIFEST)?);
                } else if let Some(d) = blob_name(&e.path) {
                    put_verified(store, &d, e.size, data).map_err(std::io::Error::other)?;
                }
                Ok(())
            })
            .map_err(|e| bad(path, e.to_string()))?;
            let index = index.ok_or_else(|| bad(path, "the archive has no index.json"))?;
            let from_store = |d: &Digest| store.read(d, MAX_MANIFEST);
            let present = |d: &Digest, _size: u64| -> Result<()> {
                if store.has(d) {
                    Ok(())
                } else {
                    Err(bad(path, format!("the archive lacks blob {d}")))
                }
            };
            let top = choose(path, &index, platform, &from_store, &present)?;
            finish(store, name, top)
        }
        Local::DockerArchive => import_docker(store, path, name),
        Local::RootDir | Local::RootTar => Err(bad(path, "a root filesystem, not a container image")),
    }
}

/// The manifest the layout's `index.json` names for `platform`: its only image, or the
/// one for the platform (through a nested index too). Every blob it needs is `put`.
fn choose(
    path: &Path,
    index: &[u8],
    platform: &Platform,
    read: &dyn Fn(&Digest) -> Result<Vec<u8>>,
    put: &dyn Fn(&Digest, u64) -> Result<()>,
) -> Result<(Digest, Manifest)> {
    let index: Index = match Document::parse(index, Some(media::OCI_INDEX)).map_err(|m| bad(path, m))? {
        Document::Index(i) => i,
        Document::Manifest(_) => return Err(bad(path, "index.json is a manifest")),
    };
    let mut desc = match index.manifests.as_slice() {
        [] => return Err(bad(path, "the layout holds no image")),
        [only] => only.clone(),
        many if many.iter().any(|d| d.platform.is_some()) => {
            index.select(platform).map_err(|m| bad(path, m))?.clone()
        }
        many => {
            let names: Vec<&str> = many
                .iter()
                .filter_map(|d| d.annotations.get("org.opencontainers.image.ref.name").map(String::as_str))
                .collect();
            return Err(bad(
                path,
                format!("the layout holds {} images ({}); keep one", many.len(), names.join(", ")),
            ));
        }
    };
    for _ in 0..4 {
        put(&desc.digest, desc.size)?;
        let data = read(&desc.digest)?;
        match Document::parse(&data, Some(&desc.media_type)).map_err(|m| bad(path, m))? {
            Document::Manifest(m) => {
                put(&m.config.digest, m.config.size)?;
                for l in &m.layers {
                    put(&l.digest, l.size)?;
                }
                return Ok((desc.digest, m));
            }
            Document::Index(i) => desc = i.select(platform).map_err(|m| bad(path, m))?.clone(),
        }
    }
    Err(bad(path, "indexes nested too deep"))
}

fn finish(
    store: &Store,
    name: String,
    (manifest_digest, manifest): (Digest, Manifest),
) -> Result<StoredImage> {
    for l in &manifest.layers {
        Compression::of_layer(&l.media_type).map_err(|m| bad(Path::new(&name), m))?;
    }
    let config = ImageConfig::parse(&store.read(&manifest.config.digest, MAX_CONFIG)?)
        .map_err(|m| bad(Path::new(&name), m))?;
    Ok(StoredImage { name, resolved: manifest_digest.clone(), manifest_digest, manifest, config })
}

/// `docker save`: `manifest.json` names the configuration and the layers by member path;
/// the layers enter the store by what they hash to, the configuration and a manifest
/// made for them too.
fn import_docker(store: &Store, path: &Path, name: String) -> Result<StoredImage> {
    let mut small: HashMap<String, Vec<u8>> = HashMap::new();
    let mut blobs: HashMap<String, (Digest, u64)> = HashMap::new();
    let f = std::fs::File::open(path).map_err(|e| Error::io("open image", path, e))?;
    tar::read(std::io::BufReader::new(f), |e, data| {
        if e.kind != Kind::File {
            return Ok(());
        }
        if e.path.ends_with(".json") && e.size <= MAX_CONFIG && small.len() < 1024 {
            small.insert(e.path.clone(), read_max(data, MAX_CONFIG)?);
        } else {
            let d = store.put_stream(data, MAX_LAYER).map_err(std::io::Error::other)?;
            blobs.insert(e.path.clone(), d);
        }
        Ok(())
    })
    .map_err(|e| bad(path, e.to_string()))?;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        #[serde(default)]
        repo_tags: Option<Vec<String>>,
        layers: Vec<String>,
    }
    let list = small.get("manifest.json").ok_or_else(|| bad(path, "no manifest.json"))?;
    let entries: Vec<Entry> =
        serde_json::from_slice(list).map_err(|e| bad(path, format!("manifest.json: {e}")))?;
    let entry = match entries.as_slice() {
        [one] => one,
        [] => return Err(bad(path, "manifest.json lists no image")),
        many => {
            let tags: Vec<String> =
                many.iter().flat_map(|e| e.repo_tags.clone().unwrap_or_default()).collect();
            return Err(bad(
                path,
                format!("the archive holds {} images ({}); save one", many.len(), tags.join(", ")),
            ));
        }
    };
    let config_bytes = small.get(&entry.config).ok_or_else(|| {
        bad(path, format!("manifest.json names {} that is not in the archive", entry.config))
    })?;
    let config_digest = store.put(config_bytes)?;
    let mut layers = Vec::new();
    for l in &entry.layers {
        let (digest, size) =
            blobs.get(l).cloned().ok_or_else(|| bad(path, format!("layer {l} is not in the archive")))?;
        let mut head = [0u8; 4];
        let n = store.open_blob(&digest)?.read(&mut head).unwrap_or(0);
        let media_type = match &head[..n] {
            [0x1f, 0x8b, ..] => media::OCI_LAYER_GZIP,
            [0x28, 0xb5, 0x2f, 0xfd] => media::OCI_LAYER_ZSTD,
            _ => media::OCI_LAYER,
        };
        layers.push(Descriptor::of(media_type, digest, size));
    }
    let manifest = Manifest::oci(config_digest, config_bytes.len() as u64, layers);
    let bytes = serde_json::to_vec(&manifest).map_err(|e| bad(path, e.to_string()))?;
    let digest = store.put(&bytes)?;
    finish(store, name, (digest, manifest))
}

/// The digest a layout member `blobs/ALG/HEX` names.
fn blob_name(member: &str) -> Option<Digest> {
    let rest = member.strip_prefix("blobs/")?;
    let (alg, hex) = rest.split_once('/')?;
    format!("{alg}:{hex}").parse().ok()
}

fn put_verified(store: &Store, d: &Digest, size: u64, mut data: impl Read) -> Result<()> {
    match store.ingest(d, Some(size))? {
        Ingest::Present => Ok(()),
        Ingest::Write(mut w) => {
            w.reset()?;
            std::io::copy(&mut data, &mut *w).map_err(|e| Error::io("write blob", store.blob_path(d), e))?;
            w.commit()
        }
    }
}

fn read_max(r: &mut dyn Read, max: u64) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.take(max + 1).read_to_end(&mut v)?;
    if v.len() as u64 > max {
        return Err(std::io::Error::other(format!("a document of more than {max} bytes")));
    }
    Ok(v)
}

fn read_bounded(p: &Path, max: u64) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(p).map_err(|e| Error::io("open", p, e))?;
    read_max(&mut f, max).map_err(|e| Error::io("read", p, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TempDir;

    #[test]
    fn local_paths_are_recognised_by_content() {
        let dir = TempDir::new("recognise");
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        assert_eq!(recognise(&root).unwrap(), Local::RootDir);
        std::fs::write(root.join("oci-layout"), b"{}").unwrap();
        assert_eq!(recognise(&root).unwrap(), Local::OciLayout);
        let tar = |name: &str, members: &[&str]| {
            let mut t = Vec::new();
            for m in members {
                t.extend_from_slice(&super::tar::ustar_header(m, b'0', 0o644, 2, "", 0, 0));
                t.extend_from_slice(b"{}");
                t.resize(t.len().div_ceil(512) * 512, 0);
            }
            t.extend_from_slice(&[0u8; 1024]);
            let p = dir.join(name);
            std::fs::write(&p, t).unwrap();
            p
        };
        assert_eq!(recognise(&tar("a.tar", &["oci-layout", "index.json"])).unwrap(), Local::OciArchive);
        assert_eq!(
            recognise(&tar("b.tar", &["abc/layer.tar", "manifest.json"])).unwrap(),
            Local::DockerArchive
        );
        assert_eq!(recognise(&tar("c.tar", &["etc/hostname", "oci-layout"])).unwrap(), Local::RootTar);
        std::fs::write(dir.join("d.tar.gz"), [0x1f, 0x8b, 8, 0]).unwrap();
        assert_eq!(recognise(&dir.join("d.tar.gz")).unwrap(), Local::RootTar);
        assert!(recognise(&dir.join("missing")).is_err());
        // A layout without an image, or with several and no platforms: what to do.
        std::fs::write(root.join("index.json"), br#"{"schemaVersion":2,"manifests":[]}"#).unwrap();
        let store = Store::open(dir.join("store")).unwrap();
        let e = import(&store, &root, Local::OciLayout, &Platform::host()).unwrap_err();
        assert!(e.to_string().contains("no image"), "{e}");
    }
}
