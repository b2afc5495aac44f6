//! [`Instance`]: a running guest, in-process or behind a helper process. Its commands
//! ([`super::process::Command`]) are in `process.rs`.
//!
//! Both modes speak the helper protocol: through a helper's socket, or straight into
//! the same handlers in this process ([`crate::server::helper::Helper::call_local`]),
//! so they behave the same. `VMHOST_USE_HELPER` chooses ([`super::use_helper`]).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::progress::Progress;
pub use crate::server::helper::FirstCommand;
use crate::server::helper::Helper;
use crate::wire::{self, InstanceNew, InstanceOptions, Request, SourceType};

use super::process::Command;
use super::transport::{answer, Transport};
use super::Client;

/// Where an instance's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Image {
    /// The default root (busybox).
    #[default]
    Default,
    /// A root filesystem directory.
    Dir(PathBuf),
    /// A tar archive, optionally compressed.
    Tar(PathBuf),
    /// A container image from a registry, `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`
    /// (`alpine`, `localhost:5000/tools:1`): taken from the image store, pulled when
    /// missing (`VMHOST_PULL`), its entrypoint, command, environment, working directory
    /// and user honoured ([`Instance::entrypoint`]).
    Ref(String),
    /// A snapshot ([`Snapshot::image`](super::snapshot::Snapshot::image)): the path of its
    /// record, `CACHE/snapshots/KEY`.
    Snapshot(PathBuf),
}

impl Image {
    /// A directory or a tar file, by what `path` is (a missing path is treated as a tar
    /// file, and fails to open with a clear error).
    pub fn from_path(path: impl AsRef<Path>) -> Image {
        let p = path.as_ref();
        if p.is_dir() {
            Image::Dir(p.to_path_buf())
        } else {
            Image::Tar(p.to_path_buf())
        }
    }
}

/// A running guest.
///
/// ```no_run
/// use vmhost::client::instance::{Image, Instance};
/// let vm = Instance::new(Image::Default, Default::default())?;
/// let out = vm.command("sh").arg("-c").arg("echo hello; exit 3").output()?;
/// assert_eq!(out.stdout, b"hello\n");
/// assert_eq!(out.status.code(), Some(3));
/// vm.close()?;
/// # Ok::<(), vmhost::Error>(())
/// ```
pub struct Instance {
    pub(super) t: Transport,
    id: String,
    closed: bool,
    /// Whether dropping it stops the guest (not for one we attached to).
    owned: bool,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance").finish_non_exhaustive()
    }
}

impl Instance {
    /// Boots an instance of `image`, in this process or through a helper as
    /// `VMHOST_USE_HELPER` says. Boot progress shows on a terminal.
    pub fn new(image: Image, options: InstanceOptions) -> Result<Instance> {
        Instance::boot(image, options, None)
    }

    /// Like [`Instance::new`], with the guest starting `first` as soon as it is up,
    /// before it is asked: the boot-and-run of a one-shot command (`vmhost run`) then
    /// does not wait for the command's start after the boot. The instance's first
    /// [`Command`] must be `first`, and takes over the running process; see
    /// [`FirstCommand`] for the rule, and for what may see its arguments.
    ///
    /// ```no_run
    /// use vmhost::{FirstCommand, Image, Instance};
    /// let first = FirstCommand::new("uname").arg("-r");
    /// let vm = Instance::new_with_first_command(Image::Default, Default::default(), first)?;
    /// let out = vm.command("uname").arg("-r").output()?;
    /// assert!(out.status.success());
    /// # Ok::<(), vmhost::Error>(())
    /// ```
    pub fn new_with_first_command(
        image: Image,
        options: InstanceOptions,
        first: FirstCommand,
    ) -> Result<Instance> {
        Instance::boot(image, options, Some(first))
    }

    /// Boots in this process or through a helper, as `VMHOST_USE_HELPER` says.
    fn boot(image: Image, options: InstanceOptions, first: Option<FirstCommand>) -> Result<Instance> {
        let t = if super::use_helper() {
            Transport::Remote(super::spawn_helper_for(first.as_ref())?)
        } else {
            let helper = Helper::with_progress(Progress::auto());
            if let Some(first) = first {
                helper.set_first_command(first);
            }
            Transport::Local(helper)
        };
        Instance::start(t, image, options)
    }

    /// Boots an instance through a helper process, whatever `VMHOST_USE_HELPER` says.
    pub fn new_with_helper(image: Image, options: InstanceOptions) -> Result<Instance> {
        Instance::start(Transport::Remote(super::spawn_helper()?), image, options)
    }

    /// Boots an instance in this process, whatever `VMHOST_USE_HELPER` says.
    pub fn new_in_process(image: Image, options: InstanceOptions) -> Result<Instance> {
        Instance::start(Transport::Local(Helper::with_progress(Progress::auto())), image, options)
    }

    /// Attaches to the instance a helper already serves (e.g. a host process's
    /// `helper.sock`). Dropping it only disconnects; [`Instance::close`] stops the guest.
    pub fn attach(client: Client) -> Result<Instance> {
        let t = Transport::Remote(client);
        let id = answer!(t, Request::InstanceId {}, InstanceId { id });
        Ok(Instance { t, id, closed: false, owned: false })
    }

    fn start(t: Transport, image: Image, options: InstanceOptions) -> Result<Instance> {
        let (source_type, source_path) = match &image {
            Image::Default => (SourceType::Dir, String::new()),
            Image::Dir(p) => (SourceType::Dir, p.display().to_string()),
            Image::Tar(p) => (SourceType::Tar, p.display().to_string()),
            Image::Ref(_) => (SourceType::Registry, String::new()),
            Image::Snapshot(p) => (SourceType::Snapshot, p.display().to_string()),
        };
        let image_ref = match &image {
            Image::Ref(r) => r.clone(),
            _ => String::new(),
        };
        let new = InstanceNew { source_type, source_path, image_ref, cache_dir: String::new(), options };
        t.call(&Request::InstanceNew { new })?;
        let id = answer!(t, Request::InstanceId {}, InstanceId { id });
        Ok(Instance { t, id, closed: false, owned: true })
    }

    /// The instance's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The helper process's pid, when the instance runs behind one this client started.
    pub fn helper_pid(&self) -> Option<u32> {
        match &self.t {
            Transport::Remote(c) => c.helper_pid(),
            Transport::Local(_) => None,
        }
    }

    /// The helper's socket, when the instance runs behind a helper.
    pub fn helper_socket(&self) -> Option<&Path> {
        match &self.t {
            Transport::Remote(c) => Some(c.socket_path()),
            Transport::Local(_) => None,
        }
    }

    /// Whether the guest is running.
    pub fn is_running(&self) -> Result<bool> {
        Ok(answer!(self.t, Request::InstanceIsRunning {}, InstanceIsRunning { running }))
    }

    /// How the VM ended: `None` while it runs.
    ///
    /// ```no_run
    /// # let vm = vmhost::Instance::new(vmhost::Image::Default, Default::default())?;
    /// let _ = vm.command("poweroff").arg("-f").status();
    /// assert_eq!(vm.end()?, Some(vmhost::vm::VmEnd::GuestShutdown));
    /// # Ok::<(), vmhost::Error>(())
    /// ```
    pub fn end(&self) -> Result<Option<crate::vm::VmEnd>> {
        let (kind, number, detail) =
            answer!(self.t, Request::InstanceEnd {}, InstanceEnd { kind, number, detail });
        crate::vm::VmEnd::from_wire(kind, number, detail).map_err(|k| Error::InvalidArgument {
            op: "InstanceEnd".into(),
            message: format!("unknown end kind {k} (a newer helper?)"),
        })
    }

    /// Sets the console size (columns, rows): commands on a terminal
    /// ([`Command::tty`]) are resized at once, later ones start with it.
    pub fn set_console(&self, cols: u16, rows: u16) -> Result<()> {
        self.t.call(&Request::InstanceSetConsole { cols: cols as i32, rows: rows as i32 }).map(drop)
    }

    /// Connects (`true`) or disconnects the guest's network. The guest is 10.0.2.15
    /// behind QEMU's user-mode NAT and reaches the host as 10.0.2.2; it starts
    /// disconnected.
    pub fn set_network(&self, enabled: bool) -> Result<()> {
        self.t.call(&Request::InstanceSetNetwork { enabled }).map(drop)
    }

    /// The guest's filesystem, like [`std::fs`].
    pub fn fs(&self) -> super::fs::Fs<'_> {
        super::fs::Fs::new(&self.t)
    }

    /// Snapshots the guest root's changes since boot as a layer on top of the image this
    /// instance booted (a container image or a snapshot), as `docker commit` does: the
    /// guest's processes pause meanwhile. See [`Snapshot`](super::snapshot::Snapshot).
    ///
    /// ```no_run
    /// use vmhost::{Image, Instance, InstanceOptions, SnapshotOptions};
    ///
    /// let vm = Instance::new(Image::Ref("alpine:3.20".into()), InstanceOptions::default())?;
    /// vm.command("sh").arg("-c").arg("echo configured > /etc/app.conf").status()?;
    /// let snap = vm.snapshot(&SnapshotOptions::default())?;
    /// vm.close()?;
    /// let again = Instance::new(snap.image(), InstanceOptions::default())?;
    /// assert_eq!(again.fs().read("/etc/app.conf")?, b"configured\n");
    /// snap.commit("app:configured")?; // `vmhost run --image app:configured` boots it
    /// # Ok::<(), vmhost::Error>(())
    /// ```
    pub fn snapshot(&self, opts: &super::snapshot::SnapshotOptions) -> Result<super::snapshot::Snapshot> {
        super::snapshot::Snapshot::take(&self.t, opts)
    }

    /// Listens in the guest on `address` (`:PORT`, or `HOST:PORT` whose host part is
    /// ignored; port 0 picks one): guest programs connect to `host.internal:PORT`
    /// (`10.42.0.1:PORT`), whether or not the guest has a network. Nothing listens on
    /// the host's own network. See [`Listener`](super::net::Listener).
    pub fn listen(&self, address: &str) -> Result<super::net::Listener<'_>> {
        super::net::Listener::bind(&self.t, address)
    }

    /// Connects to `port` on the guest's loopback, where a guest program listens, like
    /// [`std::net::TcpStream::connect`]. No network device is needed.
    ///
    /// ```no_run
    /// use std::io::Read;
    /// use vmhost::{Image, Instance, InstanceOptions};
    ///
    /// let vm = Instance::new(Image::Default, InstanceOptions::default())?;
    /// let _server = vm.command("sh").arg("-c").arg("echo hi | nc -l -p 7000").spawn()?;
    /// # std::thread::sleep(std::time::Duration::from_millis(500));
    /// let mut conn = vm.connect(7000)?;
    /// let mut got = String::new();
    /// conn.read_to_string(&mut got)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn connect(&self, port: u16) -> Result<super::net::Conn<'_>> {
        super::net::Conn::connect(&self.t, port)
    }

    /// Publishes the guest's `guest_port` on the host address `host` (port 0: any free
    /// one), as `docker run -p` does: connections to it go to a guest program listening
    /// on that port of the guest's loopback. Returns the address bound. It lasts until
    /// the instance closes; no network device is needed.
    ///
    /// ```no_run
    /// use vmhost::{Image, Instance, InstanceOptions};
    ///
    /// let vm = Instance::new(Image::Default, InstanceOptions::default())?;
    /// let addr = vm.publish("127.0.0.1:0".parse().unwrap(), 80)?;
    /// println!("the guest's port 80 is at {addr}");
    /// # Ok::<(), vmhost::Error>(())
    /// ```
    pub fn publish(&self, host: std::net::SocketAddr, guest_port: u16) -> Result<std::net::SocketAddr> {
        let req = Request::InstancePublish { address: host.to_string(), guest_port: guest_port as u32 };
        let address = answer!(self.t, req, InstancePublish { address });
        address.parse().map_err(|_| Error::InvalidArgument {
            op: "publish".into(),
            message: format!("the helper answered {address:?}, not an address"),
        })
    }

    /// Sends one request (any message of the catalogue) and returns its typed answer,
    /// the [`wire::Response`] variant of the same name; an Error frame is
    /// [`Error::Remote`]. The std-like API is built on this; it is here for what that API
    /// does not cover.
    ///
    /// ```no_run
    /// use vmhost::wire::{Request, Response};
    /// let vm = vmhost::Instance::new(vmhost::Image::Default, Default::default())?;
    /// let Response::InstanceId { id } = vm.answer(&Request::InstanceId {})? else { unreachable!() };
    /// assert_eq!(id, vm.id());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn answer(&self, req: &Request) -> Result<wire::Response> {
        self.t.answer(req)
    }

    /// The image's own command, as `docker run IMAGE ARGS` runs it: its entrypoint
    /// followed by the arguments given to the returned [`Command`] (or by the image's
    /// command when none are), with the image's environment, working directory and user.
    /// On a plain root filesystem the first argument is the program (a shell without one).
    ///
    /// ```no_run
    /// use vmhost::{Image, Instance};
    /// let vm = Instance::new(Image::Ref("alpine:3.20".into()), Default::default())?;
    /// let out = vm.entrypoint().arg("cat").arg("/etc/alpine-release").output()?;
    /// assert!(out.status.success());
    /// # Ok::<(), vmhost::Error>(())
    /// ```
    pub fn entrypoint(&self) -> Command<'_> {
        Command::entrypoint(&self.t)
    }

    /// A command to run in the guest, like [`std::process::Command::new`].
    pub fn command(&self, program: impl Into<String>) -> Command<'_> {
        Command::new(&self.t, program.into())
    }

    /// Blocks until the guest has stopped.
    pub fn wait(&self) -> Result<()> {
        self.t.call(&Request::InstanceWait {}).map(drop)
    }

    /// Stops the guest (gracefully, then by force) and releases it.
    pub fn close(mut self) -> Result<()> {
        self.close_inner()
    }

    /// Ends a throwaway guest at once, skipping its orderly shutdown (nothing in it is
    /// kept: the root filesystem lives in guest memory). In-process this stops QEMU
    /// directly; through a helper it is [`Instance::close`].
    pub fn kill(mut self) -> Result<()> {
        match &self.t {
            Transport::Local(h) if self.owned => {
                self.closed = true;
                h.kill_instance()
            }
            _ => self.close_inner(),
        }
    }

    fn close_inner(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        let r = match self.t.call(&Request::InstanceClose {}) {
            // Already gone (stopped by its timeout, or by someone else): nothing to do.
            Err(Error::Remote(ef)) if ef.code == wire::ErrorCode::NotRunning => Ok(()),
            other => other.map(drop),
        };
        if let Transport::Remote(c) = &self.t {
            c.close()?;
        }
        r
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if !self.owned {
            if let Transport::Remote(c) = &self.t {
                let _ = c.close();
            }
            return;
        }
        if let Err(e) = self.close_inner() {
            log::warn!("closing instance {}: {e}", self.id);
        }
    }
}

/// Re-exported for convenience.
pub use crate::wire::InstanceOptions as Options;
