#!/usr/bin/env python3
"""Fetch one archived WAL file for PostgreSQL's restore_command.

Wired in as (postgresql.conf on 12+, recovery.conf on 9.6-11):

    restore_command = '/opt/pg_zfs/bin/pg_wal_fetch.py %f %p'

or, faster (PostgreSQL starts it once per file; -S skips site-packages and
their .pth files, which this file, standard library only, never needs):

    restore_command = '/usr/bin/python3 -S /opt/pg_zfs/bin/pg_wal_fetch.py %f %p'

%f is the WAL file name PostgreSQL wants, %p the path (relative to the data
directory, the working directory PostgreSQL runs the command in) where it must
appear. The sources of [archive] sources are tried in order; the first that
holds a valid copy wins. Check the sources by hand with:

    pg_wal_fetch.py --check             # --json: the same as one JSON object

What it does, in order:
  1. Refuse any WALNAME that is not a segment (24 hex digits), a .partial
     segment, a TTTTTTTT.history or a .backup file, before anything runs.
  2. Deliver from the prefetch spool if a valid copy is there (no network).
  3. Otherwise try each source in order (one that failed in the last 60 s,
     by its probe, a stall or no answer, goes last, never skipped): a quick
     probe (ping; tcp waits for sshd's banner; or none; none within 2 s
     of the source's last answer: a burst of calls probes once), then ONE
     ssh command over a shared connection (ControlMaster) that streams the
     first copy of the name under the source's directory glob. Every copy is
     tried, in order, until one is valid: each directory the glob matches,
     and in each NAME, NAME.gz, NAME.bz2, NAME.xz. A local source (empty
     host) reads the glob directly. Without prefetch, the first source's ssh
     starts before the rest of this file loads (the command an earlier call
     noted in spool_dir/.code, for this very config file); the rest reads it
     only if it is exactly the command it would start, and stops it otherwise.
  4. Limits per source: no byte for [archive] stall_timeout seconds, or its
     share of [archive] timeout used up (the time left divided by the sources
     left), and the source is given up for the next one.
  5. Check a segment whole before PostgreSQL sees it: its size (as its first
     page states, checked while it arrives, decompressed output capped
     there), every page header (magic of the cluster's version, address,
     timeline, flags; zero pages only at the end), the system identifier,
     and every record that lies wholly inside it (length, link to the
     previous record, CRC-32C) by the cluster's pg_waldump ([postgres] bindir,
     the running server's, /usr/pgsql-N/bin or /usr/lib/postgresql/N/bin), or
     in Python (seconds per segment) where there is none. A segment must run
     to its end or end with a WAL switch. A bad copy counts as absent on that
     source. What cannot be checked: the one record that continues into the
     next segment (PostgreSQL checks it when it reads it), and of a .history
     file only its format.
  6. Deliver atomically: an unnamed temporary file beside DEST, linked into
     place when complete; nothing at DEST on any failure, SIGTERM included.
  7. After a segment, start (detached, one at a time) a prefetcher that keeps
     the next [archive] prefetch segments of the timeline in a spool of this
     data directory's own below [archive] spool_dir, each checked whole
     before it is spooled (not fsynced: a spool serves one boot of the
     machine; one of an earlier boot is emptied, never read). It asks a
     source for a long run of segments in ONE ssh session and takes each
     when it fits the window of the newest delivery (the host waits
     meanwhile), so a delivery from the spool is a rename when the spool is
     on pg_wal's file system (the default, /var/lib/pg_zfs/spool, often is
     not: see the README). A call
     waits (3 s at most) for a segment the prefetcher is fetching, never for
     one its last pass asked every source for in vain (the end of the
     archive): it asks the sources itself. A spool whose data directory is
     gone is removed by the next call that fetches from a source.

Doubt stops a point-in-time restore: PostgreSQL reads every exit code up to
125 as "not found", and in archive recovery (recovery.signal without
standby.signal; recovery.conf without standby_mode = on) "not found" means
"the archive ends here: open the database". So "not found" (1) is said only
when every source cleanly answered that it has no copy. When a segment is
missing in archive recovery and a source was unreachable, stalled, matched
no directory, or had only bad copies, the exit code is 200: PostgreSQL stops
the recovery (FATAL) instead of opening a copy short of what the archive
holds, and this line in its log says why:

    pg_wal_fetch: ERROR: stopping recovery at 000000010000000000000005: [source host25] unreachable (probe ping); [source host26] absent

A standby (standby.signal, standby_mode = on) keeps retrying instead: there
every exit code stays at 125 or below. History files never stop a recovery
(PostgreSQL probes for timelines that do not exist at every start and end).

The archive hosts' side: the guest's key should run nothing but pg_wal_serve,
a read-only sh program this file writes (hosts need only POSIX sh, no
Python). On each host, for the archive's owner (not root), e.g. in
~postgres/.ssh/authorized_keys:

    restrict,from="GUEST",command="/usr/local/bin/pg_wal_serve '/data04/pgdata/arch/*'" ssh-ed25519 AAAA...

    pg_wal_fetch.py --serve-script > pg_wal_serve   # the program, for the hosts
    pg_wal_fetch.py --install-server /usr/local/bin # or write it there (0755)
    pg_wal_fetch.py --authorized-keys               # that line, per source
    pg_wal_fetch.py --check                         # says "key restricted"

It serves only `fetch COPY NAME...`, `list` and `probe` for valid WAL names
from the glob of its own command line; the same requests sent to a key
installed unrestricted run as a plain `sh -c` script, so this file works both
ways, and --check warns that such a key runs any command on the host.

That key never removes anything. Archive cleanup (`pg_zfs_snap.py oldest-wal
--apply`) uses a SEPARATE key, [source NAME] cleanup_identity, whose line
(--authorized-keys prints it too) runs pg_wal_serve in cleanup mode:

    restrict,from="GUEST",command="/usr/local/bin/pg_wal_serve --cleanup '/data04/pgdata/arch/*'" ssh-ed25519 AAAA...

It serves only `cleanup NAME [dry-run]`, NAME a segment name: it removes in
the glob's directories the segments and .partial segments, plain or
.gz/.bz2/.xz, before NAME as pg_archivecleanup does (timeline ignored,
.history and .backup kept) and names each; anything else is refused (exit 2).

Config (default /etc/pg_zfs/pg_zfs.conf, or -c, or $PG_ZFS_CONFIG):
    [archive] sources, spool_dir, prefetch, timeout, stall_timeout,
              control_dir, control_persist, connect_timeout
    [source NAME] host, port, user, path, probe, identity_file, ssh_options,
              cleanup_identity (--authorized-keys only)
    [postgres] pgdata, system_identifier, bindir

Exit codes, and what [archive] spool_dir/fetch-stats.json counts the call as:
    0    delivered (from the spool or a source)                  delivered
    1    not found: every source answered that it has no copy    absent
         (the normal end of the archive)
    2    bad arguments, bad config, or an invalid WAL name (in   unreachable
         archive recovery: 200)
    3    not delivered, and not every source said absent (a      invalid when every
         source unreachable or stalled, only bad copies, no      source answered and
         archive directory, [archive] timeout); in archive       all copies found were
         recovery of a segment: 200                              invalid; else unreachable
    200  archive recovery of a segment in doubt (see above):     as for 2 or 3
         PostgreSQL stops
    SIGTERM (PostgreSQL shutting down): clean up, then end by    not counted
         SIGTERM itself.
An exit 1 for any other reason (an error) counts as unreachable.

Counters for monitoring (pg_zfs_snap.py metrics reads them): every
restore_command call (not --check, not the prefetcher) adds its outcome and
its wall time to [archive] spool_dir/fetch-stats.json (0644), e.g.

    {"delivered": {"count": 812, "seconds": 17.3}, "absent": {"count": 1,
     "seconds": 0.21}, "invalid": {"count": 0, "seconds": 0.0},
     "unreachable": {"count": 2, "seconds": 40.1}, "updated": 1764525799.25}

under a flock of .fetch-stats.lock there. A call that cannot count (the lock
busy for a second, no permission, a full disk) goes uncounted, saying so only
with -v; counting never changes what the call did or how it exits.
"""

# ---------------------------------------------------------------------------
# How this file is laid out, and why
# ---------------------------------------------------------------------------
# PostgreSQL starts a new process for every file it wants, and Python compiles
# the script it runs (__main__) on every start, never from a cache. Compiling
# all of this file took longer than everything else a delivery from the
# prefetch spool does (README, "Benchmarks"). So the file has three parts:
#   1. This first part, compiled on every call: finding the config's
#      [archive] spool_dir, and load_part(), which runs a part below into
#      this module from its code compiled earlier. That is kept under
#      spool_dir/.code (a private directory, one file per part, version of
#      this file and of Python): loading it takes a fraction of a millisecond,
#      compiling it several. It imports nothing but posix and sys: importing
#      os loads posixpath, stat and _collections_abc, about 4 ms of a 20 ms
#      call under Python 3.6, so the few path helpers it needs are its own
#      (path_join, is_directory, ...).
#   2. QUICK: what a delivery from the spool needs, loaded on every call:
#      quick_delivery() and the few pure functions it uses; and, for a call
#      without prefetch, start_early_fetch(), which starts the call's ssh
#      before the rest loads, so the loading overlaps ssh's start and the
#      first megabytes. It imports only errno, fcntl, struct and time besides
#      (and json only to read or write a counters file other than its own,
#      count_fetch), and no os either.
#   3. REST: everything else (the config, the sources and ssh, the
#      whole-segment checks, the prefetcher, --check, the archive hosts'
#      program), loaded only when a call needs more than the spool. It
#      imports os and uses it as usual.
# QUICK and REST are plain Python kept as text: read them as such. They run
# as part of this module, with this file's own line numbers in tracebacks.
# Anything quick_delivery is not sure of (a config changed since the last
# full run, a copy that is not valid, no spool, -v, another argument) is left
# to the rest, which does everything as if quick_delivery had not run.
# tests/test_wal_fetch_unit.py runs pyflakes and the project's checks over the
# file as if QUICK and REST were plain code (plain_text() there).
import posix
import sys

DEFAULT_CONFIG = "/etc/pg_zfs/pg_zfs.conf"
DEFAULT_SPOOL = "/var/lib/pg_zfs/spool"
CODE_DIR = ".code"           # in [archive] spool_dir: QUICK and REST compiled (load_part)
LOADED = set()               # the parts load_part ran here


# The path helpers of the first two parts (posixpath's rules; see above).

def path_join(path, *names):
    """What os.path.join(path, *names) returns."""
    for name in names:
        if name.startswith("/"):
            path = name
        elif not path or path.endswith("/"):
            path += name
        else:
            path += "/" + name
    return path


def path_dirname(path):
    """What os.path.dirname(path) returns."""
    head = path[:path.rfind("/") + 1]
    if head and head != "/" * len(head):
        head = head.rstrip("/")
    return head


def is_directory(path):
    try:
        return posix.stat(path).st_mode & 0o170000 == 0o040000
    except (OSError, ValueError):
        return False


def make_directories(path, mode):
    """What os.makedirs(path, mode) does on Python 3.6: every missing directory of
    path made, each with mode."""
    parent = path_dirname(path.rstrip("/"))
    if parent and not is_directory(parent):
        make_directories(parent, mode)
    posix.mkdir(path, mode)


def environment(name):
    """The environment variable name, or None (posix.environ holds bytes)."""
    value = posix.environ.get(name.encode("ascii"))
    return None if value is None else value.decode(sys.getfilesystemencoding(), "surrogateescape")


def config_path_of(argv):
    """The config file argv names (-c/--config, else $PG_ZFS_CONFIG, else the default)."""
    for index, word in enumerate(argv):
        if word in ("-c", "--config") and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith("--config="):
            return word[len("--config="):]
    return environment("PG_ZFS_CONFIG") or DEFAULT_CONFIG


def quick_config_value(path, section, key):
    """The value of key in [section] of the INI file at path, read the simple way
    (no configparser: start-up time); None if absent or the file is not simple.
    Only a hint for finding the spool: the config note there says whether the
    full reader validated this very file (quick_delivery)."""
    with open(path, "rb") as config_file:
        raw = config_file.read()
    # As "utf-8-sig" decodes it, without loading that codec (start-up time).
    text = (raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw).decode("utf-8", "replace")
    current, found = None, None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped[1:-1]
        elif current == section:
            name, equals, value = stripped.partition("=")
            if equals and name.strip().lower() == key:
                found = value.strip()
    return found


def quick_spool_root(argv):
    """[archive] spool_dir of the config argv names, read the simple way (a hint for
    the full run; the spool's config note proves it for a quick delivery); None when
    the config cannot be read."""
    try:
        config_path = config_path_of(argv)
        if config_path:
            return quick_config_value(config_path, "archive", "spool_dir") or DEFAULT_SPOOL
    except (IOError, OSError):
        pass
    return None


def load_part(name, spool_root=None):
    """Run the text of part name ("QUICK" or "REST") into this module, once: its
    code from spool_root/.code when that private directory holds it compiled
    from this very text by this very Python, else compiled here (and kept there)."""
    if name in LOADED:
        return
    import marshal
    text = globals()[name]
    code, code_dir, tag = None, None, None
    try:
        info = posix.stat(__file__)
        tag = "%s-%s-%x-%x" % (name.lower(), sys.implementation.cache_tag, info.st_dev, info.st_ino)
        code_dir = path_join(spool_root, CODE_DIR) if spool_root else None
    except OSError:
        pass
    if code_dir and private_directory(code_dir):
        try:
            with open(path_join(code_dir, tag), "rb") as cached:
                if posix.fstat(cached.fileno()).st_uid == posix.getuid():
                    kept_text, code = marshal.loads(cached.read())
                    if kept_text != text:       # this file was written since
                        code = None
        except (IOError, OSError, EOFError, ValueError, TypeError):
            code = None
    if code is None:
        # Blank lines first: tracebacks name this file's own line numbers.
        with open(__file__, "rb") as whole:
            head = whole.read().split(("\n%s = r'''\n" % name).encode("ascii"), 1)[0]
        code = compile("\n" * (head.count(b"\n") + 1) + text, __file__, "exec")
        if code_dir:
            keep_code(code_dir, tag, marshal.dumps((text, code)))
    exec(code, globals())
    LOADED.add(name)


def exit_at_once(code):
    """End this process with code without the interpreter's tear-down (about 5 ms
    of every call, issue 17) when nothing needs it: output flushed, logging shut
    down, no other thread (the prefetcher's checks). Else return (sys.exit then)."""
    if not isinstance(code, int) or not 0 <= code <= 255 or (
            "threading" in sys.modules and sys.modules["threading"].active_count() > 1):
        return
    try:
        if "logging" in sys.modules:
            sys.modules["logging"].shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        return
    posix._exit(code)


def private_directory(path):
    """True if path is a directory of this user that no one else may write to."""
    try:
        info = posix.lstat(path)
    except OSError:
        return False
    return info.st_uid == posix.getuid() and not info.st_mode & 0o022 and (info.st_mode & 0o170000) == 0o040000


def keep_code(code_dir, tag, data):
    """Store data as code_dir/tag (atomically), removing the same part's other
    versions (their tags start with the same word, up to a "-"); quietly nothing
    when the directory cannot be made private."""
    part = tag.split("-", 1)[0] + "-"
    try:
        if not is_directory(code_dir):
            make_directories(code_dir, 0o700)      # spool_root too: prefetch = 0 makes no spool
        if not private_directory(code_dir):
            return
        for old in posix.listdir(code_dir):
            if old.startswith(part) and old != tag:
                posix.unlink(path_join(code_dir, old))
        temp = path_join(code_dir, ".%s.%d.tmp" % (tag, posix.getpid()))
        with open(temp, "wb") as out:
            out.write(data)
        posix.rename(temp, path_join(code_dir, tag))
    except (IOError, OSError):
        pass


# The delivery from the spool: see "How this file is laid out" at the top.
QUICK = r'''
import errno
import fcntl
import struct
import time


VERSION = "0.1.0"
PROG = "pg_wal_fetch"
# The config sections this script reads (CONFIG_SCHEMA): typos in them are refused.
CONFIG_READS = ("postgres", "archive", "source")

DELIVERED, NOT_FOUND, USAGE, UNAVAILABLE = 0, 1, 2, 3
# Above 125: PostgreSQL's startup process ends with FATAL instead of taking
# "not found" for the end of the archive (RestoreArchivedFile, 9.6 to 18).
STOP_RECOVERY = 200

# Outcome of one source for one file. Only FOUND and ABSENT are certain:
# every other one leaves the question "is this the end of the archive?" open.
FOUND, ABSENT, INVALID = "found", "absent", "invalid"
UNREACHABLE, STALLED, FAILED, NO_DIRECTORY = "unreachable", "stalled", "failed", "no archive directory"
NO_MORE = "no more copies"   # asked for copy k of a name that has fewer

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
SPOOL_MISSED = ".prefetch.missed"   # segments the prefetcher's last pass asked every source for, in vain
SPOOL_BOOT = ".prefetch.boot"   # the boot its segments were spooled in (spool_of_this_boot)
SPOOL_SUFFIX = ".boot"   # of a spool's name (spool_for)
BOOT_ID = "/proc/sys/kernel/random/boot_id"
PREFETCH_LINGER = 2.0    # seconds an idle prefetcher waits for the next request
STREAM_AHEAD = 120       # segments after the window one prefetch session asks for
DOWN_MEMO = 60.0         # seconds a source whose probe failed is tried last
UP_MEMO = 2.0            # seconds a source that answered is not probed again (probe_needed)
# What a source that answered says: it is up, whatever it had.
ANSWERED = (FOUND, ABSENT, INVALID, NO_MORE, NO_DIRECTORY)
SPOOL_OWNER = ".pgdata"  # in each spool: the data directory it serves
STOP_MARK = "stopping recovery at"
CONFIG_NOTE = ".config-ok"   # in each spool: the config file the last full run validated
# In [archive] spool_dir: restore_command calls counted by outcome (count_fetch).
FETCH_STATS = "fetch-stats.json"
FETCH_STATS_LOCK = ".fetch-stats.lock"
FETCH_OUTCOMES = ("delivered", "absent", "invalid", "unreachable")
FETCH_STATS_WAIT = 1.0       # seconds a call waits for the counters' lock before going uncounted


def is_hex(text):
    return bool(text) and set(text) <= HEX


def path_exists(path):
    try:
        posix.stat(path)
    except (OSError, ValueError):
        return False
    return True


def absolute(path):
    """path made absolute against the working directory (not normalized)."""
    return path_join(posix.getcwd(), path)


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


def should_start_prefetch(spooled_in_window, prefetch):
    """Refill in batches: start a prefetcher once half the window or less is spooled."""
    return prefetch > 0 and spooled_in_window * 2 <= prefetch


def read_header(path):
    """(first bytes of the file, its size), or (None, None) if it is not there."""
    try:
        fd = posix.open(path, posix.O_RDONLY)
    except OSError as error:
        if error.errno == errno.ENOENT:
            return None, None
        raise
    try:
        return posix.read(fd, LONG_HEADER.size), posix.fstat(fd).st_size
    finally:
        posix.close(fd)


def try_lock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (IOError, OSError) as error:
        if error.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def spool_for(spool_root, data_directory):
    """The spool of one data directory, below [archive] spool_dir.

    A restored clone and the standby it came from read the same config; each
    gets its own prefetch window so neither prunes what the other is about to use.
    """
    try:
        from _sha1 import sha1           # hashlib's own, without loading OpenSSL (start-up time)
    except ImportError:
        from hashlib import sha1
    name = data_directory.rstrip("/").rpartition("/")[2] or "root"
    digest = sha1(data_directory.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    # ".boot": a spool of one boot (spool_of_this_boot). Versions before it read
    # NAME-DIGEST, and never this one, whose segments they could not tell torn.
    return path_join(spool_root, "%s-%s%s" % (name, digest, SPOOL_SUFFIX))


def config_identity(path):
    """One line that changes whenever the file at path is written or replaced."""
    info = posix.stat(path)
    return "%s %d %d %d %d %d" % (absolute(path), info.st_dev, info.st_ino, info.st_size,
                                  info.st_mtime_ns, info.st_ctime_ns)


def cluster_identity(pgdata_candidates, configured_identifier):
    """(system identifier, major version or None) of the first data directory among
    the candidates with a global/pg_control; configured_identifier (not None) wins.
    None when there is none."""
    for pgdata in pgdata_candidates:
        if not pgdata:
            continue
        try:
            with open(path_join(pgdata, "global", "pg_control"), "rb") as control:
                raw = control.read(8)
        except (IOError, OSError):
            continue
        if len(raw) != 8:
            continue
        try:
            with open(path_join(pgdata, "PG_VERSION")) as version_file:
                pg_major = version_file.read().strip() or None
        except (IOError, OSError):
            pg_major = None
        if configured_identifier is None:
            configured_identifier = struct.unpack("=Q", raw)[0]
        return configured_identifier, pg_major
    return None


def read_want(spool):
    """(segment, segment size) the newest delivery asked the prefetcher for, or None."""
    try:
        with open(path_join(spool, SPOOL_WANT)) as want_file:
            words = want_file.read().split()
    except (IOError, OSError):
        return None
    if len(words) != 2 or wal_kind(words[0]) != "segment" or not words[1].isdigit():
        return None
    return words[0], int(words[1])


def write_want(spool, wal_name, seg_size):
    """Ask the prefetcher for the segments after wal_name."""
    write_note(spool, SPOOL_WANT, "%s %d\n" % (wal_name, seg_size))


def write_note(spool, name, text):
    """Write spool/name (the want, the missed names): written beside as name.PID,
    then renamed, so its reader never sees half of it."""
    staged = path_join(spool, "%s.%d" % (name, posix.getpid()))
    note_fd = posix.open(staged, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC, 0o600)
    try:
        posix.write(note_fd, text.encode("ascii"))
    finally:
        posix.close(note_fd)
    posix.rename(staged, path_join(spool, name))


def read_missed(spool):
    """The segments the prefetcher's last pass asked every source for and did not spool."""
    try:
        with open(path_join(spool, SPOOL_MISSED)) as missed_file:
            return missed_file.read().split()
    except (IOError, OSError):
        return []


def spooled_in_window(spool, want, prefetch):
    """How many of the prefetch segments after want are in the spool (none in a spool
    of an earlier boot: see spool_of_this_boot)."""
    if not spool_of_this_boot(spool):
        return 0
    return sum(1 for name in following_segments(want[0], want[1], prefetch)
               if path_exists(path_join(spool, name)))


def this_boot():
    """The running kernel's boot id (Linux: a new one at every start), or "unknown"."""
    try:
        with open(BOOT_ID, "rb") as boot_file:
            return boot_file.read().decode("ascii").strip() or "unknown"
    except (IOError, OSError, ValueError):
        return "unknown"


def spool_of_this_boot(spool):
    """True if the spool's segments were spooled since this machine last started: its
    SPOOL_BOOT names this boot. A prefetcher that can tell the boot spools
    without fsync (claim_spool_boot); after a crash a spooled segment may be torn,
    so a spool of another boot, or of none, is never delivered from."""
    try:
        with open(path_join(spool, SPOOL_BOOT), "rb") as mark:
            return mark.read().decode("ascii").strip() == this_boot()
    except (IOError, OSError, ValueError):
        return False


def wait_for_prefetcher(spool, wal_name, prefetch, deadline):
    """If the running prefetcher is fetching wal_name, wait (a little) until it is
    spooled; not once its last pass asked every source for it in vain (the end
    of the archive, a bad copy, a host down: this call asks the sources itself).
    Why the wait ended, for the debug log; None when there was none."""
    want = read_want(spool)
    if want is None or wal_name not in following_segments(want[0], want[1], prefetch):
        return None
    try:
        fd = posix.open(path_join(spool, SPOOL_LOCK), posix.O_RDWR)
    except OSError:
        return None
    try:
        until = min(deadline - 1, time.time() + 3)
        while time.time() < until:
            if path_exists(path_join(spool, wal_name)):
                return "the prefetcher spooled it"
            if try_lock(fd):
                return "no prefetcher runs"
            if wal_name in read_missed(spool):
                return "the prefetcher's last pass found it on no source"
            time.sleep(0.005)
        return "the prefetcher did not spool it in time"
    finally:
        posix.close(fd)


def prefetcher_running(spool):
    """True if a prefetcher holds this spool's lock."""
    try:
        fd = posix.open(path_join(spool, SPOOL_LOCK), posix.O_RDWR)
    except OSError:
        return False
    try:
        return not try_lock(fd)
    finally:
        posix.close(fd)       # closing drops the lock we may have taken


# A call without prefetch starts its ssh before the rest of this file loads
# (start_early_fetch): importing the rest (os, subprocess, logging, configparser)
# takes about 25 ms, which ssh's start and the first megabytes overlap.
EARLY_NOTE = "early-fetch"      # in [archive] spool_dir/.code: note_early_fetch
EARLY_PLACEHOLDER = "F" * SEGMENT_NAME_LEN   # the WAL name in the note's ssh command
EARLY = []                      # the EarlyProcess start_early_fetch started, until fetch_remote adopts it


def early_fetch_argv(note, config_id, wal_name, down_at, now):
    """The ssh command that asks the first source for copy 1 of wal_name, from the
    text of the note a call without prefetch left (note_early_fetch: fields
    separated by NUL, the config file's identity, the source's down memo, then
    the command for EARLY_PLACEHOLDER); None when the note is for another config
    (or version of it), is not one, or the source failed less than DOWN_MEMO ago
    (down_at: its memo's time, or None): the rest asks it last then."""
    fields = note.split("\0")
    if len(fields) < 4 or fields[0] != config_id or wal_kind(wal_name) != "segment":
        return None
    if down_at is not None and 0 <= now - down_at < DOWN_MEMO:
        return None
    argv = fields[2:]
    if not argv[-1].endswith(" fetch 1 " + EARLY_PLACEHOLDER):
        return None
    return argv[:-1] + [argv[-1][:-len(EARLY_PLACEHOLDER)] + wal_name]


def early_note_memo(note):
    """The down memo's path the note names (early_fetch_argv), or None."""
    fields = note.split("\0")
    return fields[1] if len(fields) >= 4 and fields[1].startswith("/") else None


def restore_words(argv, verbose_too=False):
    """(config option or None, WALNAME, DEST) of a restore_command call given in the
    form the README wires (WALNAME DEST, -c CONFIG first or not), else None;
    verbose_too: with -v or --verbose before WALNAME as well."""
    if verbose_too:
        argv = [word for word in argv[:-2] if word not in ("-v", "--verbose")] + argv[-2:]
    if len(argv) == 2:
        config_option, wal_name, dest = None, argv[0], argv[1]
    elif len(argv) == 4 and argv[0] in ("-c", "--config"):
        config_option, wal_name, dest = argv[1:]
    else:
        return None
    if wal_name.startswith("-") or dest.startswith("-"):
        return None
    return config_option, wal_name, dest


def path_candidates(name):
    """The files execvp would try for name, in $PATH's order (none without $PATH)."""
    return [path_join(directory or ".", name) for directory in (environment("PATH") or "").split(":")]


def is_program(path):
    """True when path is a regular file this user may execute."""
    try:
        return posix.stat(path).st_mode & 0o170000 == 0o100000 and posix.access(path, posix.X_OK)
    except (OSError, ValueError):
        return False


class EarlyProcess(object):
    """The ssh start_early_fetch started: what fetch_remote and stop_children use of
    a subprocess.Popen (args, stdout, poll, wait, kill), and its stderr file."""

    def __init__(self, argv, pid, stdout_fd, stderr_fd):
        self.args, self.pid, self.returncode = argv, pid, None
        self.stdout = open(stdout_fd, "rb", buffering=0)
        self.errors = open(stderr_fd, "w+b")

    def _reap(self, options):
        try:
            pid, status = posix.waitpid(self.pid, options)
        except ChildProcessError:       # as subprocess: SIGCHLD ignored, reaped already
            pid, status = self.pid, 0
        if pid:
            self.returncode = -posix.WTERMSIG(status) if posix.WIFSIGNALED(status) else posix.WEXITSTATUS(status)
        return self.returncode

    def poll(self):
        return self.returncode if self.returncode is not None else self._reap(posix.WNOHANG)

    def wait(self):
        return self.returncode if self.returncode is not None else self._reap(0)

    def kill(self):
        if self.returncode is None:
            posix.kill(self.pid, 9)


def run_in_child(programs, argv, stdout_fd, stderr_fd):
    """In the child of a fork: what subprocess.Popen(argv, stdin=DEVNULL, stdout=,
    stderr=, cwd="/") does before it runs argv[0] (SIGPIPE and SIGXFSZ back to
    their defaults, every other descriptor closed), then each of programs in
    turn, as execvp tries each directory of $PATH. Never returns: exit 127 if
    none can run."""
    try:
        import _signal
        for name in ("SIGPIPE", "SIGXFSZ"):
            if hasattr(_signal, name):
                _signal.signal(getattr(_signal, name), _signal.SIG_DFL)
        posix.dup2(posix.open("/dev/null", posix.O_RDONLY), 0)
        posix.dup2(stdout_fd, 1)
        posix.dup2(stderr_fd, 2)
        posix.chdir("/")
        try:
            descriptors = [int(name) for name in posix.listdir("/proc/self/fd")]
        except OSError:
            descriptors = []            # the rest are close-on-exec (Python opens them so)
        for fd in descriptors:
            if fd > 2:
                try:
                    posix.close(fd)
                except OSError:
                    pass
        failed = None
        for program in programs:
            try:
                posix.execv(program, argv)
            except OSError as error:
                if failed is None or failed.errno in (errno.ENOENT, errno.ENOTDIR):
                    failed = error      # as subprocess: the first error that is not "no such file"
        raise failed or OSError(errno.ENOENT, "not on $PATH")
    except BaseException as error:
        try:
            posix.write(2, ("cannot run %s: %s\n" % (argv[0], error)).encode("utf-8", "replace"))
        except BaseException:
            pass
    finally:
        posix._exit(127)


def start_early_fetch(argv, spool_root):
    """Start the ssh this call would run first, before the rest of this file loads,
    when the note of an earlier call without prefetch says which (early_fetch_argv).
    fetch_remote adopts it if it is exactly the command it runs, and stop_children
    stops it otherwise: the rest decides everything as before, only sooner.
    Quietly nothing when anything is not as expected."""
    words = restore_words(argv, verbose_too=True)
    if words is None or not spool_root or wal_kind(words[1]) != "segment":
        return
    config_option, wal_name, dest = words
    code_dir = path_join(spool_root, CODE_DIR)
    if is_directory(dest) or not is_directory(path_dirname(dest) or ".") or not private_directory(code_dir):
        return
    fds = []
    try:
        with open(path_join(code_dir, EARLY_NOTE), "rb") as note_file:
            if posix.fstat(note_file.fileno()).st_uid != posix.getuid():
                return
            note = note_file.read(MAX_TEXT_FILE).decode("utf-8", "surrogateescape")
        memo = early_note_memo(note)
        if memo is None or not private_directory(path_dirname(memo)):   # the control dir
            return
        try:
            down_at = posix.stat(memo).st_mtime
        except OSError:
            down_at = None
        config_id = config_identity(config_option or environment("PG_ZFS_CONFIG") or DEFAULT_CONFIG)
        ssh = early_fetch_argv(note, config_id, wal_name, down_at, time.time())
        programs = path_candidates(ssh[0]) if ssh else []
        if not any(is_program(path) for path in programs):
            return
        fds.append(posix.open(environment("TMPDIR") or "/tmp", posix.O_TMPFILE | posix.O_RDWR, 0o600))
        fds.extend(posix.pipe())
        pid = posix.fork()
        if pid == 0:
            run_in_child(programs, ssh, fds[2], fds[0])
        posix.close(fds.pop())
        try:
            fcntl.fcntl(fds[1], 1031, CHUNK)      # F_SETPIPE_SZ, as fetch_remote
        except (IOError, OSError):
            pass
        EARLY.append(EarlyProcess(ssh, pid, fds[1], fds[0]))
        del fds[:]
    except (IOError, OSError, ValueError, AttributeError):      # AttributeError: no O_TMPFILE
        pass
    finally:
        for fd in fds:
            posix.close(fd)


def quick_delivery(argv):
    """DELIVERED if this call only had to move a spooled segment into place, and did;
    None when it needs anything else (the rest of this file then does all of it).

    A delivery from the spool: the restore_command's arguments (WALNAME DEST,
    optionally -c CONFIG first) for a segment, a config file the last full run
    validated as it is now (the config note in the spool: path, inode, size,
    times), a copy in a spool of this boot whose first page fits this cluster
    (the prefetcher checked it whole), renamed to DEST. Then the
    prefetcher is asked for the next segments; only when none runs and the
    spool needs more is the rest loaded to start one.
    """
    words = restore_words(argv)
    if words is None or wal_kind(words[1]) != "segment":
        return None
    config_option, wal_name, dest = words
    config_path = config_option or environment("PG_ZFS_CONFIG") or DEFAULT_CONFIG
    try:
        spool_root = quick_config_value(config_path, "archive", "spool_dir") or DEFAULT_SPOOL
        spool = spool_for(spool_root, posix.getcwd())
        with open(path_join(spool, CONFIG_NOTE)) as note_file:
            note = note_file.read().split("\n")
        # identity, spool root, prefetch, timeout, [postgres] pgdata, system_identifier
        if len(note) < 6 or note[0] != config_identity(config_path) or note[1] != spool_root:
            return None
        prefetch, timeout = int(note[2]), int(note[3])
        cluster = cluster_identity((".", note[4]), int(note[5]) if note[5] else None)
    except (IOError, OSError, ValueError):
        return None
    if prefetch <= 0 or cluster is None or is_directory(dest) or not is_directory(path_dirname(dest) or "."):
        return None
    wait_for_prefetcher(spool, wal_name, prefetch, time.time() + timeout)
    if not spool_of_this_boot(spool):
        return None                      # the rest fetches it; a prefetcher claims the spool
    spooled = path_join(spool, wal_name)
    header, size = read_header(spooled)
    if header is None or check_segment(header, size, wal_name, cluster[0], expected_magics(cluster[1])):
        return None                      # the rest fetches it (and removes a bad copy, saying so)
    try:
        posix.rename(spooled, dest)
    except OSError:
        return None                      # gone meanwhile, or another file system: the rest copies
    try:
        seg_size = LONG_HEADER.unpack_from(header)[6]
        write_want(spool, wal_name, seg_size)
        if prefetcher_running(spool) or not should_start_prefetch(
                spooled_in_window(spool, (wal_name, seg_size), prefetch), prefetch):
            return DELIVERED
    except (IOError, OSError):
        pass
    # No prefetcher and the spool runs low: the rest starts one (never failing the delivery).
    load_part("REST", spool_root)
    return globals()["refill_after_quick_delivery"](config_path, spool, wal_name, dest)   # in REST


def add_fetch_outcome(stats, outcome, seconds, now):
    """The counters of stats (fetch-stats.json as read, or None) with one call of
    outcome that took seconds added, and "updated" now. The four outcomes come
    first, always (one missing or malformed starts at zero); other keys are kept."""
    stats = stats if isinstance(stats, dict) else {}
    counted = {}
    for name in FETCH_OUTCOMES:
        counter = stats.get(name)
        if isinstance(counter, dict) and type(counter.get("count")) is int \
                and type(counter.get("seconds")) in (int, float):
            counter = dict(counter, seconds=float(counter["seconds"]))
        else:
            counter = {"count": 0, "seconds": 0.0}
        counted[name] = counter
    counted[outcome]["count"] += 1
    counted[outcome]["seconds"] += seconds
    counted["updated"] = float(now)
    for key, value in stats.items():
        counted.setdefault(key, value)
    return counted


def fetch_stats_text(stats):
    """The text of fetch-stats.json for stats, exactly as json.dumps writes it (plus a
    newline), when stats holds only the four outcomes (count and seconds each) and
    "updated"; else None (the json module writes it then). Importing json, which
    imports re, would add about 10 ms to a delivery from the spool (16 ms)."""
    if list(stats) != list(FETCH_OUTCOMES) + ["updated"] or type(stats["updated"]) is not float:
        return None
    parts = []
    for name in FETCH_OUTCOMES:
        counter = stats[name]
        if list(counter) != ["count", "seconds"] or type(counter["count"]) is not int \
                or type(counter["seconds"]) is not float:
            return None
        parts.append('"%s": {"count": %d, "seconds": %r}' % (name, counter["count"], counter["seconds"]))
    return '{%s, "updated": %r}\n' % (", ".join(parts), stats["updated"])


def parse_fetch_stats(text):
    """The counters in text if it is exactly what fetch_stats_text writes, else None
    (the json module reads it then)."""
    words = text.replace("{", " ").replace("}", " ").replace(":", " ").replace(",", " ").split()
    if len(words) != 22:
        return None
    stats = {}
    try:
        for index, name in enumerate(FETCH_OUTCOMES):
            stats[name] = {"count": int(words[index * 5 + 2]), "seconds": float(words[index * 5 + 4])}
        stats["updated"] = float(words[21])
    except ValueError:
        return None
    return stats if fetch_stats_text(stats) == text else None


def read_fetch_stats(path):
    """(counters of the file at path or None, why None) for count_fetch."""
    try:
        with open(path, "rb") as stats_file:
            text = stats_file.read(MAX_TEXT_FILE).decode("utf-8", "replace")
    except (IOError, OSError) as error:
        if error.errno == errno.ENOENT:
            return None, "%s not there yet: counting from zero" % path
        raise
    stats = parse_fetch_stats(text)
    if stats is None:
        import json
        try:
            stats = json.loads(text)
        except ValueError as error:
            return None, "%s is not JSON (%s): counting from zero" % (path, error)
        if not isinstance(stats, dict):
            return None, "%s is not a JSON object: counting from zero" % path
    return stats, None


def count_fetch(spool_root, outcome, seconds):
    """Add one restore_command call of outcome (FETCH_OUTCOMES) that took seconds to
    spool_root/fetch-stats.json, which pg_zfs_snap.py metrics reads. Returns a line
    for the debug log when the call was not counted or started from zero, else None.

    Counters, not a record: under an exclusive flock of spool_root/.fetch-stats.lock,
    read, add, write a temporary file beside and rename it over (0644, no fsync). It
    never raises, never waits more than FETCH_STATS_WAIT for the lock (the call then
    goes uncounted), never creates spool_root and leaves no temporary file behind
    (one a killed call left is written over by the next).
    """
    if not spool_root:
        return "call not counted: no [archive] spool_dir"
    path = path_join(spool_root, FETCH_STATS)
    staged = path_join(spool_root, "." + FETCH_STATS + ".tmp")   # only the lock's holder writes it
    lock_fd = None
    wrote = False
    try:
        lock_fd = posix.open(path_join(spool_root, FETCH_STATS_LOCK), posix.O_RDONLY | posix.O_CREAT, 0o644)
        info = posix.fstat(lock_fd)
        if info.st_uid == posix.geteuid() and info.st_mode & 0o777 != 0o644:
            posix.fchmod(lock_fd, 0o644)    # PostgreSQL's umask is 077: the metrics reader needs the file
        give_up = time.monotonic() + FETCH_STATS_WAIT
        while not try_lock(lock_fd):
            if time.monotonic() > give_up:
                return "call not counted: %s stayed locked %.0f s" % (
                    path_join(spool_root, FETCH_STATS_LOCK), FETCH_STATS_WAIT)
            time.sleep(0.002)
        stats, note = read_fetch_stats(path)
        stats = add_fetch_outcome(stats, outcome, seconds, time.time())
        text = fetch_stats_text(stats)
        if text is None:
            import json
            text = json.dumps(stats) + "\n"
        wrote = True
        with open(posix.open(staged, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_NOFOLLOW, 0o644), "wb") as out:
            posix.fchmod(out.fileno(), 0o644)
            out.write(text.encode("utf-8"))
        posix.replace(staged, path)
        wrote = False
        return note
    except Exception as error:         # counting never changes what the call did
        return "call not counted in %s: %s" % (path, error)
    finally:
        if wrote:
            try:
                posix.unlink(staged)
            except OSError:
                pass
        if lock_fd is not None:
            posix.close(lock_fd)


def main(argv=None):
    """Deliver from the spool when that is all this call has to do (quick_delivery);
    otherwise load the rest of this file and run the whole story (full_main). Then
    count a restore_command call by its outcome and time (count_fetch)."""
    started = time.monotonic()
    argv = sys.argv[1:] if argv is None else argv
    code = quick_delivery(argv)
    spool_root = quick_spool_root(argv)
    if code is not None:
        # Its notes are for the debug log, and a delivery from the spool is never -v.
        count_fetch(spool_root, "delivered", time.monotonic() - started)
        return code
    start_early_fetch(argv, spool_root)
    load_part("REST", spool_root)
    call = {}
    code = globals()["full_main"](argv, call)     # in REST
    if call:
        note = count_fetch(call["spool_root"] or spool_root, call["outcome"], time.monotonic() - started)
        if note:
            globals()["log"].debug("%s", note)
    return code
'''


# The rest of pg_wal_fetch.py: see "How this file is laid out" at the top.
REST = r'''
import configparser
import itertools
import logging
import os
import signal

log = logging.getLogger(PROG)


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
# Pure functions: WAL names, page headers, decisions. No I/O.
# ---------------------------------------------------------------------------

def source_order(sources, down_since, now, memo=DOWN_MEMO):
    """The sources to try: config order, but those whose probe failed less than
    memo seconds ago go last. Never skipped (a dead-looking host may hold the only
    copy), but a dead host no longer costs its probe timeout before every file."""
    def recently_down(source):
        since = down_since.get(source.name)
        return since is not None and 0 <= now - since < memo
    return ([source for source in sources if not recently_down(source)]
            + [source for source in sources if recently_down(source)])


def probe_needed(answered_at, now, memo=UP_MEMO):
    """False while a source that answered at answered_at (None: not lately) did so
    less than memo seconds ago. A recovery's calls come many a second, and
    each probe costs: with probe = tcp a connection that ends before it
    authenticates, which OpenSSH 9.8 and later (PerSourcePenalties, on by
    default) count as a second of penalty each, refusing the guest's
    address once 15 s have accrued, and an sshd process on the archive
    host, often the primary's; with ping a process here. So only the first
    call of a burst probes. A host that dies within memo of answering is
    given up by ssh's own limits instead (ServerAliveInterval, stall_timeout)."""
    return answered_at is None or not 0 <= now - answered_at < memo


def check_text_file(kind, content, size, timeline=None):
    """None if content (the whole file) is a plausible .history or .backup file; else why not.

    A .history file is read as PostgreSQL reads it (readTimeLineHistory): each
    line not blank or a comment is "TLI<tab>X/Y<tab>reason", the timeline IDs
    increasing and below the file's own (timeline), the switch points not going
    back. Whether those switch points are the right ones cannot be checked.
    """
    if size == 0:
        return "empty file"
    if size > MAX_TEXT_FILE:
        return "%d bytes, too big for a %s file" % (size, kind)
    if b"\0" in content:
        return "binary content in a %s file" % kind
    if kind == "backup" and not content.startswith(b"START WAL LOCATION:"):
        return "not a backup history file (no START WAL LOCATION)"
    if kind == "history":
        return check_history(content, timeline)
    return None


def check_history(content, timeline):
    """None if content is a timeline history file of timeline (an int, or None); else why not."""
    last_tli, last_lsn = 0, -1
    for number, raw in enumerate(content.splitlines(), 1):
        line = raw.split(b"#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        try:
            tli = int(fields[0])
            high, low = fields[1].split(b"/")
            lsn = (int(high, 16) << 32) | int(low, 16)
        except (ValueError, IndexError):
            return "not a timeline history file (line %d: %r)" % (number, raw[:40])
        if tli <= last_tli:
            return "timeline IDs not increasing at line %d" % number
        if timeline is not None and tli >= timeline:
            return "line %d names timeline %d, not below the file's %d" % (number, tli, timeline)
        if lsn < last_lsn:
            return "switch points going back at line %d" % number
        last_tli, last_lsn = tli, lsn
    if not last_tli:
        return "no timeline in the history file"
    return None


def check_file(kind, wal_name, head, size, cluster):
    """None if a fetched file may be delivered as wal_name; else the reason."""
    if kind in ("segment", "partial"):
        return check_segment(head, size, wal_name[:SEGMENT_NAME_LEN],
                             cluster.system_identifier, cluster.magics)
    return check_text_file(kind, head, size, int(wal_name[:8], 16) if kind == "history" else None)


# Whole-segment checks: every page header, every record. Pure (no I/O), but
# for crc32c_engine's kernel socket. Modules other than struct are imported
# where they are used, as in the rest of pg_wal_fetch.py.
#
# Layout (src/include/access/xlog_internal.h, xlogrecord.h; the same from 9.5
# to 18): a segment is pages of XLOG_BLCKSZ bytes; each page starts with a
# header (40 bytes on the segment's first page, 24 on the others). Records
# start MAXALIGNed (8) and run across pages: a page that continues a record
# has XLP_FIRST_IS_CONTRECORD and xlp_rem_len = the bytes of it still to
# come. A record is a 24-byte header (xl_tot_len, xl_xid, xl_prev, xl_info,
# xl_rmid, 2 pad bytes, xl_crc) and its data; xl_crc is CRC-32C over the data,
# then over the header's first 20 bytes.
# ---------------------------------------------------------------------------

# XLogPageHeaderData without its MAXALIGN padding: xlp_magic, xlp_info,
# xlp_tli, xlp_pageaddr, xlp_rem_len.
PAGE_HEADER = struct.Struct("=HHIQI")
SHORT_HEADER_SIZE = 24           # SizeOfXLogShortPHD = MAXALIGN(20)
LONG_HEADER_SIZE = LONG_HEADER.size   # SizeOfXLogLongPHD, 40
XLP_FIRST_IS_CONTRECORD = 0x0001
XLP_BKP_REMOVABLE = 0x0004
XLP_FIRST_IS_OVERWRITE_CONTRECORD = 0x0008
XLP_ALL_FLAGS = 0x000F
# XLogRecord: xl_tot_len, xl_xid, xl_prev, xl_info, xl_rmid, 2 pad, xl_crc.
RECORD_HEADER = struct.Struct("=IIQBB2xI")
RECORD_HEADER_SIZE = 24
RECORD_CRC_SPAN = 20             # offsetof(XLogRecord, xl_crc)
RM_XLOG_ID = 0
XLOG_SWITCH = 0x40
MAX_RECORD_LEN = 0x3FFFFFFF      # MaxAllocSize: no reader accepts more
ZERO_PAGE = bytes(8192)
CRC_BATCH = 65536                # records whose CRCs are computed together


def page_header_size(xlp_info):
    """The size of a page header: long on a segment's first page, short elsewhere."""
    return LONG_HEADER_SIZE if xlp_info & XLP_LONG_HEADER else SHORT_HEADER_SIZE


def format_lsn(position):
    """'X/X' of an integer WAL position, as PostgreSQL prints it."""
    return "%X/%X" % (position >> 32, position & 0xFFFFFFFF)


def page_geometry(segment):
    """(XLOG_BLCKSZ, None) from the long header of a segment's first page, or
    (None, reason) when the bytes cannot be cut into such pages."""
    if len(segment) < LONG_HEADER.size:
        return None, "only %d bytes, not a WAL segment" % len(segment)
    blcksz = LONG_HEADER.unpack_from(segment)[7]
    if not (is_power_of_two(blcksz) and 1024 <= blcksz <= 65536):
        return None, "implausible WAL block size %d in the header" % blcksz
    if len(segment) % blcksz:
        return None, "%d bytes is not a whole number of %d-byte pages" % (len(segment), blcksz)
    return blcksz, None


def page_place(offset, blcksz):
    return "page %d (offset %d)" % (offset // blcksz, offset)


def is_stale_page(pageaddr, offset, segment_lsn, seg_size):
    """True if a page header at offset with this address belongs to an older
    segment: what a recycled segment file holds where nothing was written."""
    return pageaddr < segment_lsn + offset and (segment_lsn + offset - pageaddr) % seg_size == 0


def check_pages(segment, wal_name, magics, kind="segment"):
    """None if every page of segment (the whole file, decompressed: bytes,
    memoryview or mmap) is a valid page header of this segment or all zeros,
    with no page header after a zero page; else the first problem, naming the
    page: "page 100 (offset 819200): page address 0/20C8001, expected 0/20C8000".

    A valid header has a magic of magics, the address of its place in the
    segment, a timeline from 1 to the name's that never goes down (the first
    segment of a timeline starts with its parent's pages), only known
    xlp_info bits (XLP_LONG_HEADER on the first page only) and no xlp_rem_len
    without XLP_FIRST_IS_CONTRECORD. Kind "partial" (a .partial file) also
    takes, where it takes zeros, pages of an older segment: a .partial is the
    file the server was writing, often a recycled one, whose pages after the
    last one written are still the older segment's. Call it after
    check_segment accepted the first page and the size.
    """
    blcksz, problem = page_geometry(segment)
    if problem:
        return problem
    size = len(segment)
    name_timeline, log_id, seg = parse_segment_name(wal_name)
    segment_lsn = log_id * 0x100000000 + seg * size
    zero_page = ZERO_PAGE if blcksz == len(ZERO_PAGE) else bytes(blcksz)
    unpack = PAGE_HEADER.unpack_from
    other_flags = XLP_ALL_FLAGS & ~XLP_LONG_HEADER
    partial = kind == "partial"
    last_timeline = 1
    unwritten_since = None        # the first page of zeros (or, in a .partial, stale)
    for offset in range(0, size, blcksz):
        magic, xlp_info, timeline, pageaddr, rem_len = unpack(segment, offset)
        # One test for the usual page; the details only when it fails.
        if (unwritten_since is None and magic in magics and offset
                and pageaddr == segment_lsn + offset
                and last_timeline <= timeline <= name_timeline
                and not xlp_info & ~other_flags
                and (xlp_info & XLP_FIRST_IS_CONTRECORD or not rem_len)):
            last_timeline = timeline
            continue
        place = page_place(offset, blcksz)
        if offset and ((magic == 0 and segment[offset:offset + blcksz] == zero_page)
                       or (partial and magic in magics
                           and is_stale_page(pageaddr, offset, segment_lsn, size))):
            if unwritten_since is None:
                unwritten_since = offset
            continue
        if unwritten_since is not None:
            return "%s: data after the %s %s (a hole)" % (
                place, "unwritten" if partial else "zero-filled", page_place(unwritten_since, blcksz))
        if magic not in magics:
            return "%s: page magic 0x%04X, expected %s" % (
                place, magic, " or ".join("0x%04X" % m for m in sorted(magics)[:3])
                + (" ..." if len(magics) > 3 else ""))
        if pageaddr != segment_lsn + offset:
            return "%s: page address %s, expected %s" % (
                place, format_lsn(pageaddr), format_lsn(segment_lsn + offset))
        if not 1 <= timeline <= name_timeline:
            return "%s: timeline %d does not fit timeline %d of the name" % (place, timeline, name_timeline)
        if timeline < last_timeline:
            return "%s: timeline %d after timeline %d" % (place, timeline, last_timeline)
        allowed = XLP_ALL_FLAGS if offset == 0 else other_flags
        if xlp_info & ~allowed:
            return "%s: unknown page flags 0x%04X" % (place, xlp_info & ~allowed)
        if offset == 0 and not xlp_info & XLP_LONG_HEADER:
            return "%s: first page has no long header" % place
        if rem_len and not xlp_info & XLP_FIRST_IS_CONTRECORD:
            return "%s: %d bytes of a record to come, but no continuation flag" % (place, rem_len)
        last_timeline = timeline
    return None


def written_end(segment, blcksz, segment_lsn):
    """(end of the data, end of the pages) a server wrote into a .partial
    segment (bytes), as offsets: its trailing pages of zeros or of an older
    segment (a recycled file) were never written, nor were the zeros at the
    end of its last written page."""
    zero_page = ZERO_PAGE if blcksz == len(ZERO_PAGE) else bytes(blcksz)
    end = len(segment)
    while end > blcksz:
        page = end - blcksz
        if segment[page:end] != zero_page and not is_stale_page(
                PAGE_HEADER.unpack_from(segment, page)[3], page, segment_lsn, len(segment)):
            break
        end = page
    page = end - blcksz
    return page + len(segment[page:end].rstrip(b"\0")), end


def check_tail(segment, offset, blcksz, segment_lsn, what, partial=False):
    """None if every byte of segment (bytes) from offset to its end is zero,
    but for headers of empty pages (9.6 and 10 leave those after a switch
    record) and, in a .partial, pages of an older segment; else the reason,
    naming the place and what the data follows."""
    page_end = offset - offset % blcksz + blcksz if offset % blcksz else offset
    zero_page = ZERO_PAGE if blcksz == len(ZERO_PAGE) else bytes(blcksz)
    rest = segment[offset:page_end]
    if rest != zero_page[:page_end - offset]:
        return "data after %s, at %s" % (
            what, format_lsn(segment_lsn + offset + len(rest) - len(rest.lstrip(b"\0"))))
    for page in range(page_end, len(segment), blcksz):
        if segment[page:page + blcksz] == zero_page:
            continue
        _magic, xlp_info, _tli, pageaddr, rem_len = PAGE_HEADER.unpack_from(segment, page)
        if partial and is_stale_page(pageaddr, page, segment_lsn, len(segment)):
            continue
        header_size = page_header_size(xlp_info)
        if (xlp_info & (XLP_FIRST_IS_CONTRECORD | XLP_FIRST_IS_OVERWRITE_CONTRECORD) or rem_len
                or segment[page + header_size:page + blcksz] != zero_page[header_size:]):
            return "%s: data after %s" % (page_place(page, blcksz), what)
    return None


def first_crc_mismatch(records, crc32c):
    """The reason for the first of records [(lsn, parts, xl_crc)] whose
    CRC-32C (crc32c: see crc32c_engine) is not its xl_crc, else None."""
    if not records:
        return None
    messages = [record[1] for record in records]
    many = getattr(crc32c, "many", None)
    computed = many(messages) if many else [crc32c(parts) for parts in messages]
    if computed == [record[2] for record in records]:
        return None
    for (lsn, _parts, stored), crc in zip(records, computed):
        if crc != stored:
            return "record at %s: CRC mismatch (xl_crc %08X, computed %08X)" % (format_lsn(lsn), stored, crc)
    return None


def walk_records(segment, wal_name, kind, crc32c):
    """None if the chain of XLOG records in segment (the whole file,
    decompressed: bytes, memoryview or mmap) is intact; else the first problem, naming the
    LSN: "record at 0/24C4A68: CRC mismatch (...)". Never raises on bad bytes.

    Checks what PostgreSQL's reader checks (xlogreader.c, 9.6 to 18): from the
    first record that starts in the segment (the tail of a record from the
    previous segment is skipped, its page chain checked), each record's
    length, its xl_prev link to the record before (the first one's only below
    its own LSN), its CRC-32C (crc32c: see crc32c_engine), and every
    continuation page's flag and remaining length. A record that goes on into
    the next segment is checked as far as it goes, without its CRC; a
    segment entirely inside one record is valid when its page chain is.

    Where it ends: kind "segment" must end with its last page full or with an
    XLOG_SWITCH record followed only by zeros (or empty page headers, 9.6 and
    10); WAL that stops earlier is a zero-filled or truncated copy. Kind
    "partial" (a .partial file) may stop after any record, zeros following,
    and its last record may be cut off where the file's written pages end
    (zeros, or an older segment's pages: see written_end).
    Expects the page headers to have passed check_pages.
    """
    blcksz, problem = page_geometry(segment)
    if problem:
        return problem
    if not isinstance(segment, bytes):
        segment = bytes(segment)      # slices of bytes are the cheapest to take and join
    size = len(segment)
    _timeline, log_id, seg = parse_segment_name(wal_name)
    segment_lsn = log_id * 0x100000000 + seg * size
    partial = kind == "partial"
    # A .partial ends where its server stopped writing: zeros after data_end,
    # then (from pages_end) pages of zeros or of an older segment, into which
    # its last record may run. A complete segment is never cut off.
    data_end, pages_end = written_end(segment, blcksz, segment_lsn) if partial else (size, size)
    unpack_record = RECORD_HEADER.unpack_from
    unpack_page = PAGE_HEADER.unpack_from
    checked = []              # [(lsn, CRC parts, xl_crc)] of records waiting for their CRC

    def finish(problem):
        """The earliest problem: a CRC mismatch before the structural one wins."""
        return first_crc_mismatch(checked, crc32c) or problem

    def end_of_wal(offset, record_lsn=None):
        if partial and offset >= data_end:
            return finish(None)
        inside = " inside the record at %s" % format_lsn(record_lsn) if record_lsn is not None else ""
        if partial:
            return finish("WAL ends at %s%s, but the file has data up to %s" % (
                format_lsn(segment_lsn + offset), inside, format_lsn(segment_lsn + data_end)))
        return finish("WAL ends at %s%s without a switch record: zero-filled or truncated copy" % (
            format_lsn(segment_lsn + offset), inside))

    # Skip the tail of the record that began in an earlier segment.
    magic, xlp_info, _tli, _addr, remaining = unpack_page(segment, 0)
    pos = LONG_HEADER_SIZE
    page = 0
    while xlp_info & XLP_FIRST_IS_CONTRECORD:
        header_size = page_header_size(xlp_info)
        if remaining <= blcksz - header_size:
            pos = (page + header_size + remaining + 7) & ~7
            break
        remaining -= blcksz - header_size
        page += blcksz
        if page >= pages_end:
            return None            # the whole segment (all of it written) is inside one record
        magic, xlp_info, _tli, _addr, rem_len = unpack_page(segment, page)
        pos = page + SHORT_HEADER_SIZE
        if magic == 0:
            return end_of_wal(page)
        if xlp_info & XLP_FIRST_IS_CONTRECORD and rem_len != remaining:
            return "%s: %d bytes of the first record to come, expected %d" % (
                page_place(page, blcksz), rem_len, remaining)
        if not xlp_info & (XLP_FIRST_IS_CONTRECORD | XLP_FIRST_IS_OVERWRITE_CONTRECORD):
            return "%s: no continuation flag, %d bytes of the first record to come" % (
                page_place(page, blcksz), remaining)

    prev_lsn = None
    while True:
        if len(checked) >= CRC_BATCH:
            problem = first_crc_mismatch(checked, crc32c)
            if problem:
                return problem
            checked = []
        if pos % blcksz == 0:
            # A record ended at a page end: the next one starts after the header.
            if pos >= pages_end:
                return finish(None)
            magic, xlp_info, _tli, _addr, _rem = unpack_page(segment, pos)
            if magic == 0:
                return end_of_wal(pos)
            if xlp_info & XLP_FIRST_IS_CONTRECORD:
                return finish("%s: continuation flag, but the record before %s ended on the page before" % (
                    page_place(pos, blcksz), format_lsn(segment_lsn + pos)))
            pos += page_header_size(xlp_info)
        page_end = pos - pos % blcksz + blcksz
        # The usual records: whole on this page, each linked to the one before.
        # (The hot loop of the walk: constants as locals, 24 = the header size.)
        append, crc_span = checked.append, RECORD_CRC_SPAN
        while page_end - pos >= 24:
            tot_len, _xid, xl_prev, xl_info, xl_rmid, xl_crc = unpack_record(segment, pos)
            end = pos + tot_len
            if xl_prev != prev_lsn or end > page_end or tot_len < 24:
                break
            prev_lsn = segment_lsn + pos
            append((prev_lsn, (segment[pos + 24:end], segment[pos:pos + crc_span]), xl_crc))
            if xl_rmid == 0 and xl_info & 0xF0 == XLOG_SWITCH:
                return finish(check_tail(segment, end, blcksz, segment_lsn,
                                         "the switch record at %s" % format_lsn(prev_lsn), partial))
            pos = (end + 7) & ~7
        if pos == page_end:
            continue

        # Anything else: the first record, one across pages, the end of WAL, damage.
        lsn = segment_lsn + pos
        if page_end - pos < 8:
            return finish("record at %s: starts %d bytes before a page end" % (format_lsn(lsn), page_end - pos))
        tot_len = struct.unpack_from("=I", segment, pos)[0]
        if tot_len == 0:
            return end_of_wal(pos)
        if not RECORD_HEADER_SIZE <= tot_len <= MAX_RECORD_LEN:
            return finish("record at %s: invalid record length %d" % (format_lsn(lsn), tot_len))
        pieces = [segment[pos:min(page_end, pos + tot_len)]]
        got = len(pieces[0])
        end = pos + got
        page = page_end
        aborted = False
        while got < tot_len and page < size:
            if page >= pages_end:
                return finish(None)            # the .partial stops inside its last record
            magic, xlp_info, _tli, _addr, rem_len = unpack_page(segment, page)
            if magic == 0:
                return end_of_wal(page, lsn)
            if not xlp_info & XLP_FIRST_IS_CONTRECORD:
                if xlp_info & XLP_FIRST_IS_OVERWRITE_CONTRECORD:
                    # The rest of this record was never written (WAL ended
                    # inside it and a later server wrote over its place): the
                    # page says so, and reading goes on after its header.
                    aborted = True
                    break
                return finish("record at %s: %s has no continuation flag" % (
                    format_lsn(lsn), page_place(page, blcksz)))
            if rem_len != tot_len - got:
                return finish("record at %s: %s says %d bytes to come, expected %d" % (
                    format_lsn(lsn), page_place(page, blcksz), rem_len, tot_len - got))
            header_size = page_header_size(xlp_info)
            take = min(blcksz - header_size, tot_len - got)
            pieces.append(segment[page + header_size:page + header_size + take])
            got += take
            end = page + header_size + take
            page += blcksz
        if aborted:
            pos = page + page_header_size(xlp_info)
            prev_lsn = None
            continue
        record = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if len(record) < RECORD_HEADER_SIZE:
            return finish(None)       # only the start of a header before the segment's end
        _len, _xid, xl_prev, xl_info, xl_rmid, xl_crc = unpack_record(record)
        if prev_lsn is None and not xl_prev < lsn:
            return finish("record at %s: previous record link %s is not before it" % (
                format_lsn(lsn), format_lsn(xl_prev)))
        if prev_lsn is not None and xl_prev != prev_lsn:
            return finish("record at %s: previous record link %s, expected %s" % (
                format_lsn(lsn), format_lsn(xl_prev), format_lsn(prev_lsn)))
        if got < tot_len:
            return finish(None)       # goes on in the next segment: no CRC to check
        checked.append((lsn, (record[RECORD_HEADER_SIZE:], record[:RECORD_CRC_SPAN]), xl_crc))
        if xl_rmid == RM_XLOG_ID and xl_info & 0xF0 == XLOG_SWITCH:
            return finish(check_tail(segment, end, blcksz, segment_lsn,
                                     "the switch record at %s" % format_lsn(lsn), partial))
        prev_lsn = lsn
        pos = (end + 7) & ~7


# ---------------------------------------------------------------------------
# CRC-32C (Castagnoli), as in xl_crc.
# ---------------------------------------------------------------------------

CRC32C_POLY = 0x82F63B78         # reflected
CRC32C_CHECK = 0xE3069283        # crc32c(b"123456789")
# The 4 bytes after which a CRC-32C register started at 0 holds 0xFFFFFFFF:
# put before a message (behind any number of zeros, which leave a register
# at 0 unchanged) they stand for the initial value, so that messages of any
# length can be computed side by side, right-aligned in lanes.
CRC32C_INIT_PREFIX = b"\x54\x64\x1f\x64"
CRC_LANE = 256                   # a longer message is cut into lanes of this size
_crc32c_tables = []


def crc32c_tables():
    """(byte table, 4 translate tables, 4 tables of the CRC_LANE-zero-byte
    shift, pads), built on first use. pads[n] right-aligns a message of n
    bytes in a lane of n + 4 rounded up to 8: zeros, then the prefix."""
    if _crc32c_tables:
        return _crc32c_tables[0]
    table = []
    for byte in range(256):
        crc = byte
        for _bit in range(8):
            crc = (crc >> 1) ^ (CRC32C_POLY if crc & 1 else 0)
        table.append(crc)
    planes = tuple(bytes((entry >> shift) & 0xFF for entry in table) for shift in (0, 8, 16, 24))
    # Moving a register over CRC_LANE zero bytes is linear: tabulate it per
    # register byte from the images of the 32 single bits.
    bits = []
    for bit in range(32):
        crc = 1 << bit
        for _byte in range(CRC_LANE):
            crc = table[crc & 0xFF] ^ (crc >> 8)
        bits.append(crc)
    shift = []
    for byte_index in range(4):
        column = [0] * 256
        for byte in range(1, 256):
            low = byte & -byte
            column[byte] = column[byte ^ low] ^ bits[8 * byte_index + low.bit_length() - 1]
        shift.append(column)
    prefix = CRC32C_INIT_PREFIX
    pads = tuple(bytes(-(length + len(prefix)) % 8) + prefix
                 for length in range(CRC_LANE - len(prefix) + 1))
    _crc32c_tables.append((table, planes, tuple(shift), pads))
    return _crc32c_tables[0]


def crc32c_lanes(buffer, width, starts, planes):
    """The CRC-32C registers (started at 0, not inverted) of every width-byte
    lane of buffer, in order. Each lane holds its bytes right-aligned behind
    zeros; starts maps a length to the number of lanes that long, and no lane
    is longer than one before it.

    One table step per byte column, for all lanes at once: bytes.translate
    looks the column up, int XORs it; a column only involves the lanes whose
    bytes have begun (a prefix of them, as the longest come first).
    """
    lanes = len(buffer) // width
    if not lanes:
        return ()
    from_bytes = int.from_bytes
    plane0, plane1, plane2, plane3 = planes
    reg0 = reg1 = reg2 = reg3 = 0      # byte k of every active lane's register
    active = 0
    for column in range(width):
        active += starts.get(width - column, 0)
        if not active:
            continue
        index = (reg0 ^ from_bytes(buffer[column:active * width:width], "little")).to_bytes(active, "little")
        reg0 = from_bytes(index.translate(plane0), "little") ^ reg1
        reg1 = from_bytes(index.translate(plane1), "little") ^ reg2
        reg2 = from_bytes(index.translate(plane2), "little") ^ reg3
        reg3 = from_bytes(index.translate(plane3), "little")
    registers = bytearray(4 * lanes)
    for byte_index, reg in enumerate((reg0, reg1, reg2, reg3)):
        registers[byte_index::4] = reg.to_bytes(lanes, "little")
    return struct.unpack("<%dI" % lanes, registers)


def crc32c_python_many(messages):
    """The CRC-32C (as stored in xl_crc) of each message, a sequence of
    bytes-like parts, in pure Python, computed together (crc32c_lanes).

    Each message gets a lane: the prefix and its bytes, right-aligned in a
    lane of their length rounded up to 8 (lanes of one width are computed
    together). A message longer than CRC_LANE keeps there only its head (its
    first bytes); the rest of it goes whole into CRC_LANE-byte lanes whose
    registers are then chained onto the head's.
    """
    import collections
    import itertools
    _table, planes, shift, pads = crc32c_tables()
    shift0, shift1, shift2, shift3 = shift
    chain = itertools.chain
    prefixed = len(CRC32C_INIT_PREFIX)
    bodies = list(map(b"".join, messages))
    lengths = list(map(len, bodies))            # lane length: 4 more, the prefix
    longer = []
    if bodies and max(lengths) > CRC_LANE - prefixed:
        longer = [number for number, length in enumerate(lengths) if length > CRC_LANE - prefixed]
    lane_lengths = lengths[:]
    full_lanes = []
    for number in longer:
        joined = CRC32C_INIT_PREFIX + bodies[number]
        head = len(joined) - (len(joined) - 1) // CRC_LANE * CRC_LANE
        full_lanes.append(joined[head:])
        bodies[number] = joined[:head]
        lane_lengths[number] = head - prefixed
    lane_pads = list(map(pads.__getitem__, lane_lengths))
    for number in longer:                # the prefix is in the head already
        lane_pads[number] = bytes(-(lane_lengths[number] + prefixed) % 8)

    result = [0] * len(messages)
    order = sorted(range(len(messages)), key=lane_lengths.__getitem__, reverse=True)
    counts = collections.Counter(lane_lengths)
    done = 0
    for width in range(CRC_LANE, 0, -8):
        starts = dict((length, counts[length - prefixed])
                      for length in range(width - 7, width + 1) if length - prefixed in counts)
        count = sum(starts.values())
        if not count:
            continue
        run = order[done:done + count]
        done += count
        buffer = b"".join(chain.from_iterable(zip(
            map(lane_pads.__getitem__, run), map(bodies.__getitem__, run))))
        for number, crc in zip(run, crc32c_lanes(buffer, width, starts, planes)):
            result[number] = crc ^ 0xFFFFFFFF
    full_buffer = b"".join(full_lanes)
    full = crc32c_lanes(full_buffer, CRC_LANE, {CRC_LANE: len(full_buffer) // CRC_LANE}, planes)
    lane = 0
    for number in longer:
        crc = result[number] ^ 0xFFFFFFFF
        count = (lengths[number] + prefixed - 1) // CRC_LANE
        for following in full[lane:lane + count]:
            crc = (shift0[crc & 0xFF] ^ shift1[(crc >> 8) & 0xFF]
                   ^ shift2[(crc >> 16) & 0xFF] ^ shift3[crc >> 24] ^ following)
        result[number] = crc ^ 0xFFFFFFFF
        lane += count
    return result


def crc32c_python(parts):
    """The CRC-32C of the concatenation of parts (bytes-like), in pure Python."""
    return crc32c_python_many([parts])[0]


crc32c_python.many = crc32c_python_many


def crc32c_kernel():
    """A CRC-32C function computed by the Linux kernel's crypto API (AF_ALG),
    or None when this kernel or Python has none or it fails its self-test."""
    import socket
    try:
        algorithm = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET)
    except (AttributeError, OSError):
        return None
    try:
        algorithm.bind(("hash", "crc32c"))
        operation, _address = algorithm.accept()
    except OSError:
        algorithm.close()
        return None
    more = getattr(socket, "MSG_MORE", 0x8000)
    broken = []         # after a failed call the socket may hold half a digest

    def crc32c(parts):
        """The CRC-32C of the concatenation of parts (bytes-like)."""
        parts = list(parts)
        if broken:
            return crc32c_python(parts)
        try:
            # One sendmsg takes at most IOV_MAX (1024) parts; MSG_MORE keeps
            # the digest open across calls.
            for start in range(0, max(len(parts), 1), 512):
                chunk = parts[start:start + 512]
                sent = operation.sendmsg(chunk, [], more if start + 512 < len(parts) else 0)
                if sent != sum(len(part) for part in chunk):
                    raise OSError("short send")
            digest = operation.recv(4)
            if len(digest) != 4:
                raise OSError("short digest")
            return int.from_bytes(digest, "little")
        except OSError:
            broken.append(True)
            return crc32c_python(parts)

    crc32c.sockets = (algorithm, operation)      # alive as long as the function
    crc32c.many = lambda messages: [crc32c(parts) for parts in messages]
    # A kernel or Python that gets it wrong (or half right: multi-part
    # messages, a digest per message) is not used.
    samples = [[b"123456789"], [b"12", memoryview(b"3456"), b"789"], [bytes(range(256)) * 9, b"x" * 20]]
    try:
        works = (crc32c(samples[0]) == CRC32C_CHECK and not broken
                 and [crc32c(parts) for parts in samples] == crc32c_python_many(samples) and not broken)
    except Exception:
        works = False
    if not works:
        operation.close()
        algorithm.close()
        return None
    return crc32c


def crc32c_engine():
    """The fastest CRC-32C function this machine offers: crc(parts) returns the
    CRC-32C (final, as stored in xl_crc) of the concatenation of a list of
    bytes-like parts; crc.many(messages) the list for many such lists. The
    kernel's (AF_ALG, opens a socket) when it works, else pure Python."""
    return crc32c_kernel() or crc32c_python


def exit_code_for(outcomes, stop_on_doubt=False):
    """The exit code for the outcomes of the sources tried, in order.

    "Not found" (1) only when every source cleanly said absent: PostgreSQL
    takes it for the end of the archive. Any other miss is doubt: 3, or
    STOP_RECOVERY when stop_on_doubt (a segment in archive recovery, where
    "not found" would open the database short of what the archive holds).
    """
    if FOUND in outcomes:
        return DELIVERED
    if outcomes and all(outcome == ABSENT for outcome in outcomes):
        return NOT_FOUND
    return STOP_RECOVERY if stop_on_doubt else UNAVAILABLE


def fetch_outcome(code, source_outcomes):
    """What fetch-stats.json counts a restore_command call as (FETCH_OUTCOMES), from its
    exit code and the outcomes of the sources it asked, in order.

    "delivered": exit 0. "absent": exit 1 because every source said absent (or
    the segment lies before its timeline). "invalid": not delivered, every
    source answered, and the copies found were all invalid. "unreachable": any
    other miss: a source down, stalled, failing or without its archive
    directory, [archive] timeout, a bad config, name or destination, an error.
    """
    if code == DELIVERED:
        return "delivered"
    if code == NOT_FOUND and source_outcomes and all(outcome == ABSENT for outcome in source_outcomes):
        return "absent"
    if INVALID in source_outcomes and all(outcome in (INVALID, ABSENT) for outcome in source_outcomes):
        return "invalid"
    return "unreachable"


def recovery_mode(files, recovery_conf):
    """'standby', 'archive' or None: how the PostgreSQL running us recovers.

    files: which of standby.signal and recovery.signal are in the data
    directory (12+); recovery_conf: the text of recovery.conf (9.6-11) or
    None. standby.signal wins over recovery.signal, as in PostgreSQL. In
    archive recovery "not found" ends recovery and opens the database; a
    standby only retries later.
    """
    if "standby.signal" in files:
        return "standby"
    if "recovery.signal" in files:
        return "archive"
    if recovery_conf is None:
        return None
    for line in recovery_conf.splitlines():
        words = line.split("#", 1)[0].replace("=", " ").split()
        if len(words) == 2 and words[0] == "standby_mode":
            return "standby" if words[1].strip("'").lower() in ("on", "true", "yes", "1") else "archive"
    return "archive"


def timeline_begins(history_text):
    """The LSN (an int) where the timeline whose .history file this is begins: the
    switch point of its last line; None if there is none."""
    begins = None
    for line in history_text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and "/" in fields[1]:
            high, _, low = fields[1].partition("/")
            try:
                begins = (int(high, 16) << 32) | int(low, 16)
            except ValueError:
                return None
    return begins


def before_its_timeline(wal_name, begins):
    """True if segment wal_name lies wholly before its timeline began: no such file
    can exist. PostgreSQL 9.6-13 still asks for it (every timeline of the history,
    newest first); the answer is a certain "absent", whatever the sources say.

    The segment size is not known here: the largest one the name allows is
    assumed, so the answer is never wrong, only sometimes too cautious.
    """
    if begins is None:
        return False
    _timeline, log_id, seg = parse_segment_name(wal_name)
    seg_size = MAX_SEG_SIZE
    while seg_size > MIN_SEG_SIZE and (seg + 1) * seg_size > 0x100000000:
        seg_size //= 2
    return log_id * 0x100000000 + (seg + 1) * seg_size <= begins


def source_deadline(now, deadline, sources_left):
    """When the next source must be given up: an equal share of the time left, so
    one stalled or crawling source never leaves the last one without its turn."""
    return now + max(0.0, deadline - now) / max(1, sources_left)


def doubt_summary(results):
    """One line for the log: '[source a] unreachable (probe ping); [source b] absent'."""
    return "; ".join("[source %s] %s%s" % (name, outcome, " (%s)" % detail if detail else "")
                     for name, outcome, detail in results)


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
    keep = set(window) | {SPOOL_LOCK, SPOOL_WANT, SPOOL_MISSED, SPOOL_LOG, SPOOL_OWNER, CONFIG_NOTE, SPOOL_BOOT}
    remove = sorted(name for name in spooled if name not in keep
                    and not name.startswith((SPOOL_WANT + ".", SPOOL_MISSED + ".")))
    missing = [name for name in window if name not in spooled]
    return remove, missing


# ---------------------------------------------------------------------------
# The archive key block: pg_wal_fetch.py and setup_guest.py carry it alike
# (tests/test_archive_key.py checks it). The line that restricts the guest's
# key on an archive host to pg_wal_serve, and the address the host sees.
# ---------------------------------------------------------------------------

SERVER = "pg_wal_serve"
SERVER_PATH = "/usr/local/bin/pg_wal_serve"


def authorized_keys_line(public_key, from_patterns, path_glob, server_path=SERVER_PATH, cleanup=False):
    """The authorized_keys line that lets public_key run pg_wal_serve on path_glob
    and nothing else, from from_patterns (sshd's from=: addresses, CIDR, *);
    cleanup: `pg_wal_serve --cleanup`, the key of pg_zfs_snap.py oldest-wal --apply.

    restrict: no forwarding of any kind, no PTY, no ~/.ssh/rc (and whatever a
    later OpenSSH adds). Inside command="..." sshd turns \\" into " and
    nothing else; the login shell then reads the quoted words.
    """
    import shlex
    public_key = public_key.strip()
    for what, value in (("public key", public_key), ("from", from_patterns), ("archive glob", path_glob),
                        ("server path", server_path)):
        if not value or "\n" in value or "\r" in value:
            raise Failure("cannot write an authorized_keys line: %s %r is empty or has a line break"
                          % (what, value), 2)
    if not path_glob.startswith("/") or not server_path.startswith("/"):
        raise Failure("the archive glob and the server path must be absolute: %r, %r"
                      % (path_glob, server_path), 2)
    if '"' in from_patterns or " " in from_patterns:
        raise Failure("from %r: addresses or patterns separated by commas, no spaces or quotes"
                      % from_patterns, 2)
    key = public_key.split()
    if len(key) < 2 or not key[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise Failure("not an ssh public key: %r" % public_key[:40], 2)
    command = "%s %s%s" % (shlex.quote(server_path), "--cleanup " if cleanup else "", shlex.quote(path_glob))
    return 'restrict,from="%s",command="%s" %s' % (from_patterns, command.replace('"', '\\"'), " ".join(key))


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


# End of the archive key block.


# ---------------------------------------------------------------------------
# The archive host's side: one sh program, sent or installed
# ---------------------------------------------------------------------------
# The host runs POSIX sh, never Python: every RHEL/CentOS and Debian host has
# it, minimal installs included (rrsync is not on RHEL; Python is not on a
# minimal RHEL 8/9). The same functions (SERVE_FUNCTIONS) answer both ways in:
#   - a key installed unrestricted: the client sends them as the script of
#     `sh -c SCRIPT pg_wal_fetch-request REQUEST...`, which reads its request
#     from "$@";
#   - a key installed restricted (authorized_keys command=): sshd runs
#     pg_wal_serve (serve_script()) whatever the client asked; it splits
#     $SSH_ORIGINAL_COMMAND into words, never evaluating it, and serves the
#     words after the last REQUEST_MARK, with the archive glob of its own
#     command line. The client's script, sent the same way, is never run.
# So one command string works both ways, and the wire protocol is the same.

REQUEST_MARK = "pg_wal_fetch-request"

# Requests (the words after REQUEST_MARK):
#   fetch COPY NAME...  "DIRS N" (directories the glob matches); then per NAME
#       "FILE NAME SUFFIX SIZE INDEX COUNT PATH" and SIZE bytes (SUFFIX -, .gz,
#       .bz2 or .xz; copy INDEX=COPY of COUNT); at the first NAME with no copy
#       "MISSING NAME", with fewer than COPY copies "NOMORE NAME COUNT", and
#       the end. A name's copies: every readable NAME, NAME.gz, NAME.bz2,
#       NAME.xz in every directory of the glob, in glob order, that suffix
#       order within a directory.
#   list   the file names in every directory of the glob, then "DIRS N".
#   probe  "PROBE MODE USER VERSION CLIENT GLOB": MODE restricted (pg_wal_serve
#       answered) or unrestricted (the client's own script ran: the key runs
#       any command), CLIENT the address the host sees the guest at.
# Every NAME must be a WAL file name (case patterns); the glob is expanded with
# IFS empty, so it is matched but never split or otherwise evaluated. No single
# quote in here: the script travels inside one (shlex.quote), and no comment
# (one_line). A file goes out as exactly the bytes its frame announces; a
# segment (whole MiBs) in 1 MiB blocks by dd: head -c reads 8 KiB and writes
# 4 KiB at a time (12.5 ms of the host's CPU a 16 MiB segment here, dd 8.5).
SERVE_FUNCTIONS = r"""h=[0123456789ABCDEF]
h8=$h$h$h$h$h$h$h$h
refuse() {
	printf "pg_wal_serve: refused: %.200s\n" "$1" >&2
	logger -p auth.notice -t pg_wal_serve "refused a request from ${SSH_CLIENT%% *}: $(printf "%.200s" "$1")" >/dev/null 2>&1
	exit ${refusal:-1}
}
is_wal_name() {
	case $1 in
	$h8$h8$h8|$h8$h8$h8.partial|$h8.history|$h8$h8$h8.$h8.backup) return 0 ;;
	esac
	return 1
}
serve_fetch() {
	k=$1
	shift
	n=0
	for d in $g; do if [ -d "$d" ]; then n=$((n+1)); fi; done
	echo "DIRS $n"
	for w in "$@"; do
		c=0
		f=
		for d in $g; do
			for s in "" .gz .bz2 .xz; do
				if [ -f "$d/$w$s" ] && [ -r "$d/$w$s" ]; then
					c=$((c+1))
					if [ $c -eq $k ]; then f=$d/$w$s; x=${s:--}; fi
				fi
			done
		done
		if [ $c -eq 0 ]; then echo "MISSING $w"; exit 0; fi
		if [ -z "$f" ]; then echo "NOMORE $w $c"; exit 0; fi
		b=$(wc -c < "$f") || exit 3
		b=$((b+0))
		printf "FILE %s %s %s %s %s %s\n" "$w" "$x" "$b" "$k" "$c" "$f"
		if [ $((b % 1048576)) -eq 0 ] && [ $b -gt 0 ]; then
			dd if="$f" bs=1048576 count=$((b / 1048576)) 2>/dev/null || {
				echo "pg_wal_serve: cannot read $f" >&2
				exit 3
			}
		else
			head -c "$b" "$f" || exit 3
		fi
	done
}
serve_list() {
	n=0
	for d in $g; do if [ -d "$d" ]; then n=$((n+1)); ls -1 "$d"; fi; done
	echo "DIRS $n"
}
serve_probe() {
	a=${SSH_CLIENT%% *}
	printf "PROBE %s %s %s %s %s\n" "$m" "$(id -un 2>/dev/null || echo "?")" "$v" "${a:--}" "$g"
}
serve() {
	IFS=
	set +f
	LC_ALL=C
	export LC_ALL
	case $1 in
	fetch)
		[ $# -ge 3 ] || refuse "fetch wants a copy number and WAL file names"
		case $2 in
		[123456789]|[123456789][0123456789]|[123456789][0123456789][0123456789]) ;;
		*) refuse "not a copy number: $2" ;;
		esac
		k=$2
		shift 2
		for w in "$@"; do is_wal_name "$w" || refuse "not a WAL file name: $w"; done
		serve_fetch "$k" "$@" ;;
	list)
		[ $# -eq 1 ] || refuse "list takes no argument"
		serve_list ;;
	probe)
		[ $# -eq 1 ] || refuse "probe takes no argument"
		serve_probe ;;
	cleanup)
		refuse "cleanup: this key reads WAL only (the cleanup key runs pg_wal_serve --cleanup)" ;;
	*)
		refuse "not a pg_wal_fetch request: $1" ;;
	esac
}
"""

# The cleanup mode of pg_wal_serve (`pg_wal_serve --cleanup GLOB`, the forced
# command of a second key, pg_zfs_snap.py oldest-wal --apply's), only in the
# installed program: never part of the script a fetch sends (remote_command), so
# no fetch key, restricted or not, is ever handed a way to remove a file.
# Request: `cleanup NAME` or `cleanup NAME dry-run`, NAME a segment name (24
# hex, timeline not 0; .partial, .backup and .history names are refused). It
# removes what `pg_archivecleanup DIR NAME` removes, plus the compressed copies
# (what `-x .gz`, `-x .bz2`, `-x .xz` runs add): in each directory of the glob,
# every file whose name, less one .gz, .bz2 or .xz, is a segment or a .partial
# segment whose 16 hex digits after the timeline sort before NAME's. Like
# pg_archivecleanup it ignores the timeline (a parent timeline's segments stay
# as long as the child's same position does), keeps .history and .backup
# files, and compares the names only. Answer: "removed PATH" (dry-run: "would
# remove PATH") per file, then "CLEANED NAME COUNT DIRS". In sh, not Python or
# pg_archivecleanup: the hosts need neither (the 16 digits are compared as two
# 8-digit numbers, $((0x...)), which POSIX sh has).
CLEANUP_FUNCTIONS = r"""serve_cleanup() {
	IFS=
	set +f
	LC_ALL=C
	export LC_ALL
	[ "${1:-}" = cleanup ] || refuse "not a cleanup request: ${1:-}: this key only removes archived WAL (pg_zfs_snap.py oldest-wal --apply)"
	[ $# -ge 2 ] || refuse "cleanup wants one WAL segment name, then dry-run or nothing"
	case $2 in
	00000000*)
		refuse "not a WAL segment name: $2" ;;
	$h8$h8$h8)
		;;
	*)
		refuse "not a WAL segment name: $2" ;;
	esac
	case $# in
	2)
		n= ;;
	3)
		[ "$3" = dry-run ] || refuse "not a cleanup option: $3"
		n=1 ;;
	*)
		refuse "cleanup wants one WAL segment name, then dry-run or nothing" ;;
	esac
	t=${2#$h8}
	hi=$((0x${t%$h8}))
	lo=$((0x${t#$h8}))
	dirs=0
	for d in $g; do if [ -d "$d" ]; then dirs=$((dirs+1)); fi; done
	if [ $dirs -eq 0 ]; then
		printf "pg_wal_serve: %s matches no directory: nothing removed\n" "$g" >&2
		exit 3
	fi
	k=0
	e=0
	for d in $g; do
		[ -d "$d" ] || continue
		for f in "$d"/*; do
			w=${f##*/}
			case $w in
			*.gz) w=${w%.gz} ;;
			*.bz2) w=${w%.bz2} ;;
			*.xz) w=${w%.xz} ;;
			esac
			case $w in
			$h8$h8$h8|$h8$h8$h8.partial) ;;
			*) continue ;;
			esac
			t=${w#$h8}
			t=${t%.partial}
			a=$((0x${t%$h8}))
			b=$((0x${t#$h8}))
			if [ $a -lt $hi ] || { [ $a -eq $hi ] && [ $b -lt $lo ]; }; then
				if [ ! -f "$f" ]; then
					continue
				elif [ -n "$n" ]; then
					echo "would remove $f"
					k=$((k+1))
				elif rm -f -- "$f"; then
					echo "removed $f"
					k=$((k+1))
				else
					e=$((e+1))
				fi
			fi
		done
	done
	if [ -z "$n" ]; then
		logger -p auth.notice -t pg_wal_serve "removed $k archived WAL file(s) before $2 for ${SSH_CLIENT%% *}" >/dev/null 2>&1
	fi
	if [ $e -gt 0 ]; then
		printf "pg_wal_serve: %s file(s) before %s could not be removed (%s removed)\n" "$e" "$2" "$k" >&2
		exit 3
	fi
	echo "CLEANED $2 $k $dirs"
}
"""

# pg_wal_serve after SERVE_FUNCTIONS and CLEANUP_FUNCTIONS: the request comes
# from sshd's $SSH_ORIGINAL_COMMAND, the archive glob (and --cleanup) from
# authorized_keys. A refusal of the cleanup mode exits 2.
SERVER_MAIN = r"""m=restricted
PATH=/usr/bin:/bin:/usr/sbin:/sbin
export PATH
c=
if [ "${1:-}" = --cleanup ]; then
	c=1
	refusal=2
	shift
fi
[ $# -eq 1 ] || refuse "usage: pg_wal_serve [--cleanup] ARCHIVE_GLOB (the command= of an authorized_keys line)"
g=$1
case $g in /*) ;; *) refuse "the archive glob must be an absolute path" ;; esac
if [ -n "$c" ]; then
	[ -n "${SSH_ORIGINAL_COMMAND:-}" ] || refuse "no command: this key serves pg_zfs_snap.py oldest-wal --apply requests only"
else
	[ -n "${SSH_ORIGINAL_COMMAND:-}" ] || refuse "no command: this key serves pg_wal_fetch.py requests only"
fi
set -f
unset IFS
found=
request=
for word in $SSH_ORIGINAL_COMMAND; do
	if [ "$word" = %(mark)s ]; then found=1; request=; else request="$request $word"; fi
done
[ -n "$found" ] || refuse "not a pg_wal_fetch request: $SSH_ORIGINAL_COMMAND"
set -- $request
if [ -n "$c" ]; then serve_cleanup "$@"; else serve "$@"; fi
"""

SERVER_HEADER = """#!/bin/sh
# %(server)s: the read-only server of archived WAL for pg_wal_fetch.py
# (pg_zfs %(version)s). Written by `pg_wal_fetch.py --serve-script` or
# `--install-server DIR`: do not edit; write it again after an upgrade.
#
# The forced command of the guest's key, in the authorized_keys of a user
# that can read the archive (not root), e.g. ~postgres/.ssh/authorized_keys:
#
#   restrict,from="GUEST",command="%(path)s '/data04/pgdata/arch/*'" ssh-ed25519 AAAA...
#
# sshd runs it for every session of that key, whatever the client asked. It
# reads the client's command from $SSH_ORIGINAL_COMMAND, splits it into words
# with globbing off (never evaluates it) and serves only these requests, the
# words after the last "%(mark)s":
#   fetch COPY NAME...   copy number COPY of each WAL file NAME, framed
#   list                 the file names in the archive's directories
#   probe                who answers (pg_wal_fetch.py --check)
# NAME: 24 upper-case hex digits (a segment), that and .partial,
# TTTTTTTT.history, or SEGMENT.XXXXXXXX.backup. The archive glob is the one
# argument above, never the client's. Anything else (a shell, scp, sftp, a
# path, another word) gets one line "pg_wal_serve: refused: ..." on stderr
# (and to syslog, auth.notice) and exit 1. It writes nothing anywhere.
#
# Cleanup mode, the forced command of a SEPARATE key (pg_zfs_snap.py
# oldest-wal --apply; the line: pg_wal_fetch.py --authorized-keys):
#
#   restrict,from="GUEST",command="%(path)s --cleanup '/data04/pgdata/arch/*'" ssh-ed25519 AAAA...
#
# serves only "cleanup NAME [dry-run]", NAME a segment (24 hex digits): it
# removes (dry-run: lists) in each directory of the glob the segments and
# .partial segments, plain or .gz/.bz2/.xz, before NAME as pg_archivecleanup
# does (timeline ignored; .history and .backup files kept), one "removed PATH"
# line each, then "CLEANED NAME COUNT DIRS". Anything else: refused, exit 2.
# In that mode it serves no fetch, list or probe; the fetch key no cleanup.
# Needs: sh, ls, wc, head -c, id, rm (RHEL/CentOS 7+, Debian: every install).
"""


def serve_script():
    """The text of pg_wal_serve, the forced command of a restricted key."""
    return (SERVER_HEADER % {"server": SERVER, "version": VERSION, "path": SERVER_PATH, "mark": REQUEST_MARK}
            + "v=%s\n" % VERSION + SERVE_FUNCTIONS + CLEANUP_FUNCTIONS + SERVER_MAIN % {"mark": REQUEST_MARK})


def one_line(script):
    """script (one command or keyword per line, as SERVE_FUNCTIONS is written) as
    one line: a line that opens a body (`{`, then, do, else, `case ... in`, a
    case pattern: ends in `)`, no `(` in it) or ends a case branch (;;) runs on
    with a blank, every other one ends with `;`. One line keeps ssh's command,
    sshd's log and `ps` readable."""
    parts = []
    for line in script.splitlines():
        line = line.strip()
        if line:
            opens = (line.endswith(("{", ";;")) or line.split()[-1] in ("then", "do", "else", "in")
                     or (line.endswith(")") and "(" not in line))
            parts.append(line + ("" if opens else ";"))
    return " ".join(parts)


def remote_command(path_glob, request):
    """The command string ssh sends for request (a list of words, e.g.
    fetch_request(...)): `sh -c SCRIPT pg_wal_fetch-request WORD...`.

    A login shell (unrestricted key) runs SCRIPT, SERVE_FUNCTIONS with the glob,
    on the words; pg_wal_serve (restricted key) serves the words after the mark.
    """
    import shlex
    script = one_line("g=%s\nm=unrestricted\nv=%s\n" % (shlex.quote(path_glob), VERSION)
                      + SERVE_FUNCTIONS + 'serve "$@"\n')
    return " ".join(["sh", "-c", shlex.quote(script), REQUEST_MARK] + [shlex.quote(w) for w in request])


def fetch_request(wal_names, candidate=1):
    """The words asking for copy number `candidate` of each of wal_names (valid names)."""
    return ["fetch", str(candidate)] + list(wal_names)


LIST_REQUEST = ["list"]
PROBE_REQUEST = ["probe"]


def parse_probe(text):
    """{mode, user, version, client, glob} of a probe's answer, or None if it is not one."""
    lines = text.splitlines()
    words = lines[0].split(" ", 5) if len(lines) == 1 else []
    if len(words) != 6 or words[0] != "PROBE" or words[1] not in ("restricted", "unrestricted"):
        return None
    return dict(zip(("mode", "user", "version", "client", "glob"), words[1:]))


def parse_frame(line, wal_name):
    """The framing line before wal_name's bytes, as a tuple, or None if it is not one.

    ("MISSING",), ("NOMORE", count) or ("FILE", suffix, size, index, count, path);
    suffix is "" for a plain file.
    """
    try:
        text = line.decode("utf-8").rstrip("\n")
    except UnicodeDecodeError:
        text = line.decode("utf-8", "replace").rstrip("\n")
    words = text.split(" ", 6)
    if words == ["MISSING", wal_name]:
        return ("MISSING",)
    if len(words) == 3 and words[:2] == ["NOMORE", wal_name] and words[2].isdigit():
        return ("NOMORE", int(words[2]))
    if (len(words) == 7 and words[:2] == ["FILE", wal_name]
            and words[2] in ("-",) + COMPRESSION_SUFFIXES[1:] and all(w.isdigit() for w in words[3:6])):
        return ("FILE", "" if words[2] == "-" else words[2], int(words[3]), int(words[4]),
                int(words[5]), words[6])
    return None


def ssh_argv(source, settings, command):
    """The ssh command that sends command (remote_command()) to source's host over
    the shared connection."""
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
    ciphers = preferred_ciphers(cpu_flags())
    if ciphers:
        argv += ["-o", "Ciphers=" + ciphers]
    if settings.control_dir:
        argv += ["-o", "ControlMaster=auto",
                 "-o", "ControlPath=" + os.path.join(settings.control_dir, "%C"),
                 "-o", "ControlPersist=%d" % settings.control_persist]
    argv += ["-p", str(source.port)]
    if source.identity_file:
        argv += ["-i", source.identity_file]
    if source.user:
        argv += ["-l", source.user]
    return argv + ["-T", "--", source.host, command]


# OpenSSH's default ciphers (6.9 to 9.x), AES-GCM first. On a CPU with AES
# instructions AES-GCM moves WAL about twice as fast as chacha20-poly1305,
# which OpenSSH prefers because it is the faster one without them (README,
# "Benchmarks"). The same set as the default, so every host that accepts the
# default accepts this; ssh_options = -o Ciphers=... wins over it.
AES_FIRST_CIPHERS = ("aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
                     "aes128-ctr,aes192-ctr,aes256-ctr")


def preferred_ciphers(flags):
    """The Ciphers option for a CPU with these feature flags: AES_FIRST_CIPHERS when
    it has AES instructions (x86 "aes", arm64 "aes"), else None (ssh's default)."""
    return AES_FIRST_CIPHERS if "aes" in flags else None


def cpu_flags():
    """The feature flags of this machine's first CPU (/proc/cpuinfo), or an empty set."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                name, _colon, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except (IOError, OSError):
        pass
    return frozenset()


# ---------------------------------------------------------------------------
# Settings and the cluster asking
# ---------------------------------------------------------------------------

class Source(object):
    """One [source NAME] section: where archived WAL can be fetched from."""

    def __init__(self, name, host, port, user, path, probe, identity_file, ssh_options, from_patterns=""):
        self.name, self.host, self.port, self.user = name, host, port, user
        self.path, self.probe = path, probe
        self.identity_file, self.ssh_options = identity_file, ssh_options
        self.from_patterns = from_patterns

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
        self.spool_dir = config.str("archive", "spool_dir", DEFAULT_SPOOL)
        self.spool_root = self.spool_dir     # spool_dir becomes this data directory's spool
        self.prefetch = config.int("archive", "prefetch", 8)
        self.durable_spool = True       # the prefetcher's claim_spool_boot may say otherwise
        self.timeout = config.int("archive", "timeout", 60, minimum=1)
        self.control_dir = config.str("archive", "control_dir", "") or "/tmp/pg_zfs-ssh-%d" % os.getuid()
        self.control_persist = config.int("archive", "control_persist", 60)
        self.connect_timeout = config.int("archive", "connect_timeout", 5, minimum=1)
        self.stall_timeout = config.int("archive", "stall_timeout", 5, minimum=1)
        self.pgdata = config.str("postgres", "pgdata", "")
        self.bindir = config.str("postgres", "bindir", "")
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
            config.str(section, "identity_file", ""), config.str(section, "ssh_options", ""),
            config.str(section, "from", ""))


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
    found = cluster_identity((".", settings.pgdata), settings.system_identifier)
    if found:
        return Cluster(*found)
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
    RUNNING.extend(EARLY)       # an early ssh no fetch_remote adopted
    del EARLY[:]
    while RUNNING:
        stop_process(RUNNING.pop())


def stop_process(proc):
    """Kill proc if it still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def end_by_signal(signum):
    """End this process by signum itself, so PostgreSQL sees what stopped us."""
    logging.shutdown()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return UNAVAILABLE   # not reached unless the signal is blocked


def adopt_early(argv):
    """The ssh start_early_fetch started, if it runs exactly argv (else it is stopped):
    fetch_remote reads it as the process it would have started itself."""
    while EARLY:
        proc = EARLY.pop()
        if proc.args == argv:
            return proc
        stop_process(proc)
    return None


def need_subprocess():
    """Import subprocess on first use: delivery from the spool never needs it."""
    global subprocess
    import subprocess


# ---------------------------------------------------------------------------
# Files: staged writes, decompression
# ---------------------------------------------------------------------------

STAGED_COUNT = itertools.count()


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
                fd = os.open(self.directory, os.O_TMPFILE | os.O_RDWR, 0o600)
            except OSError:
                fd = None
        if fd is None:
            # pid and a count: the prefetcher has two staged files at once.
            self.temp_path = os.path.join(self.directory, ".%s.%d.%d.tmp" % (PROG, os.getpid(), next(STAGED_COUNT)))
            remove_quietly(self.temp_path)      # left by an earlier process with this pid
            fd = os.open(self.temp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.file = os.fdopen(fd, "wb")

    def path_for_readers(self):
        """A path another process of this user can open the (maybe unnamed) file by."""
        if self.temp_path is not None:
            return os.path.abspath(self.temp_path)
        return "/proc/%d/fd/%d" % (os.getpid(), self.file.fileno())

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
                    temp = ".%s.%d.%d.tmp" % (PROG, os.getpid(), next(STAGED_COUNT))
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


def put_file(path, data, durable=False):
    """Write data as the file at path, whole or not at all (StagedFile)."""
    staged = StagedFile(os.path.dirname(path), durable)
    try:
        staged.write(data)
        staged.commit(path)
    finally:
        staged.discard()


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
    """Writes one file's bytes, decompressed, into a StagedFile, and never more than
    the file may hold: a segment the size its first page states, a .history or
    .backup file MAX_TEXT_FILE. A copy too big is refused before it fills the
    disk, a small archive that inflates to gigabytes before it fills memory.
    Keeps the file's head for the checks."""

    def __init__(self, staged, suffix, kind):
        self.staged = staged
        self.suffix = suffix
        self.decompressor = make_decompressor(suffix)
        self.text = kind not in ("segment", "partial")
        self.limit = MAX_TEXT_FILE if self.text else MAX_SEG_SIZE
        self.keep = MAX_TEXT_FILE + 1 if self.text else LONG_HEADER.size
        self.head = b""
        self.size = 0
        self.problem = None

    def feed(self, data):
        """Take the next bytes of the file as sent. OSError: the staged file cannot be written."""
        if self.problem:
            return
        if self.decompressor is None:
            self.take(data)
            return
        pieces = self.inflate(data)
        while not self.problem:
            try:
                piece = next(pieces)
            except StopIteration:
                return
            except Exception as error:   # zlib.error, OSError (bz2), lzma.LZMAError, EOFError
                self.problem = "cannot decompress: %s" % error
                return
            self.take(piece)

    def inflate(self, data):
        """The decompressed pieces of data, CHUNK bytes at most each. A file may hold
        several streams back to back (pbzip2, pigz -i, `cat a.gz b.gz`): gzip,
        bzip2 and xz read them all, and so do we."""
        while True:
            decompressor = self.decompressor
            if decompressor.eof:
                data = decompressor.unused_data + data
                if not data:
                    return
                decompressor = self.decompressor = make_decompressor(self.suffix)
            piece = decompressor.decompress(data, CHUNK)
            if self.suffix == ".gz":
                # At a stream's end zlib keeps what follows in unused_data (taken
                # at the top of the loop), not in unconsumed_tail.
                data = b"" if decompressor.eof else decompressor.unconsumed_tail
                more = bool(data) or len(piece) == CHUNK
            else:
                data = b""
                more = not decompressor.needs_input
            if piece:
                yield piece
            if not more and not decompressor.eof:
                return

    def take(self, piece):
        if len(self.head) < self.keep:
            self.head += piece[:self.keep - len(self.head)]
            if not self.text and len(self.head) >= LONG_HEADER.size:
                seg_size = LONG_HEADER.unpack_from(self.head)[6]
                if not (is_power_of_two(seg_size) and MIN_SEG_SIZE <= seg_size <= MAX_SEG_SIZE):
                    # Refused now, not after a gigabyte: without a size nothing bounds it.
                    self.problem = "implausible segment size %d in the first page header" % seg_size
                    return
                self.limit = seg_size
        self.size += len(piece)
        if self.size > self.limit:
            self.problem = "more than %d bytes, %s" % (
                self.limit, "too big for a history or backup file" if self.text
                else "the segment size its first page states")
            return
        self.staged.write(piece)

    def finish(self):
        if self.problem or self.decompressor is None:
            return
        decompressor = self.decompressor
        if self.suffix == ".gz" and not decompressor.eof:
            try:
                tail = decompressor.flush()
            except Exception as error:   # zlib.error
                self.problem = "cannot decompress: %s" % error
                return
            if tail:
                self.take(tail)
        if not self.problem and not decompressor.eof:
            self.problem = "compressed stream ends early"


def store(wal_name, suffix, size, read, target, durable, cluster, verify, later=None):
    """Receive size bytes from read() as wal_name, check them, and put them at target.

    Returns (outcome, reason, drained): FOUND, INVALID (a bad copy: nothing
    written) or FAILED (the bytes stopped coming, or could not be written);
    drained is False when the rest of the file was left unread, so a stream of
    several files is out of step. verify(staged, wal_name) checks a whole
    segment. Nothing is left at target or beside it unless FOUND.

    later(wal_name, finish): the checks of a received file and its commit are
    handed to finish() (BackgroundChecks: the prefetcher checks one segment
    while the next arrives), and FOUND means received; finish() returns the
    outcome and, like store(), leaves nothing at target unless FOUND.
    """
    kind = wal_kind(wal_name)
    most = MAX_TEXT_FILE if kind in ("history", "backup") else MAX_SEG_SIZE
    if not suffix and size > most:
        return INVALID, "%d bytes, more than a %s file can hold" % (size, kind), False
    staged = StagedFile(os.path.dirname(target), durable)
    try:
        receiver = Receiver(staged, suffix, kind)
        remaining = size
        try:
            while remaining > 0:
                chunk = read(min(CHUNK, remaining))
                if not chunk:
                    return FAILED, "transfer broke off after %d of %d bytes" % (size - remaining, size), False
                remaining -= len(chunk)
                receiver.feed(chunk)
                if receiver.problem:
                    return INVALID, receiver.problem, remaining == 0
            receiver.finish()
        except (OSError, IOError) as error:
            return FAILED, "cannot write beside %s: %s" % (target, error.strerror or error), False

        def finish(staged=staged):
            try:
                problem = receiver.problem or check_file(kind, wal_name, receiver.head, receiver.size, cluster)
                if not problem and kind == "segment":
                    problem = verify(staged, wal_name)
                if problem:
                    return INVALID, problem, True
                staged.commit(target)
                return FOUND, "", True
            finally:
                staged.discard()
        if later is None:
            return finish()
        later(wal_name, finish)
        staged = None                   # finish() owns it now
        return FOUND, "", True
    finally:
        if staged is not None:
            staged.discard()


# ---------------------------------------------------------------------------
# Whole-segment checks: every page here, every record by pg_waldump
# ---------------------------------------------------------------------------

def caller_bindir():
    """The bindir of the PostgreSQL that runs us (restore_command: postgres, then sh,
    then us), from /proc; None when no postgres is among our ancestors."""
    pid = os.getppid()
    for _ in range(4):
        try:
            exe = os.readlink("/proc/%d/exe" % pid)
            with open("/proc/%d/stat" % pid) as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IOError, ValueError, IndexError):
            return None
        if os.path.basename(exe) in ("postgres", "postmaster"):
            return os.path.dirname(exe)
        if parent <= 1:
            return None
        pid = parent
    return None


def waldump_places(bindir, running_bindir, pg_major):
    """Where to look for the cluster's pg_waldump, most certain first: [postgres]
    bindir, the running server's, then the packages' directories of its version."""
    places = [place for place in (bindir, running_bindir) if place]
    if pg_major:
        places += ["/usr/pgsql-%s/bin" % pg_major, "/usr/lib/postgresql/%s/bin" % pg_major]
    return places


def find_waldump(bindir, pg_major):
    """pg_waldump (pg_xlogdump on 9.6) of the cluster's version, or None."""
    name = "pg_xlogdump" if pg_major == "9.6" else "pg_waldump"
    for place in waldump_places(bindir, caller_bindir(), pg_major):
        path = os.path.join(place, name)
        if os.access(path, os.X_OK):
            return path
    return None


def waldump_verdict(returncode, message, covered_by_one_record):
    """pg_waldump's verdict on one segment: None (sound), a reason, or False (it could
    not tell: check the records here instead)."""
    if returncode == 0:
        return None
    lowered = message.lower()
    if "could not find a valid record" in lowered and covered_by_one_record:
        return None                      # one record longer than the segment: pages checked
    if "error in wal record" in lowered or "error in xlog record" in lowered \
            or "could not find a valid record" in lowered:
        return "pg_waldump: " + message.split("error: ", 1)[-1].split("FATAL:", 1)[-1].strip()
    return False


def run_waldump(waldump, staged, wal_name, timeout):
    """(exit code, last stderr line) of pg_waldump -z on the staged file, read under
    the segment's own name (pg_waldump takes the timeline and position from it)."""
    return finish_waldump(start_waldump(waldump, staged, wal_name), timeout)


def start_waldump(waldump, staged, wal_name):
    """run_waldump in two halves: pg_waldump started on the staged file, to be read
    by finish_waldump (or stopped by stop_waldump), so the page headers are checked
    while it runs (issue 17). Returns what those two take."""
    need_subprocess()
    directory = private_temp_directory()
    link = os.path.join(directory, wal_name)
    argv = [waldump, "-z", link]
    log.debug("run: %s", " ".join(argv))
    try:
        os.symlink(staged.path_for_readers(), link)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, universal_newlines=True)
    except BaseException:
        remove_link_directory(directory, link)
        raise
    return proc, directory, link


def finish_waldump(started, timeout):
    """(exit code, last stderr line) of a start_waldump; a Failure if it does not end
    within timeout seconds. The process and its link are gone afterwards."""
    proc = started[0]
    try:
        try:
            _out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Failure("%s did not finish within %s s" % (" ".join(proc.args), timeout), 1)
        return proc.returncode, (err.strip().splitlines() or [""])[-1]
    finally:
        stop_waldump(started)


def stop_waldump(started):
    """Stop a start_waldump's process if it runs, and remove its link."""
    proc, directory, link = started
    if proc.returncode is None:
        proc.kill()
        proc.communicate()
    remove_link_directory(directory, link)


def remove_link_directory(directory, link):
    remove_quietly(link)
    try:
        os.rmdir(directory)
    except OSError:
        pass


def private_temp_directory():
    """A new directory only this user may enter, in $TMPDIR, /tmp or /var/tmp (what
    tempfile.mkdtemp makes, without importing tempfile and shutil: 12 ms of CPU
    of every call that fetches a segment, issue 17)."""
    problem = None
    for parent in [place for place in (os.environ.get("TMPDIR"), "/tmp", "/var/tmp") if place]:
        for _attempt in range(20):
            path = os.path.join(parent, "%s-%d-%s" % (PROG, os.getpid(), os.urandom(6).hex()))
            try:
                os.mkdir(path, 0o700)
                return path
            except OSError as error:
                problem = error
                if error.errno != errno.EEXIST:
                    break
    raise Failure("cannot make a temporary directory: %s" % (problem.strerror or problem), UNAVAILABLE)


def make_verifier(cluster, waldump, timeout):
    """verify(staged, wal_name) for store(): None if the whole segment is one PostgreSQL
    reads to its end, else why not. Every page header is checked here; the records
    (lengths, links, CRC) by pg_waldump, or here in Python (slow) without one."""
    def verify(staged, wal_name):
        import mmap
        staged.file.flush()
        started, code, message = None, -1, ""
        if waldump:
            try:
                started = start_waldump(waldump, staged, wal_name)     # runs beside check_pages
            except (Failure, OSError) as error:
                message = str(error)
        try:
            with mmap.mmap(staged.file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                problem = check_pages(data, wal_name, cluster.magics)
                if problem:
                    return problem
                if waldump:
                    if started is not None:
                        try:
                            code, message = finish_waldump(started, timeout)
                        except (Failure, OSError) as error:
                            code, message = -1, str(error)
                        started = None
                    seg_size = len(data)
                    rem_len = LONG_HEADER.unpack_from(data)[4]
                    verdict = waldump_verdict(code, message, rem_len >= seg_size - LONG_HEADER.size)
                    if verdict is not False:
                        return verdict
                    log.warning("%s could not check %s (%s): checking its records here, slowly",
                                waldump, wal_name, message)
                return walk_records(data, wal_name, "segment", crc32c_engine())
        finally:
            if started is not None:
                stop_waldump(started)        # the pages were bad, or we were interrupted
    return verify


# ---------------------------------------------------------------------------
# Sources: the probe, local directories, ssh
# ---------------------------------------------------------------------------

def probe(source, deadline, patience=1.0):
    """True if source's host seems up (or there is nothing to probe). probe = tcp
    waits for sshd's banner: a host that accepts connections and never speaks is
    down. patience: seconds for the banner (ping: the reply); the connection
    itself gets at most one."""
    if source.is_local or source.probe == "none":
        return True
    wait = max(0.1, min(1.0, deadline - time.time()))
    patience = max(wait, min(patience, deadline - time.time()))
    if source.probe == "tcp":
        return speaks_ssh(source.host, source.port, wait, patience)
    need_subprocess()
    try:
        code = run(["ping", "-c", "1", "-W", str(max(1, int(patience))), source.host], timeout=patience + 1,
                   check=False)[0]
    except Failure as failure:
        log.warning("[source %s] probe = ping: %s; trying the host anyway", source.name, failure)
        return True
    return code == 0


def speaks_ssh(host, port, wait, patience):
    """True if host:port takes a connection within wait seconds and its first bytes,
    within patience, are an ssh banner. socket.create_connection's loop over the
    host's addresses, on the C module: socket.py costs 8 ms of CPU a call (enum,
    selectors), and an ASCII name skips the idna codec (issue 17)."""
    import _socket
    try:
        name = host.encode("ascii")
    except UnicodeEncodeError:
        try:
            name = host.encode("idna")
        except UnicodeError:
            return False
    try:
        addresses = _socket.getaddrinfo(name, port, 0, _socket.SOCK_STREAM)
    except (OSError, IOError):
        return False
    for family, kind, proto, _canonical, address in addresses:
        try:
            connection = _socket.socket(family, kind, proto)    # EAFNOSUPPORT without IPv6
        except (OSError, IOError):
            continue
        try:
            try:
                connection.settimeout(wait)
                connection.connect(address)
            except (OSError, IOError):
                continue
            try:
                connection.settimeout(patience)
                return connection.recv(64).startswith(b"SSH-")
            except (OSError, IOError):
                return False
        finally:
            connection.close()
    return False


def memo_file(settings, source, kind):
    """The file in the private control dir whose mtime says when source last failed
    (kind "down": probe, stall, or no answer) or last answered (kind "up"); None
    without a usable control dir or for an odd source name."""
    if not settings.control_dir or not all(c.isalnum() or c in "._-" for c in source.name):
        return None
    return os.path.join(settings.control_dir, kind + "-" + source.name)


def memo_time(settings, source, kind):
    """The time of source's memo of kind, or None."""
    path = memo_file(settings, source, kind)
    if path:
        try:
            return os.stat(path).st_mtime
        except OSError:
            pass
    return None


def down_since(settings):
    """{source name: time it last failed} for the sources with a memo."""
    result = {}
    for source in settings.sources:
        since = memo_time(settings, source, "down")
        if since is not None:
            result[source.name] = since
    return result


def remember(settings, source, down, answered=False):
    """Note that source failed now (source_order then asks it last for a while), or
    forget it once it answered; answered (it sent an answer just now): note the
    time too (probe_needed). Only a hint: never fails a fetch."""
    for kind, now in (("down", down), ("up", answered and not down)):
        path = memo_file(settings, source, kind)
        if not path:
            continue
        try:
            if now:
                with open(path, "a"):
                    os.utime(path, None)
            elif os.path.exists(path):
                os.unlink(path)
        except OSError:
            pass


def reachable(source, settings, deadline, patience=1.0):
    """probe(source), unless it answered a moment ago (probe_needed); a failure
    is remembered (source_order puts the source last)."""
    if not probe_needed(memo_time(settings, source, "up"), time.time()):
        log.debug("[source %s] answered less than %s s ago: not probed", source.name, UP_MEMO)
        return True
    up = probe(source, deadline, patience)
    if not up:
        remember(settings, source, True)
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


class Stalled(Exception):
    """A source sent nothing for [archive] stall_timeout, or its share of the time ran out."""


class Stream(object):
    """A child's stdout read with limits: no byte for `stall` seconds (`first_wait`
    before the first byte: ssh may still be connecting) or past `deadline`
    raises Stalled, so a frozen or crawling host is given up and the next asked."""

    def __init__(self, fd, stall, first_wait, deadline, renew=None):
        self.fd, self.stall, self.first_wait, self.deadline = fd, stall, first_wait, deadline
        self.renew = renew       # seconds per file of a long stream (prefetch), else None
        self.started = False
        self.buffer = b""

    def _more(self):
        import select
        limit = self.stall if self.started else self.first_wait
        wait = min(limit, self.deadline - time.time())
        if wait <= 0 or not select.select([self.fd], [], [], wait)[0]:
            if time.time() >= self.deadline - 0.01:
                raise Stalled("its share of [archive] timeout ran out")
            raise Stalled("no byte for %d s" % limit)
        self.started = True
        return os.read(self.fd, CHUNK)

    def readline(self, limit=4096):
        while b"\n" not in self.buffer and len(self.buffer) < limit:
            data = self._more()
            if not data:
                break
            self.buffer += data
        end = self.buffer.find(b"\n")
        end = min(limit, len(self.buffer) if end < 0 else end + 1)
        line, self.buffer = self.buffer[:end], self.buffer[end:]
        return line

    def timed_read(self):
        """read, for one file: with renew, the file's time starts at its first read
        (a prefetcher may hold the stream before it, waiting for recovery)."""
        if not self.renew:
            return self.read
        started = []

        def read(size):
            if not started:
                started.append(True)
                self.deadline = time.time() + self.renew
            return self.read(size)
        return read

    def read(self, size):
        if not self.buffer:
            self.buffer = self._more()
        if len(self.buffer) <= size:
            data, self.buffer = self.buffer, b""      # the whole buffer: no copy (16 MiB a segment)
            return data
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data


def local_copies(directories, wal_name):
    """[(path, suffix)] of every copy of wal_name in directories, in the order they are tried."""
    return [(os.path.join(directory, wal_name + suffix), suffix)
            for directory in directories for suffix in COMPRESSION_SUFFIXES
            if os.path.isfile(os.path.join(directory, wal_name + suffix))]


def fetch_local(source, wal_names, deliver, candidate):
    """Copy number `candidate` of wal_names, in order, from a local directory glob:
    {name: (outcome, detail, index, count)} up to the first name it lacks."""
    import glob
    directories = sorted(d for d in glob.glob(source.path) if os.path.isdir(d))
    if not directories:
        return {wal_names[0]: (NO_DIRECTORY, "no directory matches %s" % source.path, 0, 0)}
    results = {}
    for wal_name in wal_names:
        copies = local_copies(directories, wal_name)
        if not copies:
            results[wal_name] = (ABSENT, "", 0, 0)
            break
        if candidate > len(copies):
            results[wal_name] = (NO_MORE, "", candidate, len(copies))
            break
        path, suffix = copies[candidate - 1]
        try:
            wal_file = open(path, "rb")
        except (IOError, OSError) as error:
            results[wal_name] = (FAILED, "%s: %s" % (path, error.strerror or error), candidate, len(copies))
            break
        with wal_file:
            outcome, detail, _drained = deliver(wal_name, suffix, os.fstat(wal_file.fileno()).st_size,
                                                wal_file.read, path)
        results[wal_name] = (outcome, detail, candidate, len(copies))
        if outcome == FAILED:
            break
    return results


def fetch_remote(source, settings, wal_names, deliver, deadline, candidate, renew=None, answers=None):
    """Copy number `candidate` of wal_names, in order, from source in ONE ssh session:
    {name: (outcome, detail, index, count)} up to the first name it lacks.

    answers(): the source's probe, run while ssh starts (the two overlap: the
    probe cost a call without prefetch 17 ms before ssh began, issue 17); when it
    fails, ssh is stopped unread and the answer is (UNREACHABLE, "probe ...").
    """
    need_subprocess()
    argv = ssh_argv(source, settings, remote_command(source.path, fetch_request(wal_names, candidate)))
    proc = adopt_early(argv)
    log.debug("run%s: %s", " (started before the rest of %s loaded)" % PROG if proc else "", " ".join(argv))
    errors = proc.errors if proc else scratch_file()
    try:
        if proc is None:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=errors, cwd="/")
            except OSError as error:
                return {wal_names[0]: (UNREACHABLE, "cannot run ssh: %s" % (error.strerror or error), 0, 0)}
        RUNNING.append(proc)
        try:
            # A 1 MiB pipe (F_SETPIPE_SZ): fewer, larger reads while ssh streams.
            fcntl.fcntl(proc.stdout.fileno(), 1031, CHUNK)
        except (OSError, IOError):
            pass
        if answers is not None and not answers():
            proc.kill()
            proc.wait()
            RUNNING.remove(proc)
            return {wal_names[0]: (UNREACHABLE, "probe %s" % source.probe, 0, 0)}
        stream = Stream(proc.stdout.fileno(), settings.stall_timeout,
                        settings.connect_timeout + settings.stall_timeout, deadline, renew)
        results = {}
        in_step = True               # what is left to read is still framed
        try:
            in_step = read_frames(source, stream, wal_names, deliver, results)
        except Stalled as stall:
            unanswered = [name for name in wal_names if name not in results]
            if unanswered:
                results[unanswered[0]] = (STALLED, str(stall), 0, 0)
            in_step = False
        if not in_step:
            proc.kill()              # we stopped reading: do not let it block on the pipe
        code = proc.wait()
        RUNNING.remove(proc)
        unanswered = [name for name in wal_names if name not in results]
        ended_cleanly = any(result[0] in (ABSENT, NO_MORE, NO_DIRECTORY) for result in results.values())
        if in_step and code != 0 and unanswered and not ended_cleanly:
            reason = last_line(errors) or "exit code %d" % code
            outcome = UNREACHABLE if code == 255 and not results else FAILED
            results[unanswered[0]] = (outcome, "ssh %s: %s" % (source.host, reason), 0, 0)
        return results
    finally:
        errors.close()


def read_frames(source, stream, wal_names, deliver, results):
    """Read the remote script's answer into results; False once out of step."""
    line = stream.readline()
    words = line.split()
    if len(words) != 2 or words[0] != b"DIRS" or not words[1].isdigit():
        if line:
            log.warning("[source %s] unexpected answer %r", source.name, line[:80])
            results[wal_names[0]] = (FAILED, "unexpected answer %r" % line[:40], 0, 0)
        return bool(not line)
    if int(words[1]) == 0:
        results[wal_names[0]] = (NO_DIRECTORY, "no directory matches %s on %s" % (source.path, source.host),
                                 0, 0)
        return True
    for wal_name in wal_names:
        if stream.renew:
            stream.deadline = time.time() + stream.renew
        line = stream.readline()
        if not line:
            return True              # ssh ended: its exit code tells why
        frame = parse_frame(line, wal_name)
        if frame is None:
            log.warning("[source %s] unexpected answer %r", source.name, line[:80])
            results[wal_name] = (FAILED, "unexpected answer %r" % line[:40], 0, 0)
            return False
        if frame[0] == "MISSING":
            results[wal_name] = (ABSENT, "", 0, 0)
            return True
        if frame[0] == "NOMORE":
            results[wal_name] = (NO_MORE, "", 0, frame[1])
            return True
        _file, suffix, size, index, count, path = frame
        outcome, detail, drained = deliver(wal_name, suffix, size, stream.timed_read(), path)
        results[wal_name] = (outcome, detail, index, count)
        if not drained or outcome == FAILED:
            return False
    return True


def fetch_files(source, settings, wal_names, deliver, deadline, candidate=1, renew=None, answers=None):
    """{name: (outcome, detail, index, count)} for the names source answered, in
    order, up to the first it lacks: copy number `candidate` of each. renew:
    seconds each file of a stream gets (the deadline then moves on per file).
    answers: a probe for fetch_remote to run while ssh starts."""
    if source.is_local:
        return fetch_local(source, wal_names, deliver, candidate)
    return fetch_remote(source, settings, wal_names, deliver, deadline, candidate, renew, answers)


def list_archive(source, settings):
    """(number of directories matching path, file names in them) of a source."""
    if source.is_local:
        import glob
        directories = [d for d in glob.glob(source.path) if os.path.isdir(d)]
        return len(directories), [name for d in directories for name in os.listdir(d)]
    need_subprocess()
    code, out, err = run(ssh_argv(source, settings, remote_command(source.path, LIST_REQUEST)),
                         timeout=settings.timeout, check=False)
    lines = out.splitlines()
    if code != 0 or not lines or not lines[-1].startswith("DIRS "):
        raise Failure((err.strip().splitlines() or ["exit code %d" % code])[-1], UNAVAILABLE)
    return int(lines[-1].split()[1]), lines[:-1]


def ask_access(source, settings):
    """What the source's key may do on its host: parse_probe() of the answer to a
    probe, or a Failure (exit 3) with the answer or ssh's last line."""
    need_subprocess()
    code, out, err = run(ssh_argv(source, settings, remote_command(source.path, PROBE_REQUEST)),
                         timeout=settings.timeout, check=False)
    answer = parse_probe(out)
    if code != 0 or answer is None:
        said = (err.strip().splitlines() or out.strip().splitlines() or ["exit code %d" % code])[-1]
        raise Failure(said[:200], UNAVAILABLE)
    return answer


# ---------------------------------------------------------------------------
# The spool and the prefetcher
# ---------------------------------------------------------------------------

def spool_file(settings, wal_name):
    return os.path.join(settings.spool_dir, wal_name)


def deliver_from_spool(settings, wal_name, dest, cluster):
    """True if a valid spooled copy of wal_name was moved to dest. Invalid copies are
    removed; a spool of an earlier boot is not read (spool_of_this_boot)."""
    if not spool_of_this_boot(settings.spool_dir):
        return False
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
            # Checked whole when it was spooled: only copied here.
            if store(wal_name, "", size, spooled.read, dest, False, cluster, lambda *_: None)[0] != FOUND:
                return False
        remove_quietly(path)
    log.debug("%s delivered from the spool", wal_name)
    return True


def start_prefetch(settings, wal_name, dest, cluster, waldump, verbose):
    """After delivering segment wal_name: ask for the next segments, starting a
    detached prefetcher unless one runs or the spool is well filled."""
    header, _size = read_header(dest)
    seg_size = LONG_HEADER.unpack_from(header)[6]
    if not os.path.isdir(settings.spool_dir):
        os.makedirs(settings.spool_dir, 0o700)      # the root too, when missing
        # Which data directory this spool serves: a later call removes the
        # spool once that directory is gone (a restored copy cleaned up).
        put_file(spool_file(settings, SPOOL_OWNER), (os.getcwd() + "\n").encode("utf-8", "surrogateescape"),
                 durable=True)
    note_config(settings)
    write_want(settings.spool_dir, wal_name, seg_size)
    if not needs_refill(settings, (wal_name, seg_size)):
        return
    lock_fd = os.open(spool_file(settings, SPOOL_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not try_lock(lock_fd):
            return                       # the running prefetcher reads the want file again
        need_subprocess()
        # The child inherits the locked file description: it holds the lock from its
        # first instruction, so the next call never starts a second one.
        # -S: no site-packages (this file needs only the standard library), and
        # none of their .pth files run at start-up.
        argv = [sys.executable, "-S", os.path.abspath(__file__), "-c", os.path.abspath(settings.config_path),
                "--prefetch", "--lock-fd", str(lock_fd), "--spool-dir", settings.spool_dir,
                "--system-identifier", str(cluster.system_identifier)]
        if cluster.pg_major:
            argv += ["--pg-major", cluster.pg_major]
        # Found only now: delivery from the spool must stay cheap.
        waldump = waldump or find_waldump(settings.bindir, cluster.pg_major)
        if waldump:
            argv += ["--waldump", waldump]
        if verbose:
            argv.append("--verbose")
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, cwd="/", close_fds=True, pass_fds=(lock_fd,),
                         start_new_session=True)
    finally:
        os.close(lock_fd)


def prefetch_window(settings, want, cluster, verify):
    """Fill the spool with the segments after want, each checked whole before it is
    spooled; remove everything else from it. A name that has only bad copies on a
    source is left for the delivery call, which tries every copy: the names of
    the window not spooled once every source was asked (or the pass stopped)
    are noted in SPOOL_MISSED, and a delivery call does not wait for those."""
    window = following_segments(want[0], want[1], settings.prefetch)
    remove, missing = spool_plan(set(os.listdir(settings.spool_dir)), window)
    for name in remove:
        remove_quietly(spool_file(settings, name))
    try:
        missing = ask_sources(settings, want, window, missing, cluster, verify)
    finally:
        write_note(settings.spool_dir, SPOOL_MISSED, " ".join(
            name for name in missing if not os.path.exists(spool_file(settings, name))) + "\n")


def ask_sources(settings, want, window, missing, cluster, verify):
    """prefetch_window's passes over the sources; the names of missing none delivered."""
    deadline = time.time() + settings.timeout
    order = source_order(settings.sources, down_since(settings), time.time())
    for index, source in enumerate(order):
        if not missing:
            break
        share = source_deadline(time.time(), deadline, len(order) - index)
        if not reachable(source, settings, share):
            log.info("[source %s] does not answer", source.name)
            continue
        # One session asks for the window and STREAM_AHEAD segments after it; each
        # is taken when it fits the window of the newest want (paced_delivery),
        # and checked while the next one arrives (BackgroundChecks).
        names = missing + following_segments(window[-1], want[1], STREAM_AHEAD)
        checks = BackgroundChecks()
        try:
            deliver = paced_delivery(settings, source, cluster, verify, checks.later)
            results = fetch_files(source, settings, names, deliver, share, renew=settings.timeout)
        finally:
            # The time limit pauses while the last segment is checked: a time-out
            # inside close() would leave the checks running beside the next ones.
            remaining = signal.setitimer(signal.ITIMER_REAL, 0)[0]
            checked = checks.close()
            if remaining > 0:
                signal.setitimer(signal.ITIMER_REAL, remaining)
        for name, outcome in checked.items():
            if name in results:
                results[name] = outcome + results[name][2:]
        remember(settings, source, any(result[0] in (STALLED, UNREACHABLE) for result in results.values()),
                 any(result[0] in ANSWERED for result in results.values()))
        log.info("[source %s] %s", source.name, " ".join(
            "%s:%s%s" % (name, results[name][0], " (%s)" % results[name][1] if results[name][1] else "")
            for name in names if name in results))
        missing = [name for name in missing if results.get(name, (None,))[0] != FOUND]
    return missing


class BackgroundChecks(object):
    """The prefetcher's second stage: a thread that checks a received segment whole
    (its pages, pg_waldump), fsyncs it where the boot is unknown
    (claim_spool_boot) and renames it into the spool while the
    main thread receives the next one. later() waits while one segment is
    still waiting to be checked, so at most two are staged at once; close()
    waits for the last and returns {name: (outcome, detail)} of those that
    were checked. A copy found invalid here is not spooled: the delivery call
    fetches that segment itself and tries every copy."""

    def __init__(self):
        import queue
        import threading
        self.waiting = queue.Queue(maxsize=1)
        self.checked = {}
        self.thread = threading.Thread(target=self._work, name="checks")
        self.thread.daemon = True
        self.thread.start()

    def later(self, wal_name, finish):
        self.waiting.put((wal_name, finish))

    def _work(self):
        while True:
            item = self.waiting.get()
            if item is None:
                return
            wal_name, finish = item
            try:
                outcome, detail, _drained = finish()
            except Exception as error:      # written, yet not spooled: said, never raised here
                outcome, detail = FAILED, "checking or spooling it: %s" % (getattr(error, "strerror", None) or error)
            if outcome != FOUND:
                log.warning("%s: the prefetched copy is not spooled: %s", wal_name, detail)
            self.checked[wal_name] = (outcome, detail)

    def close(self):
        self.waiting.put(None)
        self.thread.join()
        return self.checked


def paced_delivery(settings, source, cluster, verify, later):
    """deliver() for prefetch_window: spool a segment (checked whole, fsynced only
    where the boot is unknown: by later, see BackgroundChecks, and
    claim_spool_boot) once it fits the window after the newest want;
    until then hold the stream (the host waits, by ssh's flow control). FAILED,
    with the stream left, when recovery moved past it or elsewhere, or asked
    nothing new for PREFETCH_LINGER."""
    def deliver(wal_name, suffix, size, read, path):
        signal.setitimer(signal.ITIMER_REAL, 0)      # waiting for recovery is no time-out
        asked, since = None, time.time()
        while True:
            want = read_want(settings.spool_dir) or asked    # None: being written just now
            if want != asked:
                asked, since = want, time.time()
            if want is None:
                return FAILED, "no request", False
            window = following_segments(want[0], want[1], settings.prefetch)
            if wal_name in window:
                break
            if wal_name[:8] != want[0][:8] or wal_name < window[0]:
                return FAILED, "recovery moved on to %s" % want[0], False
            if time.time() - since > PREFETCH_LINGER:
                return FAILED, "no request for %s s" % PREFETCH_LINGER, False
            time.sleep(0.01)
        signal.setitimer(signal.ITIMER_REAL, settings.timeout)
        return report_copy(wal_name, source, path, store(
            wal_name, suffix, size, read, spool_file(settings, wal_name), settings.durable_spool, cluster,
            verify, later))
    return deliver


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def fetch_command(args, config):
    """Deliver args.wal_name at args.dest: from the spool, else from the first source
    that has a valid copy; every copy on every source is tried before giving up."""
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
    spool_root = args.spool_root = settings.spool_dir
    settings.spool_dir = spool_for(spool_root, os.getcwd())
    prefetching = kind == "segment" and settings.prefetch > 0
    if prefetching:
        waited = wait_for_prefetcher(settings.spool_dir, args.wal_name, settings.prefetch, deadline)
        if waited:
            log.debug("%s: %s", args.wal_name, waited)
        if deliver_from_spool(settings, args.wal_name, args.dest, cluster):
            after_delivery(settings, args, cluster, None)
            return DELIVERED
    if kind == "segment" and before_its_timeline(args.wal_name, timeline_begins(history_here(args.wal_name))):
        log.debug("%s lies before its timeline began: absent", args.wal_name)
        args.source_outcomes = [ABSENT]
        return NOT_FOUND
    settings.control_dir = prepare_control_dir(settings.control_dir)
    waldump = find_waldump(settings.bindir, cluster.pg_major) if kind == "segment" else None
    verify = make_verifier(cluster, waldump, settings.timeout)
    results = []
    if kind == "segment" and not prefetching:
        note_early_fetch(settings, spool_root)
    order = source_order(settings.sources, down_since(settings), time.time())
    for index, source in enumerate(order):
        share = source_deadline(time.time(), deadline, len(order) - index)
        outcome, detail = fetch_from(source, settings, args, cluster, share, verify)
        results.append((source.name, outcome, detail))
        if outcome == FOUND:
            log.debug("%s delivered from [source %s]", args.wal_name, source.name)
            break
    if all_probes_failed(results) and deadline - time.time() > 1:
        # Not one host answered its probe within a second. A host so loaded that
        # its sshd is slow to speak is not down, and the answer "none answers"
        # stops a restore: once more, each given connect_timeout to speak.
        log.warning("no source answered its probe in time: probing each once more, %d s each",
                    settings.connect_timeout)
        results = []
        for index, source in enumerate(order):
            share = source_deadline(time.time(), deadline, len(order) - index)
            outcome, detail = fetch_from(source, settings, args, cluster, share, verify, settings.connect_timeout)
            results.append((source.name, outcome, detail))
            if outcome == FOUND:
                break
    args.source_outcomes = [outcome for _name, outcome, _detail in results]
    code = exit_code_for(args.source_outcomes, args.stop_on_doubt)
    if code == DELIVERED:
        if prefetching:
            after_delivery(settings, args, cluster, waldump)
    elif code == NOT_FOUND:
        log.info("%s not found on any source", args.wal_name)
    elif code == STOP_RECOVERY:
        log.error("%s %s: %s", STOP_MARK, args.wal_name, doubt_summary(results))
    else:
        log.error("%s not delivered, and not every source said it is absent: %s",
                  args.wal_name, doubt_summary(results))
    remove_orphan_spools(spool_root, settings.spool_dir)
    return code


def all_probes_failed(results):
    """True when every source was asked and each failed its probe (fetch_from's
    (UNREACHABLE, "probe ...")), so none was even asked for the file."""
    return bool(results) and all(outcome == UNREACHABLE and detail.startswith("probe ")
                                 for _name, outcome, detail in results)


def report_copy(wal_name, source, path, stored):
    """Log a rejected copy once, with where it is and why; pass store()'s result on."""
    outcome, detail, _drained = stored
    if outcome == INVALID:
        log.warning("%s: [source %s] %s is not valid: %s; trying the next copy",
                    wal_name, source.name, path, detail)
    elif outcome == FAILED:
        log.warning("%s: [source %s] %s: %s", wal_name, source.name, path, detail)
    return stored


def fetch_from(source, settings, args, cluster, deadline, verify, patience=1.0):
    """(outcome, detail) of asking one source for args.wal_name: every copy it holds,
    in order, until one is valid. A source that stalls or does not answer is
    remembered as down; one that answers is forgotten as down. patience: the
    probe's (probe), run while the first ssh starts (fetch_remote)."""
    def answers():
        return reachable(source, settings, deadline, patience)

    def deliver(wal_name, suffix, size, read, path):
        return report_copy(wal_name, source, path, store(
            wal_name, suffix, size, read, args.dest, False, cluster, verify))
    rejected = []
    candidate = 1
    while True:
        results = fetch_files(source, settings, [args.wal_name], deliver, deadline, candidate,
                              answers=answers if candidate == 1 else None)
        outcome, detail, index, count = results.get(args.wal_name, (FAILED, "no answer", 0, 0))
        if outcome == UNREACHABLE and detail.startswith("probe "):
            log.warning("[source %s] %s does not answer (probe = %s)", source.name, source.host, source.probe)
            return outcome, detail
        if outcome == INVALID:
            rejected.append(detail)
            if index < count:
                candidate = index + 1
                continue
        remember(settings, source, outcome in (STALLED, UNREACHABLE), outcome in ANSWERED)
        if outcome in (STALLED, UNREACHABLE, FAILED, NO_DIRECTORY):
            log.warning("[source %s] %s: %s%s", source.name, args.wal_name, outcome,
                        ": " + detail if detail else "")
            return outcome, detail
        if outcome in (INVALID, NO_MORE) or (outcome == ABSENT and rejected):
            return INVALID, "%d cop%s, none valid; the last: %s" % (
                len(rejected), "y" if len(rejected) == 1 else "ies", rejected[-1] if rejected else "?")
        return outcome, detail


def note_config(settings):
    """Tell quick_delivery, in the spool, that this config file is valid as it is now,
    and the settings it needs (see quick_delivery for the lines)."""
    note = "\n".join([config_identity(settings.config_path), settings.spool_root, str(settings.prefetch),
                      str(settings.timeout), settings.pgdata,
                      "" if settings.system_identifier is None else str(settings.system_identifier)]) + "\n"
    path = spool_file(settings, CONFIG_NOTE)
    try:
        with open(path) as current:
            if current.read() == note:
                return
    except (IOError, OSError):
        pass
    put_file(path, note.encode("utf-8", "surrogateescape"))


def note_early_fetch(settings, spool_root):
    """Leave the next call without prefetch the ssh command it will run first
    (start_early_fetch), in the private spool_root/.code: the first source's, for
    copy 1 of EARLY_PLACEHOLDER. Written only when it changed; quietly nothing
    for a local first source, or without a private control dir for its memo.
    Only a hint: never fails a fetch (a bad ssh_options of a source asked last
    fails only if it is asked)."""
    source = settings.sources[0] if settings.sources else None
    memo = memo_file(settings, source, "down") if source and not source.is_local else None
    if not memo or not spool_root or not os.path.isabs(memo):
        return
    try:
        argv = ssh_argv(source, settings, remote_command(source.path, fetch_request([EARLY_PLACEHOLDER])))
        note = "\0".join([config_identity(settings.config_path), memo] + argv)
    except (Failure, OSError):
        return
    code_dir = os.path.join(spool_root, CODE_DIR)
    try:
        with open(os.path.join(code_dir, EARLY_NOTE), "rb") as current:
            if current.read().decode("utf-8", "surrogateescape") == note:
                return
    except (IOError, OSError):
        pass
    keep_code(code_dir, EARLY_NOTE, note.encode("utf-8", "surrogateescape"))


def refill_after_quick_delivery(config_path, spool, wal_name, dest):
    """quick_delivery delivered wal_name, and the spool needs a prefetcher: start it.
    Its failure never fails the delivery that already happened."""
    setup_logging()
    try:
        settings = Settings(Config.load(config_path))
        settings.spool_dir = spool
        start_prefetch(settings, wal_name, dest, read_cluster(settings), None, False)
    except (Failure, OSError, IOError) as error:
        log.warning("prefetch not started: %s", error)
    except Exception as error:      # a bug: said, but the segment is delivered
        log.warning("prefetch not started: %s", unexpected_failure(error))
    finally:
        stop_children()
    return DELIVERED


def after_delivery(settings, args, cluster, waldump):
    """Start the prefetch; its failure never fails the delivery that already happened
    (not even [archive] timeout expiring now: exit 3 would leave a file at DEST)."""
    try:
        start_prefetch(settings, args.wal_name, args.dest, cluster, waldump, args.verbose)
    except (Failure, OSError, IOError) as error:
        log.warning("prefetch not started: %s", error)
    except TimedOut:
        log.warning("prefetch not started: [archive] timeout expired")


def spool_owner(spool):
    """The data directory a spool serves (its SPOOL_OWNER file), or None."""
    try:
        with open(os.path.join(spool, SPOOL_OWNER), "rb") as owner_file:
            return owner_file.read().decode("utf-8", "surrogateescape").strip() or None
    except (IOError, OSError):
        return None


def remove_orphan_spools(spool_root, own):
    """Remove the spools of data directories that are gone (restored copies cleaned
    up) and those an older version named (without SPOOL_SUFFIX: this version
    never reads them), never one a prefetcher holds. Each names its data
    directory in SPOOL_OWNER; a spool without that file is left alone."""
    try:
        entries = os.listdir(spool_root)
    except OSError:
        return
    for entry in entries:
        spool = os.path.join(spool_root, entry)
        if spool == own:
            continue
        owner = spool_owner(spool)
        if not owner or (entry.endswith(SPOOL_SUFFIX) and os.path.exists(os.path.join(owner, "PG_VERSION"))):
            continue
        try:
            lock_fd = os.open(os.path.join(spool, SPOOL_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue
        try:
            if try_lock(lock_fd):
                import shutil           # here: every fetch calls this, and shutil costs 6 ms
                shutil.rmtree(spool, ignore_errors=True)
                log.info("removed the spool of %s (%s)", owner, "an older version's"
                         if not entry.endswith(SPOOL_SUFFIX) else "no longer a data directory")
        finally:
            os.close(lock_fd)


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
    verify = make_verifier(cluster, args.waldump, settings.timeout)
    settings.control_dir = prepare_control_dir(settings.control_dir)
    lock_fd = args.lock_fd
    if lock_fd is None:                 # started by hand
        lock_fd = os.open(spool_file(settings, SPOOL_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        if not try_lock(lock_fd):
            return DELIVERED
    settings.durable_spool = not claim_spool_boot(settings.spool_dir)
    served = None
    idle_until = 0       # the first want is served at once: the delivery saw the need
    while True:
        want = read_want(settings.spool_dir)
        # Once running, refill as soon as recovery takes a segment: one more ssh
        # session over the shared connection costs little; a wait costs more.
        if want is not None and want != served and (served is None or needs_refill(settings, want, 1)):
            served = want
            signal.setitimer(signal.ITIMER_REAL, settings.timeout)
            try:
                prefetch_window(settings, want, cluster, verify)
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
        want = read_want(settings.spool_dir)
        if want in (None, served) or not needs_refill(settings, want) or not try_lock(lock_fd):
            return DELIVERED
        idle_until = time.time() + PREFETCH_LINGER


def claim_spool_boot(spool):
    """Make the spool this boot's (the prefetcher, holding its lock, before it spools):
    a spool of an earlier boot, or of none, loses its segments first, then
    SPOOL_BOOT names this boot, fsynced. True when the boot is known: the
    segments spooled now need no fsync, since only this boot reads them, from
    the page cache. Measured (issue 17): the fsync of each segment took 36 ms of
    the prefetcher's second thread and made prefetch 8 about 10% slower."""
    boot = this_boot()
    if not spool_of_this_boot(spool):
        for name in os.listdir(spool):
            if wal_kind(name) is not None:
                remove_quietly(os.path.join(spool, name))
        # Fsynced with its directory: that makes the removals durable too.
        put_file(os.path.join(spool, SPOOL_BOOT), (boot + "\n").encode("ascii"), durable=True)
        log.info("the spool is this boot's now (%s)", boot)
    return boot != "unknown"


def needs_refill(settings, want, missing=None):
    """True if half the window after want or less is spooled (or at least missing segments lack)."""
    spooled = spooled_in_window(settings.spool_dir, want, settings.prefetch)
    if missing is not None:
        return settings.prefetch - spooled >= missing
    return should_start_prefetch(spooled, settings.prefetch)


def check_command(settings, as_json=False):
    """--check: print each source's state, how segments are checked, and the spool's
    use (--json: one object, {"ok", "sources": [...], "segments", "spool"}, each
    source with its state: working, unreachable, key_probe_failed, listing_failed
    or no_directory, and the WAL segments it holds, for pg_zfs_snap.py check's
    continuity); 0 if at least one source works."""
    # The ssh master this may start lingers (ControlPersist): never in a directory
    # someone may want to unmount, such as a data directory on a dataset.
    os.chdir("/")
    settings.control_dir = prepare_control_dir(settings.control_dir)
    found = []
    for source in settings.sources:
        record = check_source(source, settings)
        found.append(record)
        lines = record.pop("lines")
        if not as_json:
            print("\n".join(lines), flush=True)      # a slow source: the ones before it are out
    working = len([record for record in found if record["state"] == "working"])
    segments, spool = verifier_line(settings), spool_line(settings.spool_dir)
    if as_json:
        import json
        print(json.dumps({"ok": working > 0, "sources": found, "segments": segments, "spool": spool},
                         sort_keys=True))
    else:
        print("%s\n%s" % (segments, spool))
    return DELIVERED if working else UNAVAILABLE


def check_source(source, settings):
    """--check of one source: {name, where, state, ...facts, warnings, lines} (lines:
    what the text output says of it)."""
    started = time.time()
    where = "local" if source.is_local else "%s:%d" % (source.host, source.port)
    record = {"name": source.name, "where": where, "state": "unreachable", "warnings": [], "lines": []}
    if not probe(source, started + settings.timeout):
        record["lines"].append("%s (%s): unreachable (probe = %s)" % (source.name, where, source.probe))
        return record
    access = None
    if not source.is_local:
        try:
            access = ask_access(source, settings)
        except Failure as failure:
            record.update(state="key_probe_failed", error=str(failure))
            record["lines"].append("%s (%s): reachable, but the probe of what its key may do failed: %s"
                                   % (source.name, where, failure))
            return record
    # A restricted key is served the host's glob (authorized_keys), not path.
    served = access["glob"] if access and access["mode"] == "restricted" else source.path
    record.update(served=served, key=access)
    try:
        directories, names = list_archive(source, settings)
    except Failure as failure:
        record.update(state="listing_failed", error=str(failure))
        record["lines"].append("%s (%s): reachable, listing %s failed: %s" % (source.name, where, served, failure))
        return record
    round_trip = (time.time() - started) * 1000
    record.update(state="working" if directories else "no_directory", directories=directories,
                  newest_wal=newest_wal(names), round_trip_ms=round(round_trip, 1),
                  segments=sorted(set(n for n in (strip_compression(name) for name in names)
                                      if wal_kind(n) == "segment")))
    record["lines"].append("%s (%s): reachable, %s %s, newest WAL file %s, round trip %.0f ms" % (
        source.name, where, served,
        "matches %d director%s" % (directories, "y" if directories == 1 else "ies")
        if directories else "matches NO directory",
        newest_wal(names) or "none", round_trip))
    if not directories:
        record["lines"].append(
            "WARNING: [source %s] %s matches no directory%s (archive disk not mounted?): a "
            "point-in-time restore stops when it needs a file this source may hold"
            % (source.name, served, "" if source.is_local else " on " + source.host))
    for line in access_lines(source, access):
        record["lines"].append(line)
    record["warnings"] = [line[len("WARNING: "):] for line in record["lines"] if line.startswith("WARNING: ")]
    return record


def access_lines(source, access):
    """What --check says of a source's key, from its probe's answer (None: local)."""
    if access is None:
        return []
    if access["mode"] == "unrestricted":
        return ["WARNING: [source %s] key unrestricted: it runs any command on %s as %s; install it "
                "restricted to %s (pg_wal_fetch.py --authorized-keys)" % (source.name, source.host,
                                                                          access["user"], SERVER)]
    lines = ["%s: key restricted: %s %s on %s answers as %s, serving %s; the host sees this guest as %s"
             % (source.name, SERVER, access["version"], source.host, access["user"], access["glob"],
                access["client"])]
    if access["user"] == "root":
        lines.append("WARNING: [source %s] %s runs as root on %s: install the key for the archive's "
                     "owner (postgres) instead" % (source.name, SERVER, source.host))
    if access["glob"] != source.path:
        lines.append("WARNING: [source %s] %s serves %s, but path = %s: make them the same "
                     "(messages name path)" % (source.name, source.host, access["glob"], source.path))
    return lines


def verifier_line(settings):
    """How fetched segments are checked, for --check."""
    try:
        pg_major = read_cluster(settings).pg_major
    except Failure:
        pg_major = None
    waldump = find_waldump(settings.bindir, pg_major)
    if waldump:
        return "segments: every page checked here, every record by %s" % waldump
    return ("WARNING: segments: no pg_waldump of PostgreSQL %s found: records are checked in Python "
            "(seconds per segment); set [postgres] bindir" % (pg_major or "(version unknown)"))


def spool_line(spool_root):
    """The spool's use, for --check: each data directory's spool and its size."""
    try:
        entries = sorted(entry for entry in os.listdir(spool_root) if not entry.startswith("."))
    except OSError:
        return "spool %s: empty" % spool_root
    parts, total = [], 0
    for entry in entries:
        spool = os.path.join(spool_root, entry)
        size = 0
        for name in list_or_empty(spool):
            try:
                size += os.lstat(os.path.join(spool, name)).st_size
            except OSError:
                pass
        total += size
        owner = spool_owner(spool) or "?"
        gone = owner != "?" and not os.path.exists(os.path.join(owner, "PG_VERSION"))
        parts.append("%s (%s%s) %.1f MiB" % (entry, owner, ", gone: removed by the next fetch" if gone else "",
                                              size / 1048576.0))
    return "spool %s: %d spool%s, %.1f MiB%s" % (spool_root, len(parts), "" if len(parts) == 1 else "s",
                                                 total / 1048576.0, ": " + "; ".join(parts) if parts else "")


def list_or_empty(directory):
    try:
        return os.listdir(directory)
    except OSError:
        return []


def install_server_command(directory):
    """--install-server DIR: DIR/pg_wal_serve, mode 0755, written atomically (temp
    file, fsync, rename); left alone when it is this version already."""
    import stat
    target = os.path.join(directory, SERVER)
    text = serve_script().encode("ascii")
    if not os.path.isdir(directory):
        raise Failure("--install-server %s: not a directory" % directory, USAGE)
    try:
        with open(target, "rb") as current:
            same = current.read() == text and stat.S_IMODE(os.fstat(current.fileno()).st_mode) == 0o755
    except (IOError, OSError):
        same = False
    if same:
        print("%s is up to date (%s %s)" % (target, SERVER, VERSION))
    else:
        staged = StagedFile(directory, durable=True)
        try:
            staged.write(text)
            staged.file.flush()
            os.fchmod(staged.file.fileno(), 0o755)
            staged.commit(target)
        finally:
            staged.discard()
        print("installed %s (%s %s)" % (target, SERVER, VERSION))
    for path in (directory, target):
        info = os.stat(path)
        if info.st_mode & 0o022 or info.st_uid not in (0, os.getuid()):
            log.warning("%s can be changed by other users: whoever can change it decides what "
                        "the guest's key runs", path)
    return DELIVERED


def public_key_of(source):
    """(path, text) of the public key ssh offers for source: identity_file + .pub,
    else the first of ssh's default keys of this user."""
    if source.identity_file:
        candidates = [source.identity_file + ".pub"]
    else:
        home = os.path.expanduser("~")
        candidates = [os.path.join(home, ".ssh", name + ".pub") for name in
                      ("id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk", "id_dsa")]
    for path in candidates:
        try:
            with open(path) as key_file:
                return path, key_file.read().strip()
        except (IOError, OSError):
            continue
    raise Failure("[source %s]: no public key (%s): create the key first (setup_guest.py --install)"
                  % (source.name, " or ".join(candidates)), UNAVAILABLE)


def authorized_keys_command(settings, server_path, config=None):
    """--authorized-keys: for each ssh source, the authorized_keys line that lets
    this guest's key run pg_wal_serve on the host and nothing else; and where
    the source has a cleanup_identity, the line of that key (pg_zfs_snap.py
    oldest-wal --apply) for pg_wal_serve --cleanup."""
    import pwd
    me = pwd.getpwuid(os.getuid()).pw_name
    for source in settings.sources:
        if source.is_local:
            continue
        key_path, public_key = public_key_of(source)
        user = source.user or me
        from_patterns = (source.from_patterns or bind_address(source.ssh_options)
                         or address_toward(source.host, source.port))
        if not from_patterns:
            raise Failure("[source %s]: cannot tell the address %s sees this guest come from: set from"
                          % (source.name, source.host), UNAVAILABLE)
        print("# [source %s] on %s, as root: %s installed (pg_wal_fetch.py --serve-script), then this "
              "line appended to ~%s/.ssh/authorized_keys (key %s; from = %s: the address the host must "
              "see this guest come from)" % (source.name, source.host, server_path, user, key_path, from_patterns))
        print(authorized_keys_line(public_key, from_patterns, source.path, server_path))
        section = "source " + source.name
        cleanup_identity = config.str(section, "cleanup_identity", "") if config is not None else ""
        if cleanup_identity:
            cleanup_key = Source(source.name, source.host, source.port, source.user, source.path, source.probe,
                                 cleanup_identity, source.ssh_options)
            key_path, public_key = public_key_of(cleanup_key)
            print("# [source %s] on %s: the cleanup key (pg_zfs_snap.py oldest-wal --apply, as root), this "
                  "line appended to ~%s/.ssh/authorized_keys too (key %s): it removes archived WAL and "
                  "reads nothing" % (source.name, source.host, user, key_path))
            print(authorized_keys_line(public_key, from_patterns, source.path, server_path, cleanup=True))
        if user == "root":
            log.warning("[source %s] user = root: install the key for the archive's owner (postgres) "
                        "and set user = postgres", source.name)
    return DELIVERED


# ---------------------------------------------------------------------------
# Arguments and main
# ---------------------------------------------------------------------------

class Arguments(object):
    """What PostgreSQL passes: [-c CONFIG] WALNAME DEST (parsed without argparse)."""

    def __init__(self, config, wal_name, dest):
        self.config, self.wal_name, self.dest = config, wal_name, dest
        self.verbose = self.check = self.prefetch = False
        self.serve_script = self.authorized_keys = False
        self.waldump = self.install_server = None


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
    parser.add_argument("--json", action="store_true", help="--check: one JSON object instead of lines")
    parser.add_argument("--serve-script", action="store_true",
                        help="print pg_wal_serve, the sh program an archive host runs as the forced "
                             "command of the guest's key")
    parser.add_argument("--install-server", metavar="DIR",
                        help="write DIR/pg_wal_serve (0755, atomically; unchanged if current)")
    parser.add_argument("--authorized-keys", action="store_true",
                        help="print, for each ssh source, the authorized_keys line restricting "
                             "this guest's key to pg_wal_serve (and its cleanup_identity's to "
                             "pg_wal_serve --cleanup)")
    parser.add_argument("--server", default=SERVER_PATH, metavar="PATH",
                        help="where pg_wal_serve is on the hosts, for --authorized-keys (default %(default)s)")
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
    parser.add_argument("--waldump", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.check or args.prefetch or args.serve_script or args.install_server or args.authorized_keys) \
            and (args.wal_name is None or args.dest is None):
        parser.error("WALNAME and DEST are required (restore_command = '%s %%f %%p')" % sys.argv[0])
    return args


def history_here(wal_name):
    """The .history file of wal_name's timeline in this data directory's pg_wal
    (pg_xlog on 9.6), where PostgreSQL keeps those it restored; "" if none."""
    for wal_dir in ("pg_wal", "pg_xlog"):
        try:
            with open(os.path.join(wal_dir, wal_name[:8] + ".history"), "rb") as history:
                return history.read(MAX_TEXT_FILE).decode("ascii", "replace")
        except (IOError, OSError):
            continue
    return ""


def recovery_mode_here():
    """recovery_mode() of the working directory: PostgreSQL runs restore_command
    in its data directory."""
    files = [name for name in ("standby.signal", "recovery.signal") if os.path.exists(name)]
    try:
        with open("recovery.conf", "rb") as conf:
            text = conf.read().decode("utf-8", "replace")
    except (IOError, OSError):
        text = None
    return recovery_mode(files, text)


def stop_or(args, code, reason):
    """code, or STOP_RECOVERY with the one line that says why, when doubt must stop
    an archive recovery (every error is doubt: exit 2 or 3 would read as "absent")."""
    if not getattr(args, "stop_on_doubt", False):
        log.error("%s", reason)
        return code
    log.error("%s %s: %s", STOP_MARK, args.wal_name, reason)
    return STOP_RECOVERY


def full_main(argv=None, call=None):
    """Run what argv asks. call (a dict), when given, receives for a restore_command
    call (WALNAME DEST) the "outcome" main counts it as (fetch_outcome) and the
    "spool_root" of its config (None if the config was not read)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = quick_args(argv) or parse_args(argv)
    except SystemExit as done:      # argparse: --help, --version, or a usage error (2)
        return done.code if isinstance(done.code, int) and 0 <= done.code <= 2 else USAGE
    setup_logging(args.verbose)
    args.stop_on_doubt = False
    args.source_outcomes, args.spool_root = [], None
    code = run_command(args)
    if call is not None and restore_call(args):
        call.update(outcome=fetch_outcome(code, args.source_outcomes), spool_root=args.spool_root)
        # Only the counting is left: a signal now ends the call at once, by that signal.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
    return code


def restore_call(args):
    """True for a restore_command call (WALNAME DEST), False for the other commands."""
    return not (args.check or args.prefetch or args.serve_script or args.install_server
                or args.authorized_keys)


def run_command(args):
    """The command args asks for, in its order; its exit code."""
    try:
        # The archive host's side needs no config (the host may have none).
        if args.serve_script:
            sys.stdout.write(serve_script())
            return DELIVERED
        if args.install_server:
            return install_server_command(args.install_server)
        if restore_call(args):
            kind = wal_kind(args.wal_name)
            if kind is None:
                # Before anything else, the config included.
                raise Failure("refusing %r: not a WAL segment, .partial, .history or .backup name"
                              % args.wal_name, USAGE)
            # A segment in archive recovery: "not found" would end the recovery
            # and open the database, so only a clean "absent" may say it.
            args.stop_on_doubt = kind == "segment" and recovery_mode_here() == "archive"
        config = Config.load(config_path(args.config))
        if args.prefetch:
            return prefetch_command(args, config)
        if args.check:
            return check_command(Settings(config), args.json)
        if args.authorized_keys:
            return authorized_keys_command(Settings(config), args.server, config)
        return fetch_command(args, config)
    except Failure as failure:
        return stop_or(args, failure.code if 0 < failure.code <= 3 else UNAVAILABLE, failure)
    except TimedOut:
        return stop_or(args, UNAVAILABLE, "%s: gave up after [archive] timeout"
                       % (getattr(args, "wal_name", "") or "check"))
    except Interrupted as stop:
        signal.setitimer(signal.ITIMER_REAL, 0)
        stop_children()
        log.warning("stopped by signal %d; nothing delivered", stop.signum)
        return end_by_signal(stop.signum)
    except Exception as error:      # a bug: report it; in archive recovery it stops the recovery
        return stop_or(args, UNAVAILABLE, unexpected_failure(error))
    finally:
        if not _stopping:
            signal.setitimer(signal.ITIMER_REAL, 0)
        stop_children()
'''


if __name__ == "__main__":
    load_part("QUICK", quick_spool_root(sys.argv[1:]))
    exit_code = globals()["main"]()       # in QUICK
    exit_at_once(exit_code)
    sys.exit(exit_code)
else:
    load_part("QUICK")      # imported (the unit tests): every function of the file, as before
    load_part("REST")
