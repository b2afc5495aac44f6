//! Virtual machines: the lifecycle states every backend reports, the stop escalation
//! every backend shares ([`stop`]), and [`Machine`], a running VM on either backend:
//! QEMU supervised over QMP ([`qemu`]) or vmhost's own KVM VMM ([`kvm`]).

pub(crate) mod agent_link;
pub(crate) mod console;
pub mod kvm;
pub(crate) mod lifecycle;
pub mod publish;
pub mod qemu;
pub mod run_dir;
pub mod snapshot;
pub mod stop;
pub mod tunnel;

use std::time::Duration;

pub use crate::status::{end, state, VmEnd, VmState};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::rootfs::Source;
use crate::progress::Progress;
use crate::wire::{InstanceNew, InstanceOptions, SourceType};

/// Whether this host can run the kvm backend: `Ok` where hardware virtualization is
/// present, else why not ([`kvm::probe`]). `asked` qemu is always qemu; `auto` becomes
/// kvm only where it can run (and [`InstanceSpec::boot`] then also checks the guest's
/// needs); `kvm` is refused, saying why and suggesting qemu, where it cannot.
pub fn resolve_backend(asked: crate::wire::Backend) -> Result<crate::wire::Backend> {
    use crate::wire::Backend;
    match (asked, kvm::probe()) {
        (Backend::Qemu, _) => Ok(Backend::Qemu),
        (Backend::Auto, Ok(())) | (Backend::Kvm, Ok(())) => Ok(Backend::Kvm),
        (Backend::Auto, Err(_)) => Ok(Backend::Qemu),
        (Backend::Kvm, Err(why)) => Err(Error::BackendUnavailable { backend: "kvm".into(), why }),
    }
}

/// What the kvm backend's machine cannot give this guest, if anything: it boots only a
/// kernel that finds virtio-mmio devices on its command line (vmhost's own), and has no
/// 9p device for host mounts yet.
pub fn kvm_unsupported(
    kernel: &crate::image::kernel::Kernel,
    mounts: &[crate::wire::MountConfig],
    disk: bool,
) -> Option<String> {
    if !kernel.is_minimal() {
        return Some(format!(
            "it boots vmhost's own kernel (`vmhost kernel build`), which finds virtio-mmio devices on its \
             command line; the kernel {} finds devices only through ACPI or PCI, which the kvm machine \
             does not offer yet; use --backend qemu",
            kernel.origin
        ));
    }
    if !mounts.is_empty() {
        return Some("host mounts (virtio-9p) are not on the kvm backend yet; use --backend qemu".into());
    }
    if disk {
        return Some(
            "container images boot from a virtio-blk disk, which the kvm machine does not have yet; use \
             --backend qemu"
                .into(),
        );
    }
    None
}

/// A running VM, on one of the backends.
#[derive(Debug, Clone)]
pub enum Machine {
    /// A QEMU process supervised over QMP.
    Qemu(qemu::QemuVm),
    /// vmhost's own KVM VMM.
    Kvm(kvm::KvmVm),
}

macro_rules! on_backend {
    ($m:expr, $v:ident => $e:expr) => {
        match $m {
            Machine::Qemu($v) => $e,
            Machine::Kvm($v) => $e,
        }
    };
}

impl Machine {
    /// The VM's id.
    pub fn id(&self) -> &str {
        on_backend!(self, v => v.id())
    }

    /// The backend it runs on: "qemu" or "kvm".
    pub fn backend(&self) -> crate::wire::Backend {
        match self {
            Machine::Qemu(_) => crate::wire::Backend::Qemu,
            Machine::Kvm(_) => crate::wire::Backend::Kvm,
        }
    }

    /// The lifecycle state.
    pub fn state(&self) -> VmState {
        on_backend!(self, v => v.state())
    }

    /// How the VM ended, once it has (or once its end was decided).
    pub fn end(&self) -> Option<VmEnd> {
        on_backend!(self, v => v.end())
    }

    /// Whether the VM runs and its agent answers: false as soon as any call has seen
    /// the agent channel close, before the backend has noticed the VM's end.
    pub fn is_running(&self) -> bool {
        self.state() == VmState::Running && self.agent().is_ok_and(|a| a.is_alive())
    }

    /// The error for `op` on a VM that has ended: [`Error::NotRunning`] with how it
    /// ended, waiting up to a second for the backend to learn that when only the agent
    /// channel has seen the end yet. `None` while the VM runs.
    pub fn ended_error(&self, op: &str) -> Option<Error> {
        if self.is_running() {
            return None;
        }
        let _ = self.wait_timeout(Duration::from_secs(1));
        Some(Error::NotRunning { op: op.into(), state: self.state(), end: self.end() })
    }

    /// The guest agent (while the VM runs).
    pub fn agent(&self) -> Result<&agent_link::AgentLink> {
        on_backend!(self, v => v.agent())
    }

    /// Connects or disconnects the guest's network. The kvm backend has no network
    /// device yet.
    pub fn set_network(&self, up: bool) -> Result<()> {
        match self {
            Machine::Qemu(v) => v.set_network(up),
            Machine::Kvm(_) => Err(Error::BackendUnavailable {
                backend: "kvm".into(),
                why: "its machine has no network device yet; use --backend qemu for a guest network".into(),
            }),
        }
    }

    /// The last `n` lines of the guest console.
    pub fn console_tail(&self, n: usize) -> String {
        on_backend!(self, v => v.console_tail(n))
    }

    /// Stops the VM gracefully, each step of the escalation bounded by `timeout`.
    pub fn stop(&self, timeout: Duration) -> Result<()> {
        on_backend!(self, v => v.stop(timeout))
    }

    /// Ends the VM at once.
    pub fn force_stop(&self) -> Result<()> {
        on_backend!(self, v => v.force_stop())
    }

    /// Stops the VM gracefully for `why` (its main process exited), which is then how
    /// it ended.
    pub fn end_because(&self, why: VmEnd, timeout: Duration) -> Result<()> {
        on_backend!(self, v => v.end_because(why, timeout))
    }

    /// Blocks until the VM has ended, at most `timeout` (`None`: still running).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<()>> {
        on_backend!(self, v => v.wait_timeout(timeout))
    }

    /// Blocks until the VM has ended; an error if it ended badly.
    pub fn wait(&self) -> Result<()> {
        loop {
            if let Some(r) = self.wait_timeout(Duration::from_secs(3600)) {
                return r;
            }
        }
    }
}

/// How long a guest may take to reach its agent: `VMHOST_BOOT_TIMEOUT` (seconds) or
/// 120 s.
pub fn boot_timeout() -> Duration {
    std::env::var("VMHOST_BOOT_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(Duration::from_secs(120), |s| Duration::from_secs_f64(s.clamp(1.0, 3600.0)))
}

/// The first line of a boot error: `e` without a repeated "VM boot:".
pub(crate) fn boot_failure(e: &Error) -> String {
    match e {
        Error::Vm { op, message } if op == "boot" => format!("the guest did not boot: {message}"),
        e => format!("the guest did not boot: {e}"),
    }
}

/// Checks host mounts: tags of letters, digits, `_`, `-` and `.`, at most 31 bytes and
/// unique; host paths existing directories (made absolute), on a filesystem with user
/// extended attributes when writable.
///
/// What a guest does in a writable mount stays in the guest's view: the owners, modes
/// (setuid and setgid included), symlinks and device nodes it makes are kept in
/// `user.virtfs.*` extended attributes (QEMU's `security_model=mapped-xattr`). On the
/// host the files it creates are regular files and directories of the user running
/// vmhost, 0644 and 0755, and a symlink made in the guest is a small file holding its
/// target, so no host program that follows links is led out of the share. Files the host
/// made keep their host modes and owners, as the guest sees them until it changes them.
pub fn check_mounts(mounts: &[crate::wire::MountConfig]) -> Result<Vec<crate::wire::MountConfig>> {
    let bad = |m: String| Error::InvalidArgument { op: "mount".into(), message: m };
    let mut out: Vec<crate::wire::MountConfig> = Vec::new();
    for m in mounts {
        let tag_ok = !m.tag.is_empty()
            && m.tag.len() <= 31
            && m.tag != "."
            && m.tag != ".."
            && m.tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if !tag_ok {
            return Err(bad(format!("mount tag {:?}: use 1 to 31 letters, digits, '_', '-' or '.'", m.tag)));
        }
        if out.iter().any(|o| o.tag == m.tag) {
            return Err(bad(format!("mount tag {:?} is used twice", m.tag)));
        }
        let path = std::fs::canonicalize(&m.host_path)
            .map_err(|e| Error::io("mount host directory", &m.host_path, e))?;
        if !path.is_dir() {
            return Err(bad(format!("{} is not a directory", path.display())));
        }
        let Some(host_path) = path.to_str() else {
            return Err(bad(format!("{} is not UTF-8", path.display())));
        };
        if m.writable && !keeps_user_xattrs(&path) {
            return Err(bad(format!(
                "{} is on a filesystem without user extended attributes, where a writable mount keeps \
                 what the guest sets (owners, modes, symlinks); mount it read-only (:ro) or share a \
                 directory on ext4, xfs or btrfs (tmpfs has them from Linux 6.6)",
                path.display()
            )));
        }
        out.push(crate::wire::MountConfig {
            tag: m.tag.clone(),
            host_path: host_path.into(),
            writable: m.writable,
        });
    }
    Ok(out)
}

/// The least guest memory vmhost boots, in MiB: neither kernel reaches its agent with
/// less (vmhost's own needs 48, Debian's stock kernel more than 64).
pub const MIN_MEMORY_MB: u64 = 96;
/// The most vCPUs a guest gets: xAPIC ids, which microvm's interrupt controller uses.
pub const MAX_CPUS: i32 = 255;

/// Checks guest memory (MiB; 0 for the default) and vCPUs (0 for the default) against
/// what a guest boots with and what this host has, before anything starts: QEMU would
/// start a guest of 1 MiB that never boots, and refuse 1000 vCPUs or more memory than
/// the host can map only once launched.
pub fn check_resources(memory_mb: u64, cpus: i32) -> Result<()> {
    let bad = |op: &str, m: String| Error::InvalidArgument { op: op.into(), message: m };
    let host_mb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb / 1024)
    });
    if memory_mb != 0 && memory_mb < MIN_MEMORY_MB {
        return Err(bad(
            "memory",
            format!("{memory_mb} MiB is less than the {MIN_MEMORY_MB} MiB a guest needs"),
        ));
    }
    if let Some(host) = host_mb.filter(|&h| memory_mb > h) {
        return Err(bad("memory", format!("{memory_mb} MiB is more than this host's {host} MiB")));
    }
    if !(0..=MAX_CPUS).contains(&cpus) {
        return Err(bad("vCPUs", format!("{cpus}: a guest has 1 to {MAX_CPUS}")));
    }
    Ok(())
}

/// Whether the filesystem of `dir` keeps `user.*` extended attributes: asking for one
/// that is not there answers ENODATA where it does, EOPNOTSUPP where it does not.
fn keeps_user_xattrs(dir: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: NUL-terminated strings, and a zero-length buffer that is never written.
    let r =
        unsafe { nix::libc::lgetxattr(path.as_ptr(), c"user.virtfs.mode".as_ptr(), std::ptr::null_mut(), 0) };
    r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(nix::libc::EOPNOTSUPP)
}

/// A container image (or a snapshot) ready to boot: its root, how it runs, the hold on
/// the store until the boot has read it, and its record as the base of snapshots.
#[derive(Debug)]
pub struct ImageBoot {
    /// The root to boot.
    pub source: Source,
    /// Its configuration's `config`.
    pub config: crate::image::oci::RunConfig,
    /// The hold on the image store.
    pub lease: Lease,
    /// The image as a snapshot's parent (see [`crate::image::snapshot`]).
    pub record: crate::image::snapshot::Record,
    /// The cache that holds the record and the image.
    pub cache: PathBuf,
}

/// The container image `reference`: from the image store in `cache` (`cache/images`),
/// pulled when missing (`VMHOST_PULL=always|missing|never`, default missing), unpacked
/// once (`cache/roots`).
pub fn registry_image(reference: &str, cache: &Path, progress: &Progress) -> Result<ImageBoot> {
    use crate::image::{pull, reference::Reference, store::Store};
    let bad = |m: String| Error::InvalidArgument { op: "image".into(), message: m };
    let r: Reference =
        reference.parse().map_err(|e: crate::image::reference::ReferenceError| bad(e.to_string()))?;
    let policy = match std::env::var("VMHOST_PULL") {
        Ok(v) if !v.is_empty() => v.parse().map_err(bad)?,
        _ => pull::PullPolicy::Missing,
    };
    let store = Store::open(cache.join("images"))?;
    let lease = store.lease()?;
    let opts = pull::PullOptions { progress: progress.clone(), ..pull::PullOptions::default() };
    let img = pull::get(&store, &r, policy, &opts)?;
    boot_stored(&store, &img, (cache, cache), progress, lease, None)
}

/// The snapshot `source`: its record's path (`CACHE/snapshots/KEY`), or its key in
/// `cache`.
pub fn snapshot_image(source: &str, cache: &Path, progress: &Progress) -> Result<ImageBoot> {
    use crate::image::{snapshot, store::Store};
    let kernels = cache;
    let path = Path::new(source);
    let (cache, key) = if snapshot::is_key(source) {
        (cache.to_path_buf(), source.to_string())
    } else {
        // CACHE/snapshots/KEY, nothing else.
        match (path.parent(), path.file_name().and_then(|k| k.to_str())) {
            (Some(dir), Some(k)) if dir.file_name().is_some_and(|n| n == "snapshots") => {
                (dir.parent().unwrap_or(Path::new("/")).to_path_buf(), k.to_string())
            }
            _ => {
                return Err(Error::InvalidArgument {
                    op: "snapshot".into(),
                    message: format!(
                        "{source:?} is neither a snapshot key nor a record path CACHE/snapshots/KEY"
                    ),
                })
            }
        }
    };
    let record = snapshot::load(&cache, &key)?;
    let store = Store::open(cache.join("images"))?;
    let lease = store.lease()?;
    let img = snapshot::image(&store, &record)?;
    // The kernel is the instance cache's (`kernels`), not the snapshot's cache's, which
    // may hold none.
    boot_stored(&store, &img, (&cache, kernels), progress, lease, Some(record))
}

/// `caches`: the one that holds the image (its store, records and unpacked roots), and
/// the instance's (its kernels).
fn boot_stored(
    store: &crate::image::store::Store,
    img: &crate::image::pull::StoredImage,
    (cache, kernels): (&Path, &Path),
    progress: &Progress,
    lease: crate::image::store::Lease,
    record: Option<crate::image::snapshot::Record>,
) -> Result<ImageBoot> {
    let record = match record {
        Some(r) => r,
        None => crate::image::snapshot::base(cache, img)?,
    };
    let source = image_root(store, img, (cache, kernels), progress)?;
    Ok(ImageBoot {
        source,
        config: img.config.config.clone().unwrap_or_default(),
        lease: Lease { _held: Arc::new(lease) },
        record,
        cache: cache.to_path_buf(),
    })
}

/// A hold on the image store (see [`crate::image::store::Lease`]) that an instance's
/// spec keeps until its boot has read the image: a prune meanwhile waits.
#[derive(Debug, Clone)]
pub struct Lease {
    _held: Arc<crate::image::store::Lease>,
}

/// How a stored container image boots: from an erofs disk built once (the image is
/// never copied into the guest's memory), or, where `mkfs.erofs` is missing or the
/// kernel is a stock one that cannot mount erofs, from its root unpacked into the
/// initramfs (as large as guest memory allows), with a warning saying what to install.
fn image_root(
    store: &crate::image::store::Store,
    img: &crate::image::pull::StoredImage,
    (cache, kernels): (&Path, &Path),
    progress: &Progress,
) -> Result<Source> {
    use crate::image::{erofs, unpack};
    // The kernel the boot will take (resolved again there: a lookup in the cache).
    let minimal = crate::image::kernel::resolve(kernels, progress)?.is_minimal();
    if erofs::available() && minimal {
        return erofs::image_disk(store, img, cache, progress).map(Source::Disk);
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        log::warn!(
            "container images are copied into the guest's memory: {}",
            if minimal {
                "install erofs-utils (apt-get install erofs-utils) to boot them from a disk"
            } else {
                "the stock kernel cannot mount their erofs disk; build vmhost's own (vmhost kernel build)"
            }
        )
    });
    unpack::unpacked(store, img, cache, progress).map(Source::Dir)
}

/// The container image at `path` (an OCI layout, an OCI archive, a `docker save`
/// archive), imported into the image store and unpacked once; `None` when `path` is a
/// plain root filesystem.
pub fn local_image(path: &Path, cache: &Path, progress: &Progress) -> Result<Option<ImageBoot>> {
    use crate::image::archive::{self, Local};
    use crate::image::{oci::Platform, store::Store};
    let kind = archive::recognise(path)?;
    if matches!(kind, Local::RootDir | Local::RootTar) {
        return Ok(None);
    }
    progress.step(&format!("importing the image {}", path.display()));
    let store = Store::open(cache.join("images"))?;
    // No reference keeps an imported image: only this lease, until the boot is done.
    let lease = store.lease()?;
    let img = archive::import(&store, path, kind, &Platform::host())?;
    boot_stored(&store, &img, (cache, cache), progress, lease, None).map(Some)
}

/// The size of a container image's writable disk, `VMHOST_DISK_MB` (`run --disk`):
/// `None` keeps the overlay's writes in the guest's memory.
pub fn rw_disk_mb() -> Result<Option<u64>> {
    match std::env::var("VMHOST_DISK_MB") {
        Ok(v) if !v.is_empty() => match v.parse::<u64>() {
            Ok(mb) if (16..=16 << 20).contains(&mb) => Ok(Some(mb)),
            _ => Err(Error::InvalidArgument {
                op: "disk".into(),
                message: format!("VMHOST_DISK_MB={v:?}: give MiB from 16 to 16777216 (16 TiB)"),
            }),
        },
        _ => Ok(None),
    }
}

/// Everything needed to boot one instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// The image root.
    pub source: Source,
    /// The cache for kernels, images and initramfs files.
    pub cache_dir: PathBuf,
    /// Memory, CPUs, timeout, user, console log, mounts.
    pub options: InstanceOptions,
    /// The guest's first command (see [`crate::server::first_command::FirstCommand`]): started as soon as the
    /// guest is up where the backend can ([`qemu::BootConfig::first_command`]), and the
    /// only command that may start first either way.
    pub first_command: Option<crate::contract::proto::ExecRequest>,
    /// How a container image says to run it (its configuration's `config`), for an
    /// instance of one.
    pub image: Option<crate::image::oci::RunConfig>,
    /// For a container image: the hold on the image store that keeps a prune from
    /// removing what the boot reads (dropped with the spec).
    pub lease: Option<Lease>,
    /// For a container image or a snapshot: its record, the parent of the instance's
    /// snapshots (see [`crate::image::snapshot`]), and the cache that holds it.
    pub snapshot_base: Option<(PathBuf, crate::image::snapshot::Record)>,
}

impl InstanceSpec {
    /// The spec of an InstanceNew request: source type 0 (tar) and 1 (directory) with a
    /// path, or an empty path for the default image; registry references are refused
    /// for now; an empty cache dir means the default cache.
    pub fn from_request(req: &InstanceNew, progress: &Progress) -> Result<InstanceSpec> {
        let path = PathBuf::from(&req.source_path);
        let cache_dir =
            if req.cache_dir.is_empty() { crate::image::cache_dir() } else { PathBuf::from(&req.cache_dir) };
        let mut booted = None;
        let source = match req.source_type {
            SourceType::Snapshot => {
                let b = snapshot_image(&req.source_path, &cache_dir, progress)?;
                let source = b.source.clone();
                booted = Some(b);
                source
            }
            _ if req.source_path.is_empty() && req.image_ref.is_empty() => Source::Default,
            // An OCI layout or an image archive in a path source is a container image.
            SourceType::Tar | SourceType::Dir if path.exists() => {
                match local_image(&path, &cache_dir, progress)? {
                    Some(b) => {
                        let source = b.source.clone();
                        booted = Some(b);
                        source
                    }
                    None if req.source_type == SourceType::Tar => Source::Tar(path),
                    None => Source::Dir(path),
                }
            }
            SourceType::Tar => Source::Tar(path),
            SourceType::Dir => Source::Dir(path),
            SourceType::Registry => {
                let b = registry_image(&req.image_ref, &cache_dir, progress)?;
                let source = b.source.clone();
                booted = Some(b);
                source
            }
        };
        let (image, lease, snapshot_base) = match booted {
            Some(b) => (Some(b.config), Some(b.lease), Some((b.cache, b.record))),
            None => (None, None, None),
        };
        Ok(InstanceSpec {
            source,
            cache_dir,
            options: req.options.clone(),
            first_command: None,
            image,
            lease,
            snapshot_base,
        })
    }

    /// Checks the spec, prepares kernel and initramfs, and boots the VM on the backend
    /// asked for. `auto` takes kvm where it can run this guest, and falls back to qemu
    /// (with a warning naming why) if the kvm machine cannot be set up.
    pub fn boot(&self, progress: &Progress) -> Result<Machine> {
        match &self.source {
            Source::Dir(p) if !p.is_dir() => {
                return Err(Error::io(
                    "open image",
                    p,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
                ))
            }
            Source::Tar(p) if !p.is_file() => {
                return Err(Error::io(
                    "open image",
                    p,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                ))
            }
            _ => {}
        }
        check_resources(self.options.memory_mb, self.options.cpus)?;
        use crate::wire::Backend;
        let asked = self.options.backend;
        let mut backend = resolve_backend(asked)?;
        let mounts = check_mounts(&self.options.mounts)?;
        let t = std::time::Instant::now();
        let kernel = crate::image::kernel::resolve(&self.cache_dir, progress)?;
        if backend == Backend::Kvm {
            let disk = matches!(self.source, Source::Disk(_));
            if let Some(why) = kvm_unsupported(&kernel, &mounts, disk) {
                if asked == Backend::Kvm {
                    return Err(Error::BackendUnavailable { backend: "kvm".into(), why });
                }
                log::debug!("auto: qemu, because the kvm backend {why}");
                backend = Backend::Qemu;
            }
        }
        log::debug!("backend {} (asked: {})", backend.as_str(), asked.as_str());
        if !mounts.is_empty() && !kernel.has_9p() {
            return Err(Error::InvalidArgument {
                op: "InstanceNew".into(),
                message: format!(
                    "host mounts need 9p over virtio, which the kernel {} lacks; build vmhost's own kernel \
                     (`vmhost kernel build`) or set VMHOST_KERNEL to one with CONFIG_9P_FS",
                    kernel.origin
                ),
            });
        }
        if matches!(self.source, Source::Disk(_)) && !kernel.is_minimal() {
            return Err(Error::InvalidArgument {
                op: "InstanceNew".into(),
                message: format!(
                    "container images boot from an erofs disk, which the kernel {} cannot mount; build \
                     vmhost's own kernel (`vmhost kernel build`)",
                    kernel.origin
                ),
            });
        }
        let agent = crate::image::initramfs::find_agent()?;
        let t_agent = t.elapsed();
        let memory_mb = if self.options.memory_mb > 0 { self.options.memory_mb } else { 256 };
        let limit = crate::image::initramfs::SizeLimit::for_memory(memory_mb);
        let initramfs =
            crate::image::initramfs::build(&self.cache_dir, &kernel, &agent, &self.source, &limit, progress)?;
        log::debug!("kernel and agent found in {t_agent:?}, initramfs ready at {:?}", t.elapsed());
        let cpus_on = |b| if self.options.cpus > 0 { self.options.cpus as u32 } else { default_cpus(b) };
        if backend == Backend::Kvm {
            let cpus = cpus_on(Backend::Kvm);
            let cfg = kvm::KvmConfig {
                vmlinux: kernel.vmlinux.clone(),
                initramfs: Some(initramfs.clone()),
                memory_mb,
                cpus,
                extra_args: kernel_args_from_env(),
                dmesg: self.options.dmesg,
                console_log: None,
                timeout: self.options.timeout,
                boot_timeout: boot_timeout(),
                first_command: self.first_command.clone(),
            };
            progress.step(&format!("booting (kvm backend, {memory_mb} MiB, {cpus} vCPU)"));
            match kvm::KvmVm::boot(cfg) {
                Ok(vm) => return Ok(Machine::Kvm(vm)),
                // Only when the machine itself could not be set up: a guest that fails
                // to boot would fail on QEMU too, after a second boot timeout.
                Err(e @ Error::Kvm(_)) if asked == Backend::Auto => {
                    log::warn!("the kvm backend could not set up the machine; falling back to qemu: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        let rw_disk = rw_disk_mb()?;
        let mut cfg = qemu::BootConfig::new(kernel, initramfs)?;
        cfg.memory_mb = memory_mb;
        cfg.cpus = cpus_on(Backend::Qemu);
        cfg.timeout = self.options.timeout;
        cfg.dmesg = self.options.dmesg;
        cfg.mounts = mounts;
        cfg.host_loopback = self.options.host_loopback;
        cfg.first_command = self.first_command.clone();
        if let Source::Disk(d) = &self.source {
            cfg.root_disk = Some(d.clone());
            cfg.rw_disk_mb = rw_disk;
        } else if rw_disk.is_some() {
            return Err(Error::InvalidArgument {
                op: "InstanceNew".into(),
                message: "a writable disk (VMHOST_DISK_MB, run --disk) is for container images booted from \
                          their erofs disk; this root is in the initramfs"
                    .into(),
            });
        }
        progress.step(&format!("booting ({}, {} MiB, {} vCPU)", cfg.accel.as_str(), cfg.memory_mb, cfg.cpus));
        qemu::QemuVm::boot(cfg).map(Machine::Qemu)
    }
}

/// The vCPUs of a VM whose options leave them open. QEMU: two where the host has two
/// CPUs or more (as krunvm does). Under TCG every vCPU is a host thread translating
/// code, so a second one speeds the boot itself: the guest kernel unpacks the initramfs
/// (and makes its hard links) and brings lo up on it beside its other start-up work
/// (BENCHMARKS.md, sessions 5 and 6). The kvm backend: one, the shape its boot is
/// tested with.
pub fn default_cpus(backend: crate::wire::Backend) -> u32 {
    match backend {
        crate::wire::Backend::Kvm => 1,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get().min(2) as u32),
    }
}

/// The user's kernel parameters, `VMHOST_KERNEL_ARGS`, which every backend puts last on
/// the command line (so they can override the machine's own).
pub fn kernel_args_from_env() -> Vec<String> {
    std::env::var("VMHOST_KERNEL_ARGS").unwrap_or_default().split_whitespace().map(String::from).collect()
}
