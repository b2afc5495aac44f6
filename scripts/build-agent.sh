#!/usr/bin/env bash
# Builds the guest agent as a static binary:
#   target/x86_64-unknown-linux-gnu/release/vmhost-agent
# The host finds it there (or through VMHOST_AGENT, or next to the vmhost binary).
#
# VMHOST_AGENT_TARGET=x86_64-unknown-linux-musl builds it with musl instead (adding
# Rust's musl target with rustup when it is missing), into
# target/x86_64-unknown-linux-musl/release/vmhost-agent, which the host uses when no
# glibc build is there, or through VMHOST_AGENT. Under TCG the musl agent reaches its
# main ~15 ms sooner after the kernel execs /init (glibc's static start-up is the
# difference) and is half the size, but moves guest files ~40 % slower: musl's
# allocator maps and unmaps every block over 128 KiB, and the agent allocates one per
# frame (BENCHMARKS.md, session 6). glibc stays the default until the frame path
# reuses its buffers.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${VMHOST_AGENT_TARGET:-x86_64-unknown-linux-gnu}
if [ "$target" = x86_64-unknown-linux-musl ] \
  && [ ! -d "$(rustc --print sysroot)/lib/rustlib/$target/lib" ]; then
  rustup target add "$target" >&2
fi
# With an explicit --target, RUSTFLAGS reach only the target's crates, not build scripts
# or proc macros (which cannot be static).
# relocation-model=static: a plain static executable, not a static PIE that relocates
# itself at every start.
# -u posix_spawn_file_actions_addchdir_np: std refers to it weakly; under LTO our strong
# reference merges into that weak one, the static link leaves it null and the agent
# crashes at its first command. Forced in, it holds with or without LTO.
RUSTFLAGS='-C target-feature=+crt-static -C relocation-model=static -C strip=symbols -C link-arg=-Wl,-u,posix_spawn_file_actions_addchdir_np' \
  cargo build --release --target "$target" --bin vmhost-agent "$@"
