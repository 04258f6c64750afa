#!/usr/bin/env bash
# Install what vmvault's tests need on Debian 12: qemu (real disk tools and live VMs), libnbd,
# OpenSSH (SFTP tests), libvhdi, Ceph's monitor, OSD and RADOS Gateway (a single-node S3 store
# the tests start on loopback: tests/ceph.py; ~60 MB download, ~320 MB installed, ~20 s), the
# tools that build guest filesystems and a bootable guest without mounts (tests/fsimages.py,
# tests/guests.py: e2fsprogs, dosfstools, mtools, ntfs-3g, exfatprogs and exfat-fuse (exFAT images
# are filled through it on a loop device), xfsprogs, fdisk,
# cryptsetup, syslinux, busybox-static, Debian's kernel and qemu-guest-agent; ~75 MB download,
# 2-4.5 min on a shared 2-core machine, most of it unpacking the kernel's modules and
# initramfs-tools rebuilding an initrd the tests do not use), Chromium and its WebDriver (the
# dashboard's browser tests, tests/web/test_browser.py), libvirt (the daemons, run by
# tests/libvirtd.py in a private mount namespace; libvirt-dev and pkg-config to build the
# libvirt-python binding; OVMF for UEFI domains; virtnbdbackup for bench/libvirt_compare.py), fuse3
# (libfuse 3 and fusermount3 for vmvault mount and its tests),
# then vmvault itself with its development extras (pytsk3's wheel bundles The Sleuth Kit: no sleuthkit package is needed).
# Run as root or with sudo; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends \
    qemu-utils qemu-system-x86 python3-libnbd libnbd-bin openssh-server openssh-client libvhdi-utils \
    ceph-mon ceph-osd radosgw openssl \
    e2fsprogs dosfstools mtools ntfs-3g exfatprogs exfat-fuse xfsprogs btrfs-progs fdisk cryptsetup-bin \
    syslinux syslinux-common busybox-static qemu-guest-agent chromium chromium-driver \
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config ovmf virtnbdbackup \
    fuse3
  # the kernel boots the test guest from its own initramfs: skip Debian's initrd for it
  $SUDO env INITRD=No apt-get install -y -q --no-install-recommends linux-image-amd64
fi
python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
