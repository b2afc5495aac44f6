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
//!
//! Files: [`config`] (what a VM is booted with), `cmdline` (QEMU's and the kernel's command
//! lines, and the descriptors QEMU gets), `supervisor` (the thread that runs QEMU and
//! records its end), [`clock`] (the guest's TSC rate), [`user`] (who QEMU runs as),
//! [`net_filter`] (the guest's network, host loopback filtered); this file: the running VM.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};

use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use super::agent_link::AgentLink;
use super::console::ConsoleEnd;
use super::console::ConsoleLog;
use super::lifecycle::Lifecycle;
use super::run_dir::RunDir;
use super::stop::{self, StopSteps, VmProcess};
use super::{VmEnd, VmState};

use crate::error::{Error, Result};

use crate::qmp;
use crate::unix;

pub mod clock;
mod cmdline;
pub mod config;
pub mod net_filter;
mod supervisor;
pub mod user;

use cmdline::{check_extra_args, cmdline_args, command_line, kernel_cmdline, QemuFds, NET_ID};
pub use cmdline::{cpu_model, tb_size_mb, SANDBOX};
pub use config::{qemu_binary, Accel, BootConfig, MachineType};
use supervisor::{read_tail, supervise, ChildSetup};
pub use user::QemuUser;

pub(super) struct Shared {
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
    /// Held through a network change (calls from several threads take turns); whether
    /// the guest has configured eth0 (NetworkUp answered), which a disconnect undoes.
    net_state: parking_lot::Mutex<bool>,
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
            let mut files = vec![("kernel", kernel), ("initramfs", cfg.initramfs.clone())];
            files.extend(cfg.root_disk.clone().map(|d| ("root disk", d)));
            for (what, path) in files {
                c.check_readable(what, &path)?;
                let f = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
                let fd = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
                match what {
                    "kernel" => cfg.kernel_image = Some(fd),
                    "initramfs" => cfg.initramfs = fd,
                    _ => cfg.root_disk = Some(fd),
                }
                inherited.push(f.into());
            }
        }
        let dir = RunDir::new()?;
        let fds = QemuFds::new(&dir.0)?;
        // The overlay's writable disk: made empty here, gone with the run directory.
        let rw_disk = match (cfg.rw_disk_mb, &cfg.root_disk) {
            (Some(mb), Some(_)) => {
                let (path, file) = make_rw_disk(&dir.0, mb, creds.is_some())?;
                inherited.extend(file);
                Some(path)
            }
            _ => None,
        };
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
            net_state: parking_lot::Mutex::new(false),
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
        let args = command_line(&cfg, cmdline, &fds, rw_disk.as_deref());
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
        let mut configured = self.shared.net_state.lock();
        if up {
            // The guest configures eth0 only when asked: boots without network skip it.
            self.agent()?.network_up(Duration::from_secs(20))?;
            *configured = true;
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
        .map_err(Error::Qmp)?;
        if !up && *configured {
            // The link carries nothing now; with eth0 down too a guest program's
            // connection fails at once (network unreachable) instead of hanging. The
            // link went first: nothing leaves the guest meanwhile, whatever happens here.
            match self.agent().and_then(|a| a.network_down(Duration::from_secs(20))) {
                Ok(()) => *configured = false,
                Err(e) => log::warn!("the network is off, but eth0 stays up in the guest: {e}"),
            }
        }
        Ok(())
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

/// Makes the overlay's writable disk: a sparse file of `mb` MiB in the run directory,
/// formatted ext4 (root's, 0755 at the top, as the overlay wants its upper directory).
/// For a QEMU of another user it goes as `/proc/self/fd/N` (the file is 0666 in a
/// directory only vmhost enters), with the descriptor QEMU keeps.
fn make_rw_disk(dir: &Path, mb: u64, other_user: bool) -> Result<(PathBuf, Option<OwnedFd>)> {
    let path = dir.join("rw.ext4");
    let f = File::create(&path).map_err(|e| Error::io("create the writable disk", &path, e))?;
    f.set_len(mb << 20).map_err(|e| Error::io("size the writable disk", &path, e))?;
    drop(f);
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0"])
        .arg(&path)
        .output()
        .map_err(|e| Error::io("run mkfs.ext4 (apt-get install e2fsprogs)", "mkfs.ext4", e))?;
    if !out.status.success() {
        return Err(Error::Vm {
            op: "boot".into(),
            message: format!(
                "mkfs.ext4 of the writable disk failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    if !other_user {
        return Ok((path, None));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| Error::io("chmod", &path, e))?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    Ok((PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())), Some(f.into())))
}
