//! The agent server: the agent protocol on the virtio-serial port, and the processes
//! it runs.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::pool::Pool;
use super::process::{feed_stdin, send_output, start, Proc, REAPER_DELAY, WAIT_DELAY};
use super::writer::Writer;
use super::{say, spawn, trace};
use crate::contract::proto::{self, AgentError, ExecRequest};
use crate::contract::PORT_NAME;
use crate::wire::{Decoder, Encoder, ErrorCode};

/// The process the host asked for on the kernel command line ([`proto::FIRST_EXEC_VAR`]),
/// started before the server runs: the request, and the process or why it could not
/// start.
#[derive(Debug)]
pub struct First {
    req: ExecRequest,
    started: Result<spawn::Spawned, AgentError>,
}

impl First {
    /// Starts the process `param` (the value of init's [`proto::FIRST_EXEC_VAR`]) asks
    /// for. Called right after the server's Hello is on its way, so that the command
    /// runs while the host reads the Hello and answers it.
    pub fn start(param: &std::ffi::OsStr) -> First {
        let req = param.to_str().ok_or_else(|| format!("{}: not UTF-8", proto::FIRST_EXEC_VAR));
        let (req, started) = match req.and_then(proto::decode_first_exec) {
            Ok(req) => {
                let started = start(&req);
                (req, started)
            }
            Err(m) => (ExecRequest::default(), Err(AgentError::new(ErrorCode::InvalidArgument, m))),
        };
        match &started {
            Ok(child) => {
                trace(format_args!("first process started at boot: {} (pid {})", req.program, child.pid))
            }
            Err(e) => trace(format_args!("first process not started: {}", e.message)),
        }
        First { req, started }
    }
}

/// Runs the server until the channel fails for good. The guest is set up by then.
/// `first`: the value of [`proto::FIRST_EXEC_VAR`], the process to start at boot. It
/// starts after the Hello is written, not before: a command that ends the guest at
/// once (a crash, a power-off) must not end it before the host knows that the agent
/// ran, or the host would report a guest that did not boot instead of how it ended.
pub fn run(first: Option<std::ffi::OsString>) -> i32 {
    let port = match find_port(Duration::from_secs(60)) {
        Some(p) => p,
        None => {
            say(format_args!("no virtio port named {PORT_NAME} appeared"));
            return 1;
        }
    };
    let file = match OpenOptions::new().read(true).write(true).open(&port) {
        Ok(f) => f,
        Err(e) => {
            say(format_args!("open {port}: {e}"));
            return 1;
        }
    };
    let writer = match file.try_clone() {
        Ok(w) => Writer(Arc::new(Mutex::new((w, Vec::new())))),
        Err(e) => {
            say(format_args!("clone {port}: {e}"));
            return 1;
        }
    };
    trace(format_args!("agent port {port} open; saying Hello"));
    let mut hello = Encoder::new();
    hello
        .u32(proto::VERSION)
        .string(concat!("vmhost-agent ", env!("CARGO_PKG_VERSION")))
        .u8(u8::from(first.is_some()));
    writer.send(proto::HELLO, 0, hello.as_bytes());
    let first = first.map(|p| First::start(&p));
    let server = Arc::new(Server {
        tunnel: Arc::new(super::tunnel::Tunnel::new(writer.clone())),
        writer,
        procs: Mutex::new(HashMap::new()),
        files: super::fs::Files::new(),
        snapshots: Mutex::new(HashMap::new()),
        fs_pool: Arc::new(Pool::new(MAX_FS_WORKERS)),
        proc_pool: Arc::new(Pool::new(usize::MAX)),
        ends_at_eof: false,
    });
    // Started while the host answers the Hello: the worker for the first command. The
    // reaper starts once a command has run a while or has ended (spawn::start_reaper).
    server.proc_pool.start_worker();
    if let Some(First { req, started }) = first {
        let id = proto::FIRST_EXEC_ID;
        let started = started.map(|child| server.clone().adopt(id, &req, child));
        server.answer_exec(id, &req, started);
    }
    server.serve(file)
}

/// The agent's server over any stream `port` (one end of a socket pair), its files
/// below `root` (see [`super::fs::Files::with_root`]): the middle of vmhost (the helper's
/// Fs and File handlers, the agent link, the agent's file serving) tested without a
/// guest. It says Hello and serves until the other end closes. Exec runs processes on
/// this host as this process's children, and the agent's reaper waits for every child:
/// serve processes only in a process of its own (`server::guestless` re-runs its test
/// binary for it).
pub fn serve_over(port: File, root: std::path::PathBuf) -> i32 {
    let writer = match port.try_clone() {
        Ok(w) => Writer(Arc::new(Mutex::new((w, Vec::new())))),
        Err(e) => {
            say(format_args!("clone the stream: {e}"));
            return 1;
        }
    };
    let mut hello = Encoder::new();
    hello.u32(proto::VERSION).string("vmhost-agent (in-process)").u8(0);
    writer.send(proto::HELLO, 0, hello.as_bytes());
    let server = Arc::new(Server {
        tunnel: Arc::new(super::tunnel::Tunnel::new(writer.clone())),
        writer,
        procs: Mutex::new(HashMap::new()),
        files: super::fs::Files::with_root(root),
        snapshots: Mutex::new(HashMap::new()),
        fs_pool: Arc::new(Pool::new(MAX_FS_WORKERS)),
        proc_pool: Arc::new(Pool::new(usize::MAX)),
        ends_at_eof: true,
    });
    server.serve(port)
}

/// Finds `/dev/vportNpM` whose port name is [`PORT_NAME`], waiting for it to appear.
/// vmhost's machines give the agent port 1 of their one virtio-serial device, which is
/// their first virtio device (`virtio0`, hence `vport0p1`): that port is asked first,
/// before a scan of every port (its name is checked either way).
fn find_port(timeout: Duration) -> Option<String> {
    let named = |port: &std::path::Path| {
        std::fs::read_to_string(port.join("name")).is_ok_and(|n| n.trim() == PORT_NAME)
    };
    let deadline = Instant::now() + timeout;
    loop {
        if named(std::path::Path::new("/sys/class/virtio-ports/vport0p1")) {
            return Some("/dev/vport0p1".into());
        }
        if let Ok(dir) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in dir.flatten() {
                if named(&e.path()) {
                    return Some(format!("/dev/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

struct Server {
    writer: Writer,
    /// Connections between host and guest programs (see [`proto::LISTEN`]).
    tunnel: Arc<super::tunnel::Tunnel>,
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
    files: super::fs::Files,
    /// Snapshots started and not yet ended, by the archive's file handle.
    snapshots: Mutex<HashMap<u64, std::thread::JoinHandle<Result<super::snapshot::Summary, String>>>>,
    /// Serves filesystem requests (a FileRead of a FIFO may block for long).
    fs_pool: Arc<Pool>,
    /// Carries each process's output and end: one worker per running process.
    proc_pool: Arc<Pool>,
    /// Whether the end of the stream ends the server (a socket's, in tests) rather than
    /// meaning "no host yet" (the virtio port's).
    ends_at_eof: bool,
}

/// The most threads serving filesystem requests at once.
const MAX_FS_WORKERS: usize = 32;

impl Server {
    fn serve(self: Arc<Self>, mut port: File) -> i32 {
        let me = self;
        loop {
            // A large payload (file data) goes into a kept buffer, which the fs
            // request gives back when it is answered.
            let buffer = |len| {
                if len >= super::buffers::BIG {
                    super::buffers::take(len)
                } else {
                    Vec::with_capacity(len)
                }
            };
            match proto::read_frame_into(&mut port, buffer) {
                Ok(Some(f)) if f.ty == proto::FS => me.dispatch_fs(f),
                // Off the read loop: a snapshot's end waits for its walk, which waits
                // for the host to read the archive.
                Ok(Some(f)) if f.ty == proto::SNAPSHOT || f.ty == proto::SNAPSHOT_END => {
                    let me2 = me.clone();
                    me.fs_pool.run(move || me2.serve_snapshot(f));
                }
                // A connection's bytes go to its writing thread as they were read.
                Ok(Some(f)) if f.ty == proto::CONN_DATA => me.tunnel.data(f.id, f.payload),
                Ok(Some(f)) => {
                    me.handle(&f);
                    // A large one (stdin data) came from the kept buffers.
                    super::buffers::give(f.payload);
                }
                Ok(None) if me.ends_at_eof => return 0,
                // The host end is not connected (yet, or any more): keep the port open
                // and wait, as closing and reopening it loses data.
                Ok(None) => thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    say(format_args!("agent channel: {e}"));
                    // A broken frame cannot be skipped: resynchronising is impossible.
                    return 1;
                }
            }
        }
    }

    /// Answers a frame other than [`proto::FS`] (see [`Self::dispatch_fs`]).
    fn handle(self: &Arc<Self>, f: &proto::Frame) {
        let w = &self.writer;
        let mut d = Decoder::new(&f.payload);
        match f.ty {
            proto::HELLO_ACK => {
                if let Ok(v) = d.u32() {
                    if v != proto::VERSION {
                        say(format_args!("host speaks agent protocol {v}, we speak {}", proto::VERSION));
                    }
                }
            }
            proto::PING => w.ok(f.id, &[]),
            proto::NETWORK_UP => {
                // The listeners' address goes on lo before eth0 routes anything: a packet
                // for it must never leave the guest.
                match self
                    .tunnel
                    .address()
                    .map_err(|e| e.message)
                    .and_then(|()| super::network::configure_network())
                {
                    Ok(()) => w.ok(f.id, &[]),
                    Err(e) => w.error(f.id, ErrorCode::Network, &format!("configure the guest network: {e}")),
                }
            }
            proto::NETWORK_DOWN => match super::network::unconfigure_network() {
                Ok(()) => w.ok(f.id, &[]),
                Err(e) => w.error(f.id, ErrorCode::Network, &format!("take the guest network down: {e}")),
            },
            proto::LISTEN => match d.u16() {
                Ok(port) => self.tunnel.listen(f.id, port),
                Err(_) => w.error(f.id, ErrorCode::InvalidArgument, "bad Listen payload"),
            },
            proto::LISTEN_CLOSE => match d.u32() {
                Ok(listener) => self.tunnel.close_listener(f.id, listener),
                Err(_) => w.error(f.id, ErrorCode::InvalidArgument, "bad ListenClose payload"),
            },
            proto::CONNECT => match d.string() {
                Ok(address) => self.tunnel.connect(f.id, address),
                Err(_) => w.error(f.id, ErrorCode::InvalidArgument, "bad Connect payload"),
            },
            proto::CONN_CREDIT => {
                if let Ok(n) = d.u32() {
                    self.tunnel.credit(f.id, n);
                }
            }
            proto::CONN_CLOSE => self.tunnel.close(f.id),
            proto::EXEC => match ExecRequest::decode(&f.payload) {
                Ok(req) => {
                    let started = self.clone().spawn(f.id, &req);
                    self.answer_exec(f.id, &req, started);
                }
                Err(e) => w.error(f.id, ErrorCode::InvalidArgument, &format!("bad Exec payload: {e}")),
            },
            proto::STDIN => {
                let (Ok(pid), Ok(data)) = (d.u32(), d.bytes()) else {
                    return w.error(f.id, ErrorCode::InvalidArgument, "bad Stdin payload");
                };
                let proc = self.procs.lock().get(&pid).cloned();
                match proc.as_ref().and_then(|p| p.stdin.as_ref()) {
                    Some(tx) => {
                        if tx.send((f.id, data)).is_err() {
                            w.error(f.id, ErrorCode::AlreadyClosed, "stdin is closed");
                        }
                    }
                    None => w.error(
                        f.id,
                        ErrorCode::InvalidHandle,
                        &format!("no process {pid} with a stdin pipe"),
                    ),
                }
            }
            proto::SIGNAL => {
                let (Ok(pid), Ok(sig)) = (d.u32(), d.i32()) else {
                    return w.error(f.id, ErrorCode::InvalidArgument, "bad Signal payload");
                };
                let proc = self.procs.lock().get(&pid).cloned();
                match proc {
                    Some(p) => match spawn::signal(p.token, p.pid, sig) {
                        Ok(()) => w.ok(f.id, &[]),
                        Err(e) => w.error(f.id, ErrorCode::Io, &format!("signal {sig} to {}: {e}", p.pid)),
                    },
                    None => w.error(f.id, ErrorCode::InvalidHandle, &format!("no running process {pid}")),
                }
            }
            proto::RESIZE => {
                let (Ok(id), Ok(cols), Ok(rows)) = (d.u32(), d.u16(), d.u16()) else {
                    return w.error(f.id, ErrorCode::InvalidArgument, "bad Resize payload");
                };
                let proc = self.procs.lock().get(&id).cloned();
                match proc.as_ref().and_then(|p| p.pty.as_ref()) {
                    Some(pty) => {
                        let ws = spawn::winsize(cols, rows);
                        // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
                        let r = unsafe {
                            nix::libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(pty), nix::libc::TIOCSWINSZ, &ws)
                        };
                        if r == 0 {
                            w.ok(f.id, &[]);
                        } else {
                            let e = std::io::Error::last_os_error();
                            w.error(
                                f.id,
                                ErrorCode::Io,
                                &format!("resize the terminal of process {id}: {e}"),
                            );
                        }
                    }
                    None => {
                        w.error(f.id, ErrorCode::InvalidHandle, &format!("no process {id} on a terminal"))
                    }
                }
            }
            proto::CREDIT => {
                if let (Ok(pid), Ok(n)) = (d.u32(), d.u32()) {
                    if let Some(p) = self.procs.lock().get(&pid) {
                        *p.credit.lock() += n as u64;
                        p.credit_cv.notify_all();
                    }
                }
            }
            proto::SHUTDOWN => {
                w.ok(f.id, &[]);
                say(format_args!("shutdown requested"));
                super::power::power_off();
            }
            other => {
                w.error(f.id, ErrorCode::InvalidArgument, &format!("unknown agent message type {other:#06x}"))
            }
        }
    }

    /// Hands a filesystem request to the pool.
    fn dispatch_fs(self: &Arc<Self>, f: proto::Frame) {
        let me = self.clone();
        self.fs_pool.run(move || me.serve_fs(f));
    }

    fn serve_fs(&self, f: proto::Frame) {
        let mut d = Decoder::new(&f.payload);
        let Ok(ty) = d.u16() else {
            return self.writer.error(f.id, ErrorCode::InvalidArgument, "bad Fs payload");
        };
        match self.files.serve(ty, &f.payload[2..]) {
            Ok(answer) => {
                self.writer.ok(f.id, &answer);
                super::buffers::give(answer);
            }
            Err(e) => self.writer.fail(f.id, &e),
        }
        super::buffers::give(f.payload);
    }

    /// Starts a snapshot ([`proto::SNAPSHOT`]) or answers for its end
    /// ([`proto::SNAPSHOT_END`]).
    fn serve_snapshot(&self, f: proto::Frame) {
        let w = &self.writer;
        let mut d = Decoder::new(&f.payload);
        if f.ty == proto::SNAPSHOT {
            let (Ok(excludes), Ok(pause)) = (d.string_list(), d.bool()) else {
                return w.error(f.id, ErrorCode::InvalidArgument, "bad Snapshot payload");
            };
            let started = match super::snapshot::start(excludes, pause) {
                Ok(s) => s,
                Err(e) => return w.fail(f.id, &e),
            };
            match self.files.adopt(started.reader, "snapshot".into()) {
                Ok(h) => {
                    self.snapshots.lock().insert(h, started.walk);
                    w.ok(f.id, &h.to_be_bytes());
                }
                // The walk ends on the closed pipe.
                Err(e) => w.fail(f.id, &e),
            }
            return;
        }
        let Ok(h) = d.u64() else {
            return w.error(f.id, ErrorCode::InvalidArgument, "bad SnapshotEnd payload");
        };
        let Some(walk) = self.snapshots.lock().remove(&h) else {
            return w.error(f.id, ErrorCode::InvalidHandle, &format!("no snapshot {h}"));
        };
        match walk.join() {
            Ok(Ok(s)) => {
                let mut out = Vec::with_capacity(16);
                out.extend_from_slice(&s.entries.to_be_bytes());
                out.extend_from_slice(&s.bytes.to_be_bytes());
                w.ok(f.id, &out);
            }
            Ok(Err(e)) => w.error(f.id, ErrorCode::Io, &e),
            Err(_) => w.error(f.id, ErrorCode::Io, "the snapshot's walk failed"),
        }
    }

    /// Answers an Exec (or the first process, started at boot): OK with the pid, or the
    /// error.
    fn answer_exec(&self, id: u32, req: &ExecRequest, started: Result<i32, AgentError>) {
        match started {
            Ok(pid) => {
                self.writer.ok(id, &(pid as u32).to_be_bytes());
                trace(format_args!("process {id} started: {} (pid {pid})", req.program));
            }
            Err(e) => {
                self.writer.fail(id, &e);
                // A failed start may leave a child to reap (a pty child killed when its
                // ends could not be set).
                spawn::start_reaper();
            }
        }
    }

    /// Starts a process as process `id` (see [`start`] and [`Server::adopt`]).
    fn spawn(self: Arc<Self>, id: u32, req: &ExecRequest) -> Result<i32, AgentError> {
        if self.procs.lock().contains_key(&id) {
            return Err(AgentError::new(ErrorCode::InvalidArgument, format!("process id {id} is in use")));
        }
        let child = start(req)?;
        Ok(self.adopt(id, req, child))
    }

    /// Makes a started process process `id`: a pool worker carries its output and exit,
    /// and a thread of its own feeds a piped stdin. Returns its pid.
    fn adopt(self: Arc<Self>, id: u32, req: &ExecRequest, child: spawn::Spawned) -> i32 {
        let (pid, token, pidfd, ends) = (child.pid, child.token, child.pidfd, child.ends);
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tty = req.tty.is_some();
        let stdin = ends.stdin.filter(|_| req.stdin).map(|pipe| {
            let (tx, rx) = crossbeam_channel::unbounded();
            let (w, ended) = (self.writer.clone(), ended.clone());
            thread::spawn(move || feed_stdin(pipe, rx, w, ended, tty));
            tx
        });
        let proc = Arc::new(Proc {
            pid,
            token,
            credit: Mutex::new(proto::INITIAL_CREDIT as u64),
            credit_cv: Condvar::new(),
            stdin,
            pty: ends.pty,
            ended,
            detached: std::sync::atomic::AtomicBool::new(false),
        });
        self.procs.lock().insert(id, proc.clone());
        let mut pipes = vec![(1u8, ends.stdout)];
        pipes.extend(ends.stderr.map(|e| (2u8, e)));
        // One worker per process carries its output and its end (a pool: thread creation
        // is costly in an emulated guest kernel, and exec latency is what users feel).
        let pool = self.proc_pool.clone();
        pool.run(move || self.run_process(id, pidfd, &proc, pipes));
        pid
    }

    /// Forwards the process's output within its credit, then reports its end. Output
    /// of children that keep the pipes open after it exits is forwarded for
    /// [`WAIT_DELAY`], then drained and dropped.
    fn run_process(
        &self,
        id: u32,
        pidfd: Option<std::os::fd::OwnedFd>,
        proc: &Proc,
        mut pipes: Vec<(u8, std::fs::File)>,
    ) {
        use nix::libc;
        use std::os::fd::AsRawFd;
        let mut exited_at: Option<Instant> = None;
        let started = Instant::now();
        let mut buf = vec![0u8; proto::OUTPUT_CHUNK];
        while !pipes.is_empty() {
            let mut fds: Vec<libc::pollfd> = pipes
                .iter()
                .map(|(_, f)| libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 })
                .collect();
            if let (Some(p), None) = (&pidfd, exited_at) {
                fds.push(libc::pollfd { fd: p.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            }
            let timeout = match exited_at {
                Some(t) => match WAIT_DELAY.checked_sub(t.elapsed()) {
                    Some(left) => left.as_millis() as i32,
                    None => break,
                },
                // Until the reaper runs, wake up when this process has run REAPER_DELAY
                // (its output may keep coming, so the time counts from its start).
                None if !spawn::reaper_started() => match REAPER_DELAY.checked_sub(started.elapsed()) {
                    Some(left) if !left.is_zero() => left.as_millis().max(1) as i32,
                    _ => {
                        spawn::start_reaper();
                        continue;
                    }
                },
                // Without a pidfd the reaper tells this process's end (has_ended).
                None if pidfd.is_none() => 200,
                None => -1,
            };
            // SAFETY: `fds` is a valid array of pollfd on descriptors we hold open.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            if fds.len() > pipes.len() && fds[pipes.len()].revents != 0 {
                exited_at = Some(Instant::now());
                proc.ended.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            if pidfd.is_none() && exited_at.is_none() && spawn::has_ended(proc.token) {
                exited_at = Some(Instant::now());
            }
            let mut closed = Vec::new();
            for (i, fd) in fds.iter().take(pipes.len()).enumerate() {
                if fd.revents == 0 {
                    continue;
                }
                let (stream, file) = &mut pipes[i];
                match file.read(&mut buf) {
                    Ok(0) | Err(_) => closed.push(i),
                    Ok(n) => send_output(*stream, id, &buf[..n], proc, &self.writer),
                }
            }
            for i in closed.into_iter().rev() {
                pipes.remove(i);
            }
        }
        proc.ended.store(true, std::sync::atomic::Ordering::SeqCst);
        let status = spawn::wait(proc.token);
        proc.detach();
        for (_, mut file) in pipes {
            // Leftover children still write: keep draining so they never block.
            thread::spawn(move || while matches!(file.read(&mut [0u8; 4096]), Ok(n) if n > 0) {});
        }
        self.procs.lock().remove(&id);
        let (code, sig) = match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(c), _) => (c, 0),
                (None, Some(sig)) => (128 + sig, sig),
                _ => (-1, 0),
            },
            Err(_) => (-1, 0),
        };
        let mut e = Encoder::new();
        e.i32(code).i32(sig);
        self.writer.send(proto::EXIT, id, e.as_bytes());
        trace(format_args!("process {id} exited with {code}"));
        // After the Exit: the orphans it may have left.
        spawn::start_reaper();
    }
}
