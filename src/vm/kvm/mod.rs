//! vmhost's own KVM backend: a minimal VMM in the spirit of Firecracker's.
//!
//! The types follow the KVM file-descriptor hierarchy (rust-vmm's `kvm-ioctls`:
//! `Kvm` -> `VmFd` -> `VcpuFd`), one noun per module:
//!
//! - [`memory`]: guest memory, anonymous mappings registered as KVM memory slots, read
//!   and written by guest physical address with bounds checks;
//! - [`bus`]: the port-I/O and MMIO buses that route exits to devices by address;
//! - [`vcpu`]: one thread per vCPU running `KVM_RUN`, controlled over a crossbeam
//!   channel (pause, resume, stop) and kicked out of the guest with a signal and
//!   `immediate_exit`; it reports what ended it (HLT, shutdown, a fault) as events;
//! - [`devices`]: the 16550 UART console and the i8042 reset line.
//!
//! [`Vmm`] ties them together: a VM with its memory, its buses and its vCPUs.
//!
//! Hardware virtualization is needed to boot Linux ([`probe`]); on hosts whose
//! `/dev/kvm` is not hardware-backed (PVM) small guest programs still run, which is
//! what the tests use.

pub mod boot;
pub mod bus;
pub mod devices;
pub mod memory;
pub mod vcpu;

use std::fmt;
use std::sync::Arc;

use kvm_ioctls::{Kvm, VmFd};

pub use bus::{Bus, BusDevice};
pub use memory::GuestMemory;
pub use vcpu::{Vcpu, VcpuSetup};

/// Errors of the KVM backend.
#[derive(Debug)]
pub enum Error {
    /// A KVM ioctl failed.
    Kvm {
        /// What was being done ("create VM", "set memory slot 0", ...).
        op: String,
        /// The cause.
        source: kvm_ioctls::Error,
    },
    /// Mapping or accessing guest memory failed.
    Memory {
        /// What failed.
        message: String,
    },
    /// A device range overlaps another on a bus.
    BusOverlap {
        /// The new range's base.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A vCPU thread could not be started or controlled.
    Vcpu {
        /// Which vCPU.
        id: u8,
        /// What failed.
        message: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Kvm { op, source } => write!(f, "KVM: {op}: {source}"),
            Error::Memory { message } => write!(f, "guest memory: {message}"),
            Error::BusOverlap { base, len } => {
                write!(f, "bus: the range {base:#x}+{len:#x} overlaps a device already there")
            }
            Error::Vcpu { id, message } => write!(f, "vCPU {id}: {message}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Kvm { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Result alias of the backend.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm_err(op: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    let op = op.into();
    move |source| Error::Kvm { op, source }
}

/// Whether this host can boot Linux guests on KVM: `/dev/kvm` usable and the CPU
/// advertising hardware virtualization (vmx or svm). `Err` says why not.
pub fn probe() -> std::result::Result<(), String> {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if let Err(e) = Kvm::new() {
        return Err(format!("/dev/kvm cannot be opened ({e}); use the qemu backend"));
    }
    if !hw {
        return Err("the CPU has no hardware virtualization (no vmx or svm flag: this /dev/kvm is \
                    not hardware-backed, e.g. PVM, which cannot run a Linux guest); use the qemu backend"
            .into());
    }
    Ok(())
}

/// A VM: its KVM file, its memory, its buses and its vCPUs.
pub struct Vmm {
    kvm: Kvm,
    vm: Arc<VmFd>,
    memory: Arc<GuestMemory>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    vcpus: Vec<Vcpu>,
}

impl Vmm {
    /// A VM with `mem_size` bytes of memory at guest physical address 0, minus the
    /// `holes` (base, length) left for MMIO devices.
    pub fn new(mem_size: u64, holes: &[(u64, u64)]) -> Result<Vmm> {
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
        let memory = GuestMemory::new(mem_size, holes)?;
        memory.register(&vm)?;
        Ok(Vmm {
            kvm,
            vm: Arc::new(vm),
            memory: Arc::new(memory),
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            vcpus: Vec::new(),
        })
    }

    /// Adds the in-kernel interrupt controllers (PIC, IOAPIC, and a LAPIC per vCPU
    /// created after) and the PIT, as a booted Linux guest needs. Call before creating
    /// vCPUs. With them, HLT waits in the kernel for an interrupt instead of exiting.
    pub fn add_irqchip_and_pit(&self) -> Result<()> {
        // The TSS and identity-map pages Intel's VMX needs, below the 4 GiB MMIO top.
        self.vm.set_identity_map_address(0xfffb_c000).map_err(kvm_err("set the identity map address"))?;
        self.vm.set_tss_address(0xfffb_d000).map_err(kvm_err("set the TSS address"))?;
        self.vm.create_irq_chip().map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit =
            kvm_bindings::kvm_pit_config { flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.vm.create_pit2(pit).map_err(kvm_err("create the in-kernel PIT"))?;
        Ok(())
    }

    /// The CPUID table vCPUs get: what KVM supports on this host
    /// (KVM_GET_SUPPORTED_CPUID), with each vCPU's APIC id filled in by
    /// [`Vmm::start_vcpu`].
    pub fn supported_cpuid(&self) -> Result<kvm_bindings::CpuId> {
        self.kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM handle.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// The port-I/O bus.
    pub fn pio(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// The MMIO bus.
    pub fn mmio(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// Creates vCPU `id` with `setup` and starts its thread (paused until
    /// [`Vcpu::resume`] when `paused`).
    pub fn start_vcpu(&mut self, id: u8, setup: VcpuSetup, paused: bool) -> Result<&Vcpu> {
        let fd = self.vm.create_vcpu(id as u64).map_err(kvm_err(format!("create vCPU {id}")))?;
        // CPUID: what KVM supports here, with this vCPU's initial APIC id (leaf 1,
        // EBX[31:24]) so that a multi-vCPU guest tells its CPUs apart.
        let mut cpuid = self.supported_cpuid()?;
        for e in cpuid.as_mut_slice() {
            if e.function == 1 {
                e.ebx = (e.ebx & 0x00ff_ffff) | ((id as u32) << 24);
            }
        }
        fd.set_cpuid2(&cpuid).map_err(kvm_err(format!("vCPU {id}: set CPUID")))?;
        let v = Vcpu::start(id, fd, setup, self.pio.clone(), self.mmio.clone(), paused)?;
        self.vcpus.push(v);
        Ok(self.vcpus.last().expect("just pushed"))
    }

    /// The vCPUs, in creation order.
    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    /// Stops every vCPU and waits for their threads.
    pub fn stop(&mut self) {
        for v in &self.vcpus {
            v.request_stop();
        }
        for v in self.vcpus.drain(..) {
            v.join();
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop();
    }
}
