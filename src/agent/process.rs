//! The guest's processes as the agent runs them: a running process and its output
//! credit ([`Proc`]), starting one as its request says ([`start`]: user, environment,
//! working directory), its output sent within its credit, its stdin fed as it comes.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use super::spawn;
use super::user::resolve_user;
use super::writer::Writer;
use crate::contract::proto::{self, AgentError, ExecRequest};
use crate::wire::{Encoder, ErrorCode};

/// A running process.
pub(super) struct Proc {
    pub(super) pid: i32,
    /// Its name at the reaper (see spawn::Spawned::token).
    pub(super) token: u64,
    pub(super) credit: Mutex<u64>,
    pub(super) credit_cv: Condvar,
    pub(super) stdin: Option<Sender<(u32, Vec<u8>)>>,
    /// The terminal's master side, for a process started on one.
    pub(super) pty: Option<File>,
    /// Set when the process has exited: its stdin feeder gives up on a full pipe.
    pub(super) ended: Arc<std::sync::atomic::AtomicBool>,
    /// Set once the process's Exit was sent: output after it (from children that kept
    /// the pipes) is read and dropped, so they never block on a full pipe.
    pub(super) detached: std::sync::atomic::AtomicBool,
}

impl Proc {
    /// Waits for output credit and takes up to `want` bytes of it; `None` once detached.
    pub(super) fn take_credit(&self, want: usize) -> Option<usize> {
        let mut c = self.credit.lock();
        while *c == 0 {
            if self.is_detached() {
                return None;
            }
            self.credit_cv.wait_for(&mut c, Duration::from_millis(500));
        }
        if self.is_detached() {
            return None;
        }
        let n = (*c).min(want as u64) as usize;
        *c -= n as u64;
        Some(n)
    }

    pub(super) fn is_detached(&self) -> bool {
        self.detached.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(super) fn detach(&self) {
        self.detached.store(true, std::sync::atomic::Ordering::SeqCst);
        let _g = self.credit.lock();
        self.credit_cv.notify_all();
    }
}

/// How long the output of an exited process's leftover children is still forwarded
/// before its Exit is sent anyway (like Go's `exec.Cmd.WaitDelay`).
pub(super) const WAIT_DELAY: Duration = Duration::from_millis(500);

/// How long a process runs before its worker starts the reaper (spawn::start_reaper),
/// if no process has ended yet.
pub(super) const REAPER_DELAY: Duration = Duration::from_millis(100);

/// Starts the process `req` asks for: its user, environment and working directory
/// resolved as the guest's files say.
pub(super) fn start(req: &ExecRequest) -> Result<spawn::Spawned, AgentError> {
    let user = resolve_user(&req.user).map_err(|m| AgentError::new(ErrorCode::InvalidArgument, m))?;
    // The environment: the request's (a later entry wins), with HOME, USER and
    // LOGNAME when it lacks them.
    let mut env = std::collections::BTreeMap::new();
    for (k, v) in [("HOME", &user.home), ("USER", &user.name), ("LOGNAME", &user.name)] {
        env.insert(k.to_string(), v.clone());
    }
    for kv in &req.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        env.insert(k.to_string(), v.to_string());
    }
    let env: Vec<(String, String)> = env.into_iter().collect();
    let dir = if req.dir.is_empty() {
        if std::path::Path::new(&user.home).is_dir() {
            user.home.as_str()
        } else {
            "/"
        }
    } else {
        if let Err(e) = std::fs::read_dir(&req.dir) {
            return Err(AgentError::new(ErrorCode::Io, format!("working directory {}: {e}", req.dir)));
        }
        req.dir.as_str()
    };
    let spec = spawn::Spec {
        program: &req.program,
        args: &req.args,
        env: &env,
        dir,
        stdin: req.stdin,
        uid: user.uid,
        gid: user.gid,
        groups: &user.groups,
        tty: req.tty,
        main: req.main,
    };
    // The host prefixes "exec PROGRAM: "; the message is the cause alone.
    spawn::spawn(&spec).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => AgentError::new(ErrorCode::InvalidArgument, e.to_string()),
        _ => AgentError::from_io(&e),
    })
}

/// Sends output within the process's credit (dropped once the process is detached).
pub(super) fn send_output(stream: u8, id: u32, data: &[u8], proc: &Proc, w: &Writer) {
    let mut sent = 0;
    while sent < data.len() {
        let Some(k) = proc.take_credit(data.len() - sent) else { return };
        let mut e = Encoder::new();
        e.u8(stream).bytes(&data[sent..sent + k]);
        w.send(proto::OUTPUT, id, e.as_bytes());
        sent += k;
    }
}

/// Writes a process's stdin as the host sends it, each chunk answered once written.
/// The pipe is non-blocking and polled, so that a process that stops reading (or a
/// leftover child holding the pipe) cannot hold the feeder once the process has ended:
/// then pending chunks are answered AlreadyClosed. On a terminal, the end of input is
/// the terminal's EOF character (typed twice when a line is pending), as a user would.
pub(super) fn feed_stdin(
    pipe: File,
    rx: Receiver<(u32, Vec<u8>)>,
    w: Writer,
    ended: Arc<std::sync::atomic::AtomicBool>,
    tty: bool,
) {
    use std::os::fd::AsRawFd;
    let fd = pipe.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = nix::libc::fcntl(fd, nix::libc::F_GETFL);
        nix::libc::fcntl(fd, nix::libc::F_SETFL, fl | nix::libc::O_NONBLOCK);
    }
    let mut last = b'\n';
    let write_all = |data: &[u8]| -> Result<(), String> {
        let mut done = 0;
        while done < data.len() {
            // SAFETY: write from a live slice.
            let n = unsafe { nix::libc::write(fd, data[done..].as_ptr().cast(), data.len() - done) };
            if n >= 0 {
                done += n as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => {}
                std::io::ErrorKind::WouldBlock => {
                    if ended.load(std::sync::atomic::Ordering::SeqCst) {
                        return Err("the process has exited; its stdin is closed".into());
                    }
                    let mut pfd = nix::libc::pollfd { fd, events: nix::libc::POLLOUT, revents: 0 };
                    // SAFETY: one valid pollfd.
                    unsafe { nix::libc::poll(&mut pfd, 1, 200) };
                }
                _ => return Err(format!("write stdin: {e}")),
            }
        }
        Ok(())
    };
    while let Ok((req, data)) = rx.recv() {
        if data.is_empty() {
            if tty {
                let eof = nix::sys::termios::tcgetattr(&pipe).map_or(4, |t| t.control_chars[nix::libc::VEOF]);
                let times = if last == b'\n' || last == eof { 1 } else { 2 };
                let _ = write_all(&vec![eof; times]);
            }
            w.ok(req, &[]);
            return; // dropping the pipe closes the process's stdin
        }
        match write_all(&data) {
            Ok(()) => {
                last = *data.last().unwrap_or(&last);
                w.ok(req, &[])
            }
            Err(m) if ended.load(std::sync::atomic::Ordering::SeqCst) => {
                w.error(req, ErrorCode::AlreadyClosed, &m)
            }
            Err(m) => w.error(req, ErrorCode::Io, &m),
        }
    }
}
