//! The supervisor thread of a QEMU VM: it starts QEMU (as its user, with its
//! descriptors, its parent-death signal), waits for it to exit or for the instance
//! timeout, and records how the VM ended.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::super::console::ConsoleEnd;
use super::super::stop::{self, VmProcess};
use super::super::{VmEnd, VmState};
use super::{user, Shared};
use crate::error::{Error, Result};
use crate::unix;

/// The last [`QEMU_SAID`] bytes of `path` (QEMU's stderr), empty when it cannot be read.
pub(super) fn read_tail(path: &Path) -> String {
    use std::io::{Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(QEMU_SAID)));
    let mut buf = Vec::new();
    let _ = f.take(QEMU_SAID).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// How much of QEMU's stderr a boot error quotes.
const QEMU_SAID: u64 = 4096;

/// How the VM ended, from whether the host `asked`, QEMU's SHUTDOWN `reason`, what the
/// guest kernel `said` last on its console and QEMU's exit `status`.
fn end_of(
    asked: bool,
    reason: Option<&str>,
    said: Option<ConsoleEnd>,
    status: Option<std::process::ExitStatus>,
) -> VmEnd {
    if asked {
        return VmEnd::Stopped;
    }
    match reason {
        // ACPI power-off (the stock kernel on microvm with ACPI).
        Some("guest-shutdown") => VmEnd::GuestShutdown,
        Some("guest-panic") => VmEnd::GuestPanic,
        // -no-reboot: a reboot, a panic (panic=-1 reboots) and a triple fault all reset.
        Some("guest-reset") => match said {
            Some(ConsoleEnd::Restarting) => VmEnd::GuestReboot,
            Some(ConsoleEnd::Panic) => VmEnd::GuestPanic,
            _ => VmEnd::GuestReset,
        },
        Some("host-signal") => VmEnd::Crashed("QEMU was ended by a signal from outside vmhost".into()),
        Some(other) => VmEnd::Crashed(format!("QEMU shut down unasked ({other})")),
        None => VmEnd::Crashed(match status {
            Some(st) => format!("QEMU exited unexpectedly ({st})"),
            None => "QEMU exited unexpectedly".into(),
        }),
    }
}

/// What QEMU's process gets besides its arguments: the user it runs as (none: ours) and
/// the files it inherits (their `/proc/self/fd` paths are in its arguments).
pub(super) struct ChildSetup {
    pub(super) creds: Option<Arc<user::Credentials>>,
    pub(super) inherited: Vec<OwnedFd>,
}

/// The supervisor thread: starts QEMU, reports back, then waits for it to exit (or
/// for the instance timeout) and records the end.
pub(super) fn supervise(
    sh: Arc<Shared>,
    qemu: PathBuf,
    args: Vec<String>,
    stderr: File,
    timeout: Option<Duration>,
    child_setup: ChildSetup,
    started: crossbeam_channel::Sender<Result<()>>,
) {
    let mut cmd = Command::new(&qemu);
    cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
    // QEMU takes SIGTERM as a graceful quit: not blocked as our signal thread blocks it.
    unix::clean_signals_in_child(&mut cmd);
    let creds = child_setup.creds.clone();
    if creds.is_some() {
        // Not our working directory, which QEMU's user may not reach.
        cmd.current_dir("/");
    }
    let inherited: Vec<i32> = child_setup.inherited.iter().map(|f| f.as_raw_fd()).collect();
    let parent = std::process::id();
    // SAFETY: fcntl, setgroups, setresgid, setresuid and prctl are async-signal-safe and
    // touch only memory allocated before the fork. This thread lives until QEMU exits,
    // so the parent-death signal fires only when our whole process dies.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherited {
                if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(c) = &creds {
                c.assume()?;
            }
            // No privileges from any exec after this one (QEMU's sandbox sets it too).
            if nix::libc::prctl(nix::libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // After the change of user, which clears the parent-death signal; a parent
            // that died before it was set is seen here instead.
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if nix::libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("vmhost ended while QEMU started"));
            }
            // No transparent huge pages for QEMU (kept across exec): with them, each
            // byte the guest touches makes 2 MiB of its memory resident, and each
            // translation region is resident whole (an idle 128 MiB guest: 34 MiB of
            // its memory, 16 MiB of translation buffer); and free page reporting
            // could give back only whole 2 MiB blocks the guest left untouched.
            if nix::libc::prctl(nix::libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = started.send(Err(Error::io("start QEMU", &qemu, e)));
            return;
        }
    };
    // QEMU has its copies; the uid stays taken until it exits.
    drop(child_setup.inherited);
    let _uid_held = child_setup.creds;
    let pid = child.id() as i32;
    let process = Arc::new(VmProcess::new(child));
    let _ = sh.process.set(process.clone());
    let _ = started.send(Ok(()));
    // SAFETY: pidfd_open returns a new descriptor we own, or -1.
    let pidfd = unsafe {
        let fd = nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) as i32;
        (fd >= 0).then(|| OwnedFd::from_raw_fd(fd))
    };
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut timed_out = false;
    loop {
        if process.has_exited() {
            break;
        }
        let wait = match deadline {
            Some(d) if !timed_out => d.saturating_duration_since(Instant::now()),
            _ => Duration::from_secs(3600),
        };
        if deadline.is_some() && !timed_out && wait.is_zero() {
            timed_out = true;
            log::warn!("{}: instance timeout reached; stopping it", sh.id);
            sh.life.set_end_reason(VmEnd::Timeout(timeout.unwrap_or_default()));
            let steps = sh.clone();
            thread::spawn(move || {
                steps.life.set(VmState::Stopping);
                let _ = stop::escalate(steps, Duration::from_secs(2));
            });
            continue;
        }
        match &pidfd {
            Some(fd) => {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                let ms = wait.as_millis().min(i32::MAX as u128) as i32;
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX));
            }
            None => thread::sleep(wait.min(Duration::from_millis(50))),
        }
    }
    match process.exit_status() {
        Some(st) => log::info!("{}: QEMU exited ({st})", sh.id),
        None => log::info!("{}: QEMU exited", sh.id),
    }
    // Nothing of the run directory is needed once QEMU is gone (the console tail is in
    // memory): remove it now, not when the last handle drops, which a process that
    // exits right after its VM never gets to.
    // Done before the state turns final: a caller waiting for that may exit at once.
    *sh.qemu_said.lock() = read_tail(&sh.dir.0.join("qemu.log"));
    let _ = std::fs::remove_dir_all(&sh.dir.0);
    // QEMU's last event (SHUTDOWN) may still be on its way through the QMP reader.
    if let Some(q) = sh.qmp.get() {
        let until = Instant::now() + Duration::from_millis(500);
        while q.is_connected() && Instant::now() < until {
            thread::sleep(Duration::from_millis(2));
        }
    }
    let asked = matches!(sh.life.state(), VmState::Stopping);
    let reason = sh.shutdown_reason.lock().clone();
    sh.life.set_end_reason(end_of(asked, reason.as_deref(), sh.console.last_end(), process.exit_status()));
    if let Some(a) = sh.agent.get() {
        a.close();
    }
    if let Some(q) = sh.qmp.get() {
        q.close();
    }
    sh.net_filter.lock().take();
    sh.life.finish();
}
