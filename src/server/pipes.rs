//! Command pipes: CmdStdinPipe, CmdStdoutPipe and CmdStderrPipe (0x040E-0x0410) give
//! file handles that FileWrite, FileRead and FileClose work on, as Go's
//! `exec.Cmd.StdinPipe` and friends give an `io.WriteCloser` or `io.ReadCloser`.
//!
//! A started command's output is carried by a pump thread from the agent link into one
//! queue per piped stream; FileRead takes from its queue and only then grants the guest
//! credit for what it took. A reader that stalls therefore stops the guest process at
//! its credit (1 MiB) the way a full pipe would, and the helper's memory stays bounded.
//! A stream nobody piped is discarded as it comes. Closing a read end discards what is
//! queued and all that follows. Stdin writes go to the process as they come, each
//! acknowledged by the agent; closing the stdin handle sends EOF.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::error::Error;
use crate::vm::agent_link::{ProcEvent, Process};
use crate::wire::{ErrorCode, ErrorFrame};

/// Which of a command's streams the client takes through pipe handles.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Wants {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl Wants {
    /// Records a pipe request for `stream` (0 stdin, 1 stdout, 2 stderr).
    pub fn add(&mut self, stream: u8) -> Result<(), ErrorFrame> {
        let (slot, name) = match stream {
            0 => (&mut self.stdin, "stdin"),
            1 => (&mut self.stdout, "stdout"),
            _ => (&mut self.stderr, "stderr"),
        };
        if std::mem::replace(slot, true) {
            return Err(ErrorFrame::new(
                ErrorCode::InvalidArgument,
                "",
                format!("{name} already has a pipe"),
            ));
        }
        Ok(())
    }
}

/// Where a command is in its start, as its pipes see it.
enum Phase {
    NotStarted,
    Starting,
    Started(Arc<Process>),
    /// It failed to start.
    Failed,
}

/// The output side of a command's pipes.
enum Output {
    /// None: not started by CmdStart (the collecting messages consume the output).
    None,
    /// CmdStart is starting it.
    Pending,
    Ready(Arc<CmdIo>),
}

struct SlotState {
    wants: Wants,
    phase: Phase,
    output: Output,
    /// Output pipes closed while CmdStart was starting the command.
    closed: [bool; 2],
}

/// A command's pipe requests and, once it runs, its I/O: shared by the command and
/// its pipe handles. Stdin writes made before the start wait for it, as writes to a
/// pipe whose reader has not started would; reads and closes made while CmdStart is
/// starting the command wait for it or are applied when it is up.
pub(super) struct PipeSlot {
    st: Mutex<SlotState>,
    cv: Condvar,
}

impl Default for PipeSlot {
    fn default() -> PipeSlot {
        PipeSlot {
            st: Mutex::new(SlotState {
                wants: Wants::default(),
                phase: Phase::NotStarted,
                output: Output::None,
                closed: [false; 2],
            }),
            cv: Condvar::new(),
        }
    }
}

fn not_started() -> ErrorFrame {
    ErrorFrame::new(ErrorCode::InvalidArgument, "", "the command is not started (CmdStart it first)")
}

impl PipeSlot {
    /// Records a pipe request (0 stdin, 1 stdout, 2 stderr): only before the start.
    pub fn want(&self, stream: u8) -> Result<(), ErrorFrame> {
        let mut st = self.st.lock();
        if !matches!(st.phase, Phase::NotStarted) {
            return Err(ErrorFrame::new(
                ErrorCode::InvalidArgument,
                "",
                "pipes must be asked for before the command starts",
            ));
        }
        st.wants.add(stream)
    }

    /// The start begins (`with_output`: CmdStart, whose output the pipes will carry):
    /// the pipes asked for are fixed from here on.
    pub fn begin_start(&self, with_output: bool) -> Wants {
        let mut st = self.st.lock();
        st.phase = Phase::Starting;
        if with_output {
            st.output = Output::Pending;
        }
        st.wants
    }

    /// The start ended: the process, or None when it failed.
    pub fn end_start(&self, p: Option<Arc<Process>>) {
        let mut st = self.st.lock();
        if p.is_none() {
            st.output = Output::None;
        }
        st.phase = p.map_or(Phase::Failed, Phase::Started);
        drop(st);
        self.cv.notify_all();
    }

    /// CmdStart's process is up: `make` builds its output side for the output pipes
    /// still open (those closed meanwhile are discarded).
    pub fn publish(&self, make: impl FnOnce(Wants) -> Arc<CmdIo>) {
        let mut st = self.st.lock();
        let mut open = st.wants;
        open.stdout &= !st.closed[0];
        open.stderr &= !st.closed[1];
        st.output = Output::Ready(make(open));
        drop(st);
        self.cv.notify_all();
    }

    /// Waits while `busy` says the start is under way; gives up when `cancelled()`.
    fn wait_while(
        &self,
        busy: impl Fn(&SlotState) -> bool,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<parking_lot::MutexGuard<'_, SlotState>, ErrorFrame> {
        let mut st = self.st.lock();
        while busy(&st) {
            if cancelled() {
                return Err(ErrorFrame::new(ErrorCode::Cancelled, "", "the client went away"));
            }
            self.cv.wait_for(&mut st, Duration::from_millis(200));
        }
        Ok(st)
    }

    /// The running process, waiting for the start if it has not happened yet.
    fn process(&self, cancelled: &dyn Fn() -> bool) -> Result<Arc<Process>, ErrorFrame> {
        let st = self.wait_while(|st| matches!(st.phase, Phase::NotStarted | Phase::Starting), cancelled)?;
        match &st.phase {
            Phase::Started(p) => Ok(p.clone()),
            _ => Err(ErrorFrame::new(ErrorCode::NotRunning, "", "the command did not start")),
        }
    }

    /// The output side, waiting while CmdStart is starting the command.
    pub fn io(&self, cancelled: &dyn Fn() -> bool) -> Result<Arc<CmdIo>, ErrorFrame> {
        let st = self.wait_while(|st| matches!(st.output, Output::Pending), cancelled)?;
        match &st.output {
            Output::Ready(io) => Ok(io.clone()),
            _ if matches!(st.phase, Phase::NotStarted) => Err(not_started()),
            _ => Err(ErrorFrame::new(
                ErrorCode::InvalidArgument,
                "",
                "the command's output is consumed by the message that ran it (use CmdStart to read pipes)",
            )),
        }
    }

    /// Writes to the process's stdin, once it has started.
    pub fn write_stdin(&self, data: &[u8], cancelled: &dyn Fn() -> bool) -> Result<(), ErrorFrame> {
        self.process(cancelled)?.write_stdin(data).map_err(|e| stdin_error(&e))
    }

    /// The pipe handle of `stream` was closed: before the start that withdraws the
    /// request (the stream is discarded, stdin is empty); after it, EOF or discard. A
    /// process that already ended is no error.
    pub fn close(&self, stream: u8, cancelled: &dyn Fn() -> bool) -> Result<(), ErrorFrame> {
        {
            let mut st = self.st.lock();
            if matches!(st.phase, Phase::NotStarted) {
                match stream {
                    0 => st.wants.stdin = false,
                    1 => st.wants.stdout = false,
                    _ => st.wants.stderr = false,
                }
                return Ok(());
            }
            if stream != 0 {
                match &st.output {
                    Output::Ready(io) => io.close_reader(stream),
                    Output::Pending => st.closed[index(stream)] = true,
                    Output::None => {}
                }
                return Ok(());
            }
        }
        let process = match self.process(cancelled) {
            Ok(p) => p,
            Err(ef) if ef.code == ErrorCode::NotRunning => return Ok(()),
            Err(ef) => return Err(ef),
        };
        match process.close_stdin() {
            Ok(()) => Ok(()),
            Err(Error::Remote(ef)) if ef.code == ErrorCode::InvalidHandle => Ok(()), // it exited
            Err(Error::Closed) => Ok(()),
            Err(e) => Err(stdin_error(&e)),
        }
    }
}

struct State {
    /// Queued output of stdout (0) and stderr (1).
    queues: [VecDeque<u8>; 2],
    /// Whether each output stream still has a reader.
    open: [bool; 2],
    /// The process ended (or its channel did): no more output comes.
    ended: bool,
}

/// The live I/O of a started command with pipes.
pub(super) struct CmdIo {
    state: Mutex<State>,
    cv: Condvar,
    process: Arc<Process>,
}

fn index(stream: u8) -> usize {
    if stream == 2 {
        1
    } else {
        0
    }
}

impl CmdIo {
    /// Starts pumping `process`'s output; `on_end` receives how it ended.
    pub fn start(
        process: Arc<Process>,
        wants: Wants,
        on_end: impl FnOnce(crate::error::Result<i32>) + Send + 'static,
    ) -> Arc<CmdIo> {
        let io = Arc::new(CmdIo {
            state: Mutex::new(State {
                queues: [VecDeque::new(), VecDeque::new()],
                open: [wants.stdout, wants.stderr],
                ended: false,
            }),
            cv: Condvar::new(),
            process,
        });
        let pump = io.clone();
        std::thread::spawn(move || on_end(pump.pump()));
        io
    }

    fn pump(&self) -> crate::error::Result<i32> {
        let result = loop {
            match self.process.recv() {
                Ok(ProcEvent::Output { stream, data }) => {
                    let mut st = self.state.lock();
                    let i = index(stream);
                    if st.open[i] {
                        st.queues[i].extend(&data);
                        drop(st);
                        self.cv.notify_all();
                    } else {
                        drop(st);
                        self.process.grant(data.len() as u32);
                    }
                }
                Ok(ProcEvent::Exit { code, .. }) => break Ok(code),
                Err(e) => break Err(e),
            }
        };
        self.state.lock().ended = true;
        self.cv.notify_all();
        result
    }

    /// Up to `max` bytes of `stream` (1 stdout, 2 stderr), waiting for some; empty at
    /// the end. Gives up when `cancelled()` turns true.
    pub fn read(&self, stream: u8, max: usize, cancelled: &dyn Fn() -> bool) -> Result<Vec<u8>, ErrorFrame> {
        let i = index(stream);
        let mut st = self.state.lock();
        loop {
            if !st.open[i] {
                return Err(ErrorFrame::new(ErrorCode::AlreadyClosed, "", "the pipe was closed"));
            }
            if !st.queues[i].is_empty() {
                let n = st.queues[i].len().min(max);
                let data: Vec<u8> = st.queues[i].drain(..n).collect();
                drop(st);
                self.process.grant(n as u32);
                return Ok(data);
            }
            if st.ended || max == 0 {
                return Ok(Vec::new());
            }
            if cancelled() {
                return Err(ErrorFrame::new(ErrorCode::Cancelled, "", "the client went away"));
            }
            self.cv.wait_for(&mut st, Duration::from_millis(200));
        }
    }

    /// How many bytes of `stream` wait for a reader.
    #[cfg(test)]
    pub fn queued(&self, stream: u8) -> usize {
        self.state.lock().queues[index(stream)].len()
    }

    /// Closes the read end of `stream`: what is queued and what follows is discarded.
    pub fn close_reader(&self, stream: u8) {
        let i = index(stream);
        let mut st = self.state.lock();
        st.open[i] = false;
        let n = st.queues[i].len();
        st.queues[i].clear();
        drop(st);
        self.cv.notify_all();
        if n > 0 {
            self.process.grant(n as u32);
        }
    }
}

fn stdin_error(e: &Error) -> ErrorFrame {
    match e {
        // The agent's "no process with a stdin pipe": it has exited.
        Error::Remote(ef) if ef.code == ErrorCode::InvalidHandle => {
            ErrorFrame::new(ErrorCode::AlreadyClosed, "", "the process has exited; its stdin is closed")
        }
        e => e.to_frame(""),
    }
}
