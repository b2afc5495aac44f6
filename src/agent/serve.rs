//! The agent server: the agent protocol on the virtio-serial port, and the processes
//! it runs.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

use super::proto::{self, ExecRequest};
use super::{say, PORT_NAME};
use crate::wire::{Decoder, Encoder, ErrorCode};

/// Runs the server until the channel fails for good.
pub fn run() -> i32 {
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
        Ok(w) => Writer(Arc::new(Mutex::new(w))),
        Err(e) => {
            say(format_args!("clone {port}: {e}"));
            return 1;
        }
    };
    let mut hello = Encoder::new();
    hello.u32(proto::VERSION).string(concat!("vmhost-agent ", env!("CARGO_PKG_VERSION")));
    writer.send(proto::HELLO, 0, hello.as_bytes());
    let server = Server { writer, procs: Mutex::new(HashMap::new()) };
    server.serve(file)
}

/// Finds `/dev/vportNpM` whose port name is [`PORT_NAME`], waiting for it to appear.
fn find_port(timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(dir) = std::fs::read_dir("/sys/class/virtio-ports") {
            for e in dir.flatten() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == PORT_NAME {
                    return Some(format!("/dev/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The write side of the port, shared by every thread that answers.
#[derive(Clone)]
struct Writer(Arc<Mutex<File>>);

impl Writer {
    fn send(&self, ty: u16, id: u32, payload: &[u8]) {
        let frame = match proto::encode_frame(ty, id, payload) {
            Ok(f) => f,
            Err(e) => {
                say(format_args!("cannot send {}: {e}", proto::name(ty)));
                return;
            }
        };
        if let Err(e) = self.0.lock().write_all(&frame) {
            say(format_args!("write to the host failed: {e}"));
        }
    }

    fn ok(&self, id: u32, payload: &[u8]) {
        self.send(proto::OK, id, payload);
    }

    fn error(&self, id: u32, code: ErrorCode, message: &str) {
        let mut e = Encoder::new();
        e.u8(code.as_u8()).string(message);
        self.send(proto::ERROR, id, e.as_bytes());
    }
}

/// A running process.
struct Proc {
    pid: i32,
    credit: Mutex<u64>,
    credit_cv: Condvar,
    stdin: Option<Sender<(u32, Vec<u8>)>>,
}

impl Proc {
    /// Waits for output credit and takes up to `want` bytes of it.
    fn take_credit(&self, want: usize) -> usize {
        let mut c = self.credit.lock();
        while *c == 0 {
            self.credit_cv.wait(&mut c);
        }
        let n = (*c).min(want as u64) as usize;
        *c -= n as u64;
        n
    }
}

struct Server {
    writer: Writer,
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
}

impl Server {
    fn serve(self, mut port: File) -> i32 {
        let me = Arc::new(self);
        loop {
            match proto::read_frame(&mut port) {
                Ok(Some(f)) => me.handle(f),
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

    fn handle(self: &Arc<Self>, f: proto::Frame) {
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
            proto::EXEC => match ExecRequest::decode(&f.payload) {
                Ok(req) => match self.clone().spawn(f.id, &req) {
                    Ok(pid) => w.ok(f.id, &(pid as u32).to_be_bytes()),
                    Err((code, msg)) => w.error(f.id, code, &msg),
                },
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
                    Some(p) => match signal_group(p.pid, sig) {
                        Ok(()) => w.ok(f.id, &[]),
                        Err(e) => w.error(f.id, ErrorCode::Io, &format!("signal {sig} to {}: {e}", p.pid)),
                    },
                    None => w.error(f.id, ErrorCode::InvalidHandle, &format!("no running process {pid}")),
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
                super::init::power_off();
            }
            other => {
                w.error(f.id, ErrorCode::InvalidArgument, &format!("unknown agent message type {other:#06x}"))
            }
        }
    }

    /// Starts a process; its output, stdin and exit are handled on threads of its own.
    fn spawn(self: Arc<Self>, id: u32, req: &ExecRequest) -> Result<i32, (ErrorCode, String)> {
        if self.procs.lock().contains_key(&id) {
            return Err((ErrorCode::InvalidArgument, format!("process id {id} is in use")));
        }
        let user = resolve_user(&req.user).map_err(|m| (ErrorCode::InvalidArgument, m))?;
        let mut cmd = Command::new(&req.program);
        cmd.args(&req.args).env_clear();
        for kv in &req.env {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            cmd.env(k, v);
        }
        let dir = if req.dir.is_empty() { user.home.clone() } else { req.dir.clone() };
        cmd.current_dir(if std::path::Path::new(&dir).is_dir() || !req.dir.is_empty() {
            dir
        } else {
            "/".into()
        });
        cmd.uid(user.uid).gid(user.gid);
        cmd.stdin(if req.stdin { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: setsid is async-signal-safe; it gives the process its own group so that
        // signals reach everything it starts.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            let code =
                if e.kind() == std::io::ErrorKind::NotFound { ErrorCode::Io } else { ErrorCode::Unknown };
            (code, format!("exec {}: {e}", req.program))
        })?;
        let pid = child.id() as i32;
        let stdin = child.stdin.take().map(|pipe| {
            let (tx, rx) = crossbeam_channel::unbounded();
            let w = self.writer.clone();
            thread::spawn(move || feed_stdin(pipe, rx, w));
            tx
        });
        let proc = Arc::new(Proc {
            pid,
            credit: Mutex::new(proto::INITIAL_CREDIT as u64),
            credit_cv: Condvar::new(),
            stdin,
        });
        self.procs.lock().insert(id, proc.clone());
        let pumps: Vec<_> = [(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>), 1u8)]
            .into_iter()
            .chain([(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>), 2u8)])
            .filter_map(|(pipe, stream)| {
                let pipe = pipe?;
                let (w, p) = (self.writer.clone(), proc.clone());
                Some(thread::spawn(move || pump(pipe, stream, id, &p, &w)))
            })
            .collect();
        thread::spawn(move || self.reap(id, child, pumps));
        Ok(pid)
    }

    fn reap(&self, id: u32, mut child: Child, pumps: Vec<thread::JoinHandle<()>>) {
        let status = child.wait();
        for p in pumps {
            let _ = p.join();
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
    }
}

/// Copies one output pipe to the host, within the process's credit.
fn pump(mut pipe: Box<dyn Read + Send>, stream: u8, id: u32, proc: &Proc, w: &Writer) {
    let mut buf = vec![0u8; proto::OUTPUT_CHUNK];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut sent = 0;
        while sent < n {
            let k = proc.take_credit(n - sent);
            let mut e = Encoder::new();
            e.u8(stream).bytes(&buf[sent..sent + k]);
            w.send(proto::OUTPUT, id, e.as_bytes());
            sent += k;
        }
    }
}

/// Writes stdin chunks in order, answering each request when it is written.
fn feed_stdin(mut pipe: std::process::ChildStdin, rx: Receiver<(u32, Vec<u8>)>, w: Writer) {
    while let Ok((req, data)) = rx.recv() {
        if data.is_empty() {
            w.ok(req, &[]);
            return; // dropping the pipe closes the process's stdin
        }
        match pipe.write_all(&data) {
            Ok(()) => w.ok(req, &[]),
            Err(e) => w.error(req, ErrorCode::Io, &format!("write stdin: {e}")),
        }
    }
}

fn signal_group(pid: i32, sig: i32) -> nix::Result<()> {
    let sig = nix::sys::signal::Signal::try_from(sig)?;
    // The process leads its own group (setsid); fall back to the process alone.
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig)
        .or_else(|_| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig))
}

struct User {
    uid: u32,
    gid: u32,
    home: String,
}

/// Resolves a user name or `uid[:gid]` against the guest's /etc/passwd.
fn resolve_user(spec: &str) -> Result<User, String> {
    if spec.is_empty() || spec == "root" || spec == "0" {
        return Ok(User { uid: 0, gid: 0, home: "/root".into() });
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entries: Vec<Vec<&str>> =
        passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).filter(|f| f.len() >= 6).collect();
    let (name, group) = spec.split_once(':').unwrap_or((spec, ""));
    let found = entries.iter().find(|f| f[0] == name || (name.parse::<u32>().is_ok() && f[2] == name));
    let (uid, mut gid, home) = match (found, name.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse().map_err(|_| format!("bad uid for {name} in /etc/passwd"))?,
            f[3].parse().map_err(|_| format!("bad gid for {name} in /etc/passwd"))?,
            f[5].to_string(),
        ),
        (None, Ok(uid)) => (uid, uid, "/".to_string()),
        (None, Err(_)) => return Err(format!("user {name:?} not found in the guest's /etc/passwd")),
    };
    if !group.is_empty() {
        gid = group.parse().map_err(|_| format!("group {group:?} is not a number"))?;
    }
    Ok(User { uid, gid, home })
}
