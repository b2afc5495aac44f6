//! Powering the guest off: on the host's Shutdown, at the agent's end, or when the
//! power button of an ACPI machine is pressed.

use std::fs::File;
use std::io::Read;
use std::thread;
use std::time::{Duration, Instant};

use super::say;

/// The name of the threads that watch the power button (which a test looks for).
pub const POWER_BUTTON_THREAD: &str = "power-button";

pub(super) fn power_button_thread(f: impl FnOnce() + Send + 'static) {
    if let Err(e) = thread::Builder::new().name(POWER_BUTTON_THREAD.into()).spawn(f) {
        say(format_args!("cannot watch the power button: {e}"));
    }
}

/// Watches every input device for the power key and powers off when it is pressed.
pub(super) fn watch_power_button() {
    // Devices may appear a little after the modules load.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut watched = Vec::new();
    while Instant::now() < deadline {
        if let Ok(dir) = std::fs::read_dir("/dev/input") {
            for e in dir.flatten() {
                let path = e.path();
                let is_event =
                    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("event"));
                if is_event && !watched.contains(&path) {
                    watched.push(path.clone());
                    power_button_thread(move || watch_device(&path));
                }
            }
        }
        thread::sleep(Duration::from_millis(500));
    }
}

fn watch_device(path: &std::path::Path) {
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let Ok(mut f) = File::open(path) else { return };
    // struct input_event on 64-bit: struct timeval (16 bytes), u16 type, u16 code, i32 value.
    let mut ev = [0u8; 24];
    while f.read_exact(&mut ev).is_ok() {
        let ty = u16::from_ne_bytes([ev[16], ev[17]]);
        let code = u16::from_ne_bytes([ev[18], ev[19]]);
        let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
        if ty == EV_KEY && code == KEY_POWER && value == 1 {
            say(format_args!("power button pressed; powering off"));
            power_off();
        }
    }
}

/// Syncs and ends the VM. The host runs QEMU with `-no-reboot`, so a reboot ends it on
/// every machine type, with or without ACPI.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        thread::sleep(Duration::from_secs(1));
    }
}
