//! The OCI image spec's documents, and Docker's schema 2 twins of them: descriptors,
//! manifests, indexes (manifest lists), platforms and the image configuration. Only the
//! fields vmhost reads; unknown fields are ignored, as the spec asks of readers. Every
//! document is bounded before it is parsed ([`MAX_MANIFEST`], [`MAX_CONFIG`]).

use serde::{Deserialize, Serialize};

use super::digest::Digest;

/// The largest manifest or index accepted (the distribution spec's suggestion).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// The largest image configuration accepted.
pub const MAX_CONFIG: u64 = 8 << 20;

/// Media types vmhost reads.
pub mod media {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image configuration.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI layer, uncompressed tar.
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    /// OCI layer, gzip.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// OCI layer, zstd.
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// Docker schema 2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image configuration.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker layer, gzip.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    /// Docker schema 1 manifests (refused).
    pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
    /// Docker schema 1, signed (refused).
    pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

    /// The Accept header of a manifest request: every manifest and index type read.
    pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
        application/vnd.oci.image.manifest.v1+json, \
        application/vnd.docker.distribution.manifest.list.v2+json, \
        application/vnd.docker.distribution.manifest.v2+json";
}

/// Points at a blob: its media type, digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the blob is.
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// In an index: the platform the manifest is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (`org.opencontainers.image.ref.name` names an OCI layout's images).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl Descriptor {
    /// A descriptor of a blob: no platform, no annotations.
    pub fn of(media_type: &str, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            platform: None,
            annotations: Default::default(),
        }
    }
}

/// An operating system and CPU architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Platform {
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `linux`, ...
    pub os: String,
    /// `v8` for arm64, `v7` for arm, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform vmhost runs guests of: linux on the host's architecture.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        Platform { architecture: architecture.into(), os: "linux".into(), variant: None }
    }

    /// Parses `os/arch[/variant]` (docker's `--platform`).
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => {
                Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: None })
            }
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(format!("platform {s:?}: write OS/ARCH or OS/ARCH/VARIANT, as linux/amd64")),
        }
    }

    /// Whether an index entry for `other` runs here: same OS and architecture, and the
    /// variant asked for, if any (an entry without a variant matches any).
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && match (&self.variant, &other.variant) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image manifest: its configuration and its layers, bottom first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// 2.
    pub schema_version: u32,
    /// Set by Docker's and usually by OCI's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The configuration blob.
    pub config: Descriptor,
    /// The layers, the bottom one first.
    pub layers: Vec<Descriptor>,
    /// Annotations (vmhost's snapshots carry their key: [`SNAPSHOT_KEY_ANNOTATION`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// The manifest annotation that holds a snapshot's key, so that an image booted by any
/// name (a committed one) is known as that snapshot.
pub const SNAPSHOT_KEY_ANNOTATION: &str = "dev.vmhost.snapshot.key";

impl Manifest {
    /// An OCI image manifest of `config` (an OCI configuration of that digest and
    /// size) and `layers`.
    pub fn oci(config: Digest, config_size: u64, layers: Vec<Descriptor>) -> Manifest {
        Manifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.into()),
            config: Descriptor::of(media::OCI_CONFIG, config, config_size),
            layers,
            annotations: Default::default(),
        }
    }
}

/// An index (a Docker manifest list): manifests by platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// 2.
    pub schema_version: u32,
    /// Set by Docker's and usually by OCI's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests.
    pub manifests: Vec<Descriptor>,
}

/// A manifest document, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    /// One image.
    Manifest(Manifest),
    /// Several, by platform.
    Index(Index),
}

impl Document {
    /// Reads a manifest or an index. `content_type` is what the registry said (it wins
    /// over the document's own `mediaType` when both are known manifest types); schema 1
    /// is refused with what to do.
    pub fn parse(data: &[u8], content_type: Option<&str>) -> Result<Document, String> {
        if data.len() as u64 > MAX_MANIFEST {
            return Err(format!(
                "the manifest is {} bytes, more than the {MAX_MANIFEST} allowed",
                data.len()
            ));
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Head {
            #[serde(default)]
            schema_version: Option<u32>,
            #[serde(default)]
            media_type: Option<String>,
            #[serde(default)]
            manifests: Option<serde_json::Value>,
            #[serde(default)]
            layers: Option<serde_json::Value>,
        }
        let head: Head =
            serde_json::from_slice(data).map_err(|e| format!("the manifest is not JSON: {e}"))?;
        let ct = content_type.map(|c| c.split(';').next().unwrap_or("").trim()).filter(|c| !c.is_empty());
        let ty = ct
            .filter(|c| *c != "application/json" && *c != "text/plain")
            .or(head.media_type.as_deref())
            .unwrap_or("");
        if ty == media::DOCKER_SCHEMA1 || ty == media::DOCKER_SCHEMA1_SIGNED || head.schema_version == Some(1)
        {
            return Err("the image has a Docker schema 1 manifest, which is deprecated and not supported; \
                        push it again with a current docker or skopeo (schema 2 or OCI)"
                .into());
        }
        if head.schema_version != Some(2) {
            return Err(format!("unsupported manifest schemaVersion {:?}", head.schema_version));
        }
        let is_index = match ty {
            media::OCI_INDEX | media::DOCKER_LIST => true,
            media::OCI_MANIFEST | media::DOCKER_MANIFEST => false,
            // No media type (allowed for OCI): what the document holds decides.
            "" => head.manifests.is_some() && head.layers.is_none(),
            other => return Err(format!("unsupported manifest media type {other:?}")),
        };
        if is_index {
            serde_json::from_slice(data).map(Document::Index).map_err(|e| format!("bad image index: {e}"))
        } else {
            serde_json::from_slice(data)
                .map(Document::Manifest)
                .map_err(|e| format!("bad image manifest: {e}"))
        }
    }
}

impl Index {
    /// The manifest for `platform`: the first entry that matches, not merely the first
    /// entry of the right architecture.
    pub fn select(&self, platform: &Platform) -> Result<&Descriptor, String> {
        self.manifests.iter().find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p))).ok_or_else(
            || {
                let have: Vec<String> = self
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                    .collect();
                format!(
                    "the image has no {platform} variant (it has: {}); ask for one with --platform",
                    have.join(", ")
                )
            },
        )
    }
}

/// How a layer's bytes are compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The compression of a layer of media type `media_type`; an error for what is not a
    /// layer vmhost can apply.
    pub fn of_layer(media_type: &str) -> Result<Compression, String> {
        match media_type {
            media::OCI_LAYER | "application/vnd.oci.image.layer.nondistributable.v1.tar" => {
                Ok(Compression::None)
            }
            media::OCI_LAYER_GZIP
            | media::DOCKER_LAYER_GZIP
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            media::OCI_LAYER_ZSTD => Ok(Compression::Zstd),
            other => Err(format!("unsupported layer media type {other:?}")),
        }
    }
}

/// The image configuration: what runs, and the layers' uncompressed digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ImageConfig {
    /// The CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// The OS.
    #[serde(default)]
    pub os: String,
    /// The container configuration.
    #[serde(default)]
    pub config: Option<RunConfig>,
    /// The layers' diff ids.
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// How the image runs (the `config` object of the image configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    /// `KEY=VALUE` entries.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// The entrypoint.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// The default arguments (or command, without an entrypoint).
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// The working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// The user (`name`, `uid`, `uid:gid`, `name:group`).
    #[serde(default)]
    pub user: Option<String>,
}

/// The layers' uncompressed digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RootFs {
    /// `layers`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// One per layer, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

impl ImageConfig {
    /// Reads a configuration blob.
    pub fn parse(data: &[u8]) -> Result<ImageConfig, String> {
        if data.len() as u64 > MAX_CONFIG {
            return Err(format!("the image configuration is {} bytes, more than {MAX_CONFIG}", data.len()));
        }
        serde_json::from_slice(data).map_err(|e| format!("bad image configuration: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn documents_are_told_apart_and_schema_1_refused() {
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{D1}","size":7}},
               "layers":[{{"mediaType":"{}","digest":"{D2}","size":9,"extra":1}}],"unknown":true}}"#,
            media::DOCKER_MANIFEST,
            media::DOCKER_CONFIG,
            media::DOCKER_LAYER_GZIP
        );
        let Document::Manifest(m) = Document::parse(manifest.as_bytes(), None).unwrap() else { panic!() };
        assert_eq!((m.config.size, m.layers.len()), (7, 1));
        assert_eq!(Compression::of_layer(&m.layers[0].media_type), Ok(Compression::Gzip));

        // An OCI index without mediaType, whose first entry is another platform.
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[
                {{"mediaType":"{m}","digest":"{D1}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
                {{"mediaType":"{m}","digest":"{D2}","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            m = media::OCI_MANIFEST
        );
        let Document::Index(i) = Document::parse(index.as_bytes(), Some("application/json")).unwrap() else {
            panic!()
        };
        let amd64 = Platform::parse("linux/amd64").unwrap();
        assert_eq!(i.select(&amd64).unwrap().digest.to_string(), D2);
        assert_eq!(i.select(&Platform::parse("linux/arm64/v8").unwrap()).unwrap().digest.to_string(), D1);
        let e = i.select(&Platform::parse("linux/arm64/v7").unwrap()).unwrap_err();
        assert!(e.contains("linux/amd64") && e.contains("--platform"), "{e}");

        let v1 = br#"{"schemaVersion":1,"name":"x","tag":"t","fsLayers":[]}"#;
        assert!(Document::parse(v1, Some(media::DOCKER_SCHEMA1_SIGNED)).unwrap_err().contains("schema 1"));
        assert!(Document::parse(v1, None).unwrap_err().contains("schema 1"));
        assert!(Document::parse(b"{", None).is_err());
        assert!(Document::parse(&vec![b' '; (MAX_MANIFEST + 1) as usize], None)
            .unwrap_err()
            .contains("more than"));
        let bad_digest = manifest.replace(D2, "sha256:../../etc");
        assert!(Document::parse(bad_digest.as_bytes(), None).is_err());
        assert!(Compression::of_layer("application/x-foo").is_err());
        assert!(Platform::parse("linux").is_err() && Platform::parse("linux/amd64/v1/x").is_err());
    }

    #[test]
    fn configuration_is_read() {
        let c = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["sh"],"WorkingDir":"/w","User":"1:2"},
                     "rootfs":{"type":"layers","diff_ids":["sha256:1111111111111111111111111111111111111111111111111111111111111111"]}}"#;
        let c = ImageConfig::parse(c).unwrap();
        let run = c.config.unwrap();
        assert_eq!(run.cmd.unwrap(), ["sh"]);
        assert_eq!((run.working_dir.as_deref(), run.user.as_deref()), (Some("/w"), Some("1:2")));
        assert_eq!(c.rootfs.unwrap().diff_ids.len(), 1);
    }
}
