"""A SIGTERM that lands after a command has reported, while the interpreter
exits: the exit code is the command's own, never death by the signal.

Python's tear-down sets a signal handler of ours back to SIG_DFL. A restore
that had printed "restored set ... promoted" then ended as killed by SIGTERM
(-15) in CI, and its caller could only read that as a failure. Here the
signal is sent without pause from the moment the command's output arrives
(stdout reaches the pipe only as the interpreter exits) until the process
is gone, on the real pool, under Python 3.6 and 3.13.
"""

import os
import signal
import subprocess

import pytest

from testbed import BIN, PY36, PY313
from test_restore_rollback import Own

PYTHONS = [PY36] + ([PY313] if PY313 else [])
RUNS = 10


def signalled_at_exit(python, script, config, args):
    """(exit code, stdout, stderr) of one run, SIGTERM sent again and again from its first output on."""
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)       # stdout block-buffered: written as the interpreter exits
    proc = subprocess.Popen([python, os.path.join(BIN, script), "-c", config] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = os.read(proc.stdout.fileno(), 1)      # not the buffered reader: communicate reads the fd
    while proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            break
    out, err = proc.communicate(timeout=60)
    return proc.wait(), (first + out).decode(), err.decode()


@pytest.fixture(scope="module")
def own(tb):
    own = Own(tb, "sigexit")
    own.take_set("20261201T000000Z")
    return own


@pytest.mark.parametrize("python", PYTHONS, ids=lambda path: "py36" if path == PY36 else "py313")
@pytest.mark.parametrize("script,args,expected", [
    ("pg_zfs_restore.py", ["cleanup", "--all"], "no clones made by pg_zfs_restore\n"),
    ("pg_zfs_snap.py", ["list"], "20261201T000000Z")])
def test_a_sigterm_after_the_report_leaves_the_exit_code_alone(own, python, script, args, expected):
    outcomes = [signalled_at_exit(python, script, own.config, args) for _ in range(RUNS)]
    for code, out, err in outcomes:
        assert (code, expected in out) == (0, True), (code, out, err)
