//! The Cmd* family: guest commands by handle (CmdNew .. CmdSetTty), started, waited
//! for, killed, their output collected, streamed or piped. The command itself is
//! [`Cmd`] (`command.rs`).

use std::sync::Arc;

use super::command::{RunState, Sink};
use super::frame;
use super::pipes::CmdIo;
use super::session::Session;
use super::{Answer, Call, HandlerResult};
use crate::error::Error;
use crate::vm::agent_link::AgentLink;
use crate::wire::{ErrorCode, ErrorFrame, Request, Response, StreamEnd};

/// Serves a Cmd* request of session `s`, whose processes `agent` runs; new handles come
/// from `next_handle`.
pub(super) fn serve(
    agent: &AgentLink,
    s: &Session,
    next_handle: &dyn Fn() -> u64,
    call: &mut Call<'_>,
    req: Request,
) -> HandlerResult {
    let cmd = |h: u64| s.cmds.lock().get(h, "command");
    match req {
        Request::CmdNew { name, args } => {
            let h = next_handle();
            s.cmds.lock().insert(h, s.command(name, args));
            Ok(Response::CmdNew { handle: h }.into())
        }
        Request::CmdEntrypoint { args } => {
            let (program, rest) =
                s.entrypoint(args).map_err(|m| ErrorFrame::new(ErrorCode::InvalidArgument, "", m))?;
            let h = next_handle();
            s.cmds.lock().insert(h, s.command(program, rest));
            Ok(Response::CmdEntrypoint { handle: h }.into())
        }
        Request::CmdFree { handle } => {
            s.cmds.lock().remove(handle, "command").map(|_| Response::CmdFree {}.into())
        }
        Request::CmdSetDir { handle, dir } => {
            cmd(handle)?.spec.lock().dir = dir;
            Ok(Response::CmdSetDir {}.into())
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
            Ok(Response::CmdSetEnv {}.into())
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
            let p = c.start_with(agent, &s.console, true)?;
            let end = c.clone();
            c.pipes.publish(|open| CmdIo::start(p, open, move |r| end.record(&r)));
            Ok(Response::CmdStart {}.into())
        }
        Request::CmdWait { handle } => {
            let code = cmd(handle)?.wait(&call.canceller())?;
            Ok(Response::CmdWait { exit_code: code }.into())
        }
        Request::CmdRun { handle } => {
            let c = cmd(handle)?;
            let p = c.start(agent, &s.console)?;
            let (code, _) = c.finish(&p, Sink::Discard, &call.canceller())?;
            Ok(Response::CmdRun { exit_code: code }.into())
        }
        Request::CmdOutput { handle } | Request::CmdCombinedOutput { handle } => {
            let combined = matches!(req, Request::CmdCombinedOutput { .. });
            let c = cmd(handle)?;
            let p = c.start(agent, &s.console)?;
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
                Some(p) => p
                    .signal(nix::libc::SIGKILL)
                    .map(|()| Response::CmdKill {}.into())
                    .map_err(|e| frame(&e, "")),
                None => Err(ErrorFrame::new(ErrorCode::InvalidArgument, "", "the command is not running")),
            }
        }
        Request::CmdSetTty { handle, enabled } => {
            let c = cmd(handle)?;
            if !matches!(*c.run.lock(), RunState::NotStarted) {
                return Err(ErrorFrame::new(ErrorCode::InvalidArgument, "", "the command already started"));
            }
            c.tty.store(enabled, std::sync::atomic::Ordering::SeqCst);
            Ok(Response::CmdSetTty {}.into())
        }
        Request::CmdRunStreaming { handle } => {
            let c = cmd(handle)?;
            let p = c.start(agent, &s.console)?;
            let cancelled = call.canceller();
            let mut client_gone = None;
            let result = p.drain_until(
                |stream, data| {
                    call.send_chunk(stream, data).map_err(|e| {
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
            Ok(Answer::StreamEnd(StreamEnd { exit_code: code }))
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
            s.files.lock().insert(h, Arc::new(pipe));
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

/// The Cmd* handlers and the command pipes against the real agent running processes on
/// this host (see [`crate::server::guestless`]): no guest.
#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::contract::proto::INITIAL_CREDIT;
    use crate::server::guestless::Guestless;
    use crate::wire;

    const GUARD: Duration = Duration::from_secs(30);

    fn sh(g: &Guestless, script: &str) -> u64 {
        g.handle(Request::CmdNew { name: "sh".into(), args: vec!["-c".into(), script.into()] })
    }

    fn read(g: &Guestless, handle: u64, max: u32) -> Vec<u8> {
        match g.call(Request::FileRead { handle, max }).unwrap() {
            Response::FileRead { data } => data,
            other => panic!("{other:?}"),
        }
    }

    fn read_to_end(g: &Guestless, handle: u64) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let data = read(g, handle, 1 << 20);
            if data.is_empty() {
                return all;
            }
            all.extend(data);
        }
    }

    #[test]
    fn output_is_collected_or_streamed_with_the_exit_code() {
        let g = Guestless::processes("cmd-out");
        let h = sh(&g, "echo out; echo err >&2; exit 3");
        let out = g.call(Request::CmdOutput { handle: h }).unwrap();
        assert_eq!(out, Response::CmdOutput { output: b"out\n".to_vec(), exit_code: 3 });
        assert_eq!(
            g.call(Request::CmdExitCode { handle: h }).unwrap(),
            Response::CmdExitCode { exit_code: 3 }
        );
        let again = g.call(Request::CmdStart { handle: h }).unwrap_err();
        assert_eq!(again.code, ErrorCode::InvalidArgument, "{again:?}");

        // Environment and working directory reach the process.
        let h = sh(&g, "echo $FOO; pwd");
        g.call(Request::CmdSetEnv { handle: h, key: "FOO".into(), value: "bar".into() }).unwrap();
        let dir = g.dir.path().to_str().unwrap().to_string();
        g.call(Request::CmdSetDir { handle: h, dir: dir.clone() }).unwrap();
        let both = g.call(Request::CmdCombinedOutput { handle: h }).unwrap();
        assert_eq!(
            both,
            Response::CmdCombinedOutput { output: format!("bar\n{dir}\n").into_bytes(), exit_code: 0 }
        );

        // Streamed: chunks by stream, then the end with the code.
        let h = sh(&g, "echo a; echo b >&2; exit 7");
        let mut got = [Vec::new(), Vec::new()];
        let end = g
            .call_streaming(Request::CmdRunStreaming { handle: h }, &mut |s, d| {
                got[usize::from(s == wire::STREAM_STDERR)].extend_from_slice(d)
            })
            .unwrap();
        assert_eq!(end, Answer::StreamEnd(StreamEnd { exit_code: 7 }));
        assert_eq!(got, [b"a\n".to_vec(), b"b\n".to_vec()]);

        // A program that is not there: the start fails, naming it.
        let h = g.handle(Request::CmdNew { name: "/no/such/program".into(), args: vec![] });
        let e = g.call(Request::CmdRun { handle: h }).unwrap_err();
        assert!(e.message.contains("/no/such/program") || e.path == "/no/such/program", "{e:?}");
        // A freed handle is already closed; one never given is invalid.
        g.call(Request::CmdFree { handle: h }).unwrap();
        let e = g.call(Request::CmdRun { handle: h }).unwrap_err();
        assert_eq!(e.code, ErrorCode::AlreadyClosed, "{e:?}");
        let e = g.call(Request::CmdRun { handle: 99_999 }).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidHandle, "{e:?}");
    }

    #[test]
    fn a_pipe_nobody_reads_stops_the_process_at_its_credit() {
        let g = Guestless::processes("cmd-credit");
        let done = g.dir.join("done");
        let total = 4_000_000usize;
        let h = sh(&g, &format!("head -c {total} /dev/zero; : > {}", done.display()));
        let out = g.handle(Request::CmdStdoutPipe { handle: h });
        g.call(Request::CmdStart { handle: h }).unwrap();
        let io = g.session.cmds.lock().get(h, "command").unwrap().pipes.io(&|| false).unwrap();
        // The agent sends what its credit allows, and no more: the process blocks.
        let credit = INITIAL_CREDIT as usize;
        let start = Instant::now();
        while io.queued(wire::STREAM_STDOUT) < credit {
            assert!(start.elapsed() < GUARD, "only {} bytes came", io.queued(wire::STREAM_STDOUT));
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(io.queued(wire::STREAM_STDOUT), credit, "nothing beyond the credit");
        assert!(!done.exists(), "the writer is held at its credit");
        // Reading grants credit back: all of it comes, and never more than a window.
        let mut got = 0;
        loop {
            let data = read(&g, out, 256 << 10);
            if data.is_empty() {
                break;
            }
            assert!(data.iter().all(|&b| b == 0));
            got += data.len();
            assert!(io.queued(wire::STREAM_STDOUT) <= credit);
        }
        assert_eq!(got, total);
        assert_eq!(g.call(Request::CmdWait { handle: h }).unwrap(), Response::CmdWait { exit_code: 0 });
        assert!(done.exists());
        g.call(Request::FileClose { handle: out }).unwrap();
        let e = g.call(Request::FileRead { handle: out, max: 1 }).unwrap_err();
        assert_eq!(e.code, ErrorCode::AlreadyClosed, "{e:?}");
    }

    #[test]
    fn stdin_pipe_feeds_the_process_and_kill_ends_it() {
        let g = Guestless::processes("cmd-stdin");
        let h = sh(&g, "cat; echo closed >&2");
        let stdin = g.handle(Request::CmdStdinPipe { handle: h });
        let stdout = g.handle(Request::CmdStdoutPipe { handle: h });
        let stderr = g.handle(Request::CmdStderrPipe { handle: h });
        g.call(Request::CmdStart { handle: h }).unwrap();
        let w = g.call(Request::FileWrite { handle: stdin, data: b"hello".to_vec() }).unwrap();
        assert_eq!(w, Response::FileWrite { written: 5 });
        g.call(Request::FileClose { handle: stdin }).unwrap();
        assert_eq!(read_to_end(&g, stdout), b"hello");
        assert_eq!(read_to_end(&g, stderr), b"closed\n");
        assert_eq!(g.call(Request::CmdWait { handle: h }).unwrap(), Response::CmdWait { exit_code: 0 });
        let e = g.call(Request::FileWrite { handle: stdin, data: b"x".to_vec() }).unwrap_err();
        assert_eq!(e.code, ErrorCode::AlreadyClosed, "{e:?}");

        let h = sh(&g, "sleep 30");
        g.call(Request::CmdStart { handle: h }).unwrap();
        g.call(Request::CmdKill { handle: h }).unwrap();
        let code = g.call(Request::CmdWait { handle: h }).unwrap();
        assert_eq!(code, Response::CmdWait { exit_code: 128 + nix::libc::SIGKILL });
    }
}
