//! A VM's lifecycle state, as every backend and the control protocol report it.

use std::fmt;

/// Lifecycle state of a VM, as the control protocol reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Configured, not started.
    Created,
    /// Booted and running.
    Running,
    /// A stop is in progress.
    Stopping,
    /// Exited.
    Stopped,
    /// Failed.
    Error,
}

impl VmState {
    /// The state's name on the wire: created, running, stopping, stopped, error.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Error => "error",
        }
    }

    /// Whether the VM has ended (stopped or error).
    pub fn is_final(self) -> bool {
        matches!(self, VmState::Stopped | VmState::Error)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
