//! Guest kernels: provisioning a stock distribution kernel into the cache, extracting the
//! uncompressed `vmlinux` (for PVH boot) from a bzImage, and the modules the guest
//! needs, in dependency order.
//!
//! Cache layout (`<cache>/kernels/`):
//!
//! ```text
//! default                      name of the directory `vmhost run` uses
//! <package>_<version>/vmlinux  the uncompressed kernel
//! <package>_<version>/vmlinuz  the package's bzImage
//! <package>_<version>/modules/ the modules we load, flat
//! <package>_<version>/modules.load   load order, one file name per line
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use byteorder::{ByteOrder, LittleEndian as LE};

use super::elf;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// The package `vmhost kernel fetch` installs by default.
pub const DEFAULT_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules the guest wants when the kernel has them as modules (missing ones are
/// built in or unavailable; both are fine). Dependencies are added automatically.
/// Only what a feature uses: each costs boot time (tens of ms under emulation).
/// The agent loads everything up to `virtio_console` before its server starts, the
/// rest beside it.
pub const WANTED_MODULES: &[&str] =
    &["virtio_mmio", "virtio_pci", "virtio_console", "virtio_net", "9pnet_virtio", "9p", "button", "evdev"];

/// What kind of kernel it is: how it finds its devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// A distribution kernel: virtio drivers as modules, devices found through ACPI.
    Stock,
    /// vmhost's own (`vmhost kernel build`): everything built in, no ACPI, virtio-mmio
    /// devices on the command line.
    Minimal,
}

/// A kernel ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Uncompressed ELF kernel (PVH entry).
    pub vmlinux: PathBuf,
    /// Modules to load, in order (empty when everything needed is built in).
    pub modules: Vec<PathBuf>,
    /// Where it came from, for messages.
    pub origin: String,
    /// Stock or minimal.
    pub kind: KernelKind,
}

impl Kernel {
    /// The kernel's tick rate (`CONFIG_HZ`), from the configuration kept beside the
    /// vmlinux (`vmhost kernel build` keeps it); None when there is none.
    pub fn hz(&self) -> Option<u32> {
        let config = std::fs::read_to_string(self.vmlinux.parent()?.join("config")).ok()?;
        config.lines().find_map(|l| l.strip_prefix("CONFIG_HZ=")).and_then(|v| v.trim().parse().ok())
    }

    /// Whether this is vmhost's own kernel (`vmhost kernel build`): everything built in,
    /// no ACPI, virtio-mmio devices on its command line, and kernel/patches/ applied.
    pub fn is_minimal(&self) -> bool {
        self.kind == KernelKind::Minimal
    }

    /// Whether the kernel has 9p over virtio (for host mounts): vmhost's own kernel
    /// has it built in; a stock one needs its modules.
    pub fn has_9p(&self) -> bool {
        self.is_minimal()
            || self
                .modules
                .iter()
                .any(|m| m.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("9p.ko")))
    }
}

/// Finds the kernel to boot: `VMHOST_KERNEL` (with `VMHOST_MODULES`), else the minimal
/// kernel when one was built, else the cached stock kernel, else provisions
/// [`DEFAULT_PACKAGE`] into the cache. `VMHOST_KERNEL_KIND=stock|minimal` picks among the
/// cached ones.
pub fn resolve(cache: &Path, progress: &Progress) -> Result<Kernel> {
    if let Some(k) = std::env::var_os("VMHOST_KERNEL").filter(|v| !v.is_empty()) {
        let modules = std::env::var_os("VMHOST_MODULES").filter(|v| !v.is_empty()).map(PathBuf::from);
        return from_files(cache, Path::new(&k), modules.as_deref());
    }
    let want = std::env::var("VMHOST_KERNEL_KIND").unwrap_or_default().to_ascii_lowercase();
    if want != "stock" {
        if let Some(k) = cached_minimal(cache)? {
            return Ok(k);
        }
        if want == "minimal" {
            return Err(Error::InvalidArgument {
                op: "choose kernel".into(),
                message:
                    "VMHOST_KERNEL_KIND=minimal, but no minimal kernel is built: run `vmhost kernel build`"
                        .into(),
            });
        }
    }
    if let Some(k) = cached_default(cache)? {
        return Ok(k);
    }
    fetch(cache, DEFAULT_PACKAGE, progress)
}

/// The built minimal kernel, if any.
pub fn cached_minimal(cache: &Path) -> Result<Option<Kernel>> {
    cached(cache, "minimal")
}

/// The cached default (stock) kernel, if one was provisioned.
pub fn cached_default(cache: &Path) -> Result<Option<Kernel>> {
    cached(cache, "default")
}

/// The kernel that the pointer file `<cache>/kernels/<pointer>` names, if it is there.
fn cached(cache: &Path, pointer: &str) -> Result<Option<Kernel>> {
    let dir = cache.join("kernels");
    let Ok(name) = std::fs::read_to_string(dir.join(pointer)) else { return Ok(None) };
    let kdir = dir.join(name.trim());
    if !kdir.join("vmlinux").is_file() {
        return Ok(None);
    }
    load_dir(&kdir).map(Some)
}

/// Every provisioned kernel directory.
pub fn list(cache: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(cache.join("kernels"))
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.join("vmlinux").is_file()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

fn load_dir(kdir: &Path) -> Result<Kernel> {
    let order = std::fs::read_to_string(kdir.join("modules.load")).unwrap_or_default();
    let modules =
        order.lines().filter(|l| !l.trim().is_empty()).map(|l| kdir.join("modules").join(l.trim())).collect();
    let kind = match std::fs::read_to_string(kdir.join("kind")).unwrap_or_default().trim() {
        "minimal" => KernelKind::Minimal,
        _ => KernelKind::Stock,
    };
    Ok(Kernel { vmlinux: kdir.join("vmlinux"), modules, origin: kdir.display().to_string(), kind })
}

/// A kernel from files given by the user: a vmlinux or bzImage, and optionally a
/// directory of modules (searched recursively for [`WANTED_MODULES`]).
pub fn from_files(cache: &Path, kernel: &Path, modules: Option<&Path>) -> Result<Kernel> {
    let read_err = |e| Error::io("read kernel (VMHOST_KERNEL)", kernel, e);
    // An ELF is booted as it is: its header says so (reading a whole vmlinux, ~18 MB,
    // cost every boot ~15 ms).
    let mut head = Vec::with_capacity(64);
    std::fs::File::open(kernel).and_then(|f| f.take(64).read_to_end(&mut head)).map_err(read_err)?;
    let vmlinux = if elf::is_elf64(&head) {
        kernel.to_path_buf()
    } else {
        let data = std::fs::read(kernel).map_err(read_err)?;
        // A bzImage: extract once into the cache, keyed by the file's identity.
        let key = super::hash_bytes(&data);
        let out = cache.join("kernels").join(format!("extracted-{key}")).join("vmlinux");
        if !out.is_file() {
            let elf = extract_vmlinux(&data).map_err(|m| Error::InvalidArgument {
                op: "extract vmlinux".into(),
                message: format!("{}: {m}", kernel.display()),
            })?;
            super::write_atomic(&out, &elf)?;
        }
        out
    };
    let modules = match modules {
        Some(dir) => module_order(&find_modules(dir), WANTED_MODULES)?,
        None => Vec::new(),
    };
    // Ours carries a `kind` file beside it; anything else is a stock kernel unless
    // VMHOST_KERNEL_KIND says otherwise.
    let kind = match (
        std::env::var("VMHOST_KERNEL_KIND").unwrap_or_default().as_str(),
        kernel.parent().map(|d| std::fs::read_to_string(d.join("kind")).unwrap_or_default()),
    ) {
        ("minimal", _) => KernelKind::Minimal,
        ("stock", _) => KernelKind::Stock,
        (_, Some(k)) if k.trim() == "minimal" => KernelKind::Minimal,
        _ => KernelKind::Stock,
    };
    Ok(Kernel { vmlinux, modules, origin: kernel.display().to_string(), kind })
}

/// Provisions a Debian kernel package into the cache: `apt-get download` and
/// `dpkg-deb -x` (nothing is installed), then vmlinux and the modules.
pub fn fetch(cache: &Path, package: &str, progress: &Progress) -> Result<Kernel> {
    for tool in ["apt-get", "apt-cache", "dpkg-deb"] {
        if which(tool).is_none() {
            return Err(Error::InvalidArgument {
                op: "kernel fetch".into(),
                message: format!(
                    "{tool} is not available, so no kernel can be provisioned here; set VMHOST_KERNEL to a \
                     vmlinux or bzImage (and VMHOST_MODULES to its modules directory if its virtio drivers are modules)"
                ),
            });
        }
    }
    let real = resolve_package(package)?;
    let _built_once = super::BUILD_LOCK.lock();
    let kernels = cache.join("kernels");
    let kdir = kernels.join(&real);
    if kdir.join("vmlinux").is_file() && kdir.join("modules.load").is_file() {
        super::write_atomic(&kernels.join("default"), real.as_bytes())?;
        return load_dir(&kdir);
    }
    let work = kernels.join(format!(".fetch-{}", super::unique_suffix()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| Error::io("create", &work, e))?;
    let result = (|| -> Result<()> {
        progress.step(&format!("downloading kernel package {real}"));
        run(
            Command::new("apt-get").args(["download", &real]).current_dir(&work),
            progress,
            "apt-get download",
        )?;
        let deb = std::fs::read_dir(&work)
            .map_err(|e| Error::io("list", &work, e))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| Error::InvalidArgument {
                op: "kernel fetch".into(),
                message: format!("apt-get download {real} produced no .deb"),
            })?;
        progress.step("unpacking the kernel package");
        let x = work.join("x");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x), progress, "dpkg-deb -x")?;
        let boot = x.join("boot");
        let vmlinuz = std::fs::read_dir(&boot)
            .map_err(|e| Error::io("list", &boot, e))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz")))
            .ok_or_else(|| Error::InvalidArgument {
                op: "kernel fetch".into(),
                message: format!("{real} has no /boot/vmlinuz"),
            })?;
        let bz = std::fs::read(&vmlinuz).map_err(|e| Error::io("read", &vmlinuz, e))?;
        progress.step("extracting vmlinux");
        let elf = extract_vmlinux(&bz)
            .map_err(|m| Error::InvalidArgument { op: "extract vmlinux".into(), message: m })?;
        let staged = work.join("out");
        std::fs::create_dir_all(staged.join("modules")).map_err(|e| Error::io("create", &staged, e))?;
        std::fs::write(staged.join("vmlinux"), &elf)
            .map_err(|e| Error::io("write", staged.join("vmlinux"), e))?;
        std::fs::write(staged.join("vmlinuz"), &bz)
            .map_err(|e| Error::io("write", staged.join("vmlinuz"), e))?;
        let order = module_order(&find_modules(&x.join("lib/modules")), WANTED_MODULES)?;
        let mut names = Vec::new();
        for m in &order {
            let name = m.file_name().unwrap_or_default().to_string_lossy().into_owned();
            std::fs::copy(m, staged.join("modules").join(&name))
                .map_err(|e| Error::io("copy module", m, e))?;
            names.push(name);
        }
        let mut list = names.join("\n");
        list.push('\n');
        std::fs::write(staged.join("modules.load"), list)
            .map_err(|e| Error::io("write", staged.join("modules.load"), e))?;
        let _ = std::fs::remove_dir_all(&kdir);
        std::fs::rename(&staged, &kdir).map_err(|e| Error::io("install kernel", &kdir, e))?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result?;
    super::write_atomic(&kernels.join("default"), real.as_bytes())?;
    progress.step(&format!("kernel {real} ready"));
    load_dir(&kdir)
}

/// The versioned package behind a metapackage (`linux-image-cloud-amd64` ->
/// `linux-image-6.1.0-xx-cloud-amd64`); a versioned name is returned as is.
fn resolve_package(package: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", package])
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| Error::io("run apt-cache", "apt-cache", e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.trim().is_empty() {
        return Err(Error::InvalidArgument {
            op: "kernel fetch".into(),
            message: format!(
                "apt does not know {package} ({}); run `apt-get update` first, or set VMHOST_KERNEL",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let dep = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-") && d.chars().any(|c| c.is_ascii_digit()));
    Ok(dep.unwrap_or(package).trim().to_string())
}

fn run(cmd: &mut Command, progress: &Progress, what: &str) -> Result<()> {
    if !progress.enabled() {
        cmd.stdout(Stdio::null());
    }
    let out = cmd.stderr(Stdio::piped()).output().map_err(|e| Error::io("run", what, e))?;
    if !out.status.success() {
        return Err(Error::InvalidArgument {
            op: what.into(),
            message: format!("failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// Every `.ko` under `dir`, by module name (`-` and `_` are the same in names).
fn find_modules(dir: &Path) -> HashMap<String, PathBuf> {
    let mut out = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            // Not through symlinks: a package's build/source links point outside it.
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if let Some(stem) =
                p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko"))
            {
                out.insert(stem.replace('-', "_"), p);
            }
        }
    }
    out
}

/// The wanted modules that exist, with their dependencies before them.
fn module_order(available: &HashMap<String, PathBuf>, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut order = Vec::new();
    fn visit(
        name: &str,
        available: &HashMap<String, PathBuf>,
        deps: &mut BTreeMap<String, Vec<String>>,
        order: &mut Vec<PathBuf>,
        depth: usize,
    ) -> Result<()> {
        let Some(path) = available.get(name) else { return Ok(()) };
        if order.contains(path) || depth > 64 {
            return Ok(());
        }
        if !deps.contains_key(name) {
            let data = std::fs::read(path).map_err(|e| Error::io("read module", path, e))?;
            let d = elf::modinfo(&data)
                .into_iter()
                .filter(|(k, _)| k == "depends")
                .flat_map(|(_, v)| {
                    v.split(',').filter(|s| !s.is_empty()).map(|s| s.replace('-', "_")).collect::<Vec<_>>()
                })
                .collect();
            deps.insert(name.to_string(), d);
        }
        for d in deps[name].clone() {
            visit(&d, available, deps, order, depth + 1)?;
        }
        if !order.contains(path) {
            order.push(path.clone());
        }
        Ok(())
    }
    for w in wanted {
        visit(w, available, &mut deps, &mut order, 0)?;
    }
    Ok(order)
}

/// Extracts the uncompressed ELF kernel from a bzImage.
///
/// The setup header gives where the compressed payload starts and how long it is
/// (`payload_offset`, `payload_length`, relative to the protected-mode code after
/// `setup_sects`); the payload's magic gives the compression. LZ4 (what Debian 12's
/// cloud kernel uses) is decoded here; gzip, xz, zstd, bzip2 and lzma through their standard tools.
pub fn extract_vmlinux(bz: &[u8]) -> std::result::Result<Vec<u8>, String> {
    if elf::is_elf64(bz) {
        return Ok(bz.to_vec());
    }
    if bz.len() < 0x250 || &bz[0x202..0x206] != b"HdrS" {
        return Err("not a bzImage (no HdrS setup header) and not an ELF kernel".into());
    }
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let payload_offset = LE::read_u32(&bz[0x248..0x24c]) as usize;
    let payload_length = LE::read_u32(&bz[0x24c..0x250]) as usize;
    let start = (setup_sects + 1) * 512 + payload_offset;
    let payload = start
        .checked_add(payload_length)
        .and_then(|end| bz.get(start..end))
        .ok_or("the setup header's payload lies outside the file")?;
    let out = if payload.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
        lz4_legacy(payload)?
    } else {
        let tool: &[&str] = if payload.starts_with(&[0x1f, 0x8b]) {
            &["gzip", "-dc"]
        } else if payload.starts_with(b"\xfd7zXZ\x00") {
            &["xz", "-dc"]
        } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            &["zstd", "-dcq"]
        } else if payload.starts_with(b"BZh") {
            &["bzip2", "-dc"]
        } else if payload.starts_with(&[0x5d, 0, 0]) {
            &["xz", "--format=lzma", "-dc"]
        } else {
            return Err(format!(
                "unknown kernel compression (magic {:02x?})",
                &payload[..payload.len().min(4)]
            ));
        };
        decompress_with(tool, payload)?
    };
    if !elf::is_elf64(&out) {
        return Err("the decompressed kernel is not an ELF file".into());
    }
    Ok(out)
}

fn decompress_with(tool: &[&str], data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    use std::io::Write;
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("{} is needed to decompress this kernel: {e} (apt-get install {})", tool[0], tool[0])
        })?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let _ = feeder.join();
    // Kernel payloads carry trailing bytes the tools complain about; judge the output.
    if out.stdout.is_empty() {
        return Err(format!("{} produced nothing", tool[0]));
    }
    Ok(out.stdout)
}

/// Decodes the LZ4 "legacy" frame format the kernel uses: a magic, then blocks of
/// (u32 compressed size, LZ4 block), each inflating to at most 8 MiB.
pub fn lz4_legacy(src: &[u8]) -> std::result::Result<Vec<u8>, String> {
    const MAGIC: u32 = 0x184C2102;
    const MAX_BLOCK: usize = 8 << 20;
    if src.len() < 4 || LE::read_u32(&src[..4]) != MAGIC {
        return Err("not an LZ4 legacy stream".into());
    }
    let mut pos = 4;
    let mut out = Vec::with_capacity(src.len() * 3);
    while pos + 4 <= src.len() {
        let n = LE::read_u32(&src[pos..pos + 4]) as usize;
        pos += 4;
        if n == MAGIC as usize {
            continue; // concatenated streams
        }
        let Some(block) = pos.checked_add(n).and_then(|end| src.get(pos..end)) else {
            break; // the size trailer the kernel build appends, or truncation: stop here
        };
        pos += n;
        lz4_block(block, &mut out, MAX_BLOCK)?;
    }
    if out.is_empty() {
        return Err("empty LZ4 stream".into());
    }
    Ok(out)
}

/// A length from an LZ4 token nibble: 15 means "add the following bytes while they are
/// 255, and the first one that is not".
fn lz4_length(b: &[u8], i: &mut usize, nibble: usize) -> Option<usize> {
    let mut n = nibble;
    if n == 15 {
        loop {
            let x = *b.get(*i)?;
            *i += 1;
            n += x as usize;
            if x != 255 {
                break;
            }
        }
    }
    Some(n)
}

fn lz4_block(b: &[u8], out: &mut Vec<u8>, max: usize) -> std::result::Result<(), String> {
    let start = out.len();
    let mut i = 0;
    let err = || "corrupt LZ4 block".to_string();
    while i < b.len() {
        let token = b[i];
        i += 1;
        let lit = lz4_length(b, &mut i, (token >> 4) as usize).ok_or_else(err)?;
        let lits = b.get(i..i + lit).ok_or_else(err)?;
        out.extend_from_slice(lits);
        i += lit;
        if i >= b.len() {
            break; // the last sequence has literals only
        }
        let off = b.get(i..i + 2).map(LE::read_u16).ok_or_else(err)? as usize;
        i += 2;
        let ml = lz4_length(b, &mut i, (token & 15) as usize).ok_or_else(err)? + 4;
        if off == 0 || off > out.len() - start || out.len() - start + ml > max {
            return Err(err());
        }
        let from = out.len() - off;
        for k in 0..ml {
            let byte = out[from + k];
            out.push(byte);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lz4_block_literals_and_matches() {
        // "abcabcabcabc": literals "abc", then a match of 9 at offset 3.
        let block = [0x35, b'a', b'b', b'c', 3, 0];
        let mut out = Vec::new();
        lz4_block(&block, &mut out, 1 << 20).unwrap();
        assert_eq!(out, b"abcabcabcabc");
        let mut stream = 0x184C2102u32.to_le_bytes().to_vec();
        stream.extend_from_slice(&(block.len() as u32).to_le_bytes());
        stream.extend_from_slice(&block);
        assert_eq!(lz4_legacy(&stream).unwrap(), b"abcabcabcabc");
        // Garbage never panics.
        for bad in [&[0xFFu8, 1, 2][..], &[0x0F, 0, 0], &[0x10], &[0x35, b'a', b'b', b'c', 9, 0]] {
            let mut out = Vec::new();
            let _ = lz4_block(bad, &mut out, 1 << 20);
        }
        assert!(extract_vmlinux(b"definitely not a kernel").is_err());
    }

    #[test]
    fn a_user_kernel_is_booted_as_it_is_when_its_header_says_elf() {
        let tmp = crate::test_dir::TempDir::new("userkernel");
        let dir = tmp.path();
        // An ELF64 header, then a body nobody needs to read.
        let mut elf = vec![0u8; 1 << 20];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let vmlinux = dir.join("vmlinux");
        std::fs::write(&vmlinux, &elf).unwrap();
        assert_eq!(from_files(dir, &vmlinux, None).unwrap().vmlinux, vmlinux);
        // Anything else must be a bzImage, and the error names the file.
        let junk = dir.join("junk");
        std::fs::write(&junk, b"definitely not a kernel").unwrap();
        let err = from_files(dir, &junk, None).unwrap_err().to_string();
        assert!(err.contains("not a bzImage") && err.contains("junk"), "{err}");
        let err = from_files(dir, &dir.join("missing"), None).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
