//! The host side of a guest snapshot: the agent's archive of the root's changes
//! ([`crate::agent::snapshot`]), read as a stream over the agent channel.

use std::io::{self, Read};
use std::time::Duration;

use super::agent_link::AgentLink;
use crate::contract::proto;
use crate::contract::MAX_CHUNK;
use crate::error::{Error, Result};
use crate::wire::{Decoder, Encoder, Request};

/// The longest the guest may take over one step (its start, a chunk, its end): a guest
/// that stops answering fails the snapshot instead of holding the call.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the guest's walk wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Archive members.
    pub entries: u64,
    /// Archive bytes.
    pub bytes: u64,
}

/// The guest's changes since boot as an uncompressed tar stream (an OCI layer), read
/// in frames of the agent channel. [`GuestLayer::finish`] says whether the walk
/// succeeded; dropped before that, it ends the walk (and the guest's pause) too.
pub struct GuestLayer<'a> {
    link: &'a AgentLink,
    cancelled: &'a dyn Fn() -> bool,
    handle: u64,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
    ended: bool,
}

impl std::fmt::Debug for GuestLayer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestLayer")
            .field("handle", &self.handle)
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl<'a> GuestLayer<'a> {
    /// Starts the guest's walk: `excludes` left out (see the agent's rule), the guest's
    /// processes stopped meanwhile when `pause`. Reading gives up once `cancelled` says
    /// so (the caller went away), or when the guest takes longer than [`STEP_TIMEOUT`].
    pub fn start(
        link: &'a AgentLink,
        excludes: &[String],
        pause: bool,
        cancelled: &'a dyn Fn() -> bool,
    ) -> Result<GuestLayer<'a>> {
        let mut e = Encoder::new();
        e.string_list(excludes).bool(pause);
        let answer = link.request(proto::SNAPSHOT, e.as_bytes(), Some(STEP_TIMEOUT))?;
        let handle = Decoder::new(&answer).u64().map_err(Error::decoding("Snapshot"))?;
        Ok(GuestLayer { link, cancelled, handle, buf: Vec::new(), pos: 0, eof: false, ended: false })
    }

    /// Closes the archive and returns the walk's result: an error if the guest could not
    /// write the whole of it.
    pub fn finish(mut self) -> Result<Summary> {
        self.end()
    }

    fn end(&mut self) -> Result<Summary> {
        self.ended = true;
        let _ = self.fs(&Request::FileClose { handle: self.handle });
        let answer =
            self.link.request(proto::SNAPSHOT_END, &self.handle.to_be_bytes(), Some(STEP_TIMEOUT))?;
        let mut d = Decoder::new(&answer);
        let summary =
            (|| Ok::<_, crate::wire::DecodeError>(Summary { entries: d.u64()?, bytes: d.u64()? }))()
                .map_err(Error::decoding("SnapshotEnd"))?;
        Ok(summary)
    }

    /// A file request of the walk's handle, bounded by [`STEP_TIMEOUT`].
    fn fs(&self, req: &Request) -> Result<Vec<u8>> {
        self.link.fs_within(req, Some(STEP_TIMEOUT))
    }
}

impl Read for GuestLayer<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.eof {
                return Ok(0);
            }
            if (self.cancelled)() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "the snapshot was cancelled"));
            }
            let answer = self
                .fs(&Request::FileRead { handle: self.handle, max: MAX_CHUNK as u32 })
                .map_err(io::Error::other)?;
            let data = Decoder::new(&answer).bytes().map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("the agent's FileRead answer: {e}"))
            })?;
            if data.len() > MAX_CHUNK {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the agent answered more than it was asked",
                ));
            }
            self.eof = data.is_empty();
            self.buf = data;
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for GuestLayer<'_> {
    fn drop(&mut self) {
        if !self.ended {
            // The closed pipe ends the walk; its end is collected so the agent forgets it.
            let _ = self.end();
        }
    }
}
