"""Logging where admins look: the scripts that run unattended (cron, rc.local,
systemd) send their lines to syslog too, tagged with the script's name.

The test binds /dev/log itself (a syslog daemon's socket) where no daemon
holds it, reads what arrives, and removes it."""

import os
import socket

import pytest

from testbed import run_script

DEV_LOG = "/dev/log"


@pytest.fixture
def syslog():
    if os.path.lexists(DEV_LOG):
        pytest.skip("a syslog daemon holds /dev/log here: its messages go to its files, not to this test")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(DEV_LOG)
    os.chmod(DEV_LOG, 0o666)
    listener.settimeout(0.2)
    try:
        yield listener
    finally:
        listener.close()
        os.unlink(DEV_LOG)


def received(listener):
    """What arrived (other programs' lines too: /dev/log is the machine's)."""
    messages = []
    while True:
        try:
            messages.append(listener.recv(65536).decode("utf-8", "replace"))
        except socket.timeout:
            return messages


@pytest.mark.parametrize("script, args, tag", [
    ("pg_zfs_snap", ["snapshot"], "pg_zfs_snap["),
    ("pg_zfs_restore", ["drill"], "pg_zfs_restore["),
    ("setup_guest", ["--start"], "setup_guest["),
])
def test_an_unattended_run_logs_its_error_to_syslog_with_the_scripts_name(syslog, tmp_path, script, args, tag):
    missing = str(tmp_path / "no.conf")
    proc = run_script(script, "-c", missing, *args)
    assert proc.returncode == 2, proc.stderr
    messages = received(syslog)
    assert any(tag in message and missing in message for message in messages), (messages, proc.stderr)


def test_an_interactive_list_stays_on_stderr(syslog, tmp_path):
    proc = run_script("pg_zfs_restore", "-c", str(tmp_path / "no.conf"), "list")
    assert proc.returncode == 2
    assert [message for message in received(syslog) if "pg_zfs_restore[" in message] == []


def fill(path):
    """Send to path until its queue takes no more (a syslog daemon that stalled)."""
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)
    sent = 0
    try:
        while True:
            sender.sendto(b"<14>filler: a message nobody reads", path)
            sent += 1
    except BlockingIOError:
        return sent
    finally:
        sender.close()


@pytest.mark.parametrize("script, args", [("pg_zfs_snap", ["snapshot"]), ("pg_zfs_restore", ["drill"]),
                                          ("setup_guest", ["--start"])])
def test_a_stalled_syslog_neither_hangs_the_script_nor_changes_its_outcome(syslog, tmp_path, script, args):
    # journald or rsyslog stalled: /dev/log's queue is full. A blocking send would
    # hang the script (a restore_command: recovery) until the daemon reads again.
    assert fill(DEV_LOG) > 0
    missing = str(tmp_path / "no.conf")
    proc = run_script(script, "-c", missing, *args, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert missing in proc.stderr and "Traceback" not in proc.stderr and "Logging error" not in proc.stderr


def test_a_dev_log_nobody_reads_any_more_changes_nothing(syslog, tmp_path):
    # The daemon is gone and left its socket: connecting is refused.
    syslog.close()
    missing = str(tmp_path / "no.conf")
    proc = run_script("pg_zfs_snap", "-c", missing, "snapshot", timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert missing in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
