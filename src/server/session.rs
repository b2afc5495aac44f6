//! [`Session`]: what the helper keeps of an instance apart from its VM.

use std::sync::Arc;

use parking_lot::Mutex;

use super::command::Cmd;
use super::console::Console;
use super::table::Table;
use crate::contract::DEFAULT_PATH;
use crate::image::oci::RunConfig;

/// What the helper keeps of an instance apart from its VM: the user its commands run
/// as, the container image's run configuration (for an instance of an image), its
/// tables of handles, its console. The Cmd*, Fs* and File* handlers serve against a
/// session and an agent link, with or without a guest behind the link.
pub(super) struct Session {
    pub(super) user: String,
    pub(super) image: Option<RunConfig>,
    pub(super) cmds: Mutex<Table<Arc<Cmd>>>,
    pub(super) files: super::fs::Files,
    pub(super) listeners: Mutex<Table<Arc<super::net::NetListener>>>,
    pub(super) conns: Mutex<Table<Arc<super::net::NetConn>>>,
    /// Guest ports published on the host (InstancePublish), until InstanceClose.
    pub(super) published: Mutex<Vec<crate::vm::publish::Published>>,
    pub(super) console: Console,
}

impl Session {
    pub(super) fn new(user: String, image: Option<RunConfig>) -> Session {
        Session {
            user,
            image,
            cmds: Mutex::new(Table::new()),
            files: Mutex::new(Table::new()),
            listeners: Mutex::new(Table::new()),
            conns: Mutex::new(Table::new()),
            published: Mutex::new(Vec::new()),
            console: Console::default(),
        }
    }

    /// A new command: as the instance's user; in an image's instance, with the image's
    /// environment, working directory and user (the instance's user option wins), as
    /// `docker exec` runs in a container.
    pub(super) fn command(&self, program: String, args: Vec<String>) -> Arc<Cmd> {
        let Some(image) = &self.image else { return Cmd::new(program, args, &self.user) };
        let user =
            if self.user.is_empty() { image.user.clone().unwrap_or_default() } else { self.user.clone() };
        let c = Cmd::new(program, args, &user);
        {
            let mut spec = c.spec.lock();
            let env = image.env.clone().unwrap_or_default();
            if !env.is_empty() {
                spec.env = env;
                if !spec.env.iter().any(|kv| kv.starts_with("PATH=")) {
                    spec.env.push(format!("PATH={DEFAULT_PATH}"));
                }
            }
            if let Some(dir) = image.working_dir.clone().filter(|d| !d.is_empty()) {
                spec.dir = dir;
            }
        }
        c
    }

    /// The program and arguments of CmdEntrypoint with `args`: as `docker run IMAGE
    /// ARGS` has it, the image's entrypoint followed by `args`, or by its Cmd when
    /// `args` is empty; without an entrypoint, `args` or the Cmd. A plain root has no
    /// configuration: the first argument is the program, or a shell.
    pub(super) fn entrypoint(&self, args: Vec<String>) -> Result<(String, Vec<String>), String> {
        let mut argv = match &self.image {
            None if args.is_empty() => vec!["/bin/sh".to_string()],
            None => args,
            Some(image) => {
                let mut argv = image.entrypoint.clone().unwrap_or_default();
                if args.is_empty() {
                    argv.extend(image.cmd.clone().unwrap_or_default());
                } else {
                    argv.extend(args);
                }
                argv
            }
        };
        if argv.is_empty() {
            return Err("the image has neither an entrypoint nor a command: give one".into());
        }
        let program = argv.remove(0);
        Ok((program, argv))
    }
}
