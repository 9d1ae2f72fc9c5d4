"""SIGTERM to pg_zfs_restore.py at every moment of a restore and a drill (a
delay swept from the start to the end, and while pg_wal_fetch.py --check
lists a stalled archive): each run either finishes or ends in one line, exit
1 (drill: CRITICAL, 2), with no clone, server, work directory, mountpoint
directory or port claim left behind. The sweep takes about two minutes.
"""

import glob
import os
import signal
import subprocess
import time
import types

import pytest

from testbed import BIN, PY36, wait_for
from test_restore import Restored, our_clones, restore_script, story  # noqa: F401
from test_restore_faults import descendants, nothing_left, stalled


def assert_the_copy_is_whole(story, out):
    """A restore that finished although a signal came (too late to stop it): its
    copy, promoted at the end of the set's backup, holds a non-empty prefix of
    the primary's rows, row for row."""
    rows = Restored(types.SimpleNamespace(stdout=out), story.tb).rows()
    assert rows and rows == story.rows[:len(rows)], (out, rows[-3:], story.rows[:len(rows)][-3:])


@pytest.mark.parametrize("command", ["restore", pytest.param("drill", marks=pytest.mark.host_only("the drill's steps are the restore's; the restore runs in the guest"))])
def test_sigterm_at_any_step_leaves_nothing(story, command):
    args = ["restore", "--immediate", "--set", story.sets[0], "--action", "promote"] \
        if command == "restore" else ["drill"]
    outcomes = []
    for delay in [0.1 * n for n in range(1, 30)]:
        proc = subprocess.Popen([PY36, os.path.join(BIN, "pg_zfs_restore.py"), "-c", story.config] + args,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
        outcomes.append((delay, proc.returncode))
        assert "Traceback" not in err, err
        if proc.returncode == -signal.SIGTERM:
            # before the handler was set: nothing was made yet (checked below), nothing said
            assert out == "", (delay, out, err)     # after the report (the tear-down): the code is 0
        elif proc.returncode == 0:
            if command == "restore":
                assert_the_copy_is_whole(story, out)
                assert restore_script(story.config, "cleanup", "--all").returncode == 0
            if delay > 2:
                break
        elif command == "restore":
            assert proc.returncode == 1, (delay, out, err)
            assert err.strip().splitlines()[-1].startswith("pg_zfs_restore: ERROR: "), (delay, err)
        else:
            assert proc.returncode == 2 and out.startswith("CRITICAL: "), (delay, out, err)
        assert nothing_left(story) == [], (delay, out, err)
        assert our_clones(story.tb) == [], (delay, out, err)
        assert glob.glob(os.path.join(story.tb.run_dir, "restore_wal", ".port-*")) == [], (delay, out, err)
    print(outcomes)


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as text:
            return text.read().split(b"\0")
    except OSError:
        return []


@pytest.mark.host_only("a signal before anything is made")
@pytest.mark.parametrize("command", ["restore", "drill"])
def test_sigterm_while_the_archive_is_listed_ends_the_command_before_anything_is_made(story, command):
    """pg_wal_fetch.py --check (is each set's WAL archived?) answering slowly: a SIGTERM
    then was taken for "no source could be listed" and the restore went on."""
    args = ["restore", "--latest"] if command == "restore" else ["drill"]
    with stalled(story.tb.hosts):       # --check waits on both archives
        proc = subprocess.Popen([PY36, os.path.join(BIN, "pg_zfs_restore.py"), "-c", story.config] + args,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        try:
            wait_for(lambda: proc.poll() is not None or any(b"--check" in cmdline(pid)
                                                            for pid in descendants(proc.pid)),
                     60, "pg_wal_fetch.py --check to run")
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                out, err = proc.communicate()
    if command == "restore":
        assert proc.returncode == 1, out + err
        assert err.strip().splitlines()[-1] == "pg_zfs_restore: ERROR: stopped by SIGTERM", err
    else:
        assert proc.returncode == 2 and out.startswith("CRITICAL: ") and "stopped by SIGTERM" in out, out + err
    assert "cloned" not in err, err
    assert nothing_left(story) == [] and our_clones(story.tb) == []


@pytest.mark.parametrize("command", ["restore", pytest.param("drill", marks=pytest.mark.host_only("the drill's steps are the restore's; the restore runs in the guest"))])
def test_ctrl_c_that_kills_the_zfs_clone_too_ends_as_stopped_by_sigint(story, command):
    """Ctrl-C at a terminal reaches the whole process group: the zfs clone the
    command waits on dies of the same SIGINT. The command must say it was stopped,
    not report "zfs clone failed: exit code -2" (a drill said so, CRITICAL, under
    kernel OpenZFS where a clone takes a second)."""
    args = ["restore", "--latest"] if command == "restore" else ["drill"]
    for attempt in range(5):        # the clone must be caught running: a quick one may slip by
        proc = subprocess.Popen([PY36, os.path.join(BIN, "pg_zfs_restore.py"), "-c", story.config] + args,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                start_new_session=True)
        caught = False
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline and not caught:
                caught = any(os.path.basename(line[0]) == b"zfs" and b"clone" in line[1:2]
                             for line in (cmdline(pid) for pid in descendants(proc.pid)) if line and line[0])
            if caught:
                os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                out, err = proc.communicate()
        assert "Traceback" not in err, err
        if caught:
            break
        assert proc.returncode == 0, out + err
        if command == "restore":
            assert restore_script(story.config, "cleanup", "--all").returncode == 0
    else:
        pytest.skip("zfs clone was never seen running: it is too quick here to interrupt")
    if command == "restore":
        assert proc.returncode == 1, out + err
        assert err.strip().splitlines()[-1] == "pg_zfs_restore: ERROR: stopped by SIGINT", err
    else:
        assert proc.returncode == 2, out + err
        assert out.strip().splitlines() == [out.strip()] and "stopped by SIGINT" in out, out
        assert "exit code" not in out, out
    assert nothing_left(story) == [] and our_clones(story.tb) == []


@pytest.mark.host_only("a signal after the outcome is settled: pg_zfs_restore's own handling, not ZFS's")
@pytest.mark.parametrize("command", ["restore", "drill"])
def test_a_signal_once_the_command_reported_changes_nothing(story, command):
    """SIGTERM the moment the report starts: the restore is done (its copy stays up,
    exit 0), the drill is done (OK, its record written). Under load a sweep's
    signal landed there: the restore said "stopped by SIGTERM" with its copy left
    running, or ended in a traceback while Python exited."""
    args = ["restore", "--immediate", "--set", story.sets[0], "--action", "promote"] \
        if command == "restore" else ["drill"]
    first = "restored set " if command == "restore" else "OK: drill of set "
    record = os.path.join(story.tb.run_dir, "restore_wal", "last-drill.json")
    for attempt in range(3):
        if os.path.exists(record):
            os.unlink(record)
        proc = subprocess.Popen([PY36, os.path.join(BIN, "pg_zfs_restore.py"), "-c", story.config] + args,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            line = proc.stdout.readline()
            assert line.startswith(first), line + proc.communicate(timeout=240)[1]
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert "Traceback" not in err and "ERROR" not in err, err
        assert proc.returncode == 0, (attempt, line + out, err)
        if command == "restore":
            clones = our_clones(story.tb)
            assert clones and all(story.sets[0] in name for name in clones), clones
            servers = glob.glob(os.path.join(story.tb.run_dir, "restore_mnt", "*", "pgdata", "postmaster.pid"))
            assert len(servers) == 1, servers
            assert restore_script(story.config, "cleanup", "--all").returncode == 0
        else:
            with open(record) as drilled:
                assert '"OK: drill of set ' in drilled.read()
        assert nothing_left(story) == [] and our_clones(story.tb) == []
