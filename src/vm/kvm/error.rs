//! The KVM backend's error type: what failed, on what, and the cause.

use std::fmt;

/// Errors of the KVM backend.
#[derive(Debug)]
pub enum Error {
    /// A KVM ioctl failed.
    Kvm {
        /// What was being done ("create VM", "set memory slot 0", ...).
        op: String,
        /// The cause.
        source: kvm_ioctls::Error,
    },
    /// Mapping or accessing guest memory failed.
    Memory {
        /// What failed.
        message: String,
    },
    /// A device range overlaps another on a bus.
    BusOverlap {
        /// The new range's base.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A host resource (an eventfd, a socket, a thread) could not be set up.
    Host {
        /// What was being set up.
        op: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A vCPU thread could not be started or controlled.
    Vcpu {
        /// Which vCPU.
        id: u8,
        /// What failed.
        message: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Kvm { op, source } => write!(f, "KVM: {op}: {source}"),
            Error::Memory { message } => write!(f, "guest memory: {message}"),
            Error::BusOverlap { base, len } => {
                write!(f, "bus: the range {base:#x}+{len:#x} overlaps a device already there")
            }
            Error::Host { op, source } => write!(f, "{op}: {source}"),
            Error::Vcpu { id, message } => write!(f, "vCPU {id}: {message}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Kvm { source, .. } => Some(source),
            Error::Host { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The crate's error for a kvm backend failure.
impl From<Error> for crate::error::Error {
    fn from(e: Error) -> crate::error::Error {
        crate::error::Error::Kvm(Box::new(e))
    }
}
