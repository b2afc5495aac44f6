//! The helper: `vmhost helper --socket PATH` serves the helper protocol for one VM.
//!
//! Every request's payload is decoded into a [`Request`] (a malformed one is answered
//! with code 2 before anything happens) and served by `dispatch`. Until an instance exists,
//! instance-scoped messages answer Error code 3 (NotRunning) naming the operation.
//!
//! The same service runs without a socket for the library's in-process mode
//! ([`Helper::call_local`]), so both modes share every handler.
//!
//! One file per message family: InstanceNew and the routing here; the other
//! Instance* messages in `instance.rs`, Cmd* in `cmd.rs`, Fs* and File* in `fs.rs`, the
//! command pipes (and Conn* on them) in `pipes.rs`; the handle tables in `table.rs`, the
//! first command a helper boots with in [`super::first_command`].
//!
//! The helper process lives as long as its clients: it serves with
//! [`crate::server::Server::serve_until_idle`], so when the last connection closes
//! (after InstanceClose, or because the client went away) it stops the VM and exits.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::instance::BootedInstance;
use super::{frame, not_yet};
use crate::error::Error;
use crate::progress::Progress;
use crate::server::{Call, Handler, HandlerResult};
use crate::vm::InstanceSpec;
use crate::vm::Machine;
use crate::wire::{msg, ErrorCode, ErrorFrame, Request, Response};

pub use super::command::MAX_COLLECTED_OUTPUT;
pub use super::first_command::{FirstCommand, FIRST_COMMAND_ENV};
/// The default `PATH` of guest commands.
pub use crate::contract::DEFAULT_PATH;

/// The helper-protocol service of one helper process.
pub struct Helper {
    state: Arc<State>,
}

impl std::fmt::Debug for Helper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Helper").finish_non_exhaustive()
    }
}

struct State {
    instance: Mutex<Option<Arc<BootedInstance>>>,
    /// Set while InstanceNew boots (without holding `instance`, so that other requests
    /// are answered meanwhile).
    booting: std::sync::atomic::AtomicBool,
    next_handle: std::sync::atomic::AtomicU64,
    progress: Progress,
    /// The command the next InstanceNew's guest starts at boot.
    first_command: Mutex<Option<FirstCommand>>,
    /// Snapshot handles: the helper's, not an instance's (see `super::snapshot`).
    snapshots: Mutex<super::table::Table<Arc<super::snapshot::Snap>>>,
}

impl State {
    fn handle(&self) -> u64 {
        self.next_handle.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn instance(&self) -> Result<Arc<BootedInstance>, ErrorFrame> {
        match &*self.instance.lock() {
            Some(i) => Ok(i.clone()),
            None => Err(ErrorFrame::new(
                ErrorCode::NotRunning,
                "",
                "no instance is running: send InstanceNew first",
            )),
        }
    }
}

impl State {
    /// The answer to a request that failed: once the VM has ended, whatever failed says
    /// how it ended ([`BootedInstance::after_end`]).
    fn after_end(&self, ty: u16, f: ErrorFrame) -> ErrorFrame {
        match self.instance.lock().clone() {
            Some(inst) => inst.after_end(ty, f),
            None => f,
        }
    }
}

impl Helper {
    /// A helper with no instance yet.
    pub fn new() -> Arc<Helper> {
        Helper::build(None, Progress::quiet())
    }

    /// A helper serving an instance that is already running (the per-VM host process),
    /// booted from `source` in `cache` (the base of its snapshots; `identity`: the
    /// source's when it booted, see `image::snapshot::root_identity`).
    pub fn with_vm(
        vm: Machine,
        user: String,
        source: crate::image::rootfs::Source,
        identity: Option<String>,
        cache: std::path::PathBuf,
    ) -> Arc<Helper> {
        let origin = super::snapshot::Origin { cache, base: super::snapshot::Base::Root(source, identity) };
        let h = Helper::build(None, Progress::quiet());
        *h.state.instance.lock() = Some(Arc::new(BootedInstance::new(vm, user, None, Some(origin))));
        h
    }

    /// A helper with no instance yet that reports boot progress (the library's
    /// in-process mode on a terminal).
    pub fn with_progress(progress: Progress) -> Arc<Helper> {
        Helper::build(None, progress)
    }

    fn build(vm: Option<(Machine, String)>, progress: Progress) -> Arc<Helper> {
        let state = Arc::new(State {
            instance: Mutex::new(vm.map(|(vm, user)| Arc::new(BootedInstance::new(vm, user, None, None)))),
            booting: std::sync::atomic::AtomicBool::new(false),
            next_handle: std::sync::atomic::AtomicU64::new(1),
            progress,
            first_command: Mutex::new(None),
            snapshots: Mutex::new(super::table::Table::new()),
        });
        Arc::new(Helper { state })
    }

    /// Declares the first command of the next instance this helper boots (see
    /// [`FirstCommand`]).
    pub fn set_first_command(&self, first: FirstCommand) {
        *self.state.first_command.lock() = Some(first);
    }

    /// Serves one request without a socket and without encoding anything (the
    /// library's in-process mode): `on_chunk` receives the output a streaming request
    /// sends ahead of its answer.
    pub fn call_local(&self, req: Request, on_chunk: crate::server::ChunkSink<'_>) -> HandlerResult {
        let mut call = Call::new(0, on_chunk);
        self.serve(&mut call, req)
    }

    /// Serves one decoded request; the error names the message.
    fn serve(&self, call: &mut Call<'_>, req: Request) -> HandlerResult {
        let ty = req.ty();
        let st = &self.state;
        // InstanceExec's failure is the main process's, which ended the VM.
        dispatch(st, call, req).map_err(|f| {
            let mut f = if ty == msg::INSTANCE_EXEC { f } else { st.after_end(ty, f) };
            if f.op.is_empty() {
                f.op = crate::wire::type_name(ty);
            }
            f
        })
    }

    /// Stops the instance, if any (the helper is going away).
    pub fn shutdown(&self) {
        if let Some(i) = self.state.instance.lock().take() {
            let _ = i.vm.stop(Duration::from_secs(5));
        }
    }

    /// Ends the instance at once, without the guest's shutdown (SIGTERM to QEMU, then
    /// SIGKILL): for throwaway guests whose state nobody keeps.
    pub fn kill_instance(&self) -> crate::error::Result<()> {
        match self.state.instance.lock().take() {
            Some(i) => i.vm.force_stop(),
            None => Ok(()),
        }
    }
}

/// A request's payload is decoded into a [`Request`] (a malformed one is answered with
/// code 2 before anything happens, an unknown type too), then served.
impl Handler for Helper {
    fn handle(&self, call: &mut Call<'_>, ty: u16, payload: &[u8]) -> HandlerResult {
        let refused = |message: String| {
            ErrorFrame::new(ErrorCode::InvalidArgument, crate::wire::type_name(ty), message)
        };
        match Request::from_payload(ty, payload) {
            Ok(Some(req)) => self.serve(call, req),
            Ok(None) => Err(refused(format!("unknown message type: {ty:#06x}"))),
            Err(e) => Err(refused(format!("bad payload: {e}"))),
        }
    }
}

/// Serves one decoded request.
fn dispatch(st: &State, call: &mut Call<'_>, req: Request) -> HandlerResult {
    let op = req.name();
    match req {
        Request::InstanceNew { new } => {
            use std::sync::atomic::Ordering;
            if st.instance.lock().as_ref().is_some_and(|i| !i.vm.state().is_final()) {
                return Err(ErrorFrame::new(
                    ErrorCode::InvalidArgument,
                    op,
                    "an instance is already running",
                ));
            }
            if st.booting.swap(true, Ordering::SeqCst) {
                return Err(ErrorFrame::new(
                    ErrorCode::InvalidArgument,
                    op,
                    "an instance is already booting",
                ));
            }
            let first = st.first_command.lock().take().map(|f| f.request(&new.options.user));
            let booted = InstanceSpec::from_request(&new, &st.progress).and_then(|spec| {
                let image = spec.image.clone();
                use super::snapshot::{Base, Origin};
                let origin = match (&spec.snapshot_base, &spec.source) {
                    (Some((cache, record)), _) => {
                        Some(Origin { cache: cache.clone(), base: Base::Image(record.clone()) })
                    }
                    (None, crate::image::rootfs::Source::Disk(_)) => None,
                    (None, source) => {
                        // The root as the guest boots it: its snapshots refuse a changed one.
                        let identity = crate::image::snapshot::root_identity(&spec.cache_dir, source);
                        Some(Origin {
                            cache: spec.cache_dir.clone(),
                            base: Base::Root(source.clone(), identity),
                        })
                    }
                };
                InstanceSpec { first_command: first, ..spec }.boot(&st.progress).map(|vm| (vm, image, origin))
            });
            st.booting.store(false, Ordering::SeqCst);
            let what = if new.image_ref.is_empty() { &new.source_path } else { &new.image_ref };
            let (vm, image, origin) = booted.map_err(|e| frame(&e, what))?;
            let inst = BootedInstance::new(vm, new.options.user.clone(), image, origin);
            *st.instance.lock() = Some(Arc::new(inst));
            Ok(Response::InstanceNew {}.into())
        }
        Request::BuildDockerfile { .. } => Err(not_yet("BuildDockerfile")),
        req if super::snapshot::is_handle_message(&req) => {
            super::snapshot::serve_handle(&st.snapshots, &|| st.handle(), req)
        }
        req => {
            let inst = st.instance()?;
            // Once the VM has ended, only what asks about the end (or closes) is served;
            // the rest says NotRunning and how it ended, without touching any table.
            let about_the_end = matches!(
                req,
                Request::InstanceId {}
                    | Request::InstanceIsRunning {}
                    | Request::InstanceEnd {}
                    | Request::InstanceWait {}
                    | Request::InstanceClose {}
            );
            if !about_the_end && inst.vm.state().is_final() {
                let e = inst.vm.ended_error(op).unwrap_or(Error::Closed);
                return Err(frame(&e, ""));
            }
            serve_instance(st, &inst, call, req)
        }
    }
}

fn serve_instance(
    st: &State,
    inst: &Arc<BootedInstance>,
    call: &mut Call<'_>,
    req: Request,
) -> HandlerResult {
    let vm = &inst.vm;
    match req {
        req if super::net::is_net(&inst.session, &req) => {
            let agent = vm.agent().map_err(|e| frame(&e, ""))?;
            super::net::serve(agent, &inst.session, &|| st.handle(), &call.canceller(), req)
        }
        // A pipe handle is served as a connection too, as the original's helper serves
        // it; other connections are the network family's (above).
        Request::ConnRead { handle, .. }
        | Request::ConnWrite { handle, .. }
        | Request::ConnClose { handle }
        | Request::ConnLocalAddr { handle }
        | Request::ConnRemoteAddr { handle }
            if super::fs::is_pipe_or_closed(&inst.session.files, handle) =>
        {
            let as_file = match req {
                Request::ConnRead { handle, max } => Request::FileRead { handle, max },
                Request::ConnWrite { handle, data } => Request::FileWrite { handle, data },
                Request::ConnClose { handle } => Request::FileClose { handle },
                Request::ConnLocalAddr { .. } => {
                    return Ok(Response::ConnLocalAddr { address: "pipe".into() }.into())
                }
                _ => return Ok(Response::ConnRemoteAddr { address: "pipe".into() }.into()),
            };
            let agent = vm.agent().map_err(|e| frame(&e, ""))?;
            super::fs::serve(agent, &inst.session.files, &|| st.handle(), &call.canceller(), as_file)
        }
        Request::FsSnapshot { opts } => {
            let agent = vm.agent().map_err(|e| frame(&e, ""))?;
            let cancelled = call.canceller();
            let snap = super::snapshot::take(
                agent,
                inst.origin.as_ref(),
                &opts.excludes,
                &opts.cache_dir,
                &cancelled,
            )
            .map_err(|e| inst.after_end(crate::wire::msg::FS_SNAPSHOT, frame(&e, "")))?;
            let h = st.handle();
            st.snapshots.lock().insert(h, Arc::new(snap));
            Ok(Response::FsSnapshot { handle: h }.into())
        }
        req if super::fs::is_fs(&req) => {
            let agent = vm.agent().map_err(|e| frame(&e, ""))?;
            super::fs::serve(agent, &inst.session.files, &|| st.handle(), &call.canceller(), req)
        }
        req if req.ty() >> 8 == 0x01 => super::instance::serve(&st.instance, inst, call, req),
        req if req.ty() >> 8 == 0x04 => {
            let agent = vm.agent().map_err(|e| frame(&e, ""))?;
            super::cmd::serve(agent, &inst.session, &|| st.handle(), call, req)
        }
        other => Err(not_yet(other.name())),
    }
}
