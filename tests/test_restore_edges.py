"""pg_zfs_restore.py at the edges of what a user can ask, run as a process
against the testbed (the story of test_restore.py): a time target exactly at
the last commit a set holds, with --exclusive; Ctrl-C at the terminal, which
signals the whole process group (pg_ctl, runuser and zfs too), not only the
script; a set taken on a restarted, idle standby under a wrong guest clock; a
tablespace created through a symlink into a dataset; a set waiting for WAL,
chosen once its stop segment is archived.
"""

import datetime
import os
import shutil
import signal
import subprocess

import pytest

from testbed import BIN, PY36, chown_pg, run_script, wait_for
from test_restore import (our_clones, parse_iso, props_of, restore_script, restored, set_names,  # noqa: F401
                          set_waiting_for_wal, snap, story, utc_now)
from test_restore_faults import nothing_left, stalled
from test_restore_mountpoints import assert_restores_with_tablespaces_in_the_clones, own_standby_config


def set_taken_by_a_clock_behind(story, behind):
    """The name of a set pg_zfs_snap.py took with its clock `behind` (--now)."""
    before = set(set_names(story.tb))
    taken = run_script("pg_zfs_snap", "--now", (utc_now() - behind).strftime("%Y%m%dT%H%M%SZ"), "snapshot",
                       "--no-prune", config=story.config, timeout=180)
    assert taken.returncode == 0, taken.stderr
    return [name for name in set_names(story.tb) if name not in before][0]


def restore_to(story, moment):
    """restore --target-time moment --action promote; a copy made anyway is removed."""
    proc = restore_script(story.config, "restore", "--target-time", moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
                          "--action", "promote")
    if proc.returncode == 0:
        restore_script(story.config, "cleanup", "--all")
    return proc


# -- a time target exactly at a set's last commit -----------------------------------

@pytest.mark.host_only("recovery_target_inclusive")
def test_exclusive_target_at_a_sets_last_commit_leaves_that_commit_out(story):
    """pgzfs:db_time of a set taken while the primary is idle is the commit time of the
    last transaction the set holds. A restore to just before that transaction
    (--exclusive at its commit time) must not use the set: the copy would hold the
    transaction it was asked to leave out."""
    tb = story.tb
    note = "committed at the target %s" % utc_now().isoformat()
    note_xid = int(tb.primary.psql("INSERT INTO smoke (note) VALUES ('%s') RETURNING txid_current()" % note))
    wait_for(lambda: tb.standby.psql("SELECT count(*) FROM smoke WHERE note = '%s'" % note) == "1",
             30, "the standby to replay the row")
    # A restartpoint after the commit: the set's backup starts after it, so no replay
    # before consistency can show PostgreSQL that the target is inside the set.
    tb.primary.psql("CHECKPOINT")
    lsn = tb.primary.psql("SELECT pg_current_wal_lsn()")
    wait_for(lambda: tb.standby.psql("SELECT pg_last_wal_replay_lsn() >= '%s'" % lsn) == "t", 30,
             "the standby to replay the checkpoint")
    tb.standby.psql("CHECKPOINT")
    before = set(set_names(tb))
    snap(tb, story.config)
    idle = [name for name in set_names(tb) if name not in before][0]
    try:
        db_time = props_of(tb, tb.datasets[1] + "@" + idle)["pgzfs:db_time"]
        # A commit record belongs to an xid: the next xid is the note's + 1 only if the
        # note's commit is the set's last (the testbed's primary runs no autovacuum).
        assert int(tb.primary.psql("SELECT txid_current()")) == note_xid + 1, \
            "another transaction committed after the note: the set's db_time is not the note's"
        tb.primary.psql("INSERT INTO smoke (note) VALUES ('after the target')")
        tb.switch_wal()
        with restored(story, "--target-time", db_time, "--action", "promote") as copy:
            assert "restored set %s to" % idle in copy.out
            assert copy.psql("SELECT count(*) FROM smoke WHERE note = '%s'" % note) == "1"
        with restored(story, "--target-time", db_time, "--exclusive", "--action", "promote") as copy:
            assert "restored set %s to" % idle not in copy.out, copy.out
            assert copy.psql("SELECT count(*) FROM smoke WHERE note = '%s'" % note) == "0", \
                "the transaction committed at the target is in an --exclusive copy"
        # Asked for by name, the set is refused, and nothing is left.
        proc = restore_script(story.config, "restore", "--set", idle, "--target-time", db_time, "--exclusive")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        assert our_clones(tb) == [] and nothing_left(story) == []
    finally:
        for dataset in tb.datasets:
            tb.zfs.destroy("%s@%s" % (dataset, idle))


# -- Ctrl-C: SIGINT to the whole process group --------------------------------------

@pytest.mark.parametrize("command", ["restore", pytest.param("drill", marks=pytest.mark.host_only("the drill's steps are the restore's; the restore runs in the guest"))])
def test_ctrl_c_at_the_terminal_while_the_copy_starts_stops_it_and_removes_the_clones(story, command):
    tb = story.tb
    args = ["restore", "--latest"] if command == "restore" else ["drill"]
    pgdata = os.path.join(tb.run_dir, "restore_mnt", "data02_%s_%s" % (command, story.sets[1]), "pgdata")
    with stalled(tb.hosts):     # pg_ctl start -w waits: the copy cannot become consistent yet
        proc = subprocess.Popen([PY36, os.path.join(BIN, "pg_zfs_restore.py"), "-c", story.config] + args,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                start_new_session=True)
        try:
            # the clone carries the standby's postmaster.pid until the restore removes it:
            # the copy's own names pgdata on its second line
            wait_for(lambda: proc.poll() is not None or server_of(pgdata),
                     120, "the copy's server to start")
            assert proc.poll() is None, proc.communicate()
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert "Traceback" not in err
    if command == "restore":
        assert proc.returncode == 1, out + err
        assert err.strip().splitlines()[-1] == "pg_zfs_restore: ERROR: stopped by SIGINT", err
    else:
        assert proc.returncode == 2, out + err
        assert len(out.strip().splitlines()) == 1 and "stopped by SIGINT" in out, out
    wait_for(lambda: not os.path.exists(os.path.join(pgdata, "postmaster.pid")), 30, "no server on the clone")
    assert nothing_left(story) == []
    assert our_clones(tb) == []


def server_of(pgdata):
    """True once pgdata's postmaster.pid is the copy's own server's (not the standby's,
    which the snapshot carries)."""
    try:
        with open(os.path.join(pgdata, "postmaster.pid")) as pidfile:
            lines = pidfile.read().splitlines()
    except OSError:
        return False
    return len(lines) > 1 and os.path.realpath(lines[1]) == os.path.realpath(pgdata)


# -- a set taken on a standby that replayed no commit since it started ---------------

@pytest.mark.host_only("a wrong clock")
def test_a_set_on_a_restarted_idle_standby_under_a_wrong_clock_serves_no_target_before_its_rows(story):
    """pg_last_xact_replay_timestamp() is NULL on a standby that replayed no commit since
    it started (a reboot at night, no writes since). The set must still carry the
    primary's time (the last message the primary sent), not only the guest's clock."""
    tb = story.tb
    # A restartpoint after the last commit: replay after the restart starts past it.
    tb.primary.psql("CHECKPOINT")
    lsn = tb.primary.psql("SELECT pg_current_wal_lsn()")
    wait_for(lambda: tb.standby.psql("SELECT pg_last_wal_replay_lsn() >= '%s'" % lsn) == "t", 30,
             "the standby to replay the checkpoint")
    tb.standby.psql("CHECKPOINT")
    tb.standby.stop()
    tb.standby.start()
    wait_for(lambda: tb.standby.psql("SELECT last_msg_send_time IS NOT NULL FROM pg_stat_wal_receiver") == "t",
             60, "the restarted standby to stream")
    assert tb.standby.psql("SELECT pg_last_xact_replay_timestamp() IS NULL") == "t"
    wrong = set_taken_by_a_clock_behind(story, datetime.timedelta(hours=1))
    try:
        tb.primary.psql("INSERT INTO smoke (note) VALUES ('after the idle set')")
        tb.switch_wal()
        # After its guest stop time, before its rows: no set fits.
        proc = restore_to(story, utc_now() - datetime.timedelta(minutes=30))
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "earliest possible target is" in proc.stderr
        assert our_clones(tb) == []
        props = props_of(tb, tb.datasets[1] + "@" + wrong)
        assert abs(parse_iso(props.get("pgzfs:db_time", "1970-01-01T00:00:00Z")) - utc_now()) \
            < datetime.timedelta(minutes=5), props
    finally:
        for dataset in tb.datasets:
            tb.zfs.destroy("%s@%s" % (dataset, wrong))


# -- a tablespace created through a symlink to its dataset ----------------------------

@pytest.mark.host_only("the symlink's path is ours; tablespaces in clones are test_restore_mountpoints'")
def test_a_tablespace_located_through_a_symlink_into_a_dataset_is_restored(tb):
    """CREATE TABLESPACE ... LOCATION '/srv/ts1' where /srv/ts1 links into a dataset:
    pg_zfs_snap.py accepts the set (it resolves the link), so the restore must map it."""
    zfs = tb.zfs
    datasets = [zfs.create("sl_ts"), zfs.create("sl_pg")]
    for dataset in datasets:
        chown_pg(zfs.mountpoint(dataset))
    real_ts = os.path.join(zfs.mountpoint(datasets[0]), "ts1")
    os.mkdir(real_ts, 0o700)
    chown_pg(real_ts)
    linked_ts = os.path.join(tb.run_dir, "sl_ts1_link")
    os.symlink(real_ts, linked_ts)
    standby = tb.make_standby("sl_standby", os.path.join(zfs.mountpoint(datasets[1]), "pgdata"), linked_ts)
    config = own_standby_config(tb, standby, datasets, "sl")
    try:
        assert_restores_with_tablespaces_in_the_clones(tb, config, datasets, "sl")
    finally:
        standby.stop()
        for dataset in datasets:
            zfs.destroy(dataset, recursive=True)
        shutil.rmtree(standby.waldir, ignore_errors=True)


# -- a set waiting for WAL, then archived -----------------------------------------------

@pytest.mark.host_only("a stop segment archived later")
def test_a_set_waiting_for_wal_is_chosen_once_its_stop_segment_is_archived(story):
    tb = story.tb
    with set_waiting_for_wal(story) as (waiting, note):
        with restored(story, "--immediate") as copy:
            assert "restored set %s" % story.sets[1] in copy.out
            rows = copy.rows()
            assert rows == story.rows[:len(rows)], "not a prefix of the primary's rows"
        tb.switch_wal()
        with restored(story, "--immediate") as copy:
            assert "restored set %s" % waiting in copy.out
            assert copy.psql("SELECT count(*) FROM smoke WHERE note = '%s'" % note) == "1"
            assert copy.rows() == story.rows        # taken after the story's last row
