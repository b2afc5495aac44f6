//! Pulling an image into the [`Store`]: the reference's manifest (through an index, the
//! entry for the platform asked for), its configuration and its layers, three layers at
//! a time (docker's default), each verified before it enters the store; then the
//! reference is recorded. And finding a pulled image again without the network
//! ([`local`]), as `run` does by default ([`PullPolicy`]).

use super::digest::Digest;
use super::oci::{Document, ImageConfig, Manifest, Platform, MAX_CONFIG, MAX_MANIFEST};
use super::reference::Reference;
#[cfg(feature = "registry")]
use super::registry::Registry;
use super::store::Store;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Layers downloaded at once.
#[cfg(feature = "registry")]
const PARALLEL_LAYERS: usize = 3;

/// When `run` pulls (docker's `--pull`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Always ask the registry what the tag is now.
    Always,
    /// Pull only what is not in the store (the default).
    #[default]
    Missing,
    /// Never: an image not in the store is an error.
    Never,
}

impl std::str::FromStr for PullPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<PullPolicy, String> {
        match s {
            "always" => Ok(PullPolicy::Always),
            "missing" => Ok(PullPolicy::Missing),
            "never" => Ok(PullPolicy::Never),
            _ => Err(format!("pull policy {s:?}: use always, missing or never")),
        }
    }
}

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The platform to take from an index.
    pub platform: Platform,
    /// Registries spoken to over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    /// Where progress goes.
    pub progress: Progress,
    /// Credentials to use instead of those the usual files give
    /// ([`super::auth::lookup`]).
    pub credentials: Option<super::auth::Credentials>,
}

impl Default for PullOptions {
    fn default() -> PullOptions {
        PullOptions {
            platform: Platform::host(),
            insecure: insecure_registries(),
            progress: Progress::quiet(),
            credentials: None,
        }
    }
}

/// An image whose manifest, configuration and layers are all in the store.
#[derive(Debug, Clone)]
pub struct StoredImage {
    /// What it was asked for as: the reference, normalised, or a local archive's path.
    pub name: String,
    /// What the reference resolved to (an index's digest for a multi-platform image).
    pub resolved: Digest,
    /// The platform's manifest's digest.
    pub manifest_digest: Digest,
    /// The manifest.
    pub manifest: Manifest,
    /// The configuration.
    pub config: ImageConfig,
}

/// Finds `r` for `opts.platform` as `policy` says: in the store, from the registry, or
/// both.
pub fn get(store: &Store, r: &Reference, policy: PullPolicy, opts: &PullOptions) -> Result<StoredImage> {
    if policy != PullPolicy::Always {
        if let Some(img) = local(store, r, &opts.platform)? {
            return Ok(img);
        }
        if policy == PullPolicy::Never {
            return Err(Error::InvalidArgument {
                op: "find image".into(),
                message: format!("{r} is not in the image store and --pull=never was given; pull it first"),
            });
        }
    }
    pull(store, r, opts)
}

/// The image `r` as the store has it, without the network: `None` when the reference
/// was never pulled or a part of it is missing.
pub fn local(store: &Store, r: &Reference, platform: &Platform) -> Result<Option<StoredImage>> {
    let top = match r.digest() {
        Some(d) => d.clone(),
        None => match store.get_ref(&r.to_string())? {
            Some(d) => d,
            None => return Ok(None),
        },
    };
    if !store.has(&top) {
        return Ok(None);
    }
    let bad = |m: String| Error::InvalidArgument { op: format!("read stored image {r}"), message: m };
    let (manifest_digest, manifest) =
        match Document::parse(&store.read(&top, MAX_MANIFEST)?, None).map_err(bad)? {
            Document::Manifest(m) => (top.clone(), m),
            Document::Index(i) => {
                let d = i.select(platform).map_err(bad)?.digest.clone();
                if !store.has(&d) {
                    return Ok(None);
                }
                match Document::parse(&store.read(&d, MAX_MANIFEST)?, None).map_err(bad)? {
                    Document::Manifest(m) => (d, m),
                    Document::Index(_) => return Err(bad(format!("{d}: an index inside an index"))),
                }
            }
        };
    if !store.has(&manifest.config.digest) || manifest.layers.iter().any(|l| !store.has(&l.digest)) {
        return Ok(None);
    }
    let config = ImageConfig::parse(&store.read(&manifest.config.digest, MAX_CONFIG)?).map_err(bad)?;
    Ok(Some(StoredImage { name: r.to_string(), resolved: top, manifest_digest, manifest, config }))
}

/// The registries named in `VMHOST_INSECURE_REGISTRIES` (comma-separated), spoken to
/// over plain HTTP besides loopback ones.
pub fn insecure_registries() -> Vec<String> {
    std::env::var("VMHOST_INSECURE_REGISTRIES")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Without the `registry` feature (the guest agent's build): no pulling.
#[cfg(not(feature = "registry"))]
pub fn pull(_store: &Store, r: &Reference, _opts: &PullOptions) -> Result<StoredImage> {
    Err(Error::InvalidArgument {
        op: format!("pull {r}"),
        message: "this build of vmhost has no registry support (the `registry` feature)".into(),
    })
}

/// Pulls `r` from its registry into `store`: what the tag names now, for the platform.
#[cfg(feature = "registry")]
pub fn pull(store: &Store, r: &Reference, opts: &PullOptions) -> Result<StoredImage> {
    // Until the reference is recorded, a prune would see the new blobs as garbage.
    let _lease = store.lease()?;
    let mut registry = Registry::for_reference(r, &opts.insecure)?;
    if let Some(c) = &opts.credentials {
        registry = registry.with_credentials(Some(c.clone()));
    }
    let repo = r.repository();
    opts.progress.step(&format!("pulling {r}"));
    let top = registry.manifest(repo, &r.manifest_reference())?;
    let bad = |m: String| Error::Registry {
        registry: r.registry().into(),
        op: format!("pull {r}"),
        status: None,
        message: m,
    };
    let doc = Document::parse(&top.data, top.media_type.as_deref()).map_err(bad)?;
    store.put_verified(&top.digest, &top.data)?;
    let (manifest_digest, manifest) = match doc {
        Document::Manifest(m) => (top.digest.clone(), m),
        Document::Index(index) => {
            let desc = index.select(&opts.platform).map_err(bad)?;
            let m = registry.manifest(repo, &desc.digest.to_string())?;
            if m.data.len() as u64 != desc.size {
                return Err(bad(format!(
                    "manifest {} is {} bytes, the index says {}",
                    desc.digest,
                    m.data.len(),
                    desc.size
                )));
            }
            match Document::parse(&m.data, m.media_type.as_deref()).map_err(bad)? {
                Document::Manifest(manifest) => {
                    store.put_verified(&m.digest, &m.data)?;
                    (m.digest, manifest)
                }
                Document::Index(_) => return Err(bad(format!("{}: an index inside an index", desc.digest))),
            }
        }
    };
    if manifest.config.size > MAX_CONFIG {
        return Err(bad(format!(
            "the configuration is {} bytes, more than {MAX_CONFIG}",
            manifest.config.size
        )));
    }
    for l in &manifest.layers {
        super::oci::Compression::of_layer(&l.media_type).map_err(bad)?;
    }
    // The configuration, then the layers, several at a time.
    fetch(store, &registry, repo, &manifest.config, None)?;
    let bars = crate::progress::Bars::new(&opts.progress);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = parking_lot::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL_LAYERS.min(manifest.layers.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(layer) = manifest.layers.get(i) else { break };
                if failed.lock().is_some() {
                    break;
                }
                if let Err(e) = fetch(store, &registry, repo, layer, Some(&bars)) {
                    failed.lock().get_or_insert(e);
                    break;
                }
            });
        }
    });
    if let Some(e) = failed.into_inner() {
        return Err(e);
    }
    let config = ImageConfig::parse(&store.read(&manifest.config.digest, MAX_CONFIG)?).map_err(bad)?;
    if let Some(rootfs) = &config.rootfs {
        if rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(bad(format!(
                "the configuration lists {} layers, the manifest {}",
                rootfs.diff_ids.len(),
                manifest.layers.len()
            )));
        }
    }
    if r.digest().is_none() {
        store.set_ref(&r.to_string(), &top.digest)?;
    }
    opts.progress.step(&format!("{r}: {}", top.digest));
    Ok(StoredImage { name: r.to_string(), resolved: top.digest, manifest_digest, manifest, config })
}

/// Puts the blob `desc` into the store unless it is there.
#[cfg(feature = "registry")]
fn fetch(
    store: &Store,
    registry: &Registry,
    repo: &str,
    desc: &super::oci::Descriptor,
    bars: Option<&crate::progress::Bars>,
) -> Result<()> {
    let short = &desc.digest.hex()[..12];
    let bar = bars.map(|b| b.add(short, Some(desc.size)));
    match store.ingest(&desc.digest, Some(desc.size))? {
        super::store::Ingest::Present => {
            if let (Some(b), Some(i)) = (bars, bar) {
                b.finish(i, "Already exists");
            }
            Ok(())
        }
        super::store::Ingest::Write(w) => {
            let progress = |done: u64| {
                if let (Some(b), Some(i)) = (bars, bar) {
                    b.set(i, done);
                }
            };
            registry.blob_into(repo, desc, *w, &progress)?;
            if let (Some(b), Some(i)) = (bars, bar) {
                b.finish(i, "Pull complete");
            }
            Ok(())
        }
    }
}
