//! Typed QMP commands: each is a struct of its arguments with the type of its return.
//!
//! ```no_run
//! # let client: vmhost::qmp::Client = unimplemented!();
//! use std::time::Duration;
//! use vmhost::qmp::cmd::QueryStatus;
//! let status = client.execute(&QueryStatus, Duration::from_secs(5))?;
//! println!("{} (running: {})", status.status, status.running);
//! # Ok::<(), vmhost::qmp::Error>(())
//! ```

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use super::msg::VersionInfo;

/// A QMP command: its name, its arguments (the struct itself) and its return type.
pub trait Command: Serialize {
    /// The command's name on the wire.
    const NAME: &'static str;
    /// What its `return` value deserializes to.
    type Returns: DeserializeOwned;

    /// The `arguments` object, or `None` for a command without arguments.
    fn arguments(&self) -> Option<Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) if m.is_empty() => None,
            Ok(Value::Null) => None,
            Ok(v) => Some(v),
            Err(_) => None,
        }
    }
}

/// The empty return of commands that return `{}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Empty {}

macro_rules! no_arg_commands {
    ($($(#[$doc:meta])* $name:ident = $wire:literal -> $ret:ty;)*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
            pub struct $name;

            impl Command for $name {
                const NAME: &'static str = $wire;
                type Returns = $ret;
                fn arguments(&self) -> Option<Value> {
                    None
                }
            }
        )*
    };
}

no_arg_commands! {
    /// Leave capabilities negotiation mode (sent by [`super::Client::connect`]).
    QmpCapabilities = "qmp_capabilities" -> Empty;
    /// The VM's run state.
    QueryStatus = "query-status" -> StatusInfo;
    /// QEMU's version.
    QueryVersion = "query-version" -> VersionInfo;
    /// The vCPUs, cheaply (without interrupting them).
    QueryCpusFast = "query-cpus-fast" -> Vec<CpuInfoFast>;
    /// The commands this QEMU knows.
    QueryCommands = "query-commands" -> Vec<CommandInfo>;
    /// The block devices.
    QueryBlock = "query-block" -> Vec<BlockInfo>;
    /// Pause the vCPUs.
    Stop = "stop" -> Empty;
    /// Resume the vCPUs.
    Cont = "cont" -> Empty;
    /// Reset the machine.
    SystemReset = "system_reset" -> Empty;
    /// Press the ACPI power button.
    SystemPowerdown = "system_powerdown" -> Empty;
    /// Exit QEMU.
    Quit = "quit" -> Empty;
}

/// `query-status`'s return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// The run state: running, paused, prelaunch, shutdown, guest-panicked, ...
    pub status: String,
    /// Single-step mode (older QEMUs).
    #[serde(default)]
    pub singlestep: bool,
}

/// One entry of `query-cpus-fast`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuInfoFast {
    /// vCPU index.
    #[serde(rename = "cpu-index")]
    pub cpu_index: i64,
    /// The host thread running it.
    #[serde(rename = "thread-id")]
    pub thread_id: i64,
    /// QOM path of the CPU object.
    #[serde(rename = "qom-path")]
    pub qom_path: String,
    /// Target architecture.
    #[serde(default)]
    pub target: String,
    /// The rest (props, cpu-state...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// One entry of `query-commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandInfo {
    /// The command's name.
    pub name: String,
}

/// One entry of `query-block`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockInfo {
    /// The device name.
    pub device: String,
    /// Whether it can be removed.
    #[serde(default)]
    pub removable: bool,
    /// Whether it is locked.
    #[serde(default)]
    pub locked: bool,
    /// The inserted medium, if any (left untyped: it is large and version-dependent).
    #[serde(default)]
    pub inserted: Option<Value>,
    /// The rest.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// Run a human monitor (HMP) command and return its text output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HumanMonitorCommand {
    /// The HMP command line, e.g. `info qtree`.
    #[serde(rename = "command-line")]
    pub command_line: String,
    /// The CPU the command applies to.
    #[serde(rename = "cpu-index", skip_serializing_if = "Option::is_none")]
    pub cpu_index: Option<i64>,
}

impl HumanMonitorCommand {
    /// The command `line` on the default CPU.
    pub fn new(line: impl Into<String>) -> HumanMonitorCommand {
        HumanMonitorCommand { command_line: line.into(), cpu_index: None }
    }
}

impl Command for HumanMonitorCommand {
    const NAME: &'static str = "human-monitor-command";
    type Returns = String;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_serialize_with_qmp_names() {
        assert_eq!(QueryStatus.arguments(), None);
        let hmp = HumanMonitorCommand::new("info qtree");
        assert_eq!(hmp.arguments(), Some(serde_json::json!({"command-line": "info qtree"})));
        let hmp = HumanMonitorCommand { command_line: "x".into(), cpu_index: Some(1) };
        assert_eq!(hmp.arguments(), Some(serde_json::json!({"command-line": "x", "cpu-index": 1})));
        let s: StatusInfo =
            serde_json::from_str(r#"{"status": "running", "singlestep": false, "running": true}"#).unwrap();
        assert!(s.running);
    }
}
