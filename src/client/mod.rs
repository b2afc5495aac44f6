//! The host-program side of the helper protocol.
//!
//! A [`Client`] talks to one helper process: either one it found with [`connect_to`] or
//! one it started with [`spawn_helper`]. It is `Send + Sync`; calls from many threads run
//! at the same time, each on its own connection (taken from a pool, dialled when none is
//! idle), because the protocol answers one request at a time per connection and a
//! blocking call (a command's Wait, a listener's Accept) must not stall the others.

pub mod fs;
pub mod instance;
pub mod net;
pub mod process;
pub mod snapshot;
mod transport;

use std::ffi::OsString;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::unix;
use crate::wire::{self, msg, Decoder, Encoder, ErrorFrame, FrameError, Wire};

/// How long [`spawn_helper`] waits for the helper's socket.
pub const HELPER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often [`spawn_helper`] and [`connect_to`] retry a connect.
pub const CONNECT_RETRY_INTERVAL: Duration = Duration::from_millis(10);
/// How long [`Client::close`] waits for a spawned helper to exit before killing it.
pub const HELPER_EXIT_GRACE: Duration = Duration::from_secs(2);
/// Idle connections a client keeps for reuse.
const MAX_IDLE_CONNECTIONS: usize = 16;

/// The answer to a call: the Response payload, read past its OK byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    payload: Vec<u8>,
}

impl Response {
    /// The result fields (the payload after the error-code byte).
    pub fn fields(&self) -> &[u8] {
        &self.payload[1..]
    }

    /// A decoder over the result fields.
    pub fn decoder(&self) -> Decoder<'_> {
        Decoder::new(self.fields())
    }
}

/// A connection pool to one helper, and the helper process if we started it.
///
/// The first connection is a lifeline that carries no calls: the helper lives as long
/// as it has a client, so a call that loses its connection (an I/O error, a refused
/// frame) never makes the helper exit under us.
pub struct Client {
    path: PathBuf,
    lifeline: UnixStream,
    idle: Mutex<Vec<Conn>>,
    /// Every open call connection (idle or busy), to shut them all down on close.
    open: Mutex<std::collections::HashMap<u64, UnixStream>>,
    next_conn: AtomicU64,
    helper: Mutex<Option<Child>>,
    closed: AtomicBool,
    max_frame: u32,
}

/// Connects to a helper already serving `path`, retrying every 10 ms until `timeout`.
///
/// ```no_run
/// let client = vmhost::client::connect_to("/run/user/1000/vm1/helper.sock",
///     std::time::Duration::from_secs(5))?;
/// let id = client.call(vmhost::wire::msg::INSTANCE_ID, &[])?;
/// # Ok::<(), vmhost::Error>(())
/// ```
pub fn connect_to(path: impl AsRef<Path>, timeout: Duration) -> Result<Client> {
    let path = path.as_ref().to_path_buf();
    let first = unix::connect_retry(&path, timeout, CONNECT_RETRY_INTERVAL)?;
    Ok(Client::new(path, first, None))
}

/// Starts `vmhost helper --socket <new socket>` and connects to it.
///
/// The binary is searched in `VMHOST_HELPER_PATH`, next to the current executable,
/// in `~/.local/share/vmhost/bin`, then on `$PATH` ([`find_helper`]). The socket goes in
/// `$XDG_RUNTIME_DIR` or `$TMPDIR` ([`helper_socket_path`]). The helper's stderr is
/// passed through. Connecting is retried every 10 ms for up to 10 s; a helper that exits
/// before serving gives [`Error::HelperExited`].
pub fn spawn_helper() -> Result<Client> {
    spawn_helper_for(None)
}

/// [`spawn_helper`] for an instance whose first command is `first` (given to the helper
/// in its environment, see [`crate::server::helper::FIRST_COMMAND_ENV`]).
pub(crate) fn spawn_helper_for(first: Option<&crate::server::first_command::FirstCommand>) -> Result<Client> {
    let bin = find_helper(&HelperSearch::from_env())?;
    let socket = helper_socket_path();
    if let Some(dir) = socket.parent() {
        unix::ensure_private_dir(dir)?;
    }
    log::debug!("starting helper {} on {}", bin.display(), socket.display());
    let mut cmd = Command::new(&bin);
    // The helper is ended with SIGTERM: not blocked or ignored as the caller may have it.
    unix::clean_signals_in_child(&mut cmd);
    let mut child = cmd
        .arg("helper")
        .arg("--socket")
        .arg(&socket)
        .envs(first.map(|f| (crate::server::helper::FIRST_COMMAND_ENV, f.to_env())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Error::io("start helper", &bin, e))?;
    let start = Instant::now();
    loop {
        match unix::connect_retry(&socket, Duration::ZERO, Duration::ZERO) {
            Ok(stream) => return Ok(Client::new(socket, stream, Some(child))),
            Err(Error::ConnectTimeout { source, .. }) => {
                if let Ok(Some(status)) = child.try_wait() {
                    let _ = std::fs::remove_file(&socket);
                    return Err(Error::HelperExited { socket, status });
                }
                if start.elapsed() >= HELPER_START_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = std::fs::remove_file(&socket);
                    return Err(Error::ConnectTimeout { path: socket, waited: start.elapsed(), source });
                }
                std::thread::sleep(CONNECT_RETRY_INTERVAL);
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
    }
}

/// Where [`find_helper`] looks, gathered from the environment.
#[derive(Debug, Clone, Default)]
pub struct HelperSearch {
    /// `VMHOST_HELPER_PATH`.
    pub env_path: Option<PathBuf>,
    /// The current executable.
    pub current_exe: Option<PathBuf>,
    /// `$HOME`.
    pub home: Option<PathBuf>,
    /// `$PATH`.
    pub path_var: Option<OsString>,
}

impl HelperSearch {
    /// The search inputs of this process.
    pub fn from_env() -> HelperSearch {
        HelperSearch {
            env_path: std::env::var_os("VMHOST_HELPER_PATH").filter(|v| !v.is_empty()).map(PathBuf::from),
            current_exe: std::env::current_exe().ok(),
            home: std::env::var_os("HOME").filter(|v| !v.is_empty()).map(PathBuf::from),
            path_var: std::env::var_os("PATH"),
        }
    }

    /// Every candidate, in search order.
    pub fn candidates(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        out.extend(self.env_path.clone());
        if let Some(dir) = self.current_exe.as_deref().and_then(Path::parent) {
            out.push(dir.join(HELPER_BIN));
        }
        if let Some(home) = &self.home {
            out.push(home.join(".local/share/vmhost/bin").join(HELPER_BIN));
        }
        if let Some(p) = &self.path_var {
            out.extend(
                std::env::split_paths(p).filter(|d| !d.as_os_str().is_empty()).map(|d| d.join(HELPER_BIN)),
            );
        }
        out
    }
}

/// The helper's binary name: the `vmhost` CLI itself, run as `vmhost helper`.
pub const HELPER_BIN: &str = "vmhost";

/// The first candidate of `search` that is an executable file.
pub fn find_helper(search: &HelperSearch) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let candidates = search.candidates();
    for c in &candidates {
        if let Ok(meta) = std::fs::metadata(c) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(c.clone());
            }
        }
    }
    Err(Error::HelperNotFound { searched: candidates })
}

/// A fresh socket path for a helper: `vmhost-<pid>-<nanos>-<n>.sock` in a private
/// (0700) directory `vmhost-<uid>` under `$XDG_RUNTIME_DIR`, else `$TMPDIR`, else
/// `/tmp`; under `/tmp` when that would be too long for a socket.
pub fn helper_socket_path() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let name =
        format!("vmhost-{}-{}-{}.sock", std::process::id(), nanos, COUNTER.fetch_add(1, Ordering::Relaxed));
    let private = format!("vmhost-{}", nix::unistd::geteuid().as_raw());
    let base = ["XDG_RUNTIME_DIR", "TMPDIR"]
        .iter()
        .filter_map(std::env::var_os)
        .find(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    let path = base.join(&private).join(&name);
    if path.as_os_str().len() <= unix::MAX_SOCKET_PATH {
        path
    } else {
        PathBuf::from("/tmp").join(private).join(name)
    }
}

/// Whether instances should run through a helper process: `VMHOST_USE_HELPER` set to
/// 1/true/yes/on forces it, 0/false/no/off forbids it; otherwise false on Linux, where
/// the library can drive the hypervisor in-process.
pub fn use_helper() -> bool {
    match std::env::var("VMHOST_USE_HELPER") {
        Ok(v) => parse_bool(&v).unwrap_or_else(|| {
            log::warn!("VMHOST_USE_HELPER={v:?} is not one of 1/true/yes/on/0/false/no/off; ignoring it");
            false
        }),
        Err(_) => false,
    }
}

/// Parses 1/true/yes/on and 0/false/no/off, case-insensitively.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

impl Client {
    fn new(path: PathBuf, first: UnixStream, helper: Option<Child>) -> Client {
        Client {
            path,
            lifeline: first,
            idle: Mutex::new(Vec::new()),
            open: Mutex::new(std::collections::HashMap::new()),
            next_conn: AtomicU64::new(1),
            helper: Mutex::new(helper),
            closed: AtomicBool::new(false),
            max_frame: wire::DEFAULT_MAX_FRAME,
        }
    }

    /// Sets the largest frame this client sends or accepts (default 64 MiB).
    pub fn set_max_frame(&mut self, max: u32) {
        self.max_frame = max;
    }

    /// The helper's socket.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// The PID of the helper, if this client started it.
    pub fn helper_pid(&self) -> Option<u32> {
        self.helper.lock().as_ref().map(Child::id)
    }

    fn checkout(&self) -> Result<Conn> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        if let Some(c) = self.idle.lock().pop() {
            return Ok(c);
        }
        // The helper is up (we hold its lifeline): a refused connect means it died, so
        // fail at once instead of retrying; wait only while its backlog is full.
        let stream = unix::dial(&self.path, Duration::from_secs(5))?;
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let clone = stream.try_clone().map_err(|e| Error::io("clone connection", &self.path, e))?;
        self.open.lock().insert(id, clone);
        if self.closed.load(Ordering::SeqCst) {
            self.discard(Conn { id, stream });
            return Err(Error::Closed);
        }
        Ok(Conn { id, stream })
    }

    /// Returns a healthy connection to the pool.
    fn checkin(&self, c: Conn) {
        let mut idle = self.idle.lock();
        if !self.closed.load(Ordering::SeqCst) && idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(c);
        } else {
            drop(idle);
            self.discard(c);
        }
    }

    /// Closes a connection that is in an unknown state (mid-frame, broken).
    fn discard(&self, c: Conn) {
        self.open.lock().remove(&c.id);
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Sends a request and waits for its answer. Returns the Response (past its OK
    /// byte); an Error frame becomes [`Error::Remote`].
    pub fn call(&self, ty: u16, payload: &[u8]) -> Result<Response> {
        self.call_streaming(ty, payload, |t, _| Err(unexpected(ty, t)))
    }

    /// Like [`Client::call`], with the payload written by `f`.
    ///
    /// ```no_run
    /// # let client: vmhost::client::Client = unimplemented!();
    /// use vmhost::wire::msg;
    /// let r = client.call_with(msg::FS_READ_FILE, |enc| { enc.string("/etc/hostname"); })?;
    /// let data = r.decoder().bytes()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn call_with(&self, ty: u16, f: impl FnOnce(&mut Encoder)) -> Result<Response> {
        let mut enc = Encoder::new();
        f(&mut enc);
        self.call(ty, enc.as_bytes())
    }

    /// Sends a request whose answer may be preceded by other frames (streaming): each
    /// frame that is neither a Response nor an Error goes to `on_frame`, until the final
    /// answer, or until a [`msg::STREAM_END`], which is returned as a Response payload.
    pub fn call_streaming(
        &self,
        ty: u16,
        payload: &[u8],
        mut on_frame: impl FnMut(u16, &[u8]) -> Result<()>,
    ) -> Result<Response> {
        let op = wire::type_name(ty);
        let mut conn = self.checkout()?;
        match wire::write_frame(&mut conn.stream, ty, payload, self.max_frame) {
            Ok(()) => {}
            Err(e @ FrameError::TooLarge { .. }) => {
                // Refused here, nothing was sent: the connection is still good.
                self.checkin(conn);
                return Err(Error::Frame { op, source: e });
            }
            Err(e) => {
                // The helper may have refused the frame (too large for it) and closed:
                // its Error frame is still readable and says why.
                let _ = conn.stream.set_read_timeout(Some(Duration::from_millis(200)));
                let answer = wire::read_frame(&mut conn.stream, self.max_frame);
                self.discard(conn);
                if let Ok(f) = answer {
                    if f.ty == msg::ERROR {
                        if let Ok(ef) = ErrorFrame::from_payload(&f.payload) {
                            return Err(Error::Remote(ef));
                        }
                    }
                }
                return Err(Error::Frame { op, source: e });
            }
        }
        loop {
            let frame = match wire::read_frame(&mut conn.stream, self.max_frame) {
                Ok(f) => f,
                Err(e) => {
                    self.discard(conn);
                    return Err(Error::Frame {
                        op,
                        source: match e {
                            FrameError::Eof => FrameError::Io(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the helper closed the connection without answering",
                            )),
                            e => e,
                        },
                    });
                }
            };
            match frame.ty {
                msg::RESPONSE | msg::STREAM_END => {
                    self.checkin(conn);
                    let fields = wire::response_fields(&frame.payload)
                        .map_err(|source| Error::Decode { msg: "Response".into(), source })?;
                    return match fields {
                        Ok(_) => Ok(Response { payload: frame.payload }),
                        Err(mut ef) => {
                            ef.op = op;
                            Err(Error::Remote(ef))
                        }
                    };
                }
                msg::ERROR => {
                    self.checkin(conn);
                    let ef = ErrorFrame::from_payload(&frame.payload)
                        .map_err(|source| Error::Decode { msg: "Error".into(), source })?;
                    return Err(Error::Remote(ef));
                }
                other => {
                    if let Err(e) = on_frame(other, &frame.payload) {
                        // The rest of this answer is still on the connection.
                        self.discard(conn);
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Whether the helper is alive: for a helper we started, whether its process runs;
    /// otherwise whether its socket accepts a connection.
    pub fn is_alive(&self) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        if let Some(child) = self.helper.lock().as_mut() {
            return matches!(child.try_wait(), Ok(None));
        }
        unix::connect_retry(&self.path, Duration::ZERO, Duration::ZERO).is_ok()
    }

    /// Closes every connection; for a helper we started, waits up to 2 s for it to exit,
    /// then kills it, and removes its socket file. Idempotent.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.idle.lock().clear();
        for (_, s) in self.open.lock().drain() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = self.lifeline.shutdown(std::net::Shutdown::Both);
        let Some(mut child) = self.helper.lock().take() else {
            return Ok(());
        };
        let deadline = Instant::now() + HELPER_EXIT_GRACE;
        let exited = loop {
            match child.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Ok(None) => break false,
                Err(e) => return Err(Error::io("wait for helper", &self.path, e)),
            }
        };
        if !exited {
            log::warn!("helper {} did not exit within {:?}; killing it", child.id(), HELPER_EXIT_GRACE);
            let _ = child.kill();
            let _ = child.wait();
        }
        // A helper that died abruptly left its VM's run directory behind.
        crate::vm::run_dir::sweep_stale(&crate::vm::run_dir::run_base());
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io("remove socket", &self.path, e))
            }
            _ => Ok(()),
        }
    }
}

fn unexpected(request: u16, got: u16) -> Error {
    Error::UnexpectedFrame { request: wire::type_name(request), got }
}

/// One call connection of the pool.
struct Conn {
    id: u64,
    stream: UnixStream,
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("path", &self.path).field("helper_pid", &self.helper_pid()).finish()
    }
}
