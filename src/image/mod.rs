//! Everything a guest boots from: the kernel ([`kernel`]), the root filesystem of the
//! image ([`rootfs`]: a directory, a tar archive, or the default busybox root), and the
//! initramfs that carries both with the agent ([`initramfs`], written as cpio by
//! [`cpio`]; tar archives read by [`tar`]).

pub mod archive;
pub mod auth;
pub mod busybox_build;
pub mod cpio;
pub mod digest;
pub mod elf;
pub mod erofs;
pub mod export;
pub mod initramfs;
pub mod kernel;
pub mod kernel_build;
pub mod oci;
pub mod prune;
pub mod pull;
pub mod reference;
#[cfg(feature = "registry")]
pub mod registry;
pub mod rootfs;
pub mod snapshot;
pub mod store;
pub mod tar;
pub mod tar_writer;
pub mod unpack;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The cache directory: `$XDG_CACHE_HOME/vmhost`, else `~/.cache/vmhost`.
pub fn cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("vmhost");
    }
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty()).unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache/vmhost")
}

/// A 128-bit FNV-1a hash, as 32 hex digits: keys for what the cache builds (kernels,
/// initramfs images), not content addresses (those are [`digest::Digest`]s) and not a
/// security boundary: the cache is the user's own.
#[derive(Debug, Clone)]
pub struct CacheKey(u128);

impl CacheKey {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;

    /// A fresh digest.
    pub fn new() -> CacheKey {
        CacheKey(Self::OFFSET)
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) -> &mut Self {
        for &b in data {
            self.0 ^= b as u128;
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
        self
    }

    /// Adds a length-delimited field (so that fields cannot run into each other).
    pub fn field(&mut self, data: &[u8]) -> &mut Self {
        self.update(&(data.len() as u64).to_le_bytes()).update(data)
    }

    /// The hex digest.
    pub fn hex(&self) -> String {
        format!("{:032x}", self.0)
    }
}

impl Default for CacheKey {
    fn default() -> CacheKey {
        CacheKey::new()
    }
}

/// The digest of `data`.
pub fn hash_bytes(data: &[u8]) -> String {
    CacheKey::new().update(data).hex()
}

/// A suffix no other temporary file of this or another process uses.
pub fn unique_suffix() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// Held while provisioning into the cache, so that threads of one process build each
/// thing once (other processes are kept apart by unique temporary names and renames).
pub(crate) static BUILD_LOCK: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// Writes a file atomically: a temporary file in the same directory, then rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    }
    let tmp = path.with_extension(format!("tmp.{}", unique_suffix()));
    std::fs::write(&tmp, data).map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e))
}
