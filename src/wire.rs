//! The helper protocol on the wire, byte for byte compatible with v0.0.2 of the
//! original `ipc` package (see `docs/protocol.md` for the full catalogue).
//!
//! # Framing
//!
//! Every message is one frame: a 6-byte header, `u16 type` then `u32 payload length`,
//! both big-endian, followed by the payload. A request carries one of the message types
//! of [`msg`]; the answer is either a [`msg::RESPONSE`] frame whose payload starts with an
//! error-code byte (0 = OK) followed by the result fields, or a [`msg::ERROR`] frame
//! carrying an [`ErrorFrame`]. Streaming commands answer with several
//! [`msg::STREAM_CHUNK`] frames and one [`msg::STREAM_END`].
//!
//! # Primitives
//!
//! Everything is big-endian. `bool` is one byte (0 or 1); strings and byte strings are a
//! `u32` length and the data; a string list is a `u32` count and that many strings; a map
//! is a `u32` count and that many (key, value) string pairs.
//!
//! Every decoder is bounded: a frame larger than the configured maximum is refused
//! before anything is allocated for it, a length or count larger than the bytes that
//! remain is an error, and nothing in this module panics on any input.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::time::Duration;

use byteorder::{BigEndian, ByteOrder};

/// Size of the frame header in bytes: `u16` type and `u32` length.
pub const HEADER_SIZE: usize = 6;

/// The default bound on a frame's payload: 64 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 64 << 20;

/// The most elements a string list, map or mount list may have. Bounds what a decoded
/// payload costs in memory (an empty string on the wire is 4 bytes, in memory 24).
pub const MAX_LIST: u32 = 1 << 16;

macro_rules! catalogue {
    ($( $(#[$doc:meta])* $konst:ident = $num:literal => $name:literal, )*) => {
        $( $(#[$doc])* pub const $konst: u16 = $num; )*

        /// Every message type of the catalogue with its name, in numeric order.
        pub const ALL: &[(u16, &str)] = &[ $( ($num, $name), )* ];

        /// The message's name as the protocol document spells it (`InstanceNew`), or
        /// `None` for a number that is not in the catalogue.
        pub fn name(ty: u16) -> Option<&'static str> {
            match ty {
                $( $num => Some($name), )*
                _ => None,
            }
        }
    };
}

/// The message catalogue: every type number of the helper protocol.
///
/// Numbers 0x0100..=0x0700 and 0xFF00/0xFF01 are those of v0.0.2; 0x040E..=0x0411,
/// 0xFF02 and 0xFF03 are the streaming additions of the later revision; 0x0108
/// (InstanceEnd) and 0x0412 (CmdSetTty) are vmhost's own.
pub mod msg {
    catalogue! {
        /// Create the instance (boot the VM).
        INSTANCE_NEW = 0x0100 => "InstanceNew",
        /// Shut the instance down and release it.
        INSTANCE_CLOSE = 0x0101 => "InstanceClose",
        /// Wait until the instance exits.
        INSTANCE_WAIT = 0x0102 => "InstanceWait",
        /// The instance's identifier.
        INSTANCE_ID = 0x0103 => "InstanceID",
        /// Whether the instance is running.
        INSTANCE_IS_RUNNING = 0x0104 => "InstanceIsRunning",
        /// Set the console size (columns, rows).
        INSTANCE_SET_CONSOLE = 0x0105 => "InstanceSetConsole",
        /// Enable or disable guest networking.
        INSTANCE_SET_NETWORK = 0x0106 => "InstanceSetNetwork",
        /// Run the instance's main process attached to the console.
        INSTANCE_EXEC = 0x0107 => "InstanceExec",
        /// How the instance ended (vmhost's addition).
        INSTANCE_END = 0x0108 => "InstanceEnd",
        /// Open a guest file for reading.
        FS_OPEN = 0x0200 => "FsOpen",
        /// Create or truncate a guest file.
        FS_CREATE = 0x0201 => "FsCreate",
        /// Open a guest file with flags and permissions.
        FS_OPEN_FILE = 0x0202 => "FsOpenFile",
        /// Read a whole guest file.
        FS_READ_FILE = 0x0203 => "FsReadFile",
        /// Write a whole guest file.
        FS_WRITE_FILE = 0x0204 => "FsWriteFile",
        /// Stat a guest path, following symlinks.
        FS_STAT = 0x0205 => "FsStat",
        /// Stat a guest path without following symlinks.
        FS_LSTAT = 0x0206 => "FsLstat",
        /// Remove a file or empty directory.
        FS_REMOVE = 0x0207 => "FsRemove",
        /// Remove a path and everything below it.
        FS_REMOVE_ALL = 0x0208 => "FsRemoveAll",
        /// Create a directory.
        FS_MKDIR = 0x0209 => "FsMkdir",
        /// Create a directory and its parents.
        FS_MKDIR_ALL = 0x020A => "FsMkdirAll",
        /// Rename a path.
        FS_RENAME = 0x020B => "FsRename",
        /// Create a symbolic link.
        FS_SYMLINK = 0x020C => "FsSymlink",
        /// Read a symbolic link.
        FS_READLINK = 0x020D => "FsReadlink",
        /// List a directory.
        FS_READ_DIR = 0x020E => "FsReadDir",
        /// Change permission bits.
        FS_CHMOD = 0x020F => "FsChmod",
        /// Change owner and group.
        FS_CHOWN = 0x0210 => "FsChown",
        /// Change access and modification times.
        FS_CHTIMES = 0x0211 => "FsChtimes",
        /// Snapshot the guest filesystem.
        FS_SNAPSHOT = 0x0212 => "FsSnapshot",
        /// Close a file handle.
        FILE_CLOSE = 0x0300 => "FileClose",
        /// Read from a file handle.
        FILE_READ = 0x0301 => "FileRead",
        /// Write to a file handle.
        FILE_WRITE = 0x0302 => "FileWrite",
        /// Seek a file handle.
        FILE_SEEK = 0x0303 => "FileSeek",
        /// Flush a file to stable storage.
        FILE_SYNC = 0x0304 => "FileSync",
        /// Truncate or extend a file.
        FILE_TRUNCATE = 0x0305 => "FileTruncate",
        /// Stat an open file.
        FILE_STAT = 0x0306 => "FileStat",
        /// The name a file was opened with.
        FILE_NAME = 0x0307 => "FileName",
        /// Prepare a guest command.
        CMD_NEW = 0x0400 => "CmdNew",
        /// Prepare the image's entrypoint with extra arguments.
        CMD_ENTRYPOINT = 0x0401 => "CmdEntrypoint",
        /// Forget a command handle.
        CMD_FREE = 0x0402 => "CmdFree",
        /// Set a command's working directory.
        CMD_SET_DIR = 0x0403 => "CmdSetDir",
        /// Set one environment variable of a command.
        CMD_SET_ENV = 0x0404 => "CmdSetEnv",
        /// Read one environment variable of a command.
        CMD_GET_ENV = 0x0405 => "CmdGetEnv",
        /// A command's whole environment.
        CMD_ENVIRON = 0x0406 => "CmdEnviron",
        /// Start a command without waiting.
        CMD_START = 0x0407 => "CmdStart",
        /// Wait for a started command.
        CMD_WAIT = 0x0408 => "CmdWait",
        /// Start a command and wait for it.
        CMD_RUN = 0x0409 => "CmdRun",
        /// Run a command and collect its stdout.
        CMD_OUTPUT = 0x040A => "CmdOutput",
        /// Run a command and collect stdout and stderr together.
        CMD_COMBINED_OUTPUT = 0x040B => "CmdCombinedOutput",
        /// The exit code of a finished command.
        CMD_EXIT_CODE = 0x040C => "CmdExitCode",
        /// Signal a running command.
        CMD_KILL = 0x040D => "CmdKill",
        /// A readable handle on a command's standard output.
        CMD_STDOUT_PIPE = 0x040E => "CmdStdoutPipe",
        /// A readable handle on a command's standard error.
        CMD_STDERR_PIPE = 0x040F => "CmdStderrPipe",
        /// A writable handle on a command's standard input.
        CMD_STDIN_PIPE = 0x0410 => "CmdStdinPipe",
        /// Run a command, streaming its output as it comes.
        CMD_RUN_STREAMING = 0x0411 => "CmdRunStreaming",
        /// Run a command on a terminal (vmhost's addition).
        CMD_SET_TTY = 0x0412 => "CmdSetTty",
        /// Listen on a guest network address.
        NET_LISTEN = 0x0500 => "NetListen",
        /// Accept one connection on a listener.
        LISTENER_ACCEPT = 0x0501 => "ListenerAccept",
        /// Close a listener.
        LISTENER_CLOSE = 0x0502 => "ListenerClose",
        /// A listener's address.
        LISTENER_ADDR = 0x0503 => "ListenerAddr",
        /// Read from a connection.
        CONN_READ = 0x0504 => "ConnRead",
        /// Write to a connection.
        CONN_WRITE = 0x0505 => "ConnWrite",
        /// Close a connection.
        CONN_CLOSE = 0x0506 => "ConnClose",
        /// A connection's local address.
        CONN_LOCAL_ADDR = 0x0507 => "ConnLocalAddr",
        /// A connection's remote address.
        CONN_REMOTE_ADDR = 0x0508 => "ConnRemoteAddr",
        /// A snapshot's cache key.
        SNAPSHOT_CACHE_KEY = 0x0600 => "SnapshotCacheKey",
        /// A snapshot's parent (0 = none).
        SNAPSHOT_PARENT = 0x0601 => "SnapshotParent",
        /// Release a snapshot handle.
        SNAPSHOT_CLOSE = 0x0602 => "SnapshotClose",
        /// Make a snapshot usable as an instance source.
        SNAPSHOT_AS_SOURCE = 0x0603 => "SnapshotAsSource",
        /// Build an image from a Dockerfile.
        BUILD_DOCKERFILE = 0x0700 => "BuildDockerfile",
        /// A successful answer (payload starts with the error-code byte 0).
        RESPONSE = 0xFF00 => "Response",
        /// A failed answer: code, message, op, path.
        ERROR = 0xFF01 => "Error",
        /// One chunk of a streamed command's output: stream byte, bytes.
        STREAM_CHUNK = 0xFF02 => "StreamChunk",
        /// The end of a stream: error-code byte, i32 exit code.
        STREAM_END = 0xFF03 => "StreamEnd",
    }

    /// Whether `ty` is an answer type (0xFFxx) rather than a request.
    pub fn is_answer(ty: u16) -> bool {
        ty & 0xFF00 == 0xFF00
    }
}

/// The name of a message type for messages and logs: its catalogue name or `0x....`.
pub fn type_name(ty: u16) -> String {
    match msg::name(ty) {
        Some(n) => n.to_string(),
        None => format!("{ty:#06x}"),
    }
}

/// Error codes carried by Error frames and by the Response frame's leading byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    /// Success.
    Ok = 0,
    /// The handle does not name a live object.
    InvalidHandle = 1,
    /// The request is malformed or an argument is out of range.
    InvalidArgument = 2,
    /// The instance is not running.
    NotRunning = 3,
    /// The object was already closed.
    AlreadyClosed = 4,
    /// The operation timed out.
    Timeout = 5,
    /// No hypervisor is available to run the instance.
    HypervisorUnavailable = 6,
    /// An I/O error in the guest or on the host.
    Io = 7,
    /// A network error.
    Network = 8,
    /// The operation was cancelled.
    Cancelled = 9,
    /// Anything else (including codes this version does not know).
    Unknown = 99,
}

impl ErrorCode {
    /// The code for a byte read off the wire; unknown values become [`ErrorCode::Unknown`].
    pub fn from_u8(b: u8) -> ErrorCode {
        match b {
            0 => ErrorCode::Ok,
            1 => ErrorCode::InvalidHandle,
            2 => ErrorCode::InvalidArgument,
            3 => ErrorCode::NotRunning,
            4 => ErrorCode::AlreadyClosed,
            5 => ErrorCode::Timeout,
            6 => ErrorCode::HypervisorUnavailable,
            7 => ErrorCode::Io,
            8 => ErrorCode::Network,
            9 => ErrorCode::Cancelled,
            _ => ErrorCode::Unknown,
        }
    }

    /// The byte sent on the wire.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// A short lower-case description, as used in error messages.
    pub fn describe(self) -> &'static str {
        match self {
            ErrorCode::Ok => "ok",
            ErrorCode::InvalidHandle => "invalid handle",
            ErrorCode::InvalidArgument => "invalid argument",
            ErrorCode::NotRunning => "not running",
            ErrorCode::AlreadyClosed => "already closed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::HypervisorUnavailable => "hypervisor unavailable",
            ErrorCode::Io => "I/O error",
            ErrorCode::Network => "network error",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Unknown => "unknown error",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.describe(), self.as_u8())
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
        Encoder { buf: vec![ErrorCode::Ok.as_u8()] }
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
    /// are bounded far below 4 GiB), and [`write_frame`] refuses the frame.
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
    fn count(&mut self, what: &'static str, min_size: usize) -> Result<u32, DecodeError> {
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

    /// Reads a `u32` count and that many [`DirEntry`] (the FsReadDir answer).
    pub fn dir_entries(&mut self) -> Result<Vec<DirEntry>, DecodeError> {
        let n = self.count("directory entries", 9)?;
        (0..n).map(|_| DirEntry::decode(self)).collect()
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

/// Go `io/fs.FileMode` bits: permissions in the low 9 bits, the file type and special
/// bits at the top. Not POSIX `S_IFMT` values; [`FileMode::from_unix`] converts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FileMode(pub u32);

impl FileMode {
    /// Directory.
    pub const DIR: u32 = 1 << 31;
    /// Append-only.
    pub const APPEND: u32 = 1 << 30;
    /// Exclusive use.
    pub const EXCLUSIVE: u32 = 1 << 29;
    /// Temporary file.
    pub const TEMPORARY: u32 = 1 << 28;
    /// Symbolic link.
    pub const SYMLINK: u32 = 1 << 27;
    /// Device file.
    pub const DEVICE: u32 = 1 << 26;
    /// Named pipe (FIFO).
    pub const NAMED_PIPE: u32 = 1 << 25;
    /// Unix domain socket.
    pub const SOCKET: u32 = 1 << 24;
    /// Set-user-ID.
    pub const SETUID: u32 = 1 << 23;
    /// Set-group-ID.
    pub const SETGID: u32 = 1 << 22;
    /// Character device (with [`FileMode::DEVICE`]).
    pub const CHAR_DEVICE: u32 = 1 << 21;
    /// Sticky bit.
    pub const STICKY: u32 = 1 << 20;
    /// Not a regular file, of no known other kind.
    pub const IRREGULAR: u32 = 1 << 19;
    /// The permission bits.
    pub const PERM: u32 = 0o777;
    /// The type bits.
    pub const TYPE: u32 = Self::DIR
        | Self::SYMLINK
        | Self::NAMED_PIPE
        | Self::SOCKET
        | Self::DEVICE
        | Self::CHAR_DEVICE
        | Self::IRREGULAR;

    /// Converts a POSIX `st_mode` the way Go's `os.Stat` does.
    pub fn from_unix(st_mode: u32) -> FileMode {
        let mut m = st_mode & Self::PERM;
        m |= match st_mode & 0o170000 {
            0o060000 => Self::DEVICE,
            0o020000 => Self::DEVICE | Self::CHAR_DEVICE,
            0o040000 => Self::DIR,
            0o010000 => Self::NAMED_PIPE,
            0o120000 => Self::SYMLINK,
            0o100000 => 0,
            0o140000 => Self::SOCKET,
            _ => Self::IRREGULAR,
        };
        if st_mode & 0o4000 != 0 {
            m |= Self::SETUID;
        }
        if st_mode & 0o2000 != 0 {
            m |= Self::SETGID;
        }
        if st_mode & 0o1000 != 0 {
            m |= Self::STICKY;
        }
        FileMode(m)
    }

    /// The POSIX permission and special bits (no file type) for chmod/open.
    pub fn to_unix_perm(self) -> u32 {
        let mut m = self.0 & Self::PERM;
        if self.0 & Self::SETUID != 0 {
            m |= 0o4000;
        }
        if self.0 & Self::SETGID != 0 {
            m |= 0o2000;
        }
        if self.0 & Self::STICKY != 0 {
            m |= 0o1000;
        }
        m
    }

    /// The permission bits.
    pub fn perm(self) -> u32 {
        self.0 & Self::PERM
    }

    /// Whether the directory bit is set.
    pub fn is_dir(self) -> bool {
        self.0 & Self::DIR != 0
    }

    /// Whether the symlink bit is set.
    pub fn is_symlink(self) -> bool {
        self.0 & Self::SYMLINK != 0
    }

    /// Whether no type bit is set.
    pub fn is_regular(self) -> bool {
        self.0 & Self::TYPE == 0
    }
}

/// File metadata: name, size, mode, mtime (Unix seconds), isDir, isSymlink.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileInfo {
    /// Base name.
    pub name: String,
    /// Size in bytes.
    pub size: i64,
    /// Go FileMode bits.
    pub mode: FileMode,
    /// Modification time, Unix seconds.
    pub mod_time: i64,
    /// Whether it is a directory.
    pub is_dir: bool,
    /// Whether it is a symbolic link.
    pub is_symlink: bool,
}

impl Wire for FileInfo {
    fn encode(&self, enc: &mut Encoder) {
        enc.string(&self.name)
            .i64(self.size)
            .u32(self.mode.0)
            .i64(self.mod_time)
            .bool(self.is_dir)
            .bool(self.is_symlink);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(FileInfo {
            name: dec.string()?,
            size: dec.i64()?,
            mode: FileMode(dec.u32()?),
            mod_time: dec.i64()?,
            is_dir: dec.bool()?,
            is_symlink: dec.bool()?,
        })
    }
}

/// One directory entry: name, isDir, mode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirEntry {
    /// Base name.
    pub name: String,
    /// Whether it is a directory.
    pub is_dir: bool,
    /// Go FileMode bits (type bits; permissions may be absent, as with Go's `Type()`).
    pub mode: FileMode,
}

impl Wire for DirEntry {
    fn encode(&self, enc: &mut Encoder) {
        enc.string(&self.name).bool(self.is_dir).u32(self.mode.0);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(DirEntry { name: dec.string()?, is_dir: dec.bool()?, mode: FileMode(dec.u32()?) })
    }
}

/// A host directory shared into the guest: tag, host path, writable.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountConfig {
    /// The mount tag the guest sees.
    pub tag: String,
    /// The host directory.
    pub host_path: String,
    /// Whether the guest may write to it.
    pub writable: bool,
}

impl Wire for MountConfig {
    fn encode(&self, enc: &mut Encoder) {
        enc.string(&self.tag).string(&self.host_path).bool(self.writable);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(MountConfig { tag: dec.string()?, host_path: dec.string()?, writable: dec.bool()? })
    }
}

/// Options of a new instance.
///
/// Wire layout: `u64 memory MB, i32 cpus, u64 timeout ns, string user, bool dmesg,
/// u32 count x MountConfig`, then vmhost's optional `u8 backend` (1 qemu, 2 kvm; 0 auto
/// only before flags) and `u8 network flags` ([`NET_HOST_LOOPBACK`]), each left out when
/// it and what follows are defaults. A timeout of 0 on the wire means none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceOptions {
    /// Guest memory in MiB (0 = the backend's default).
    pub memory_mb: u64,
    /// Virtual CPUs (0 = the backend's default: see `vm::default_cpus`).
    pub cpus: i32,
    /// Wall-clock limit of the instance, `None` for no limit.
    pub timeout: Option<Duration>,
    /// The user commands run as (empty = the image's default).
    pub user: String,
    /// Whether to show the guest kernel's console log.
    pub dmesg: bool,
    /// Host directories shared into the guest.
    pub mounts: Vec<MountConfig>,
    /// Which VMM runs the instance.
    pub backend: Backend,
    /// With its network on, whether the guest reaches the host's own loopback services
    /// through its gateway (10.0.2.2). Off by default: the guest then reaches what any
    /// machine on the host's network reaches, not what the host keeps to itself.
    pub host_loopback: bool,
}

/// The bit of InstanceOptions' optional network-flags byte that lets the guest reach
/// the host's loopback ([`InstanceOptions::host_loopback`]).
pub const NET_HOST_LOOPBACK: u8 = 1;

/// Which VMM runs an instance. On the wire it is an optional trailing `u8` of
/// InstanceOptions (1 qemu, 2 kvm), absent for `Auto`, so that v0.0.2 layouts are
/// unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// KVM where hardware virtualization is present (and the kvm backend can boot the
    /// guest), else QEMU.
    #[default]
    Auto,
    /// QEMU, supervised over QMP.
    Qemu,
    /// vmhost's own VMM on /dev/kvm.
    Kvm,
}

impl Backend {
    /// Its name: "auto", "qemu" or "kvm".
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Qemu => "qemu",
            Backend::Kvm => "kvm",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "qemu" => Ok(Backend::Qemu),
            "kvm" => Ok(Backend::Kvm),
            other => Err(format!("backend {other:?}: use kvm, qemu or auto")),
        }
    }
}

impl Wire for InstanceOptions {
    fn encode(&self, enc: &mut Encoder) {
        let ns = self.timeout.map_or(0, |t| t.as_nanos().min(u64::MAX as u128) as u64);
        enc.u64(self.memory_mb).i32(self.cpus).u64(ns).string(&self.user).bool(self.dmesg);
        enc.u32(self.mounts.len() as u32);
        for m in &self.mounts {
            m.encode(enc);
        }
        // vmhost's trailing bytes: the backend, then the network flags, each left out
        // when it and what follows are defaults (auto is 0 only before flags).
        let flags = if self.host_loopback { NET_HOST_LOOPBACK } else { 0 };
        match (self.backend, flags) {
            (Backend::Auto, 0) => {}
            (Backend::Auto, _) => {
                enc.u8(0);
            }
            (Backend::Qemu, _) => {
                enc.u8(1);
            }
            (Backend::Kvm, _) => {
                enc.u8(2);
            }
        }
        if flags != 0 {
            enc.u8(flags);
        }
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        let memory_mb = dec.u64()?;
        let cpus = dec.i32()?;
        let ns = dec.u64()?;
        let user = dec.string()?;
        let dmesg = dec.bool()?;
        // A mount is at least two empty strings and a bool: 9 bytes.
        let n = dec.count("mount list", 9)?;
        let mounts = (0..n).map(|_| MountConfig::decode(dec)).collect::<Result<_, _>>()?;
        // vmhost's optional trailing bytes (InstanceOptions ends InstanceNew): the
        // backend, then the network flags. Defaults are said by leaving bytes out, so
        // that every value has one encoding: auto is 0 only when flags follow, and a
        // flags byte is never 0.
        let backend = if dec.remaining() == 0 {
            Backend::Auto
        } else {
            match dec.u8()? {
                0 if dec.remaining() > 0 => Backend::Auto,
                1 => Backend::Qemu,
                2 => Backend::Kvm,
                b => {
                    return Err(DecodeError::OutOfRange {
                        field: "backend",
                        reason: format!("{b} (1 qemu, 2 kvm; auto is no byte, or 0 before network flags)"),
                    })
                }
            }
        };
        let host_loopback = if dec.remaining() == 0 {
            false
        } else {
            match dec.u8()? {
                NET_HOST_LOOPBACK => true,
                f => {
                    return Err(DecodeError::OutOfRange {
                        field: "network flags",
                        reason: format!("{f:#04x} (bit 0: host loopback; no flags is no byte)"),
                    })
                }
            }
        };
        Ok(InstanceOptions {
            memory_mb,
            cpus,
            timeout: (ns != 0).then(|| Duration::from_nanos(ns)),
            user,
            dmesg,
            mounts,
            backend,
            host_loopback,
        })
    }
}

/// Where a new instance's root filesystem comes from (the InstanceNew source-type byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SourceType {
    /// A tar archive (optionally compressed).
    Tar = 0,
    /// A root filesystem directory.
    Dir = 1,
    /// A registry image reference.
    Registry = 2,
}

impl SourceType {
    fn from_u8(b: u8) -> Result<SourceType, DecodeError> {
        match b {
            0 => Ok(SourceType::Tar),
            1 => Ok(SourceType::Dir),
            2 => Ok(SourceType::Registry),
            _ => Err(DecodeError::OutOfRange {
                field: "source type",
                reason: format!("{b} is not 0 (tar), 1 (dir) or 2 (registry)"),
            }),
        }
    }
}

/// The InstanceNew request: source type, source path, image ref, cache dir, options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceNew {
    /// What `source_path` is.
    pub source_type: SourceType,
    /// Path of the tar or directory.
    pub source_path: String,
    /// Registry reference (source type 2).
    pub image_ref: String,
    /// Cache directory for images and kernels.
    pub cache_dir: String,
    /// Instance options.
    pub options: InstanceOptions,
}

impl Wire for InstanceNew {
    fn encode(&self, enc: &mut Encoder) {
        enc.u8(self.source_type as u8)
            .string(&self.source_path)
            .string(&self.image_ref)
            .string(&self.cache_dir);
        self.options.encode(enc);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(InstanceNew {
            source_type: SourceType::from_u8(dec.u8()?)?,
            source_path: dec.string()?,
            image_ref: dec.string()?,
            cache_dir: dec.string()?,
            options: InstanceOptions::decode(dec)?,
        })
    }
}

/// Options of FsSnapshot: excluded paths, cache dir.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotOptions {
    /// Guest paths left out of the snapshot.
    pub excludes: Vec<String>,
    /// Where snapshot layers are cached.
    pub cache_dir: String,
}

impl Wire for SnapshotOptions {
    fn encode(&self, enc: &mut Encoder) {
        enc.string_list(&self.excludes).string(&self.cache_dir);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(SnapshotOptions { excludes: dec.string_list()?, cache_dir: dec.string()? })
    }
}

/// Options of BuildDockerfile: Dockerfile bytes, context dir, cache dir, build args.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DockerfileOptions {
    /// The Dockerfile's content.
    pub dockerfile: Vec<u8>,
    /// Directory COPY and ADD read from (may be empty).
    pub context_dir: String,
    /// Cache directory (required by the builder).
    pub cache_dir: String,
    /// `ARG` values.
    pub build_args: BTreeMap<String, String>,
}

impl Wire for DockerfileOptions {
    fn encode(&self, enc: &mut Encoder) {
        enc.bytes(&self.dockerfile)
            .string(&self.context_dir)
            .string(&self.cache_dir)
            .string_map(&self.build_args);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(DockerfileOptions {
            dockerfile: dec.bytes()?,
            context_dir: dec.string()?,
            cache_dir: dec.string()?,
            build_args: dec.string_map()?,
        })
    }
}

/// The payload of an Error frame (0xFF01): code, message, op, path, and vmhost's
/// optional errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable description.
    pub message: String,
    /// The operation that failed (a message name such as `FsOpen`).
    pub op: String,
    /// The path or handle concerned, if any.
    pub path: String,
    /// The errno of the guest (or host) system call that failed: vmhost's trailing
    /// `i32`, sent only when a system call failed; v0.0.2 peers neither send nor read it.
    pub errno: Option<i32>,
}

impl ErrorFrame {
    /// An error frame with no path.
    pub fn new(code: ErrorCode, op: impl Into<String>, message: impl Into<String>) -> ErrorFrame {
        ErrorFrame { code, message: message.into(), op: op.into(), path: String::new(), errno: None }
    }

    /// The same error naming a path or handle.
    pub fn with_path(mut self, path: impl Into<String>) -> ErrorFrame {
        self.path = path.into();
        self
    }

    /// The same error with the errno of the system call that failed.
    pub fn with_errno(mut self, errno: i32) -> ErrorFrame {
        self.errno = Some(errno);
        self
    }
}

impl fmt::Display for ErrorFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.op.is_empty() {
            write!(f, "{}", self.op)?;
            if !self.path.is_empty() {
                write!(f, " {}", self.path)?;
            }
            write!(f, ": ")?;
        }
        write!(f, "{} [{}]", self.message, self.code)
    }
}

impl std::error::Error for ErrorFrame {}

impl Wire for ErrorFrame {
    fn encode(&self, enc: &mut Encoder) {
        enc.u8(self.code.as_u8()).string(&self.message).string(&self.op).string(&self.path);
        if let Some(n) = self.errno {
            enc.i32(n);
        }
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        Ok(ErrorFrame {
            code: ErrorCode::from_u8(dec.u8()?),
            message: dec.string()?,
            op: dec.string()?,
            path: dec.string()?,
            // Absent, or a whole i32: anything in between is bytes no field takes.
            errno: match dec.remaining() {
                0 => None,
                count @ 1..=3 => return Err(DecodeError::TrailingBytes { count }),
                _ => Some(dec.i32()?),
            },
        })
    }
}

/// Splits a Response payload into its leading error-code byte and the result fields.
///
/// A non-zero leading byte (the original never sends one, but the layout allows it)
/// comes back as an [`ErrorFrame`] with that code and no message.
pub fn response_fields(payload: &[u8]) -> Result<Result<&[u8], ErrorFrame>, DecodeError> {
    let mut dec = Decoder::new(payload);
    let code = dec.u8()?;
    if code == 0 {
        Ok(Ok(&payload[1..]))
    } else {
        let code = ErrorCode::from_u8(code);
        Ok(Err(ErrorFrame::new(code, "", format!("response carries error code {}", code.as_u8()))))
    }
}

/// A value with a fixed place in a request: the primitives and the typed payloads.
///
/// Each is read in two forms: [`Field::Ref`], which borrows a top-level string or byte
/// string from the payload (string lists and the typed payloads are read owned), held by
/// [`RequestRef`]; and the owned value made from it, held by [`Request`]. A layout is
/// decoded by one piece of code either way.
pub trait Field: Sized {
    /// The value as read without copying: `&str` for a string, `&[u8]` for bytes, the
    /// value itself for the rest.
    type Ref<'a>;
    /// Appends the value.
    fn put(&self, enc: &mut Encoder);
    /// Reads the value, borrowing from the payload where it can.
    fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<Self::Ref<'a>, DecodeError>;
    /// The owned value of a borrowed one.
    fn from_ref(r: Self::Ref<'_>) -> Self;
}

macro_rules! prim_field {
    ($($t:ty => $put:ident, $get:ident;)*) => {
        $(impl Field for $t {
            type Ref<'a> = $t;
            fn put(&self, enc: &mut Encoder) {
                enc.$put(*self);
            }
            fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<$t, DecodeError> {
                dec.$get()
            }
            fn from_ref(r: $t) -> $t {
                r
            }
        })*
    };
}

prim_field! {
    u8 => u8, u8;
    u32 => u32, u32;
    u64 => u64, u64;
    i32 => i32, i32;
    i64 => i64, i64;
    bool => bool, bool;
}

impl Field for FileMode {
    type Ref<'a> = FileMode;
    fn put(&self, enc: &mut Encoder) {
        enc.u32(self.0);
    }
    fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<FileMode, DecodeError> {
        dec.u32().map(FileMode)
    }
    fn from_ref(r: FileMode) -> FileMode {
        r
    }
}

impl Field for String {
    type Ref<'a> = &'a str;
    fn put(&self, enc: &mut Encoder) {
        enc.string(self);
    }
    fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<&'a str, DecodeError> {
        dec.str_ref()
    }
    fn from_ref(r: &str) -> String {
        r.to_string()
    }
}

impl Field for Vec<u8> {
    type Ref<'a> = &'a [u8];
    fn put(&self, enc: &mut Encoder) {
        enc.bytes(self);
    }
    fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<&'a [u8], DecodeError> {
        dec.bytes_ref()
    }
    fn from_ref(r: &[u8]) -> Vec<u8> {
        r.to_vec()
    }
}

impl Field for Vec<String> {
    type Ref<'a> = Vec<String>;
    fn put(&self, enc: &mut Encoder) {
        enc.string_list(self);
    }
    fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<Vec<String>, DecodeError> {
        dec.string_list()
    }
    fn from_ref(r: Vec<String>) -> Vec<String> {
        r
    }
}

macro_rules! wire_field {
    ($($t:ty),*) => {
        $(impl Field for $t {
            type Ref<'a> = $t;
            fn put(&self, enc: &mut Encoder) {
                self.encode(enc);
            }
            fn get_ref<'a>(dec: &mut Decoder<'a>) -> Result<$t, DecodeError> {
                <$t as Wire>::decode(dec)
            }
            fn from_ref(r: $t) -> $t {
                r
            }
        })*
    };
}

wire_field!(InstanceNew, SnapshotOptions, DockerfileOptions);

macro_rules! requests {
    ($( $(#[$doc:meta])* $name:ident = $ty:ident { $($field:ident : $fty:ty),* $(,)? }, )*) => {
        /// Every request of the helper protocol with its fields, in wire order.
        ///
        /// The layouts are those of `docs/protocol.md`; [`Request::encode`] and
        /// [`RequestRef::read`] (which [`Request::read`] copies out of) are the only code
        /// that turns them into bytes and back.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[allow(missing_docs)]
        pub enum Request {
            $( $(#[$doc])* $name { $($field: $fty),* }, )*
        }

        impl Request {
            /// The message type number.
            pub fn ty(&self) -> u16 {
                match self {
                    $( Request::$name { .. } => msg::$ty, )*
                }
            }

            /// Appends the request's payload.
            pub fn encode(&self, enc: &mut Encoder) {
                match self {
                    $( Request::$name { $($field),* } => { $( Field::put($field, enc); )* } )*
                }
            }

            /// Reads the fields of a request of type `ty`; `None` for a type that is not
            /// a request. The caller checks [`Decoder::finish`].
            pub fn read(ty: u16, dec: &mut Decoder<'_>) -> Result<Option<Request>, DecodeError> {
                Ok(RequestRef::read(ty, dec)?.map(RequestRef::into_owned))
            }
        }

        /// A [`Request`] read without copying its top-level strings and byte strings out
        /// of the payload (string lists and typed payloads are read owned): the same
        /// variants and fields, each a [`Field::Ref`]. For the receiver that uses the
        /// data where it lies (the agent writes FileWrite's and FsWriteFile's data from
        /// its frame); [`Request::read`] is this and [`RequestRef::into_owned`].
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[allow(missing_docs)]
        pub enum RequestRef<'a> {
            $( $(#[$doc])* $name { $($field: <$fty as Field>::Ref<'a>),* }, )*
        }

        impl<'a> RequestRef<'a> {
            /// Reads the fields of a request of type `ty`; `None` for a type that is not
            /// a request. The caller checks [`Decoder::finish`].
            pub fn read(ty: u16, dec: &mut Decoder<'a>) -> Result<Option<RequestRef<'a>>, DecodeError> {
                Ok(Some(match ty {
                    $( msg::$ty => RequestRef::$name { $($field: <$fty as Field>::get_ref(dec)?),* }, )*
                    _ => return Ok(None),
                }))
            }

            /// The message type number.
            pub fn ty(&self) -> u16 {
                match self {
                    $( RequestRef::$name { .. } => msg::$ty, )*
                }
            }

            /// The message's catalogue name (`FsOpen`).
            pub fn name(&self) -> &'static str {
                msg::name(self.ty()).unwrap_or("?")
            }

            /// The request with its fields copied out of the payload.
            pub fn into_owned(self) -> Request {
                match self {
                    $( RequestRef::$name { $($field),* } =>
                        Request::$name { $($field: <$fty as Field>::from_ref($field)),* }, )*
                }
            }
        }
    };
}

requests! {
    /// Create the instance.
    InstanceNew = INSTANCE_NEW { new: InstanceNew },
    /// Shut the instance down.
    InstanceClose = INSTANCE_CLOSE {},
    /// Wait for the instance to exit.
    InstanceWait = INSTANCE_WAIT {},
    /// The instance's id.
    InstanceId = INSTANCE_ID {},
    /// Whether it runs.
    InstanceIsRunning = INSTANCE_IS_RUNNING {},
    /// Console size.
    InstanceSetConsole = INSTANCE_SET_CONSOLE { cols: i32, rows: i32 },
    /// Networking on or off.
    InstanceSetNetwork = INSTANCE_SET_NETWORK { enabled: bool },
    /// Run the main process on the console.
    InstanceExec = INSTANCE_EXEC { name: String, args: Vec<String> },
    /// How it ended.
    InstanceEnd = INSTANCE_END {},
    /// Open for reading.
    FsOpen = FS_OPEN { path: String },
    /// Create or truncate.
    FsCreate = FS_CREATE { path: String },
    /// Open with Linux O_* flags and a permission.
    FsOpenFile = FS_OPEN_FILE { path: String, flags: i32, perm: FileMode },
    /// Read a whole file.
    FsReadFile = FS_READ_FILE { path: String },
    /// Write a whole file.
    FsWriteFile = FS_WRITE_FILE { path: String, data: Vec<u8>, perm: FileMode },
    /// Stat, following symlinks.
    FsStat = FS_STAT { path: String },
    /// Stat, not following symlinks.
    FsLstat = FS_LSTAT { path: String },
    /// Remove a file or empty directory.
    FsRemove = FS_REMOVE { path: String },
    /// Remove recursively.
    FsRemoveAll = FS_REMOVE_ALL { path: String },
    /// Make a directory.
    FsMkdir = FS_MKDIR { path: String, perm: FileMode },
    /// Make a directory and its parents.
    FsMkdirAll = FS_MKDIR_ALL { path: String, perm: FileMode },
    /// Rename.
    FsRename = FS_RENAME { from: String, to: String },
    /// Make `link` a symlink to `target` (Go `os.Symlink(oldname, newname)`).
    FsSymlink = FS_SYMLINK { target: String, link: String },
    /// Read a symlink.
    FsReadlink = FS_READLINK { path: String },
    /// List a directory.
    FsReadDir = FS_READ_DIR { path: String },
    /// Change mode bits.
    FsChmod = FS_CHMOD { path: String, mode: FileMode },
    /// Change owner.
    FsChown = FS_CHOWN { path: String, uid: i32, gid: i32 },
    /// Change times (Unix seconds).
    FsChtimes = FS_CHTIMES { path: String, atime: i64, mtime: i64 },
    /// Snapshot the filesystem.
    FsSnapshot = FS_SNAPSHOT { opts: SnapshotOptions },
    /// Close a file.
    FileClose = FILE_CLOSE { handle: u64 },
    /// Read up to `max` bytes.
    FileRead = FILE_READ { handle: u64, max: u32 },
    /// Write bytes.
    FileWrite = FILE_WRITE { handle: u64, data: Vec<u8> },
    /// Seek (whence 0 start, 1 current, 2 end).
    FileSeek = FILE_SEEK { handle: u64, offset: i64, whence: i32 },
    /// Flush to storage.
    FileSync = FILE_SYNC { handle: u64 },
    /// Set the length.
    FileTruncate = FILE_TRUNCATE { handle: u64, size: i64 },
    /// Stat an open file.
    FileStat = FILE_STAT { handle: u64 },
    /// The name it was opened with.
    FileName = FILE_NAME { handle: u64 },
    /// Prepare a command.
    CmdNew = CMD_NEW { name: String, args: Vec<String> },
    /// Prepare the image's entrypoint.
    CmdEntrypoint = CMD_ENTRYPOINT { args: Vec<String> },
    /// Forget a command.
    CmdFree = CMD_FREE { handle: u64 },
    /// Working directory.
    CmdSetDir = CMD_SET_DIR { handle: u64, dir: String },
    /// Set a variable.
    CmdSetEnv = CMD_SET_ENV { handle: u64, key: String, value: String },
    /// Read a variable.
    CmdGetEnv = CMD_GET_ENV { handle: u64, key: String },
    /// The whole environment.
    CmdEnviron = CMD_ENVIRON { handle: u64 },
    /// Start.
    CmdStart = CMD_START { handle: u64 },
    /// Wait.
    CmdWait = CMD_WAIT { handle: u64 },
    /// Start and wait.
    CmdRun = CMD_RUN { handle: u64 },
    /// Run, collect stdout.
    CmdOutput = CMD_OUTPUT { handle: u64 },
    /// Run, collect stdout and stderr together.
    CmdCombinedOutput = CMD_COMBINED_OUTPUT { handle: u64 },
    /// Exit code of a finished command.
    CmdExitCode = CMD_EXIT_CODE { handle: u64 },
    /// Kill the guest process.
    CmdKill = CMD_KILL { handle: u64 },
    /// Stdout as a readable handle (ConnRead or FileRead).
    CmdStdoutPipe = CMD_STDOUT_PIPE { handle: u64 },
    /// Stderr as a readable handle (ConnRead or FileRead).
    CmdStderrPipe = CMD_STDERR_PIPE { handle: u64 },
    /// Stdin as a writable handle (ConnWrite or FileWrite).
    CmdStdinPipe = CMD_STDIN_PIPE { handle: u64 },
    /// Run, streaming output.
    CmdRunStreaming = CMD_RUN_STREAMING { handle: u64 },
    /// Run it on a terminal sized by InstanceSetConsole (vmhost's addition).
    CmdSetTty = CMD_SET_TTY { handle: u64, enabled: bool },
    /// Listen in the guest.
    NetListen = NET_LISTEN { network: String, address: String },
    /// Accept a connection.
    ListenerAccept = LISTENER_ACCEPT { handle: u64 },
    /// Close a listener.
    ListenerClose = LISTENER_CLOSE { handle: u64 },
    /// A listener's address.
    ListenerAddr = LISTENER_ADDR { handle: u64 },
    /// Read up to `max` bytes.
    ConnRead = CONN_READ { handle: u64, max: u32 },
    /// Write bytes.
    ConnWrite = CONN_WRITE { handle: u64, data: Vec<u8> },
    /// Close a connection.
    ConnClose = CONN_CLOSE { handle: u64 },
    /// Local address.
    ConnLocalAddr = CONN_LOCAL_ADDR { handle: u64 },
    /// Remote address.
    ConnRemoteAddr = CONN_REMOTE_ADDR { handle: u64 },
    /// A snapshot's cache key.
    SnapshotCacheKey = SNAPSHOT_CACHE_KEY { handle: u64 },
    /// A snapshot's parent.
    SnapshotParent = SNAPSHOT_PARENT { handle: u64 },
    /// Release a snapshot.
    SnapshotClose = SNAPSHOT_CLOSE { handle: u64 },
    /// A snapshot as an InstanceNew source.
    SnapshotAsSource = SNAPSHOT_AS_SOURCE { handle: u64 },
    /// Build from a Dockerfile.
    BuildDockerfile = BUILD_DOCKERFILE { opts: DockerfileOptions },
}

impl Request {
    /// The message's catalogue name (`FsOpen`).
    pub fn name(&self) -> &'static str {
        msg::name(self.ty()).unwrap_or("?")
    }

    /// The request's payload alone.
    pub fn to_payload(&self) -> Vec<u8> {
        let mut enc = Encoder::new();
        self.encode(&mut enc);
        enc.into_bytes()
    }

    /// Decodes a whole payload of type `ty`; `None` for a type that is not a request.
    pub fn from_payload(ty: u16, payload: &[u8]) -> Result<Option<Request>, DecodeError> {
        Ok(RequestRef::from_payload(ty, payload)?.map(RequestRef::into_owned))
    }
}

impl<'a> RequestRef<'a> {
    /// Decodes a whole payload of type `ty`, borrowing from it; `None` for a type that is
    /// not a request.
    pub fn from_payload(ty: u16, payload: &'a [u8]) -> Result<Option<RequestRef<'a>>, DecodeError> {
        let mut dec = Decoder::new(payload);
        let r = RequestRef::read(ty, &mut dec)?;
        if r.is_some() {
            dec.finish()?;
        }
        Ok(r)
    }
}

/// One chunk of a streamed command's output (0xFF02): stream (1 stdout, 2 stderr), data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamChunk {
    /// 1 for stdout, 2 for stderr.
    pub stream: u8,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Stream number of standard output in [`StreamChunk`].
pub const STREAM_STDOUT: u8 = 1;
/// Stream number of standard error in [`StreamChunk`].
pub const STREAM_STDERR: u8 = 2;

impl StreamChunk {
    /// The payload of a chunk, from borrowed data (no copy into a `StreamChunk`).
    pub fn payload(stream: u8, data: &[u8]) -> Vec<u8> {
        let mut enc = Encoder::with_capacity(5 + data.len());
        enc.u8(stream).bytes(data);
        enc.into_bytes()
    }
}

impl Wire for StreamChunk {
    fn encode(&self, enc: &mut Encoder) {
        enc.u8(self.stream).bytes(&self.data);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        let stream = dec.u8()?;
        if stream != STREAM_STDOUT && stream != STREAM_STDERR {
            return Err(DecodeError::OutOfRange {
                field: "stream",
                reason: format!("{stream} is not 1 (stdout) or 2 (stderr)"),
            });
        }
        Ok(StreamChunk { stream, data: dec.bytes()? })
    }
}

/// The end of a stream (0xFF03): error-code byte 0, then the i32 exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamEnd {
    /// The command's exit code.
    pub exit_code: i32,
}

impl Wire for StreamEnd {
    fn encode(&self, enc: &mut Encoder) {
        enc.u8(ErrorCode::Ok.as_u8()).i32(self.exit_code);
    }

    fn decode(dec: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        let code = dec.u8()?;
        if code != 0 {
            return Err(DecodeError::OutOfRange {
                field: "stream end code",
                reason: format!("{code} is not 0"),
            });
        }
        Ok(StreamEnd { exit_code: dec.i32()? })
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_borrowed_request_reads_its_strings_and_data_where_they_lie_in_the_payload() {
        let within = |payload: &[u8], field: &[u8]| {
            let (p, f) = (payload.as_ptr_range(), field.as_ptr_range());
            p.start <= f.start && f.end <= p.end
        };
        let req = Request::FsWriteFile { path: "/tmp/a".into(), data: vec![7; 100], perm: FileMode(0o640) };
        let payload = req.to_payload();
        let Some(RequestRef::FsWriteFile { path, data, perm }) =
            RequestRef::from_payload(msg::FS_WRITE_FILE, &payload).unwrap()
        else {
            panic!("not an FsWriteFile");
        };
        assert!(within(&payload, path.as_bytes()) && within(&payload, data), "borrowed, not copied");
        assert_eq!((path, data, perm), ("/tmp/a", &[7; 100][..], FileMode(0o640)));

        let req = Request::FileWrite { handle: 9, data: b"xyz".to_vec() };
        let payload = req.to_payload();
        let borrowed = RequestRef::from_payload(msg::FILE_WRITE, &payload).unwrap().unwrap();
        assert!(matches!(borrowed, RequestRef::FileWrite { handle: 9, data } if within(&payload, data)));
        assert_eq!(borrowed.into_owned(), req);

        let mut long = payload.clone();
        long.push(0);
        assert_eq!(
            RequestRef::from_payload(msg::FILE_WRITE, &long),
            Err(DecodeError::TrailingBytes { count: 1 })
        );
        assert!(matches!(
            RequestRef::from_payload(msg::FILE_WRITE, &payload[..payload.len() - 1]),
            Err(DecodeError::Truncated { needed: 3, remaining: 2, .. })
        ));
        assert_eq!(RequestRef::from_payload(msg::RESPONSE, &payload), Ok(None));
    }

    #[test]
    fn the_backend_is_an_optional_trailing_byte_of_instance_options() {
        let auto = InstanceOptions::default();
        let kvm = InstanceOptions { backend: Backend::Kvm, ..Default::default() };
        let (a, k) = (auto.to_payload(), kvm.to_payload());
        assert_eq!(k.len(), a.len() + 1, "auto adds nothing: v0.0.2 layout");
        assert_eq!((&k[..a.len()], k[a.len()]), (&a[..], 2));
        assert_eq!(InstanceOptions::from_payload(&k).unwrap().backend, Backend::Kvm);
        assert_eq!(InstanceOptions::from_payload(&a).unwrap().backend, Backend::Auto);
        for b in [0u8, 3, 9] {
            let mut bad = a.clone();
            bad.push(b);
            assert!(InstanceOptions::from_payload(&bad).is_err(), "{b}");
        }
        assert_eq!("qemu".parse::<Backend>(), Ok(Backend::Qemu));
        assert!("xen".parse::<Backend>().is_err());
    }

    #[test]
    fn catalogue_numbers_are_unique_and_sorted() {
        for pair in msg::ALL.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{:?} before {:?}", pair[0], pair[1]);
        }
        assert_eq!(msg::ALL.len(), 73);
        assert_eq!(type_name(0x0999), "0x0999");
        assert_eq!(type_name(msg::FS_READ_DIR), "FsReadDir");
    }

    #[test]
    fn error_codes_round_trip() {
        for b in [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 99] {
            assert_eq!(ErrorCode::from_u8(b).as_u8(), b);
        }
        assert_eq!(ErrorCode::from_u8(42), ErrorCode::Unknown);
    }

    #[test]
    fn file_mode_from_unix() {
        assert_eq!(FileMode::from_unix(0o040755).0, FileMode::DIR | 0o755);
        assert_eq!(FileMode::from_unix(0o120777).0, FileMode::SYMLINK | 0o777);
        assert_eq!(FileMode::from_unix(0o100644).0, 0o644);
        assert_eq!(FileMode::from_unix(0o020620).0, FileMode::DEVICE | FileMode::CHAR_DEVICE | 0o620);
        assert_eq!(FileMode::from_unix(0o041777).0, FileMode::DIR | FileMode::STICKY | 0o777);
        assert_eq!(FileMode::from_unix(0o104755).0, FileMode::SETUID | 0o755);
        assert_eq!(FileMode(FileMode::SETGID | 0o750).to_unix_perm(), 0o2750);
    }

    #[test]
    fn decoder_bounds() {
        let mut d = Decoder::new(&[0, 0, 0, 9, b'a']);
        assert!(matches!(d.string(), Err(DecodeError::Truncated { needed: 9, .. })));
        let mut d = Decoder::new(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.string_list(), Err(DecodeError::OutOfRange { .. })));
        let mut d = Decoder::new(&[0, 0, 0, 100, 0, 0, 0, 0]);
        assert!(matches!(d.string_list(), Err(DecodeError::CountTooLarge { count: 100, .. })));
        let mut d = Decoder::new(&[0, 0, 0, 1, 0xff]);
        assert_eq!(d.string(), Err(DecodeError::InvalidUtf8 { offset: 4 }));
        let mut d = Decoder::new(&[2]);
        assert_eq!(d.bool(), Err(DecodeError::InvalidBool { offset: 0, value: 2 }));
        assert_eq!(FileInfo::from_payload(&[0; 40]), Err(DecodeError::TrailingBytes { count: 14 }));
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_payload() {
        let mut bytes = Header { ty: msg::FS_WRITE_FILE, len: 1000 }.to_bytes().to_vec();
        bytes.extend_from_slice(&[0; 10]);
        let err = read_frame(&mut &bytes[..], 999).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 1000, max: 999, .. }), "{err}");
        let err = read_frame(&mut &bytes[..], 1000).unwrap_err();
        assert!(matches!(err, FrameError::Truncated { expected: 1006, got: 16 }), "{err}");
        assert!(matches!(read_frame(&mut &bytes[..3], 1000), Err(FrameError::Truncated { .. })));
        assert!(matches!(read_frame(&mut &[][..], 1000), Err(FrameError::Eof)));
    }
}
