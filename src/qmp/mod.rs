//! QMP, the QEMU Machine Protocol: a client that never hangs and never mixes up replies.
//!
//! QMP is JSON lines over a socket. The server greets, the client sends
//! `qmp_capabilities` to leave negotiation mode, then commands
//! (`{"execute": NAME, "arguments": {...}, "id": ID}`) are answered with
//! `{"return": ..., "id": ID}` or `{"error": {"class", "desc"}, "id": ID}`, while
//! events (`{"event", "data", "timestamp"}`) may arrive at any moment, even before the
//! greeting and between a command and its reply.
//!
//! How this client stays correct where public clients went wrong:
//!
//! - One reader thread owns the read side. It routes each reply by its `id` to the one
//!   caller waiting for it (a crossbeam channel per call), and each event to every
//!   [`Listener`]. An event is never taken for a reply, and concurrent callers never see
//!   each other's replies.
//! - Every wait has a deadline: the greeting, the capabilities reply, every command. A
//!   reply that comes after its caller gave up is dropped and counted.
//! - Listeners have bounded channels; a full listener loses events (counted in
//!   [`Listener::dropped`]) instead of blocking the reader, so replies keep flowing.
//! - Lines up to [`DEFAULT_MAX_LINE`] (32 MiB) are read; a longer one breaks the
//!   connection with a clear error. Malformed lines are counted and skipped, up to
//!   [`MAX_MALFORMED`] in a row, after which the connection is declared broken.
//! - When the connection ends (EOF, reset, [`Client::close`]), every waiting caller and
//!   every listener gets the error at once, and [`Client::is_connected`] turns false.
//!
//! ```no_run
//! use std::time::Duration;
//! use vmhost::qmp::{cmd, Client};
//! let stream = std::os::unix::net::UnixStream::connect("/run/vm/qmp.sock")?;
//! let client = Client::connect(stream, Duration::from_secs(5))?;
//! println!("QEMU {}", client.server_info().qmp.version.qemu);
//! let events = client.listen(64);
//! client.execute(&cmd::SystemPowerdown, Duration::from_secs(5))?;
//! let ev = events.recv_timeout(Duration::from_secs(5))?;
//! assert_eq!(ev.event, "POWERDOWN");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod cmd;
pub mod msg;

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::Mutex;
use serde_json::Value;

pub use msg::{ErrorBody, Event, Greeting, Timestamp, VersionInfo};

use msg::Incoming;

/// The longest line read by default: 32 MiB.
pub const DEFAULT_MAX_LINE: usize = 32 << 20;
/// Malformed lines in a row tolerated before the connection is declared broken.
pub const MAX_MALFORMED: u64 = 100;

/// Errors of the QMP client.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// QEMU answered the command with an error.
    Qmp {
        /// The command.
        command: String,
        /// The error class (GenericError, CommandNotFound, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer within the deadline.
    Timeout {
        /// What was awaited: a command name, "greeting" or "event".
        what: String,
        /// The deadline.
        after: Duration,
    },
    /// The connection ended; every pending call and listener gets this.
    Disconnected {
        /// Why it ended.
        reason: String,
    },
    /// The client was closed.
    Closed,
    /// Writing or setting up the stream failed.
    Io {
        /// What was being done.
        op: String,
        /// The OS error.
        message: String,
        /// Its kind.
        kind: io::ErrorKind,
    },
    /// A reply did not have the shape the command's return type needs.
    Decode {
        /// The command.
        command: String,
        /// What did not fit.
        message: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Qmp { command, class, desc } => write!(f, "QMP {command}: {class}: {desc}"),
            Error::Timeout { what, after } if what == "greeting" => write!(
                f,
                "QMP: no greeting within {:.1} s: QEMU is stopped or busy, or another client holds its QMP socket",
                after.as_secs_f64()
            ),
            Error::Timeout { what, after } => {
                write!(f, "QMP {what}: no answer within {:.1} s (is QEMU stopped or busy?)", after.as_secs_f64())
            }
            Error::Disconnected { reason } => write!(f, "QMP connection lost: {reason}"),
            Error::Closed => write!(f, "QMP client closed"),
            Error::Io { op, message, .. } => write!(f, "QMP {op}: {message}"),
            Error::Decode { command, message } => write!(f, "QMP {command}: unexpected return value: {message}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    fn io(op: impl Into<String>, e: &io::Error) -> Error {
        Error::Io { op: op.into(), message: e.to_string(), kind: e.kind() }
    }
}

/// A byte stream a [`Client`] can run over: it must be cloneable, so that one thread
/// reads while callers write, and shut down from any thread.
pub trait Stream: Read + Write + Send + Sync + 'static {
    /// Another handle on the same stream.
    fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>>;
    /// Sets the write timeout.
    fn set_write_deadline(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Shuts both directions down, waking a blocked reader.
    fn shutdown_stream(&self);
}

macro_rules! socket_stream {
    ($($t:ty),*) => {$(
        impl Stream for $t {
            fn try_clone_stream(&self) -> io::Result<Box<dyn Stream>> {
                Ok(Box::new(self.try_clone()?))
            }
            fn set_write_deadline(&self, timeout: Option<Duration>) -> io::Result<()> {
                self.set_write_timeout(timeout)
            }
            fn shutdown_stream(&self) {
                let _ = self.shutdown(std::net::Shutdown::Both);
            }
        }
    )*};
}

socket_stream!(UnixStream, TcpStream);

#[derive(Debug, Clone)]
enum ConnState {
    Connected,
    Broken(String),
    Closed,
}

struct Slot {
    id: u64,
    tx: Sender<Event>,
    dropped: Arc<AtomicU64>,
}

struct Shared {
    writer: Mutex<Box<dyn Stream>>,
    closer: Box<dyn Stream>,
    pending: Mutex<HashMap<u64, Sender<Result<Value, Error>>>>,
    listeners: Mutex<Vec<Slot>>,
    state: Mutex<ConnState>,
    greeting: OnceLock<Greeting>,
    next_id: AtomicU64,
    next_listener: AtomicU64,
    malformed: AtomicU64,
    unmatched: AtomicU64,
}

impl Shared {
    fn error(&self) -> Option<Error> {
        match &*self.state.lock() {
            ConnState::Connected => None,
            ConnState::Broken(reason) => Some(Error::Disconnected { reason: reason.clone() }),
            ConnState::Closed => Some(Error::Closed),
        }
    }

    /// Ends the connection: records why, fails every pending call, releases listeners.
    fn end(&self, reason: Option<String>) {
        {
            let mut st = self.state.lock();
            if let (ConnState::Connected, Some(r)) = (&*st, reason) {
                log::debug!("QMP connection ended: {r}");
                *st = ConnState::Broken(r);
            }
        }
        self.closer.shutdown_stream();
        let err = self.error().unwrap_or(Error::Closed);
        for (_, tx) in self.pending.lock().drain() {
            let _ = tx.send(Err(err.clone()));
        }
        self.listeners.lock().clear();
    }

    fn deliver_event(&self, ev: Event) {
        for slot in self.listeners.lock().iter() {
            match slot.tx.try_send(ev.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    slot.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
}

/// A QMP connection. Cheap to clone; all clones share the connection, which closes
/// when the last clone is dropped. `Send + Sync`: any number of threads may execute
/// commands at once.
#[derive(Clone)]
pub struct Client {
    handle: Arc<Handle>,
}

/// Owned by the user-facing clones only (the reader thread holds [`Shared`]), so that
/// dropping the last [`Client`] closes the connection and ends the reader.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        close_shared(&self.shared);
    }
}

fn close_shared(sh: &Shared) {
    {
        let mut st = sh.state.lock();
        if matches!(*st, ConnState::Connected) {
            *st = ConnState::Closed;
        }
    }
    sh.end(None);
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("qmp::Client").field("connected", &self.is_connected()).finish()
    }
}

impl Client {
    /// Connects over `stream`: waits up to `timeout` for the greeting, sends
    /// `qmp_capabilities` and waits for its reply in what is left of `timeout`.
    pub fn connect<S: Stream>(stream: S, timeout: Duration) -> Result<Client, Error> {
        Client::connect_with(stream, timeout, DEFAULT_MAX_LINE, None).map(|(c, _)| c)
    }

    /// Like [`Client::connect`], with a listener that exists from the first byte, so
    /// that events sent before the greeting or before the capabilities reply reach it.
    pub fn connect_with_listener<S: Stream>(
        stream: S,
        timeout: Duration,
        capacity: usize,
    ) -> Result<(Client, Listener), Error> {
        let (c, l) = Client::connect_with(stream, timeout, DEFAULT_MAX_LINE, Some(capacity))?;
        Ok((c, l.expect("listener requested")))
    }

    /// The general form: a line-length bound and an optional early listener.
    pub fn connect_with<S: Stream>(
        stream: S,
        timeout: Duration,
        max_line: usize,
        early_listener: Option<usize>,
    ) -> Result<(Client, Option<Listener>), Error> {
        let start = Instant::now();
        let reader = stream.try_clone_stream().map_err(|e| Error::io("clone stream", &e))?;
        let closer = stream.try_clone_stream().map_err(|e| Error::io("clone stream", &e))?;
        stream
            .set_write_deadline(Some(timeout.max(Duration::from_secs(1))))
            .map_err(|e| Error::io("set write timeout", &e))?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(Box::new(stream)),
            closer,
            pending: Mutex::new(HashMap::new()),
            listeners: Mutex::new(Vec::new()),
            state: Mutex::new(ConnState::Connected),
            greeting: OnceLock::new(),
            next_id: AtomicU64::new(1),
            next_listener: AtomicU64::new(1),
            malformed: AtomicU64::new(0),
            unmatched: AtomicU64::new(0),
        });
        let client = Client { handle: Arc::new(Handle { shared: shared.clone() }) };
        let early = early_listener.map(|cap| client.listen(cap));
        let (greet_tx, greet_rx) = crossbeam_channel::bounded(1);
        thread::Builder::new()
            .name("vmhost-qmp-reader".into())
            .spawn(move || reader_loop(shared, reader, max_line, greet_tx))
            .map_err(|e| Error::io("start reader thread", &e))?;

        let greeted = greet_rx.recv_timeout(timeout);
        if greeted.is_err() {
            let err = client
                .handle
                .shared
                .error()
                .unwrap_or(Error::Timeout { what: "greeting".into(), after: timeout });
            client.close();
            return Err(err);
        }
        let left = timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(1));
        if let Err(e) = client.execute(&cmd::QmpCapabilities, left) {
            client.close();
            return Err(e);
        }
        Ok((client, early))
    }

    /// The greeting the server sent: QEMU's version and capabilities.
    pub fn server_info(&self) -> &Greeting {
        self.handle.shared.greeting.get().expect("connect returns only after the greeting")
    }

    /// Whether the connection is up.
    pub fn is_connected(&self) -> bool {
        matches!(*self.handle.shared.state.lock(), ConnState::Connected)
    }

    /// Runs a typed command.
    pub fn execute<C: cmd::Command>(&self, command: &C, timeout: Duration) -> Result<C::Returns, Error> {
        let v = self.execute_raw(C::NAME, command.arguments(), timeout)?;
        serde_json::from_value(v)
            .map_err(|e| Error::Decode { command: C::NAME.into(), message: e.to_string() })
    }

    /// Runs any command by name with optional arguments and returns its `return` value.
    pub fn execute_raw(
        &self,
        name: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, Error> {
        let sh = &self.handle.shared;
        let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        sh.pending.lock().insert(id, tx);
        // Checked after registering: the reader fails every registered call when the
        // connection ends, and this catches an end that came before we registered.
        if let Some(e) = sh.error() {
            sh.pending.lock().remove(&id);
            return Err(e);
        }
        let mut msg = serde_json::Map::new();
        msg.insert("execute".into(), Value::String(name.into()));
        if let Some(args) = arguments {
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), Value::from(id));
        let mut line = serde_json::to_vec(&Value::Object(msg)).map_err(|e| Error::Decode {
            command: name.into(),
            message: format!("cannot encode the command: {e}"),
        })?;
        line.push(b'\n');
        let start = Instant::now();
        let written = match sh.writer.try_lock_for(timeout) {
            None => {
                sh.pending.lock().remove(&id);
                return Err(Error::Timeout { what: name.into(), after: timeout });
            }
            Some(mut w) => {
                let left = timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(1));
                w.set_write_deadline(Some(left)).and_then(|()| w.write_all(&line)).and_then(|()| w.flush())
            }
        };
        if let Err(e) = written {
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
                sh.pending.lock().remove(&id);
                sh.end(Some(format!(
                    "QEMU stopped reading: sending {name} did not finish within {timeout:?}"
                )));
                return Err(Error::Timeout { what: name.into(), after: timeout });
            }
            sh.pending.lock().remove(&id);
            // A partial line cannot be taken back: the connection is unusable now.
            let err = sh.error().unwrap_or_else(|| Error::io(format!("send {name}"), &e));
            sh.end(Some(format!("sending {name} failed: {e}")));
            return Err(err);
        }
        match rx.recv_timeout(timeout.saturating_sub(start.elapsed())) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(Error::Qmp { class, desc, .. })) => Err(Error::Qmp { command: name.into(), class, desc }),
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => {
                sh.pending.lock().remove(&id);
                // The reply may have been routed between the timeout and the removal.
                match rx.try_recv() {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(Error::Qmp { class, desc, .. })) => {
                        Err(Error::Qmp { command: name.into(), class, desc })
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(Error::Timeout { what: name.into(), after: timeout }),
                }
            }
            Err(RecvTimeoutError::Disconnected) => Err(sh.error().unwrap_or(Error::Closed)),
        }
    }

    /// A new listener receiving every event from now on, holding up to `capacity`
    /// undelivered events (further ones are dropped and counted).
    pub fn listen(&self, capacity: usize) -> Listener {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        let id = self.handle.shared.next_listener.fetch_add(1, Ordering::Relaxed);
        let dropped = Arc::new(AtomicU64::new(0));
        {
            // Checked under the listeners lock: `end` sets the state first, then clears
            // the listeners under this lock, so a listener is either cleared or never added.
            let mut listeners = self.handle.shared.listeners.lock();
            if self.is_connected() {
                listeners.push(Slot { id, tx, dropped: dropped.clone() });
            }
        }
        Listener { id, rx, dropped, shared: self.handle.shared.clone() }
    }

    /// Lines that were not valid QMP and were skipped.
    pub fn malformed_lines(&self) -> u64 {
        self.handle.shared.malformed.load(Ordering::Relaxed)
    }

    /// Replies that matched no waiting call (late replies after a timeout, or replies
    /// without an id) and were dropped.
    pub fn unmatched_replies(&self) -> u64 {
        self.handle.shared.unmatched.load(Ordering::Relaxed)
    }

    /// Closes the connection: pending calls and listeners get [`Error::Closed`].
    pub fn close(&self) {
        close_shared(&self.handle.shared);
    }
}

/// Reads lines until EOF, error or close; routes replies and events.
fn reader_loop(sh: Arc<Shared>, stream: Box<dyn Stream>, max_line: usize, greet_tx: Sender<()>) {
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    let mut line = Vec::new();
    let mut consecutive_bad = 0u64;
    let reason = loop {
        match read_line(&mut reader, &mut line, max_line) {
            Ok(true) => {}
            Ok(false) => break "QEMU closed the connection".to_string(),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => break e.to_string(),
            Err(e) => break format!("read failed: {e}"),
        }
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        let incoming = msg::parse_line(trimmed);
        if !matches!(incoming, Incoming::Malformed(_)) {
            consecutive_bad = 0;
        }
        match incoming {
            Incoming::Greeting(g) => {
                if sh.greeting.set(g).is_ok() {
                    let _ = greet_tx.try_send(());
                } else {
                    log::warn!("QMP: a second greeting, ignored");
                    sh.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Incoming::Event(ev) => sh.deliver_event(ev),
            Incoming::Reply { id, result } => {
                let waiter = id.as_ref().and_then(Value::as_u64).and_then(|id| sh.pending.lock().remove(&id));
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(result.map_err(|b| Error::Qmp {
                            command: String::new(),
                            class: b.class,
                            desc: b.desc,
                        }));
                    }
                    None => {
                        sh.unmatched.fetch_add(1, Ordering::Relaxed);
                        log::debug!("QMP: reply with id {id:?} matches no waiting call; dropped");
                    }
                }
            }
            Incoming::Malformed(why) => {
                sh.malformed.fetch_add(1, Ordering::Relaxed);
                consecutive_bad += 1;
                log::warn!("QMP: skipped a malformed line ({why})");
                if consecutive_bad >= MAX_MALFORMED {
                    break format!("{consecutive_bad} malformed lines in a row; the last: {why}");
                }
                continue;
            }
        }
    };
    let closed_by_us = matches!(*sh.state.lock(), ConnState::Closed);
    sh.end(if closed_by_us { None } else { Some(reason) });
}

/// Reads one line into `buf` (newline excluded). `Ok(false)` at EOF before any byte. A
/// line longer than `max` is an `InvalidData` error; memory never exceeds `max` plus one
/// buffer.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> io::Result<bool> {
    buf.clear();
    loop {
        let (done, used) = {
            let chunk = match r.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                return if buf.is_empty() {
                    Ok(false)
                } else {
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a line"))
                };
            }
            match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    buf.extend_from_slice(&chunk[..i]);
                    (true, i + 1)
                }
                None => {
                    buf.extend_from_slice(chunk);
                    (false, chunk.len())
                }
            }
        };
        r.consume(used);
        if buf.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line longer than {max} bytes; refusing to buffer it"),
            ));
        }
        if done {
            return Ok(true);
        }
    }
}

/// Receives events. Dropping or closing it removes it from the client.
pub struct Listener {
    id: u64,
    rx: Receiver<Event>,
    dropped: Arc<AtomicU64>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").finish_non_exhaustive()
    }
}

impl Listener {
    /// The next event, waiting up to `timeout`. After the connection ends, events
    /// already received are still returned, then the connection's error.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Event, Error> {
        match self.rx.recv_timeout(timeout) {
            Ok(ev) => Ok(ev),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout { what: "event".into(), after: timeout }),
            Err(RecvTimeoutError::Disconnected) => Err(self.shared.error().unwrap_or(Error::Closed)),
        }
    }

    /// The next event, waiting as long as the connection lives.
    pub fn recv(&self) -> Result<Event, Error> {
        self.rx.recv().map_err(|_| self.shared.error().unwrap_or(Error::Closed))
    }

    /// An event if one is waiting.
    pub fn try_recv(&self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Events lost because this listener was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stops receiving: the client forgets this listener.
    pub fn close(&self) {
        self.shared.listeners.lock().retain(|s| s.id != self.id);
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.close();
    }
}

/// Iterates over events until the connection ends.
impl Iterator for &Listener {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.recv().ok()
    }
}
