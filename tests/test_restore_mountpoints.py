"""Where the datasets were mounted when a set was taken: pg_zfs_snap.py stores it
(pgzfs:mountpoints, from the mount table), pg_zfs_restore.py maps the set's
tablespaces by it. A dataset whose mountpoint changed since (set to `legacy`
and mounted by fstab, or moved) no longer makes the restore refuse its
tablespaces as "on no dataset of the set".

zfs-fuse cannot mount a `legacy` dataset (there is no mount.zfs), so the test
moves the tablespace's dataset instead: the same gap between the paths the set
names and the dataset's mountpoint property.
"""

import base64
import json
import os
import shutil

from testbed import PG_USER, chown_pg, run_script
from test_restore import Restored


def own_standby_config(tb, standby, datasets, tag):
    """A config for a test's own standby on datasets (PGDATA's last): prefix, mount_root
    RUN_DIR/TAG_mnt and wal_root RUN_DIR/TAG_wal named by tag."""
    sections = tb.archive_config()
    sections.update({
        "postgres": {"pgdata": standby.pgdata, "bindir": tb.pg_bindir, "user": PG_USER,
                     "host": standby.socket_dir, "port": str(standby.port), "dbname": "postgres"},
        "snapshot": {"backend": "zfs", "datasets": " ".join(datasets), "prefix": tag,
                     "lock_file": os.path.join(tb.run_dir, "%s.lock" % tag),
                     "state_file": os.path.join(tb.run_dir, "%s.json" % tag)},
        "restore": {"mount_root": os.path.join(tb.run_dir, "%s_mnt" % tag),
                    "wal_root": os.path.join(tb.run_dir, "%s_wal" % tag), "timeout": "240"}})
    return tb.write_config(os.path.join(tb.run_dir, "%s.conf" % tag), sections=sections)


def assert_restores_with_tablespaces_in_the_clones(tb, config, datasets, tag, moved=None):
    """Take a set, archive its WAL, (moved: (dataset, standby, where): stop the standby and
    move the dataset), restore it --immediate: ts1 reads, every tablespace link points
    into the clones; cleanup leaves nothing."""
    zfs = tb.zfs
    proc = run_script("pg_zfs_snap", "snapshot", "--no-prune", config=config, timeout=180)
    assert proc.returncode == 0, proc.stderr
    name = [s.split("@")[1] for s in zfs.snapshots() if s.startswith(datasets[-1] + "@%s_" % tag)][0]
    stored = zfs.run("get", "-H", "-o", "value", "pgzfs:mountpoints", "%s@%s" % (datasets[-1], name))
    assert json.loads(base64.b64decode(stored.strip()).decode()) == dict(
        (dataset, zfs.mountpoint(dataset)) for dataset in datasets)
    tb.primary.psql("INSERT INTO smoke (note) VALUES ('after set %s')" % name)
    tb.switch_wal()         # the segment holding the set's stop LSN, archived
    if moved:
        moved[1].stop()
        zfs.run("set", "mountpoint=" + moved[2], moved[0])
    proc = run_script("pg_zfs_restore", "restore", "--immediate", "--set", name, "--action", "promote",
                      config=config, timeout=300)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        copy = Restored(proc, tb)
        assert int(copy.psql("SELECT count(*) FROM smoke")) >= 0      # its table is in ts1
        links = [os.readlink(os.path.join(copy.pgdata, "pg_tblspc", oid))
                 for oid in os.listdir(os.path.join(copy.pgdata, "pg_tblspc"))]
        assert links and all(link.startswith(os.path.join(tb.run_dir, "%s_mnt" % tag)) for link in links)
    finally:
        assert run_script("pg_zfs_restore", "cleanup", "--all", config=config).returncode == 0
    assert os.listdir(os.path.join(tb.run_dir, "%s_wal" % tag)) == []


def test_a_restore_maps_tablespaces_by_where_the_datasets_were_mounted_when_the_set_was_taken(tb):
    zfs = tb.zfs
    datasets = [zfs.create("mp_ts"), zfs.create("mp_pg")]
    for dataset in datasets:
        chown_pg(zfs.mountpoint(dataset))
    mounted = dict((dataset, zfs.mountpoint(dataset)) for dataset in datasets)
    standby = tb.make_standby("mp_standby", os.path.join(mounted[datasets[1]], "pgdata"),
                              os.path.join(mounted[datasets[0]], "ts1"))
    config = own_standby_config(tb, standby, datasets, "mp")
    try:
        assert_restores_with_tablespaces_in_the_clones(tb, config, datasets, "mp", moved=(
            datasets[0], standby, os.path.join(tb.run_dir, "mp_moved")))
    finally:
        standby.stop()
        for dataset in datasets:
            zfs.destroy(dataset, recursive=True)
        shutil.rmtree(standby.waldir, ignore_errors=True)
