#!/usr/bin/env bash
# Sets up and runs every vmhost test on a fresh Debian machine: installs QEMU, builds
# the static guest agent, provisions the guest kernel, then formatting, lints and the
# whole test suite (unit, integration with real QEMU guests, doc tests).
# CI (`.ci/run`) runs exactly this. Under CI=true a missing prerequisite is an error.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '== %s\n' "$*"; }

for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    say "installing the $comp component"
    rustup component add "$comp"
  fi
done

say "setup (QEMU, vmhost, static guest agent)"
VMHOST_PROFILE=debug bash scripts/setup.sh
# The minimal kernel's build tools (vmhost kernel build installs the source itself).
kneed=()
for tool in gcc make flex bison bc patch; do
  command -v "$tool" >/dev/null 2>&1 || kneed+=("$tool")
done
[ -e /usr/include/libelf.h ] || kneed+=(libelf-dev)
if [ "${#kneed[@]}" -gt 0 ]; then
  say "installing ${kneed[*]}"
  apt-get install -y --no-install-recommends "${kneed[@]}"
fi
# The container-image tests' real parts: the CNCF registry (Debian's docker-registry),
# skopeo and umoci to make and push test images, htpasswd (apache2-utils) for the
# registry's bcrypt password file; erofs-utils, which vmhost itself uses to boot images
# from a disk, with fakeroot and attr's setfattr for a vmhost that is not root.
ineed=()
command -v docker-registry >/dev/null 2>&1 || ineed+=(docker-registry)
command -v htpasswd >/dev/null 2>&1 || ineed+=(apache2-utils)
command -v mkfs.erofs >/dev/null 2>&1 || ineed+=(erofs-utils)
command -v fakeroot >/dev/null 2>&1 || ineed+=(fakeroot)
command -v setfattr >/dev/null 2>&1 || ineed+=(attr)
command -v skopeo >/dev/null 2>&1 || ineed+=(skopeo)
command -v umoci >/dev/null 2>&1 || ineed+=(umoci)
# A registry that serves HTTPS, with a certificate from a CA the tests make.
command -v openssl >/dev/null 2>&1 || ineed+=(openssl)
if [ "${#ineed[@]}" -gt 0 ]; then
  say "installing ${ineed[*]}"
  apt-get install -y --no-install-recommends "${ineed[@]}"
fi
say "guest kernels (stock, and the minimal one: minutes the first time, cached after)"
./target/debug/vmhost kernel fetch
./target/debug/vmhost kernel build

say "the default image (its busybox is built from Debian's source the first time)"
./target/debug/vmhost run -- busybox true

say "cargo fmt --check"
cargo fmt --check
say "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
say "cargo test"
cargo test
# Said in the log, not only in captured test output: the kvm backend's Linux boot test
# (exec_suite_on_the_kvm_backend) needs hardware virtualization.
if ! grep -qwE 'vmx|svm' /proc/cpuinfo; then
  say "note: no hardware virtualization (vmx/svm) here: the kvm backend's Linux boot test was skipped"
fi
