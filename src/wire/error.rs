//! What goes wrong on the wire: the protocol's error codes, decoding errors, and the
//! Error frame.

use std::fmt;

use super::codec::{DecodeError, Decoder, Encoder, Wire};

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
