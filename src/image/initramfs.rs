//! The initramfs a guest boots: the image's root, the kernel modules the agent loads,
//! and the agent itself as `/init`. Written once per (agent, modules, image) and cached
//! under `<cache>/initramfs/<digest>.cpio`.

use std::io::BufWriter;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cpio::{self, Meta};
use super::kernel::Kernel;
use super::rootfs::Source;
use super::{elf, CacheKey};
use crate::error::{Error, Result};
use crate::progress::Progress;

/// The agent's binary name.
pub const AGENT_BIN: &str = "vmhost-agent";

/// The targets `scripts/build-agent.sh` builds the agent for, preferred first (musl's
/// starts faster; glibc's is the fallback where Rust's musl target is missing).
const AGENT_TARGETS: [&str; 2] = ["x86_64-unknown-linux-musl", "x86_64-unknown-linux-gnu"];

/// Finds the static guest agent: `VMHOST_AGENT`, next to the current executable, in
/// this source tree's static build directories (musl's, then glibc's),
/// `~/.local/share/vmhost/bin`, then `$PATH`.
pub fn find_agent() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("VMHOST_AGENT").filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            candidates.push(dir.join(AGENT_BIN));
            for t in AGENT_TARGETS {
                candidates.push(dir.join(t).join("release").join(AGENT_BIN));
                candidates.push(dir.join("target").join(t).join("release").join(AGENT_BIN));
            }
        }
    }
    for t in AGENT_TARGETS {
        candidates.push(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target").join(t).join("release").join(AGENT_BIN),
        );
    }
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
    let hint =
        "build it with scripts/build-agent.sh (a static build for the x86_64-unknown-linux-musl target, \
                or -gnu with -C target-feature=+crt-static), or set VMHOST_AGENT";
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

/// The most bytes an initramfs may take, and what to say of it.
#[derive(Debug, Clone)]
pub struct SizeLimit {
    /// The bound, in bytes.
    pub bytes: u64,
    /// What it comes from and what to do when an image passes it.
    pub why: String,
}

/// Memory the guest kernel and agent need besides the image, in MiB.
pub const KERNEL_MEMORY_MB: u64 = 64;

impl SizeLimit {
    /// The limit for a guest of `memory_mb`: `VMHOST_IMAGE_MAX_MB` when set, else half of
    /// what the kernel and agent leave ([`KERNEL_MEMORY_MB`]), since the guest holds the
    /// archive and the files it unpacks from it in memory at once while it boots.
    pub fn for_memory(memory_mb: u64) -> SizeLimit {
        if let Some(mb) = std::env::var("VMHOST_IMAGE_MAX_MB").ok().and_then(|v| v.trim().parse::<u64>().ok())
        {
            return SizeLimit {
                bytes: mb.saturating_mul(1 << 20),
                why: format!("VMHOST_IMAGE_MAX_MB is {mb}; raise it, or use a smaller image"),
            };
        }
        let mb = memory_mb.saturating_sub(KERNEL_MEMORY_MB) / 2;
        SizeLimit {
            bytes: mb << 20,
            why: format!(
                "a guest of {memory_mb} MiB unpacks at most {mb} MiB of image (the archive and its files are \
                 both in its memory while it boots): give it more memory (--memory), use a smaller image, \
                 or set VMHOST_IMAGE_MAX_MB"
            ),
        }
    }

    /// No bound at all: for archives whose size is known and small (tests, benches).
    pub fn none() -> SizeLimit {
        SizeLimit { bytes: u64::MAX, why: String::new() }
    }
}

/// Builds (or finds in the cache) the initramfs for `source` booted with `kernel`, of at
/// most `limit` bytes: an image that would pass it is refused while it is read, and
/// nothing of it stays in the cache.
pub fn build(
    cache: &Path,
    kernel: &Kernel,
    agent: &Path,
    source: &Source,
    limit: &SizeLimit,
    progress: &Progress,
) -> Result<PathBuf> {
    // The default root is a directory in the cache, provisioned first: provisioning
    // takes the build lock itself, which this function holds below.
    let source = &match source {
        Source::Default => Source::Dir(super::rootfs::busybox_root(cache, progress)?),
        other => other.clone(),
    };
    let mut d = CacheKey::new();
    d.field(b"vmhost-initramfs-v4");
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
    // Marked used first, then looked for: a prune that saw it unused before the mark
    // may have removed it, never after (see `prune`).
    let cached = |out: &Path| -> Result<bool> {
        if !(mark_used(out) && out.is_file()) {
            return Ok(false);
        }
        // Built for a larger guest: too large for this one.
        let len = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
        if len > limit.bytes {
            return Err(Error::InvalidArgument {
                op: "build the initramfs".into(),
                message: format!("the image takes {} MiB; {}", len.div_ceil(1 << 20), limit.why),
            });
        }
        Ok(true)
    };
    if cached(&out)? {
        return Ok(out);
    }
    let _built_once = super::BUILD_LOCK.lock();
    if cached(&out)? {
        return Ok(out);
    }
    progress.step("building the initramfs");
    std::fs::create_dir_all(out.parent().expect("has a parent")).map_err(|e| Error::io("create", &out, e))?;
    let tmp = out.with_extension(format!("tmp.{}", super::unique_suffix()));
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        let mut w = cpio::Writer::new(BufWriter::with_capacity(1 << 20, file));
        w.set_limit(limit.bytes, limit.why.clone());
        let io = |e| Error::io("write initramfs", &tmp, e);
        // The agent is /init: the image's own init goes under /vmhost, with its other
        // names (an init that is a hard link to busybox keeps busybox whole).
        w.dir("vmhost", Meta::root(0o755)).map_err(io)?;
        w.reserve(&["init"], "vmhost/image-");
        source.write_to(&mut w, cache, progress)?;
        w.release();
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
    let dir = out.parent().expect("has a parent");
    let removed = prune(dir, &out, std::time::SystemTime::now(), UNUSED_FOR, BUDGET);
    if removed > 0 {
        log::debug!("removed {removed} unused initramfs files from {}", dir.display());
    }
    Ok(out)
}

/// A cached initramfs unused this long is removed when another is written.
const UNUSED_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// Beyond this many bytes of cached initramfs files, the least recently used go too.
const BUDGET: u64 = 2 << 30;
/// A temporary file this old is the leftover of an interrupted write.
const LEFTOVER_AFTER: Duration = Duration::from_secs(3600);
/// A file used this recently is never removed, over budget or not: another VM may be
/// about to boot from it.
const IN_USE_FOR: Duration = Duration::from_secs(3600);

/// Marks a cached initramfs as used now: its mtime, which [`prune`] goes by. False
/// when the file is not there; true too when it cannot be marked (a read-only cache
/// still boots).
fn mark_used(path: &Path) -> bool {
    use nix::sys::time::TimeSpec;
    let marked = nix::sys::stat::utimensat(
        None,
        path,
        &TimeSpec::UTIME_OMIT,
        &TimeSpec::UTIME_NOW,
        nix::sys::stat::UtimensatFlags::FollowSymlink,
    );
    marked != Err(nix::errno::Errno::ENOENT)
}

/// Keeps the initramfs cache `dir` from growing without end (every new agent build or
/// image writes another): removes the files unused for `unused_for` (by mtime, see
/// [`mark_used`]), then the least recently used beyond `budget` bytes, and leftovers of
/// interrupted writes; never `keep`, the one just written, nor one used in the last
/// hour. Each file's age is read again just before it goes, so that a boot that marks
/// a file used keeps it. Returns how many it removed. A VM already booted from a removed
/// file is not affected: QEMU has read it.
fn prune(dir: &Path, keep: &Path, now: std::time::SystemTime, unused_for: Duration, budget: u64) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let age = |m: &std::fs::Metadata| {
        m.modified().ok().and_then(|t| now.duration_since(t).ok()).unwrap_or_default()
    };
    // The files that may go for the budget, and the size of all that stay for now.
    let mut cached = Vec::new();
    let mut total: u64 = 0;
    let mut removed = 0;
    for e in entries.flatten() {
        let path = e.path();
        let Ok(m) = e.metadata() else { continue };
        let name = e.file_name().to_string_lossy().into_owned();
        let cpio = name.ends_with(".cpio");
        let stale = if cpio {
            path != keep && age(&m) > unused_for
        } else {
            name.contains(".tmp.") && age(&m) > LEFTOVER_AFTER
        };
        if stale {
            removed += usize::from(remove_if_older(&path, IN_USE_FOR, now));
        } else if cpio {
            total += m.len();
            if path != keep && age(&m) > IN_USE_FOR {
                cached.push((age(&m), m.len(), path));
            }
        }
    }
    // Oldest first.
    cached.sort_by_key(|c| std::cmp::Reverse(c.0));
    for (_, len, path) in cached {
        if total <= budget {
            break;
        }
        if remove_if_older(&path, IN_USE_FOR, now) {
            removed += 1;
            total -= len;
        }
    }
    removed
}

/// Removes `path` if it was last used (modified) more than `age` before `now`, as read
/// just now.
fn remove_if_older(path: &Path, age: Duration, now: std::time::SystemTime) -> bool {
    let old = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| now.duration_since(t).is_ok_and(|a| a > age));
    old && std::fs::remove_file(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn prune_removes_the_unused_then_the_oldest_beyond_the_budget() {
        let tmp = crate::test_dir::TempDir::new("prune");
        let dir = tmp.path();
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        let file = |name: &str, len: usize, days_old: u32| {
            let p = dir.join(name);
            std::fs::write(&p, vec![0u8; len]).unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(now - day * days_old).unwrap();
            p
        };
        let keep = file("new.cpio", 100, 0);
        let in_use = file("in-use.cpio", 50, 0);
        let recent = file("recent.cpio", 100, 1);
        let older = file("older.cpio", 100, 5);
        let unused = file("unused.cpio", 1, 40);
        let leftover = file("x.cpio.tmp.1-0", 1, 2);
        let writing = file("y.cpio.tmp.2-0", 1, 0);
        let other = file("notes.txt", 1, 400);
        // Budget for two and a half of the 100-byte files (the 50 bytes in use count too):
        // "older" goes (oldest), "unused" goes (40 days), the old temporary file goes,
        // the fresh one stays (being written), others are not ours.
        let removed = prune(dir, &keep, now, 30 * day, 300);
        assert_eq!(removed, 3);
        for (p, there) in [
            (&keep, true),
            (&recent, true),
            (&older, false),
            (&unused, false),
            (&leftover, false),
            (&writing, true),
            (&other, true),
        ] {
            assert_eq!(p.exists(), there, "{}", p.display());
        }
        // The one just written, and one just used, stay even over budget.
        assert_eq!(prune(dir, &keep, now, 30 * day, 0), 1);
        assert!(keep.exists() && in_use.exists() && !recent.exists());
    }

    #[test]
    fn a_cache_hit_marks_the_file_used() {
        let tmp = crate::test_dir::TempDir::new("used");
        let p = tmp.join("used.cpio");
        std::fs::write(&p, b"x").unwrap();
        let old = SystemTime::now() - Duration::from_secs(90 * 24 * 3600);
        std::fs::File::options().write(true).open(&p).unwrap().set_modified(old).unwrap();
        mark_used(&p);
        let age = SystemTime::now().duration_since(std::fs::metadata(&p).unwrap().modified().unwrap());
        assert!(age.unwrap_or_default() < Duration::from_secs(60));
    }
}
