//! A VM's lifecycle as every backend tracks it: the state, who waits for it to change,
//! and why the VM ended.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::agent_link::AgentLink;
use super::stop::{self, StopSteps};
use super::{VmEnd, VmState};
use crate::error::{Error, Result};

/// The state of one VM, shared by its supervisor, its stop steps and its users.
pub(crate) struct Lifecycle {
    state: Mutex<VmState>,
    changed: Condvar,
    /// How the VM ended, once it has (or once an end was decided, e.g. a timeout).
    ended: Mutex<Option<VmEnd>>,
}

impl Lifecycle {
    pub(crate) fn new() -> Lifecycle {
        Lifecycle { state: Mutex::new(VmState::Created), changed: Condvar::new(), ended: Mutex::new(None) }
    }

    pub(crate) fn state(&self) -> VmState {
        *self.state.lock()
    }

    /// Moves to `s`, unless the VM has already ended.
    pub(crate) fn set(&self, s: VmState) {
        let mut st = self.state.lock();
        if !st.is_final() {
            *st = s;
        }
        self.changed.notify_all();
    }

    /// Records how the VM ends, unless an end is already recorded (the first cause
    /// wins: a timeout over the stop it starts, a guest halt over the SIGTERM that ends it).
    pub(crate) fn set_end_reason(&self, why: VmEnd) {
        self.ended.lock().get_or_insert(why);
    }

    /// How the VM ended (or is ending), once known.
    pub(crate) fn end(&self) -> Option<VmEnd> {
        self.ended.lock().clone()
    }

    /// The VM has ended: Stopped, or Error when the recorded end is a failure.
    pub(crate) fn finish(&self) {
        let mut st = self.state.lock();
        *st = if self.ended.lock().as_ref().is_some_and(VmEnd::is_error) {
            VmState::Error
        } else {
            VmState::Stopped
        };
        self.changed.notify_all();
    }

    /// The error for `op` on a VM that does not run (any more).
    pub(crate) fn not_running(&self, op: &str) -> Error {
        Error::NotRunning { op: op.into(), state: self.state(), end: self.end() }
    }

    /// Waits up to `timeout` for the VM to end; whether it has.
    pub(crate) fn wait_final(&self, timeout: Duration) -> bool {
        let mut st = self.state.lock();
        let deadline = Instant::now() + timeout;
        while !st.is_final() {
            if self.changed.wait_until(&mut st, deadline).timed_out() {
                return st.is_final();
            }
        }
        true
    }

    /// The VM's agent `link`, while the VM runs.
    pub(crate) fn agent<'a>(&self, link: &'a OnceLock<AgentLink>) -> Result<&'a AgentLink> {
        match link.get() {
            Some(a) if self.state() == VmState::Running => Ok(a),
            _ => Err(self.not_running("agent")),
        }
    }

    /// Stops the VM through its backend's `steps`, escalating, each step bounded by
    /// `timeout` ([`stop::escalate`]).
    pub(crate) fn stop(&self, steps: Arc<dyn StopSteps>, timeout: Duration) -> Result<()> {
        self.set(VmState::Stopping);
        stop::escalate(steps, timeout).map(drop)
    }

    /// Ends the VM at once through its backend's `steps` ([`stop::force_stop`]).
    pub(crate) fn force_stop(&self, steps: Arc<dyn StopSteps>) -> Result<()> {
        self.set(VmState::Stopping);
        stop::force_stop(steps, Duration::from_secs(5)).map(drop)
    }

    /// Waits up to `timeout` for the VM to end: `None` while it runs, else how it ended.
    pub(crate) fn wait_timeout(&self, timeout: Duration) -> Option<Result<()>> {
        if !self.wait_final(timeout) {
            return None;
        }
        Some(match self.end() {
            Some(end) if end.is_error() => Err(self.not_running("wait")),
            _ => Ok(()),
        })
    }
}
