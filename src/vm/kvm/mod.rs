//! vmhost's own KVM backend: a minimal VMM in the spirit of Firecracker's.
//!
//! The types follow the KVM file-descriptor hierarchy (rust-vmm's `kvm-ioctls`:
//! `Kvm` -> `VmFd` -> `VcpuFd`), one noun per module:
//!
//! - `memory`: guest memory, anonymous mappings registered as KVM memory slots, read
//!   and written by guest physical address with bounds checks;
//! - `bus`: the port-I/O and MMIO buses that route exits to devices by address;
//! - [`vcpu`]: one thread per vCPU running `KVM_RUN`, controlled over a crossbeam
//!   channel (pause, resume, stop) and kicked out of the guest with a signal and
//!   `immediate_exit`; it reports what ended it (HLT, shutdown, a fault) as events;
//! - [`devices`]: the 16550 UART console, the i8042 reset line, and virtio over MMIO
//!   (the transport, split virtqueues, and the multiport console that carries the agent);
//! - [`boot`]: PVH entry of an uncompressed vmlinux (start info, e820, command line,
//!   initramfs, GDT) and 64-bit entry (identity page tables);
//! - `mptable`: the MultiProcessor table that tells a guest without ACPI its CPUs and
//!   its I/O APIC;
//! - `machine`: all of it put together into the backend's VM (`KvmVm`).
//!
//! [`Vmm`] ties the first ones together: a VM with its memory, its buses, its interrupt
//! lines (irqfds into the in-kernel irqchip) and its vCPUs.
//!
//! KVM is reached through rust-vmm's `kvm-ioctls` and `kvm-bindings`, the crates
//! Firecracker and cloud-hypervisor use: typed ioctls and the kernel's structures,
//! maintained against new kernels, where hand-written nix ioctls would repeat them.
//!
//! Hardware virtualization is needed to boot Linux ([`probe`]); on hosts whose
//! `/dev/kvm` is not hardware-backed (PVM) small guest programs still run, which is
//! what most tests use, and the minimal kernel runs until PVM's emulator gives up.
//!
//! Devices are found through the kernel command line (`virtio_mmio.device=`), which
//! vmhost's own kernel understands. Debian's stock kernels do not; they would need ACPI
//! tables (a DSDT describing the virtio-mmio devices, as Firecracker now generates) or
//! PCI (config space at ports 0xCF8/0xCFC and a virtio-pci transport). Neither is built
//! yet: the kvm backend boots vmhost's own kernel, and asked to boot another it says so.

pub mod boot;
pub(crate) mod bus;
pub mod devices;
pub mod error;
pub(crate) mod machine;
pub(crate) mod memory;
pub(crate) mod mptable;
pub mod seccomp;
pub mod vcpu;

use std::sync::Arc;

use kvm_ioctls::{Kvm, VmFd};

pub use bus::{Bus, BusDevice};
pub use error::Error;
pub use machine::{KvmConfig, KvmVm};
pub use memory::GuestMemory;
pub use vcpu::{Vcpu, VcpuSetup};

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

/// The CPUID table of vCPU `id`, from what KVM supports: its initial APIC id (leaf 1
/// EBX bits 31..24, and leaf 0xB EDX, its x2APIC id) so that a multi-vCPU guest tells its
/// CPUs apart, and the hypervisor bit (leaf 1 ECX bit 31) so that the guest looks for
/// KVM's paravirtual clock.
pub fn vcpu_cpuid(cpuid: &mut kvm_bindings::CpuId, id: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | ((id as u32) << 24);
                e.ecx |= 1 << 31;
            }
            0xb => e.edx = id as u32,
            _ => {}
        }
    }
}

/// LAPIC register offsets of the local interrupt pins.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
/// Delivery modes (LVT bits 10:8).
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Sets LINT0 to ExtINT and LINT1 to NMI in a LAPIC register page.
pub fn set_lint(lapic: &mut kvm_bindings::kvm_lapic_state) {
    let mut set = |off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    };
    set(APIC_LVT0, APIC_MODE_EXTINT);
    set(APIC_LVT1, APIC_MODE_NMI);
}

/// A VM: its KVM file, its memory, its buses and its vCPUs.
#[derive(Debug)]
pub struct Vmm {
    kvm: Kvm,
    vm: Arc<VmFd>,
    memory: Arc<GuestMemory>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    vcpus: Vec<Vcpu>,
    /// Whether the in-kernel irqchip is there (vCPUs then get their LAPIC set up).
    irqchip: bool,
    /// vCPU ids, sent by each vCPU thread as it ends.
    ended: (crossbeam_channel::Sender<u8>, crossbeam_channel::Receiver<u8>),
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
            irqchip: false,
            // One message per vCPU, never more than there can be vCPUs.
            ended: crossbeam_channel::bounded(256),
        })
    }

    /// Adds the in-kernel interrupt controllers (PIC, IOAPIC, and a LAPIC per vCPU
    /// created after) and the PIT, as a booted Linux guest needs. Call before creating
    /// vCPUs. With them, HLT waits in the kernel for an interrupt instead of exiting.
    pub fn add_irqchip_and_pit(&mut self) -> Result<()> {
        // The TSS and identity-map pages Intel's VMX needs, below the 4 GiB MMIO top.
        self.vm.set_identity_map_address(0xfffb_c000).map_err(kvm_err("set the identity map address"))?;
        self.vm.set_tss_address(0xfffb_d000).map_err(kvm_err("set the TSS address"))?;
        self.vm.create_irq_chip().map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit =
            kvm_bindings::kvm_pit_config { flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.vm.create_pit2(pit).map_err(kvm_err("create the in-kernel PIT"))?;
        self.irqchip = true;
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
        let mut cpuid = self.supported_cpuid()?;
        vcpu_cpuid(&mut cpuid, id);
        fd.set_cpuid2(&cpuid).map_err(kvm_err(format!("vCPU {id}: set CPUID")))?;
        if self.irqchip {
            // The local interrupt pins as a PC's firmware leaves them: the PIC on
            // LINT0 (virtual wire mode, until the guest sets up its I/O APIC), NMI on
            // LINT1.
            let mut lapic = fd.get_lapic().map_err(kvm_err(format!("vCPU {id}: get LAPIC")))?;
            set_lint(&mut lapic);
            fd.set_lapic(&lapic).map_err(kvm_err(format!("vCPU {id}: set LAPIC")))?;
        }
        let v =
            Vcpu::start(id, fd, setup, self.pio.clone(), self.mmio.clone(), paused, self.ended.0.clone())?;
        self.vcpus.push(v);
        Ok(self.vcpus.last().expect("just pushed"))
    }

    /// Receives the id of each vCPU whose thread ends (shutdown, failure or stop).
    pub fn ended(&self) -> &crossbeam_channel::Receiver<u8> {
        &self.ended.1
    }

    /// An interrupt line: a KVM irqfd on `gsi` of the in-kernel irqchip, returned as the
    /// function a device calls to raise it (an edge: ISA and virtio-mmio interrupts).
    pub fn irq_line(&self, gsi: u32) -> Result<devices::virtio::Interrupt> {
        let fd = vmm_sys_util::eventfd::EventFd::new(nix::libc::EFD_NONBLOCK)
            .map_err(|e| Error::Host { op: format!("create the eventfd of interrupt {gsi}"), source: e })?;
        self.vm
            .register_irqfd(&fd, gsi)
            .map_err(kvm_err(format!("register the irqfd of interrupt {gsi}")))?;
        Ok(Arc::new(move || {
            // Fails only when the counter would overflow: the interrupt is pending anyway.
            let _ = fd.write(1);
        }))
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
