//! Virtual machines: the lifecycle states every backend reports, and the stop
//! escalation every backend shares ([`stop`]).
//!
//! The backends themselves (QEMU supervised over QMP, and our own KVM VMM) plug in behind
//! a machine trait here; until they exist the helper refuses to create instances.

pub mod agent_link;
pub mod console;
pub mod kvm;
pub(crate) mod lifecycle;
pub mod qemu;
pub mod run_dir;
pub mod stop;

use std::fmt;

/// Lifecycle state of a VM, as the control protocol reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Configured, not started.
    Created,
    /// Booted and running.
    Running,
    /// A stop is in progress.
    Stopping,
    /// Exited.
    Stopped,
    /// Failed.
    Error,
}

impl VmState {
    /// The state's name on the wire: created, running, stopping, stopped, error.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Error => "error",
        }
    }

    /// Whether the VM has ended (stopped or error).
    pub fn is_final(self) -> bool {
        matches!(self, VmState::Stopped | VmState::Error)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::image::rootfs::Source;
use crate::progress::Progress;
use crate::wire::{InstanceNew, InstanceOptions, SourceType};

/// Whether this build's kvm backend can boot a Linux guest. Not yet: its VMM core
/// (memory, vCPUs, buses, UART) runs, the Linux boot and the virtio console are to
/// come, so `auto` picks QEMU everywhere for now.
pub const KVM_BOOTS_LINUX: bool = false;

/// The backend an instance runs on, from the one asked for: `auto` picks kvm where
/// hardware virtualization is present and the kvm backend can boot the guest, else
/// qemu; `kvm` is refused, saying why and suggesting qemu, where it cannot run.
pub fn resolve_backend(asked: crate::wire::Backend) -> Result<crate::wire::Backend> {
    use crate::wire::Backend;
    let kvm = kvm::probe().and_then(|()| {
        if KVM_BOOTS_LINUX {
            Ok(())
        } else {
            Err("this build's kvm backend does not boot Linux guests yet (its VMM core runs small \
                 guest programs); use --backend qemu"
                .into())
        }
    });
    match (asked, kvm) {
        (Backend::Qemu, _) => Ok(Backend::Qemu),
        (Backend::Auto, Ok(())) | (Backend::Kvm, Ok(())) => Ok(Backend::Kvm),
        (Backend::Auto, Err(_)) => Ok(Backend::Qemu),
        (Backend::Kvm, Err(why)) => Err(Error::BackendUnavailable { backend: "kvm".into(), why }),
    }
}

/// The first line of a boot error: `e` without a repeated "VM boot:".
pub(crate) fn boot_failure(e: &Error) -> String {
    match e {
        Error::Vm { op, message } if op == "boot" => format!("the guest did not boot: {message}"),
        e => format!("the guest did not boot: {e}"),
    }
}

/// Checks host mounts: tags of letters, digits, `_`, `-` and `.`, at most 31 bytes and
/// unique; host paths existing directories (made absolute).
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
        out.push(crate::wire::MountConfig {
            tag: m.tag.clone(),
            host_path: host_path.into(),
            writable: m.writable,
        });
    }
    Ok(out)
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
}

impl InstanceSpec {
    /// The spec of an InstanceNew request: source type 0 (tar) and 1 (directory) with a
    /// path, or an empty path for the default image; registry references are refused
    /// for now; an empty cache dir means the default cache.
    pub fn from_request(req: &InstanceNew) -> Result<InstanceSpec> {
        let path = PathBuf::from(&req.source_path);
        let source = match req.source_type {
            _ if req.source_path.is_empty() && req.image_ref.is_empty() => Source::Default,
            SourceType::Tar => Source::Tar(path),
            SourceType::Dir => Source::Dir(path),
            SourceType::Registry => {
                return Err(Error::InvalidArgument {
                    op: "InstanceNew".into(),
                    message: format!(
                        "registry images ({}) are not supported yet; pass a root filesystem directory or a tar archive",
                        req.image_ref
                    ),
                })
            }
        };
        let cache_dir =
            if req.cache_dir.is_empty() { crate::image::cache_dir() } else { PathBuf::from(&req.cache_dir) };
        Ok(InstanceSpec { source, cache_dir, options: req.options.clone() })
    }

    /// Checks the spec, prepares kernel and initramfs, and boots the VM.
    pub fn boot(&self, progress: &Progress) -> Result<qemu::QemuVm> {
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
        let backend = resolve_backend(self.options.backend)?;
        log::debug!("backend {} (asked: {})", backend.as_str(), self.options.backend.as_str());
        let mounts = check_mounts(&self.options.mounts)?;
        let t = std::time::Instant::now();
        let kernel = crate::image::kernel::resolve(&self.cache_dir, progress)?;
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
        let agent = crate::image::initramfs::find_agent()?;
        let t_agent = t.elapsed();
        let initramfs =
            crate::image::initramfs::build(&self.cache_dir, &kernel, &agent, &self.source, progress)?;
        log::debug!("kernel and agent found in {t_agent:?}, initramfs ready at {:?}", t.elapsed());
        let mut cfg = qemu::BootConfig::new(kernel, initramfs)?;
        if self.options.memory_mb > 0 {
            cfg.memory_mb = self.options.memory_mb;
        }
        if self.options.cpus > 0 {
            cfg.cpus = self.options.cpus as u32;
        }
        cfg.timeout = self.options.timeout;
        cfg.dmesg = self.options.dmesg;
        cfg.mounts = mounts;
        progress.step(&format!("booting ({}, {} MiB, {} vCPU)", cfg.accel.as_str(), cfg.memory_mb, cfg.cpus));
        qemu::QemuVm::boot(cfg)
    }
}
