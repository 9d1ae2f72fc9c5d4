#!/usr/bin/env python3
"""Restore a PostgreSQL snapshot set to a point in time, as ZFS clones (or btrfs
writable snapshots with [snapshot] backend = btrfs).

Run by hand, as root, on the machine that holds the pool (the guest):

    pg_zfs_restore.py list
    pg_zfs_restore.py restore --target-time '2026-11-25 04:30:00+00' --action promote
    pg_zfs_restore.py cleanup pgzfs_20261125T040100Z

and as a monitoring check (Nagios/Icinga command line, e.g. daily):

    /opt/pg_zfs/bin/pg_zfs_restore.py drill --query 'SELECT count(*) FROM orders'

Commands:
    list [--json]        the snapshot sets found in the pool (pgzfs:* properties
                         written by pg_zfs_snap.py), the earliest target time each
                         can serve (its stop time), and the clones made from each.
                         A complete set whose stop segment no archive holds yet
                         (taken on an idle primary: the segment is archived at the
                         next WAL switch, archive_timeout) is WAITING for WAL
                         (--json: waiting_for_wal); pg_wal_fetch.py --check, run as
                         the PostgreSQL user, lists the archive
    restore TARGET       clone a set, make it a recovery to TARGET, start it on a
                         new port and wait until the target is reached.
                         TARGET is exactly one of:
                           --target-time TS   ISO 8601 WITH a zone: 2026-11-25T04:30:00Z,
                                              '2026-11-25 06:30:00.25+02:00'. A time
                                              without a zone is refused (PostgreSQL
                                              would read it in the server's zone)
                           --target-lsn X/X   a WAL location
                           --target-xid N     a transaction id
                           --target-name NAME a restore point (pg_create_restore_point)
                           --immediate        the end of the backup (consistency)
                           --latest           the end of the archive (always opens)
                         --set NAME           the set to use; else the newest
                                              complete set whose stop point is at or
                                              before the target (for --target-xid and
                                              --target-name, which the pool cannot
                                              place, the OLDEST complete set). A set
                                              waiting for WAL (see list) is passed
                                              over with a warning, refused by --set
                         --to DIR             root of the clones' mountpoints
                                              (default [restore] mount_root)
                         --port N             (default: the first free port from
                                              [restore] port_start)
                         --action pause|promote|shutdown  at the target (default
                                              pause, as PostgreSQL)
                         --timeline latest|current|N  recovery_target_timeline
                         --exclusive          stop just before the target
                                              (recovery_target_inclusive = off)
                         --no-start           prepare the clone, do not start it
                         --dry-run            print every step, change nothing
                         --keep-on-failure    leave the clones and the server for
                                              a post-mortem
    drill [--query SQL] [--amcheck]
                         restore the newest complete set with --immediate into
                         throwaway clones (DATASET_drill_SET) on a free port,
                         promote, run SELECT 1 and SQL (and pg_amcheck, 14+, on
                         request), stop, destroy; one Nagios line with the time
                         of each step (and the newer sets waiting for WAL).
                         At a terminal it logs the set and progress lines (see
                         recover) on stderr; elsewhere (cron, a monitoring agent:
                         stderr not a terminal) only its warnings and errors go
                         to stderr, the rest to syslog, so a drill that passes
                         prints its Nagios line and nothing else (-v: all).
                         Each drill that read its config, passed or failed (a
                         signal too), ends by writing WAL_ROOT/last-drill.json
                         ([restore] wal_root; pg_zfs_snap.py metrics reads it),
                         atomically, mode 0644, one JSON object:
                           {"exit_code": 0 or 2, "status": "OK" or "CRITICAL",
                            "set": the set drilled (null: none was chosen),
                            "started": Unix time, "finished": Unix time,
                            "seconds": its duration, "message": the Nagios line}
                         (a file that cannot be written is a warning; the
                         drill's line and exit code stay)
    cleanup NAME|--all   stop the server running on clones made by this tool and
                         destroy them (NAME: a set name or one of its clones)
    rollback --set NAME [--force]
                         roll the live datasets back to a set IN PLACE and write
                         its backup_label into PGDATA, for when the standby
                         itself must go back. Lists every later snapshot (in
                         ZFS's own creation order) that is destroyed with it,
                         destroys exactly those, then runs zfs rollback without
                         -r, so nothing unlisted can go. Refuses, changing
                         nothing, when a later snapshot is not a set of this
                         config stamped after the set (a snapshot made by hand,
                         another cluster's set), while PostgreSQL runs on the
                         datasets, and without --force.
                         btrfs: see below; later sets are listed and KEPT.

What a restore does, in order (each step is timed and reported):
  clone    zfs clone -o mountpoint=ROOT/<name> -o pgzfs:clone_of=SET DATASET@SET
           DATASET_restore_SET for every dataset of the set (the origin keeps
           pg_zfs_snap.py prune from destroying the set while a clone lives)
  prepare  in the clone: write backup_label and tablespace_map (byte for byte
           from the set, mode 0600, owned by the PostgreSQL user; the map's paths
           and the pg_tblspc links pointed at the cloned datasets); remove
           postmaster.pid, postmaster.opts, standby.signal and old recovery
           files; replace the pg_wal symlink (it points at the live standby's WAL)
           by a fresh directory WAL_ROOT/restore_SET/pg_wal that is not on ZFS;
           comment out inherited primary_conninfo, primary_slot_name, recovery
           targets, restore_command, archive and synchronous-standby settings,
           recovery_min_apply_delay, data_directory, external_pid_file,
           stats_temp_directory; then write the recovery settings (on 12+
           also '' for primary_conninfo, the slot, the other recovery targets
           and the like, so that an include file of the standby's config
           cannot bring them back; the last line wins):
           12+ recovery.signal plus lines appended to postgresql.auto.conf,
           9.6-11 recovery.conf. restore_command is this directory's
           pg_wal_fetch.py with the same config file. The copy always gets
           archive_mode = off (it can never push a new timeline into
           production's archive), a new port, its socket in
           WAL_ROOT/restore_SET and logging_collector = off (its log is
           WAL_ROOT/restore_SET/server.log), synchronous_standby_names = ''
           and no external_pid_file. Last, `postgres -C` must show that the
           copy runs on the clone's PGDATA with archive_mode off.
  start    pg_ctl start -w as the PostgreSQL user (runuser -u USER --, found by its
           full path, so cron's PATH does not matter; su where there is none)
  recover  wait (bounded by [restore] timeout) until the target is reached:
           paused, promoted or shut down, then report the last replayed LSN and
           transaction time. Every 10 s (3 s on a terminal) a progress line
           (a drill not at a terminal: to syslog only):
           the LSN replay reached and its rate, the last commit's time, the
           segments restored from the archive, and the time left to a time
           target (by the pace of the commit times), an LSN target or
           --immediate (by the rate). If the archive ends before the target, say so with
           the LSN reached, and fail. --latest: PostgreSQL opens at the first
           segment it cannot get, so after it opened, pg_wal_fetch.py --check
           (run as the PostgreSQL user) lists each source's newest segment; if
           one is after the segment replay ended in (on that timeline, or a
           later one with --timeline latest), the restore fails naming the
           missing segment and the LSN reached. When pg_wal_fetch.py stopped
           the recovery (exit 200: a source unreachable, only damaged copies),
           its line in the server log is the reason given:
             restore failed: recovery stopped at 000000010000000000000005:
             [source host1] unreachable (probe ping); [source host2] absent
             (LSN reached 0/5000000)
           Any failure of the recovery quotes the server log line that says why
           (pg_wal_fetch's stop line, else the FATAL, else the invalid record).
On any failure the server is stopped, the clones destroyed and the WAL directory
removed, unless --keep-on-failure.

btrfs ([snapshot] backend = btrfs; layout in DEVELOPERS.md, "btrfs layout"):
  sets     SUBVOLUME@SET is the read-only PARENT/.pgzfs/NAME@SET, its metadata
           NAME@SET.json beside it. A snapshot whose JSON is missing or unreadable
           is not a backup: `list` prints it as NO-METADATA with a warning, and
           it is never chosen.
  clone    the clone is a writable snapshot (btrfs subvolume snapshot, no -r)
           ROOT/NAME_restore_SET (drill: NAME_drill_SET). Before it is made, its
           marker PARENT/.pgzfs/clones/NAME_restore_SET.json is written atomically
           (pg_zfs_snap.py prune keeps a set while a marker's clone exists);
           cleanup deletes the clone, then the marker. ROOT is --to or [restore]
           mount_root when that is on the same btrfs as the snapshots (a
           snapshot cannot cross file systems); otherwise the clones go beside
           the subvolumes, PARENT/NAME_restore_SET, and an explicit --to on
           another file system is refused (exit 2). wal_root must not be on btrfs.
  rollback each subvolume gets a writable snapshot of the set,
           PARENT/NAME_rollback_SET; then PARENT/NAME is renamed to
           PARENT/NAME_before_rollback_STAMP (UTC) and the new one renamed to
           PARENT/NAME. The old subvolumes are KEPT and printed (delete them with
           btrfs subvolume delete once satisfied); no set is destroyed: the
           later sets stay and remain restorable.

Config (default /etc/pg_zfs/pg_zfs.conf, or -c, or $PG_ZFS_CONFIG):
    [postgres] pgdata, bindir, user, dbname, port
    [snapshot] backend (zfs or btrfs), datasets (btrfs: subvolume paths), prefix
               (default pgzfs). Only this config's sets are listed, restored,
               drilled, cleaned up or rolled back to: named PREFIX_YYYYmmddTHHMMSSZ
               and taken of one of these datasets, as pg_zfs_snap.py counts them;
               another cluster's sets on the same pool are not looked at.
    [restore]  mount_root, wal_root, port_start, timeout
    (pg_wal_fetch.py, run by the restored copy, reads [archive] and [source *])

Signals: SIGTERM, SIGHUP and SIGINT (Ctrl-C) end a restore or drill like any
failure: the server is stopped, the clones destroyed, their mountpoint
directories and the work directory removed (a zfs or btrfs call under way
finishes first); a rollback under way finishes whole.

Exit codes:
    (every error is one line; the clones are removed unless --keep-on-failure)
    0  done (drill: OK)
    1  the restore, cleanup or rollback failed or was refused; also: the
       archive ended before the target or has a hole (--latest), a source
       stopped the recovery (pg_wal_fetch), an OS error (its text and file: a
       --to that is a file, a full or read-only wal_root), a signal
       ("stopped by SIGTERM")
    2  bad arguments (--port outside 1-65535, an empty --set or --timeline, a
       time or xid out of range: refused before anything is made) or bad
       config; drill: CRITICAL (any failure, a full pool and a signal included)
"""

import argparse
import base64
import calendar
import collections
import configparser
import contextlib
import datetime
import errno
import glob
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

VERSION = "0.1.0"
PROG = "pg_zfs_restore"
DEFAULT_CONFIG = "/etc/pg_zfs/pg_zfs.conf"
# The config sections this script reads (CONFIG_SCHEMA): typos in them are refused.
CONFIG_READS = ("postgres", "snapshot", "restore")

log = logging.getLogger(PROG)

CLONE_OF = "pgzfs:clone_of"     # P + "clone_of" (P: the set-format block)
CLONE_KINDS = ("restore", "drill")

BTRFS_TIMEOUT = 120
RUNUSER_CANDIDATES = ("/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser", "/bin/runuser")
SU = "/bin/su"
SET_STAMP_RE = re.compile(r"(\d{8}T\d{6}Z)$")
DEFAULT_PREFIX = "pgzfs"

DEFAULT_MOUNT_ROOT = "/var/lib/pg_zfs/restore"
DEFAULT_WAL_ROOT = "/var/lib/pg_zfs/restore-wal"
DEFAULT_TIMEOUT = 3600          # seconds from pg_ctl start to the target
PORT_SPAN = 200                 # ports tried from port_start on
POLL_INTERVAL = 0.5             # seconds between two looks at the recovering server
PROGRESS_INTERVAL = 10          # seconds between two progress lines while it recovers
TERMINAL_PROGRESS_INTERVAL = 3  # the same on a terminal
# A drill's result, in [restore] wal_root, for pg_zfs_snap.py metrics (the format: drill_state_text).
DRILL_STATE_FILE = "last-drill.json"
NAGIOS_STATUS = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}
# zfs destroy (btrfs subvolume delete) right after pg_ctl stop may find the clone
# "busy" for a while (a process still leaving it; zfs-fuse busy with other pools):
# tried again for this many seconds before it counts as a failure.
DESTROY_BUSY_SECONDS = 60
BUSY_SLEEP = 0.25
ZFS_TIMEOUT = 120
PSQL_TIMEOUT = 30
STOP_TIMEOUT = 120

# Settings the clone must not inherit from the standby (or from the primary,
# whose postgresql.conf pg_basebackup copied): they are commented out in
# postgresql.conf and postgresql.auto.conf before the restore's own are added.
INHERITED_SETTINGS = (
    "primary_conninfo", "primary_slot_name", "standby_mode", "trigger_file",
    "promote_trigger_file", "restore_command", "archive_cleanup_command",
    "recovery_end_command", "recovery_target", "recovery_target_time",
    "recovery_target_xid", "recovery_target_lsn", "recovery_target_name",
    "recovery_target_inclusive", "recovery_target_timeline", "recovery_target_action",
    "pause_at_recovery_target", "recovery_min_apply_delay",
    "archive_mode", "archive_command", "archive_library",
    "synchronous_standby_names", "port", "unix_socket_directories",
    "hot_standby", "logging_collector",
    # Paths the copy would share with the live standby (Debian sets the last two).
    "data_directory", "external_pid_file", "stats_temp_directory",
)
# Recovery targets of 12+ (GUCs since then): a standby's include file may set one,
# and a second target is FATAL, so the others are set to '' before ours.
TARGET_SETTINGS = (("immediate", "recovery_target"), ("time", "recovery_target_time"),
                   ("xid", "recovery_target_xid"), ("lsn", "recovery_target_lsn"),
                   ("name", "recovery_target_name"))
COMMENT_MARK = "#pg_zfs_restore: "
# Files in PGDATA that belong to the standby's life, not to the restored copy.
STALE_FILES = ("postmaster.pid", "postmaster.opts", "standby.signal", "recovery.signal",
               "recovery.conf", "recovery.done", "backup_label.old", "tablespace_map.old")

TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,6}))?)?"
    r"\s*(Z|UTC|[+-]\d{2}(?::?\d{2})?)?$", re.IGNORECASE)
SET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
LOG_LSN_RE = re.compile(r"([0-9A-F]{1,8}/[0-9A-F]{1,8})")
# The one line pg_wal_fetch.py writes (into the copy's server log) before it
# exits 200 and PostgreSQL's startup process ends with FATAL.
FETCH_STOP_MARK = "pg_wal_fetch: ERROR: stopping recovery at "
RESTORED_RE = re.compile(r'restored log file "([0-9A-F]{24})" from archive')
# What PostgreSQL logs where the WAL it reads ends or goes bad (xlogreader.c).
WAL_PROBLEM_RE = re.compile(r"invalid record|invalid magic number|invalid info bits|incorrect resource "
                            r"manager data checksum|incorrect prev-link|unexpected pageaddr|contrecord|"
                            r"invalid resource manager|record length .* too long|out-of-sequence|"
                            r"unexpected timeline|could not read|invalid checkpoint|checksum mismatch|"
                            r"WAL file is from different database system", re.IGNORECASE)
CHECK_TIMEOUT = 300             # pg_wal_fetch.py --check, every source probed and listed

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
# Pure functions: targets, sets, recovery settings, configuration text,
# ports, the server's log. No I/O, no subprocess.
# ---------------------------------------------------------------------------

UTC = datetime.timezone.utc


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


def zone_of(text):
    """A tzinfo for Z, UTC, +HH, +HHMM or +HH:MM; ValueError if out of range."""
    if text.upper() in ("Z", "UTC"):
        return UTC
    digits = text[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:] or 0)
    if hours > 15 or minutes > 59:
        raise ValueError("time zone %s is out of range" % text)
    offset = datetime.timedelta(hours=hours, minutes=minutes)
    return datetime.timezone(-offset if text.startswith("-") else offset)


def parse_time(text):
    """An aware datetime in UTC from ISO 8601 with a zone; ValueError (one line) if not.

    A time without a zone is refused: PostgreSQL would read it silently in the
    server's TimeZone, which on a guest is often not the operator's.
    """
    match = TIME_RE.match(text.strip())
    if not match:
        raise ValueError("%r is not an ISO 8601 time such as 2026-11-25T04:30:00Z "
                         "or '2026-11-25 06:30:00.25+02:00'" % text)
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    if zone is None:
        raise ValueError("%r has no time zone: add one (Z, +00, +02:00); PostgreSQL would "
                         "read it silently in the server's zone" % text)
    try:
        moment = datetime.datetime(int(year), int(month), int(day), int(hour), int(minute),
                                   int(second or 0), int((fraction or "0").ljust(6, "0")),
                                   tzinfo=zone_of(zone))
        return moment.astimezone(UTC)
    except (ValueError, OverflowError) as error:
        # 9999-12-31T23:59:59-15:00 is a valid local time past the last UTC one.
        raise ValueError("%r is not a valid time: %s" % (text, error))


def pg_time(moment):
    """A timestamptz literal PostgreSQL reads the same in any zone: '... +00'."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def iso_time(moment):
    """2026-11-25T04:30:00Z, with the fraction only when there is one."""
    moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += (".%06d" % moment.microsecond).rstrip("0")
    return text + "Z"


def parse_major(text):
    """(major, minor) of a pgzfs:pg_version or PG_VERSION: '15' -> (15, 0), '9.6' -> (9, 6)."""
    match = re.match(r"^(\d+)(?:\.(\d+))?$", text.strip())
    if not match:
        raise ValueError("%r is not a PostgreSQL major version" % text)
    major = (int(match.group(1)), int(match.group(2) or 0))
    if major[0] >= 10:
        major = (major[0], 0)
    if major < (9, 6):
        raise ValueError("PostgreSQL %s is older than 9.6, which pg_zfs does not support" % text)
    return major


def major_text(major):
    """'15' or '9.6'."""
    return str(major[0]) if major[0] >= 10 else "%d.%d" % major


class Target(object):
    """Where recovery stops. kind: time, lsn, xid, name, immediate or latest."""

    KINDS = ("time", "lsn", "xid", "name", "immediate", "latest")

    def __init__(self, kind, value=None):
        self.kind = kind
        self.value = value

    def __str__(self):
        if self.kind == "time":
            return iso_time(self.value)
        if self.kind == "lsn":
            return "LSN " + format_lsn(self.value)
        if self.kind == "xid":
            return "xid %d" % self.value
        if self.kind == "name":
            return "restore point %r" % self.value
        return {"immediate": "end of backup (immediate)", "latest": "end of archive"}[self.kind]


def parse_target(kind, text=None):
    """The Target of a --target-* option; ValueError (one line) if the text is bad."""
    if kind == "time":
        return Target(kind, parse_time(text))
    if kind == "lsn":
        return Target(kind, parse_lsn(text))
    if kind == "xid":
        if not re.match(r"^[0-9]{1,20}$", text.strip()) or not 3 <= int(text) < 2 ** 64:
            raise ValueError("%r is not a transaction id (a whole number from 3 to 2^64-1)" % text)
        return Target(kind, int(text))
    if kind == "name":
        if not text or len(text.encode("utf-8")) > 63:
            raise ValueError("%r is not a restore point name (1 to 63 bytes)" % text)
        return Target(kind, text)
    if kind in ("immediate", "latest"):
        return Target(kind)
    raise ValueError("unknown target kind %r" % kind)


def parse_timeline(text):
    """recovery_target_timeline: 'latest', 'current' or a timeline ID (decimal)."""
    if text in ("latest", "current"):
        return text
    if re.match(r"^[0-9]{1,10}$", text) and 0 < int(text) < 2 ** 32:
        return str(int(text))
    raise ValueError("--timeline %r is not latest, current or a timeline ID" % text)


def clone_of_config(fs, prefix, datasets):
    """True for a clone (is_our_clone) of a snapshot of one of datasets, of a set named PREFIX_STAMP."""
    return bool(is_our_clone(fs) and fs["origin"].rpartition("@")[0] in datasets
                and parse_set_name(fs["clone_of"], prefix) is not None)


def is_time(text):
    try:
        parse_time(text)
        return True
    except ValueError:
        return False


def set_problems(snapshot_set):
    """What keeps a set from being restored, as short phrases (empty: none)."""
    problems = []
    if not snapshot_set.complete:
        missing = [d for d in snapshot_set.datasets if d not in snapshot_set.present]
        problems.append("incomplete (%s)" % ("missing on " + " ".join(missing) if missing
                                             else "pgzfs:stop_lsn not on every snapshot"))
    for key in ("datasets", "pgdata_dataset", "pgdata_rel", "mode", "start_lsn", "stop_lsn",
                "timeline", "stop_time", "pg_version"):
        if not snapshot_set.get(key):
            problems.append("pgzfs:%s is not set" % key)
    if snapshot_set.get("mode") not in (None, "backup", "shutdown"):
        problems.append("pgzfs:mode %r is neither backup nor shutdown" % snapshot_set.get("mode"))
    if snapshot_set.get("pgdata_dataset") and \
            snapshot_set.get("pgdata_dataset") not in snapshot_set.datasets:
        problems.append("pgzfs:pgdata_dataset is not one of pgzfs:datasets")
    for key in ("start_lsn", "stop_lsn"):
        if snapshot_set.get(key) and not LSN_RE.match(snapshot_set.get(key)):
            problems.append("pgzfs:%s %r is not X/X" % (key, snapshot_set.get(key)))
    for key in ("stop_time", "db_time"):
        if snapshot_set.get(key) and not is_time(snapshot_set.get(key)):
            problems.append("pgzfs:%s %r is not a UTC time" % (key, snapshot_set.get(key)))
    if snapshot_set.get("timeline") and snapshot_set.timeline is None:
        problems.append("pgzfs:timeline %r is not a number" % snapshot_set.get("timeline"))
    try:
        if snapshot_set.get("pg_version"):
            parse_major(snapshot_set.get("pg_version"))
    except ValueError as error:
        problems.append(str(error))
    return problems


def label_problems(mode, start_lsn, backup_label):
    """What is wrong with a set's backup_label bytes for its mode (empty: nothing)."""
    if mode != "backup":
        return []
    if not backup_label.strip():
        return ["taken in backup mode but pgzfs:backup_label is empty: without it recovery "
                "would start at the wrong checkpoint"]
    match = re.search(rb"^START WAL LOCATION: ([0-9A-Fa-f]+/[0-9A-Fa-f]+)", backup_label, re.M)
    if not match:
        return ["pgzfs:backup_label has no START WAL LOCATION line"]
    try:
        if start_lsn and parse_lsn(match.group(1).decode("ascii")) != parse_lsn(start_lsn):
            return ["backup_label starts at %s but pgzfs:start_lsn is %s"
                    % (match.group(1).decode("ascii"), start_lsn)]
    except ValueError as error:
        return [str(error)]
    return []


def set_stop_time(one):
    """Set one's stop point in time: pgzfs:db_time, the database's own (the primary's
    clock stamped every commit the set holds), else the guest's pgzfs:stop_time."""
    for key in ("db_time", "stop_time"):
        try:
            return parse_time(one.get(key, ""))
        except ValueError:
            continue
    return None


def choose_set(sets, target, set_name=None, timeline=None, inclusive=True):
    """The set that serves target: a Failure (exit 1) naming why none does.

    --set wins if given (and must be complete and not stop after the target).
    Otherwise the newest complete set whose stop point (pgzfs:db_time, else
    pgzfs:stop_time: set_stop_time; or
    pgzfs:stop_lsn for an LSN target) is at or before the target; for
    --immediate and --latest the newest; for an xid or a restore point name,
    which the pool cannot place in time, the oldest. A numeric timeline keeps
    only sets taken on that timeline or an earlier one. A time target with
    inclusive False (--exclusive) needs a stop point before it: pgzfs:db_time
    is the commit time of the last transaction the set holds, which
    --exclusive at that time leaves out.
    """
    if set_name:
        named = [s for s in sets if s.name == set_name]
        if not named:
            raise Failure("no snapshot set named %s in the pool" % set_name, 1)
        candidates = named
    else:
        candidates = [s for s in sets if s.complete]
        if timeline not in (None, "latest", "current"):
            candidates = [s for s in candidates if s.timeline is not None and s.timeline <= int(timeline)]
        if not candidates:
            raise Failure("no complete snapshot set in the pool%s"
                          % ("" if timeline in (None, "latest", "current")
                             else " on timeline %s or earlier" % timeline), 1)
    if set_name and not candidates[0].complete:
        raise Failure("set %s is %s" % (set_name, set_problems(candidates[0])[0]), 1)
    if target.kind in ("time", "lsn"):
        if target.kind == "time":
            def stop(s):
                return set_stop_time(s)
            show = iso_time
        else:
            def stop(s):
                return s.stop_lsn
            show = format_lsn
        known = [s for s in candidates if stop(s) is not None]
        fits = [s for s in known if stop(s) < target.value
                or (stop(s) == target.value and (inclusive or target.kind != "time"))]
        if not fits:
            if not known:
                raise Failure("no set has a usable pgzfs:stop_%s" % target.kind, 1)
            earliest = min(known, key=lambda s: (stop(s), s.name))
            raise Failure("target %s is before the stop point of %s: the earliest possible "
                          "target is %s (set %s)"
                          % (str(target), "set " + set_name if set_name else "every set",
                             show(stop(earliest)), earliest.name), 1)
        return max(fits, key=lambda s: (stop(s), s.name))
    if target.kind in ("xid", "name") and not set_name:
        return candidates[0]
    return candidates[-1]


def clone_dataset(dataset, kind, set_name):
    """DATASET_restore_SET or DATASET_drill_SET (DEVELOPERS.md)."""
    return "%s_%s_%s" % (dataset, kind, set_name)


def clone_mountpoint(root, clone):
    """ROOT/<clone without its pool, '/' as '_'>: data02_restore_pgzfs_2026...Z."""
    tail = clone.split("/", 1)[1] if "/" in clone else clone
    return os.path.join(root, tail.replace("/", "_"))


def work_dir_of(wal_root, kind, set_name):
    """The restore's own directory off ZFS: pg_wal, socket and server log."""
    return os.path.join(wal_root, "%s_%s" % (kind, set_name))


def clone_kind(clone, set_name):
    """'restore' or 'drill' from a clone's name and its pgzfs:clone_of, else None."""
    for kind in CLONE_KINDS:
        if clone.endswith("_%s_%s" % (kind, set_name)):
            return kind
    return None


def is_our_clone(fs):
    """True for a clone this tool made: named DATASET_KIND_SET, cloned from a snapshot @SET.

    pgzfs:clone_of alone is not enough: ZFS passes it on to a dataset made
    below a clone, and zfs send -p | recv keeps it on a copy that is no clone.
    """
    set_name = fs.get("clone_of")
    return bool(set_name and fs.get("origin") and fs["origin"].rpartition("@")[2] == set_name
                and clone_kind(fs["name"], set_name))


def source_mountpoints(datasets, stored, properties, mounts, sources=None):
    """{dataset: [paths]}: where the dataset was mounted when the set was taken, as the
    set's backup_label, tablespace_map and pg_tblspc links name it, each mapped
    to the dataset's clone.

    stored: pgzfs:mountpoints (the JSON bytes pg_zfs_snap.py wrote from the
    mount table; b'' for an older set); also where the dataset is mounted now
    (mounts, parse_mounts' table: a `legacy` dataset too) and its
    mountpoint property (btrfs: the configured path) when that is a path.
    sources: the set's names in stored ({dataset: the guest's dataset} on a
    replica, where stored names the guest's datasets and mountpoints).
    """
    try:
        found = json.loads(stored.decode("utf-8")) if stored.strip() else {}
    except ValueError:
        found = {}
    if not isinstance(found, dict):
        found = {}
    mounted = zfs_mountpoints(datasets, mounts)
    result = {}
    for dataset in datasets:
        for candidate in (found.get((sources or {}).get(dataset, dataset)), mounted.get(dataset),
                          properties.get(dataset)):
            if isinstance(candidate, str) and candidate.startswith("/") \
                    and os.path.normpath(candidate) not in result.get(dataset, []):
                result.setdefault(dataset, []).append(os.path.normpath(candidate))
    return result


def map_path(path, mount_map, resolve=None):
    """path moved from a source mountpoint to its clone's (longest match), or None.

    When no source mountpoint holds path, resolve(path) is tried (os.path.realpath:
    a tablespace located through a symlink into a dataset, which pg_zfs_snap.py
    resolves when it takes the set).
    """
    path = os.path.normpath(path)
    best = None
    for source, clone in mount_map.items():
        source = os.path.normpath(source)
        if path == source or path.startswith(source.rstrip("/") + "/"):
            if best is None or len(source) > len(best[0]):
                best = (source, clone)
    if best is None:
        real = resolve(path) if resolve else path
        return map_path(real, mount_map) if os.path.normpath(real) != path else None
    rest = path[len(best[0]):].lstrip("/")
    return os.path.join(best[1], rest) if rest else best[1]


def rewrite_tablespace_map(text, mount_map, resolve=None):
    """tablespace_map text with each 'OID PATH' line's path moved into the clones.

    A tablespace on no dataset of the set is a Failure: the restored copy would
    write into the live standby's tablespace.
    """
    lines = []
    for line in text.splitlines(True):
        body = line.rstrip("\r\n")
        if not body.strip():
            lines.append(line)
            continue
        oid, space, path = body.partition(" ")
        if not space or not oid.isdigit():
            raise Failure("tablespace_map line %r is not 'OID PATH'" % body, 1)
        moved = map_path(path, mount_map, resolve)
        if moved is None:
            raise Failure("tablespace %s at %s is on no dataset of the set: a restore would "
                          "share it with the live standby" % (oid, path), 1)
        lines.append("%s %s%s" % (oid, moved, line[len(body):]))
    return "".join(lines)


def quote_setting(value):
    """A configuration file string literal: 'it''s', backslashes doubled (PostgreSQL reads escapes)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def restore_command_for(fetch_script, config_file, first_line=None):
    """restore_command: pg_wal_fetch.py beside this script, with the same config, run
    as script_words says. first_line: the fetch script's, read from it when not given."""
    if first_line is None:
        first_line = first_line_of(fetch_script)
    return "%s -c %s %%f %%p" % (" ".join(shlex.quote(word) for word in script_words(fetch_script, first_line)),
                                 shlex.quote(config_file))


def script_words(script, first_line):
    """The words that run script in a restore_command: its #! interpreter with -S
    (no site-packages: none of their .pth files run at each of the thousands
    of calls a recovery makes; these scripts need only the standard library),
    e.g. /usr/bin/env python3 -S SCRIPT; just SCRIPT when its first line
    names no python."""
    words = first_line[2:].split() if first_line.startswith("#!") else []
    if not any(os.path.basename(word).startswith(("python", "platform-python")) for word in words):
        return [script]
    return words + ["-S", script]


def first_line_of(path):
    """The first line of a file, or "" when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.readline(256).decode("utf-8", "replace").rstrip("\n")
    except (IOError, OSError):
        return ""


def recovery_settings(major, target, action, restore_command, timeline=None, inclusive=True):
    """[(name, literal)] of the recovery, whichever file they go to.

    recovery_target_action exists from 9.5 on and replaced
    pause_at_recovery_target; 'pause' pauses only with hot_standby = on (else
    it acts as 'shutdown'), which server_settings always sets. --latest has no
    target: recovery runs to the end of the archive and the server opens.
    """
    pairs = [("restore_command", quote_setting(restore_command))]
    if major >= (12, 0):
        # What a standby's postgresql.conf or its include files may set; the
        # last line wins, so these lines in postgresql.auto.conf neutralise them.
        pairs += [("primary_conninfo", "''"), ("primary_slot_name", "''"),
                  ("recovery_min_apply_delay", "0"), ("recovery_end_command", "''"),
                  ("archive_cleanup_command", "''")]
        pairs += [(name, "''") for kind, name in TARGET_SETTINGS if kind != target.kind]
    if target.kind == "time":
        pairs.append(("recovery_target_time", quote_setting(pg_time(target.value))))
    elif target.kind == "lsn":
        if major < (10, 0):
            raise Failure("--target-lsn needs PostgreSQL 10 or later; this set is %s"
                          % major_text(major), 2)
        pairs.append(("recovery_target_lsn", quote_setting(format_lsn(target.value))))
    elif target.kind == "xid":
        pairs.append(("recovery_target_xid", quote_setting(target.value)))
    elif target.kind == "name":
        pairs.append(("recovery_target_name", quote_setting(target.value)))
    elif target.kind == "immediate":
        pairs.append(("recovery_target", quote_setting("immediate")))
    if not inclusive:
        if target.kind not in ("time", "lsn", "xid"):
            raise Failure("--exclusive applies to --target-time, --target-lsn and --target-xid", 2)
        pairs.append(("recovery_target_inclusive", "off"))
    # 12+ defaults to 'latest', 9.6-11 to 'current': say it, so that a restore
    # follows a failover of production on every version alike.
    pairs.append(("recovery_target_timeline", quote_setting(timeline or "latest")))
    if target.kind != "latest":
        pairs.append(("recovery_target_action", quote_setting(action)))
    return pairs


def server_settings(port, socket_dir, major):
    """[(name, literal)] every restored copy gets, on every version.

    They go last into postgresql.auto.conf, so they win over anything the
    standby's postgresql.conf or its include files set: no synchronous standby
    to wait for, and no pid or statistics file shared with the live standby.
    """
    pairs = [("port", str(port)),
             ("archive_mode", "off"),
             ("hot_standby", "on"),
             ("unix_socket_directories", quote_setting(socket_dir)),
             ("logging_collector", "off"),
             ("synchronous_standby_names", "''"),
             ("external_pid_file", "''")]
    if major < (15, 0):
        pairs.append(("stats_temp_directory", quote_setting(socket_dir)))
    else:
        # 15+ reads WAL ahead of replay (recovery_prefetch = try): it would ask for
        # the next segment before reaching a target in this one, and pg_wal_fetch
        # stops a recovery when a segment it is asked for is in doubt (a host down).
        # Off, every segment asked for is one replay needs.
        pairs.append(("recovery_prefetch", "off"))
    return pairs


def effective_settings_problems(effective, pgdata):
    """Why the copy must not start with these settings (postgres -C), as phrases.

    data_directory can only come from postgresql.conf or its include files,
    which may lie outside the clone: if it names another directory, the copy
    would recover (and promote) that directory, maybe the live standby's.
    """
    problems = []
    if os.path.normpath(effective.get("data_directory", "")) != os.path.normpath(pgdata):
        problems.append("data_directory = %r in the standby's configuration (an include file?): the "
                        "copy would run on that directory, not on %s; remove that line from the clone "
                        "(restore --no-start, edit, start) and retry" % (effective.get("data_directory"),
                                                                         pgdata))
    if effective.get("archive_mode") != "off":
        problems.append("archive_mode is %r, not off: the copy could archive into production's archive"
                        % effective.get("archive_mode"))
    return problems


def render_settings(pairs, header):
    """Configuration file lines for pairs, after a comment line."""
    return "".join(["# %s\n" % header] + ["%s = %s\n" % pair for pair in pairs])


def recovery_files(major, recovery_pairs, server_pairs, header):
    """[(file in PGDATA, 'append' or 'write', text)] that make the clone a recovery.

    12+: recovery.signal and every setting appended to postgresql.auto.conf;
    9.6-11: recovery.conf (no standby_mode: recovery ends at the target) and the
    server settings in postgresql.auto.conf.
    """
    if major >= (12, 0):
        return [("postgresql.auto.conf", "append", render_settings(server_pairs + recovery_pairs, header)),
                ("recovery.signal", "write", "")]
    return [("postgresql.auto.conf", "append", render_settings(server_pairs, header)),
            ("recovery.conf", "write", render_settings(recovery_pairs, header))]


SETTING_LINE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(?:=|\s|$)")


def comment_out_settings(text, names):
    """(text with every line that sets one of names commented out, names found)."""
    wanted = set(name.lower() for name in names)
    lines, found = [], []
    for line in text.splitlines(True):
        match = SETTING_LINE_RE.match(line)
        if match and match.group(1).lower() in wanted:
            lines.append(COMMENT_MARK + line)
            found.append(match.group(1).lower())
        else:
            lines.append(line)
    return "".join(lines), found


def used_ports(tcp_tables, unix_table):
    """Ports in use: TCP listeners (/proc/net/tcp, tcp6) and PostgreSQL unix sockets."""
    ports = set()
    for table in tcp_tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A" and ":" in fields[1]:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    for line in unix_table.splitlines()[1:]:
        match = re.search(r"/\.s\.PGSQL\.(\d+)$", line.strip())
        if match:
            ports.add(int(match.group(1)))
    return ports


def choose_port(start, used, span=PORT_SPAN):
    """The first port from start on that nobody uses."""
    free = free_ports(start, used, span)
    if not free:
        raise Failure("no free port in %d-%d" % (start, min(start + span, 65536) - 1), 1)
    return free[0]


def free_ports(start, used, span=PORT_SPAN):
    """The ports from start on (span of them, at most 65535) that nobody uses, in order."""
    return [port for port in range(start, min(start + span, 65536)) if port not in used]


COW_FSTYPES = ("zfs", "fuse.zfs", "btrfs")     # zfs-fuse mounts as fuse.zfs


def wal_root_problem(mount, own_filesystems):
    """Why a restore's WAL must not go on mount (mount_of's tuple or None), or None.

    Any ZFS (also of another pool, or zfs-fuse's fuse.zfs) or btrfs: each WAL
    segment would be written anew into every snapshot of that file system.
    """
    source, point, fstype = mount or ("", "", "")
    if fstype in COW_FSTYPES or source in own_filesystems:
        return "%s (%s mounted at %s)" % (fstype, source, point)
    return None


def log_message(line):
    """The message of a server log line, without the log_line_prefix."""
    for level in ("LOG:", "FATAL:", "PANIC:", "ERROR:", "WARNING:", "DETAIL:", "HINT:"):
        index = line.find(level)
        if index >= 0:
            return line[index:].strip()
    return line.strip()


def read_recovery_log(text):
    """What the server log says about the recovery (English messages), as a dict.

    stopping: the 'recovery stopping ...' message (the target was found);
    redo_lsn: the LSN of 'redo done at'; last_xact: 'last completed transaction
    was at log time ...'; ended_early: 13+ said the archive ended before the
    target; shutdown: 'shutdown at recovery target'; fatal: the last FATAL/PANIC;
    fetch_stop: 'WALNAME: reason' of pg_wal_fetch's stop line (the cause of
    that FATAL); restored: the last WAL segment restored from the archive
    (restored_count: how many);
    wal_problem: the last line saying why the WAL read ended (an invalid
    record, a bad checksum).
    """
    events = {"stopping": None, "redo_lsn": None, "last_xact": None, "ended_early": False,
              "shutdown": False, "fatal": None, "paused": False, "fetch_stop": None,
              "restored": None, "restored_count": 0, "wal_problem": None}
    for line in text.splitlines():
        if FETCH_STOP_MARK in line:
            events["fetch_stop"] = line.split(FETCH_STOP_MARK, 1)[1].strip()
            continue
        if "recovery stopping" in line:
            events["stopping"] = log_message(line)
        elif "redo done at" in line:
            match = LOG_LSN_RE.search(line.split("redo done at", 1)[1])
            events["redo_lsn"] = match.group(1) if match else None
        elif "last completed transaction was at log time" in line:
            events["last_xact"] = line.split("log time", 1)[1].strip()
        elif "recovery ended before configured recovery target was reached" in line:
            events["ended_early"] = True
        elif "shutdown at recovery target" in line:
            events["shutdown"] = True
        elif "pausing at the end of recovery" in line or "recovery has paused" in line:
            events["paused"] = True
        elif RESTORED_RE.search(line):
            events["restored"] = RESTORED_RE.search(line).group(1)
            events["restored_count"] += 1
        elif WAL_PROBLEM_RE.search(line) and "FATAL:" not in line and "PANIC:" not in line:
            events["wal_problem"] = log_message(line)
        if "FATAL:" in line or "PANIC:" in line:
            events["fatal"] = log_message(line)
    return events


def why_recovery_stopped(events):
    """The server log's own reason, as ' (server log: ...)', or ''.

    pg_wal_fetch's stop line is the cause when there is one (the FATAL that
    follows it is the consequence); else the last FATAL; else the last line
    saying why the WAL read ended.
    """
    why = (FETCH_STOP_MARK.strip() + " " + events["fetch_stop"] if events["fetch_stop"]
           else events["fatal"] or events["wal_problem"])
    return " (server log: %s)" % why if why else ""


def parse_segment_size(text):
    """Bytes per WAL segment from pg_controldata's line (16 MiB when unreadable)."""
    return int(text) if text.strip().isdigit() and int(text) > 0 else DEFAULT_SEGMENT_SIZE


def waiting_for_wal(sets, newest):
    """{set name: stop segment} of the sets waiting for WAL (waiting_segment): their
    stop segment is in no archive yet. Empty newest (no source listed): {}."""
    waiting = {}
    for one in sets:
        segment = waiting_segment(one, newest)
        if segment:
            waiting[one.name] = segment
    return waiting


def archive_gap(last_replayed, newest, follow_timelines, segment_size=DEFAULT_SEGMENT_SIZE):
    """(missing segment, newest archived segment) when the archive holds WAL after the
    segment replay ended in, else None.

    last_replayed: the last segment restored (or the one holding the LSN
    reached); newest: each source's newest segment (by position, any
    timeline). A newer segment on the same timeline means a hole: the
    segment after last_replayed is missing or damaged everywhere. With
    recovery_target_timeline = latest, a newer segment on a later timeline
    counts too (replay should have followed it); with current or an ID it
    does not.
    """
    timeline, number = segment_position(last_replayed, segment_size)
    beyond = []
    for name in newest:
        other_timeline, other_number = segment_position(name, segment_size)
        if other_number > number and (other_timeline == timeline
                                      or (follow_timelines and other_timeline > timeline)):
            beyond.append((other_number, other_timeline, name))
    if not beyond:
        return None
    return segment_name(timeline, number + 1, segment_size), max(beyond)[2]


def status_sql(major):
    """One row: in recovery | paused | last replayed LSN | last replayed commit time."""
    if major >= (14, 0):
        paused = "pg_get_wal_replay_pause_state()"
    elif major >= (10, 0):
        paused = "pg_is_wal_replay_paused()::text"
    else:
        paused = "pg_is_xlog_replay_paused()::text"
    lsn = "pg_last_wal_replay_lsn()" if major >= (10, 0) else "pg_last_xlog_replay_location()"
    # The pause functions raise an error outside recovery, hence the CASE.
    return ("SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN %s "
            "ELSE 'not paused' END, %s, pg_last_xact_replay_timestamp()" % (paused, lsn))


def parse_status(line):
    """(in_recovery, paused, lsn, last transaction time) from status_sql's row."""
    fields = (line.strip().split("|") + ["", "", "", ""])[:4]
    return fields[0] == "t", fields[1] in ("paused", "true"), fields[2], fields[3]


def recovery_outcome(target_kind, status, events):
    """Where a recovery stands: waiting, paused, promoted, shut down, ended early, failed.

    status is parse_status's tuple, or None when the server no longer runs.
    A server out of recovery without a 'recovery stopping' line did not find
    its target: before 13 PostgreSQL opens at the end of the archive silently.
    """
    if events["ended_early"]:
        return "ended early"
    if status is None:
        return "shut down" if events["shutdown"] else "failed"
    in_recovery, paused = status[0], status[1]
    if in_recovery:
        return "paused" if paused and events["stopping"] else "waiting"
    if target_kind == "latest" or events["stopping"]:
        return "promoted"
    return "ended early"


def commit_after_target(last_transaction, target_time, inclusive, snapshot_set):
    """Why a copy restored to target_time holds a transaction committed after it, or None.

    The set's pgzfs:db_time is the latest commit it holds (the primary's
    clock); last_transaction the copy's last replayed commit (text as the
    server prints it, '?' when none was replayed).
    """
    try:
        held = parse_time(snapshot_set.get("db_time", ""))
    except ValueError:
        held = None
    if held is not None and (held > target_time or (held == target_time and not inclusive)):
        return "set %s holds transactions committed up to %s (pgzfs:db_time), after the target %s" % (
            snapshot_set.name, iso_time(held), iso_time(target_time))
    try:
        last = parse_time(last_transaction or "")
    except ValueError:
        return None
    if last > target_time or (last == target_time and not inclusive):
        return "its last replayed transaction committed at %s, after the target %s" % (
            iso_time(last), iso_time(target_time))
    return None


def replay_sample(elapsed, status):
    """(elapsed seconds, replayed LSN as an integer, last commit as a datetime or None)
    of a status row (parse_status), or None while it names no LSN."""
    try:
        lsn = parse_lsn(status[2]) if status else None
    except ValueError:
        lsn = None
    if lsn is None:
        return None
    try:
        commit = parse_time(status[3]) if status[3] else None
    except ValueError:
        commit = None
    return elapsed, lsn, commit


def replay_estimate(first, last, target, stop_lsn=None):
    """(bytes of WAL replayed per second, seconds left to the target or None) from two
    replay_samples. Seconds left: a time target by the pace at which commit times
    advance; an LSN target, or --immediate (the set's stop_lsn), by the byte rate.
    None when the target cannot be placed (xid, name, latest) or nothing moved yet."""
    if first is None or last is None or last[0] <= first[0]:
        return None, None
    seconds = float(last[0] - first[0])
    rate = max(last[1] - first[1], 0) / seconds
    left = None
    if target.kind == "time" and first[2] is not None and last[2] is not None and last[2] > first[2]:
        pace = (last[2] - first[2]).total_seconds() / seconds
        left = max((target.value - last[2]).total_seconds(), 0.0) / pace
    else:
        goal = target.value if target.kind == "lsn" else stop_lsn if target.kind == "immediate" else None
        if goal is not None and rate > 0:
            left = max(goal - last[1], 0) / rate
    return rate, left


def progress_line(status, events, elapsed, rate=None, left=None):
    """One line on a recovery under way: where replay is, how fast, how long to go."""
    if status is None:
        where = "not answering yet (replaying up to consistency)"
    else:
        where = "replay at LSN %s, last commit %s" % (status[2] or "?", status[3] or "none yet")
    if rate is not None:
        where += " (%.1f MB/s)" % (rate / 1e6)
    return "recovering for %ds: %s; %d segment(s) restored from the archive%s%s" % (
        elapsed, where, events["restored_count"],
        ", the last %s" % events["restored"] if events["restored"] else "",
        "; about %ds to the target" % round(left) if left is not None else "")


def drill_state_text(code, set_name, started, finished, seconds, message):
    """The text of last-drill.json: {"exit_code": 0|1|2|3, "status": "OK"|"WARNING"|"CRITICAL"|
    "UNKNOWN", "set": the set drilled or null (none chosen), "started", "finished": Unix times,
    "seconds": how long it ran, "message": the Nagios line it printed}."""
    return json.dumps({"exit_code": code, "status": NAGIOS_STATUS.get(code, "UNKNOWN"), "set": set_name,
                       "started": started, "finished": finished, "seconds": seconds, "message": message},
                      sort_keys=True) + "\n"


def stderr_level(command, verbose, terminal):
    """The least level logged to stderr. A drill not on a terminal runs from cron or a
    monitoring agent, which mail or keep whatever reaches stderr: its info lines (the set
    chosen, progress) go to syslog only, its warnings and errors to both."""
    if verbose:
        return logging.DEBUG
    return logging.WARNING if command == "drill" and not terminal else logging.INFO


def format_timings(timings):
    """'clone 0.12s, start 1.40s; total 1.52s'."""
    parts = ["%s %.2fs" % (name, seconds) for name, seconds in timings]
    return "%s; total %.2fs" % (", ".join(parts) or "no step", sum(s for _, s in timings))


def later_snapshots(order, snapshot):
    """The snapshots of snapshot's dataset that come after it in order.

    order: snapshot ids, oldest first. ZFS: its own creation order (`zfs list
    -s createtxg` sorts by the exact number; we never read the number, which
    zfs-fuse prints as 1.41K past 1000); btrfs: by the UTC stamp of the set name.
    """
    dataset = snapshot.rpartition("@")[0]
    own = [name for name in order if name.rpartition("@")[0] == dataset]
    if snapshot not in own:
        raise Failure("snapshot %s does not exist" % snapshot, 1)
    return own[own.index(snapshot) + 1:]


def not_later_sets(later, snapshot_set, sets):
    """Those of later that are not a snapshot of one of sets stamped after snapshot_set.

    The stamp is the UTC time we wrote into the set name: a rollback that
    would destroy anything else (a snapshot made by hand, another tool's, a set
    of another config) is refused, whatever ZFS's own order says.
    """
    stamp = snapshot_stamp("@" + snapshot_set.name)
    ours = set()
    for one in sets:
        if stamp and snapshot_stamp("@" + one.name) > stamp:
            ours.update(one.snapshot(dataset) for dataset in one.present)
    return [name for name in later if name not in ours]


# -- btrfs: where snapshots, clones and their markers live (DEVELOPERS.md) ------


def btrfs_marker_path(subvolume, clone):
    """The marker of a clone made from a snapshot of subvolume: PARENT/.pgzfs/clones/CLONE.json."""
    return os.path.join(btrfs_snapshot_dir(subvolume), BTRFS_CLONE_DIR,
                        os.path.basename(clone) + BTRFS_METADATA_SUFFIX)


def btrfs_clone_root(subvolume, mount_root, explicit, mounts):
    """The directory that gets the clone (a writable snapshot) of subvolume's snapshot.

    A snapshot cannot cross file systems: mount_root (--to, [restore]
    mount_root) is used when it is on the same btrfs as the snapshot directory
    (same device in /proc/mounts). Otherwise the clone goes beside the
    subvolume, PARENT/NAME_restore_SET as DEVELOPERS.md names it, unless the
    directory was asked for explicitly (--to): that is refused (exit 2).
    """
    parent = os.path.dirname(subvolume)
    here = mount_of(parent, mounts) or ("", "", "")
    there = mount_of(mount_root, mounts) or ("", "", "")
    if here[2] == "btrfs" and there[2] == "btrfs" and here[0] == there[0]:
        return mount_root
    if explicit:
        raise Failure("--to %s is on %s (%s), not on the btrfs of %s (%s): a snapshot cannot cross "
                      "file systems; give a directory on that btrfs, or leave out --to to put the "
                      "clones beside the subvolumes" % (mount_root, there[2] or "?", there[1] or "?",
                                                        subvolume, here[0] or "?"), 2)
    return parent


def snapshot_stamp(snapshot):
    """The UTC stamp that ends a set name ('20261125T040100Z'), '' if none: btrfs order."""
    match = SET_STAMP_RE.search(snapshot.rpartition("@")[2])
    return match.group(1) if match else ""


def marker_text(set_name, snapshot, clone, kind, created):
    """The JSON of a clone marker (DEVELOPERS.md): pg_zfs_snap.py reads snapshot and path."""
    return json.dumps({"clone_of": set_name, "snapshot": snapshot, "path": clone, "kind": kind,
                       "created": created}, indent=1, sort_keys=True) + "\n"


def parse_marker(text):
    """{clone_of, snapshot, path, kind} of a marker; ValueError if snapshot or path is missing."""
    found = json.loads(text)
    if not isinstance(found, dict) or not all(isinstance(found.get(key), str) and found[key]
                                              for key in ("snapshot", "path")):
        raise ValueError("no snapshot and path")
    if "@" not in found["snapshot"] or not found["path"].startswith("/"):
        raise ValueError("snapshot %r or path %r is malformed" % (found["snapshot"], found["path"]))
    set_name = found.get("clone_of") if isinstance(found.get("clone_of"), str) else ""
    return {"snapshot": found["snapshot"], "path": os.path.normpath(found["path"]),
            "clone_of": set_name or found["snapshot"].rpartition("@")[2],
            "kind": found.get("kind") if found.get("kind") in CLONE_KINDS else None}


def btrfs_rollback_paths(subvolume, set_name, stamp):
    """(new, old) of a btrfs rollback: PARENT/NAME_rollback_SET is made from the set,
    and PARENT/NAME moves to PARENT/NAME_before_rollback_STAMP before it takes its place."""
    return ("%s_rollback_%s" % (subvolume, set_name), "%s_before_rollback_%s" % (subvolume, stamp))


def set_summary(snapshot_set, clones, waiting=None):
    """The dict `list --json` prints for a set (no base64 files); waiting_for_wal is
    the stop segment no archive holds yet (waiting_for_wal), else None."""
    summary = dict((key, snapshot_set.get(key)) for key in LIST_KEYS if key != "set")
    summary.update({"name": snapshot_set.name, "complete": snapshot_set.complete,
                    "problems": set_problems(snapshot_set),
                    "earliest_target": iso_time(set_stop_time(snapshot_set)) if set_stop_time(snapshot_set) else None,
                    "waiting_for_wal": waiting,
                    "clones": sorted(clones)})
    return summary


def waiting_note(set_name, segment):
    """One line: why a complete set cannot be restored yet."""
    return ("set %s is waiting for WAL: its stop segment %s is in no archive yet (the primary's current "
            "segment; archived at its next WAL switch, see archive_timeout)" % (set_name, segment))


# ---------------------------------------------------------------------------
# Adapters: zfs, PostgreSQL (pg_ctl, psql), files. Each outside call is here.
# ---------------------------------------------------------------------------

class Zfs(object):
    """The zfs commands pg_zfs_restore needs (zfs-fuse: no -p, one name per call).

    Btrfs offers the same methods; the attributes and methods before _run are
    the seam between the two (what differs in placing, naming and rolling back).
    """

    unreadable = ()                 # snapshots without readable metadata: none on ZFS
    later_verb = "destroys"         # what `rollback` does to later snapshots
    clones_pin_snapshots = True     # a later snapshot with a clone cannot be destroyed

    def clone_path(self, dataset, kind, set_name, mount_root, explicit):
        """(clone dataset, its mountpoint)."""
        clone = clone_dataset(dataset, kind, set_name)
        return clone, clone_mountpoint(mount_root, clone)

    def clone_target_problem(self, mountpoint):
        if os.path.isdir(mountpoint) and os.listdir(mountpoint):
            return "mountpoint %s exists and is not empty" % mountpoint
        return None

    def describe_clone(self, snapshot, clone, mountpoint, set_name):
        return "zfs clone -o mountpoint=%s -o %s=%s %s %s" % (mountpoint, CLONE_OF, set_name, snapshot, clone)

    def describe_destroy(self, clone):
        return "zfs destroy %s" % clone

    def rollback_set(self, snapshot_set, later):
        """Destroy exactly the later snapshots listed, then `zfs rollback` WITHOUT -r:
        should anything newer have appeared meanwhile, zfs refuses instead of destroying it."""
        for snapshot in later:
            self._run("destroy", snapshot)
            print("destroyed %s" % snapshot)
        done = []
        for dataset in snapshot_set.datasets:
            code, _, err = self._run("rollback", snapshot_set.snapshot(dataset), check=False)
            if code != 0:
                raise Failure("zfs rollback %s failed: %s; rolled back so far: %s" % (
                    snapshot_set.snapshot(dataset), (err.strip().splitlines() or ["?"])[-1],
                    " ".join(done) or "none"), 1)
            done.append(dataset)
            print("rolled back %s" % snapshot_set.snapshot(dataset))

    def __init__(self, program="zfs"):
        self.program = shutil.which(program) or "/sbin/zfs"

    def _run(self, *args, **kwargs):
        return run([self.program] + list(args), timeout=ZFS_TIMEOUT, **kwargs)

    def snapshot_rows(self, pools):
        """(dataset, snapshot name, 0, {key: value}) of every snapshot under pools
        (group_sets' rows; the bytes used are pg_zfs_snap.py's to show)."""
        columns = ["name"] + [P + key for key in LIST_KEYS]
        _, out, _ = self._run("list", "-H", "-t", "snapshot", "-o", ",".join(columns), "-r", *pools)
        rows = []
        for line in out.splitlines():
            fields = line.split("\t")
            if len(fields) != len(columns) or "@" not in fields[0]:
                continue
            dataset, _, name = fields[0].partition("@")
            properties = dict((key, value) for key, value in zip(LIST_KEYS, fields[1:]) if value != "-")
            rows.append((dataset, name, 0, properties))
        return rows

    def file_property(self, snapshot, key):
        """The bytes a base64 property holds (b'' when unset or empty)."""
        _, out, _ = self._run("get", "-H", "-o", "value", P + key, snapshot)
        text = "".join(out.split())
        if text in ("", "-"):
            return b""
        try:
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (ValueError, TypeError):
            raise Failure("%s: %s%s is not base64" % (snapshot, P, key), 1)

    def filesystems(self, pools):
        """[{name, origin, clone_of, mountpoint}] of every file system under pools."""
        _, out, _ = self._run("list", "-H", "-t", "filesystem", "-o",
                              "name,origin,%s,mountpoint" % CLONE_OF, "-r", *pools)
        result = []
        for line in out.splitlines():
            fields = line.split("\t")
            if len(fields) == 4:
                result.append(dict(zip(("name", "origin", "clone_of", "mountpoint"),
                                       [None if f == "-" else f for f in fields])))
        return result

    def mountpoints(self, datasets):
        """{dataset: mountpoint}."""
        _, out, _ = self._run("get", "-H", "-o", "name,value", "mountpoint", *datasets)
        return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)

    def snapshots_in_order(self, dataset):
        """Snapshot names of dataset in ZFS's creation order, oldest first.

        zfs sorts by the exact createtxg; the number itself is never read
        (zfs-fuse has no -p and prints 1.41K past txg 1000).
        """
        _, out, _ = self._run("list", "-H", "-t", "snapshot", "-o", "name", "-s", "createtxg",
                              "-r", dataset)
        return [line.strip() for line in out.splitlines()
                if line.strip().rpartition("@")[0] == dataset]

    def clone(self, snapshot, clone, mountpoint, set_name):
        """zfs clone; when zfs made the clone but could not mount it, destroy it (unrecorded,
        it would block the next restore) and fail. A clone that existed already is another
        restore's or drill's of the same set, started at the same moment: never destroyed."""
        code, _, err = self._run("clone", "-o", "mountpoint=" + mountpoint, "-o", "%s=%s" % (CLONE_OF, set_name),
                                 snapshot, clone, check=False)
        if code == 0:
            return
        found, origin, _ = self._run("get", "-H", "-o", "value", "origin", clone, check=False)
        if found == 0 and origin.strip() == snapshot and "already exists" not in err:
            self.destroy(clone)
        raise Failure("zfs clone %s %s failed: %s" % (snapshot, clone, (err.strip().splitlines()
                                                                        or ["exit code %d" % code])[-1]), 1)

    def destroy(self, dataset):
        """Destroy a clone, retrying while it is busy (right after pg_ctl stop)."""
        give_up = time.monotonic() + DESTROY_BUSY_SECONDS
        while True:
            code, _, err = self._run("destroy", dataset, check=False)
            if code == 0:
                return
            if "does not exist" in err:
                return
            if "busy" not in err or time.monotonic() > give_up:
                mounted = [point for source, point, _ in read_mounts() if source == dataset]
                raise Failure("zfs destroy %s: %s%s" % (dataset, err.strip(), busy_hint(mounted[:1]) if "busy" in err
                                                        else ""), 1)
            time.sleep(BUSY_SLEEP)


def users_of(paths):
    """['PID NAME (cwd|root|fd)'] of the processes whose working directory, root or an
    open file lies below one of paths (what keeps a clone busy), from /proc."""
    def entries(directory):
        try:
            return os.listdir(directory)
        except OSError:         # gone meanwhile, or another user's (not root)
            return []
    prefixes = [path.rstrip("/") + "/" for path in paths]
    found = []
    for pid in sorted((entry for entry in entries("/proc") if entry.isdigit()), key=int):
        links = [("cwd", "/proc/%s/cwd" % pid), ("root", "/proc/%s/root" % pid)]
        links += [("fd", "/proc/%s/fd/%s" % (pid, fd)) for fd in entries("/proc/%s/fd" % pid)]
        for kind, link in links:
            try:
                target = os.readlink(link) + "/"
            except OSError:
                continue
            if any(target.startswith(prefix) for prefix in prefixes):
                try:
                    with open("/proc/%s/comm" % pid) as comm:
                        name = comm.read().strip()
                except (IOError, OSError):
                    name = "?"
                found.append("%s %s (%s)" % (pid, name, kind))
                break
    return found


def busy_hint(paths):
    """What a 'busy' failure adds: who holds the clone, or how to find out."""
    holders = users_of(paths) if paths else []
    return " (still busy after %d s: %s)" % (DESTROY_BUSY_SECONDS, ", ".join(holders) if holders else
                                             "a process has its working directory or a file there; "
                                             "`fuser -vm MOUNTPOINT` names it")


class Btrfs(object):
    """The same methods as Zfs, on btrfs subvolumes (DEVELOPERS.md, btrfs layout).

    A dataset is a subvolume path, a snapshot the id SUBVOLUME@SET of the
    read-only PARENT/.pgzfs/NAME@SET with its metadata in NAME@SET.json. A clone
    is a writable snapshot whose name is its path (no mount needed); it keeps no
    link to its origin, so its marker PARENT/.pgzfs/clones/CLONE.json is written
    before it is made and removed after it is deleted: pg_zfs_snap.py prune
    skips a set while a marker names one of its snapshots and the clone exists.
    """

    later_verb = "keeps"            # rollback swaps subvolumes; every set stays
    clones_pin_snapshots = False    # a writable snapshot does not depend on its source

    def __init__(self, subvolumes, program="btrfs"):
        self.program = shutil.which(program) or next(
            (p for p in BTRFS_CANDIDATES if os.access(p, os.X_OK)), program)
        self.subvolumes = subvolumes
        self.unreadable = []

    def _run(self, *args, **kwargs):
        return run([self.program] + list(args), timeout=BTRFS_TIMEOUT, **kwargs)

    def _metadata(self, snapshot):
        with open(btrfs_snapshot_path(snapshot) + BTRFS_METADATA_SUFFIX) as handle:
            return parse_metadata(handle.read())

    def _snapshot_ids(self, subvolume):
        """Snapshot ids SUBVOLUME@SET of every read-only snapshot in PARENT/.pgzfs."""
        directory = btrfs_snapshot_dir(subvolume)
        head = os.path.basename(subvolume) + "@"
        return [subvolume + "@" + entry[len(head):] for entry in sorted(list_dir(directory))
                if entry.startswith(head) and not entry.endswith(BTRFS_METADATA_SUFFIX)
                and is_subvolume(os.path.join(directory, entry))]

    def snapshot_rows(self, subvolumes):
        """(subvolume, set name, 0, {key: value}) of every snapshot with readable metadata;
        the others go into self.unreadable as (snapshot id, why): not backups."""
        rows = []
        self.unreadable = []
        for subvolume in subvolumes:
            for snapshot in self._snapshot_ids(subvolume):
                try:
                    properties = self._metadata(snapshot)
                except (OSError, IOError, ValueError) as error:
                    self.unreadable.append((snapshot, getattr(error, "strerror", None) or str(error)))
                    continue
                rows.append((subvolume, snapshot.rpartition("@")[2], 0,
                             dict((k, v) for k, v in properties.items() if k in LIST_KEYS)))
        return rows

    def file_property(self, snapshot, key):
        """The bytes a base64 metadata key holds (b'' when absent or empty)."""
        try:
            text = "".join(self._metadata(snapshot).get(key, "").split())
        except (OSError, IOError, ValueError) as error:
            raise Failure("%s: no readable metadata (%s)" % (snapshot, getattr(error, "strerror", None)
                                                             or error), 1)
        if not text:
            return b""
        try:
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (ValueError, TypeError):
            raise Failure("%s: %s in %s%s is not base64" % (snapshot, key, btrfs_snapshot_path(snapshot),
                                                            BTRFS_METADATA_SUFFIX), 1)

    def filesystems(self, subvolumes):
        """[{name, origin, clone_of, mountpoint, marker, exists}] of every clone marker in
        the subvolumes' snapshot directories (exists: the clone is still a subvolume)."""
        result = []
        for directory in sorted(set(btrfs_snapshot_dir(s) for s in subvolumes)):
            markers = os.path.join(directory, BTRFS_CLONE_DIR)
            for entry in sorted(list_dir(markers)):
                if not entry.endswith(BTRFS_METADATA_SUFFIX) or entry.startswith("."):
                    continue
                path = os.path.join(markers, entry)
                try:
                    marker = parse_marker(read_text_file(path))
                except (ValueError, TypeError) as error:
                    log.warning("clone marker %s unreadable (%s): ignored", path, error)
                    continue
                exists = is_subvolume(marker["path"])
                result.append({"name": marker["path"], "origin": marker["snapshot"],
                               "clone_of": marker["clone_of"], "mountpoint": marker["path"] if exists else None,
                               "marker": path, "exists": exists})
        return result

    def mountpoints(self, subvolumes):
        """{subvolume: its path}: a subvolume is its own mountpoint."""
        return dict((subvolume, subvolume) for subvolume in subvolumes)

    def snapshots_in_order(self, subvolume):
        """Snapshot ids of subvolume, oldest first by the stamp of their set name."""
        return sorted(self._snapshot_ids(subvolume), key=lambda snapshot: (snapshot_stamp(snapshot), snapshot))

    def clone_path(self, subvolume, kind, set_name, mount_root, explicit):
        """(clone path, the same path): ROOT/NAME_KIND_SET, ROOT from btrfs_clone_root."""
        # /proc/mounts names real paths: compare those, place by the configured ones.
        real_root = os.path.realpath(mount_root)
        root = btrfs_clone_root(os.path.realpath(subvolume), real_root, explicit, read_mounts())
        root = mount_root if root == real_root else os.path.dirname(subvolume)
        path = os.path.join(root, "%s_%s_%s" % (os.path.basename(subvolume), kind, set_name))
        return path, path

    def clone_target_problem(self, mountpoint):
        # btrfs would put the snapshot INSIDE an existing directory.
        if os.path.lexists(mountpoint):
            return "%s exists already" % mountpoint
        return None

    def describe_clone(self, snapshot, clone, mountpoint, set_name):
        return ("write clone marker %s, then btrfs subvolume snapshot %s %s"
                % (btrfs_marker_path(snapshot.rpartition("@")[0], clone), btrfs_snapshot_path(snapshot), clone))

    def describe_destroy(self, clone):
        return "btrfs subvolume delete %s, then remove its clone marker" % clone

    def clone(self, snapshot, clone, mountpoint, set_name):
        """Marker first (written atomically), then the writable snapshot; no marker left on failure."""
        subvolume = snapshot.rpartition("@")[0]
        marker = btrfs_marker_path(subvolume, clone)
        if os.path.lexists(clone):
            raise Failure("%s exists already" % clone, 1)
        make_private_dir(os.path.dirname(marker))
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_atomically(marker, marker_text(set_name, snapshot, clone, clone_kind(clone, set_name), created))
        code, _, err = self._run("subvolume", "snapshot", btrfs_snapshot_path(snapshot), clone, check=False)
        if code != 0:
            remove_file(marker)
            raise Failure("btrfs subvolume snapshot %s %s: %s" % (btrfs_snapshot_path(snapshot), clone,
                                                                  err.strip()), 1)

    def destroy(self, clone):
        """Delete the clone (retrying while busy), then every marker naming it."""
        if os.path.lexists(clone):
            if not is_subvolume(clone):
                raise Failure("%s is not a btrfs subvolume: not deleted" % clone, 1)
            give_up = time.monotonic() + DESTROY_BUSY_SECONDS
            while True:
                code, _, err = self._run("subvolume", "delete", clone, check=False)
                if code == 0:
                    break
                if "busy" not in err.lower() or time.monotonic() > give_up:
                    raise Failure("btrfs subvolume delete %s: %s%s" % (
                        clone, err.strip(), busy_hint([clone]) if "busy" in err.lower() else ""), 1)
                time.sleep(BUSY_SLEEP)
        for fs in self.filesystems(self.subvolumes):
            if fs["name"] == os.path.normpath(clone):
                remove_file(fs["marker"])

    def rollback_set(self, snapshot_set, later):
        """Replace each subvolume by a writable snapshot of the set, all or none.

        Every NAME_rollback_SET is made first; then, subvolume by subvolume,
        PARENT/NAME is renamed to NAME_before_rollback_STAMP and the new one
        renamed to PARENT/NAME. The old subvolumes are kept (printed) for the
        operator to delete; the sets in PARENT/.pgzfs (later among them) are not touched.
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moves = []
        for subvolume in snapshot_set.datasets:
            new, old = btrfs_rollback_paths(subvolume, snapshot_set.name, stamp)
            if not is_subvolume(subvolume):
                raise Failure("%s is not a btrfs subvolume" % subvolume, 1)
            for path in (new, old):
                if os.path.lexists(path):
                    raise Failure("%s exists already: move it away first" % path, 1)
            moves.append((subvolume, btrfs_snapshot_path(snapshot_set.snapshot(subvolume)), new, old))
        made = []
        try:
            for subvolume, source, new, old in moves:
                self._run("subvolume", "snapshot", source, new)
                made.append(new)
        except Failure:
            for new in made:
                self._run("subvolume", "delete", new, check=False)
            raise
        swapped = []
        try:
            for subvolume, source, new, old in moves:
                os.rename(subvolume, old)
                swapped.append((subvolume, new, old))
                os.rename(new, subvolume)
                fsync_directory(os.path.dirname(subvolume))
        except OSError as error:
            for subvolume, new, old in reversed(swapped):
                with contextlib.suppress(OSError):
                    if not os.path.lexists(new):
                        os.rename(subvolume, new)
                    os.rename(old, subvolume)
            for subvolume, source, new, old in moves:
                if is_subvolume(new):
                    self._run("subvolume", "delete", new, check=False)
            raise Failure("rollback of %s failed, subvolumes put back: %s" % (snapshot_set.name, error), 1)
        for subvolume, source, new, old in moves:
            print("rolled back %s: now a writable snapshot of %s; the old subvolume is kept as %s "
                  "(remove it with: btrfs subvolume delete %s)" % (subvolume, source, old, old))

def pg_bindir(config, major):
    """The directory of pg_ctl of this major version (find_program): the server's programs."""
    return os.path.dirname(find_program("pg_ctl", config.str("postgres", "bindir", ""), major_text(major)))


class Server(object):
    """A PostgreSQL server on a clone, driven as its OS user through runuser."""

    def __init__(self, bindir, user, pgdata, socket_dir=None, port=None, dbname="postgres",
                 log_file=None):
        self.bindir = bindir
        self.user = user
        self.pgdata = pgdata
        self.socket_dir = socket_dir
        self.port = port
        self.dbname = dbname
        self.log_file = log_file

    def _as_user(self, program, *args):
        return self.as_user([os.path.join(self.bindir, program)] + list(args))

    def as_user(self, argv):
        return as_user(self.user, argv)

    def start(self, timeout):
        """pg_ctl start -w; (exit code, last stderr line). A failure is judged by the caller."""
        code, out, err = run(self._as_user("pg_ctl", "start", "-w", "-t", str(timeout), "-D", self.pgdata,
                                           "-l", self.log_file), timeout=timeout + 30, check=False)
        return code, (err.strip().splitlines() or out.strip().splitlines() or [""])[-1]

    def running(self):
        code, _, _ = run(self._as_user("pg_ctl", "status", "-D", self.pgdata), timeout=30, check=False)
        return code == 0

    def stop(self):
        """Stop fast, else immediate; no error if it is not running."""
        if not self.running():
            return
        code, _, err = run(self._as_user("pg_ctl", "stop", "-w", "-m", "fast", "-t", str(STOP_TIMEOUT),
                                         "-D", self.pgdata), timeout=STOP_TIMEOUT + 30, check=False)
        if code != 0 and self.running():
            log.warning("pg_ctl stop -m fast: %s; stopping with -m immediate", err.strip())
            run(self._as_user("pg_ctl", "stop", "-w", "-m", "immediate", "-D", self.pgdata),
                timeout=STOP_TIMEOUT, check=False)

    def _psql(self, sql, check):
        conninfo = "dbname=%s connect_timeout=5" % self.dbname
        return run(self._as_user("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                                 "-h", self.socket_dir, "-p", str(self.port), "-d", conninfo,
                                 "-c", sql), timeout=PSQL_TIMEOUT, check=check)

    def status(self, major):
        """parse_status of the recovery status row, or None if it does not answer yet."""
        try:
            code, out, _ = self._psql(status_sql(major), check=False)
        except Failure:
            return None
        return parse_status(out) if code == 0 and out.strip() else None

    def execute(self, sql):
        """Run SQL; a Failure with the server's error if it fails."""
        code, out, err = self._psql(sql, check=False)
        if code != 0:
            raise Failure("query %r failed: %s" % (sql[:60], (err.strip().splitlines() or ["?"])[-1]), 1)
        return out.strip()

    def amcheck(self):
        program = os.path.join(self.bindir, "pg_amcheck")
        if not os.access(program, os.X_OK):
            raise Failure("pg_amcheck is not in %s (it comes with PostgreSQL 14+)" % self.bindir, 1)
        code, out, err = run(self._as_user("pg_amcheck", "-h", self.socket_dir, "-p", str(self.port),
                                           "--all", "--install-missing"), timeout=3600, check=False)
        if code != 0:
            lines = (out + err).strip().splitlines() or ["exit code %d" % code]
            raise Failure("pg_amcheck found problems: %s" % lines[0], 1)

    def setting(self, name):
        """The value PostgreSQL reads for a setting in this PGDATA's files (postgres -C)."""
        code, out, err = run(self._as_user("postgres", "-D", self.pgdata, "-C", name), timeout=30, check=False)
        if code != 0:
            raise Failure("postgres -D %s -C %s: %s" % (self.pgdata, name, (
                [line for line in err.splitlines() if "FATAL" in line] or err.strip().splitlines()
                or ["exit code %d" % code])[-1].strip()), 1)
        return out.strip()

    def control_value(self, key):
        """One line of pg_controldata (empty when unavailable)."""
        code, out, _ = run(self._as_user("pg_controldata", "-D", self.pgdata), timeout=30, check=False)
        for line in out.splitlines():
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
        return ""


def as_user(user, argv):
    """argv run as user when we are someone else: runuser by its full path (cron's PATH,
    /usr/bin:/bin, lacks the sbin directories it lives in), else su."""
    if pwd.getpwuid(os.geteuid()).pw_name == user:
        return argv
    return switch_user_argv(user, argv, next((p for p in RUNUSER_CANDIDATES if os.access(p, os.X_OK)),
                                             shutil.which("runuser")))


def switch_user_argv(user, argv, runuser):
    """[runuser -u USER -- argv], or without runuser [su -s /bin/sh USER -c 'argv'] (quoted)."""
    if runuser:
        return [runuser, "-u", user, "--"] + argv
    return [SU, "-s", "/bin/sh", user, "-c", " ".join(shlex.quote(arg) for arg in argv)]


def fetch_script_path():
    """pg_wal_fetch.py beside this script: the copies' restore_command."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "pg_wal_fetch.py")


def sets_waiting(config, sets):
    """waiting_for_wal of the sets, the archive listed by pg_wal_fetch.py --check (a warning
    and {} when no source could be listed)."""
    if not [one for one in sets if one.complete]:
        return {}
    newest, last_line = archive_listing(fetch_script_path(), os.path.abspath(config.path),
                                       config.str("postgres", "user", "postgres"))
    if not newest:
        log.warning("no archive source could be listed (pg_wal_fetch.py --check: %s): whether each set's "
                    "stop segment is archived is unknown", last_line)
    return waiting_for_wal(sets, newest)


def archive_listing(fetch_script, config_file, user):
    """(each source's newest WAL segment, pg_wal_fetch.py --check's last line), run as
    the PostgreSQL user as restore_command is; [] when no source could be listed."""
    try:
        code, out, err = run(as_user(user, [fetch_script, "-c", config_file, "--check"]),
                             timeout=CHECK_TIMEOUT, check=False)
    except Failure as failure:
        return [], str(failure)
    return newest_in_check(out), ((err + out).strip().splitlines() or ["exit code %d" % code])[-1]


def owner_of(user):
    """(uid, gid) of the PostgreSQL OS user."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise Failure("[postgres] user %s does not exist" % user, 2)
    return entry.pw_uid, entry.pw_gid


def write_file(path, data, mode, owner):
    """Write bytes to path: temp file in the same directory, fsync, chown, rename."""
    temp = "%s.pg_zfs_restore.%d" % (path, os.getpid())
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.chown(temp, owner[0], owner[1])
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def read_bytes(path):
    with open(path, "rb") as source:
        return source.read()


def read_text_file(path):
    """A file's text, or '' if it is not there."""
    try:
        with open(path, errors="replace") as source:
            return source.read()
    except (OSError, IOError):
        return ""


def make_dir(path, mode, owner=None):
    os.makedirs(path, mode)
    os.chmod(path, mode)
    if owner:
        os.chown(path, owner[0], owner[1])


def postmaster_pid(pgdata):
    """The pid in PGDATA/postmaster.pid if that process lives, else None."""
    try:
        with open(os.path.join(pgdata, "postmaster.pid")) as pidfile:
            pid = int(pidfile.readline().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, IOError, ValueError):
        return None


def live_postmasters(roots, depth=3):
    """[(pgdata, pid)] of running servers whose PGDATA is at most depth levels under roots."""
    found = []
    for root in roots:
        for path, dirs, files in os.walk(root):
            if path[len(root):].count(os.sep) >= depth:
                dirs[:] = []
            if "postmaster.pid" in files:
                pid = postmaster_pid(path)
                if pid:
                    found.append((path, pid))
                dirs[:] = []
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


def remove_empty_dir(path):
    """rmdir path if it is an empty directory (a destroyed clone's mountpoint); never an error."""
    with contextlib.suppress(OSError):
        os.rmdir(path)


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


def remove_file(path):
    """Unlink path (gone already is fine) and make it durable."""
    try:
        os.unlink(path)
    except OSError as error:
        if error.errno != errno.ENOENT:
            raise Failure("cannot remove %s: %s" % (path, error.strerror), 1)
    fsync_directory(os.path.dirname(path))


# -- signals: SIGTERM, SIGHUP and SIGINT end a command as a Failure, so that a
# restore or drill stops its server and removes its clones; while a zfs or btrfs
# call runs (or the undo), they wait, so that nothing is made unrecorded.

_signals_held = []
_signals_pending = []
SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP", signal.SIGINT: "SIGINT"}


class Stopped(BaseException):
    """A signal ends the command (exit code 1). Not an Exception, as KeyboardInterrupt
    is not, so that no `except Exception` or `except Failure` takes it for an error
    and goes on: not ours, and not logging's, which prints a signal that lands while
    a line is written as a "Logging error" and carries on."""
    code = 1


def signal_failure(signum):
    return Stopped("stopped by %s" % SIGNAL_NAMES.get(signum, "signal %d" % signum))


def on_stop_signal(signum, frame):
    """End the command with Stopped, or note the signal while signals are held. Once
    raised, the end has begun: a second signal is only noted, never cuts the undo short."""
    if _signals_held:
        _signals_pending.append(signum)
        return
    signals_settled()
    raise signal_failure(signum)


@contextlib.contextmanager
def signals_held():
    """Hold SIGTERM, SIGHUP and SIGINT while the block runs; after it, raise the first
    one that came (unless signals_settled() came first: then it is the end already).

    A command that failed in the block while a signal waited is taken as the
    signal's doing: Ctrl-C at a terminal reaches the whole process group, so a
    zfs call dies of the same SIGINT, and the reason to give is the signal."""
    _signals_held.append(True)
    try:
        yield
    except Failure:
        if not (_signals_pending and len(_signals_held) == 1):
            raise
    finally:
        _signals_held.pop()
    if _signals_pending and not _signals_held:
        signals_settled()
        raise signal_failure(_signals_pending.pop(0))


def signals_settled():
    """The outcome is settled (made and reported, or undone): from now on SIGTERM,
    SIGHUP and SIGINT are only noted. A late one changes nothing, and ends in no
    traceback while the interpreter exits."""
    _signals_held.append(True)


def catch_signals():
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGHUP, on_stop_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, on_stop_signal)     # Ctrl-C: the same clean end, no traceback


def claim_port(directory, ports):
    """(port, claim file): the first of ports no other restore has claimed.

    Two restores started together see the same free ports: each claims its
    port with a file DIRECTORY/.port-N made with O_EXCL (holding its pid) and
    removes it once its server listens or it gave up. A claim whose process
    is gone is stale and taken over.
    """
    if not os.path.isdir(directory):
        make_dir(directory, 0o755)
    for port in ports:
        path = os.path.join(directory, ".port-%d" % port)
        for _ in range(2):
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as error:
                if error.errno != errno.EEXIST:
                    raise
                if claim_is_live(path):
                    break
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            with os.fdopen(descriptor, "w") as claim:
                claim.write("%d\n" % os.getpid())
            return port, path
    raise Failure("no free port: each of %s is claimed by another restore"
                  % ("%d-%d" % (ports[0], ports[-1]) if ports else "none"), 1)


def claim_is_live(path):
    """True while the process named in a port claim runs; a claim without a pid yet
    (its writer is between create and write) counts as live for 10 s."""
    try:
        with open(path) as claim:
            pid = int(claim.read().strip() or "0")
        age = time.time() - os.path.getmtime(path)
    except (OSError, IOError, ValueError):
        return False
    if pid <= 0:
        return age < 10
    try:
        os.kill(pid, 0)
        return True
    except OSError as error:
        return error.errno == errno.EPERM


def release_port(claim):
    """Remove a port claim (claim_port); None or gone already is fine."""
    if claim:
        with contextlib.suppress(OSError):
            os.unlink(claim)


def system_ports():
    tables = [read_text_file(path) for path in ("/proc/net/tcp", "/proc/net/tcp6")]
    return used_ports(tables, read_text_file("/proc/net/unix"))


def backend_of(config):
    """(adapter, scope) for [snapshot] backend: (Zfs, the pools of the datasets) or
    (Btrfs, the subvolumes). The scope is what the adapter lists snapshots and clones in."""
    name = config.choice("snapshot", "backend", ("zfs", "btrfs"), "zfs")
    datasets = config.list("snapshot", "datasets")
    if not datasets:
        raise config.error("snapshot", "datasets", "is empty")
    if name == "btrfs":
        for subvolume in datasets:
            problem = btrfs_subvolume_problem(subvolume)
            if problem:
                raise config.error("snapshot", "datasets", problem)
        return Btrfs(datasets), datasets
    return Zfs(), sorted(set(dataset.split("/")[0] for dataset in datasets))


def scope_of(config):
    """(prefix, datasets) of this config: the sets that are ours ([snapshot] prefix, datasets)."""
    prefix = config.str("snapshot", "prefix", DEFAULT_PREFIX)
    if not PREFIX_RE.match(prefix):
        raise config.error("snapshot", "prefix", "%r is not a snapshot name prefix (letters, digits, _ . : -)"
                           % prefix)
    return prefix, config.list("snapshot", "datasets")


def restore_options(config):
    """The [restore] keys, checked."""
    options = {}
    for key, default in (("mount_root", DEFAULT_MOUNT_ROOT), ("wal_root", DEFAULT_WAL_ROOT)):
        options[key] = config.str("restore", key, default)
        if not os.path.isabs(options[key]):
            raise config.error("restore", key, "%r is not an absolute path" % options[key])
    options["port_start"] = config.int("restore", "port_start",
                                       config.int("postgres", "port", 5432, minimum=1) + 1, minimum=1)
    options["timeout"] = config.int("restore", "timeout", DEFAULT_TIMEOUT, minimum=1)
    return options


# ---------------------------------------------------------------------------
# The restore, step by step
# ---------------------------------------------------------------------------

class Plan(object):
    """Everything a restore will do, decided before anything changes."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def make_plan(zfs, config, snapshot_set, kind, target, action, mount_root, port,
              timeline=None, inclusive=True, explicit_root=False):
    """Check the set and work out names, paths, files and settings of the restore."""
    problems = set_problems(snapshot_set)
    if problems:
        raise Failure("set %s cannot be restored: %s" % (snapshot_set.name, "; ".join(problems)), 1)
    major = parse_major(snapshot_set.get("pg_version"))
    pgdata_dataset = snapshot_set.get("pgdata_dataset")
    backup_label = zfs.file_property(snapshot_set.snapshot(pgdata_dataset), "backup_label")
    tablespace_map = zfs.file_property(snapshot_set.snapshot(pgdata_dataset), "tablespace_map")
    problems = label_problems(snapshot_set.get("mode"), snapshot_set.get("start_lsn"), backup_label)
    if problems:
        raise Failure("set %s is broken: %s" % (snapshot_set.name, "; ".join(problems)), 1)
    options = restore_options(config)
    work_dir = work_dir_of(options["wal_root"], kind, snapshot_set.name)
    source_mounts = source_mountpoints(
        snapshot_set.datasets, zfs.file_property(snapshot_set.snapshot(pgdata_dataset), "mountpoints"),
        zfs.mountpoints(snapshot_set.datasets), read_mounts(), snapshot_set.sources)
    clones, mount_map = [], {}
    for dataset in snapshot_set.datasets:
        clone, mountpoint = zfs.clone_path(dataset, kind, snapshot_set.name, mount_root, explicit_root)
        clones.append((snapshot_set.snapshot(dataset), clone, mountpoint))
        for path in source_mounts.get(dataset, []):
            mount_map[path] = mountpoint
    pgdata_clone = [m for s, c, m in clones if s.rpartition("@")[0] == pgdata_dataset][0]
    pgdata = os.path.normpath(os.path.join(pgdata_clone, snapshot_set.get("pgdata_rel")))
    fetch_script = fetch_script_path()
    command = restore_command_for(fetch_script, os.path.abspath(config.path))
    header = "pg_zfs_restore %s: %s of set %s to %s" % (VERSION, kind, snapshot_set.name, target)
    files = recovery_files(major, recovery_settings(major, target, action, command, timeline, inclusive),
                           server_settings(port, work_dir, major), header)
    return Plan(kind=kind, snapshot_set=snapshot_set, major=major, target=target, action=action,
                timeline=timeline, inclusive=inclusive, config_file=os.path.abspath(config.path), clones=clones,
                mount_map=mount_map, pgdata=pgdata, work_dir=work_dir,
                wal_root=options["wal_root"], wal_dir=os.path.join(work_dir, "pg_wal"),
                log_file=os.path.join(work_dir, "server.log"), port=port,
                timeout=options["timeout"], backup_label=backup_label,
                tablespace_map=tablespace_map, files=files, fetch_script=fetch_script)


def check_plan(plan, zfs, pools):
    """Refuse what would collide: existing clones, mountpoints, work directory, WAL on ZFS
    or btrfs (either backend)."""
    existing = set(fs["name"] for fs in zfs.filesystems(pools))
    taken = [clone for _, clone, _ in plan.clones if clone in existing]
    if taken:
        # The clone's name, not the set's: `cleanup SET` also removes the other kind's
        # clones (a drill's advice would end someone's restored copy of the set).
        raise Failure("%s exists already: remove it with `%s cleanup %s`"
                      % (taken[0], PROG + ".py", taken[0]), 1)
    mountpoints = [mountpoint for _, _, mountpoint in plan.clones]
    if len(set(mountpoints)) != len(mountpoints):
        raise Failure("two clones of set %s would share a place: %s" % (plan.snapshot_set.name,
                                                                        " ".join(mountpoints)), 1)
    for mountpoint in mountpoints:
        problem = zfs.clone_target_problem(mountpoint)
        if problem:
            raise Failure(problem, 1)
    if os.path.lexists(plan.work_dir):
        raise Failure("%s exists already (an earlier restore?): `%s cleanup %s`"
                      % (plan.work_dir, PROG + ".py", plan.snapshot_set.name), 1)
    existing_root = plan.wal_root
    while not os.path.exists(existing_root):
        existing_root = os.path.dirname(existing_root)
    problem = wal_root_problem(mount_of(os.path.realpath(existing_root), read_mounts()),
                               existing)
    if problem:
        raise Failure("[restore] wal_root %s is on %s: the restored copy's WAL must not be on ZFS or btrfs; "
                      "set [restore] wal_root to a directory on another file system" % (plan.wal_root, problem), 2)
    if not os.path.exists(plan.fetch_script):
        raise Failure("%s is missing: the restored copy needs it as restore_command" % plan.fetch_script, 2)


class Restorer(object):
    """Carries out a Plan, one timed step at a time, and can undo what it made."""

    def __init__(self, plan, zfs, server, owner, dry_run=False):
        self.plan = plan
        self.zfs = zfs
        self.server = server
        self.owner = owner
        self.dry_run = dry_run
        self.timings = []
        self.made_clones = []
        self.made_work_dir = False
        self.started = False
        self.waiting = {}       # newer sets passed over: {name: stop segment not archived}
        self.start_cut_short = False
        self.port_claim = None  # released once the server listens, or when we end

    @contextlib.contextmanager
    def step(self, name):
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings.append((name, time.monotonic() - started))

    def act(self, description, func, *args):
        """Do func(*args), or only print what it would do under --dry-run."""
        if self.dry_run:
            print("dry-run: " + description)
            return None
        log.debug("%s", description)
        return func(*args)

    def clone(self):
        plan = self.plan
        for snapshot, clone, mountpoint in plan.clones:
            parent = os.path.dirname(mountpoint)
            if not os.path.isdir(parent):
                self.act("mkdir -m 0755 %s" % parent, make_dir, parent, 0o755)
            self.act(self.zfs.describe_clone(snapshot, clone, mountpoint, plan.snapshot_set.name),
                     self._clone, snapshot, clone, mountpoint)
        log.info("cloned %d dataset(s) of set %s under %s", len(plan.clones), plan.snapshot_set.name,
                 os.path.dirname(plan.clones[0][2]))

    def _clone(self, snapshot, clone, mountpoint):
        with signals_held():
            self.zfs.clone(snapshot, clone, mountpoint, self.plan.snapshot_set.name)
            self.made_clones.append(clone)

    def prepare(self):
        """Make the cloned PGDATA a recovery of its own (see the module docstring)."""
        plan, pgdata = self.plan, self.plan.pgdata
        if not self.dry_run and not os.path.isfile(os.path.join(pgdata, "PG_VERSION")):
            raise Failure("no PG_VERSION in %s: is pgzfs:pgdata_rel right?" % pgdata, 1)
        if not self.dry_run:
            found = parse_major(read_text_file(os.path.join(pgdata, "PG_VERSION")))
            if found != plan.major:
                raise Failure("%s/PG_VERSION says %s, the set says %s"
                              % (pgdata, major_text(found), major_text(plan.major)), 1)
        self.act("remove %s from %s where present" % (", ".join(STALE_FILES), pgdata),
                 self._remove_stale_files)
        self.act("mkdir %s (owner %s, 0700) for the server's WAL, socket and log"
                 % (plan.work_dir, self.server.user), self._make_work_dir)
        self.act("replace %s/pg_wal (a link to the live standby's WAL) by a link to %s"
                 % (pgdata, plan.wal_dir), self._replace_pg_wal)
        self.act("point every link in %s/pg_tblspc into the clones (%s)" % (pgdata, ", ".join(
            "%s -> %s" % pair for pair in sorted(plan.mount_map.items()))), self._repoint_tablespaces)
        if plan.backup_label:
            self.act("write %s/backup_label (%d bytes, 0600, %s)"
                     % (pgdata, len(plan.backup_label), self.server.user),
                     write_file, os.path.join(pgdata, "backup_label"), plan.backup_label, 0o600, self.owner)
        if plan.tablespace_map.strip():
            moved = rewrite_tablespace_map(plan.tablespace_map.decode("utf-8", "surrogateescape"),
                                           plan.mount_map, os.path.realpath).encode("utf-8", "surrogateescape")
            self.act("write %s/tablespace_map (0600, %s):\n%s"
                     % (pgdata, self.server.user, moved.decode("utf-8", "replace").rstrip()),
                     write_file, os.path.join(pgdata, "tablespace_map"), moved, 0o600, self.owner)
        for name in ("postgresql.conf", "postgresql.auto.conf"):
            self.act("comment out inherited %s in %s/%s" % (", ".join(INHERITED_SETTINGS), pgdata, name),
                     self._comment_out, os.path.join(pgdata, name))
        for name, how, text in plan.files:
            self.act("%s %s/%s:\n%s" % (how, pgdata, name, text.rstrip() or "(empty)"),
                     self._write_setting_file, os.path.join(pgdata, name), how, text)
        self.act("check with postgres -C that the copy runs on %s with archive_mode off" % pgdata,
                 self._check_effective_settings)
        log.info("prepared %s: recovery to %s, then %s, on port %d", pgdata, plan.target,
                 "open" if plan.target.kind == "latest" else plan.action, plan.port)

    def _remove_stale_files(self):
        for name in STALE_FILES:
            path = os.path.join(self.plan.pgdata, name)
            if os.path.lexists(path):
                os.unlink(path)
                log.debug("removed %s", path)

    def _make_work_dir(self):
        if not os.path.isdir(self.plan.wal_root):
            make_dir(self.plan.wal_root, 0o755)
        make_dir(self.plan.work_dir, 0o700, self.owner)
        self.made_work_dir = True
        make_dir(self.plan.wal_dir, 0o700, self.owner)
        for sub in ("archive_status",) + (("summaries",) if self.plan.major >= (17, 0) else ()):
            make_dir(os.path.join(self.plan.wal_dir, sub), 0o700, self.owner)

    def _replace_pg_wal(self):
        link = os.path.join(self.plan.pgdata, "pg_wal" if self.plan.major >= (10, 0) else "pg_xlog")
        if os.path.isdir(link) and not os.path.islink(link):
            # WAL inside PGDATA is part of the snapshot: consistent, and the clone's own.
            log.info("%s is a directory on the clone, not a link: kept", link)
            return
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(self.plan.wal_dir, link)
        os.lchown(link, self.owner[0], self.owner[1])

    def _repoint_tablespaces(self):
        directory = os.path.join(self.plan.pgdata, "pg_tblspc")
        if not os.path.isdir(directory):
            return
        for oid in sorted(os.listdir(directory)):
            link = os.path.join(directory, oid)
            if not os.path.islink(link):
                continue
            current = os.readlink(link)
            moved = map_path(current, self.plan.mount_map, os.path.realpath)
            if moved is None:
                raise Failure("tablespace %s at %s is on no dataset of the set: a restore would share "
                              "it with the live standby" % (oid, current), 1)
            temp = link + ".pg_zfs_restore"
            os.symlink(moved, temp)
            os.lchown(temp, self.owner[0], self.owner[1])
            os.rename(temp, link)
            log.debug("pg_tblspc/%s: %s -> %s", oid, current, moved)

    def _comment_out(self, path):
        if not os.path.exists(path):
            return
        stat = os.stat(path)
        text, found = comment_out_settings(read_bytes(path).decode("utf-8", "surrogateescape"),
                                           INHERITED_SETTINGS)
        if found:
            write_file(path, text.encode("utf-8", "surrogateescape"), stat.st_mode & 0o777,
                       (stat.st_uid, stat.st_gid))
            log.debug("%s: commented out %s", path, ", ".join(found))

    def _check_effective_settings(self):
        effective = dict((name, self.server.setting(name)) for name in ("data_directory", "archive_mode"))
        problems = effective_settings_problems(effective, self.plan.pgdata)
        if problems:
            raise Failure("refusing to start the copy: %s" % "; ".join(problems), 1)

    def _write_setting_file(self, path, how, text):
        data = text.encode("utf-8")
        if how == "append" and os.path.exists(path):
            old = read_bytes(path)
            data = old + (b"" if old.endswith(b"\n") or not old else b"\n") + data
        write_file(path, data, 0o600, self.owner)

    def start(self):
        plan = self.plan
        self.started = True
        self.start_cut_short = True     # until pg_ctl start -w returns
        code, message = self.act("pg_ctl start -w -t %d -D %s -l %s as %s"
                                 % (plan.timeout, plan.pgdata, plan.log_file, self.server.user),
                                 self.server.start, plan.timeout) or (0, "")
        self.start_cut_short = False
        if code != 0:
            # With --action shutdown, or when the archive ends early, the server
            # may be gone before pg_ctl sees it ready: wait_for_target judges.
            log.info("pg_ctl start exited %d: %s", code, message)

    def wait_for_target(self):
        """Poll until the target is reached; the outcome dict, or a Failure saying where it stopped."""
        plan = self.plan
        if self.dry_run:
            self.act("wait up to %d s until the server is %s at %s" % (
                plan.timeout, "open" if plan.target.kind == "latest" else plan.action, plan.target),
                lambda: None)
            return None
        started = time.monotonic()
        deadline = started + plan.timeout
        # A terminal gets a line every few seconds; a log (not a terminal) every 10 s.
        interval = TERMINAL_PROGRESS_INTERVAL if sys.stderr.isatty() else PROGRESS_INTERVAL
        next_progress = started + interval
        status = None
        lsn_reached = None
        first_sample = None
        while True:
            # Whether it runs first, then its log: a server that has exited wrote
            # its last line before it did. The other way round, a server that logs
            # "shutdown at recovery target" and exits between the two reads was
            # taken for one that failed without a word (seen with PostgreSQL 14).
            running = self.server.running()
            events = read_recovery_log(read_text_file(plan.log_file))
            status = self.server.status(plan.major) if running else None
            if status and status[2]:
                lsn_reached = status[2]
            if running and status is None:
                outcome = "waiting"   # up, but not answering yet
            else:
                outcome = recovery_outcome(plan.target.kind, status, events)
            if outcome == "promoted" and plan.target.kind == "latest":
                self._check_archive_end(status[2] or lsn_reached, events)
            if outcome in ("paused", "promoted", "shut down"):
                report = self._report(outcome, status, events)
                if plan.target.kind == "time":
                    problem = commit_after_target(report["last_transaction"], plan.target.value, plan.inclusive,
                                                  plan.snapshot_set)
                    if problem:
                        raise Failure("restore failed: %s: the copy is not the state at the target (a wrong "
                                      "clock where the set was taken?)" % problem, 1)
                return report
            lsn = lsn_reached or self.server.control_value("Minimum recovery ending location") \
                or events["redo_lsn"] or "?"
            if events["fetch_stop"] and outcome in ("failed", "ended early"):
                raise Failure("restore failed: recovery stopped at %s (LSN reached %s)"
                              % (events["fetch_stop"], lsn), 1)
            if outcome == "ended early":
                raise Failure("the archive ended before the target %s was reached: replay stopped at "
                              "LSN %s (last transaction %s)%s%s"
                              % (plan.target, (status[2] if status else "") or lsn,
                                 (status[3] if status else "") or events["last_xact"] or "?",
                                 "; the copy opened there anyway (PostgreSQL %s)" % major_text(plan.major)
                                 if status else "", why_recovery_stopped(events)), 1)
            if outcome == "failed":
                raise Failure("the restored server stopped before the target at LSN %s: %s (log %s)"
                              % (lsn, events["fatal"] or events["wal_problem"] or "no FATAL line",
                                 plan.log_file), 1)
            if time.monotonic() > deadline:
                raise Failure("target %s not reached within %d s: replay at LSN %s ([restore] timeout)"
                              % (plan.target, plan.timeout, lsn_reached or "?"), 1)
            if time.monotonic() >= next_progress:
                sample = replay_sample(time.monotonic() - started, status)
                first_sample = first_sample or sample
                rate, left = replay_estimate(first_sample, sample, plan.target, plan.snapshot_set.stop_lsn)
                log.info("%s", progress_line(status, events, time.monotonic() - started, rate, left))
                next_progress += interval
            time.sleep(POLL_INTERVAL)

    def _check_archive_end(self, lsn, events):
        """--latest: a Failure unless replay ended in the newest segment the archive holds.

        PostgreSQL takes the first segment no source has for the end of the
        archive: with a hole (a segment missing or damaged in every archive)
        it opens there. pg_wal_fetch.py --check names each source's newest
        segment; anything after the segment replay ended in is the hole's proof.
        """
        plan = self.plan
        segment_size = parse_segment_size(self.server.control_value("Bytes per WAL segment"))
        last = events["restored"]
        if not last:
            last = segment_of_lsn(plan.snapshot_set.timeline or 1, parse_lsn(lsn), segment_size)
        newest, last_line = archive_listing(plan.fetch_script, plan.config_file, self.server.user)
        if not newest:
            raise Failure("restore failed: replay ended at LSN %s in %s, and no source could be listed to "
                          "confirm that is the end of the archive (pg_wal_fetch.py --check: %s)"
                          % (lsn, last, last_line), 1)
        gap = archive_gap(last, newest, plan.timeline in (None, "latest"), segment_size)
        if gap:
            raise Failure("restore failed: replay ended at LSN %s in %s, but the archive holds WAL up to %s: "
                          "%s is missing or damaged in every archive%s"
                          % (lsn, last, gap[1], gap[0], why_recovery_stopped(events)), 1)
        log.info("replay ended in %s, the newest segment in the archive (%s)", last, " ".join(sorted(set(newest))))

    def _report(self, outcome, status, events):
        if status is not None:
            lsn, last = status[2], status[3]
        else:
            lsn = self.server.control_value("Minimum recovery ending location") or events["redo_lsn"]
            last = events["last_xact"]
        return {"outcome": outcome, "lsn": lsn or "?", "last_transaction": last or "?",
                "stopping": events["stopping"]}

    def stop(self):
        if self.started and not self.dry_run:
            if self.start_cut_short:
                # pg_ctl start goes on without us: let its postmaster appear, then stop
                # it. Under load that can take a while; while nothing holds PGDATA
                # after a few seconds, no postmaster is coming.
                started = time.monotonic()
                while not self.server.running() and time.monotonic() < started + DESTROY_BUSY_SECONDS:
                    if time.monotonic() > started + 3 and not users_of([self.plan.pgdata]):
                        break
                    time.sleep(POLL_INTERVAL)
            self.server.stop()
        elif self.dry_run:
            self.act("pg_ctl stop -m fast -D %s" % self.plan.pgdata, lambda: None)

    def destroy(self):
        """Destroy the clones made and the work directory; log what could not go."""
        ok = True
        for clone in reversed(list(self.made_clones)):
            try:
                with signals_held():
                    self.zfs.destroy(clone)
                self.made_clones.remove(clone)
            except Failure as failure:
                log.error("%s", failure)
                ok = False
        for _, clone, mountpoint in self.plan.clones:
            if clone not in self.made_clones and not self.dry_run:
                remove_empty_dir(mountpoint)
        if self.dry_run:
            for _, clone, _ in reversed(self.plan.clones):
                self.act(self.zfs.describe_destroy(clone), lambda: None)
            self.act("rm -r %s" % self.plan.work_dir, lambda: None)
        elif self.made_work_dir:
            shutil.rmtree(self.plan.work_dir, ignore_errors=True)
        return ok

    def undo(self, keep):
        """After a failure: stop, destroy, remove; or say what was kept. The command
        ends with the failure that brought it here, whatever signal comes."""
        signals_settled()
        if keep:
            log.error("kept for inspection (--keep-on-failure): clones %s, server log %s; remove with "
                      "`%s.py cleanup %s`", " ".join(self.made_clones) or "none", self.plan.log_file,
                      PROG, self.plan.snapshot_set.name)
            return
        with contextlib.suppress(Failure):
            self.stop()
        self.destroy()


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def load_sets(zfs, pools, config):
    """This config's sets in the pool (scope_of), oldest first."""
    prefix, datasets = scope_of(config)
    return sets_of(group_sets(zfs.snapshot_rows(pools), prefix), datasets)


def clones_by_set(filesystems):
    """{set name: [clone names]} from the clones' origin snapshots (btrfs: live ones)."""
    result = {}
    for fs in filesystems:
        if fs["origin"] and "@" in fs["origin"] and fs.get("exists", True):
            result.setdefault(fs["origin"].rpartition("@")[2], []).append(fs["name"])
    return result


def cmd_list(config, args):
    zfs, pools = backend_of(config)
    sets = load_sets(zfs, pools, config)
    filesystems = zfs.filesystems(pools)
    for fs in filesystems:
        if not fs.get("exists", True):
            log.warning("clone marker %s: its clone %s is gone (remove the marker with `%s.py "
                        "cleanup %s`)", fs["marker"], fs["name"], PROG, fs["clone_of"])
    clones = clones_by_set([fs for fs in filesystems
                            if (fs["origin"] or "").rpartition("@")[0] in scope_of(config)[1]])
    waiting = sets_waiting(config, sets)
    summaries = [set_summary(s, clones.get(s.name, []), waiting.get(s.name)) for s in sets]
    if args.json:
        print(json.dumps(summaries, indent=2, sort_keys=True))
        return 0
    print("%-32s %-8s %-27s %-12s %-3s %-4s %-8s %s" % ("SET", "MODE", "EARLIEST TARGET", "STOP LSN",
                                                        "TL", "PG", "COMPLETE", "CLONES"))
    for summary in summaries:
        print("%-32s %-8s %-27s %-12s %-3s %-4s %-8s %s" % (
            summary["name"], summary["mode"] or "-", summary["earliest_target"] or "-",
            summary["stop_lsn"] or "-", summary["timeline"] or "-", summary["pg_version"] or "-",
            "WAITING" if summary["waiting_for_wal"] else
            "yes" if summary["complete"] and not summary["problems"] else "NO",
            " ".join(summary["clones"]) or "-"))
    for name in sorted(waiting):
        print("WAITING %s" % waiting_note(name, waiting[name]))
    prefix = scope_of(config)[0]
    for snapshot, why in [(s, w) for s, w in zfs.unreadable if parse_set_name(s.rpartition("@")[2], prefix) is not None]:
        log.warning("%s has no readable metadata (%s): not a backup", snapshot, why)
        print("NO-METADATA %s: not a backup (%s)" % (snapshot, why))
    return 0


def target_of(args):
    """The Target of the restore options (argparse makes sure there is exactly one)."""
    for kind in ("time", "lsn", "xid", "name"):
        text = getattr(args, "target_" + kind)
        if text is not None:
            try:
                return parse_target(kind, text)
            except ValueError as error:
                raise Failure("--target-%s %s" % (kind, error), 2)
    return Target("immediate" if args.immediate else "latest")


def prepare_restore(config, args, kind, target, action, mount_root, port_option, dry_run):
    """Choose the set and the port, make and check the plan; return a Restorer."""
    zfs, pools = backend_of(config)
    snapshot_set, waiting = choose_restore_set(zfs, pools, config, args, target)
    return plan_restore(zfs, pools, config, args, kind, target, action, snapshot_set, waiting, mount_root,
                        port_option, dry_run)


def choose_restore_set(zfs, pools, config, args, target):
    """(the set that serves target, {newer set passed over: its stop segment not archived})."""
    timeline = getattr(args, "timeline", None)
    sets = load_sets(zfs, pools, config)
    waiting = sets_waiting(config, [one for one in sets if args.set is None or one.name == args.set])
    if args.set in waiting:
        raise Failure("cannot restore yet: " + waiting_note(args.set, waiting[args.set]), 1)
    for name in sorted(waiting):
        log.warning("%s: not chosen", waiting_note(name, waiting[name]))
    snapshot_set = choose_set([one for one in sets if one.name not in waiting], target, args.set, timeline,
                              not getattr(args, "exclusive", False))
    log.info("set %s (stop %s, LSN %s) serves target %s", snapshot_set.name,
             iso_time(set_stop_time(snapshot_set)) if set_stop_time(snapshot_set) else "?", snapshot_set.get("stop_lsn"),
             target)
    return snapshot_set, waiting


def plan_restore(zfs, pools, config, args, kind, target, action, snapshot_set, waiting, mount_root, port_option,
                 dry_run):
    """Choose the port, make and check the plan of a restore of snapshot_set; return a Restorer."""
    timeline = getattr(args, "timeline", None)
    options = restore_options(config)
    used = system_ports()
    if port_option is not None:
        if port_option in used:
            raise Failure("port %d is in use" % port_option, 1)
        ports = [port_option]
    else:
        ports = free_ports(options["port_start"], used)
        choose_port(options["port_start"], used)        # none free: the Failure


    def plan_on(port):
        return make_plan(zfs, config, snapshot_set, kind, target, action,
                         os.path.abspath(mount_root or options["mount_root"]), port, timeline,
                         not getattr(args, "exclusive", False), bool(mount_root))
    plan = plan_on(ports[0])
    check_plan(plan, zfs, pools)
    claim = None
    if not dry_run:
        port, claim = claim_port(options["wal_root"], ports)
    try:
        if not dry_run and port != plan.port:
            plan = plan_on(port)        # another restore started at the same time took the first
        user = config.str("postgres", "user", "postgres")
        server = Server(pg_bindir(config, plan.major), user, plan.pgdata,
                        plan.work_dir, plan.port, config.str("postgres", "dbname", "postgres"), plan.log_file)
        restorer = Restorer(plan, zfs, server, owner_of(user), dry_run)
    except BaseException:
        release_port(claim)
        raise
    restorer.waiting = waiting
    restorer.port_claim = claim
    return restorer


def cmd_restore(config, args):
    target = target_of(args)
    restorer = prepare_restore(config, args, "restore", target, args.action, args.to, args.port,
                               args.dry_run)
    try:
        return restore_with(restorer, args)
    finally:
        release_port(restorer.port_claim)   # the server listens on it by now, or it gave up


def restore_with(restorer, args):
    """The steps of cmd_restore, and its report."""
    plan = restorer.plan
    try:
        with restorer.step("clone"):
            restorer.clone()
        with restorer.step("prepare"):
            restorer.prepare()
        if args.no_start:
            signals_settled()
            print("prepared set %s for recovery to %s in %s (port %d); start it with:\n"
                  "  runuser -u %s -- %s start -D %s -l %s\nsteps: %s"
                  % (plan.snapshot_set.name, plan.target, plan.pgdata, plan.port, restorer.server.user,
                     os.path.join(restorer.server.bindir, "pg_ctl"), plan.pgdata, plan.log_file,
                     format_timings(restorer.timings)))
            return 0
        with restorer.step("start"):
            restorer.start()
        with restorer.step("recover"):
            outcome = restorer.wait_for_target()
        signals_settled()       # restored: a signal from now on undoes nothing
    except BaseException:
        signals_settled()       # the end has begun: a signal in the line below must not skip the undo
        log.error("restore of set %s failed after: %s", plan.snapshot_set.name,
                  format_timings(restorer.timings))
        if not args.dry_run:
            restorer.undo(args.keep_on_failure)
        raise
    if args.dry_run:
        print("dry-run: nothing was changed")
        return 0
    print("restored set %s to %s: %s" % (plan.snapshot_set.name, plan.target, outcome["outcome"]))
    if outcome["stopping"]:
        print("  %s" % outcome["stopping"])
    print("  last replayed LSN %s, last transaction %s" % (outcome["lsn"], outcome["last_transaction"]))
    print("  data directory %s, port %d, server log %s" % (plan.pgdata, plan.port, plan.log_file))
    if outcome["outcome"] != "shut down":
        print("  connect: psql -h %s -p %d" % (plan.work_dir, plan.port))
    print("  remove: %s.py cleanup %s" % (PROG, plan.snapshot_set.name))
    print("  steps: %s" % format_timings(restorer.timings))
    return 0


def cmd_drill(config, args):
    """Restore the newest set into throwaway clones, query it, remove it: one Nagios line,
    and the same result in WAL_ROOT/last-drill.json."""
    started, clock = time.time(), time.monotonic()
    wal_root = restore_options(config)["wal_root"]     # bad: main's CRITICAL line, and no file
    code, set_name, line = drill(config, args)       # settled its signals (a late one changes nothing)
    if code:
        log.error("%s", line.split(": ", 1)[1])     # stderr and syslog; stdout is Nagios'
    print(line)
    sys.stdout.flush()
    record_drill(wal_root, drill_state_text(code, set_name, started, time.time(),
                                            time.monotonic() - clock, line))
    return code


def drill(config, args):
    """The steps of cmd_drill: (exit code, the set drilled or None, the Nagios line)."""
    restorer = None
    set_name = args.set
    try:
        zfs, pools = backend_of(config)
        snapshot_set, waiting = choose_restore_set(zfs, pools, config, args, Target("immediate"))
        set_name = snapshot_set.name
        restorer = plan_restore(zfs, pools, config, args, "drill", Target("immediate"), "promote", snapshot_set,
                                waiting, None, None, False)
        steps = [("clone", restorer.clone), ("prepare", restorer.prepare), ("start", restorer.start),
                 ("recover", restorer.wait_for_target),
                 ("query", lambda: [restorer.server.execute(query) for query in ["SELECT 1"] + [args.query]
                                    if query])]
        if args.amcheck:
            steps.append(("amcheck", lambda: restorer.server.amcheck()))
        step = steps[0][0]
        try:
            for step, action in steps:
                with restorer.step(step):
                    action()
        except (Failure, Stopped, EnvironmentError) as error:
            raise Failure("%s: %s" % (step, error if isinstance(error, (Failure, Stopped))
                                      else unexpected_failure(error)), 2)
        finally:
            signals_settled()       # the drill ends here, whatever comes
            release_port(restorer.port_claim)
            with restorer.step("stop"):
                with contextlib.suppress(Failure):
                    restorer.stop()
            with restorer.step("destroy"):
                destroyed = restorer.destroy()
        if not destroyed:
            raise Failure("destroy: clones left behind: %s" % " ".join(restorer.made_clones), 2)
    except (Exception, Stopped) as error:       # Failure, a signal, and any other error as one line
        signals_settled()       # the outcome: cmd_drill reports and records it, whatever comes
        failure = error if isinstance(error, (Failure, Stopped)) else unexpected_failure(error)
        return 2, set_name, "CRITICAL: drill of set %s failed: %s; %s" % (
            set_name or "?", failure, format_timings(restorer.timings if restorer else []))
    return 0, set_name, "OK: drill of set %s restored, promoted and queried; %s%s" % (
        set_name, format_timings(restorer.timings), "".join(
            "; newer set %s waits for WAL %s" % item for item in sorted(restorer.waiting.items())))


def record_drill(wal_root, text):
    """Write WAL_ROOT/last-drill.json (mode 0644, atomically: pg_zfs_snap.py metrics reads it);
    a failure is a warning, never the drill's result."""
    path = os.path.join(wal_root, DRILL_STATE_FILE)
    try:
        if not os.path.isdir(wal_root):
            make_dir(wal_root, 0o755)
        write_file(path, text.encode("utf-8"), 0o644, (os.getuid(), os.getgid()))
        fsync_directory(wal_root)
    except (Failure, EnvironmentError) as error:
        log.warning("the drill's result was not recorded in %s: %s", path,
                    error if isinstance(error, Failure) else error.strerror or error)


def cmd_cleanup(config, args):
    """Stop servers on our clones and destroy them, with their work directories."""
    zfs, pools = backend_of(config)
    prefix, datasets = scope_of(config)
    ours = [fs for fs in zfs.filesystems(pools) if clone_of_config(fs, prefix, datasets)]
    if args.all:
        chosen = ours
    else:
        named = [fs for fs in ours if args.name in (fs["name"], fs["clone_of"], os.path.basename(fs["name"]))]
        keys = set((fs["clone_of"], clone_kind(fs["name"], fs["clone_of"])) for fs in named)
        chosen = [fs for fs in ours if (fs["clone_of"], clone_kind(fs["name"], fs["clone_of"])) in keys]
        if not chosen:
            raise Failure("no clone made by %s matches %s" % (PROG, args.name), 1)
    if not chosen:
        print("no clones made by %s" % PROG)
        return 0
    sets = dict((s.name, s) for s in load_sets(zfs, pools, config))
    options = restore_options(config)
    groups = {}
    for fs in chosen:
        groups.setdefault((fs["clone_of"], clone_kind(fs["name"], fs["clone_of"])), []).append(fs)
    failed = []
    for (set_name, kind), members in sorted(groups.items(), key=lambda item: (item[0][0], str(item[0][1]))):
        stop_servers_on([fs["mountpoint"] for fs in members if fs["mountpoint"]], config, sets.get(set_name))
        for fs in sorted(members, key=lambda fs: fs["name"], reverse=True):
            try:
                with signals_held():
                    zfs.destroy(fs["name"])
                print("destroyed %s" % fs["name"])
            except Failure as failure:
                log.error("%s", failure)
                failed.append(fs["name"])
                continue
            if fs["mountpoint"]:
                remove_empty_dir(fs["mountpoint"])
        if kind:
            work_dir = work_dir_of(options["wal_root"], kind, set_name)
            if os.path.isdir(work_dir):
                shutil.rmtree(work_dir, ignore_errors=True)
                print("removed %s" % work_dir)
    if failed:
        raise Failure("could not destroy %s" % " ".join(failed), 1)
    return 0


def stop_servers_on(mountpoints, config, snapshot_set):
    """Stop every PostgreSQL whose PGDATA is on these mountpoints."""
    for pgdata, pid in live_postmasters(mountpoints):
        major = parse_major(read_text_file(os.path.join(pgdata, "PG_VERSION")) or
                            (snapshot_set.get("pg_version") if snapshot_set else ""))
        server = Server(pg_bindir(config, major),
                        config.str("postgres", "user", "postgres"), pgdata)
        log.info("stopping the server on %s (pid %d)", pgdata, pid)
        server.stop()
        print("stopped the server on %s" % pgdata)


def cmd_rollback(config, args):
    """Roll the live datasets back to a set in place; only with --force, never under a server."""
    zfs, pools = backend_of(config)
    sets = load_sets(zfs, pools, config)
    named = [s for s in sets if s.name == args.set]
    if not named:
        raise Failure("no snapshot set named %s in the pool" % args.set, 1)
    snapshot_set = named[0]
    problems = set_problems(snapshot_set)
    if problems:
        raise Failure("set %s cannot be rolled back to: %s" % (args.set, "; ".join(problems)), 1)
    pgdata_snapshot = snapshot_set.snapshot(snapshot_set.get("pgdata_dataset"))
    backup_label = zfs.file_property(pgdata_snapshot, "backup_label")
    tablespace_map = zfs.file_property(pgdata_snapshot, "tablespace_map")
    problems = label_problems(snapshot_set.get("mode"), snapshot_set.get("start_lsn"), backup_label)
    if problems:
        raise Failure("set %s is broken: %s" % (args.set, "; ".join(problems)), 1)
    later = []
    for dataset in snapshot_set.datasets:
        later += later_snapshots(zfs.snapshots_in_order(dataset), snapshot_set.snapshot(dataset))
    print("rollback to set %s %s %d later snapshot(s)%s" % (args.set, zfs.later_verb, len(later),
                                                             ":" if later else ""))
    for snapshot in later:
        print("  %s" % snapshot)
    strangers = not_later_sets(later, snapshot_set, sets) if zfs.later_verb == "destroys" else []
    if strangers:
        raise Failure("rollback to set %s would destroy %s, which is not a set of this config stamped "
                      "after it: refused; move it away (zfs rename) or destroy it yourself first"
                      % (args.set, " ".join(strangers)), 1)
    dependants = [fs["name"] for fs in zfs.filesystems(pools)
                  if fs["origin"] in later and zfs.clones_pin_snapshots]
    if dependants:
        raise Failure("later snapshots have clones (%s): remove them first (cleanup)"
                      % " ".join(dependants), 1)
    mountpoints = zfs.mountpoints(snapshot_set.datasets)
    running = live_postmasters([m for m in mountpoints.values() if m.startswith("/")])
    pgdata = config.str("postgres", "pgdata")
    if postmaster_pid(pgdata):
        running.append((pgdata, postmaster_pid(pgdata)))
    if running:
        raise Failure("PostgreSQL runs on the datasets (%s, pid %d): stop it first"
                      % running[0], 1)
    if not args.force:
        raise Failure("refusing to roll back without --force", 1)
    live_pgdata = os.path.normpath(os.path.join(mountpoints[snapshot_set.get("pgdata_dataset")],
                                                snapshot_set.get("pgdata_rel")))
    owner = owner_of(config.str("postgres", "user", "postgres"))
    # Once it starts, the rollback and its backup_label go through whole: a signal changes nothing.
    signals_settled()
    zfs.rollback_set(snapshot_set, later)
    for name in ("postmaster.pid", "postmaster.opts"):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(live_pgdata, name))
    if backup_label:
        write_file(os.path.join(live_pgdata, "backup_label"), backup_label, 0o600, owner)
    if tablespace_map.strip():
        write_file(os.path.join(live_pgdata, "tablespace_map"), tablespace_map, 0o600, owner)
    print("%s is at set %s%s; start it as before (it replays from %s on and follows the primary)"
          % (live_pgdata, args.set, " with its backup_label" if backup_label else "",
             snapshot_set.get("start_lsn")))
    return 0


def port_argument(text):
    """--port: a TCP port, 1 to 65535 (argparse refuses anything else, exit 2)."""
    if not re.match(r"^[0-9]{1,5}$", text) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError("%r is not a TCP port (1 to 65535)" % text)
    return int(text)


def set_argument(text):
    """--set: a set name as pg_zfs_snap.py makes them (never empty)."""
    if not SET_NAME_RE.match(text):
        raise argparse.ArgumentTypeError("%r is not a snapshot set name" % text)
    return text


def timeline_argument(text):
    """--timeline: latest, current or a timeline ID (never empty)."""
    try:
        return parse_timeline(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="config file (default: $PG_ZFS_CONFIG or %s)" % DEFAULT_CONFIG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version="%(prog)s " + VERSION)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def subcommand(name, summary, examples):
        """A subcommand whose --help ends with real command lines."""
        return commands.add_parser(name, help=summary, description=summary[:1].upper() + summary[1:] + ".",
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="examples:\n" + "".join("  %s.py %s\n" % (PROG, line) for line in examples))

    listing = subcommand("list", "the snapshot sets and their clones", [
        "list", "list --json", "-c /etc/pg_zfs/other.conf list"])
    listing.add_argument("--json", action="store_true", help="print JSON")

    restore = subcommand("restore", "restore a set to a target, as clones", [
        "restore --target-time '2026-11-25 06:30:00+01:00'",
        "restore --target-lsn 0/5000060 --action promote --port 5499",
        "restore --latest --to /srv/restore --dry-run"])
    targets = restore.add_mutually_exclusive_group(required=True)
    targets.add_argument("--target-time", metavar="TS", help="ISO 8601 time with a zone")
    targets.add_argument("--target-lsn", metavar="X/X", help="WAL location")
    targets.add_argument("--target-xid", metavar="XID", help="transaction id")
    targets.add_argument("--target-name", metavar="NAME", help="restore point name")
    targets.add_argument("--immediate", action="store_true", help="the end of the backup")
    targets.add_argument("--latest", action="store_true", help="the end of the archive")
    restore.add_argument("--set", metavar="NAME", type=set_argument, help="the set to restore (default: chosen)")
    restore.add_argument("--to", metavar="DIR", help="root of the clones' mountpoints")
    restore.add_argument("--port", type=port_argument, metavar="N", help="port of the restored server")
    restore.add_argument("--action", choices=("pause", "promote", "shutdown"), default="pause",
                         help="at the target (default: pause)")
    restore.add_argument("--timeline", metavar="TL", type=timeline_argument,
                         help="latest (default), current or an ID")
    restore.add_argument("--exclusive", action="store_true", help="stop just before the target")
    restore.add_argument("--no-start", action="store_true", help="prepare, do not start")
    restore.add_argument("--dry-run", action="store_true", help="print every step, change nothing")
    restore.add_argument("--keep-on-failure", action="store_true", help="leave clones for inspection")

    drill = subcommand("drill", "restore test of the newest set (Nagios line)", [
        "drill", "drill --query 'SELECT count(*) FROM orders' --amcheck",
        "drill --set pgzfs_20261125T040100Z"])
    drill.add_argument("--query", metavar="SQL", help="a query that must succeed on the copy")
    drill.add_argument("--amcheck", action="store_true", help="also run pg_amcheck (14+)")
    drill.add_argument("--set", metavar="NAME", type=set_argument, help="drill this set instead of the newest")

    cleanup = subcommand("cleanup", "stop and destroy clones made by this tool", [
        "cleanup pgzfs_20261125T040100Z", "cleanup tank/pgdata_restore_pgzfs_20261125T040100Z",
        "cleanup --all"])
    which = cleanup.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", metavar="NAME", help="a set name or one of its clones")
    which.add_argument("--all", action="store_true", help="every clone made by this tool")

    rollback = subcommand("rollback", "roll the live datasets back to a set", [
        "rollback --set pgzfs_20261125T040100Z",
        "rollback --set pgzfs_20261125T040100Z --force"])
    rollback.add_argument("--set", metavar="NAME", type=set_argument, required=True,
                          help="the set to roll back to (later snapshots are listed, then destroyed)")
    rollback.add_argument("--force", action="store_true", help="really do it")
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("a command is required: list, restore, drill, cleanup or rollback")
    return args


COMMANDS = {"list": cmd_list, "restore": cmd_restore, "drill": cmd_drill,
            "cleanup": cmd_cleanup, "rollback": cmd_rollback}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # drill runs from cron; a restore, rollback or cleanup is worth a line where admins look.
    logger = setup_logging(args.verbose, use_syslog=args.command != "list")
    for handler in logger.handlers:
        if type(handler) is logging.StreamHandler:      # stderr; syslog keeps every info line
            handler.setLevel(stderr_level(args.command, args.verbose, sys.stderr.isatty()))
    if args.command != "list":
        catch_signals()
    try:
        config = Config.load(config_path(args.config))
        return COMMANDS[args.command](config, args)
    except (Exception, Stopped) as error:       # Failure, a signal, and any other error as one line
        signals_settled()           # the failure is the outcome
        failure = error if isinstance(error, (Failure, Stopped)) else unexpected_failure(error)
        if args.command == "drill":
            log.error("drill failed: %s", failure)        # stderr and syslog; stdout is Nagios'
            print("CRITICAL: drill failed: %s" % failure)
            return 2
        log.error("%s", failure)
        return failure.code
    finally:
        signals_settled()


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
