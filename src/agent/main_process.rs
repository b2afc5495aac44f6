//! The instance's main process (the helper protocol's InstanceExec): the command the
//! guest exists for, as a container's entrypoint is in docker.
//!
//! The agent stays PID 1 of the guest (it serves files and other commands meanwhile);
//! the main process is PID 1 of a PID namespace of its own, which makes it PID 1 for
//! everything it can see: `$$` is 1, its orphans are reparented to it, signals for
//! which it has no handler do not reach it from inside (SIGKILL and SIGSTOP from the
//! agent still do), and when it exits the kernel ends everything it left running. It
//! gets a mount namespace too, with a /proc of its namespace; mounts it makes stay in
//! that namespace (the agent's file requests do not see them).
//!
//! On a kernel without PID namespaces (`CONFIG_PID_NS`) it runs in the agent's, as the
//! child subreaper of what it starts: orphans are reparented to it, but its pid is not 1.
//!
//! Started with a raw `clone`, as `fork` is: between it and `exec` the child makes only
//! async-signal-safe system calls on memory prepared before.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::libc;

use super::launch::{cstring, same_identity, winsize, Ends, ExecStrings, Spec};

/// The standard descriptors the child gets: its ends, and the agent's.
struct Stdio {
    /// The child's stdin, stdout and stderr (the same terminal for all three with a tty).
    child: [OwnedFd; 3],
    ends: Ends,
    /// Whether the child's descriptors are a terminal to make its controlling one.
    tty: bool,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just created and are ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn stdio(spec: &Spec<'_>) -> io::Result<Stdio> {
    if let Some((cols, rows)) = spec.tty {
        let pty = nix::pty::openpty(Some(&winsize(cols, rows)), None).map_err(io::Error::from)?;
        for fd in [&pty.master, &pty.slave] {
            // SAFETY: fcntl on a descriptor we own.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        let master = File::from(pty.master);
        let ends = Ends {
            stdin: Some(master.try_clone()?),
            stdout: master.try_clone()?,
            stderr: None,
            pty: Some(master),
        };
        let child = [pty.slave.try_clone()?, pty.slave.try_clone()?, pty.slave];
        return Ok(Stdio { child, ends, tty: true });
    }
    let (stdin_child, stdin_end) = if spec.stdin {
        let (r, w) = pipe()?;
        (r, Some(File::from(w)))
    } else {
        let null = std::fs::OpenOptions::new().read(true).open("/dev/null")?;
        (OwnedFd::from(null), None)
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    Ok(Stdio {
        child: [stdin_child, out_w, err_w],
        ends: Ends {
            stdin: stdin_end,
            stdout: File::from(out_r),
            stderr: Some(File::from(err_r)),
            pty: None,
        },
        tty: false,
    })
}

/// Starts the main process; the error is the one exec gave. The caller holds the
/// table of children (see [`super::spawn::spawn`]).
pub(super) fn spawn(spec: &Spec<'_>, program: &Path) -> io::Result<(i32, Ends)> {
    let strings = ExecStrings::new(spec, program)?;
    let dir = cstring(spec.dir.as_bytes())?;
    let groups: Vec<libc::gid_t> = spec.groups.to_vec();
    let change_user = !same_identity(spec.uid, spec.gid, spec.groups);
    let io = stdio(spec)?;
    // The child writes exec's errno here; closed on a successful exec.
    let (report_r, report_w) = pipe()?;
    let raw = Raw {
        exec: &strings,
        dir: &dir,
        groups: &groups,
        ids: change_user.then_some((spec.uid, spec.gid)),
        child: [io.child[0].as_raw_fd(), io.child[1].as_raw_fd(), io.child[2].as_raw_fd()],
        tty: io.tty,
        report: report_w.as_raw_fd(),
    };
    let flags = (libc::CLONE_NEWPID | libc::CLONE_NEWNS) as libc::c_long;
    let pid = match clone_and_exec(&raw, flags) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            log::warn!("the guest kernel has no PID namespaces: the main process is not PID 1");
            clone_and_exec(&raw, 0)?
        }
        r => r?,
    };
    drop(report_w);
    drop(io.child);
    // Whether the exec succeeded: EOF when it did, its errno when it failed. Bounded: a
    // child stuck before its exec (it should never be) is killed rather than holding
    // the table of children for ever.
    let mut errno = [0u8; 4];
    let mut got = 0;
    let mut pfd = libc::pollfd { fd: report_r.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd on a descriptor we own.
    if unsafe { libc::poll(&mut pfd, 1, 30_000) } == 0 {
        // SAFETY: kill and waitpid on our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the main process did not reach its exec in 30 s",
        ));
    }
    while got < 4 {
        // SAFETY: read into our buffer from a descriptor we own.
        let n = unsafe { libc::read(report_r.as_raw_fd(), errno[got..].as_mut_ptr().cast(), 4 - got) };
        if n > 0 {
            got += n as usize;
        } else if n == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    if got == 4 {
        // The child exits at once: take its status here (the reaper cannot: we hold
        // the table of children).
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
    }
    Ok((pid, io.ends))
}

/// What the child needs, prepared before the clone.
struct Raw<'a> {
    exec: &'a ExecStrings,
    dir: &'a CString,
    groups: &'a [libc::gid_t],
    /// The uid and gid to take on, when they are not the agent's.
    ids: Option<(u32, u32)>,
    child: [i32; 3],
    tty: bool,
    report: i32,
}

/// Clones with `ns_flags` (new namespaces, or none) and, in the child, sets it up and
/// execs; the parent gets the child's pid.
fn clone_and_exec(raw: &Raw<'_>, ns_flags: libc::c_long) -> io::Result<i32> {
    // SAFETY: clone without CLONE_VM and without a new stack behaves as fork: the child
    // runs on a copy of this stack. The child calls only async-signal-safe system calls
    // on memory prepared before, and leaves by exec or _exit.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            ns_flags | libc::SIGCHLD as libc::c_long,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the child, see above.
        unsafe { child(raw, ns_flags != 0) }
    }
    Ok(pid as i32)
}

/// The kernel's `struct sigaction` on x86-64 (for `rt_sigaction` made directly).
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// The child's side: never returns.
unsafe fn child(raw: &Raw<'_>, namespaced: bool) -> ! {
    let fail = |report: i32| -> ! {
        let errno = *libc::__errno_location();
        let bytes = errno.to_ne_bytes();
        libc::write(report, bytes.as_ptr().cast(), 4);
        libc::_exit(127)
    };
    if namespaced {
        // A /proc of the new PID namespace, in the new mount namespace alone.
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        );
    } else if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
        fail(raw.report);
    }
    if libc::setsid() < 0 {
        fail(raw.report);
    }
    for (target, &fd) in raw.child.iter().enumerate() {
        if libc::dup2(fd, target as i32) < 0 {
            fail(raw.report);
        }
    }
    if raw.tty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) != 0 {
        fail(raw.report);
    }
    if libc::chdir(raw.dir.as_ptr()) != 0 {
        fail(raw.report);
    }
    // Default dispositions for what the agent ignores (SIGPIPE; exec resets handlers
    // itself) and an empty mask. Raw system calls: after a raw clone, libc's wrappers may
    // take locks another thread of the agent held at the clone (musl's signal(SIGABRT),
    // the set*id broadcast of both libcs to threads this process does not have).
    for sig in 1..32 {
        let mut old = KernelSigaction::default();
        if libc::syscall(libc::SYS_rt_sigaction, sig, std::ptr::null::<KernelSigaction>(), &mut old, 8) == 0
            && old.handler == libc::SIG_IGN
        {
            let dfl = KernelSigaction::default();
            libc::syscall(libc::SYS_rt_sigaction, sig, &dfl, std::ptr::null_mut::<KernelSigaction>(), 8);
        }
    }
    let empty: u64 = 0;
    libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &empty, std::ptr::null_mut::<u64>(), 8);
    // The child is one thread: the raw calls change exactly its credentials.
    if let Some((uid, gid)) = raw.ids {
        if libc::syscall(libc::SYS_setgroups, raw.groups.len(), raw.groups.as_ptr()) != 0
            || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
            || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
        {
            fail(raw.report);
        }
    }
    let e = raw.exec;
    libc::execve(e.path.as_ptr(), e.argv_p.as_ptr().cast(), e.envp_p.as_ptr().cast());
    fail(raw.report)
}
