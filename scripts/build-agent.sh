#!/usr/bin/env bash
# Builds the guest agent as a static binary:
#   target/x86_64-unknown-linux-musl/release/vmhost-agent   (musl, preferred)
#   target/x86_64-unknown-linux-gnu/release/vmhost-agent    (glibc, when Rust's musl
#                                                            target cannot be installed)
# The host finds it there, musl's first (or through VMHOST_AGENT, or next to the vmhost
# binary). VMHOST_AGENT_TARGET picks the target instead.
#
# musl, because the agent is the guest's /init and its start is on every boot's path:
# under emulation (TCG) glibc's static start-up costs ~15 ms between the kernel's exec
# of /init and the agent's main, and the binary is twice the size (1.7 MB, not 0.8 MB)
# for the kernel to unpack. The agent keeps its large buffers (src/agent/buffers.rs),
# so that musl's allocator, which maps and unmaps every block over 128 KiB, does not
# slow file transfers down. See BENCHMARKS.md, session 6.
set -euo pipefail
cd "$(dirname "$0")/.."
musl=x86_64-unknown-linux-musl
gnu=x86_64-unknown-linux-gnu
has_target() { [ -d "$(rustc --print sysroot)/lib/rustlib/$1/lib" ]; }
target=${VMHOST_AGENT_TARGET:-}
if [ -z "$target" ]; then
  target=$musl
  if ! has_target "$musl"; then
    if command -v rustup >/dev/null 2>&1 && rustup target add "$musl" >&2 && has_target "$musl"; then
      :
    else
      echo "note: Rust's $musl target is not available; building the agent with glibc" >&2
      target=$gnu
      # A musl build left from before would be found first: it is stale now.
      rm -f "target/$musl/release/vmhost-agent"
    fi
  fi
elif [ "$target" = "$musl" ] && ! has_target "$musl"; then
  rustup target add "$musl" >&2
elif [ "$target" != "$musl" ]; then
  # Asked for another target: a musl build left from before would be found first.
  rm -f "target/$musl/release/vmhost-agent"
fi
# With an explicit --target, RUSTFLAGS reach only the target's crates, not build scripts
# or proc macros (which cannot be static).
# relocation-model=static: a plain static executable, not a static PIE that relocates
# itself at every start.
# -u posix_spawn_file_actions_addchdir_np: std refers to it weakly; under LTO our strong
# reference merges into that weak one, the static link leaves it null and the agent
# crashes at its first command. Forced in, it holds with or without LTO.
RUSTFLAGS='-C target-feature=+crt-static -C relocation-model=static -C strip=symbols -C link-arg=-Wl,-u,posix_spawn_file_actions_addchdir_np' \
  cargo build --release --target "$target" --bin vmhost-agent --no-default-features "$@"
