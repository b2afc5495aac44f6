//! The stop escalation, written once for every backend.
//!
//! 1. Ask the guest agent to shut down (the guest syncs and powers off); wait.
//! 2. If the VM is still running, press the ACPI power button; wait.
//! 3. SIGTERM to the VM process; wait 1 s; SIGKILL; wait.
//!
//! Every step, and every wait, is bounded by the timeout: a step that hangs is abandoned
//! on its own thread and counts as failed. A step that fails jumps straight to step 3.

use std::fmt;
use std::process::Child;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// How long the VM process gets between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(1);

/// The primitive actions a backend offers to stop its VM.
///
/// The request steps return once the request is made; [`StopSteps::wait_exit`] tells
/// whether it worked.
pub trait StopSteps: Send + Sync + 'static {
    /// Asks the guest agent to sync and power off.
    fn agent_shutdown(&self) -> Result<()>;
    /// Presses the ACPI power button (QMP `system_powerdown`, or the KVM backend's
    /// equivalent).
    fn acpi_powerdown(&self) -> Result<()>;
    /// Sends SIGTERM to the VM process.
    fn terminate(&self) -> Result<()>;
    /// Sends SIGKILL to the VM process.
    fn kill(&self) -> Result<()>;
    /// Waits up to `timeout` for the VM to exit; true once it has.
    fn wait_exit(&self, timeout: Duration) -> bool;
}

/// The agent step of [`StopSteps`] for a backend whose guest runs vmhost's agent: asks
/// it to sync and power off. Made, not awaited: an unresponsive agent shows in the wait
/// that follows.
pub fn ask_agent_to_power_off(agent: Option<&crate::vm::agent_link::AgentLink>) -> Result<()> {
    let agent = agent.ok_or_else(|| Error::Vm { op: "stop".into(), message: "no agent".into() })?;
    if !agent.is_alive() {
        return Err(Error::Vm { op: "stop".into(), message: "the agent channel is down".into() });
    }
    let a = agent.clone();
    thread::spawn(move || {
        let _ = a.shutdown(Duration::from_secs(30));
    });
    Ok(())
}

/// One step of the escalation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopStep {
    /// Agent shutdown.
    Agent,
    /// ACPI power-down.
    Acpi,
    /// SIGTERM.
    Term,
    /// SIGKILL.
    Kill,
}

/// What a step came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// The VM exited after it.
    Exited,
    /// The request was made, but the VM was still running when the wait ended.
    StillRunning,
    /// The request failed.
    Failed(String),
    /// The request did not return within the timeout.
    Hung,
}

/// The record of one escalation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    /// Every step tried, in order, with its outcome.
    pub steps: Vec<(StopStep, StepOutcome)>,
}

impl StopReport {
    /// The step after which the VM exited, if it did.
    pub fn stopped_by(&self) -> Option<StopStep> {
        self.steps.iter().find(|(_, o)| *o == StepOutcome::Exited).map(|(s, _)| *s)
    }
}

impl fmt::Display for StopReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (step, outcome)) in self.steps.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{step:?}: {outcome:?}")?;
        }
        Ok(())
    }
}

/// Runs `f` on its own thread and gives up waiting after `timeout` (the thread is left
/// to finish, or not, on its own). `None` means it hung.
fn bounded<T: Send + 'static>(timeout: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let spawned = thread::Builder::new().name("vmhost-stop-step".into()).spawn(move || {
        let _ = tx.send(f());
    });
    match spawned {
        Ok(_) => rx.recv_timeout(timeout).ok(),
        Err(e) => {
            log::error!("cannot start a stop-step thread: {e}");
            None
        }
    }
}

/// Runs one request step and the wait after it.
fn attempt(
    steps: &Arc<dyn StopSteps>,
    step: StopStep,
    timeout: Duration,
    wait: Duration,
    report: &mut StopReport,
) -> StepOutcome {
    let s = steps.clone();
    let requested = bounded(timeout, move || match step {
        StopStep::Agent => s.agent_shutdown(),
        StopStep::Acpi => s.acpi_powerdown(),
        StopStep::Term => s.terminate(),
        StopStep::Kill => s.kill(),
    });
    let outcome = match requested {
        None => StepOutcome::Hung,
        Some(Err(e)) => StepOutcome::Failed(e.to_string()),
        Some(Ok(())) => {
            let s = steps.clone();
            // The wait is bounded too, with a little slack for the thread itself.
            match bounded(wait.saturating_add(Duration::from_millis(500)), move || s.wait_exit(wait)) {
                Some(true) => StepOutcome::Exited,
                _ => StepOutcome::StillRunning,
            }
        }
    };
    log::info!("stop step {step:?}: {outcome:?}");
    report.steps.push((step, outcome.clone()));
    outcome
}

/// Stops a VM: agent, then ACPI, then SIGTERM, 1 s, SIGKILL, each step bounded by
/// `timeout`. Returns the report once the VM has exited, or an error carrying the
/// report if even SIGKILL did not end it.
pub fn escalate(steps: Arc<dyn StopSteps>, timeout: Duration) -> Result<StopReport> {
    let mut report = StopReport { steps: Vec::new() };
    if steps.wait_exit(Duration::ZERO) {
        return Ok(report);
    }
    let mut graceful = true;
    for step in [StopStep::Agent, StopStep::Acpi] {
        match attempt(&steps, step, timeout, timeout, &mut report) {
            StepOutcome::Exited => return Ok(report),
            StepOutcome::StillRunning => continue,
            StepOutcome::Failed(_) | StepOutcome::Hung => {
                graceful = false;
                break;
            }
        }
    }
    if !graceful {
        log::info!("a graceful stop step failed; going straight to SIGTERM");
    }
    force(steps, timeout, report)
}

/// The last step alone: SIGTERM, 1 s, SIGKILL (what `force_stop` runs).
pub fn force_stop(steps: Arc<dyn StopSteps>, timeout: Duration) -> Result<StopReport> {
    force(steps, timeout, StopReport { steps: Vec::new() })
}

fn force(steps: Arc<dyn StopSteps>, timeout: Duration, mut report: StopReport) -> Result<StopReport> {
    if attempt(&steps, StopStep::Term, timeout, TERM_GRACE, &mut report) == StepOutcome::Exited {
        return Ok(report);
    }
    if attempt(&steps, StopStep::Kill, timeout, timeout, &mut report) == StepOutcome::Exited {
        return Ok(report);
    }
    Err(Error::Vm { op: "stop".into(), message: format!("the VM is still running after SIGKILL ({report})") })
}

/// A VM process we started, for the Term and Kill steps: signals it and reaps it.
#[derive(Debug)]
pub struct VmProcess {
    child: Mutex<Child>,
    pid: Pid,
    status: Mutex<Option<std::process::ExitStatus>>,
}

impl VmProcess {
    /// Wraps a started child process.
    pub fn new(child: Child) -> VmProcess {
        let pid = Pid::from_raw(child.id() as i32);
        VmProcess { child: Mutex::new(child), pid, status: Mutex::new(None) }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    fn signal(&self, sig: Signal) -> Result<()> {
        // Checked and sent under the lock: once reaped, the pid may belong to another
        // process, so no one may reap between the check and the signal.
        let mut child = self.child.lock();
        if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            return Ok(());
        }
        signal::kill(self.pid, sig).map_err(|e| Error::Vm {
            op: format!("{sig:?}"),
            message: format!("cannot signal VM process {}: {e}", self.pid),
        })
    }

    /// Sends SIGTERM (nothing if it has exited).
    pub fn terminate(&self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Sends SIGKILL (nothing if it has exited).
    pub fn kill(&self) -> Result<()> {
        self.signal(Signal::SIGKILL)
    }

    /// Whether it has exited (and is reaped).
    pub fn has_exited(&self) -> bool {
        match self.child.lock().try_wait() {
            Ok(Some(st)) => {
                self.status.lock().get_or_insert(st);
                true
            }
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// How it exited, once it has.
    pub fn exit_status(&self) -> Option<std::process::ExitStatus> {
        *self.status.lock()
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.has_exited() {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}
