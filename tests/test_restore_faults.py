"""pg_zfs_restore.py when something goes wrong, run as a process against the
testbed's pool and archives (the story of test_restore.py): a signal in the
middle of a restore or drill, an OS error, a time or argument out of range, a
clone zfs made but could not mount. Every case ends in one line with a
documented exit code, and leaves no clone, no server, no work directory and
no empty mountpoint directory behind.
"""

import contextlib
import glob
import os
import signal
import subprocess

import pytest

from testbed import BIN, PY36, sh, wait_for
from test_restore import our_clones, restore_script, story  # noqa: F401  (story is a fixture)


def descendants(pid):
    """Every process below pid (from /proc), children first found first."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open("/proc/%s/stat" % entry) as stat:
                    parents.setdefault(int(stat.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


@contextlib.contextmanager
def stalled(hosts):
    """Every sshd process of these archive hosts stopped (SIGSTOP): a new connection gets no
    banner, a transfer no byte; continued (SIGCONT) afterwards."""
    pids = []
    for host in hosts:
        pids += [host.pid] + descendants(host.pid)
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):     # a session that just ended
                os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def nothing_left(story):
    """Clones, work directories, mountpoint directories and servers of restores: none."""
    mount_root = os.path.join(story.tb.run_dir, "restore_mnt")
    servers = [p for p in glob.glob(os.path.join(mount_root, "*", "pgdata", "postmaster.pid"))]
    return story.leftovers() + glob.glob(os.path.join(mount_root, "*")) + servers


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if ": ERROR: " in line]


# -- signals ----------------------------------------------------------------------

@pytest.mark.parametrize("command,signum", [
    ("restore", signal.SIGTERM),
    pytest.param("restore", signal.SIGINT, marks=pytest.mark.host_only("SIGINT's path is SIGTERM's; SIGTERM runs in the guest")),
    pytest.param("drill", signal.SIGTERM, marks=pytest.mark.host_only("the drill's steps are the restore's; the restore runs in the guest"))])
def test_a_signal_while_the_copy_recovers_stops_it_and_removes_the_clones(story, command, signum):
    tb = story.tb
    args = ["restore", "--latest"] if command == "restore" else ["drill"]
    pgdata = os.path.join(tb.run_dir, "restore_mnt", "data02_%s_%s" % (command, story.sets[1]), "pgdata")
    with stalled(tb.hosts):     # recovery waits for its first segment: the copy runs, not done
        proc = subprocess.Popen([PY36, os.path.join(BIN, "pg_zfs_restore.py"), "-c", story.config] + args,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        try:
            wait_for(lambda: proc.poll() is not None or os.path.exists(os.path.join(pgdata, "postmaster.pid")),
                     120, "the copy's server to start")
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    name = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}[signum]
    assert "Traceback" not in err
    if command == "restore":
        assert proc.returncode == 1, out + err
        assert err.strip().splitlines()[-1] == "pg_zfs_restore: ERROR: stopped by %s" % name, err
    else:
        assert proc.returncode == 2, out + err
        assert len(out.strip().splitlines()) == 1 and out.startswith(
            "CRITICAL: drill of set %s failed: " % story.sets[1]) and "stopped by %s" % name in out, out
    assert nothing_left(story) == []
    assert our_clones(tb) == []


# -- OS errors, times and arguments ---------------------------------------------

@pytest.mark.host_only("refused before anything is made")
def test_to_a_file_is_one_line_exit_1_and_leaves_nothing(story):
    a_file = os.path.join(story.tb.run_dir, "not_a_directory")
    open(a_file, "w").close()
    try:
        proc = restore_script(story.config, "restore", "--immediate", "--to", a_file)
    finally:
        os.unlink(a_file)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert error_lines(proc)[-1].endswith(a_file), proc.stderr
    assert nothing_left(story) == [] and our_clones(story.tb) == []


@pytest.mark.host_only("refused before anything is made")
def test_a_wal_root_that_cannot_be_made_is_one_line_exit_1_and_leaves_nothing(story):
    tb = story.tb
    config = tb.write_config(os.path.join(tb.run_dir, "bad_wal_root.conf"), {"restore": {
        "mount_root": os.path.join(tb.run_dir, "restore_mnt"),
        "wal_root": os.path.join(story.config, "wal")}})      # below a file
    proc = restore_script(config, "restore", "--immediate")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert error_lines(proc)[-1].startswith("pg_zfs_restore: ERROR: Not a directory: "), proc.stderr
    assert nothing_left(story) == [] and our_clones(tb) == []


def test_a_drill_that_runs_out_of_space_is_critical_and_leaves_nothing(story):
    tb = story.tb
    full = os.path.join(tb.run_dir, "full_wal_root")
    os.mkdir(full)
    sh(["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=3", "tmpfs", full])
    try:
        config = tb.write_config(os.path.join(tb.run_dir, "full.conf"), {"restore": {
            "mount_root": os.path.join(tb.run_dir, "restore_mnt"), "wal_root": full}})
        proc = restore_script(config, "drill")
        left = os.listdir(full)
    finally:
        sh(["umount", full])
        os.rmdir(full)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.startswith("CRITICAL: drill of set %s failed: prepare: No space left on device"
                                  % story.sets[1]), proc.stdout
    assert "Traceback" not in proc.stderr
    # the drill's result for metrics, if the full file system took it, and nothing else
    assert left in ([], ["last-drill.json"]) and nothing_left(story) == [] and our_clones(tb) == []


@pytest.mark.parametrize("args,message", [
    (["--target-time", "9999-12-31T23:59:59-15:00"], "is not a valid time"),
    (["--immediate", "--port", "65536"], "argument --port"),
    (["--immediate", "--port", "-1"], "argument --port"),
    (["--immediate", "--port", "0"], "argument --port"),
    (["--immediate", "--set", ""], "argument --set"),
    (["--immediate", "--timeline", ""], "argument --timeline"),
    (["--target-xid", str(2 ** 64)], "is not a transaction id"),
])
@pytest.mark.host_only("refused before anything is made")
def test_an_out_of_range_target_or_argument_is_refused_before_anything_is_made(story, args, message):
    proc = restore_script(story.config, "restore", "--dry-run", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert "dry-run" not in proc.stdout
    assert nothing_left(story) == [] and our_clones(story.tb) == []


# -- a clone zfs made but could not mount ------------------------------------------

def test_a_clone_zfs_made_but_could_not_mount_is_destroyed(story):
    tb = story.tb
    mount_root = os.path.join(tb.run_dir, "restore_mnt")
    os.makedirs(mount_root, exist_ok=True)
    in_the_way = os.path.join(mount_root, "data03_restore_%s" % story.sets[1])
    with open(in_the_way, "w") as out:
        out.write("a file where the clone's mountpoint goes\n")
    try:
        proc = restore_script(story.config, "restore", "--immediate")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "zfs clone" in error_lines(proc)[-1], proc.stderr
        assert our_clones(tb) == []
        assert [p for p in nothing_left(story) if p != in_the_way] == []
    finally:
        os.unlink(in_the_way)
    proc = restore_script(story.config, "restore", "--immediate", "--no-start")     # nothing blocks it
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        assert restore_script(story.config, "cleanup", "--all").returncode == 0
    assert nothing_left(story) == []


# -- two restores started together --------------------------------------------------

@pytest.mark.host_only("ports of two restores at once")
def test_two_restores_started_together_run_on_different_ports(story):
    procs = [subprocess.Popen([PY36, os.path.join(BIN, "pg_zfs_restore.py"), "-c", story.config, "restore",
                               "--immediate", "--set", name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
             for name in story.sets]
    try:
        results = [proc.communicate(timeout=300) for proc in procs]
        for proc, (out, err) in zip(procs, results):
            assert proc.returncode == 0, out + err
        ports = [int(out.split("connect: psql -h ")[1].split(" -p ")[1].split()[0]) for out, _ in results]
        assert len(set(ports)) == 2
        assert not glob.glob(os.path.join(story.tb.run_dir, "restore_wal", ".port-*"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert restore_script(story.config, "cleanup", "--all").returncode == 0
    assert nothing_left(story) == []
