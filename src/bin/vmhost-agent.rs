//! `vmhost-agent`: the guest's PID 1 and agent server. Build it static, with musl where
//! Rust's musl target can be installed (scripts/build-agent.sh): `cargo build --release
//! --target x86_64-unknown-linux-musl --bin vmhost-agent`.

fn main() {
    vmhost::agent::main()
}
