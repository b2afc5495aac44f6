#!/usr/bin/env bash
# Sets up and runs every vmhost test on a fresh Debian machine: installs what is
# missing, then formatting, lints, and the whole test suite (unit, integration, doc).
# CI (`.ci/run`) runs exactly this. Under CI=true a missing prerequisite is an error.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '== %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install a Rust toolchain (rustup, or Debian's cargo) and re-run" >&2
  exit 1
fi
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    say "installing the $comp component"
    rustup component add "$comp"
  fi
done

# Debian packages the tests need: QEMU for the QMP tests (and, later, the guests).
need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
if [ "${#need[@]}" -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq
  apt-get install -y --no-install-recommends "${need[@]}"
fi

say "cargo fmt --check"
cargo fmt --check
say "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
say "cargo test"
cargo test
