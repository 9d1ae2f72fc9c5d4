"""pg_zfs_snap.py run as cron would (a process, Python 3.6, root) against the
testbed's real zfs-fuse pool and streaming standby (PGDATA on data02, tablespace
ts1 on data01). Each test uses its own snapshot prefix so tests do not see each
other's sets. PG_ZFS_TEST_PG=14 runs the same tests through pg_start_backup.
"""

import base64
import calendar
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time

import pytest

from testbed import BIN, PY36, names_from, run_script

SCRIPT = "pg_zfs_snap"
NAGIOS_LINE = re.compile(r"^PG_ZFS_SNAP (OK|WARNING|CRITICAL|UNKNOWN) - .+ \| (age=\d+s )?sets=\d+"
                         r"( pool_[A-Za-z0-9_.-]+=\d+%;80;90)*$")


def config(tb, tmp_path, prefix, **snapshot_keys):
    keys = {"prefix": prefix, "keep_hourly": 0, "keep_daily": 7, "keep_weekly": 4,
            "keep_monthly": 3}
    keys.update(snapshot_keys)
    return tb.write_config(tmp_path / "pg_zfs.conf", {"snapshot": keys})


def snap(cfg, *args, **kwargs):
    return run_script(SCRIPT, *args, config=cfg, **kwargs)


def snapshots_named(tb, name):
    return sorted(s for s in tb.zfs.snapshots() if s.endswith("@" + name))


def set_names(tb, prefix):
    return sorted(set(s.split("@", 1)[1] for s in tb.zfs.snapshots()
                      if s.split("@", 1)[1].startswith(prefix + "_")))


def properties(tb, snapshot):
    out = tb.zfs.run("get", "-H", "-o", "property,value", "all", snapshot)
    return dict(line.split("\t", 1) for line in out.splitlines()
                if line.startswith("pgzfs:"))


def destroy_sets(tb, prefix):
    for snapshot in tb.zfs.snapshots():
        if snapshot.split("@", 1)[1].startswith(prefix + "_"):
            tb.zfs.destroy(snapshot)


def no_snap_session_left(tb, standby=None):
    """True once no backend of pg_zfs_snap is connected: its backup has ended."""
    standby = standby or tb.standby
    deadline = time.time() + 10
    while time.time() < deadline:
        count = standby.psql("SELECT count(*) FROM pg_stat_activity "
                                "WHERE application_name = 'pg_zfs_snap'")
        if count == "0":
            return True
        time.sleep(0.2)
    return False


@contextlib.contextmanager
def insert_load(tb):
    """Rows inserted on the primary, in a loop, while the block runs."""
    stop = threading.Event()
    counts = []

    def loop():
        while not stop.is_set():
            tb.primary.psql("INSERT INTO smoke(note) SELECT md5(g::text) "
                            "FROM generate_series(1, 500) g")
            counts.append(1)
    thread = threading.Thread(target=loop)
    thread.start()
    try:
        time.sleep(0.5)
        yield counts
    finally:
        stop.set()
        thread.join(60)


@contextlib.contextmanager
def standby_stopped(tb, standby=None):
    """The shared standby (or this one) stopped cleanly; started again afterwards."""
    standby = standby or tb.standby
    standby.stop()
    try:
        yield standby
    finally:
        standby.start()


@pytest.fixture
def cleanup(tb):
    """Destroys the sets of the prefixes a test registers, also on failure."""
    prefixes = []
    yield prefixes.append
    for prefix in prefixes:
        destroy_sets(tb, prefix)


# -- taking a set ---------------------------------------------------------------


def assert_started_at_its_name(name, start_time):
    """A set named load_YYYYmmddTHHMMSSZ started within a minute of that time."""
    named = calendar.timegm(time.strptime(name, "load_%Y%m%dT%H%M%SZ"))
    started = calendar.timegm(time.strptime(start_time.split(".")[0].rstrip("Z"), "%Y-%m-%dT%H:%M:%S"))
    assert 0 <= started - named < 60


def assert_standby_backup_label(label_base64, name, start_lsn, start_wal):
    """The stored label is the one a backup of the standby, labelled for set name, returns."""
    label = base64.b64decode(label_base64).decode()
    assert "BACKUP FROM: standby" in label
    assert "LABEL: pg_zfs_snap %s under load" % name in label
    assert "START WAL LOCATION: %s (file %s)" % (start_lsn, start_wal) in label

def test_set_on_a_loaded_standby_is_self_describing(tb, tmp_path, cleanup):
    cleanup("load")
    cfg = config(tb, tmp_path, "load")
    with insert_load(tb) as counts:
        proc = snap(cfg, "snapshot", "--no-prune", "--label", "under load")
    assert proc.returncode == 0, proc.stderr
    assert len(counts) > 0
    [name] = set_names(tb, "load")
    assert re.match(r"^load_\d{8}T\d{6}Z$", name)
    assert "took set %s (backup from standby" % name in proc.stderr
    members = snapshots_named(tb, name)
    assert members == sorted(d + "@" + name for d in tb.datasets)

    props = properties(tb, "%s/data02@%s" % (tb.zfs.name, name))
    for member in members:                  # every snapshot carries the same
        assert properties(tb, member) == props
    assert props["pgzfs:set"] == name
    assert props["pgzfs:mode"] == "backup"
    assert props["pgzfs:version"]
    datasets = props["pgzfs:datasets"].split()
    assert sorted(datasets) == sorted(tb.datasets)
    assert datasets[-1] == tb.zfs.name + "/data02"          # pg_control last
    assert props["pgzfs:pgdata_dataset"] == tb.zfs.name + "/data02"
    assert props["pgzfs:pgdata_rel"] == "pgdata"
    assert props["pgzfs:pg_version"] == tb.pg_version
    assert props["pgzfs:system_identifier"] == tb.standby.psql(
        "SELECT system_identifier FROM pg_control_system()")
    assert re.match(r"^[0-9A-F]+/[0-9A-F]+$", props["pgzfs:start_lsn"])
    assert re.match(r"^[0-9A-F]+/[0-9A-F]+$", props["pgzfs:stop_lsn"])
    for key in ("pgzfs:start_time", "pgzfs:stop_time"):     # to the microsecond
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", props[key]), props[key]
    assert props["pgzfs:start_time"] <= props["pgzfs:stop_time"]
    assert_started_at_its_name(name, props["pgzfs:start_time"])

    assert_standby_backup_label(props["pgzfs:backup_label"], name, props["pgzfs:start_lsn"],
                                props["pgzfs:start_wal"])
    assert int(props["pgzfs:timeline"]) == int(props["pgzfs:start_wal"][:8], 16)
    tablespace_map = base64.b64decode(props["pgzfs:tablespace_map"]).decode()
    assert tb.zfs.mountpoint(tb.zfs.name + "/data01") + "/ts1" in tablespace_map
    assert no_snap_session_left(tb)


def test_list_rebuilds_the_sets_from_the_pool(tb, tmp_path, cleanup):
    cleanup("listed")
    cfg = config(tb, tmp_path, "listed")
    assert snap(cfg, "snapshot", "--no-prune").returncode == 0
    [name] = set_names(tb, "listed")
    proc = snap(cfg, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads(proc.stdout)
    assert entry["name"] == name and entry["complete"] is True
    assert entry["mode"] == "backup" and entry["timeline"] and entry["stop_lsn"]
    assert isinstance(entry["used_bytes"], int) and entry["clones"] == []
    assert sorted(entry["datasets"]) == sorted(entry["present"]) == sorted(tb.datasets)
    table = snap(cfg, "list").stdout.splitlines()
    assert table[0].split("\t")[:3] == ["set", "time", "mode"]
    assert table[1].startswith(name + "\t") and table[1].endswith("\tcomplete")


@pytest.mark.host_only("the metrics file")
def test_metrics_textfile_is_written_whole_and_parses_as_prometheus_text(tb, tmp_path, cleanup):
    from prometheus_client.parser import text_string_to_metric_families
    cleanup("metered")
    cfg = config(tb, tmp_path, "metered", state_file=tmp_path / "state.json")
    assert snap(cfg, "snapshot", "--no-prune").returncode == 0
    [name] = set_names(tb, "metered")
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    proc = snap(cfg, "metrics", "--textfile", textfile)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(str(textfile))) == ["pg_zfs.prom"]         # no temp file left
    assert stat.S_IMODE(os.stat(str(textfile / "pg_zfs.prom")).st_mode) == 0o644
    samples = {}
    for family in text_string_to_metric_families((textfile / "pg_zfs.prom").read_text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("pg_zfs_sets", (("state", "complete"),))] == 1
    assert 0 <= samples[("pg_zfs_newest_set_age_seconds", ())] < 600
    assert samples[("pg_zfs_set_used_bytes", (("complete", "yes"), ("set", name)))] >= 0
    health = [key for key in samples if key[0] == "pg_zfs_pool_healthy"]
    assert health == [("pg_zfs_pool_healthy", (("health", "ONLINE"), ("pool", tb.zfs.name)))]
    assert samples[health[0]] == 1
    assert samples[("pg_zfs_pool_size_bytes", (("pool", tb.zfs.name),))] > 0
    printed = snap(cfg, "metrics")
    assert printed.returncode == 0 and printed.stdout.startswith("# HELP pg_zfs_sets ")
    # the last snapshot run: its result and how long it took
    state_file = json.loads(open(cfg.replace("pg_zfs.conf", "state.json")).read())
    assert state_file["exit_code"] == 0 and state_file["set"] == name and state_file["seconds"] > 0
    assert samples[("pg_zfs_last_run_success", (("job", "snapshot"),))] == 1
    assert 0 < samples[("pg_zfs_last_run_duration_seconds", (("job", "snapshot"),))] < 600
    assert samples[("pg_zfs_last_run_timestamp_seconds", (("job", "snapshot"),))] >= state_file["started"]
    assert ("pg_zfs_spool_bytes", ()) in samples
    # a run that fails is recorded as failed, with its reason
    missing = tb.write_config(tmp_path / "missing.conf", {"snapshot": {
        "prefix": "metered", "state_file": tmp_path / "state.json", "datasets": "nosuchpool/data"}})
    assert snap(missing, "snapshot", "--no-prune").returncode == 2
    failed = json.loads(open(cfg.replace("pg_zfs.conf", "state.json")).read())
    assert failed["exit_code"] != 0 and failed["set"] is None and failed["message"], failed
    after = snap(cfg, "metrics").stdout
    assert 'pg_zfs_last_run_success{job="snapshot"} 0' in after.splitlines(), after


@pytest.mark.host_only("the set's facts from pg_controldata; the snapshot is every other test's")
def test_stopped_postgres_gives_a_shutdown_set(tb, tmp_path, cleanup):
    cleanup("stopped")
    cfg = config(tb, tmp_path, "stopped")
    with standby_stopped(tb):
        proc = snap(cfg, "snapshot", "--no-prune")
        assert proc.returncode == 0, proc.stderr
        [name] = set_names(tb, "stopped")
        props = properties(tb, "%s/data02@%s" % (tb.zfs.name, name))
        assert props["pgzfs:mode"] == "shutdown"
        # REDO of the last restartpoint; stop at the minimum recovery point if later.
        start, stop = [int(h, 16) << 32 | int(l, 16) for h, l in
                       (props["pgzfs:" + k].split("/") for k in ("start_lsn", "stop_lsn"))]
        assert start <= stop
        assert re.match(r"^[0-9A-F]{24}$", props["pgzfs:start_wal"])
        assert props["pgzfs:pg_version"] == tb.pg_version
        assert props["pgzfs:backup_label"] == ""
        assert len(snapshots_named(tb, name)) == 4


@pytest.mark.host_only("refused before any snapshot")
def test_postmaster_pid_without_a_server_is_refused(tb, tmp_path, cleanup):
    cleanup("ambiguous")
    cfg = config(tb, tmp_path, "ambiguous")
    with standby_stopped(tb) as standby:
        pid_file = os.path.join(standby.pgdata, "postmaster.pid")
        with open(pid_file, "w") as handle:
            handle.write("999999\n")
        try:
            proc = snap(cfg, "snapshot", "--no-prune")
        finally:
            os.unlink(pid_file)
    assert proc.returncode == 1
    assert "postmaster.pid exists but psql cannot connect" in proc.stderr
    assert set_names(tb, "ambiguous") == []


def test_failure_on_the_second_dataset_leaves_no_set_and_no_backup(tb, tmp_path, cleanup):
    cleanup("fail")
    cfg = config(tb, tmp_path, "fail")
    # zfs-fuse takes one name per call: data01, data03, data04, then data02.
    # A snapshot of the set's name already on data03 makes the second call fail.
    # --now's clock runs on until the set is named, so the names of the first
    # testbed.SECONDS_OF_DRIFT seconds are all taken there.
    blockers = names_from("fail", "20260101T040100Z")
    for blocker in blockers:
        tb.zfs.run("snapshot", "%s/data03@%s" % (tb.zfs.name, blocker))
    proc = snap(cfg, "--now", "20260101T040100Z", "snapshot")
    assert proc.returncode == 1
    assert "dataset already exists" in proc.stderr
    (name,) = set(re.findall(r"fail_\w+Z", proc.stderr))
    assert name in blockers, proc.stderr
    in_the_way = "%s/data03@%s" % (tb.zfs.name, name)
    assert snapshots_named(tb, name) == [in_the_way]        # ours destroyed, theirs kept
    assert properties(tb, in_the_way) == {}
    assert no_snap_session_left(tb)
    if tb.pg_version == "14":
        assert tb.standby.psql("SELECT pg_is_in_backup()") == "f"
    assert "pruned" not in proc.stderr
    # Backup mode really ended: the next run takes its set.
    proc = snap(cfg, "--now", "20260101T040200Z", "snapshot", "--no-prune")
    assert proc.returncode == 0, proc.stderr


def test_a_dataset_that_does_not_exist_is_a_config_error(tb, tmp_path, cleanup):
    cleanup("missing")
    datasets = list(tb.datasets)
    datasets.insert(1, tb.zfs.name + "/nosuch")
    cfg = config(tb, tmp_path, "missing", datasets=" ".join(datasets))
    proc = snap(cfg, "snapshot")
    assert proc.returncode == 2
    assert "dataset does not exist" in proc.stderr
    assert set_names(tb, "missing") == []
    assert no_snap_session_left(tb)


def test_pgdata_on_a_dataset_nested_below_a_configured_one_is_refused(tb, tmp_path, cleanup):
    # A snapshot of data02 does not hold a child dataset mounted below it: a
    # "backup" of such a PGDATA would be empty.
    cleanup("nested")
    nested = tb.zfs.create("data02/nested")
    try:
        pgdata = os.path.join(tb.zfs.mountpoint(nested), "pgdata")
        os.mkdir(pgdata)
        cfg = tb.write_config(tmp_path / "pg_zfs.conf", {"snapshot": {"prefix": "nested"},
                                                         "postgres": {"pgdata": pgdata}})
        proc = snap(cfg, "snapshot", "--no-prune")
        assert proc.returncode == 2
        assert "%s is on %s" % (pgdata, nested) in proc.stderr, proc.stderr
        assert set_names(tb, "nested") == []
    finally:
        tb.zfs.destroy(nested, recursive=True)


@pytest.mark.parametrize("ctrl_c", [False, pytest.param(True, marks=pytest.mark.host_only(
    "Ctrl-C reaches the snapshot as SIGINT; SIGTERM runs in the guest"))], ids=["sigterm", "ctrl_c"])
def test_sigterm_while_a_snapshot_is_made_leaves_no_snapshot_and_no_backup(tb, tmp_path, cleanup, ctrl_c):
    # The zfs call that SIGTERM interrupts finishes anyway: the run must wait for
    # it, destroy what it made, and end backup mode. Ctrl-C at a terminal reaches
    # the whole process group: the zfs call dies of it after making its snapshot
    # (here, the wrapper dies in its sleep), and that snapshot must go too.
    cleanup("term")
    cfg = config(tb, tmp_path, "term")
    called = tmp_path / "snapshot_called"
    slow_bin = tmp_path / "slow_bin"
    slow_bin.mkdir()
    wrapper = slow_bin / "zfs"
    wrapper.write_text('#!/bin/sh\n%s "$@"; code=$?\n'
                       'if [ "$1" = snapshot ] && [ $code = 0 ]; then touch %s; sleep 2; fi\nexit $code\n'
                       % (shutil.which("zfs"), called))
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH="%s:%s" % (slow_bin, os.environ["PATH"]))
    env.pop("PG_ZFS_CONFIG", None)
    proc = subprocess.Popen([PY36, os.path.join(BIN, SCRIPT + ".py"), "-c", cfg, "snapshot", "--no-prune"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                            env=env, start_new_session=True)
    deadline = time.time() + 60
    while not called.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if ctrl_c:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "stopped by signal %d" % (signal.SIGINT if ctrl_c else signal.SIGTERM) in err, err
    assert set_names(tb, "term") == []
    assert no_snap_session_left(tb)


# -- the lock -------------------------------------------------------------------

@pytest.mark.host_only("our lock")
def test_two_concurrent_runs_make_one_set(tb, tmp_path, cleanup):
    cleanup("twice")
    cfg = config(tb, tmp_path, "twice")
    argv = [PY36, os.path.join(BIN, SCRIPT + ".py"), "-c", cfg, "snapshot"]
    with insert_load(tb):
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True) for _ in range(2)]
        results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [code for _, _, code in results] == [0, 0]
    assert len(set_names(tb, "twice")) == 1
    assert sum("holds %s: nothing done" % os.path.join(tb.run_dir, "snap.lock") in err
               for _, err, _ in results) == 1


@pytest.mark.host_only("our lock")
def test_a_held_lock_exits_0_or_waits_with_wait(tb, tmp_path, cleanup):
    cleanup("locked")
    cfg = config(tb, tmp_path, "locked")
    with open(os.path.join(tb.run_dir, "snap.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = snap(cfg)
        assert proc.returncode == 0 and "nothing done" in proc.stderr
        assert set_names(tb, "locked") == []
        waiting = subprocess.Popen(
            [PY36, os.path.join(BIN, SCRIPT + ".py"), "-c", cfg, "--wait", "snapshot"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True)
        time.sleep(2)
        assert waiting.poll() is None
    _, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert len(set_names(tb, "locked")) == 1


# -- retention --------------------------------------------------------------------

def test_prune_with_a_fixed_now_destroys_exactly_the_expected_sets(tb, tmp_path, cleanup):
    cleanup("prune")
    cleanup("other")
    cfg = config(tb, tmp_path, "prune", keep_daily=2, keep_weekly=1, keep_monthly=0)
    stamps = ["20260301T040100Z", "20260302T040100Z", "20260303T040100Z",
              "20260303T120000Z", "20260304T040100Z"]
    made = []       # a set is named when its snapshot is taken: --now's clock runs on
    for stamp in stamps:
        before = set(set_names(tb, "prune"))
        proc = snap(cfg, "--now", stamp, "snapshot", "--no-prune")
        assert proc.returncode == 0, proc.stderr
        (name,) = set(set_names(tb, "prune")) - before
        assert name in names_from("prune", stamp), name
        made.append(name)
    # Another tool's snapshots, and an incomplete set of ours (a run that died).
    tb.zfs.run("snapshot", "%s/data02@other_20260101T000000Z" % tb.zfs.name)
    tb.zfs.run("snapshot", "%s/data02@prune_20260101T000000Z" % tb.zfs.name)
    broken = "prune_20260228T040100Z"
    tb.zfs.run("snapshot", "-o", "pgzfs:set=" + broken,
               "-o", "pgzfs:datasets=" + " ".join(tb.datasets),
               "%s/data01@%s" % (tb.zfs.name, broken))
    # A drill clone depends on the oldest set.
    clone = "%s/data02_drill_%s" % (tb.zfs.name, made[0])
    tb.zfs.run("clone", "-o", "mountpoint=%s" % os.path.join(tb.run_dir, "drill_prune"),
               "%s/data02@%s" % (tb.zfs.name, made[0]), clone)
    try:
        now = ["--now", "20260305T000000Z"]
        dry = snap(cfg, *(now + ["prune", "--dry-run"]))
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.split() == ["would", "destroy", broken,
                                      "would", "destroy", made[1],
                                      "would", "destroy", made[2]]
        assert "%s has clones (%s)" % (made[0], clone) in dry.stderr
        assert len(set_names(tb, "prune")) == 7

        proc = snap(cfg, *(now + ["prune"]))
        assert proc.returncode == 0, proc.stderr
        # daily=2 keeps 03-04 and 03-03 12:00; weekly=1 keeps the newest of this
        # week (03-04); 03-01 has a clone; other tools' snapshots are untouched.
        assert set_names(tb, "prune") == ["prune_20260101T000000Z", made[0], made[3], made[4]]
        assert snapshots_named(tb, "other_20260101T000000Z")
        assert proc.stderr.count("pruned set") == 3

        oldest = snap(cfg, "oldest-wal")
        assert oldest.returncode == 0, oldest.stderr
        first = properties(tb, "%s/data02@%s" % (tb.zfs.name, made[0]))
        assert oldest.stdout.strip() == first["pgzfs:start_wal"]
    finally:
        tb.zfs.destroy(clone)


def test_cron_run_takes_a_set_then_prunes(tb, tmp_path, cleanup):
    cleanup("cron")
    cfg = config(tb, tmp_path, "cron", keep_daily=0, keep_weekly=0, keep_monthly=0)
    assert snap(cfg, "--now", "20250101T040100Z", "snapshot", "--no-prune").returncode == 0
    (old,) = set_names(tb, "cron")      # named when taken: --now's clock runs on
    assert old in names_from("cron", "20250101T040100Z"), old
    proc = snap(cfg)
    assert proc.returncode == 0, proc.stderr
    names = set_names(tb, "cron")
    assert len(names) == 1 and names[0] != old
    assert "pruned set %s" % old in proc.stderr


@pytest.mark.host_only("no set, no ZFS call")
def test_oldest_wal_without_a_set_fails(tb, tmp_path):
    proc = snap(config(tb, tmp_path, "nothing"), "oldest-wal")
    assert proc.returncode == 1 and proc.stdout == ""


# -- check ------------------------------------------------------------------------

@pytest.mark.host_only("check's states (test_snap_unit); its zfs list is every other test's")
def test_check_gives_each_of_its_four_states(tb, tmp_path, cleanup):
    cleanup("check")
    cfg = config(tb, tmp_path, "check", warn_age=3600, crit_age=7200)

    def check(now, config_path=cfg):
        proc = snap(config_path, "--now", now, "check")
        assert NAGIOS_LINE.match(proc.stdout.strip()), proc.stdout
        assert len(proc.stdout.splitlines()) == 1
        return proc.returncode, proc.stdout.split()[1]

    assert check("20260601T000000Z") == (2, "CRITICAL")            # no set at all
    assert snap(cfg, "--now", "20260601T000000Z", "snapshot", "--no-prune").returncode == 0
    assert check("20260601T003000Z") == (0, "OK")
    assert check("20260601T013000Z") == (1, "WARNING")
    assert check("20260601T023000Z") == (2, "CRITICAL")
    broken = tb.write_config(tmp_path / "broken.conf", {"snapshot": {"datasets": None}})
    assert check("20260601T003000Z", broken) == (3, "UNKNOWN")
    assert "sets=1" in snap(cfg, "--now", "20260601T003000Z", "check").stdout
    # The pool's fill, from zpool list, in the perfdata (warn at 80%, critical at 90%).
    assert re.search(r" pool_%s=\d+%%;80;90$" % tb.zfs.name,
                     snap(cfg, "--now", "20260601T003000Z", "check").stdout.strip())
    # --json: the same result as one object, the same exit code
    for now, code, status in (("20260601T003000Z", 0, "OK"), ("20260601T013000Z", 1, "WARNING")):
        proc = snap(cfg, "--now", now, "check", "--json")
        result = json.loads(proc.stdout)
        assert proc.returncode == code == result["exit_code"] and result["status"] == status, proc.stdout
        assert result["perfdata"]["sets"] == {"value": 1, "unit": ""}
        assert result["perfdata"]["pool_" + tb.zfs.name]["unit"] == "%"
        assert result["perfdata"]["pool_" + tb.zfs.name]["crit"] == 90
    proc = snap(broken, "check", "--json")
    assert proc.returncode == 3 and json.loads(proc.stdout)["status"] == "UNKNOWN", proc.stdout
