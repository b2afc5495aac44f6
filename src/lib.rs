//! vmhost boots Linux micro-VMs and drives them from ordinary, synchronous Rust
//! programs: run commands in the guest, move files in and out, open guest listeners,
//! snapshot guest filesystems, and supervise QEMU over QMP.
//!
//! The crate speaks three public protocols byte for byte:
//!
//! - the **helper protocol** ([`wire`], [`server`], [`client`]) between a host program
//!   and the helper process that owns one VM (`vmhost helper --socket PATH`);
//! - the **control protocol** ([`server::control`]) between a managing daemon and a
//!   per-VM host process (`vmhost.sock`, one JSON request per connection);
//! - **QMP** ([`qmp`]) between vmhost and QEMU.
//!
//! Everything is blocking std I/O: one thread per connection and per VM, crossbeam
//! channels between them, no async runtime.
//!
//! The full message catalogue of the helper protocol is in `docs/protocol.md`; the agent
//! protocol's is in `docs/agent-protocol.md`. Runnable programs are in `examples/`
//! (`cargo run --example run_command -- uname -a`). The README follows.
//!
#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod client;
pub mod error;
pub mod image;
pub mod progress;
pub mod qmp;
pub(crate) mod rate_limit;
pub mod server;
pub mod status;
pub mod vm;
pub mod wire;

#[doc(hidden)]
pub mod internals;
// Their short paths inside the crate (`crate::contract`, `crate::agent` in tests and docs).
#[allow(unused_imports)]
pub(crate) use internals::{agent, contract, signals, unix};

#[cfg(test)]
mod test_dir;

pub use client::fs::{File, Fs, Metadata, OpenOptions};
pub use client::instance::{FirstCommand, Image, Instance};
pub use client::net::{Conn, Incoming, Listener};
pub use client::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Output, Stdio};
pub use client::snapshot::{Snapshot, SnapshotOptions};
pub use error::{Error, Result};
pub use wire::InstanceOptions;
