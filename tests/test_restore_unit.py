"""pg_zfs_restore.py's decisions, without a database: targets, the choice of a
set, recovery settings per version, configuration rewriting, ports, the log."""

import datetime
import logging
import os
import signal
import subprocess
import types

import pytest

from testbed import load_script, run_script

restore = load_script("pg_zfs_restore")
UTC = datetime.timezone.utc


def props(name, stop_time, stop_lsn, start_lsn="0/2000028", timeline="1", datasets="p/d1 p/d2",
          pg_version="15", **extra):
    values = {"set": name, "datasets": datasets, "pgdata_dataset": "p/d2", "pgdata_rel": "pgdata",
              "mode": "backup", "start_lsn": start_lsn, "stop_lsn": stop_lsn, "timeline": timeline,
              "start_time": stop_time, "stop_time": stop_time, "pg_version": pg_version}
    values.update(extra)
    return dict((k, v) for k, v in values.items() if v is not None)


def rows_of(*set_props, missing=()):
    rows = []
    for p in set_props:
        for dataset in p["datasets"].split():
            if (p["set"], dataset) not in missing:
                rows.append((dataset, p["set"], 0, dict(p)))
    return rows


def group_sets(rows, prefix=None):
    """The sets of the rows, of the first row's prefix unless one is given."""
    return restore.group_sets(rows, prefix or rows[0][1].rpartition("_")[0])


SETS = group_sets(rows_of(
    props("pgzfs_20261125T040100Z", "2026-11-25T04:01:02Z", "0/5000100"),
    props("pgzfs_20261125T050100Z", "2026-11-25T05:01:03Z", "0/9000100"),
    props("pgzfs_20261125T060100Z", "2026-11-25T06:01:01Z", "0/D000100"),
))


def target(kind, text=None):
    return restore.parse_target(kind, text)


# -- target parsing -----------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("2026-11-25T04:30:00Z", datetime.datetime(2026, 11, 25, 4, 30, tzinfo=UTC)),
    ("2026-11-25 06:30:00+02:00", datetime.datetime(2026, 11, 25, 4, 30, tzinfo=UTC)),
    ("2026-11-25 06:30:00+02", datetime.datetime(2026, 11, 25, 4, 30, tzinfo=UTC)),
    ("2026-11-24T23:30:00.25-0500", datetime.datetime(2026, 11, 25, 4, 30, 0, 250000, tzinfo=UTC)),
    ("2026-11-25 04:30 UTC", datetime.datetime(2026, 11, 25, 4, 30, tzinfo=UTC)),
])
def test_target_time_with_a_zone_is_read_in_utc(text, expected):
    assert restore.parse_time(text) == expected


def test_target_time_without_a_zone_is_refused_with_a_clear_reason():
    with pytest.raises(ValueError) as error:
        restore.parse_time("2026-11-25 04:30:00")
    assert "no time zone" in str(error.value)


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01T00:00:00Z", "2026-11-25T04:30:00+16:00",
                                  "2026-11-25", "9999-12-31T23:59:59-15:00", "0001-01-01T00:00:00+15:00"])
def test_malformed_target_time_is_refused(text):
    with pytest.raises(ValueError):
        restore.parse_time(text)


def test_pg_time_is_utc_with_microseconds_so_the_server_zone_does_not_matter():
    moment = restore.parse_time("2026-11-25 06:30:00.5+02:00")
    assert restore.pg_time(moment) == "2026-11-25 04:30:00.500000+00"


def test_lsn_parses_and_formats_back():
    assert restore.parse_lsn("1/2A") == (1 << 32) + 0x2A
    assert restore.format_lsn(restore.parse_lsn("16/B374D848")) == "16/B374D848"
    assert restore.parse_lsn("0/5000100") < restore.parse_lsn("1/0")
    for bad in ("12345", "G/1", "1/123456789", ""):
        with pytest.raises(ValueError):
            restore.parse_lsn(bad)


def test_xid_and_name_targets_are_checked():
    assert target("xid", "1234").value == 1234
    assert target("name", "before_upgrade").value == "before_upgrade"
    assert target("xid", str(2 ** 64 - 1)).value == 2 ** 64 - 1
    for kind, bad in (("xid", "abc"), ("xid", "1"), ("xid", str(2 ** 64)), ("name", ""), ("name", "x" * 64)):
        with pytest.raises(ValueError):
            target(kind, bad)


@pytest.mark.parametrize("args", [["--port", "65536"], ["--port", "-1"], ["--port", "0"], ["--port", ""],
                                  ["--set", ""], ["--set", "a b"], ["--timeline", ""], ["--timeline", "0"]])
def test_a_bad_port_set_or_timeline_is_refused_by_the_argument_parser(args, capsys):
    with pytest.raises(SystemExit) as end:
        restore.parse_args(["restore", "--immediate"] + args)
    assert end.value.code == 2
    assert "error: argument %s: " % args[0] in capsys.readouterr().err


def test_good_port_set_and_timeline_arguments_pass():
    args = restore.parse_args(["restore", "--immediate", "--port", "65535", "--set", "pgzfs_20261125T040100Z",
                               "--timeline", "current"])
    assert (args.port, args.set, args.timeline) == (65535, "pgzfs_20261125T040100Z", "current")


def test_timeline_option():
    assert restore.parse_timeline("latest") == "latest"
    assert restore.parse_timeline("3") == "3"
    with pytest.raises(ValueError):
        restore.parse_timeline("three")


# -- sets and the choice of one ------------------------------------------------

def test_sets_are_grouped_oldest_first_and_incomplete_ones_are_marked():
    sets = group_sets(rows_of(
        props("a_20261125T050100Z", "2026-11-25T05:01:00Z", "0/9000100"),
        props("a_20261125T040100Z", "2026-11-25T04:01:00Z", "0/5000100"),
        props("a_20261125T060100Z", "2026-11-25T06:01:00Z", "0/D000100"),
        missing={("a_20261125T060100Z", "p/d1")}))
    assert [s.name for s in sets] == ["a_20261125T040100Z", "a_20261125T050100Z", "a_20261125T060100Z"]
    assert [s.complete for s in sets] == [True, True, False]
    assert "missing on p/d1" in restore.set_problems(sets[2])[0]


def test_a_set_whose_stop_lsn_is_not_on_every_snapshot_is_incomplete():
    rows = rows_of(props("a_20261125T040100Z", "2026-11-25T05:01:00Z", "0/9000100"))
    del rows[0][3]["stop_lsn"]
    assert not group_sets(rows)[0].complete


def test_snapshots_of_other_tools_are_ignored():
    rows = rows_of(props("a_20261125T040100Z", "2026-11-25T05:01:00Z", "0/9000100"))
    rows.append(("p/d1", "manual", 0, {}))
    rows.append(("p/other", "a_20261125T040100Z", 0, dict(rows[0][3])))     # dataset not in pgzfs:datasets
    assert [s.present for s in group_sets(rows)] == [("p/d1", "p/d2")]


def test_time_target_takes_the_newest_set_that_stops_at_or_before_it():
    chosen = restore.choose_set(SETS, target("time", "2026-11-25T05:30:00Z"))
    assert chosen.name == "pgzfs_20261125T050100Z"
    chosen = restore.choose_set(SETS, target("time", "2026-11-25T05:01:03Z"))
    assert chosen.name == "pgzfs_20261125T050100Z"
    chosen = restore.choose_set(SETS, target("time", "2026-11-25T05:01:02.9Z"))
    assert chosen.name == "pgzfs_20261125T040100Z"


def test_target_before_every_set_is_refused_naming_the_earliest_possible():
    with pytest.raises(restore.Failure) as error:
        restore.choose_set(SETS, target("time", "2026-11-25T05:00:00+02:00"))
    assert "earliest possible target is 2026-11-25T04:01:02Z (set pgzfs_20261125T040100Z)" \
        in str(error.value)
    assert error.value.code == 1


def test_lsn_target_compares_lsns_not_text():
    assert restore.choose_set(SETS, target("lsn", "0/C000000")).name == "pgzfs_20261125T050100Z"
    assert restore.choose_set(SETS, target("lsn", "1/0")).name == "pgzfs_20261125T060100Z"
    with pytest.raises(restore.Failure) as error:
        restore.choose_set(SETS, target("lsn", "0/4000000"))
    assert "0/5000100" in str(error.value)


def test_numeric_timeline_keeps_only_sets_of_that_timeline_or_earlier():
    sets = group_sets(rows_of(
        props("a_20261125T040100Z", "2026-11-25T04:01:00Z", "0/5000100", timeline="1"),
        props("a_20261125T050100Z", "2026-11-25T05:01:00Z", "0/9000100", timeline="2")))
    assert restore.choose_set(sets, target("lsn", "1/0"), timeline="1").name == "a_20261125T040100Z"
    assert restore.choose_set(sets, target("lsn", "1/0"), timeline="latest").name == "a_20261125T050100Z"


def test_immediate_and_latest_take_the_newest_complete_set():
    sets = group_sets(rows_of(
        props("a_20261125T040100Z", "2026-11-25T04:01:00Z", "0/5000100"),
        props("a_20261125T050100Z", "2026-11-25T05:01:00Z", "0/9000100"), missing={("a_20261125T050100Z", "p/d1")}))
    assert restore.choose_set(sets, target("immediate")).name == "a_20261125T040100Z"
    assert restore.choose_set(SETS, target("latest")).name == "pgzfs_20261125T060100Z"


def test_xid_and_name_targets_take_the_oldest_set_which_the_pool_cannot_place():
    assert restore.choose_set(SETS, target("name", "x")).name == "pgzfs_20261125T040100Z"
    assert restore.choose_set(SETS, target("name", "x"), "pgzfs_20261125T050100Z").name \
        == "pgzfs_20261125T050100Z"


def test_named_set_must_exist_be_complete_and_stop_before_the_target():
    with pytest.raises(restore.Failure):
        restore.choose_set(SETS, target("immediate"), "nope")
    with pytest.raises(restore.Failure) as error:
        restore.choose_set(SETS, target("time", "2026-11-25T05:00:00Z"), "pgzfs_20261125T050100Z")
    assert "set pgzfs_20261125T050100Z" in str(error.value)


def test_backup_label_must_be_there_and_match_the_start_lsn():
    label = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nBACKUP FROM: standby\n"
    assert restore.label_problems("backup", "0/2000028", label) == []
    assert restore.label_problems("shutdown", "0/2000028", b"") == []
    assert "empty" in restore.label_problems("backup", "0/2000028", b"")[0]
    assert "0/3000000" in restore.label_problems("backup", "0/3000000", label)[0]


def test_set_problems_name_missing_and_bad_properties():
    sets = group_sets(rows_of(props("a_20261125T040100Z", "soon", "0/1", mode="odd", pg_version="9.4")))
    problems = " ".join(restore.set_problems(sets[0]))
    assert "stop_time" in problems and "mode" in problems and "older than 9.6" in problems


# -- recovery settings per version ------------------------------------------------

COMMAND = restore.restore_command_for("/opt/pg zfs/bin/pg_wal_fetch.py", "/etc/pg_zfs/it's.conf")


def files(version, tgt, action="pause", **options):
    major = restore.parse_major(version)
    pairs = restore.recovery_settings(major, tgt, action, COMMAND, **options)
    return dict((name, (how, text)) for name, how, text in restore.recovery_files(
        major, pairs, restore.server_settings(5433, "/var/lib/pg_zfs/restore-wal/restore_x", major), "header"))


def test_restore_command_calls_pg_wal_fetch_with_the_same_config_shell_quoted():
    assert COMMAND == "'/opt/pg zfs/bin/pg_wal_fetch.py' -c '/etc/pg_zfs/it'\"'\"'s.conf' %f %p"
    literal = restore.quote_setting(COMMAND)
    assert literal.startswith("'''/opt/pg zfs") and literal.count("'") == 2 * COMMAND.count("'") + 2


def test_12_and_later_use_recovery_signal_and_postgresql_auto_conf():
    made = files("15", target("time", "2026-11-25T04:30:00Z"), "promote")
    assert made["recovery.signal"] == ("write", "")
    how, text = made["postgresql.auto.conf"]
    assert how == "append"
    lines = text.splitlines()
    assert "recovery_target_time = '2026-11-25 04:30:00.000000+00'" in lines
    assert "recovery_target_action = 'promote'" in lines
    assert "archive_mode = off" in lines and "port = 5433" in lines and "hot_standby = on" in lines
    assert any(line.startswith("restore_command = ") for line in lines)
    assert "recovery.conf" not in made


def test_9_6_to_11_use_recovery_conf_without_standby_mode():
    for version in ("9.6", "11"):
        made = files(version, target("xid", "1234"))
        recovery = made["recovery.conf"][1]
        assert "recovery_target_xid = '1234'" in recovery
        assert "recovery_target_action = 'pause'" in recovery
        assert "standby_mode" not in recovery and "pause_at_recovery_target" not in recovery
        assert "restore_command" not in made["postgresql.auto.conf"][1]
        assert "archive_mode = off" in made["postgresql.auto.conf"][1]
        assert "recovery.signal" not in made


def test_lsn_target_needs_10_and_later():
    assert "recovery_target_lsn = '0/5000100'" in files("10", target("lsn", "0/5000100"))["recovery.conf"][1]
    with pytest.raises(restore.Failure):
        files("9.6", target("lsn", "0/5000100"))


def test_immediate_latest_exclusive_and_timeline():
    assert "recovery_target = 'immediate'" in files("14", target("immediate"))["postgresql.auto.conf"][1]
    latest = files("18", target("latest"))["postgresql.auto.conf"][1]
    assert "recovery_target_action" not in latest and "recovery_target = 'immediate'" not in latest
    assert "recovery_target = ''" in latest  # cleared: a standby's include file may set one
    text = files("15", target("lsn", "0/1"), inclusive=False, timeline="2")["postgresql.auto.conf"][1]
    assert "recovery_target_inclusive = off" in text and "recovery_target_timeline = '2'" in text
    assert "recovery_target_timeline = 'latest'" in files("11", target("immediate"))["recovery.conf"][1]
    with pytest.raises(restore.Failure):
        files("15", target("name", "x"), inclusive=False)


def test_inherited_standby_settings_are_commented_out():
    conf = ("# Do not edit this file manually!\n"
            "primary_conninfo = 'user=postgres host=/tmp port=5432'\n"
            "  Primary_Slot_Name='slot'\n"
            "port = 5432\n"
            "archive_command = 'cp %p /arch/%f'\n"
            "recovery_target_time = '2026-01-01'\n"
            "primary_conninfo_extra = 1\n"
            "#primary_conninfo = 'already a comment'\n"
            "shared_buffers = 16MB\n"
            "synchronous_standby_names 'any 1 (a, b)'\n")
    text, found = restore.comment_out_settings(conf, restore.INHERITED_SETTINGS)
    assert found == ["primary_conninfo", "primary_slot_name", "port", "archive_command",
                     "recovery_target_time", "synchronous_standby_names"]
    lines = text.splitlines()
    assert lines[1] == "#pg_zfs_restore: primary_conninfo = 'user=postgres host=/tmp port=5432'"
    assert "primary_conninfo_extra = 1" in lines and "shared_buffers = 16MB" in lines
    assert "#primary_conninfo = 'already a comment'" in lines
    assert restore.comment_out_settings(text, restore.INHERITED_SETTINGS)[1] == []


# -- paths, names, ports -------------------------------------------------------------

MOUNTS = {"/tank/data01": "/restore/data01_restore_s", "/tank/data02": "/restore/data02_restore_s",
          "/tank/data02/sub": "/restore/data02_sub_restore_s"}


def test_paths_move_to_the_clone_of_the_longest_matching_mountpoint():
    assert restore.map_path("/tank/data01/ts1", MOUNTS) == "/restore/data01_restore_s/ts1"
    assert restore.map_path("/tank/data02/sub/x/", MOUNTS) == "/restore/data02_sub_restore_s/x"
    assert restore.map_path("/tank/data01", MOUNTS) == "/restore/data01_restore_s"
    assert restore.map_path("/tank/data011/ts", MOUNTS) is None


def test_tablespace_map_paths_are_rewritten_and_a_foreign_tablespace_is_refused():
    text = "16384 /tank/data01/ts1\n16385 /tank/data02/sub/with space\n"
    assert restore.rewrite_tablespace_map(text, MOUNTS) == (
        "16384 /restore/data01_restore_s/ts1\n16385 /restore/data02_sub_restore_s/with space\n")
    with pytest.raises(restore.Failure) as error:
        restore.rewrite_tablespace_map("16386 /srv/elsewhere\n", MOUNTS)
    assert "live standby" in str(error.value)


def test_a_tablespace_located_through_a_symlink_maps_by_where_the_link_leads():
    links = {"/srv/ts1": "/tank/data01/ts1", "/srv/loop": "/srv/loop"}
    resolve = lambda path: links.get(path, path)    # noqa: E731  (os.path.realpath, without a disk)
    assert restore.map_path("/srv/ts1", MOUNTS, resolve) == "/restore/data01_restore_s/ts1"
    assert restore.map_path("/srv/loop", MOUNTS, resolve) is None
    assert restore.map_path("/srv/ts1", MOUNTS) is None
    assert restore.rewrite_tablespace_map("16384 /srv/ts1\n", MOUNTS, resolve) == "16384 /restore/data01_restore_s/ts1\n"
    with pytest.raises(restore.Failure):
        restore.rewrite_tablespace_map("16386 /srv/elsewhere\n", MOUNTS, resolve)


def test_clone_names_and_mountpoints_follow_developers_md():
    clone = restore.clone_dataset("zp1/data02", "restore", "pgzfs_20261125T040100Z")
    assert clone == "zp1/data02_restore_pgzfs_20261125T040100Z"
    assert restore.clone_mountpoint("/r", clone) == "/r/data02_restore_pgzfs_20261125T040100Z"
    assert restore.clone_mountpoint("/r", "zp1/a/b_drill_s") == "/r/a_b_drill_s"
    assert restore.clone_kind("zp1/data02_drill_s1", "s1") == "drill"
    assert restore.clone_kind("zp1/data02_other", "s1") is None


def test_used_ports_come_from_tcp_listeners_and_postgres_sockets():
    tcp = ("  sl  local_address rem_address   st\n"
           "   0: 0100007F:1538 00000000:0000 0A 00000000:00000000\n"
           "   1: 0100007F:1539 0100007F:D3C2 01 00000000:00000000\n")
    unix = ("Num RefCount Protocol Flags Type St Inode Path\n"
            "0000: 00000002 00000000 00010000 0001 01 1234 /tmp/sock/.s.PGSQL.5434\n")
    used = restore.used_ports([tcp], unix)
    assert used == {5432, 5434}
    assert restore.choose_port(5432, used) == 5433
    with pytest.raises(restore.Failure):
        restore.choose_port(5432, set(range(5432, 5500)), span=10)


def test_wal_root_on_zfs_is_recognised_from_proc_mounts():
    mounts = restore.parse_mounts("/dev/sda1 / ext4 rw 0 0\n"
                                  "tank/data01 /tank/data01 fuse rw 0 0\n"
                                  "tank /tank zfs rw 0 0\n")
    assert restore.mount_of("/var/lib/pg_zfs", mounts)[2] == "ext4"
    assert restore.mount_of("/tank/data01/wal", mounts)[0] == "tank/data01"
    assert restore.mount_of("/tank/x", mounts)[2] == "zfs"


def test_wal_root_on_any_copy_on_write_file_system_is_refused():
    mounts = restore.parse_mounts("/dev/sda1 / ext4 rw 0 0\n"
                                  "other/wal /srv/wal fuse.zfs rw 0 0\n"
                                  "/dev/sdb1 /srv/bt btrfs rw 0 0\n"
                                  "tank/data01 /tank/data01 fuse rw 0 0\n")
    own = {"tank/data01"}
    assert restore.wal_root_problem(restore.mount_of("/var/lib/pg_zfs/wal", mounts), own) is None
    for path in ("/srv/wal/restore", "/srv/bt/wal", "/tank/data01/wal"):
        assert restore.wal_root_problem(restore.mount_of(path, mounts), own), path


def test_cleanup_takes_only_clones_this_tool_made():
    s = "pgzfs_20261125T040100Z"
    clone = {"name": "tank/data02_restore_" + s, "origin": "tank/data02@" + s, "clone_of": s}
    drill = {"name": "tank/data02_drill_" + s, "origin": "tank/data02@" + s, "clone_of": s}
    btrfs_marker = {"name": "/srv/bt/data02_restore_" + s, "origin": "/srv/bt/data02@" + s, "clone_of": s,
                    "exists": False}
    assert restore.is_our_clone(clone) and restore.is_our_clone(drill) and restore.is_our_clone(btrfs_marker)
    # pgzfs:clone_of is inherited by a dataset made below a clone, and kept by zfs send -p | recv
    child = {"name": "tank/data02_restore_%s/notes" % s, "origin": None, "clone_of": s}
    received = {"name": "backup/data02_restore_" + s, "origin": None, "clone_of": s}
    renamed = {"name": "tank/keep_me", "origin": "tank/data02@" + s, "clone_of": s}
    assert not any(restore.is_our_clone(fs) for fs in (child, received, renamed))
    assert not restore.is_our_clone({"name": "tank/data02", "origin": None, "clone_of": None})


def test_later_snapshots_follow_zfs_order_of_names_and_never_read_a_number():
    # zfs list -s createtxg -o name: the order is zfs's, exact past txg 1000 (1.41K).
    order = ["p/d1@a", "p/d1@b", "p/d1/child@c", "p/d1@c"]
    assert restore.later_snapshots(order, "p/d1@b") == ["p/d1@c"]
    assert restore.later_snapshots(order, "p/d1@a") == ["p/d1@b", "p/d1@c"]
    assert restore.later_snapshots(order, "p/d1@c") == []
    with pytest.raises(restore.Failure):
        restore.later_snapshots(order, "p/d1@zz")


def test_a_later_snapshot_that_is_no_later_set_of_ours_is_named_for_refusal():
    first, second = SETS[0], SETS[1]
    later = ["p/d1@pgzfs_20261125T050100Z", "p/d1@by_hand", "p/d1@pgzfs_20261125T060100Z"]
    assert restore.not_later_sets(later, first, SETS) == ["p/d1@by_hand"]
    # Stamped before the set although zfs made it after (a clock that went back): not ours to drop.
    assert restore.not_later_sets(["p/d1@pgzfs_20261125T040100Z"], second, SETS) == [
        "p/d1@pgzfs_20261125T040100Z"]
    assert restore.not_later_sets([], first, SETS) == []


# -- the recovering server -----------------------------------------------------------

LOG_REACHED = """\
2026-11-25 04:40:00.1 UTC [12] LOG:  starting point-in-time recovery to 2026-11-25 04:30:00+00
2026-11-25 04:40:00.3 UTC [12] LOG:  recovery stopping before commit of transaction 812, time 2026-11-25 04:30:00.2+00
2026-11-25 04:40:00.3 UTC [12] LOG:  pausing at the end of recovery
"""
LOG_ENDED_13 = """\
2026-11-25 04:40:00.3 UTC [12] LOG:  redo done at 0/9000148 system usage: CPU: user: 0.00 s
2026-11-25 04:40:00.3 UTC [12] LOG:  last completed transaction was at log time 2026-11-25 04:20:00+00
2026-11-25 04:40:00.3 UTC [12] FATAL:  recovery ended before configured recovery target was reached
"""


def test_recovery_log_is_read():
    events = restore.read_recovery_log(LOG_REACHED)
    assert events["stopping"].startswith("LOG:  recovery stopping before commit of transaction 812")
    assert events["paused"] and not events["ended_early"]
    events = restore.read_recovery_log(LOG_ENDED_13)
    assert events["ended_early"] and events["redo_lsn"] == "0/9000148"
    assert events["last_xact"] == "2026-11-25 04:20:00+00"
    assert events["fatal"].startswith("FATAL:  recovery ended")


def test_recovery_outcomes():
    reached = restore.read_recovery_log(LOG_REACHED)
    quiet = restore.read_recovery_log("")
    paused = (True, True, "0/9000148", "")
    replaying = (True, False, "0/8000000", "")
    opened = (False, False, "0/9000148", "")
    assert restore.recovery_outcome("time", paused, reached) == "paused"
    assert restore.recovery_outcome("time", replaying, quiet) == "waiting"
    assert restore.recovery_outcome("time", paused, quiet) == "waiting"   # someone else's pause
    assert restore.recovery_outcome("time", opened, reached) == "promoted"
    assert restore.recovery_outcome("latest", opened, quiet) == "promoted"
    # Before 13, a server that runs out of archive opens silently: not the target.
    assert restore.recovery_outcome("time", opened, quiet) == "ended early"
    assert restore.recovery_outcome("time", None, restore.read_recovery_log(LOG_ENDED_13)) == "ended early"
    assert restore.recovery_outcome("time", None, restore.read_recovery_log(
        "LOG:  shutdown at recovery target\n")) == "shut down"
    assert restore.recovery_outcome("time", None, quiet) == "failed"


class ServerExitingWhenAsked(object):
    """A recovering server that, at the moment it is asked whether it runs, writes
    its last lines ("shutdown at recovery target", --action shutdown) and exits:
    the window between two reads that no real PostgreSQL can be made to hit at
    will (CI saw it once with PostgreSQL 14)."""

    def __init__(self, log_file):
        self.log_file = log_file
        self.asked = 0

    def running(self):
        self.asked += 1
        with open(self.log_file, "a") as log_file:
            log_file.write("2026-12-02 02:27:27.5 UTC [9] LOG:  shutdown at recovery target\n"
                           "2026-12-02 02:27:27.6 UTC [9] LOG:  database system is shut down\n")
        return False

    def control_value(self, _name):
        return "0/48250A8"


def test_a_server_that_shuts_down_at_the_target_between_two_reads_is_taken_as_shut_down(tmp_path):
    # wait_for_target asks whether the server runs, then reads its log: a server
    # that has exited wrote its last line before. The other way round this was
    # "stopped before the target ... no FATAL line", and the restore failed.
    log_file = tmp_path / "server.log"
    log_file.write_text("2026-12-02 02:27:26.0 UTC [9] LOG:  starting point-in-time recovery to "
                        "2026-12-02 02:27:25.221286+00\n")
    snapshot_set = restore.SnapshotSet("pgzfs_20261202T022722Z", None, [], [], {}, 0, True)
    plan = restore.Plan(timeout=30, log_file=str(log_file), inclusive=True, snapshot_set=snapshot_set,
                        target=restore.Target("time", datetime.datetime(2026, 12, 2, 2, 27, 25, 221286, UTC)))
    server = ServerExitingWhenAsked(str(log_file))
    outcome = restore.Restorer(plan, None, server, None).wait_for_target()
    assert outcome["outcome"] == "shut down"
    assert outcome["lsn"] == "0/48250A8"
    assert server.asked == 1


def test_status_query_uses_each_versions_functions():
    assert "pg_get_wal_replay_pause_state" in restore.status_sql((14, 0))
    assert "pg_is_wal_replay_paused" in restore.status_sql((13, 0))
    assert "pg_last_xlog_replay_location" in restore.status_sql((9, 6))
    assert restore.parse_status("t|paused|0/9000148|2026-11-25 04:29:59+00") == (
        True, True, "0/9000148", "2026-11-25 04:29:59+00")
    assert restore.parse_status("f|not paused||")[:2] == (False, False)


def test_timings_line():
    assert restore.format_timings([("clone", 0.1), ("start", 1.25)]) == "clone 0.10s, start 1.25s; total 1.35s"


# -- the command line, without a pool ------------------------------------------------

@pytest.fixture
def bare_config(tmp_path):
    path = tmp_path / "pg_zfs.conf"
    path.write_text("[postgres]\npgdata = /nonexistent\n[snapshot]\ndatasets = nopool/data02\n")
    return path


def test_zone_less_target_time_exits_2_with_one_line(bare_config):
    proc = run_script("pg_zfs_restore", "restore", "--target-time", "2026-11-25 04:30:00",
                      config=bare_config)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "no time zone" in proc.stderr


def test_restore_needs_exactly_one_target(bare_config):
    proc = run_script("pg_zfs_restore", "restore", "--immediate", "--latest", config=bare_config)
    assert proc.returncode == 2
    proc = run_script("pg_zfs_restore", "restore", config=bare_config)
    assert proc.returncode == 2


def test_help_names_the_exit_codes_and_the_restore_command():
    proc = run_script("pg_zfs_restore", "--help")
    assert proc.returncode == 0
    assert "Exit codes:" in proc.stdout and "pg_wal_fetch.py" in proc.stdout
    assert os.path.basename(restore.__file__) == "pg_zfs_restore.py"


# -- settings a standby can bring back through include files ---------------------------

def postgres_settings(pgdata, names):
    """What PostgreSQL itself reads for names in pgdata's configuration (postgres -C)."""
    import subprocess
    from testbed import pg_bindir
    # Debian's PostgreSQL 15 (tools/install-deps.sh installs it): not on PATH there.
    program = os.path.join(pg_bindir("15"), "postgres")
    for path, _, names_here in os.walk(pgdata):
        os.chmod(path, 0o755)
        for name in names_here:
            os.chmod(os.path.join(path, name), 0o644)
    found = {}
    for name in names:
        proc = subprocess.run(["runuser", "-u", "postgres", "--", program, "-D", pgdata, "-C", name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        found[name] = proc.stdout.strip() if proc.returncode == 0 else "FAILED: " + proc.stderr.strip()
    return found


@pytest.fixture
def open_dir():
    """A directory the postgres user can read (pytest's tmp_path is root's alone)."""
    import pathlib
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="pg_zfs_restore_unit.", dir="/tmp")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_included_files_cannot_bring_back_standby_settings(open_dir):
    pgdata = open_dir / "pgdata"
    (pgdata / "conf.d").mkdir(parents=True)
    (pgdata / "postgresql.conf").write_text("include_dir 'conf.d'\n")
    (pgdata / "conf.d" / "standby.conf").write_text(
        "primary_conninfo = 'host=production'\nprimary_slot_name = 'guest'\n"
        "recovery_target_name = 'old'\nsynchronous_standby_names = '*'\n"
        "recovery_min_apply_delay = '1h'\nrecovery_end_command = 'touch /prod/flag'\n"
        "external_pid_file = '/run/postgresql/15-main.pid'\narchive_mode = on\n")
    (pgdata / "postgresql.auto.conf").write_text("")
    made = files("15", target("time", "2026-11-25T04:30:00Z"), "promote")
    (pgdata / "postgresql.auto.conf").write_text(made["postgresql.auto.conf"][1])
    found = postgres_settings(str(pgdata), [
        "primary_conninfo", "primary_slot_name", "recovery_target_name", "recovery_target_time",
        "synchronous_standby_names", "recovery_min_apply_delay", "recovery_end_command",
        "external_pid_file", "archive_mode"])
    assert found == {"primary_conninfo": "", "primary_slot_name": "", "recovery_target_name": "",
                     "recovery_target_time": "2026-11-25 04:30:00.000000+00",
                     "synchronous_standby_names": "", "recovery_min_apply_delay": "0",
                     "recovery_end_command": "", "external_pid_file": "", "archive_mode": "off"}


def test_a_copy_that_would_run_on_another_data_directory_is_refused():
    pgdata = "/var/lib/pg_zfs/restore/data02_restore_s/pgdata"
    assert restore.effective_settings_problems(
        {"data_directory": pgdata, "archive_mode": "off"}, pgdata) == []
    problems = restore.effective_settings_problems(
        {"data_directory": "/tank/data02/pgdata", "archive_mode": "off"}, pgdata)
    assert len(problems) == 1 and "data_directory" in problems[0] and "/tank/data02/pgdata" in problems[0]
    problems = restore.effective_settings_problems({"data_directory": pgdata, "archive_mode": "on"}, pgdata)
    assert len(problems) == 1 and "archive_mode" in problems[0]


def test_data_directory_and_shared_files_of_the_standby_are_commented_out():
    text, found = restore.comment_out_settings(
        "data_directory = '/tank/data02/pgdata'\nexternal_pid_file = '/run/postgresql/15-main.pid'\n"
        "stats_temp_directory = '/run/postgresql/15-main.pg_stat_tmp'\n", restore.INHERITED_SETTINGS)
    assert found == ["data_directory", "external_pid_file", "stats_temp_directory"]


def test_a_setting_with_a_quote_or_a_backslash_reads_back_as_written():
    assert restore.quote_setting("it's") == "'it''s'"
    assert restore.quote_setting("C:\\wal") == "'C:\\\\wal'"


def test_only_sets_of_this_prefix_and_of_its_datasets_are_ours():
    mine = props("pgzfs_20261125T040100Z", "2026-11-25T04:01:02Z", "0/5000100")
    other_prefix = props("other_20261125T070100Z", "2026-11-25T07:01:02Z", "0/F000100")
    other_cluster = props("pgzfs_20261125T080100Z", "2026-11-25T08:01:02Z", "0/F000200",
                          datasets="p/e1 p/e2", pgdata_dataset="p/e2")
    hand_named = props("pgzfs_today", "2026-11-25T09:01:02Z", "0/F000300")
    rows = rows_of(mine, other_prefix, other_cluster, hand_named)

    def names(prefix, datasets):
        return [s.name for s in restore.sets_of(restore.group_sets(rows, prefix), datasets)]
    assert names("pgzfs", ["p/d1", "p/d2"]) == ["pgzfs_20261125T040100Z"]
    assert names("other", ["p/d1", "p/d2"]) == ["other_20261125T070100Z"]
    assert names("pgzfs", ["p/e2"]) == ["pgzfs_20261125T080100Z"]


def test_only_clones_of_this_configs_sets_are_cleaned_up():
    s = "pgzfs_20261125T040100Z"
    mine = {"name": "p/d2_restore_" + s, "origin": "p/d2@" + s, "clone_of": s}
    other_dataset = {"name": "p/e2_restore_" + s, "origin": "p/e2@" + s, "clone_of": s}
    o = "other_20261125T040100Z"
    other_prefix = {"name": "p/d2_drill_" + o, "origin": "p/d2@" + o, "clone_of": o}
    assert restore.clone_of_config(mine, "pgzfs", ["p/d1", "p/d2"])
    assert not restore.clone_of_config(other_dataset, "pgzfs", ["p/d1", "p/d2"])
    assert not restore.clone_of_config(other_prefix, "pgzfs", ["p/d1", "p/d2"])
    assert restore.clone_of_config(other_prefix, "other", ["p/d2"])


# -- why a recovery stopped, and holes in the archive --------------------------------

LOG_FETCH_STOPPED = """\
2026-11-25 04:40:00.1 UTC [12] LOG:  restored log file "000000010000000000000004" from archive
pg_wal_fetch: ERROR: stopping recovery at 000000010000000000000005: [source host1] unreachable (probe ping); [source host2] absent
2026-11-25 04:40:02.0 UTC [12] FATAL:  could not restore file "000000010000000000000005" from archive: child process exited with exit code 200
2026-11-25 04:40:02.0 UTC [10] LOG:  startup process (PID 12) exited with exit code 1
"""
LOG_OPENED_AT_A_HOLE = """\
2026-11-25 04:40:00.1 UTC [12] LOG:  restored log file "000000010000000000000004" from archive
2026-11-25 04:40:00.2 UTC [12] LOG:  invalid record length at 0/5000060: expected at least 24, got 0
2026-11-25 04:40:00.2 UTC [12] LOG:  redo done at 0/5000028 system usage: CPU: user: 0.00 s
2026-11-25 04:40:00.3 UTC [12] LOG:  selected new timeline ID: 2
"""


def test_pg_wal_fetch_stop_line_is_the_reason_and_the_fatal_only_its_consequence():
    events = restore.read_recovery_log(LOG_FETCH_STOPPED)
    assert events["fetch_stop"] == ("000000010000000000000005: [source host1] unreachable (probe ping); "
                                    "[source host2] absent")
    assert events["restored"] == "000000010000000000000004"
    assert events["fatal"].startswith("FATAL:  could not restore file")
    assert restore.why_recovery_stopped(events) == (
        " (server log: pg_wal_fetch: ERROR: stopping recovery at 000000010000000000000005: "
        "[source host1] unreachable (probe ping); [source host2] absent)")
    assert restore.recovery_outcome("latest", None, events) == "failed"


def test_the_line_saying_where_the_wal_went_bad_is_kept():
    events = restore.read_recovery_log(LOG_OPENED_AT_A_HOLE)
    assert events["wal_problem"] == "LOG:  invalid record length at 0/5000060: expected at least 24, got 0"
    assert events["fetch_stop"] is None and events["fatal"] is None
    assert "invalid record length" in restore.why_recovery_stopped(events)
    assert restore.why_recovery_stopped(restore.read_recovery_log("")) == ""


def test_segment_names_and_positions_round_trip_for_any_segment_size():
    assert restore.segment_position("0000000200000001000000FF") == (2, 0x1FF)
    assert restore.segment_name(2, 0x1FF) == "0000000200000001000000FF"
    assert restore.segment_name(1, 0x100) == "000000010000000100000000"
    size = 64 * 1024 * 1024
    assert restore.segment_position("000000010000000100000003", size) == (1, 64 + 3)
    assert restore.segment_name(1, 64 + 3, size) == "000000010000000100000003"
    assert restore.segment_of_lsn(1, restore.parse_lsn("0/5000000")) == "000000010000000000000005"
    assert restore.segment_of_lsn(1, restore.parse_lsn("1/4FFFFFF")) == "000000010000000100000004"
    with pytest.raises(ValueError):
        restore.segment_position("00000001000000000000000G")
    assert restore.parse_segment_size("16777216") == 16777216
    assert restore.parse_segment_size("") == restore.DEFAULT_SEGMENT_SIZE


def test_a_newer_segment_in_any_archive_after_where_replay_ended_is_a_hole():
    check = ("host1 (127.0.0.2:2222): reachable, /a/* matches 1 directory, newest WAL file "
             "000000010000000000000009, round trip 40 ms\n"
             "host2 (127.0.0.3:2222): unreachable (probe = ping)\n")
    newest = restore.newest_in_check(check)
    assert newest == ["000000010000000000000009"]
    assert restore.archive_gap("000000010000000000000004", newest, True) == (
        "000000010000000000000005", "000000010000000000000009")
    assert restore.archive_gap("000000010000000000000009", newest, True) is None
    # Another timeline: followed with --timeline latest, not with current or an ID.
    later_timeline = ["000000020000000000000007"]
    assert restore.archive_gap("000000010000000000000004", later_timeline, True) == (
        "000000010000000000000005", "000000020000000000000007")
    assert restore.archive_gap("000000010000000000000004", later_timeline, False) is None
    assert restore.archive_gap("000000020000000000000004", ["000000010000000000000009"], True) is None


def test_a_set_whose_stop_segment_no_archive_holds_is_waiting_for_wal():
    backup = group_sets(rows_of(props("pgzfs_20261125T040100Z", "2026-11-25T04:01:02Z", "0/5000100",
                                              start_wal="000000010000000000000002")))[0]
    at_boundary = group_sets(rows_of(props("pgzfs_20261125T050100Z", "2026-11-25T05:01:02Z",
                                                   "0/6000000", start_wal="000000010000000000000002")))[0]
    shutdown = group_sets(rows_of(props("pgzfs_20261125T060100Z", "2026-11-25T06:01:02Z",
                                                "0/7000000", mode="shutdown",
                                                start_wal="000000010000000000000007", start_lsn="0/7000000")))[0]
    assert restore.stop_segment(backup) == "000000010000000000000005"
    # Consistent at the end of segment 5, but --immediate stops on reading the record at 0/6000000.
    assert restore.stop_segment(at_boundary) == "000000010000000000000006"
    assert restore.stop_segment(shutdown) == "000000010000000000000007"       # its checkpoint record
    sets = [backup, at_boundary, shutdown]
    assert restore.waiting_for_wal(sets, ["000000010000000000000005"]) == {
        "pgzfs_20261125T050100Z": "000000010000000000000006", "pgzfs_20261125T060100Z": "000000010000000000000007"}
    assert restore.waiting_for_wal(sets, ["000000010000000000000004", "000000010000000000000007"]) == {}
    assert restore.waiting_for_wal(sets, ["000000010000000000000004"]) == {
        "pgzfs_20261125T040100Z": "000000010000000000000005", "pgzfs_20261125T050100Z": "000000010000000000000006",
        "pgzfs_20261125T060100Z": "000000010000000000000007"}
    assert restore.waiting_for_wal(sets, ["000000020000000000000009"]) == {}   # a later timeline holds it
    assert restore.waiting_for_wal(sets, []) == {}      # nothing listed: nothing known


def test_the_segment_size_is_the_one_start_wal_and_start_lsn_agree_on():
    assert restore.segment_size_of("000000010000000000000005", "0/5000028") == 16 * 1024 * 1024
    assert restore.segment_size_of("000000010000000000000002", "0/5000028") == 32 * 1024 * 1024
    assert restore.segment_size_of("000000010000000000000001", "0/5000028") == 64 * 1024 * 1024
    assert restore.segment_size_of("", "0/5000028") == 16 * 1024 * 1024
    assert restore.segment_size_of("000000010000000000000005", "bad") == 16 * 1024 * 1024


# -- run as the PostgreSQL user from cron ------------------------------------------------

def test_the_user_switch_needs_no_path_runuser_by_its_full_path_else_su():
    assert restore.switch_user_argv("postgres", ["/usr/lib/postgresql/15/bin/pg_ctl", "status"],
                                    "/usr/sbin/runuser") == [
        "/usr/sbin/runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "status"]
    assert restore.switch_user_argv("postgres", ["/opt/pg zfs/pg_wal_fetch.py", "-c", "/etc/a b.conf"], None) == [
        "/bin/su", "-s", "/bin/sh", "postgres", "-c", "'/opt/pg zfs/pg_wal_fetch.py' -c '/etc/a b.conf'"]
    found = restore.as_user("postgres", ["/bin/true"])
    assert os.path.isabs(found[0]) and found[1:] == ["-u", "postgres", "--", "/bin/true"]


def test_crontab_example_runs_the_weekly_drill_as_root_with_the_config():
    example = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc",
                                "crontab.example")).read()
    drills = [line for line in example.splitlines() if " drill" in line and not line.startswith("#")]
    assert len(drills) == 1
    fields = drills[0].split()
    assert len(fields[:5]) == 5 and fields[5] == "root"
    assert fields[6:] == ["/opt/pg_zfs/bin/pg_zfs_restore.py", "-c", "/etc/pg_zfs/pg_zfs.conf", "drill"]


# -- where the datasets were mounted when the set was taken ----------------------------

def test_tablespaces_on_a_legacy_dataset_map_by_the_mountpoints_stored_with_the_set():
    stored = b'{"tank/ts": "/srv/ts", "tank/pg": "/var/lib/pg"}'
    mounts = "tank/pg /var/lib/pg fuse.zfs rw 0 0\n/dev/sda1 / ext4 rw 0 0\n"
    found = restore.source_mountpoints(["tank/ts", "tank/pg"], stored, {"tank/ts": "legacy", "tank/pg": "/var/lib/pg"},
                                       restore.parse_mounts(mounts))
    assert found == {"tank/ts": ["/srv/ts"], "tank/pg": ["/var/lib/pg"]}
    mount_map = dict((path, "/restore/" + dataset.split("/")[1]) for dataset, paths in found.items() for path in paths)
    assert restore.rewrite_tablespace_map("16390 /srv/ts/space\n", mount_map) == "16390 /restore/ts/space\n"
    # An older set without pgzfs:mountpoints: a legacy dataset is found in the mount table.
    older = restore.source_mountpoints(["tank/ts"], b"", {"tank/ts": "legacy"},
                                       restore.parse_mounts("tank/ts /srv/ts zfs rw 0 0\n"))
    assert older == {"tank/ts": ["/srv/ts"]}
    # Unreadable stored bytes are ignored; nothing known leaves the dataset out (restore refuses the map).
    assert restore.source_mountpoints(["tank/ts"], b"not json", {"tank/ts": "legacy"}, []) == {}
    # Stored and current places differ (a symlinked path, a moved mountpoint): both lead to the clone.
    assert restore.source_mountpoints(["/srv/bt/d"], b'{"/srv/bt/d": "/mnt/bt/d"}', {"/srv/bt/d": "/srv/bt/d"},
                                      []) == {"/srv/bt/d": ["/mnt/bt/d", "/srv/bt/d"]}


# -- the database's own time per set --------------------------------------------------

def test_a_sets_stop_point_is_the_databases_own_time_when_it_has_one():
    wrong_clock = group_sets(rows_of(props("pgzfs_20261125T030100Z", "2026-11-25T03:01:02Z", "0/9000100",
                                                   db_time="2026-11-25T04:01:01.500000Z")))
    assert restore.iso_time(restore.set_stop_time(wrong_clock[0])) == "2026-11-25T04:01:01.5Z"
    sets = SETS + wrong_clock
    # The guest clock said 03:01, an hour behind: the set holds commits up to 04:01:01.5.
    assert restore.choose_set(sets, target("time", "2026-11-25T04:01:01.7Z")).name == "pgzfs_20261125T030100Z"
    assert restore.choose_set(sets, target("time", "2026-11-25T04:30:00Z")).name == "pgzfs_20261125T040100Z"
    with pytest.raises(restore.Failure) as refused:
        restore.choose_set(wrong_clock, target("time", "2026-11-25T03:30:00Z"))
    assert "earliest possible target is 2026-11-25T04:01:01.5Z" in str(refused.value)
    broken = group_sets(rows_of(props("pgzfs_20261125T070100Z", "2026-11-25T07:01:02Z", "0/9000100",
                                              db_time="yesterday")))[0]
    assert "pgzfs:db_time 'yesterday' is not a UTC time" in restore.set_problems(broken)


def test_a_copy_holding_a_commit_after_the_target_is_named():
    at = restore.parse_time
    old_set = SETS[0]
    newer = group_sets(rows_of(props("pgzfs_20261125T030100Z", "2026-11-25T03:01:02Z", "0/9000100",
                                             db_time="2026-11-25T04:01:01.5Z")))[0]
    assert restore.commit_after_target("2026-11-25 04:29:59.9+00", at("2026-11-25T04:30:00Z"), True, old_set) is None
    assert restore.commit_after_target("?", at("2026-11-25T04:30:00Z"), True, old_set) is None
    assert "committed at 2026-11-25T04:30:00.1Z, after the target" in restore.commit_after_target(
        "2026-11-25 04:30:00.1+00", at("2026-11-25T04:30:00Z"), True, old_set)
    assert restore.commit_after_target("2026-11-25 04:30:00+00", at("2026-11-25T04:30:00Z"), True, old_set) is None
    assert restore.commit_after_target("2026-11-25 04:30:00+00", at("2026-11-25T04:30:00Z"), False, old_set)
    assert "holds transactions committed up to 2026-11-25T04:01:01.5Z (pgzfs:db_time)" in \
        restore.commit_after_target("?", at("2026-11-25T04:00:00Z"), True, newer)


def test_an_exclusive_target_at_a_sets_last_commit_does_not_use_that_set():
    at = "2026-11-25T04:01:01.5Z"
    newer = group_sets(rows_of(props("pgzfs_20261125T040200Z", "2026-11-25T04:01:02Z", "0/9000100",
                                             db_time="2026-11-25T04:01:01.500000Z")))
    sets = group_sets(rows_of(props("pgzfs_20261125T030100Z", "2026-11-25T03:01:02Z", "0/5000100"))) + newer
    # db_time is the commit time of the set's last transaction: --exclusive at it leaves that one out.
    assert restore.choose_set(sets, target("time", at)).name == "pgzfs_20261125T040200Z"
    assert restore.choose_set(sets, target("time", at), inclusive=False).name == "pgzfs_20261125T030100Z"
    with pytest.raises(restore.Failure):
        restore.choose_set(sets, target("time", at), "pgzfs_20261125T040200Z", inclusive=False)
    assert "holds transactions committed up to 2026-11-25T04:01:01.5Z" in restore.commit_after_target(
        "?", restore.parse_time(at), False, newer[0])
    assert restore.commit_after_target("?", restore.parse_time(at), True, newer[0]) is None


def test_progress_names_the_lsn_the_last_commit_and_the_segments_restored():
    events = restore.read_recovery_log(LOG_OPENED_AT_A_HOLE + LOG_OPENED_AT_A_HOLE)
    assert events["restored_count"] == 2
    line = restore.progress_line((True, False, "0/5000060", "2026-11-25 04:20:00+00"), events, 20.4)
    assert line == ("recovering for 20s: replay at LSN 0/5000060, last commit 2026-11-25 04:20:00+00; "
                    "2 segment(s) restored from the archive, the last 000000010000000000000004")
    assert restore.progress_line(None, restore.read_recovery_log(""), 10) == (
        "recovering for 10s: not answering yet (replaying up to consistency); 0 segment(s) restored from the archive")


def test_progress_gives_the_rate_and_the_time_left_to_a_time_an_lsn_or_the_sets_stop():
    first = restore.replay_sample(10.0, (True, False, "0/5000000", "2026-11-25 04:00:00+00"))
    last = restore.replay_sample(20.0, (True, False, "0/5A00000", "2026-11-25 04:10:00+00"))
    # 10 MiB in 10 s; the commit times advance 600 s in 10 s: 60 to 1.
    rate, left = restore.replay_estimate(first, last, target("time", "2026-11-25T05:00:00Z"))
    assert rate == 0xA00000 / 10.0 and left == 50.0
    assert restore.replay_estimate(first, last, target("lsn", "0/6E00000")) == (0xA00000 / 10.0, 20.0)
    assert restore.replay_estimate(first, last, target("immediate"), stop_lsn=0x5A00000)[1] == 0.0
    # Past the target (an exclusive stop, a clock): never negative.
    assert restore.replay_estimate(first, last, target("time", "2026-11-25T04:05:00Z"))[1] == 0.0
    # What the pool cannot place, or nothing moved yet: no time left given.
    assert restore.replay_estimate(first, last, target("name", "before_upgrade"))[1] is None
    assert restore.replay_estimate(first, first, target("lsn", "1/0")) == (None, None)
    assert restore.replay_estimate(None, last, target("lsn", "1/0")) == (None, None)
    assert restore.replay_sample(5.0, None) is None
    assert restore.replay_sample(5.0, (True, False, "", "")) is None
    line = restore.progress_line((True, False, "0/5A00000", "2026-11-25 04:10:00+00"),
                                 restore.read_recovery_log(""), 20.0, rate, left)
    assert line.endswith("(1.0 MB/s); 0 segment(s) restored from the archive; about 50s to the target")


# -- two restores started together ---------------------------------------------------

def test_two_restores_claim_different_ports_and_a_dead_ones_claim_is_taken_over(tmp_path):
    directory = str(tmp_path / "wal_root")
    ports = restore.free_ports(6000, {6001}, span=4)
    assert ports == [6000, 6002, 6003]
    first, first_claim = restore.claim_port(directory, ports)
    second, second_claim = restore.claim_port(directory, ports)
    assert (first, second) == (6000, 6002)
    assert open(first_claim).read().strip() == str(os.getpid())
    restore.release_port(first_claim)
    assert not os.path.exists(first_claim)
    assert restore.claim_port(directory, ports)[0] == 6000
    # A restore that died (its pid is gone) leaves a stale claim: taken over.
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(os.path.join(directory, ".port-6003"), "w") as claim:
        claim.write("%d\n" % dead.pid)
    assert restore.claim_port(directory, [6002, 6003])[0] == 6003
    with pytest.raises(restore.Failure):
        restore.claim_port(directory, [6000, 6002])
    restore.release_port(None)


# -- a signal is never taken for a command that failed -------------------------------

def test_a_signal_while_the_archive_is_listed_or_the_copy_is_asked_ends_the_command(monkeypatch):
    def stopped(*args, **kwargs):
        raise restore.signal_failure(15)

    def failed(*args, **kwargs):
        raise restore.Failure("psql did not finish within 30 s", 1)

    server = restore.Server("/usr/lib/postgresql/15/bin", "postgres", "/x/pgdata", "/x", 5499)
    monkeypatch.setattr(restore, "run", failed)
    assert restore.archive_listing("/x/pg_wal_fetch.py", "/x/pg_zfs.conf", "postgres")[0] == []
    assert server.status((15, 0)) is None
    monkeypatch.setattr(restore, "run", stopped)
    for ask in (lambda: restore.archive_listing("/x/pg_wal_fetch.py", "/x/pg_zfs.conf", "postgres"),
                lambda: server.status((15, 0))):
        with pytest.raises(restore.Stopped) as error:
            ask()
        assert str(error.value) == "stopped by SIGTERM"


# -- a clone that another restore made a moment before ---------------------------------

class FakeZfs(object):
    """restore.Zfs with its zfs calls answered from a list and recorded."""

    def __init__(self, answers):
        self.zfs = restore.Zfs()
        self.answers = list(answers)
        self.calls = []
        self.zfs._run = self.run

    def run(self, *args, **kwargs):
        self.calls.append(args[0])
        return self.answers.pop(0)


def test_a_clone_that_exists_already_is_never_destroyed_and_one_zfs_could_not_mount_is():
    snapshot, clone = "tank/data01@pgzfs_20261125T040100Z", "tank/data01_drill_pgzfs_20261125T040100Z"
    theirs = FakeZfs([(1, "", "cannot create '%s': dataset already exists\n" % clone), (0, snapshot + "\n", "")])
    with pytest.raises(restore.Failure) as error:
        theirs.zfs.clone(snapshot, clone, "/r/data01_drill_s", "pgzfs_20261125T040100Z")
    assert "already exists" in str(error.value) and "destroy" not in theirs.calls
    ours = FakeZfs([(1, "", "cannot mount '/r/data01_drill_s': directory is not empty\n"), (0, snapshot + "\n", ""),
                    (0, "", "")])
    with pytest.raises(restore.Failure):
        ours.zfs.clone(snapshot, clone, "/r/data01_drill_s", "pgzfs_20261125T040100Z")
    assert ours.calls == ["clone", "get", "destroy"]


@pytest.mark.parametrize("command", ["list", "restore", "drill", "cleanup", "rollback"])
def test_each_subcommands_help_ends_with_command_lines_that_parse(command):
    import shlex
    proc = run_script("pg_zfs_restore", command, "--help")
    assert proc.returncode == 0, proc.stderr
    examples = proc.stdout.split("\nexamples:\n", 1)[1].splitlines()
    assert len(examples) >= 2
    for line in examples:
        words = shlex.split(line)
        assert words[0] == "pg_zfs_restore.py"
        assert restore.parse_args(words[1:]).command == command


def test_the_processes_that_keep_a_clone_busy_are_named(tmp_path):
    """What a 'dataset is busy' failure names: a real process with its working
    directory below the clone's mountpoint, and one with a file open there."""
    held = tmp_path / "clone" / "pgdata"
    held.mkdir(parents=True)
    in_dir = subprocess.Popen(["sleep", "30"], cwd=str(held))
    with open(str(tmp_path / "clone" / "open.log"), "w") as handle:
        with_file = subprocess.Popen(["sleep", "30"], stdout=handle, cwd="/")
    try:
        found = restore.users_of([str(tmp_path / "clone")])
        assert "%d sleep (cwd)" % in_dir.pid in found and "%d sleep (fd)" % with_file.pid in found
        assert restore.users_of([str(tmp_path / "elsewhere")]) == []
        assert ("%d sleep (cwd)" % in_dir.pid) in restore.busy_hint([str(tmp_path / "clone")])
    finally:
        for proc in (in_dir, with_file):
            proc.kill()
            proc.wait()


def test_a_signal_while_a_failed_restore_says_so_still_undoes_it():
    """Review of stop 26's fix: a restore failed, and a SIGTERM came while its
    "failed after" line was logged, before the undo: the undo (stop the server,
    destroy the clones) must still run, and the failure is what is reported."""
    fresh = load_script("pg_zfs_restore")      # signals not settled by an earlier test's main()

    class FailingClone(object):
        plan = types.SimpleNamespace(snapshot_set=types.SimpleNamespace(name="pgzfs_20261201T000000Z"))
        timings = []
        undone = None
        step = fresh.Restorer.step

        def clone(self):
            raise fresh.Failure("zfs clone failed: out of space", 1)

        def undo(self, keep):
            self.undone = keep

    class SignalWhileLogging(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("restore of set"):
                os.kill(os.getpid(), signal.SIGTERM)    # the handler runs as kill returns

    restorer, handler = FailingClone(), SignalWhileLogging()
    fresh.log.addHandler(handler)
    try:
        fresh.catch_signals()
        with pytest.raises(fresh.Failure) as error:
            fresh.restore_with(restorer, types.SimpleNamespace(dry_run=False, keep_on_failure=False,
                                                               no_start=False))
    finally:
        fresh.log.removeHandler(handler)
    assert str(error.value) == "zfs clone failed: out of space"
    assert restorer.undone is False and fresh._signals_pending == [signal.SIGTERM]
