#!/bin/sh
# Install what the tests and the demo need, only when it is missing.
# Run as root on Debian 12 (apt-get) with pip for the Python test tools.
# DRY_RUN=1: print what would be installed, install nothing.
set -eu
PYTHON=${PYTHON:-python3}
ZFS_DEVICE=${ZFS_DEVICE:-/dev/zfs}
ZFSUTILS_PACKAGE=${ZFSUTILS_PACKAGE:-zfsutils-linux}
packages="btrfs-progs openssh-server openssh-client iputils-ping nftables libvirt-clients postgresql gzip bzip2 xz-utils"
# The packaging tests: rpmbuild (Debian's rpm), man -l and groff for the man
# pages (dpkg-deb is in dpkg, always here).
packages="$packages rpm man-db groff-base"
# make test-guest: the KVM guest (tools/guest.py): debootstrap builds its image,
# libvirtd with the qemu driver boots it, socat forwards the host's loopback
# services into its restricted user-mode network.
if [ -n "${GUEST:-}" ]; then
    packages="$packages debootstrap qemu-system-x86 qemu-utils libvirt-daemon-system socat"
fi
# Kernel OpenZFS (/dev/zfs, zfsutils-linux) is used where it runs: zfs-fuse is
# installed only without it (apt would remove zfsutils-linux for it: Conflicts).
if [ -e "$ZFS_DEVICE" ] || dpkg-query -W -f='${Status}' "$ZFSUTILS_PACKAGE" 2>/dev/null | grep -q "install ok installed"; then
    echo "install-deps: kernel ZFS here (/dev/zfs or zfsutils-linux): not installing zfs-fuse"
else
    packages="zfs-fuse $packages"
fi
missing=""
for pkg in $packages; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "${DRY_RUN:-}" ]; then
    echo "install-deps: packages: $packages"
    echo "install-deps: would apt-get install:${missing:- nothing}"
    exit 0
fi
if [ -n "$missing" ]; then
    echo "install-deps: apt-get install$missing"
    apt-get update -q
    # Package scripts may try to start services: the tests start their own.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
if ! "$PYTHON" -c "import pytest, pytest_timeout, prometheus_client, pyflakes" 2>/dev/null || ! command -v vermin >/dev/null 2>&1; then
    # prometheus-client: its text-format parser reads our metrics file in the tests;
    # pyflakes reads pg_wal_fetch.py as plain code (its REST part is a string).
    echo "install-deps: pip install pytest pytest-timeout vermin prometheus-client pyflakes"
    "$PYTHON" -m pip install -q pytest pytest-timeout vermin prometheus-client pyflakes
fi
