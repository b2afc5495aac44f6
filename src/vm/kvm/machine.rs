//! The kvm backend's machine: the pieces of this module put together into a VM that
//! boots vmhost's minimal kernel with the agent, as the QEMU backend's microvm does.
//!
//! The layout, fixed like Firecracker's:
//!
//! | what                          | where                              | interrupt |
//! |-------------------------------|------------------------------------|-----------|
//! | RAM                           | 0 .. `memory_mb`, less the hole    |           |
//! | MP table                      | 0x9FC00 (left out of the e820 map) |           |
//! | 16550 UART, `ttyS0` console   | ports 0x3F8..0x3FF                 | 4         |
//! | i8042 (reset line)            | ports 0x60..0x64                   |           |
//! | virtio console, the agent     | MMIO 0xD000_0000, 4 KiB            | 5         |
//! | I/O APIC, LAPICs (in-kernel)  | 0xFEC0_0000, 0xFEE0_0000           |           |
//!
//! RAM beyond 3.25 GiB continues above 4 GiB, past the MMIO hole. The guest finds the
//! virtio device on its command line (`virtio_mmio.device=4K@0xd0000000:5`), which
//! needs `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`: vmhost's own kernel has it, Debian's
//! kernels do not (they find devices through ACPI or PCI, which this machine does not
//! offer yet).
//!
//! Interrupts are edges through KVM irqfds into the in-kernel PIC and I/O APIC. The
//! virtio console is multiport: port 1 is named [`crate::contract::PORT_NAME`] and carries
//! the agent channel to one end of a socket pair, whose other end the host's
//! [`AgentLink`] uses as it uses QEMU's chardev socket.
//!
//! Threads: one per vCPU, one pump moving the agent's host-to-guest bytes into the
//! device, and one supervisor that ends the VM when the guest resets, powers off,
//! faults, or reaches its timeout, or when asked to stop.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::devices::i8042::I8042;
use super::devices::serial::Serial;
use super::devices::virtio::console::Console;
use super::devices::virtio::MmioTransport;
use super::vcpu::{VcpuSetup, VcpuState};
use super::{boot, mptable, Vmm};
use crate::error::{Error, Result};
use crate::vm::agent_link::AgentLink;
use crate::vm::console::{ConsoleLog, ConsoleWriter};
use crate::vm::lifecycle::Lifecycle;
use crate::vm::stop::{self, StopSteps};
use crate::vm::VmEnd;
use crate::vm::VmState;

/// The MMIO hole below 4 GiB: devices, the I/O APIC and the LAPICs.
pub const MMIO_HOLE: (u64, u64) = (0xd000_0000, 0x3000_0000);
/// The virtio console's register block.
pub const VIRTIO_CONSOLE_BASE: u64 = 0xd000_0000;
/// Its interrupt.
pub const VIRTIO_CONSOLE_IRQ: u32 = 5;
/// The UART's ports.
pub const UART_BASE: u64 = 0x3f8;
/// Its interrupt.
pub const UART_IRQ: u32 = 4;
/// The i8042's ports (data at 0x60, command at 0x64).
pub const I8042_BASE: u64 = 0x60;
/// The virtio console port of the agent channel.
pub const AGENT_PORT: usize = 1;
/// Host-to-guest agent bytes the device holds before the pump waits for the guest.
const PUMP_HIGH_WATER: usize = 256 << 10;

/// How to boot a VM on the kvm backend.
#[derive(Debug, Clone)]
pub struct KvmConfig {
    /// The uncompressed kernel, entered through its PVH note.
    pub vmlinux: PathBuf,
    /// The initramfs, if any.
    pub initramfs: Option<PathBuf>,
    /// Guest memory in MiB.
    pub memory_mb: u64,
    /// vCPUs (1 to `mptable::MAX_CPUS`).
    pub cpus: u32,
    /// Kernel parameters after the machine's own.
    pub extra_args: Vec<String>,
    /// Show the guest console on our stderr (and let the kernel print).
    pub dmesg: bool,
    /// A file that receives the guest console (bounded, as QEMU's `console.log`).
    pub console_log: Option<PathBuf>,
    /// Wall-clock limit of the VM.
    pub timeout: Option<Duration>,
    /// How long the guest may take to reach its agent.
    pub boot_timeout: Duration,
    /// The guest's first command (`AgentLink::connect`): only it may start first. This
    /// machine starts it when it is run, not at boot.
    pub first_command: Option<crate::contract::proto::ExecRequest>,
}

/// The kernel command line: the machine's devices, `quiet` unless in dmesg mode, then
/// `extra_args` (which may override any of them).
pub fn kernel_cmdline(cfg: &KvmConfig) -> String {
    let mut a: Vec<String> = [
        "console=ttyS0",
        // A reboot ends the VM: the triple fault is a KVM shutdown exit.
        "reboot=t",
        "panic=-1",
        "pci=off",
        "8250.nr_uarts=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("virtio_mmio.device=4K@{VIRTIO_CONSOLE_BASE:#x}:{VIRTIO_CONSOLE_IRQ}"));
    if !cfg.dmesg {
        a.extend(["quiet".to_string(), "loglevel=1".to_string()]);
    }
    a.extend(cfg.extra_args.iter().cloned());
    a.join(" ")
}

/// Why the supervisor ends the VM.
enum End {
    /// A vCPU thread ended (its id).
    Vcpu(u8),
    /// The guest pulsed the reset line.
    Reset,
    /// We were asked to.
    Stop,
    /// The instance timeout.
    Timeout,
}

struct Shared {
    id: String,
    life: Lifecycle,
    console: Arc<ConsoleLog>,
    agent: OnceLock<AgentLink>,
    /// Asks the supervisor to end the VM.
    stop_tx: Sender<()>,
    /// The host end of the agent channel, shut down when the VM ends.
    channel: UnixStream,
    /// How the VM ended, in words.
    how: OnceLock<String>,
    /// Wakes the pump from its wait for the guest.
    wake_pump: Sender<()>,
}

impl StopSteps for Shared {
    fn agent_shutdown(&self) -> Result<()> {
        stop::ask_agent_to_power_off(self.agent.get())
    }

    fn acpi_powerdown(&self) -> Result<()> {
        Err(Error::Vm {
            op: "stop".into(),
            message: "the kvm backend's machine has no ACPI power button".into(),
        })
    }

    fn terminate(&self) -> Result<()> {
        let _ = self.stop_tx.try_send(());
        Ok(())
    }

    fn kill(&self) -> Result<()> {
        self.terminate()
    }

    fn wait_exit(&self, timeout: Duration) -> bool {
        self.life.wait_final(timeout)
    }
}

/// A VM running on the kvm backend.
#[derive(Clone)]
pub struct KvmVm {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm").finish_non_exhaustive()
    }
}

fn host_err(op: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| super::Error::Host { op: op.to_string(), source }.into()
}

impl KvmVm {
    /// Builds the machine, boots the kernel and returns once the agent answered (or
    /// with an error carrying why the guest ended and its last console lines).
    pub fn boot(cfg: KvmConfig) -> Result<KvmVm> {
        static N: AtomicU64 = AtomicU64::new(1);
        let start = Instant::now();
        if cfg.cpus == 0 || cfg.cpus > mptable::MAX_CPUS as u32 {
            return Err(Error::InvalidArgument {
                op: "boot".into(),
                message: format!("{} vCPUs: the kvm backend runs 1 to {}", cfg.cpus, mptable::MAX_CPUS),
            });
        }
        if cfg.memory_mb < 64 || cfg.memory_mb > (1 << 20) {
            return Err(Error::InvalidArgument {
                op: "boot".into(),
                message: format!("{} MiB of memory: the kvm backend runs 64 MiB to 1 TiB", cfg.memory_mb),
            });
        }
        let id = format!("kvm-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let vmlinux = std::fs::read(&cfg.vmlinux).map_err(|e| Error::io("read kernel", &cfg.vmlinux, e))?;
        let initramfs = match &cfg.initramfs {
            Some(p) => Some(std::fs::read(p).map_err(|e| Error::io("read initramfs", p, e))?),
            None => None,
        };

        // Memory: RAM from 0, continued above 4 GiB past the MMIO hole.
        let ram = cfg.memory_mb << 20;
        let span = if ram > MMIO_HOLE.0 { ram + MMIO_HOLE.1 } else { ram };
        let holes = [MMIO_HOLE];
        let mut vmm = Vmm::new(span, &holes)?;
        vmm.add_irqchip_and_pit()?;
        let kernel = boot::load_kernel(vmm.memory(), &vmlinux)?;
        drop(vmlinux);
        let cmdline = kernel_cmdline(&cfg);
        log::debug!("{id}: kernel command line: {cmdline}");
        boot::setup_pvh(vmm.memory(), span, &holes, &kernel, &cmdline, initramfs.as_deref())?;
        drop(initramfs);
        mptable::write(vmm.memory(), cfg.cpus as u8)?;

        // Devices.
        let console = Arc::new(ConsoleLog::new(cfg.console_log.as_deref(), cfg.dmesg));
        let uart_irq = vmm.irq_line(UART_IRQ)?;
        let uart = Serial::new(Box::new(ConsoleWriter(console.clone())), Box::new(move || uart_irq()));
        vmm.pio().insert(UART_BASE, 8, Arc::new(Mutex::new(uart)))?;
        let (reset_tx, reset_rx) = crossbeam_channel::bounded::<()>(1);
        let kbd = I8042::new(Box::new(move || {
            let _ = reset_tx.try_send(());
        }));
        vmm.pio().insert(I8042_BASE, 5, Arc::new(Mutex::new(kbd)))?;
        let (host_end, link_end) = UnixStream::pair().map_err(host_err("create the agent channel"))?;
        let to_link = host_end.try_clone().map_err(host_err("clone the agent channel"))?;
        let mut device = Console::multiport(vec![
            (None, Box::new(ConsoleWriter(console.clone()))),
            (Some(crate::contract::PORT_NAME.to_string()), Box::new(to_link)),
        ]);
        // Wakes the pump when the guest takes input, and (from the supervisor) when the
        // VM ends.
        let (taken_tx, taken_rx) = crossbeam_channel::bounded(1);
        device.on_input_taken(taken_tx.clone());
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            vmm.memory().clone(),
            vmm.irq_line(VIRTIO_CONSOLE_IRQ)?,
        )));
        vmm.mmio().insert(VIRTIO_CONSOLE_BASE, 0x1000, transport.clone())?;

        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let shared = Arc::new(Shared {
            id: id.clone(),
            life: Lifecycle::new(),
            console,
            agent: OnceLock::new(),
            stop_tx,
            channel: host_end.try_clone().map_err(host_err("clone the agent channel"))?,
            how: OnceLock::new(),
            wake_pump: taken_tx,
        });
        // A guest that halts (halt, or power-off without power-off hardware) leaves its
        // vCPUs in HLT for ever: its kernel's last line on the console ends the VM.
        let weak = Arc::downgrade(&shared);
        shared.console.on_end(Box::new(move |said| {
            let Some(sh) = weak.upgrade() else { return };
            log::info!("{}: the guest kernel announced {said:?}", sh.id);
            if said.host_must_end() && sh.life.state() == VmState::Running {
                sh.life.set_end_reason(said.end());
                let _ = sh.stop_tx.try_send(());
            }
        }));

        // vCPUs: the first enters the kernel; the others wait in KVM for the INIT and
        // SIPI the kernel sends them (the in-kernel LAPIC runs that protocol).
        for cpu in 0..cfg.cpus as u8 {
            let setup = if cpu == 0 { boot::pvh_vcpu(kernel.entry) } else { VcpuSetup::real_mode(0, 0) };
            vmm.start_vcpu(cpu, setup, false)?;
        }
        let pump = {
            let sh = shared.clone();
            let t = transport.clone();
            thread::Builder::new()
                .name(format!("vmhost-{id}-agent-pump"))
                .spawn(move || {
                    // It moves the guest's bytes: confined like the vCPUs.
                    if let Err(e) = super::seccomp::confine_thread() {
                        log::error!("{e}; the agent channel stays closed");
                        return;
                    }
                    pump(&sh, host_end, &t, &taken_rx)
                })
                .map_err(host_err("start the agent channel pump"))?
        };
        {
            let sh = shared.clone();
            let timeout = cfg.timeout;
            thread::Builder::new()
                .name(format!("vmhost-{id}"))
                .spawn(move || supervise(&sh, vmm, stop_rx, reset_rx, timeout, pump))
                .map_err(host_err("start the VM supervisor"))?;
        }
        let vm = KvmVm { shared };
        match AgentLink::connect(link_end, cfg.boot_timeout, cfg.first_command.as_ref()) {
            Ok(link) => {
                let _ = vm.shared.agent.set(link);
                vm.shared.life.set(VmState::Running);
                log::info!("{id} booted in {:?} (kvm)", start.elapsed());
                Ok(vm)
            }
            Err(e) => {
                let _ = vm.force_stop();
                Err(vm.boot_error(e))
            }
        }
    }

    fn boot_error(&self, e: Error) -> Error {
        let mut msg = crate::vm::boot_failure(&e);
        if let Some(how) = self.shared.how.get() {
            msg.push_str(&format!("\nthe VM ended: {how}"));
        }
        msg.push_str(&self.shared.console.boot_excerpt());
        Error::Vm { op: "boot".into(), message: msg }
    }

    /// The VM's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The lifecycle state.
    pub fn state(&self) -> VmState {
        self.shared.life.state()
    }

    /// How the VM ended, once it has (or once its end was decided).
    pub fn end(&self) -> Option<VmEnd> {
        self.shared.life.end()
    }

    /// The agent, while the VM runs.
    pub fn agent(&self) -> Result<&AgentLink> {
        self.shared.life.agent(&self.shared.agent)
    }

    /// The last `n` lines of the guest console.
    pub fn console_tail(&self, n: usize) -> String {
        self.shared.console.tail(n)
    }

    /// Stops the VM: the agent's shutdown, then ending the vCPUs, each bounded by
    /// `timeout`.
    pub fn stop(&self, timeout: Duration) -> Result<()> {
        self.shared.life.stop(self.shared.clone(), timeout)
    }

    /// Stops the VM as [`Self::stop`] does, recording `why` as how it ended (unless an
    /// end was recorded before).
    pub fn end_because(&self, why: VmEnd, timeout: Duration) -> Result<()> {
        self.shared.life.set_end_reason(why);
        self.stop(timeout)
    }

    /// Ends the VM at once.
    pub fn force_stop(&self) -> Result<()> {
        self.shared.life.force_stop(self.shared.clone())
    }

    /// Blocks until the VM has ended, at most `timeout` (`None`: still running).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<()>> {
        self.shared.life.wait_timeout(timeout)
    }
}

/// Moves the host's bytes for the agent into the virtio console, holding back (and so
/// holding back the host's writes) while the guest has not taken what it has: it waits
/// on `taken`, which the device signals as the guest takes input (the driver notifies
/// the device each time it posts receive buffers) and the supervisor at the VM's end.
fn pump(sh: &Shared, mut from: UnixStream, transport: &Mutex<MmioTransport<Console>>, taken: &Receiver<()>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        {
            let mut t = transport.lock();
            t.device_mut().enqueue_port(AGENT_PORT, &buf[..n]);
            t.poll();
        }
        while transport.lock().device_mut().pending_port(AGENT_PORT) > PUMP_HIGH_WATER {
            // Set by the supervisor before it wakes and joins this thread.
            if sh.how.get().is_some() {
                return;
            }
            let _ = taken.recv();
        }
    }
}

/// Waits for the VM's end, then stops every vCPU and closes the agent channel.
fn supervise(
    sh: &Shared,
    mut vmm: Vmm,
    stop_rx: Receiver<()>,
    reset_rx: Receiver<()>,
    timeout: Option<Duration>,
    pump: thread::JoinHandle<()>,
) {
    let deadline = timeout.map(|t| Instant::now() + t);
    let end = {
        let ended = vmm.ended().clone();
        let wait = deadline.map_or(crossbeam_channel::never(), crossbeam_channel::at);
        crossbeam_channel::select! {
            recv(ended) -> id => id.map_or(End::Stop, End::Vcpu),
            recv(reset_rx) -> _ => End::Reset,
            recv(stop_rx) -> _ => End::Stop,
            recv(wait) -> _ => End::Timeout,
        }
    };
    // A stop the host asked for ends however the guest takes it (the agent's power-off
    // is a reboot by triple fault on vmhost's kernel): stopped, not rebooted.
    let asked = sh.life.state() == VmState::Stopping;
    let (why, how) = match end {
        End::Vcpu(_) | End::Reset if asked => (VmEnd::Stopped, "stopped by the host".to_string()),
        End::Vcpu(id) => match vmm.vcpus().iter().find(|v| v.id() == id).map(|v| v.state()) {
            Some(VcpuState::Failed(why)) => {
                let m = format!("vCPU {id} failed: {why}");
                (VmEnd::Crashed(m.clone()), m)
            }
            // reboot=t resets by triple fault, as a crash does: the console tells them apart.
            Some(VcpuState::Shutdown) => {
                let end = match sh.console.last_end() {
                    Some(said) => said.end(),
                    None => VmEnd::GuestReset,
                };
                (end, format!("the guest reset the machine (a shutdown exit of vCPU {id})"))
            }
            _ => (VmEnd::Stopped, format!("vCPU {id} stopped")),
        },
        End::Reset => (VmEnd::GuestReboot, "the guest reset the machine through the i8042".to_string()),
        End::Stop => (VmEnd::Stopped, "stopped by the host".to_string()),
        End::Timeout => {
            let t = timeout.unwrap_or_default();
            (VmEnd::Timeout(t), format!("the instance timeout of {t:?} was reached"))
        }
    };
    log::info!("{}: {how}", sh.id);
    let _ = sh.how.set(how);
    let _ = sh.wake_pump.try_send(());
    sh.life.set_end_reason(why);
    // EOF for the agent link and the pump, first: a vCPU blocked writing to the
    // channel then fails its write instead of holding up the stop.
    let _ = sh.channel.shutdown(std::net::Shutdown::Both);
    if let Some(a) = sh.agent.get() {
        a.close();
    }
    vmm.stop();
    let _ = pump.join();
    drop(vmm);
    log::info!("{}: VM ended", sh.id);
    sh.life.finish();
}
