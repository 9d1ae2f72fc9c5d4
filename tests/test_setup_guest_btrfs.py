"""setup_guest.py with `backend = btrfs`, run as a process as a DBA would, on the
testbed's loop-mounted btrfs (tb.btrfs): --init creates the subvolumes
MOUNT/sg/data01 (tablespace ts1) and MOUNT/sg/data02 (PGDATA) and builds a
standby with pg_wal under the run directory; --check names pg_wal on btrfs.
"""

import json
import os

import pytest

from testbed import PG_USER, chown_pg, free_port, run_script, sh, wait_for
from test_setup_guest import OwnStandby, checks_of, setup_guest


class BtrfsGuest(OwnStandby):
    """A standby --init makes on btrfs subvolumes of its own (OwnStandby's pg_ctl, psql)."""

    def __init__(self, tb):
        # Not OwnStandby.__init__: that one names ZFS datasets.
        self.tb = tb
        self.dir = os.path.join(tb.run_dir, "sg_btrfs")
        self.socket_dir = os.path.join(self.dir, "sock")
        os.makedirs(self.socket_dir)
        chown_pg(self.socket_dir)
        self.parent = os.path.join(tb.btrfs.mountpoint, "sg")
        os.makedirs(self.parent)
        self.subvolumes = [os.path.join(self.parent, "data01"), os.path.join(self.parent, "data02")]
        self.pgdata = os.path.join(self.subvolumes[1], "pgdata")
        self.ts1 = os.path.join(self.subvolumes[0], "ts1")
        self.waldir = os.path.join(self.dir, "wal")
        self.port = free_port()
        self.sections = tb.archive_config()
        self.sections.update({
            "postgres": {"pgdata": self.pgdata, "bindir": tb.pg_bindir, "user": PG_USER,
                         "host": self.socket_dir, "port": str(self.port), "dbname": "postgres"},
            "snapshot": {"backend": "btrfs", "datasets": " ".join(self.subvolumes), "prefix": "sgbt",
                         "lock_file": os.path.join(self.dir, "snap.lock"),
                         "state_file": os.path.join(self.dir, "last-snapshot.json")},
            "guest": {"primary_conninfo": tb.primary.conninfo() + " application_name=sg_btrfs",
                      "waldir": self.waldir, "logfile": os.path.join(self.dir, "start.log"),
                      "start_timeout": "120",
                      "tablespace_mapping": "%s=%s" % (tb.primary.ts1_dir, self.ts1),
                      "check_clock": "no"},
        })
        self.config = self.write_config("btrfs.conf")

    def write_config(self, name, overrides=None):
        return self.tb.write_config(os.path.join(self.dir, name), overrides, sections=json.loads(
            json.dumps(self.sections)))


@pytest.fixture(scope="module")
def guest(tb):
    made = BtrfsGuest(tb)
    try:
        yield made
    finally:
        made.stop()


def test_btrfs_init_refuses_a_parent_that_is_not_on_btrfs(guest, tb):
    elsewhere = os.path.join(guest.dir, "not_btrfs")
    os.makedirs(elsewhere, exist_ok=True)
    config = guest.write_config("elsewhere.conf", {"snapshot": {"datasets": elsewhere + "/data01"}})
    proc = setup_guest("-c", config, "--init", "--dry-run")
    assert proc.returncode == 1
    assert "cannot create btrfs subvolume %s/data01: %s is on " % (elsewhere, elsewhere) in proc.stderr
    assert "not btrfs" in proc.stderr
    relative = guest.write_config("relative.conf", {"snapshot": {"datasets": "sg/data01"}})
    proc = setup_guest("-c", relative, "--init", "--dry-run")
    assert proc.returncode == 2 and "not an absolute, normalised subvolume path" in proc.stderr


def test_btrfs_init_refuses_a_plain_directory_where_a_subvolume_belongs(guest):
    plain = os.path.join(guest.parent, "plain")
    os.makedirs(plain, exist_ok=True)
    config = guest.write_config("plain.conf", {"snapshot": {"datasets": plain}})
    proc = setup_guest("-c", config, "--init", "--dry-run")
    assert proc.returncode == 1
    assert "%s exists but is not a btrfs subvolume (a plain directory)" % plain in proc.stderr


def test_btrfs_init_refuses_a_waldir_on_btrfs(guest):
    on_btrfs = os.path.join(guest.parent, "wal_here")
    config = guest.write_config("walbtrfs.conf", {"guest": {"waldir": on_btrfs}})
    proc = setup_guest("-c", config, "--init", "--dry-run")
    assert proc.returncode == 1
    assert "[guest] waldir %s is on btrfs" % on_btrfs in proc.stderr
    assert "pg_wal must not live on ZFS or btrfs" in proc.stderr


def test_btrfs_init_creates_the_subvolumes_and_builds_the_standby(guest, tb):
    dry = setup_guest("-c", guest.config, "--init", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for subvolume in guest.subvolumes:
        assert "would: create btrfs subvolume %s" % subvolume in dry.stdout
        assert not os.path.exists(subvolume)
    proc = setup_guest("-c", guest.config, "--init", timeout=900)
    assert proc.returncode == 0, proc.stderr
    for subvolume in guest.subvolumes:
        assert os.stat(subvolume).st_ino == 256                       # a subvolume
        assert sh(["btrfs", "subvolume", "show", subvolume]).returncode == 0
        assert os.stat(subvolume).st_uid == os.stat(guest.socket_dir).st_uid   # postgres
    assert os.path.exists(os.path.join(guest.pgdata, "standby.signal"))
    assert os.path.realpath(os.path.join(guest.pgdata, "pg_wal")) == os.path.realpath(guest.waldir)
    assert os.listdir(guest.ts1), "the tablespace was not mapped into sg/data01"
    again = setup_guest("-c", guest.config, "--init")
    assert again.returncode == 0, again.stderr
    assert "nothing to change" in again.stderr


def test_btrfs_standby_starts_and_pg_zfs_snap_takes_a_set_of_it(guest):
    proc = setup_guest("-c", guest.config, "--start")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: guest.receiver_status() == "streaming", 60,
             "the WAL receiver to stream")
    proc = run_script("pg_zfs_snap", "snapshot", "--no-prune", config=guest.config)
    assert proc.returncode == 0, proc.stderr
    name = proc.stderr.split("took set ", 1)[1].split()[0]
    snapshots = os.path.join(guest.parent, ".pgzfs")
    assert sorted(os.listdir(snapshots)) == sorted(
        ["data01@" + name, "data01@%s.json" % name, "data02@" + name, "data02@%s.json" % name])
    proc = setup_guest("-c", guest.config, "--check", "--json")
    report, checks = checks_of(proc)
    assert checks["datasets"]["status"] == "OK", report
    assert checks["pgdata"]["status"] == "OK" and guest.subvolumes[1] in checks["pgdata"]["detail"]
    assert checks["pg_wal"]["status"] == "OK", checks["pg_wal"]
    assert checks["snapshots"]["status"] == "OK", checks["snapshots"]
    assert checks["tools"]["detail"].startswith("btrfs, ")


def test_btrfs_check_names_pg_wal_moved_onto_btrfs(guest, tb):
    wal_link = os.path.join(guest.pgdata, "pg_wal")
    on_btrfs = os.path.join(guest.parent, "wal_moved")
    guest.stop()
    sh(["mv", guest.waldir, on_btrfs])   # across file systems, keeping the owner
    os.unlink(wal_link)
    os.symlink(on_btrfs, wal_link)
    try:
        assert setup_guest("-c", guest.config, "--start").returncode == 0
        proc = setup_guest("-c", guest.config, "--check", "--json")
        report, checks = checks_of(proc)
        assert proc.returncode == 2
        assert checks["pg_wal"]["status"] == "CRITICAL"
        assert "%s (-> %s) is on btrfs (" % (wal_link, on_btrfs) in checks["pg_wal"]["detail"]
        assert "mounted at %s)" % tb.btrfs.mountpoint in checks["pg_wal"]["detail"]
        assert "it must not be on ZFS or btrfs" in checks["pg_wal"]["detail"]
        assert "pg_wal: " in report["summary"]
    finally:
        guest.stop()
        sh(["mv", on_btrfs, guest.waldir])
        os.unlink(wal_link)
        os.symlink(guest.waldir, wal_link)
    proc = setup_guest("-c", guest.config, "--check", "--json")
    assert checks_of(proc)[1]["pg_wal"]["status"] == "OK"
