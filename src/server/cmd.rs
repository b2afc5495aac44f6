//! The Cmd* family: guest commands by handle (CmdNew .. CmdSetTty), their lifecycle
//! (not started, starting, running, done), their output collected, streamed or piped.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::frame;
use super::instance::BootedInstance;
use super::pipes::{CmdIo, PipeSlot};
use super::{Call, HandlerResult, Reply};
use crate::contract::proto::ExecRequest;
use crate::contract::DEFAULT_PATH;
use crate::error::Error;
use crate::vm::agent_link::Process;
use crate::wire::{self, msg, ErrorCode, ErrorFrame, Request, Response, StreamChunk, StreamEnd, Wire};

/// The request a new command starts from: `program` with `args`, as `user`, with the
/// default `PATH` alone for its environment.
pub(super) fn exec_request(program: String, args: Vec<String>, user: &str) -> ExecRequest {
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
pub(super) struct Cmd {
    pub(super) spec: Mutex<ExecRequest>,
    run: Mutex<RunState>,
    done: Condvar,
    /// Its pipe requests and, once started with any, its I/O.
    pub(super) pipes: Arc<PipeSlot>,
    /// Run on a terminal (CmdSetTty).
    pub(super) tty: std::sync::atomic::AtomicBool,
}

impl Cmd {
    pub(super) fn new(program: String, args: Vec<String>, user: &str) -> Arc<Cmd> {
        Arc::new(Cmd {
            spec: Mutex::new(exec_request(program, args, user)),
            run: Mutex::new(RunState::NotStarted),
            done: Condvar::new(),
            pipes: Arc::new(PipeSlot::default()),
            tty: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub(super) fn set_env(&self, key: &str, value: &str) {
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
    pub(super) fn start(&self, inst: &BootedInstance) -> Result<Arc<Process>, ErrorFrame> {
        self.start_with(inst, false)
    }

    /// Starts the process; `with_output`: CmdStart, whose output goes to the pipes.
    fn start_with(&self, inst: &BootedInstance, with_output: bool) -> Result<Arc<Process>, ErrorFrame> {
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

    pub(super) fn record(&self, result: &crate::Result<i32>) {
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

/// Serves a Cmd* request on the instance `inst`; new handles come from `next_handle`.
pub(super) fn serve(
    inst: &Arc<BootedInstance>,
    next_handle: &dyn Fn() -> u64,
    call: &mut Call<'_>,
    req: Request,
) -> HandlerResult {
    let cmd = |h: u64| inst.cmds.lock().get(h, "command");
    match req {
        Request::CmdNew { name, args } => {
            let h = next_handle();
            inst.cmds.lock().insert(h, Cmd::new(name, args, &inst.user));
            Ok(Response::CmdNew { handle: h }.into())
        }
        Request::CmdEntrypoint { args } => {
            // Plain root filesystems carry no image config: the entrypoint is the first
            // argument, or a shell.
            let (program, rest) = match args.split_first() {
                Some((p, rest)) => (p.clone(), rest.to_vec()),
                None => ("/bin/sh".to_string(), Vec::new()),
            };
            let h = next_handle();
            inst.cmds.lock().insert(h, Cmd::new(program, rest, &inst.user));
            Ok(Response::CmdEntrypoint { handle: h }.into())
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
            Ok(Response::CmdGetEnv { value: v }.into())
        }
        Request::CmdEnviron { handle } => {
            let env = cmd(handle)?.spec.lock().env.clone();
            Ok(Response::CmdEnviron { env }.into())
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
            Ok(Response::CmdWait { exit_code: code }.into())
        }
        Request::CmdRun { handle } => {
            let c = cmd(handle)?;
            let p = c.start(inst)?;
            let (code, _) = c.finish(&p, Sink::Discard, &call.canceller())?;
            Ok(Response::CmdRun { exit_code: code }.into())
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
            Ok(if combined {
                Response::CmdCombinedOutput { output: out, exit_code: code }
            } else {
                Response::CmdOutput { output: out, exit_code: code }
            }
            .into())
        }
        Request::CmdExitCode { handle } => match &*cmd(handle)?.run.lock() {
            RunState::Done(code) => Ok(Response::CmdExitCode { exit_code: *code }.into()),
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
            let h = next_handle();
            let pipe = super::fs::HostFile::Pipe { slot: c.pipes.clone(), stream, cmd: handle };
            inst.files.lock().insert(h, Arc::new(pipe));
            Ok(match stream {
                0 => Response::CmdStdinPipe { handle: h },
                1 => Response::CmdStdoutPipe { handle: h },
                _ => Response::CmdStderrPipe { handle: h },
            }
            .into())
        }
        other => Err(super::not_yet(other.name())),
    }
}
