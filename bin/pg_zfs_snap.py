#!/usr/bin/env python3
"""Take consistent, self-describing snapshot sets of a PostgreSQL standby.

Wired in as (root's crontab on the guest; no arguments = snapshot, then prune):

    1 4 * * * /opt/pg_zfs/bin/pg_zfs_snap.py

and, for monitoring (Nagios/Icinga command line):

    /opt/pg_zfs/bin/pg_zfs_snap.py check

Commands:
    (none)                     snapshot, then prune (the cron job)
    snapshot [--label TEXT] [--no-prune] [--replicate]
                               take one snapshot set, then prune unless --no-prune;
                               --replicate: then replicate (below) to every replica
    list [--json]              every set rebuilt from the pool alone; a complete set
                               whose stop segment no archive holds yet is shown
                               WAITING for WAL (--json: waiting_for_wal)
    list --replica NAME [--json]
                               each set here and on [replica NAME], and its state there
    prune [--dry-run]          destroy the sets the retention policy lets go
    check [--replica NAME] [--json]
                               Nagios line from the age of the newest complete set
                               (here, or on the replica), the pools' fill and health,
                               and the archive's continuity: every WAL segment from
                               the oldest set's start to the newest archived one on
                               some source (pg_wal_fetch.py --check --json), else
                               CRITICAL when the hole is after the newest set's
                               start, WARNING before it; --json: one object
                               {status, exit_code, message, perfdata}, same exit code
    metrics [--textfile DIR] [--no-replicas]
                               Prometheus metrics (sets by state, newest set's age,
                               bytes per set, pool size/allocation/health, each
                               replica's newest set; the last snapshot run and the
                               last drill: result, exit code, end, duration, from
                               [snapshot] state_file and [restore] wal_root/
                               last-drill.json; pg_wal_fetch.py's calls and seconds
                               by outcome, from [archive] spool_dir/fetch-stats.json,
                               and the spool's bytes): DIR/pg_zfs.prom, written
                               atomically, for node_exporter's textfile collector
    oldest-wal [--commands | --apply [--dry-run]]
                               first WAL file the oldest kept set needs, here or
                               on a [replica NAME]: archived files before it may
                               go; --commands prints the pg_archivecleanup lines
                               for each [source NAME] (plain and -x .gz/.bz2/.xz);
                               --apply removes them on each [source NAME] over
                               ssh with its cleanup_identity key, restricted to
                               `pg_wal_serve --cleanup` there (pg_wal_fetch.py
                               --authorized-keys), printing each file removed
                               (--dry-run: that would be); exit 1 if a source
                               failed (each one says why), the others still go
    replicate [--replica NAME] [--dry-run] [--no-prune]
                               send every complete set a replica lacks, then prune
                               the replica by its own keep_* (below); --dry-run
                               prints each stream and its size (btrfs: counted
                               here), sends nothing; on a terminal a progress
                               line every 3 s per stream (bytes, rate; share and
                               time left where zfs send -nvP estimates it), none
                               under cron
    receiver-script            print pg_zfs_receive, the forced command of the
                               guest's key on a replica
    authorized-keys [--replica NAME] [--receiver-path PATH]
                               print that key's authorized_keys line for each replica
snapshot, prune, replicate and the cron run take the lock (flock on lock_file);
while another run holds it they log a line and exit 0, or wait with --wait.
Each snapshot run (cron, snapshot) leaves its result in [snapshot] state_file
(JSON: exit_code, status, set, started, finished, seconds, message) for metrics.

One backup is one snapshot set: DATASET@PREFIX_YYYYmmddTHHMMSSZ (UTC, so a
daylight saving change cannot make two runs collide) on every configured
dataset. While PostgreSQL runs (standby or primary) the set is taken in
non-exclusive backup mode, inside ONE psql session kept open on pipes:
pg_backup_start(label, true) / pg_backup_stop(false) on 15+,
pg_start_backup(label, true, false) / pg_stop_backup(false, false) on 9.6-14.
If this script dies, psql's session ends and PostgreSQL leaves backup mode by
itself; exclusive backup mode is never used.

Where ZFS allows it, the set is one atomic `zfs snapshot a@n b@n ...` call.
zfs-fuse and old ZFS take one name per call, and no ZFS snapshots datasets of
several pools in one call: then the datasets are snapshotted one by one and the dataset that holds global/pg_control goes LAST. The article
took PGDATA's dataset first; that is right for a crash-consistent copy of a
primary, but here the snapshots sit inside backup mode and the restore replays
WAL from the label's start to the stop LSN: on a standby the control file's
minRecoveryPoint says how far replay must go for the files to be consistent, so
the control file must be at least as new as every other file of the set.

btrfs ([snapshot] backend = btrfs, datasets = subvolume paths): btrfs cannot
snapshot several subvolumes at once, so it is always one by one, PGDATA's last.
Snapshot SUBVOLUME@SET is the read-only snapshot PARENT/.pgzfs/NAME@SET of
SUBVOLUME = PARENT/NAME (beside the subvolume, not inside it), and its
metadata, the pgzfs:* keys without the prefix, is the JSON file NAME@SET.json
beside it, written atomically. A snapshot without readable metadata is not a
backup: `list` warns about it and prune never touches it. `list` reports as
used the bytes only that snapshot holds (`btrfs filesystem du`, no quota
needed). DEVELOPERS.md has the layout and the clone markers of restores.

If PostgreSQL is not running (psql cannot connect AND PGDATA/postmaster.pid is
absent AND pg_controldata says "shut down"), the set is taken as is and marked
`shutdown`. If postmaster.pid exists but psql cannot connect, nothing is taken:
that state is ambiguous.

All or nothing: if any snapshot of a set fails, the ones made are destroyed,
backup mode is ended, the run exits 1 and does not prune. So on SIGTERM, SIGHUP
or SIGINT, once the zfs or btrfs call under way has finished. A signal during
prune lets the set being destroyed go whole, then ends the run (exit 1); the
sets not reached are kept.

Each snapshot carries ZFS user properties pgzfs:* (on btrfs: its JSON file):
start/stop LSN, start WAL file, timeline, start/stop time (UTC, to the
microsecond: a target a moment after the stop can use the set), major version,
system identifier, PGDATA relative to its dataset, backup label and tablespace
map in base64, the database's own time at the stop (pgzfs:db_time, the last
replayed commit's timestamp on a standby, or the primary's last message when it
replayed none since it started: the primary's clock, which a wrong guest clock
does not shift; pgzfs:db_time_lsn where replay was), where each
dataset was mounted (pgzfs:mountpoints, base64 JSON,
from the mount table: legacy mountpoints too), tool version, the datasets of
the set; DEVELOPERS.md lists them. pgzfs:stop_lsn is
written last: a set without it on every snapshot is incomplete (a run that died)
and is never counted as a backup.

Retention (sanoid-like, UTC periods): for each of keep_hourly, keep_daily,
keep_weekly, keep_monthly = N, keep the newest complete set of each of the N
most recent hours/days/ISO weeks/months that hold a set (periods with no set do
not use up N, so an outage never prunes more). A set kept by any rule stays.
The newest complete set is always kept; sets dated in the future (clock
change) are kept and left out of the count; incomplete sets older than the
newest complete set are destroyed; a set whose snapshots have clones (a running
restore or drill) is skipped with a warning; snapshots with another prefix or
without pgzfs:set are never touched, nor are the sets of another config on
the same pool (sets that include none of [snapshot] datasets: another
cluster's, even with the same prefix). All four keys 0 keeps only the newest set.

Config (default /etc/pg_zfs/pg_zfs.conf, or -c, or $PG_ZFS_CONFIG):
    [postgres] pgdata, bindir, user, host, port, dbname
    [snapshot] backend, datasets, prefix, keep_hourly, keep_daily,
               keep_weekly, keep_monthly, lock_file, state_file, warn_age, crit_age,
               wal_wait
    (check: [archive] and [source *] as pg_wal_fetch.py reads them)
    (oldest-wal --apply: [source *] host, port, user, path, ssh_options,
               cleanup_identity; [archive] sources, connect_timeout)
    [replica NAME] host, port, user, identity_file, ssh_options, from, target,
               keep_hourly, keep_daily, keep_weekly, keep_monthly, bwlimit,
               warn_age, crit_age

Replicas (a copy of the sets on another machine with ZFS, README "A copy on
another machine"): replicate sends each complete set newer than the newest set
both sides hold, oldest first, each snapshot `zfs send -i` from the newest
snapshot of its dataset that arrived (the first whole), piped through ssh into
`zfs recv -u -d TARGET` there: POOL/PATH arrives as TARGET/PATH (a pool's root
dataset, or one PATH in two pools, is refused). zfs send without -p carries no
user property (and with -p the datasets' own mountpoints would come along), so
once a set's snapshots arrived it writes their pgzfs:* there with `zfs set`, as
they are here (the guest's dataset names: pg_zfs_restore.py maps them), plus
pgzfs:copy_of (the dataset sent from), pgzfs:stop_lsn last. A set is complete
there only when every copy has the GUID of its snapshot here (zfs get -p guid)
and carries pgzfs:stop_lsn; then the set gets pgzfs:replicated_to NAME here.
A run cut short leaves the sets complete there as they were: the next one
sends what did not arrive (OpenZFS with resumable receives, detected by its
receive_resume_token property: resumed by zfs send -t; zfs-fuse: redone).
Retention there is the replica's keep_* (prune_decision), never the newest
set both sides hold (the next send's base), never a snapshot it did not send,
never a set with clones there (a restore: kept with a warning). Here, prune
keeps the newest set each replica holds. Every ssh session of a run shares one
master connection; the replica runs the commands through pg_zfs_receive.

btrfs replicas ([snapshot] backend = btrfs; target = an absolute directory on a
btrfs there): the copy of subvolume /DIR/NAME is TARGET/NAME, so its snapshots
land as TARGET/.pgzfs/NAME@SET with NAME@SET.json beside them, the layout
pg_zfs_restore.py reads (only the snapshots exist there, not TARGET/NAME).
Each is `btrfs send [-p BASE]` piped through ssh into `btrfs receive
TARGET/.pgzfs` there. The GUID is the UUID the stream carries (btrfs subvolume
show here), which the copy keeps as its Received UUID; a copy has arrived when
it has that and is read-only. Once every copy of a set arrived, each
NAME@SET.json is written there in one write (the keys here but replicated_to,
plus copy_of, stop_lsn among them): the set is complete there when every file
is written. A cut receive leaves a writable subvolume without a received UUID:
the next run deletes such copies of this config's set snapshots and sends
them again (btrfs cannot resume). Retention there deletes the subvolume, then
its .json; a restore's clone there does not depend on its set (btrfs). The key
is root's (btrfs receive needs CAP_SYS_ADMIN), restricted to pg_zfs_receive,
whose btrfs verbs are its own (RECEIVER_SCRIPT).

Exit codes (snapshot, prune, list, oldest-wal, replicate, the cron run):
    0  done (also: another run holds the lock and --wait was not given)
    1  a snapshot set or a prune failed (nothing half made is left), or there
       is no complete set (oldest-wal), or a replica was not brought up to
       date (the sets complete there stay so; the next run goes on)
    2  bad arguments or bad config
Exit codes of `check` (Nagios): 0 OK, 1 WARNING (newest set older than
warn_age, or waiting for WAL longer than wal_wait, default 3600 s, or a pool
of the datasets 80% full), 2 CRITICAL (older than crit_age, no complete set, a
pool 90% full or not ONLINE), 3 UNKNOWN (also: the replica
cannot be reached, with --replica: its own warn_age and crit_age). Waiting for WAL: the
newest set's stop segment is in no archive yet (pg_wal_fetch.py --check, run
as [postgres] user, lists each source's newest segment): a set taken on an idle
primary ends in its current segment, archived only at the next WAL switch, and
no restore of it can become consistent before; the line says so.

For tests only: --now YYYYmmddTHHMMSSZ shifts this run's clock to that UTC
time (set names, retention, check).
"""

import argparse
import base64
import binascii
import calendar
import collections
import configparser
import contextlib
import datetime
import errno
import fcntl
import glob
import json
import logging
import math
import os
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

VERSION = "0.1.0"
PROG = "pg_zfs_snap"
DEFAULT_CONFIG = "/etc/pg_zfs/pg_zfs.conf"
# The config sections this script reads (CONFIG_SCHEMA): typos in them are refused.
CONFIG_READS = ("postgres", "snapshot", "archive", "source", "replica", "restore")

log = logging.getLogger(PROG)

# ZFS user property values must stay under 8 KiB (ZAP_MAXVALUELEN).
MAX_PROPERTY_BYTES = 8191
DB_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
LABEL_TEXT_RE = re.compile(r"^[ -~]{0,200}$")
SIZE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([BKMGTPEZ]?)$")
# Retention rules, in the order they are applied, with the period each counts.
RETENTION_RULES = ("hourly", "daily", "weekly", "monthly")
RETENTION_DEFAULTS = {"hourly": 0, "daily": 7, "weekly": 4, "monthly": 3}

PSQL_TIMEOUT = 30            # seconds for an ordinary statement
BACKUP_CALL_TIMEOUT = 600    # pg_backup_start may wait for a restartpoint
ZFS_TIMEOUT = 120
ZFS_CANDIDATES = ("/sbin/zfs", "/usr/sbin/zfs", "/usr/local/sbin/zfs")
# What old ZFS (zfs-fuse) answers, exit code 2, to several names in one call.
ZFS_ONE_NAME_ONLY = "too many arguments"
BUSY_RETRIES = 10            # "dataset is busy" right after pg_ctl stop
BTRFS_TIMEOUT = 120

NAGIOS_STATES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
POOL_WARN_PERCENT, POOL_CRIT_PERCENT = 80, 90    # check: how full the pool may be
DEFAULT_WAL_WAIT = 3600      # check: a newest set waiting this long for its stop WAL warns
ARCHIVE_CHECK_TIMEOUT = 120  # pg_wal_fetch.py --check: every source probed and listed
# The last snapshot run ([snapshot] state_file), the last drill (pg_zfs_restore.py
# writes WAL_ROOT/last-drill.json) and pg_wal_fetch.py's counters
# (SPOOL_DIR/fetch-stats.json), for metrics.
DEFAULT_STATE_FILE = "/var/lib/pg_zfs/last-snapshot.json"
DEFAULT_SPOOL = "/var/lib/pg_zfs/spool"
DEFAULT_WAL_ROOT = "/var/lib/pg_zfs/restore-wal"
DRILL_STATE_FILE = "last-drill.json"
FETCH_STATS = "fetch-stats.json"
FETCH_OUTCOMES = ("delivered", "absent", "invalid", "unreachable")


# ---------------------------------------------------------------------------
# Pure functions: names, times, parsing, the retention decision. No I/O.
# ---------------------------------------------------------------------------


Policy = collections.namedtuple("Policy", RETENTION_RULES)


def parse_utc(text):
    """Epoch seconds of YYYYmmddTHHMMSSZ (the --now form); ValueError if not."""
    if not re.match(r"^[0-9]{8}T[0-9]{6}Z$", text):
        raise ValueError("%r is not YYYYmmddTHHMMSSZ" % text)
    return calendar.timegm(time.strptime(text, NAME_TIME_FORMAT))


def iso_utc(when):
    """UTC ISO 8601 to the second: 2026-11-25T04:01:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(when)))


def iso_utc_exact(when):
    """UTC ISO 8601 to the microsecond, 2026-11-25T04:01:00.250000Z: a set's start and
    stop time, so that a target a moment after the stop can use the set."""
    seconds = int(math.floor(when))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%06dZ" % int((when - seconds) * 1e6)


def major_version(server_version_num):
    """'15' for 150004, '9.6' for 90624; ValueError below 9.6."""
    number = int(server_version_num)
    if number < 90600:
        raise ValueError("PostgreSQL %d is older than 9.6" % number)
    if number >= 100000:
        return str(number // 10000)
    return "%d.%d" % (number // 10000, number // 100 % 100)


def backup_calls(server_version_num, label):
    """(start SQL, stop SQL) for this server: the non-exclusive backup functions.

    The stop statement returns one line `lsn|labelfile|spcmapfile|db_time|db_lsn`,
    the two files as base64 of their UTF-8 bytes with the line breaks removed,
    so they come back byte for byte whatever they contain. db_time is the
    database's own time at the stop, read after it in the same statement: on a
    standby the last replayed commit's timestamp (the primary's clock, which
    stamped every commit the set holds; when none was replayed since the standby
    started, the send time of the primary's last message, later than every
    commit received; empty when that is unknown too: no streaming), on a
    primary its clock; db_lsn where replay (or WAL) was.
    """
    quoted = "'" + label.replace("'", "''") + "'"
    number = int(server_version_num)
    if number >= 150000:
        start = "SELECT pg_backup_start(%s, true)" % quoted
        stop_call = "pg_backup_stop(false)"
    elif number >= 100000:
        start = "SELECT pg_start_backup(%s, true, false)" % quoted
        stop_call = "pg_stop_backup(false, false)"
    else:   # 9.6 has no wait_for_archive argument
        start = "SELECT pg_start_backup(%s, true, false)" % quoted
        stop_call = "pg_stop_backup(false)"
    encoded = "translate(encode(convert_to(coalesce(%s, ''), 'UTF8'), 'base64'), E'\\n', '')"
    if number >= 100000:
        current = "pg_last_wal_replay_lsn(), pg_current_wal_lsn()"
    else:
        current = "pg_last_xlog_replay_location(), pg_current_xlog_location()"
    # A restarted standby that replayed no commit yet has no replay timestamp: the
    # primary stamped every commit it holds before its last message's send time.
    replayed = "coalesce(pg_last_xact_replay_timestamp(), (SELECT last_msg_send_time FROM pg_stat_wal_receiver))"
    db_time = ("coalesce(to_char((CASE WHEN pg_is_in_recovery() THEN %s ELSE clock_timestamp() END) "
               "AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), '')" % replayed)
    db_lsn = "CASE WHEN pg_is_in_recovery() THEN %s ELSE %s END" % tuple(current.split(", "))
    stop = "SELECT lsn, %s, %s, %s, %s FROM %s" % (encoded % "labelfile", encoded % "spcmapfile", db_time,
                                                   db_lsn, stop_call)
    return start, stop


def parse_stop_row(line):
    """(stop_lsn, label bytes, map bytes, db_time, db_lsn) from the stop statement's line;
    db_time and db_lsn are '' when the server could not tell."""
    fields = line.strip().split("|")
    if len(fields) != 5 or not LSN_RE.match(fields[0]) \
            or not (fields[3] == "" or DB_TIME_RE.match(fields[3])) or not (fields[4] == "" or LSN_RE.match(fields[4])):
        raise ValueError("unexpected answer from the backup stop function: %r" % line[:200])
    return fields[0], base64.b64decode(fields[1]), base64.b64decode(fields[2]), fields[3], fields[4]


def parse_backup_label(label):
    """The start LSN, start WAL file, timeline and origin from a backup_label.

    `label` is the text PostgreSQL returned. START TIMELINE is there since 11;
    before, the timeline is the first 8 digits of the WAL file name.
    """
    found = {}
    for line in label.splitlines():
        match = re.match(r"^START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+) \(file ([0-9A-F]{24})\)$", line)
        if match:
            found["start_lsn"], found["start_wal"] = match.group(1), match.group(2)
        match = re.match(r"^START TIMELINE: ([0-9]+)$", line)
        if match:
            found["timeline"] = int(match.group(1))
        match = re.match(r"^BACKUP FROM: (\w+)$", line)
        if match:
            found["backup_from"] = match.group(1)
    if "start_wal" not in found:
        raise ValueError("backup label has no START WAL LOCATION line")
    file_timeline = int(found["start_wal"][:8], 16)
    if found.setdefault("timeline", file_timeline) != file_timeline:
        raise ValueError("backup label: START TIMELINE %d but WAL file %s"
                         % (found["timeline"], found["start_wal"]))
    return found


def parse_controldata(text):
    """pg_controldata's output (LC_ALL=C) as {field: value}."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def shutdown_facts(controldata):
    """The set properties of a cleanly stopped cluster, from pg_controldata.

    start is the last checkpoint's REDO location; stop is the same, or the
    minimum recovery ending location of a stopped standby when that is later.
    Raises ValueError unless the cluster state is "shut down" or
    "shut down in recovery" (a crashed cluster is not consistent as is).
    """
    state = controldata.get("Database cluster state", "")
    if state not in ("shut down", "shut down in recovery"):
        raise ValueError("cluster state is %r, not shut down" % state)
    redo = controldata.get("Latest checkpoint's REDO location", "")
    min_recovery = controldata.get("Minimum recovery ending location", "0/0")
    wal = controldata.get("Latest checkpoint's REDO WAL file", "")
    timeline = controldata.get("Latest checkpoint's TimeLineID", "")
    system_identifier = controldata.get("Database system identifier", "")
    if not (LSN_RE.match(redo) and WAL_NAME_RE.match(wal) and timeline.isdigit()
            and system_identifier.isdigit()):
        raise ValueError("pg_controldata output lacks the checkpoint's REDO location, "
                         "WAL file, timeline or system identifier")
    # A stopped standby's files are consistent only from its minimum recovery
    # point, which may be past the REDO location: that is where the set stops.
    stop = redo
    if LSN_RE.match(min_recovery) and parse_lsn(min_recovery) > parse_lsn(redo):
        stop = min_recovery
    return {"start_lsn": redo, "stop_lsn": stop, "start_wal": wal,
            "timeline": str(int(timeline)), "system_identifier": system_identifier}


def dataset_of(path, mountpoints):
    """(dataset, path relative to its mountpoint) for the dataset holding path.

    mountpoints maps dataset -> absolute mountpoint; the longest mountpoint that
    contains path wins. Raises ValueError if none does.
    """
    best = None
    for dataset, mountpoint in mountpoints.items():
        if not mountpoint.startswith("/"):
            continue
        if path == mountpoint or path.startswith(mountpoint.rstrip("/") + "/"):
            if best is None or len(mountpoint) > len(mountpoints[best]):
                best = dataset
    if best is None:
        raise ValueError("%s is on none of the datasets %s" % (path, " ".join(sorted(mountpoints))))
    return best, os.path.relpath(path, mountpoints[best])


def snapshot_order(datasets, pgdata_dataset):
    """The datasets in the order they are snapshotted: PGDATA's dataset last."""
    return [d for d in datasets if d != pgdata_dataset] + [pgdata_dataset]


# -- btrfs: where a subvolume's snapshots and their metadata live ---------------


def btrfs_placement_problem(subvolume, mounts):
    """Why PARENT/.pgzfs cannot hold SUBVOLUME's snapshots, or None.

    Both must be on btrfs and on the same file system (a snapshot cannot cross
    file systems): a subvolume mounted on its own (subvol=...) below a parent
    of another file system is refused.
    """
    here = mount_of(subvolume, mounts)
    if here is None or here[2] != "btrfs":
        return "%s is not on btrfs (%s)" % (subvolume, here[2] if here else "no mount")
    parent = mount_of(os.path.dirname(subvolume), mounts)
    if parent is None or parent[2] != "btrfs" or parent[0] != here[0]:
        return ("%s is mounted on its own and its parent %s is not on the same btrfs (%s): "
                "configure the subvolume's path below a mount of the btrfs that holds it"
                % (subvolume, os.path.dirname(subvolume), parent[2] if parent else "no mount"))
    return None


def parse_du_exclusive(text):
    """{path: exclusive bytes} from `btrfs filesystem du -s --raw PATH...`."""
    result = {}
    for line in text.splitlines():
        fields = line.split(None, 3)
        if len(fields) == 4 and fields[0].isdigit() and fields[1].isdigit():
            result[fields[3]] = int(fields[1])
    return result


def mountpoints_value(mountpoints, datasets):
    """pgzfs:mountpoints: base64 of the JSON {dataset: where it was mounted} at snapshot
    time, from the mount table (a `legacy` dataset too): the paths the backup_label,
    the tablespace_map and the pg_tblspc links of the set name."""
    return encode_value(json.dumps(dict((dataset, mountpoints[dataset]) for dataset in datasets
                                        if dataset in mountpoints), sort_keys=True).encode("utf-8"))


def encode_value(raw):
    """base64 text of bytes, for a property value; ValueError if over 8 KiB."""
    text = base64.b64encode(raw).decode("ascii")
    if len(text) > MAX_PROPERTY_BYTES:
        raise ValueError("%d bytes encoded, over the %d a ZFS property holds"
                         % (len(text), MAX_PROPERTY_BYTES))
    return text


def parse_size(text):
    """Bytes of a zfs size column ('1.5M', '512', '-'); 0 when unknown."""
    match = SIZE_RE.match(text.strip().upper())
    if not match:
        return 0
    power = "BKMGTPEZ".index(match.group(2) or "B")
    return int(float(match.group(1)) * (1024 ** power))


def human_size(count):
    """1536 -> '1.5K', like zfs prints sizes."""
    for unit in "BKMGTP":
        if count < 1024 or unit == "P":
            return ("%d%s" if unit == "B" else "%.1f%s") % (count, unit)
        count /= 1024.0


def send_progress_line(what, sent, total, elapsed):
    """'sending WHAT: 1.5G of 4.0G (37%), 52.3M/s, 48 s left'; total None (no
    estimate): without the share and the time left."""
    rate = sent / elapsed if elapsed > 0 else 0.0
    share = left = ""
    if total:
        share = " of %s (%d%%)" % (human_size(total), min(100, int(100.0 * sent / total)))
        if rate > 0 and total > sent:
            left = ", %d s left" % math.ceil((total - sent) / rate)
    return "sending %s: %s%s, %s/s%s" % (what, human_size(sent), share, human_size(int(rate)), left)


def period_key(rule, when):
    """The UTC hour, day, ISO week or month that epoch seconds `when` falls in."""
    moment = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    if rule == "hourly":
        return moment.strftime("%Y-%m-%dT%H")
    if rule == "daily":
        return moment.strftime("%Y-%m-%d")
    if rule == "weekly":
        year, week, _ = moment.isocalendar()
        return "%04d-W%02d" % (year, week)
    if rule == "monthly":
        return moment.strftime("%Y-%m")
    raise ValueError("unknown retention rule %r" % rule)


def prune_decision(sets, policy, now):
    """Names of the sets to destroy, oldest first. Pure: no clock, no zfs.

    sets: SnapshotSets of one prefix (group_sets); policy: Policy of counts;
    now: UTC epoch seconds. Like sanoid, N of a rule never means fewer than N
    sets: the N most recent periods that hold a set keep their newest one.
    Keeps the newest complete set, every set dated after `now` (a clock that
    went back), and every set a rule keeps. Incomplete sets older than the
    newest complete set go; newer incomplete ones stay.
    """
    past = [one for one in sets if one.time is not None and one.time <= now]
    complete = sorted((one for one in past if one.complete),
                      key=lambda one: (one.time, one.name), reverse=True)
    if not complete:
        return []
    keep = set([complete[0].name])
    for rule in RETENTION_RULES:
        periods = []
        for one in complete:
            key = period_key(rule, one.time)
            if key in periods:
                continue
            if len(periods) >= getattr(policy, rule):
                break
            periods.append(key)
            keep.add(one.name)
    newest = complete[0].time
    doomed = [one for one in past
              if (one.complete and one.name not in keep)
              or (not one.complete and one.time < newest)]
    doomed.sort(key=lambda one: (one.time, one.name))
    return [one.name for one in doomed]


def future_sets(sets, now):
    """Names of sets dated after now (kept; worth a warning: the clock?)."""
    return [one.name for one in sets if one.time is not None and one.time > now]


def oldest_needed_wal(sets):
    """The start WAL file of the oldest complete set, or None."""
    for one in sets:
        if one.complete and WAL_NAME_RE.match(one.properties.get("start_wal", "")):
            return one.properties["start_wal"]
    return None


def archive_cleanup_lines(sources, wal_name):
    """The shell lines that remove, on each archive host, the WAL files before
    wal_name (pg_archivecleanup), every copy: plain and each compressed suffix
    (pg_archivecleanup strips one -x suffix per run; a plain name qualifies in
    every run). sources: [(name, host, user, path glob)]. The glob is expanded
    by the host's shell, so a path with characters a shell would treat
    otherwise gets a comment instead of a line."""
    lines = []
    for name, host, user, path in sources:
        where = "on %s as %s" % (host or "this machine", user or "the archive's owner")
        if not re.match(r"^/[A-Za-z0-9_./*?-]*$", path):
            lines.append("# [source %s] %s: path %r needs quoting by hand: run pg_archivecleanup in each "
                         "directory it matches with %s" % (name, where, path, wal_name))
            continue
        runs = " && ".join("pg_archivecleanup %s\"$d\" %s" % ("-x %s " % suffix if suffix else "", wal_name)
                           for suffix in ("", ".gz", ".bz2", ".xz"))
        lines.append("# [source %s] %s:" % (name, where))
        lines.append("for d in %s; do [ -d \"$d\" ] && %s; done" % (path, runs))
    return lines


# pg_wal_fetch.py's REQUEST_MARK: pg_wal_serve serves the words after it.
CLEANUP_MARK = "pg_wal_fetch-request"
CLEANUP_TIMEOUT = 600       # seconds one archive host may take to remove its files


def oldest_wal_name(sets):
    """oldest_needed_wal of the complete sets here and on the replicas, in any order;
    a Failure when there is none."""
    wal_name = oldest_needed_wal(sorted(sets, key=lambda one: (one.time, one.name)))
    if wal_name is None:
        raise Failure("no complete snapshot set: keep every archived WAL file", 1)
    return wal_name


def cleanup_request(sets, dry_run):
    """(wal_name, the command string for pg_wal_serve --cleanup) from the complete
    sets here and on the replicas: the name is always oldest_wal_name(sets),
    never one a caller could pass, so nothing a set needs can be asked for.
    A Failure when no complete set names a valid segment."""
    wal_name = oldest_wal_name(sets)
    if wal_name.startswith("00000000"):
        raise Failure("the oldest set's start WAL file %s has timeline 0: keep every archived WAL file"
                      % wal_name, 1)
    return wal_name, " ".join([CLEANUP_MARK, "cleanup", wal_name] + (["dry-run"] if dry_run else []))


def cleanup_ssh_argv(source, request, connect_timeout):
    """The ssh command sending request to source's host with its cleanup key,
    or a Failure saying why this source cannot be cleaned up. source: a dict of
    its [source NAME] keys. Never a shared connection (another key's master
    would run the request under that key's forced command); ssh_options come
    after the key and connection choices, so they cannot replace them."""
    import shlex
    name = source["name"]
    if not source["cleanup_identity"]:
        raise Failure("[source %s] has no cleanup_identity: not cleaned up (pg_wal_fetch.py --authorized-keys "
                      "prints the line of a cleanup key)" % name, 2)
    if not source["host"]:
        raise Failure("[source %s] is a local directory (no host): run the lines of oldest-wal --commands "
                      "instead" % name, 2)
    if not source["user"]:
        raise Failure("[source %s] has no user: set user = the archive's owner there (the cleanup key's "
                      "user)" % name, 2)
    try:
        extra = shlex.split(source["ssh_options"])
    except ValueError as error:
        raise Failure("[source %s] ssh_options: %s" % (name, error), 2)
    return (["ssh", "-o", "BatchMode=yes", "-o", "ControlMaster=no", "-o", "ControlPath=none",
             "-o", "IdentitiesOnly=yes", "-i", source["cleanup_identity"]] + extra
            + ["-o", "ConnectTimeout=%d" % connect_timeout, "-p", str(source["port"]),
               "-l", source["user"], "-T", "--", source["host"], request])


def parse_cleanup_answer(text, wal_name, dry_run):
    """The paths pg_wal_serve --cleanup removed (dry_run: would remove), from its
    answer: one "removed PATH" line each, then "CLEANED NAME COUNT DIRS"; None
    if the answer is not that (cut short, or not pg_wal_serve's)."""
    lines = text.splitlines()
    if not lines:
        return None
    words = lines[-1].split(" ")
    if len(words) != 4 or words[:2] != ["CLEANED", wal_name] or not words[2].isdigit() \
            or not words[3].isdigit():
        return None
    prefix = "would remove " if dry_run else "removed "
    paths = [line[len(prefix):] for line in lines[:-1] if line.startswith(prefix)]
    if len(paths) != len(lines) - 1 or len(paths) != int(words[2]):
        return None
    return paths


def cleanup_failure(source_name, returncode, stderr_text):
    """Why pg_wal_serve --cleanup did not clean up a source, in one line."""
    last = (stderr_text.strip().splitlines() or ["no message"])[-1]
    if returncode == 255:
        return "[source %s] not reached by ssh: %s" % (source_name, last)
    if returncode == 127:
        return ("[source %s] the cleanup key is not restricted to pg_wal_serve --cleanup (the host ran "
                "the request as a command): install its line from pg_wal_fetch.py --authorized-keys: %s"
                % (source_name, last))
    return "[source %s] not cleaned up (exit %d): %s" % (source_name, returncode, last)


def prometheus_label(value):
    """A label value as the Prometheus text format writes it (\\, \", \\n escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(sets, now, pools=(), replicas=(), runs=None, fetch_stats=None, spool_bytes=None):
    """The Prometheus text exposition (node_exporter's textfile collector) of the sets.

    sets: this config's sets (with used bytes); pools: [(pool, size bytes,
    allocated bytes, health)]; replicas: [(name, its sets or None when it
    could not be listed)]; runs: {"snapshot": record, "drill": record} of the
    last run of each (a record: exit_code, finished, seconds; absent when there
    was none); fetch_stats: pg_wal_fetch.py's {outcome: {count, seconds}};
    spool_bytes: bytes waiting in the spool. Every family has HELP and TYPE
    lines; times are UTC epoch seconds.
    """
    out = []

    def family(name, kind, text, samples):
        out.append("# HELP %s %s" % (name, text))
        out.append("# TYPE %s %s" % (name, kind))
        for labels, value in samples:
            label_text = ",".join('%s="%s"' % (key, prometheus_label(str(val))) for key, val in labels)
            out.append("%s%s %s" % (name, "{%s}" % label_text if label_text else "",
                                    repr(float(value)) if isinstance(value, float) else int(value)))

    complete = [one for one in sets if one.complete]
    family("pg_zfs_sets", "gauge", "Snapshot sets of this config, by state.",
           [((("state", "complete"),), len(complete)), ((("state", "incomplete"),), len(sets) - len(complete))])
    if complete:
        family("pg_zfs_newest_set_timestamp_seconds", "gauge", "When the newest complete set was taken.",
               [((), complete[-1].time)])
        family("pg_zfs_newest_set_age_seconds", "gauge", "Age of the newest complete set.",
               [((), max(now - complete[-1].time, 0))])
        family("pg_zfs_oldest_set_timestamp_seconds", "gauge", "When the oldest complete set was taken.",
               [((), complete[0].time)])
    family("pg_zfs_set_used_bytes", "gauge", "Bytes only this set's snapshots hold.",
           [((("set", one.name), ("complete", "yes" if one.complete else "no")), one.used) for one in sets])
    if pools:
        family("pg_zfs_pool_size_bytes", "gauge", "Size of the pool that holds the datasets.",
               [((("pool", pool),), size) for pool, size, _, _ in pools])
        family("pg_zfs_pool_allocated_bytes", "gauge", "Bytes allocated in the pool.",
               [((("pool", pool),), allocated) for pool, _, allocated, _ in pools])
        family("pg_zfs_pool_healthy", "gauge", "1 when the pool's health is ONLINE.",
               [((("pool", pool), ("health", health)), 1 if health == "ONLINE" else 0)
                for pool, _, _, health in pools])
    if replicas:
        family("pg_zfs_replica_up", "gauge", "1 when the replica's sets could be listed.",
               [((("replica", name),), 0 if there is None else 1) for name, there in replicas])
        newest = [(name, [one for one in there if one.complete]) for name, there in replicas if there is not None]
        family("pg_zfs_replica_newest_set_age_seconds", "gauge", "Age of the newest set complete on the replica.",
               [((("replica", name),), max(now - there[-1].time, 0)) for name, there in newest if there])
        family("pg_zfs_replica_sets", "gauge", "Sets complete on the replica.",
               [((("replica", name),), len(there)) for name, there in newest])
    runs = [(kind, record) for kind, record in sorted((runs or {}).items()) if record]
    if runs:
        family("pg_zfs_last_run_success", "gauge", "1 when the last run of the job (snapshot, drill) succeeded.",
               [((("job", kind),), 1 if record["exit_code"] == 0 else 0) for kind, record in runs])
        family("pg_zfs_last_run_exit_code", "gauge", "Exit code of the last run of the job (drill: Nagios state).",
               [((("job", kind),), record["exit_code"]) for kind, record in runs])
        family("pg_zfs_last_run_timestamp_seconds", "gauge", "When the last run of the job ended.",
               [((("job", kind),), float(record["finished"])) for kind, record in runs])
        family("pg_zfs_last_run_duration_seconds", "gauge", "How long the last run of the job took.",
               [((("job", kind),), float(record["seconds"])) for kind, record in runs])
    if fetch_stats is not None:
        family("pg_zfs_wal_fetch_calls_total", "counter",
               "restore_command calls of pg_wal_fetch.py, by outcome.",
               [((("outcome", outcome),), fetch_stats[outcome]["count"]) for outcome in FETCH_OUTCOMES])
        family("pg_zfs_wal_fetch_seconds_total", "counter",
               "Seconds spent in restore_command calls of pg_wal_fetch.py, by outcome.",
               [((("outcome", outcome),), float(fetch_stats[outcome]["seconds"])) for outcome in FETCH_OUTCOMES])
    if spool_bytes is not None:
        family("pg_zfs_spool_bytes", "gauge", "Bytes of prefetched WAL waiting in the spool.",
               [((), spool_bytes)])
    return "\n".join(out) + "\n"


def run_record(record):
    """A last-run record (JSON already parsed) with exit_code, finished and seconds
    as numbers; ValueError saying what is wrong otherwise."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    for key in ("exit_code", "finished", "seconds"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError("%s is %r, not a number" % (key, value))
    return record


def fetch_counters(record):
    """pg_wal_fetch.py's counters with every outcome (count int, seconds float);
    ValueError when the file holds something else."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    counters = {}
    for outcome in FETCH_OUTCOMES:
        entry = record.get(outcome, {"count": 0, "seconds": 0.0})
        count, seconds = (entry.get("count"), entry.get("seconds")) if isinstance(entry, dict) else (None, None)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0 or \
                isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise ValueError("%s: %r is not {count, seconds}" % (outcome, entry))
        counters[outcome] = {"count": count, "seconds": float(seconds)}
    return counters


def snapshot_run_record(started, finished, set_name, failure):
    """The last-run record of a snapshot run ([snapshot] state_file)."""
    return {"exit_code": failure.code if failure else 0, "status": "failed" if failure else "ok",
            "set": set_name, "started": started, "finished": finished,
            "seconds": round(max(finished - started, 0.0), 3),
            "message": str(failure) if failure else "took set %s" % set_name}


def parse_perfdata(perf):
    """{label: {"value": number, "unit": text, "warn", "crit" (when given)}} of a
    Nagios perfdata string ("sets=3 age=3600s;93600;180000")."""
    result = {}
    for item in perf.split():
        label, _, rest = item.partition("=")
        fields = rest.split(";")
        match = re.match(r"^(-?[0-9.]+)([^0-9.;]*)$", fields[0])
        if not label or not match:
            continue
        entry = {"value": float(match.group(1)) if "." in match.group(1) else int(match.group(1)),
                 "unit": match.group(2)}
        for key, field in zip(("warn", "crit"), fields[1:3]):
            if re.match(r"^-?[0-9]+(\.[0-9]+)?$", field):
                entry[key] = float(field) if "." in field else int(field)
        result[label] = entry
    return result


def check_json(state, text, perf):
    """check --json: the Nagios result as one JSON object (the exit code stays the state)."""
    return json.dumps({"status": NAGIOS_STATES[state], "exit_code": state, "message": text,
                       "perfdata": parse_perfdata(perf)}, sort_keys=True)


def pool_state(pools):
    """(Nagios state 0-2, [texts], perfdata) of the pools: a pool POOL_WARN_PERCENT
    full warns, POOL_CRIT_PERCENT full or not ONLINE is critical (a full pool
    takes no more sets; a faulted one may hold none)."""
    state, texts, perf = 0, [], []
    for pool, size, allocated, health in pools:
        percent = int(round(100.0 * allocated / size)) if size else 0
        perf.append("pool_%s=%d%%;%d;%d" % (re.sub(r"[^A-Za-z0-9_.-]", "_", pool), percent,
                                             POOL_WARN_PERCENT, POOL_CRIT_PERCENT))
        if health != "ONLINE":
            state = 2
            texts.append("pool %s is %s" % (pool, health))
        elif percent >= POOL_WARN_PERCENT:
            state = max(state, 2 if percent >= POOL_CRIT_PERCENT else 1)
            texts.append("pool %s is %d%% full" % (pool, percent))
    return state, texts, " ".join(perf)


def check_state(sets, now, warn_age, crit_age, newest_archived=None, wal_wait=DEFAULT_WAL_WAIT):
    """(Nagios state index 0-2, text, perfdata) from the newest complete set.

    A newest set whose stop segment no archive holds yet (newest_archived:
    each source's newest segment) cannot be restored: noted, and WARNING once
    it has waited wal_wait seconds (an idle primary without archive_timeout).
    """
    complete = [one for one in sets if one.complete]
    if not complete:
        return 2, "no complete snapshot set", "sets=0"
    newest = complete[-1]
    age = int(now - newest.time)
    perf = "age=%ds sets=%d" % (max(age, 0), len(complete))
    if age < 0:
        return 1, "newest set %s is dated %ds in the future (clock?)" % (newest.name, -age), perf
    state = 2 if age >= crit_age else 1 if age >= warn_age else 0
    text = "newest set %s is %ds old, %d complete sets" % (newest.name, age, len(complete))
    segment = waiting_segment(newest, newest_archived)
    if segment:
        text += "; it is waiting for WAL %s, in no archive yet (not restorable until the primary " \
                "archives it: archive_timeout?)" % segment
        state = max(state, 1 if age >= wal_wait else 0)
    return state, text, perf


def segment_size(start_lsn, start_wal):
    """The WAL segment size (bytes) that makes start_wal the segment of start_lsn, or
    None. Every size PostgreSQL allows (1 MiB to 1 GiB, powers of two) is tried."""
    try:
        high, low = start_lsn.split("/")
        lsn = int(high, 16) << 32 | int(low, 16)
        log, seg = int(start_wal[8:16], 16), int(start_wal[16:24], 16)
    except (AttributeError, ValueError, IndexError):
        return None
    for shift in range(20, 31):
        size = 1 << shift
        if lsn // size == log * (0x100000000 // size) + seg and seg < 0x100000000 // size:
            return size
    return None


def wal_holes(sets, archived):
    """The segments (names) from the oldest complete set's start to the newest
    archived segment that no source holds, on any timeline since that set's;
    [] when there is no set, no listing or no size to count by.

    archived: every segment name some source holds. A segment is there when a
    file of its position exists on the set's timeline or a later one (after a
    promotion the new timeline carries the positions on).
    """
    complete = [one for one in sets if one.complete]
    if not complete or not archived:
        return []
    oldest = complete[0]
    start = oldest.properties.get("start_wal", "")
    size = segment_size(oldest.properties.get("start_lsn"), start)
    if size is None:
        return []
    per_log = 0x100000000 // size
    timeline = int(start[:8], 16)
    ours = [name for name in archived if int(name[:8], 16) >= timeline]
    if not ours:
        return []
    present = {}
    for name in ours:
        position = int(name[8:16], 16) * per_log + int(name[16:24], 16)
        present[position] = max(present.get(position, 0), int(name[:8], 16))
    holes, current = [], timeline
    for position in range(int(start[8:16], 16) * per_log + int(start[16:24], 16), max(present) + 1):
        if position in present:
            current = present[position]
        else:           # named on the timeline of the segment before it
            holes.append("%08X%08X%08X" % (current, position // per_log, position % per_log))
    return holes


def continuity_state(sets, holes):
    """(Nagios state 0-2, [texts]) of the archive's holes (wal_holes): CRITICAL when
    one comes after the newest complete set's start (no set restores past it to
    now), WARNING when only older sets are cut off by one."""
    if not holes:
        return 0, []
    complete = [one for one in sets if one.complete]
    newest_start = complete[-1].properties.get("start_wal", "") if complete else ""
    late = [name for name in holes if name[8:] >= newest_start[8:]]
    text = "WAL %s is in no archive%s: %s" % (
        holes[0], " (and %d more)" % (len(holes) - 1) if len(holes) > 1 else "",
        "no set restores past it" if late else "sets before it cannot be restored past it")
    return (2 if late else 1), [text]


# -- replication: what to send, what the replica keeps ----------------------------

# What replicate writes on the replica, checked before it goes on a command line
# (pg_zfs_receive checks it again there).
DATASET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*(/[A-Za-z0-9_.:-]+)*$")
PROPERTY_VALUE_RE = re.compile(r"^[A-Za-z0-9+/=:.,_@ -]+$")
# btrfs: a path on a replica's command line (its target; the guest's subvolumes,
# whose last component names their copies there): absolute, no component
# starting with a dot.
BTRFS_PATH_RE = re.compile(r"^(/[A-Za-z0-9_:-][A-Za-z0-9_.:-]*)+$")
# The largest NAME@SET.json pg_zfs_receive writes (a set's is about 2 KiB).
REPLICA_METADATA_MAX = 65536
# Properties of the guest that stay there: copy_of is written by the replica's
# side, replicated_to says which replicas hold a set.
NOT_SENT = ("copy_of", "replicated_to")

Send = collections.namedtuple("Send", "snapshot base target")


def replica_dataset(parent, source):
    """The name of source's copy on a replica: PARENT/PATH for POOL/PATH."""
    return parent + "/" + copy_tail(source)


def dataset_name_problem(name):
    """Why name cannot be written on a replica's command line as a dataset, or None."""
    if not DATASET_NAME_RE.match(name) or any(part in (".", "..") for part in name.split("/")):
        return "%r is not a dataset name (letters, digits, _ . : - and /)" % name
    return None


def btrfs_path_problem(path):
    """Why path cannot be written on a replica's command line as a btrfs path, or None."""
    if not BTRFS_PATH_RE.match(path) or os.path.normpath(path) != path:
        return ("%r is not an absolute path of letters, digits, _ . : - (no component starting with a dot)"
                % path)
    return None


def replica_layout_problem(datasets):
    """Why these datasets cannot be received below one replica parent, or None: a
    pool's root dataset has no PATH to land on, and POOL1/PATH and POOL2/PATH
    (btrfs: /DIR1/NAME and /DIR2/NAME) would land on the same copy."""
    seen = {}
    for dataset in datasets:
        problem = btrfs_path_problem(dataset) if dataset.startswith("/") else dataset_name_problem(dataset)
        if problem:
            return problem
        tail = copy_tail(dataset)
        if not tail:
            return "%s is a pool's root dataset: a replica receives POOL/PATH as TARGET/PATH" % dataset
        if tail in seen:
            return "%s and %s would both be TARGET/%s on a replica" % (seen[tail], dataset, tail)
        seen[tail] = dataset
    return None


def parse_replica_listing(text, parent):
    """(rows, {snapshot: guid}, [file systems]) below parent from the replica's
    `zfs get -rHp -o name,property,value guid,pgzfs:... PARENT`; rows as
    group_sets takes them, unset properties left out."""
    found = collections.OrderedDict()
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 3:
            found.setdefault(fields[0], {})[fields[1]] = fields[2]
    rows, guids, filesystems = [], {}, []
    for name, properties in found.items():
        if not name.startswith(parent + "/"):
            continue
        if "@" not in name:
            filesystems.append(name)
            continue
        dataset, _, snapshot = name.partition("@")
        if properties.get("guid", "-") != "-":
            guids[name] = properties["guid"]
        rows.append((dataset, snapshot, 0, dict((key[len(P):], value) for key, value in properties.items()
                                                if key.startswith(P) and value != "-")))
    return rows, guids, filesystems


def parse_resume_tokens(text, parent):
    """{dataset: token} of `zfs get -rHp -o name,property,value receive_resume_token
    PARENT`: the file systems below parent holding a partial resumable receive."""
    tokens = {}
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[0].startswith(parent + "/") and "@" not in fields[0] \
                and re.match(r"^[0-9a-f]+(-[0-9a-f]+)+$", fields[2]):
            tokens[fields[0]] = fields[2]
    return tokens


def parse_btrfs_listing(text, parent):
    """(rows, {snapshot: received UUID}, {snapshot: (received UUID or None, read-only)})
    of pg_zfs_receive's listing of a btrfs replica's PARENT/.pgzfs, one line each:

        subvolume NAME@SET RECEIVED_UUID FLAGS   (`btrfs subvolume show`: `-` when none)
        metadata NAME@SET JSON                   (NAME@SET.json, its line breaks removed)

    The snapshot ids are PARENT/NAME@SET, as replica_dataset names the copies.
    rows, as group_sets takes them: one per read-only subvolume (a writable one
    is a receive that did not finish), its metadata {} when missing or not ours
    to read. The UUIDs: a read-only subvolume's received UUID, `-` for any other
    subvolume (never the UUID of a snapshot here: not arrived).
    """
    found, metadata = collections.OrderedDict(), {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        name, _, value = rest.partition(" ")
        if "@" not in name or "/" in name or name.startswith("."):
            continue
        if kind == "subvolume" and len(value.split()) >= 2:
            received, flags = value.split()[0], value.split()[1:]
            found[name] = (None if received == "-" else received, "readonly" in flags)
        elif kind == "metadata":
            try:
                metadata[name] = parse_metadata(value)
            except ValueError:
                metadata[name] = {}
    rows, guids, subvolumes = [], {}, collections.OrderedDict()
    for name, (received, read_only) in found.items():
        copy, _, set_name = name.partition("@")
        snapshot = "%s/%s" % (parent, name)
        subvolumes[snapshot] = (received, read_only)
        guids[snapshot] = received if read_only and received else "-"
        if read_only:
            rows.append(("%s/%s" % (parent, copy), set_name, 0, metadata.get(name, {})))
    return rows, guids, subvolumes


def btrfs_leftovers(subvolumes, parent, prefix, datasets, guids):
    """The copies below parent that a cut `btrfs receive` left (parse_btrfs_listing's
    subvolumes): writable, named as the snapshot of one of datasets in a set of
    prefix, without a received UUID, or with the UUID of that snapshot here
    (guids: cut between its last two steps). btrfs cannot resume a receive:
    replicate deletes them and sends their snapshots again. Anything else
    there (read-only, another UUID, another name) is never touched."""
    copies = dict((replica_dataset(parent, dataset), dataset) for dataset in datasets)
    leftovers = []
    for snapshot, (received, read_only) in subvolumes.items():
        copy, _, name = snapshot.partition("@")
        if read_only or copy not in copies or parse_set_name(name, prefix) is None:
            continue
        if received is None or received == guids.get("%s@%s" % (copies[copy], name)):
            leftovers.append(snapshot)
    return leftovers


def sent_uuid(show):
    """The UUID `btrfs send` gives a snapshot's stream, from its `btrfs subvolume show`:
    its Received UUID when it has one (a copy sent on), else its UUID; what the
    copy's Received UUID becomes. None when the text has neither."""
    found = dict(re.findall(r"^\s*(UUID|Received UUID):\s*(\S+)\s*$", show, re.MULTILINE))
    received = found.get("Received UUID", "-")
    return received if received != "-" else found.get("UUID")


def replica_metadata_text(properties, source):
    """NAME@SET.json of the copy of a btrfs snapshot: its keys here but NOT_SENT, plus
    copy_of = source (the subvolume sent from). ValueError when a value has a
    character pg_zfs_receive refuses, or the text is longer than it takes."""
    found = dict((key, value) for key, value in properties.items() if key not in NOT_SENT)
    found["copy_of"] = source
    for key, value in sorted(found.items()):
        if value and not PROPERTY_VALUE_RE.match(value):
            raise ValueError("%s %r has a character the replica's pg_zfs_receive refuses" % (key, value[:60]))
    text = metadata_text(found)
    if len(text) > REPLICA_METADATA_MAX:
        raise ValueError("its metadata is %d bytes, more than the replica's pg_zfs_receive takes (%d)"
                         % (len(text), REPLICA_METADATA_MAX))
    return text


def replica_sets(rows, prefix, parent, datasets):
    """The sets of this config (datasets here) whose copies are below parent: sets
    whose snapshots carry copy_of (a btrfs replica's NAME is the basename of the
    subvolume here, so a set of the replica's own could otherwise pass)."""
    return [one for one in sets_of(group_sets(rows, prefix), [replica_dataset(parent, d) for d in datasets])
            if one.get("copy_of") and all(name == replica_dataset(parent, source)
                                          for name, source in one.sources.items())]


def plan_replication(sets, guids, there, there_guids, there_filesystems, parent):
    """(newest common set or None, [(set, [Send])], problems): what a replicate run sends.

    sets: the complete sets here, oldest first; guids: {snapshot here: guid};
    there: the replica's sets (replica_sets); there_guids: {snapshot there:
    guid}. A snapshot has arrived when its copy has its GUID. The newest
    common set is the newest set here that is complete there (stop_lsn on
    every copy) with every snapshot arrived: every set newer than it is sent,
    each snapshot that has not arrived from the newest snapshot of its
    dataset that has (-i), or whole when the dataset has no copy yet. A set
    whose snapshots all arrived still gets its properties. Problems: a copy
    with another GUID, a copy that shares no set with its dataset here: they
    are not ours to replace.
    """
    def target_of(one, dataset):
        return "%s@%s" % (replica_dataset(parent, dataset), one.name)

    def arrived(one, dataset):
        guid = guids.get(one.snapshot(dataset))
        return guid is not None and there_guids.get(target_of(one, dataset)) == guid

    complete_there = set(one.name for one in there if one.complete)
    common = None
    for one in sets:
        if one.name in complete_there and all(arrived(one, dataset) for dataset in one.datasets):
            common = one
    problems, plan, base = [], [], {}
    for one in sets:
        newer = common is None or (one.time, one.name) > (common.time, common.name)
        sends = []
        for dataset in one.datasets:
            target = target_of(one, dataset)
            if arrived(one, dataset):
                base[dataset] = one.snapshot(dataset)
                continue
            if not newer:
                continue
            if target in there_guids:
                problems.append("%s exists there with another GUID than %s: not a copy of it"
                                % (target, one.snapshot(dataset)))
                continue
            copy = replica_dataset(parent, dataset)
            if dataset not in base and copy in there_filesystems:
                problems.append("%s exists there but holds no set of %s: nothing to send %s from"
                                % (copy, dataset, one.snapshot(dataset)))
                continue
            sends.append(Send(one.snapshot(dataset), base.get(dataset), copy))
            base[dataset] = one.snapshot(dataset)
        if newer:
            plan.append((one, sends))
    return common, plan, problems


def replica_bases(sets, replica_names):
    """{set name: [replica names]}: for each replica, the newest complete set here
    whose pgzfs:replicated_to names it, the base of its next send: prune keeps it."""
    bases = {}
    for name in replica_names:
        held = [one for one in sets if one.complete and name in one.get("replicated_to", "").split()]
        if held:
            bases.setdefault(held[-1].name, []).append(name)
    return bases


def replica_prune_decision(there, policy, now, common):
    """Names of the replica's sets to destroy: prune_decision with the replica's own
    keep_*, never `common` (the newest set in common with here: the next send's base)."""
    return [name for name in prune_decision(there, policy, now) if name != common]


def property_command(key, value, snapshots):
    """The command line `zfs set 'pgzfs:KEY=VALUE' SNAPSHOT...` for the replica (the
    quotes are what a login shell and pg_zfs_receive both read); ValueError when
    the value has a character pg_zfs_receive refuses."""
    if not PROPERTY_VALUE_RE.match(value):
        raise ValueError("pgzfs:%s %r has a character the replica's pg_zfs_receive refuses" % (key, value[:60]))
    return "zfs set '%s%s=%s' %s" % (P, key, value, " ".join(snapshots))


def parse_rate(text):
    """Bytes per second of a bwlimit such as 20M, 512K or 1000000; None when empty."""
    match = SIZE_RE.match(text.strip().upper())
    if not text.strip():
        return None
    if not match or float(match.group(1)) <= 0:
        raise ValueError("%r is not a rate (bytes per second: 20M, 512K, 1000000)" % text)
    return int(float(match.group(1)) * (1024 ** "BKMGTPEZ".index(match.group(2) or "B")))


def failure_line(text, code):
    """Why one side of a send failed: the last line of its stderr that is not btrfs
    send's or receive's chatter (At subvol, At snapshot, Chroot to), else its
    exit code."""
    lines = [line for line in text.strip().splitlines()
             if not re.match(r"^(At subvol|At snapshot|Chroot to) ", line)]
    return lines[-1] if lines else "exit code %d" % code


def send_size_of(output):
    """Bytes of `zfs send -nvP`'s 'size' line, or None."""
    match = re.search(r"^size\s+([0-9]+)\s*$", output, re.MULTILINE)
    return int(match.group(1)) if match else None


# pg_zfs_receive: the forced command of the guest's key on a replica. POSIX sh,
# as pg_wal_serve on the archive hosts (pg_wal_fetch.py): every host has it.
# The guest sends plain zfs command lines, so a key installed without it works
# too (as root); pg_zfs_receive runs only these, below ITS parent (its argument
# in authorized_keys, never the client's), the words split with globbing off
# and never evaluated:
#   zfs get -rHp -o name,property,value PROPERTIES PARENT    the listing
#   zfs recv [-s] -u -d PARENT                               a stream from stdin
#   zfs recv -A PARENT/PATH                                  drop a resumable partial receive
#   zfs destroy PARENT/PATH@SET                              retention (SET: *_YYYYmmddTHHMMSSZ)
#   zfs set 'pgzfs:KEY=VALUE' PARENT/PATH@SET...             a set's metadata
# A btrfs replica's PARENT is an absolute path (a directory on a btrfs there);
# its copies are PARENT/.pgzfs/NAME@SET with NAME@SET.json beside them (the
# guest's layout), and the verbs are pg_zfs_receive's own (a bare key cannot
# serve them: on btrfs the key always runs pg_zfs_receive):
#   pgzfs-list PARENT                            one line per copy and per
#                                                metadata file (parse_btrfs_listing)
#   btrfs receive PARENT/.pgzfs                  a stream from stdin (run with -C:
#                                                chrooted into PARENT/.pgzfs)
#   pgzfs-delete PARENT/.pgzfs/NAME@SET          the subvolume, then NAME@SET.json
#   pgzfs-write PARENT/.pgzfs/NAME@SET.json      the metadata from stdin (atomically;
#                                                at most REPLICA_METADATA_MAX bytes of the
#                                                characters metadata_text writes)
RECEIVER = "pg_zfs_receive"
RECEIVER_PATH = "/usr/local/bin/pg_zfs_receive"
RECEIVER_SCRIPT = r"""#!/bin/sh
# pg_zfs_receive: the receiving end of `pg_zfs_snap.py replicate` on a replica
# (pg_zfs @VERSION@). Written by `pg_zfs_snap.py receiver-script`: do not edit;
# write it again after an upgrade.
#
# The forced command of the guest's key in the authorized_keys of the user
# that receives (root on zfs-fuse and on btrfs; with OpenZFS a user given
# `zfs allow USER create,mount,receive,destroy,userprop PARENT`):
#
#   restrict,from="GUEST",command="@PATH@ bk/guest1" ssh-ed25519 AAAA...
#   restrict,from="GUEST",command="@PATH@ /srv/replica/guest1" ssh-ed25519 AAAA...   (btrfs)
#
# sshd runs it for every session of that key, whatever the client asked. It
# reads the client's command from $SSH_ORIGINAL_COMMAND, splits it into words
# with globbing off (never evaluates it) and runs only these, with the parent
# dataset of its own command line, never the client's:
#   zfs get -rHp -o name,property,value PROPERTIES PARENT   list what is there
#   zfs recv [-s] -u -d PARENT      receive the stream on stdin below PARENT
#                                   (POOL/PATH@SET arrives as PARENT/PATH@SET)
#   zfs recv -A PARENT/PATH         drop a partial resumable receive (OpenZFS)
#   zfs destroy PARENT/PATH@SET     one set's snapshot (SET ends _YYYYmmddTHHMMSSZ)
#   zfs set 'pgzfs:KEY=VALUE' PARENT/PATH@SET...  a set's metadata
# or, when PARENT is an absolute path (a directory on a btrfs):
#   pgzfs-list PARENT               list PARENT/.pgzfs: each copy NAME@SET (its
#                                   received UUID and flags) and NAME@SET.json
#   btrfs receive PARENT/.pgzfs     receive the stream on stdin there (chrooted)
#   pgzfs-delete PARENT/.pgzfs/NAME@SET         one set's copy, then its .json
#   pgzfs-write PARENT/.pgzfs/NAME@SET.json     its metadata from stdin (at most
#                                   @METADATA_MAX@ bytes of letters, digits, blanks
#                                   and +/=:.,_@-{}")
# Anything else (a shell, id, a destroy of PARENT, a receive elsewhere, a ;
# or $(...) in a name) gets one line "pg_zfs_receive: refused: ..." on stderr
# (and to syslog, auth.notice) and exit 1, and nothing changes.
v=@VERSION@
refuse() {
	printf "pg_zfs_receive: refused: %.200s\n" "$1" >&2
	logger -p auth.notice -t pg_zfs_receive "refused a request from ${SSH_CLIENT%% *}: $(printf "%.200s" "$1")" >/dev/null 2>&1
	exit 1
}
fail() {
	printf "pg_zfs_receive: %.200s\n" "$1" >&2
	exit 1
}
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
LC_ALL=C
export LC_ALL
d2=[0123456789][0123456789]
[ $# -eq 1 ] || refuse "usage: pg_zfs_receive PARENT (the command= of an authorized_keys line)"
p=$1
case $p in
/*)
	case $p/ in
	*//*|*/.*|*[!A-Za-z0-9_.:/-]*) refuse "not an absolute path of letters, digits and _ . : -: $p" ;;
	esac ;;
""|*/|*//*|.*|*/.*|*[!A-Za-z0-9_.:/-]*) refuse "not a dataset name: $p" ;;
esac
below() {
	case $1 in
	"$p"/*) ;;
	*) return 1 ;;
	esac
	case $1 in
	*/|*//*|*/./*|*/.|*/../*|*/..|*[!A-Za-z0-9_.:/-]*) return 1 ;;
	esac
	return 0
}
is_set_snapshot() {
	case ${1#*@} in
	*@*|*[!A-Za-z0-9_.:-]*) return 1 ;;
	?*_${d2}${d2}${d2}${d2}T${d2}${d2}${d2}Z) ;;
	*) return 1 ;;
	esac
	below "${1%%@*}"
}
snapdir=$p/.pgzfs
is_copy() {
	case $1 in
	"$snapdir"/*) ;;
	*) return 1 ;;
	esac
	case ${1#"$snapdir"/} in
	.*|*/*|*@*@*|*[!A-Za-z0-9_.:@-]*) return 1 ;;
	?*@?*_${d2}${d2}${d2}${d2}T${d2}${d2}${d2}Z) return 0 ;;
	esac
	return 1
}
list_copies() {
	[ -d "$snapdir" ] || return 0
	set +f
	for e in "$snapdir"/*@*; do
		n=${e##*/}
		case $n in
		*.json)
			is_copy "${e%.json}" && [ -f "$e" ] && [ ! -L "$e" ] || continue
			printf "metadata %s " "${n%.json}"
			head -c @METADATA_MAX@ "$e" | tr -d "\n"
			echo ;;
		*)
			is_copy "$e" || continue
			i=$(btrfs subvolume show "$e" 2>/dev/null) || continue
			r=$(printf "%s\n" "$i" | sed -n "s/^[[:space:]]*Received UUID:[[:space:]]*//p")
			f=$(printf "%s\n" "$i" | sed -n "s/^[[:space:]]*Flags:[[:space:]]*//p")
			printf "subvolume %s %s %s\n" "$n" "${r:--}" "${f:--}" ;;
		esac
	done
	set -f
}
btrfs_request() {
	unset IFS
	set -- $c
	case ${1:-} in
	pgzfs-list)
		[ $# -eq 2 ] && [ "$2" = "$p" ] || refuse "not the listing pgzfs-list $p: $c"
		list_copies
		exit 0 ;;
	btrfs)
		[ "$*" = "btrfs receive $snapdir" ] || refuse "not btrfs receive $snapdir: $c"
		[ -d "$snapdir" ] || mkdir -m 0700 "$snapdir" || exit 1
		exec btrfs receive -C "$snapdir" ;;
	pgzfs-delete)
		[ $# -eq 2 ] && is_copy "$2" || refuse "not the delete of a set's copy in $snapdir: $c"
		[ ! -L "$2" ] || fail "$2 is a symbolic link: not deleted"
		if btrfs subvolume show "$2" >/dev/null 2>&1; then
			btrfs subvolume delete "$2" >/dev/null || exit 1
		fi
		rm -f "$2.json" || exit 1
		exit 0 ;;
	pgzfs-write)
		[ $# -eq 2 ] && [ "${2%.json}.json" = "$2" ] && is_copy "${2%.json}" ||
			refuse "not the metadata NAME@SET.json of a set's copy in $snapdir: $c"
		[ ! -L "$2" ] && [ ! -d "$2" ] && [ ! -L "${2%.json}" ] || fail "$2: not a plain file: not written"
		btrfs subvolume show "${2%.json}" >/dev/null 2>&1 || fail "no copy ${2%.json} to describe"
		t=$snapdir/.${2##*/}.$$.tmp
		head -c $((@METADATA_MAX@ + 1)) > "$t" || { rm -f "$t"; exit 1; }
		n=$(wc -c < "$t")
		[ $n -le @METADATA_MAX@ ] || { rm -f "$t"; refuse "metadata of more than @METADATA_MAX@ bytes for $2"; }
		[ -z "$(tr -d "A-Za-z0-9+/=:.,_@ {}\"\n-" < "$t")" ] ||
			{ rm -f "$t"; refuse "a character pg_zfs_receive never writes, in the metadata for $2"; }
		sync "$t" 2>/dev/null || sync
		mv -f "$t" "$2" || { rm -f "$t"; exit 1; }
		sync "$snapdir" 2>/dev/null || sync
		exit 0 ;;
	*)
		refuse "not a command pg_zfs_receive runs on btrfs: $c" ;;
	esac
}
c=${SSH_ORIGINAL_COMMAND:-}
[ -n "$c" ] || refuse "no command: this key receives pg_zfs_snap.py replicate and nothing else"
set -f
case $c in
*"
"*) refuse "a line break in the command" ;;
esac
case $p in
/*) btrfs_request ;;
esac
case $c in
"zfs set '"*)
	r=${c#"zfs set '"}
	q=${r%%"' "*}
	[ "$q" != "$r" ] || refuse "not zfs set 'pgzfs:KEY=VALUE' SNAPSHOT...: $c"
	case $q in
	*"'"*) refuse "a quote in the property: $c" ;;
	pgzfs:[a-z]*=?*) ;;
	*) refuse "not a pgzfs: property: $q" ;;
	esac
	case ${q%%=*} in
	*[!a-z0-9_:]*) refuse "not a property name: ${q%%=*}" ;;
	esac
	case ${q#*=} in
	*[!A-Za-z0-9+/=:.,_@\ -]*) refuse "a character pg_zfs_receive never sets, in ${q%%=*}" ;;
	esac
	unset IFS
	set -- ${r#*"' "}
	[ $# -ge 1 ] || refuse "zfs set without a snapshot"
	for s in "$@"; do is_set_snapshot "$s" || refuse "not a set's snapshot below $p: $s"; done
	exec zfs set "$q" "$@" ;;
esac
unset IFS
set -- $c
[ "${1:-}" = zfs ] || refuse "not a zfs command: $c"
case ${2:-} in
get)
	[ $# -eq 7 ] && [ "$3" = -rHp ] && [ "$4" = -o ] && [ "$5" = name,property,value ] ||
		refuse "not the listing zfs get -rHp -o name,property,value PROPERTIES $p: $c"
	case $6 in
	""|*[!a-z0-9_:,]*) refuse "not a list of properties: $6" ;;
	esac
	[ "$7" = "$p" ] || refuse "a listing of $7, not $p"
	exec zfs get -rHp -o name,property,value "$6" "$p" ;;
recv|receive)
	if [ $# -eq 4 ] && [ "$3" = -A ]; then
		below "$4" || refuse "not a dataset below $p: $4"
		exec zfs receive -A "$4"
	fi
	[ "$*" = "zfs $2 -u -d $p" ] && exec zfs receive -u -d "$p"
	[ "$*" = "zfs $2 -s -u -d $p" ] && exec zfs receive -s -u -d "$p"
	refuse "not zfs recv [-s] -u -d $p: $c" ;;
destroy)
	[ $# -eq 3 ] && is_set_snapshot "$3" || refuse "not the destroy of a set's snapshot below $p: $c"
	exec zfs destroy "$3" ;;
*)
	refuse "not a zfs command pg_zfs_receive runs: $c" ;;
esac
"""


def receiver_script():
    """The text of pg_zfs_receive, the forced command of the guest's key on a replica."""
    return RECEIVER_SCRIPT.replace("@VERSION@", VERSION).replace("@PATH@", RECEIVER_PATH).replace(
        "@METADATA_MAX@", str(REPLICA_METADATA_MAX))


def receiver_keys_line(public_key, from_patterns, parent, receiver_path=RECEIVER_PATH):
    """The authorized_keys line that lets public_key run pg_zfs_receive below parent
    and nothing else, from from_patterns (sshd's from=: addresses, CIDR, *)."""
    import shlex
    public_key = public_key.strip()
    key = public_key.split()
    if len(key) < 2 or not key[0].startswith(("ssh-", "ecdsa-", "sk-")) or "\n" in public_key:
        raise Failure("not an ssh public key: %r" % public_key[:40], 2)
    if not from_patterns or '"' in from_patterns or " " in from_patterns or "\n" in from_patterns:
        raise Failure("from %r: addresses or patterns separated by commas, no spaces or quotes"
                      % from_patterns, 2)
    parent_problem = btrfs_path_problem(parent) if parent.startswith("/") else dataset_name_problem(parent)
    if parent_problem or not receiver_path.startswith("/") or "\n" in receiver_path:
        raise Failure("cannot write an authorized_keys line for parent %r and receiver %r"
                      % (parent, receiver_path), 2)
    command = "%s %s" % (shlex.quote(receiver_path), shlex.quote(parent))
    return 'restrict,from="%s",command="%s" %s' % (from_patterns, command.replace('"', '\\"'), " ".join(key))


# ---------------------------------------------------------------------------
# The helpers every pg_zfs script carries (config, logging, commands).
# Each script is one self-contained file, so these few lines are repeated in
# all four on purpose; keep them alike when you change one.
# ---------------------------------------------------------------------------

class Failure(Exception):
    """An error for the operator: one line of text and the exit code to end on."""

    def __init__(self, message, code=1):
        Exception.__init__(self, message)
        self.code = code


class Config(object):
    """The pg_zfs INI file, read with typed getters whose errors name the key.

    Every error is a Failure with exit code 2 whose message reads
    ``FILE: [section] key: what is wrong``.
    """

    REQUIRED = object()

    def __init__(self, path, parser):
        self.path = path
        self.parser = parser

    @classmethod
    def load(cls, path):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, "rb") as config_file:
                raw = config_file.read()
        except (OSError, IOError) as error:
            raise Failure("%s: cannot read config file: %s" % (path, error.strerror or error), 2)
        # UTF-8 whatever the locale: cron, systemd and a postmaster started
        # without LANG run us under C, where open() would read ASCII only.
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise Failure("%s: line %d is not UTF-8 text (byte 0x%02X); save the file as UTF-8"
                          % (path, raw.count(b"\n", 0, error.start) + 1, raw[error.start]), 2)
        try:
            parser.read_string(text, path)
        except configparser.Error as error:
            raise Failure("%s: %s" % (path, " ".join(str(error).split())), 2)
        problem = config_problem([(section, [(key, parser.get(section, key)) for key in parser.options(section)])
                                  for section in parser.sections()], CONFIG_READS)
        if problem:
            raise Failure("%s: %s" % (path, problem), 2)
        return cls(path, parser)

    def error(self, section, key, message):
        return Failure("%s: [%s] %s: %s" % (self.path, section, key, message), 2)

    def has_section(self, section):
        return self.parser.has_section(section)

    def str(self, section, key, default=REQUIRED):
        if self.parser.has_option(section, key):
            return self.parser.get(section, key).strip()
        if default is Config.REQUIRED:
            raise self.error(section, key, "missing (required)")
        return default

    def int(self, section, key, default=REQUIRED, minimum=0):
        text = self.str(section, key, default if default is Config.REQUIRED else str(default))
        try:
            value = int(text)
        except ValueError:
            raise self.error(section, key, "%r is not a whole number" % text)
        if value < minimum:
            raise self.error(section, key, "%d is below the minimum %d" % (value, minimum))
        return value

    def choice(self, section, key, choices, default=REQUIRED):
        value = self.str(section, key, default)
        if value not in choices:
            raise self.error(section, key, "%r is not one of %s" % (value, ", ".join(choices)))
        return value

    def list(self, section, key, default=REQUIRED):
        return self.str(section, key, default).split()

    def duration(self, section, key, default=REQUIRED):
        """Seconds: a whole number, or one with a unit s, m, h, d or w (26h, 2d)."""
        text = self.str(section, key, default if default is Config.REQUIRED else str(default))
        seconds = parse_duration(text)
        if seconds is None:
            raise self.error(section, key, "%r is not a duration (seconds, or 90m, 26h, 2d, 1w)" % text)
        return seconds


# Every section and key of pg_zfs.conf, one file for the four scripts, and the
# kind of value each takes ("source" stands for every [source NAME], "replica"
# for every [replica NAME]). Any other name is a typo: Config.load refuses it
# with the nearest valid one, so that keep_dayly = 30 never silently means the
# default.
CONFIG_SCHEMA = {
    "postgres": {"pgdata": "text", "bindir": "text", "user": "text", "host": "text", "port": "int",
                 "dbname": "text", "system_identifier": "int"},
    "snapshot": {"backend": ("zfs", "btrfs"), "datasets": "text", "prefix": "text", "keep_hourly": "int",
                 "keep_daily": "int", "keep_weekly": "int", "keep_monthly": "int", "lock_file": "text",
                 "state_file": "text", "warn_age": "duration", "crit_age": "duration", "wal_wait": "duration"},
    "archive": {"sources": "text", "spool_dir": "text", "prefetch": "int", "timeout": "int",
                "stall_timeout": "int", "control_dir": "text", "control_persist": "int",
                "connect_timeout": "int"},
    "source": {"host": "text", "port": "int", "user": "text", "path": "text", "probe": ("ping", "tcp", "none"),
               "identity_file": "text", "ssh_options": "text", "from": "text", "cleanup_identity": "text"},
    "guest": {"primary_conninfo": "text", "waldir": "text", "logfile": "text", "start_timeout": "int",
              "systemd_unit": "text", "dataset_properties": "text", "tablespace_mapping": "text",
              "cron_schedule": "text", "check_clock": ("yes", "no")},
    "host": {"domain": "text", "libvirt_uri": "text", "start_timeout": "int", "guest_address": "text",
             "guest_port": "int"},
    "restore": {"mount_root": "text", "wal_root": "text", "port_start": "int", "timeout": "int"},
    "replica": {"host": "text", "port": "int", "user": "text", "identity_file": "text", "ssh_options": "text",
                "from": "text", "target": "text", "keep_hourly": "int", "keep_daily": "int",
                "keep_weekly": "int", "keep_monthly": "int", "bwlimit": "text", "warn_age": "duration",
                "crit_age": "duration"},
}
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text):
    """Seconds of "3600", "90m", "26h", "2d" or "1w"; None if it is none of those."""
    text = text.strip().lower()
    unit = DURATION_UNITS.get(text[-1:], None) if text else None
    number = text[:-1] if unit else text
    if not number.isdigit():
        return None
    return int(number) * (unit or 1)


def schema_section(section):
    """The CONFIG_SCHEMA entry a file's section name stands for ("source NAME": "source",
    "replica NAME": "replica")."""
    words = section.split()
    if words[:1] in (["source"], ["replica"]) and len(words) == 2:
        return words[0]
    return section if section in CONFIG_SCHEMA and section not in ("source", "replica") else None


def nearest(name, names):
    """' (did you mean X?)' for the valid name nearest to a typo, or ''."""
    import difflib
    match = difflib.get_close_matches(name, sorted(names), 1, 0.6)
    return " (did you mean %s?)" % match[0] if match else ""


def config_problem(sections, reads):
    """The first typo or bad value in a config file, as one line, or None.

    sections: [(section name, [(key, value)])] as in the file; reads: the
    schema sections this script reads. An unknown section is this script's
    business when it reads the section nearest to it (or none is near); keys
    and values are checked in the sections it reads.
    """
    for section, items in sections:
        kind = schema_section(section)
        if kind is None:
            hint = nearest(section, [name for name in CONFIG_SCHEMA if name not in ("source", "replica")]
                           + ["source NAME", "replica NAME"])
            near = hint[len(" (did you mean "):-2].split()[0] if hint else None
            if near is None or near in reads:
                return "[%s]: no such section%s" % (section, hint)
            continue
        if kind not in reads:
            continue
        for key, value in items:
            if key not in CONFIG_SCHEMA[kind]:
                return "[%s] %s: no such key%s" % (section, key, nearest(key, CONFIG_SCHEMA[kind]))
            expected, text = CONFIG_SCHEMA[kind][key], value.strip()
            if not text or expected == "text":
                continue
            if expected == "int" and not (text.lstrip("-").isdigit()):
                return "[%s] %s: %r is not a whole number" % (section, key, text)
            if expected == "duration" and parse_duration(text) is None:
                return "[%s] %s: %r is not a duration (seconds, or 90m, 26h, 2d, 1w)" % (section, key, text)
            if isinstance(expected, tuple) and text not in expected:
                return "[%s] %s: %r is not one of %s" % (section, key, text, ", ".join(expected))
    return None


def config_path(option):
    """The config file to read: -c/--config, else $PG_ZFS_CONFIG, else the default."""
    return option or os.environ.get("PG_ZFS_CONFIG") or DEFAULT_CONFIG


def setup_logging(verbose=False, use_syslog=False):
    """Log to stderr (PostgreSQL and cron keep it) and, if asked, to syslog."""
    logger = logging.getLogger(PROG)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(PROG + ": %(levelname)s: %(message)s"))
    logger.handlers = [stderr]
    if use_syslog and os.path.exists("/dev/log"):
        try:
            handler = never_waiting_syslog_handler()
        except OSError:             # /dev/log left by a daemon that is gone: stderr only
            return logger
        handler.setFormatter(logging.Formatter(PROG + "[%(process)d]: %(message)s"))
        logger.addHandler(handler)
    return logger


def never_waiting_syslog_handler():
    """A SysLogHandler on /dev/log that never blocks nor fails the script: a syslog
    daemon that takes nothing (its queue full, stalled, restarting) loses the
    line, which stderr has, rather than hang a restore_command or a restore."""
    from logging.handlers import SysLogHandler

    class NeverWaiting(SysLogHandler):
        def emit(self, record):
            try:
                self.socket.setblocking(False)
                priority = self.encodePriority(self.facility, self.mapPriority(record.levelname))
                self.socket.send(("<%d>%s\000" % (priority, self.format(record))).encode("utf-8"))
            except (OSError, ValueError):
                pass
    return NeverWaiting(address="/dev/log", facility=SysLogHandler.LOG_DAEMON)


def unexpected_failure(error):
    """A Failure (exit 1) of an error no step turned into one: one line for the
    operator (an OSError names its file), the traceback only with --verbose."""
    import traceback
    log.debug("%s", "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip())
    if isinstance(error, EnvironmentError) and error.strerror:
        where = " ".join(str(name) for name in (error.filename, getattr(error, "filename2", None)) if name)
        return Failure("%s%s" % (error.strerror, ": " + where if where else ""), 1)
    return Failure("internal error: %s: %s" % (type(error).__name__, error), 1)

def run(argv, timeout=None, input_text=None, check=True):
    """Run argv (a list, never a shell string); return (exit code, stdout, stderr).

    A missing program or a timeout is a Failure with exit code 1; so is a
    non-zero exit when check is true, with the command's last stderr line.
    """
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True)
    except OSError as error:
        raise Failure("cannot run %s: %s" % (argv[0], error.strerror or error), 1)
    try:
        out, err = proc.communicate(input_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise Failure("%s did not finish within %s s" % (" ".join(argv), timeout), 1)
    if check and proc.returncode != 0:
        last = (err.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]
        raise Failure("%s failed: %s" % (" ".join(argv[:3]), last), 1)
    return proc.returncode, out, err


# ---------------------------------------------------------------------------
# The snapshot-set format: how pg_zfs_snap.py writes a set and
# pg_zfs_restore.py reads it (DEVELOPERS.md), where each program of
# PostgreSQL is found, and the mount table. Both scripts carry this block,
# identical (tests/test_config.py): change it in both.
# ---------------------------------------------------------------------------

# ZFS user properties pgzfs:KEY (btrfs: the keys of NAME@SET.json). stop_lsn
# is written last: a snapshot without it is not part of a complete set.
P = "pgzfs:"
PROPERTY_KEYS = (
    "version", "set", "datasets", "pgdata_dataset", "pgdata_rel", "mode",
    "start_lsn", "stop_lsn", "start_wal", "timeline", "start_time", "stop_time",
    "pg_version", "system_identifier", "backup_label", "tablespace_map", "mountpoints",
    "db_time", "db_time_lsn", "copy_of", "replicated_to",
)
# Replication (pg_zfs_snap.py replicate): on the replica every received snapshot
# carries the source's pgzfs:* as they are (names of the guest's datasets) and
# copy_of, the dataset it was sent from; its name there is PARENT/copy_tail(it).
# On the guest, replicated_to lists the replicas that hold the set whole.
# The long base64 ones: read only for the set being restored.
FILE_KEYS = ("backup_label", "tablespace_map", "mountpoints")
LIST_KEYS = tuple(key for key in PROPERTY_KEYS if key not in FILE_KEYS)
NAME_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
WAL_NAME_RE = re.compile(r"^[0-9A-F]{24}$")
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
ZFS_FSTYPES = ("zfs", "fuse.zfs")    # /proc/self/mounts: OpenZFS, zfs-fuse
# btrfs: the snapshots of SUBVOLUME are PARENT/.pgzfs/NAME@SET, read-only, with
# their metadata in NAME@SET.json; pg_zfs_restore.py's clone markers are
# PARENT/.pgzfs/clones/CLONE.json.
BTRFS_SNAPSHOT_DIR = ".pgzfs"
BTRFS_CLONE_DIR = "clones"
BTRFS_METADATA_SUFFIX = ".json"
BTRFS_SUBVOLUME_INODE = 256          # the root directory of every btrfs subvolume
BTRFS_CANDIDATES = ("/sbin/btrfs", "/usr/sbin/btrfs", "/bin/btrfs", "/usr/bin/btrfs")


class SnapshotSet(object):
    """One backup: DATASET@NAME on every dataset of pgzfs:datasets.

    time is the UTC epoch of the name; properties are pgzfs:* without the
    prefix, from the snapshot of the PGDATA dataset; present lists the datasets
    that have the snapshot; used is bytes, summed; complete means every dataset
    has it and every snapshot carries pgzfs:stop_lsn (written last). sources
    maps each dataset to the name the properties give it: itself, or on a
    replica the guest's dataset its copy came from (datasets and pgdata_dataset
    are the names here).
    """

    def __init__(self, name, time, datasets, present, properties, used, complete, sources=None):
        self.name, self.time, self.datasets, self.present = name, time, datasets, present
        self.properties, self.used, self.complete = properties, used, complete
        self.sources = sources if sources is not None else dict((d, d) for d in datasets)

    def __repr__(self):
        return "SnapshotSet(%r, complete=%r)" % (self.name, self.complete)

    def get(self, key, default=None):
        return self.properties.get(key, default)

    def snapshot(self, dataset):
        return "%s@%s" % (dataset, self.name)

    @property
    def stop_lsn(self):
        """pgzfs:stop_lsn as an integer, or None."""
        try:
            return parse_lsn(self.properties.get("stop_lsn", ""))
        except ValueError:
            return None

    @property
    def timeline(self):
        """pgzfs:timeline as an integer, or None."""
        text = self.properties.get("timeline", "")
        return int(text) if text.isdigit() else None


def check_prefix(prefix):
    """Return prefix if it can start a snapshot name, else raise ValueError."""
    if not PREFIX_RE.match(prefix):
        raise ValueError("%r is not a snapshot name prefix (letters, digits, _ . : -)" % prefix)
    return prefix


def set_name(prefix, when):
    """The set name for UTC epoch seconds `when`: PREFIX_YYYYmmddTHHMMSSZ."""
    return "%s_%s" % (prefix, time.strftime(NAME_TIME_FORMAT, time.gmtime(int(when))))


def parse_set_name(name, prefix):
    """UTC epoch seconds of a set name with this prefix, or None if not ours."""
    head = prefix + "_"
    if not name.startswith(head) or len(name) != len(head) + 16:
        return None
    stamp = name[len(head):]
    if not re.match(r"^[0-9]{8}T[0-9]{6}Z$", stamp):
        return None
    try:
        return calendar.timegm(time.strptime(stamp, NAME_TIME_FORMAT))
    except ValueError:
        return None


def group_sets(rows, prefix):
    """Every set of this prefix, oldest first (by the name's time, then name).

    rows: (dataset, snapshot name, used bytes, {property: value}) with the
    pgzfs: prefix already removed and unset properties absent. A snapshot is ours
    only if its name parses with the prefix AND its pgzfs:set equals the name
    AND its dataset is in its pgzfs:datasets; anything else is never touched.
    A replica's copy counts by its pgzfs:copy_of instead of its own name, and
    only as PARENT/copy_tail(copy_of): one set is the copies below one PARENT,
    its datasets and pgdata_dataset given by their names here (sources maps
    them back).
    """
    by_key = collections.OrderedDict()
    for dataset, snapshot, used, properties in rows:
        when = parse_set_name(snapshot, prefix)
        if when is None or properties.get("set") != snapshot:
            continue
        source = properties.get("copy_of", dataset)
        parent = copy_parent(dataset, source) if "copy_of" in properties else ""
        if parent is None or source not in properties.get("datasets", "").split():
            continue
        by_key.setdefault((snapshot, parent), []).append((dataset, source, used, properties))
    sets = []
    for (name, parent), members in by_key.items():
        present = tuple(dataset for dataset, _, _, _ in members)
        main = members[-1][3]
        for _, source, _, properties in members:
            if source == properties.get("pgdata_dataset"):
                main = properties
        sources = collections.OrderedDict(
            (parent + "/" + copy_tail(source) if parent else source, source)
            for source in main.get("datasets", "").split())
        datasets = tuple(sources)
        properties = dict(main)
        if parent:
            here = dict((source, dataset) for dataset, source in sources.items())
            properties["datasets"] = " ".join(datasets)
            if main.get("pgdata_dataset") in here:
                properties["pgdata_dataset"] = here[main["pgdata_dataset"]]
        complete = (set(datasets) <= set(present)
                    and all(member[3].get("stop_lsn") for member in members))
        sets.append(SnapshotSet(name, parse_set_name(name, prefix), datasets, present, properties,
                                sum(used for _, _, used, _ in members), complete, dict(sources)))
    sets.sort(key=lambda one: (one.time, one.name))
    return sets


def copy_tail(source):
    """A dataset's copy's name below a replica's parent: PATH for POOL/PATH (what
    `zfs recv -d PARENT` makes of it), NAME for a btrfs subvolume /DIR/NAME."""
    return os.path.basename(source) if source.startswith("/") else source.partition("/")[2]


def copy_parent(dataset, source):
    """PARENT when dataset is PARENT/copy_tail(source), source's copy on a replica; else None."""
    tail = copy_tail(source)
    if tail and dataset.endswith("/" + tail) and len(dataset) > len(tail) + 1:
        return dataset[:-len(tail) - 1]
    return None


def sets_of(sets, datasets):
    """The sets that include one of these datasets: another config's sets with the
    same prefix on the same pool (another cluster) are never listed, chosen,
    pruned, counted or cleaned up."""
    ours = set(datasets)
    return [one for one in sets if ours & set(one.datasets)]


def parse_lsn(text):
    """The integer position of a WAL location 'X/X'; ValueError if it is not one."""
    match = LSN_RE.match(text.strip())
    if not match:
        raise ValueError("%r is not a WAL location (X/X, hexadecimal)" % text)
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(position):
    """'X/X' of an integer WAL position, as PostgreSQL prints it."""
    return "%X/%X" % (position >> 32, position & 0xFFFFFFFF)


def segment_position(wal_name, segment_size=DEFAULT_SEGMENT_SIZE):
    """(timeline, segment number) of a WAL segment name; ValueError if it is not one."""
    if not WAL_NAME_RE.match(wal_name or ""):
        raise ValueError("%r is not a WAL segment name" % wal_name)
    per_id = 0x100000000 // segment_size
    return int(wal_name[:8], 16), int(wal_name[8:16], 16) * per_id + int(wal_name[16:], 16)


def segment_name(timeline, number, segment_size=DEFAULT_SEGMENT_SIZE):
    """The WAL segment name of (timeline, segment number)."""
    per_id = 0x100000000 // segment_size
    return "%08X%08X%08X" % (timeline, number // per_id, number % per_id)


def segment_of_lsn(timeline, lsn, segment_size=DEFAULT_SEGMENT_SIZE):
    """The name of the segment holding WAL position lsn (an integer) on timeline."""
    return segment_name(timeline, lsn // segment_size, segment_size)


def segment_size_of(start_wal, start_lsn):
    """The WAL segment size a set was taken with, as pgzfs:start_wal and start_lsn agree
    (16 MiB whenever that fits, or they cannot tell)."""
    try:
        position = parse_lsn(start_lsn)
        for size in [DEFAULT_SEGMENT_SIZE] + [1 << bits for bits in range(20, 31)]:
            if segment_position(start_wal, size)[1] == position // size:
                return size
    except ValueError:
        pass
    return DEFAULT_SEGMENT_SIZE


def stop_segment(one):
    """The last WAL segment a restore of set one needs, or None: the one holding
    pgzfs:stop_lsn. Replay is consistent once it has replayed up to stop_lsn,
    but stops there (--immediate, a drill) only on reading the record AT
    stop_lsn: a backup that ended on a segment boundary needs the next
    segment; a shutdown set's checkpoint record is at stop_lsn itself.
    """
    if one.stop_lsn is None or one.timeline is None:
        return None
    return segment_of_lsn(one.timeline, one.stop_lsn,
                          segment_size_of(one.get("start_wal", ""), one.get("start_lsn", "")))


def waiting_segment(one, newest_archived):
    """The stop segment of set one when no source holds it yet, else None.

    newest_archived: each source's newest segment (pg_wal_fetch.py --check,
    newest_in_check). A set taken on an idle primary ends in the primary's
    current segment, archived only at the next WAL switch (archive_timeout):
    until then no restore of it can become consistent. Empty or None (no
    source listed) tells nothing: None. A later timeline's segment at or
    after it counts as holding it.
    """
    segment = stop_segment(one) if one.complete else None
    if segment is None or not newest_archived:
        return None
    size = segment_size_of(one.get("start_wal", ""), one.get("start_lsn", ""))
    timeline, number = segment_position(segment, size)
    for name in newest_archived:
        other = segment_position(name, size)
        if other[0] >= timeline and other[1] >= number:
            return None
    return segment


def newest_in_check(output):
    """The 'newest WAL file NAME' of each source in pg_wal_fetch.py --check's output."""
    return re.findall(r"newest WAL file ([0-9A-F]{24})\b", output)


def btrfs_snapshot_dir(subvolume):
    """PARENT/.pgzfs for SUBVOLUME = PARENT/NAME: beside the subvolume, not in it.

    Not inside: a nested subvolume is left out of a snapshot anyway and would
    clutter PGDATA's subvolume; and a rollback can replace the subvolume (rename
    it away, put a writable snapshot in its place) without touching the sets.
    """
    return os.path.join(os.path.dirname(subvolume), BTRFS_SNAPSHOT_DIR)


def btrfs_snapshot_path(snapshot):
    """The path of snapshot id SUBVOLUME@SET: PARENT/.pgzfs/NAME@SET."""
    subvolume, _, name = snapshot.rpartition("@")
    return os.path.join(btrfs_snapshot_dir(subvolume), "%s@%s" % (os.path.basename(subvolume), name))


def btrfs_subvolume_problem(subvolume):
    """Why SUBVOLUME cannot be a btrfs dataset name (config), or None."""
    if not subvolume.startswith("/") or os.path.normpath(subvolume) != subvolume or subvolume == "/":
        return "%r is not an absolute, normalised subvolume path" % subvolume
    if "@" in os.path.basename(subvolume):
        return "%r: a subvolume name must not contain @ (it separates NAME@SET)" % subvolume
    return None


def metadata_text(properties):
    """The JSON of one btrfs snapshot's metadata: the pgzfs:* keys without the prefix."""
    return json.dumps(dict((key, str(properties[key])) for key in PROPERTY_KEYS if key in properties),
                      indent=1, sort_keys=True) + "\n"


def parse_metadata(text):
    """{key: value} of a btrfs snapshot's JSON; ValueError unless an object of strings with `set`."""
    try:
        found = json.loads(text)
    except ValueError as error:
        raise ValueError("not JSON: %s" % error)
    if not isinstance(found, dict) or not isinstance(found.get("set"), str) or not found["set"]:
        raise ValueError("not a JSON object with a set name")
    result = {}
    for key in PROPERTY_KEYS:
        if key in found:
            if not isinstance(found[key], str):
                raise ValueError("%s is not a string" % key)
            result[key] = found[key]
    return result


def parse_mounts(text):
    """/proc/self/mounts as [(source, mountpoint, fstype)] in table order, octal
    escapes (\\040 for a space) decoded."""
    def unescape(field):
        return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append((unescape(fields[0]), unescape(fields[1]), fields[2]))
    return mounts


def read_mounts():
    """This process's mount table (parse_mounts); [] when it cannot be read."""
    try:
        with open("/proc/self/mounts") as handle:
            return parse_mounts(handle.read())
    except (OSError, IOError):
        return []


def mount_of(path, mounts):
    """(source, mountpoint, fstype) of the mount holding absolute path, or None:
    the longest mountpoint, the last mounted of equals (parse_mounts' list)."""
    path = os.path.normpath(path)
    best = None
    for source, mountpoint, fstype in mounts:
        root = mountpoint.rstrip("/") or "/"
        if path == root or path.startswith(root if root == "/" else root + "/"):
            if best is None or len(mountpoint) >= len(best[1]):
                best = (source, mountpoint, fstype)
    return best


def zfs_mountpoints(datasets, mounts):
    """{dataset: where it is mounted} from the mount table, for the datasets that are.

    Not the mountpoint property: a `legacy` dataset is mounted by fstab, and a
    dataset that is not mounted leaves its mountpoint a plain directory of the
    file system below, whose files its snapshot would not hold. A dataset
    mounted more than once (bind mounts): its first mount.
    """
    result = {}
    for source, mountpoint, fstype in mounts:
        if source in datasets and fstype in ZFS_FSTYPES and source not in result:
            result[source] = mountpoint
    return result


def program_major(text):
    """'15' or '9.6' from a program's --version line ('pg_ctl (PostgreSQL) 15.4'), or None."""
    found = re.search(r"\(PostgreSQL\) (\d+)(?:\.(\d+))?", text)
    if not found:
        return None
    return found.group(1) if int(found.group(1)) >= 10 else "%s.%s" % (found.group(1), found.group(2) or "0")


def find_program(name, bindir, major=None):
    """The path of PostgreSQL's program `name` ('15', '9.6' for major: that version's).

    [postgres] bindir when set (nothing else); else for a major version its
    package directories (/usr/pgsql-M/bin, /usr/lib/postgresql/M/bin), then
    PATH's when its --version says that major; without one, PATH's, then the
    newest installed package's. Failure (exit code 2) when there is none.
    """
    if bindir:
        path = os.path.join(bindir, name)
        if not os.access(path, os.X_OK):
            raise Failure("%s not found in [postgres] bindir %s" % (name, bindir), 2)
        return path
    places = []
    if major:
        places += ["/usr/pgsql-%s/bin" % major, "/usr/lib/postgresql/%s/bin" % major]
    on_path = shutil.which(name)
    if on_path and not major:
        return on_path
    if on_path and program_major(run([on_path, "--version"], timeout=30, check=False)[1]) == major:
        places.append(os.path.dirname(on_path))
    if not major:
        installed = glob.glob("/usr/pgsql-*/bin") + glob.glob("/usr/lib/postgresql/*/bin")
        places += sorted(installed, reverse=True,
                         key=lambda path: [int(n) for n in re.findall(r"[0-9]+", path)])
    for directory in places:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    raise Failure("%s%s not found: set [postgres] bindir"
                  % (name, " of PostgreSQL %s" % major if major else ""), 2)

# ---------------------------------------------------------------------------
# End of the snapshot-set format block.
# ---------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="config file (default: $PG_ZFS_CONFIG or %s)" % DEFAULT_CONFIG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version="%(prog)s " + VERSION)
    parser.add_argument("--wait", action="store_true", help="wait for the lock held by another run")
    parser.add_argument("--now", help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    snapshot = commands.add_parser("snapshot", help="take one snapshot set (then prune)")
    snapshot.add_argument("--label", default="", help="text added to the backup label")
    snapshot.add_argument("--no-prune", action="store_true",
                          help="do not prune afterwards (here, nor the replicas with --replicate)")
    snapshot.add_argument("--replicate", action="store_true",
                          help="then send the sets to every [replica NAME] (replicate)")
    listing = commands.add_parser("list", help="list the snapshot sets")
    listing.add_argument("--json", action="store_true", help="JSON with every property")
    listing.add_argument("--replica", metavar="NAME", help="the sets here and on [replica NAME]")
    prune = commands.add_parser("prune", help="destroy sets the retention policy lets go")
    prune.add_argument("--dry-run", action="store_true", help="only print what would go")
    check = commands.add_parser("check", help="Nagios check of the newest set's age")
    check.add_argument("--replica", metavar="NAME", help="of the newest set complete on [replica NAME]")
    check.add_argument("--json", action="store_true",
                       help="one JSON object (status, exit_code, message, perfdata) instead of the Nagios line")
    oldest = commands.add_parser("oldest-wal", help="print the first WAL file the oldest set needs")
    oldest.add_argument("--commands", action="store_true",
                        help="print the pg_archivecleanup lines for each archive host instead")
    oldest.add_argument("--apply", action="store_true",
                        help="remove the archived WAL before it on each [source NAME] (its cleanup_identity "
                             "key, pg_wal_serve --cleanup)")
    oldest.add_argument("--dry-run", action="store_true", help="with --apply: only list what would go")
    metrics = commands.add_parser("metrics", help="Prometheus metrics of the sets, the pool and the replicas")
    metrics.add_argument("--textfile", metavar="DIR",
                         help="write DIR/pg_zfs.prom atomically (node_exporter's textfile collector)")
    metrics.add_argument("--no-replicas", action="store_true", help="do not list the [replica NAME]s (no ssh)")
    replicate = commands.add_parser("replicate", help="send the sets a replica lacks, prune it")
    replicate.add_argument("--replica", metavar="NAME", help="only [replica NAME] (default: every one)")
    replicate.add_argument("--dry-run", action="store_true", help="print what would be sent, with sizes")
    replicate.add_argument("--no-prune", action="store_true", help="do not prune the replica afterwards")
    commands.add_parser("receiver-script", help="print pg_zfs_receive, the replica's forced command")
    keys = commands.add_parser("authorized-keys", help="print the key's authorized_keys line for each replica")
    keys.add_argument("--replica", metavar="NAME", help="only [replica NAME]")
    keys.add_argument("--receiver-path", metavar="PATH", default=RECEIVER_PATH,
                      help="where pg_zfs_receive is on the replica (default %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "oldest-wal" and args.commands and args.apply:
        parser.error("oldest-wal: --commands or --apply, not both")
    if args.command == "oldest-wal" and args.dry_run and not args.apply:
        parser.error("oldest-wal: --dry-run goes with --apply")
    if args.now:
        try:
            parse_utc(args.now)
        except ValueError as error:
            parser.error("--now: %s" % error)
    if getattr(args, "label", "") and not LABEL_TEXT_RE.match(args.label):
        parser.error("--label: printable ASCII, at most 200 characters")
    return args


# ---------------------------------------------------------------------------
# Adapters: zfs, psql, pg_controldata, the lock. Each in one place.
# ---------------------------------------------------------------------------

class SnapshotError(Failure):
    """A snapshot call failed; `made` lists the snapshots it did make."""

    def __init__(self, message, made):
        Failure.__init__(self, message, 1)
        self.made = made


class ZfsBackend(object):
    """The zfs commands pg_zfs_snap needs. BtrfsBackend offers the same methods.

    A snapshot is named DATASET@SET in both; `unreadable` lists the snapshots
    the last list_snapshots found without readable metadata (never on ZFS: a
    snapshot without pgzfs:set is simply not ours).
    """

    def __init__(self):
        self.zfs = shutil.which("zfs") or next((p for p in ZFS_CANDIDATES if os.access(p, os.X_OK)), "zfs")
        self.unreadable = []
        self.exact_sizes = True

    def _run(self, *args, **kwargs):
        return run([self.zfs] + list(args), timeout=ZFS_TIMEOUT, **kwargs)

    def mountpoints(self, datasets):
        """{dataset: where it is mounted} of the mounted ones; a Failure(2) if one does not exist."""
        code, _, err = self._run("list", "-H", "-o", "name", *datasets, check=False)
        if code != 0:
            raise Failure("zfs list %s: %s" % (" ".join(datasets), err.strip()), 2)
        return zfs_mountpoints(datasets, read_mounts())

    def snapshot(self, datasets, name, properties):
        """Snapshot every dataset as DATASET@name with properties; return them.

        One atomic call where zfs takes several names and they are all in one
        pool (OpenZFS refuses several pools in one call); else one call per
        dataset in the order given. On failure raises SnapshotError listing those made.
        """
        options = []
        for key in sorted(properties):
            options += ["-o", "%s%s=%s" % (P, key, properties[key])]
        targets = ["%s@%s" % (dataset, name) for dataset in datasets]
        made = []
        with signals_deferred():
            one_by_one = True
            if len(set(dataset.split("/")[0] for dataset in datasets)) > 1:
                log.debug("datasets in several pools: one by one, %s last", datasets[-1])
            elif len(targets) > 1:
                try:
                    code, _, err = self._run("snapshot", *(options + targets), check=False)
                except Failure as failure:      # a timeout: zfs was killed
                    raise self._failed(str(failure), made, targets, properties)
                if code == 0:
                    made, one_by_one = targets, False
                elif not (code == 2 and err.strip().splitlines()[:1] == [ZFS_ONE_NAME_ONLY]):
                    raise self._failed("zfs snapshot %s: %s" % (" ".join(targets), err.strip()), made,
                                       targets if code < 0 else [], properties)
                else:
                    log.debug("zfs takes one snapshot per call here: one by one, %s last", datasets[-1])
            for target in targets if one_by_one else []:
                if pending_signal():
                    break
                try:
                    code, _, err = self._run("snapshot", *(options + [target]), check=False)
                except Failure as failure:      # a timeout: zfs was killed
                    raise self._failed(str(failure), made, [target], properties)
                if code != 0:
                    raise self._failed("zfs snapshot %s: %s" % (target, err.strip()), made,
                                       [target] if code < 0 else [], properties)
                made.append(target)
        if pending_signal():
            raise SnapshotError("stopped by signal %d" % pending_signal(), made)
        return made

    def _failed(self, message, made, killed, properties):
        """The SnapshotError for a zfs snapshot call that failed. A zfs killed (its
        timeout, or Ctrl-C at a terminal, which reaches zfs too) after its ioctl has
        made the snapshot all the same: each of those `killed` targets that exists
        with this run's start_time counts as made and goes with the rest of the set
        (a snapshot of that name made by anyone else is never touched)."""
        made = list(made)
        for target in killed:
            try:
                code, out, _ = self._run("get", "-H", "-o", "value", P + "start_time", target, check=False)
            except Failure:
                code, out = 1, ""
            if code == 0 and out.strip() == properties.get("start_time") and target not in made:
                made.append(target)
        return SnapshotError(stopped_or(message), made)

    def set_properties(self, snapshots, properties, order):
        """Set properties on every snapshot; the last key of `order` only after the others.

        One property per call because old zfs takes one; values must not be empty.
        The calls before the last run at once: ZFS can commit them in one
        transaction group instead of waiting for one each.
        """
        failures = []

        def set_one(key):
            try:
                self._run("set", "%s%s=%s" % (P, key, properties[key]), *snapshots)
            except Failure as failure:
                failures.append(failure)
        workers = [threading.Thread(target=set_one, args=(key,)) for key in order[:-1]]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if failures:
            raise failures[0]
        set_one(order[-1])
        if failures:
            raise failures[0]

    def list_snapshots(self, datasets, usage=True):
        """Rows (dataset, snapshot, used bytes, {key: value}) under the pools of datasets.

        `used` comes with the listing on ZFS, so usage=False saves nothing here.
        """
        pools = sorted(set(dataset.split("/")[0] for dataset in datasets))
        columns = ["name", "used"] + [P + key for key in PROPERTY_KEYS]
        argv = ["list", "-H", "-t", "snapshot", "-o", ",".join(columns), "-r"] + pools
        # Exact bytes with -p (OpenZFS); zfs-fuse has no `zfs list -p`: rounded sizes there.
        if self.exact_sizes:
            code, out, _ = self._run("list", "-p", *argv[1:], check=False)
            self.exact_sizes = code == 0
        if not self.exact_sizes:
            _, out, _ = self._run(*argv)
        rows = []
        for line in out.splitlines():
            fields = line.split("\t")
            if len(fields) != len(columns) or "@" not in fields[0]:
                continue
            dataset, _, snapshot = fields[0].partition("@")
            properties = dict((key, value) for key, value in zip(PROPERTY_KEYS, fields[2:])
                              if value != "-")
            rows.append((dataset, snapshot, parse_size(fields[1]), properties))
        return rows

    def clones(self):
        """{origin snapshot: [clones]} for every file system that is a clone."""
        _, out, _ = self._run("list", "-H", "-o", "name,origin", "-t", "filesystem")
        result = {}
        for line in out.splitlines():
            name, _, origin = line.partition("\t")
            if origin and origin != "-":
                result.setdefault(origin, []).append(name)
        return result

    def destroy(self, snapshot):
        """Destroy one snapshot, retrying briefly while it is busy."""
        for attempt in range(BUSY_RETRIES):
            code, _, err = self._run("destroy", snapshot, check=False)
            if code == 0:
                return
            if "busy" not in err or attempt == BUSY_RETRIES - 1:
                raise Failure("zfs destroy %s: %s" % (snapshot, err.strip()), 1)
            time.sleep(0.5)

    # replicate: what a snapshot's copy must match, how it is sent, what it says.

    def guids(self, snapshots):
        """{snapshot: GUID}: a copy on a replica is this snapshot's when it has that GUID."""
        return zfs_guids(self.zfs, snapshots)

    def send_argv(self, snapshot, base=None, token=None):
        return send_argv(self.zfs, snapshot, base, token)

    def snapshot_properties(self, snapshots, keys):
        """{snapshot: {key: value}} of pgzfs:KEY, unset ones left out."""
        return zfs_properties(self.zfs, snapshots, keys)


class BtrfsBackend(object):
    """The same methods as ZfsBackend, on btrfs subvolumes (DEVELOPERS.md, btrfs layout).

    Datasets are subvolume paths; snapshot SUBVOLUME@SET is the read-only
    snapshot PARENT/.pgzfs/NAME@SET with its metadata in NAME@SET.json beside
    it. btrfs cannot snapshot several subvolumes at once: always one by one.
    """

    def __init__(self, subvolumes):
        self.btrfs = shutil.which("btrfs") or next(
            (p for p in BTRFS_CANDIDATES if os.access(p, os.X_OK)), "btrfs")
        self.subvolumes = subvolumes
        self.unreadable = []

    def _run(self, *args, **kwargs):
        return run([self.btrfs] + list(args), timeout=BTRFS_TIMEOUT, **kwargs)

    def mountpoints(self, subvolumes):
        """{subvolume: its real path}; a Failure(2) unless each is a btrfs subvolume
        whose parent directory, on the same btrfs, can hold the snapshot directory."""
        mounts = read_mounts()
        result = {}
        for subvolume in subvolumes:
            if not is_subvolume(subvolume):
                raise Failure("%s: subvolume does not exist or is not a btrfs subvolume" % subvolume, 2)
            problem = btrfs_placement_problem(os.path.realpath(subvolume), mounts)
            if problem:
                raise Failure(problem, 2)
            result[subvolume] = os.path.realpath(subvolume)
        return result

    def snapshot(self, subvolumes, name, properties):
        """Snapshot each subvolume read-only, in the order given, each followed by its
        metadata file; return the snapshot ids. On failure raises SnapshotError
        listing those made (a snapshot whose metadata failed counts as made)."""
        made = []
        with signals_deferred():
            for subvolume in subvolumes:
                if pending_signal():
                    break
                target = "%s@%s" % (subvolume, name)
                path = btrfs_snapshot_path(target)
                called = False
                try:
                    make_private_dir(os.path.dirname(path))
                    for existing in (path, path + BTRFS_METADATA_SUFFIX):
                        # btrfs would put the snapshot INSIDE an existing directory.
                        if os.path.lexists(existing):
                            raise Failure("%s already exists" % existing, 1)
                    called = True
                    code, _, err = self._run("subvolume", "snapshot", "-r", subvolume, path, check=False)
                    if code != 0:
                        raise Failure("btrfs subvolume snapshot -r %s %s: %s"
                                      % (subvolume, path, err.strip()), 1)
                    made.append(target)
                    write_atomically(path + BTRFS_METADATA_SUFFIX, metadata_text(properties))
                except Failure as failure:
                    if called and target not in made and is_subvolume(path):
                        made.append(target)     # btrfs killed (timeout, Ctrl-C) after it made the snapshot
                    raise SnapshotError(stopped_or(str(failure)), made)
        if pending_signal():
            raise SnapshotError("stopped by signal %d" % pending_signal(), made)
        return made

    def _metadata(self, snapshot):
        """(path, {key: value}) of a snapshot's metadata file; a Failure when it cannot be read."""
        path = btrfs_snapshot_path(snapshot) + BTRFS_METADATA_SUFFIX
        try:
            with open(path) as handle:
                return path, parse_metadata(handle.read())
        except (OSError, IOError, ValueError) as error:
            raise Failure("metadata %s: %s" % (path, getattr(error, "strerror", None) or error), 1)

    def set_properties(self, snapshots, properties, order):
        """Add properties to each snapshot's metadata file, all keys in one atomic
        rewrite per file (so `stop_lsn`, in `order` last, never comes before the others)."""
        for snapshot in snapshots:
            path, current = self._metadata(snapshot)
            current.update((key, properties[key]) for key in order)
            write_atomically(path, metadata_text(current))

    def list_snapshots(self, subvolumes, usage=False):
        """Rows (subvolume, set name, exclusive bytes, {key: value}) of the subvolumes'
        snapshots. A snapshot without readable metadata gets {} (so it is no set)
        and goes into self.unreadable. usage: ask `btrfs filesystem du` for the
        bytes only that snapshot holds (it reads every extent: list only)."""
        found = []
        self.unreadable = []
        for subvolume in subvolumes:
            directory = btrfs_snapshot_dir(subvolume)
            head = os.path.basename(subvolume) + "@"
            for entry in sorted(list_dir(directory)):
                if not entry.startswith(head) or entry.endswith(BTRFS_METADATA_SUFFIX):
                    continue
                path = os.path.join(directory, entry)
                if not is_subvolume(path):
                    continue
                snapshot = subvolume + "@" + entry[len(head):]
                try:
                    with open(path + BTRFS_METADATA_SUFFIX) as handle:
                        properties = parse_metadata(handle.read())
                except (OSError, IOError, ValueError) as error:
                    self.unreadable.append((snapshot, getattr(error, "strerror", None) or str(error)))
                    properties = {}
                found.append((subvolume, entry[len(head):], path, properties))
        used = {}
        if usage and found:
            _, out, _ = self._run("filesystem", "du", "-s", "--raw", *[path for _, _, path, _ in found])
            used = parse_du_exclusive(out)
        return [(subvolume, name, used.get(path, 0), properties)
                for subvolume, name, path, properties in found]

    def clones(self):
        """{snapshot id: [clone paths]} from pg_zfs_restore's markers whose clone exists.

        A marker PARENT/.pgzfs/clones/CLONE.json names the snapshot it was made
        from; one whose clone is gone is stale: ignored with a warning.
        """
        result = {}
        for directory in sorted(set(btrfs_snapshot_dir(s) for s in self.subvolumes)):
            markers = os.path.join(directory, BTRFS_CLONE_DIR)
            for entry in sorted(list_dir(markers)):
                if not entry.endswith(BTRFS_METADATA_SUFFIX) or entry.startswith("."):
                    continue
                path = os.path.join(markers, entry)
                try:
                    with open(path) as handle:
                        marker = json.load(handle)
                    snapshot, clone = marker["snapshot"], marker["path"]
                except (OSError, IOError, ValueError, KeyError, TypeError) as error:
                    log.warning("clone marker %s unreadable (%s): ignored", path, error)
                    continue
                if is_subvolume(clone):
                    result.setdefault(snapshot, []).append(clone)
                else:
                    log.warning("clone marker %s: its clone %s is gone: ignored", path, clone)
        return result

    def destroy(self, snapshot):
        """Delete the read-only snapshot, then its metadata file."""
        path = btrfs_snapshot_path(snapshot)
        if os.path.lexists(path):
            code, _, err = self._run("subvolume", "delete", path, check=False)
            if code != 0:
                raise Failure("btrfs subvolume delete %s: %s" % (path, err.strip()), 1)
        try:
            os.unlink(path + BTRFS_METADATA_SUFFIX)
        except OSError as error:
            if error.errno != errno.ENOENT:
                raise Failure("%s: %s" % (path + BTRFS_METADATA_SUFFIX, error.strerror), 1)
        fsync_directory(os.path.dirname(path))

    # replicate: a copy is this snapshot's when its Received UUID is the UUID the
    # stream carries (sent_uuid) and it is read-only (btrfs receive finished).

    def guids(self, snapshots):
        """{snapshot: the UUID btrfs send gives its stream} (btrfs subvolume show)."""
        found = {}
        for snapshot in snapshots:
            path = btrfs_snapshot_path(snapshot)
            code, out, err = self._run("subvolume", "show", path, check=False)
            found[snapshot] = sent_uuid(out) if code == 0 else None
            if found[snapshot] is None:
                raise Failure("btrfs subvolume show %s: %s" % (path, (err.strip().splitlines() or [
                    "no UUID in its output"])[-1]), 1)
        return found

    def send_argv(self, snapshot, base=None, token=None):
        return btrfs_send_argv(self.btrfs, snapshot, base)

    def snapshot_properties(self, snapshots, keys):
        """{snapshot: {key: value}} of the keys in each snapshot's NAME@SET.json."""
        found = {}
        for snapshot in snapshots:
            metadata = self._metadata(snapshot)[1]
            found[snapshot] = dict((key, metadata[key]) for key in keys if key in metadata)
        return found


def is_subvolume(path):
    """True when path is the root directory of a btrfs subvolume (inode 256)."""
    try:
        return os.path.isdir(path) and not os.path.islink(path) and \
            os.lstat(path).st_ino == BTRFS_SUBVOLUME_INODE
    except OSError:
        return False


def list_dir(path):
    """Entries of a directory; [] when it does not exist."""
    try:
        return os.listdir(path)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return []
        raise Failure("%s: %s" % (path, error.strerror), 1)


def make_private_dir(path):
    """Create path with mode 0700 unless it exists (the clone markers' directory)."""
    try:
        os.mkdir(path, 0o700)
    except OSError as error:
        if error.errno == errno.EEXIST and os.path.isdir(path):
            return
        raise Failure("cannot create %s: %s" % (path, error.strerror), 1)
    fsync_directory(os.path.dirname(path))


def fsync_directory(path):
    """Make a rename or unlink in directory path durable."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path, text):
    """Temp file .NAME.PID.tmp in the same directory, fsync, rename, fsync the directory."""
    directory = os.path.dirname(path)
    temp = os.path.join(directory, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    try:
        with open(temp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temp, path)
    except (OSError, IOError) as error:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise Failure("cannot write %s: %s" % (path, error.strerror or error), 1)
    fsync_directory(directory)


def make_backend(config):
    """The snapshot backend named by [snapshot] backend."""
    name = config.choice("snapshot", "backend", ("zfs", "btrfs"), "zfs")
    if name == "btrfs":
        subvolumes = config.list("snapshot", "datasets")
        for subvolume in subvolumes:
            problem = btrfs_subvolume_problem(subvolume)
            if problem:
                raise config.error("snapshot", "datasets", problem)
        return BtrfsBackend(subvolumes)
    return ZfsBackend()


def demote_to(user):
    """(preexec_fn, env) that run a child as `user` when we are root, else as us."""
    env = dict(os.environ, LC_ALL="C", PGAPPNAME=PROG, PGCONNECT_TIMEOUT="10")
    if os.geteuid() != 0 or user in ("", "root"):
        return None, env
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise Failure("[postgres] user %s: no such user" % user, 2)
    env.update(HOME=entry.pw_dir, USER=user, LOGNAME=user)

    def demote():
        os.initgroups(user, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    return demote, env


class PsqlSession(object):
    """ONE psql process on pipes; query() sends a statement and reads its answer.

    After each statement we send `\\echo TAG`: the answer ends at the line TAG.
    Reads wait with select() against a deadline, so nothing hangs. With
    ON_ERROR_STOP psql exits at the first error: that is a Failure carrying its
    last stderr line. Closing stdin ends the session, and with it backup mode.
    """

    def __init__(self, psql, host, port, dbname, user):
        preexec, env = demote_to(user)
        argv = [psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", host, "-p", str(port), "-d", dbname]
        log.debug("psql session: %s", " ".join(argv))
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env, preexec_fn=preexec,
                                         close_fds=True, cwd="/")
        except OSError as error:
            raise Failure("cannot run %s: %s" % (psql, error.strerror or error), 1)
        self.out = b""
        self.err = b""

    def last_error(self):
        lines = self.err.decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else "psql exited with code %s" % self.proc.poll()

    def query(self, sql, timeout=PSQL_TIMEOUT):
        """The answer lines of one statement; Failure if psql fails or is silent."""
        tag = "PGZFS_END_" + binascii.hexlify(os.urandom(8)).decode("ascii")
        try:
            self.proc.stdin.write(("%s;\n\\echo %s\n" % (sql.rstrip().rstrip(";"), tag)).encode("utf-8"))
            self.proc.stdin.flush()
        except (IOError, OSError):
            self._drain(time.time() + 2)
            raise Failure("psql: %s" % self.last_error(), 1)
        deadline = time.time() + timeout
        marker = ("\n%s\n" % tag).encode("ascii")
        while True:
            text = b"\n" + self.out
            if marker in text:
                answer, _, rest = text.partition(marker)
                self.out = rest
                return answer.decode("utf-8").splitlines()[1:]
            if not self._read(deadline):
                if self.proc.poll() is None and time.time() >= deadline:
                    raise Failure("psql: no answer within %d s to %s" % (timeout, sql.split("(")[0]), 1)
                self._drain(time.time() + 2)
                raise Failure("psql: %s" % self.last_error(), 1)

    def _read(self, deadline):
        """Read what is there on stdout/stderr; False at EOF of stdout or deadline."""
        streams = [self.proc.stdout, self.proc.stderr]
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                return False
            ready, _, _ = select.select(streams, [], [], remaining)
            got_out = False
            for stream in ready:
                chunk = os.read(stream.fileno(), 65536)
                if stream is self.proc.stdout:
                    if not chunk:
                        return False
                    self.out += chunk
                    got_out = True
                else:
                    if not chunk:
                        streams.remove(stream)
                    self.err += chunk
            if got_out:
                return True

    def _drain(self, deadline):
        """Collect stderr of a psql that is exiting, for its error message."""
        while self.proc.poll() is None and time.time() < deadline:
            if not self._read(deadline):
                break
        try:
            while True:
                ready, _, _ = select.select([self.proc.stderr], [], [], 0)
                chunk = os.read(self.proc.stderr.fileno(), 65536) if ready else b""
                if not chunk:
                    break
                self.err += chunk
        except (OSError, ValueError):
            pass

    def close(self):
        """End the session (PostgreSQL aborts a backup still in progress)."""
        try:
            self.proc.stdin.close()
        except (IOError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def read_controldata(pg_controldata, pgdata, user):
    """pg_controldata's fields for PGDATA, in the C locale."""
    preexec, env = demote_to(user)
    try:
        proc = subprocess.Popen([pg_controldata, "-D", pgdata], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                preexec_fn=preexec, universal_newlines=True, cwd="/")
        out, err = proc.communicate(timeout=60)
    except OSError as error:
        raise Failure("cannot run %s: %s" % (pg_controldata, error.strerror or error), 1)
    if proc.returncode != 0:
        raise Failure("pg_controldata -D %s: %s" % (pgdata, err.strip()), 1)
    return parse_controldata(out)


class Lock(object):
    """flock() on lock_file: one pg_zfs_snap at a time."""

    def __init__(self, path):
        self.path = path
        self.handle = None

    def acquire(self, wait):
        """True when held; False if another run holds it and wait is false."""
        try:
            self.handle = open(self.path, "a")
        except (OSError, IOError) as error:
            raise Failure("lock file %s: %s" % (self.path, error.strerror or error), 1)
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except (OSError, IOError) as error:
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                self.handle.close()
                self.handle = None
                return False
            raise
        return True

    def release(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None


class Clock(object):
    """Wall clock in UTC epoch seconds, shifted for tests by --now."""

    def __init__(self, now_text=None):
        self.offset = parse_utc(now_text) - time.time() if now_text else 0.0

    def now(self):
        return time.time() + self.offset


# -- a replica: its config, the ssh link, zfs send -------------------------------

SSH_CONNECT_TIMEOUT = 10
REPLICA_TIMEOUT = 300        # one listing, set or destroy on the replica
REPLICA_SESSIONS = 4         # sessions at once on the connection (sshd's MaxSessions is 10)
SEND_CHUNK = 1 << 20
SEND_PROGRESS_INTERVAL = 3      # seconds between two progress lines of a send (on a terminal only)


class Replica(object):
    """One [replica NAME] section: where the sets go and what the replica keeps."""

    def __init__(self, config, name):
        import shlex
        replica_section = "replica " + name
        if not config.has_section(replica_section):
            raise Failure("%s: no [replica %s] section" % (config.path, name), 2)
        self.name = name
        self.host = config.str(replica_section, "host")
        if not self.host or self.host.startswith("-") or any(c.isspace() for c in self.host):
            raise config.error(replica_section, "host", "%r is not a host name or address" % self.host)
        self.port = config.int(replica_section, "port", 22, minimum=1)
        self.user = config.str(replica_section, "user", "root")
        if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", self.user):
            raise config.error(replica_section, "user", "%r is not a user name" % self.user)
        self.identity_file = config.str(replica_section, "identity_file", "")
        self.ssh_options_text = config.str(replica_section, "ssh_options", "")
        try:
            self.ssh_options = shlex.split(self.ssh_options_text)
        except ValueError as error:
            raise config.error(replica_section, "ssh_options", str(error))
        self.from_patterns = config.str(replica_section, "from", "")
        # btrfs: the copies are received into TARGET/.pgzfs, a directory on a btrfs there.
        self.btrfs = config.choice("snapshot", "backend", ("zfs", "btrfs"), "zfs") == "btrfs"
        self.target = config.str(replica_section, "target")
        problem = btrfs_path_problem(self.target) if self.btrfs else dataset_name_problem(self.target)
        if problem:
            raise config.error(replica_section, "target", problem)
        if self.btrfs and self.user != "root":
            raise config.error(replica_section, "user", "btrfs receive needs root there (CAP_SYS_ADMIN): "
                               "user = root, its key restricted to pg_zfs_receive")
        self.policy = Policy(*[config.int(replica_section, "keep_" + rule, RETENTION_DEFAULTS[rule])
                               for rule in RETENTION_RULES])
        try:
            self.bwlimit = parse_rate(config.str(replica_section, "bwlimit", ""))
        except ValueError as error:
            raise config.error(replica_section, "bwlimit", str(error))
        self.warn_age = config.duration(replica_section, "warn_age", 93600)
        self.crit_age = config.duration(replica_section, "crit_age", 180000)

    def __str__(self):
        return "[replica %s] %s@%s:%s" % (self.name, self.user, self.host, self.target)


def replica_names(config):
    """The NAMEs of the [replica NAME] sections, in file order."""
    return [section.split()[1] for section in config.parser.sections() if schema_section(section) == "replica"]


class ReplicaLink(object):
    """ssh to one replica: one master connection (ours: it ends with the run), each
    command a session on it. Commands are zfs command lines (replica_* below):
    pg_zfs_receive runs them there, and so would a login shell. On a btrfs
    replica they are pg_zfs_receive's own verbs (pgzfs-list, btrfs receive,
    pgzfs-delete, pgzfs-write: RECEIVER_SCRIPT)."""

    def __init__(self, replica):
        self.replica = replica
        self.control_dir = None
        self.master = None

    def argv(self, command=None, master=False):
        replica = self.replica
        argv = ["ssh", "-p", str(replica.port), "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=%d" % SSH_CONNECT_TIMEOUT,
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if replica.identity_file:
            argv += ["-i", replica.identity_file, "-o", "IdentitiesOnly=yes"]
        argv += replica.ssh_options
        control = os.path.join(self.control_dir, "control") if self.control_dir else None
        if master:
            argv += ["-M", "-N", "-S", control, "-o", "ControlPersist=no"]
        elif control:
            argv += ["-S", control, "-o", "ControlMaster=no"]
        argv += ["-l", replica.user, "--", replica.host]
        return argv + ([command] if command else [])

    def open(self):
        """Start the master connection; a Failure when the replica cannot be reached."""
        import tempfile
        self.control_dir = tempfile.mkdtemp(prefix="pg_zfs_snap-ssh-")
        control = os.path.join(self.control_dir, "control")
        errors = tempfile.TemporaryFile()
        log.debug("run: %s", " ".join(self.argv(master=True)))
        try:
            self.master = subprocess.Popen(self.argv(master=True), stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=errors, cwd="/")
        except OSError as error:
            raise Failure("cannot run ssh: %s" % (error.strerror or error), 1)
        deadline = time.time() + SSH_CONNECT_TIMEOUT + 30
        while not os.path.exists(control):
            if self.master.poll() is not None or time.time() > deadline:
                errors.seek(0)
                lines = errors.read().decode("utf-8", "replace").strip().splitlines()
                raise Failure("%s: cannot connect: %s" % (self.replica, lines[-1] if lines else "no answer"), 1)
            time.sleep(0.05)

    def close(self):
        """End the master connection and remove its directory."""
        if self.master is not None:
            if self.master.poll() is None:
                self.master.terminate()
                try:
                    self.master.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.master.kill()
                    self.master.wait()
            self.master = None
        if self.control_dir:
            shutil.rmtree(self.control_dir, ignore_errors=True)
            self.control_dir = None

    def run(self, command, check=True, input_text=None):
        """(exit code, stdout, stderr) of one command there (input_text: its stdin)."""
        code, out, err = run(self.argv(command), timeout=REPLICA_TIMEOUT, input_text=input_text, check=False)
        if check and code != 0:
            last = (err.strip().splitlines() or ["exit code %d" % code])[-1]
            raise Failure("%s: %s: %s" % (self.replica, command[:120], last), 1)
        return code, out, err

    def run_all(self, commands):
        """Run commands there, REPLICA_SESSIONS at a time (each a session on the one
        connection: ~0.1 s each on their own); a Failure with the first that failed,
        once all have ended."""
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(max_workers=REPLICA_SESSIONS) as pool:
            ran = [pool.submit(self.run, command) for command in commands]
        for future in ran:
            future.result()

    def listing(self):
        """(rows, {snapshot: guid}, [file systems]) below the target (parse_replica_listing;
        btrfs: parse_btrfs_listing, its UUIDs as the GUIDs, no file systems)."""
        if self.replica.btrfs:
            rows, guids, _ = self.btrfs_listing()
            return rows, guids, []
        columns = ",".join(["guid"] + [P + key for key in LIST_KEYS])
        _, out, _ = self.run("zfs get -rHp -o name,property,value %s %s" % (columns, self.replica.target))
        return parse_replica_listing(out, self.replica.target)

    def btrfs_listing(self):
        """btrfs: (rows, {snapshot: received UUID}, {snapshot: (received UUID, read-only)})
        of the copies in TARGET/.pgzfs (parse_btrfs_listing)."""
        _, out, _ = self.run("pgzfs-list %s" % self.replica.target)
        return parse_btrfs_listing(out, self.replica.target)

    def resume_tokens(self):
        """{dataset: token} of partial resumable receives there, or None where its zfs
        has none (zfs-fuse: no receive_resume_token, no recv -s; btrfs): then a
        cut receive is simply done again."""
        if self.replica.btrfs:
            return None
        code, out, _ = self.run("zfs get -rHp -o name,property,value receive_resume_token %s"
                                % self.replica.target, check=False)
        return parse_resume_tokens(out, self.replica.target) if code == 0 else None

    def destroy_command(self, snapshot):
        """The command that destroys a copy there (btrfs: its subvolume, then its .json)."""
        if self.replica.btrfs:
            return "pgzfs-delete %s" % btrfs_snapshot_path(snapshot)
        return "zfs destroy %s" % snapshot

    def receive(self, send_argv, resumable, what=None):
        """Pipe `send_argv` (zfs send ...) into `zfs recv -u -d TARGET` there (btrfs:
        btrfs send into `btrfs receive TARGET/.pgzfs`), at most bwlimit bytes a
        second; (bytes, seconds). A Failure with the last line of whichever side
        failed; both are ended on any way out. On a terminal, a progress line
        every SEND_PROGRESS_INTERVAL seconds (of `what`, with the share and time
        left where zfs send -nvP estimates the stream); quiet otherwise (cron)."""
        import tempfile
        if self.replica.btrfs:
            command = "btrfs receive %s" % os.path.join(self.replica.target, BTRFS_SNAPSHOT_DIR)
        else:
            command = "zfs recv %s-u -d %s" % ("-s " if resumable else "", self.replica.target)
        send_errors, recv_errors = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        started, sent, sender, receiver = time.time(), 0, None, None
        log.debug("run: %s | %s", " ".join(send_argv), " ".join(self.argv(command)))
        progress = what is not None and sys.stderr.isatty()
        total = send_estimate(send_argv) if progress and not self.replica.btrfs else None
        next_line = started + SEND_PROGRESS_INTERVAL
        try:
            sender = subprocess.Popen(send_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=send_errors, cwd="/")
            receiver = subprocess.Popen(self.argv(command), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=recv_errors, cwd="/")
            try:
                while True:
                    chunk = os.read(sender.stdout.fileno(), SEND_CHUNK)
                    if not chunk:
                        break
                    receiver.stdin.write(chunk)
                    sent += len(chunk)
                    ahead = self.replica.bwlimit and sent / float(self.replica.bwlimit) - (time.time() - started)
                    if ahead and ahead > 0:
                        time.sleep(ahead)
                    if progress and time.time() >= next_line:
                        log.info("%s", send_progress_line(what, sent, total, time.time() - started))
                        next_line += SEND_PROGRESS_INTERVAL
                receiver.stdin.close()
            except (IOError, OSError):          # the receiving side is gone: its stderr says why
                pass
            receiver.wait()
            killed = receiver.returncode != 0 and sender.poll() is None
            if killed:
                sender.kill()
            sender.wait()
        except OSError as error:
            raise Failure("cannot run %s: %s" % (send_argv[0], error.strerror or error), 1)
        finally:
            for process in (sender, receiver):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
        sides = [(sender.returncode, send_errors, " ".join(send_argv[1:])),
                 (receiver.returncode, recv_errors, "%s on %s" % (" ".join(command.split()[:2]),
                                                                   self.replica.host))]
        for code, errors, what in sides[1:] + sides[:1] if killed else sides:
            if code != 0:
                errors.seek(0)
                raise Failure("%s: %s" % (what, failure_line(errors.read().decode("utf-8", "replace"), code)), 1)
        return sent, time.time() - started


def send_argv(zfs, snapshot, base=None, token=None):
    """zfs send of snapshot, incrementally from base (-i), or resuming a token (-t)."""
    if token:
        return [zfs, "send", "-t", token]
    return [zfs, "send"] + (["-i", base] if base else []) + [snapshot]


def btrfs_send_argv(btrfs, snapshot, base=None):
    """btrfs send of snapshot id SUBVOLUME@SET, incrementally from base (-p): the
    read-only PARENT/.pgzfs/NAME@SET paths."""
    return [btrfs, "send", "-q"] + (["-p", btrfs_snapshot_path(base)] if base else []) + [
        btrfs_snapshot_path(snapshot)]


def zfs_guids(zfs, snapshots):
    """{snapshot: guid}, exact (zfs get -p: zfs-fuse's zfs list rounds it to 5.93E)."""
    if not snapshots:
        return {}
    _, out, _ = run([zfs, "get", "-Hp", "-o", "name,value", "guid"] + list(snapshots), timeout=ZFS_TIMEOUT)
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def zfs_properties(zfs, snapshots, keys):
    """{snapshot: {key: value}} of pgzfs:KEY on each snapshot, unset ones left out."""
    _, out, _ = run([zfs, "get", "-H", "-o", "name,property,value", ",".join(P + key for key in keys)]
                    + list(snapshots), timeout=ZFS_TIMEOUT)
    found = dict((snapshot, {}) for snapshot in snapshots)
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[1].startswith(P) and fields[2] != "-" and fields[0] in found:
            found[fields[0]][fields[1][len(P):]] = fields[2]
    return found


def send_estimate(argv):
    """The bytes `zfs send -nvP` expects the send argv to write; None where zfs
    cannot estimate (zfs-fuse) or fails."""
    try:
        code, out, err = run([argv[0], "send", "-nvP"] + argv[2:], timeout=ZFS_TIMEOUT, check=False)
    except Failure:
        return None
    return send_size_of(out + "\n" + err) if code == 0 else None


def stream_size(argv, estimate=True):
    """(bytes, how) a send would write: `zfs send -nvP` where zfs has it (estimate),
    else the stream itself counted here (zfs-fuse has no -n, btrfs send no
    estimate), nothing sent anywhere."""
    size = send_estimate(argv) if estimate else None
    if size is not None:
        return size, "zfs send -nvP"
    total = 0
    try:
        sender = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, cwd="/")
    except OSError as error:
        raise Failure("cannot run %s: %s" % (argv[0], error.strerror or error), 1)
    try:
        while True:
            chunk = os.read(sender.stdout.fileno(), SEND_CHUNK)
            if not chunk:
                break
            total += len(chunk)
    finally:
        if sender.poll() is None:
            sender.kill()
        sender.wait()
    if sender.returncode != 0:
        raise Failure("%s failed (exit code %d)" % (" ".join(argv), sender.returncode), 1)
    return total, "counted: this zfs has no send -n" if estimate else "counted: btrfs send has no estimate"


# ---------------------------------------------------------------------------
# The commands.
# ---------------------------------------------------------------------------

class Job(object):
    """What every command reads from the config, checked once."""

    def __init__(self, config, clock):
        self.config = config
        self.clock = clock
        self.datasets = config.list("snapshot", "datasets")
        if not self.datasets or len(set(self.datasets)) != len(self.datasets):
            raise config.error("snapshot", "datasets", "needs one or more distinct datasets")
        try:
            self.prefix = check_prefix(config.str("snapshot", "prefix", "pgzfs"))
        except ValueError as error:
            raise config.error("snapshot", "prefix", str(error))
        self.policy = Policy(*[config.int("snapshot", "keep_" + rule, RETENTION_DEFAULTS[rule])
                               for rule in RETENTION_RULES])
        self.lock_file = config.str("snapshot", "lock_file", "/run/pg_zfs_snap.lock")
        self.state_file = config.str("snapshot", "state_file", DEFAULT_STATE_FILE)
        self.warn_age = config.duration("snapshot", "warn_age", 93600)
        self.crit_age = config.duration("snapshot", "crit_age", 180000)
        self.wal_wait = config.duration("snapshot", "wal_wait", DEFAULT_WAL_WAIT)
        self.user = config.str("postgres", "user", "postgres")
        self.pgdata = config.str("postgres", "pgdata")
        if not os.path.isabs(self.pgdata):
            raise config.error("postgres", "pgdata", "%r is not an absolute path" % self.pgdata)
        self.backend = make_backend(config)

    def sets(self, usage=False):
        """The sets of our prefix, oldest first (usage: btrfs asks for bytes held)."""
        return sets_of(group_sets(self.backend.list_snapshots(self.datasets, usage), self.prefix),
                       self.datasets)

    def unreadable(self):
        """(snapshot, why) of our prefix without readable metadata, as of the last sets()."""
        return [(snapshot, why) for snapshot, why in self.backend.unreadable
                if parse_set_name(snapshot.rpartition("@")[2], self.prefix) is not None]


def take_backup_mode_set(job, session, version_num, name, label, base_properties, order):
    """Snapshot the set inside backup mode: (snapshots, stop LSN, label, map bytes,
    db_time, db_lsn).

    On any failure the snapshots made are destroyed and backup mode is ended
    (by the stop call, or by closing the session) before the Failure goes up.
    """
    start_sql, stop_sql = backup_calls(version_num, label)
    started = job.clock.now()
    start_lsn = session.query(start_sql, timeout=BACKUP_CALL_TIMEOUT)[0].strip()
    # Label and map are written empty now (zfs set refuses an empty value) and
    # set after the stop when PostgreSQL returned something.
    properties = dict(base_properties, start_lsn=start_lsn, start_time=iso_utc_exact(started),
                      backup_label="", tablespace_map="")
    try:
        made = job.backend.snapshot(order, name, properties)
    except SnapshotError as error:
        destroy_made(job, error.made)
        try:
            session.query(stop_sql, timeout=BACKUP_CALL_TIMEOUT)
        except Failure as stop_failure:
            log.error("ending backup mode: %s (closing the session ends it)", stop_failure)
        raise Failure("set %s not taken: %s" % (name, error), 1)
    try:
        stop_line = session.query(stop_sql, timeout=BACKUP_CALL_TIMEOUT)[0]
        return (made,) + parse_stop_row(stop_line)
    except (Failure, Stopped, ValueError, IndexError) as error:
        destroy_made(job, made)
        raise ended_as(error, "set %s not taken: ending backup mode: %s" % (name, error))


def ended_as(error, message):
    """The exception a clean-up ends with: a Stopped stays a signal's end (never a
    Failure that a loop over replicas would log and go on from), the rest a Failure."""
    return Stopped(message) if isinstance(error, Stopped) else Failure(message, 1)


def destroy_made(job, made):
    """Destroy snapshots this run made (newest first); log, never raise."""
    with signals_deferred():        # a second SIGTERM must not cut the clean-up short
        for snapshot in reversed(made):
            try:
                job.backend.destroy(snapshot)
                log.info("destroyed %s (its set failed)", snapshot)
            except Failure as failure:
                log.error("could not destroy %s: %s", snapshot, failure)


def cluster_facts(job, session):
    """Version, system identifier and checks of a running cluster."""
    version_num = int(session.query("SHOW server_version_num")[0])
    try:
        pg_version = major_version(version_num)
    except ValueError as error:
        raise Failure(str(error), 1)
    data_directory = session.query("SHOW data_directory")[0]
    if os.path.realpath(data_directory) != os.path.realpath(job.pgdata):
        raise Failure("the server's data_directory is %s, not [postgres] pgdata %s"
                      % (data_directory, job.pgdata), 2)
    system_identifier = session.query("SELECT system_identifier FROM pg_control_system()")[0]
    locations = session.query("SELECT pg_tablespace_location(oid) FROM pg_tablespace "
                              "WHERE pg_tablespace_location(oid) <> ''")
    return version_num, pg_version, system_identifier, [l for l in locations if l]


def tablespaces_on_disk(pgdata):
    """Targets of PGDATA/pg_tblspc/* (a stopped cluster's tablespaces)."""
    directory = os.path.join(pgdata, "pg_tblspc")
    try:
        return [os.path.realpath(os.path.join(directory, e)) for e in os.listdir(directory)]
    except OSError:
        return []


def open_session(job):
    """A connected PsqlSession, or None when PostgreSQL is certainly stopped."""
    config = job.config
    psql = find_program("psql", config.str("postgres", "bindir", ""))
    session = PsqlSession(psql, config.str("postgres", "host", "/tmp"),
                          config.int("postgres", "port", 5432),
                          config.str("postgres", "dbname", "postgres"),
                          config.str("postgres", "user", "postgres"))
    try:
        session.query("SELECT 1")
        return session
    except Failure as failure:
        session.close()
        pid_file = os.path.join(job.pgdata, "postmaster.pid")
        if os.path.exists(pid_file):
            raise Failure("%s exists but psql cannot connect (%s): is PostgreSQL starting, "
                          "stopping or on another port? No snapshot taken" % (pid_file, failure), 1)
        log.info("PostgreSQL is not running (%s absent; psql: %s)", pid_file, failure)
        return None


def cmd_snapshot(job, label_text):
    """Take one snapshot set; return its name. All or nothing."""
    mountpoints = job.backend.mountpoints(job.datasets)
    pgdata_dataset, pgdata_rel = locate(job.pgdata, mountpoints, job.datasets, "[postgres] pgdata")
    order = snapshot_order(job.datasets, pgdata_dataset)
    existing = set(one.name for one in job.sets())
    name = set_name(job.prefix, job.clock.now())
    while name in existing:             # a run earlier in this second: wait for the next
        time.sleep(1.01 - job.clock.now() % 1)
        name = set_name(job.prefix, job.clock.now())
    base = {"version": VERSION, "set": name, "datasets": " ".join(order),
            "pgdata_dataset": pgdata_dataset, "pgdata_rel": pgdata_rel,
            "mountpoints": mountpoints_value(mountpoints, order)}
    session = open_session(job)
    if session is None:
        return take_shutdown_set(job, name, base, order, mountpoints)
    try:
        version_num, pg_version, system_identifier, tablespaces = cluster_facts(job, session)
        check_tablespaces(tablespaces, mountpoints, job.datasets)
        base.update(mode="backup", pg_version=pg_version, system_identifier=system_identifier)
        label = "%s %s%s" % (PROG, name, (" " + label_text) if label_text else "")
        made, stop_lsn, label_bytes, map_bytes, db_time, db_lsn = take_backup_mode_set(
            job, session, version_num, name, label, base, order)
    finally:
        session.close()
    try:
        facts = parse_backup_label(label_bytes.decode("utf-8"))
        final = {"start_wal": facts["start_wal"], "timeline": str(facts["timeline"]),
                 "stop_time": iso_utc_exact(job.clock.now()),
                 "backup_label": encode_value(label_bytes),
                 "tablespace_map": encode_value(map_bytes), "db_time": db_time, "db_time_lsn": db_lsn,
                 "stop_lsn": stop_lsn}
        # stop_lsn goes last: it is what makes the set complete.
        order = [key for key in ("start_wal", "timeline", "stop_time", "backup_label",
                                 "tablespace_map", "db_time", "db_time_lsn", "stop_lsn") if final[key]]
        job.backend.set_properties(made, final, order)
    except (ValueError, Failure, Stopped) as error:
        destroy_made(job, made)
        raise ended_as(error, "set %s: %s" % (name, error))
    log.info("took set %s (backup from %s, start %s %s, stop %s, %d datasets)", name,
             facts.get("backup_from", "primary"), facts["start_lsn"], facts["start_wal"],
             stop_lsn, len(made))
    return name


def check_tablespaces(locations, mountpoints, datasets):
    """Every tablespace must be on a dataset of the set, or the set is not a backup."""
    for location in locations:
        locate(location, mountpoints, datasets, "tablespace")


def locate(path, mountpoints, datasets, what):
    """(dataset, path relative to its mountpoint) of the configured dataset whose
    snapshot holds path, else a Failure(2) that says where path is.

    The longest mountpoint holding path is not enough: a dataset (or btrfs
    subvolume) nested below it, or a dataset that is not mounted, is another
    file system, and the set would hold none of path's files.
    """
    real = os.path.realpath(path)
    unmounted = [d for d in datasets if d not in mountpoints]
    try:
        dataset, relative = dataset_of(real, mountpoints)
    except ValueError as error:
        raise Failure("%s: %s%s" % (what, error, "; not mounted: %s" % " ".join(unmounted)
                                    if unmounted else ""), 2)
    try:
        same = os.stat(real).st_dev == os.stat(mountpoints[dataset]).st_dev
    except OSError as error:
        raise Failure("%s: %s: %s" % (what, real, error.strerror or error), 2)
    if not same:
        holder = mount_of(real, read_mounts())
        where = (holder[0] if holder and holder[1] != mountpoints[dataset]
                 else "a subvolume nested in %s" % dataset)
        raise Failure("%s: %s is on %s, not on %s itself, so its snapshots would not hold it: "
                      "add that to [snapshot] datasets" % (what, path, where, dataset), 2)
    return dataset, relative


def take_shutdown_set(job, name, base, order, mountpoints):
    """Snapshot a cleanly stopped cluster as is, marked `shutdown`."""
    config = job.config
    version_file = os.path.join(job.pgdata, "PG_VERSION")
    try:
        with open(version_file) as handle:
            pg_version = handle.read().strip()
    except (OSError, IOError) as error:
        raise Failure("%s: %s" % (version_file, error.strerror or error), 1)
    pg_controldata = find_program("pg_controldata", config.str("postgres", "bindir", ""), pg_version)
    try:
        facts = shutdown_facts(read_controldata(pg_controldata, job.pgdata,
                                                config.str("postgres", "user", "postgres")))
    except ValueError as error:
        raise Failure("PostgreSQL is not running and %s: no snapshot taken" % error, 1)
    check_tablespaces(tablespaces_on_disk(job.pgdata), mountpoints, job.datasets)
    stamp = iso_utc(job.clock.now())
    properties = dict(base, mode="shutdown", pg_version=pg_version, start_time=stamp,
                      stop_time=stamp, backup_label="", tablespace_map="", **facts)
    try:
        made = job.backend.snapshot(order, name, properties)
    except SnapshotError as error:
        destroy_made(job, error.made)
        raise Failure("set %s: %s" % (name, error), 1)
    if os.path.exists(os.path.join(job.pgdata, "postmaster.pid")):
        destroy_made(job, made)
        raise Failure("PostgreSQL started while set %s was taken: destroyed it" % name, 1)
    log.info("took set %s (cluster shut down, redo %s %s, %d datasets)", name,
             facts["start_lsn"], facts["start_wal"], len(made))
    return name


def cmd_prune(job, dry_run):
    """Destroy the sets the policy lets go; return the number that failed."""
    sets = job.sets()
    now = job.clock.now()
    for snapshot, why in job.unreadable():
        log.warning("%s has no readable metadata (%s): not a backup, never pruned", snapshot, why)
    for name in future_sets(sets, now):
        log.warning("set %s is dated in the future (clock change?): kept", name)
    doomed = prune_decision(sets, job.policy, now)
    clones = job.backend.clones()
    by_name = dict((one.name, one) for one in sets)
    bases = replica_bases(sets, replica_names(job.config))
    failed = 0
    for name in doomed:
        one = by_name[name]
        if name in bases:
            log.info("set %s kept: the base of the next send to [replica %s]", name, "], [replica ".join(bases[name]))
            continue
        snapshots = ["%s@%s" % (dataset, name) for dataset in one.present]
        dependants = sorted(c for s in snapshots for c in clones.get(s, []))
        if dependants:
            log.warning("set %s has clones (%s): not pruned", name, " ".join(dependants))
            continue
        if dry_run:
            print("would destroy %s" % name)
            continue
        # A signal lets the set under way go whole, then ends the prune: never half a set.
        with signals_deferred():
            try:
                for snapshot in snapshots:
                    job.backend.destroy(snapshot)
                log.info("pruned set %s%s", name, "" if one.complete else " (incomplete)")
            except Failure as failure:
                log.error("could not prune set %s: %s", name, failure)
                failed += 1
        if pending_signal():
            raise Failure("stopped by signal %d after set %s: the remaining sets are kept"
                          % (pending_signal(), name), 1)
    return failed


def cmd_list(job, as_json):
    """Print every set: name, time, mode, LSNs, timeline, space used.

    A btrfs snapshot of our prefix without readable metadata is no set: it gets
    a warning (and, in the table, a NO-METADATA line), never a place in --json.
    """
    sets = job.sets(usage=True)
    unreadable = job.unreadable()
    for snapshot, why in unreadable:
        log.warning("%s has no readable metadata (%s): not a backup", snapshot, why)
    clones = job.backend.clones()
    newest_archived = archive_newest(job) if [one for one in sets if one.complete] else None
    waiting = dict((one.name, waiting_segment(one, newest_archived)) for one in sets if one.complete)
    if as_json:
        out = []
        for one in sets:
            entry = dict(one.properties)
            entry.update(name=one.name, time=iso_utc(one.time), complete=one.complete,
                         waiting_for_wal=waiting.get(one.name),
                         datasets=list(one.datasets), present=list(one.present),
                         used_bytes=one.used,
                         clones=sorted(c for d in one.present
                                       for c in clones.get("%s@%s" % (d, one.name), [])))
            out.append(entry)
        print(json.dumps(out, indent=2, sort_keys=True))
        return
    print("\t".join(["set", "time", "mode", "start_lsn", "stop_lsn", "timeline", "used", "state"]))
    for one in sets:
        props = one.properties
        print("\t".join([one.name, iso_utc(one.time), props.get("mode", "-"),
                         props.get("start_lsn", "-"), props.get("stop_lsn", "-"),
                         props.get("timeline", "-"), human_size(one.used),
                         ("WAITING for WAL " + waiting[one.name]) if waiting.get(one.name)
                         else "complete" if one.complete else "INCOMPLETE"]))
    for snapshot, _ in unreadable:
        name = snapshot.rpartition("@")[2]
        print("\t".join([name, iso_utc(parse_set_name(name, job.prefix))] + ["-"] * 5
                         + ["NO-METADATA " + snapshot]))


def archive_newest(job):
    """Each source's newest WAL segment, from pg_wal_fetch.py --check (beside this
    script) run as the PostgreSQL user, as restore_command runs; None without an
    [archive] section or when it cannot run (check then judges by age alone)."""
    listing = archive_segments(job)
    return None if listing is None else listing[0]


def archive_segments(job):
    """([each working source's newest segment], {every segment some source holds}),
    from `pg_wal_fetch.py --check --json` (beside this script) run as the
    PostgreSQL user, as restore_command runs; None without an [archive] section
    or when it cannot run or answers otherwise."""
    fetch_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pg_wal_fetch.py")
    if not job.config.has_section("archive") or not os.path.exists(fetch_script):
        return None
    demote, env = demote_to(job.user)
    try:
        proc = subprocess.Popen([fetch_script, "-c", os.path.abspath(job.config.path), "--check", "--json"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, preexec_fn=demote, env=env, cwd="/")
        out, _ = proc.communicate(timeout=ARCHIVE_CHECK_TIMEOUT)
        sources = json.loads(out)["sources"]
        newest = [one["newest_wal"] for one in sources if one.get("newest_wal")]
        segments = set(name for one in sources for name in one.get("segments", [])
                       if re.match(r"^[0-9A-F]{24}$", name))
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError) as error:
        with contextlib.suppress(Exception):
            proc.kill()
            proc.communicate()
        log.warning("pg_wal_fetch.py --check: %s: the sets' WAL is not checked", error)
        return None
    return newest, segments


def run_check(args):
    """The Nagios check: one line, exit 0/1/2/3, UNKNOWN on any error."""
    try:
        job = Job(Config.load(config_path(args.config)), Clock(args.now))
        if args.replica:
            state, text, perf = replica_check_state(job, replicas_of(job, args.replica)[0])
        else:
            sets = job.sets()
            listing = archive_segments(job)
            state, text, perf = check_state(sets, job.clock.now(), job.warn_age, job.crit_age,
                                            listing and listing[0], job.wal_wait)
            holes, hole_texts = continuity_state(sets, wal_holes(sets, listing[1])) if listing else (0, [])
            pools, pool_texts, pool_perf = pool_state(job_pools(job))
            state = max(state, holes, pools)
            text = "; ".join([text] + hole_texts + pool_texts)
            perf = " ".join(part for part in (perf, pool_perf) if part)
    except Failure as failure:
        state, text, perf = 3, str(failure), "sets=0"
    except Exception as error:      # a monitoring check says UNKNOWN, never a traceback
        state, text, perf = 3, "internal error: %s: %s" % (type(error).__name__, error), "sets=0"
    if args.json:
        print(check_json(state, text, perf))
    else:
        print("PG_ZFS_SNAP %s - %s | %s" % (NAGIOS_STATES[state], text, perf))
    return state


def replicas_of(job, name=None):
    """The Replica of --replica NAME, or of every [replica NAME] section; a Failure(2)
    when there is none, or when the datasets cannot be laid out below a parent."""
    names = [name] if name else replica_names(job.config)
    if not names:
        raise Failure("%s: no [replica NAME] section: nothing to replicate to" % job.config.path, 2)
    problem = replica_layout_problem(job.datasets)
    if problem:
        raise job.config.error("snapshot", "datasets", problem)
    return [Replica(job.config, one) for one in names]


def cmd_replicate(job, name=None, dry_run=False, prune=True):
    """Send to each replica every complete set it lacks, then (prune) prune it by its
    own keep_*; return the number of replicas that failed (a signal ends the run)."""
    failed = 0
    for replica in replicas_of(job, name):
        try:
            replicate_to(job, replica, dry_run, prune)
        except Failure as failure:
            log.error("%s", failure)
            failed += 1
    return failed


def replicate_to(job, replica, dry_run, prune=True):
    """One replica: resume or redo what a cut run left, send the missing sets in
    order, each one complete there (GUIDs checked, pgzfs:stop_lsn last) before
    the next, then the replica's retention."""
    sets = [one for one in job.sets() if one.complete]
    if not sets:
        log.info("%s: no complete set here to send", replica)
        return
    link = ReplicaLink(replica)
    link.open()
    try:
        guids = job.backend.guids([one.snapshot(d) for one in sets for d in one.datasets])
        tokens = link.resume_tokens()
        if tokens and not dry_run:
            resume_receives(job, link, tokens)
        leftovers = remove_leftovers(job, link, guids, dry_run) if replica.btrfs else []
        rows, there_guids, filesystems = link.listing()
        for snapshot in leftovers if dry_run else ():
            del there_guids[snapshot]           # as the run would find them: deleted
        there = replica_sets(rows, job.prefix, replica.target, job.datasets)
        common, plan, problems = plan_replication(sets, guids, there, there_guids, filesystems, replica.target)
        if problems:
            raise Failure("%s: %s; nothing sent" % (replica, "; ".join(problems)), 1)
        if common is not None and not dry_run:
            note_replicated(job, replica, common)        # a run that died before it noted it
        if not plan:
            log.info("%s holds every set: the newest, %s, since an earlier run", replica, common.name)
        for one, sends in plan:
            if dry_run:
                describe_sends(job, replica, one, sends)
                continue
            send_set(job, link, replica, one, sends, tokens is not None)
            common = one
        if prune:
            prune_replica(job, link, replica, common, dry_run)
    finally:
        link.close()


def resume_receives(job, link, tokens):
    """OpenZFS: finish each partial receive a cut run left (zfs send -t TOKEN); one whose
    snapshot is gone here (or that fails to resume) is dropped (zfs recv -A)
    and sent again from the start."""
    for dataset, token in sorted(tokens.items()):
        if dataset_name_problem(dataset):
            continue
        try:
            sent, seconds = link.receive(job.backend.send_argv(None, token=token), True)
            log.info("%s: resumed the cut receive of %s: %s more in %.1f s", link.replica, dataset,
                     human_size(sent), seconds)
        except Failure as failure:
            log.warning("%s: cannot resume the receive of %s (%s): dropping it, the set goes again",
                        link.replica, dataset, failure)
            link.run("zfs recv -A %s" % dataset)


def remove_leftovers(job, link, guids, dry_run):
    """btrfs: delete the copies a cut receive left there (btrfs_leftovers), so that
    their snapshots go again (btrfs cannot resume a receive); the leftovers
    (dry_run: printed, left as they are)."""
    replica = link.replica
    _, _, subvolumes = link.btrfs_listing()
    leftovers = btrfs_leftovers(subvolumes, replica.target, job.prefix, job.datasets, guids)
    for snapshot in leftovers:
        path = btrfs_snapshot_path(snapshot)
        if dry_run:
            print("would delete %s on [replica %s]: a receive cut short" % (path, replica.name))
            continue
        link.run(link.destroy_command(snapshot))
        log.info("%s: deleted %s, left by a receive cut short: it is sent again", replica, path)
    return leftovers


def describe_sends(job, replica, one, sends):
    """--dry-run: what sending set one would do, with each stream's size."""
    total = 0
    for send in sends:
        size, how = stream_size(job.backend.send_argv(send.snapshot, send.base), not replica.btrfs)
        total += size
        print("would send %s to %s:%s (%s): %s (%s)" % (
            send.snapshot, replica.host, send.target, "incremental from %s" % send.base.partition("@")[2]
            if send.base else "full", human_size(size), how))
    print("would make set %s complete on [replica %s]: %s in %d stream(s), then its %s"
          % (one.name, replica.name, human_size(total), len(sends),
             "NAME@SET.json files" if replica.btrfs else "pgzfs:* properties"))


def send_set(job, link, replica, one, sends, resumable):
    """Send the snapshots of set one that have not arrived, check every copy has its
    snapshot's GUID (btrfs: its UUID), then write the set's properties there,
    pgzfs:stop_lsn last (btrfs: the NAME@SET.json files), and note the replica
    in the set's pgzfs:replicated_to here."""
    for send in sends:
        sent, seconds = link.receive(job.backend.send_argv(send.snapshot, send.base), resumable,
                                     "%s to %s" % (send.snapshot, replica.host))
        log.info("sent %s to %s:%s (%s): %s in %.1f s", send.snapshot, replica.host, send.target,
                 "incremental from %s" % send.base.partition("@")[2] if send.base else "full",
                 human_size(sent), seconds)
    snapshots = [one.snapshot(dataset) for dataset in one.datasets]
    copies = dict((snapshot, "%s@%s" % (replica_dataset(replica.target, dataset), one.name))
                  for dataset, snapshot in zip(one.datasets, snapshots))
    guids = job.backend.guids(snapshots)
    _, there_guids, _ = link.listing()
    for snapshot, copy in copies.items():
        if there_guids.get(copy) != guids.get(snapshot):
            raise Failure("%s: %s has GUID %s, not %s's %s: set %s not complete there"
                          % (replica, copy, there_guids.get(copy, "(absent)"), snapshot, guids.get(snapshot),
                             one.name), 1)
    if replica.btrfs:
        write_copy_metadata(job, link, one, copies)
    else:
        write_copy_properties(job, link, one, copies)
    note_replicated(job, replica, one)
    log.info("set %s complete on %s (%d datasets, %s checked)", one.name, replica, len(snapshots),
             "UUIDs" if replica.btrfs else "GUIDs")


def write_copy_properties(job, link, one, copies):
    """zfs: the pgzfs:* of each snapshot of set one on its copy there (copies: {snapshot
    here: copy there}), as they are here, plus copy_of; pgzfs:stop_lsn last."""
    replica = link.replica
    snapshots = [one.snapshot(dataset) for dataset in one.datasets]
    keys = [key for key in PROPERTY_KEYS if key not in NOT_SENT]
    found = job.backend.snapshot_properties(snapshots, keys)
    commands, last = [], []
    for key in keys:
        by_value = collections.OrderedDict()
        for snapshot in snapshots:
            if key in found[snapshot]:
                by_value.setdefault(found[snapshot][key], []).append(copies[snapshot])
        for value, targets in by_value.items():
            try:
                (last if key == "stop_lsn" else commands).append(property_command(key, value, targets))
            except ValueError as error:
                raise Failure("%s: set %s: %s" % (replica, one.name, error), 1)
    commands += [property_command("copy_of", dataset, [copies[one.snapshot(dataset)]]) for dataset in one.datasets]
    if not last:
        raise Failure("set %s has no pgzfs:stop_lsn here: not complete" % one.name, 1)
    link.run_all(commands)
    for command in last:        # stop_lsn after all the others: it makes the set complete there
        link.run(command)


def write_copy_metadata(job, link, one, copies):
    """btrfs: NAME@SET.json beside each copy of set one there (copies: {snapshot here:
    copy there}), each in one write (pg_zfs_receive: temp file, rename): the
    snapshot's keys here but NOT_SENT, plus copy_of. Each has stop_lsn: the set
    is complete there once every file is written."""
    replica = link.replica
    snapshots = [one.snapshot(dataset) for dataset in one.datasets]
    found = job.backend.snapshot_properties(snapshots, PROPERTY_KEYS)
    texts = []
    for dataset, snapshot in zip(one.datasets, snapshots):
        if not found[snapshot].get("stop_lsn"):
            raise Failure("set %s has no stop_lsn in %s here: not complete" % (one.name, snapshot), 1)
        try:
            texts.append((btrfs_snapshot_path(copies[snapshot]) + BTRFS_METADATA_SUFFIX,
                          replica_metadata_text(found[snapshot], dataset)))
        except ValueError as error:
            raise Failure("%s: set %s: %s: %s" % (replica, one.name, snapshot, error), 1)
    for path, text in texts:
        link.run("pgzfs-write %s" % path, input_text=text)


def note_replicated(job, replica, one):
    """Add the replica to set one's pgzfs:replicated_to here (prune keeps its newest)."""
    held = one.get("replicated_to", "").split()
    if replica.name not in held:
        job.backend.set_properties([one.snapshot(dataset) for dataset in one.datasets],
                                   {"replicated_to": " ".join(held + [replica.name])}, ["replicated_to"])


def prune_replica(job, link, replica, common, dry_run):
    """The replica's retention (prune_decision with its keep_*), never its newest set
    in common with here (the next send's base); a set with clones there (a
    restore) is kept with a warning."""
    rows, _, _ = link.listing()
    there = replica_sets(rows, job.prefix, replica.target, job.datasets)
    doomed = replica_prune_decision(there, replica.policy, job.clock.now(), common.name if common else None)
    by_name = dict((one.name, one) for one in there)
    for name in doomed:
        snapshots = [by_name[name].snapshot(dataset) for dataset in by_name[name].present]
        if dry_run:
            print("would destroy %s on [replica %s]" % (name, replica.name))
            continue
        with signals_deferred():
            for snapshot in snapshots:
                command = link.destroy_command(snapshot)
                code, _, err = link.run(command, check=False)
                if code != 0:
                    log.warning("%s: set %s not pruned: %s: %s", replica, name, command,
                                (err.strip().splitlines() or ["exit code %d" % code])[-1])
                    break
            else:
                log.info("pruned set %s on %s", name, replica)
        if pending_signal():
            raise Stopped("stopped by signal %d after set %s: the remaining sets are kept"
                          % (pending_signal(), name))


def replica_listing(replica):
    """ReplicaLink.listing() over a connection of its own."""
    link = ReplicaLink(replica)
    link.open()
    try:
        return link.listing()
    finally:
        link.close()


def replica_comparison(here, there, guids, there_guids, target, prefix):
    """One row per set on either side, oldest first: {set, time, here, replica}.

    here/there: the sets on each side; guids/there_guids: {snapshot: guid} of
    each side. here is "complete", "incomplete" or None (not here); replica is
    None (not there) or {state: complete|incomplete, present, datasets,
    other_guid: a snapshot there is not the copy of the one here}.
    """
    here = dict((one.name, one) for one in here)
    there = dict((one.name, one) for one in there)
    rows = []
    for set_name in sorted(set(here) | set(there), key=lambda n: (parse_set_name(n, prefix), n)):
        mine, theirs = here.get(set_name), there.get(set_name)
        copy = None
        if theirs is not None:
            copy = {"state": "complete" if theirs.complete else "incomplete", "present": len(theirs.present),
                    "datasets": len(theirs.datasets),
                    "other_guid": mine is not None and any(
                        there_guids.get(theirs.snapshot(replica_dataset(target, d))) != guids.get(mine.snapshot(d))
                        for d in mine.present)}
        rows.append({"set": set_name, "time": iso_utc(parse_set_name(set_name, prefix)),
                     "here": None if mine is None else "complete" if mine.complete else "incomplete",
                     "replica": copy})
    return rows


def cmd_list_replica(job, name, as_json=False):
    """Each set here or on the replica, and its state on both sides."""
    [replica] = replicas_of(job, name)
    sets = job.sets()
    listing, there_guids, _ = replica_listing(replica)
    there = replica_sets(listing, job.prefix, replica.target, job.datasets)
    guids = job.backend.guids([one.snapshot(d) for one in sets for d in one.present])
    rows = replica_comparison(sets, there, guids, there_guids, replica.target, job.prefix)
    if as_json:
        print(json.dumps({"replica": replica.name, "host": replica.host, "target": replica.target, "sets": rows},
                         indent=2, sort_keys=True))
        return
    print("\t".join(["set", "time", "here", "replica " + replica.name]))
    for row in rows:
        copy = row["replica"]
        state = "-"
        if copy is not None:
            state = "complete" if copy["state"] == "complete" else "INCOMPLETE (%d of %d)" % (
                copy["present"], copy["datasets"])
            state += ", OTHER GUID" if copy["other_guid"] else ""
        print("\t".join([row["set"], row["time"], (row["here"] or "-").replace("incomplete", "INCOMPLETE"),
                         state]))


def replica_check_state(job, replica):
    """(Nagios state, text, perfdata) from the newest set complete on the replica."""
    rows, _, _ = replica_listing(replica)
    there = replica_sets(rows, job.prefix, replica.target, job.datasets)
    state, text, perf = check_state(there, job.clock.now(), replica.warn_age, replica.crit_age)
    newest = [one for one in there if one.complete]
    behind = [one for one in job.sets() if one.complete and (not newest or one.time > newest[-1].time)]
    if behind:
        text += "; %d newer set(s) here not there yet" % len(behind)
    return state, "%s: %s" % (replica, text), perf


def cmd_oldest_wal(job, commands, apply=False, dry_run=False):
    """Print the first WAL file a set here or on any [replica NAME] needs (with
    --commands, the pg_archivecleanup lines for each [source NAME] instead;
    with --apply, remove the files before it on each archive host). A
    replica that cannot be listed is a Failure: its sets may need older WAL.
    Returns the exit code."""
    sets = [one for one in job.sets() if one.complete]
    if replica_names(job.config):
        for replica in replicas_of(job):
            try:
                rows, _, _ = replica_listing(replica)
            except Failure as failure:
                raise Failure("%s cannot be listed (%s): its sets may need older WAL; keep every archived "
                              "WAL file" % (replica, failure), 1)
            sets += [one for one in replica_sets(rows, job.prefix, replica.target, job.datasets) if one.complete]
    if apply:
        return apply_archive_cleanup(job, sets, dry_run)
    wal_name = oldest_wal_name(sets)
    if not commands:
        print(wal_name)
        return 0
    sources = [(one["name"], one["host"], one["user"], one["path"]) for one in archive_sources(job.config)]
    for line in archive_cleanup_lines(sources, wal_name):
        print(line)
    return 0


def archive_sources(config):
    """Each [source NAME] of [archive] sources, as a dict of the keys cleanup uses."""
    names = config.list("archive", "sources", "") if config.has_section("archive") else []
    sources = []
    for name in names:
        section = "source " + name
        if not config.has_section(section):
            raise Failure("%s: [%s] missing (named in [archive] sources)" % (config.path, section), 2)
        sources.append({"name": name, "host": config.str(section, "host", ""),
                        "port": config.int(section, "port", 22, minimum=1), "user": config.str(section, "user", ""),
                        "path": config.str(section, "path"), "ssh_options": config.str(section, "ssh_options", ""),
                        "cleanup_identity": config.str(section, "cleanup_identity", "")})
    if not sources:
        raise Failure("%s: no [archive] sources: nothing to clean up" % config.path, 2)
    return sources


def apply_archive_cleanup(job, sets, dry_run):
    """oldest-wal --apply: on each [source NAME], pg_wal_serve --cleanup removes
    (dry_run: lists) the archived WAL before the oldest needed file, over ssh
    with the source's cleanup key. Every source is tried; 1 if any failed."""
    wal_name, request = cleanup_request(sets, dry_run)
    sources = archive_sources(job.config)
    connect_timeout = job.config.int("archive", "connect_timeout", 5, minimum=1)
    print("oldest needed WAL file: %s" % wal_name)
    failed = 0
    for source in sources:
        where = "[source %s] %s" % (source["name"], source["host"] or "local")
        try:
            argv = cleanup_ssh_argv(source, request, connect_timeout)
            code, out, err = run(argv, timeout=CLEANUP_TIMEOUT, check=False)
            paths = parse_cleanup_answer(out, wal_name, dry_run) if code == 0 else None
            for line in out.splitlines():
                if line.startswith(("removed ", "would remove ")):
                    print("%s: %s" % (where, line))
            if code != 0:
                raise Failure(cleanup_failure(source["name"], code, err), 1)
            if paths is None:
                raise Failure("[source %s] answered not as pg_wal_serve --cleanup does: %r"
                              % (source["name"], (out.strip().splitlines() or [""])[-1][:200]), 1)
        except Failure as failure:
            log.error("%s", failure)
            failed += 1
            continue
        print("%s: %d file(s) %s before %s" % (where, len(paths), "would be removed" if dry_run else "removed",
                                               wal_name))
    if failed:
        log.error("%d of %d archive source(s) not cleaned up", failed, len(sources))
    return 1 if failed else 0


def job_pools(job):
    """[(pool, size bytes, allocated bytes, health)] of the pools holding the datasets
    (ZFS; [] for btrfs)."""
    pools = []
    if isinstance(job.backend, ZfsBackend):
        for pool in sorted(set(dataset.split("/")[0] for dataset in job.datasets)):
            _, out, _ = run(["zpool", "list", "-H", "-o", "name,size,alloc,health", pool], timeout=ZFS_TIMEOUT)
            fields = out.split("\t") if out.strip() else []
            if len(fields) == 4:
                pools.append((pool, parse_size(fields[1]), parse_size(fields[2]), fields[3].strip()))
    return pools


def cmd_metrics(job, textfile_dir, with_replicas):
    """Write DIR/pg_zfs.prom (atomically: node_exporter never reads half a file),
    or print the metrics when no DIR is given."""
    sets = job.sets(usage=True)
    pools = job_pools(job)
    replicas = []
    if with_replicas and replica_names(job.config):
        for replica in replicas_of(job):
            try:
                rows, _, _ = replica_listing(replica)
                replicas.append((replica.name, replica_sets(rows, job.prefix, replica.target, job.datasets)))
            except Failure as failure:
                log.warning("%s cannot be listed: %s", replica, failure)
                replicas.append((replica.name, None))
    runs = {"snapshot": read_state(job.state_file, "the last snapshot run", run_record),
            "drill": read_state(os.path.join(job.config.str("restore", "wal_root", DEFAULT_WAL_ROOT),
                                             DRILL_STATE_FILE), "the last drill", run_record)}
    fetch_stats = spool_bytes = None
    if job.config.has_section("archive"):
        spool_dir = job.config.str("archive", "spool_dir", DEFAULT_SPOOL)
        fetch_stats = read_state(os.path.join(spool_dir, FETCH_STATS), "pg_wal_fetch.py's counters",
                                 fetch_counters) or fetch_counters({})
        spool_bytes = tree_bytes(spool_dir)
    text = metrics_text(sets, job.clock.now(), pools, replicas, runs, fetch_stats, spool_bytes)
    if not textfile_dir:
        print(text, end="")
        return
    path = os.path.join(textfile_dir, "pg_zfs.prom")
    write_atomically(path, text)
    os.chmod(path, 0o644)


def read_state(path, what, parse):
    """parse(the JSON in path), or None when the file is not there (never run) or
    cannot be read (a warning naming what: metrics go on without it)."""
    try:
        with open(path) as handle:
            return parse(json.load(handle))
    except (OSError, IOError) as error:
        if error.errno != errno.ENOENT:
            log.warning("%s: cannot read %s: %s", what, path, error.strerror)
    except ValueError as error:
        log.warning("%s: %s is not what it should be: %s", what, path, error)
    return None


def tree_bytes(directory):
    """Bytes of the regular files below directory (0 when it is not there)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                status = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(status.st_mode):
                    total += status.st_size
    return total


def snapshot_and_record(job, label_text):
    """cmd_snapshot, then the run's record in [snapshot] state_file (for metrics);
    a record that cannot be written is a warning, never the run's failure."""
    started = time.time()
    name = failure = None
    try:
        name = cmd_snapshot(job, label_text)
    except (Exception, Stopped) as error:
        failure = error if isinstance(error, (Failure, Stopped)) else unexpected_failure(error)
        raise
    finally:
        record = snapshot_run_record(started, time.time(), name, failure)
        with signals_deferred():        # the record is written whatever comes
            try:
                if not os.path.isdir(os.path.dirname(job.state_file)):
                    os.makedirs(os.path.dirname(job.state_file), 0o755)     # /var/lib/pg_zfs: others' too
                write_atomically(job.state_file, json.dumps(record, sort_keys=True) + "\n")
                os.chmod(job.state_file, 0o644)
            except (Failure, OSError) as error:
                log.warning("the run's record for metrics: %s", error)
    if pending_signal():
        raise Stopped("stopped by signal %d after set %s was taken and recorded" % (pending_signal(), name))
    return name


def cmd_receiver_script():
    print(receiver_script(), end="")


def cmd_authorized_keys(job, name=None, receiver_path=RECEIVER_PATH):
    """Print, for each replica, the authorized_keys line of the guest's key there."""
    for replica in replicas_of(job, name):
        key_path = (replica.identity_file or next(
            (path for path in (os.path.expanduser("~/.ssh/id_" + kind) for kind in ("ed25519", "ecdsa", "rsa"))
             if os.path.exists(path)), "~/.ssh/id_ed25519")) + ".pub"
        try:
            with open(key_path) as handle:
                public_key = handle.read()
        except (OSError, IOError) as error:
            raise Failure("%s: cannot read the public key %s: %s" % (replica, key_path, error.strerror), 1)
        from_patterns = (replica.from_patterns or bind_address(replica.ssh_options_text)
                         or address_toward(replica.host, replica.port))
        if not from_patterns:
            raise Failure("%s: cannot tell the address it sees this guest come from: set from" % replica, 2)
        made = ("mkdir -p %s, on a btrfs there" if replica.btrfs else "zfs create -p %s") % replica.target
        print("# %s: %s installed there (pg_zfs_snap.py receiver-script, mode 0755), the parent made "
              "(%s), then this line in ~%s/.ssh/authorized_keys (key %s; from = %s)%s"
              % (replica, receiver_path, made, replica.user, key_path, from_patterns,
                 "; root's key, as btrfs receive needs root (CAP_SYS_ADMIN): restricted to pg_zfs_receive "
                 "by restrict, from= and command=" if replica.btrfs else ""))
        print(receiver_keys_line(public_key, from_patterns, replica.target, receiver_path))


def bind_address(ssh_options):
    """The local address ssh_options bind ssh to (-b ADDR, -o BindAddress=ADDR), or None."""
    import shlex
    words = shlex.split(ssh_options)
    for index, word in enumerate(words):
        value = None
        if word == "-b" and index + 1 < len(words):
            value = words[index + 1]
        elif word.startswith("-b") and len(word) > 2:
            value = word[2:]
        elif word in ("-o", "-o=") and index + 1 < len(words):
            value = words[index + 1]
        elif word.startswith("-o"):
            value = word[2:]
        else:
            continue
        if word.startswith("-b"):
            return value
        key, _sep, setting = value.replace("=", " ", 1).partition(" ")
        if key.lower() == "bindaddress" and setting.strip():
            return setting.strip()
    return None


def address_toward(host, port):
    """The local address this machine sends from to reach host (a connected UDP
    socket: the kernel picks the route and source; no packet is sent), or None."""
    import socket
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
        probe_socket = socket.socket(family, kind, proto)
        try:
            probe_socket.connect(address)
            return probe_socket.getsockname()[0]
        finally:
            probe_socket.close()
    except (OSError, IOError, IndexError):
        return None


_signals_held = []      # non-empty while snapshots are made or destroyed
_signals_pending = []


def defer_or_fail_on_signal(signum, frame):
    """SIGTERM, SIGHUP, SIGINT: end the run with Stopped (backup mode ends, made
    snapshots go). While signals are held, note the signal and let the zfs or
    btrfs call finish: one cut short would leave snapshots nobody records."""
    if _signals_held:
        _signals_pending.append(signum)
        return
    signals_settled()       # the end has begun: a second signal never cuts the clean-up short
    raise Stopped("stopped by signal %d" % signum)


class Stopped(BaseException):
    """A signal ends the command (exit code 1). Not an Exception, as KeyboardInterrupt
    is not, so that no `except Exception` or `except Failure` takes it for an error
    and goes on: not ours, and not logging's, which prints a signal that lands while
    a line is written as a "Logging error" and carries on."""
    code = 1


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGTERM, SIGHUP and SIGINT while the block runs; see pending_signal()."""
    _signals_held.append(True)
    try:
        yield
    finally:
        _signals_held.pop()


def signals_settled():
    """The outcome is settled (made and reported, or undone): from now on SIGTERM,
    SIGHUP and SIGINT are only noted. A late one changes nothing, and ends in no
    traceback while the interpreter exits."""
    _signals_held.append(True)


def pending_signal():
    """The first signal that came while held, or None."""
    return _signals_pending[0] if _signals_pending else None


def stopped_or(message):
    """The reason a held zfs or btrfs call failed: the signal that came meanwhile if
    any (Ctrl-C at a terminal kills the whole process group, the call too)."""
    return "stopped by signal %d" % pending_signal() if pending_signal() else message


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command or "cron"
    setup_logging(args.verbose, use_syslog=command in ("cron", "snapshot", "prune"))
    if command == "check":
        return run_check(args)
    if command == "receiver-script":
        cmd_receiver_script()
        return 0
    signal.signal(signal.SIGTERM, defer_or_fail_on_signal)
    signal.signal(signal.SIGHUP, defer_or_fail_on_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, defer_or_fail_on_signal)     # Ctrl-C: the same clean end, no traceback
    lock = None
    try:
        job = Job(Config.load(config_path(args.config)), Clock(args.now))
        if command == "list":
            if args.replica:
                cmd_list_replica(job, args.replica, args.json)
            else:
                cmd_list(job, args.json)
            return 0
        if command == "authorized-keys":
            cmd_authorized_keys(job, args.replica, args.receiver_path)
            return 0
        if command == "replicate" and args.dry_run:
            failed = cmd_replicate(job, args.replica, dry_run=True, prune=not args.no_prune)
            return 1 if failed else 0
        if command == "oldest-wal":
            return cmd_oldest_wal(job, args.commands, args.apply, args.dry_run)
        if command == "metrics":
            cmd_metrics(job, args.textfile, not args.no_replicas)
            return 0
        lock = Lock(job.lock_file)
        if not lock.acquire(args.wait):
            log.info("another %s run holds %s: nothing done", PROG, job.lock_file)
            return 0
        if command == "replicate":
            failed = cmd_replicate(job, args.replica, prune=not args.no_prune)
            if failed:
                raise Failure("%d replica(s) not brought up to date" % failed, 1)
            return 0
        if command in ("cron", "snapshot"):
            snapshot_and_record(job, getattr(args, "label", ""))
        failed = 0 if getattr(args, "no_prune", False) else cmd_prune(job, getattr(args, "dry_run", False))
        failed_replicas = (cmd_replicate(job, prune=not getattr(args, "no_prune", False))
                           if getattr(args, "replicate", False) else 0)
        if failed or failed_replicas:
            raise Failure("%s" % "; ".join(
                text for count, text in ((failed, "%d set(s) could not be pruned" % failed),
                                         (failed_replicas, "%d replica(s) not brought up to date"
                                          % failed_replicas)) if count), 1)
        return 0
    except (Exception, Stopped) as error:       # Failure, a signal, and any other error as one line
        signals_settled()           # the failure is the outcome
        failure = error if isinstance(error, (Failure, Stopped)) else unexpected_failure(error)
        log.error("%s", failure)
        return failure.code
    finally:
        signals_settled()
        if lock is not None:
            lock.release()


def ignore_stop_signals():
    """The command has reported its outcome: SIGTERM, SIGHUP and SIGINT are ignored
    while the interpreter exits. Python's tear-down sets a handler of ours back to
    SIG_DFL (it leaves SIG_IGN alone), and a signal that landed after that ended a
    command that had finished, and said so, as killed by it (exit -15 after
    "restored set ...")."""
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    exit_code = main()
    ignore_stop_signals()       # main settled its signals: a late one is only noted until here
    sys.exit(exit_code)
