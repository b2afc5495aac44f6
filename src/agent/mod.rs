//! The guest side: `vmhost-agent`, a static binary that the initramfs holds as `/init`.
//!
//! It is one process, PID 1, with a few threads ([`init`]):
//!
//! - the **main thread** sets the guest up: makes the image's hard links; mounts /proc,
//!   /sys, /dev, /dev/pts, /dev/shm, /tmp and /run; loads the kernel modules the host
//!   listed, in dependency order; brings lo up (vmhost's own kernel has done it during
//!   boot); mounts the host's directories. Then it runs the **server** ([`serve`]):
//!   starts the first command if the host put one on the kernel command line, finds its
//!   virtio-serial port by name, says Hello, speaks the agent protocol ([`crate::contract::proto`]) on it
//!   and runs commands. When the server ends, it syncs and powers the VM off.
//! - the **power button** watcher, on machines with ACPI (a stock kernel's).
//! - the **reaper** ([`spawn::reap_forever`]) waits for every child: the commands' (whose
//!   status it keeps for the server, unless a command's worker reaps it first) and the
//!   orphans every PID 1 inherits.
//! - **workers** (`pool`): one per running command (its output and end), and some for
//!   file requests.
//!
//! Files: [`init`] (setting the guest up), `network` (lo and eth0), [`power`] (power-off
//! and the power button), [`serve`] (the frame loop), `process` (the
//! processes it runs: credit, output, stdin), `writer` (the port's write side), [`fs`]
//! (file requests), [`spawn`] and [`main_process`] (starting processes, with what they
//! share in `launch`), [`user`] (guest
//! users), `pool` (worker threads), [`buffers`] (kept large buffers).
//!
//! One process, not init plus a forked server: under emulation the fork, the second
//! address space and the switches between the two cost ~10 ms of every boot. The price
//! is that only the reaper may wait for children (see [`spawn`]).

pub mod buffers;
pub mod fs;
pub mod init;
mod launch;
pub mod main_process;
mod network;
mod pool;
pub mod power;
mod process;
pub mod serve;
pub mod snapshot;
pub mod spawn;
mod tunnel;
pub mod user;
mod writer;

/// Entry point of `vmhost-agent`, called from its C `main`: std's runtime start does
/// not run, so this does the part of it the agent needs. Standard descriptors the
/// kernel left closed (no /dev/console in the image) become /dev/null, so that no file
/// the agent opens takes their place; SIGPIPE is ignored, so that a write to a closed
/// pipe fails with EPIPE instead of ending PID 1 (commands get it back at its default:
/// spawn resets every signal).
///
/// `warm_up` (`/init --warm-up`): vmhost's kernel runs it while it finishes its
/// start-up (kernel/patches/0004-*), on an idle vCPU, before it runs PID 1. It reads
/// what PID 1 reads first and exits: its exec, the C and Rust start-up and those reads
/// are then translated by the emulator (QEMU TCG translates code the first time it runs
/// anywhere in the guest) when PID 1 runs them. It changes nothing.
pub fn main(warm_up: bool) -> ! {
    use nix::libc;
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor; open returns a new one or -1.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) == -1 {
                libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            }
        }
    }
    // SAFETY: SIG_IGN for SIGPIPE, as std's runtime start does, before any thread.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    if std::process::id() == 1 {
        init::run()
    }
    if warm_up {
        user::warm_up();
        std::process::exit(0)
    }
    eprintln!("vmhost-agent runs as /init inside a vmhost guest");
    std::process::exit(2)
}

/// Whether this is a verbose boot (no `quiet` on the kernel command line, as with
/// `vmhost run --dmesg`): then the agent traces its start-up on the console.
/// Before /proc is mounted the answer is "no" and is not remembered.
pub(crate) fn verbose() -> bool {
    static VERBOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if let Some(v) = VERBOSE.get() {
        return *v;
    }
    match std::fs::read_to_string("/proc/cmdline") {
        Ok(c) => *VERBOSE.get_or_init(|| !c.split_whitespace().any(|w| w == "quiet")),
        Err(_) => false,
    }
}

/// In a verbose boot, writes a start-up milestone to the console stamped with the time
/// since boot, in the kernel's own format, so it lines up with the kernel's messages.
pub(crate) fn trace(msg: std::fmt::Arguments<'_>) {
    if verbose() {
        let mut t = nix::libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec, which `t` is.
        unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_BOOTTIME, &mut t) };
        say(format_args!("[{:5}.{:06}] {msg}", t.tv_sec, t.tv_nsec / 1000));
    }
}

/// Writes a line to the console (the kernel's, when PID 1's stderr is /dev/console).
pub(crate) fn say(msg: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "vmhost-agent: {msg}");
}
