"""pg_zfs_restore.py with `backend = btrfs`, run as a process, as root, against a
real loop-mounted btrfs (tb.btrfs): the tests of tests/test_restore.py that
prove the product, on a streaming standby of this module's own whose PGDATA and
tablespace are btrfs subvolumes (MOUNT/rs/data02, MOUNT/rs/data01; data03 and
data04 empty; pg_wal under the run directory), sets taken by pg_zfs_snap.py,
WAL fetched by pg_wal_fetch.py over ssh from the two archive hosts.

Clones go to [restore] mount_root = MOUNT/rs_clones (on the same btrfs), their
markers to MOUNT/rs/.pgzfs/clones (DEVELOPERS.md, btrfs layout). The rollback
is done for real on a second, throwaway standby (MOUNT/rb).
"""

import glob
import hashlib
import json
import os
import re
import time

import pytest

from testbed import PG_USER, chown_pg, run_script, sh, wait_for
from test_restore import (Story, work_dirs, assert_a_promoted_restore_leaves_untouched,
                          assert_rows_up_to, parse_iso, pgdata_fingerprint, pitr_story, restored)

SCRIPT = "pg_zfs_restore"
SHORTS = ("data01", "data02", "data03", "data04")


class BtrfsStandby(object):
    """A streaming standby of tb.primary on subvolumes MOUNT/PARENT/dataNN: PGDATA on
    data02, tablespace ts1 on data01, pg_wal under the run directory (not on btrfs)."""

    def __init__(self, tb, parent, prefix, shorts=SHORTS):
        self.tb = tb
        self.prefix = prefix
        self.parent = os.path.join(tb.btrfs.mountpoint, parent)
        os.makedirs(self.parent)
        self.subvolumes = [tb.btrfs.create(os.path.join(parent, short)) for short in shorts]
        for subvolume in self.subvolumes:
            chown_pg(subvolume)
        self.pgdata = os.path.join(self.subvolumes[1], "pgdata")
        self.ts1 = os.path.join(self.subvolumes[0], "ts1")
        self.cluster = tb.make_standby(parent + "_standby", self.pgdata, self.ts1)
        self.waldir = self.cluster.waldir
        self.wal_root = os.path.join(tb.run_dir, parent + "_restore_wal")
        self.clone_root = os.path.join(tb.btrfs.mountpoint, parent + "_clones")
        self.config = self.write_config(parent + "_restore.conf")

    def write_config(self, file_name, restore_keys=None):
        sections = self.tb.archive_config()
        cluster = self.cluster
        sections.update({
            "postgres": {"pgdata": self.pgdata, "bindir": self.tb.pg_bindir, "user": PG_USER,
                         "host": cluster.socket_dir, "port": str(cluster.port), "dbname": "postgres"},
            "snapshot": {"backend": "btrfs", "datasets": " ".join(self.subvolumes), "prefix": self.prefix,
                         "lock_file": os.path.join(self.tb.run_dir, self.prefix + "_snap.lock"),
                         "state_file": os.path.join(self.tb.run_dir, self.prefix + "_snap.json")},
        })
        sections["restore"] = {"mount_root": self.clone_root, "wal_root": self.wal_root, "timeout": "240"}
        sections["restore"].update(restore_keys or {})
        return self.tb.write_config(os.path.join(self.tb.run_dir, file_name), sections=sections)

    @property
    def snapshot_dir(self):
        return os.path.join(self.parent, ".pgzfs")

    @property
    def marker_dir(self):
        return os.path.join(self.snapshot_dir, "clones")

    def snapshot_path(self, subvolume, name):
        return os.path.join(self.snapshot_dir, "%s@%s" % (os.path.basename(subvolume), name))

    def set_names(self):
        entries = os.listdir(self.snapshot_dir) if os.path.isdir(self.snapshot_dir) else []
        return sorted(set(e.split("@", 1)[1] for e in entries
                          if "@" in e and not e.endswith(".json") and e.split("@", 1)[1].startswith(self.prefix + "_")))

    def snap(self):
        proc = run_script("pg_zfs_snap", "snapshot", "--no-prune", config=self.config, timeout=180)
        assert proc.returncode == 0, proc.stderr
        return proc

    def leftovers(self):
        """Clone markers, and clones (subvolumes) in the clone root or beside the subvolumes."""
        markers = os.listdir(self.marker_dir) if os.path.isdir(self.marker_dir) else []
        clones = glob.glob(os.path.join(self.clone_root, "*")) + [
            path for path in glob.glob(os.path.join(self.parent, "*"))
            if re.search(r"_(restore|drill)_", os.path.basename(path))]
        return markers + clones + work_dirs(self.wal_root)


def restore_script(config, *args, timeout=300):
    return run_script(SCRIPT, *args, config=config, timeout=timeout)


def is_subvolume(path):
    return os.path.isdir(path) and os.lstat(path).st_ino == 256


def read_only(path):
    return sh(["btrfs", "property", "get", "-ts", path, "ro"]).stdout.strip()


@pytest.fixture(scope="module")
def story(tb):
    """Set A; T, its LSN, a restore point; set B; all rows of the primary."""
    standby = BtrfsStandby(tb, "rs", "rs")
    s = Story()
    s.tb = tb
    s.bt = standby
    s.config = standby.config
    s.leftovers = standby.leftovers
    try:
        pitr_story(tb, s, standby.snap, "pitr_point_bt_%d" % int(time.time() * 1000))
        s.sets = standby.set_names()
        assert len(s.sets) == 2
        yield s
    finally:
        restore_script(standby.config, "cleanup", "--all")
        standby.cluster.stop()


# -- the product --------------------------------------------------------------

def test_btrfs_pitr_restore_to_a_time_between_two_sets_has_exactly_the_rows_committed_by_then(story):
    bt = story.bt
    target = story.target_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with restored(story, "--target-time", target, "--action", "promote") as copy:
        assert "restored set %s to" % story.sets[0] in copy.out
        assert ": promoted" in copy.out
        assert "recovery stopping before commit" in copy.out
        assert re.search(r"steps: clone [0-9.]+s, prepare [0-9.]+s, start [0-9.]+s, recover", copy.out)
        assert copy.psql("SELECT pg_is_in_recovery()") == "f"
        assert_rows_up_to(story, copy.rows(), story.target_time, story.target_committed)
        # The clones are writable snapshots in mount_root, each with its marker.
        clones = sorted(os.path.join(bt.clone_root, "%s_restore_%s" % (os.path.basename(s), story.sets[0]))
                        for s in bt.subvolumes)
        assert sorted(glob.glob(os.path.join(bt.clone_root, "*"))) == clones
        assert all(is_subvolume(clone) and read_only(clone) == "ro=false" for clone in clones)
        assert copy.pgdata == os.path.join(bt.clone_root, "data02_restore_" + story.sets[0], "pgdata")
        for clone in clones:
            name = os.path.basename(clone)
            with open(os.path.join(bt.marker_dir, name + ".json")) as marker_file:
                marker = json.load(marker_file)
            subvolume = os.path.join(bt.parent, name.split("_restore_")[0])
            assert marker["snapshot"] == subvolume + "@" + story.sets[0]
            assert marker["path"] == clone and marker["clone_of"] == story.sets[0]
            assert marker["kind"] == "restore"
        # pg_zfs_snap.py sees them through the markers (its prune keeps the set).
        listing = json.loads(run_script("pg_zfs_snap", "list", "--json", config=story.config).stdout)
        assert [entry["clones"] for entry in listing if entry["name"] == story.sets[0]] == [clones]
        # The copy archives nothing, keeps its WAL off btrfs and its tablespace in the clone.
        assert copy.psql("SHOW archive_mode") == "off"
        copy.psql("INSERT INTO pitr (at) VALUES (now()); SELECT pg_switch_wal()")
        assert os.readlink(os.path.join(copy.pgdata, "pg_wal")).startswith(bt.wal_root)
        tablespace_links = [os.readlink(p) for p in glob.glob(os.path.join(copy.pgdata, "pg_tblspc", "*"))]
        assert tablespace_links == [os.path.join(bt.clone_root, "data01_restore_" + story.sets[0], "ts1")]
        assert int(copy.psql("SELECT count(*) FROM smoke")) >= 0    # the ts1 tablespace reads
        time.sleep(1)
        for host in story.tb.hosts:
            assert not [name for name in os.listdir(host.wal_dir) if not name.startswith("00000001")]
        assert not [name for name in os.listdir(bt.waldir) if name.startswith("00000002")]


def test_btrfs_latest_replays_the_whole_archive_and_opens(story):
    with restored(story, "--latest") as copy:
        assert "restored set %s to end of archive: promoted" % story.sets[1] in copy.out
        assert copy.rows() == story.rows


def test_btrfs_target_name_stops_at_the_restore_point(story):
    with restored(story, "--target-name", story.point_name, "--action", "promote") as copy:
        assert "recovery stopping at restore point \"%s\"" % story.point_name in copy.out
        assert_rows_up_to(story, copy.rows(), story.point_time, story.point_committed)


def test_btrfs_target_before_every_set_is_refused_naming_the_earliest_possible(story):
    proc = restore_script(story.config, "restore", "--target-time", "2000-01-01T00:00:00Z")
    assert proc.returncode == 1
    assert "earliest possible target is" in proc.stderr and "(set %s)" % story.sets[0] in proc.stderr
    assert story.bt.leftovers() == []


def test_btrfs_list_shows_each_set_and_a_snapshot_without_metadata_as_not_a_backup(story):
    bt = story.bt
    stray = bt.snapshot_path(bt.subvolumes[3], bt.prefix + "_20200101T000000Z")
    sh(["btrfs", "subvolume", "snapshot", "-r", bt.subvolumes[3], stray])
    try:
        proc = restore_script(story.config, "list")
        assert proc.returncode == 0, proc.stderr
        for name in story.sets:
            line = [l for l in proc.stdout.splitlines() if l.startswith(name)][0]
            with open(bt.snapshot_path(bt.subvolumes[1], name) + ".json") as metadata:
                stored = json.load(metadata)
            # The database's own time when the set has it, else the guest's stop time.
            stop = parse_iso(stored.get("db_time") or stored["stop_time"])
            assert parse_iso(re.search(r" (\d{4}-\d\d-\d\dT[0-9:.]+Z) ", line).group(1)) == stop
            assert " yes " in line
        assert "NO-METADATA %s@%s_20200101T000000Z" % (bt.subvolumes[3], bt.prefix) in proc.stdout
        assert "has no readable metadata" in proc.stderr
        listing = json.loads(restore_script(story.config, "list", "--json").stdout)
        assert [entry["name"] for entry in listing] == story.sets
        # Never chosen: the oldest target is still served by the first real set.
        proc = restore_script(story.config, "restore", "--target-time", "2000-01-01T00:00:00Z")
        assert "(set %s)" % story.sets[0] in proc.stderr
    finally:
        sh(["btrfs", "subvolume", "delete", stray])


def test_btrfs_no_start_prepares_the_clones_and_cleanup_leaves_no_clone_and_no_marker(story):
    bt = story.bt
    proc = restore_script(story.config, "restore", "--immediate", "--no-start")
    assert proc.returncode == 0, proc.stderr
    pgdata = os.path.join(bt.clone_root, "data02_restore_" + story.sets[1], "pgdata")
    label = os.stat(os.path.join(pgdata, "backup_label"))
    assert label.st_mode & 0o777 == 0o600 and label.st_uid == os.stat(pgdata).st_uid
    assert not os.path.exists(os.path.join(pgdata, "standby.signal"))
    assert sorted(os.listdir(bt.marker_dir)) == sorted(
        "%s_restore_%s.json" % (os.path.basename(s), story.sets[1]) for s in bt.subvolumes)
    listing = json.loads(restore_script(story.config, "list", "--json").stdout)
    assert [s["clones"] for s in listing if s["name"] == story.sets[1]][0] == sorted(
        os.path.join(bt.clone_root, "%s_restore_%s" % (os.path.basename(s), story.sets[1]))
        for s in bt.subvolumes)
    proc = restore_script(story.config, "cleanup", story.sets[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("destroyed ") == 4
    assert bt.leftovers() == []


def test_btrfs_mount_root_off_btrfs_puts_the_clones_beside_the_subvolumes_and_to_is_refused(story, tmp_path):
    bt = story.bt
    off_btrfs = bt.write_config("rs_off_btrfs.conf", {"mount_root": str(tmp_path / "elsewhere")})
    proc = restore_script(off_btrfs, "restore", "--immediate", "--no-start")
    assert proc.returncode == 0, proc.stderr
    try:
        for subvolume in bt.subvolumes:
            assert is_subvolume("%s_restore_%s" % (subvolume, story.sets[1]))
        assert not os.path.exists(str(tmp_path / "elsewhere"))
        assert os.path.join(bt.parent, "data02_restore_" + story.sets[1], "pgdata") in proc.stdout
    finally:
        cleanup = restore_script(off_btrfs, "cleanup", "--all")
        assert cleanup.returncode == 0, cleanup.stderr
    assert bt.leftovers() == []
    proc = restore_script(story.config, "restore", "--immediate", "--to", str(tmp_path / "to"))
    assert proc.returncode == 2
    assert "a snapshot cannot cross file systems" in proc.stderr
    assert bt.leftovers() == [] and not os.path.exists(str(tmp_path / "to"))


def test_btrfs_wal_root_on_btrfs_is_refused(story):
    on_btrfs = story.bt.write_config("rs_wal_on_btrfs.conf",
                                     {"wal_root": os.path.join(story.tb.btrfs.mountpoint, "rs_wal")})
    proc = restore_script(on_btrfs, "restore", "--immediate")
    assert proc.returncode == 2
    assert "wal_root %s is on btrfs" % os.path.join(story.tb.btrfs.mountpoint, "rs_wal") in proc.stderr
    assert story.bt.leftovers() == []


def test_btrfs_dry_run_prints_every_step_and_changes_nothing(story):
    bt = story.bt
    proc = restore_script(story.config, "restore", "--immediate", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "dry-run: write clone marker %s/data02_restore_%s.json, then btrfs subvolume snapshot " \
        "%s %s/data02_restore_%s" % (bt.marker_dir, story.sets[1],
                                     bt.snapshot_path(bt.subvolumes[1], story.sets[1]),
                                     bt.clone_root, story.sets[1]) in proc.stdout
    assert "nothing was changed" in proc.stdout
    assert bt.leftovers() == []


def test_btrfs_source_subvolumes_and_the_running_standby_are_untouched(story):
    bt = story.bt

    def fingerprint():
        files = pgdata_fingerprint(bt.pgdata)
        files["parent"] = sorted(os.listdir(bt.parent))
        files["sets"] = sorted(e for e in os.listdir(bt.snapshot_dir) if e != "clones")
        files["metadata"] = [hashlib.sha256(open(p, "rb").read()).hexdigest()
                             for p in sorted(glob.glob(os.path.join(bt.snapshot_dir, "*.json")))]
        files["ro"] = [read_only(bt.snapshot_path(s, name)) for s in bt.subvolumes for name in story.sets]
        return files

    assert_a_promoted_restore_leaves_untouched(story, fingerprint, bt.cluster,
                                               "after the btrfs restore")


# -- drill --------------------------------------------------------------------

def test_btrfs_drill_passes_with_a_nagios_line(story):
    proc = restore_script(story.config, "drill", "--query", "SELECT count(*) FROM pitr")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = proc.stdout.strip()
    assert len(line.splitlines()) == 1
    assert re.match(r"^OK: drill of set %s .*clone [0-9.]+s, prepare [0-9.]+s, start [0-9.]+s, "
                    r"recover [0-9.]+s, query [0-9.]+s, stop [0-9.]+s, destroy [0-9.]+s; total [0-9.]+s$"
                    % story.sets[1], line), line
    assert story.bt.leftovers() == []


def test_btrfs_drill_fails_with_exit_2_when_the_set_has_lost_its_backup_label(story):
    bt = story.bt
    path = bt.snapshot_path(bt.subvolumes[1], story.sets[1]) + ".json"
    original = open(path).read()
    metadata = json.loads(original)
    metadata["backup_label"] = ""
    with open(path, "w") as out:
        json.dump(metadata, out)
    try:
        proc = restore_script(story.config, "drill")
        assert proc.returncode == 2
        assert proc.stdout.startswith("CRITICAL:")
        assert "backup_label" in proc.stdout
        assert bt.leftovers() == []
    finally:
        with open(path, "w") as out:
            out.write(original)


# -- rollback -----------------------------------------------------------------

def test_btrfs_rollback_names_the_later_sets_it_keeps_and_refuses_while_the_standby_runs(story):
    bt = story.bt
    proc = restore_script(story.config, "rollback", "--set", story.sets[0], "--force")
    assert proc.returncode == 1
    assert "rollback to set %s keeps %d later snapshot(s):" % (story.sets[0], len(bt.subvolumes)) in proc.stdout
    for subvolume in bt.subvolumes:
        assert "%s@%s" % (subvolume, story.sets[1]) in proc.stdout
    assert "PostgreSQL runs on the datasets" in proc.stderr
    assert bt.set_names() == story.sets
    assert not glob.glob(os.path.join(bt.parent, "*_rollback_*"))


def test_btrfs_rollback_replaces_the_subvolumes_of_a_stopped_standby_and_keeps_the_old_ones(tb):
    own = BtrfsStandby(tb, "rb", "rb", shorts=("data01", "data02"))
    try:
        own.snap()
        [first] = own.set_names()
        after_first = os.path.join(own.subvolumes[0], "written_after_the_first_set")
        with open(after_first, "w") as out:
            out.write("gone after the rollback\n")
        time.sleep(1.1)     # set names have one-second resolution
        own.snap()
        later = [n for n in own.set_names() if n != first]
        assert len(later) == 1
        own.cluster.stop()

        proc = restore_script(own.config, "rollback", "--set", first)
        assert proc.returncode == 1 and "refusing to roll back without --force" in proc.stderr
        assert os.path.exists(after_first)

        proc = restore_script(own.config, "rollback", "--set", first, "--force")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "rollback to set %s keeps 2 later snapshot(s):" % first in proc.stdout
        kept = re.findall(r"the old subvolume is kept as (\S+) ", proc.stdout)
        assert len(kept) == 2
        for subvolume, old in zip(own.subvolumes, kept):
            assert re.match(re.escape(subvolume) + r"_before_rollback_\d{8}T\d{6}Z$", old)
            assert is_subvolume(old) and is_subvolume(subvolume)
            assert read_only(subvolume) == "ro=false"
        assert not os.path.exists(after_first)
        assert os.path.exists(os.path.join(kept[0], os.path.basename(after_first)))
        assert own.set_names() == sorted([first] + later)          # every set stays
        assert not glob.glob(os.path.join(own.parent, "*_rollback_%s" % first))
        assert os.path.exists(os.path.join(own.pgdata, "backup_label"))
        assert not os.path.exists(os.path.join(own.pgdata, "postmaster.pid"))

        # The rolled-back standby starts, replays from the set and follows the primary again.
        own.cluster.start()
        assert own.cluster.psql("SELECT pg_is_in_recovery()") == "t"
        tb.primary.psql("INSERT INTO smoke (note) VALUES ('after the btrfs rollback')")
        wait_for(lambda: own.cluster.psql(
            "SELECT count(*) FROM smoke WHERE note = 'after the btrfs rollback'") == "1",
            60, "the rolled-back standby to follow the primary")
    finally:
        own.cluster.stop()
