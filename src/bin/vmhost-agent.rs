//! `vmhost-agent`: the guest's PID 1 and agent server. Build it static:
//! `RUSTFLAGS='-C target-feature=+crt-static' cargo build --release
//! --target x86_64-unknown-linux-gnu --bin vmhost-agent` (scripts/build-agent.sh, which
//! can also build it with musl).

fn main() {
    vmhost::agent::main()
}
