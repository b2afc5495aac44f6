//! [`Cmd`]: one guest command of a CmdNew handle, its lifecycle (not started,
//! starting, running, done) and its output collected (the handlers are in `cmd.rs`).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::console::Console;
use super::frame;
use super::pipes::PipeSlot;
use crate::contract::proto::ExecRequest;
use crate::contract::DEFAULT_PATH;
use crate::error::Error;
use crate::vm::agent_link::{AgentLink, Process};
use crate::wire::{self, ErrorCode, ErrorFrame};

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
pub(super) enum Sink {
    Discard,
    Stdout(Vec<u8>),
    Combined(Vec<u8>),
}

/// The most output CmdOutput and CmdCombinedOutput collect: what fits in one answer.
pub const MAX_COLLECTED_OUTPUT: usize = wire::DEFAULT_MAX_FRAME as usize - 1024;

#[derive(Clone)]
pub(super) enum RunState {
    NotStarted,
    Starting,
    Running(Arc<Process>),
    Done(i32),
    Failed(String),
}

/// One guest command (a CmdNew handle).
pub(super) struct Cmd {
    pub(super) spec: Mutex<ExecRequest>,
    pub(super) run: Mutex<RunState>,
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

    pub(super) fn get_env(&self, key: &str) -> String {
        let prefix = format!("{key}=");
        self.spec.lock().env.iter().find_map(|kv| kv.strip_prefix(&prefix)).unwrap_or_default().to_string()
    }

    /// Starts the process; its events are consumed by [`Cmd::finish`] or by the caller.
    /// The state lock is not held while the agent starts it, so Kill, ExitCode and Wait
    /// on the same handle answer meanwhile.
    pub(super) fn start(&self, agent: &AgentLink, console: &Console) -> Result<Arc<Process>, ErrorFrame> {
        self.start_with(agent, console, false)
    }

    /// Starts the process; `with_output`: CmdStart, whose output goes to the pipes.
    pub(super) fn start_with(
        &self,
        agent: &AgentLink,
        console: &Console,
        with_output: bool,
    ) -> Result<Arc<Process>, ErrorFrame> {
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
            spec.tty = Some(console.size());
        }
        let started = agent.exec(&spec);
        let mut run = self.run.lock();
        match started {
            Ok(p) => {
                let p = Arc::new(p);
                *run = RunState::Running(p.clone());
                self.pipes.end_start(Some(p.clone()));
                if tty {
                    console.attach(&p, spec.tty);
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
    pub(super) fn finish(
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

    pub(super) fn record(&self, result: &crate::error::Result<i32>) {
        *self.run.lock() = match result {
            Ok(code) => RunState::Done(*code),
            Err(e) => RunState::Failed(e.to_string()),
        };
        self.done.notify_all();
    }

    pub(super) fn wait(&self, cancelled: &dyn Fn() -> bool) -> Result<i32, ErrorFrame> {
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
