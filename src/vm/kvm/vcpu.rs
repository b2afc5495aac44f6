//! vCPU threads: one per vCPU, each running `KVM_RUN` in a loop and routing its exits
//! to the buses.
//!
//! A vCPU is controlled over a crossbeam channel: [`Vcpu::pause`], [`Vcpu::resume`],
//! [`Vcpu::request_stop`]. A command reaches a vCPU that is inside the guest by a kick:
//! a signal ([`kick_signal`]) whose handler sets the thread's `kvm_run.immediate_exit`,
//! so `KVM_RUN` returns at once (also when the signal lands just before it is entered)
//! and the loop reads its commands. What ends or parks a vCPU (HLT without an in-kernel
//! irqchip, a shutdown such as a triple fault, a failed entry, an emulation failure) is
//! reported as its [`VcpuState`], which [`Vcpu::wait_for`] waits on.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use parking_lot::{Condvar, Mutex};

use super::bus::Bus;
use super::{kvm_err, Error, Result};

/// The signal that kicks a vCPU thread out of the guest (`SIGRTMIN + 1`; Firecracker
/// uses a real-time signal the same way).
pub fn kick_signal() -> i32 {
    nix::libc::SIGRTMIN() + 1
}

thread_local! {
    /// This thread's `kvm_run`, for the kick handler; null outside vCPU threads.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: nix::libc::c_int, _: *mut nix::libc::siginfo_t, _: *mut nix::libc::c_void) {
    // Async-signal-safe: a const-initialised thread-local and one byte store.
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: set by this thread's vCPU loop while its VcpuFd (which owns the
            // mapping) lives, cleared before it is dropped.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

fn install_kick_handler() -> Result<()> {
    static INSTALLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *INSTALLED.get_or_init(|| {
        // SAFETY: installs a handler that only touches this thread's kvm_run; zeroed
        // sigaction fields are valid defaults.
        unsafe {
            let mut sa: nix::libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = nix::libc::SA_SIGINFO;
            nix::libc::sigemptyset(&mut sa.sa_mask);
            nix::libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) == 0
        }
    });
    if !ok {
        return Err(Error::Vcpu { id: 0, message: "cannot install the vCPU kick signal handler".into() });
    }
    Ok(())
}

/// How a vCPU starts: its registers.
#[derive(Clone)]
pub struct VcpuSetup {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers: applied over the vCPU's reset state by the function.
    pub sregs: Arc<dyn Fn(&mut kvm_sregs) + Send + Sync>,
}

impl std::fmt::Debug for VcpuSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuSetup").finish_non_exhaustive()
    }
}

impl VcpuSetup {
    /// Real mode at `cs:ip` (the segment's base is `cs << 4`), interrupts off.
    pub fn real_mode(cs: u16, ip: u16) -> VcpuSetup {
        let regs = kvm_regs { rip: ip as u64, rflags: 0x2, ..Default::default() };
        VcpuSetup {
            regs,
            sregs: Arc::new(move |s: &mut kvm_sregs| {
                s.cs.base = (cs as u64) << 4;
                s.cs.selector = cs;
            }),
        }
    }
}

/// What a vCPU is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuState {
    /// In its run loop.
    Running,
    /// Parked by [`Vcpu::pause`].
    Paused,
    /// Parked after the guest executed HLT (resume continues after it).
    Halted,
    /// The guest shut down or reset (a triple fault, or a reset request).
    Shutdown,
    /// Stopped by [`Vcpu::request_stop`].
    Stopped,
    /// The guest could not be run further: why.
    Failed(String),
}

impl VcpuState {
    /// Whether the thread has ended.
    pub fn is_final(&self) -> bool {
        matches!(self, VcpuState::Shutdown | VcpuState::Stopped | VcpuState::Failed(_))
    }
}

enum Command {
    Pause,
    Resume,
    Stop,
}

struct Shared {
    state: Mutex<VcpuState>,
    changed: Condvar,
}

impl Shared {
    fn set(&self, id: u8, state: VcpuState) {
        log::debug!("vCPU {id}: {state:?}");
        *self.state.lock() = state;
        self.changed.notify_all();
    }
}

/// A vCPU and its thread.
pub struct Vcpu {
    id: u8,
    tx: Sender<Command>,
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// std's handle type for the thread (an integer on every libc, which keeps `Vcpu`
    /// `Send` where the libc crate's `pthread_t` is a pointer, as on musl).
    pthread: std::os::unix::thread::RawPthread,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").finish_non_exhaustive()
    }
}

impl Vcpu {
    /// Sets the registers and starts the thread.
    pub(super) fn start(
        id: u8,
        fd: VcpuFd,
        setup: VcpuSetup,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        paused: bool,
        ended: Sender<u8>,
    ) -> Result<Vcpu> {
        install_kick_handler()?;
        let mut sregs = fd.get_sregs().map_err(kvm_err(format!("vCPU {id}: get sregs")))?;
        (setup.sregs)(&mut sregs);
        fd.set_sregs(&sregs).map_err(kvm_err(format!("vCPU {id}: set sregs")))?;
        fd.set_regs(&setup.regs).map_err(kvm_err(format!("vCPU {id}: set regs")))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let initial = if paused { VcpuState::Paused } else { VcpuState::Running };
        let shared = Arc::new(Shared { state: Mutex::new(initial), changed: Condvar::new() });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vmhost-vcpu{id}"))
            .spawn(move || {
                // Reports the end however the thread ends, a device model's panic too.
                struct Ended(Sender<u8>, u8);
                impl Drop for Ended {
                    fn drop(&mut self) {
                        let _ = self.0.try_send(self.1);
                    }
                }
                let _ended = Ended(ended, id);
                // Device models run on this thread: confined before the guest runs.
                if let Err(e) = super::seccomp::confine_thread() {
                    *sh.state.lock() = VcpuState::Failed(e.to_string());
                    sh.changed.notify_all();
                    return;
                }
                run_loop(id, fd, rx, &sh, &pio, &mmio, paused);
            })
            .map_err(|e| Error::Vcpu { id, message: format!("start its thread: {e}") })?;
        let pthread = thread.as_pthread_t();
        Ok(Vcpu { id, tx, shared, thread: Mutex::new(Some(thread)), pthread })
    }

    /// Its index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Its state now.
    pub fn state(&self) -> VcpuState {
        self.shared.state.lock().clone()
    }

    fn kick(&self) {
        if self.thread.lock().is_some() {
            // SAFETY: the thread has not been joined, so its pthread_t is valid.
            unsafe { nix::libc::pthread_kill(self.pthread as nix::libc::pthread_t, kick_signal()) };
        }
    }

    fn send(&self, c: Command) {
        let _ = self.tx.send(c);
        self.kick();
    }

    /// Waits (at most `timeout`) until `want` says yes of the state; returns the state.
    pub fn wait_for(&self, timeout: Duration, want: impl Fn(&VcpuState) -> bool) -> VcpuState {
        let until = std::time::Instant::now() + timeout;
        let mut st = self.shared.state.lock();
        while !want(&st) && std::time::Instant::now() < until {
            self.shared.changed.wait_until(&mut st, until);
        }
        st.clone()
    }

    /// Takes it out of the guest and parks it; returns once it is parked (or ended).
    pub fn pause(&self) -> VcpuState {
        self.send(Command::Pause);
        self.wait_for(Duration::from_secs(10), |s| !matches!(s, VcpuState::Running))
    }

    /// Lets a paused or halted vCPU run again.
    pub fn resume(&self) {
        self.send(Command::Resume);
    }

    /// Asks it to stop (kicking it out of the guest); see [`Vcpu::join`].
    pub fn request_stop(&self) {
        self.send(Command::Stop);
    }

    /// Waits for the thread to end.
    pub fn join(self) {
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

fn describe(fd: &VcpuFd, what: &str) -> String {
    match fd.get_regs() {
        Ok(r) => format!("{what} at rip {:#x}", r.rip),
        Err(_) => what.to_string(),
    }
}

fn run_loop(
    id: u8,
    mut fd: VcpuFd,
    rx: Receiver<Command>,
    sh: &Shared,
    pio: &Bus,
    mmio: &Bus,
    mut parked: bool,
) {
    KVM_RUN.with(|p| p.set(fd.get_kvm_run() as *mut kvm_run));
    let end = |state: VcpuState, fd: VcpuFd| {
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        drop(fd);
        sh.set(id, state);
    };
    loop {
        // Commands: all that are queued, and while parked, wait for one.
        loop {
            let cmd = if parked {
                rx.recv().unwrap_or(Command::Stop)
            } else {
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => Command::Stop,
                }
            };
            match cmd {
                Command::Pause => {
                    parked = true;
                    sh.set(id, VcpuState::Paused);
                }
                Command::Resume => {
                    parked = false;
                    sh.set(id, VcpuState::Running);
                }
                Command::Stop => return end(VcpuState::Stopped, fd),
            }
        }
        let exit = fd.run();
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(port as u64, data);
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(port as u64, data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                parked = true;
                sh.set(id, VcpuState::Halted);
            }
            Ok(VcpuExit::Shutdown) => return end(VcpuState::Shutdown, fd),
            Ok(VcpuExit::SystemEvent(ty, _)) => {
                log::info!("vCPU {id}: system event {ty}");
                return end(VcpuState::Shutdown, fd);
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                let why = describe(&fd, &format!("entry failed (hardware reason {reason:#x}, cpu {cpu})"));
                return end(VcpuState::Failed(why), fd);
            }
            Ok(VcpuExit::InternalError) => {
                let why = describe(&fd, "KVM internal error (an instruction it could not emulate)");
                return end(VcpuState::Failed(why), fd);
            }
            Ok(other) => {
                let what = format!("unhandled exit {other:?}");
                let why = describe(&fd, &what);
                return end(VcpuState::Failed(why), fd);
            }
            Err(e) if e.errno() == nix::libc::EINTR || e.errno() == nix::libc::EAGAIN => {
                // Kicked: commands are read at the top of the loop.
                fd.set_kvm_immediate_exit(0);
            }
            Err(e) => return end(VcpuState::Failed(format!("KVM_RUN: {e}")), fd),
        }
    }
}
