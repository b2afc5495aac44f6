//! The protocol's primitives: [`Encoder`], [`Decoder`] and the [`Wire`] trait of typed
//! payloads.

use std::collections::BTreeMap;
use std::fmt;

use byteorder::{BigEndian, ByteOrder};

use super::MAX_LIST;

/// Appends protocol primitives to a buffer.
///
/// ```
/// use vmhost::wire::Encoder;
/// let mut enc = Encoder::new();
/// enc.u16(0x0103).string("hi").bool(true);
/// assert_eq!(enc.as_bytes(), &[0x01, 0x03, 0, 0, 0, 2, b'h', b'i', 1]);
/// ```
#[derive(Debug, Default, Clone)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Encoder {
        Encoder { buf: Vec::new() }
    }

    /// An empty encoder with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Encoder {
        Encoder { buf: Vec::with_capacity(n) }
    }

    /// An encoder for a Response payload: starts with the OK error-code byte.
    pub fn response() -> Encoder {
        // The OK error-code byte (ErrorCode::Ok).
        Encoder { buf: vec![0] }
    }

    /// Clears the buffer for reuse.
    pub fn reset(&mut self) {
        self.buf.clear();
    }

    /// The bytes encoded so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The encoded bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// Number of bytes encoded.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was encoded.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends a `u8`.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Appends a big-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian `i32`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian `i64`.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a bool as one byte, 0 or 1.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.buf.push(v as u8);
        self
    }

    /// Appends a `u32` length and the bytes.
    ///
    /// Lengths are `u32` on the wire; a longer slice could never fit in a frame (frames
    /// are bounded far below 4 GiB), and [`super::write_frame`] refuses the frame.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len().min(u32::MAX as usize) as u32);
        self.buf.extend_from_slice(b);
        self
    }

    /// Appends a `u32` length and the string's UTF-8 bytes.
    pub fn string(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Appends a `u32` count and the strings.
    pub fn string_list<S: AsRef<str>>(&mut self, list: &[S]) -> &mut Self {
        self.u32(list.len() as u32);
        for s in list {
            self.string(s.as_ref());
        }
        self
    }

    /// Appends a `u32` count and the (key, value) pairs, in key order.
    pub fn string_map(&mut self, map: &BTreeMap<String, String>) -> &mut Self {
        self.u32(map.len() as u32);
        for (k, v) in map {
            self.string(k);
            self.string(v);
        }
        self
    }

    /// Appends raw bytes with no length prefix.
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
}

/// Reads protocol primitives from a payload, never past its end.
///
/// ```
/// use vmhost::wire::Decoder;
/// let mut dec = Decoder::new(&[0, 0, 0, 2, b'h', b'i', 1]);
/// assert_eq!(dec.string().unwrap(), "hi");
/// assert!(dec.bool().unwrap());
/// dec.finish().unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder over `buf`.
    pub fn new(buf: &'a [u8]) -> Decoder<'a> {
        Decoder { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Offset of the next byte.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Succeeds only when every byte was read.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { count }),
        }
    }

    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                what,
                offset: self.pos,
                needed: n as u64,
                remaining: self.remaining(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// Reads a `u8`.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take("u8", 1)?[0])
    }

    /// Reads a big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(BigEndian::read_u16(self.take("u16", 2)?))
    }

    /// Reads a big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(BigEndian::read_u32(self.take("u32", 4)?))
    }

    /// Reads a big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(BigEndian::read_u64(self.take("u64", 8)?))
    }

    /// Reads a big-endian `i32`.
    pub fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(BigEndian::read_i32(self.take("i32", 4)?))
    }

    /// Reads a big-endian `i64`.
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(BigEndian::read_i64(self.take("i64", 8)?))
    }

    /// Reads a bool: one byte, 0 or 1.
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        let offset = self.pos;
        match self.take("bool", 1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::InvalidBool { offset, value }),
        }
    }

    fn length_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let offset = self.pos;
        let len = self.u32()?;
        if len as u64 > self.remaining() as u64 {
            return Err(DecodeError::Truncated {
                what,
                offset,
                needed: len as u64,
                remaining: self.remaining(),
            });
        }
        self.take(what, len as usize)
    }

    /// Reads a `u32` length and that many bytes, borrowed from the payload.
    pub fn bytes_ref(&mut self) -> Result<&'a [u8], DecodeError> {
        self.length_prefixed("bytes")
    }

    /// Reads a `u32` length and that many bytes.
    pub fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        self.bytes_ref().map(<[u8]>::to_vec)
    }

    /// Reads a `u32` length and a UTF-8 string, borrowed from the payload.
    pub fn str_ref(&mut self) -> Result<&'a str, DecodeError> {
        let data = self.length_prefixed("string")?;
        let offset = self.pos - data.len();
        std::str::from_utf8(data).map_err(|_| DecodeError::InvalidUtf8 { offset })
    }

    /// Reads a `u32` length and a UTF-8 string.
    pub fn string(&mut self) -> Result<String, DecodeError> {
        self.str_ref().map(str::to_string)
    }

    /// Reads a count checked against the remaining bytes, `min_size` bytes per element.
    pub(super) fn count(&mut self, what: &'static str, min_size: usize) -> Result<u32, DecodeError> {
        let offset = self.pos;
        let count = self.u32()?;
        if count > MAX_LIST {
            return Err(DecodeError::OutOfRange {
                field: what,
                reason: format!("{count} elements at offset {offset}; at most {MAX_LIST} are accepted"),
            });
        }
        if count as u64 * min_size as u64 > self.remaining() as u64 {
            return Err(DecodeError::CountTooLarge { what, offset, count, remaining: self.remaining() });
        }
        Ok(count)
    }

    /// Reads a `u32` count and that many strings.
    pub fn string_list(&mut self) -> Result<Vec<String>, DecodeError> {
        let n = self.count("string list", 4)?;
        (0..n).map(|_| self.string()).collect()
    }

    /// Reads a `u32` count and that many (key, value) string pairs. A repeated key keeps
    /// its last value, as a Go map would.
    pub fn string_map(&mut self) -> Result<BTreeMap<String, String>, DecodeError> {
        let n = self.count("string map", 8)?;
        let mut map = BTreeMap::new();
        for _ in 0..n {
            let k = self.string()?;
            let v = self.string()?;
            map.insert(k, v);
        }
        Ok(map)
    }
}

/// A type with a fixed layout in the protocol.
pub trait Wire: Sized {
    /// Appends the value.
    fn encode(&self, enc: &mut Encoder);
    /// Reads the value.
    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError>;

    /// Decodes a whole payload holding exactly one value.
    fn from_payload(payload: &[u8]) -> Result<Self, DecodeError> {
        let mut dec = Decoder::new(payload);
        let v = Self::decode(&mut dec)?;
        dec.finish()?;
        Ok(v)
    }

    /// Encodes the value alone.
    fn to_payload(&self) -> Vec<u8> {
        let mut enc = Encoder::new();
        self.encode(&mut enc);
        enc.into_bytes()
    }
}

/// A payload that does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A field runs past the end of the payload.
    Truncated {
        /// The primitive being read.
        what: &'static str,
        /// Offset of the field in the payload.
        offset: usize,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes that were left.
        remaining: usize,
    },
    /// A string is not valid UTF-8.
    InvalidUtf8 {
        /// Offset of the string's data in the payload.
        offset: usize,
    },
    /// A list or map announces more elements than the remaining bytes can hold.
    CountTooLarge {
        /// The kind of list.
        what: &'static str,
        /// Offset of the count in the payload.
        offset: usize,
        /// The announced count.
        count: u32,
        /// Bytes that were left after the count.
        remaining: usize,
    },
    /// A bool byte other than 0 or 1.
    InvalidBool {
        /// Offset of the byte.
        offset: usize,
        /// The byte.
        value: u8,
    },
    /// A value outside the range the message allows.
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// Bytes left over after the last field.
    TrailingBytes {
        /// How many bytes were left.
        count: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated { what, offset, needed, remaining } => write!(
                f,
                "truncated payload: {what} at offset {offset} needs {needed} bytes, {remaining} left"
            ),
            DecodeError::InvalidUtf8 { offset } => {
                write!(f, "string at offset {offset} is not valid UTF-8")
            }
            DecodeError::CountTooLarge { what, offset, count, remaining } => write!(
                f,
                "{what} at offset {offset} announces {count} elements but only {remaining} bytes remain"
            ),
            DecodeError::InvalidBool { offset, value } => {
                write!(f, "bool at offset {offset} is {value}, not 0 or 1")
            }
            DecodeError::OutOfRange { field, reason } => write!(f, "{field} out of range: {reason}"),
            DecodeError::TrailingBytes { count } => {
                write!(f, "{count} unexpected bytes after the last field")
            }
        }
    }
}

impl std::error::Error for DecodeError {}
