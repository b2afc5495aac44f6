//! The initramfs a guest boots: the image's root, the kernel modules the agent loads,
//! and the agent itself as `/init`. Written once per (agent, modules, image) and cached
//! under `<cache>/initramfs/<digest>.cpio`.

use std::io::BufWriter;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::cpio::{self, Meta};
use super::kernel::Kernel;
use super::rootfs::Source;
use super::{elf, Digest};
use crate::error::{Error, Result};
use crate::progress::Progress;

/// The agent's binary name.
pub const AGENT_BIN: &str = "vmhost-agent";

/// Finds the static guest agent: `VMHOST_AGENT`, next to the current executable, in
/// this source tree's static build directory, `~/.local/share/vmhost/bin`, then `$PATH`.
pub fn find_agent() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("VMHOST_AGENT").filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            candidates.push(dir.join(AGENT_BIN));
            candidates.push(dir.join("x86_64-unknown-linux-gnu/release").join(AGENT_BIN));
            candidates.push(dir.join("target/x86_64-unknown-linux-gnu/release").join(AGENT_BIN));
        }
    }
    candidates.push(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target/x86_64-unknown-linux-gnu/release")
            .join(AGENT_BIN),
    );
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".local/share/vmhost/bin").join(AGENT_BIN));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(AGENT_BIN)));
    }
    let mut dynamic = None;
    for c in &candidates {
        // The ELF and program headers are at the start: no need to read the whole file.
        let Ok(data) = read_head(c, 64 << 10) else { continue };
        if !elf::is_elf64(&data) {
            continue;
        }
        if elf::has_interp(&data) {
            dynamic.get_or_insert(c.clone());
            continue;
        }
        return Ok(c.clone());
    }
    let hint = "build it with scripts/build-agent.sh (RUSTFLAGS='-C target-feature=+crt-static' cargo build \
                --release --target x86_64-unknown-linux-gnu --bin vmhost-agent) or set VMHOST_AGENT";
    Err(Error::InvalidArgument {
        op: "find guest agent".into(),
        message: match dynamic {
            Some(d) => {
                format!("{} is dynamically linked and cannot run as the guest's init; {hint}", d.display())
            }
            None => format!("no static {AGENT_BIN} found; {hint}"),
        },
    })
}

fn read_head(path: &Path, n: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut v = Vec::new();
    std::fs::File::open(path)?.take(n).read_to_end(&mut v)?;
    Ok(v)
}

/// Builds (or finds in the cache) the initramfs for `source` booted with `kernel`.
pub fn build(
    cache: &Path,
    kernel: &Kernel,
    agent: &Path,
    source: &Source,
    progress: &Progress,
) -> Result<PathBuf> {
    // The default root is a directory in the cache, provisioned first: provisioning
    // takes the build lock itself, which this function holds below.
    let source = &match source {
        Source::Default => Source::Dir(super::rootfs::busybox_root(cache, progress)?),
        other => other.clone(),
    };
    let mut d = Digest::new();
    d.field(b"vmhost-initramfs-v2");
    // The agent is keyed by its identity (path, size, mtime), like image files: hashing
    // its 1.6 MB on every boot would cost milliseconds for nothing.
    let am = std::fs::metadata(agent).map_err(|e| Error::io("stat agent", agent, e))?;
    d.field(agent.as_os_str().as_encoded_bytes()).field(&am.size().to_le_bytes());
    d.field(&am.mtime().to_le_bytes()).field(&am.mtime_nsec().to_le_bytes());
    for m in &kernel.modules {
        let meta = std::fs::metadata(m).map_err(|e| Error::io("stat module", m, e))?;
        d.field(m.as_os_str().as_encoded_bytes())
            .field(&meta.size().to_le_bytes())
            .field(&meta.mtime().to_le_bytes());
    }
    source.identity(&mut d)?;
    let out = cache.join("initramfs").join(format!("{}.cpio", d.hex()));
    if out.is_file() {
        return Ok(out);
    }
    let _built_once = super::BUILD_LOCK.lock();
    if out.is_file() {
        return Ok(out);
    }
    progress.step("building the initramfs");
    std::fs::create_dir_all(out.parent().expect("has a parent")).map_err(|e| Error::io("create", &out, e))?;
    let tmp = out.with_extension(format!("tmp.{}", super::unique_suffix()));
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        let mut w = cpio::Writer::new(BufWriter::with_capacity(1 << 20, file));
        source.write_to(&mut w, cache, progress)?;
        let io = |e| Error::io("write initramfs", &tmp, e);
        w.dir("vmhost", Meta::root(0o755)).map_err(io)?;
        w.dir("vmhost/modules", Meta::root(0o755)).map_err(io)?;
        let mut list = String::new();
        for m in &kernel.modules {
            let name = m.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let data = std::fs::read(m).map_err(|e| Error::io("read module", m, e))?;
            w.file(&format!("vmhost/modules/{name}"), Meta::root(0o644), &data).map_err(io)?;
            list.push_str(&name);
            list.push('\n');
        }
        w.file("vmhost/modules.load", Meta::root(0o644), list.as_bytes()).map_err(io)?;
        for d in ["proc", "sys", "dev", "tmp", "run"] {
            w.dir(d, Meta::root(if d == "tmp" { 0o1777 } else { 0o755 })).map_err(io)?;
        }
        let agent_data = std::fs::read(agent).map_err(|e| Error::io("read agent", agent, e))?;
        w.file("init", Meta::root(0o755), &agent_data).map_err(io)?;
        let mut buf = w.finish().map_err(io)?;
        std::io::Write::flush(&mut buf).map_err(io)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &out).map_err(|e| Error::io("install initramfs", &out, e))?;
    Ok(out)
}
