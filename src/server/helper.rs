//! The helper: `vmhost helper --socket PATH` serves the helper protocol for one VM.
//!
//! Every message of the catalogue has a handler registered in [`Helper::new`]. Until an
//! instance exists, instance-scoped messages answer Error code 3 (NotRunning) naming the
//! operation. This build has no VM backend yet, so InstanceNew (after checking its
//! payload) and BuildDockerfile answer code 6 (HypervisorUnavailable).
//!
//! The helper process lives as long as its clients: it serves with
//! [`crate::server::Server::serve_until_idle`], so when the last connection closes
//! (after InstanceClose, or because the client went away) it cleans up and exits.

use std::sync::Arc;

use crate::server::{Call, Handler, HandlerResult, Mux};
use crate::wire::{msg, Decoder, DockerfileOptions, ErrorCode, ErrorFrame, InstanceNew, Wire};

/// The helper-protocol service of one helper process.
pub struct Helper {
    mux: Mux,
}

impl Helper {
    /// A helper with no instance.
    pub fn new() -> Arc<Helper> {
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
        Arc::new(Helper { mux })
    }
}

impl Handler for Helper {
    fn handle(&self, call: &mut Call<'_>, ty: u16, payload: &[u8]) -> HandlerResult {
        self.mux.handle(call, ty, payload)
    }
}

const NO_BACKEND: &str = "this build of vmhost has no VM backend to run instances with";

fn instance_new(_call: &mut Call<'_>, dec: &mut Decoder<'_>) -> HandlerResult {
    let req = InstanceNew::decode(dec)?;
    dec.finish()?;
    log::info!("InstanceNew {:?} {:?} refused: {NO_BACKEND}", req.source_type, req.source_path);
    Err(ErrorFrame::new(ErrorCode::HypervisorUnavailable, "InstanceNew", NO_BACKEND)
        .with_path(req.source_path))
}

fn build_dockerfile(_call: &mut Call<'_>, dec: &mut Decoder<'_>) -> HandlerResult {
    let opts = DockerfileOptions::decode(dec)?;
    dec.finish()?;
    Err(ErrorFrame::new(ErrorCode::HypervisorUnavailable, "BuildDockerfile", NO_BACKEND)
        .with_path(opts.context_dir))
}

fn no_instance(_call: &mut Call<'_>, _dec: &mut Decoder<'_>) -> HandlerResult {
    // The op (the message's name) is filled in by the mux.
    Err(ErrorFrame::new(ErrorCode::NotRunning, "", "no instance is running: send InstanceNew first"))
}
