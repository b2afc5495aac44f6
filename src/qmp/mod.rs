//! QMP, the QEMU Machine Protocol: a client that never hangs and never mixes up replies.
//!
//! Not written yet; it arrives with the QEMU backend's supervision.
