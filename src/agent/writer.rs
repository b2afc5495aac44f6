//! The write side of the agent's port, shared by every thread that answers.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;

use parking_lot::Mutex;

use super::say;
use crate::contract::proto::{self, AgentError};
use crate::wire::{Encoder, ErrorCode};

/// The write side of the port, shared by every thread that answers, with the buffer
/// small frames are encoded into for a single write.
#[derive(Clone)]
pub(super) struct Writer(pub(super) Arc<Mutex<(File, Vec<u8>)>>);

/// Payloads from this size on are written after their header as they are, not copied
/// behind it first: under emulation a user-space copy of a MiB costs more than a
/// second write (musl's memcpy is `rep movsq`, which TCG runs one step at a time).
const WRITE_AS_IS: usize = 16 << 10;

impl Writer {
    pub(super) fn send(&self, ty: u16, id: u32, payload: &[u8]) {
        let mut guard = self.0.lock();
        let (port, frame) = &mut *guard;
        frame.clear();
        let big = payload.len() >= WRITE_AS_IS;
        let encoded = if big {
            proto::encode_header(ty, id, payload).map(|h| frame.extend_from_slice(&h))
        } else {
            proto::encode_frame_into(frame, ty, id, payload)
        };
        if let Err(e) = encoded {
            say(format_args!("cannot send {}: {e}", proto::name(ty)));
            return;
        }
        let mut written = port.write_all(frame);
        if big && written.is_ok() {
            written = port.write_all(payload);
        }
        if let Err(e) = written {
            say(format_args!("write to the host failed: {e}"));
        }
    }

    pub(super) fn ok(&self, id: u32, payload: &[u8]) {
        self.send(proto::OK, id, payload);
    }

    pub(super) fn error(&self, id: u32, code: ErrorCode, message: &str) {
        self.fail(id, &AgentError::new(code, message));
    }

    pub(super) fn fail(&self, id: u32, e: &AgentError) {
        let mut enc = Encoder::new();
        e.encode(&mut enc);
        self.send(proto::ERROR, id, enc.as_bytes());
    }
}
