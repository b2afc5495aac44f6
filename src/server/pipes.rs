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

/// A command's pipe requests and, once it runs, its I/O: shared by the command and
/// its pipe handles.
#[derive(Default)]
pub(super) struct PipeSlot {
    pub wants: Mutex<Wants>,
    pub io: Mutex<Option<Arc<CmdIo>>>,
}

impl PipeSlot {
    /// The running command's I/O.
    pub fn io(&self) -> Result<Arc<CmdIo>, ErrorFrame> {
        self.io.lock().clone().ok_or_else(|| {
            ErrorFrame::new(ErrorCode::InvalidArgument, "", "the command is not started (CmdStart it first)")
        })
    }

    /// The pipe handle of `stream` was closed: before the start that withdraws the
    /// request (the stream is discarded, stdin is empty); after it, EOF or discard.
    pub fn close(&self, stream: u8) -> Result<(), ErrorFrame> {
        let io = self.io.lock().clone();
        match (io, stream) {
            (None, s) => {
                let mut w = self.wants.lock();
                match s {
                    0 => w.stdin = false,
                    1 => w.stdout = false,
                    _ => w.stderr = false,
                }
                Ok(())
            }
            (Some(io), 0) => io.close_stdin(),
            (Some(io), s) => {
                io.close_reader(s);
                Ok(())
            }
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
        on_end: impl FnOnce(crate::Result<i32>) + Send + 'static,
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

    fn pump(&self) -> crate::Result<i32> {
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

    /// Writes to the process's stdin.
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), ErrorFrame> {
        self.process.write_stdin(data).map_err(|e| stdin_error(&e))
    }

    /// Sends EOF to the process's stdin. A process that already ended is no error.
    pub fn close_stdin(&self) -> Result<(), ErrorFrame> {
        if self.state.lock().ended {
            return Ok(());
        }
        match self.process.close_stdin() {
            Err(Error::Remote(ef)) if ef.code == ErrorCode::InvalidHandle => Ok(()), // just exited
            r => r.map_err(|e| stdin_error(&e)),
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
