//! The crate's error type.
//!
//! Every variant says what failed and on what (a path, a socket, a message type), and
//! [`std::error::Error::source`] chains the underlying cause. [`Error::code`] maps an
//! error to the helper protocol's wire error code, so a server can answer with it.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::wire::{self, DecodeError, ErrorCode, ErrorFrame, FrameError};

impl Error {
    /// The error for a payload that does not decode as message `msg`, for `map_err`.
    pub(crate) fn decoding(msg: &'static str) -> impl Fn(DecodeError) -> Error {
        move |source| Error::Decode { msg: msg.into(), source }
    }

    /// The crate error an [`io::Error`] made by `From<Error>` carries, or else the I/O
    /// error itself, as done by `op`.
    pub(crate) fn from_io(op: &'static str, e: io::Error) -> Error {
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            if let Some(inner) = e.into_inner() {
                if let Ok(err) = inner.downcast::<Error>() {
                    return *err;
                }
            }
            return Error::Closed;
        }
        Error::Io { op, path: PathBuf::new(), source: e }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// Result alias with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of vmhost.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation failed on a path.
    Io {
        /// What was being done ("bind", "connect", "write pid file"...).
        op: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Connecting to a socket did not succeed before the deadline.
    ConnectTimeout {
        /// The socket.
        path: PathBuf,
        /// How long we tried.
        waited: std::time::Duration,
        /// The last error seen.
        source: io::Error,
    },
    /// A socket path is already served by a live process.
    SocketInUse {
        /// The socket.
        path: PathBuf,
    },
    /// A socket path does not fit in `sun_path` (107 bytes).
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
    },
    /// A frame could not be read or written on a connection.
    Frame {
        /// The request being made, or "serve".
        op: String,
        /// The cause.
        source: FrameError,
    },
    /// A payload did not decode.
    Decode {
        /// The message type whose payload it was.
        msg: String,
        /// The cause.
        source: DecodeError,
    },
    /// The peer answered with an Error frame.
    Remote(ErrorFrame),
    /// The peer answered with a frame type that does not answer the request.
    UnexpectedFrame {
        /// The request.
        request: String,
        /// The type that came back.
        got: u16,
    },
    /// The helper binary was not found.
    HelperNotFound {
        /// Everywhere we looked, in order.
        searched: Vec<PathBuf>,
    },
    /// The helper process exited before it served its socket.
    HelperExited {
        /// Its socket.
        socket: PathBuf,
        /// How it exited.
        status: std::process::ExitStatus,
    },
    /// The client was closed.
    Closed,
    /// A control-protocol exchange failed.
    Control {
        /// The method.
        method: String,
        /// What went wrong.
        message: String,
    },
    /// The VM does not run: it has ended, how once known, or it is stopping.
    NotRunning {
        /// The operation.
        op: String,
        /// Its lifecycle state.
        state: crate::status::VmState,
        /// How it ended.
        end: Option<crate::status::VmEnd>,
    },
    /// A VM lifecycle operation failed.
    Vm {
        /// The operation ("stop", "force_stop", ...).
        op: String,
        /// What went wrong.
        message: String,
    },
    /// An operation did not finish in time.
    Timeout {
        /// The operation.
        op: String,
        /// How long it was given.
        after: std::time::Duration,
    },
    /// A QMP exchange with QEMU failed.
    Qmp(crate::qmp::Error),
    /// The kvm backend's VMM failed (a KVM ioctl, guest memory, a vCPU): its error
    /// (`vm::kvm::error::Error`, which `source()` and `downcast_ref` reach).
    Kvm(Box<dyn std::error::Error + Send + Sync>),
    /// The backend asked for cannot run here.
    BackendUnavailable {
        /// The backend ("kvm").
        backend: String,
        /// Why, and what to use instead.
        why: String,
    },
    /// A container registry refused or failed a request, or sent what is not allowed.
    Registry {
        /// The registry (`localhost:5000`, `docker.io`).
        registry: String,
        /// What was being done ("fetch manifest library/busybox:latest").
        op: String,
        /// The HTTP status, when one came.
        status: Option<u16>,
        /// What went wrong, and what to do.
        message: String,
    },
    /// An argument was refused.
    InvalidArgument {
        /// The operation.
        op: String,
        /// Why.
        message: String,
    },
}

impl Error {
    /// The [`io::ErrorKind`] closest to this error. For a guest error, the guest's
    /// errno (the Error frame's typed field) decides, so a missing guest file is
    /// [`io::ErrorKind::NotFound`] as a local one would be.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::Io { source, .. } => source.kind(),
            Error::Remote(ef) => match ef.errno {
                Some(n) => io::Error::from_raw_os_error(n).kind(),
                None => match ef.code {
                    ErrorCode::InvalidArgument | ErrorCode::InvalidHandle => io::ErrorKind::InvalidInput,
                    ErrorCode::Timeout => io::ErrorKind::TimedOut,
                    ErrorCode::NotRunning | ErrorCode::AlreadyClosed => io::ErrorKind::NotConnected,
                    _ => io::ErrorKind::Other,
                },
            },
            Error::Timeout { .. } | Error::ConnectTimeout { .. } => io::ErrorKind::TimedOut,
            Error::InvalidArgument { .. } => io::ErrorKind::InvalidInput,
            Error::Closed | Error::NotRunning { .. } => io::ErrorKind::NotConnected,
            _ => io::ErrorKind::Other,
        }
    }

    /// Builds an [`Error::Io`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io { op, path: path.into(), source }
    }

    /// The helper protocol error code that best describes this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Remote(f) => f.code,
            Error::Io { .. } | Error::Frame { .. } => ErrorCode::Io,
            Error::Decode { .. } | Error::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            Error::Timeout { .. } | Error::ConnectTimeout { .. } => ErrorCode::Timeout,
            Error::Closed => ErrorCode::AlreadyClosed,
            Error::NotRunning { .. } => ErrorCode::NotRunning,
            Error::HelperNotFound { .. } | Error::HelperExited { .. } | Error::BackendUnavailable { .. } => {
                ErrorCode::HypervisorUnavailable
            }
            _ => ErrorCode::Unknown,
        }
    }

    /// The Error frame a server sends for this error, naming the operation.
    pub fn to_frame(&self, op: &str) -> ErrorFrame {
        match self {
            Error::Remote(f) => f.clone(),
            Error::Io { path, source, .. } => {
                let f =
                    ErrorFrame::new(self.code(), op, self.to_string()).with_path(path.display().to_string());
                match source.raw_os_error() {
                    Some(n) => f.with_errno(n),
                    None => f,
                }
            }
            _ => ErrorFrame::new(self.code(), op, self.to_string()),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { op, path, source } => write!(f, "{op} {}: {source}", path.display()),
            Error::ConnectTimeout { path, waited, source } => write!(
                f,
                "connect {}: no answer after {:.1} s ({source}); is the server running?",
                path.display(),
                waited.as_secs_f64()
            ),
            Error::SocketInUse { path } => write!(
                f,
                "socket {} is in use by a live process; stop it or choose another path",
                path.display()
            ),
            Error::SocketPathTooLong { path } => write!(
                f,
                "socket path {} is longer than the 107 bytes a Unix socket allows; \
                 set XDG_RUNTIME_DIR or TMPDIR to a shorter directory",
                path.display()
            ),
            Error::Frame { op, source } => write!(f, "{op}: {source}"),
            Error::Decode { msg, source } => write!(f, "bad {msg} payload: {source}"),
            Error::Remote(frame) => write!(f, "{frame}"),
            Error::UnexpectedFrame { request, got } => {
                write!(f, "{request}: unexpected answer of type {}", wire::type_name(*got))
            }
            Error::HelperNotFound { searched } => {
                write!(f, "vmhost helper binary not found; looked in:")?;
                for p in searched {
                    write!(f, " {}", p.display())?;
                }
                write!(f, ". Set VMHOST_HELPER_PATH to the vmhost binary")
            }
            Error::HelperExited { socket, status } => write!(
                f,
                "helper for {} exited before serving its socket ({status}); see its stderr above",
                socket.display()
            ),
            Error::Closed => write!(f, "the client is closed"),
            Error::Control { method, message } => write!(f, "control {method}: {message}"),
            // The op goes in the Error frame's own field, not in its message.
            Error::NotRunning { end: Some(end), .. } => write!(f, "the VM is not running: {end}"),
            Error::NotRunning { state, end: None, .. } => write!(f, "the VM is {state}"),
            Error::Vm { op, message } => write!(f, "VM {op}: {message}"),
            Error::Timeout { op, after } => {
                write!(f, "{op}: timed out after {:.1} s", after.as_secs_f64())
            }
            Error::InvalidArgument { op, message } => write!(f, "{op}: {message}"),
            Error::Registry { registry, op, status: Some(status), message } => {
                write!(f, "registry {registry}: {op}: HTTP {status}: {message}")
            }
            Error::Registry { registry, op, status: None, message } => {
                write!(f, "registry {registry}: {op}: {message}")
            }
            Error::BackendUnavailable { backend, why } => {
                write!(f, "the {backend} backend cannot run here: {why}")
            }
            Error::Qmp(e) => write!(f, "{e}"),
            Error::Kvm(e) => write!(f, "kvm backend: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } | Error::ConnectTimeout { source, .. } => Some(source),
            Error::Frame { source, .. } => Some(source),
            Error::Decode { source, .. } => Some(source),
            Error::Qmp(e) => Some(e),
            Error::Kvm(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}

impl From<crate::qmp::Error> for Error {
    fn from(e: crate::qmp::Error) -> Error {
        Error::Qmp(e)
    }
}

impl From<ErrorFrame> for Error {
    fn from(f: ErrorFrame) -> Error {
        Error::Remote(f)
    }
}
