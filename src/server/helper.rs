//! The helper: `vmhost helper --socket PATH` serves the helper protocol for one VM.
//!
//! Every message of the catalogue has a handler registered in [`Helper::new`]. Until an
//! instance exists, instance-scoped messages answer Error code 3 (NotRunning) naming the
//! operation. This build has no VM backend yet, so InstanceNew (after checking its
//! payload) and BuildDockerfile answer code 6 (HypervisorUnavailable).
//!
//! The helper process lives as long as its clients: when the last connection closes
//! (after InstanceClose, or because the client went away), [`Helper::wait_idle`]
//! returns and the process cleans up and exits.

use std::collections::HashSet;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::server::{Call, ConnId, Handler, HandlerResult, Mux};
use crate::wire::{msg, Decoder, DockerfileOptions, ErrorCode, ErrorFrame, InstanceNew, Wire};

/// The helper-protocol service of one helper process.
pub struct Helper {
    mux: Mux,
    clients: Mutex<HashSet<ConnId>>,
    idle_tx: Sender<()>,
    idle_rx: Receiver<()>,
}

impl Helper {
    /// A helper with no instance.
    pub fn new() -> Arc<Helper> {
        let (idle_tx, idle_rx) = crossbeam_channel::bounded(1);
        let mut mux = Mux::new();
        for &(ty, _) in msg::ALL {
            if msg::is_answer(ty) {
                continue;
            }
            match ty {
                msg::INSTANCE_NEW => mux.register(ty, instance_new),
                msg::BUILD_DOCKERFILE => mux.register(ty, build_dockerfile),
                _ => mux.register(ty, no_instance),
            };
        }
        Arc::new(Helper {
            mux,
            clients: Mutex::new(HashSet::new()),
            idle_tx,
            idle_rx,
        })
    }

    /// Blocks until a client has connected and every client has gone again.
    pub fn wait_idle(&self) {
        let _ = self.idle_rx.recv();
    }

    /// A receiver that gets one message when the helper becomes idle.
    pub fn idle(&self) -> Receiver<()> {
        self.idle_rx.clone()
    }
}

impl Handler for Helper {
    fn handle(&self, call: &mut Call<'_>, ty: u16, payload: &[u8]) -> HandlerResult {
        self.mux.handle(call, ty, payload)
    }

    fn connected(&self, conn: ConnId) {
        self.clients.lock().insert(conn);
    }

    fn disconnected(&self, conn: ConnId) {
        let mut clients = self.clients.lock();
        clients.remove(&conn);
        if clients.is_empty() {
            log::info!("last client disconnected");
            let _ = self.idle_tx.try_send(());
        }
    }
}

const NO_BACKEND: &str = "this build of vmhost has no VM backend to run instances with";

fn instance_new(_call: &mut Call<'_>, dec: &mut Decoder<'_>) -> HandlerResult {
    let req = InstanceNew::decode(dec)?;
    dec.finish()?;
    log::info!(
        "InstanceNew {:?} {:?} refused: {NO_BACKEND}",
        req.source_type,
        req.source_path
    );
    Err(
        ErrorFrame::new(ErrorCode::HypervisorUnavailable, "InstanceNew", NO_BACKEND)
            .with_path(req.source_path),
    )
}

fn build_dockerfile(_call: &mut Call<'_>, dec: &mut Decoder<'_>) -> HandlerResult {
    let opts = DockerfileOptions::decode(dec)?;
    dec.finish()?;
    Err(ErrorFrame::new(
        ErrorCode::HypervisorUnavailable,
        "BuildDockerfile",
        NO_BACKEND,
    )
    .with_path(opts.context_dir))
}

fn no_instance(_call: &mut Call<'_>, _dec: &mut Decoder<'_>) -> HandlerResult {
    // The op (the message's name) is filled in by the mux.
    Err(ErrorFrame::new(
        ErrorCode::NotRunning,
        "",
        "no instance is running: send InstanceNew first",
    ))
}
