//! `vmhost kernel build`: the project's own minimal guest kernel.
//!
//! The configuration is `make tinyconfig` plus the fragment `kernel/vmhost.config` (every
//! option with its reason), built from the distribution's kernel source package (Debian
//! `linux-source-*`, installed through apt when missing) or a source tree the user names.
//! The packaged source gets the patches of `kernel/patches/` (each explains itself); a
//! tree given with `--source` is the user's and is built as it is.
//! The result is cached under `<cache>/kernels/minimal-<version>-<digest>/`, the digest
//! covering the configuration and the patches, so a rebuild happens only when the source
//! version, the configuration or the patches change; the file `<cache>/kernels/minimal`
//! names the one `vmhost run` uses.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::kernel::{Kernel, KernelKind};
use super::CacheKey;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// The configuration fragment, as kept in the repository.
pub const FRAGMENT: &str = include_str!("../../kernel/vmhost.config");

/// Patches to the packaged kernel source, applied in order with `patch -p1`.
pub const PATCHES: &[(&str, &str)] = &[
    (
        "0001-x86-mm-free-init-memory-without-poison.patch",
        include_str!("../../kernel/patches/0001-x86-mm-free-init-memory-without-poison.patch"),
    ),
    (
        "0002-net-bring-lo-up-during-boot.patch",
        include_str!("../../kernel/patches/0002-net-bring-lo-up-during-boot.patch"),
    ),
    (
        "0003-virtio-mmio-cap-queue-size.patch",
        include_str!("../../kernel/patches/0003-virtio-mmio-cap-queue-size.patch"),
    ),
    (
        "0004-init-warm-up-init-on-an-idle-cpu.patch",
        include_str!("../../kernel/patches/0004-init-warm-up-init-on-an-idle-cpu.patch"),
    ),
    (
        "0005-x86-apic-lapic-timer-period-parameter.patch",
        include_str!("../../kernel/patches/0005-x86-apic-lapic-timer-period-parameter.patch"),
    ),
];

/// A digest of [`PATCHES`]: names and contents.
fn patches_digest() -> String {
    let mut d = CacheKey::new();
    for (name, text) in PATCHES {
        d.field(name.as_bytes()).field(text.as_bytes());
    }
    d.hex()[..12].to_string()
}

/// The fragment without comments: what Kconfig reads.
pub fn fragment_options() -> Vec<(String, String)> {
    FRAGMENT
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

fn bad(message: impl Into<String>) -> Error {
    Error::InvalidArgument { op: "kernel build".into(), message: message.into() }
}

/// Whether `tool` is on the `PATH`.
pub(crate) fn which(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Checks the build tools, naming the install command when some are missing.
fn check_tools() -> Result<()> {
    let mut missing: Vec<&str> =
        ["gcc", "make", "flex", "bison", "bc", "patch"].into_iter().filter(|t| !which(t)).collect();
    if !Path::new("/usr/include/libelf.h").exists() && !Path::new("/usr/include/gelf.h").exists() {
        missing.push("libelf-dev");
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(bad(format!(
        "missing build tools: {}; install them with: apt-get install -y --no-install-recommends {}",
        missing.join(", "),
        missing.iter().map(|t| if *t == "gcc" { "gcc" } else { *t }).collect::<Vec<_>>().join(" ")
    )))
}

/// The Debian source tarball, installing `linux-source-6.1` when there is none.
fn source_tarball(progress: &Progress) -> Result<PathBuf> {
    let find = || {
        std::fs::read_dir("/usr/src").ok().and_then(|d| {
            let mut v: Vec<PathBuf> = d
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("linux-source-") && n.ends_with(".tar.xz"))
                })
                .collect();
            v.sort();
            v.pop()
        })
    };
    if let Some(t) = find() {
        return Ok(t);
    }
    if !which("apt-get") {
        return Err(bad(
            "no kernel source: pass --source DIR (a Linux source tree), or install linux-source-* with apt",
        ));
    }
    progress.step("installing the kernel source package (linux-source-6.1)");
    let st = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "linux-source-6.1"])
        .stdout(if progress.enabled() { Stdio::inherit() } else { Stdio::null() })
        .status()
        .map_err(|e| Error::io("run apt-get", "apt-get", e))?;
    if !st.success() {
        return Err(bad(
            "apt-get install linux-source-6.1 failed; run `apt-get update` first, or pass --source DIR",
        ));
    }
    find().ok_or_else(|| bad("linux-source-6.1 installed no /usr/src/linux-source-*.tar.xz"))
}

fn run(cmd: &mut Command, what: &str, progress: &Progress) -> Result<()> {
    run_step("kernel build", cmd, what, progress)
}

/// Runs one step of a build from source (`op` names the build in the error), its output
/// shown when progress is, the tail of its errors kept for the message.
pub(crate) fn run_step(op: &str, cmd: &mut Command, what: &str, progress: &Progress) -> Result<()> {
    log::debug!("{what}: {cmd:?}");
    let out = cmd
        .stdout(if progress.enabled() { Stdio::inherit() } else { Stdio::null() })
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| Error::io("run", what, e))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        return Err(Error::InvalidArgument {
            op: op.into(),
            message: format!(
                "{what} failed ({}):\n{}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        });
    }
    Ok(())
}

/// Builds the minimal kernel (or finds it in the cache) and makes it the one
/// `vmhost run` uses.
pub fn build(cache: &Path, source: Option<&Path>, progress: &Progress) -> Result<Kernel> {
    check_tools()?;
    let _built_once = super::BUILD_LOCK.lock();
    let build_root = cache.join("build");
    std::fs::create_dir_all(&build_root).map_err(|e| Error::io("create", &build_root, e))?;
    let tree = match source {
        Some(dir) => dir.to_path_buf(),
        None => {
            let tarball = source_tarball(progress)?;
            let stem = tarball
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .trim_end_matches(".tar.xz")
                .to_string();
            let tree = build_root.join(&stem);
            // The stamp says which patches the unpacked tree carries; any other set
            // (or none) means a fresh unpack.
            let stamp = tree.join(".vmhost-patches");
            let patched = patches_digest();
            if !tree.join("Makefile").is_file()
                || std::fs::read_to_string(&stamp).ok().as_deref() != Some(patched.as_str())
            {
                progress.step(&format!("unpacking {}", tarball.display()));
                let _ = std::fs::remove_dir_all(&tree);
                run(
                    Command::new("tar").arg("-xf").arg(&tarball).arg("-C").arg(&build_root),
                    "tar -x",
                    progress,
                )?;
                for (name, text) in PATCHES {
                    progress.step(&format!("applying kernel/patches/{name}"));
                    let file = build_root.join(name);
                    std::fs::write(&file, text).map_err(|e| Error::io("write", &file, e))?;
                    run(
                        Command::new("patch")
                            .args(["-p1", "--forward", "--batch", "--silent", "-i"])
                            .arg(&file)
                            .current_dir(&tree),
                        &format!("patch {name}"),
                        progress,
                    )?;
                }
                std::fs::write(&stamp, &patched).map_err(|e| Error::io("write", &stamp, e))?;
            }
            tree
        }
    };
    let version = Command::new("make")
        .args(["-s", "kernelversion"])
        .current_dir(&tree)
        .output()
        .map_err(|e| Error::io("run make kernelversion", &tree, e))?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    if version.is_empty() {
        return Err(bad(format!(
            "{} is not a Linux source tree (make kernelversion said nothing)",
            tree.display()
        )));
    }
    let options = fragment_options();
    let mut d = CacheKey::new();
    d.field(version.as_bytes());
    match source {
        None => d.field(patches_digest().as_bytes()),
        Some(dir) => {
            log::warn!(
                "building {} as it is: vmhost's kernel patches (kernel/patches/) are applied only to \
                 the packaged source; without them the guest boots ~0.17 s slower under TCG",
                dir.display()
            );
            d.field(b"unpatched")
        }
    };
    for (k, v) in &options {
        d.field(k.as_bytes()).field(v.as_bytes());
    }
    let key = d.hex()[..12].to_string();
    let name = format!("minimal-{version}-{key}");
    let kernels = cache.join("kernels");
    let kdir = kernels.join(&name);
    if !kdir.join("vmlinux").is_file() {
        let out = build_root.join(format!("out-{version}-{key}"));
        std::fs::create_dir_all(&out).map_err(|e| Error::io("create", &out, e))?;
        let frag = out.join("vmhost.fragment");
        let text: String = options.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        std::fs::write(&frag, text).map_err(|e| Error::io("write", &frag, e))?;
        let make = |args: &[&str]| {
            let mut c = Command::new("make");
            c.current_dir(&tree).arg(format!("O={}", out.display())).arg("ARCH=x86_64").args(args);
            c
        };
        progress.step(&format!("configuring Linux {version} (tinyconfig + kernel/vmhost.config)"));
        run(&mut make(&["-s", "tinyconfig"]), "make tinyconfig", progress)?;
        run(
            Command::new(tree.join("scripts/kconfig/merge_config.sh"))
                .current_dir(&tree)
                .args(["-m", "-O"])
                .arg(&out)
                .arg(out.join(".config"))
                .arg(&frag),
            "merge_config.sh",
            progress,
        )?;
        run(&mut make(&["-s", "olddefconfig"]), "make olddefconfig", progress)?;
        let config = std::fs::read_to_string(out.join(".config"))
            .map_err(|e| Error::io("read", out.join(".config"), e))?;
        let lost: Vec<String> = options
            .iter()
            .filter(|(k, v)| {
                if v == "n" {
                    config.lines().any(|l| l.starts_with(&format!("{k}=")))
                } else {
                    !config.lines().any(|l| l == format!("{k}={v}"))
                }
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !lost.is_empty() {
            return Err(bad(format!(
                "Kconfig did not keep: {} (a dependency is missing from the fragment)",
                lost.join(", ")
            )));
        }
        let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
        progress.step(&format!("building Linux {version} with {jobs} jobs (minutes)"));
        run(&mut make(&["-s", &format!("-j{jobs}"), "vmlinux"]), "make vmlinux", progress)?;
        let staged = kernels.join(format!(".{name}.{}", super::unique_suffix()));
        std::fs::create_dir_all(&staged).map_err(|e| Error::io("create", &staged, e))?;
        std::fs::copy(out.join("vmlinux"), staged.join("vmlinux"))
            .map_err(|e| Error::io("copy vmlinux", &out, e))?;
        std::fs::copy(out.join(".config"), staged.join("config"))
            .map_err(|e| Error::io("copy config", &out, e))?;
        std::fs::write(staged.join("modules.load"), "").map_err(|e| Error::io("write", &staged, e))?;
        std::fs::write(staged.join("kind"), "minimal\n").map_err(|e| Error::io("write", &staged, e))?;
        let _ = std::fs::remove_dir_all(&kdir);
        std::fs::rename(&staged, &kdir).map_err(|e| Error::io("install kernel", &kdir, e))?;
    }
    super::write_atomic(&kernels.join("minimal"), name.as_bytes())?;
    progress.step(&format!("minimal kernel {name} ready"));
    Ok(Kernel {
        vmlinux: kdir.join("vmlinux"),
        modules: Vec::new(),
        origin: kdir.display().to_string(),
        kind: KernelKind::Minimal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_patch_in_the_repository_is_applied_in_name_order() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel/patches");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".patch"))
            .collect();
        files.sort();
        let listed: Vec<&str> = PATCHES.iter().map(|(n, _)| *n).collect();
        assert_eq!(files, listed, "kernel/patches/ and PATCHES disagree");
        for (name, text) in PATCHES {
            assert_eq!(*text, std::fs::read_to_string(dir.join(name)).unwrap());
            let (why, diff) = text.split_once("\n--- a/").expect("a description, then a -p1 diff");
            assert!(why.lines().count() >= 3, "{name}: say why the patch exists");
            assert!(diff.contains("\n+++ b/"), "{name}: not a unified diff");
        }
    }
}
