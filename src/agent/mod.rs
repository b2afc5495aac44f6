//! The guest side: `vmhost-agent`, a static binary that the initramfs holds as `/init`.
//!
//! It runs as two processes, in the manner of tini plus a service:
//!
//! - **init** (PID 1, [`init`]): mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /tmp, /run;
//!   loads the kernel modules the host listed, in dependency order; watches the ACPI
//!   power button; starts the server; reaps every zombie; and when the server ends, or
//!   the power button is pressed, syncs and powers the VM off.
//! - **server** (`/init serve`, [`serve`]): finds its virtio-serial port by name, speaks
//!   the agent protocol ([`proto`]) on it, and runs commands as its children.
//!
//! Keeping the server out of PID 1 keeps process reaping trivial (the server waits for
//! its own children; init reaps orphans) and keeps power-off working when the server
//! is wedged.

pub mod init;
pub mod proto;
pub mod serve;

/// The name of the virtio-serial port the agent serves.
pub const PORT_NAME: &str = "vmhost.agent";
/// Where the initramfs keeps the agent's files (modules, module list).
pub const AGENT_DIR: &str = "/vmhost";
/// Created by init once the guest is fully set up (all modules, network); commands
/// wait for it, so that they never see a half-configured guest.
pub const SETUP_DONE: &str = "/run/vmhost-setup-done";

/// The module list: one `file.ko [params]` per line, in load order.
pub const MODULES_LIST: &str = "/vmhost/modules.load";

/// Entry point of `vmhost-agent`.
pub fn main() -> ! {
    let args: Vec<String> = std::env::args().collect();
    let code = match args.get(1).map(String::as_str) {
        Some("serve") => serve::run(),
        _ if std::process::id() == 1 => init::run(),
        _ => {
            eprintln!("vmhost-agent runs as /init inside a vmhost guest (or `serve` under it)");
            2
        }
    };
    std::process::exit(code)
}

/// Writes a line to the console (the kernel's, when PID 1's stderr is /dev/console).
pub(crate) fn say(msg: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "vmhost-agent: {msg}");
}
