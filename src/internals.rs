//! vmhost's own parts, not an API: public for its binaries (the guest agent is
//! `vmhost-agent`; the CLI uses the Unix plumbing and the signal watcher) and for the
//! tests that drive them. They change without notice, and the documentation hides them.

#[path = "agent/mod.rs"]
pub mod agent;
#[path = "contract/mod.rs"]
pub mod contract;
#[path = "signals.rs"]
pub mod signals;
#[path = "unix.rs"]
pub mod unix;
