//! The default image's busybox, built from Debian's source package.
//!
//! Debian's `busybox-static` lacks wget's timeout, and its wget then crashes on `-T` (see
//! `busybox/vmhost.config`), the option scripts and healthchecks use. So vmhost builds
//! busybox the way Debian builds `busybox-static`, from the same source package (the
//! upstream tarball and Debian's patches, security fixes among them) and Debian's
//! configuration, with the options of `busybox/vmhost.config` set first.
//!
//! Both tarballs come from Debian's archive (`VMHOST_DEBIAN_MIRROR`, by default
//! `http://deb.debian.org/debian`) and are checked against the sizes and SHA-256 sums
//! below before anything reads them, so a mirror or a proxy cannot change what is built.
//! The binary is cached as `<cache>/busybox/<DIGEST>/busybox`, the digest covering the
//! source and the fragment; a build takes about 40 s on two cores, once.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::kernel_build::which;
use super::CacheKey;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// The configuration fragment, as kept in the repository.
pub const FRAGMENT: &str = include_str!("../../busybox/vmhost.config");

/// Debian's source package: version, and each file's name, size and SHA-256 (from its
/// `.dsc`).
pub const DEBIAN_VERSION: &str = "1:1.35.0-4+deb12u1";
const UPSTREAM: Tarball = Tarball {
    name: "busybox_1.35.0.orig.tar.bz2",
    size: 2_480_624,
    sha256: "faeeb244c35a348a334f4a59e44626ee870fb07b6884d68c10ae8bc19f83a694",
};
const DEBIAN: Tarball = Tarball {
    name: "busybox_1.35.0-4+deb12u1.debian.tar.xz",
    size: 68_028,
    sha256: "1cacbe095ef4880ea7879933c8e3c5075d1527cd6fbcb626a9b41e5daefd1a46",
};
/// The directory the upstream tarball unpacks into.
const UPSTREAM_DIR: &str = "busybox-1.35.0";

struct Tarball {
    name: &'static str,
    size: u64,
    sha256: &'static str,
}

fn bad(message: impl Into<String>) -> Error {
    Error::InvalidArgument { op: "busybox build".into(), message: message.into() }
}

/// The fragment's options, comments dropped: `CONFIG_X=y` lines and `# CONFIG_X is not
/// set` ones, as Kconfig writes them.
pub fn fragment_options() -> Vec<String> {
    FRAGMENT
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_") || (l.starts_with("# CONFIG_") && l.ends_with(" is not set")))
        .map(str::to_string)
        .collect()
}

/// What names a build: the source package and the fragment's options.
pub fn key() -> String {
    let mut d = CacheKey::new();
    d.field(DEBIAN_VERSION.as_bytes()).field(UPSTREAM.sha256.as_bytes()).field(DEBIAN.sha256.as_bytes());
    for o in fragment_options() {
        d.field(o.as_bytes());
    }
    d.hex()[..12].to_string()
}

/// The build tools missing from this machine, by Debian package.
pub fn missing_tools() -> Vec<&'static str> {
    let mut missing: Vec<&str> =
        [("gcc", "gcc"), ("make", "make"), ("patch", "patch"), ("bzip2", "bzip2"), ("xz", "xz-utils")]
            .into_iter()
            .filter(|(t, _)| !which(t))
            .map(|(_, p)| p)
            .collect();
    if !Path::new("/usr/include/stdio.h").exists() {
        missing.push("libc6-dev");
    }
    missing
}

/// The busybox binary of [`key`], built now when the cache has none.
pub fn build(cache: &Path, progress: &Progress) -> Result<PathBuf> {
    let dir = cache.join("busybox").join(key());
    let bin = dir.join("busybox");
    if bin.is_file() {
        return Ok(bin);
    }
    let missing = missing_tools();
    if !missing.is_empty() {
        return Err(bad(format!(
            "missing build tools: install them with: apt-get install -y --no-install-recommends {}",
            missing.join(" ")
        )));
    }
    let work = cache.join("build").join(format!("busybox-{}", super::unique_suffix()));
    std::fs::create_dir_all(&work).map_err(|e| Error::io("create", &work, e))?;
    let result = build_in(&work, &dir, progress);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn build_in(work: &Path, dir: &Path, progress: &Progress) -> Result<PathBuf> {
    let mirror = std::env::var("VMHOST_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_string());
    let mirror = mirror.trim_end_matches('/');
    progress.step(&format!("downloading busybox {DEBIAN_VERSION} source from {mirror}"));
    for t in [&UPSTREAM, &DEBIAN] {
        download(&format!("{mirror}/pool/main/b/busybox/{}", t.name), t, &work.join(t.name))?;
    }
    run(Command::new("tar").arg("-xjf").arg(UPSTREAM.name).current_dir(work), "tar -xjf", progress)?;
    run(Command::new("tar").arg("-xJf").arg(DEBIAN.name).current_dir(work), "tar -xJf", progress)?;
    let tree = work.join(UPSTREAM_DIR);
    let debian = work.join("debian");
    let series = std::fs::read_to_string(debian.join("patches/series"))
        .map_err(|e| Error::io("read", debian.join("patches/series"), e))?;
    for name in series.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        run(
            Command::new("patch")
                .args(["-p1", "--forward", "--batch", "--silent", "-i"])
                .arg(debian.join("patches").join(name))
                .current_dir(&tree),
            &format!("patch {name}"),
            progress,
        )?;
    }
    // As debian/rules does: the OS's overrides, then the flavour's configuration, the
    // first assignment winning; ours come before both.
    let mut config: String = fragment_options().iter().map(|o| format!("{o}\n")).collect();
    for part in ["config/os/linux", "config/pkg/static"] {
        let p = debian.join(part);
        config.push_str(&std::fs::read_to_string(&p).map_err(|e| Error::io("read", &p, e))?);
    }
    std::fs::write(tree.join(".config"), config).map_err(|e| Error::io("write", tree.join(".config"), e))?;
    let make = || {
        let mut c = Command::new("make");
        c.current_dir(&tree).env("KCONFIG_NOTIMESTAMP", "1").env_remove("CFLAGS").env_remove("LDFLAGS");
        c
    };
    progress.step("configuring busybox (Debian's static configuration + busybox/vmhost.config)");
    let mut oldconfig = make();
    oldconfig.arg("oldconfig").stdin(Stdio::null());
    run(&mut oldconfig, "make oldconfig", progress)?;
    let written = std::fs::read_to_string(tree.join(".config"))
        .map_err(|e| Error::io("read", tree.join(".config"), e))?;
    let lost: Vec<String> =
        fragment_options().into_iter().filter(|o| !written.lines().any(|l| l.trim() == o)).collect();
    if !lost.is_empty() {
        return Err(bad(format!("Kconfig did not keep: {}", lost.join(", "))));
    }
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    progress.step(&format!("building busybox with {jobs} jobs (about a minute)"));
    run(
        make()
            .arg(format!("-j{jobs}"))
            .arg("busybox")
            .arg(format!("BB_EXTRA_VERSION=Debian {DEBIAN_VERSION} vmhost")),
        "make busybox",
        progress,
    )?;
    let built = tree.join("busybox");
    let elf = std::fs::read(&built).map_err(|e| Error::io("read", &built, e))?;
    if super::elf::has_interp(&elf) {
        return Err(bad("the build made a dynamically linked busybox (CONFIG_STATIC is off)"));
    }
    let staged = dir.with_extension(super::unique_suffix());
    std::fs::create_dir_all(&staged).map_err(|e| Error::io("create", &staged, e))?;
    std::fs::copy(&built, staged.join("busybox")).map_err(|e| Error::io("copy", &built, e))?;
    if let Err(e) = std::fs::rename(&staged, dir) {
        let _ = std::fs::remove_dir_all(&staged);
        // Another process built it first: use theirs.
        if !dir.join("busybox").is_file() {
            return Err(Error::io("install", dir, e));
        }
    }
    Ok(dir.join("busybox"))
}

/// Downloads `url` into `to`, refusing more bytes than `t` has or other content.
fn download(url: &str, t: &Tarball, to: &Path) -> Result<()> {
    check(&fetch(url, t.size + 1)?, url, t, to)
}

/// Writes `body` to `to` when it is `t`, byte for byte.
fn check(body: &[u8], url: &str, t: &Tarball, to: &Path) -> Result<()> {
    if body.len() as u64 != t.size {
        return Err(bad(format!("{url}: {} bytes, expected {}", body.len(), t.size)));
    }
    let sum = Sha256::digest(body);
    let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
    if hex != t.sha256 {
        return Err(bad(format!("{url}: SHA-256 {hex}, expected {}", t.sha256)));
    }
    std::fs::write(to, body).map_err(|e| Error::io("write", to, e))
}

#[cfg(feature = "registry")]
fn fetch(url: &str, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(30))
        .timeout_read(std::time::Duration::from_secs(120))
        .try_proxy_from_env(true)
        .user_agent(concat!("vmhost/", env!("CARGO_PKG_VERSION")))
        .build();
    let response = agent.get(url).call().map_err(|e| {
        bad(format!(
            "cannot download {url}: {e}; set VMHOST_DEBIAN_MIRROR to a Debian mirror this machine reaches, \
             or VMHOST_BUSYBOX to a static busybox binary"
        ))
    })?;
    let mut body = Vec::new();
    response.into_reader().take(limit).read_to_end(&mut body).map_err(|e| Error::io("download", url, e))?;
    Ok(body)
}

#[cfg(not(feature = "registry"))]
fn fetch(url: &str, _limit: u64) -> Result<Vec<u8>> {
    Err(bad(format!("cannot download {url}: vmhost was built without its HTTP client (feature `registry`)")))
}

fn run(cmd: &mut Command, what: &str, progress: &Progress) -> Result<()> {
    super::kernel_build::run_step("busybox build", cmd, what, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fragment_turns_on_wgets_timeout() {
        assert!(fragment_options().contains(&"CONFIG_FEATURE_WGET_TIMEOUT=y".to_string()));
        assert!(fragment_options().iter().all(|o| !o.contains("Each option")), "comments are dropped");
    }

    #[test]
    fn a_download_of_other_content_is_refused_before_use() {
        let dir = crate::test_dir::TempDir::new("busybox-download");
        let t = Tarball { name: "x", size: 3, sha256: "00" };
        // Through `download`'s checks, without a network: the body is checked, not the url.
        let to = dir.join("x");
        let e = check(b"abc", "file:x", &t, &to).unwrap_err().to_string();
        assert!(e.contains("SHA-256"), "{e}");
        let e = check(b"abcd", "file:x", &t, &to).unwrap_err().to_string();
        assert!(e.contains("4 bytes, expected 3"), "{e}");
        assert!(!to.exists(), "nothing written");
    }
}
