//! The helper: `vmhost helper --socket PATH` serves the helper protocol for one VM.
//!
//! Every request type of the catalogue is registered in the [`Mux`]: its payload is
//! decoded into a [`Request`] (a malformed one is answered with code 2 before anything
//! happens) and served by `dispatch`. Until an instance exists,
//! instance-scoped messages answer Error code 3 (NotRunning) naming the operation.
//!
//! The same service runs without a socket for the library's in-process mode
//! ([`Helper::call_local`]), so both modes share every handler.
//!
//! The helper process lives as long as its clients: it serves with
//! [`crate::server::Server::serve_until_idle`], so when the last connection closes
//! (after InstanceClose, or because the client went away) it stops the VM and exits.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::pipes::{CmdIo, PipeSlot};
use crate::agent::proto::ExecRequest;
use crate::error::Error;
use crate::progress::Progress;
use crate::server::{Call, Handler, HandlerResult, Mux, Reply};
use crate::vm::agent_link::Process;
use crate::vm::InstanceSpec;
use crate::vm::Machine;
use crate::wire::{self, msg, ErrorCode, ErrorFrame, Request, StreamChunk, StreamEnd, Wire};

/// The default `PATH` of guest commands.
pub use crate::agent::spawn::DEFAULT_PATH;

/// A guest's first command, declared when it boots ([`Helper::set_first_command`],
/// `Instance::new_with_first_command`): the guest starts it as soon as it is set up,
/// before it is asked, so that under emulation its start is off the path of a
/// boot-and-run. It may then run before anything the caller does after the boot (a
/// network enabled, files written into the guest).
///
/// The instance's first command must be this one: the same program, arguments and
/// directory, no environment added, no terminal, and a stdin pipe only if this one has
/// one (without, its stdin is closed at once). It takes over the running process. Any
/// other command is refused until then, so that a command is never run twice by
/// mistake. The rule holds whether or not the guest could start it at boot: the kernel
/// command line that carries it holds about 1 KiB, and the kvm backend starts it when
/// it is run.
///
/// The program, arguments and directory are on the guest's kernel command line, which
/// every user of the guest can read (/proc/cmdline): pass no secrets in them.
///
/// ```
/// use vmhost::FirstCommand;
/// let first = FirstCommand::new("sh").arg("-c").arg("make test").current_dir("/src");
/// assert_eq!(first.args, ["-c", "make test"]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FirstCommand {
    /// The program: a path, or a name looked up in the default `PATH`.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its working directory (`None`: the user's home, else `/`).
    pub dir: Option<String>,
    /// Whether its stdin is a pipe the host feeds (else /dev/null).
    pub stdin: bool,
}

impl FirstCommand {
    /// `program`, with no arguments, in the user's home, without a stdin pipe.
    pub fn new(program: impl Into<String>) -> FirstCommand {
        FirstCommand { program: program.into(), ..Default::default() }
    }

    /// Adds an argument.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets the working directory.
    pub fn current_dir(mut self, dir: impl Into<String>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Gives it a stdin pipe (as `Command::stdin(Stdio::piped())` will ask).
    pub fn stdin_piped(mut self, on: bool) -> Self {
        self.stdin = on;
        self
    }

    /// The request for the agent, as `user`.
    fn request(&self, user: &str) -> ExecRequest {
        ExecRequest {
            dir: self.dir.clone().unwrap_or_default(),
            stdin: self.stdin,
            ..exec_request(self.program.clone(), self.args.clone(), user)
        }
    }

    /// The value of [`FIRST_COMMAND_ENV`] that carries it to a helper process.
    pub(crate) fn to_env(&self) -> String {
        self.request("").to_hex()
    }

    /// The first command a helper process was started with ([`FIRST_COMMAND_ENV`]).
    pub fn from_env() -> Result<Option<FirstCommand>, String> {
        let Some(v) = std::env::var_os(FIRST_COMMAND_ENV) else { return Ok(None) };
        let bad = |e: String| format!("{FIRST_COMMAND_ENV}: {e}");
        let v = v.into_string().map_err(|_| bad("not UTF-8".into()))?;
        let r = ExecRequest::from_hex(&v).map_err(bad)?;
        let dir = (!r.dir.is_empty()).then_some(r.dir);
        Ok(Some(FirstCommand { program: r.program, args: r.args, dir, stdin: r.stdin }))
    }
}

/// The environment variable that gives a helper process (`vmhost helper`) the first
/// command of the instance it will boot: the library's [`FirstCommand`] through a
/// helper. Only the same user can read a process's environment; its arguments, anyone.
pub const FIRST_COMMAND_ENV: &str = "VMHOST_FIRST_COMMAND";

/// The request a new command starts from: `program` with `args`, as `user`, with the
/// default `PATH` alone for its environment.
fn exec_request(program: String, args: Vec<String>, user: &str) -> ExecRequest {
    ExecRequest {
        program,
        args,
        env: vec![format!("PATH={DEFAULT_PATH}")],
        dir: String::new(),
        user: user.to_string(),
        stdin: false,
        tty: None,
        main: false,
    }
}

/// A table of handles of one kind. Handles come from one counter shared by every table,
/// starting at 1; a handle this table gave out and took back is "already closed", any
/// other unknown one is "invalid".
pub(super) struct Table<T> {
    live: HashMap<u64, T>,
    freed: HashSet<u64>,
}

impl<T: Clone> Table<T> {
    pub(super) fn new() -> Table<T> {
        Table { live: HashMap::new(), freed: HashSet::new() }
    }

    pub(super) fn insert(&mut self, h: u64, v: T) {
        self.live.insert(h, v);
    }

    pub(super) fn get(&self, h: u64, what: &str) -> Result<T, ErrorFrame> {
        match self.live.get(&h) {
            Some(v) => Ok(v.clone()),
            None if self.freed.contains(&h) => Err(ErrorFrame::new(
                ErrorCode::AlreadyClosed,
                "",
                format!("{what} handle {h} was already freed"),
            )),
            None => Err(ErrorFrame::new(ErrorCode::InvalidHandle, "", format!("no {what} with handle {h}"))),
        }
    }

    /// Whether `h` was given out by this table and taken back.
    pub(super) fn was_freed(&self, h: u64) -> bool {
        self.freed.contains(&h)
    }

    pub(super) fn remove(&mut self, h: u64, what: &str) -> Result<T, ErrorFrame> {
        let v = self.get(h, what)?;
        self.live.remove(&h);
        // Remembered to tell "already closed" from "invalid"; bounded, so that a
        // long-lived helper does not grow (beyond it, old handles read as invalid).
        if self.freed.len() >= 1 << 16 {
            self.freed.clear();
        }
        self.freed.insert(h);
        Ok(v)
    }
}

/// How a command's output is consumed.
enum Sink {
    Discard,
    Stdout(Vec<u8>),
    Combined(Vec<u8>),
}

/// The most output CmdOutput and CmdCombinedOutput collect: what fits in one answer.
pub const MAX_COLLECTED_OUTPUT: usize = wire::DEFAULT_MAX_FRAME as usize - 1024;

#[derive(Clone)]
enum RunState {
    NotStarted,
    Starting,
    Running(Arc<Process>),
    Done(i32),
    Failed(String),
}

/// One guest command (a CmdNew handle).
struct Cmd {
    spec: Mutex<ExecRequest>,
    run: Mutex<RunState>,
    done: Condvar,
    /// Its pipe requests and, once started with any, its I/O.
    pipes: Arc<PipeSlot>,
    /// Run on a terminal (CmdSetTty).
    tty: std::sync::atomic::AtomicBool,
}

impl Cmd {
    fn new(program: String, args: Vec<String>, user: &str) -> Arc<Cmd> {
        Arc::new(Cmd {
            spec: Mutex::new(exec_request(program, args, user)),
            run: Mutex::new(RunState::NotStarted),
            done: Condvar::new(),
            pipes: Arc::new(PipeSlot::default()),
            tty: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn set_env(&self, key: &str, value: &str) {
        let mut spec = self.spec.lock();
        let prefix = format!("{key}=");
        spec.env.retain(|kv| !kv.starts_with(&prefix));
        spec.env.push(format!("{key}={value}"));
    }

    fn get_env(&self, key: &str) -> String {
        let prefix = format!("{key}=");
        self.spec.lock().env.iter().find_map(|kv| kv.strip_prefix(&prefix)).unwrap_or_default().to_string()
    }

    /// Starts the process; its events are consumed by [`Cmd::finish`] or by the caller.
    /// The state lock is not held while the agent starts it, so Kill, ExitCode and Wait
    /// on the same handle answer meanwhile.
    fn start(&self, inst: &Instance) -> Result<Arc<Process>, ErrorFrame> {
        self.start_with(inst, false)
    }

    /// Starts the process; `with_output`: CmdStart, whose output goes to the pipes.
    fn start_with(&self, inst: &Instance, with_output: bool) -> Result<Arc<Process>, ErrorFrame> {
        let vm = &inst.vm;
        {
            let mut run = self.run.lock();
            if !matches!(*run, RunState::NotStarted) {
                return Err(ErrorFrame::new(
                    ErrorCode::InvalidArgument,
                    "",
                    "the command was already started",
                ));
            }
            *run = RunState::Starting;
        }
        let mut spec = self.spec.lock().clone();
        spec.stdin = self.pipes.begin_start(with_output).stdin;
        let tty = self.tty.load(std::sync::atomic::Ordering::SeqCst);
        if tty {
            let (cols, rows) = *inst.console.lock();
            spec.tty = Some((cols.clamp(1, 10_000) as u16, rows.clamp(1, 10_000) as u16));
        }
        let started = vm.agent().and_then(|agent| agent.exec(&spec));
        let mut run = self.run.lock();
        match started {
            Ok(p) => {
                let p = Arc::new(p);
                *run = RunState::Running(p.clone());
                self.pipes.end_start(Some(p.clone()));
                if tty {
                    let mut ttys = inst.ttys.lock();
                    ttys.retain(|w| w.strong_count() > 0);
                    ttys.push(Arc::downgrade(&p));
                    drop(ttys);
                    // A resize that came during the start missed it: catch up.
                    let (cols, rows) = *inst.console.lock();
                    let now = (cols.clamp(1, 10_000) as u16, rows.clamp(1, 10_000) as u16);
                    if Some(now) != spec.tty {
                        let _ = p.resize(now.0, now.1);
                    }
                }
                Ok(p)
            }
            Err(e) => {
                self.pipes.end_start(None);
                *run = RunState::Failed(e.to_string());
                self.done.notify_all();
                Err(frame(&e, &spec.program))
            }
        }
    }

    /// Drains the process into `sink` and records its end; gives up (killing the
    /// process) when `cancelled()` turns true or the collected output would not fit in
    /// an answer.
    fn finish(
        &self,
        p: &Process,
        mut sink: Sink,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(i32, Sink), ErrorFrame> {
        let mut too_much = false;
        let result = p.drain_until(
            |stream, data| {
                let buf = match &mut sink {
                    Sink::Discard => return Ok(()),
                    Sink::Stdout(buf) if stream == wire::STREAM_STDOUT => buf,
                    Sink::Stdout(_) => return Ok(()),
                    Sink::Combined(buf) => buf,
                };
                if buf.len() + data.len() > MAX_COLLECTED_OUTPUT {
                    too_much = true;
                    return Err(Error::Closed);
                }
                buf.extend_from_slice(data);
                Ok(())
            },
            cancelled,
        );
        if too_much {
            self.record(&Err(Error::Closed));
            return Err(ErrorFrame::new(
                ErrorCode::InvalidArgument,
                "",
                format!(
                    "output exceeds {MAX_COLLECTED_OUTPUT} bytes; the command was killed (stream it instead)"
                ),
            ));
        }
        self.record(&result);
        result.map(|code| (code, sink)).map_err(|e| frame(&e, ""))
    }

    fn record(&self, result: &crate::Result<i32>) {
        *self.run.lock() = match result {
            Ok(code) => RunState::Done(*code),
            Err(e) => RunState::Failed(e.to_string()),
        };
        self.done.notify_all();
    }

    fn wait(&self, cancelled: &dyn Fn() -> bool) -> Result<i32, ErrorFrame> {
        let mut run = self.run.lock();
        loop {
            match &*run {
                RunState::NotStarted => {
                    return Err(ErrorFrame::new(
                        ErrorCode::InvalidArgument,
                        "",
                        "the command was not started",
                    ))
                }
                RunState::Starting | RunState::Running(_) => {
                    if cancelled() {
                        return Err(ErrorFrame::new(ErrorCode::Cancelled, "", "the client went away"));
                    }
                    self.done.wait_for(&mut run, Duration::from_millis(200));
                }
                RunState::Done(code) => return Ok(*code),
                RunState::Failed(m) => return Err(ErrorFrame::new(ErrorCode::Io, "", m.clone())),
            }
        }
    }
}

/// The instance and its handle tables.
struct Instance {
    vm: Machine,
    user: String,
    cmds: Mutex<Table<Arc<Cmd>>>,
    files: super::fs::Files,
    console: Mutex<(i32, i32)>,
    /// Running commands on a terminal, resized with the console.
    ttys: Mutex<Vec<std::sync::Weak<Process>>>,
    /// Set once InstanceExec started the main process (there is one).
    main_started: std::sync::atomic::AtomicBool,
}

/// The helper-protocol service of one helper process.
pub struct Helper {
    mux: Mux,
    state: Arc<State>,
}

impl std::fmt::Debug for Helper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Helper").finish_non_exhaustive()
    }
}

struct State {
    instance: Mutex<Option<Arc<Instance>>>,
    /// Set while InstanceNew boots (without holding `instance`, so that other requests
    /// are answered meanwhile).
    booting: std::sync::atomic::AtomicBool,
    next_handle: std::sync::atomic::AtomicU64,
    progress: Progress,
    /// The command the next InstanceNew's guest starts at boot.
    first_command: Mutex<Option<FirstCommand>>,
}

impl State {
    fn handle(&self) -> u64 {
        self.next_handle.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn instance(&self) -> Result<Arc<Instance>, ErrorFrame> {
        match &*self.instance.lock() {
            Some(i) => Ok(i.clone()),
            None => Err(ErrorFrame::new(
                ErrorCode::NotRunning,
                "",
                "no instance is running: send InstanceNew first",
            )),
        }
    }
}

impl State {
    /// The answer to a request that failed: once the VM has ended, whatever failed says
    /// NotRunning and how the VM ended, rather than what broke on the way (the agent
    /// channel's EOF, a closed handle).
    fn after_end(&self, ty: u16, f: ErrorFrame) -> ErrorFrame {
        let Some(inst) = self.instance.lock().clone() else { return f };
        match inst.vm.ended_error(&crate::wire::type_name(ty)) {
            Some(e) => {
                log::debug!("{} after the VM's end: {} (was: {})", crate::wire::type_name(ty), e, f.message);
                frame(&e, &f.path)
            }
            None => f,
        }
    }
}

impl Helper {
    /// A helper with no instance yet.
    pub fn new() -> Arc<Helper> {
        Helper::build(None, Progress::quiet())
    }

    /// A helper serving an instance that is already running (the per-VM host process).
    pub fn with_vm(vm: Machine, user: String) -> Arc<Helper> {
        Helper::build(Some((vm, user)), Progress::quiet())
    }

    /// A helper with no instance yet that reports boot progress (the library's
    /// in-process mode on a terminal).
    pub fn with_progress(progress: Progress) -> Arc<Helper> {
        Helper::build(None, progress)
    }

    fn build(vm: Option<(Machine, String)>, progress: Progress) -> Arc<Helper> {
        let state = Arc::new(State {
            instance: Mutex::new(vm.map(|(vm, user)| Arc::new(new_instance(vm, user)))),
            booting: std::sync::atomic::AtomicBool::new(false),
            next_handle: std::sync::atomic::AtomicU64::new(1),
            progress,
            first_command: Mutex::new(None),
        });
        let mut mux = Mux::new();
        for &(ty, _) in msg::ALL {
            if msg::is_answer(ty) {
                continue;
            }
            let st = state.clone();
            mux.register(ty, move |call, dec| {
                let Some(req) = Request::read(ty, dec)? else {
                    return Err(ErrorFrame::new(
                        ErrorCode::InvalidArgument,
                        "",
                        format!("unknown message type: {ty:#06x}"),
                    ));
                };
                dec.finish()?;
                // InstanceExec's failure is the main process's, which ended the VM.
                dispatch(&st, call, req).map_err(|f| {
                    if ty == msg::INSTANCE_EXEC {
                        f
                    } else {
                        st.after_end(ty, f)
                    }
                })
            });
        }
        Arc::new(Helper { mux, state })
    }

    /// Declares the first command of the next instance this helper boots (see
    /// [`FirstCommand`]).
    pub fn set_first_command(&self, first: FirstCommand) {
        *self.state.first_command.lock() = Some(first);
    }

    /// Serves one request without a socket: `on_frame` receives the frames a streaming
    /// request sends ahead of its answer.
    pub fn call_local(
        &self,
        ty: u16,
        payload: &[u8],
        on_frame: crate::server::FrameSink<'_>,
    ) -> HandlerResult {
        let mut call = Call::new(0, on_frame);
        self.mux.handle(&mut call, ty, payload)
    }

    /// Stops the instance, if any (the helper is going away).
    pub fn shutdown(&self) {
        if let Some(i) = self.state.instance.lock().take() {
            let _ = i.vm.stop(Duration::from_secs(5));
        }
    }

    /// Ends the instance at once, without the guest's shutdown (SIGTERM to QEMU, then
    /// SIGKILL): for throwaway guests whose state nobody keeps.
    pub fn kill_instance(&self) -> crate::Result<()> {
        match self.state.instance.lock().take() {
            Some(i) => i.vm.force_stop(),
            None => Ok(()),
        }
    }
}

impl Handler for Helper {
    fn handle(&self, call: &mut Call<'_>, ty: u16, payload: &[u8]) -> HandlerResult {
        self.mux.handle(call, ty, payload)
    }
}

fn new_instance(vm: Machine, user: String) -> Instance {
    Instance {
        vm,
        user,
        cmds: Mutex::new(Table::new()),
        files: Mutex::new(Table::new()),
        console: Mutex::new((80, 24)),
        ttys: Mutex::new(Vec::new()),
        main_started: std::sync::atomic::AtomicBool::new(false),
    }
}

/// The Error frame for a crate error, naming `path` when the error names none.
pub(super) fn frame(e: &Error, path: &str) -> ErrorFrame {
    let mut f = e.to_frame("");
    if f.path.is_empty() {
        f.path = path.to_string();
    }
    f
}

fn not_yet(what: &str) -> ErrorFrame {
    ErrorFrame::new(ErrorCode::InvalidArgument, "", format!("{what} is not supported by this build yet"))
}

/// Serves one decoded request.
fn dispatch(st: &State, call: &mut Call<'_>, req: Request) -> HandlerResult {
    let op = req.name();
    match req {
        Request::InstanceNew { new } => {
            use std::sync::atomic::Ordering;
            if st.instance.lock().as_ref().is_some_and(|i| !i.vm.state().is_final()) {
                return Err(ErrorFrame::new(
                    ErrorCode::InvalidArgument,
                    op,
                    "an instance is already running",
                ));
            }
            if st.booting.swap(true, Ordering::SeqCst) {
                return Err(ErrorFrame::new(
                    ErrorCode::InvalidArgument,
                    op,
                    "an instance is already booting",
                ));
            }
            let first = st.first_command.lock().take().map(|f| f.request(&new.options.user));
            let booted = InstanceSpec::from_request(&new)
                .and_then(|spec| InstanceSpec { first_command: first, ..spec }.boot(&st.progress));
            st.booting.store(false, Ordering::SeqCst);
            let vm = booted.map_err(|e| frame(&e, &new.source_path))?;
            *st.instance.lock() = Some(Arc::new(new_instance(vm, new.options.user.clone())));
            Ok(Reply::ok())
        }
        Request::BuildDockerfile { .. } => Err(not_yet("BuildDockerfile")),
        req => {
            let inst = st.instance()?;
            // Once the VM has ended, only what asks about the end (or closes) is served;
            // the rest says NotRunning and how it ended, without touching any table.
            let about_the_end = matches!(
                req,
                Request::InstanceId {}
                    | Request::InstanceIsRunning {}
                    | Request::InstanceEnd {}
                    | Request::InstanceWait {}
                    | Request::InstanceClose {}
            );
            if !about_the_end && inst.vm.state().is_final() {
                let e = inst.vm.ended_error(op).unwrap_or(Error::Closed);
                return Err(frame(&e, ""));
            }
            serve_instance(st, &inst, call, req)
        }
    }
}

fn serve_instance(st: &State, inst: &Arc<Instance>, call: &mut Call<'_>, req: Request) -> HandlerResult {
    let vm = &inst.vm;
    let cmd = |h: u64| inst.cmds.lock().get(h, "command");
    match req {
        // A pipe handle is served as a connection too, as the original's helper serves
        // it; other connections are the network family's (not built yet).
        Request::ConnRead { handle, .. }
        | Request::ConnWrite { handle, .. }
        | Request::ConnClose { handle }
        | Request::ConnLocalAddr { handle }
        | Request::ConnRemoteAddr { handle }
            if super::fs::is_pipe_or_closed(&inst.files, handle) =>
        {
            let as_file = match req {
                Request::ConnRead { handle, max } => Request::FileRead { handle, max },
                Request::ConnWrite { handle, data } => Request::FileWrite { handle, data },
                Request::ConnClose { handle } => Request::FileClose { handle },
                _ => {
                    return Ok(Reply::with(|e| {
                        e.string("pipe");
                    }))
                }
            };
            let agent = vm.agent().map_err(|e| frame(&e, ""))?;
            super::fs::serve(agent, &inst.files, &|| st.handle(), &call.canceller(), as_file)
        }
        req if super::fs::is_fs(&req) => {
            let agent = vm.agent().map_err(|e| frame(&e, ""))?;
            super::fs::serve(agent, &inst.files, &|| st.handle(), &call.canceller(), req)
        }
        Request::InstanceClose {} => {
            let r = vm.stop(Duration::from_secs(10));
            let mut slot = st.instance.lock();
            // Only this instance: another connection may have made a new one meanwhile.
            if slot.as_ref().is_some_and(|i| Arc::ptr_eq(i, inst)) {
                slot.take();
            }
            r.map(|()| Reply::ok()).map_err(|e| frame(&e, ""))
        }
        Request::InstanceWait {} => loop {
            if let Some(r) = vm.wait_timeout(Duration::from_millis(200)) {
                break r.map(|()| Reply::ok()).map_err(|e| frame(&e, ""));
            }
            if call.is_cancelled() {
                break Err(ErrorFrame::new(ErrorCode::Cancelled, "", "the client went away"));
            }
        },
        Request::InstanceId {} => Ok(Reply::with(|e| {
            e.string(vm.id());
        })),
        Request::InstanceIsRunning {} => Ok(Reply::with(|e| {
            e.bool(vm.is_running());
        })),
        Request::InstanceEnd {} => Ok(Reply::with(|e| match vm.end().filter(|_| vm.state().is_final()) {
            Some(end) => {
                let (kind, nanos, detail) = end.to_wire();
                e.u8(kind).u64(nanos).string(detail);
            }
            None => {
                e.u8(0).u64(0).string("");
            }
        })),
        Request::InstanceSetConsole { cols, rows } => {
            if !(1..=10_000).contains(&cols) || !(1..=10_000).contains(&rows) {
                return Err(ErrorFrame::new(
                    ErrorCode::InvalidArgument,
                    "",
                    format!("console size {cols}x{rows}"),
                ));
            }
            *inst.console.lock() = (cols, rows);
            let live: Vec<Arc<Process>> =
                inst.ttys.lock().iter().filter_map(std::sync::Weak::upgrade).collect();
            for p in live {
                if let Err(e) = p.resize(cols as u16, rows as u16) {
                    log::debug!("resizing a guest terminal: {e}"); // it may just have exited
                }
            }
            Ok(Reply::ok())
        }
        Request::InstanceSetNetwork { enabled } => {
            vm.set_network(enabled).map(|()| Reply::ok()).map_err(|e| frame(&e, ""))
        }
        Request::InstanceExec { name, args } => {
            // The instance's main process, as the original's Exec: PID 1 of the guest
            // for the command (a PID namespace of its own: crate::agent::main_process),
            // attached to the console: a terminal in the guest sized by
            // InstanceSetConsole, our stdin typed into it, its output on our stdout.
            // When it exits the VM ends (InstanceWait answers, InstanceEnd says how)
            // and the answer is the original's: nothing after the status byte for exit
            // status 0, an error (code 7, "exit status N") for any other.
            use std::sync::atomic::Ordering::SeqCst;
            if inst.main_started.swap(true, SeqCst) {
                return Err(ErrorFrame::new(
                    ErrorCode::InvalidArgument,
                    "exec",
                    "the instance already has its main process (InstanceExec runs once)",
                ));
            }
            let c = Cmd::new(name.clone(), args, &inst.user);
            c.tty.store(true, SeqCst);
            c.spec.lock().main = true;
            if let Ok(term) = std::env::var("TERM") {
                c.set_env("TERM", &term);
            }
            c.pipes.want(0)?;
            let p = match c.start(inst) {
                Ok(p) => p,
                Err(e) => {
                    // Nothing was replaced: the instance runs on, and may try again (a
                    // start that failed because the VM ended says NotRunning).
                    inst.main_started.store(false, SeqCst);
                    return Err(st.after_end(msg::INSTANCE_EXEC, e));
                }
            };
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let typist = {
                let (p, stop) = (p.clone(), stop.clone());
                std::thread::spawn(move || forward_console_input(&p, &stop))
            };
            let code = p.drain_until(
                |_, data| {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(data).and_then(|()| out.flush());
                    Ok(())
                },
                &call.canceller(),
            );
            stop.store(true, SeqCst);
            let _ = typist.join();
            c.record(&code);
            // Its exit status, or SIGKILL's (128 + 9) when the client went away (drain_until
            // killed it); when the VM itself failed, the backend says how it ended.
            let status = match &code {
                Ok(status) => Some(*status),
                Err(_) if call.is_cancelled() => Some(128 + nix::libc::SIGKILL),
                Err(_) => None,
            };
            if let Some(status) = status {
                log::info!("InstanceExec: the main process exited with status {status}; ending the VM");
                if let Err(e) = vm.end_because(crate::vm::VmEnd::MainExited(status), Duration::from_secs(10))
                {
                    log::warn!("ending the VM after its main process: {e}");
                }
            }
            let code = code.map_err(|e| frame(&vm.ended_error("InstanceExec").unwrap_or(e), ""))?;
            if code == 0 {
                Ok(Reply::ok())
            } else {
                Err(ErrorFrame::new(ErrorCode::Io, "exec", format!("exec {name}: exit status {code}"))
                    .with_path(name))
            }
        }
        Request::CmdNew { name, args } => {
            let h = st.handle();
            inst.cmds.lock().insert(h, Cmd::new(name, args, &inst.user));
            Ok(Reply::with(|e| {
                e.u64(h);
            }))
        }
        Request::CmdEntrypoint { args } => {
            // Plain root filesystems carry no image config: the entrypoint is the first
            // argument, or a shell.
            let (program, rest) = match args.split_first() {
                Some((p, rest)) => (p.clone(), rest.to_vec()),
                None => ("/bin/sh".to_string(), Vec::new()),
            };
            let h = st.handle();
            inst.cmds.lock().insert(h, Cmd::new(program, rest, &inst.user));
            Ok(Reply::with(|e| {
                e.u64(h);
            }))
        }
        Request::CmdFree { handle } => inst.cmds.lock().remove(handle, "command").map(|_| Reply::ok()),
        Request::CmdSetDir { handle, dir } => {
            cmd(handle)?.spec.lock().dir = dir;
            Ok(Reply::ok())
        }
        Request::CmdSetEnv { handle, key, value } => {
            if key.is_empty() || key.contains('=') {
                return Err(ErrorFrame::new(
                    ErrorCode::InvalidArgument,
                    "",
                    format!("bad variable name {key:?}"),
                ));
            }
            cmd(handle)?.set_env(&key, &value);
            Ok(Reply::ok())
        }
        Request::CmdGetEnv { handle, key } => {
            let v = cmd(handle)?.get_env(&key);
            Ok(Reply::with(|e| {
                e.string(&v);
            }))
        }
        Request::CmdEnviron { handle } => {
            let env = cmd(handle)?.spec.lock().env.clone();
            Ok(Reply::with(|e| {
                e.string_list(&env);
            }))
        }
        Request::CmdStart { handle } => {
            // Output goes to the pipes the client asked for, the rest is discarded.
            let c = cmd(handle)?;
            let p = c.start_with(inst, true)?;
            let end = c.clone();
            c.pipes.publish(|open| CmdIo::start(p, open, move |r| end.record(&r)));
            Ok(Reply::ok())
        }
        Request::CmdWait { handle } => {
            let code = cmd(handle)?.wait(&call.canceller())?;
            Ok(Reply::with(|e| {
                e.i32(code);
            }))
        }
        Request::CmdRun { handle } => {
            let c = cmd(handle)?;
            let p = c.start(inst)?;
            let (code, _) = c.finish(&p, Sink::Discard, &call.canceller())?;
            Ok(Reply::with(|e| {
                e.i32(code);
            }))
        }
        Request::CmdOutput { handle } | Request::CmdCombinedOutput { handle } => {
            let combined = matches!(req, Request::CmdCombinedOutput { .. });
            let c = cmd(handle)?;
            let p = c.start(inst)?;
            let sink = if combined { Sink::Combined(Vec::new()) } else { Sink::Stdout(Vec::new()) };
            let (code, sink) = c.finish(&p, sink, &call.canceller())?;
            let out = match sink {
                Sink::Stdout(b) | Sink::Combined(b) => b,
                Sink::Discard => Vec::new(),
            };
            Ok(Reply::with(|e| {
                e.bytes(&out).i32(code);
            }))
        }
        Request::CmdExitCode { handle } => match &*cmd(handle)?.run.lock() {
            RunState::Done(code) => {
                let code = *code;
                Ok(Reply::with(|e| {
                    e.i32(code);
                }))
            }
            RunState::Failed(m) => Err(ErrorFrame::new(ErrorCode::Io, "", m.clone())),
            _ => Err(ErrorFrame::new(ErrorCode::InvalidArgument, "", "the command has not exited")),
        },
        Request::CmdKill { handle } => {
            let running = match &*cmd(handle)?.run.lock() {
                RunState::Running(p) => Some(p.clone()),
                _ => None,
            };
            match running {
                Some(p) => p.signal(nix::libc::SIGKILL).map(|()| Reply::ok()).map_err(|e| frame(&e, "")),
                None => Err(ErrorFrame::new(ErrorCode::InvalidArgument, "", "the command is not running")),
            }
        }
        Request::CmdSetTty { handle, enabled } => {
            let c = cmd(handle)?;
            if !matches!(*c.run.lock(), RunState::NotStarted) {
                return Err(ErrorFrame::new(ErrorCode::InvalidArgument, "", "the command already started"));
            }
            c.tty.store(enabled, std::sync::atomic::Ordering::SeqCst);
            Ok(Reply::ok())
        }
        Request::CmdRunStreaming { handle } => {
            let c = cmd(handle)?;
            let p = c.start(inst)?;
            let cancelled = call.canceller();
            let mut client_gone = None;
            let result = p.drain_until(
                |stream, data| {
                    call.send(msg::STREAM_CHUNK, &StreamChunk::payload(stream, data)).map_err(|e| {
                        client_gone = Some(e.to_string());
                        Error::Closed
                    })
                },
                &cancelled,
            );
            c.record(&result);
            if client_gone.is_some() || cancelled() {
                // drain_until killed the process: nobody reads its output any more.
                let why = client_gone.unwrap_or_else(|| "the client went away".into());
                log::info!("CmdRunStreaming: {why}; the process was killed");
                return Err(ErrorFrame::new(ErrorCode::Cancelled, "", why));
            }
            let code = result.map_err(|e| frame(&e, ""))?;
            Ok(Reply { ty: msg::STREAM_END, payload: StreamEnd { exit_code: code }.to_payload() })
        }
        Request::CmdStdinPipe { handle }
        | Request::CmdStdoutPipe { handle }
        | Request::CmdStderrPipe { handle } => {
            let stream = match req {
                Request::CmdStdinPipe { .. } => 0,
                Request::CmdStdoutPipe { .. } => 1,
                _ => 2,
            };
            let c = cmd(handle)?;
            if !matches!(*c.run.lock(), RunState::NotStarted) {
                return Err(ErrorFrame::new(
                    ErrorCode::InvalidArgument,
                    "",
                    "pipes must be asked for before the command starts",
                ));
            }
            c.pipes.want(stream)?;
            let h = st.handle();
            let pipe = super::fs::HostFile::Pipe { slot: c.pipes.clone(), stream, cmd: handle };
            inst.files.lock().insert(h, Arc::new(pipe));
            Ok(Reply::with(|e| {
                e.u64(h);
            }))
        }
        other => Err(not_yet(other.name())),
    }
}

/// Types our stdin into the console's process until `stop`; EOF on our stdin sends
/// nothing (a terminal has no EOF of its own: the user types Ctrl-D).
fn forward_console_input(p: &Process, stop: &std::sync::atomic::AtomicBool) {
    // Raw reads of fd 0: std's buffered Stdin could hold bytes that poll cannot see.
    let fd = 0;
    let mut buf = [0u8; 4096];
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let mut pfd = nix::libc::pollfd { fd, events: nix::libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { nix::libc::poll(&mut pfd, 1, 100) };
        if n <= 0 {
            continue;
        }
        // SAFETY: read into a buffer we own, at most its length.
        let r = unsafe { nix::libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(r) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if p.write_stdin(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
