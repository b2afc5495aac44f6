//! The helper: `vmhost helper --socket PATH` serves the helper protocol for one VM.
//!
//! Every request type of the catalogue is registered in the [`Mux`]: its payload is
//! decoded into a [`Request`] (a malformed one is answered with code 2 before anything
//! happens) and dispatched in [`Helper::dispatch`]. Until an instance exists,
//! instance-scoped messages answer Error code 3 (NotRunning) naming the operation. This
//! build has no VM backend yet, so InstanceNew and BuildDockerfile answer code 6
//! (HypervisorUnavailable).
//!
//! The helper process lives as long as its clients: it serves with
//! [`crate::server::Server::serve_until_idle`], so when the last connection closes
//! (after InstanceClose, or because the client went away) it cleans up and exits.

use std::sync::Arc;

use crate::server::{Call, Handler, HandlerResult, Mux};
use crate::wire::{msg, ErrorCode, ErrorFrame, Request};

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
            mux.register(ty, move |call, dec| {
                let Some(req) = Request::read(ty, dec)? else {
                    return Err(ErrorFrame::new(
                        ErrorCode::InvalidArgument,
                        "",
                        format!("unknown message type: {ty:#06x}"),
                    ));
                };
                dec.finish()?;
                dispatch(call, req)
            });
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

/// Serves one decoded request.
fn dispatch(_call: &mut Call<'_>, req: Request) -> HandlerResult {
    match req {
        Request::InstanceNew { new } => {
            log::info!("InstanceNew {:?} {:?} refused: {NO_BACKEND}", new.source_type, new.source_path);
            Err(ErrorFrame::new(ErrorCode::HypervisorUnavailable, "InstanceNew", NO_BACKEND)
                .with_path(new.source_path))
        }
        Request::BuildDockerfile { opts } => {
            Err(ErrorFrame::new(ErrorCode::HypervisorUnavailable, "BuildDockerfile", NO_BACKEND)
                .with_path(opts.context_dir))
        }
        other => Err(ErrorFrame::new(
            ErrorCode::NotRunning,
            other.name(),
            "no instance is running: send InstanceNew first",
        )),
    }
}
