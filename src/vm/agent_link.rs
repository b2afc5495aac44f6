//! The host end of the agent protocol ([`crate::contract::proto`]): one reader thread
//! routes answers to waiting requests by id and process output to per-process channels,
//! so that many requests and processes share the one channel.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use crate::contract::proto::{self, ExecRequest};
use crate::error::{Error, Result};
use crate::wire::{Decoder, Encoder, ErrorFrame};

/// How long the agent may take to start a process.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// What a running guest process reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcEvent {
    /// Output on stream 1 (stdout) or 2 (stderr).
    Output {
        /// 1 stdout, 2 stderr.
        stream: u8,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The process ended, after all its output.
    Exit {
        /// Exit code; 128 + signal when killed by one.
        code: i32,
        /// The signal that killed it, 0 if none.
        signal: i32,
    },
}

/// Where a request's answer goes: its payload, or the agent's error.
type Answer = Sender<std::result::Result<Vec<u8>, ErrorFrame>>;

/// A process's event channel and the output bytes it may still send.
struct Slot {
    tx: Sender<ProcEvent>,
    credit: u64,
}

struct Inner {
    writer: Mutex<UnixStream>,
    closer: UnixStream,
    pending: Mutex<HashMap<u32, Answer>>,
    procs: Mutex<HashMap<u32, Slot>>,
    next_id: AtomicU32,
    broken: Mutex<Option<String>>,
    /// Why the VM is ending, when the host ends it (e.g. its timeout): reported in
    /// preference to the bare loss of the channel.
    end_reason: Mutex<Option<String>>,
    /// The guest's first command, until an exec claims it.
    first: Mutex<Option<First>>,
    /// The tunnel's listeners and connections (see [`super::tunnel`]).
    routes: super::tunnel::Routes,
    /// Connections the reader refuses, for the thread that tells the guest: the reader
    /// itself never writes, or a writer blocked on a full channel could wait for it.
    refusals: Sender<u32>,
}

/// The guest's first command, until an exec claims it: its request, and the process
/// when the agent started it at boot.
struct First {
    req: ExecRequest,
    started: Option<Started>,
}

/// The process the agent started at boot ([`proto::FIRST_EXEC_ID`]): where the agent's
/// answer to it arrives, and its events.
struct Started {
    answer: Receiver<std::result::Result<Vec<u8>, ErrorFrame>>,
    events: Receiver<ProcEvent>,
}

impl Inner {
    fn error(&self, op: &str) -> Option<Error> {
        let broken = self.broken.lock().clone()?;
        let message = match self.end_reason.lock().clone() {
            Some(why) => format!("the VM stopped: {why}"),
            None => format!("agent channel lost: {broken}"),
        };
        Some(Error::Vm { op: op.into(), message })
    }

    fn fail_all(&self, reason: String) {
        self.broken.lock().get_or_insert(reason);
        let _ = self.closer.shutdown(std::net::Shutdown::Both);
        self.pending.lock().clear();
        self.procs.lock().clear();
        self.routes.end_all();
    }

    fn send(&self, ty: u16, id: u32, payload: &[u8]) -> Result<()> {
        let frame =
            proto::encode_frame(ty, id, payload).map_err(|e| Error::io("encode agent frame", "agent", e))?;
        let r = self.writer.lock().write_all(&frame);
        r.map_err(|e| {
            self.fail_all(format!("write failed: {e}"));
            self.error(proto::name(ty)).unwrap_or(Error::Closed)
        })
    }
}

/// A connection to the guest agent.
#[derive(Clone)]
pub struct AgentLink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink").finish_non_exhaustive()
    }
}

impl AgentLink {
    /// Waits up to `timeout` for the agent's HELLO on `stream`, answers it, and starts
    /// the reader. The guest speaks first, so this is also "wait until booted".
    ///
    /// `first`: the guest's first command (see [`check_first`]). The guest may have
    /// started it at boot, if the host could put it on its kernel command line (see
    /// [`proto::encode_first_exec`]); its Hello says. The first [`AgentLink::exec`] must
    /// ask for it, and takes that process over, or starts the command when there is none.
    pub fn connect(stream: UnixStream, timeout: Duration, first: Option<&ExecRequest>) -> Result<AgentLink> {
        let mut reader = stream.try_clone().map_err(|e| Error::io("clone agent channel", "agent", e))?;
        reader.set_read_timeout(Some(timeout)).map_err(|e| Error::io("agent channel", "agent", e))?;
        let hello = match proto::read_frame(&mut reader) {
            Ok(Some(f)) if f.ty == proto::HELLO => f,
            Ok(Some(f)) => {
                return Err(Error::Vm {
                    op: "boot".into(),
                    message: format!("agent sent {} before Hello", proto::name(f.ty)),
                })
            }
            Ok(None) => {
                return Err(Error::Vm {
                    op: "boot".into(),
                    message: "the agent channel closed before the agent said hello".into(),
                })
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(Error::Timeout { op: "boot: waiting for the guest agent".into(), after: timeout })
            }
            Err(e) => return Err(Error::Vm { op: "boot".into(), message: format!("agent channel: {e}") }),
        };
        let mut d = Decoder::new(&hello.payload);
        let version = d.u32().unwrap_or(0);
        let started_first = d.string().and_then(|_| d.u8()).is_ok_and(|f| f == 1);
        if version != proto::VERSION {
            return Err(Error::Vm {
                op: "boot".into(),
                message: format!(
                    "the guest agent speaks protocol {version}, this vmhost {}: rebuild the agent",
                    proto::VERSION
                ),
            });
        }
        reader.set_read_timeout(None).map_err(|e| Error::io("agent channel", "agent", e))?;
        // Bounded: past it a refusal is dropped (the guest keeps a connection nobody
        // reads, its own loss), never a reader that waits.
        let (refusals, refused) = crossbeam_channel::bounded::<u32>(1024);
        let closer = stream.try_clone().map_err(|e| Error::io("clone agent channel", "agent", e))?;
        let inner = Arc::new(Inner {
            writer: Mutex::new(stream),
            closer,
            pending: Mutex::new(HashMap::new()),
            procs: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(proto::FIRST_EXEC_ID + 1),
            broken: Mutex::new(None),
            end_reason: Mutex::new(None),
            first: Mutex::new(None),
            routes: super::tunnel::Routes::default(),
            refusals,
        });
        if let Some(req) = first {
            // Registered before the reader starts: the agent answers it, and the process
            // may write, right after its Hello.
            let started = started_first.then(|| {
                let id = proto::FIRST_EXEC_ID;
                let (tx, answer) = crossbeam_channel::bounded(1);
                inner.pending.lock().insert(id, tx);
                let (tx, events) = crossbeam_channel::unbounded();
                inner.procs.lock().insert(id, Slot { tx, credit: proto::INITIAL_CREDIT as u64 });
                Started { answer, events }
            });
            log::debug!("first command {:?}: started at boot: {}", req.program, started.is_some());
            *inner.first.lock() = Some(First { req: req.clone(), started });
        }
        let mut ack = Encoder::new();
        ack.u32(proto::VERSION);
        inner.send(proto::HELLO_ACK, 0, ack.as_bytes())?;
        let weak = Arc::downgrade(&inner);
        thread::Builder::new()
            .name("vmhost-agent-refuser".into())
            .spawn(move || {
                for id in refused {
                    let Some(inner) = weak.upgrade() else { return };
                    let _ = inner.send(proto::CONN_CLOSE, id, &[]);
                }
            })
            .map_err(|e| Error::io("start agent refuser", "agent", e))?;
        let r = inner.clone();
        thread::Builder::new()
            .name("vmhost-agent-link".into())
            .spawn(move || reader_loop(r, reader))
            .map_err(|e| Error::io("start agent reader", "agent", e))?;
        Ok(AgentLink { inner })
    }

    fn id(&self) -> u32 {
        loop {
            // Below the bit that marks the agent's connection ids.
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed) & !proto::GUEST_CONN_BIT;
            // 0 is for frames that answer nothing; the first process's id is its own.
            if id != 0 && id != proto::FIRST_EXEC_ID {
                return id;
            }
        }
    }

    /// A fresh request id, for a request whose id names something after it (a
    /// listener, a connection; none in use): see [`AgentLink::request_with_id`].
    pub(crate) fn new_id(&self) -> u32 {
        loop {
            let id = self.id();
            if !self.inner.routes.in_use(id) {
                return id;
            }
        }
    }

    /// The error of a call that found the channel ended.
    pub(crate) fn ended_error(&self, op: &str) -> Error {
        self.inner.error(op).unwrap_or(Error::Closed)
    }

    /// Sends a frame that is not answered; a failure ends the channel, which every
    /// waiter then hears of.
    pub(crate) fn send_frame(&self, ty: u16, id: u32, payload: &[u8]) {
        let _ = self.inner.send(ty, id, payload);
    }

    /// The tunnel's routes.
    pub(crate) fn routes(&self) -> &super::tunnel::Routes {
        &self.inner.routes
    }

    /// Whether the channel is up.
    pub fn is_alive(&self) -> bool {
        self.inner.broken.lock().is_none()
    }

    /// Sends a request and waits for its answer (`None`: no deadline).
    pub fn request(&self, ty: u16, payload: &[u8], timeout: Option<Duration>) -> Result<Vec<u8>> {
        self.request_with_id(self.id(), ty, payload, timeout)
    }

    /// Records why the VM is being ended, for the errors its callers will get.
    pub fn set_end_reason(&self, why: impl Into<String>) {
        self.inner.end_reason.lock().get_or_insert(why.into());
    }

    /// Starts a guest process (the agent must answer within `EXEC_TIMEOUT`). While the
    /// guest's first command (see [`AgentLink::connect`]) is unclaimed, only it may
    /// start ([`check_first`]); it takes over the process the guest started at boot, if
    /// there is one.
    pub fn exec(&self, req: &ExecRequest) -> Result<Process> {
        let mut first = self.inner.first.lock();
        if let Some(f) = first.as_ref() {
            check_first(&f.req, req)?;
            let First { req: asked, started } = first.take().expect("checked");
            drop(first);
            if let Some(Started { answer, events }) = started {
                let answer = self.answer(proto::FIRST_EXEC_ID, proto::EXEC, &answer, Some(EXEC_TIMEOUT));
                let p = self.process(proto::FIRST_EXEC_ID, req, events, answer)?;
                if asked.stdin && !req.stdin {
                    // Its input ended before it was asked for (see check_first); an
                    // error means it has exited already.
                    if let Err(e) = p.close_stdin() {
                        log::debug!("closing the first command's stdin: {e}");
                    }
                }
                return Ok(p);
            }
        } else {
            drop(first);
        }
        let id = self.id();
        // Unbounded, but never more than the credit granted: the reader enforces it.
        let (tx, rx) = crossbeam_channel::unbounded();
        // Registered before the request: output may come before the answer.
        self.inner.procs.lock().insert(id, Slot { tx, credit: proto::INITIAL_CREDIT as u64 });
        let mut e = Encoder::new();
        req.encode(&mut e);
        let answer = self.request_with_id(id, proto::EXEC, e.as_bytes(), Some(EXEC_TIMEOUT));
        self.process(id, req, rx, answer)
    }

    /// The process of an Exec answer (`u32 pid`), or the error that names it.
    fn process(
        &self,
        id: u32,
        req: &ExecRequest,
        events: Receiver<ProcEvent>,
        answer: Result<Vec<u8>>,
    ) -> Result<Process> {
        let pid = match answer {
            Ok(p) => Decoder::new(&p).u32().unwrap_or(0),
            Err(err) => {
                self.inner.procs.lock().remove(&id);
                return Err(match err {
                    Error::Remote(mut ef) => {
                        ef.op = "exec".into();
                        ef.path = req.program.clone();
                        Error::Remote(ef)
                    }
                    e => e,
                });
            }
        };
        Ok(Process { id, pid, events, link: self.clone() })
    }

    /// Sends request `ty` under `id` (an exec's, or one from [`AgentLink::new_id`]) and
    /// waits for its answer.
    pub(crate) fn request_with_id(
        &self,
        id: u32,
        ty: u16,
        payload: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.inner.pending.lock().insert(id, tx);
        // Checked after registering: the reader fails every registered request when the
        // channel ends, and this catches an end that came before.
        if let Some(e) = self.inner.error(proto::name(ty)) {
            self.inner.pending.lock().remove(&id);
            return Err(e);
        }
        self.inner.send(ty, id, payload)?;
        self.answer(id, ty, &rx, timeout)
    }

    /// Waits for the answer to request `id` of type `ty` on `rx`.
    fn answer(
        &self,
        id: u32,
        ty: u16,
        rx: &Receiver<std::result::Result<Vec<u8>, ErrorFrame>>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>> {
        let got = match timeout {
            Some(t) => rx.recv_timeout(t),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match got {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(ef)) => Err(Error::Remote(ef)),
            Err(RecvTimeoutError::Timeout) => {
                self.inner.pending.lock().remove(&id);
                Err(Error::Timeout {
                    op: format!("agent {}", proto::name(ty)),
                    after: timeout.unwrap_or_default(),
                })
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.inner.error(proto::name(ty)).unwrap_or(Error::Closed))
            }
        }
    }

    /// A filesystem request (an Fs* or File* helper-protocol request, file handles being
    /// the agent's): the answer is the helper protocol's response fields.
    pub fn fs(&self, req: &crate::wire::Request) -> Result<Vec<u8>> {
        self.fs_within(req, None)
    }

    /// [`AgentLink::fs`], giving up after `timeout` (a guest that stops answering).
    pub fn fs_within(&self, req: &crate::wire::Request, timeout: Option<Duration>) -> Result<Vec<u8>> {
        let mut e = Encoder::new();
        e.u16(req.ty());
        req.encode(&mut e);
        self.request(proto::FS, e.as_bytes(), timeout)
    }

    /// Has the guest configure its network interface (see [`proto::NETWORK_UP`]).
    pub fn network_up(&self, timeout: Duration) -> Result<()> {
        self.request(proto::NETWORK_UP, &[], Some(timeout)).map(drop)
    }

    /// Has the guest take its network interface down (see [`proto::NETWORK_DOWN`]).
    pub fn network_down(&self, timeout: Duration) -> Result<()> {
        self.request(proto::NETWORK_DOWN, &[], Some(timeout)).map(drop)
    }

    /// Asks the guest to sync and power off; returns once the agent acknowledged.
    pub fn shutdown(&self, timeout: Duration) -> Result<()> {
        self.request(proto::SHUTDOWN, &[], Some(timeout)).map(drop)
    }

    /// Closes the channel: every waiting request and process gets an error.
    pub fn close(&self) {
        self.inner.fail_all("closed".into());
    }
}

/// Whether `req` may run while `first`, the guest's first command, is unclaimed: only
/// when it is that very command (then it takes it over). Any other is refused, so that
/// a command that differs by a detail is never run a second time by mistake. One
/// difference is allowed: `req` without the stdin pipe `first` has. A client that
/// closes its stdin before the start (an empty input) asks for no pipe then, and the
/// first command's pipe is closed at once instead: it reads the end of its input,
/// as from /dev/null.
pub fn check_first(first: &ExecRequest, req: &ExecRequest) -> Result<()> {
    let differ: Vec<&str> = [
        ("program", first.program == req.program),
        ("arguments", first.args == req.args),
        ("environment", first.env == req.env),
        ("directory", first.dir == req.dir),
        ("user", first.user == req.user),
        ("stdin", first.stdin || !req.stdin),
        ("terminal", first.tty == req.tty),
    ]
    .into_iter()
    .filter_map(|(name, same)| (!same).then_some(name))
    .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        op: "exec".into(),
        message: format!(
            "{:?} is not this guest's first command, {:?} as given at boot (its {} {}): run that one first",
            req.program,
            first.program,
            differ.join(", "),
            if differ.len() == 1 { "differs" } else { "differ" }
        ),
    })
}

fn reader_loop(inner: Arc<Inner>, mut reader: UnixStream) {
    let reason = loop {
        let f = match proto::read_frame(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => break "the guest closed the channel (VM stopped?)".to_string(),
            Err(e) => break format!("read failed: {e}"),
        };
        match f.ty {
            proto::OK => {
                if let Some(tx) = inner.pending.lock().remove(&f.id) {
                    let _ = tx.send(Ok(f.payload));
                }
            }
            proto::ERROR => {
                let e = proto::AgentError::decode(&f.payload);
                let mut frame = ErrorFrame::new(e.code, "", e.message);
                if e.errno != 0 {
                    frame = frame.with_errno(e.errno);
                }
                if let Some(tx) = inner.pending.lock().remove(&f.id) {
                    let _ = tx.send(Err(frame));
                }
            }
            proto::OUTPUT => {
                let mut d = Decoder::new(&f.payload);
                if let (Ok(stream), Ok(data)) = (d.u8(), d.bytes()) {
                    let mut procs = inner.procs.lock();
                    if let Some(slot) = procs.get_mut(&f.id) {
                        // The guest is not trusted: output beyond the credit it was given
                        // would make us buffer without bound.
                        if data.len() as u64 > slot.credit {
                            break format!("the guest exceeded its output credit for process {}", f.id);
                        }
                        slot.credit -= data.len() as u64;
                        let _ = slot.tx.send(ProcEvent::Output { stream, data });
                    }
                }
            }
            proto::EXIT => {
                let mut d = Decoder::new(&f.payload);
                let code = d.i32().unwrap_or(-1);
                let signal = d.i32().unwrap_or(0);
                if let Some(slot) = inner.procs.lock().remove(&f.id) {
                    let _ = slot.tx.send(ProcEvent::Exit { code, signal });
                }
            }
            proto::ACCEPTED | proto::CONN_DATA | proto::CONN_CREDIT | proto::CONN_CLOSE => {
                match inner.routes.route(f) {
                    super::tunnel::Routed::Done => {}
                    super::tunnel::Routed::Refuse(id) => {
                        let _ = inner.refusals.try_send(id);
                    }
                    super::tunnel::Routed::Broken(why) => break why,
                }
            }
            other => log::warn!("agent sent unexpected message {other:#06x}"),
        }
    };
    log::debug!("agent link ended: {reason}");
    inner.fail_all(reason);
}

/// A process running in the guest.
#[derive(Debug)]
pub struct Process {
    id: u32,
    pid: u32,
    events: Receiver<ProcEvent>,
    link: AgentLink,
}

impl Process {
    /// The guest pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next event; an error when the channel to the guest is lost.
    pub fn recv(&self) -> Result<ProcEvent> {
        self.events.recv().map_err(|_| self.link.inner.error("wait").unwrap_or(Error::Closed))
    }

    /// Lets the guest send `n` more output bytes.
    pub fn grant(&self, n: u32) {
        match self.link.inner.procs.lock().get_mut(&self.id) {
            Some(slot) => slot.credit += n as u64,
            None => return, // exited
        }
        let mut e = Encoder::new();
        e.u32(self.id).u32(n);
        let _ = self.link.inner.send(proto::CREDIT, 0, e.as_bytes());
    }

    /// Writes to the process's stdin (it must have been started with a stdin pipe).
    pub fn write_stdin(&self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks((proto::MAX_FRAME as usize) / 2) {
            let mut e = Encoder::new();
            e.u32(self.id).bytes(chunk);
            self.link.request(proto::STDIN, e.as_bytes(), None)?;
        }
        Ok(())
    }

    /// Closes the process's stdin.
    pub fn close_stdin(&self) -> Result<()> {
        let mut e = Encoder::new();
        e.u32(self.id).bytes(&[]);
        self.link.request(proto::STDIN, e.as_bytes(), None).map(drop)
    }

    /// Resizes the process's terminal (it must have been started with a tty).
    pub fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        let mut e = Encoder::new();
        e.u32(self.id).u16(cols).u16(rows);
        self.link.request(proto::RESIZE, e.as_bytes(), Some(Duration::from_secs(10))).map(drop)
    }

    /// Sends `signal` to the process's group.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let mut e = Encoder::new();
        e.u32(self.id).i32(signal);
        self.link.request(proto::SIGNAL, e.as_bytes(), Some(Duration::from_secs(10))).map(drop)
    }

    /// Consumes events until the exit, passing output to `sink` and granting credit as
    /// it goes. Returns the exit code.
    pub fn drain(&self, sink: impl FnMut(u8, &[u8]) -> Result<()>) -> Result<i32> {
        self.drain_until(sink, &|| false)
    }

    /// Like [`Process::drain`], giving up when `cancelled()` turns true: the process is
    /// killed and the result is [`Error::Closed`].
    pub fn drain_until(
        &self,
        mut sink: impl FnMut(u8, &[u8]) -> Result<()>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<i32> {
        loop {
            // Checked on every event too: a process that never stops printing must not
            // outlive a consumer that went away.
            if cancelled() {
                let _ = self.signal(nix::libc::SIGKILL);
                return Err(Error::Closed);
            }
            let ev = match self.events.recv_timeout(Duration::from_millis(200)) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.link.inner.error("wait").unwrap_or(Error::Closed));
                }
            };
            match ev {
                ProcEvent::Output { stream, data } => {
                    if let Err(e) = sink(stream, &data) {
                        // Nobody takes the output any more: end the process.
                        let _ = self.signal(nix::libc::SIGKILL);
                        return Err(e);
                    }
                    self.grant(data.len() as u32);
                }
                ProcEvent::Exit { code, .. } => return Ok(code),
            }
        }
    }
}
