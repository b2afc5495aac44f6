//! Unix-socket plumbing shared by every server and client of the crate: binding with
//! stale-socket handling and safe permissions, connecting with a deadline, and the
//! peer-credential check.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};

use crate::error::{Error, Result};

/// The longest socket path `sun_path` holds, without its terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Refuses a path that does not fit in `sun_path`.
pub fn check_socket_path(path: &Path) -> Result<()> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::SocketPathTooLong { path: path.to_path_buf() });
    }
    Ok(())
}

/// Binds a listening socket at `path`.
///
/// A missing parent directory is created with mode 0700; the socket is made 0600. An
/// existing socket file that nobody answers on (left by a dead process) is replaced; one
/// that a live process serves is refused with [`Error::SocketInUse`]; any other kind of
/// file at the path is left alone and refused.
pub fn bind_socket(path: &Path) -> Result<UnixListener> {
    check_socket_path(path)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| Error::io("create socket directory", parent, e))?;
        }
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(Error::SocketInUse { path: path.to_path_buf() }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("replacing stale socket {}", path.display());
                fs::remove_file(path).map_err(|e| Error::io("remove stale socket", path, e))?;
            }
            Err(e) => return Err(Error::io("probe existing socket", path, e)),
        },
        Ok(_) => {
            return Err(Error::io(
                "bind",
                path,
                io::Error::new(io::ErrorKind::AlreadyExists, "a file that is not a socket is in the way"),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("stat socket path", path, e)),
    }
    let listener = bind_private(path).map_err(|e| Error::io("bind", path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("chmod socket", path, e))?;
    Ok(listener)
}

/// Binds and listens with the socket node created 0600 from the start: on Linux the node
/// takes the socket inode's mode, which `fchmod` sets before `bind`. The node is bound
/// under a temporary name and renamed to `path` once it listens, so that `path` exists
/// only when a connect to it succeeds: a client that waits for the file (as the
/// original's clients wait for their helper's) is never refused in between.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    use std::os::fd::AsRawFd;
    let fd = socket::socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    nix::sys::stat::fchmod(fd.as_raw_fd(), nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{:x}~", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    // A path near the 107-byte limit is bound where it is (the brief refusal window
    // then remains).
    let staged = tmp.as_os_str().len() <= 107;
    let bound = if staged { &tmp } else { path };
    if staged {
        let _ = fs::remove_file(&tmp);
    }
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(bound)?)?;
    let listening = socket::listen(&fd, socket::Backlog::new(128).unwrap_or(socket::Backlog::MAXCONN))
        .map_err(io::Error::from)
        .and_then(|()| if staged { fs::rename(&tmp, path) } else { Ok(()) });
    if let Err(e) = listening {
        if staged {
            let _ = fs::remove_file(&tmp);
        }
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// Makes sure `dir` is a directory only we can enter: creates it 0700, or checks that an
/// existing one is ours and closed to others.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io("create private directory", dir, e)),
        Err(e) => Err(Error::io("stat", dir, e)),
        Ok(m) => {
            let me = nix::unistd::geteuid().as_raw();
            if !m.is_dir() || m.uid() != me || m.mode() & 0o077 != 0 {
                return Err(Error::io(
                    "use private directory",
                    dir,
                    io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "must be a directory owned by uid {me} with mode 0700 (it is {:o}, uid {})",
                            m.mode() & 0o7777,
                            m.uid()
                        ),
                    ),
                ));
            }
            Ok(())
        }
    }
}

/// One non-blocking connect attempt; `WouldBlock` when the listener's backlog is full.
fn connect_once(path: &Path) -> io::Result<UnixStream> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Connects to `path`, retrying every `interval` while the socket is missing, refuses
/// connections or has a full backlog, until `timeout` has passed. Never blocks longer.
pub fn connect_retry(path: &Path, timeout: Duration, interval: Duration) -> Result<UnixStream> {
    connect_retry_while(path, timeout, interval, &|| true)
}

/// [`connect_retry`], giving up early (with the last error) once `worth_it()` says the
/// listener will never come, e.g. because the process that would create it has exited.
pub fn connect_retry_while(
    path: &Path,
    timeout: Duration,
    interval: Duration,
    worth_it: &dyn Fn() -> bool,
) -> Result<UnixStream> {
    check_socket_path(path)?;
    let start = Instant::now();
    loop {
        match connect_once(path) {
            Ok(s) => return Ok(s),
            Err(e) if retryable(&e) => {
                if start.elapsed() >= timeout || !worth_it() {
                    return Err(Error::ConnectTimeout {
                        path: path.to_path_buf(),
                        waited: start.elapsed(),
                        source: e,
                    });
                }
                thread::sleep(interval.min(timeout.saturating_sub(start.elapsed())));
            }
            Err(e) => return Err(Error::io("connect", path, e)),
        }
    }
}

/// Connects to `path` once, waiting up to `timeout` only while the listener's backlog
/// is full; a missing or dead socket fails at once.
pub fn dial(path: &Path, timeout: Duration) -> Result<UnixStream> {
    check_socket_path(path)?;
    let start = Instant::now();
    loop {
        match connect_once(path) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed() < timeout => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(Error::ConnectTimeout {
                    path: path.to_path_buf(),
                    waited: start.elapsed(),
                    source: e,
                })
            }
            Err(e) => return Err(Error::io("connect", path, e)),
        }
    }
}

/// Whether a connect error may go away by itself (server not up yet, or busy).
pub fn retryable(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused | io::ErrorKind::WouldBlock)
        || e.raw_os_error() == Some(nix::libc::EAGAIN)
}

/// The uid of the process at the other end of a connection (SO_PEERCRED).
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let cred = socket::getsockopt(stream, sockopt::PeerCredentials)?;
    Ok(cred.uid())
}

/// Whether the peer runs as our effective uid; logs and returns false otherwise.
pub fn peer_allowed(stream: &UnixStream, what: &str) -> bool {
    // Another user can connect as often as it likes: its refusals are said once a second.
    static REFUSED: crate::rate_limit::RateLimited =
        crate::rate_limit::RateLimited::new(Duration::from_secs(1));
    let me = nix::unistd::geteuid().as_raw();
    match peer_uid(stream) {
        Ok(uid) if uid == me => true,
        Ok(uid) => {
            REFUSED.warn(|| format!("{what}: refused a connection from uid {uid} (serving uid {me} only)"));
            false
        }
        Err(e) => {
            REFUSED.warn(|| format!("{what}: refused a connection whose credentials are unreadable: {e}"));
            false
        }
    }
}

/// Shuts a listening socket down so that a thread blocked in `accept` returns.
pub fn shutdown_listener(listener: &UnixListener) {
    use std::os::fd::AsRawFd;
    // On Linux, shutdown(2) on a listening socket wakes every accept() with EINVAL.
    let _ = socket::shutdown(listener.as_raw_fd(), socket::Shutdown::Both);
}

/// Has `cmd`'s child start with an empty signal mask and every signal at its default
/// action, whatever the spawning process had: an ignored signal (SIGTERM or SIGHUP under
/// `nohup` or a supervisor that ignores them) stays ignored through exec, and then the
/// stop escalation's SIGTERM would not end QEMU gracefully. (std already empties the
/// mask in the child; this does it too, as part of one rule.)
pub fn clean_signals_in_child(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe calls are made: sigemptyset,
    // sigprocmask and signal.
    unsafe {
        cmd.pre_exec(|| {
            let mut set = std::mem::MaybeUninit::<nix::libc::sigset_t>::uninit();
            nix::libc::sigemptyset(set.as_mut_ptr());
            if nix::libc::sigprocmask(nix::libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            for sig in 1..nix::libc::SIGRTMIN() {
                if sig != nix::libc::SIGKILL && sig != nix::libc::SIGSTOP {
                    nix::libc::signal(sig, nix::libc::SIG_DFL);
                }
            }
            Ok(())
        });
    }
}

/// This process's limit of open descriptors (the soft RLIMIT_NOFILE), which a server's
/// caps on connections are taken from, so that its clients never use up what the VM, the
/// control socket and the log need.
pub fn fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// Raises the soft RLIMIT_NOFILE to the hard one (as Go's runtime does at start) and
/// returns the new soft limit. For vmhost's own processes (`vmhost helper`, `vmhost
/// host`), never for a library caller's: children inherit it, and `select(2)` users
/// break past 1024.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_path_appears_only_once_it_listens_and_leaves_nothing_beside_it() {
        let dir = crate::test_dir::TempDir::new("bind");
        let path = dir.join("s.sock");
        let listener = bind_socket(&path).unwrap();
        // The path is there and takes connections at once; no staging name is left.
        let _client = UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["s.sock"]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
