//! The QEMU backend: a `qemu-system-x86_64` child supervised from one thread, driven
//! over QMP, with the guest agent on a virtio-serial port.
//!
//! Default machine: `-M microvm` (with its ACPI tables, which is how Debian kernels find
//! virtio-mmio devices and the power button), the uncompressed vmlinux booted through
//! its PVH entry, `-nodefaults`, the serial console through a socket pair into a bounded
//! `console.log` (and our stderr in dmesg mode), and
//! `-no-reboot` so that a guest reboot ends the VM. The accelerator is KVM where the
//! host has hardware virtualization, else TCG (`VMHOST_ACCEL=kvm|tcg|auto`).
//!
//! QEMU gets `PR_SET_PDEATHSIG(SIGKILL)` from the supervisor thread, which lives exactly
//! as long as QEMU: if the process that owns the VM dies, even by SIGKILL, QEMU dies too.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use super::agent_link::AgentLink;
use super::console::ConsoleLog;
use super::end::ConsoleEnd;
use super::lifecycle::Lifecycle;
use super::run_dir::RunDir;
use super::stop::{self, StopSteps, VmProcess};
use super::{VmEnd, VmState};
use crate::agent::proto::ExecRequest;
use crate::error::{Error, Result};
use crate::image::kernel::Kernel;
use crate::qmp;
use crate::unix;

pub mod net_filter;
pub mod user;

pub use user::QemuUser;

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
    /// [`net_filter`]).
    pub host_loopback: bool,
    /// The guest's first command: the agent starts it as soon as the guest is set up,
    /// before the host asks (it goes on the kernel command line: see
    /// [`crate::agent::proto::FIRST_EXEC_VAR`]), where it fits; only it may start first
    /// either way (see [`AgentLink::exec`]).
    pub first_command: Option<ExecRequest>,
    /// Who QEMU runs as (by default [`QemuUser::from_env`]: a user of its own when
    /// vmhost is root; see [`user`]).
    pub qemu_user: QemuUser,
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
            boot_timeout: super::boot_timeout(),
            machine: MachineType::Microvm,
            accel: Accel::choose()?,
            mounts: Vec::new(),
            extra_args: super::kernel_args_from_env(),
            host_loopback: false,
            first_command: None,
            qemu_user: QemuUser::from_env()?,
        })
    }
}

/// The id of the guest's network device.
const NET_ID: &str = "net0";

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

struct Shared {
    id: String,
    dir: RunDir,
    life: Lifecycle,
    process: OnceLock<Arc<VmProcess>>,
    qmp: OnceLock<qmp::Client>,
    agent: OnceLock<AgentLink>,
    accel: Accel,
    console: ConsoleLog,
    /// Set when the console reader has read everything there will be.
    console_done: std::sync::atomic::AtomicBool,
    /// The end of what QEMU wrote on its stderr (`qemu.log`), kept when it exits (the run
    /// directory goes): why it refused to start, for the boot error.
    qemu_said: parking_lot::Mutex<String>,
    /// The filter between the guest's network device and slirp, once the guest's
    /// network was first enabled; ended with the VM.
    net_filter: parking_lot::Mutex<Option<net_filter::NetFilter>>,
    host_loopback: bool,
    /// The reason of QEMU's SHUTDOWN event (guest-shutdown, guest-reset, host-signal...).
    shutdown_reason: parking_lot::Mutex<Option<String>>,
}

impl StopSteps for Shared {
    fn agent_shutdown(&self) -> Result<()> {
        stop::ask_agent_to_power_off(self.agent.get())
    }

    fn acpi_powerdown(&self) -> Result<()> {
        let q = self
            .qmp
            .get()
            .ok_or_else(|| Error::Vm { op: "stop".into(), message: "no QMP connection".into() })?;
        q.execute(&qmp::cmd::SystemPowerdown, Duration::from_secs(5)).map(drop).map_err(Error::Qmp)
    }

    fn terminate(&self) -> Result<()> {
        self.process.get().map_or(Ok(()), |p| p.terminate())
    }

    fn kill(&self) -> Result<()> {
        self.process.get().map_or(Ok(()), |p| p.kill())
    }

    fn wait_exit(&self, timeout: Duration) -> bool {
        self.life.wait_final(timeout)
    }
}

/// A running QEMU VM.
#[derive(Clone)]
pub struct QemuVm {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuVm").field("id", &self.shared.id).finish_non_exhaustive()
    }
}

impl QemuVm {
    /// Boots a VM and returns once its agent answered (or with an error carrying the
    /// last console lines).
    pub fn boot(mut cfg: BootConfig) -> Result<QemuVm> {
        static N: AtomicU64 = AtomicU64::new(1);
        check_extra_args(&cfg)?;
        let qemu = qemu_binary()?;
        let creds = cfg.qemu_user.credentials(cfg.accel)?;
        // What QEMU keeps open from us (see `QemuFds`), and for a QEMU of another user
        // (see `user`) the kernel and the initramfs too: it opens nothing of ours by name.
        let mut inherited: Vec<OwnedFd> = Vec::new();
        if let Some(c) = &creds {
            for m in &cfg.mounts {
                c.check_share(m)?;
            }
            let kernel = cfg.kernel_image.clone().unwrap_or_else(|| cfg.kernel.vmlinux.clone());
            for (what, path) in [("kernel", kernel), ("initramfs", cfg.initramfs.clone())] {
                c.check_readable(what, &path)?;
                let f = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
                let fd = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
                match what {
                    "kernel" => cfg.kernel_image = Some(fd),
                    _ => cfg.initramfs = fd,
                }
                inherited.push(f.into());
            }
        }
        let dir = RunDir::new()?;
        let fds = QemuFds::new(&dir.0)?;
        let console = ConsoleLog::new(Some(&dir.0.join("console.log")), cfg.dmesg);
        let id = format!("vm-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let shared = Arc::new(Shared {
            id,
            dir,
            life: Lifecycle::new(),
            process: OnceLock::new(),
            qmp: OnceLock::new(),
            agent: OnceLock::new(),
            accel: cfg.accel,
            console,
            console_done: std::sync::atomic::AtomicBool::new(false),
            shutdown_reason: parking_lot::Mutex::new(None),
            qemu_said: parking_lot::Mutex::new(String::new()),
            net_filter: parking_lot::Mutex::new(None),
            host_loopback: cfg.host_loopback,
        });
        let weak = Arc::downgrade(&shared);
        shared.console.on_end(Box::new(move |said| {
            if let Some(sh) = weak.upgrade() {
                guest_announced_end(&sh, said);
            }
        }));
        let vm = QemuVm { shared: shared.clone() };
        let (append, private) = kernel_cmdline(&cfg);
        let (cmdline, cmdline_file) = cmdline_args(append, private, &shared.dir.0, creds.is_some())?;
        inherited.extend(cmdline_file);
        let args = command_line(&cfg, cmdline, &fds);
        log::debug!("qemu {}", args.join(" "));
        let stderr = File::create(shared.dir.0.join("qemu.log"))
            .map_err(|e| Error::io("create", shared.dir.0.join("qemu.log"), e))?;
        let QemuFds { console, for_qemu } = fds;
        inherited.extend(for_qemu);
        let reader = shared.clone();
        thread::Builder::new()
            .name("vmhost-console".into())
            .spawn(move || {
                read_console(&reader, console);
                reader.console_done.store(true, Ordering::SeqCst);
            })
            .map_err(|e| Error::io("start console reader", &shared.dir.0, e))?;
        let (started_tx, started_rx) = crossbeam_channel::bounded(1);
        let sup = shared.clone();
        let timeout = cfg.timeout;
        let child = ChildSetup { creds: creds.map(Arc::new), inherited };
        thread::Builder::new()
            .name(format!("vmhost-qemu-{}", shared.id))
            .spawn(move || supervise(sup, qemu, args, stderr, timeout, child, started_tx))
            .map_err(|e| Error::io("start VM supervisor", &shared.dir.0, e))?;
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::Vm { op: "boot".into(), message: "the VM supervisor died".into() }),
        }
        match vm.connect(&cfg) {
            Ok(()) => {
                shared.life.set(VmState::Running);
                Ok(vm)
            }
            Err(e) => {
                log::debug!("{}: the boot failed: {e}", shared.id);
                let _ = vm.force_stop();
                Err(vm.boot_error(e))
            }
        }
    }

    fn connect(&self, cfg: &BootConfig) -> Result<()> {
        let sh = &self.shared;
        let start = Instant::now();
        let (qmp_path, agent_path) = (sh.dir.0.join("qmp.sock"), sh.dir.0.join("agent.sock"));
        let stream = self.dial_socket(&qmp_path)?;
        let q = qmp::Client::connect(stream, Duration::from_secs(30)).map_err(Error::Qmp)?;
        // No network until asked for: the link is down before the guest boots.
        q.execute_raw(
            "set_link",
            Some(serde_json::json!({"name": NET_ID, "up": false})),
            Duration::from_secs(10),
        )
        .map_err(Error::Qmp)?;
        // QEMU's SHUTDOWN event says why it ends (the guest's power-off or reset, a signal).
        let events = q.listen(16);
        let watcher = sh.clone();
        thread::Builder::new()
            .name("vmhost-qmp-events".into())
            .spawn(move || {
                while let Ok(ev) = events.recv() {
                    if ev.event == "SHUTDOWN" {
                        let reason = ev.data.get("reason").and_then(|r| r.as_str()).unwrap_or("");
                        *watcher.shutdown_reason.lock() = Some(reason.to_string());
                    }
                }
            })
            .map_err(|e| Error::io("start the QMP event watcher", &sh.dir.0, e))?;
        let _ = sh.qmp.set(q);
        let stream = self.dial_socket(&agent_path)?;
        let link = AgentLink::connect(stream, cfg.boot_timeout, cfg.first_command.as_ref())?;
        let _ = sh.agent.set(link);
        log::info!("{} booted in {:?} ({})", sh.id, start.elapsed(), sh.accel.as_str());
        Ok(())
    }

    /// Connects to one of the sockets QEMU creates while starting: the file appears at
    /// bind(2) and connections are refused until listen(2), so a missing or refusing
    /// socket is retried while QEMU runs (for at most 30 s).
    fn dial_socket(&self, path: &Path) -> Result<std::os::unix::net::UnixStream> {
        let running = || !self.shared.life.state().is_final();
        let r = unix::connect_retry_while(path, Duration::from_secs(30), Duration::from_millis(1), &running);
        match r {
            Err(_) if !running() => {
                Err(Error::Vm { op: "boot".into(), message: "QEMU exited while starting".into() })
            }
            r => r,
        }
    }

    fn boot_error(&self, e: Error) -> Error {
        // The VM is down: let the console reader take in its last words first.
        let until = Instant::now() + Duration::from_secs(3);
        while !self.shared.console_done.load(Ordering::SeqCst) && Instant::now() < until {
            thread::sleep(Duration::from_millis(10));
        }
        // QEMU may not have exited yet (a guest that failed to boot): then its log is
        // still in the run directory.
        let mut qemu_log = self.shared.qemu_said.lock().clone();
        if qemu_log.is_empty() {
            qemu_log = read_tail(&self.shared.dir.0.join("qemu.log"));
        }
        // QEMU's informational lines (`info: QEMU waiting for connection ...`) and its
        // warning that slirp's hub has no NIC (by design: see net_filter) say nothing.
        let noise = |l: &str| l.contains(": info: ") || l.contains("with no nics") || l.trim().is_empty();
        let said: Vec<&str> = qemu_log.lines().filter(|l| !noise(l)).collect();
        let exited = self.shared.process.get().is_some_and(|p| p.has_exited());
        if exited && self.shared.console.tail(1).is_empty() && !said.is_empty() {
            // QEMU refused to start: its own words are the error.
            return Error::BackendUnavailable {
                backend: "qemu".into(),
                why: format!("QEMU refused to start the VM:\n{}", said.join("\n")),
            };
        }
        let mut msg = super::boot_failure(&e);
        if !said.is_empty() {
            msg.push_str(&format!("\nQEMU said:\n{}", said.join("\n")));
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

    /// Connects or disconnects the guest's network (QEMU's user-mode network through
    /// [`net_filter`]: the guest is 10.0.2.15, its gateway 10.0.2.2, which is the host's
    /// loopback only when the VM was booted with [`BootConfig::host_loopback`]).
    /// Connecting has the agent configure eth0 first (again harmlessly when it is) and
    /// starts the filter the first time: a guest never connected skips both.
    pub fn set_network(&self, up: bool) -> Result<()> {
        let q = self
            .shared
            .qmp
            .get()
            .ok_or_else(|| Error::Vm { op: "set network".into(), message: "no QMP connection".into() })?;
        if up {
            // The guest configures eth0 only when asked: boots without network skip it.
            self.agent()?.network_up(Duration::from_secs(20))?;
            let mut filter = self.shared.net_filter.lock();
            if filter.is_none() {
                let (guest, net) =
                    (self.shared.dir.0.join("guest-net.sock"), self.shared.dir.0.join("slirp.sock"));
                *filter = Some(net_filter::NetFilter::start(&guest, &net, self.shared.host_loopback)?);
            }
        }
        q.execute_raw(
            "set_link",
            Some(serde_json::json!({"name": NET_ID, "up": up})),
            Duration::from_secs(10),
        )
        .map(drop)
        .map_err(Error::Qmp)
    }

    /// The QMP connection.
    pub fn qmp(&self) -> Option<&qmp::Client> {
        self.shared.qmp.get()
    }

    /// QEMU's pid.
    pub fn pid(&self) -> Option<u32> {
        self.shared.process.get().map(|p| p.pid())
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.shared.accel
    }

    /// The last `n` lines of the guest console.
    pub fn console_tail(&self, n: usize) -> String {
        self.shared.console.tail(n)
    }

    /// Stops the VM: agent, ACPI, SIGTERM, SIGKILL, each step bounded by `timeout`.
    pub fn stop(&self, timeout: Duration) -> Result<()> {
        self.shared.life.stop(self.shared.clone(), timeout)
    }

    /// Stops the VM as [`Self::stop`] does, recording `why` as how it ended (unless an
    /// end was recorded before).
    pub fn end_because(&self, why: VmEnd, timeout: Duration) -> Result<()> {
        self.shared.life.set_end_reason(why);
        self.stop(timeout)
    }

    /// Ends the VM at once: SIGTERM, 1 s, SIGKILL.
    pub fn force_stop(&self) -> Result<()> {
        self.shared.life.force_stop(self.shared.clone())
    }

    /// Blocks until the VM has ended, at most `timeout` (`None`: still running); an
    /// error if it ended badly.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<()>> {
        self.shared.life.wait_timeout(timeout)
    }
}

/// What QEMU gets as open descriptors rather than names, all made by us in the VM's
/// run directory, which only we can enter: its listening sockets (QMP, the agent's
/// port, the network device's and slirp's streams), bound here and listened on by
/// QEMU (`fd=N`), and its end of the console's socket pair. Nothing QEMU (or a guest
/// that took it over) does can put something else at a path we later connect to or
/// read.
struct QemuFds {
    /// Our end of the console.
    console: File,
    /// QEMU's descriptors, in [`QemuFds::ORDER`]: closed here once QEMU has its copies.
    for_qemu: Vec<OwnedFd>,
}

impl QemuFds {
    /// The sockets, in the order of `for_qemu`, by the name of their path.
    const ORDER: [&'static str; 4] = ["qmp.sock", "agent.sock", "guest-net.sock", "slirp.sock"];

    fn new(dir: &Path) -> Result<QemuFds> {
        let mut for_qemu: Vec<OwnedFd> = Vec::new();
        for name in QemuFds::ORDER {
            for_qemu.push(unix::bind_socket(&dir.join(name))?.into());
        }
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| Error::io("create the console socket", dir, e))?;
        for_qemu.push(theirs.into());
        Ok(QemuFds { console: File::from(OwnedFd::from(ours)), for_qemu })
    }

    /// The descriptor number QEMU gets for the socket `name` (one of [`QemuFds::ORDER`])
    /// or, for "console", its end of the console.
    fn fd(&self, name: &str) -> i32 {
        let i = QemuFds::ORDER.iter().position(|n| *n == name).unwrap_or(QemuFds::ORDER.len());
        self.for_qemu[i].as_raw_fd()
    }
}

/// Reads the guest console until the VM ends (QEMU's end of the socket pair closes
/// with it), into the VM's [`ConsoleLog`].
fn read_console(sh: &Shared, mut console: File) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match console.read(&mut buf) {
            Ok(0) => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
            Ok(n) => sh.console.append(&buf[..n]),
        }
    }
}

/// The local APIC timer's period for vmhost's own kernel (kernel/patches/0005-*): bus
/// cycles per jiffy, QEMU's (and KVM's) 1 GHz APIC bus at the kernel's HZ (250 when the
/// kernel's config is not beside it, as vmhost's kernel.config sets it).
fn lapic_timer_period_arg(hz: Option<u32>) -> String {
    format!("lapic_timer_period={}", 1_000_000_000 / hz.filter(|&h| h > 0).unwrap_or(250))
}

/// The kernel parameter that has vmhost's own kernel warm the agent up
/// (kernel/patches/0004-*, [`crate::agent::main`]).
const WARM_UP_ARG: &str = "vmhost.warm_up=/init";

/// The kernel's command line, and whether it carries the first command.
fn kernel_cmdline(cfg: &BootConfig) -> (String, bool) {
    let minimal = cfg.kernel.is_minimal();
    // The host's TSC rate, so that guest clocks keep the host's time (see vm::clock).
    let tsc = crate::vm::clock::kernel_args(cfg.kernel.hz());
    let mut append = vec!["console=ttyS0", "panic=-1"];
    append.extend(tsc.iter().map(String::as_str));
    append.push("cryptomgr.notests");
    let lapic_period = lapic_timer_period_arg(cfg.kernel.hz());
    if minimal {
        // No ACPI: devices come on the command line (QEMU's microvm adds them), reboot
        // by triple fault (which -no-reboot turns into QEMU exiting).
        append.extend(["reboot=t", "no_timer_check", "8250.nr_uarts=1"]);
        // The local APIC timer, whose one-shot mode lets an idle vCPU go without ticks
        // (with nolapic_timer, the PIT's periodic broadcast cost an idle VM 7.7 % of a
        // core), with its period given: QEMU's APIC bus runs at 1 GHz, 4000000 cycles a
        // jiffy at HZ=250, so the kernel skips its ~220 ms calibration against the PIT
        // (kernel/patches/0005-*). The stock kernel calibrates (it has no such patch).
        append.push(&lapic_period);
        if cfg.machine == MachineType::Microvm {
            append.push("pci=off");
        }
        // With a second vCPU, idle while the first finishes the kernel's start-up, the
        // kernel runs `/init --warm-up` there first, so that init's exec and first steps
        // are translated when init runs them (kernel/patches/0004-*). With one vCPU it
        // would only run beside init.
        if cfg.cpus > 1 {
            append.push(WARM_UP_ARG);
        }
    }
    // The agent mounts each shared directory (crate::agent::init reads this).
    let mounts_arg = (!cfg.mounts.is_empty()).then(|| {
        let list: Vec<String> = cfg
            .mounts
            .iter()
            .map(|m| format!("{}:{}", m.tag, if m.writable { "rw" } else { "ro" }))
            .collect();
        format!("{}{}", crate::agent::MOUNTS_PARAM, list.join(","))
    });
    append.extend(mounts_arg.as_deref());
    if !cfg.dmesg {
        append.extend(["quiet", "loglevel=1"]);
    }
    // The first command, for the agent (crate::agent::proto::FIRST_EXEC_VAR), where it
    // fits. The kernel keeps COMMAND_LINE_SIZE (2048) bytes with their NUL and cuts the
    // rest, and QEMU's microvm adds a `virtio_mmio.device=512@0xfeb00e00:12` for each
    // device. The command line then goes to QEMU in a file (see `cmdline_args`), whose
    // values hold at most QEMU_CONFIG_VALUE bytes and no double quote.
    let room = 2048usize.saturating_sub(40 * (VIRTIO_DEVICES + cfg.mounts.len())).min(QEMU_CONFIG_VALUE + 1);
    let given = append.iter().copied().chain(cfg.extra_args.iter().map(String::as_str));
    let used: usize = given.clone().map(|a| a.len() + 1).sum();
    let quoted = given.clone().any(|a| a.contains('"'));
    let first_param = cfg.first_command.as_ref().map(crate::agent::proto::encode_first_exec);
    let first_param = first_param.filter(|p| !quoted && used + p.len() < room);
    if cfg.first_command.is_some() && first_param.is_none() {
        log::debug!("the first command does not fit on the kernel command line: it starts when run");
    }
    append.extend(first_param.as_deref());
    // Last, so that they can override any of the above.
    append.extend(cfg.extra_args.iter().map(String::as_str));
    (append.join(" "), first_param.is_some())
}

/// Refuses kernel parameters that would break the machine: on microvm without ACPI (our
/// own kernel's), QEMU appends its devices' parameters (`virtio_mmio.device=`) after all
/// of ours, so after a `--` they would become init's arguments and the guest would find
/// no devices (no agent port: a boot that times out).
fn check_extra_args(cfg: &BootConfig) -> Result<()> {
    let devices_on_cmdline = cfg.machine == MachineType::Microvm && cfg.kernel.is_minimal();
    if devices_on_cmdline && cfg.extra_args.iter().any(|a| a == "--") {
        return Err(Error::InvalidArgument {
            op: "boot".into(),
            message: "`--` in the kernel parameters (VMHOST_KERNEL_ARGS): QEMU's microvm adds its devices \
                      after them, which would go to init as arguments and leave the guest without devices; \
                      drop the `--` and what follows"
                .into(),
        });
    }
    Ok(())
}

/// QEMU's `-sandbox` option (see `command_line`).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The virtio devices of every VM besides its mounts: the agent's serial port, the
/// network device and the balloon (see [`command_line`]).
const VIRTIO_DEVICES: usize = 3;

/// The longest value a QEMU configuration file (`-readconfig`) takes: 1023 bytes.
const QEMU_CONFIG_VALUE: usize = 1023;

/// QEMU's arguments that give the kernel its command line: `-append` with it, or, when
/// it carries a command (`private`), `-readconfig` with a file in the VM's private run
/// directory that holds it. QEMU's own arguments are readable by every user of the host
/// (`ps`); the file is not.
fn cmdline_args(
    append: String,
    private: bool,
    dir: &Path,
    other_user: bool,
) -> Result<([String; 2], Option<OwnedFd>)> {
    if !private {
        return Ok((["-append".into(), append], None));
    }
    let path = dir.join("cmdline.cfg");
    let text = format!("[machine]\n  append = \"{append}\"\n");
    std::fs::write(&path, text).map_err(|e| Error::io("write the kernel command line", &path, e))?;
    if !other_user {
        return Ok((["-readconfig".into(), path.display().to_string()], None));
    }
    // A QEMU of another user reads it through the descriptor (reopened by
    // /proc/self/fd, which checks the file's mode, not the directory's): 0644 in a
    // directory only we enter.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::io("chmod", &path, e))?;
    let f = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
    let arg = format!("/proc/self/fd/{}", f.as_raw_fd());
    Ok((["-readconfig".into(), arg], Some(f.into())))
}

/// QEMU's arguments, with `cmdline` giving the kernel its command line.
fn command_line(cfg: &BootConfig, cmdline: [String; 2], fds: &QemuFds) -> Vec<String> {
    let minimal = cfg.kernel.is_minimal();
    let (machine, serial_dev, net_dev, balloon_dev) = match cfg.machine {
        MachineType::Microvm if minimal => {
            ("microvm,acpi=off", "virtio-serial-device", "virtio-net-device", "virtio-balloon-device")
        }
        MachineType::Microvm => {
            ("microvm", "virtio-serial-device", "virtio-net-device", "virtio-balloon-device")
        }
        MachineType::Pc => ("pc", "virtio-serial-pci", "virtio-net-pci", "virtio-balloon-pci"),
    };
    let kernel = cfg.kernel_image.as_ref().unwrap_or(&cfg.kernel.vmlinux);
    let cpu = cpu_model(cfg.accel);
    let mut args: Vec<String> = vec![
        "-M".into(),
        machine.into(),
        "-accel".into(),
        accel_option(cfg),
        "-cpu".into(),
        cpu,
        "-m".into(),
        format!("{}M", cfg.memory_mb),
        "-smp".into(),
        cfg.cpus.max(1).to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        // QEMU's seccomp filter, as libvirt sets it: no obsolete system calls, no
        // set*id, no fork or exec, no scheduler or resource changes. A guest that takes
        // QEMU over through a device bug cannot spawn a shell or raise privileges; QEMU
        // is killed on the spot instead.
        "-sandbox".into(),
        SANDBOX.into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        cfg.initramfs.display().to_string(),
        "-chardev".into(),
        format!("socket,id=con,fd={}", fds.fd("console")),
        "-serial".into(),
        "chardev:con".into(),
        // Two ports (0, kept for a console, and the agent's), not the default 31: the
        // guest driver sets up two virtqueues per port, 64 of them by default, which
        // cost ~10 ms of boot under TCG (`initcall_debug`).
        "-device".into(),
        format!("{serial_dev},max_ports=2"),
        "-chardev".into(),
        format!("socket,id=agent,fd={},server=on,wait=off", fds.fd("agent.sock")),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={}", crate::agent::PORT_NAME),
        // wait=on: QEMU accepts us before it sets its monitor up. With wait=off, QEMU 7.2
        // can lose an early client's greeting or commands under load (its main loop
        // accepts while the monitor's I/O thread takes the socket over); we connect at
        // once, so it waits at most one dial interval for us.
        "-chardev".into(),
        format!("socket,id=qmp,fd={},server=on,wait=on", fds.fd("qmp.sock")),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        // The network device and QEMU's user-mode network, each on a socket of its own
        // that net_filter joins when the network is first enabled (slirp behind a hub,
        // IPv6 off); the device's link starts down (see QemuVm::set_network).
        "-netdev".into(),
        format!("stream,id={NET_ID},server=on,addr.type=fd,addr.str={}", fds.fd("guest-net.sock")),
        "-device".into(),
        format!("{net_dev},netdev={NET_ID}"),
        "-netdev".into(),
        "user,id=slirp,ipv6=off".into(),
        "-netdev".into(),
        "hubport,id=slirp-port,hubid=0,netdev=slirp".into(),
        "-netdev".into(),
        format!("stream,id=slirp-net,server=on,addr.type=fd,addr.str={}", fds.fd("slirp.sock")),
        "-netdev".into(),
        "hubport,id=filter-port,hubid=0,netdev=slirp-net".into(),
        // Memory the guest frees goes back to the host (free page reporting: the guest
        // reports free 2 MiB blocks, QEMU discards them), so an idle guest holds what it
        // uses, not all it ever touched (the initramfs it unpacked, boot-time buffers).
        "-device".into(),
        format!("{balloon_dev},free-page-reporting=on"),
    ];
    args.extend(cmdline);
    let ninep = if cfg.machine == MachineType::Pc { "virtio-9p-pci" } else { "virtio-9p-device" };
    for (i, m) in cfg.mounts.iter().enumerate() {
        // In QEMU option values a comma is written twice.
        let path = m.host_path.replace(',', ",,");
        // A writable share keeps what the guest sets (owners, modes with setuid and
        // setgid, symlinks, device nodes) in user.virtfs.* extended attributes: on the
        // host, files and directories the guest makes are plain, owned by the user
        // running vmhost, 0644 and 0755 (see `crate::vm::check_mounts`).
        let model = if m.writable {
            "security_model=mapped-xattr,fmode=0644,dmode=0755"
        } else {
            "security_model=none,readonly=on"
        };
        args.push("-fsdev".into());
        args.push(format!("local,id=fs{i},path={path},{model}"));
        args.push("-device".into());
        args.push(format!("{ninep},fsdev=fs{i},mount_tag={}", m.tag));
    }
    if cfg.accel == Accel::Kvm && cfg.machine == MachineType::Microvm {
        args.push("-global".into());
        args.push("kvm-pit.lost_tick_policy=discard".into());
    }
    args
}

/// The `-accel` option: the accelerator, and under TCG a translation buffer sized for
/// the guest ([`tb_size_mb`]) instead of QEMU's 1 GiB, whose touched part stays in QEMU's
/// memory for as long as the VM runs.
fn accel_option(cfg: &BootConfig) -> String {
    match cfg.accel {
        Accel::Kvm => "kvm".into(),
        Accel::Tcg => format!("tcg,tb-size={}", tb_size_mb(cfg.memory_mb)),
    }
}

/// TCG's translation buffer for a guest of `memory_mb`, in MiB: an eighth of the guest's
/// memory, 16 to 256 MiB (`VMHOST_TB_SIZE` overrides). The boot of vmhost's guest
/// translates ~48,000 blocks, about 12 MiB of host code; a full buffer is flushed and
/// refilled, which costs time, not correctness.
pub fn tb_size_mb(memory_mb: u64) -> u64 {
    if let Some(mb) = std::env::var("VMHOST_TB_SIZE").ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        return mb.max(1);
    }
    (memory_mb / 8).clamp(16, 256)
}

/// The `-cpu` model for `accel`: `VMHOST_CPU` when set, else `host` under KVM and
/// `max,-erms,-fsrm` under TCG.
///
/// Under TCG the guest is told it has no ERMS/FSRM ("fast rep movsb/stosb"): TCG
/// emulates `rep movsb` one byte per iteration, so with them every kernel and glibc
/// memcpy and memset moves a byte at a time; without them they move 8 bytes or a vector
/// at a time. Guest file throughput doubles (BENCHMARKS.md, fs_io: 89 -> 175 MB/s).
pub fn cpu_model(accel: Accel) -> String {
    std::env::var("VMHOST_CPU").ok().filter(|c| !c.is_empty()).unwrap_or_else(|| {
        match accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max,-erms,-fsrm",
        }
        .to_string()
    })
}

/// The last [`QEMU_SAID`] bytes of `path` (QEMU's stderr), empty when it cannot be read.
fn read_tail(path: &Path) -> String {
    use std::io::{Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(QEMU_SAID)));
    let mut buf = Vec::new();
    let _ = f.take(QEMU_SAID).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// How much of QEMU's stderr a boot error quotes.
const QEMU_SAID: u64 = 4096;

/// The guest kernel announced its end on the console. A halted guest (halt, and
/// power-off on a machine without power-off hardware) never ends its VM: the host does,
/// at once, and records why.
fn guest_announced_end(sh: &Arc<Shared>, said: ConsoleEnd) {
    log::info!("{}: the guest kernel announced {said:?}", sh.id);
    // In a stop the host asked for, the guest halting is the stop's doing.
    if !said.host_must_end() || sh.life.state() != VmState::Running {
        return;
    }
    sh.life.set_end_reason(said.end());
    let steps = sh.clone();
    let spawned = thread::Builder::new().name("vmhost-guest-halted".into()).spawn(move || {
        if let Err(e) = steps.life.force_stop(steps.clone()) {
            log::warn!("{}: ending the halted guest's VM: {e}", steps.id);
        }
    });
    if let Err(e) = spawned {
        log::error!("{}: cannot end the halted guest's VM: {e}", sh.id);
    }
}

/// How the VM ended, from whether the host `asked`, QEMU's SHUTDOWN `reason`, what the
/// guest kernel `said` last on its console and QEMU's exit `status`.
fn end_of(
    asked: bool,
    reason: Option<&str>,
    said: Option<ConsoleEnd>,
    status: Option<std::process::ExitStatus>,
) -> VmEnd {
    if asked {
        return VmEnd::Stopped;
    }
    match reason {
        // ACPI power-off (the stock kernel on microvm with ACPI).
        Some("guest-shutdown") => VmEnd::GuestShutdown,
        Some("guest-panic") => VmEnd::GuestPanic,
        // -no-reboot: a reboot, a panic (panic=-1 reboots) and a triple fault all reset.
        Some("guest-reset") => match said {
            Some(ConsoleEnd::Restarting) => VmEnd::GuestReboot,
            Some(ConsoleEnd::Panic) => VmEnd::GuestPanic,
            _ => VmEnd::GuestReset,
        },
        Some("host-signal") => VmEnd::Crashed("QEMU was ended by a signal from outside vmhost".into()),
        Some(other) => VmEnd::Crashed(format!("QEMU shut down unasked ({other})")),
        None => VmEnd::Crashed(match status {
            Some(st) => format!("QEMU exited unexpectedly ({st})"),
            None => "QEMU exited unexpectedly".into(),
        }),
    }
}

/// What QEMU's process gets besides its arguments: the user it runs as (none: ours) and
/// the files it inherits (their `/proc/self/fd` paths are in its arguments).
struct ChildSetup {
    creds: Option<Arc<user::Credentials>>,
    inherited: Vec<OwnedFd>,
}

/// The supervisor thread: starts QEMU, reports back, then waits for it to exit (or
/// for the instance timeout) and records the end.
fn supervise(
    sh: Arc<Shared>,
    qemu: PathBuf,
    args: Vec<String>,
    stderr: File,
    timeout: Option<Duration>,
    child_setup: ChildSetup,
    started: crossbeam_channel::Sender<Result<()>>,
) {
    let mut cmd = Command::new(&qemu);
    cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
    // QEMU takes SIGTERM as a graceful quit: not blocked as our signal thread blocks it.
    unix::clean_signals_in_child(&mut cmd);
    let creds = child_setup.creds.clone();
    if creds.is_some() {
        // Not our working directory, which QEMU's user may not reach.
        cmd.current_dir("/");
    }
    let inherited: Vec<i32> = child_setup.inherited.iter().map(|f| f.as_raw_fd()).collect();
    let parent = std::process::id();
    // SAFETY: fcntl, setgroups, setresgid, setresuid and prctl are async-signal-safe and
    // touch only memory allocated before the fork. This thread lives until QEMU exits,
    // so the parent-death signal fires only when our whole process dies.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherited {
                if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(c) = &creds {
                c.assume()?;
            }
            // No privileges from any exec after this one (QEMU's sandbox sets it too).
            if nix::libc::prctl(nix::libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // After the change of user, which clears the parent-death signal; a parent
            // that died before it was set is seen here instead.
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if nix::libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("vmhost ended while QEMU started"));
            }
            // No transparent huge pages for QEMU (kept across exec): with them, each
            // byte the guest touches makes 2 MiB of its memory resident, and each
            // translation region is resident whole (an idle 128 MiB guest: 34 MiB of
            // its memory, 16 MiB of translation buffer); and free page reporting
            // could give back only whole 2 MiB blocks the guest left untouched.
            if nix::libc::prctl(nix::libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = started.send(Err(Error::io("start QEMU", &qemu, e)));
            return;
        }
    };
    // QEMU has its copies; the uid stays taken until it exits.
    drop(child_setup.inherited);
    let _uid_held = child_setup.creds;
    let pid = child.id() as i32;
    let process = Arc::new(VmProcess::new(child));
    let _ = sh.process.set(process.clone());
    let _ = started.send(Ok(()));
    // SAFETY: pidfd_open returns a new descriptor we own, or -1.
    let pidfd = unsafe {
        let fd = nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) as i32;
        (fd >= 0).then(|| OwnedFd::from_raw_fd(fd))
    };
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut timed_out = false;
    loop {
        if process.has_exited() {
            break;
        }
        let wait = match deadline {
            Some(d) if !timed_out => d.saturating_duration_since(Instant::now()),
            _ => Duration::from_secs(3600),
        };
        if deadline.is_some() && !timed_out && wait.is_zero() {
            timed_out = true;
            log::warn!("{}: instance timeout reached; stopping it", sh.id);
            sh.life.set_end_reason(VmEnd::Timeout(timeout.unwrap_or_default()));
            let steps = sh.clone();
            thread::spawn(move || {
                steps.life.set(VmState::Stopping);
                let _ = stop::escalate(steps, Duration::from_secs(2));
            });
            continue;
        }
        match &pidfd {
            Some(fd) => {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                let ms = wait.as_millis().min(i32::MAX as u128) as i32;
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX));
            }
            None => thread::sleep(wait.min(Duration::from_millis(50))),
        }
    }
    match process.exit_status() {
        Some(st) => log::info!("{}: QEMU exited ({st})", sh.id),
        None => log::info!("{}: QEMU exited", sh.id),
    }
    // Nothing of the run directory is needed once QEMU is gone (the console tail is in
    // memory): remove it now, not when the last handle drops, which a process that
    // exits right after its VM never gets to.
    // Done before the state turns final: a caller waiting for that may exit at once.
    *sh.qemu_said.lock() = read_tail(&sh.dir.0.join("qemu.log"));
    let _ = std::fs::remove_dir_all(&sh.dir.0);
    // QEMU's last event (SHUTDOWN) may still be on its way through the QMP reader.
    if let Some(q) = sh.qmp.get() {
        let until = Instant::now() + Duration::from_millis(500);
        while q.is_connected() && Instant::now() < until {
            thread::sleep(Duration::from_millis(2));
        }
    }
    let asked = matches!(sh.life.state(), VmState::Stopping);
    let reason = sh.shutdown_reason.lock().clone();
    sh.life.set_end_reason(end_of(asked, reason.as_deref(), sh.console.last_end(), process.exit_status()));
    if let Some(a) = sh.agent.get() {
        a.close();
    }
    if let Some(q) = sh.qmp.get() {
        q.close();
    }
    sh.net_filter.lock().take();
    sh.life.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mounts: usize, extra: &str, args: &str) -> BootConfig {
        let kernel = Kernel {
            vmlinux: "/nonexistent/vmlinux".into(),
            modules: Vec::new(),
            origin: "test".into(),
            kind: crate::image::kernel::KernelKind::Minimal,
        };
        BootConfig {
            memory_mb: 256,
            cpus: 1,
            kernel,
            kernel_image: None,
            initramfs: "/nonexistent/initramfs".into(),
            dmesg: false,
            timeout: None,
            boot_timeout: Duration::from_secs(1),
            machine: MachineType::Microvm,
            accel: Accel::Tcg,
            mounts: (0..mounts)
                .map(|i| crate::wire::MountConfig {
                    tag: format!("t{i}"),
                    host_path: "/".into(),
                    writable: true,
                })
                .collect(),
            extra_args: extra.split_whitespace().map(String::from).collect(),
            host_loopback: false,
            first_command: Some(ExecRequest {
                program: "sh".into(),
                args: vec![args.into()],
                ..Default::default()
            }),
            qemu_user: QemuUser::Same,
        }
    }

    #[test]
    fn the_first_command_goes_on_the_kernel_command_line_only_where_it_fits() {
        // QEMU's microvm adds " virtio_mmio.device=512@0xfeb00e00:12" per device.
        let added = " virtio_mmio.device=512@0xfeb00e00:12".len();
        let (mut carried, mut left) = (0, 0);
        for (mounts, cpus) in [0, 1, 5, 20, 30, 60].into_iter().flat_map(|m| [(m, 1), (m, 2)]) {
            for extra in ["", "a=b c=d", &"x=y ".repeat(100)] {
                for len in [0, 50, 200, 400, 800] {
                    let mut cfg = config(mounts, extra, &"a".repeat(len));
                    cfg.cpus = cpus;
                    let (line, private) = kernel_cmdline(&cfg);
                    assert_eq!(private, line.contains("VMHOST_EXEC="), "{line}");
                    if private {
                        carried += 1;
                        assert!(line.len() + added * (3 + mounts) < 2048, "{mounts} mounts: {line}");
                        assert!(line.len() <= QEMU_CONFIG_VALUE, "{line}");
                    } else {
                        left += 1;
                    }
                    // The user's parameters stay last, so that they can override.
                    assert!(line.ends_with(extra.trim_end()), "{line}");
                }
            }
        }
        assert!(carried > 0 && left > 0, "{carried} carried, {left} left out");
        // `--` would hand microvm's devices to init.
        let e = check_extra_args(&config(0, "quiet -- a", "")).unwrap_err().to_string();
        assert!(e.contains("VMHOST_KERNEL_ARGS") && e.contains("drop the `--`"), "{e}");
        assert!(check_extra_args(&config(0, "quiet a=--", "")).is_ok());
        // A double quote cannot go in QEMU's configuration file.
        assert!(!kernel_cmdline(&config(0, "a=\"b\"", "")).1);
        assert!(kernel_cmdline(&config(0, "", "")).1);
    }

    #[test]
    fn our_kernel_warms_the_agent_up_only_with_a_second_vcpu() {
        let line = |cpus, kind| {
            let mut cfg = config(0, "", "");
            cfg.cpus = cpus;
            cfg.kernel.kind = kind;
            kernel_cmdline(&cfg).0.split(' ').any(|a| a == WARM_UP_ARG)
        };
        use crate::image::kernel::KernelKind::{Minimal, Stock};
        assert!(line(2, Minimal) && line(4, Minimal));
        assert!(!line(1, Minimal));
        // A stock kernel has no such parameter (kernel/patches/ are ours).
        assert!(!line(2, Stock));
    }
}
