"""pg_zfs_restore.py's btrfs decisions, without a file system: where snapshots,
clones, markers and rollback subvolumes go (DEVELOPERS.md, btrfs layout), which
metadata is a backup, and the config check."""

import json

import pytest

from testbed import load_script

restore = load_script("pg_zfs_restore")

MOUNTS = restore.parse_mounts("/dev/sda1 / ext4 rw 0 0\n"
                              "/dev/loop3 /srv/bt btrfs rw 0 0\n"
                              "/dev/loop3 /mnt/bt_again btrfs rw 0 0\n"
                              "/dev/loop4 /srv/other_bt btrfs rw 0 0\n")


def test_snapshot_and_marker_paths_follow_developers_md():
    assert restore.btrfs_snapshot_path("/srv/bt/data02@pgzfs_20261125T040100Z") == \
        "/srv/bt/.pgzfs/data02@pgzfs_20261125T040100Z"
    assert restore.btrfs_marker_path("/srv/bt/data02", "/srv/bt/data02_restore_s1") == \
        "/srv/bt/.pgzfs/clones/data02_restore_s1.json"
    # The marker sits beside the source's snapshots wherever the clone is.
    assert restore.btrfs_marker_path("/srv/bt/data02", "/srv/bt/restore/data02_drill_s1") == \
        "/srv/bt/.pgzfs/clones/data02_drill_s1.json"
    assert restore.clone_kind("/srv/bt/data02_drill_s1", "s1") == "drill"


def test_clones_go_to_mount_root_when_it_is_on_the_same_btrfs():
    assert restore.btrfs_clone_root("/srv/bt/data02", "/srv/bt/restore", False, MOUNTS) == "/srv/bt/restore"
    assert restore.btrfs_clone_root("/srv/bt/data02", "/mnt/bt_again/r", True, MOUNTS) == "/mnt/bt_again/r"


def test_clones_go_beside_the_subvolume_when_mount_root_is_on_another_file_system():
    for root in ("/var/lib/pg_zfs/restore", "/srv/other_bt/restore"):
        assert restore.btrfs_clone_root("/srv/bt/data02", root, False, MOUNTS) == "/srv/bt"


def test_an_explicit_to_on_another_file_system_is_refused_with_exit_2():
    with pytest.raises(restore.Failure) as error:
        restore.btrfs_clone_root("/srv/bt/data02", "/var/tmp/r", True, MOUNTS)
    assert error.value.code == 2
    assert "cannot cross file systems" in str(error.value) and "/srv/bt/data02" in str(error.value)


def test_metadata_must_be_an_object_of_strings_with_a_set():
    text = json.dumps({"set": "s1", "datasets": "/srv/bt/a", "backup_label": "QQ==", "future_key": 3})
    assert restore.parse_metadata(text) == {"set": "s1", "datasets": "/srv/bt/a", "backup_label": "QQ=="}
    for bad in ('{"set": "s1', '["s1"]', '{"datasets": "/srv/bt/a"}', '{"set": ""}',
                '{"set": "s1", "stop_lsn": 5}'):
        with pytest.raises(ValueError):
            restore.parse_metadata(bad)


def test_metadata_rows_group_into_sets_as_on_zfs():
    subvolumes = "/srv/bt/data01 /srv/bt/data02"

    def props(name, **extra):
        values = {"set": name, "datasets": subvolumes, "pgdata_dataset": "/srv/bt/data02",
                  "stop_lsn": "0/5000100", "start_time": "2026-11-25T04:01:00Z"}
        values.update(extra)
        return values
    s1, s2 = "pgzfs_20261125T040100Z", "pgzfs_20261125T050100Z"
    rows = [("/srv/bt/data01", s1, 0, props(s1)), ("/srv/bt/data02", s1, 0, props(s1)),
            ("/srv/bt/data02", s2, 0, props(s2, start_time="2026-11-25T05:01:00Z"))]
    [first, second] = restore.group_sets(rows, "pgzfs")
    assert first.name == s1 and first.complete
    assert second.name == s2 and not second.complete      # data01's snapshot has no metadata
    assert first.snapshot("/srv/bt/data02") == "/srv/bt/data02@" + s1


def test_clone_marker_round_trips_and_names_the_snapshot_and_the_clone():
    text = restore.marker_text("s1", "/srv/bt/data02@s1", "/srv/bt/data02_restore_s1", "restore",
                               "2026-11-25T09:12:00Z")
    assert json.loads(text) == {"clone_of": "s1", "snapshot": "/srv/bt/data02@s1",
                                "path": "/srv/bt/data02_restore_s1", "kind": "restore",
                                "created": "2026-11-25T09:12:00Z"}
    assert restore.parse_marker(text) == {"clone_of": "s1", "snapshot": "/srv/bt/data02@s1",
                                          "path": "/srv/bt/data02_restore_s1", "kind": "restore"}
    # Only snapshot and path are needed (pg_zfs_snap.py reads only those).
    assert restore.parse_marker('{"snapshot": "/srv/bt/d@s2", "path": "/srv/bt/x"}')["clone_of"] == "s2"
    for bad in ('{"snapshot": "/srv/bt/d@s2"}', '{"snapshot": "nothing", "path": "/x"}',
                '{"snapshot": "/srv/bt/d@s2", "path": "relative"}', "[]"):
        with pytest.raises(ValueError):
            restore.parse_marker(bad)


def test_clones_by_set_leaves_out_markers_whose_clone_is_gone():
    filesystems = [{"name": "/srv/bt/d_restore_s1", "origin": "/srv/bt/d@s1", "exists": True},
                   {"name": "/srv/bt/d_drill_s2", "origin": "/srv/bt/d@s2", "exists": False},
                   {"name": "tank/d_restore_s3", "origin": "tank/d@s3"}]
    assert restore.clones_by_set(filesystems) == {"s1": ["/srv/bt/d_restore_s1"], "s3": ["tank/d_restore_s3"]}


def test_later_btrfs_snapshots_are_ordered_by_the_stamp_of_their_set_name():
    rows = ["/srv/bt/d@p_20261125T040100Z", "/srv/bt/d@q_20261125T050000Z", "/srv/bt/d@p_20261125T060100Z"]
    assert restore.snapshot_stamp("/srv/bt/d@p_20261125T040100Z") == "20261125T040100Z"
    assert restore.snapshot_stamp("/srv/bt/d@handmade") == ""
    assert restore.later_snapshots(rows, "/srv/bt/d@p_20261125T040100Z") == [
        "/srv/bt/d@q_20261125T050000Z", "/srv/bt/d@p_20261125T060100Z"]


def test_rollback_paths_keep_the_old_subvolume_beside_the_new_one():
    assert restore.btrfs_rollback_paths("/srv/bt/data02", "s1", "20261126T100000Z") == (
        "/srv/bt/data02_rollback_s1", "/srv/bt/data02_before_rollback_20261126T100000Z")


def config_of(tmp_path, text):
    path = tmp_path / "pg_zfs.conf"
    path.write_text(text)
    return restore.Config.load(str(path))


def test_backend_btrfs_takes_subvolume_paths_and_refuses_others(tmp_path):
    backend, scope = restore.backend_of(config_of(
        tmp_path, "[snapshot]\nbackend = btrfs\ndatasets = /srv/bt/data01 /srv/bt/data02\n"))
    assert isinstance(backend, restore.Btrfs) and scope == ["/srv/bt/data01", "/srv/bt/data02"]
    backend, scope = restore.backend_of(config_of(tmp_path, "[snapshot]\ndatasets = tank/a tank/b zp/c\n"))
    assert isinstance(backend, restore.Zfs) and scope == ["tank", "zp"]
    for datasets, says in (("srv/bt/data01", "not an absolute, normalised"),
                           ("/srv/bt/data@01", "must not contain @")):
        with pytest.raises(restore.Failure) as error:
            restore.backend_of(config_of(tmp_path, "[snapshot]\nbackend = btrfs\ndatasets = %s\n" % datasets))
        assert error.value.code == 2 and says in str(error.value)
    with pytest.raises(restore.Failure) as error:
        restore.backend_of(config_of(tmp_path, "[snapshot]\nbackend = lvm\ndatasets = a\n"))
    assert "not one of zfs, btrfs" in str(error.value)


def test_backends_describe_their_clones_for_dry_run():
    zfs = restore.Zfs()
    assert zfs.describe_clone("tank/d@s1", "tank/d_restore_s1", "/r/d_restore_s1", "s1") == \
        "zfs clone -o mountpoint=/r/d_restore_s1 -o pgzfs:clone_of=s1 tank/d@s1 tank/d_restore_s1"
    btrfs = restore.Btrfs(["/srv/bt/d"])
    assert btrfs.describe_clone("/srv/bt/d@s1", "/srv/bt/d_restore_s1", "/srv/bt/d_restore_s1", "s1") == (
        "write clone marker /srv/bt/.pgzfs/clones/d_restore_s1.json, then btrfs subvolume snapshot "
        "/srv/bt/.pgzfs/d@s1 /srv/bt/d_restore_s1")
