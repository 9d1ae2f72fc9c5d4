"""The paths only kernel OpenZFS takes, run where it runs (make test-guest: the
suite inside the KVM guest of tools/guest.py; on zfs-fuse they are skipped, and
the rest of the suite covers zfs-fuse's own paths).

- One atomic `zfs snapshot a@x b@x ...` for a set whose datasets share a pool:
  every snapshot of the set is born in the same transaction group.
- Exact sizes: `zfs list -p` (zfs-fuse has no -p and rounds to 3 digits).
- The resume token of a cut receive is covered in tests/test_replicate.py
  (test_a_receive_killed_mid_stream_...: OpenZFS resumes, zfs-fuse sends again).
"""

import json

import pytest

from testbed import kernel_zfs, run_script, sh, wait_for

pytestmark = pytest.mark.skipif(not kernel_zfs(), reason="kernel OpenZFS only (make test-guest); here zfs-fuse")

PREFIX = "ozfs"


def snap(config, *args):
    return run_script("pg_zfs_snap", *args, config=config, timeout=300)


def set_names(tb):
    return sorted(set(s.split("@", 1)[1] for s in tb.zfs.snapshots() if s.split("@", 1)[1].startswith(PREFIX + "_")))


def take_set(tb, config):
    before = set(set_names(tb))
    proc = snap(config, "-v", "snapshot", "--no-prune")
    assert proc.returncode == 0, proc.stderr
    [name] = set(set_names(tb)) - before
    return name, proc.stderr


def exact(tb, snapshot, prop):
    return int(sh(["zfs", "get", "-Hp", "-o", "value", prop, snapshot]).stdout.strip())


@pytest.fixture
def config(tb, tmp_path):
    tb.standby
    cfg = tb.write_config(str(tmp_path / "pg_zfs.conf"), {"snapshot": {
        "prefix": PREFIX, "keep_hourly": 0, "keep_daily": 7, "keep_weekly": 0, "keep_monthly": 0}})
    yield cfg
    for snapshot in tb.zfs.snapshots():
        if snapshot.split("@", 1)[1].startswith(PREFIX + "_"):
            tb.zfs.destroy(snapshot)


def test_a_set_in_one_pool_is_one_atomic_snapshot_every_member_born_in_the_same_txg(tb, config):
    name, err = take_set(tb, config)
    snapshots = ["%s@%s" % (dataset, name) for dataset in tb.datasets]
    assert len(snapshots) == 4
    assert len(set(exact(tb, snapshot, "createtxg") for snapshot in snapshots)) == 1
    assert "one by one" not in err


def test_list_gives_each_sets_space_in_exact_bytes(tb, config):
    first, _ = take_set(tb, config)
    # Rows the standby replays after the first set: its blocks diverge.
    tb.primary.psql("CREATE TABLE ozfs_fill AS SELECT g, md5(g::text) AS m FROM generate_series(1, 50000) g")
    lsn = tb.primary.psql("SELECT pg_current_wal_lsn()")
    wait_for(lambda: tb.standby.psql("SELECT pg_last_wal_replay_lsn() >= '%s'" % lsn) == "t", 60,
             "the standby to replay the table")
    tb.primary.psql("DROP TABLE ozfs_fill")
    sh(["sync"])
    take_set(tb, config)
    proc = snap(config, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    used = dict((entry["name"], entry["used_bytes"]) for entry in json.loads(proc.stdout))
    expected = sum(exact(tb, "%s@%s" % (dataset, first), "used") for dataset in tb.datasets)
    assert expected > 0 and used[first] == expected
