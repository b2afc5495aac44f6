//! A container image's root as a read-only erofs image, built once per platform
//! manifest into `cache/roots/ALG-HEX.erofs` with `mkfs.erofs` (Debian's erofs-utils)
//! from the unpacked layers, and attached to the guest as a virtio-blk disk: the image
//! is never copied into guest memory, so the boot does not grow with its size.

use std::path::{Path, PathBuf};

use super::pull::StoredImage;
use super::store::Store;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// The tool that builds the images.
pub const MKFS: &str = "mkfs.erofs";

/// Whether `mkfs.erofs` is on the `PATH`.
pub fn available() -> bool {
    super::kernel_build::which(MKFS)
}

/// The erofs image of `img`'s root, built when missing (under a lock and a temporary
/// name, from the layers unpacked into a scratch directory that is removed after).
pub fn image_disk(store: &Store, img: &StoredImage, cache: &Path, progress: &Progress) -> Result<PathBuf> {
    let roots = super::unpack::roots_dir(cache)?;
    let name = format!("{}-{}", img.manifest_digest.algorithm().as_str(), img.manifest_digest.hex());
    let disk = roots.join(format!("{name}.erofs"));
    if disk.is_file() {
        return Ok(disk);
    }
    let _lock = super::store::lock_exclusive(&roots.join(format!("{name}.erofs.lock")))?;
    if disk.is_file() {
        return Ok(disk);
    }
    let scratch = roots.join(format!("{name}.unpack.{}", super::unique_suffix()));
    std::fs::create_dir(&scratch).map_err(|e| Error::io("create directory", &scratch, e))?;
    let mut state_file: Option<PathBuf> = None;
    let built = (|| {
        let faked = super::unpack::unpack_into(store, img, &scratch, progress)?;
        // The image's `/`: readable by all, as in a container.
        std::fs::set_permissions(&scratch, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| Error::io("chmod", &scratch, e))?;
        progress.step(&format!("building the image's disk ({MKFS})"));
        let tmp = roots.join(format!("{name}.erofs.tmp.{}", super::unique_suffix()));
        // Not root: owners, device nodes and modes come from the image through
        // fakeroot, which mkfs.erofs runs under (see unpack::Root::fakeroot_state).
        let mut cmd = match &faked {
            Some(state) if super::kernel_build::which("fakeroot") => {
                let file = roots.join(format!("{name}.fakeroot.{}", super::unique_suffix()));
                std::fs::write(&file, state).map_err(|e| Error::io("write", &file, e))?;
                let mut c = std::process::Command::new("fakeroot");
                // -u: what the state has no entry for keeps its real owner (vmhost's own
                // files stay vmhost's, not root's).
                c.arg("-u").arg("-i").arg(&file).arg("--").arg(MKFS);
                state_file = Some(file);
                c
            }
            Some(_) => {
                log::warn!(
                    "{}: the image's owners and device nodes are lost: vmhost is not root and fakeroot is \
                     missing (apt-get install fakeroot)",
                    img.name
                );
                std::process::Command::new(MKFS)
            }
            None => std::process::Command::new(MKFS),
        };
        let out = cmd
            .arg("--quiet")
            .arg("--preserve-mtime")
            .arg(&tmp)
            .arg(&scratch)
            .output()
            .map_err(|e| Error::io("run mkfs.erofs (apt-get install erofs-utils)", MKFS, e));
        if let Some(f) = state_file.take() {
            let _ = std::fs::remove_file(f);
        }
        let out = out?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::InvalidArgument {
                op: "build the image's disk".into(),
                message: format!("{MKFS} failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        std::fs::rename(&tmp, &disk).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io("publish", &disk, e)
        })
    })();
    super::unpack::remove_tree(&scratch);
    built.map(|()| disk)
}
