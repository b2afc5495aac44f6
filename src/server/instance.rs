//! The Instance* family (but InstanceNew, which makes one: see the helper): the booted
//! instance's lifecycle, console, network and main process.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::frame;
use super::session::Session;
use super::{Call, HandlerResult};
use crate::vm::agent_link::Process;
use crate::vm::Machine;
use crate::wire::{msg, ErrorCode, ErrorFrame, Request, Response};

/// The helper's booted instance: its VM and its session.
pub(super) struct BootedInstance {
    pub(super) vm: Machine,
    pub(super) session: Session,
    /// Set once InstanceExec started the main process (there is one).
    pub(super) main_started: std::sync::atomic::AtomicBool,
    /// What its snapshots start from (an instance of an image or a snapshot).
    pub(super) origin: Option<super::snapshot::Origin>,
}

impl BootedInstance {
    /// The answer to a request that failed: once the VM has ended, whatever failed says
    /// NotRunning and how the VM ended, rather than what broke on the way (the agent
    /// channel's EOF, a closed handle).
    pub(super) fn after_end(&self, ty: u16, f: ErrorFrame) -> ErrorFrame {
        match self.vm.ended_error(&crate::wire::type_name(ty)) {
            Some(e) => {
                log::debug!("{} after the VM's end: {} (was: {})", crate::wire::type_name(ty), e, f.message);
                frame(&e, &f.path)
            }
            None => f,
        }
    }

    pub(super) fn new(
        vm: Machine,
        user: String,
        image: Option<crate::image::oci::RunConfig>,
        origin: Option<super::snapshot::Origin>,
    ) -> BootedInstance {
        BootedInstance {
            vm,
            session: Session::new(user, image),
            main_started: std::sync::atomic::AtomicBool::new(false),
            origin,
        }
    }
}

/// Serves an Instance* request on the instance `inst`.
pub(super) fn serve(
    slot: &Mutex<Option<Arc<BootedInstance>>>,
    inst: &Arc<BootedInstance>,
    call: &mut Call<'_>,
    req: Request,
) -> HandlerResult {
    let vm = &inst.vm;
    match req {
        Request::InstanceClose {} => {
            // Every listener and connection ends (their waiters wake), handles freed.
            super::net::close_all(&inst.session);
            let r = vm.stop(Duration::from_secs(10));
            let mut slot = slot.lock();
            // Only this instance: another connection may have made a new one meanwhile.
            if slot.as_ref().is_some_and(|i| Arc::ptr_eq(i, inst)) {
                slot.take();
            }
            r.map(|()| Response::InstanceClose {}.into()).map_err(|e| frame(&e, ""))
        }
        Request::InstanceWait {} => loop {
            if let Some(r) = vm.wait_timeout(Duration::from_millis(200)) {
                break r.map(|()| Response::InstanceWait {}.into()).map_err(|e| frame(&e, ""));
            }
            if call.is_cancelled() {
                break Err(ErrorFrame::new(ErrorCode::Cancelled, "", "the client went away"));
            }
        },
        Request::InstanceId {} => Ok(Response::InstanceId { id: vm.id().to_string() }.into()),
        Request::InstanceIsRunning {} => Ok(Response::InstanceIsRunning { running: vm.is_running() }.into()),
        Request::InstanceEnd {} => {
            let (kind, number, detail) = match vm.end().filter(|_| vm.state().is_final()) {
                Some(end) => {
                    let (kind, number, detail) = end.to_wire();
                    (kind, number, detail.to_string())
                }
                None => (0, 0, String::new()),
            };
            Ok(Response::InstanceEnd { kind, number, detail }.into())
        }
        Request::InstancePublish { address, guest_port } => {
            let bad = |m: String| ErrorFrame::new(ErrorCode::InvalidArgument, "", m);
            let host: std::net::SocketAddr =
                address.parse().map_err(|_| bad(format!("{address:?} is not IP:PORT")))?;
            let port = u16::try_from(guest_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(format!("guest port {guest_port} is not 1-65535")))?;
            let agent = vm.agent().map_err(|e| frame(&e, ""))?;
            let p = crate::vm::publish::Published::start(agent, host, port).map_err(|e| frame(&e, ""))?;
            let address = p.host_addr().to_string();
            inst.session.published.lock().push(p);
            Ok(Response::InstancePublish { address }.into())
        }
        Request::InstanceSetConsole { cols, rows } => {
            if !(1..=10_000).contains(&cols) || !(1..=10_000).contains(&rows) {
                return Err(ErrorFrame::new(
                    ErrorCode::InvalidArgument,
                    "",
                    format!("console size {cols}x{rows}"),
                ));
            }
            inst.session.console.resize(cols as u16, rows as u16);
            Ok(Response::InstanceSetConsole {}.into())
        }
        Request::InstanceSetNetwork { enabled } => vm
            .set_network(enabled)
            .map(|()| Response::InstanceSetNetwork {}.into())
            .map_err(|e| frame(&e, "")),
        Request::InstanceExec { name, args } => {
            // The instance's main process, as the original's Exec: PID 1 of the guest
            // for the command (a PID namespace of its own: crate::agent::main_process),
            // attached to the console: a terminal in the guest sized by
            // InstanceSetConsole, our stdin typed into it, its output on our stdout.
            // When it exits the VM ends (InstanceWait answers, InstanceEnd says how)
            // and the answer is the original's: nothing after the status byte for exit
            // status 0, an error (code 7, "exit status N") for any other.
            use std::sync::atomic::Ordering::SeqCst;
            if inst.main_started.swap(true, SeqCst) {
                return Err(ErrorFrame::new(
                    ErrorCode::InvalidArgument,
                    "exec",
                    "the instance already has its main process (InstanceExec runs once)",
                ));
            }
            let c = inst.session.command(name.clone(), args);
            c.tty.store(true, SeqCst);
            c.spec.lock().main = true;
            if let Ok(term) = std::env::var("TERM") {
                c.set_env("TERM", &term);
            }
            c.pipes.want(0)?;
            let p = match vm
                .agent()
                .map_err(|e| frame(&e, ""))
                .and_then(|agent| c.start(agent, &inst.session.console))
            {
                Ok(p) => p,
                Err(e) => {
                    // Nothing was replaced: the instance runs on, and may try again (a
                    // start that failed because the VM ended says NotRunning).
                    inst.main_started.store(false, SeqCst);
                    return Err(inst.after_end(msg::INSTANCE_EXEC, e));
                }
            };
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let typist = {
                let (p, stop) = (p.clone(), stop.clone());
                std::thread::spawn(move || forward_console_input(&p, &stop))
            };
            let code = p.drain_until(
                |_, data| {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(data).and_then(|()| out.flush());
                    Ok(())
                },
                &call.canceller(),
            );
            stop.store(true, SeqCst);
            let _ = typist.join();
            c.record(&code);
            // Its exit status, or SIGKILL's (128 + 9) when the client went away (drain_until
            // killed it); when the VM itself failed, the backend says how it ended.
            let status = match &code {
                Ok(status) => Some(*status),
                Err(_) if call.is_cancelled() => Some(128 + nix::libc::SIGKILL),
                Err(_) => None,
            };
            if let Some(status) = status {
                log::info!("InstanceExec: the main process exited with status {status}; ending the VM");
                if let Err(e) = vm.end_because(crate::vm::VmEnd::MainExited(status), Duration::from_secs(10))
                {
                    log::warn!("ending the VM after its main process: {e}");
                }
            }
            let code = code.map_err(|e| frame(&vm.ended_error("InstanceExec").unwrap_or(e), ""))?;
            if code == 0 {
                Ok(Response::InstanceExec {}.into())
            } else {
                Err(ErrorFrame::new(ErrorCode::Io, "exec", format!("exec {name}: exit status {code}"))
                    .with_path(name))
            }
        }
        other => Err(super::not_yet(other.name())),
    }
}

/// Types our stdin into the console's process until `stop`; EOF on our stdin sends
/// nothing (a terminal has no EOF of its own: the user types Ctrl-D).
fn forward_console_input(p: &Process, stop: &std::sync::atomic::AtomicBool) {
    // Raw reads of fd 0: std's buffered Stdin could hold bytes that poll cannot see.
    let fd = 0;
    let mut buf = [0u8; 4096];
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let mut pfd = nix::libc::pollfd { fd, events: nix::libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { nix::libc::poll(&mut pfd, 1, 100) };
        if n <= 0 {
            continue;
        }
        // SAFETY: read into a buffer we own, at most its length.
        let r = unsafe { nix::libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match usize::try_from(r) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if p.write_stdin(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
