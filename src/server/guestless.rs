//! The helper's handlers without a guest: the real agent server
//! ([`crate::agent::serve::serve_over`]) on one end of a socket pair, the real
//! [`AgentLink`] on the other, a scratch directory as the guest's root. The middle of
//! vmhost (the Fs*, File* and Cmd* handlers, handle mapping, chunking, pipes and their
//! credit) then runs in milliseconds; the guest tests stay for what needs a guest.
//!
//! Files are served on a thread of the test process. Processes are not: the agent waits
//! for every child it has (it is a guest's PID 1), which would take the children of
//! other tests. An agent that runs processes runs in a process of its own: this test
//! binary again, asked for [`agent_process`] alone, its standard input the socket.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::session::Session;
use super::{Answer, Call};
use crate::test_dir::TempDir;
use crate::vm::agent_link::AgentLink;
use crate::wire::{ErrorFrame, Request, Response};

/// Set in the agent's process: the root of its files.
const ROOT_VAR: &str = "VMHOST_GUESTLESS_AGENT_ROOT";

/// An agent without a guest, and the helper's side of it.
pub(super) struct Guestless {
    pub(super) agent: AgentLink,
    pub(super) session: Session,
    pub(super) dir: TempDir,
    next: AtomicU64,
    child: Option<std::process::Child>,
}

impl Guestless {
    /// An agent serving files only, on a thread of this process.
    pub(super) fn files(tag: &str) -> Guestless {
        let dir = TempDir::new(tag);
        let (host, guest) = UnixStream::pair().unwrap();
        let root = dir.path().to_path_buf();
        std::thread::spawn(move || {
            crate::agent::serve::serve_over(std::fs::File::from(OwnedFd::from(guest)), root)
        });
        Guestless::connect(host, dir, None)
    }

    /// An agent that also runs processes (on this host, as this user), in a process of
    /// its own.
    pub(super) fn processes(tag: &str) -> Guestless {
        let dir = TempDir::new(tag);
        let (host, guest) = UnixStream::pair().unwrap();
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "server::guestless::agent_process", "--nocapture", "--test-threads=1"])
            .env(ROOT_VAR, dir.path())
            .stdin(std::process::Stdio::from(OwnedFd::from(guest)))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("re-run the test binary as an agent");
        Guestless::connect(host, dir, Some(child))
    }

    fn connect(host: UnixStream, dir: TempDir, child: Option<std::process::Child>) -> Guestless {
        let agent = AgentLink::connect(host, Duration::from_secs(20), None).expect("the agent's Hello");
        Guestless { agent, session: Session::new(String::new(), None), dir, next: AtomicU64::new(1), child }
    }

    /// One request through the helper's handler of its family, as the helper routes it:
    /// the typed answer.
    pub(super) fn call(&self, req: Request) -> Result<Response, ErrorFrame> {
        match self.call_streaming(req, &mut |_, _| panic!("output chunks for a call that streams none"))? {
            Answer::Response(r) => Ok(r),
            other => panic!("answered {other:?}"),
        }
    }

    /// Like [`Guestless::call`], for a request that streams output chunks to `on_chunk`.
    pub(super) fn call_streaming(
        &self,
        req: Request,
        on_chunk: &mut dyn FnMut(u8, &[u8]),
    ) -> Result<Answer, ErrorFrame> {
        let next = || self.next_handle();
        let mut sink = |stream: u8, data: &[u8]| {
            on_chunk(stream, data);
            Ok(())
        };
        let mut call = Call::new(1, &mut sink);
        if super::fs::is_fs(&req) {
            super::fs::serve(&self.agent, &self.session.files, &next, &call.canceller(), req)
        } else {
            super::cmd::serve(&self.agent, &self.session, &next, &mut call, req)
        }
    }

    /// The handle in an answer that gives one.
    pub(super) fn handle(&self, req: Request) -> u64 {
        match self.call(req).unwrap() {
            Response::FsOpen { handle }
            | Response::FsCreate { handle }
            | Response::FsOpenFile { handle }
            | Response::CmdNew { handle }
            | Response::CmdEntrypoint { handle }
            | Response::CmdStdinPipe { handle }
            | Response::CmdStdoutPipe { handle }
            | Response::CmdStderrPipe { handle } => handle,
            other => panic!("no handle in {other:?}"),
        }
    }

    /// A new helper handle, as the helper gives them.
    pub(super) fn next_handle(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Skips the next `n` handles (so that the helper's numbers differ from the agent's).
    pub(super) fn skip_handles(&self, n: u64) {
        self.next.fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for Guestless {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Its channel closes with the link, which ends it; a stuck one is killed.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The agent's process for [`Guestless::processes`]: does nothing in a normal test run.
#[test]
fn agent_process() {
    let Some(root) = std::env::var_os(ROOT_VAR) else { return };
    // SAFETY: fd 0 is the socket the parent passed, and nothing else in this process
    // uses it.
    let port = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(0) };
    let code = crate::agent::serve::serve_over(port, root.into());
    std::process::exit(code);
}
