"""pg_zfs_restore.py drill as cron and monitoring run it, against the real testbed
(the story of test_restore.py): every drill leaves its result in
WAL_ROOT/last-drill.json for pg_zfs_snap.py metrics (passed, failed, stopped by a
signal), and a drill that passes, not at a terminal, prints its Nagios line and
nothing on stderr, so cron mails nothing but that line.
"""

import json
import logging
import os
import signal
import stat
import subprocess
import threading
import time

import pytest

from testbed import BIN, PY36, load_script, on_a_terminal, run_script, wait_for
from test_restore import our_clones, restore_script, story  # noqa: F401  (story is a fixture)
from test_restore_edges import server_of
from test_restore_faults import nothing_left, stalled
from test_syslog import received, syslog  # noqa: F401  (syslog is a fixture)

restore = load_script("pg_zfs_restore")

STATE_KEYS = {"exit_code", "status", "set", "started", "finished", "seconds", "message"}


def state_path(story):
    return os.path.join(story.tb.run_dir, "restore_wal", "last-drill.json")


@pytest.fixture
def no_state(story):
    """No last-drill.json before the test, none after it (story.leftovers() counts it)."""
    path = state_path(story)
    if os.path.exists(path):
        os.unlink(path)
    yield path
    if os.path.exists(path):
        os.unlink(path)


def read_state(path):
    with open(path) as source:
        state = json.load(source)
    assert set(state) == STATE_KEYS, state
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    return state


def assert_times_of(state, before, after):
    assert before <= state["started"] <= state["finished"] <= after, (before, state, after)
    assert 0 < state["seconds"] <= after - before, state


# -- the format, decided without a database ---------------------------------------

def test_the_state_is_one_json_object_with_the_nagios_status_of_the_exit_code():
    text = restore.drill_state_text(2, None, 100.5, 130.25, 29.75, "CRITICAL: drill of set ? failed: x; no step")
    assert text.endswith("\n") and len(text.splitlines()) == 1
    assert json.loads(text) == {"exit_code": 2, "status": "CRITICAL", "set": None, "started": 100.5,
                                "finished": 130.25, "seconds": 29.75,
                                "message": "CRITICAL: drill of set ? failed: x; no step"}
    assert [json.loads(restore.drill_state_text(code, "s", 1.0, 2.0, 1.0, "m"))["status"]
            for code in (0, 1, 2, 3)] == ["OK", "WARNING", "CRITICAL", "UNKNOWN"]


def test_only_a_drill_off_a_terminal_keeps_its_info_lines_off_stderr():
    assert restore.stderr_level("drill", False, False) == logging.WARNING
    assert restore.stderr_level("drill", False, True) == logging.INFO
    assert restore.stderr_level("drill", True, False) == logging.DEBUG
    assert restore.stderr_level("restore", False, False) == logging.INFO


# -- drills run as a process --------------------------------------------------------

@pytest.fixture
def passed_drill(story, no_state):
    """A drill run as cron runs it (stdout and stderr pipes): (proc, state, before, after)."""
    before = time.time()
    proc = restore_script(story.config, "drill", "--query", "SELECT count(*) FROM pitr")
    after = time.time()
    return proc, read_state(no_state), before, after


def test_a_drill_that_passes_records_ok_the_set_and_its_duration(story, passed_drill):
    proc, state, before, after = passed_drill
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert state["exit_code"] == 0 and state["status"] == "OK", state
    assert state["set"] == story.sets[1]
    assert state["message"] == proc.stdout.strip() and state["message"].startswith(
        "OK: drill of set %s " % story.sets[1]), state
    assert_times_of(state, before, after)
    assert our_clones(story.tb) == []
    assert drill_metrics(story) == {"success": 1, "exit_code": 0, "timestamp_seconds": state["finished"],
                                    "duration_seconds": state["seconds"]}


def drill_metrics(story):
    """{name: value} of pg_zfs_snap.py metrics' job="drill" samples (root's cron job reads the file)."""
    proc = run_script("pg_zfs_snap", "metrics", "--no-replicas", config=story.config)
    assert proc.returncode == 0, proc.stderr
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("pg_zfs_last_run_") and '{job="drill"}' in line:
            name, value = line.split(" ")
            found[name[len("pg_zfs_last_run_"):].split("{")[0]] = float(value)
    return found


def test_a_drill_that_passes_off_a_terminal_prints_one_line_and_nothing_on_stderr(story, passed_drill):
    proc = passed_drill[0]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    assert len(proc.stdout.splitlines()) == 1 and proc.stdout.endswith("\n"), proc.stdout


def test_a_drill_off_a_terminal_logs_the_set_it_drills_to_syslog_only(story, no_state, syslog):
    messages, done = [], threading.Event()

    def drain():        # read as it comes: a full socket would block every sender (the copy's
        while not done.is_set():        # restore_command logs to syslog too)
            messages.extend(received(syslog))
    reader = threading.Thread(target=drain)
    reader.start()
    try:
        proc = restore_script(story.config, "drill")
    finally:
        done.set()
        reader.join()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    assert any("pg_zfs_restore[" in message and "set %s " % story.sets[1] in message and "serves target" in message
               for message in messages), proc.stdout


def test_a_drill_at_a_terminal_logs_the_set_it_drills_on_stderr(story, no_state):
    code, out, err = on_a_terminal([PY36, os.path.join(BIN, "pg_zfs_restore.py"), "-c", story.config, "drill"])
    assert code == 0, out + err
    assert "pg_zfs_restore: INFO: set %s " % story.sets[1] in err, err
    assert read_state(no_state)["message"] == out.strip()


def test_a_drill_whose_query_fails_records_critical_with_its_line(story, no_state):
    before = time.time()
    proc = restore_script(story.config, "drill", "--query", "SELECT * FROM no_such_table")
    after = time.time()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    state = read_state(no_state)
    assert state["exit_code"] == 2 and state["status"] == "CRITICAL", state
    assert state["set"] == story.sets[1]
    assert state["message"] == proc.stdout.strip(), state
    assert state["message"].startswith("CRITICAL: drill of set %s failed: query" % story.sets[1])
    assert "no_such_table" in state["message"]
    assert_times_of(state, before, after)
    assert drill_metrics(story)["success"] == 0 and drill_metrics(story)["exit_code"] == 2
    assert our_clones(story.tb) == []


def test_a_drill_stopped_by_sigterm_records_critical_stopped_by_sigterm(story, no_state):
    tb = story.tb
    pgdata = os.path.join(tb.run_dir, "restore_mnt", "data02_drill_%s" % story.sets[1], "pgdata")
    before = time.time()
    # stalled: recovery waits for its first segment, the copy runs, not done
    with stalled(tb.hosts), subprocess.Popen(
            [PY36, os.path.join(BIN, "pg_zfs_restore.py"), "-c", story.config, "drill"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True) as proc:
        try:
            wait_for(lambda: proc.poll() is not None or server_of(pgdata), 120, "the copy's server to start")
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=240)
        except BaseException:
            proc.kill()         # leaving the with block waits for it
            raise
    after = time.time()
    assert proc.returncode == 2, out + err
    state = read_state(no_state)
    assert state["exit_code"] == 2 and state["status"] == "CRITICAL", state
    assert state["set"] == story.sets[1]
    assert state["message"] == out.strip() and "stopped by SIGTERM" in out, state
    assert_times_of(state, before, after)
    os.unlink(no_state)
    assert nothing_left(story) == []


def test_a_result_that_cannot_be_written_is_a_warning_and_the_drill_still_passes(story, no_state):
    os.mkdir(no_state)      # a directory where the file goes: the rename fails
    try:
        proc = restore_script(story.config, "drill")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.startswith("OK: drill of set %s " % story.sets[1])
        assert proc.stderr.startswith("pg_zfs_restore: WARNING: the drill's result was not recorded in %s: "
                                      % no_state) and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert os.listdir(no_state) == []
        assert [name for name in os.listdir(os.path.dirname(no_state))      # no temp file left
                if name.startswith("last-drill.json.")] == []
    finally:
        os.rmdir(no_state)
