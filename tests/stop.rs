//! The stop escalation, with agent and ACPI steps that can be made to work, do nothing,
//! fail or hang, and a real process for the SIGTERM and SIGKILL steps.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmhost::vm::stop::{self, StepOutcome, StopStep, StopSteps, VmProcess};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behaviour {
    /// The request works and the VM exits.
    Works,
    /// The request is accepted, but nothing happens.
    Ignored,
    /// The request fails.
    Fails,
    /// The request never returns.
    Hangs,
}

struct Steps {
    vm: VmProcess,
    agent: Behaviour,
    acpi: Behaviour,
}

impl Steps {
    fn act(&self, b: Behaviour, what: &str) -> vmhost::Result<()> {
        match b {
            Behaviour::Works => self.vm.kill(), // the guest powers off: the VM process ends
            Behaviour::Ignored => Ok(()),
            Behaviour::Fails => {
                Err(vmhost::Error::Vm { op: what.into(), message: "agent not reachable".into() })
            }
            Behaviour::Hangs => {
                std::thread::sleep(Duration::from_secs(3600));
                Ok(())
            }
        }
    }
}

impl StopSteps for Steps {
    fn agent_shutdown(&self) -> vmhost::Result<()> {
        self.act(self.agent, "agent shutdown")
    }
    fn acpi_powerdown(&self) -> vmhost::Result<()> {
        self.act(self.acpi, "acpi powerdown")
    }
    fn terminate(&self) -> vmhost::Result<()> {
        self.vm.terminate()
    }
    fn kill(&self) -> vmhost::Result<()> {
        self.vm.kill()
    }
    fn wait_exit(&self, timeout: Duration) -> bool {
        self.vm.wait_exit(timeout)
    }
}

/// A stand-in VM process; `ignore_term` makes it survive SIGTERM.
fn vm_process(ignore_term: bool) -> VmProcess {
    use std::io::BufRead;
    let script =
        if ignore_term { "trap '' TERM; echo ready; exec sleep 600" } else { "echo ready; exec sleep 600" };
    let mut child =
        Command::new("sh").args(["-c", script]).stdin(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap();
    // Signal it only once the trap is in place.
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    VmProcess::new(child)
}

fn run(agent: Behaviour, acpi: Behaviour, ignore_term: bool) -> (Vec<(StopStep, StepOutcome)>, bool) {
    let steps = Arc::new(Steps { vm: vm_process(ignore_term), agent, acpi });
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let report = stop::escalate(steps.clone(), timeout).expect("the VM stops");
    // Hang guard: four steps of 300 ms and a 1 s grace, with slack for thread start.
    assert!(start.elapsed() < Duration::from_secs(10), "escalation took {:?}", start.elapsed());
    let exited = steps.vm.wait_exit(Duration::ZERO);
    (report.steps, exited)
}

#[test]
fn agent_shutdown_is_enough() {
    let (steps, exited) = run(Behaviour::Works, Behaviour::Fails, false);
    assert!(exited);
    assert_eq!(steps, vec![(StopStep::Agent, StepOutcome::Exited)]);
}

#[test]
fn ignored_agent_then_acpi() {
    let (steps, exited) = run(Behaviour::Ignored, Behaviour::Works, false);
    assert!(exited);
    assert_eq!(
        steps,
        vec![(StopStep::Agent, StepOutcome::StillRunning), (StopStep::Acpi, StepOutcome::Exited)]
    );
}

#[test]
fn failed_agent_jumps_to_sigterm() {
    let (steps, exited) = run(Behaviour::Fails, Behaviour::Works, false);
    assert!(exited);
    assert!(
        matches!(steps[0], (StopStep::Agent, StepOutcome::Failed(ref m)) if m.contains("agent not reachable"))
    );
    assert_eq!(steps[1..], [(StopStep::Term, StepOutcome::Exited)]);
}

#[test]
fn hung_agent_is_abandoned_and_jumps_to_sigterm() {
    let (steps, exited) = run(Behaviour::Hangs, Behaviour::Works, false);
    assert!(exited);
    assert_eq!(steps, vec![(StopStep::Agent, StepOutcome::Hung), (StopStep::Term, StepOutcome::Exited)]);
}

#[test]
fn hung_acpi_jumps_to_sigterm() {
    let (steps, exited) = run(Behaviour::Ignored, Behaviour::Hangs, false);
    assert!(exited);
    assert_eq!(
        steps,
        vec![
            (StopStep::Agent, StepOutcome::StillRunning),
            (StopStep::Acpi, StepOutcome::Hung),
            (StopStep::Term, StepOutcome::Exited)
        ]
    );
}

#[test]
fn process_ignoring_sigterm_gets_sigkill() {
    let (steps, exited) = run(Behaviour::Ignored, Behaviour::Ignored, true);
    assert!(exited);
    assert_eq!(
        steps,
        vec![
            (StopStep::Agent, StepOutcome::StillRunning),
            (StopStep::Acpi, StepOutcome::StillRunning),
            (StopStep::Term, StepOutcome::StillRunning),
            (StopStep::Kill, StepOutcome::Exited),
        ]
    );
}

#[test]
fn force_stop_is_term_then_kill() {
    let steps = Arc::new(Steps { vm: vm_process(true), agent: Behaviour::Works, acpi: Behaviour::Works });
    let report = stop::force_stop(steps.clone(), Duration::from_millis(300)).unwrap();
    assert_eq!(
        report.steps,
        vec![(StopStep::Term, StepOutcome::StillRunning), (StopStep::Kill, StepOutcome::Exited)]
    );
    assert_eq!(report.stopped_by(), Some(StopStep::Kill));
}

#[test]
fn already_stopped_vm_needs_no_step() {
    let steps = Arc::new(Steps { vm: vm_process(false), agent: Behaviour::Hangs, acpi: Behaviour::Hangs });
    steps.vm.kill().unwrap();
    assert!(steps.vm.wait_exit(Duration::from_secs(10)));
    let report = stop::escalate(steps, Duration::from_millis(300)).unwrap();
    assert!(report.steps.is_empty());
}
