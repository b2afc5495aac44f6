//! How a QEMU VM is configured: the accelerator, the machine type, the boot
//! configuration, and the QEMU binary.

use std::path::PathBuf;
use std::time::Duration;

use super::QemuUser;
use crate::contract::proto::ExecRequest;
use crate::error::{Error, Result};
use crate::image::kernel::Kernel;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// `VMHOST_ACCEL` (kvm, tcg, auto), else the probe: KVM when `/dev/kvm` is usable
    /// and the CPU has hardware virtualization (vmx/svm), else TCG.
    pub fn choose() -> Result<Accel> {
        match std::env::var("VMHOST_ACCEL").unwrap_or_default().to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            "" | "auto" => Ok(Accel::probe()),
            other => Err(Error::InvalidArgument {
                op: "VMHOST_ACCEL".into(),
                message: format!("{other:?} is not kvm, tcg or auto"),
            }),
        }
    }

    /// Whether hardware virtualization is there to use.
    pub fn probe() -> Accel {
        let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        let cpu = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
            c.lines().any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm")))
        });
        if dev && cpu {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// The name QEMU knows.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineType {
    /// `-M microvm` with ACPI, virtio-mmio devices.
    Microvm,
    /// `-M pc`, virtio-pci devices.
    Pc,
}

/// How to boot.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// Guest memory in MiB.
    pub memory_mb: u64,
    /// vCPUs.
    pub cpus: u32,
    /// The kernel (its vmlinux is booted).
    pub kernel: Kernel,
    /// Kernel to pass to `-kernel` instead of `kernel.vmlinux` (e.g. a bzImage).
    pub kernel_image: Option<PathBuf>,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// Show the guest console on our stderr.
    pub dmesg: bool,
    /// Wall-clock limit of the VM.
    pub timeout: Option<Duration>,
    /// How long the guest may take to reach its agent.
    pub boot_timeout: Duration,
    /// Machine type.
    pub machine: MachineType,
    /// Accelerator.
    pub accel: Accel,
    /// Host directories shared over virtio-9p (checked by [`crate::vm::check_mounts`]).
    pub mounts: Vec<crate::wire::MountConfig>,
    /// Kernel parameters after the machine's own and the agent's (by default
    /// [`crate::vm::kernel_args_from_env`]).
    pub extra_args: Vec<String>,
    /// With its network on, whether the guest reaches the host's loopback (see
    /// [`super::net_filter`]).
    pub host_loopback: bool,
    /// The guest's first command: the agent starts it as soon as the guest is set up,
    /// before the host asks (it goes on the kernel command line: see
    /// [`crate::contract::proto::FIRST_EXEC_VAR`]), where it fits; only it may start first
    /// either way (see `crate::vm::agent_link::AgentLink::exec`).
    pub first_command: Option<ExecRequest>,
    /// Who QEMU runs as (by default [`QemuUser::from_env`]: a user of its own when
    /// vmhost is root; see [`super::user`]).
    pub qemu_user: QemuUser,
    /// A read-only root filesystem image (erofs) attached as the first virtio-blk disk,
    /// which the agent makes the root (see [`crate::contract::ROOT_DISK_PARAM`]).
    pub root_disk: Option<PathBuf>,
    /// With a root disk: a writable disk of this many MiB for its overlay (made empty,
    /// ext4, in the VM's run directory, gone with the VM), instead of tmpfs.
    pub rw_disk_mb: Option<u64>,
}

impl BootConfig {
    /// Defaults for `kernel` and `initramfs`: 256 MiB, 1 vCPU, microvm, probed
    /// accelerator, `VMHOST_BOOT_TIMEOUT` (seconds) or 120 s to boot.
    pub fn new(kernel: Kernel, initramfs: PathBuf) -> Result<BootConfig> {
        Ok(BootConfig {
            memory_mb: 256,
            cpus: 1,
            kernel,
            kernel_image: None,
            initramfs,
            dmesg: false,
            timeout: None,
            boot_timeout: crate::vm::boot_timeout(),
            machine: MachineType::Microvm,
            accel: Accel::choose()?,
            mounts: Vec::new(),
            extra_args: crate::vm::kernel_args_from_env(),
            host_loopback: false,
            first_command: None,
            qemu_user: QemuUser::from_env()?,
            root_disk: None,
            rw_disk_mb: None,
        })
    }
}

/// The QEMU binary: `VMHOST_QEMU`, else `qemu-system-x86_64` on `$PATH`.
pub fn qemu_binary() -> Result<PathBuf> {
    if let Some(q) = std::env::var_os("VMHOST_QEMU").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(q));
    }
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("qemu-system-x86_64")).find(|c| c.is_file()))
        .ok_or_else(|| Error::InvalidArgument {
            op: "start VM".into(),
            message:
                "qemu-system-x86_64 not found: apt-get install -y --no-install-recommends qemu-system-x86 \
                      (or set VMHOST_QEMU)"
                    .into(),
        })
}
