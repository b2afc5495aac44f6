//! Device models of the KVM backend.

pub mod i8042;
pub mod serial;
pub mod virtio;
