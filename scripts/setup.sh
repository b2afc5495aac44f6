#!/usr/bin/env bash
# Installs what vmhost needs on a Debian machine and builds it:
#   - qemu-system-x86, erofs-utils, fakeroot and attr (Debian packages, no recommends),
#     and the tools that build the default image's busybox
#   - the vmhost binary (release) and the static guest agent
# The guest kernel is provisioned by vmhost itself on first use (`vmhost kernel fetch`);
# `vmhost kernel build` builds the faster minimal one.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install a Rust toolchain (rustup, or Debian's cargo) and re-run" >&2
  exit 1
fi
need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
# Container images boot from a read-only erofs disk that mkfs.erofs builds.
command -v mkfs.erofs >/dev/null 2>&1 || need+=(erofs-utils)
# A vmhost that is not root keeps an image's owners and device nodes through fakeroot,
# and its xattrs through setfattr (attr) run under the same fakeroot.
command -v fakeroot >/dev/null 2>&1 || need+=(fakeroot)
command -v setfattr >/dev/null 2>&1 || need+=(attr)
# The default image's busybox is built once from Debian's source (busybox/vmhost.config).
for tool in gcc make patch bzip2; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
command -v xz >/dev/null 2>&1 || need+=(xz-utils)
[ -e /usr/include/stdio.h ] || need+=(libc6-dev)
if [ "${#need[@]}" -gt 0 ]; then
  echo "== installing ${need[*]}" >&2
  apt-get update -qq
  apt-get install -y --no-install-recommends "${need[@]}" >&2
fi
# Kernel provisioning downloads Debian packages: make sure apt knows them.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  apt-get update -qq
fi
profile=${VMHOST_PROFILE:-release}
if [ "$profile" = release ]; then
  cargo build --release --bin vmhost >&2
else
  cargo build --bin vmhost >&2
fi
bash scripts/build-agent.sh >&2
