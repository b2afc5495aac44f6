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
    let mut temp_files: Vec<PathBuf> = Vec::new();
    let built = (|| {
        let faked = super::unpack::unpack_into(store, img, &scratch, progress)?;
        // The image's `/`: readable by all, as in a container.
        std::fs::set_permissions(&scratch, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| Error::io("chmod", &scratch, e))?;
        progress.step(&format!("building the image's disk ({MKFS})"));
        let tmp = roots.join(format!("{name}.erofs.tmp.{}", super::unique_suffix()));
        let tmp = std::path::absolute(&tmp).map_err(|e| Error::io("resolve", &tmp, e))?;
        let mut cmd = mkfs_command(&faked, &roots, &name, &img.name, &mut temp_files)?;
        // The tree is the working directory: the xattr dump names paths below it.
        let out = cmd
            .arg("--quiet")
            .arg("--preserve-mtime")
            .arg(&tmp)
            .arg(".")
            .current_dir(&scratch)
            .output()
            .map_err(|e| Error::io("run mkfs.erofs (apt-get install erofs-utils)", MKFS, e));
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
    for f in temp_files {
        let _ = std::fs::remove_file(f);
    }
    super::unpack::remove_tree(&scratch);
    built.map(|()| disk)
}

/// `mkfs.erofs`, to be given its arguments. As root the files on disk say everything.
/// Not root: under `fakeroot -u -i STATE` for owners, modes and device nodes (`-u`:
/// what the state has no entry for keeps its real owner, so vmhost's own files stay
/// vmhost's), after `setfattr -h --restore` in the same fakeroot session for the
/// xattrs, which fakeroot keeps for any name but its state file does not hold.
fn mkfs_command(
    faked: &super::unpack::FakedTree,
    roots: &Path,
    name: &str,
    image: &str,
    temp_files: &mut Vec<PathBuf>,
) -> Result<std::process::Command> {
    use super::kernel_build::which;
    if faked.is_empty() {
        return Ok(std::process::Command::new(MKFS));
    }
    if !which("fakeroot") {
        log::warn!(
            "{image}: the image's owners, device nodes and xattrs are lost: vmhost is not root and \
             fakeroot is missing (apt-get install fakeroot)"
        );
        return Ok(std::process::Command::new(MKFS));
    }
    let mut write = |what: &str, text: &str| -> Result<PathBuf> {
        let file = roots.join(format!("{name}.{what}.{}", super::unique_suffix()));
        // Absolute: the tools run in the tree.
        let file = std::path::absolute(&file).map_err(|e| Error::io("resolve", &file, e))?;
        std::fs::write(&file, text).map_err(|e| Error::io("write", &file, e))?;
        temp_files.push(file.clone());
        Ok(file)
    };
    let mut c = std::process::Command::new("fakeroot");
    c.arg("-u");
    if let Some(state) = &faked.state {
        c.arg("-i").arg(write("fakeroot", state)?);
    }
    c.arg("--");
    match &faked.xattrs {
        Some(dump) if which("setfattr") => {
            let dump = write("xattrs", dump)?;
            c.args(["sh", "-c", "setfattr -h --restore=\"$0\" && exec \"$@\""]).arg(dump).arg(MKFS);
        }
        Some(_) => {
            log::warn!(
                "{image}: the image's xattrs are lost: vmhost is not root and setfattr is missing \
                 (apt-get install attr)"
            );
            c.arg(MKFS);
        }
        None => {
            c.arg(MKFS);
        }
    }
    Ok(c)
}
