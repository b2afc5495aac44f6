//! How a VM ended: what the host asked for, what the guest did (power-off, halt, reboot,
//! a kernel panic, a triple fault), or what happened to the VMM process. Every backend
//! records one (`vm::Machine::end`); calls made after the end answer
//! NotRunning with it, and `vmhost run` exits with its [`VmEnd::exit_code`].

use std::fmt;
use std::time::Duration;

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmEnd {
    /// The host stopped it (stop, force_stop, close, a signal to the host process).
    Stopped,
    /// The guest powered off or halted (`poweroff`, `halt`, with or without `-f`; a guest
    /// kernel without power-off hardware halts for both).
    GuestShutdown,
    /// The guest rebooted: a VM does not restart, it ends.
    GuestReboot,
    /// The guest kernel panicked.
    GuestPanic,
    /// The guest reset the machine without announcing a reboot: a triple fault, or an
    /// emergency restart (sysrq b).
    GuestReset,
    /// The instance timeout was reached.
    Timeout(Duration),
    /// The VMM failed, or its process ended without being asked to: what happened.
    Crashed(String),
    /// The instance's main process (the helper protocol's InstanceExec) exited with
    /// this status (128 + N when signal N ended it), which ends the VM.
    MainExited(i32),
}

impl VmEnd {
    /// Whether the end is a failure (the lifecycle state is then `error`): a panic, a
    /// triple fault, the timeout or a crash. A shutdown, reboot or stop is not.
    pub fn is_error(&self) -> bool {
        matches!(self, VmEnd::GuestPanic | VmEnd::GuestReset | VmEnd::Timeout(_) | VmEnd::Crashed(_))
    }

    /// The exit status `vmhost run` gives when the VM ends before its command did:
    /// 121 the guest shut down, halted or rebooted; 122 the guest crashed (a kernel
    /// panic or a triple fault); 123 the VMM crashed or was killed; 124 the instance
    /// timeout; 125 the host stopped it (vmhost's own failure code).
    pub fn exit_code(&self) -> u8 {
        match self {
            VmEnd::GuestShutdown | VmEnd::GuestReboot => 121,
            VmEnd::GuestPanic | VmEnd::GuestReset => 122,
            VmEnd::Crashed(_) => 123,
            VmEnd::Timeout(_) => 124,
            VmEnd::Stopped => 125,
            VmEnd::MainExited(code) => *code as u8,
        }
    }
}

impl VmEnd {
    /// The InstanceEnd answer's fields: kind (1-8), a number (the timeout in ns, the
    /// main process's exit status), detail.
    pub fn to_wire(&self) -> (u8, u64, &str) {
        match self {
            VmEnd::Stopped => (1, 0, ""),
            VmEnd::GuestShutdown => (2, 0, ""),
            VmEnd::GuestReboot => (3, 0, ""),
            VmEnd::GuestPanic => (4, 0, ""),
            VmEnd::GuestReset => (5, 0, ""),
            VmEnd::Timeout(t) => (6, t.as_nanos().min(u64::MAX as u128) as u64, ""),
            VmEnd::Crashed(why) => (7, 0, why),
            VmEnd::MainExited(code) => (8, *code as u32 as u64, ""),
        }
    }

    /// The end an InstanceEnd answer names: `Ok(None)` while the VM runs (kind 0), an
    /// error naming an unknown kind.
    pub fn from_wire(kind: u8, nanos: u64, detail: String) -> Result<Option<VmEnd>, u8> {
        Ok(Some(match kind {
            0 => return Ok(None),
            1 => VmEnd::Stopped,
            2 => VmEnd::GuestShutdown,
            3 => VmEnd::GuestReboot,
            4 => VmEnd::GuestPanic,
            5 => VmEnd::GuestReset,
            6 => VmEnd::Timeout(Duration::from_nanos(nanos)),
            7 => VmEnd::Crashed(detail),
            8 => VmEnd::MainExited(nanos as u32 as i32),
            other => return Err(other),
        }))
    }
}

impl fmt::Display for VmEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmEnd::Stopped => write!(f, "it was stopped by the host"),
            VmEnd::GuestShutdown => write!(f, "the guest powered off or halted"),
            VmEnd::GuestReboot => write!(f, "the guest rebooted"),
            VmEnd::GuestPanic => write!(f, "the guest kernel panicked (the console log shows why)"),
            VmEnd::GuestReset => {
                write!(f, "the guest reset the machine unannounced (a triple fault or an emergency restart)")
            }
            VmEnd::Timeout(t) => write!(f, "the instance timeout of {:.1} s was reached", t.as_secs_f64()),
            VmEnd::Crashed(why) => write!(f, "{why}"),
            VmEnd::MainExited(code) => write!(f, "its main process exited with status {code}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_have_codes_and_wire_forms() {
        assert!(VmEnd::GuestPanic.is_error() && !VmEnd::GuestShutdown.is_error());
        let codes: Vec<u8> = [VmEnd::GuestShutdown, VmEnd::GuestPanic, VmEnd::Crashed("x".into())]
            .iter()
            .map(VmEnd::exit_code)
            .collect();
        assert_eq!(codes, [121, 122, 123]);
        for end in [
            VmEnd::Stopped,
            VmEnd::GuestReset,
            VmEnd::Timeout(Duration::from_secs(3)),
            VmEnd::Crashed("x".into()),
            VmEnd::MainExited(3),
            VmEnd::MainExited(-1),
        ] {
            let (k, n, d) = end.to_wire();
            assert_eq!(VmEnd::from_wire(k, n, d.to_string()), Ok(Some(end.clone())));
        }
        assert_eq!(VmEnd::from_wire(0, 0, String::new()), Ok(None));
        assert_eq!(VmEnd::from_wire(9, 0, String::new()), Err(9));
        assert!(!VmEnd::MainExited(3).is_error());
        assert_eq!(VmEnd::MainExited(3).exit_code(), 3);
    }
}
