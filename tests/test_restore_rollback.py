"""pg_zfs_restore.py rollback on the real zfs-fuse pool: it destroys exactly the
later snapshots it lists, also past txg 1000 (where zfs-fuse prints createtxg as
1.12K), and refuses, changing nothing, when a later snapshot is not a set of
this config.

The sets here are made by hand (zfs snapshot -o pgzfs:...=...), as
pg_zfs_snap.py makes a `shutdown` set of a stopped cluster: rollback reads only
the pool, and what it does to the pool is what these tests are about.
"""

import itertools
import os
import re

import pytest

from testbed import PG_USER, chown_pg, kernel_zfs, run_script

PREFIX = "rbk"
TAGS = itertools.count(1)


def hand_made_set(tb, datasets, name):
    """A complete shutdown-mode set NAME (PREFIX_YYYYmmddTHHMMSSZ) of datasets, the last
    one holding PGDATA, with the pgzfs: properties pg_zfs_snap.py writes."""
    stamp = name.rpartition("_")[2]
    iso = re.sub(r"^(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z$", r"\1-\2-\3T\4:\5:\6Z", stamp)
    props = {"version": "0.1.0", "set": name, "datasets": " ".join(datasets),
             "pgdata_dataset": datasets[-1], "pgdata_rel": "pgdata", "mode": "shutdown",
             "start_lsn": "0/3000028", "start_wal": "000000010000000000000003", "timeline": "1",
             "start_time": iso, "stop_time": iso, "pg_version": tb.pg_version,
             "system_identifier": "7000000000000000001", "stop_lsn": "0/3000028"}
    for dataset in datasets:
        argv = ["snapshot"]
        for key, value in sorted(props.items()):
            argv += ["-o", "pgzfs:%s=%s" % (key, value)]
        tb.zfs.run(*(argv + ["%s@%s" % (dataset, name)]))
    return name


class Own(object):
    """Two datasets of the test's own, a PGDATA on the second, a config for them."""

    def __init__(self, tb, tag):
        self.tb = tb
        self.datasets = [tb.zfs.create("%s_ts" % tag), tb.zfs.create("%s_pg" % tag)]
        self.pgdata = os.path.join(tb.zfs.mountpoint(self.datasets[1]), "pgdata")
        os.mkdir(self.pgdata, 0o700)
        with open(os.path.join(self.pgdata, "PG_VERSION"), "w") as out:
            out.write("%s\n" % tb.pg_version)
        chown_pg(self.pgdata, os.path.join(self.pgdata, "PG_VERSION"))
        self.config = tb.write_config(os.path.join(tb.run_dir, "%s.conf" % tag), sections={
            "postgres": {"pgdata": self.pgdata, "bindir": tb.pg_bindir, "user": PG_USER},
            "snapshot": {"backend": "zfs", "datasets": " ".join(self.datasets), "prefix": PREFIX},
            "restore": {"mount_root": os.path.join(tb.run_dir, "%s_mnt" % tag),
                        "wal_root": os.path.join(tb.run_dir, "%s_wal" % tag)}})

    def take_set(self, stamp, prefix=PREFIX):
        """A complete shutdown-mode set PREFIX_STAMP of both datasets (PGDATA's last)."""
        return hand_made_set(self.tb, self.datasets, "%s_%s" % (prefix, stamp))

    def snapshots(self):
        return sorted(s for s in self.tb.zfs.snapshots() if s.split("@")[0] in self.datasets)

    def write(self, name, text):
        with open(os.path.join(self.pgdata, name), "w") as out:
            out.write(text)

    def pgdata_files(self):
        return sorted(os.listdir(self.pgdata))

    def bump_txg(self, count):
        """Let the pool's transaction group number grow by about 2 * count."""
        for number in range(count):
            self.tb.zfs.run("set", "pgzfs:bump=%d" % number, self.datasets[0])

    def createtxg(self, snapshot):
        return self.tb.zfs.run("get", "-H", "-o", "value", "createtxg", snapshot).strip()

    def remove(self):
        for dataset in self.datasets:
            self.tb.zfs.destroy(dataset, recursive=True)


@pytest.fixture
def own(tb):
    made = Own(tb, "rb%d" % next(TAGS))
    yield made
    made.remove()
    assert not [s for s in tb.zfs.snapshots() if s.split("@")[0] in made.datasets]


def rollback(own, *args):
    return run_script("pg_zfs_restore", "rollback", *args, config=own.config, timeout=180)


@pytest.mark.host_only("createtxg past 1000, which zfs-fuse prints rounded (1.02K); OpenZFS's exact createtxg is read by every other rollback test")
def test_rollback_past_txg_1000_destroys_exactly_the_later_sets_it_lists(own):
    first = own.take_set("20261125T040100Z")
    own.write("after_first", "x")
    own.bump_txg(550)
    second = own.take_set("20261125T050100Z")
    own.write("after_second", "x")
    third = own.take_set("20261125T060100Z")
    if not kernel_zfs():
        assert own.createtxg(own.datasets[1] + "@" + second).endswith("K")   # what zfs-fuse prints
    assert int(own.tb.zfs.run("get", "-Hp", "-o", "value", "createtxg", own.datasets[1] + "@" + second)) > 1000

    proc = rollback(own, "--set", second, "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rollback to set %s destroys 2 later snapshot(s):" % second in proc.stdout
    assert own.snapshots() == sorted("%s@%s" % (d, s) for d in own.datasets for s in (first, second))
    assert "after_second" not in own.pgdata_files() and "after_first" in own.pgdata_files()

    proc = rollback(own, "--set", first, "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rollback to set %s destroys 2 later snapshot(s):" % first in proc.stdout
    for dataset in own.datasets:
        assert "  %s@%s" % (dataset, second) in proc.stdout
    assert own.snapshots() == sorted("%s@%s" % (d, first) for d in own.datasets)
    assert own.pgdata_files() == ["PG_VERSION"]


@pytest.mark.parametrize("stranger", ["by_hand", pytest.param("zz_20261125T060100Z", marks=pytest.mark.host_only(
    "another config's set is our decision; a snapshot by hand runs in the guest"))])
def test_rollback_refuses_and_changes_nothing_when_a_later_snapshot_is_no_set_of_this_config(own, stranger):
    first = own.take_set("20261125T040100Z")
    own.bump_txg(30)
    own.take_set("20261125T050100Z")
    if stranger == "by_hand":
        own.tb.zfs.run("snapshot", "%s@%s" % (own.datasets[0], stranger))
    else:       # another config's set: another prefix on the same datasets
        hand_made_set(own.tb, own.datasets, stranger)
    own.write("after_first", "x")
    before = own.snapshots()

    proc = rollback(own, "--set", first, "--force")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "%s@%s" % (own.datasets[0], stranger) in errors[0], proc.stderr
    assert "refused" in errors[0]
    assert own.snapshots() == before
    assert "after_first" in own.pgdata_files()


def test_rollback_without_force_lists_and_changes_nothing(own):
    first = own.take_set("20261125T040100Z")
    own.take_set("20261125T050100Z")
    before = own.snapshots()
    proc = rollback(own, "--set", first)
    assert proc.returncode == 1
    assert "without --force" in proc.stderr
    assert own.snapshots() == before
