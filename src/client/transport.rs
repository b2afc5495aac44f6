//! [`Transport`]: how a client's requests reach the helper's handlers, in this process or
//! through a helper's socket, and the typed answers they give.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::server::helper::Helper;
use crate::server::Answer;
use crate::wire::{self, msg, Request, StreamChunk, Wire};

use super::Client;

/// How requests reach the handlers.
pub(super) enum Transport {
    Local(Arc<Helper>),
    Remote(Client),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Local(_) => "Transport::Local",
            Transport::Remote(_) => "Transport::Remote",
        })
    }
}

/// The fields of the typed answer to a request: `answer!(transport, request, Variant {
/// field, .. })` gives the field (or a tuple of them) of the [`wire::Response`] variant the
/// catalogue defines for that request.
macro_rules! answer {
    ($t:expr, $req:expr, $variant:ident { $($f:ident),* }) => {{
        let req = $req;
        match $t.answer(&req)? {
            wire::Response::$variant { $($f),* } => ($($f),*),
            other => return Err($crate::client::transport::unexpected(&req, &other).into()),
        }
    }};
}
pub(super) use answer;

/// The error for an answer that is not the one the catalogue gives `req` (which
/// [`wire::Response::from_fields`] never makes).
pub(super) fn unexpected(req: &Request, got: &wire::Response) -> Error {
    Error::UnexpectedFrame { request: req.name().into(), got: got.ty() }
}

impl Transport {
    /// The typed answer to `req`: in-process straight from the handler, through a
    /// helper read as the catalogue defines it.
    pub(super) fn answer(&self, req: &Request) -> Result<wire::Response> {
        match self {
            Transport::Remote(c) => {
                let r = c.call(req.ty(), &req.to_payload())?;
                wire::Response::from_fields(req.ty(), r.fields())
                    .map_err(Error::decoding(req.name()))?
                    .ok_or_else(|| Error::UnexpectedFrame { request: req.name().into(), got: req.ty() })
            }
            Transport::Local(h) => {
                let chunk = |_: u8, _: &[u8]| -> Result<()> {
                    Err(Error::UnexpectedFrame { request: req.name().into(), got: msg::STREAM_CHUNK })
                };
                match Transport::local(h, req, &mut { chunk })? {
                    Answer::Response(r) => Ok(r),
                    Answer::StreamEnd(_) => {
                        Err(Error::UnexpectedFrame { request: req.name().into(), got: msg::STREAM_END })
                    }
                }
            }
        }
    }

    /// Sends a request whose answer has no fields.
    pub(super) fn call(&self, req: &Request) -> Result<()> {
        self.answer(req).map(drop)
    }

    /// A streaming request (CmdRunStreaming): its output chunks to `on_chunk` as they
    /// come, its exit code back.
    pub(super) fn run_streaming(
        &self,
        req: &Request,
        on_chunk: &mut dyn FnMut(u8, &[u8]) -> Result<()>,
    ) -> Result<i32> {
        match self {
            Transport::Remote(c) => {
                let r = c.call_streaming(req.ty(), &req.to_payload(), |ty, payload| {
                    if ty != msg::STREAM_CHUNK {
                        return Err(Error::UnexpectedFrame { request: req.name().into(), got: ty });
                    }
                    let chunk = StreamChunk::from_payload(payload).map_err(Error::decoding("StreamChunk"))?;
                    on_chunk(chunk.stream, &chunk.data)
                })?;
                let mut dec = r.decoder();
                let code = dec.i32().map_err(Error::decoding("StreamEnd"))?;
                dec.finish().map_err(Error::decoding("StreamEnd"))?;
                Ok(code)
            }
            Transport::Local(h) => match Transport::local(h, req, on_chunk)? {
                Answer::StreamEnd(e) => Ok(e.exit_code),
                Answer::Response(_) => {
                    Err(Error::UnexpectedFrame { request: req.name().into(), got: msg::RESPONSE })
                }
            },
        }
    }

    /// Serves `req` in this process: nothing is encoded either way.
    fn local(h: &Helper, req: &Request, on_chunk: &mut dyn FnMut(u8, &[u8]) -> Result<()>) -> Result<Answer> {
        let mut failed = None;
        let mut sink = |stream: u8, data: &[u8]| {
            on_chunk(stream, data).map_err(|e| {
                let msg = e.to_string();
                failed = Some(e);
                wire::FrameError::Io(std::io::Error::other(msg))
            })
        };
        let answer = h.call_local(req.clone(), &mut sink);
        if let Some(e) = failed {
            return Err(e);
        }
        answer.map_err(|mut ef| {
            if ef.op.is_empty() {
                ef.op = req.name().into();
            }
            Error::Remote(ef)
        })
    }
}
