"""pg_zfs_restore.py rollback on the real zfs-fuse pool when several sets come
after the one rolled back to: one of them incomplete (a snapshot run that died
after its first dataset), one of them with a clone (a restore of it still
there). Rollback destroys exactly what it lists, or refuses changing nothing.
"""

from test_restore_rollback import Own, TAGS, rollback  # noqa: F401

import pytest


@pytest.fixture
def own(tb):
    made = Own(tb, "rbe%d" % next(TAGS))
    yield made
    for dataset in made.datasets:
        for name in tb.zfs.run("list", "-H", "-t", "filesystem", "-o", "name,origin").splitlines():
            if name.split("\t")[1].startswith(dataset + "@"):
                tb.zfs.destroy(name.split("\t")[0])
    made.remove()


def died_after_first_dataset(own, stamp):
    """What a pg_zfs_snap.py run that died leaves: the set's snapshot of its first dataset,
    without pgzfs:stop_lsn."""
    name = "rbk_%s" % stamp
    own.tb.zfs.run("snapshot", "-o", "pgzfs:set=%s" % name, "-o", "pgzfs:datasets=%s" % " ".join(own.datasets),
                   "-o", "pgzfs:pgdata_dataset=%s" % own.datasets[1], "-o", "pgzfs:mode=shutdown",
                   "%s@%s" % (own.datasets[0], name))
    return name


def test_rollback_past_three_later_sets_one_incomplete_destroys_exactly_those(own):
    first = own.take_set("20261125T040100Z")
    own.write("after_first", "x")
    later = [own.take_set("20261125T050100Z"), died_after_first_dataset(own, "20261125T053000Z"),
             own.take_set("20261125T060100Z")]
    proc = rollback(own, "--set", first, "--force")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rollback to set %s destroys 5 later snapshot(s):" % first in proc.stdout
    assert own.snapshots() == sorted("%s@%s" % (d, first) for d in own.datasets)
    assert own.pgdata_files() == ["PG_VERSION"]
    assert all(name in proc.stdout for name in later)


def test_rollback_refuses_and_changes_nothing_when_a_later_set_has_a_clone(own):
    first = own.take_set("20261125T040100Z")
    second = own.take_set("20261125T050100Z")
    third = own.take_set("20261125T060100Z")
    own.write("after_first", "x")
    own.tb.zfs.run("clone", "-o", "pgzfs:clone_of=%s" % third, "%s@%s" % (own.datasets[1], third),
                   "%s_restore_%s" % (own.datasets[1], third))
    before = own.snapshots()
    proc = rollback(own, "--set", first, "--force")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "clones" in errors[0], proc.stderr
    assert own.snapshots() == before and second in " ".join(before)
    assert "after_first" in own.pgdata_files()
