#!/usr/bin/env bash
# Install what vmvault's tests need on Debian 12: qemu (real disk tools and live VMs), libnbd,
# OpenSSH (SFTP tests), libvhdi, then vmvault itself with its development extras.
# Run as root or with sudo; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends \
    qemu-utils qemu-system-x86 python3-libnbd libnbd-bin openssh-server openssh-client libvhdi-utils
fi
python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
