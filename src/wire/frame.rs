//! Frames on a stream: the header, reading and writing whole frames within a bound.

use std::fmt;
use std::io::{self, Read, Write};

use byteorder::{BigEndian, ByteOrder};

use super::catalogue::type_name;
use super::HEADER_SIZE;

/// A frame header: message type and payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message type.
    pub ty: u16,
    /// Payload length in bytes.
    pub len: u32,
}

impl Header {
    /// The 6 header bytes.
    pub fn to_bytes(self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        BigEndian::write_u16(&mut b[0..2], self.ty);
        BigEndian::write_u32(&mut b[2..6], self.len);
        b
    }

    /// Parses 6 header bytes.
    pub fn from_bytes(b: [u8; HEADER_SIZE]) -> Header {
        Header { ty: BigEndian::read_u16(&b[0..2]), len: BigEndian::read_u32(&b[2..6]) }
    }
}

/// A whole frame read off a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Message type.
    pub ty: u16,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Why a frame could not be read or written.
#[derive(Debug)]
pub enum FrameError {
    /// The stream ended cleanly before a new header.
    Eof,
    /// The stream ended inside a frame.
    Truncated {
        /// Bytes the frame (header included) needed.
        expected: u64,
        /// Bytes that came.
        got: u64,
    },
    /// The header announces a payload over the bound.
    TooLarge {
        /// Message type of the frame.
        ty: u16,
        /// Announced payload length.
        len: u64,
        /// The bound.
        max: u32,
    },
    /// The stream failed.
    Io(io::Error),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Eof => write!(f, "connection closed"),
            FrameError::Truncated { expected, got } => {
                write!(f, "connection closed inside a frame: got {got} of {expected} bytes")
            }
            FrameError::TooLarge { ty, len, max } => {
                write!(f, "frame too large: {} announces {len} bytes, the limit is {max}", type_name(*ty))
            }
            FrameError::Io(e) => write!(f, "frame I/O failed: {e}"),
        }
    }
}

impl std::error::Error for FrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FrameError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> FrameError {
        FrameError::Io(e)
    }
}

/// Reads until `buf` is full; returns how many bytes came before EOF.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads a frame header.
pub fn read_header(r: &mut impl Read) -> Result<Header, FrameError> {
    let mut hb = [0u8; HEADER_SIZE];
    match read_full(r, &mut hb)? {
        0 => Err(FrameError::Eof),
        HEADER_SIZE => Ok(Header::from_bytes(hb)),
        got => Err(FrameError::Truncated { expected: HEADER_SIZE as u64, got: got as u64 }),
    }
}

/// Reads one frame whose payload is at most `max` bytes.
///
/// The bound is checked before anything is allocated, and the payload buffer grows with
/// the bytes that actually arrive, so a peer that announces a large frame and sends
/// nothing costs no memory.
pub fn read_frame(r: &mut impl Read, max: u32) -> Result<Frame, FrameError> {
    let h = read_header(r)?;
    if h.len > max {
        return Err(FrameError::TooLarge { ty: h.ty, len: h.len as u64, max });
    }
    const STEP: usize = 1 << 20;
    let len = h.len as usize;
    let mut payload = Vec::with_capacity(len.min(STEP));
    while payload.len() < len {
        let start = payload.len();
        let end = len.min(start + STEP);
        payload.resize(end, 0);
        let got = read_full(r, &mut payload[start..end])?;
        if got < end - start {
            return Err(FrameError::Truncated {
                expected: (HEADER_SIZE + len) as u64,
                got: (HEADER_SIZE + start + got) as u64,
            });
        }
    }
    Ok(Frame { ty: h.ty, payload })
}

/// Writes one frame (header and payload in one write) if the payload is at most `max`.
pub fn write_frame(w: &mut impl Write, ty: u16, payload: &[u8], max: u32) -> Result<(), FrameError> {
    if payload.len() as u64 > max as u64 {
        return Err(FrameError::TooLarge { ty, len: payload.len() as u64, max });
    }
    let mut buf = Vec::with_capacity(HEADER_SIZE + payload.len());
    buf.extend_from_slice(&Header { ty, len: payload.len() as u32 }.to_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    Ok(())
}
