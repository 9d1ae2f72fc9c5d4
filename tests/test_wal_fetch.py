"""pg_wal_fetch.py run as PostgreSQL runs it: as postgres, under Python 3.6, in a data
directory, against the testbed's two sshd archive hosts (and nft for a dead host)."""

import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import time

import pytest

from testbed import BIN, PG_USER, PY36, PY36_PYENV, chown_pg, load_script, python36_for_postgres, sh, wait_for

pytestmark = pytest.mark.timeout(300)

SCRIPT = os.path.join(BIN, "pg_wal_fetch.py")
FETCH = load_script("pg_wal_fetch")
@pytest.fixture(scope="module")
def py36():
    python = python36_for_postgres()
    version = sh([python, "-c", "import sys; print(sys.version.split()[0])"], user=PG_USER).stdout
    # pyenv's 3.6.15 where it is (RHEL 8's Python), else the system's python3.
    if PY36 == PY36_PYENV:
        assert version.strip() == "3.6.15"
    assert version.strip().startswith("3.")
    return python


@pytest.fixture(scope="module")
def segments(tb):
    """Eight consecutive segments archived on both hosts."""
    names = [tb.switch_wal() for _ in range(9)]
    for start in range(len(names) - 7):
        run = names[start:start + 8]
        if all(int(b[8:], 16) == int(a[8:], 16) + 1 for a, b in zip(run, run[1:])):
            return run
    pytest.fail("no run of 8 consecutive segments in %s" % names)


class WalEnv(object):
    """A data directory for the restore_command to run in, private archive trees on the
    two hosts (hard links of the real archive), a spool, a control dir and a PATH shim
    that records every ssh and ping started."""

    counter = [0]

    def __init__(self, tb, segments, python):
        self.counter[0] += 1
        self.python = python
        self.tb = tb
        self.segments = segments
        self.root = os.path.join(tb.run_dir, "wf%d" % self.counter[0])
        self.pgdata = os.path.join(self.root, "pgdata")
        self.pg_wal = os.path.join(self.pgdata, "pg_wal")
        os.makedirs(os.path.join(self.pgdata, "global"))
        os.makedirs(self.pg_wal)
        for name in ("global/pg_control", "PG_VERSION"):
            shutil.copy(os.path.join(tb.primary.pgdata, name), os.path.join(self.pgdata, name))
        self.archive = {}
        for index, host in enumerate(tb.hosts):
            wal_dir = os.path.join(self.root, "arch%d" % (index + 1), "primary")
            os.makedirs(wal_dir)
            for name in segments:
                os.link(os.path.join(host.wal_dir, name), os.path.join(wal_dir, name))
            self.archive[index] = wal_dir
        self.spool_root = os.path.join(self.root, "spool")
        # The spool of this data directory (one per data directory below spool_dir).
        self.spool = FETCH.spool_for(self.spool_root, self.pgdata)
        self.control = os.path.join(self.root, "c")
        self.shim = os.path.join(self.root, "shim")
        self.shim_log = os.path.join(self.root, "commands.log")
        os.makedirs(self.shim)
        for program in ("ssh", "ping"):
            path = os.path.join(self.shim, program)
            with open(path, "w") as out:
                # Each line starts with the session id: a detached prefetcher
                # has its own session, the restore_command call has ours.
                out.write('#!/bin/sh\necho "$(cut -d" " -f6 /proc/$$/stat) %s $*" >> %s\n'
                          'exec /usr/bin/%s "$@"\n' % (program, self.shim_log, program))
            os.chmod(path, 0o755)
        sh(["chown", "-R", PG_USER, self.root])
        self.configure()

    def configure(self, archive=None, **sources):
        overrides = {"archive": {"spool_dir": self.spool_root, "control_dir": self.control,
                                 "control_persist": "5", "prefetch": "0", "timeout": "20"}}
        overrides["archive"].update(archive or {})
        for index, host in enumerate(self.tb.hosts):
            overrides["source " + host.name] = {"path": os.path.dirname(self.archive[index]) + "/*"}
            overrides["source " + host.name].update(sources.get(host.name, {}))
        self.config = self.tb.write_config(os.path.join(self.root, "pg_zfs.conf"), overrides)

    def argv(self, *args):
        return ["runuser", "-u", PG_USER, "--", self.python, SCRIPT, "-c", self.config] + list(args)

    def env(self):
        env = dict(os.environ)
        env["PATH"] = self.shim + ":" + env["PATH"]
        env.pop("PG_ZFS_CONFIG", None)
        return env

    def run(self, *args):
        return subprocess.run(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, cwd=self.pgdata, env=self.env(), timeout=120)

    def popen(self, *args):
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, cwd=self.pgdata, env=self.env())

    def commands(self, this_call_only=False):
        """ssh and ping commands run (this_call_only: not by a detached prefetcher)."""
        if not os.path.exists(self.shim_log):
            return []
        with open(self.shim_log) as log:
            lines = [line.split(" ", 1) for line in log.read().splitlines()]
        return [command for session, command in lines
                if not this_call_only or int(session) == os.getsid(0)]

    def original(self, name):
        with open(os.path.join(self.tb.hosts[0].wal_dir, name), "rb") as segment:
            return segment.read()

    def delivered(self, dest="RECOVERYXLOG"):
        with open(os.path.join(self.pg_wal, dest), "rb") as segment:
            return segment.read()

    def replace(self, host_index, name, content, suffix=""):
        """Put content as NAME+suffix in one host's private archive (never writes through a link)."""
        path = os.path.join(self.archive[host_index], name)
        if os.path.exists(path):
            os.unlink(path)
        if content is not None:
            with open(path + suffix, "wb") as out:
                out.write(content)
            chown_pg(path + suffix)

    def wait_for_prefetcher(self):
        """Until no prefetcher runs (an idle one lingers 2 s before it ends)."""
        lock = os.path.join(self.spool, ".prefetch.lock")
        if os.path.exists(lock):
            with open(lock) as lock_file:
                def unlocked():
                    try:
                        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        return True
                    except OSError:
                        return False
                wait_for(unlocked, 60, "the prefetcher to finish")

    def teardown(self):
        self.wait_for_prefetcher()
        if os.path.isdir(self.control):
            for name in os.listdir(self.control):
                sh(["ssh", "-S", os.path.join(self.control, name), "-O", "exit", "x"],
                   user=PG_USER, check=False, timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def wal(tb, segments, py36):
    env = WalEnv(tb, segments, py36)
    try:
        yield env
    finally:
        env.teardown()


def python_child(runuser_pid, interval=0.1):
    """The pid of the python process runuser started (looked for every interval s)."""
    return wait_for(lambda: first_child(runuser_pid), 10, "the python child of runuser", interval)


def first_child(pid):
    """The first child of pid, or None."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as children:
            pids = children.read().split()
    except OSError:
        return None
    return int(pids[0]) if pids else None


# ---------------------------------------------------------------------------

def test_segment_is_delivered_from_the_first_host(wal):
    name = wal.segments[0]
    proc = wal.run("-v", name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert wal.delivered() == wal.original(name)
    assert "delivered from [source host1]" in proc.stderr
    assert "ERROR" not in proc.stderr and "WARNING" not in proc.stderr     # prefetch = 0 here
    assert os.listdir(wal.pg_wal) == ["RECOVERYXLOG"]
    assert sum(1 for c in wal.commands() if c.startswith("ssh")) == 1   # one ssh command


def test_dead_first_host_is_skipped_and_the_second_serves(wal, tb):
    name = wal.segments[1]
    with tb.hosts[0].dead():
        started = time.monotonic()
        proc = wal.run("-v", name, "pg_wal/RECOVERYXLOG")
        elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "delivered from [source host2]" in proc.stderr
    assert "host1" in proc.stderr and "does not answer" in proc.stderr
    assert wal.delivered() == wal.original(name)
    assert elapsed < 10, "the dead host held the call %.1f s" % elapsed     # a bound, not a benchmark


def asked(wal, program):
    """The hosts program (ssh or ping) was run for, in order, since the shim's log was last removed."""
    hosts = []
    for command in wal.commands():
        words = command.split()
        if words[0] == program:
            hosts.append(words[words.index("--") + 1] if program == "ssh" else words[-1])
    return hosts


def next_call(wal):
    os.unlink(wal.shim_log)
    os.unlink(os.path.join(wal.pg_wal, "RECOVERYXLOG"))


def answered_just_now(wal, source):
    """Renew source's memo that it answered (the last call wrote it): the next call
    then comes within UP_MEMO of it even on a machine so loaded that starting the
    call took seconds. Where the pause is not the subject."""
    path = os.path.join(wal.control, "up-" + source)
    assert os.path.exists(path), "no memo that %s answered" % source
    os.utime(path, None)


def test_a_dead_host_is_asked_last_while_it_stays_dead_and_first_again_once_back(wal, tb):
    wal.configure(host1={"probe": "ping"}, host2={"probe": "ping"})
    first, second, third = wal.segments[1], wal.segments[2], wal.segments[3]
    host1, host2 = tb.hosts[0].address, tb.hosts[1].address
    with tb.hosts[0].dead():
        assert wal.run(first, "pg_wal/RECOVERYXLOG").returncode == 0
        assert asked(wal, "ping") == [host1, host2]
        next_call(wal)
        answered_just_now(wal, "host2")
        proc = wal.run(second, "pg_wal/RECOVERYXLOG")
        assert proc.returncode == 0, proc.stderr
        assert wal.delivered() == wal.original(second)
        # host2 served at once: host1 was not even asked; host2, which
        # answered a moment ago, not probed again (probe_needed).
        assert asked(wal, "ssh") == [host2] and asked(wal, "ping") == []
    # Alive again but still marked: tried after host2, which lacks the file.
    wal.replace(1, third, None)
    next_call(wal)
    proc = wal.run(third, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert wal.delivered() == wal.original(third)
    assert asked(wal, "ssh") == [host2, host1] and asked(wal, "ping") == [host1]
    # It answered: back at the head of the line.
    next_call(wal)
    assert wal.run(first, "pg_wal/RECOVERYXLOG").returncode == 0
    assert asked(wal, "ssh") == [host1]


def probes_seen(host):
    """The connections host's sshd saw end before the ssh protocol began: probes."""
    with open(host.log) as log:
        return log.read().count("kex_exchange_identification: Connection closed by remote host")


def test_a_burst_of_calls_probes_a_host_once_and_again_only_after_a_pause(wal, tb):
    # OpenSSH 9.8+ counts every probe (a connection that ends unauthenticated) as
    # a second of penalty and refuses the client for a while from 15 s on; a
    # recovery without prefetch makes several calls a second. Counted at the
    # host's real sshd.
    host = tb.hosts[0]
    before = probes_seen(host)
    for name in wal.segments[:4]:
        proc = wal.run(name, "pg_wal/RECOVERYXLOG")
        assert proc.returncode == 0, proc.stderr
        assert wal.delivered() == wal.original(name)
        os.unlink(os.path.join(wal.pg_wal, "RECOVERYXLOG"))
    wait_for(lambda: probes_seen(host) > before, 5, "the first call's probe in sshd's log")
    time.sleep(0.5)                        # sshd logs as it goes: let a late line come
    assert probes_seen(host) == before + 1
    assert os.path.exists(os.path.join(wal.control, "up-host1"))
    time.sleep(FETCH.UP_MEMO + 0.2)
    assert wal.run(wal.segments[0], "pg_wal/RECOVERYXLOG").returncode == 0
    wait_for(lambda: probes_seen(host) == before + 2, 5, "the probe after a pause")


def test_a_host_that_dies_right_after_it_answered_is_given_up_and_the_other_serves(wal, tb):
    # Not probed (it answered a moment ago), host1 is asked over the shared
    # connection and never answers: ssh's keepalives or stall_timeout give it
    # up, and host2 delivers the same bytes.
    wal.configure(archive={"stall_timeout": "3"})
    first, second = wal.segments[0], wal.segments[1]
    assert wal.run(first, "pg_wal/RECOVERYXLOG").returncode == 0
    os.unlink(os.path.join(wal.pg_wal, "RECOVERYXLOG"))
    with tb.hosts[0].dead():
        answered_just_now(wal, "host1")
        started = time.monotonic()
        proc = wal.run("-v", second, "pg_wal/RECOVERYXLOG")
        elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "not probed" in proc.stderr and "delivered from [source host2]" in proc.stderr
    assert wal.delivered() == wal.original(second)
    assert elapsed < 15, "the dead host held the call %.1f s" % elapsed     # a bound, not a benchmark
    assert os.path.exists(os.path.join(wal.control, "down-host1"))
    assert not os.path.exists(os.path.join(wal.control, "up-host1"))


EARLY = "run (started before the rest of pg_wal_fetch loaded): ssh"


def test_a_call_without_prefetch_starts_its_ssh_before_loading_the_rest(wal, tb):
    # The first call notes its ssh command (.code/early-fetch); the next starts it
    # before the rest of the script loads, and the rest adopts it: one ssh a call.
    first, second, third = wal.segments[0], wal.segments[1], wal.segments[2]
    proc = wal.run("-v", first, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert EARLY not in proc.stderr
    assert os.path.exists(os.path.join(wal.spool_root, ".code", "early-fetch"))
    for name, verbose in ((second, ["-v"]), (third, [])):
        next_call(wal)
        proc = wal.run(*(verbose + [name, "pg_wal/RECOVERYXLOG"]))
        assert proc.returncode == 0, proc.stderr
        assert wal.delivered() == wal.original(name)
        assert asked(wal, "ssh") == [tb.hosts[0].address]
        assert os.listdir(wal.pg_wal) == ["RECOVERYXLOG"]
        if verbose:
            assert EARLY in proc.stderr and "delivered from [source host1]" in proc.stderr


def test_an_edited_config_never_runs_the_early_ssh_of_the_old_one(wal, tb):
    # The note names the config as it was (path, inode, size, times): once it is
    # edited (here the order of the sources), no ssh starts before the rest has
    # read it, and host1, now second and not needed, is not asked at all.
    assert wal.run(wal.segments[0], "pg_wal/RECOVERYXLOG").returncode == 0
    next_call(wal)
    wal.configure(archive={"sources": "host2 host1"})
    proc = wal.run("-v", wal.segments[1], "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert wal.delivered() == wal.original(wal.segments[1])
    assert EARLY not in proc.stderr and "delivered from [source host2]" in proc.stderr
    assert asked(wal, "ssh") == [tb.hosts[1].address]
    # Noted anew: the next call starts host2's ssh early.
    next_call(wal)
    proc = wal.run("-v", wal.segments[2], "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0 and EARLY in proc.stderr, proc.stderr
    assert asked(wal, "ssh") == [tb.hosts[1].address]


def broken_ssh_first_after_a_call(wal):
    """A call that writes the early note; then the shim's ssh, first on $PATH, is a
    script whose interpreter is missing: it stats as a program but cannot run."""
    assert wal.run(wal.segments[0], "pg_wal/RECOVERYXLOG").returncode == 0
    next_call(wal)
    with open(os.path.join(wal.shim, "ssh"), "w") as out:
        out.write("#!/nonexistent/interpreter\n")


def test_an_early_ssh_tries_each_ssh_on_the_path_as_execvp_does(wal):
    # An ssh first on $PATH that cannot run (a missing interpreter): execvp, and
    # so subprocess, go on to the next one; the early start must too, or host1
    # would count as failed where the rest's own ssh would have run.
    broken_ssh_first_after_a_call(wal)
    proc = wal.run("-v", wal.segments[1], "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert EARLY in proc.stderr and "delivered from [source host1]" in proc.stderr
    assert wal.delivered() == wal.original(wal.segments[1])


def test_an_early_ssh_that_cannot_run_stops_an_archive_recovery_with_a_reason(wal):
    # No ssh on $PATH can run: the early child exits 127 with its line, the rest's
    # own ssh for host2 cannot start either, and in archive recovery that is
    # doubt: exit 200 and why, nothing at DEST.
    broken_ssh_first_after_a_call(wal)
    open(os.path.join(wal.pgdata, "recovery.signal"), "w").close()
    env = dict(wal.env(), PATH=wal.shim)
    argv = wal.argv("-v", wal.segments[1], "pg_wal/RECOVERYXLOG")
    argv[0] = shutil.which(argv[0])                   # runuser, found on the test's own $PATH
    proc = subprocess.run(argv, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, cwd=wal.pgdata, env=env, timeout=120)
    assert proc.returncode == FETCH.STOP_RECOVERY, proc.stderr
    assert EARLY in proc.stderr
    assert "[source host1] %s: failed: ssh %s: cannot run ssh" % (wal.segments[1], wal.tb.hosts[0].address) \
        in proc.stderr
    assert "stopping recovery at %s" % wal.segments[1] in proc.stderr
    assert os.listdir(wal.pg_wal) == []


def test_sigterm_at_any_moment_of_a_call_with_an_early_ssh_leaves_nothing(wal):
    # From the fork of the early ssh to the rest's signal handlers, a SIGTERM ends
    # Python by its default action: ssh, writing to a pipe nobody reads, ends by
    # SIGPIPE. Later, the rest stops it. Swept over the first 80 ms of a call
    # until a SIGTERM lands in that window (an ssh ran, and no "stopped by signal").
    name = wal.segments[3]
    assert wal.run(name, "pg_wal/RECOVERYXLOG").returncode == 0
    os.unlink(os.path.join(wal.pg_wal, "RECOVERYXLOG"))
    in_the_window = []
    for delay in [0.002 * step for step in range(40)] * 3:
        if os.path.exists(wal.shim_log):
            os.unlink(wal.shim_log)
        proc = wal.popen(name, "pg_wal/RECOVERYXLOG")
        python = python_child(proc.pid, 0.0005)
        time.sleep(delay)
        try:
            os.kill(python, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM), (delay, proc.returncode, err)
        if proc.returncode == 0:
            assert wal.delivered() == wal.original(name)
            os.unlink(os.path.join(wal.pg_wal, "RECOVERYXLOG"))
        elif "stopped by signal" not in err and wal.commands():
            in_the_window.append(delay)
        assert os.listdir(wal.pg_wal) == [], delay

        def ssh_gone():
            return not any(name in command for command in running_commands())
        wait_for(ssh_gone, 10, "the ssh of the call stopped at %.3f s" % delay)
        if len(in_the_window) >= 3:
            break
    assert in_the_window, "no SIGTERM landed between the early ssh and the signal handlers"


def running_commands():
    """The command lines of every process, as text."""
    commands = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as cmdline:
                    commands.append(cmdline.read().replace(b"\0", b" ").decode("utf-8", "replace"))
            except OSError:
                pass
    return commands


def test_second_host_serves_what_the_first_lacks(wal):
    name = wal.segments[2]
    wal.replace(0, name, None)
    proc = wal.run("-v", name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert "delivered from [source host2]" in proc.stderr
    assert wal.delivered() == wal.original(name)


def test_segment_found_nowhere_exits_1_and_writes_nothing(wal):
    name = wal.segments[-1][:16] + "%08X" % (int(wal.segments[-1][16:], 16) + 40)
    proc = wal.run(name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 1, proc.stderr
    assert "INFO" in proc.stderr and "not found on any source" in proc.stderr
    assert "ERROR" not in proc.stderr
    assert os.listdir(wal.pg_wal) == []


def test_no_source_reachable_exits_3_and_writes_nothing(wal, tb):
    with tb.hosts[0].dead(), tb.hosts[1].dead():
        proc = wal.run(wal.segments[0], "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 3, proc.stderr
    assert os.listdir(wal.pg_wal) == []


def test_refused_ssh_connection_exits_3_not_255(wal):
    wal.configure(host1={"probe": "none", "port": "1"}, host2={"probe": "none", "port": "1"})
    proc = wal.run(wal.segments[0], "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 3, proc.stderr
    assert os.listdir(wal.pg_wal) == []


@pytest.mark.parametrize("name", ["../x", ";rm -rf ~", "", "0000000100000000000000011",
                                  "$(touch /tmp/pwned)", "00000001000000000000000a"])
def test_invalid_names_exit_2_and_run_no_command(wal, name):
    proc = wal.run(name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 2, proc.stderr
    assert "refusing" in proc.stderr
    assert wal.commands() == []
    assert os.listdir(wal.pg_wal) == []


def test_bad_config_exits_2(wal):
    wal.configure(host1={"probe": "carrier-pigeon"})
    proc = wal.run(wal.segments[0], "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 2 and "probe" in proc.stderr
    assert wal.commands() == []


def test_corrupt_copy_on_the_first_host_is_skipped_for_the_good_one_on_the_second(wal):
    name = wal.segments[3]
    good = wal.original(name)
    wal.replace(0, name, good[:1000] + b"\xff" * 8 + good[1008:])     # inside the first page
    wal.replace(0, name, good[:2] + b"\x00\x00" + good[4:])           # xlp_info without long header
    proc = wal.run("-v", name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" in proc.stderr and "not valid" in proc.stderr
    assert "delivered from [source host2]" in proc.stderr
    assert wal.delivered() == good


def test_copy_of_another_cluster_is_never_delivered(wal):
    name = wal.segments[3]
    foreign = bytearray(wal.original(name))
    foreign[24:32] = struct.pack("=Q", 42)
    wal.replace(0, name, bytes(foreign))
    wal.replace(1, name, bytes(foreign))
    proc = wal.run(name, "pg_wal/RECOVERYXLOG")
    # Copies exist, none valid: not "absent" (1), which would end an archive recovery.
    assert proc.returncode == 3, proc.stderr
    assert "system identifier 42" in proc.stderr
    assert os.listdir(wal.pg_wal) == []


@pytest.mark.parametrize("suffix, program", [(".gz", "gzip"), (".xz", "xz"), (".bz2", "bzip2")])
def test_compressed_archive_is_delivered_decompressed(wal, suffix, program):
    name = wal.segments[4]
    packed = subprocess.run([program, "-c", os.path.join(wal.archive[0], name)],
                            stdout=subprocess.PIPE, check=True).stdout
    wal.replace(0, name, packed, suffix)
    proc = wal.run("-v", name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert "delivered from [source host1]" in proc.stderr
    assert wal.delivered() == wal.original(name)


def test_history_file_is_delivered(wal):
    history = b"1\t0/5000000\tno recovery target specified\n"
    wal.replace(1, "00000002.history", history)
    proc = wal.run("00000002.history", "pg_wal/RECOVERYHISTORY")
    assert proc.returncode == 0, proc.stderr
    assert "ERROR" not in proc.stderr and "WARNING" not in proc.stderr
    assert wal.delivered("RECOVERYHISTORY") == history


def signalled_mid_transfer(wal, signum):
    """Fetch a segment whose stream stalls after 4 MB (certainly mid-transfer), send
    signum to the fetching Python, and return (process, its stderr)."""
    marker = os.path.join(wal.root, "stalled")
    with open(os.path.join(wal.shim, "ssh"), "w") as out:
        out.write('#!/bin/sh\n/usr/bin/ssh "$@" | { head -c 4000000; touch %s; sleep 5; }\n' % marker)
    proc = wal.popen(wal.segments[5], "pg_wal/RECOVERYXLOG")
    try:
        wait_for(lambda: os.path.exists(marker), 30, "the stalled transfer")
        time.sleep(0.3)
        os.kill(python_child(proc.pid), signum)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, err


def test_kill_9_mid_transfer_leaves_nothing_in_the_wal_directory(wal):
    signalled_mid_transfer(wal, signal.SIGKILL)
    assert os.listdir(wal.pg_wal) == []


def test_sigterm_mid_transfer_cleans_up_and_ends_by_sigterm(wal):
    # A file system without O_TMPFILE would use a named temporary file: both must vanish.
    proc, err = signalled_mid_transfer(wal, signal.SIGTERM)
    assert "stopped by signal 15" in err
    assert proc.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM)   # runuser passes the signal on
    assert os.listdir(wal.pg_wal) == []


def test_prefetch_fills_the_spool_and_the_next_call_uses_no_ssh(wal):
    wal.configure(archive={"prefetch": "4"})
    first, window = wal.segments[0], wal.segments[1:5]
    proc = wal.run(first, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr

    def spooled():
        return all(os.path.exists(os.path.join(wal.spool, name)) for name in window)
    wait_for(spooled, 60, "the prefetcher to spool %s" % window)
    wal.wait_for_prefetcher()
    segments_in_spool = [n for n in os.listdir(wal.spool) if not n.startswith(".")]
    assert len(segments_in_spool) <= 4 + 2
    os.unlink(wal.shim_log)
    os.unlink(os.path.join(wal.pg_wal, "RECOVERYXLOG"))
    proc = wal.run(window[0], "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert wal.delivered() == wal.original(window[0])
    # No ssh, no ping: straight from the spool (the prefetcher may refill meanwhile).
    assert wal.commands(this_call_only=True) == []
    assert not os.path.exists(os.path.join(wal.spool, window[0]))


def test_at_the_end_of_the_archive_a_call_waits_for_no_prefetcher_that_found_nothing(wal):
    # The prefetcher asks both hosts for the segments after the last one archived,
    # in vain, and notes so; a call for the next one then asks the hosts itself at
    # once, rather than waiting (up to 3 s) for a prefetcher that lingers.
    wal.configure(archive={"prefetch": "4"})
    last = wal.segments[-1]
    after = FETCH.following_segments(last, 16 * 1024 * 1024, 1)[0]
    proc = wal.run(wal.segments[-2], "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: after in FETCH.read_missed(wal.spool), 60, "the prefetcher to note %s missed" % after)
    assert os.path.exists(os.path.join(wal.spool, last))
    wal.wait_for_prefetcher()
    os.unlink(os.path.join(wal.pg_wal, "RECOVERYXLOG"))
    # As if that prefetcher still ran: the call could only wait on its lock.
    with open(os.path.join(wal.spool, ".prefetch.lock")) as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        proc = wal.run("-v", after, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 1, proc.stderr                  # every host said: absent
    assert "%s: the prefetcher's last pass found it on no source" % after in proc.stderr
    assert "not found on any source" in proc.stderr
    assert os.listdir(wal.pg_wal) == []
    # The last one is still delivered from the spool, whole.
    proc = wal.run(last, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert wal.delivered() == wal.original(last)


def test_invalid_spool_file_is_removed_and_the_segment_fetched_again(wal):
    wal.configure(archive={"prefetch": "2"})
    name = wal.segments[6]
    os.makedirs(wal.spool)
    with open(os.path.join(wal.spool, FETCH.SPOOL_BOOT), "w") as mark:
        mark.write(FETCH.this_boot() + "\n")        # a spool of this boot: its files are read
    with open(os.path.join(wal.spool, name), "wb") as torn:
        torn.write(wal.original(name)[:SEGMENT_HALF])
    chown_pg(wal.spool)
    for entry in os.listdir(wal.spool):
        chown_pg(os.path.join(wal.spool, entry))
    proc = wal.run(name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert "spooled %s is not valid" % name in proc.stderr
    assert wal.delivered() == wal.original(name)


SEGMENT_HALF = 8 * 1024 * 1024


def test_a_spool_of_an_earlier_boot_is_never_delivered_from(wal):
    # The prefetcher spools without fsync; a crash may leave a segment torn (its
    # first page whole, whatever the disk held after it: what a delivery from the
    # spool checks looks right). After the reboot nothing in that spool
    # is delivered: the segment comes from a host, whole, and the next
    # prefetcher empties the spool before it claims it for this boot.
    wal.configure(archive={"prefetch": "2"})
    first, torn_one, after = wal.segments[0], wal.segments[1], wal.segments[2]
    proc = wal.run(first, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: os.path.exists(os.path.join(wal.spool, torn_one)), 60, "the prefetcher to spool %s" % torn_one)
    wal.wait_for_prefetcher()
    mark = os.path.join(wal.spool, FETCH.SPOOL_BOOT)
    with open(mark) as mark_file:
        assert mark_file.read().strip() == FETCH.this_boot()
    os.unlink(os.path.join(wal.pg_wal, "RECOVERYXLOG"))
    # "The crash": the spooled copy torn, the mark of the boot before.
    torn = wal.original(torn_one)[:8192] + b"\xa5" * (2 * SEGMENT_HALF - 8192)
    assert torn != wal.original(torn_one)
    with open(os.path.join(wal.spool, torn_one), "wb") as spooled:
        spooled.write(torn)
    with open(mark, "w") as mark_file:
        mark_file.write("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n")
    proc = wal.run(torn_one, "pg_wal/RECOVERYXLOG")          # as PostgreSQL asks: the quick path's arguments
    assert proc.returncode == 0, proc.stderr
    assert wal.delivered() == wal.original(torn_one)
    # The prefetcher that call started made the spool this boot's, with whole copies.
    wait_for(lambda: os.path.exists(os.path.join(wal.spool, after)), 60, "the prefetcher to spool %s" % after)
    wal.wait_for_prefetcher()
    with open(mark) as mark_file:
        assert mark_file.read().strip() == FETCH.this_boot()
    for name in os.listdir(wal.spool):
        if FETCH.wal_kind(name):
            with open(os.path.join(wal.spool, name), "rb") as spooled:
                assert spooled.read() == wal.original(name), name


def test_check_reports_each_source_and_fails_only_when_none_works(wal, tb):
    with tb.hosts[0].dead():
        proc = wal.run("--check")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("host1") and "unreachable" in lines[0]
    assert lines[1].startswith("host2") and "reachable" in lines[1] and wal.segments[-1] in lines[1]
    assert "round trip" in lines[1]
    with tb.hosts[0].dead():
        as_json = wal.run("--check", "--json")          # the same facts, for a machine
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["ok"] is True and [(one["name"], one["state"]) for one in report["sources"]] == [
        ("host1", "unreachable"), ("host2", "working")]
    assert report["sources"][1]["newest_wal"] == wal.segments[-1] and report["sources"][1]["directories"] == 1
    assert report["segments"] == lines[-2] and report["spool"] == lines[-1]
    with tb.hosts[0].dead(), tb.hosts[1].dead():
        proc = wal.run("--check")
        dead = wal.run("--check", "--json")
    assert proc.returncode == 3
    assert dead.returncode == 3 and json.loads(dead.stdout)["ok"] is False


# ---------------------------------------------------------------------------
# A real recovery
# ---------------------------------------------------------------------------

@pytest.mark.timeout(600)
@pytest.mark.parametrize("prefetch", ["8", "0"])
def test_real_recovery_replays_30_segments_with_host1_dead_for_a_while(tb, wal, prefetch):
    # prefetch 0: every call after the first starts its ssh before the rest loads
    # (start_early_fetch), to host1 until it is found dead, and again once back.
    primary = tb.primary
    primary.psql("CREATE TABLE IF NOT EXISTS wf_recovery (id int, note text)")
    backup = os.path.join(wal.root, "restored")
    ts_dir = os.path.join(wal.root, "restored_ts1")
    sh([primary.tool("pg_basebackup"), "-D", backup, "-X", "none", "-c", "fast",
        "-T", "%s=%s" % (primary.ts1_dir, ts_dir),
        "-h", primary.socket_dir, "-p", str(primary.port), "-U", PG_USER], user=PG_USER, timeout=300)
    for batch in range(32):
        primary.psql("INSERT INTO wf_recovery SELECT g, md5(g::text) FROM generate_series(%d, %d) g"
                     % (batch * 1000, batch * 1000 + 999))
        last = tb.switch_wal()
    expected = primary.psql("SELECT count(*), sum(id), md5(string_agg(note, ',' ORDER BY id)) "
                            "FROM wf_recovery")

    restored = tb.new_cluster("wf_restored%s" % prefetch, pgdata=backup)
    wal.configure(archive={"prefetch": prefetch},
                  host1={"path": tb.hosts[0].glob}, host2={"path": tb.hosts[1].glob})
    verbose = "-v " if prefetch == "0" else ""      # the calls' debug lines, in the server's log
    restored.configure(port=restored.port, unix_socket_directories="'%s'" % restored.socket_dir,
                       archive_mode="off", hot_standby="off",
                       restore_command="'%s %s -c %s %s%%f %%p'" % (wal.python, SCRIPT, wal.config, verbose),
                       recovery_target_timeline="'current'")
    open(os.path.join(backup, "recovery.signal"), "w").close()
    chown_pg(os.path.join(backup, "recovery.signal"))
    # -W: pg_ctl -w would wait for most of the recovery (no hot standby).
    sh([restored.tool("pg_ctl"), "start", "-W", "-D", backup, "-l", restored.logfile], user=PG_USER)
    try:
        def restored_count():
            if not os.path.exists(restored.logfile):
                return 0
            with open(restored.logfile) as log_file:
                return log_file.read().count("restored log file")
        # Without prefetch, from the third call on the early ssh goes to host1.
        before = 10 if prefetch != "0" else 3
        wait_for(lambda: restored_count() >= before, 240, "%d segments restored" % before, 0.02)
        with tb.hosts[0].dead():
            assert restored_count() < 22, "recovery was nearly over before host1 died"
            wait_for(lambda: restored_count() >= 22, 240, "22 segments restored with host1 dead")
        # Back before the end: at the end of the archive "absent" must come from
        # every source, or the recovery would stop rather than open (see the faults tests).
        wait_for(lambda: restored.is_running() and restored.psql(
            "SELECT NOT pg_is_in_recovery()", check=False).stdout.strip() == "t",
            300, "the end of recovery", interval=1)
        with open(restored.logfile) as log_file:
            log_text = log_file.read()
        assert 'restored log file "%s" from archive' % last in log_text
        assert log_text.count("restored log file") >= 30
        assert "could not restore file" not in log_text
        assert restored.psql("SELECT count(*), sum(id), md5(string_agg(note, ',' ORDER BY id)) "
                             "FROM wf_recovery") == expected
        if prefetch == "0":
            assert "run (started before the rest of pg_wal_fetch loaded): ssh" in log_text
            assert "delivered from [source host2]" in log_text
            return
        # It ended through the prefetcher's note: its last pass found the segments
        # after the archive's last on no host, and the call for the next one did
        # not wait for it (test_at_the_end_of_the_archive_...).
        spool = FETCH.spool_for(wal.spool_root, backup)
        missed = wait_for(lambda: FETCH.read_missed(spool), 60, "the prefetcher's note of the missed")
        assert all(name > last for name in missed), missed
    finally:
        restored.stop("immediate")
