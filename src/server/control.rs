//! The control protocol between a managing daemon and a per-VM host process.
//!
//! The host process serves `<vm dir>/vmhost.sock` and writes its PID (decimal, no
//! newline) to `<vm dir>/vmhost.pid` before listening. Each connection carries exactly
//! one exchange:
//!
//! ```text
//! -> {"method":"status"|"stop"|"force_stop"|"info","timeout_seconds":N}
//! -> {"method":"commit","name":"app:2","excludes":["/var/cache"]}
//! <- {"ok":true,"state":"running"}\n                       (status)
//! <- {"ok":true,"state":"running","ssh_port":2222,"backend":"qemu"}\n   (info)
//! <- {"ok":true,"state":"stopping"}\n                      (stop, force_stop)
//! <- {"ok":true,"state":"running","key":"5f0c…","image":"docker.io/library/app:2"}\n (commit)
//! <- {"ok":false,"error":"invalid request: ..."}\n         (bad JSON)
//! <- {"ok":false,"error":"unknown method: ..."}\n          (anything else)
//! ```
//!
//! `stop` (a timeout <= 0 means 30 s) and `force_stop` answer at once and do the work in
//! the background; repeating them while one runs is harmless. `commit` (vmhost's
//! addition, `vmhost commit`) snapshots the guest's root and keeps it in the image store
//! under `name` (as `docker commit`), answering when done with the snapshot's key. The server exits when the
//! VM exits or [`ControlServer::shutdown`] is called, and removes its socket and pid file.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::unix;
use crate::vm::VmState;

/// Largest request a control server reads.
pub const MAX_REQUEST: u64 = 64 << 10;
/// Largest reply a control client reads.
pub const MAX_REPLY: u64 = 1 << 20;
/// The client's dial timeout.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// The client's deadline for a whole exchange.
pub const EXCHANGE_DEADLINE: Duration = Duration::from_secs(30);
/// The client's deadline for a `commit` exchange.
pub const COMMIT_DEADLINE: Duration = Duration::from_secs(3600);
/// The stop timeout when the request gives none (or <= 0).
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server waits for a connected client's request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Control connections served at once; more are answered `busy` at once and closed.
/// An exchange takes a moment, so this many only come from a flood.
pub const MAX_CONNECTIONS: usize = 32;

/// What the control server needs from a VM. Each backend implements it.
pub trait VmController: Send + Sync + 'static {
    /// The current lifecycle state.
    fn state(&self) -> VmState;
    /// Stops the VM gracefully, escalating within `timeout` per step
    /// ([`crate::vm::stop::escalate`]).
    fn stop(&self, timeout: Duration) -> Result<()>;
    /// Terminates the VM at once (SIGTERM, 1 s, SIGKILL).
    fn force_stop(&self) -> Result<()>;
    /// The host port forwarded to the guest's SSH port, 0 for none.
    fn ssh_port(&self) -> u16;
    /// The backend name: "qemu" or "kvm".
    fn backend(&self) -> &str;
    /// Snapshots the guest's root (without `excludes`) and keeps it as the image `name`;
    /// returns the snapshot's key and the name as stored. Not every VM can.
    fn commit(&self, name: &str, excludes: &[String]) -> Result<(String, String)> {
        let _ = (name, excludes);
        Err(Error::InvalidArgument {
            op: "commit".into(),
            message: "this VM's root has no recorded source".into(),
        })
    }
    /// Blocks until the VM exits: `Ok` for a clean exit, an error if it crashed.
    fn wait(&self) -> Result<()>;
}

/// The control server over a VM of either backend (the arrow runs from the server to
/// the VM, never back).
impl VmController for crate::vm::Machine {
    fn state(&self) -> VmState {
        crate::vm::Machine::state(self)
    }
    fn stop(&self, timeout: Duration) -> Result<()> {
        crate::vm::Machine::stop(self, timeout)
    }
    fn force_stop(&self) -> Result<()> {
        crate::vm::Machine::force_stop(self)
    }
    fn ssh_port(&self) -> u16 {
        0
    }
    fn backend(&self) -> &str {
        crate::vm::Machine::backend(self).as_str()
    }
    fn wait(&self) -> Result<()> {
        crate::vm::Machine::wait(self)
    }
}

/// A VM as `vmhost host` serves it: the machine, the host port its SSH port (22) is
/// published on (`-p`), 0 for none, and what it booted (for `commit`).
#[derive(Debug, Clone)]
pub struct Hosted {
    /// The VM.
    pub machine: crate::vm::Machine,
    /// The host port of the guest's port 22, 0 for none.
    pub ssh_port: u16,
    /// Its root's source.
    pub source: crate::image::rootfs::Source,
    /// The source's identity when the VM booted (`image::snapshot::root_identity`).
    pub identity: Option<String>,
    /// The cache it booted from (the image store's home).
    pub cache: PathBuf,
}

impl VmController for Hosted {
    fn state(&self) -> VmState {
        self.machine.state()
    }
    fn stop(&self, timeout: Duration) -> Result<()> {
        self.machine.stop(timeout)
    }
    fn force_stop(&self) -> Result<()> {
        self.machine.force_stop()
    }
    fn ssh_port(&self) -> u16 {
        self.ssh_port
    }
    fn backend(&self) -> &str {
        self.machine.backend().as_str()
    }
    fn wait(&self) -> Result<()> {
        self.machine.wait()
    }
    fn commit(&self, name: &str, excludes: &[String]) -> Result<(String, String)> {
        use super::snapshot::{take, Base, Origin};
        let origin = Origin {
            cache: self.cache.clone(),
            base: Base::Root(self.source.clone(), self.identity.clone()),
        };
        let snap = take(self.machine.agent()?, Some(&origin), excludes, "", &|| false)?;
        let store = crate::image::store::Store::open(snap.cache.join("images"))?;
        let stored = crate::image::snapshot::commit(&store, &snap.record, name)?;
        Ok((snap.record.key.clone(), stored))
    }
}

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// status, stop, force_stop or info.
    pub method: String,
    /// Stop timeout in seconds (stop only; <= 0 means 30).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout_seconds: i64,
    /// The image name (commit only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Guest paths left out (commit only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excludes: Vec<String>,
}

/// A JSON object's members in the order they came (duplicates kept).
struct Fields(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Fields, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Fields, A::Error> {
                let mut out = Vec::new();
                while let Some(kv) = m.next_entry()? {
                    out.push(kv);
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl Request {
    /// The request an object's `fields` make, keys matched as mb's Go server matches
    /// them (`encoding/json`): a key names a field when it equals the field's name
    /// ignoring case (`{"Method":"status"}`), a later key wins over an earlier one,
    /// other keys are ignored, and `null` leaves a field unset.
    fn from_fields(fields: Fields) -> std::result::Result<Request, String> {
        let field = |name: &str| {
            fields.0.iter().rev().find(|(k, v)| k.eq_ignore_ascii_case(name) && !v.is_null()).map(|(_, v)| v)
        };
        let method = match field("method") {
            Some(serde_json::Value::String(m)) => m.clone(),
            None => return Err("missing field `method`".into()),
            Some(other) => return Err(format!("method: expected a string, got {other}")),
        };
        let timeout_seconds = match field("timeout_seconds") {
            None => 0,
            Some(v) => v.as_i64().ok_or_else(|| format!("timeout_seconds: expected an integer, got {v}"))?,
        };
        // Read for commit only: to the other methods they are other keys, ignored.
        let commit = method == "commit";
        let name = match field("name").filter(|_| commit) {
            None => String::new(),
            Some(serde_json::Value::String(n)) => n.clone(),
            Some(other) => return Err(format!("name: expected a string, got {other}")),
        };
        let excludes = match field("excludes").filter(|_| commit) {
            None => Vec::new(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|_| format!("excludes: expected a list of strings, got {v}"))?,
        };
        Ok(Request { method, timeout_seconds, name, excludes })
    }
}

/// A control reply.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The VM state.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    /// The host SSH port (info).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ssh_port: i64,
    /// The backend (info).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backend: String,
    /// The snapshot's key (commit).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// The image name as stored (commit).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl Response {
    fn error(msg: String) -> Response {
        Response { ok: false, error: msg, ..Response::default() }
    }

    fn state(state: VmState) -> Response {
        Response { ok: true, state: state.as_str().to_string(), ..Response::default() }
    }

    /// The reply as one JSON line (with its newline).
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| r#"{"ok":false}"#.into());
        s.push('\n');
        s
    }
}

struct Shared {
    controller: Arc<dyn VmController>,
    stopping: AtomicBool,
    forcing: AtomicBool,
}

impl Shared {
    fn answer(self: &Arc<Self>, req: Request) -> Response {
        let c = &self.controller;
        match req.method.as_str() {
            "status" => Response::state(c.state()),
            "info" => Response {
                ssh_port: c.ssh_port() as i64,
                backend: c.backend().to_string(),
                ..Response::state(c.state())
            },
            "stop" => {
                let timeout = if req.timeout_seconds <= 0 {
                    DEFAULT_STOP_TIMEOUT
                } else {
                    Duration::from_secs(req.timeout_seconds.min(24 * 3600) as u64)
                };
                self.background(&self.stopping, "stop", move |c| c.stop(timeout));
                Response::state(VmState::Stopping)
            }
            "force_stop" => {
                self.background(&self.forcing, "force_stop", |c| c.force_stop());
                Response::state(VmState::Stopping)
            }
            "commit" if req.name.is_empty() => Response::error("commit: give the image a name".into()),
            "commit" => match c.commit(&req.name, &req.excludes) {
                Ok((key, image)) => Response { key, image, ..Response::state(c.state()) },
                Err(e) => Response::error(format!("commit: {e}")),
            },
            other => Response::error(format!("unknown method: {other}")),
        }
    }

    /// Runs `f` on a thread unless one started through the same flag still runs.
    fn background(
        self: &Arc<Self>,
        flag: &AtomicBool,
        what: &'static str,
        f: impl FnOnce(&dyn VmController) -> Result<()> + Send + 'static,
    ) {
        if flag.swap(true, Ordering::SeqCst) {
            log::info!("{what} already in progress");
            return;
        }
        let me = self.clone();
        let is_force = what == "force_stop";
        let spawned = thread::Builder::new().name(format!("vmhost-{what}")).spawn(move || {
            if let Err(e) = f(me.controller.as_ref()) {
                log::error!("{what}: {e}");
            }
            let flag = if is_force { &me.forcing } else { &me.stopping };
            flag.store(false, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            log::error!("cannot start the {what} thread: {e}");
            flag.store(false, Ordering::SeqCst);
        }
    }

    fn serve_conn(self: &Arc<Self>, stream: UnixStream) {
        let _ = stream.set_read_timeout(Some(REQUEST_DEADLINE));
        let _ = stream.set_write_timeout(Some(REQUEST_DEADLINE));
        let reply = match read_request(&stream) {
            Ok(req) => self.answer(req),
            Err(msg) => Response::error(format!("invalid request: {msg}")),
        };
        let mut w = &stream;
        if let Err(e) = w.write_all(reply.to_line().as_bytes()) {
            log::debug!("control reply not delivered: {e}");
        }
    }
}

/// Reads one JSON request (up to [`MAX_REQUEST`] bytes, within [`REQUEST_DEADLINE`]
/// for the whole request) without waiting for EOF.
fn read_request(stream: &UnixStream) -> std::result::Result<Request, String> {
    let mut limited = Deadline { stream, until: Instant::now() + REQUEST_DEADLINE, read: 0 };
    let result = {
        let reader = BufReader::new((&mut limited).take(MAX_REQUEST));
        let mut de = serde_json::Deserializer::from_reader(reader).into_iter::<Fields>();
        de.next()
    };
    match result {
        Some(Ok(fields)) => Request::from_fields(fields),
        Some(Err(_)) if limited.read >= MAX_REQUEST => {
            Err(format!("request larger than {MAX_REQUEST} bytes"))
        }
        Some(Err(e)) if e.is_io() => {
            Err(format!("no complete request within {} s: {e}", REQUEST_DEADLINE.as_secs()))
        }
        Some(Err(e)) => Err(e.to_string()),
        None => Err("empty request".to_string()),
    }
}

/// A reader whose reads all end by one deadline.
struct Deadline<'a> {
    stream: &'a UnixStream,
    until: Instant,
    read: u64,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.stream.set_read_timeout(Some(left))?;
        let n = (&mut &*self.stream).read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// The control server of one per-VM host process.
pub struct ControlServer {
    socket: PathBuf,
    pid_path: PathBuf,
    listener: Arc<UnixListener>,
    shared: Arc<Shared>,
    done_tx: Sender<()>,
    done_rx: Receiver<()>,
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer").finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Writes the pid file, binds the socket and starts serving in the background.
    pub fn start(
        socket: impl AsRef<Path>,
        pid_path: impl AsRef<Path>,
        controller: Arc<dyn VmController>,
    ) -> Result<ControlServer> {
        let socket = socket.as_ref().to_path_buf();
        let pid_path = pid_path.as_ref().to_path_buf();
        unix::check_socket_path(&socket)?;
        if let Some(dir) = socket.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !dir.exists() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| Error::io("create VM directory", dir, e))?;
            }
        }
        // A live host process keeps its files: check before touching the pid file.
        ControlServer::check_free(&socket)?;
        let me = std::process::id().to_string();
        let tmp = pid_path.with_extension(format!("pid.{me}.tmp"));
        std::fs::write(&tmp, &me)
            .and_then(|()| std::fs::rename(&tmp, &pid_path))
            .map_err(|e| Error::io("write pid file", &pid_path, e))?;
        let listener = match unix::bind_socket(&socket) {
            Ok(l) => Arc::new(l),
            Err(e) => {
                if std::fs::read_to_string(&pid_path).is_ok_and(|p| p == me) {
                    let _ = std::fs::remove_file(&pid_path);
                }
                return Err(e);
            }
        };
        let (done_tx, done_rx) = crossbeam_channel::bounded(2);
        let shared = Arc::new(Shared {
            controller,
            stopping: AtomicBool::new(false),
            forcing: AtomicBool::new(false),
        });
        let server = ControlServer {
            socket,
            pid_path,
            listener,
            shared,
            done_tx,
            done_rx,
            closed: Arc::new(AtomicBool::new(false)),
        };
        server.spawn_threads()?;
        Ok(server)
    }

    /// Refuses a `socket` that a live host process serves ([`Error::SocketInUse`]): a
    /// host process checks before it boots anything, and [`ControlServer::start`] again.
    pub fn check_free(socket: &Path) -> Result<()> {
        match unix::dial(socket, Duration::from_millis(200)) {
            Ok(_) => Err(Error::SocketInUse { path: socket.to_path_buf() }),
            Err(_) => Ok(()),
        }
    }

    fn spawn_threads(&self) -> Result<()> {
        let (listener, shared, closed) = (self.listener.clone(), self.shared.clone(), self.closed.clone());
        let sock = self.socket.clone();
        thread::Builder::new()
            .name("vmhost-control".into())
            .spawn(move || {
                use crate::rate_limit::RateLimited;
                static FAILED: RateLimited = RateLimited::new(Duration::from_secs(1));
                static BUSY: RateLimited = RateLimited::new(Duration::from_secs(1));
                let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                for conn in listener.incoming() {
                    if closed.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(s) if unix::peer_allowed(&s, "control server") => {
                            if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                                BUSY.warn(|| {
                                    format!(
                                        "{}: {MAX_CONNECTIONS} control connections open; refusing more",
                                        sock.display()
                                    )
                                });
                                let busy = Response::error(format!(
                                    "busy: {MAX_CONNECTIONS} control requests in progress; try again"
                                ));
                                let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
                                let _ = (&s).write_all(busy.to_line().as_bytes());
                                continue;
                            }
                            active.fetch_add(1, Ordering::SeqCst);
                            let (shared, done) = (shared.clone(), active.clone());
                            let spawned =
                                thread::Builder::new().name("vmhost-control-conn".into()).spawn(move || {
                                    shared.serve_conn(s);
                                    done.fetch_sub(1, Ordering::SeqCst);
                                });
                            if spawned.is_err() {
                                active.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            FAILED.warn(|| format!("control accept on {}: {e}", sock.display()));
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
            .map_err(|e| Error::io("start control thread", &self.socket, e))?;
        let (controller, done) = (self.shared.controller.clone(), self.done_tx.clone());
        thread::Builder::new()
            .name("vmhost-control-wait".into())
            .spawn(move || {
                match controller.wait() {
                    Ok(()) => log::info!("VM exited"),
                    Err(e) => log::error!("VM exited with an error: {e}"),
                }
                let _ = done.try_send(());
            })
            .map_err(|e| Error::io("start VM wait thread", &self.socket, e))?;
        Ok(())
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Makes [`ControlServer::run`] return.
    pub fn shutdown(&self) {
        let _ = self.done_tx.try_send(());
    }

    /// A sender that makes [`ControlServer::run`] return (for signal handlers).
    pub fn shutdown_handle(&self) -> Sender<()> {
        self.done_tx.clone()
    }

    /// Blocks until the VM exits or [`ControlServer::shutdown`], then stops serving and
    /// removes the socket and the pid file.
    pub fn run(&self) -> Result<()> {
        let _ = self.done_rx.recv();
        // Let a stop in progress finish its last step (it ended the VM) before we go.
        let until = Instant::now() + Duration::from_secs(10);
        while (self.shared.stopping.load(Ordering::SeqCst) || self.shared.forcing.load(Ordering::SeqCst))
            && Instant::now() < until
        {
            thread::sleep(Duration::from_millis(10));
        }
        self.cleanup();
        Ok(())
    }

    fn cleanup(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        unix::shutdown_listener(&self.listener);
        for p in [&self.socket, &self.pid_path] {
            if let Err(e) = std::fs::remove_file(p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("remove {}: {e}", p.display());
                }
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A client of a host process's control socket: 5 s to connect, 30 s for the exchange.
///
/// ```no_run
/// let c = vmhost::server::control::ControlClient::new("/var/lib/vms/a/vmhost.sock");
/// let r = c.status()?;
/// println!("{}", r.state);
/// # Ok::<(), vmhost::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ControlClient {
    socket: PathBuf,
}

impl ControlClient {
    /// A client for `socket`.
    pub fn new(socket: impl AsRef<Path>) -> ControlClient {
        ControlClient { socket: socket.as_ref().to_path_buf() }
    }

    /// Sends one request and reads the reply.
    pub fn request(&self, req: &Request) -> Result<Response> {
        let start = Instant::now();
        let stream = unix::dial(&self.socket, DIAL_TIMEOUT)?;
        // A commit moves the guest's changes: minutes for gigabytes, not seconds.
        let deadline = if req.method == "commit" { COMMIT_DEADLINE } else { EXCHANGE_DEADLINE };
        let left = deadline.saturating_sub(start.elapsed()).max(Duration::from_millis(1));
        let io = |e: std::io::Error| {
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                Error::Timeout { op: format!("control {}", req.method), after: deadline }
            } else {
                Error::io("control exchange", &self.socket, e)
            }
        };
        stream.set_read_timeout(Some(left)).map_err(io)?;
        stream.set_write_timeout(Some(left)).map_err(io)?;
        let mut line = serde_json::to_string(req)
            .map_err(|e| Error::Control { method: req.method.clone(), message: e.to_string() })?;
        line.push('\n');
        (&stream).write_all(line.as_bytes()).map_err(io)?;
        let mut reply = String::new();
        BufReader::new((&stream).take(MAX_REPLY)).read_line(&mut reply).map_err(io)?;
        if reply.is_empty() {
            return Err(Error::Control {
                method: req.method.clone(),
                message: "no reply: the host process closed the connection".into(),
            });
        }
        serde_json::from_str(&reply).map_err(|e| Error::Control {
            method: req.method.clone(),
            message: format!("bad reply {:?}: {e}", reply.trim_end()),
        })
    }

    fn method(&self, method: &str, timeout_seconds: i64) -> Result<Response> {
        self.request(&Request {
            method: method.into(),
            timeout_seconds,
            name: String::new(),
            excludes: Vec::new(),
        })
    }

    /// `commit`: snapshot the guest's root, leaving out `excludes`, and keep it as the
    /// image `name`.
    pub fn commit(&self, name: &str, excludes: &[String]) -> Result<Response> {
        self.request(&Request {
            method: "commit".into(),
            timeout_seconds: 0,
            name: name.into(),
            excludes: excludes.to_vec(),
        })
    }

    /// `status`: the VM state.
    pub fn status(&self) -> Result<Response> {
        self.method("status", 0)
    }

    /// `info`: state, SSH port and backend.
    pub fn info(&self) -> Result<Response> {
        self.method("info", 0)
    }

    /// `stop` with a per-step timeout in seconds (<= 0 for the default 30 s).
    pub fn stop(&self, timeout_seconds: i64) -> Result<Response> {
        self.method("stop", timeout_seconds)
    }

    /// `force_stop`.
    pub fn force_stop(&self) -> Result<Response> {
        self.method("force_stop", 0)
    }

    /// Whether the host process answers a status request with `ok` (as mb's
    /// `IsAlive`): a host that answers with an error is not alive.
    pub fn is_alive(&self) -> bool {
        self.status().is_ok_and(|r| r.ok)
    }
}
