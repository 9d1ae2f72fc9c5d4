"""Unit tests of pg_zfs_snap.py's pure functions: names, labels, retention, check.

No database, no zfs: the script is imported by path.
"""

import base64
import calendar
import json
import os
import signal
import time
import types

import pytest

from testbed import load_script

snap = load_script("pg_zfs_snap")

DATASETS = ("pool/data01", "pool/data03", "pool/data04", "pool/data02")


def utc(text):
    """Epoch seconds of 'YYYY-mm-dd HH:MM:SS' UTC."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


def rows_for(name, datasets=DATASETS, present=None, stop_lsn="0/3000100", **extra):
    """Snapshot rows of one set as ZfsBackend.list_snapshots returns them."""
    properties = {"set": name, "datasets": " ".join(datasets), "pgdata_dataset": datasets[-1],
                  "start_wal": "000000010000000000000003", "mode": "backup"}
    if stop_lsn:
        properties["stop_lsn"] = stop_lsn
    properties.update(extra)
    return [(dataset, name, 1024, dict(properties))
            for dataset in (datasets if present is None else present)]


def sets_at(*times, **kwargs):
    """Complete sets (prefix pgzfs) at the given 'YYYY-mm-dd HH:MM:SS' UTC times."""
    rows = []
    for text in times:
        rows += rows_for(snap.set_name("pgzfs", utc(text)), **kwargs)
    return snap.group_sets(rows, "pgzfs")


def names(*times):
    return [snap.set_name("pgzfs", utc(text)) for text in times]


def policy(hourly=0, daily=0, weekly=0, monthly=0):
    return snap.Policy(hourly, daily, weekly, monthly)


# -- names ------------------------------------------------------------------

def test_set_name_is_utc_to_the_second_and_parses_back():
    when = utc("2026-11-25 04:01:07")
    assert snap.set_name("pgzfs", when) == "pgzfs_20261125T040107Z"
    assert snap.parse_set_name("pgzfs_20261125T040107Z", "pgzfs") == when


@pytest.mark.parametrize("name", [
    "other_20261125T040107Z",        # another prefix
    "pgzfs_x_20261125T040107Z",      # a longer prefix that starts like ours
    "pgzfs_20261125T0401Z",          # not to the second
    "pgzfs_20261325T040107Z",        # month 13
    "pgzfs_20261125",                # the article's daily name
    "autosnap_2026-11-25_04:01:07_daily",
])
def test_names_of_other_tools_or_shapes_are_not_ours(name):
    assert snap.parse_set_name(name, "pgzfs") is None


@pytest.mark.parametrize("prefix", ["", "a/b", "a@b", "a b", "_x", "x" * 65])
def test_bad_prefixes_are_refused(prefix):
    with pytest.raises(ValueError):
        snap.check_prefix(prefix)


def test_now_option_format():
    assert snap.parse_utc("20260101T000000Z") == utc("2026-01-01 00:00:00")
    with pytest.raises(ValueError):
        snap.parse_utc("2026-01-01")


# -- versions and backup calls ------------------------------------------------

@pytest.mark.parametrize("number, major", [(180001, "18"), (150004, "15"), (140001, "14"),
                                           (100023, "10"), (90624, "9.6")])
def test_major_version(number, major):
    assert snap.major_version(number) == major


def test_versions_before_9_6_are_refused():
    with pytest.raises(ValueError):
        snap.major_version(90522)


def test_15_and_later_use_pg_backup_start_and_stop():
    start, stop = snap.backup_calls(150004, "pg_zfs_snap it's")
    assert start == "SELECT pg_backup_start('pg_zfs_snap it''s', true)"
    assert "FROM pg_backup_stop(false)" in stop
    # The database's own time, read in the same statement, after the stop.
    assert "pg_last_xact_replay_timestamp()" in stop and "clock_timestamp()" in stop
    assert "pg_last_wal_replay_lsn()" in stop


def test_10_to_14_use_non_exclusive_pg_start_backup():
    start, stop = snap.backup_calls(140001, "x")
    assert start == "SELECT pg_start_backup('x', true, false)"
    assert stop.endswith("FROM pg_stop_backup(false, false)")


def test_9_6_stop_has_no_wait_for_archive_argument():
    assert snap.backup_calls(90624, "x")[1].endswith("FROM pg_stop_backup(false)")


def test_db_time_of_a_standby_that_replayed_no_commit_since_it_started_is_the_primarys_last_message():
    # pg_last_xact_replay_timestamp() is NULL then: the guest clock alone would stand for the primary's.
    for number in (90624, 100000, 150000):
        stop = snap.backup_calls(number, "x")[1]
        assert "coalesce(pg_last_xact_replay_timestamp(), (SELECT last_msg_send_time FROM pg_stat_wal_receiver))" \
            in stop


def test_stop_answer_gives_label_and_map_byte_for_byte():
    label = "START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\nLABEL: \xe9t\xe9\n"
    tablespace_map = "16384 /mnt/data01/ts1\n"
    line = "0/3000100|%s|%s|2026-11-25T04:01:00.250000Z|0/3000100" % (
        base64.b64encode(label.encode("utf-8")).decode(), base64.b64encode(tablespace_map.encode()).decode())
    lsn, label_bytes, map_bytes, db_time, db_lsn = snap.parse_stop_row(line)
    assert lsn == "0/3000100" and db_time == "2026-11-25T04:01:00.250000Z" and db_lsn == "0/3000100"
    assert label_bytes == label.encode("utf-8")
    assert map_bytes == tablespace_map.encode()


def test_stop_answer_with_empty_map():
    assert snap.parse_stop_row("0/3000100|QUJD|||")[2:] == (b"", "", "")


@pytest.mark.parametrize("line", ["", "0/1|a", "garbage|QUJD|||", "0/1|QUJD||x", "0/1|QUJD||yesterday|",
                                  "0/1|QUJD|||nolsn", "0/1|QUJD|"])
def test_unexpected_stop_answers_are_refused(line):
    with pytest.raises(ValueError):
        snap.parse_stop_row(line)


# -- backup label -------------------------------------------------------------

LABEL_15 = """START WAL LOCATION: 0/5000028 (file 000000020000000000000005)
CHECKPOINT LOCATION: 0/5000060
BACKUP METHOD: streamed
BACKUP FROM: standby
START TIME: 2026-11-25 04:01:00 UTC
LABEL: pg_zfs_snap pgzfs_20261125T040100Z
START TIMELINE: 2
"""

LABEL_10 = """START WAL LOCATION: 0/2000028 (file 000000010000000000000002)
CHECKPOINT LOCATION: 0/2000060
BACKUP METHOD: streamed
BACKUP FROM: master
START TIME: 2026-11-25 04:01:00 UTC
LABEL: x
"""


def test_label_gives_start_wal_lsn_timeline_and_origin():
    facts = snap.parse_backup_label(LABEL_15)
    assert facts == {"start_lsn": "0/5000028", "start_wal": "000000020000000000000005",
                     "timeline": 2, "backup_from": "standby"}


def test_label_without_start_timeline_takes_it_from_the_wal_name():
    assert snap.parse_backup_label(LABEL_10)["timeline"] == 1


def test_label_whose_timeline_contradicts_its_wal_name_is_refused():
    with pytest.raises(ValueError):
        snap.parse_backup_label(LABEL_15.replace("START TIMELINE: 2", "START TIMELINE: 3"))


def test_label_without_start_location_is_refused():
    with pytest.raises(ValueError):
        snap.parse_backup_label("LABEL: x\n")


# -- a stopped cluster ----------------------------------------------------------

CONTROLDATA = """pg_control version number:            1300
Database system identifier:           7441234567890123456
Database cluster state:               shut down in recovery
Latest checkpoint location:           0/6000060
Latest checkpoint's REDO location:    0/6000028
Latest checkpoint's REDO WAL file:    000000010000000000000006
Latest checkpoint's TimeLineID:       1
"""


def test_stopped_standby_facts_come_from_its_last_restartpoint():
    facts = snap.shutdown_facts(snap.parse_controldata(CONTROLDATA))
    assert facts == {"start_lsn": "0/6000028", "stop_lsn": "0/6000028",
                     "start_wal": "000000010000000000000006", "timeline": "1",
                     "system_identifier": "7441234567890123456"}


def test_stopped_standby_set_stops_at_its_minimum_recovery_point_when_later():
    text = CONTROLDATA + "Minimum recovery ending location:     0/60001A0\n"
    facts = snap.shutdown_facts(snap.parse_controldata(text))
    assert (facts["start_lsn"], facts["stop_lsn"]) == ("0/6000028", "0/60001A0")
    text = CONTROLDATA + "Minimum recovery ending location:     0/0\n"
    assert snap.shutdown_facts(snap.parse_controldata(text))["stop_lsn"] == "0/6000028"


def test_lsn_values_compare_across_the_slash():
    assert snap.parse_lsn("1/0") > snap.parse_lsn("0/FFFFFFFF")


@pytest.mark.parametrize("state", ["in production", "in archive recovery", "shutting down"])
def test_a_cluster_that_did_not_shut_down_cleanly_is_refused(state):
    text = CONTROLDATA.replace("shut down in recovery", state)
    with pytest.raises(ValueError):
        snap.shutdown_facts(snap.parse_controldata(text))


# -- datasets -----------------------------------------------------------------

MOUNTS = {"pool": "/pool", "pool/data01": "/pool/data01", "pool/data02": "/pool/data02",
          "pool/legacy": "legacy"}


def test_pgdata_dataset_is_the_longest_mountpoint_holding_it():
    assert snap.dataset_of("/pool/data02/pgdata", MOUNTS) == ("pool/data02", "pgdata")
    assert snap.dataset_of("/pool/data02", MOUNTS) == ("pool/data02", ".")
    assert snap.dataset_of("/pool/data021/x", MOUNTS) == ("pool", "data021/x")


def test_a_path_on_no_configured_dataset_is_refused():
    with pytest.raises(ValueError):
        snap.dataset_of("/srv/pgdata", {"pool/data02": "/pool/data02", "pool/x": "none"})


def test_the_dataset_holding_pg_control_is_snapshotted_last():
    order = snap.snapshot_order(["pool/data02", "pool/data01", "pool/data03"], "pool/data02")
    assert order == ["pool/data01", "pool/data03", "pool/data02"]


def test_property_values_stay_under_8_kib():
    assert snap.encode_value(b"x" * 6000)
    with pytest.raises(ValueError):
        snap.encode_value(b"x" * 6200)


@pytest.mark.parametrize("text, count", [("0", 0), ("512", 512), ("1.5K", 1536),
                                         ("2M", 2 << 20), ("-", 0)])
def test_zfs_sizes(text, count):
    assert snap.parse_size(text) == count


# -- sets from the pool ---------------------------------------------------------

def test_sets_are_rebuilt_from_snapshot_rows():
    sets = snap.group_sets(rows_for("pgzfs_20261125T040100Z"), "pgzfs")
    assert [(s.name, s.complete, s.present, s.used) for s in sets] == [
        ("pgzfs_20261125T040100Z", True, DATASETS, 4096)]
    assert sets[0].properties["start_wal"] == "000000010000000000000003"


def test_other_tools_snapshots_are_not_sets():
    rows = (rows_for("other_20261125T040100Z")
            + [("pool/data02", "pgzfs_20261124T040100Z", 0, {})]          # no pgzfs:set
            + rows_for("pgzfs_20261123T040100Z", set="pgzfs_x")            # set differs
            + [("pool/data05", "pgzfs_20261122T040100Z", 0,                # not in its set
                {"set": "pgzfs_20261122T040100Z", "datasets": "pool/data02"})])
    assert snap.group_sets(rows, "pgzfs") == []


def test_a_set_missing_a_dataset_is_incomplete():
    rows = rows_for("pgzfs_20261125T040100Z", present=DATASETS[:3])
    assert not snap.group_sets(rows, "pgzfs")[0].complete


def test_a_set_without_stop_lsn_is_incomplete():
    assert not snap.group_sets(rows_for("pgzfs_20261125T040100Z", stop_lsn=""), "pgzfs")[0].complete


# -- retention ------------------------------------------------------------------

NOW = utc("2026-11-25 12:00:00")


def test_prune_nothing_when_there_are_no_sets():
    assert snap.prune_decision([], policy(daily=7), NOW) == []


def test_the_only_set_is_kept_even_with_a_zero_policy():
    assert snap.prune_decision(sets_at("2025-01-01 04:01:00"), policy(), NOW) == []


def test_zero_policy_keeps_only_the_newest_set():
    sets = sets_at("2026-11-23 04:01:00", "2026-11-24 04:01:00", "2026-11-25 04:01:00")
    assert snap.prune_decision(sets, policy(), NOW) == names("2026-11-23 04:01:00",
                                                             "2026-11-24 04:01:00")


def test_daily_keeps_the_newest_set_of_each_of_the_last_n_days():
    days = ["2026-11-%02d 04:01:00" % day for day in range(15, 26)]     # 11 daily sets
    sets = sets_at(*days)
    assert snap.prune_decision(sets, policy(daily=7), NOW) == names(*days[:4])


def test_within_one_day_only_the_newest_set_is_kept_by_daily():
    sets = sets_at("2026-11-24 01:00:00", "2026-11-24 04:01:00", "2026-11-24 23:59:59",
                   "2026-11-25 04:01:00")
    assert snap.prune_decision(sets, policy(daily=2), NOW) == names("2026-11-24 01:00:00",
                                                                    "2026-11-24 04:01:00")


def test_an_outage_does_not_prune_more_days_with_no_set_do_not_count():
    # Sets stopped 30 days ago: daily=3 still keeps three of them (sanoid's floor).
    sets = sets_at("2026-10-20 04:01:00", "2026-10-21 04:01:00", "2026-10-22 04:01:00",
                   "2026-10-23 04:01:00", "2026-10-24 04:01:00")
    assert snap.prune_decision(sets, policy(daily=3), NOW) == names("2026-10-20 04:01:00",
                                                                    "2026-10-21 04:01:00")


def test_a_set_kept_by_any_rule_stays():
    # Hourly keeps the last 2 hours' sets; daily=1 keeps today's newest; monthly=2
    # keeps October's newest, weekly=2 keeps last week's newest (Sunday 22nd).
    sets = sets_at("2026-10-30 04:01:00", "2026-10-31 04:01:00", "2026-11-21 04:01:00",
                   "2026-11-22 04:01:00", "2026-11-25 10:00:00", "2026-11-25 11:00:00",
                   "2026-11-25 11:30:00")
    doomed = snap.prune_decision(sets, policy(hourly=2, daily=1, weekly=2, monthly=2), NOW)
    assert doomed == names("2026-10-30 04:01:00", "2026-11-21 04:01:00", "2026-11-25 11:00:00")


def test_weeks_are_iso_weeks_in_utc():
    # 2026-11-22 is a Sunday, 2026-11-23 the Monday of the next ISO week.
    sets = sets_at("2026-11-21 04:01:00", "2026-11-22 23:59:59", "2026-11-23 00:00:00")
    assert snap.prune_decision(sets, policy(weekly=2), NOW) == names("2026-11-21 04:01:00")


def test_months_keep_the_newest_set_of_each():
    sets = sets_at("2026-09-01 04:01:00", "2026-09-30 04:01:00", "2026-10-01 04:01:00",
                   "2026-10-31 04:01:00", "2026-11-25 04:01:00")
    assert snap.prune_decision(sets, policy(monthly=2), NOW) == names(
        "2026-09-01 04:01:00", "2026-09-30 04:01:00", "2026-10-01 04:01:00")


def test_sets_from_the_future_are_kept_and_not_counted():
    # The clock went back a day: yesterday's run named its set "tomorrow".
    sets = sets_at("2026-11-23 04:01:00", "2026-11-24 04:01:00", "2026-11-26 04:01:00")
    assert snap.prune_decision(sets, policy(daily=1), NOW) == names("2026-11-23 04:01:00")
    assert snap.future_sets(sets, NOW) == names("2026-11-26 04:01:00")


def test_only_future_sets_means_nothing_is_pruned():
    sets = sets_at("2026-11-26 04:01:00", "2026-11-27 04:01:00")
    assert snap.prune_decision(sets, policy(), NOW) == []


def test_a_clock_step_back_within_the_hour_keeps_the_newest_by_name():
    # Two runs in one UTC hour after the clock was stepped back 40 minutes.
    sets = sets_at("2026-11-25 10:50:00", "2026-11-25 10:10:00")
    assert snap.prune_decision(sets, policy(hourly=1), NOW) == names("2026-11-25 10:10:00")


def test_the_newest_complete_set_is_never_destroyed():
    sets = snap.group_sets(rows_for("pgzfs_20261120T040100Z")
                           + rows_for("pgzfs_20261125T040100Z", stop_lsn=""), "pgzfs")
    assert snap.prune_decision(sets, policy(), NOW) == []


def test_incomplete_sets_older_than_the_newest_complete_go_newer_ones_stay():
    rows = (rows_for("pgzfs_20261123T040100Z", present=DATASETS[:2])
            + rows_for("pgzfs_20261124T040100Z")
            + rows_for("pgzfs_20261125T040100Z", stop_lsn=""))
    sets = snap.group_sets(rows, "pgzfs")
    assert snap.prune_decision(sets, policy(daily=7), NOW) == ["pgzfs_20261123T040100Z"]


def test_other_prefixes_are_never_pruned():
    rows = []
    for day in range(10, 26):
        rows += rows_for("other_202611%02dT040100Z" % day)
    rows += rows_for("pgzfs_20261125T040100Z")
    assert snap.prune_decision(snap.group_sets(rows, "pgzfs"), policy(), NOW) == []


# -- check and oldest-wal ---------------------------------------------------------

def test_check_states():
    sets = sets_at("2026-11-25 04:00:00")
    age = NOW - utc("2026-11-25 04:00:00")
    assert snap.check_state(sets, NOW, age + 1, age + 2)[0] == 0
    assert snap.check_state(sets, NOW, age, age + 1)[0] == 1
    assert snap.check_state(sets, NOW, age - 1, age)[0] == 2
    state, text, perf = snap.check_state(sets, NOW, 93600, 180000)
    assert perf == "age=%ds sets=1" % age


def test_check_notes_a_newest_set_waiting_for_wal_and_warns_once_it_waited_wal_wait():
    sets = sets_at("2026-11-25 04:00:00", stop_lsn="0/3000100", timeline="1", start_lsn="0/3000028")
    age = NOW - utc("2026-11-25 04:00:00")
    assert snap.waiting_segment(sets[-1], ["000000010000000000000002"]) == "000000010000000000000003"
    assert snap.waiting_segment(sets[-1], ["000000010000000000000003"]) is None
    assert snap.waiting_segment(sets[-1], ["000000020000000000000004"]) is None   # a later timeline
    assert snap.waiting_segment(sets[-1], None) is None                          # archive not listed
    state, text, _ = snap.check_state(sets, NOW, age + 10, age + 20, ["000000010000000000000002"], age + 1)
    assert state == 0 and "waiting for WAL 000000010000000000000003" in text
    state, text, _ = snap.check_state(sets, NOW, age + 10, age + 20, ["000000010000000000000002"], age)
    assert state == 1 and "waiting for WAL 000000010000000000000003" in text
    state, text, _ = snap.check_state(sets, NOW, age + 10, age + 20, ["000000010000000000000003"], 0)
    assert state == 0 and "waiting" not in text
    # A stop LSN at a segment's first byte: --immediate stops on reading the record there.
    at_boundary = sets_at("2026-11-25 04:00:00", stop_lsn="0/4000000", timeline="1", start_lsn="0/3000028")
    assert snap.waiting_segment(at_boundary[-1], ["000000010000000000000003"]) == "000000010000000000000004"
    assert snap.waiting_segment(at_boundary[-1], ["000000010000000000000004"]) is None


def test_check_without_complete_sets_is_critical():
    sets = snap.group_sets(rows_for("pgzfs_20261125T040100Z", stop_lsn=""), "pgzfs")
    assert snap.check_state(sets, NOW, 10, 20) == (2, "no complete snapshot set", "sets=0")


def test_check_warns_about_a_newest_set_from_the_future():
    assert snap.check_state(sets_at("2026-11-26 04:00:00"), NOW, 10, 20)[0] == 1


def test_oldest_wal_is_the_start_of_the_oldest_complete_set():
    rows = (rows_for("pgzfs_20261123T040100Z", stop_lsn="", start_wal="000000010000000000000001")
            + rows_for("pgzfs_20261124T040100Z", start_wal="000000010000000000000007")
            + rows_for("pgzfs_20261125T040100Z", start_wal="000000010000000000000009"))
    assert snap.oldest_needed_wal(snap.group_sets(rows, "pgzfs")) == "000000010000000000000007"
    assert snap.oldest_needed_wal([]) is None


# -- btrfs: layout, metadata files, placement ---------------------------------------

def test_btrfs_snapshots_live_beside_the_subvolume_not_inside_it():
    assert snap.btrfs_snapshot_dir("/bt/data02") == "/bt/.pgzfs"
    assert snap.btrfs_snapshot_path("/bt/data02@pgzfs_20261125T040100Z") == \
        "/bt/.pgzfs/data02@pgzfs_20261125T040100Z"
    assert snap.btrfs_snapshot_path("/srv/pg/ts@x_1") == "/srv/pg/.pgzfs/ts@x_1"


@pytest.mark.parametrize("path", ["bt/data02", "/bt/data02/", "/bt/../data02", "/", "/bt/da@ta"])
def test_btrfs_subvolume_paths_must_be_absolute_normalised_and_without_at(path):
    assert snap.btrfs_subvolume_problem(path)


def test_btrfs_a_plain_subvolume_path_is_fine():
    assert snap.btrfs_subvolume_problem("/bt/data02") is None


def test_metadata_round_trips_the_property_keys_only():
    properties = {"set": "pgzfs_20261125T040100Z", "stop_lsn": "0/3000100", "backup_label": "",
                  "datasets": "/bt/a /bt/b", "unknown": "dropped"}
    text = snap.metadata_text(properties)
    assert text.endswith("\n")
    assert snap.parse_metadata(text) == dict((k, v) for k, v in properties.items() if k != "unknown")


@pytest.mark.parametrize("text", ["", '{"set": "pgzfs_2026', "[]", '{"mode": "backup"}',
                                  '{"set": "s", "stop_lsn": 5}'])
def test_unreadable_metadata_is_a_value_error(text):
    with pytest.raises(ValueError):
        snap.parse_metadata(text)


BTRFS_MOUNTS = """/dev/loop3 /srv/bt btrfs rw,relatime,subvolid=5,subvol=/ 0 0
/dev/sda1 / ext4 rw 0 0
/dev/loop3 /var/lib/pg\\040data btrfs rw,subvolid=257,subvol=/data 0 0
"""


def test_btrfs_placement_needs_the_parent_on_the_same_btrfs():
    mounts = snap.parse_mounts(BTRFS_MOUNTS)
    assert ("/dev/loop3", "/var/lib/pg data", "btrfs") in mounts
    assert snap.btrfs_placement_problem("/srv/bt/data02", mounts) is None
    assert "not on btrfs" in snap.btrfs_placement_problem("/home/data02", mounts)
    assert "mounted on its own" in snap.btrfs_placement_problem("/var/lib/pg data", mounts)


def test_du_exclusive_bytes_per_path():
    out = ("     Total   Exclusive  Set shared  Filename\n"
           "   4194304     1048576     3145728  /bt/.pgzfs/data02@pgzfs_20261125T040100Z\n"
           "         0           0           0  /bt/.pgzfs/my dir@x\n")
    assert snap.parse_du_exclusive(out) == {"/bt/.pgzfs/data02@pgzfs_20261125T040100Z": 1048576,
                                            "/bt/.pgzfs/my dir@x": 0}


# -- how a set is snapshotted ----------------------------------------------------

def test_snapshots_in_one_pool_are_one_atomic_call_in_several_pools_one_by_one(monkeypatch):
    calls = []

    def fake_run(argv, timeout=None, input_text=None, check=True):
        calls.append([arg for arg in argv[1:] if "@" in arg])
        return 0, "", ""
    monkeypatch.setattr(snap, "run", fake_run)
    backend = snap.ZfsBackend()
    assert backend.snapshot(["zp1/a", "zp1/b"], "s", {"set": "s"}) == ["zp1/a@s", "zp1/b@s"]
    assert calls == [["zp1/a@s", "zp1/b@s"]]
    del calls[:]
    # OpenZFS refuses snapshots of several pools in one call (EXDEV): one by one,
    # in the order given (PGDATA's dataset last).
    assert backend.snapshot(["fast/ts", "zp1/pg"], "s", {"set": "s"}) == ["fast/ts@s", "zp1/pg@s"]
    assert calls == [["fast/ts@s"], ["zp1/pg@s"]]


# -- where the datasets really are mounted ----------------------------------------

def test_zfs_mountpoints_come_from_the_mount_table_legacy_included_unmounted_left_out():
    mounts = snap.parse_mounts(
        "zp1 /zp1 zfs rw 0 0\n"
        "zp1/data02 /srv/pg zfs rw 0 0\n"                  # mountpoint=legacy, fstab
        "zp1/data01 /data01 fuse.zfs rw 0 0\n"             # zfs-fuse
        "zp1/data01 /var/lib/docker/x fuse.zfs rw 0 0\n"   # a bind mount: the first wins
        "/dev/sda1 /data03 ext4 rw 0 0\n")                 # not the dataset data03
    assert snap.zfs_mountpoints(["zp1/data01", "zp1/data02", "zp1/data03"], mounts) == {
        "zp1/data01": "/data01", "zp1/data02": "/srv/pg"}


def test_sets_of_another_config_on_the_same_pool_are_not_ours():
    rows = (rows_for("pgzfs_20261125T040100Z", datasets=("zp1/a01", "zp1/a02"))
            + rows_for("pgzfs_20261125T040200Z", datasets=("zp1/b01", "zp1/b02"))
            + rows_for("pgzfs_20261124T040100Z", datasets=("zp1/a01", "zp1/old", "zp1/a02")))
    sets = snap.group_sets(rows, "pgzfs")
    assert [one.name for one in snap.sets_of(sets, ["zp1/a01", "zp1/a02"])] == [
        "pgzfs_20261124T040100Z", "pgzfs_20261125T040100Z"]


def test_check_says_unknown_not_a_traceback_on_an_unexpected_error(monkeypatch, capsys, tmp_path):
    def broken(*args):
        raise KeyError("pgzfs:set")
    monkeypatch.setattr(snap, "Job", broken)
    config = tmp_path / "pg_zfs.conf"
    config.write_text("[postgres]\n")
    args = snap.parse_args(["-c", str(config), "check"])
    assert snap.run_check(args) == 3
    assert capsys.readouterr().out.startswith("PG_ZFS_SNAP UNKNOWN - internal error: KeyError")


def test_start_and_stop_times_are_kept_to_the_microsecond_never_rounded_up():
    when = utc("2026-11-25 04:01:00") + 0.25
    assert snap.iso_utc_exact(when) == "2026-11-25T04:01:00.250000Z"
    assert snap.iso_utc_exact(utc("2026-11-25 04:01:00") + 0.9999996) == "2026-11-25T04:01:00.999999Z"
    assert snap.iso_utc_exact(utc("2026-11-25 04:01:00")) == "2026-11-25T04:01:00.000000Z"
    # Read back by pg_zfs_restore.py, and ordered as text within one second.
    assert snap.iso_utc_exact(when) < snap.iso_utc_exact(when + 0.5)


# -- archive clean-up lines ------------------------------------------------------------

def test_cleanup_lines_run_pg_archivecleanup_for_every_copy_in_each_directory_of_a_source(tmp_path):
    """The printed line, run by sh with the real pg_archivecleanup, removes every
    copy (plain, .gz, .bz2, .xz) of the segments before the named one in each
    directory the glob matches, and nothing else."""
    import subprocess
    from testbed import pg_bindir
    first = "000000010000000000000005"
    names = ["000000010000000000000003", "000000010000000000000004", first, "000000010000000000000006"]
    kept_always = ["00000002.history", "000000010000000000000004.00000028.backup"]
    for directory in ("a", "b"):
        os.makedirs(str(tmp_path / "arch" / directory))
        for name in names:
            for suffix in ("", ".gz", ".bz2", ".xz"):
                (tmp_path / "arch" / directory / (name + suffix)).write_text("x")
        for name in kept_always:
            (tmp_path / "arch" / directory / name).write_text("x")
    path = str(tmp_path / "arch") + "/*"
    lines = snap.archive_cleanup_lines([("host25", "172.16.18.25", "postgres", path)], first)
    assert lines[0] == "# [source host25] on 172.16.18.25 as postgres:"
    env = dict(os.environ, PATH=pg_bindir(os.environ.get("PG_ZFS_TEST_PG") or "15") + ":" + os.environ["PATH"])
    proc = subprocess.run(["sh", "-c", "\n".join(lines)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for directory in ("a", "b"):
        left = sorted(os.listdir(str(tmp_path / "arch" / directory)))
        assert left == sorted(kept_always + [name + suffix for name in names[2:] for suffix in ("", ".gz", ".bz2", ".xz")])


def test_a_source_path_a_shell_would_misread_gets_a_comment_not_a_line():
    lines = snap.archive_cleanup_lines([("h", "", "", "/srv/arch dir/*"), ("i", "h", "u", "/srv/$(id)")],
                                       "000000010000000000000005")
    assert all(line.startswith("# ") for line in lines)
    assert "needs quoting by hand" in lines[0] and "on this machine" in lines[0]


# -- metrics -----------------------------------------------------------------------------

def test_metrics_are_strict_prometheus_text_with_escaped_labels():
    from prometheus_client.parser import text_string_to_metric_families
    sets = sets_at("2026-11-25 04:01:00", "2026-11-25 05:01:00")
    now = utc("2026-11-25 06:01:00")
    replica_sets = sets_at("2026-11-25 04:01:00")
    text = snap.metrics_text(sets, now, pools=[('tank"x', 2 << 30, 1 << 30, "DEGRADED")],
                             replicas=[("r1", replica_sets), ("gone", None)])
    families = dict((family.name, family) for family in text_string_to_metric_families(text))
    assert families["pg_zfs_sets"].type == "gauge"
    values = dict(((sample.name, tuple(sorted(sample.labels.items()))), sample.value)
                  for family in families.values() for sample in family.samples)
    assert values[("pg_zfs_newest_set_age_seconds", ())] == 3600
    assert values[("pg_zfs_sets", (("state", "complete"),))] == 2
    assert values[("pg_zfs_pool_healthy", (("health", "DEGRADED"), ("pool", 'tank"x')))] == 0
    assert values[("pg_zfs_replica_up", (("replica", "gone"),))] == 0
    assert values[("pg_zfs_replica_newest_set_age_seconds", (("replica", "r1"),))] == 7200
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or line.startswith("pg_zfs_"), line
    assert text.endswith("\n")


def test_check_warns_on_a_pool_80_percent_full_and_is_critical_at_90_or_not_online():
    gib = 1 << 30
    assert snap.pool_state([("tank", 10 * gib, 7 * gib, "ONLINE")]) == (0, [], "pool_tank=70%;80;90")
    assert snap.pool_state([("tank", 10 * gib, 8 * gib, "ONLINE")])[:2] == (1, ["pool tank is 80% full"])
    assert snap.pool_state([("tank", 10 * gib, 9.5 * gib, "ONLINE")])[:2] == (2, ["pool tank is 95% full"])
    state, texts, perf = snap.pool_state([("tank", 10 * gib, gib, "DEGRADED"), ("b:x", gib, 0, "ONLINE")])
    assert (state, texts) == (2, ["pool tank is DEGRADED"]) and perf == "pool_tank=10%;80;90 pool_b_x=0%;80;90"


def test_metrics_of_the_last_runs_the_wal_fetches_and_the_spool_are_strict_prometheus_text():
    from prometheus_client.parser import text_string_to_metric_families
    sets = sets_at("2026-11-25 04:01:00")
    now = utc("2026-11-25 06:01:00")
    runs = {"snapshot": snap.run_record({"exit_code": 0, "finished": now - 60, "seconds": 12.5}),
            "drill": snap.run_record({"exit_code": 2, "finished": now - 30, "seconds": 300})}
    fetches = snap.fetch_counters({"delivered": {"count": 7, "seconds": 0.7}, "absent": {"count": 1, "seconds": 5},
                                   "future": {"count": 1}})
    text = snap.metrics_text(sets, now, runs=runs, fetch_stats=fetches, spool_bytes=16 << 20)
    values = dict(((sample.name, tuple(sorted(sample.labels.items()))), sample.value)
                  for family in text_string_to_metric_families(text) for sample in family.samples)
    assert values[("pg_zfs_last_run_success", (("job", "snapshot"),))] == 1
    assert values[("pg_zfs_last_run_success", (("job", "drill"),))] == 0
    assert values[("pg_zfs_last_run_exit_code", (("job", "drill"),))] == 2
    assert values[("pg_zfs_last_run_duration_seconds", (("job", "snapshot"),))] == 12.5
    assert values[("pg_zfs_last_run_timestamp_seconds", (("job", "drill"),))] == now - 30
    # counters: the parser names the samples NAME_total
    assert values[("pg_zfs_wal_fetch_calls_total", (("outcome", "delivered"),))] == 7
    assert values[("pg_zfs_wal_fetch_calls_total", (("outcome", "unreachable"),))] == 0
    assert values[("pg_zfs_wal_fetch_seconds_total", (("outcome", "absent"),))] == 5
    assert values[("pg_zfs_spool_bytes", ())] == 16 << 20
    # nothing known: no family at all rather than a made-up zero
    bare = snap.metrics_text(sets, now, runs={"snapshot": None, "drill": None})
    assert "pg_zfs_last_run" not in bare and "pg_zfs_wal_fetch" not in bare and "spool" not in bare


@pytest.mark.parametrize("record", [[], {"delivered": 3}, {"delivered": {"count": -1, "seconds": 0}},
                                    {"delivered": {"count": True, "seconds": 0}},
                                    {"absent": {"count": 1, "seconds": "x"}}])
def test_fetch_counters_that_are_not_counters_are_refused(record):
    with pytest.raises(ValueError):
        snap.fetch_counters(record)


@pytest.mark.parametrize("record", [None, {"exit_code": "0", "finished": 1, "seconds": 1},
                                    {"exit_code": 0, "finished": 1}, {"exit_code": 0, "finished": 1,
                                                                     "seconds": float("nan")}])
def test_a_run_record_without_numbers_is_refused(record):
    with pytest.raises(ValueError):
        snap.run_record(record)


def test_check_json_carries_the_nagios_result_and_its_perfdata():
    text = snap.check_json(1, "newest set is 27h old", "sets=3 age=97200s;93600;180000 pool_tank=12%;80;90")
    result = json.loads(text)
    assert result == {"status": "WARNING", "exit_code": 1, "message": "newest set is 27h old",
                      "perfdata": {"sets": {"value": 3, "unit": ""},
                                   "age": {"value": 97200, "unit": "s", "warn": 93600, "crit": 180000},
                                   "pool_tank": {"value": 12, "unit": "%", "warn": 80, "crit": 90}}}
    assert "\n" not in text


# -- the archive's continuity (check) ---------------------------------------------

def test_the_segment_size_is_the_one_that_puts_the_start_lsn_in_the_start_segment():
    assert snap.segment_size("0/2000028", "000000010000000000000002") == 16 << 20
    assert snap.segment_size("1/A0000028", "0000000100000001000000A0") == 16 << 20
    assert snap.segment_size("1/A0000028", "00000001000000010000000A") == 256 << 20
    assert snap.segment_size("0/80000028", "000000010000000000000002") == 1 << 30
    assert snap.segment_size("0/2000028", "000000010000000000000005") is None
    assert snap.segment_size(None, "000000010000000000000002") is None


def two_sets(first_start, second_start, size=16 << 20):
    """The oldest and the newest complete set, starting at these segments."""
    def lsn(name):
        position = int(name[8:16], 16) * (0x100000000 // size) + int(name[16:24], 16)
        value = position * size + 0x28
        return "%X/%X" % (value >> 32, value & 0xFFFFFFFF)
    rows = rows_for("pgzfs_20261125T040100Z", start_wal=first_start, start_lsn=lsn(first_start)) + \
        rows_for("pgzfs_20261126T040100Z", start_wal=second_start, start_lsn=lsn(second_start))
    return snap.group_sets(rows, "pgzfs")


def segments(timeline, log, first, last):
    return ["%08X%08X%08X" % (timeline, log, seg) for seg in range(first, last + 1)]


def test_every_segment_from_the_oldest_set_on_some_source_is_no_hole_even_across_a_log_and_a_timeline():
    sets = two_sets("0000000100000000000000FE", "000000020000000100000003")
    archived = segments(1, 0, 0xF0, 0xFF) + segments(1, 1, 0, 2) + segments(2, 1, 2, 6)
    assert snap.wal_holes(sets, archived) == []
    assert snap.continuity_state(sets, []) == (0, [])


def test_a_segment_on_no_source_is_named_on_its_timeline_critical_after_the_newest_set_warning_before():
    sets = two_sets("000000010000000000000003", "000000010000000000000008")
    archived = segments(1, 0, 3, 12)
    late = [name for name in archived if name != "00000001000000000000000A"]
    assert snap.wal_holes(sets, late) == ["00000001000000000000000A"]
    assert snap.continuity_state(sets, ["00000001000000000000000A"]) == (
        2, ["WAL 00000001000000000000000A is in no archive: no set restores past it"])
    early = [name for name in archived if name not in ("000000010000000000000005", "000000010000000000000006")]
    holes = snap.wal_holes(sets, early)
    assert holes == ["000000010000000000000005", "000000010000000000000006"]
    assert snap.continuity_state(sets, holes) == (
        1, ["WAL 000000010000000000000005 is in no archive (and 1 more): sets before it cannot be restored "
            "past it"])
    # segments before the oldest set's start, or of an older timeline than its, do not count
    assert snap.wal_holes(sets, segments(1, 0, 0, 1) + archived) == []
    assert snap.wal_holes(two_sets("000000020000000000000003", "000000020000000000000004"),
                          segments(1, 0, 3, 5) + segments(2, 0, 3, 3) + segments(2, 0, 5, 5)) == [
        "000000020000000000000004"]


def test_no_listing_or_no_set_is_no_hole():
    assert snap.wal_holes([], segments(1, 0, 3, 5)) == []
    assert snap.wal_holes(two_sets("000000010000000000000003", "000000010000000000000004"), []) == []


def test_a_signal_while_the_run_is_recorded_lets_the_record_be_written_then_ends_the_run(monkeypatch, tmp_path):
    """Review of stop 26's fix: a SIGTERM while the snapshot run's record is written
    (for metrics) must not leave the record unwritten; the run then ends (no prune,
    no replicas) with the signal, saying the set was taken."""
    fresh = load_script("pg_zfs_snap")
    job = types.SimpleNamespace(state_file=str(tmp_path / "state" / "last-snapshot.json"))
    monkeypatch.setattr(fresh, "cmd_snapshot", lambda job, label: "pgzfs_20261201T000000Z")
    write = fresh.write_atomically

    def signalled_write(path, text):
        os.kill(os.getpid(), signal.SIGTERM)        # the handler runs as kill returns
        write(path, text)
    monkeypatch.setattr(fresh, "write_atomically", signalled_write)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, fresh.defer_or_fail_on_signal)
    with pytest.raises(fresh.Stopped) as error:
        fresh.snapshot_and_record(job, "")
    assert str(error.value) == "stopped by signal 15 after set pgzfs_20261201T000000Z was taken and recorded"
    with open(job.state_file) as record:
        assert json.load(record)["status"] == "ok"
