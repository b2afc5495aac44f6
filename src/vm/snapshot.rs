//! The host side of a guest snapshot: the agent's archive of the root's changes
//! ([`crate::agent::snapshot`]), read as a stream over the agent channel.

use std::io::{self, Read};

use super::agent_link::AgentLink;
use crate::contract::proto;
use crate::contract::MAX_CHUNK;
use crate::error::{Error, Result};
use crate::wire::{Decoder, Encoder, Request};

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
#[derive(Debug)]
pub struct GuestLayer<'a> {
    link: &'a AgentLink,
    handle: u64,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
    ended: bool,
}

impl<'a> GuestLayer<'a> {
    /// Starts the guest's walk: `excludes` left out (see the agent's rule), the guest's
    /// processes stopped meanwhile when `pause`.
    pub fn start(link: &'a AgentLink, excludes: &[String], pause: bool) -> Result<GuestLayer<'a>> {
        let mut e = Encoder::new();
        e.string_list(excludes).bool(pause);
        let answer = link.request(proto::SNAPSHOT, e.as_bytes(), None)?;
        let handle = Decoder::new(&answer).u64().map_err(Error::decoding("Snapshot"))?;
        Ok(GuestLayer { link, handle, buf: Vec::new(), pos: 0, eof: false, ended: false })
    }

    /// Closes the archive and returns the walk's result: an error if the guest could not
    /// write the whole of it.
    pub fn finish(mut self) -> Result<Summary> {
        self.end()
    }

    fn end(&mut self) -> Result<Summary> {
        self.ended = true;
        let _ = self.link.fs(&Request::FileClose { handle: self.handle });
        let answer = self.link.request(proto::SNAPSHOT_END, &self.handle.to_be_bytes(), None)?;
        let mut d = Decoder::new(&answer);
        let summary =
            (|| Ok::<_, crate::wire::DecodeError>(Summary { entries: d.u64()?, bytes: d.u64()? }))()
                .map_err(Error::decoding("SnapshotEnd"))?;
        Ok(summary)
    }
}

impl Read for GuestLayer<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.eof {
                return Ok(0);
            }
            let answer = self
                .link
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
