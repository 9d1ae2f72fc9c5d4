#!/usr/bin/env python3
"""Fetch one archived WAL file for PostgreSQL's restore_command.

Wired in as (postgresql.conf on 12+, recovery.conf on 9.6-11):

    restore_command = '/opt/pg_zfs/bin/pg_wal_fetch.py %f %p'

%f is the WAL file name PostgreSQL wants, %p the path (relative to the data
directory, the working directory PostgreSQL runs the command in) where it must
appear. The sources of [archive] sources are tried in order; the first that
holds a valid copy wins. Check the sources by hand with:

    pg_wal_fetch.py --check

What it does, in order:
  1. Refuse any WALNAME that is not a segment (24 hex digits), a .partial
     segment, a TTTTTTTT.history or a .backup file, before anything runs.
  2. Deliver from the prefetch spool if a valid copy is there (no network).
  3. Otherwise try each source in order (one whose probe failed in the last
     60 s goes last, never skipped: a dead host does not cost its probe
     timeout on every file): a quick probe (ping, tcp or none), then ONE
     ssh command over a shared connection (ControlMaster) that finds the first
     NAME, NAME.gz, NAME.bz2 or NAME.xz under the source's directory glob and
     streams it. A local source (empty host) reads the glob directly.
  4. Check a segment before PostgreSQL sees it: size as its page header says
     (xlp_seg_size), page magic of the cluster's version, first page address
     and timeline matching the name, system identifier of the cluster
     (global/pg_control of the data directory, or [postgres]
     system_identifier). A bad copy counts as absent on that source.
  5. Deliver atomically: an unnamed temporary file beside DEST, linked into
     place when complete; nothing at DEST on any failure, SIGTERM included.
  6. After a segment, start (detached, one at a time) a prefetch of the next
     [archive] prefetch segments of the timeline into a spool of this data
     directory's own below [archive] spool_dir (a restored clone and the
     standby share a config, not a prefetch window).

Config (default /etc/pg_zfs/pg_zfs.conf, or -c, or $PG_ZFS_CONFIG):
    [archive] sources, spool_dir, prefetch, timeout,
              control_dir, control_persist, connect_timeout
    [source NAME] host, port, user, path, probe, identity_file, ssh_options
    [postgres] pgdata, system_identifier

Exit codes (PostgreSQL aborts recovery on a signal or a code above 125; no
path of this command exits above 125):
    0  delivered
    1  not found on any reachable source (normal at the end of the archive)
    2  bad arguments, bad config, or an invalid WAL name
    3  no source reachable, or every transfer failed, or [archive] timeout hit
    SIGTERM (PostgreSQL shutting down): clean up, then end by SIGTERM itself.
"""

# Each call is a new process: only what every path needs is imported here.
# argparse, subprocess, shlex, socket, glob and the decompressors are imported
# where they are used, off the delivery-from-spool path (start-up time).
import configparser
import errno
import fcntl
import logging
import os
import signal
import struct
import sys
import time

VERSION = "0.1.0"
PROG = "pg_wal_fetch"
DEFAULT_CONFIG = "/etc/pg_zfs/pg_zfs.conf"

log = logging.getLogger(PROG)

DELIVERED, NOT_FOUND, USAGE, UNAVAILABLE = 0, 1, 2, 3

# Outcome of one source for one file.
FOUND, ABSENT, INVALID, UNREACHABLE, FAILED = "found", "absent", "invalid", "unreachable", "failed"

HEX = frozenset("0123456789ABCDEF")
SEGMENT_NAME_LEN = 24
# Tried in this order in each archive directory; the plain file first.
COMPRESSION_SUFFIXES = ("", ".gz", ".bz2", ".xz")

# XLOG_PAGE_MAGIC per major version (src/include/access/xlog_internal.h).
PAGE_MAGIC = {
    "9.6": 0xD093, "10": 0xD097, "11": 0xD098, "12": 0xD101, "13": 0xD106,
    "14": 0xD10D, "15": 0xD110, "16": 0xD113, "17": 0xD116, "18": 0xD118,
}
# XLogLongPageHeaderData, native byte order as PostgreSQL writes it:
# xlp_magic H, xlp_info H, xlp_tli I, xlp_pageaddr Q, xlp_rem_len I,
# 4 bytes of padding (MAXALIGN), xlp_sysid Q, xlp_seg_size I, xlp_xlog_blcksz I.
LONG_HEADER = struct.Struct("=HHIQI4xQII")
XLP_LONG_HEADER = 0x0002
MIN_SEG_SIZE, MAX_SEG_SIZE = 1 << 20, 1 << 30
MAX_TEXT_FILE = 1 << 20          # .history and .backup files are a few lines
CHUNK = 1 << 20

SPOOL_LOCK = ".prefetch.lock"
SPOOL_WANT = ".prefetch.want"
SPOOL_LOG = ".prefetch.log"
PREFETCH_LINGER = 2.0    # seconds an idle prefetcher waits for the next request
DOWN_MEMO = 60.0         # seconds a source whose probe failed is tried last

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
        from logging.handlers import SysLogHandler
        handler = SysLogHandler(address="/dev/log", facility=SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(PROG + "[%(process)d]: %(message)s"))
        logger.addHandler(handler)
    return logger


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
# Pure functions: WAL names, page headers, decisions. No I/O.
# ---------------------------------------------------------------------------

def is_hex(text):
    return bool(text) and set(text) <= HEX


def wal_kind(wal_name):
    """'segment', 'partial', 'history' or 'backup' for a name PostgreSQL may ask for, else None.

    Strict, like pg_archivecleanup: anything else (paths, shell words, empty,
    lower case, timeline 0) is refused before any command runs.
    """
    if not isinstance(wal_name, str):
        return None
    if len(wal_name) == 16 and wal_name.endswith(".history"):
        return "history" if is_hex(wal_name[:8]) and int(wal_name[:8], 16) > 0 else None
    head, rest = wal_name[:SEGMENT_NAME_LEN], wal_name[SEGMENT_NAME_LEN:]
    if len(head) != SEGMENT_NAME_LEN or not is_hex(head):
        return None
    timeline, _log_id, seg = parse_segment_name(head)
    # With the smallest segments (1 MiB) a log id holds 4096 segments.
    if timeline == 0 or seg >= 0x100000000 // MIN_SEG_SIZE:
        return None
    if rest == "":
        return "segment"
    if rest == ".partial":
        return "partial"
    # TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup
    if len(rest) == 16 and rest[0] == "." and rest.endswith(".backup") and is_hex(rest[1:9]):
        return "backup"
    return None


def parse_segment_name(wal_name):
    """(timeline, log id, segment within the log id) of a segment name."""
    return int(wal_name[0:8], 16), int(wal_name[8:16], 16), int(wal_name[16:24], 16)


def source_order(sources, down_since, now, memo=DOWN_MEMO):
    """The sources to try: config order, but those whose probe failed less than
    memo seconds ago go last. Never skipped (a dead-looking host may hold the only
    copy), but a dead host no longer costs its probe timeout before every file."""
    def recently_down(source):
        since = down_since.get(source.name)
        return since is not None and 0 <= now - since < memo
    return ([source for source in sources if not recently_down(source)]
            + [source for source in sources if recently_down(source)])


def following_segments(wal_name, seg_size, count):
    """The count segment names after wal_name on its timeline."""
    timeline, log_id, seg = parse_segment_name(wal_name)
    per_log = 0x100000000 // seg_size
    segno = log_id * per_log + seg
    return ["%08X%08X%08X" % (timeline, n // per_log, n % per_log)
            for n in range(segno + 1, segno + 1 + count)]


def major_key(pg_major):
    return tuple(int(part) for part in pg_major.split("."))


def expected_magics(pg_major):
    """Page magics a segment of a cluster of this major version may carry.

    Known version: exactly its magic. Unknown (None): any known magic. A
    release newer than this table: any magic above the newest known one.
    """
    if pg_major in PAGE_MAGIC:
        return frozenset([PAGE_MAGIC[pg_major]])
    newest = max(PAGE_MAGIC, key=major_key)
    try:
        newer = pg_major is not None and major_key(pg_major) > major_key(newest)
    except ValueError:
        newer = False
    if newer:
        return frozenset(range(PAGE_MAGIC[newest] + 1, 0xD200))
    return frozenset(PAGE_MAGIC.values())


def is_power_of_two(value):
    return value > 0 and value & (value - 1) == 0


def check_segment(header, size, wal_name, system_identifier, magics):
    """None if a file of this size whose first bytes are header may be delivered as
    segment wal_name; otherwise the reason it may not."""
    if len(header) < LONG_HEADER.size:
        return "only %d bytes, not a WAL segment" % size
    magic, info, timeline, pageaddr, _rem, sysid, seg_size, blcksz = LONG_HEADER.unpack_from(header)
    if magic not in magics:
        return "page magic 0x%04X is not this cluster's (%s)" % (
            magic, ", ".join("0x%04X" % m for m in sorted(magics)[:3]) + (" ..." if len(magics) > 3 else ""))
    if not info & XLP_LONG_HEADER:
        return "first page has no long header"
    if not (is_power_of_two(seg_size) and MIN_SEG_SIZE <= seg_size <= MAX_SEG_SIZE):
        return "implausible segment size %d in the header" % seg_size
    if not (is_power_of_two(blcksz) and 1024 <= blcksz <= 65536):
        return "implausible WAL block size %d in the header" % blcksz
    if size != seg_size:
        return "%d bytes, the header says %d (truncated or padded)" % (size, seg_size)
    name_timeline, log_id, seg = parse_segment_name(wal_name)
    if seg >= 0x100000000 // seg_size:
        return "no segment %08X in a log id with %d-byte segments" % (seg, seg_size)
    expected = log_id * 0x100000000 + seg * seg_size
    if pageaddr != expected:
        return "first page address %X/%08X, the name says %X/%08X" % (
            pageaddr >> 32, pageaddr & 0xFFFFFFFF, expected >> 32, expected & 0xFFFFFFFF)
    # The first segment of a new timeline starts with pages copied from its
    # parent timeline, so the first page may carry a lower timeline.
    if not 1 <= timeline <= name_timeline:
        return "first page timeline %d does not fit timeline %d of the name" % (timeline, name_timeline)
    if system_identifier is not None and sysid != system_identifier:
        return "system identifier %d, this cluster's is %d" % (sysid, system_identifier)
    return None


def check_text_file(kind, content, size):
    """None if content (the whole file) is a plausible .history or .backup file; else why not."""
    if size == 0:
        return "empty file"
    if size > MAX_TEXT_FILE:
        return "%d bytes, too big for a %s file" % (size, kind)
    if b"\0" in content:
        return "binary content in a %s file" % kind
    if kind == "backup" and not content.startswith(b"START WAL LOCATION:"):
        return "not a backup history file (no START WAL LOCATION)"
    if kind == "history":
        for line in content.splitlines():
            line = line.strip()
            if line and not line.startswith(b"#") and not line[:1].isdigit():
                return "not a timeline history file (line %r)" % line[:40]
    return None


def check_file(kind, wal_name, head, size, cluster):
    """None if a fetched file may be delivered as wal_name; else the reason."""
    if kind in ("segment", "partial"):
        return check_segment(head, size, wal_name[:SEGMENT_NAME_LEN],
                             cluster.system_identifier, cluster.magics)
    return check_text_file(kind, head, size)


def exit_code_for(outcomes):
    """The exit code for the outcomes of the sources tried, in order."""
    if FOUND in outcomes:
        return DELIVERED
    if ABSENT in outcomes or INVALID in outcomes:
        return NOT_FOUND
    return UNAVAILABLE


def strip_compression(name):
    for suffix in COMPRESSION_SUFFIXES[1:]:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def newest_wal(names):
    """The newest segment among archive file names (compressed or not), or None."""
    segments = [n for n in (strip_compression(name) for name in names) if wal_kind(n) == "segment"]
    return max(segments, key=lambda n: (n[8:], n[:8])) if segments else None


def spool_plan(spooled, window):
    """(files to remove, segments to fetch): the spool keeps only the window's segments."""
    keep = set(window) | {SPOOL_LOCK, SPOOL_WANT, SPOOL_LOG}
    remove = sorted(name for name in spooled if name not in keep)
    missing = [name for name in window if name not in spooled]
    return remove, missing


def should_start_prefetch(spooled_in_window, prefetch):
    """Refill in batches: start a prefetcher once half the window or less is spooled."""
    return prefetch > 0 and spooled_in_window * 2 <= prefetch


def remote_fetch_script(path_glob, wal_names):
    """The sh script that streams wal_names from path_glob, in order, framed.

    For each name: "FILE NAME SUFFIX SIZE" and SIZE bytes, SUFFIX being -, .gz,
    .bz2 or .xz, from the first directory of the glob that has it; at the
    first name found nowhere: "MISSING NAME" and the end. The glob is expanded
    with IFS empty, so it is matched but never split or otherwise evaluated.
    """
    import shlex
    return ("IFS=; p=%s; for w in %s; do f=; for d in $p; do for s in '' .gz .bz2 .xz; do "
            "if [ -f \"$d/$w$s\" ] && [ -r \"$d/$w$s\" ]; then f=$d/$w$s; x=${s:--}; break 2; fi; "
            "done; done; if [ -z \"$f\" ]; then echo \"MISSING $w\"; exit 0; fi; "
            "n=$(wc -c < \"$f\") || exit 3; n=$((n+0)); echo \"FILE $w $x $n\"; "
            "head -c \"$n\" \"$f\" || exit 3; done"
            % (shlex.quote(path_glob), " ".join(shlex.quote(name) for name in wal_names)))


def remote_list_script(path_glob):
    """The sh script that lists every directory of path_glob, then "DIRS N"."""
    import shlex
    return ("IFS=; p=%s; n=0; for d in $p; do if [ -d \"$d\" ]; then n=$((n+1)); ls -1 \"$d\"; fi; "
            "done; echo \"DIRS $n\"" % shlex.quote(path_glob))


def ssh_argv(source, settings, script):
    """The ssh command that runs script (sh) on source's host over the shared connection."""
    import shlex
    try:
        extra = shlex.split(source.ssh_options)
    except ValueError as error:
        raise Failure("[source %s] ssh_options: %s" % (source.name, error), USAGE)
    # ssh keeps the first value it gets for an option: ssh_options win.
    argv = ["ssh"] + extra + [
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=%d" % settings.connect_timeout,
        "-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=3"]
    if settings.control_dir:
        argv += ["-o", "ControlMaster=auto",
                 "-o", "ControlPath=" + os.path.join(settings.control_dir, "%C"),
                 "-o", "ControlPersist=%d" % settings.control_persist]
    argv += ["-p", str(source.port)]
    if source.identity_file:
        argv += ["-i", source.identity_file]
    if source.user:
        argv += ["-l", source.user]
    # The login shell of the archive user may not be POSIX: run sh explicitly.
    return argv + ["-T", "--", source.host, "sh -c " + shlex.quote(script)]


# ---------------------------------------------------------------------------
# Settings and the cluster asking
# ---------------------------------------------------------------------------

class Source(object):
    """One [source NAME] section: where archived WAL can be fetched from."""

    def __init__(self, name, host, port, user, path, probe, identity_file, ssh_options):
        self.name, self.host, self.port, self.user = name, host, port, user
        self.path, self.probe = path, probe
        self.identity_file, self.ssh_options = identity_file, ssh_options

    @property
    def is_local(self):
        return not self.host


class Settings(object):
    """What this command reads from the config file."""

    def __init__(self, config):
        self.config_path = config.path
        names = config.list("archive", "sources")
        if not names:
            raise config.error("archive", "sources", "empty: name at least one [source NAME]")
        self.sources = [self.read_source(config, name) for name in names]
        self.spool_dir = config.str("archive", "spool_dir", "/var/lib/pg_zfs/spool")
        self.prefetch = config.int("archive", "prefetch", 8)
        self.timeout = config.int("archive", "timeout", 60, minimum=1)
        self.control_dir = config.str("archive", "control_dir", "") or "/tmp/pg_zfs-ssh-%d" % os.getuid()
        self.control_persist = config.int("archive", "control_persist", 60)
        self.connect_timeout = config.int("archive", "connect_timeout", 5, minimum=1)
        self.pgdata = config.str("postgres", "pgdata", "")
        text = config.str("postgres", "system_identifier", "")
        try:
            self.system_identifier = int(text) if text else None
        except ValueError:
            raise config.error("postgres", "system_identifier", "%r is not a whole number" % text)

    @staticmethod
    def read_source(config, name):
        section = "source " + name
        if not config.has_section(section):
            raise Failure("%s: [%s] missing (named in [archive] sources)" % (config.path, section), USAGE)
        host = config.str(section, "host", "")
        return Source(
            name, host, config.int(section, "port", 22, minimum=1), config.str(section, "user", ""),
            config.str(section, "path"),
            config.choice(section, "probe", ("ping", "tcp", "none"), "ping" if host else "none"),
            config.str(section, "identity_file", ""), config.str(section, "ssh_options", ""))


class Cluster(object):
    """The identity fetched segments must match."""

    def __init__(self, system_identifier, pg_major):
        self.system_identifier = system_identifier
        self.pg_major = pg_major
        self.magics = expected_magics(pg_major)


def read_cluster(settings):
    """The Cluster whose recovery asks: global/pg_control and PG_VERSION of the working
    directory (PostgreSQL runs restore_command in the data directory), else of
    [postgres] pgdata; [postgres] system_identifier, when set, wins."""
    for pgdata in (".", settings.pgdata):
        if not pgdata:
            continue
        try:
            with open(os.path.join(pgdata, "global", "pg_control"), "rb") as control:
                raw = control.read(8)
        except (IOError, OSError):
            continue
        if len(raw) != 8:
            continue
        try:
            with open(os.path.join(pgdata, "PG_VERSION")) as version_file:
                pg_major = version_file.read().strip() or None
        except (IOError, OSError):
            pg_major = None
        system_identifier = settings.system_identifier
        if system_identifier is None:
            system_identifier = struct.unpack("=Q", raw)[0]
        return Cluster(system_identifier, pg_major)
    if settings.system_identifier is None:
        raise Failure("cannot tell this cluster's system identifier: no global/pg_control in the "
                      "working directory or in [postgres] pgdata; set [postgres] system_identifier",
                      USAGE)
    return Cluster(settings.system_identifier, None)


# ---------------------------------------------------------------------------
# Signals, the time limit and child processes
# ---------------------------------------------------------------------------

class Interrupted(BaseException):
    """SIGTERM (PostgreSQL shutting down) or SIGINT: clean up, then end by that signal."""

    def __init__(self, signum):
        BaseException.__init__(self, signum)
        self.signum = signum


class TimedOut(BaseException):
    """[archive] timeout expired."""


RUNNING = []            # child processes to stop on any way out
_stopping = []          # a signal already started the way out


def on_signal(signum, _frame):
    if signum == signal.SIGALRM:
        if not _stopping:
            raise TimedOut()
        return
    if _stopping:
        return          # already cleaning up: let the clean-up finish
    _stopping.append(signum)
    raise Interrupted(signum)


def install_signal_handlers(timeout):
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        signal.signal(signum, on_signal)
    signal.setitimer(signal.ITIMER_REAL, timeout)


def stop_children():
    while RUNNING:
        proc = RUNNING.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def end_by_signal(signum):
    """End this process by signum itself, so PostgreSQL sees what stopped us."""
    logging.shutdown()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return UNAVAILABLE   # not reached unless the signal is blocked


def need_subprocess():
    """Import subprocess on first use: delivery from the spool never needs it."""
    global subprocess
    import subprocess


# ---------------------------------------------------------------------------
# Files: staged writes, decompression
# ---------------------------------------------------------------------------

class StagedFile(object):
    """A file written beside its final name and invisible until commit().

    Unnamed (O_TMPFILE) where the file system allows, so even kill -9 leaves
    nothing behind; otherwise a dot-file named after this process.
    """

    def __init__(self, directory, durable=False):
        self.directory = directory or "."
        self.durable = durable
        self.temp_path = None
        fd = None
        if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
            try:
                fd = os.open(self.directory, os.O_TMPFILE | os.O_WRONLY, 0o600)
            except OSError:
                fd = None
        if fd is None:
            self.temp_path = os.path.join(self.directory, ".%s.%d.tmp" % (PROG, os.getpid()))
            remove_quietly(self.temp_path)      # left by an earlier process with this pid
            fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.file = os.fdopen(fd, "wb")

    def write(self, data):
        self.file.write(data)

    def commit(self, target):
        """Put the complete file at target (replacing it), fsynced first if durable."""
        self.file.flush()
        if self.durable:
            os.fsync(self.file.fileno())
        name = os.path.basename(target)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            if self.temp_path is not None:
                os.rename(self.temp_path, target)
                self.temp_path = None
            else:
                source = "/proc/self/fd/%d" % self.file.fileno()
                try:
                    os.link(source, name, dst_dir_fd=dir_fd)   # linkat(AT_SYMLINK_FOLLOW)
                except OSError as error:
                    if error.errno != errno.EEXIST:
                        raise
                    temp = ".%s.%d.tmp" % (PROG, os.getpid())
                    remove_quietly(os.path.join(self.directory, temp))
                    os.link(source, temp, dst_dir_fd=dir_fd)
                    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            if self.durable:
                os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def discard(self):
        """Close; remove the temporary file if it was not committed."""
        try:
            self.file.close()
        except (IOError, OSError):
            pass
        if self.temp_path is not None:
            remove_quietly(self.temp_path)
            self.temp_path = None


def remove_quietly(path):
    try:
        os.unlink(path)
    except OSError as error:
        if error.errno != errno.ENOENT:
            raise


def make_decompressor(suffix):
    """An object with decompress(bytes) for suffix, or None for a plain file."""
    if suffix == ".gz":
        import zlib
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if suffix == ".bz2":
        import bz2
        return bz2.BZ2Decompressor()
    if suffix == ".xz":
        import lzma
        return lzma.LZMADecompressor()
    return None


class Receiver(object):
    """Writes one file's bytes, decompressed, into a StagedFile; keeps what validation needs."""

    def __init__(self, staged, suffix, keep):
        self.staged = staged
        self.suffix = suffix
        self.decompressor = make_decompressor(suffix)
        self.keep = keep
        self.head = b""
        self.size = 0
        self.problem = None

    def feed(self, data):
        if self.problem:
            return                       # drain the rest of a bad file, write nothing
        if self.decompressor is not None:
            try:
                data = self.decompress(data)
            except Exception as error:   # zlib.error, OSError (bz2), lzma.LZMAError
                self.problem = "cannot decompress: %s" % error
                return
        if len(self.head) < self.keep:
            self.head += data[:self.keep - len(self.head)]
        self.size += len(data)
        if self.size > MAX_SEG_SIZE:
            self.problem = "more than %d bytes" % MAX_SEG_SIZE
            return
        self.staged.write(data)

    def decompress(self, data):
        """The bytes data decompresses to. A file may hold several streams back to
        back (pbzip2, pigz -i, `cat a.gz b.gz`): gzip, bzip2 and xz read them all."""
        out = b""
        while data:
            if self.decompressor.eof:
                self.decompressor = make_decompressor(self.suffix)
            out += self.decompressor.decompress(data)
            data = self.decompressor.unused_data if self.decompressor.eof else b""
        return out

    def finish(self):
        if self.problem or self.decompressor is None:
            return
        decompressor, self.decompressor = self.decompressor, None
        if hasattr(decompressor, "flush"):          # zlib keeps a tail
            self.feed(decompressor.flush())
        if not decompressor.eof and not self.problem:
            self.problem = "compressed stream ends early"


def read_header(path):
    """(first bytes of the file, its size), or (None, None) if it is not there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return None, None
        raise
    try:
        return os.read(fd, LONG_HEADER.size), os.fstat(fd).st_size
    finally:
        os.close(fd)


def store(wal_name, suffix, size, read, target, durable, cluster, where):
    """Receive size bytes from read() as wal_name, check them, and put them at target.

    Returns FOUND, INVALID (a bad copy: nothing written) or FAILED (the bytes
    stopped coming). Nothing is left at target or beside it unless FOUND.
    """
    kind = wal_kind(wal_name)
    staged = StagedFile(os.path.dirname(target), durable)
    try:
        receiver = Receiver(staged, suffix, LONG_HEADER.size if kind in ("segment", "partial")
                            else MAX_TEXT_FILE + 1)
        remaining = size
        while remaining > 0:
            chunk = read(min(CHUNK, remaining))
            if not chunk:
                log.warning("%s from %s: transfer broke off after %d of %d bytes",
                            wal_name, where, size - remaining, size)
                return FAILED
            remaining -= len(chunk)
            receiver.feed(chunk)
        receiver.finish()
        problem = receiver.problem or check_file(kind, wal_name, receiver.head, receiver.size, cluster)
        if problem:
            log.warning("%s%s from %s is not valid: %s; treated as absent there",
                        wal_name, suffix, where, problem)
            return INVALID
        staged.commit(target)
        return FOUND
    finally:
        staged.discard()


# ---------------------------------------------------------------------------
# Sources: the probe, local directories, ssh
# ---------------------------------------------------------------------------

def probe(source, deadline):
    """True if source's host seems up (or there is nothing to probe)."""
    if source.is_local or source.probe == "none":
        return True
    wait = max(0.1, min(1.0, deadline - time.time()))
    if source.probe == "tcp":
        import socket
        try:
            socket.create_connection((source.host, source.port), timeout=wait).close()
            return True
        except (OSError, IOError):
            return False
    need_subprocess()
    try:
        code = run(["ping", "-c", "1", "-W", "1", source.host], timeout=wait + 1, check=False)[0]
    except Failure as failure:
        log.warning("[source %s] probe = ping: %s; trying the host anyway", source.name, failure)
        return True
    return code == 0


def down_memo(settings, source):
    """The file in the private control dir whose mtime says when source's probe last
    failed; None without a usable control dir or for an odd source name."""
    if not settings.control_dir or not all(c.isalnum() or c in "._-" for c in source.name):
        return None
    return os.path.join(settings.control_dir, "down-" + source.name)


def down_since(settings):
    """{source name: time its probe last failed} for the sources with a memo."""
    result = {}
    for source in settings.sources:
        path = down_memo(settings, source)
        if path:
            try:
                result[source.name] = os.stat(path).st_mtime
            except OSError:
                pass
    return result


def reachable(source, settings, deadline):
    """probe(source), remembered for the next calls (source_order puts it last)."""
    up = probe(source, deadline)
    path = down_memo(settings, source)
    if path:
        try:
            if not up:
                with open(path, "a"):
                    os.utime(path, None)
            elif os.path.exists(path):
                os.unlink(path)
        except OSError:
            pass                         # only a hint: never fail a fetch over it
    return up


def prepare_control_dir(path):
    """path if it is a safe private directory for ssh's connection sockets, else None."""
    import stat
    try:
        os.mkdir(path, 0o700)
    except OSError as error:
        if error.errno != errno.EEXIST:
            log.warning("cannot create %s (%s): ssh connections are not shared", path, error.strerror)
            return None
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        log.warning("%s is not a private directory of this user: ssh connections are not shared", path)
        return None
    # A socket path is at most 107 bytes; ssh adds "/" + 40 (%C) + 17 while binding.
    if len(path) > 48:
        log.warning("[archive] control_dir %s is too long for a socket path: "
                    "ssh connections are not shared", path)
        return None
    return path


def scratch_file():
    """An anonymous file for a child's stderr (a pipe could be held open by ssh's master)."""
    try:
        fd = os.open(os.environ.get("TMPDIR") or "/tmp", os.O_TMPFILE | os.O_RDWR, 0o600)
        return os.fdopen(fd, "w+b")
    except (AttributeError, OSError):
        import tempfile
        return tempfile.TemporaryFile()


def last_line(scratch):
    scratch.seek(0)
    lines = scratch.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else ""


def fetch_local(source, wal_names, deliver):
    """Fetch wal_names, in order, from a local directory glob: {name: outcome}."""
    import glob
    directories = sorted(d for d in glob.glob(source.path) if os.path.isdir(d))
    if not directories:
        log.warning("[source %s] no directory matches %s", source.name, source.path)
        return {wal_names[0]: UNREACHABLE}
    outcomes = {}
    for wal_name in wal_names:
        found = None
        for directory in directories:
            for suffix in COMPRESSION_SUFFIXES:
                path = os.path.join(directory, wal_name + suffix)
                if os.path.isfile(path):
                    found = (path, suffix)
                    break
            if found:
                break
        if not found:
            outcomes[wal_name] = ABSENT
            break
        with open(found[0], "rb") as wal_file:
            size = os.fstat(wal_file.fileno()).st_size
            outcomes[wal_name] = deliver(wal_name, found[1], size, wal_file.read)
    return outcomes


def fetch_remote(source, settings, wal_names, deliver):
    """Fetch wal_names, in order, from source in ONE ssh session: {name: outcome}."""
    need_subprocess()
    argv = ssh_argv(source, settings, remote_fetch_script(source.path, wal_names))
    log.debug("run: %s", " ".join(argv))
    errors = scratch_file()
    try:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=errors, cwd="/")
        except OSError as error:
            log.warning("[source %s] cannot run ssh: %s", source.name, error.strerror or error)
            return {wal_names[0]: UNREACHABLE}
        RUNNING.append(proc)
        outcomes = {}
        for wal_name in wal_names:
            line = proc.stdout.readline(256)
            if not line:
                break
            words = line.decode("ascii", "replace").split()
            if words == ["MISSING", wal_name]:
                outcomes[wal_name] = ABSENT
                break
            suffix = words[2] if len(words) == 4 else None
            if (words[:2] != ["FILE", wal_name] or suffix not in ("-",) + COMPRESSION_SUFFIXES[1:]
                    or not words[3].isdigit()):
                log.warning("[source %s] unexpected answer %r", source.name, line[:80])
                break
            outcomes[wal_name] = deliver(wal_name, "" if suffix == "-" else suffix, int(words[3]),
                                         proc.stdout.read)
            if outcomes[wal_name] == FAILED:
                break
        if len(outcomes) < len(wal_names) and ABSENT not in outcomes.values():
            proc.kill()             # we stopped reading: do not let it block on the pipe
        code = proc.wait()
        RUNNING.remove(proc)
        unanswered = [name for name in wal_names if name not in outcomes]
        if code != 0 and unanswered and ABSENT not in outcomes.values() and FAILED not in outcomes.values():
            reason = last_line(errors) or "exit code %d" % code
            log.warning("[source %s] ssh %s: %s", source.name, source.host, reason)
            outcomes[unanswered[0]] = UNREACHABLE if code == 255 and not outcomes else FAILED
        return outcomes
    finally:
        errors.close()


def fetch_files(source, settings, wal_names, deliver):
    """{name: outcome} for the names source answered, in order, up to the first it lacks."""
    if source.is_local:
        return fetch_local(source, wal_names, deliver)
    return fetch_remote(source, settings, wal_names, deliver)


def list_archive(source, settings):
    """(number of directories matching path, file names in them) of a source."""
    if source.is_local:
        import glob
        directories = [d for d in glob.glob(source.path) if os.path.isdir(d)]
        return len(directories), [name for d in directories for name in os.listdir(d)]
    need_subprocess()
    code, out, err = run(ssh_argv(source, settings, remote_list_script(source.path)),
                         timeout=settings.timeout, check=False)
    lines = out.splitlines()
    if code != 0 or not lines or not lines[-1].startswith("DIRS "):
        raise Failure((err.strip().splitlines() or ["exit code %d" % code])[-1], UNAVAILABLE)
    return int(lines[-1].split()[1]), lines[:-1]


# ---------------------------------------------------------------------------
# The spool and the prefetcher
# ---------------------------------------------------------------------------

def spool_for(spool_root, data_directory):
    """The spool of one data directory, below [archive] spool_dir.

    A restored clone and the standby it came from read the same config; each
    gets its own prefetch window so neither prunes what the other is about to use.
    """
    import hashlib
    name = os.path.basename(data_directory.rstrip("/")) or "root"
    digest = hashlib.sha1(data_directory.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return os.path.join(spool_root, "%s-%s" % (name, digest))


def spool_file(settings, wal_name):
    return os.path.join(settings.spool_dir, wal_name)


def deliver_from_spool(settings, wal_name, dest, cluster):
    """True if a valid spooled copy of wal_name was moved to dest. Invalid copies are removed."""
    path = spool_file(settings, wal_name)
    header, size = read_header(path)
    if header is None:
        return False
    problem = check_segment(header, size, wal_name, cluster.system_identifier, cluster.magics)
    if problem:
        log.warning("spooled %s is not valid: %s; removed", wal_name, problem)
        remove_quietly(path)
        return False
    try:
        os.rename(path, dest)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return False                 # the prefetcher pruned it just now
        if error.errno != errno.EXDEV:
            raise
        with open(path, "rb") as spooled:
            if store(wal_name, "", size, spooled.read, dest, False, cluster, "the spool") != FOUND:
                return False
        remove_quietly(path)
    log.debug("%s delivered from the spool", wal_name)
    return True


def try_lock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (IOError, OSError) as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def read_want(settings):
    """(segment, segment size) the newest delivery asked the prefetcher for, or None."""
    try:
        with open(spool_file(settings, SPOOL_WANT)) as want_file:
            words = want_file.read().split()
    except (IOError, OSError):
        return None
    if len(words) != 2 or wal_kind(words[0]) != "segment" or not words[1].isdigit():
        return None
    return words[0], int(words[1])


def wait_for_prefetcher(settings, wal_name, deadline):
    """If the running prefetcher is fetching wal_name, wait (a little) until it is spooled."""
    want = read_want(settings)
    if want is None or wal_name not in following_segments(want[0], want[1], settings.prefetch):
        return
    try:
        fd = os.open(spool_file(settings, SPOOL_LOCK), os.O_RDWR)
    except OSError:
        return
    try:
        until = min(deadline - 1, time.time() + 3)
        while time.time() < until and not os.path.exists(spool_file(settings, wal_name)):
            if try_lock(fd):
                return                   # no prefetcher any more
            time.sleep(0.005)
    finally:
        os.close(fd)


def start_prefetch(settings, wal_name, dest, cluster, verbose):
    """After delivering segment wal_name: ask for the next segments, starting a
    detached prefetcher unless one runs or the spool is well filled."""
    header, _size = read_header(dest)
    seg_size = LONG_HEADER.unpack_from(header)[6]
    if not os.path.isdir(settings.spool_dir):
        os.makedirs(settings.spool_dir, 0o700)      # the root too, when missing
    want_fd = os.open(spool_file(settings, SPOOL_WANT), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(want_fd, ("%s %d\n" % (wal_name, seg_size)).encode("ascii"))
    finally:
        os.close(want_fd)
    if not needs_refill(settings, (wal_name, seg_size)):
        return
    lock_fd = os.open(spool_file(settings, SPOOL_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not try_lock(lock_fd):
            return                       # the running prefetcher reads the want file again
        need_subprocess()
        # The child inherits the locked file description: it holds the lock from its
        # first instruction, so the next call never starts a second one.
        argv = [sys.executable, os.path.abspath(__file__), "-c", os.path.abspath(settings.config_path),
                "--prefetch", "--lock-fd", str(lock_fd), "--spool-dir", settings.spool_dir,
                "--system-identifier", str(cluster.system_identifier)]
        if cluster.pg_major:
            argv += ["--pg-major", cluster.pg_major]
        if verbose:
            argv.append("--verbose")
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, cwd="/", close_fds=True, pass_fds=(lock_fd,),
                         start_new_session=True)
    finally:
        os.close(lock_fd)


def prefetch_window(settings, want, cluster):
    """Fill the spool with the segments after want; remove everything else from it."""
    window = following_segments(want[0], want[1], settings.prefetch)
    remove, missing = spool_plan(set(os.listdir(settings.spool_dir)), window)
    for name in remove:
        remove_quietly(spool_file(settings, name))
    deadline = time.time() + settings.timeout
    for source in source_order(settings.sources, down_since(settings), time.time()):
        if not missing:
            return
        if not reachable(source, settings, deadline):
            log.info("[source %s] does not answer", source.name)
            continue

        def deliver(wal_name, suffix, size, read):
            return store(wal_name, suffix, size, read, spool_file(settings, wal_name), True,
                         cluster, "[source %s]" % source.name)
        outcomes = fetch_files(source, settings, missing, deliver)
        log.info("[source %s] %s", source.name,
                 " ".join("%s:%s" % (name, outcomes[name]) for name in missing if name in outcomes))
        missing = [name for name in missing if outcomes.get(name) != FOUND]


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def fetch_command(args, config):
    """Deliver args.wal_name at args.dest: from the spool, else from the first source that has it."""
    kind = wal_kind(args.wal_name)      # main() refused any other name already
    if not args.dest or os.path.isdir(args.dest):
        raise Failure("destination %r must be a file path (%%p)" % args.dest, USAGE)
    if not os.path.isdir(os.path.dirname(args.dest) or "."):
        raise Failure("directory of destination %r does not exist" % args.dest, USAGE)
    settings = Settings(config)
    install_signal_handlers(settings.timeout)
    deadline = time.time() + settings.timeout
    cluster = read_cluster(settings)
    # PostgreSQL runs restore_command in the data directory.
    settings.spool_dir = spool_for(settings.spool_dir, os.getcwd())
    prefetching = kind == "segment" and settings.prefetch > 0
    if prefetching:
        wait_for_prefetcher(settings, args.wal_name, deadline)
        if deliver_from_spool(settings, args.wal_name, args.dest, cluster):
            after_delivery(settings, args, cluster)
            return DELIVERED
    settings.control_dir = prepare_control_dir(settings.control_dir)
    outcomes = []
    for source in source_order(settings.sources, down_since(settings), time.time()):
        outcome = fetch_from(source, settings, args, cluster, deadline)
        outcomes.append(outcome)
        if outcome == FOUND:
            log.debug("%s delivered from [source %s]", args.wal_name, source.name)
            break
    code = exit_code_for(outcomes)
    if code == DELIVERED and prefetching:
        after_delivery(settings, args, cluster)
    elif code == NOT_FOUND:
        log.info("%s not found on any reachable source", args.wal_name)
    elif code == UNAVAILABLE:
        log.error("%s: no source reachable or every transfer failed", args.wal_name)
    return code


def fetch_from(source, settings, args, cluster, deadline):
    """The outcome of asking one source for args.wal_name."""
    if not reachable(source, settings, deadline):
        log.warning("[source %s] %s does not answer (probe = %s)", source.name, source.host, source.probe)
        return UNREACHABLE

    def deliver(wal_name, suffix, size, read):
        return store(wal_name, suffix, size, read, args.dest, False, cluster, "[source %s]" % source.name)
    outcomes = fetch_files(source, settings, [args.wal_name], deliver)
    return outcomes.get(args.wal_name, FAILED)


def after_delivery(settings, args, cluster):
    """Start the prefetch; its failure never fails the delivery that already happened
    (not even [archive] timeout expiring now: exit 3 would leave a file at DEST)."""
    try:
        start_prefetch(settings, args.wal_name, args.dest, cluster, args.verbose)
    except (Failure, OSError, IOError) as error:
        log.warning("prefetch not started: %s", error)
    except TimedOut:
        log.warning("prefetch not started: [archive] timeout expired")


def prefetch_command(args, config):
    """The detached prefetcher: serve the want file while deliveries keep asking."""
    settings = Settings(config)
    settings.spool_dir = args.spool_dir
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    handler = logging.FileHandler(spool_file(settings, SPOOL_LOG), mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s " + PROG + " prefetch: %(levelname)s: %(message)s"))
    log.handlers = [handler]
    cluster = Cluster(args.system_identifier, args.pg_major)
    settings.control_dir = prepare_control_dir(settings.control_dir)
    lock_fd = args.lock_fd
    if lock_fd is None:                 # started by hand
        lock_fd = os.open(spool_file(settings, SPOOL_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        if not try_lock(lock_fd):
            return DELIVERED
    served = None
    idle_until = 0       # the first want is served at once: the delivery saw the need
    while True:
        want = read_want(settings)
        # Once running, refill as soon as recovery takes a segment: one more ssh
        # session over the shared connection costs little; a wait costs more.
        if want is not None and want != served and (served is None or needs_refill(settings, want, 1)):
            served = want
            signal.setitimer(signal.ITIMER_REAL, settings.timeout)
            try:
                prefetch_window(settings, want, cluster)
            except (Failure, TimedOut, OSError, IOError) as error:
                log.warning("prefetch after %s stopped: %s", want[0], error or "timeout")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                stop_children()
            idle_until = time.time() + PREFETCH_LINGER
            continue
        if time.time() < idle_until:
            # Stay a moment: recovery consumes the spool and a running prefetcher
            # refills it without a new process and a new ssh session.
            time.sleep(0.02)
            continue
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        # A delivery may have asked for more while we held the lock.
        want = read_want(settings)
        if want in (None, served) or not needs_refill(settings, want) or not try_lock(lock_fd):
            return DELIVERED
        idle_until = time.time() + PREFETCH_LINGER


def needs_refill(settings, want, missing=None):
    """True if half the window after want or less is spooled (or at least missing segments lack)."""
    window = following_segments(want[0], want[1], settings.prefetch)
    spooled = sum(1 for name in window if os.path.exists(spool_file(settings, name)))
    if missing is not None:
        return settings.prefetch - spooled >= missing
    return should_start_prefetch(spooled, settings.prefetch)


def check_command(settings):
    """--check: print each source's state; 0 if at least one source works."""
    settings.control_dir = prepare_control_dir(settings.control_dir)
    working = 0
    for source in settings.sources:
        started = time.time()
        where = "local" if source.is_local else "%s:%d" % (source.host, source.port)
        if not probe(source, started + settings.timeout):
            print("%s (%s): unreachable (probe = %s)" % (source.name, where, source.probe))
            continue
        try:
            directories, names = list_archive(source, settings)
        except Failure as failure:
            print("%s (%s): reachable, listing %s failed: %s" % (source.name, where, source.path, failure))
            continue
        round_trip = (time.time() - started) * 1000
        if directories:
            working += 1
        print("%s (%s): reachable, %s %s, newest WAL file %s, round trip %.0f ms" % (
            source.name, where, source.path,
            "matches %d director%s" % (directories, "y" if directories == 1 else "ies")
            if directories else "matches NO directory",
            newest_wal(names) or "none", round_trip))
    return DELIVERED if working else UNAVAILABLE


# ---------------------------------------------------------------------------
# Arguments and main
# ---------------------------------------------------------------------------

class Arguments(object):
    """What PostgreSQL passes: [-c CONFIG] WALNAME DEST (parsed without argparse)."""

    def __init__(self, config, wal_name, dest):
        self.config, self.wal_name, self.dest = config, wal_name, dest
        self.verbose = self.check = self.prefetch = False


def quick_args(argv):
    """Arguments for exactly the shapes restore_command uses, else None (argparse then)."""
    if len(argv) == 2 and not argv[0].startswith("-") and not argv[1].startswith("-"):
        return Arguments(None, argv[0], argv[1])
    if len(argv) == 4 and argv[0] in ("-c", "--config") and not argv[2].startswith("-") \
            and not argv[3].startswith("-"):
        return Arguments(argv[1], argv[2], argv[3])
    return None


def parse_args(argv):
    import argparse
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", help="config file (default: $PG_ZFS_CONFIG or %s)" % DEFAULT_CONFIG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version="%(prog)s " + VERSION)
    parser.add_argument("--check", action="store_true",
                        help="test every source: reachable, archive path, newest WAL file, round trip")
    parser.add_argument("wal_name", nargs="?", metavar="WALNAME",
                        help="the WAL file PostgreSQL wants (%%f in restore_command)")
    parser.add_argument("dest", nargs="?", metavar="DEST",
                        help="where to put it, relative to the data directory (%%p in restore_command)")
    # The detached prefetcher: the script starts itself with these.
    parser.add_argument("--prefetch", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spool-dir", help=argparse.SUPPRESS)
    parser.add_argument("--system-identifier", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pg-major", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.check and not args.prefetch and (args.wal_name is None or args.dest is None):
        parser.error("WALNAME and DEST are required (restore_command = '%s %%f %%p')" % sys.argv[0])
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = quick_args(argv) or parse_args(argv)
    except SystemExit as done:      # argparse: --help, --version, or a usage error (2)
        return done.code if isinstance(done.code, int) and 0 <= done.code <= 2 else USAGE
    setup_logging(args.verbose)
    try:
        if not args.check and not args.prefetch and wal_kind(args.wal_name) is None:
            # Before anything else, the config included.
            raise Failure("refusing %r: not a WAL segment, .partial, .history or .backup name"
                          % args.wal_name, USAGE)
        config = Config.load(config_path(args.config))
        if args.prefetch:
            return prefetch_command(args, config)
        if args.check:
            return check_command(Settings(config))
        return fetch_command(args, config)
    except Failure as failure:
        log.error("%s", failure)
        return failure.code if 0 < failure.code <= 3 else UNAVAILABLE
    except TimedOut:
        log.error("%s: gave up after [archive] timeout", getattr(args, "wal_name", "") or "check")
        return UNAVAILABLE
    except Interrupted as stop:
        signal.setitimer(signal.ITIMER_REAL, 0)
        stop_children()
        log.warning("stopped by signal %d; nothing delivered", stop.signum)
        return end_by_signal(stop.signum)
    except Exception as error:      # a bug must not abort recovery: report and say "unavailable"
        log.error("internal error: %s: %s", type(error).__name__, error)
        return UNAVAILABLE
    finally:
        if not _stopping:
            signal.setitimer(signal.ITIMER_REAL, 0)
        stop_children()


if __name__ == "__main__":
    sys.exit(main())
