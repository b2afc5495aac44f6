#!/usr/bin/env bash
# Builds the guest agent as a static binary:
#   target/x86_64-unknown-linux-gnu/release/vmhost-agent
# The host finds it there (or through VMHOST_AGENT, or next to the vmhost binary).
set -euo pipefail
cd "$(dirname "$0")/.."
# With an explicit --target, RUSTFLAGS reach only the target's crates, not build scripts
# or proc macros (which cannot be static).
# -u posix_spawn_file_actions_addchdir_np: std refers to it weakly; under LTO our strong
# reference merges into that weak one, the static link leaves it null and the agent
# crashes at its first command. Forced in, it holds with or without LTO.
RUSTFLAGS='-C target-feature=+crt-static -C relocation-model=static -C strip=symbols -C link-arg=-Wl,-u,posix_spawn_file_actions_addchdir_np' \
  cargo build --release --target x86_64-unknown-linux-gnu --bin vmhost-agent "$@"
