"""pg_zfs_snap.py with `backend = btrfs`, run as cron would (a process, Python
3.6, root) against a real loop-mounted btrfs (tb.btrfs) and a streaming standby
of its own: PGDATA on subvolume bt_data02, tablespace ts1 on bt_data01,
bt_data03 and bt_data04 empty, pg_wal under the run directory (not on btrfs).
The same behaviours tests/test_snap.py proves on ZFS; each test uses its own
prefix. Layout (DEVELOPERS.md): SUBVOLUME@SET is the read-only snapshot
MOUNT/.pgzfs/NAME@SET with its metadata in NAME@SET.json beside it.
"""

import base64
import json
import os
import re
import subprocess

import pytest

from testbed import BIN, PG_USER, PY36, chown_pg, lsn, names_from, run_script, sh
from test_snap import (NAGIOS_LINE, assert_standby_backup_label, assert_started_at_its_name,
                       insert_load, no_snap_session_left, standby_stopped)

SCRIPT = "pg_zfs_snap"
SHORTS = ("bt_data01", "bt_data02", "bt_data03", "bt_data04")


class BtrfsStandby(object):
    """A streaming standby of tb.primary whose PGDATA and tablespace are on btrfs subvolumes."""

    def __init__(self, tb):
        self.tb = tb
        self.mount = tb.btrfs.mountpoint
        self.subvolumes = [tb.btrfs.create(short) for short in SHORTS]
        for subvolume in self.subvolumes:
            chown_pg(subvolume)
        self.pgdata = os.path.join(self.subvolumes[1], "pgdata")
        self.ts1 = os.path.join(self.subvolumes[0], "ts1")
        self.cluster = tb.make_standby("bt_standby", self.pgdata, self.ts1)
        self.waldir = self.cluster.waldir

    @property
    def snapshot_dir(self):
        return os.path.join(self.mount, ".pgzfs")

    def config(self, tmp_path, prefix, file_name="pg_zfs.conf", **snapshot_keys):
        keys = {"backend": "btrfs", "datasets": " ".join(self.subvolumes), "prefix": prefix,
                "keep_hourly": "0", "keep_daily": "7", "keep_weekly": "4", "keep_monthly": "3",
                "lock_file": os.path.join(self.tb.run_dir, "bt_snap.lock"),
                "state_file": os.path.join(self.tb.run_dir, "bt_snap.json")}
        keys.update((key, str(value)) for key, value in snapshot_keys.items())
        cluster = self.cluster
        sections = {
            "postgres": {"pgdata": self.pgdata, "bindir": self.tb.pg_bindir, "user": PG_USER,
                         "host": cluster.socket_dir, "port": str(cluster.port), "dbname": "postgres"},
            "snapshot": keys,
        }
        return self.tb.write_config(tmp_path / file_name, sections=sections)

    def path(self, snapshot):
        """MOUNT/.pgzfs/NAME@SET of snapshot id SUBVOLUME@SET."""
        subvolume, _, name = snapshot.rpartition("@")
        return os.path.join(self.snapshot_dir, "%s@%s" % (os.path.basename(subvolume), name))

    def entries(self):
        return os.listdir(self.snapshot_dir) if os.path.isdir(self.snapshot_dir) else []

    def snapshots_named(self, name):
        """Snapshot ids SUBVOLUME@name whose snapshot directory exists."""
        return sorted(os.path.join(self.mount, entry.split("@")[0]) + "@" + name
                      for entry in self.entries()
                      if entry.endswith("@" + name) and os.path.isdir(os.path.join(self.snapshot_dir, entry)))

    def set_names(self, prefix):
        return sorted(set(entry.split("@", 1)[1] for entry in self.entries()
                          if "@" in entry and not entry.endswith(".json") and not entry.startswith(".")
                          and entry.split("@", 1)[1].startswith(prefix + "_")))

    def metadata(self, snapshot):
        with open(self.path(snapshot) + ".json") as handle:
            return json.load(handle)

    def destroy_sets(self, prefix):
        for entry in self.entries():
            if "@" not in entry or not entry.split("@", 1)[1].startswith(prefix + "_"):
                continue
            path = os.path.join(self.snapshot_dir, entry)
            if entry.endswith(".json"):
                os.unlink(path)
            elif os.stat(path).st_ino == 256:
                sh(["btrfs", "subvolume", "delete", path])
            else:
                os.rmdir(path)

    def psql(self, sql):
        return self.cluster.psql(sql)


@pytest.fixture(scope="module")
def bt(tb):
    standby = BtrfsStandby(tb)
    try:
        yield standby
    finally:
        standby.cluster.stop()


@pytest.fixture
def cleanup(bt):
    prefixes = []
    yield prefixes.append
    for prefix in prefixes:
        bt.destroy_sets(prefix)


def snap(cfg, *args, **kwargs):
    return run_script(SCRIPT, *args, config=cfg, **kwargs)


# -- taking a set ---------------------------------------------------------------

def test_btrfs_set_on_a_loaded_standby_is_read_only_snapshots_with_json_metadata(tb, bt, tmp_path, cleanup):
    cleanup("load")
    cfg = bt.config(tmp_path, "load")
    with insert_load(tb) as counts:
        proc = snap(cfg, "snapshot", "--no-prune", "--label", "under load")
    assert proc.returncode == 0, proc.stderr
    assert len(counts) > 0
    [name] = bt.set_names("load")
    assert re.match(r"^load_\d{8}T\d{6}Z$", name)
    assert "took set %s (backup from standby" % name in proc.stderr
    members = bt.snapshots_named(name)
    assert members == sorted(s + "@" + name for s in bt.subvolumes)
    for member in members:
        path = bt.path(member)
        assert os.stat(path).st_ino == 256                          # a subvolume
        assert sh(["btrfs", "property", "get", "-ts", path, "ro"]).stdout.strip() == "ro=true"
        assert oct(os.stat(bt.snapshot_dir).st_mode & 0o777) == "0o700"
    # Snapshots sit beside the subvolumes, not inside them.
    assert not any(os.path.exists(os.path.join(s, ".pgzfs")) for s in bt.subvolumes)
    assert os.path.exists(os.path.join(bt.path(bt.subvolumes[1] + "@" + name), "pgdata", "global", "pg_control"))
    assert os.listdir(os.path.join(bt.path(bt.subvolumes[0] + "@" + name), "ts1"))

    props = bt.metadata(bt.subvolumes[1] + "@" + name)
    for member in members:
        assert bt.metadata(member) == props
    assert not [e for e in bt.entries() if e.endswith(".tmp")]
    assert props["set"] == name and props["mode"] == "backup" and props["version"]
    datasets = props["datasets"].split()
    assert sorted(datasets) == sorted(bt.subvolumes)
    assert datasets[-1] == bt.subvolumes[1]                      # pg_control last
    assert props["pgdata_dataset"] == bt.subvolumes[1]
    assert props["pgdata_rel"] == "pgdata"
    assert props["pg_version"] == tb.pg_version
    assert props["system_identifier"] == bt.psql("SELECT system_identifier FROM pg_control_system()")
    assert lsn(props["start_lsn"]) <= lsn(props["stop_lsn"])
    assert props["start_time"] <= props["stop_time"]
    assert_started_at_its_name(name, props["start_time"])
    assert_standby_backup_label(props["backup_label"], name, props["start_lsn"], props["start_wal"])
    assert bt.ts1 in base64.b64decode(props["tablespace_map"]).decode()
    assert no_snap_session_left(tb, bt.cluster)


def test_btrfs_list_has_the_zfs_shape_and_reports_exclusive_bytes(bt, tmp_path, cleanup):
    cleanup("listed")
    cfg = bt.config(tmp_path, "listed")
    # A file only the snapshot keeps: its bytes are the set's exclusive bytes.
    only_in_set = os.path.join(bt.subvolumes[3], "gone_after_the_set")
    with open(only_in_set, "wb") as out:
        out.write(os.urandom(1 << 20))
    assert snap(cfg, "snapshot", "--no-prune").returncode == 0
    os.unlink(only_in_set)
    sh(["btrfs", "filesystem", "sync", bt.mount])
    [name] = bt.set_names("listed")
    proc = snap(cfg, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads(proc.stdout)
    assert entry["name"] == name and entry["complete"] is True
    assert entry["mode"] == "backup" and entry["timeline"] and entry["stop_lsn"]
    assert isinstance(entry["used_bytes"], int) and entry["clones"] == []
    assert (1 << 20) <= entry["used_bytes"] < (1 << 20) + (1 << 18)
    assert sorted(entry["datasets"]) == sorted(entry["present"]) == sorted(bt.subvolumes)
    table = snap(cfg, "list").stdout.splitlines()
    assert table[0].split("\t")[:3] == ["set", "time", "mode"]
    assert table[1].startswith(name + "\t") and table[1].endswith("\tcomplete")


def test_btrfs_stopped_postgres_gives_a_shutdown_set(tb, bt, tmp_path, cleanup):
    cleanup("stopped")
    cfg = bt.config(tmp_path, "stopped")
    with standby_stopped(tb, bt.cluster):
        proc = snap(cfg, "snapshot", "--no-prune")
        assert proc.returncode == 0, proc.stderr
    [name] = bt.set_names("stopped")
    props = bt.metadata(bt.subvolumes[1] + "@" + name)
    assert props["mode"] == "shutdown"
    assert lsn(props["start_lsn"]) <= lsn(props["stop_lsn"])
    assert re.match(r"^[0-9A-F]{24}$", props["start_wal"])
    assert props["pg_version"] == tb.pg_version
    assert props["backup_label"] == ""
    assert len(bt.snapshots_named(name)) == 4


def test_btrfs_failure_on_the_second_subvolume_leaves_no_set_and_no_backup(tb, bt, tmp_path, cleanup):
    cleanup("fail")
    cfg = bt.config(tmp_path, "fail")
    # One by one: bt_data01, bt_data03, bt_data04, then bt_data02 (pg_control).
    # Something of the set's name already in bt_data03's place makes the second
    # fail. --now's clock runs on until the set is named, so the names of the
    # first testbed.SECONDS_OF_DRIFT seconds are all taken there.
    blockers = names_from("fail", "20260101T040100Z")
    os.makedirs(bt.snapshot_dir, exist_ok=True)
    for blocker in blockers:
        sh(["btrfs", "subvolume", "snapshot", "-r", bt.subvolumes[2], bt.path(bt.subvolumes[2] + "@" + blocker)])
    proc = snap(cfg, "--now", "20260101T040100Z", "snapshot")
    assert proc.returncode == 1
    (name,) = set(re.findall(r"fail_\w+Z", proc.stderr))
    assert name in blockers, proc.stderr
    theirs = bt.subvolumes[2] + "@" + name
    assert "%s already exists" % bt.path(theirs) in proc.stderr
    assert "destroyed %s@%s (its set failed)" % (bt.subvolumes[0], name) in proc.stderr
    assert bt.snapshots_named(name) == [theirs]                 # ours deleted, theirs kept
    assert os.listdir(bt.path(theirs)) == []                    # nothing was put inside it
    assert not [e for e in bt.entries() if e.startswith("bt_data") and e.endswith(name + ".json")]
    assert no_snap_session_left(tb, bt.cluster)
    if tb.pg_version == "14":
        assert bt.psql("SELECT pg_is_in_backup()") == "f"
    assert "pruned" not in proc.stderr
    proc = snap(cfg, "--now", "20260101T040200Z", "snapshot", "--no-prune")
    assert proc.returncode == 0, proc.stderr


def test_btrfs_a_path_that_is_no_subvolume_is_a_config_error(tb, bt, tmp_path, cleanup):
    cleanup("missing")
    plain = os.path.join(bt.mount, "plain_dir")
    os.makedirs(plain, exist_ok=True)
    for datasets, says in (([bt.subvolumes[0], plain, bt.subvolumes[1]], "is not a btrfs subvolume"),
                           ([bt.subvolumes[0], "bt/data02"], "not an absolute, normalised")):
        proc = snap(bt.config(tmp_path, "missing", datasets=" ".join(datasets)), "snapshot", "--no-prune")
        assert proc.returncode == 2, proc.stderr
        assert says in proc.stderr
    assert bt.set_names("missing") == []
    assert no_snap_session_left(tb, bt.cluster)


# -- the lock -------------------------------------------------------------------

def test_btrfs_two_concurrent_runs_make_one_set(tb, bt, tmp_path, cleanup):
    cleanup("twice")
    cfg = bt.config(tmp_path, "twice")
    argv = [PY36, os.path.join(BIN, SCRIPT + ".py"), "-c", cfg, "snapshot"]
    with insert_load(tb):
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True) for _ in range(2)]
        results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [code for _, _, code in results] == [0, 0]
    assert len(bt.set_names("twice")) == 1
    assert sum("nothing done" in err for _, err, _ in results) == 1


# -- retention --------------------------------------------------------------------

def write_json(path, value):
    with open(path, "w") as out:
        json.dump(value, out)


def test_btrfs_prune_with_a_fixed_now_destroys_exactly_the_expected_sets(bt, tmp_path, cleanup):
    cleanup("prune")
    cleanup("other")
    cfg = bt.config(tmp_path, "prune", keep_daily=2, keep_weekly=1, keep_monthly=0)
    made = []       # a set is named when its snapshots are taken: --now's clock runs on
    for stamp in ["20260301T040100Z", "20260302T040100Z", "20260303T040100Z",
                  "20260303T120000Z", "20260304T040100Z"]:
        before = set(bt.set_names("prune"))
        proc = snap(cfg, "--now", stamp, "snapshot", "--no-prune")
        assert proc.returncode == 0, proc.stderr
        (name,) = set(bt.set_names("prune")) - before
        assert name in names_from("prune", stamp), name
        made.append(name)
    data01, data02 = bt.subvolumes[0], bt.subvolumes[1]
    # Another tool's snapshot; one of ours without metadata; one with unreadable
    # metadata; and an incomplete set (a run that died after its first snapshot).
    for snapshot in (data02 + "@other_20260101T000000Z", data02 + "@prune_20260101T000000Z",
                     data02 + "@prune_20260102T000000Z", data01 + "@prune_20260228T040100Z"):
        sh(["btrfs", "subvolume", "snapshot", "-r", snapshot.split("@")[0], bt.path(snapshot)])
    with open(bt.path(data02 + "@prune_20260102T000000Z") + ".json", "w") as out:
        out.write('{"set": "prune_20260102T0')                  # cut short
    broken = "prune_20260228T040100Z"
    write_json(bt.path(data01 + "@" + broken) + ".json",
               {"set": broken, "datasets": " ".join(bt.subvolumes)})
    # A drill clone (writable snapshot + marker) depends on the oldest set; a
    # stale marker names a clone that is gone.
    oldest = data02 + "@" + made[0]
    clone = data02 + "_drill_" + made[0]
    markers = os.path.join(bt.snapshot_dir, "clones")
    os.makedirs(markers, exist_ok=True)
    sh(["btrfs", "subvolume", "snapshot", bt.path(oldest), clone])
    write_json(os.path.join(markers, os.path.basename(clone) + ".json"),
               {"clone_of": made[0], "snapshot": oldest, "path": clone,
                "kind": "drill", "created": "2026-03-05T00:00:00Z"})
    stale = os.path.join(markers, "bt_data02_restore_%s.json" % made[1])
    write_json(stale, {"clone_of": made[1], "snapshot": data02 + "@" + made[1],
                       "path": data02 + "_restore_" + made[1], "kind": "restore",
                       "created": "2026-03-04T00:00:00Z"})
    try:
        now = ["--now", "20260305T000000Z"]
        dry = snap(cfg, *(now + ["prune", "--dry-run"]))
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.split() == ["would", "destroy", broken,
                                      "would", "destroy", made[1],
                                      "would", "destroy", made[2]]
        assert "%s has clones (%s)" % (made[0], clone) in dry.stderr
        assert "%s@prune_20260101T000000Z has no readable metadata" % data02 in dry.stderr
        assert "%s@prune_20260102T000000Z has no readable metadata" % data02 in dry.stderr
        assert "clone marker %s: its clone" % stale in dry.stderr
        table = snap(cfg, *(now + ["list"]))
        assert "\tNO-METADATA %s@prune_20260101T000000Z" % data02 in table.stdout
        listed = json.loads(snap(cfg, *(now + ["list", "--json"])).stdout)
        assert [entry["name"] for entry in listed] == [broken] + made
        assert listed[1]["clones"] == [clone] and listed[0]["complete"] is False

        proc = snap(cfg, *(now + ["prune"]))
        assert proc.returncode == 0, proc.stderr
        assert bt.set_names("prune") == ["prune_20260101T000000Z", "prune_20260102T000000Z",
                                         made[0], made[3], made[4]]
        assert proc.stderr.count("pruned set") == 3
        assert not [e for e in bt.entries() if e.endswith(".json") and
                    ("20260302T" in e or "20260303T04" in e or broken in e)]
        assert bt.snapshots_named("other_20260101T000000Z")
        assert os.path.isdir(clone)

        oldest_wal = snap(cfg, "oldest-wal")
        assert oldest_wal.returncode == 0, oldest_wal.stderr
        assert oldest_wal.stdout.strip() == bt.metadata(oldest)["start_wal"]
    finally:
        sh(["btrfs", "subvolume", "delete", clone])
        for marker in os.listdir(markers):
            os.unlink(os.path.join(markers, marker))


def test_btrfs_cron_run_takes_a_set_then_prunes(bt, tmp_path, cleanup):
    cleanup("cron")
    cfg = bt.config(tmp_path, "cron", keep_daily=0, keep_weekly=0, keep_monthly=0)
    assert snap(cfg, "--now", "20250101T040100Z", "snapshot", "--no-prune").returncode == 0
    (old,) = bt.set_names("cron")       # named when taken: --now's clock runs on
    assert old in names_from("cron", "20250101T040100Z"), old
    proc = snap(cfg)
    assert proc.returncode == 0, proc.stderr
    names = bt.set_names("cron")
    assert len(names) == 1 and names[0] != old
    assert "pruned set %s" % old in proc.stderr
    assert not [e for e in bt.entries() if old in e]


# -- check ------------------------------------------------------------------------

def test_btrfs_check_gives_each_of_its_four_states(bt, tmp_path, cleanup):
    cleanup("check")
    cfg = bt.config(tmp_path, "check", warn_age=3600, crit_age=7200)

    def check(now, config_path=cfg):
        proc = snap(config_path, "--now", now, "check")
        assert NAGIOS_LINE.match(proc.stdout.strip()), proc.stdout
        return proc.returncode, proc.stdout.split()[1]

    assert check("20260601T000000Z") == (2, "CRITICAL")
    assert snap(cfg, "--now", "20260601T000000Z", "snapshot", "--no-prune").returncode == 0
    assert check("20260601T003000Z") == (0, "OK")
    assert check("20260601T013000Z") == (1, "WARNING")
    assert check("20260601T023000Z") == (2, "CRITICAL")
    broken = bt.config(tmp_path, "check", "broken.conf", datasets="relative/path")
    assert check("20260601T003000Z", broken) == (3, "UNKNOWN")
