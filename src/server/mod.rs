//! The helper-process side of the helper protocol.
//!
//! A [`Server`] listens on a Unix socket and runs one thread per connection. On each
//! connection requests are served one at a time, in order: read a frame, hand it to the
//! [`Handler`], write the answer. Concurrency comes from several connections (the
//! [`crate::client::Client`] opens one per concurrent caller), all served against the one
//! VM the helper owns, so a blocking call on one connection never stalls another.
//!
//! A [`Mux`] maps message types to handler functions and is what the helper registers
//! its messages with ([`helper`]). The control protocol of the per-VM host process lives
//! in [`control`].
//!
//! Failure rules:
//! - an unknown message type gets an Error frame, code 2, `unknown message type: 0x....`;
//! - a malformed payload gets an Error frame, code 2, naming the message;
//! - a handler that panics gets an Error frame, code 99, and the connection goes on;
//! - a frame over the size bound gets an Error frame, code 2, and the connection is closed
//!   (its remaining bytes cannot be skipped safely);
//! - a peer running as another uid (SO_PEERCRED) is dropped before anything is read.

mod cmd;
mod command;
mod console;
pub mod control;
pub mod first_command;
mod fs;
#[cfg(test)]
mod guestless;
mod hangup;
pub mod helper;
mod instance;
mod net;
mod pipes;
mod session;
mod snapshot;
mod table;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::unix;
use crate::wire::{self, msg, DecodeError, Decoder, ErrorCode, ErrorFrame, FrameError};

/// Identifies one connection of a server, unique for the server's life.
pub type ConnId = u64;

/// The typed answer to one request, as a handler returns it: nothing is encoded until
/// the socket layer writes it ([`Server`]), and the library's in-process mode never
/// encodes it at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A Response frame: the OK byte, then the fields the catalogue gives the request.
    Response(wire::Response),
    /// The end of a streaming answer (CmdRunStreaming): the command's exit code.
    StreamEnd(wire::StreamEnd),
}

impl From<wire::Response> for Answer {
    fn from(r: wire::Response) -> Answer {
        Answer::Response(r)
    }
}

impl Answer {
    /// The frame that carries it: type and payload.
    pub fn to_frame(&self) -> (u16, Vec<u8>) {
        use crate::wire::Wire;
        match self {
            Answer::Response(r) => (msg::RESPONSE, r.to_payload()),
            Answer::StreamEnd(e) => (msg::STREAM_END, e.to_payload()),
        }
    }
}

/// The Error frame for a crate error, naming `path` when the error names none.
pub(crate) fn frame(e: &Error, path: &str) -> ErrorFrame {
    let mut f = e.to_frame("");
    if f.path.is_empty() {
        f.path = path.to_string();
    }
    f
}

pub(crate) fn not_yet(what: &str) -> ErrorFrame {
    ErrorFrame::new(ErrorCode::InvalidArgument, "", format!("{what} is not supported by this build yet"))
}

impl From<DecodeError> for ErrorFrame {
    fn from(e: DecodeError) -> ErrorFrame {
        ErrorFrame::new(ErrorCode::InvalidArgument, "", format!("bad payload: {e}"))
    }
}

/// The outcome of a handler: an answer, or an Error frame.
pub type HandlerResult = std::result::Result<Answer, ErrorFrame>;

/// Where the output chunks of a streaming call go, ahead of its answer: `(stream, bytes)`
/// with stream [`wire::STREAM_STDOUT`] or [`wire::STREAM_STDERR`]. On a socket each is a
/// [`msg::STREAM_CHUNK`] frame; in-process they reach the caller as they are.
pub type ChunkSink<'a> = &'a mut dyn FnMut(u8, &[u8]) -> std::result::Result<(), FrameError>;

/// The request being served, with a way to send frames before the final answer
/// (streaming) and who is asking.
pub struct Call<'a> {
    conn: ConnId,
    sink: ChunkSink<'a>,
    cancel: Option<&'a AtomicBool>,
}

impl<'a> std::fmt::Debug for Call<'a> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call").finish_non_exhaustive()
    }
}

impl<'a> Call<'a> {
    /// A call whose output chunks go to `sink` (for serving without a socket: the
    /// library's in-process mode).
    pub fn new(conn: ConnId, sink: ChunkSink<'a>) -> Call<'a> {
        Call { conn, sink, cancel: None }
    }

    /// Whether the client went away while this request was being served: a handler
    /// that blocks checks this and gives up (ending what it started for the client).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::SeqCst))
    }

    /// A check of [`Call::is_cancelled`] that does not borrow the call, for use beside
    /// [`Call::send_chunk`].
    pub fn canceller(&self) -> impl Fn() -> bool + 'a {
        let c = self.cancel;
        move || c.is_some_and(|c| c.load(Ordering::SeqCst))
    }

    /// The connection the request came on.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Sends a chunk of a command's output ahead of the final answer.
    pub fn send_chunk(&mut self, stream: u8, data: &[u8]) -> std::result::Result<(), FrameError> {
        (self.sink)(stream, data)
    }
}

/// Serves requests. Implementations must be thread-safe: every connection thread calls
/// them.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, call: &mut Call<'_>, ty: u16, payload: &[u8]) -> HandlerResult;

    /// A connection was accepted.
    fn connected(&self, _conn: ConnId) {}

    /// A connection ended (by either side).
    fn disconnected(&self, _conn: ConnId) {}
}

type MuxFn = Box<dyn Fn(&mut Call<'_>, &mut Decoder<'_>) -> HandlerResult + Send + Sync>;

/// Maps message types to handler functions.
///
/// A handler decodes its arguments from the [`Decoder`] (decode errors convert with `?`
/// into an Error frame, code 2) and calls [`Decoder::finish`] before acting, so that a
/// request with trailing garbage does nothing. An Error frame returned without an `op`
/// gets the message's name as its op.
///
/// ```
/// use vmhost::server::Mux;
/// use vmhost::wire::{msg, Response};
/// let mut mux = Mux::new();
/// mux.register(msg::INSTANCE_ID, |_call, dec| {
///     dec.finish()?;
///     Ok(Response::InstanceId { id: "vm-1".into() }.into())
/// });
/// ```
#[derive(Default)]
pub struct Mux {
    handlers: HashMap<u16, MuxFn>,
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mux").finish_non_exhaustive()
    }
}

impl Mux {
    /// An empty mux: every type is unknown.
    pub fn new() -> Mux {
        Mux::default()
    }

    /// Registers (or replaces) the handler of `ty`.
    pub fn register<F>(&mut self, ty: u16, f: F) -> &mut Self
    where
        F: Fn(&mut Call<'_>, &mut Decoder<'_>) -> HandlerResult + Send + Sync + 'static,
    {
        self.handlers.insert(ty, Box::new(f));
        self
    }

    /// Whether `ty` has a handler.
    pub fn handles(&self, ty: u16) -> bool {
        self.handlers.contains_key(&ty)
    }
}

impl Handler for Mux {
    fn handle(&self, call: &mut Call<'_>, ty: u16, payload: &[u8]) -> HandlerResult {
        let Some(f) = self.handlers.get(&ty) else {
            return Err(ErrorFrame::new(
                ErrorCode::InvalidArgument,
                wire::type_name(ty),
                format!("unknown message type: {ty:#06x}"),
            ));
        };
        let mut dec = Decoder::new(payload);
        f(call, &mut dec).map_err(|mut e| {
            if e.op.is_empty() {
                e.op = wire::type_name(ty);
            }
            e
        })
    }
}

/// Settings of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest request payload accepted, in bytes.
    pub max_frame: u32,
    /// Connections served at once; more are answered with an Error frame and closed.
    /// The default, [`default_max_connections`], leaves most descriptors to the rest.
    pub max_connections: usize,
    /// How long a request frame may take to arrive once its first byte has: a peer that
    /// stops inside a frame gets an Error frame (code 5) and is closed after at most
    /// 1.5 times this. Idle connections between frames are not bounded.
    pub frame_timeout: std::time::Duration,
    /// For [`Server::serve_until_idle`]: how long to wait for the first client before
    /// giving up (a client that died before connecting must not leave us running).
    pub first_client_timeout: std::time::Duration,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            max_frame: wire::DEFAULT_MAX_FRAME,
            max_connections: default_max_connections(),
            frame_timeout: std::time::Duration::from_secs(30),
            first_client_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// Connections a server takes by default: a quarter of the descriptors this process may
/// open beyond 64 (a connection holds two, and the VM, the control socket and the log
/// need theirs), at most 1024 and at least 8 ([`crate::unix::fd_limit`]; vmhost's own
/// processes raise it to the hard limit first, [`crate::unix::raise_fd_limit`]).
pub fn default_max_connections() -> usize {
    (crate::unix::fd_limit().saturating_sub(64) / 4).clamp(8, 1024) as usize
}

/// Reads a connection's frames: without a bound while it is idle between frames, and
/// within a deadline once a frame has begun. The socket's own read timeout is half the
/// frame timeout, so that an idle read wakes now and then and a slow drip of bytes is
/// caught at the next read past the deadline.
struct FrameReader<'a> {
    stream: &'a UnixStream,
    timeout: std::time::Duration,
    /// When the frame being read began.
    began: Option<std::time::Instant>,
}

impl Read for FrameReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.began.is_some_and(|t| t.elapsed() >= self.timeout) {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the request frame stalled"));
            }
            match (&mut &*self.stream).read(buf) {
                Ok(n) => {
                    if n > 0 && self.began.is_none() {
                        self.began = Some(std::time::Instant::now());
                    }
                    return Ok(n);
                }
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

enum Accepted {
    Conn(UnixStream),
    Nothing,
    Closed,
}

struct Inner {
    path: PathBuf,
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    opts: ServerOptions,
    closed: AtomicBool,
    next_conn: AtomicU64,
    conns: Mutex<HashMap<ConnId, UnixStream>>,
    /// Connections accepted and not finished (counted at accept, before their thread).
    active: AtomicUsize,
    /// Written to when `active` drops to zero, to wake [`Server::serve_until_idle`].
    idle_wake: (UnixStream, UnixStream),
    /// Notices clients that hang up while a handler runs.
    watch: hangup::Watcher,
    /// Requests being served (read and not yet answered).
    busy: AtomicUsize,
}

/// A helper-protocol server on a Unix socket.
///
/// ```no_run
/// use std::sync::Arc;
/// use vmhost::server::{Mux, Server};
/// let server = Server::bind("/tmp/vmhost-doc/helper.sock", Arc::new(Mux::new())).unwrap();
/// let s2 = server.clone();
/// std::thread::spawn(move || s2.serve());
/// // ... later, from any thread:
/// server.close();
/// ```
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl Server {
    /// Binds `path` (see [`crate::unix::bind_socket`] for permissions and stale sockets).
    pub fn bind(path: impl AsRef<Path>, handler: Arc<dyn Handler>) -> Result<Server> {
        Server::bind_with(path, handler, ServerOptions::default())
    }

    /// Binds `path` with explicit options.
    pub fn bind_with(
        path: impl AsRef<Path>,
        handler: Arc<dyn Handler>,
        opts: ServerOptions,
    ) -> Result<Server> {
        let path = path.as_ref().to_path_buf();
        let listener = unix::bind_socket(&path)?;
        let idle_wake = UnixStream::pair()
            .and_then(|(a, b)| {
                a.set_nonblocking(true)?;
                b.set_nonblocking(true)?;
                Ok((a, b))
            })
            .map_err(|e| Error::io("create wake-up pair", &path, e))?;
        Ok(Server {
            inner: Arc::new(Inner {
                path,
                listener,
                handler,
                opts,
                closed: AtomicBool::new(false),
                next_conn: AtomicU64::new(1),
                conns: Mutex::new(HashMap::new()),
                active: AtomicUsize::new(0),
                idle_wake,
                watch: hangup::Watcher::default(),
                busy: AtomicUsize::new(0),
            }),
        })
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.inner.path
    }

    /// Number of connections being served.
    pub fn connections(&self) -> usize {
        self.inner.conns.lock().len()
    }

    /// Whether [`Server::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Accepts connections until [`Server::close`], serving each on its own thread.
    pub fn serve(&self) -> Result<()> {
        while let Some(stream) = self.accept()? {
            self.spawn_conn(stream);
        }
        Ok(())
    }

    /// Like [`Server::serve`], but also returns once at least one connection was served
    /// and none is left, with none waiting to be accepted: the helper's lifetime rule
    /// (it lives as long as its clients). Decided on the accepting thread, so a client
    /// that connected before the last one left is never turned away.
    pub fn serve_until_idle(&self) -> Result<()> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let started = std::time::Instant::now();
        let mut served_any = false;
        loop {
            if self.is_closed() {
                return Ok(());
            }
            let timeout = if served_any {
                PollTimeout::NONE
            } else {
                let left = self.inner.opts.first_client_timeout.saturating_sub(started.elapsed());
                if left.is_zero() {
                    log::warn!(
                        "{}: no client came within {:?}; exiting",
                        self.inner.path.display(),
                        self.inner.opts.first_client_timeout
                    );
                    return Ok(());
                }
                PollTimeout::try_from(left.as_millis().min(60_000) as u64 as i32).unwrap_or(PollTimeout::MAX)
            };
            let (listen_ready, wake_ready) = {
                let mut fds = [
                    PollFd::new(self.inner.listener.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.inner.idle_wake.1.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(Error::io("poll", &self.inner.path, e.into())),
                }
                let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                (ready(&fds[0]), ready(&fds[1]))
            };
            if wake_ready {
                let mut buf = [0u8; 64];
                while matches!((&self.inner.idle_wake.1).read(&mut buf), Ok(n) if n > 0) {}
            }
            if listen_ready {
                match self.accept_once()? {
                    Accepted::Conn(stream) => {
                        served_any = true;
                        self.spawn_conn(stream);
                    }
                    Accepted::Nothing => {}
                    Accepted::Closed => return Ok(()),
                }
            } else if served_any && self.inner.active.load(Ordering::SeqCst) == 0 {
                log::info!("{}: last client gone", self.inner.path.display());
                return Ok(());
            }
        }
    }

    /// Registers the connection on the accepting thread (so that connections are
    /// registered in accept order, and close() sees every accepted one), then serves it
    /// on a thread of its own.
    fn spawn_conn(&self, stream: UnixStream) {
        self.inner.active.fetch_add(1, Ordering::SeqCst);
        let Some(id) = self.inner.register(&stream) else { return };
        let inner = self.inner.clone();
        let spawned =
            thread::Builder::new().name("vmhost-conn".into()).spawn(move || inner.serve_conn(id, stream));
        if let Err(e) = spawned {
            log::error!("cannot start a connection thread: {e}");
            self.inner.conns.lock().remove(&id);
            self.inner.conn_finished();
        }
    }

    /// Accepts one connection and serves it on the calling thread until it ends (the
    /// one-connection-per-instance model). Returns at once if the server is closed.
    pub fn serve_one(&self) -> Result<()> {
        if let Some(stream) = self.accept()? {
            self.inner.active.fetch_add(1, Ordering::SeqCst);
            if let Some(id) = self.inner.register(&stream) {
                self.inner.clone().serve_conn(id, stream);
            }
        }
        Ok(())
    }

    /// Accepts the next connection from an allowed peer; `None` once closed.
    fn accept(&self) -> Result<Option<UnixStream>> {
        loop {
            match self.accept_once()? {
                Accepted::Conn(s) => return Ok(Some(s)),
                Accepted::Closed => return Ok(None),
                Accepted::Nothing => {}
            }
        }
    }

    /// One accept: a connection from an allowed peer, nothing (a refused peer, a
    /// transient error), or the server is closed.
    fn accept_once(&self) -> Result<Accepted> {
        if self.is_closed() {
            return Ok(Accepted::Closed);
        }
        match self.inner.listener.accept() {
            Ok((stream, _)) => {
                if self.is_closed() {
                    return Ok(Accepted::Closed);
                }
                if !unix::peer_allowed(&stream, "helper server") {
                    return Ok(Accepted::Nothing);
                }
                if self.inner.active.load(Ordering::SeqCst) >= self.inner.opts.max_connections {
                    static REFUSED: crate::rate_limit::RateLimited =
                        crate::rate_limit::RateLimited::new(std::time::Duration::from_secs(1));
                    REFUSED.warn(|| {
                        format!(
                            "{}: refusing a connection: {} already open",
                            self.inner.path.display(),
                            self.inner.opts.max_connections
                        )
                    });
                    let ef = ErrorFrame::new(
                        ErrorCode::Unknown,
                        "",
                        format!("too many connections (limit {})", self.inner.opts.max_connections),
                    );
                    let _ = send_error(&mut &stream, &ef, self.inner.opts.max_frame);
                    return Ok(Accepted::Nothing);
                }
                Ok(Accepted::Conn(stream))
            }
            Err(_) if self.is_closed() => Ok(Accepted::Closed),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(Accepted::Nothing),
            Err(e) if is_transient_accept_error(&e) => {
                static FAILED: crate::rate_limit::RateLimited =
                    crate::rate_limit::RateLimited::new(std::time::Duration::from_secs(1));
                FAILED.warn(|| format!("accept on {}: {e}", self.inner.path.display()));
                thread::sleep(std::time::Duration::from_millis(10));
                Ok(Accepted::Nothing)
            }
            Err(e) => Err(Error::io("accept", &self.inner.path, e)),
        }
    }

    /// Stops serving: unblocks `serve`/`serve_one`, lets the requests being served be
    /// answered (for at most [`CLOSE_GRACE`]: a client gets its Error frame, not an
    /// EOF, when the VM ended under its call), ends every connection, removes the socket
    /// file. Idempotent.
    pub fn close(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        unix::shutdown_listener(&self.inner.listener);
        let until = std::time::Instant::now() + CLOSE_GRACE;
        while self.inner.busy.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < until {
            thread::sleep(std::time::Duration::from_millis(5));
        }
        for (_, s) in self.inner.conns.lock().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Err(e) = std::fs::remove_file(&self.inner.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("remove socket {}: {e}", self.inner.path.display());
            }
        }
    }
}

/// How long [`Server::close`] lets requests in progress finish.
pub const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use nix::libc;
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    )
}

impl Inner {
    fn conn_finished(&self) {
        if self.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _ = (&self.idle_wake.0).write(&[1]);
        }
    }

    /// Gives an accepted connection its id and keeps a handle on it for close(); None
    /// (the connection dropped and counted finished) when it cannot be.
    fn register(&self, stream: &UnixStream) -> Option<u64> {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        match stream.try_clone() {
            Ok(c) => {
                self.conns.lock().insert(id, c);
                Some(id)
            }
            Err(e) => {
                log::error!("connection {id}: cannot register: {e}");
                self.conn_finished();
                None
            }
        }
    }

    fn serve_conn(self: Arc<Self>, id: u64, mut stream: UnixStream) {
        // close() may have run between accept and registration.
        if !self.closed.load(Ordering::SeqCst) {
            self.handler.connected(id);
            self.conn_loop(id, &mut stream);
            self.handler.disconnected(id);
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
        self.conns.lock().remove(&id);
        self.conn_finished();
    }

    fn conn_loop(&self, id: ConnId, stream: &mut UnixStream) {
        let max = self.opts.max_frame;
        let timeout = self.opts.frame_timeout.max(std::time::Duration::from_millis(2));
        if let Err(e) = stream.set_read_timeout(Some(timeout / 2)) {
            log::warn!("connection {id}: cannot bound its reads: {e}");
            return;
        }
        loop {
            let mut reader = FrameReader { stream, timeout, began: None };
            let frame = match wire::read_frame(&mut reader, max) {
                Ok(f) => f,
                Err(FrameError::Eof) => return,
                Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    log::debug!("connection {id}: a request frame stalled for {timeout:?}; closing it");
                    let ef = ErrorFrame::new(
                        ErrorCode::Timeout,
                        "",
                        format!(
                            "the request frame did not arrive whole within {:.1} s",
                            timeout.as_secs_f64()
                        ),
                    );
                    let _ = send_error(stream, &ef, max);
                    return;
                }
                Err(e @ FrameError::TooLarge { .. }) => {
                    let op = match &e {
                        FrameError::TooLarge { ty, .. } => wire::type_name(*ty),
                        _ => String::new(),
                    };
                    log::warn!("connection {id}: {e}; closing it");
                    let ef = ErrorFrame::new(ErrorCode::InvalidArgument, op, e.to_string());
                    let _ = send_error(stream, &ef, max);
                    return;
                }
                Err(e) => {
                    if !self.closed.load(Ordering::SeqCst) {
                        log::debug!("connection {id}: {e}");
                    }
                    return;
                }
            };
            self.busy.fetch_add(1, Ordering::SeqCst);
            let sent = self.answer(id, stream, frame);
            self.busy.fetch_sub(1, Ordering::SeqCst);
            if let Err(e) = sent {
                log::debug!("connection {id}: cannot answer: {e}");
                return;
            }
        }
    }

    /// Serves one request and writes its answer.
    fn answer(
        &self,
        id: ConnId,
        stream: &mut UnixStream,
        frame: wire::Frame,
    ) -> std::result::Result<(), FrameError> {
        let max = self.opts.max_frame;
        {
            let guard = self.watch.watch(stream);
            let reply = {
                let mut sink = |s: u8, data: &[u8]| {
                    wire::write_frame(
                        &mut *stream,
                        msg::STREAM_CHUNK,
                        &wire::StreamChunk::payload(s, data),
                        max,
                    )
                };
                let mut call = Call { conn: id, sink: &mut sink, cancel: Some(guard.flag()) };
                let handler = &self.handler;
                panic::catch_unwind(AssertUnwindSafe(|| handler.handle(&mut call, frame.ty, &frame.payload)))
                    .unwrap_or_else(|p| {
                        let what = panic_message(&p);
                        log::error!(
                            "connection {id}: {} handler panicked: {what}",
                            wire::type_name(frame.ty)
                        );
                        Err(ErrorFrame::new(
                            ErrorCode::Unknown,
                            wire::type_name(frame.ty),
                            format!("internal error: handler panicked: {what}"),
                        ))
                    })
            };
            let sent =
                match reply {
                    Ok(answer) => {
                        let (ty, payload) = answer.to_frame();
                        match wire::write_frame(stream, ty, &payload, max) {
                            Err(FrameError::TooLarge { len, .. }) => {
                                let ef = ErrorFrame::new(
                            ErrorCode::InvalidArgument,
                            wire::type_name(frame.ty),
                            format!("answer of {len} bytes exceeds the {max}-byte frame limit; ask for less"),
                        );
                                send_error(stream, &ef, max)
                            }
                            other => other,
                        }
                    }
                    Err(ef) => send_error(stream, &ef, max),
                };
            sent
        }
    }
}

fn send_error(stream: &mut impl Write, ef: &ErrorFrame, max: u32) -> std::result::Result<(), FrameError> {
    use crate::wire::Wire;
    wire::write_frame(stream, msg::ERROR, &ef.to_payload(), max)?;
    stream.flush()?;
    Ok(())
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: make sure the socket file is too.
        if !self.closed.swap(true, Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
