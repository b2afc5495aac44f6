//! The first command a guest boots with, declared before its boot (the library's
//! `Instance::new_with_first_command`), and how it reaches a helper process.

use super::command::exec_request;
use crate::contract::proto::ExecRequest;

/// A guest's first command, declared when it boots ([`super::helper::Helper::set_first_command`],
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
    pub(super) fn request(&self, user: &str) -> ExecRequest {
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
