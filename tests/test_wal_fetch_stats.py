"""Issue 18: every restore_command call of pg_wal_fetch.py counted by outcome and time
in [archive] spool_dir/fetch-stats.json, the file pg_zfs_snap.py metrics reads.

Run as PostgreSQL runs it (as postgres, Python 3.6, in a data directory) against the
testbed's two sshd archive hosts; a dead host is an nftables rule, a damaged copy a
real file in each host's private archive tree.
"""

import fcntl
import json
import os
import time

import pytest

from testbed import chown_pg, run_script, wait_for
from test_wal_fetch import FETCH, py36, segments, wal  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(300)

OUTCOMES = ("delivered", "absent", "invalid", "unreachable")


@pytest.fixture
def stats(wal):
    """The wal environment with its spool_dir made (as setup_guest.py makes it)."""
    os.makedirs(wal.spool_root)
    chown_pg(wal.spool_root)
    return wal


def read_stats(env):
    with open(os.path.join(env.spool_root, "fetch-stats.json")) as stats_file:
        return json.load(stats_file)


def counts(env):
    found = read_stats(env)
    return {outcome: found[outcome]["count"] for outcome in OUTCOMES}


def fetch(env, name, dest="pg_wal/RECOVERYXLOG", *options):
    """One restore_command call; the delivered file removed again after checking it."""
    proc = env.run(*(list(options) + [name, dest]))
    path = os.path.join(env.pgdata, dest)
    if proc.returncode == 0:
        assert env.delivered(os.path.basename(dest)) == env.original(name)
        os.unlink(path)
    else:
        assert not os.path.exists(path)
    return proc


def past_the_end(env):
    last = env.segments[-1]
    return last[:16] + "%08X" % (int(last[16:], 16) + 40)


def no_temporary_files(env):
    """Only the counters and their lock: no temporary file of the counting left."""
    return sorted(name for name in os.listdir(env.spool_root) if "fetch-stats" in name) \
        == [".fetch-stats.lock", "fetch-stats.json"]


# ---------------------------------------------------------------------------

def test_each_outcome_is_counted_once_with_its_time(stats, tb):
    before = time.time()
    for name in stats.segments[:3]:
        assert fetch(stats, name).returncode == 0
    assert counts(stats) == {"delivered": 3, "absent": 0, "invalid": 0, "unreachable": 0}

    proc = fetch(stats, past_the_end(stats))
    assert proc.returncode == 1, proc.stderr                       # the end of the archive

    name = stats.segments[3]
    good = stats.original(name)
    for host_index in (0, 1):                                      # first page without a long header
        stats.replace(host_index, name, good[:2] + b"\x00\x00" + good[4:])
    proc = fetch(stats, name)
    assert proc.returncode == 3 and "not valid" in proc.stderr, proc.stderr

    with tb.hosts[0].dead(), tb.hosts[1].dead():
        proc = fetch(stats, stats.segments[4])
    assert proc.returncode == 3 and "does not answer" in proc.stderr, proc.stderr

    found = read_stats(stats)
    assert counts(stats) == {"delivered": 3, "absent": 1, "invalid": 1, "unreachable": 1}
    for outcome in OUTCOMES:
        assert set(found[outcome]) == {"count", "seconds"}
        assert isinstance(found[outcome]["seconds"], float) and found[outcome]["seconds"] > 0, found
    assert before < found["updated"] <= time.time()
    # Read by another user's metrics (the cron job's), whatever PostgreSQL's umask.
    for name in ("fetch-stats.json", ".fetch-stats.lock"):
        assert os.stat(os.path.join(stats.spool_root, name)).st_mode & 0o777 == 0o644
    assert no_temporary_files(stats), os.listdir(stats.spool_root)
    # The sources said what they said: nothing of the counting in the call's output.
    assert "fetch-stats" not in proc.stderr and proc.stdout == ""
    # What root's metrics cron job makes of them (pg_zfs_snap.py metrics).
    metrics = run_script("pg_zfs_snap", "metrics", "--no-replicas", config=stats.config)
    assert metrics.returncode == 0, metrics.stderr
    lines = metrics.stdout.splitlines()
    for outcome, count in counts(stats).items():
        assert 'pg_zfs_wal_fetch_calls_total{outcome="%s"} %d' % (outcome, count) in lines, metrics.stdout
        assert 'pg_zfs_wal_fetch_seconds_total{outcome="%s"} %r' % (outcome, found[outcome]["seconds"]) in lines
    assert [line for line in lines if line.startswith("pg_zfs_spool_bytes ")], metrics.stdout


def test_a_delivery_from_the_spool_counts_and_the_prefetcher_does_not(stats):
    stats.configure(archive={"prefetch": "4"})
    first, window = stats.segments[0], stats.segments[1:5]
    assert fetch(stats, first).returncode == 0
    wait_for(lambda: all(os.path.exists(os.path.join(stats.spool, name)) for name in window),
             60, "the prefetcher to spool %s" % window)
    stats.wait_for_prefetcher()
    assert counts(stats)["delivered"] == 1          # its four fetches are not restore_command calls
    os.unlink(stats.shim_log)
    for name in window[:2]:
        assert fetch(stats, name).returncode == 0
    assert stats.commands(this_call_only=True) == []   # straight from the spool
    stats.wait_for_prefetcher()
    assert counts(stats) == {"delivered": 3, "absent": 0, "invalid": 0, "unreachable": 0}
    assert read_stats(stats)["delivered"]["seconds"] > 0


def test_check_and_other_commands_are_not_counted(stats):
    assert stats.run("--check").returncode == 0
    assert stats.run("--serve-script").returncode == 0
    assert not os.path.exists(os.path.join(stats.spool_root, "fetch-stats.json"))


def test_eight_calls_at_once_are_all_counted(stats):
    calls = [stats.popen(stats.segments[i % 4] if i % 2 == 0 else past_the_end(stats), "pg_wal/R%d" % i)
             for i in range(8)]
    for index, call in enumerate(calls):
        _out, err = call.communicate(timeout=120)
        assert call.returncode == (0 if index % 2 == 0 else 1), err
        if index % 2 == 0:
            assert stats.delivered("R%d" % index) == stats.original(stats.segments[index % 4])
    assert counts(stats) == {"delivered": 4, "absent": 4, "invalid": 0, "unreachable": 0}
    assert no_temporary_files(stats), os.listdir(stats.spool_root)


def test_existing_counts_are_added_to_and_unknown_keys_kept(stats):
    path = os.path.join(stats.spool_root, "fetch-stats.json")
    with open(path, "w") as stats_file:
        json.dump({"delivered": {"count": 41, "seconds": 2.5}, "absent": {"count": 7, "seconds": 1},
                   "unreachable": {"count": 2, "seconds": 9.0}, "since": "2026-01-01",
                   "updated": 1.0}, stats_file)
    chown_pg(path)
    assert fetch(stats, stats.segments[0]).returncode == 0
    found = read_stats(stats)
    assert counts(stats) == {"delivered": 42, "absent": 7, "invalid": 0, "unreachable": 2}
    assert 2.5 < found["delivered"]["seconds"] < 2.5 + 60 and found["absent"]["seconds"] == 1.0
    assert found["invalid"] == {"count": 0, "seconds": 0.0}
    assert found["since"] == "2026-01-01" and found["updated"] > 1.0


def test_unparsable_counts_start_again_from_zero(stats):
    path = os.path.join(stats.spool_root, "fetch-stats.json")
    with open(path, "w") as stats_file:
        stats_file.write('{"delivered": {"count": 4')             # a torn file: never written by us
    chown_pg(path)
    proc = fetch(stats, stats.segments[0], "pg_wal/RECOVERYXLOG", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "is not JSON" in proc.stderr and "counting from zero" in proc.stderr
    assert counts(stats) == {"delivered": 1, "absent": 0, "invalid": 0, "unreachable": 0}


def test_unwritable_spool_dir_changes_nothing_of_the_call(stats):
    name = stats.segments[0]
    assert fetch(stats, name).returncode == 0
    counted = read_stats(stats)
    os.chmod(stats.spool_root, 0o555)
    try:
        proc = stats.run(name, "pg_wal/RECOVERYXLOG")
        assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == ""
        assert stats.delivered() == stats.original(name)
        os.unlink(os.path.join(stats.pg_wal, "RECOVERYXLOG"))
        proc = fetch(stats, name, "pg_wal/RECOVERYXLOG", "-v")
        assert proc.returncode == 0, proc.stderr
        assert "call not counted" in proc.stderr and "Permission denied" in proc.stderr
        proc = fetch(stats, past_the_end(stats))
        assert proc.returncode == 1, proc.stderr
    finally:
        os.chmod(stats.spool_root, 0o755)
    assert read_stats(stats) == counted
    assert no_temporary_files(stats), os.listdir(stats.spool_root)


def test_a_spool_dir_that_cannot_be_made_leaves_the_call_alone(wal):
    blocker = os.path.join(wal.root, "a-file")
    open(blocker, "w").close()
    wal.configure(archive={"spool_dir": os.path.join(blocker, "spool")})
    proc = fetch(wal, wal.segments[0], "pg_wal/RECOVERYXLOG", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "call not counted" in proc.stderr and "Not a directory" in proc.stderr
    proc = fetch(wal, past_the_end(wal))
    assert proc.returncode == 1 and "ERROR" not in proc.stderr, proc.stderr


def test_a_lock_held_elsewhere_costs_at_most_a_second_and_the_call_goes_uncounted(stats):
    name = stats.segments[0]
    assert fetch(stats, name).returncode == 0
    counted = read_stats(stats)
    with open(os.path.join(stats.spool_root, ".fetch-stats.lock")) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        proc = fetch(stats, name, "pg_wal/RECOVERYXLOG", "-v")
        elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "stayed locked" in proc.stderr
    assert read_stats(stats) == counted
    assert 1.0 <= elapsed < 10      # waited its second for the lock, then went on


# ---------------------------------------------------------------------------
# The file's text, without the json module on the delivery path
# ---------------------------------------------------------------------------

def test_counters_are_written_exactly_as_json_writes_them_and_read_back():
    counted = FETCH.add_fetch_outcome(None, "absent", 0.125, 1764525799.25)
    counted = FETCH.add_fetch_outcome(counted, "delivered", 1e-05, 1764525800.5)
    text = FETCH.fetch_stats_text(counted)
    assert text == json.dumps(counted) + "\n"
    assert list(json.loads(text)) == list(OUTCOMES) + ["updated"]
    assert FETCH.parse_fetch_stats(text) == counted
    # Anything else is left to the json module, both ways.
    assert FETCH.parse_fetch_stats(text.replace(", ", ",")) is None
    assert FETCH.parse_fetch_stats(text.replace('"count": 1', '"count": 1.0', 1)) is None
    assert FETCH.fetch_stats_text(dict(counted, since="x")) is None


@pytest.mark.parametrize("code, sources, outcome", [
    (0, [], "delivered"), (0, ["unreachable", "found"], "delivered"),
    (1, ["absent", "absent"], "absent"), (1, [], "unreachable"),
    (3, ["invalid", "invalid"], "invalid"), (200, ["invalid", "absent"], "invalid"),
    (3, ["unreachable", "invalid"], "unreachable"), (3, ["stalled", "absent"], "unreachable"),
    (3, ["no archive directory", "absent"], "unreachable"), (2, [], "unreachable"),
])
def test_outcome_of_a_call(code, sources, outcome):
    assert FETCH.fetch_outcome(code, sources) == outcome
