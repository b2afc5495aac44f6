//! `vmhost-agent`: the guest's PID 1 and agent server. Build it static, with musl where
//! Rust's musl target can be installed (scripts/build-agent.sh): `cargo build --release
//! --target x86_64-unknown-linux-musl --bin vmhost-agent`.
//!
//! No Rust `main`: the C one below skips std's runtime start (`lang_start`), which PID 1
//! pays for at every boot and does not need. Under emulation its first-time kernel paths
//! (a poll of the standard descriptors, SIGSEGV and SIGBUS handlers, an alternate signal
//! stack mapped for the main thread and for every thread started after) cost
//! milliseconds of every boot. [`vmhost::internals::agent::main`] does the part the agent needs.
#![no_main]

/// The C entry point (musl's `__libc_start_main` calls it).
///
/// # Safety
///
/// `argv` holds `argc` valid NUL-terminated strings, as the C runtime passes them.
#[no_mangle]
pub unsafe extern "C" fn main(
    argc: std::ffi::c_int,
    argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    // SAFETY: the C runtime passes argc valid NUL-terminated strings in argv.
    let warm_up = argc == 2 && unsafe { std::ffi::CStr::from_ptr(*argv.add(1)) } == c"--warm-up";
    vmhost::internals::agent::main(warm_up)
}
