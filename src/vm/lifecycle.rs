//! A VM's lifecycle as every backend tracks it: the state, who waits for it to change,
//! and why the VM ended.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::agent_link::AgentLink;
use super::stop::{self, StopSteps};
use super::VmState;
use crate::error::{Error, Result};

/// The state of one VM, shared by its supervisor, its stop steps and its users.
pub(crate) struct Lifecycle {
    state: Mutex<VmState>,
    changed: Condvar,
    /// Why the VM ended, once it has (or once an end was decided, e.g. a timeout).
    ended: Mutex<Option<std::result::Result<(), String>>>,
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

    /// Records why the VM ends, unless a reason is already recorded.
    pub(crate) fn set_end_reason(&self, why: std::result::Result<(), String>) {
        self.ended.lock().get_or_insert(why);
    }

    /// The VM has ended: Stopped, or Error when the recorded reason is an error.
    pub(crate) fn finish(&self) {
        let mut st = self.state.lock();
        *st = if matches!(*self.ended.lock(), Some(Err(_))) { VmState::Error } else { VmState::Stopped };
        self.changed.notify_all();
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
            _ => Err(Error::Vm { op: "agent".into(), message: format!("the VM is {}", self.state()) }),
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
        Some(match self.ended.lock().clone() {
            Some(Err(m)) => Err(Error::Vm { op: "wait".into(), message: m }),
            _ => Ok(()),
        })
    }
}
