//! Starting guest processes.
//!
//! A process that runs as the agent's own user (root, the common case) starts with
//! `posix_spawn`, which glibc implements with `clone(CLONE_VM | CLONE_VFORK)`: no copy of
//! the agent's page tables and no copy-on-write faults in the agent afterwards. Under
//! TCG that is a few milliseconds of every exec. A process that needs another user,
//! group or supplementary groups starts with `fork`, which can change identity before
//! `exec`.
//!
//! Either way the process gets its own process group (signals reach what it starts),
//! default signal dispositions and an empty signal mask, the environment given and
//! nothing else, its working directory, /dev/null or a pipe as stdin, and pipes as
//! stdout and stderr.
//!
//! Waiting: the agent is PID 1, so the orphans of the whole guest are its children too.
//! One thread, [`reap_forever`], waits for all of them. Children are reaped only under
//! the lock of the agent's table of children: [`spawn`] registers each process it
//! starts under it, the reaper reaps under it, and [`wait`] returns the status the
//! reaper kept or reaps its own process under it. Nothing else may call `wait`.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::libc;

use super::launch::{cstring, same_identity, ExecStrings};
pub use super::launch::{winsize, Ends, Spec};

/// A started process and the agent's ends of its pipes.
#[derive(Debug)]
pub struct Spawned {
    /// Its process id (also its process group id).
    pub pid: i32,
    /// The agent's ends of its stdin, stdout and stderr (or terminal).
    pub ends: Ends,
    /// Names this process for [`wait`], [`has_ended`] and [`signal`]: unlike its pid,
    /// never reused.
    pub token: u64,
    /// A pidfd for it (None on kernels without pidfd_open), readable once it has ended.
    pub pidfd: Option<OwnedFd>,
}

/// Starts the process; the error is the one exec would give (NotFound and the like).
/// The process is registered for [`wait`] before any reaping can see it.
pub fn spawn(spec: &Spec<'_>) -> io::Result<Spawned> {
    let program = resolve(spec.program, spec.env, spec.dir)?;
    let forked = spec.main || spec.tty.is_some() || !same_identity(spec.uid, spec.gid, spec.groups);
    if forked {
        // Outside the lock: it looks at the file.
        check_format(&Path::new(spec.dir).join(&program))?;
    }
    // Held from before the fork to the registration: the reaper cannot take the new
    // process's status first (nor free its pid for reuse), nor the status of a child
    // whose exec failed, which the spawn itself (std's or glibc's) waits for.
    let mut table = CHILDREN.table.lock();
    let (pid, ends) = match spec.tty {
        _ if spec.main => super::main_process::spawn(spec, &program),
        Some((cols, rows)) => spawn_pty(spec, &program, cols, rows),
        None if forked => spawn_fork(spec, &program),
        None => spawn_vfork(spec, &program),
    }?;
    // SAFETY: pidfd_open returns a new descriptor we own, or -1. The pid is still ours:
    // the reaper cannot reap it while we hold the lock.
    let pidfd = unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) as i32;
        (fd >= 0).then(|| OwnedFd::from_raw_fd(fd))
    };
    table.next_token += 1;
    let token = table.next_token;
    table.running.insert(pid, token);
    CHILDREN.changed.notify_all();
    Ok(Spawned { pid, ends, token, pidfd })
}

/// Holds process starts off (each holds this from before its fork to after its exec)
/// until the guard drops: while a snapshot stops the guest's processes, none is caught
/// between fork and exec, where the start that waits for it would wait forever.
pub(super) fn hold_starts() -> parking_lot::MutexGuard<'static, impl Sized> {
    CHILDREN.table.lock()
}

/// The agent's children. The agent is PID 1: every orphan in the guest becomes its
/// child, beside the processes it starts. [`reap_forever`] waits for all children; it
/// keeps the status of those [`spawn`] started for [`wait`] and drops the others'.
struct Children {
    table: parking_lot::Mutex<Table>,
    /// A status arrived, or a child was registered.
    changed: parking_lot::Condvar,
}

struct Table {
    /// The processes [`spawn`] started that have not been reaped: pid to token.
    running: std::collections::BTreeMap<i32, u64>,
    /// The status of those reaped, by token, until [`wait`] takes it. By token, not
    /// pid: once reaped, a pid may be given to another process at once.
    ended: std::collections::BTreeMap<u64, std::process::ExitStatus>,
    /// The last token given out.
    next_token: u64,
}

static CHILDREN: Children = Children {
    table: parking_lot::const_mutex(Table {
        running: std::collections::BTreeMap::new(),
        ended: std::collections::BTreeMap::new(),
        next_token: 0,
    }),
    changed: parking_lot::Condvar::new(),
};

static REAPER: std::sync::Once = std::sync::Once::new();

/// Starts the reaper ([`reap_forever`]) once. PID 1 inherits every orphan of the guest,
/// but there are none before the first command: its worker starts the reaper once that
/// command has run for a while (serve's `REAPER_DELAY`) or has ended, and [`wait`] when
/// the process it waits for has not ended. So a short first command (`vmhost run --
/// true`) ends without waiting for the thread's start, milliseconds under emulation; a
/// command's own worker reaps it ([`wait`]).
pub fn start_reaper() {
    REAPER.call_once(|| {
        if let Err(e) = std::thread::Builder::new().name("reaper".into()).spawn(reap_forever) {
            // Commands still end (each worker reaps its own, see wait); orphans stay
            // zombies.
            super::say(format_args!("cannot start the reaper: {e}"));
        }
    });
}

/// Whether [`start_reaper`] has run.
pub fn reaper_started() -> bool {
    REAPER.is_completed()
}

/// The reaper: waits (without reaping) until some child has ended, then reaps every
/// ended child under the table's lock. Runs on a thread of its own for the agent's life.
pub fn reap_forever() -> ! {
    loop {
        let generation = CHILDREN.table.lock().next_token;
        // SAFETY: waitid writes one siginfo_t, which `info` is.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        if r == 0 {
            reap_ended();
            continue;
        }
        match io::Error::last_os_error().raw_os_error() {
            // No children at all: sleep until one is registered, or a second (a child
            // of the kernel's own, such as a usermode helper's, may come and go).
            Some(libc::ECHILD) => {
                let mut table = CHILDREN.table.lock();
                if table.next_token == generation {
                    CHILDREN.changed.wait_for(&mut table, std::time::Duration::from_secs(1));
                }
            }
            Some(libc::EINTR) => {}
            _ => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// Reaps every ended child: keeps the status of ours, drops the orphans'.
fn reap_ended() {
    use std::os::unix::process::ExitStatusExt;
    let mut table = CHILDREN.table.lock();
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int, which `status` is.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            if let Some(token) = table.running.remove(&pid) {
                table.ended.insert(token, std::process::ExitStatus::from_raw(status));
                CHILDREN.changed.notify_all();
            }
            continue;
        }
        if pid < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return;
    }
}

/// Whether the process [`spawn`] gave `token` has ended (and been reaped).
pub fn has_ended(token: u64) -> bool {
    CHILDREN.table.lock().ended.contains_key(&token)
}

/// Waits for the process [`spawn`] gave `token` to end, and forgets it.
///
/// A process that has ended is reaped here at once, under the table's lock as the
/// reaper reaps: its caller has usually seen the end already (the pidfd), and the
/// reaper's own wake-up is a thread switch away (~4 ms of a fresh guest's first
/// command under emulation).
pub fn wait(token: u64) -> io::Result<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let mut table = CHILDREN.table.lock();
    loop {
        if let Some(status) = table.ended.remove(&token) {
            return Ok(status);
        }
        let Some(pid) = table.running.iter().find(|(_, t)| **t == token).map(|(p, _)| *p) else {
            return Err(io::Error::other(format!("no process {token} was started by the agent")));
        };
        let mut status = 0;
        // SAFETY: waitpid writes one int, which `status` is. The pid is ours and
        // unreaped (it is in `running`, and only holders of this lock reap).
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            table.running.remove(&pid);
            return Ok(std::process::ExitStatus::from_raw(status));
        }
        // The reaper says when a child ends; the timeout only re-checks, should the
        // reaper not run (its thread could not start).
        if !reaper_started() {
            drop(table);
            start_reaper();
            table = CHILDREN.table.lock();
            continue;
        }
        CHILDREN.changed.wait_for(&mut table, std::time::Duration::from_millis(250));
    }
}

/// Sends `sig` to the process group of the process [`spawn`] gave `token` (or to the
/// process alone, when it left its group), while it runs. Once it has been reaped its
/// pid may belong to another process: then nothing is sent, as to a finished process.
pub fn signal(token: u64, pid: i32, sig: i32) -> nix::Result<()> {
    let sig = nix::sys::signal::Signal::try_from(sig)?;
    // Held while signalling: the reaper cannot free the pid meanwhile.
    let table = CHILDREN.table.lock();
    if table.running.get(&pid) != Some(&token) {
        return Ok(());
    }
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::killpg(pid, sig).or_else(|_| nix::sys::signal::kill(pid, sig))
}

/// The program to exec: `program` itself when it holds a slash (relative to the working
/// directory, as exec would see it), else the first executable file of that name in
/// the environment's PATH.
pub fn resolve(program: &str, env: &[(String, String)], dir: &str) -> io::Result<PathBuf> {
    if program.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(crate::contract::DEFAULT_PATH, |(_, v)| v.as_str());
    let mut denied = false;
    for d in path.split(':') {
        let d = if d.is_empty() { "." } else { d };
        let mut candidate = Path::new(dir).join(d);
        candidate.push(program);
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() => {
                use std::os::unix::fs::PermissionsExt;
                if m.permissions().mode() & 0o111 != 0 {
                    return Ok(candidate);
                }
                denied = true;
            }
            _ => {}
        }
    }
    Err(io::Error::from_raw_os_error(if denied { libc::EACCES } else { libc::ENOENT }))
}

/// A pipe whose both ends are close-on-exec: (read, write).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// posix_spawn's attribute and file-action objects, both initialised; destroyed on drop.
struct SpawnObjects {
    attr: libc::posix_spawnattr_t,
    actions: libc::posix_spawn_file_actions_t,
}

impl SpawnObjects {
    fn new() -> io::Result<Box<SpawnObjects>> {
        // SAFETY: both objects are initialised by their init functions before a
        // SpawnObjects exists (whose drop destroys them); on a failed init, what was
        // initialised is destroyed here and nothing else is.
        unsafe {
            let mut attr = std::mem::MaybeUninit::<libc::posix_spawnattr_t>::uninit();
            check(libc::posix_spawnattr_init(attr.as_mut_ptr()))?;
            let mut actions = std::mem::MaybeUninit::<libc::posix_spawn_file_actions_t>::uninit();
            if let Err(e) = check(libc::posix_spawn_file_actions_init(actions.as_mut_ptr())) {
                libc::posix_spawnattr_destroy(attr.as_mut_ptr());
                return Err(e);
            }
            // Boxed: the objects stay at one address from here on.
            Ok(Box::new(SpawnObjects { attr: attr.assume_init(), actions: actions.assume_init() }))
        }
    }
}

impl Drop for SpawnObjects {
    fn drop(&mut self) {
        // SAFETY: both were initialised in SpawnObjects::new.
        unsafe {
            libc::posix_spawnattr_destroy(&mut self.attr);
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
        }
    }
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

fn spawn_vfork(spec: &Spec<'_>, program: &Path) -> io::Result<(i32, Ends)> {
    use std::os::fd::AsRawFd;
    let ExecStrings { path, argv: _argv, envp: _envp, argv_p, envp_p } = ExecStrings::new(spec, program)?;
    let dir = cstring(spec.dir.as_bytes())?;
    let dev_null = cstring(b"/dev/null")?;

    let stdin = if spec.stdin { Some(pipe()?) } else { None };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;

    let mut o = SpawnObjects::new()?;
    // SAFETY: the posix_spawn objects are initialised before use and destroyed by
    // SpawnObjects' drop; every pointer handed to posix_spawn (path, argv, envp and the
    // strings they point to, the descriptors) outlives the call, which returns only
    // after the child has exec'd or failed to.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let flags = libc::POSIX_SPAWN_SETPGROUP | libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
        check(libc::posix_spawnattr_setflags(&mut o.attr, flags as libc::c_short))?;
        check(libc::posix_spawnattr_setpgroup(&mut o.attr, 0))?;
        check(libc::posix_spawnattr_setsigmask(&mut o.attr, &empty))?;
        check(libc::posix_spawnattr_setsigdefault(&mut o.attr, &all))?;
        match &stdin {
            Some((r, _)) => check(libc::posix_spawn_file_actions_adddup2(&mut o.actions, r.as_raw_fd(), 0))?,
            None => check(libc::posix_spawn_file_actions_addopen(
                &mut o.actions,
                0,
                dev_null.as_ptr(),
                libc::O_RDONLY,
                0,
            ))?,
        }
        check(libc::posix_spawn_file_actions_adddup2(&mut o.actions, out_w.as_raw_fd(), 1))?;
        check(libc::posix_spawn_file_actions_adddup2(&mut o.actions, err_w.as_raw_fd(), 2))?;
        check(libc::posix_spawn_file_actions_addchdir_np(&mut o.actions, dir.as_ptr()))?;
        let mut pid = 0;
        check(libc::posix_spawn(
            &mut pid,
            path.as_ptr(),
            &o.actions,
            &o.attr,
            argv_p.as_ptr(),
            envp_p.as_ptr(),
        ))?;
        let ends = Ends {
            stdin: stdin.map(|(_, w)| File::from(w)),
            stdout: File::from(out_r),
            stderr: Some(File::from(err_r)),
            pty: None,
        };
        Ok((pid, ends))
    }
}

/// Refuses a file the kernel cannot execute (neither ELF nor `#!` script) with ENOEXEC,
/// as the kernel and posix_spawn do. std's Command execs with execvp, which would run
/// such a file with /bin/sh instead: the fork paths look first, so that it is "Exec
/// format error" whoever runs it. Only a regular file is opened (without blocking, and
/// no FIFO or device is ever opened: exec refuses those with EACCES); a file the agent
/// cannot read is left to exec.
fn check_format(path: &Path) -> io::Result<()> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => return Err(io::Error::from_raw_os_error(libc::EACCES)),
        Ok(_) => {}
        Err(_) => return Ok(()),
    }
    let mut head = [0u8; 4];
    let opened =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path);
    let Ok(n) = opened.and_then(|mut f| f.read(&mut head)) else { return Ok(()) };
    if head[..n].starts_with(b"\x7fELF") || head[..n].starts_with(b"#!") {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::ENOEXEC))
    }
}

fn spawn_fork(spec: &Spec<'_>, program: &Path) -> io::Result<(i32, Ends)> {
    let mut cmd = Command::new(program);
    cmd.arg0(OsStr::new(spec.program)).args(spec.args).env_clear();
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v))).current_dir(spec.dir).process_group(0);
    cmd.stdin(if spec.stdin { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let (uid, gid) = (spec.uid, spec.gid);
    // Prepared here: nothing may allocate between fork and exec.
    let gids: Vec<nix::unistd::Gid> = spec.groups.iter().map(|g| nix::unistd::Gid::from_raw(*g)).collect();
    // SAFETY: setgroups, setgid and setuid are async-signal-safe system calls on data
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            use nix::unistd::{Gid, Uid};
            nix::unistd::setgroups(&gids).map_err(io::Error::from)?;
            nix::unistd::setgid(Gid::from_raw(gid)).map_err(io::Error::from)?;
            nix::unistd::setuid(Uid::from_raw(uid)).map_err(io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let missing = || io::Error::other("a piped stream of the new process is missing");
    let ends = Ends {
        stdin: child.stdin.take().map(|p| File::from(OwnedFd::from(p))),
        stdout: File::from(OwnedFd::from(child.stdout.take().ok_or_else(missing)?)),
        stderr: Some(File::from(OwnedFd::from(child.stderr.take().ok_or_else(missing)?))),
        pty: None,
    };
    Ok((child.id() as i32, ends))
}

/// Starts the process on a new pseudo-terminal: a new session whose controlling
/// terminal is the pty, on all three standard descriptors.
fn spawn_pty(spec: &Spec<'_>, program: &Path, cols: u16, rows: u16) -> io::Result<(i32, Ends)> {
    let pty = nix::pty::openpty(Some(&winsize(cols, rows)), None).map_err(io::Error::from)?;
    let master = File::from(pty.master);
    let slave = File::from(pty.slave);
    // Both ends close on exec: only the copies placed on 0, 1 and 2 reach the program.
    for f in [&master, &slave] {
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(f), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let mut cmd = Command::new(program);
    cmd.arg0(OsStr::new(spec.program)).args(spec.args).env_clear();
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v))).current_dir(spec.dir);
    if !spec.env.iter().any(|(k, _)| k == "TERM") {
        cmd.env("TERM", "xterm");
    }
    cmd.stdin(slave.try_clone()?).stdout(slave.try_clone()?).stderr(slave.try_clone()?);
    let (uid, gid) = (spec.uid, spec.gid);
    let change = !same_identity(uid, gid, spec.groups);
    let gids: Vec<nix::unistd::Gid> = spec.groups.iter().map(|g| nix::unistd::Gid::from_raw(*g)).collect();
    // SAFETY: setsid, ioctl, setgroups, setgid and setuid are async-signal-safe system
    // calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            use nix::unistd::{Gid, Uid};
            nix::unistd::setsid().map_err(io::Error::from)?;
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if change {
                nix::unistd::setgroups(&gids).map_err(io::Error::from)?;
                nix::unistd::setgid(Gid::from_raw(gid)).map_err(io::Error::from)?;
                nix::unistd::setuid(Uid::from_raw(uid)).map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(slave);
    let ends = (|| Ok::<_, io::Error>((master.try_clone()?, master.try_clone()?)))();
    let (stdin, stdout) = match ends {
        Ok(e) => e,
        Err(e) => {
            // Not handed out: end it here (its status is reaped with the orphans').
            let _ = child.kill();
            return Err(e);
        }
    };
    Ok((child.id() as i32, Ends { stdin: Some(stdin), stdout, stderr: None, pty: Some(master) }))
}
