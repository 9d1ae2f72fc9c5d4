#!/usr/bin/env python3
"""The test guest: the article's platform (kernel OpenZFS in a KVM guest) for the
suite and the benchmarks, started through a real libvirt.

    python3 tools/guest.py build        # the image, once: ~/.cache/pg_zfs-tests/guest-KEY/
    python3 tools/guest.py test [-- PYTEST ARGS]
                                        # boot it, copy the repository in, run pytest
                                        # there (kernel ZFS), print its output here
    python3 tools/guest.py run -- python3 bench/snapshot.py
                                        # any command there, from the copied tree
    python3 tools/guest.py shell        # boot it and log in (debugging)
    make test-guest                     # build (when missing) + test

The image is built from the package registries only: `debootstrap` of Debian 12
(main + contrib), then in the chroot the kernel with its headers, zfs-dkms
(built by dkms for that kernel), zfsutils-linux, PostgreSQL 15, sshd, the test
tools (Debian's pytest, pip's vermin and pyflakes). It is an ext4 file system
made by `mkfs.ext4 -d` (no loop mount), booted by its own kernel and initrd
(direct kernel boot). The cache key is a hash of everything that goes into it
(RECIPE below, this file's build steps): change either and the next run builds
a new image. Each boot runs on a qcow2 overlay: the cached image is never
written.

The guest boots through libvirt (qemu:///system; libvirtd and virtlogd are
started for the run when none answers, and stopped after): the domain is
etc/libvirt/pg-zfs-guest.xml with this run's name, paths and ports filled in,
QEMU running as root by the domain's own seclabel (no change to
/etc/libvirt/qemu.conf). KVM when /dev/kvm works, else TCG
(software emulation, slower); the output says which. Its network is QEMU's
user mode with restrict=on: the guest reaches nothing but what is forwarded
(ssh into it on a 127.0.0.1 port; `--forward GUEST_PORT=HOST:PORT` for a
service on the host's loopback, as the topology tests do).

Needs root, debootstrap, qemu-system-x86, libvirt-daemon-system, libvirt-clients,
about 3 GB in ~/.cache and, for the build only, Debian's mirror.
"""

import argparse
import glob
import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.expanduser(os.environ.get("PG_ZFS_TEST_CACHE", "~/.cache/pg_zfs-tests"))
DOMAIN_XML = os.path.join(REPO, "etc", "libvirt", "pg-zfs-guest.xml")
MIRROR = os.environ.get("PG_ZFS_GUEST_MIRROR", "http://deb.debian.org/debian")
URI = "qemu:///system"
OVERLAY_SIZE = "24G"

# Everything that goes into the image: change it and the cache key changes.
RECIPE = {
    "suite": "bookworm",
    "components": "main,contrib",
    "debootstrap_include": "ca-certificates,systemd-sysv,udev,dbus,kmod,iproute2,openssh-server,python3",
    "packages": " ".join([
        "linux-image-amd64", "linux-headers-amd64", "dkms", "zfs-dkms", "zfsutils-linux",
        "postgresql-15", "postgresql-client-15",
        "openssh-client", "btrfs-progs", "nftables", "iputils-ping", "libvirt-clients",
        "gzip", "bzip2", "xz-utils", "rpm", "man-db", "groff-base", "rsync", "procps", "psmisc",
        "python3-pytest", "python3-pytest-timeout", "python3-prometheus-client", "python3-pip",
        "make", "less", "socat",
    ]),
    "pip": "vermin==1.9.2 pyflakes==3.2.0",
    "size": "8G",
}
# ssh into the guest: user-mode network, the guest's sshd forwarded to this port.
SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "-o", "BatchMode=yes",
               "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=8"]

# In the chroot, step 1: the packages, and zfs-dkms built for the image's kernel.
PACKAGES_SCRIPT = r"""
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 0755 /usr/sbin/policy-rc.d
echo "deb {mirror} {suite} {components_sp}" > /etc/apt/sources.list
apt-get update -q
apt-get install -y -q --no-install-recommends {packages}
kver=$(ls /lib/modules | sort -V | tail -n 1)
dkms autoinstall -k "$kver"
ls /lib/modules/$kver/updates/dkms/zfs.ko*
echo "$kver" > /boot/pg_zfs-kernel-version
"""
# Step 2: pip's test tools from wheels the host downloaded (the chroot does not
# carry the host's CA settings), then the system as the tests want it.
CONFIGURE_SCRIPT = r"""
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
python3 -m pip install -q --break-system-packages --no-index --find-links /tmp/wheels {pip}
rm -rf /tmp/wheels
pg_dropcluster --stop 15 main || true
rm -f /usr/sbin/policy-rc.d
apt-get clean
echo pgzfs-guest > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 pgzfs-guest\n' > /etc/hosts
printf '/dev/vda / ext4 rw,relatime 0 1\n' > /etc/fstab
mkdir -p /etc/systemd/network
printf '[Match]\nName=en* eth*\n[Network]\nDHCP=ipv4\n' > /etc/systemd/network/50-dhcp.network
systemctl enable systemd-networkd ssh
systemctl disable apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer 2>/dev/null || true
passwd -d root
mkdir -p /root/.ssh; chmod 0700 /root/.ssh
"""


def log(message):
    print("guest: %s" % message, flush=True)


def sh(argv, check=True, **kwargs):
    result = subprocess.run(argv, **kwargs)
    if check and result.returncode != 0:
        raise SystemExit("guest: %s exited %d" % (" ".join(argv[:3]), result.returncode))
    return result


def cache_key():
    digest = hashlib.sha256()
    digest.update(repr(sorted(RECIPE.items())).encode())
    digest.update(PACKAGES_SCRIPT.encode())
    digest.update(CONFIGURE_SCRIPT.encode())
    digest.update(MIRROR.encode())
    return digest.hexdigest()[:12]


def image_dir():
    return os.path.join(CACHE, "guest-%s" % cache_key())


def image_ready(directory):
    return all(os.path.exists(os.path.join(directory, name))
               for name in ("root.img", "vmlinuz", "initrd.img", "id_ed25519", "READY"))


# ---------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------

def chroot(root, script):
    """Run script (sh) in the chroot with /proc, /sys and /dev mounted for it."""
    mounted = []
    try:
        for source, target, args in (("proc", "proc", ["-t", "proc"]), ("sysfs", "sys", ["-t", "sysfs"]),
                                     ("/dev", "dev", ["--bind"]), ("devpts", "dev/pts", ["-t", "devpts"])):
            path = os.path.join(root, target)
            os.makedirs(path, exist_ok=True)
            sh(["mount"] + args + [source, path])
            mounted.append(path)
        shutil.copy("/etc/resolv.conf", os.path.join(root, "etc", "resolv.conf"))
        sh(["chroot", root, "/bin/sh", "-c", script], stdout=subprocess.DEVNULL)
    finally:
        for path in reversed(mounted):
            sh(["umount", "-l", path], check=False)


def build(force=False):
    """The image directory (root.img, vmlinuz, initrd.img, id_ed25519): cached,
    else built in steps under guest-KEY.build, each step done once (a build cut
    short goes on from its last finished step)."""
    directory = image_dir()
    if image_ready(directory) and not force:
        log("image cached: %s" % directory)
        return directory
    started = time.time()
    work = directory + ".build"
    if force and os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    root = os.path.join(work, "root")
    values = dict(mirror=MIRROR, suite=RECIPE["suite"], components_sp=RECIPE["components"].replace(",", " "),
                  packages=RECIPE["packages"], pip=RECIPE["pip"])

    def step(name, action):
        marker = os.path.join(work, name + ".done")
        if os.path.exists(marker):
            log("%s: done by an earlier run" % name)
            return
        action()
        open(marker, "w").close()
        log("%s done at %.0f s" % (name, time.time() - started))

    def debootstrap():
        if os.path.exists(root):
            shutil.rmtree(root)
        log("debootstrap %s (%s) into %s" % (RECIPE["suite"], RECIPE["components"], root))
        sh(["debootstrap", "--variant=minbase", "--components=" + RECIPE["components"],
            "--include=" + RECIPE["debootstrap_include"], RECIPE["suite"], root, MIRROR],
           stdout=subprocess.DEVNULL)

    def packages():
        log("apt-get install in the chroot: %s" % RECIPE["packages"])
        chroot(root, PACKAGES_SCRIPT.format(**values))

    def configure():
        wheels = os.path.join(root, "tmp", "wheels")
        sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "-d", wheels] + RECIPE["pip"].split())
        chroot(root, CONFIGURE_SCRIPT.format(**values))

    def image():
        key = os.path.join(work, "id_ed25519")
        for path in (key, key + ".pub"):
            if os.path.exists(path):
                os.remove(path)
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pg_zfs-tests-guest", "-f", key])
        shutil.copy(key + ".pub", os.path.join(root, "root", ".ssh", "authorized_keys"))
        with open(os.path.join(root, "etc", "resolv.conf"), "w") as handle:
            handle.write("nameserver 10.0.2.3\n")
        kver = open(os.path.join(root, "boot", "pg_zfs-kernel-version")).read().strip()
        shutil.copy(os.path.join(root, "boot", "vmlinuz-" + kver), os.path.join(work, "vmlinuz"))
        shutil.copy(os.path.join(root, "boot", "initrd.img-" + kver), os.path.join(work, "initrd.img"))
        log("mkfs.ext4 -d (%s sparse)" % RECIPE["size"])
        path = os.path.join(work, "root.img")
        if os.path.exists(path):
            os.remove(path)
        sh(["truncate", "-s", RECIPE["size"], path])
        sh(["mkfs.ext4", "-q", "-F", "-L", "pgzfs-guest", "-d", root, path])
        with open(os.path.join(work, "READY"), "w") as handle:
            handle.write("kernel %s\nkey %s\nrecipe %r\n" % (kver, cache_key(), sorted(RECIPE.items())))

    step("debootstrap", debootstrap)
    step("packages", packages)
    step("configure", configure)
    step("image", image)
    shutil.rmtree(root)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.rename(work, directory)
    used = int(subprocess.check_output(["du", "-s", "--block-size=1M", directory]).split()[0])
    log("image built in %.0f s: %s (%d MB on disk)" % (time.time() - started, directory, used))
    return directory


# ---------------------------------------------------------------------------
# boot (libvirt) and talk to it (ssh)
# ---------------------------------------------------------------------------

# A boot sector that writes 1 to QEMU's isa-debug-exit port: QEMU exits with 3.
KVM_PROBE_SECTOR = bytes([0xB0, 0x01, 0xE6, 0xF4, 0xF4, 0xEB, 0xFE]).ljust(510, b"\0") + b"\x55\xaa"
# KVM is used when its probe takes at most KVM_PROBE_FACTOR times TCG's
# probe of the same sector, measured in the same call (and never less than
# KVM_PROBE_FLOOR s). Both are mostly QEMU's start: a working KVM runs the
# sector about as fast as TCG. A nested KVM the outer hypervisor emulates took
# 4 s on one machine, and there a Debian kernel needed minutes to print its
# first line; on another (2026-12-02) 1.32 to 1.42 s against TCG's 0.06 s, and
# the guest did not answer ssh within 240 s. An absolute limit of 2 s let that
# one through and failed CI's guest leg.
KVM_PROBE_FACTOR = 5
KVM_PROBE_FLOOR = 0.5


def probe_seconds(accel, sector):
    """(QEMU's exit code, seconds) of the probe sector under accel (kvm, tcg);
    (None, seconds) when it did not finish in 30 s."""
    started = time.time()
    try:
        code = subprocess.run(["qemu-system-x86_64", "-accel", accel, "-nodefaults", "-display", "none",
                               "-m", "16", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                               "-drive", "file=%s,format=raw,if=ide" % sector],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30).returncode
    except subprocess.TimeoutExpired:
        code = None
    return code, time.time() - started


def kvm_fast_enough(kvm_seconds, tcg_seconds):
    """True when KVM's probe is quick next to TCG's (KVM_PROBE_FACTOR)."""
    return kvm_seconds <= max(KVM_PROBE_FLOOR, KVM_PROBE_FACTOR * tcg_seconds)


def kvm_works():
    """(True, why) when KVM runs a guest here at a usable speed: the probe
    boot sector under -accel kvm exits through isa-debug-exit about as fast as
    under TCG (kvm_fast_enough); else (False, why)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    with tempfile.NamedTemporaryFile(suffix=".bin") as sector:
        sector.write(KVM_PROBE_SECTOR)
        sector.flush()
        code, seconds = probe_seconds("kvm", sector.name)
        if code is None:
            return False, "/dev/kvm is there but its probe guest did not finish in 30 s"
        if code != 3:
            return False, "/dev/kvm is there but its probe guest failed (exit %d)" % code
        tcg_code, tcg_seconds = probe_seconds("tcg", sector.name)
    if tcg_code == 3 and not kvm_fast_enough(seconds, tcg_seconds):
        return False, "/dev/kvm works but slowly here (probe %.2f s, TCG's %.2f s: nested?)" % (seconds, tcg_seconds)
    return True, "probe %.2f s, TCG's %.2f s" % (seconds, tcg_seconds)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def virsh(*words, check=True, timeout=120):
    result = subprocess.run(["virsh", "-c", URI] + list(words), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)
    if check and result.returncode != 0:
        raise SystemExit("guest: virsh %s: %s" % (" ".join(words), result.stderr.strip()))
    return result


# libvirt starts each QEMU in a mount namespace of its own, a copy of
# libvirtd's mounts at that moment; where / is a private mount (this
# machine kind), an unmount on the host never reaches that copy, and zfs-fuse
# calls a dataset mounted when the guest booted "busy" until QEMU exits
# (DEVELOPERS.md, "CI"). libvirtd therefore runs in a private namespace of
# its own without zfs-fuse's mounts: the host's later mounts and unmounts do
# not reach it, and no QEMU holds the testbed's datasets.
WITHOUT_ZFS_FUSE_MOUNTS = [
    "unshare", "--mount", "--propagation", "private", "sh", "-c",
    "awk '$3 == \"fuse.zfs\" {print $2}' /proc/self/mounts | sort -r | "
    "while read -r mount; do umount -l \"$mount\"; done; exec \"$@\"", "sh"]


class Libvirtd(object):
    """libvirtd (and virtlogd, which its qemu driver logs through) for the run:
    the running one if it answers, else started here and stopped by stop()."""

    def __init__(self):
        self.started = []

    def answers(self):
        return subprocess.run(["virsh", "-c", URI, "version"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode == 0

    def start(self):
        if self.answers():
            return self
        for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
            if subprocess.run(["pgrep", "-x", daemon], stdout=subprocess.DEVNULL).returncode != 0:
                argv = [daemon, "--daemon", "--pid-file", pidfile]
                sh(WITHOUT_ZFS_FUSE_MOUNTS + argv if daemon == "libvirtd" else argv)
                self.started.append(pidfile)
        deadline = time.time() + 30
        while not self.answers():
            if time.time() > deadline:
                raise SystemExit("guest: libvirtd does not answer on %s" % URI)
            time.sleep(0.3)
        log("started libvirtd (%s)" % URI)
        return self

    def stop(self):
        for pidfile in reversed(self.started):
            try:
                os.kill(int(open(pidfile).read().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        self.started = []


# libvirt starts QEMU with -sandbox on,...,spawn=deny (its seccomp_sandbox):
# that forbids the socat each guestfwd=...-cmd: runs per connection. Where a
# guest has forwards, its <emulator> is this wrapper, which drops -sandbox and
# nothing else (a fixed path in the cache: libvirt probes each new emulator).
QEMU_WRAPPER = r"""#!/bin/sh
# pg_zfs tests (tools/guest.py): QEMU without libvirt's -sandbox, for guestfwd's socat.
skip=
for arg; do
    shift
    if [ -n "$skip" ]; then skip=; continue; fi
    if [ "$arg" = "-sandbox" ]; then skip=1; continue; fi
    set -- "$@" "$arg"
done
exec /usr/bin/qemu-system-x86_64 "$@"
"""


def qemu_wrapper():
    path = os.path.join(CACHE, "qemu-no-sandbox")
    if not os.path.exists(path) or open(path).read() != QEMU_WRAPPER:
        os.makedirs(CACHE, exist_ok=True)
        with open(path + ".new", "w") as handle:
            handle.write(QEMU_WRAPPER)
        os.chmod(path + ".new", 0o755)
        os.rename(path + ".new", path)
    return path


def domain_xml(template, name, disk, kernel, initrd, console, ssh_port, forwards, kvm,
               memory_mib=4096, vcpus=2, host_forwards=(), zfs_disk=None):
    """The shipped domain with this run's name, disk, kernel and network: the
    interface becomes QEMU's user network with restrict=on, ssh forwarded from
    127.0.0.1:ssh_port, each (host_port, guest_port) of host_forwards from
    127.0.0.1:host_port, and each (guest_address, guest_port, host, host_port)
    of forwards reaching host:host_port on this machine's loopback (socat).
    zfs_disk: a second virtio disk (vdb) for the guest's pool."""
    import xml.etree.ElementTree as ET
    qemu_ns = "http://libvirt.org/schemas/domain/qemu/1.0"
    ET.register_namespace("qemu", qemu_ns)
    domain = ET.fromstring(template)
    domain.set("type", "kvm" if kvm else "qemu")
    domain.find("name").text = name
    domain.find("memory").text = str(memory_mib)
    domain.find("vcpu").text = str(vcpus)
    if not kvm:
        domain.remove(domain.find("cpu"))
    os_element = domain.find("os")
    os_element.remove(os_element.find("boot"))
    for tag, text in (("kernel", kernel), ("initrd", initrd),
                      ("cmdline", "root=/dev/vda rw console=ttyS0 net.ifnames=0")):
        ET.SubElement(os_element, tag).text = text
    devices = domain.find("devices")
    if forwards:
        ET.SubElement(devices, "emulator").text = qemu_wrapper()
    disk_element = devices.find("disk")
    disk_element.find("source").set("file", disk)
    disk_element.find("driver").set("cache", "unsafe")
    if zfs_disk:
        second = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(second, "driver", name="qemu", type="qcow2", cache="unsafe")
        ET.SubElement(second, "source", file=zfs_disk)
        ET.SubElement(second, "target", dev="vdb", bus="virtio")
    devices.remove(devices.find("interface"))
    for tag in ("serial", "console"):
        devices.remove(devices.find(tag))
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=console)
    ET.SubElement(serial, "target", port="0")
    # Run QEMU as root (the images live under /root): no change to qemu.conf.
    seclabel = ET.SubElement(domain, "seclabel", type="static", model="dac", relabel="no")
    ET.SubElement(seclabel, "label").text = "+0:+0"
    netdev = ["user", "id=pgzfsnet", "restrict=on", "hostfwd=tcp:127.0.0.1:%d-:22" % ssh_port]
    for host_port, guest_port in host_forwards:
        netdev.append("hostfwd=tcp:127.0.0.1:%d-:%d" % (host_port, guest_port))
    for guest_address, guest_port, host, host_port in forwards:
        netdev.append("guestfwd=tcp:%s:%d-cmd:socat - TCP:%s:%d" % (guest_address, guest_port, host, host_port))
    commandline = ET.SubElement(domain, "{%s}commandline" % qemu_ns)
    for value in ("-netdev", ",".join(netdev), "-device", "virtio-net-pci,netdev=pgzfsnet,bus=pcie.0,addr=0x10"):
        ET.SubElement(commandline, "{%s}arg" % qemu_ns, value=value)
    return ET.tostring(domain, encoding="unicode")


def remove_stale_guests():
    """Destroy and undefine the test domains (pg-zfs-test-PID) and remove the run
    directories (/var/tmp/pg_zfs-guest-PID-*) of runs whose process is gone."""
    names = virsh("list", "--all", "--name", check=False).stdout.split()
    for name in names:
        match = re.match(r"^pg-zfs-test-(\d+)$", name)
        if match and not pid_alive(int(match.group(1))):
            log("removing %s, left by a run that is gone" % name)
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)
    for path in glob.glob("/var/tmp/pg_zfs-guest-*-*"):
        match = re.match(r"^pg_zfs-guest-(\d+)-", os.path.basename(path))
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Guest(object):
    """One booted test guest: a qcow2 overlay on the cached image, defined and
    started through libvirt, reached by ssh on a 127.0.0.1 port."""

    def __init__(self, image, name=None, forwards=(), memory_mib=4096, vcpus=2, host_forwards=(),
                 zfs_disk_size=None):
        self.image = image
        self.name = name or "pg-zfs-test-%d" % os.getpid()
        self.forwards = list(forwards)
        self.host_forwards = list(host_forwards)
        self.zfs_disk_size = zfs_disk_size
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.kvm, self.kvm_why = kvm_works()
        self.run_dir = tempfile.mkdtemp(prefix="pg_zfs-guest-%d-" % os.getpid(), dir="/var/tmp")
        self.disk = os.path.join(self.run_dir, "overlay.qcow2")
        self.zfs_disk = os.path.join(self.run_dir, "zfs.qcow2") if zfs_disk_size else None
        self.console = os.path.join(self.run_dir, "console.log")
        self.key = os.path.join(self.run_dir, "id_ed25519")
        self.ssh_port = free_port()
        self.libvirtd = Libvirtd()
        self.defined = False

    def xml(self):
        with open(DOMAIN_XML) as handle:
            template = handle.read()
        return domain_xml(template, self.name, self.disk, os.path.join(self.image, "vmlinuz"),
                          os.path.join(self.image, "initrd.img"), self.console, self.ssh_port,
                          self.forwards, self.kvm, self.memory_mib, self.vcpus,
                          self.host_forwards, self.zfs_disk)

    def define(self):
        """Overlay, key and domain: `virsh define` of the shipped XML, not started."""
        self.libvirtd.start()
        remove_stale_guests()
        # The overlay is larger than the image: the guest's ext4 grows into it
        # at the first boot (resize2fs, online), room for the 1 GB benchmarks.
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
            os.path.join(self.image, "root.img"), self.disk, OVERLAY_SIZE])
        if self.zfs_disk:
            sh(["qemu-img", "create", "-q", "-f", "qcow2", self.zfs_disk, self.zfs_disk_size])
        shutil.copy(os.path.join(self.image, "id_ed25519"), self.key)
        os.chmod(self.key, 0o600)
        path = os.path.join(self.run_dir, "domain.xml")
        with open(path, "w") as handle:
            handle.write(self.xml())
        virsh("define", path, timeout=900)   # a new <emulator>: libvirtd probes it first
        self.defined = True
        log("defined %s (%s, %d MiB, %d vCPUs)" % (self.name, self.accel(), self.memory_mib, self.vcpus))

    def accel(self):
        return ("KVM, %s" if self.kvm else "TCG, software emulation: %s") % self.kvm_why

    def start(self, timeout=None):
        if not self.defined:
            self.define()
        started = time.time()
        virsh("start", self.name)
        self.wait_for_ssh(timeout)
        log("%s answers ssh after %.0f s" % (self.name, time.time() - started))
        self.ssh("resize2fs /dev/vda", quiet=True)

    def wait_for_ssh(self, timeout=None):
        deadline = time.time() + (timeout or (240 if self.kvm else 900))
        while True:
            result = self.ssh("true", check=False, timeout=20, quiet=True)
            if result.returncode == 0:
                return
            if time.time() > deadline:
                raise SystemExit("guest: %s does not answer ssh on 127.0.0.1:%d; its console: %s"
                                 % (self.name, self.ssh_port, self.console))
            time.sleep(2)

    def ssh_argv(self, command):
        return (["ssh", "-i", self.key, "-p", str(self.ssh_port)] + SSH_OPTIONS
                + ["root@127.0.0.1", command])

    def ssh(self, command, check=True, timeout=3600, quiet=False, input=None, capture=False):
        kwargs = {}
        if capture:
            kwargs = {"stdout": subprocess.PIPE, "universal_newlines": True}
        elif quiet:
            kwargs = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        try:
            result = subprocess.run(self.ssh_argv(command), input=input, timeout=timeout,
                                    stdin=None if input is not None else subprocess.DEVNULL, **kwargs)
        except subprocess.TimeoutExpired:
            result = subprocess.CompletedProcess(command, 124, "", "")
        if check and result.returncode != 0:
            raise SystemExit("guest: %r exited %d in the guest" % (command, result.returncode))
        return result

    def put_repo(self, target="/srv/pg_zfs"):
        """The working tree (tracked and untracked files, not ignored) into the guest,
        where the postgres user can run the scripts (not under /root)."""
        files = subprocess.check_output(["git", "-C", REPO, "ls-files", "-co", "--exclude-standard", "-z"])
        names = [name for name in files.decode().split("\0") if name and os.path.exists(os.path.join(REPO, name))]
        archive = subprocess.run(["tar", "-C", REPO, "-c", "--null", "-T", "-", "-f", "-"],
                                 input="\0".join(names).encode(), stdout=subprocess.PIPE, check=True).stdout
        self.ssh("rm -rf %s && mkdir -p %s && tar -C %s -xf -" % (target, target, target), input=archive)

    def shutdown(self, timeout=120):
        virsh("shutdown", self.name)
        deadline = time.time() + timeout
        while "shut off" not in virsh("domstate", self.name).stdout:
            if time.time() > deadline:
                raise SystemExit("guest: %s did not shut down in %d s" % (self.name, timeout))
            time.sleep(1)

    def teardown(self):
        # Also when define or start failed half-way (a define cut by its timeout still lands).
        if self.defined or virsh("domstate", self.name, check=False).returncode == 0:
            virsh("destroy", self.name, check=False)
            virsh("undefine", self.name, check=False)
            self.defined = False
        self.libvirtd.stop()
        if os.path.exists(self.console):
            shutil.copy(self.console, os.path.join(CACHE, "guest-console.log"))
        shutil.rmtree(self.run_dir, ignore_errors=True)


def run_in_guest(argv, memory_mib=6144):
    """Boot a guest, copy the working tree in, run argv there (from the tree,
    as root), print its output here; its exit code."""
    image = build()
    guest = Guest(image, memory_mib=memory_mib)
    try:
        log("booting %s (%s)" % (guest.name, guest.accel()))
        guest.start()
        guest.put_repo()
        version = guest.ssh("modprobe zfs && cat /sys/module/zfs/version", capture=True).stdout.strip()
        log("kernel OpenZFS %s in the guest; running: %s" % (version, " ".join(argv)))
        # Under TCG every step takes several times as long: the tests' window
        # of an unarchived segment (the primary's archive_timeout) grows with it.
        env = "" if guest.kvm else "PG_ZFS_TEST_ARCHIVE_TIMEOUT=240 "
        command = "cd /srv/pg_zfs && %s%s" % (env, " ".join(shlex.quote(arg) for arg in argv))
        return guest.ssh(command, check=False, timeout=6 * 3600).returncode
    finally:
        guest.teardown()


def cmd_shell():
    image = build()
    guest = Guest(image)
    try:
        guest.start()
        guest.put_repo()
        argv = guest.ssh_argv("cd /srv/pg_zfs; exec bash -l")
        return subprocess.run(argv[:1] + ["-t"] + argv[1:]).returncode     # -t: a terminal for the shell
    finally:
        guest.teardown()


def on_signal(number, frame):
    raise SystemExit("guest: stopped by signal %d" % number)


def main(argv=None):
    # SIGTERM and SIGHUP unwind like Ctrl-C: the guest is destroyed and undefined on the way out.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    p_build = sub.add_parser("build", help="build the image unless it is cached")
    p_build.add_argument("--force", action="store_true", help="build even when cached")
    p_test = sub.add_parser("test", help="run pytest in the guest")
    p_test.add_argument("pytest_args", nargs="*")
    p_run = sub.add_parser("run", help="run a command in the guest, from the copied tree")
    p_run.add_argument("argv", nargs="+")
    sub.add_parser("shell", help="boot the guest and log in")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.force)
        return 0
    if args.command == "test":
        return run_in_guest(["python3", "-m", "pytest", "-p", "no:cacheprovider"] + args.pytest_args)
    if args.command == "run":
        return run_in_guest(args.argv)
    if args.command == "shell":
        return cmd_shell()
    parser.print_usage()
    return 2


if __name__ == "__main__":
    sys.exit(main())
