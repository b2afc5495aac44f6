//! A guest command that reads like [`std::process::Command`]: [`Command`], the
//! [`Child`] it spawns with its pipes ([`ChildStdin`], [`ChildStdout`], [`ChildStderr`]),
//! its [`Output`] and [`ExitStatus`], and where its standard streams go ([`Stdio`]).

use super::fs::File;
use super::transport::{answer, unexpected, Transport};
use crate::error::{Error, Result};
use crate::wire::{self, Request};

/// How a guest command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    code: i32,
}

impl ExitStatus {
    /// The exit code (128 + N when killed by signal N, as shells report it).
    pub fn code(&self) -> Option<i32> {
        Some(self.code)
    }

    /// Whether the code is 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status: {}", self.code)
    }
}

/// What a finished command printed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
}

/// What a spawned guest command's stdin, stdout or stderr is connected to, like
/// [`std::process::Stdio`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stdio {
    /// Nothing: stdin reads EOF, output is discarded. The default for [`Command::spawn`]
    /// (std's default, inheriting, has no meaning across the VM boundary).
    #[default]
    Null,
    /// A pipe: [`Child::stdin`], [`Child::stdout`] or [`Child::stderr`].
    Piped,
}

impl Stdio {
    /// A pipe to the child.
    pub fn piped() -> Stdio {
        Stdio::Piped
    }
    /// Nothing.
    pub fn null() -> Stdio {
        Stdio::Null
    }
}

/// A guest command being prepared, like [`std::process::Command`].
#[derive(Debug)]
pub struct Command<'a> {
    t: &'a Transport,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: Option<String>,
    stdio: [Stdio; 3],
    tty: bool,
    /// The image's entrypoint (CmdEntrypoint), `args` after it, instead of `program`.
    entrypoint: bool,
}

impl<'a> Command<'a> {
    /// `program` in the instance `t` reaches, with no arguments, environment or directory of its own, its
    /// standard streams at /dev/null ([`Instance::command`] makes it).
    pub(super) fn new(t: &'a Transport, program: String) -> Command<'a> {
        Command {
            t,
            program,
            args: Vec::new(),
            env: Vec::new(),
            dir: None,
            stdio: [Stdio::Null; 3],
            tty: false,
            entrypoint: false,
        }
    }

    /// The image's entrypoint with the arguments added ([`Instance::entrypoint`] makes it).
    pub(super) fn entrypoint(t: &'a Transport) -> Command<'a> {
        Command { entrypoint: true, ..Command::new(t, String::new()) }
    }

    /// Adds an argument.
    pub fn arg(&mut self, a: impl Into<String>) -> &mut Self {
        self.args.push(a.into());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, args: I) -> &mut Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets several environment variables.
    pub fn envs<I: IntoIterator<Item = (K, V)>, K: Into<String>, V: Into<String>>(
        &mut self,
        vars: I,
    ) -> &mut Self {
        self.env.extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Sets the working directory.
    pub fn current_dir(&mut self, dir: impl Into<String>) -> &mut Self {
        self.dir = Some(dir.into());
        self
    }

    /// Connects stdin for [`Command::spawn`] (the collecting calls give it none).
    pub fn stdin(&mut self, s: Stdio) -> &mut Self {
        self.stdio[0] = s;
        self
    }

    /// Connects stdout for [`Command::spawn`] (the collecting calls collect it).
    pub fn stdout(&mut self, s: Stdio) -> &mut Self {
        self.stdio[1] = s;
        self
    }

    /// Connects stderr for [`Command::spawn`] (the collecting calls collect it).
    pub fn stderr(&mut self, s: Stdio) -> &mut Self {
        self.stdio[2] = s;
        self
    }

    /// Runs it on a terminal in the guest (a pty, sized by [`Instance::set_console`](crate::Instance::set_console)):
    /// its output, stdout and stderr together, comes as stdout with the terminal's
    /// line endings, and stdin is typed into the terminal.
    pub fn tty(&mut self, on: bool) -> &mut Self {
        self.tty = on;
        self
    }

    /// Creates the command handle in the helper, with env and directory applied.
    fn prepare(&self) -> Result<u64> {
        let t = self.t;
        let h = if self.entrypoint {
            answer!(t, Request::CmdEntrypoint { args: self.args.clone() }, CmdEntrypoint { handle })
        } else {
            answer!(
                t,
                Request::CmdNew { name: self.program.clone(), args: self.args.clone() },
                CmdNew { handle }
            )
        };
        let setup = || -> Result<()> {
            for (k, v) in &self.env {
                t.call(&Request::CmdSetEnv { handle: h, key: k.clone(), value: v.clone() })?;
            }
            if let Some(d) = &self.dir {
                t.call(&Request::CmdSetDir { handle: h, dir: d.clone() })?;
            }
            if self.tty {
                t.call(&Request::CmdSetTty { handle: h, enabled: true })?;
            }
            Ok(())
        };
        if let Err(e) = setup() {
            let _ = t.call(&Request::CmdFree { handle: h });
            return Err(e);
        }
        Ok(h)
    }

    fn with_handle<T>(&self, f: impl FnOnce(u64) -> Result<T>) -> Result<T> {
        let h = self.prepare()?;
        let r = f(h);
        let _ = self.t.call(&Request::CmdFree { handle: h });
        r
    }

    /// Runs the command and collects its output, stdout and stderr apart. A non-zero
    /// exit is not an error: it is in `status`.
    pub fn output(&self) -> Result<Output> {
        let mut out = Output { status: ExitStatus { code: -1 }, stdout: Vec::new(), stderr: Vec::new() };
        let code = self.stream(|stream, data| {
            if stream == wire::STREAM_STDERR {
                out.stderr.extend_from_slice(data);
            } else {
                out.stdout.extend_from_slice(data);
            }
            Ok(())
        })?;
        out.status = ExitStatus { code };
        Ok(out)
    }

    /// Runs the command, passing its output to `f` as it comes (stream 1 stdout, 2
    /// stderr). Returns the exit code.
    pub fn stream(&self, mut f: impl FnMut(u8, &[u8]) -> Result<()>) -> Result<i32> {
        self.with_handle(|h| self.run_streaming(h, &mut f))
    }

    /// CmdRunStreaming of command `h`: its chunks to `f`, its exit code back.
    fn run_streaming(&self, h: u64, f: &mut dyn FnMut(u8, &[u8]) -> Result<()>) -> Result<i32> {
        self.t.run_streaming(&Request::CmdRunStreaming { handle: h }, f)
    }

    /// Like [`Command::stream`], feeding `input` to the command's stdin as it is read
    /// and closing it at `input`'s end. `input` is read on a thread of its own, which is
    /// left to end by itself if the command ends first (a terminal nobody types into).
    ///
    /// ```no_run
    /// use vmhost::{Image, Instance};
    /// let vm = Instance::new(Image::Default, Default::default())?;
    /// let mut out = Vec::new();
    /// let code = vm.command("wc").arg("-c").stream_stdin(&b"12345"[..], |_, d| {
    ///     out.extend_from_slice(d);
    ///     Ok(())
    /// })?;
    /// assert_eq!((code, out.as_slice()), (0, &b"5\n"[..]));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stream_stdin(
        &self,
        mut input: impl std::io::Read + Send + 'static,
        mut f: impl FnMut(u8, &[u8]) -> Result<()>,
    ) -> Result<i32> {
        use crossbeam_channel::RecvTimeoutError;
        use std::sync::atomic::{AtomicBool, Ordering};
        self.with_handle(|h| {
            let t = self.t;
            let pipe = answer!(t, Request::CmdStdinPipe { handle: h }, CmdStdinPipe { handle });
            let mut stdin = ChildStdin(File::pipe(self.t, pipe, "stdin"));
            // The reader may block for ever: a detached thread, passing chunks on.
            let (tx, rx) = crossbeam_channel::bounded::<Option<Vec<u8>>>(4);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let chunk = match input.read(&mut buf) {
                        Ok(0) | Err(_) => None,
                        Ok(n) => Some(buf[..n].to_vec()),
                    };
                    let last = chunk.is_none();
                    if tx.send(chunk).is_err() || last {
                        return;
                    }
                }
            });
            let done = AtomicBool::new(false);
            std::thread::scope(|s| {
                let writer = s.spawn(|| {
                    loop {
                        match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                            Ok(Some(d)) => {
                                if std::io::Write::write_all(&mut stdin, &d).is_err() {
                                    return;
                                }
                            }
                            Ok(None) | Err(RecvTimeoutError::Disconnected) => break,
                            Err(RecvTimeoutError::Timeout) if done.load(Ordering::SeqCst) => return,
                            Err(RecvTimeoutError::Timeout) => {}
                        }
                    }
                    let _ = stdin.close();
                });
                let r = self.run_streaming(h, &mut f);
                done.store(true, Ordering::SeqCst);
                let _ = writer.join();
                r
            })
        })
    }

    /// Runs the command with its output discarded and returns how it ended.
    pub fn status(&self) -> Result<ExitStatus> {
        self.with_handle(|h| {
            let code = answer!(self.t, Request::CmdRun { handle: h }, CmdRun { exit_code });
            Ok(ExitStatus { code })
        })
    }

    /// Runs the command and returns stdout and stderr interleaved as they came.
    pub fn combined_output(&self) -> Result<(ExitStatus, Vec<u8>)> {
        self.with_handle(|h| {
            let (out, code) = answer!(
                self.t,
                Request::CmdCombinedOutput { handle: h },
                CmdCombinedOutput { output, exit_code }
            );
            Ok((ExitStatus { code }, out))
        })
    }

    /// Starts the command and returns at once, with the pipes asked for through
    /// [`Command::stdin`], [`Command::stdout`] and [`Command::stderr`].
    ///
    /// ```no_run
    /// use std::io::{Read, Write};
    /// use vmhost::{Image, Instance, Stdio};
    /// let vm = Instance::new(Image::Default, Default::default())?;
    /// let mut child = vm.command("tr").arg("a-z").arg("A-Z").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    /// child.stdin.take().unwrap().write_all(b"hello\n")?; // dropped: EOF
    /// let mut s = String::new();
    /// child.stdout.as_mut().unwrap().read_to_string(&mut s)?;
    /// assert_eq!(s, "HELLO\n");
    /// assert!(child.wait()?.success());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn spawn(&self) -> Result<Child<'a>> {
        let h = self.prepare()?;
        let t = self.t;
        let mut pipes: [Option<u64>; 3] = [None; 3];
        let started = (|| -> Result<()> {
            for (i, s) in self.stdio.iter().enumerate() {
                if *s == Stdio::Piped {
                    let req = match i {
                        0 => Request::CmdStdinPipe { handle: h },
                        1 => Request::CmdStdoutPipe { handle: h },
                        _ => Request::CmdStderrPipe { handle: h },
                    };
                    pipes[i] = Some(match t.answer(&req)? {
                        wire::Response::CmdStdinPipe { handle }
                        | wire::Response::CmdStdoutPipe { handle }
                        | wire::Response::CmdStderrPipe { handle } => handle,
                        other => return Err(unexpected(&req, &other)),
                    });
                }
            }
            t.call(&Request::CmdStart { handle: h }).map(drop)
        })();
        let names = ["stdin", "stdout", "stderr"];
        let pipe = |i: usize| pipes[i].map(|handle| File::pipe(self.t, handle, names[i]));
        if let Err(e) = started {
            for i in 0..3 {
                drop(pipe(i));
            }
            let _ = t.call(&Request::CmdFree { handle: h });
            return Err(e);
        }
        Ok(Child {
            t: self.t,
            handle: h,
            freed: false,
            stdin: pipe(0).map(ChildStdin),
            stdout: pipe(1).map(ChildStdout),
            stderr: pipe(2).map(ChildStderr),
        })
    }
}

/// The write end of a spawned guest command's stdin; dropping it sends EOF.
#[derive(Debug)]
pub struct ChildStdin<'a>(File<'a>);

impl ChildStdin<'_> {
    /// Closes it (EOF for the command), reporting any error.
    pub fn close(self) -> Result<()> {
        self.0.close()
    }
}

impl std::io::Write for ChildStdin<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The read end of a spawned guest command's stdout.
#[derive(Debug)]
pub struct ChildStdout<'a>(File<'a>);

impl std::io::Read for ChildStdout<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }

    fn read_to_end(&mut self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        self.0.read_to_end(buf)
    }
}

/// The read end of a spawned guest command's stderr.
#[derive(Debug)]
pub struct ChildStderr<'a>(File<'a>);

impl std::io::Read for ChildStderr<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }

    fn read_to_end(&mut self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        self.0.read_to_end(buf)
    }
}

/// A started guest command, like [`std::process::Child`].
#[derive(Debug)]
pub struct Child<'a> {
    t: &'a Transport,
    handle: u64,
    freed: bool,
    /// Its stdin, when piped.
    pub stdin: Option<ChildStdin<'a>>,
    /// Its stdout, when piped.
    pub stdout: Option<ChildStdout<'a>>,
    /// Its stderr, when piped.
    pub stderr: Option<ChildStderr<'a>>,
}

impl Child<'_> {
    /// Whether it has exited: its status, or None while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.t.answer(&Request::CmdExitCode { handle: self.handle }) {
            Ok(wire::Response::CmdExitCode { exit_code }) => Ok(Some(ExitStatus { code: exit_code })),
            Ok(other) => Err(unexpected(&Request::CmdExitCode { handle: self.handle }, &other)),
            Err(Error::Remote(ef)) if ef.code == wire::ErrorCode::InvalidArgument => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads stdout and stderr (those piped) to their end at once, then waits, like
    /// [`std::process::Child::wait_with_output`]. Stdin is closed first.
    pub fn wait_with_output(mut self) -> Result<Output> {
        use std::io::Read;
        drop(self.stdin.take());
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (so, se) = (self.stdout.take(), self.stderr.take());
        std::thread::scope(|s| -> Result<()> {
            let t = se.map(|mut e| {
                let buf = &mut err;
                s.spawn(move || e.read_to_end(buf).map(drop))
            });
            if let Some(mut o) = so {
                o.read_to_end(&mut out).map_err(|e| Error::from_io("read stdout", e))?;
            }
            if let Some(t) = t {
                t.join().map_err(|_| Error::Closed)?.map_err(|e| Error::from_io("read stderr", e))?;
            }
            Ok(())
        })?;
        let status = self.wait()?;
        Ok(Output { status, stdout: out, stderr: err })
    }

    /// Waits for it to exit. Its stdin, if piped, is closed first (as std does), so a
    /// command reading it to the end can finish.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(stdin) = self.stdin.take() {
            stdin.close()?;
        }
        let code = answer!(self.t, Request::CmdWait { handle: self.handle }, CmdWait { exit_code });
        Ok(ExitStatus { code })
    }

    /// Kills it (SIGKILL to its process group in the guest).
    pub fn kill(&mut self) -> Result<()> {
        self.t.call(&Request::CmdKill { handle: self.handle }).map(drop)
    }
}

impl Drop for Child<'_> {
    fn drop(&mut self) {
        if !std::mem::replace(&mut self.freed, true) {
            let _ = self.t.call(&Request::CmdFree { handle: self.handle });
        }
    }
}
