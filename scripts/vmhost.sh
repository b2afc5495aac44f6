#!/usr/bin/env bash
# Sets vmhost up on this machine (scripts/setup.sh) and runs it with these arguments,
# e.g.: bash scripts/vmhost.sh run -- uname -a
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh"
exec "$here/target/release/vmhost" "$@"
