"""pg_zfs_restore.py run as a process, as root, against the real testbed: a
zfs-fuse pool under a streaming standby, sets taken by pg_zfs_snap.py, WAL
fetched by pg_wal_fetch.py over ssh from the two archive hosts.

The story the module sets up once: on the primary a loop inserts rows stamped
with clock_timestamp(); set A is taken on the standby; later we note a time
T, the primary's LSN at T, and create a restore point; then set B is taken;
the loop stops and the WAL is archived. Every restore is checked against the
primary's rows.
"""

import contextlib
import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import time

import pytest

from testbed import ARCHIVE_TIMEOUT, PG_USER, PY36, lsn, run_script, sh, wait_for

SCRIPT = "pg_zfs_restore"
# One statement (psql -c sends one query string; COMMIT inside DO needs that).
LOOP_SQL = """
DO $$
BEGIN
  FOR i IN 1..100000 LOOP
    INSERT INTO pitr (at) VALUES (clock_timestamp());
    COMMIT;
    PERFORM pg_sleep(0.02);
    EXIT WHEN EXISTS (SELECT 1 FROM pitr_stop);
  END LOOP;
END $$;
"""


def parse_iso(text):
    """An aware datetime of a UTC ISO 8601 time as the scripts write it (fraction optional)."""
    return datetime.datetime.strptime(text if "." in text else text.replace("Z", ".0Z"),
                                      "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc)


def parse_pg_time(text):
    """A timestamptz as psql prints it in UTC ('2026-11-25 04:30:00.123+00')."""
    text = text.strip()
    match = re.match(r"^(.*?)([+-]\d\d)$", text)
    base = datetime.datetime.strptime(match.group(1).split(".")[0], "%Y-%m-%d %H:%M:%S")
    fraction = match.group(1).split(".")[1] if "." in match.group(1) else "0"
    base = base.replace(microsecond=int(fraction.ljust(6, "0")[:6]))
    return base.replace(tzinfo=datetime.timezone(datetime.timedelta(hours=int(match.group(2)))))


class Story(object):
    """What the module fixture built: config, sets, T, LSN, restore point, the rows."""


def snap(tb, config):
    proc = sh([PY36,
               os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bin",
                            "pg_zfs_snap.py"), "-c", config, "snapshot", "--no-prune"],
              check=False, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc


def set_names(tb):
    names = []
    for name in tb.zfs.snapshots():
        short = name.split("@", 1)[1]
        if short.startswith("pgzfs_") and short not in names:
            names.append(short)
    return names


def restore_script(config, *args, timeout=300):
    from testbed import run_script
    return run_script(SCRIPT, *args, config=config, timeout=timeout)


def work_dirs(wal_root):
    """What restores and drills left in wal_root: not the last drill's result
    (last-drill.json, kept for metrics on purpose)."""
    return [path for path in glob.glob(os.path.join(wal_root, "*")) if os.path.basename(path) != "last-drill.json"]


@pytest.fixture(scope="module")
def story(tb):
    tb.standby
    s = Story()
    s.tb = tb
    s.config = tb.write_config(os.path.join(tb.run_dir, "restore.conf"), {"restore": {
        "mount_root": os.path.join(tb.run_dir, "restore_mnt"),
        "wal_root": os.path.join(tb.run_dir, "restore_wal"),
        "timeout": "240"}})
    s.sets_before = set(set_names(tb))
    s.leftovers = lambda: our_clones(tb) + work_dirs(os.path.join(tb.run_dir, "restore_wal"))
    # a name of its own: another module's story made its pitr_point earlier on the same
    # primary, and PostgreSQL stops at the first restore point of a name after the set
    pitr_story(tb, s, lambda: snap(tb, s.config), "pitr_point_%d" % int(time.time() * 1000))
    s.sets = [name for name in set_names(tb) if name not in s.sets_before]
    assert len(s.sets) == 2
    return s


def pitr_story(tb, s, take_set, point_name):
    """On tb.primary, while a loop inserts rows: set A (take_set()); T, the LSN at T,
    a restore point point_name; set B; then the WAL is archived. Fills in s."""
    s.point_name = point_name
    primary = tb.primary
    primary.psql("DROP TABLE IF EXISTS pitr; DROP TABLE IF EXISTS pitr_stop; "
                 "CREATE TABLE pitr_stop (x int); "
                 "CREATE TABLE pitr (id serial PRIMARY KEY, at timestamptz NOT NULL)")
    loop = subprocess.Popen(
        ["runuser", "-u", PG_USER, "--", os.path.join(tb.pg_bindir, "psql"), "-X", "-q",
         "-h", primary.socket_dir, "-p", str(primary.port), "-d", "postgres", "-c", LOOP_SQL],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        wait_for(lambda: loop.poll() is not None or int(primary.psql("SELECT count(*) FROM pitr")) > 20,
                 30, "the insert loop")
        assert loop.poll() is None, loop.communicate()
        take_set()
        time.sleep(2.5)
        # T, the LSN at T and the newest row committed by then, in ONE statement on
        # the primary's clock: no Python clock, no psql latency, no slack.
        s.target_time, s.target_lsn, s.target_committed = moment_of(
            primary, "SELECT clock_timestamp(), pg_current_wal_lsn(), coalesce(max(id), 0) FROM pitr")
        time.sleep(1.5)
        s.point_time, _lsn, s.point_committed = moment_of(
            primary, "SELECT clock_timestamp(), pg_create_restore_point('%s'), coalesce(max(id), 0) FROM pitr"
            % point_name)
        time.sleep(1.5)
        take_set()
        time.sleep(1.0)
    finally:
        primary.psql("INSERT INTO pitr_stop VALUES (1)")
        out, err = loop.communicate(timeout=60)
    assert loop.returncode == 0, err
    tb.switch_wal()
    s.rows = rows_of(primary)


def moment_of(primary, sql):
    """(time, text, int) of one row: a timestamptz, any value, a row id."""
    at, value, ident = primary.psql("SET TimeZone = 'UTC'; " + sql).splitlines()[-1].split("|")
    return parse_pg_time(at), value, int(ident)


def first_record_at_or_after(tb, location):
    """Where the first WAL record at or after location starts, read by pg_waldump
    from the first host's archive (timeline 1)."""
    out = sh([os.path.join(tb.pg_bindir, "pg_waldump"), "-p", tb.hosts[0].wal_dir,
              "-s", location, "-n", "1"]).stdout
    return re.search(r"lsn: ([0-9A-F]+/[0-9A-F]+)", out).group(1)


def stopped_after(out):
    """The LSN of PostgreSQL's "recovery stopping after WAL location" line in out."""
    stop = re.search(r'recovery stopping after WAL location \(LSN\) "([0-9A-F]+/[0-9A-F]+)"', out)
    assert stop, out
    return lsn(stop.group(1))


def rows_of(cluster_or_args):
    if isinstance(cluster_or_args, tuple):
        socket_dir, port, bindir = cluster_or_args
        out = sh([os.path.join(bindir, "psql"), "-X", "-q", "-A", "-t", "-h", socket_dir, "-p", str(port),
                  "-d", "postgres", "-c", "SET TimeZone = 'UTC'; SELECT id, at FROM pitr ORDER BY id"],
                 user=PG_USER).stdout
    else:
        out = cluster_or_args.psql("SET TimeZone = 'UTC'; SELECT id, at FROM pitr ORDER BY id")
    rows = []
    for line in out.splitlines():
        if "|" in line:
            ident, at = line.split("|")
            rows.append((int(ident), parse_pg_time(at)))
    return rows


def props_of(tb, snapshot):
    out = tb.zfs.run("get", "-H", "-o", "property,value", "all", snapshot)
    return dict(line.split("\t", 1) for line in out.splitlines() if line.startswith("pgzfs:"))


def our_clones(tb):
    out = tb.zfs.run("list", "-H", "-t", "filesystem", "-o", "name,pgzfs:clone_of", "-r", tb.zfs.name)
    return [line.split("\t")[0] for line in out.splitlines() if not line.endswith("\t-")]


class Restored(object):
    def __init__(self, proc, tb):
        self.proc = proc
        self.out = proc.stdout
        match = re.search(r"connect: psql -h (\S+) -p (\d+)", proc.stdout)
        self.socket_dir, self.port = (match.group(1), int(match.group(2))) if match else (None, None)
        match = re.search(r"data directory (\S+),", proc.stdout)
        self.pgdata = match.group(1) if match else None
        self.bindir = tb.pg_bindir

    def psql(self, sql):
        return sh([os.path.join(self.bindir, "psql"), "-X", "-q", "-A", "-t", "-h", self.socket_dir,
                   "-p", str(self.port), "-d", "postgres", "-c", sql], user=PG_USER).stdout.strip()

    def rows(self):
        return rows_of((self.socket_dir, self.port, self.bindir))


@contextlib.contextmanager
def restored(story, *args):
    """Run restore ARGS; yield a Restored; always clean up and check nothing is left
    (story.leftovers(): clones, markers, work directories)."""
    proc = restore_script(story.config, "restore", *args)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield Restored(proc, story.tb)
    finally:
        cleanup = restore_script(story.config, "cleanup", "--all")
        assert cleanup.returncode == 0, cleanup.stderr
        assert story.leftovers() == []


def assert_rows_up_to(story, rows, moment, committed):
    """rows are exactly a prefix of the primary's rows: every row committed by `moment`
    (ids up to `committed`, read with it in one statement) and none stamped after it
    (a row is stamped before its commit). Rows stamped before and committed after are
    either way."""
    primary_rows = story.rows
    assert rows == primary_rows[:len(rows)], "not a prefix of the primary's rows"
    assert all(at <= moment for _, at in rows), "a row stamped after the target is present"
    assert all(ident > committed for ident, _ in primary_rows[len(rows):]), \
        "a row committed before the target is missing"
    assert primary_rows[len(rows):], "the primary has rows after the target"


# -- the product --------------------------------------------------------------

def test_pitr_restore_to_a_time_between_two_sets_has_exactly_the_rows_committed_by_then(story):
    target = story.target_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with restored(story, "--target-time", target, "--action", "promote") as copy:
        assert "restored set %s to" % story.sets[0] in copy.out
        assert ": promoted" in copy.out
        assert "recovery stopping before commit" in copy.out
        assert re.search(r"steps: clone [0-9.]+s, prepare [0-9.]+s, start [0-9.]+s, recover", copy.out)
        assert copy.psql("SELECT pg_is_in_recovery()") == "f"
        assert_rows_up_to(story, copy.rows(), story.target_time, story.target_committed)
        # The copy archives nothing and keeps its WAL off ZFS, away from the standby's.
        assert copy.psql("SHOW archive_mode") == "off"
        copy.psql("INSERT INTO pitr (at) VALUES (now()); SELECT pg_switch_wal()")
        wal_link = os.readlink(os.path.join(copy.pgdata, "pg_wal"))
        assert wal_link.startswith(os.path.join(story.tb.run_dir, "restore_wal"))
        tablespace_links = [os.readlink(p) for p in glob.glob(os.path.join(copy.pgdata, "pg_tblspc", "*"))]
        assert tablespace_links and all(link.startswith(os.path.join(story.tb.run_dir, "restore_mnt"))
                                        for link in tablespace_links)
        assert int(copy.psql("SELECT count(*) FROM smoke")) >= 0    # the ts1 tablespace reads
        time.sleep(1)
        for host in story.tb.hosts:
            assert not [name for name in os.listdir(host.wal_dir) if not name.startswith("00000001")]
        assert not [name for name in os.listdir(story.tb.standby_wal) if name.startswith("00000002")]


@pytest.mark.host_only("recovery_target = immediate")
def test_immediate_pauses_at_the_end_of_the_backup(story):
    with restored(story, "--immediate", "--set", story.sets[0]) as copy:
        assert ": paused" in copy.out
        assert "recovery stopping after reaching consistency" in copy.out
        assert copy.psql("SELECT pg_is_in_recovery()") == "t"
        rows = copy.rows()
        assert rows == story.rows[:len(rows)] and 0 < len(rows) < len(story.rows)


@pytest.mark.host_only("recovery_target = latest; the clones are the PITR test's")
def test_latest_replays_the_whole_archive_and_opens(story):
    with restored(story, "--latest") as copy:
        assert "restored set %s to end of archive: promoted" % story.sets[1] in copy.out
        assert copy.rows() == story.rows


@pytest.mark.host_only("recovery_target_lsn")
def test_target_lsn_stops_at_that_wal_location(story):
    with restored(story, "--target-lsn", story.target_lsn, "--action", "promote") as copy:
        assert "restored set %s" % story.sets[0] in copy.out
        # PostgreSQL stops after the first record that starts at or after the target.
        # pg_current_wal_lsn() is where the WAL was written to, often a page boundary
        # inside a record (CI, 2026-12-02: 0/46BC000), so that record may start later.
        stop = stopped_after(copy.out)
        assert stop == lsn(first_record_at_or_after(story.tb, story.target_lsn))
        assert stop >= lsn(story.target_lsn)
        assert_rows_up_to(story, copy.rows(), story.target_time, story.target_committed)


@pytest.mark.host_only("recovery_target_lsn")
def test_target_lsn_at_a_page_boundary_stops_at_the_first_record_after_it(story):
    # Every WAL page starts with its header, so a page boundary is never where a
    # record starts: PostgreSQL replays up to the page's first record and stops there.
    # (The test above meets this case only when pg_current_wal_lsn() was one.)
    # The newest boundary whose first record lies before T (the target may itself be
    # a page's first record), and after set A's stop, so that A serves it.
    stop_a = lsn(props_of(story.tb, story.tb.datasets[1] + "@" + story.sets[0])["pgzfs:stop_lsn"])
    boundary = (lsn(story.target_lsn) - 1) & ~(8192 - 1)
    while True:
        text = "%X/%X" % (boundary >> 32, boundary & 0xFFFFFFFF)
        first = first_record_at_or_after(story.tb, text)
        if lsn(first) < lsn(story.target_lsn):
            break
        boundary -= 8192
    assert stop_a < boundary < lsn(first) < lsn(story.target_lsn)
    with restored(story, "--target-lsn", text, "--action", "promote") as copy:
        assert "restored set %s to LSN %s: promoted" % (story.sets[0], text) in copy.out
        assert stopped_after(copy.out) == lsn(first), copy.out
        rows = copy.rows()
        assert rows and rows == story.rows[:len(rows)], "not a prefix of the primary's rows"
        assert all(at <= story.target_time for _, at in rows), "a row stamped after the target is present"


@pytest.mark.host_only("recovery_target_name")
def test_target_name_stops_at_the_restore_point(story):
    with restored(story, "--target-name", story.point_name, "--action", "promote") as copy:
        assert "recovery stopping at restore point \"%s\"" % story.point_name in copy.out
        assert_rows_up_to(story, copy.rows(), story.point_time, story.point_committed)


@pytest.mark.host_only("recovery_target_action")
def test_action_shutdown_leaves_the_copy_stopped_at_the_target(story):
    target = story.target_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with restored(story, "--target-time", target, "--action", "shutdown") as copy:
        assert ": shut down" in copy.out
        assert "recovery stopping before commit" in copy.out


@pytest.mark.host_only("which set serves a target: refused before anything is made")
def test_target_before_every_set_is_refused_naming_the_earliest_possible(story):
    first = props_of(story.tb, story.tb.datasets[1] + "@" + story.sets[0])
    proc = restore_script(story.config, "restore", "--target-time", "2000-01-01T00:00:00Z")
    assert proc.returncode == 1
    assert "earliest possible target is" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    all_sets = [s for s in set_names(story.tb)]
    assert "(set %s)" % all_sets[0] in proc.stderr or first["pgzfs:stop_time"] in proc.stderr
    assert our_clones(story.tb) == []


@pytest.mark.host_only("the archive's end")
def test_archive_that_ends_before_the_target_fails_plainly_and_cleans_up(story):
    later = (utc_now() + datetime.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    proc = restore_script(story.config, "restore", "--target-time", later, "--action", "promote")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"archive ended before the target .* replay stopped at LSN [0-9A-F]+/[0-9A-F]+",
                     proc.stderr), proc.stderr
    assert our_clones(story.tb) == []
    assert work_dirs(os.path.join(story.tb.run_dir, "restore_wal")) == []


def test_dry_run_prints_every_step_and_changes_nothing(story):
    proc = restore_script(story.config, "restore", "--immediate", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for step in ("dry-run: zfs clone -o mountpoint=", "backup_label", "pg_wal", "recovery.signal"
                 if int(story.tb.pg_version) >= 12 else "recovery.conf", "archive_mode = off",
                 "pg_ctl start", "nothing was changed"):
        assert step in proc.stdout
    assert our_clones(story.tb) == []
    assert not os.path.exists(os.path.join(story.tb.run_dir, "restore_wal", "restore_" + story.sets[1]))


def test_no_start_prepares_the_clone_and_cleanup_leaves_no_clone(story):
    proc = restore_script(story.config, "restore", "--immediate", "--no-start")
    assert proc.returncode == 0, proc.stderr
    clones = our_clones(story.tb)
    assert sorted(clones) == sorted("%s_restore_%s" % (d, story.sets[1]) for d in story.tb.datasets)
    mountpoint = os.path.join(story.tb.run_dir, "restore_mnt", "data02_restore_" + story.sets[1])
    pgdata = os.path.join(mountpoint, "pgdata")
    label = os.stat(os.path.join(pgdata, "backup_label"))
    assert label.st_mode & 0o777 == 0o600 and label.st_uid == os.stat(pgdata).st_uid
    assert not os.path.exists(os.path.join(pgdata, "standby.signal"))
    assert not os.path.exists(os.path.join(pgdata, "postmaster.pid"))
    auto = open(os.path.join(pgdata, "postgresql.auto.conf")).read()
    assert "#pg_zfs_restore: primary_conninfo" in auto
    listing = json.loads(restore_script(story.config, "list", "--json").stdout)
    assert [s["clones"] for s in listing if s["name"] == story.sets[1]][0] == sorted(clones)
    proc = restore_script(story.config, "cleanup", story.sets[1])
    assert proc.returncode == 0, proc.stderr
    assert our_clones(story.tb) == []


def test_list_shows_each_set_with_its_earliest_target(story):
    proc = restore_script(story.config, "list")
    assert proc.returncode == 0, proc.stderr
    for name in story.sets:
        line = [l for l in proc.stdout.splitlines() if l.startswith(name)][0]
        props = props_of(story.tb, story.tb.datasets[1] + "@" + name)
        # The database's own time when the set has it, else the guest's stop time.
        stop = parse_iso(props.get("pgzfs:db_time") or props["pgzfs:stop_time"])
        shown = re.search(r" (\d{4}-\d\d-\d\dT[0-9:.]+Z) ", line).group(1)
        assert parse_iso(shown) == stop and " yes " in line


def pgdata_fingerprint(pgdata):
    """The standby's config files, recovery markers and links: what a restore never changes."""
    files = {}
    for name in ("postgresql.conf", "postgresql.auto.conf", "pg_hba.conf", "standby.signal",
                 "PG_VERSION"):
        path = os.path.join(pgdata, name)
        files[name] = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else None
    for name in ("backup_label", "recovery.signal", "tablespace_map"):
        files[name] = os.path.exists(os.path.join(pgdata, name))
    files["pg_wal"] = os.readlink(os.path.join(pgdata, "pg_wal"))
    files["pg_tblspc"] = sorted(os.readlink(p) for p in glob.glob(os.path.join(pgdata, "pg_tblspc", "*")))
    return files


def assert_a_promoted_restore_leaves_untouched(story, fingerprint, standby, note):
    """Restore to the story's target and write in the copy: fingerprint() never changes,
    and the standby stays in recovery and keeps streaming (note: a row to wait for)."""
    before = fingerprint()
    target = story.target_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with restored(story, "--target-time", target, "--action", "promote") as copy:
        copy.psql("CREATE TABLE only_in_the_copy (x int)")
        assert fingerprint() == before
    assert fingerprint() == before
    assert standby.psql("SELECT pg_is_in_recovery()") == "t"
    story.tb.primary.psql("INSERT INTO smoke (note) VALUES ('%s')" % note)
    wait_for(lambda: standby.psql("SELECT count(*) FROM smoke WHERE note = '%s'" % note) == "1",
             30, "the standby to keep streaming")
    assert standby.psql("SELECT to_regclass('only_in_the_copy') IS NULL") == "t"


def test_source_datasets_and_the_running_standby_are_untouched(story):
    tb = story.tb

    def fingerprint():
        files = pgdata_fingerprint(tb.standby.pgdata)
        files["props"] = [props_of(tb, d + "@" + s) for d in tb.datasets for s in story.sets]
        files["mountpoints"] = [tb.zfs.mountpoint(d) for d in tb.datasets]
        return files

    assert_a_promoted_restore_leaves_untouched(story, fingerprint, tb.standby, "after the restore")


def test_rollback_lists_later_snapshots_and_refuses_while_the_standby_runs(story):
    tb = story.tb
    proc = restore_script(story.config, "rollback", "--set", story.sets[0], "--force")
    assert proc.returncode == 1
    for dataset in tb.datasets:
        assert "%s@%s" % (dataset, story.sets[1]) in proc.stdout
    assert "PostgreSQL runs on the datasets" in proc.stderr
    proc = restore_script(story.config, "rollback", "--set", story.sets[1])
    assert proc.returncode == 1
    assert set_names(tb)[-2:] == story.sets


@pytest.mark.host_only("the drill's Nagios line; a drill's ZFS steps run in the cron drill test")
def test_drill_passes_with_a_nagios_line(story):
    proc = restore_script(story.config, "drill", "--query", "SELECT count(*) FROM pitr")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = proc.stdout.strip()
    assert len(line.splitlines()) == 1
    assert re.match(r"^OK: drill of set %s .*clone [0-9.]+s, prepare [0-9.]+s, start [0-9.]+s, "
                    r"recover [0-9.]+s, query [0-9.]+s, stop [0-9.]+s, destroy [0-9.]+s; total [0-9.]+s$"
                    % story.sets[1], line), line
    assert our_clones(story.tb) == []


@pytest.mark.host_only("the drill's query")
def test_drill_fails_with_exit_2_when_the_query_fails(story):
    proc = restore_script(story.config, "drill", "--query", "SELECT * FROM no_such_table")
    assert proc.returncode == 2
    assert proc.stdout.startswith("CRITICAL: drill of set %s failed: query" % story.sets[1])
    assert "no_such_table" in proc.stdout
    assert our_clones(story.tb) == []


@pytest.mark.host_only("the set's backup label, refused before anything is made")
def test_drill_fails_with_exit_2_when_the_set_has_lost_its_backup_label(story):
    tb = story.tb
    snapshot = tb.datasets[1] + "@" + story.sets[1]
    label = tb.zfs.run("get", "-H", "-o", "value", "pgzfs:backup_label", snapshot).strip()
    tb.zfs.run("inherit", "pgzfs:backup_label", snapshot)
    try:
        proc = restore_script(story.config, "drill")
        assert proc.returncode == 2
        assert proc.stdout.startswith("CRITICAL:")
        assert "backup_label" in proc.stdout
        assert our_clones(tb) == []
    finally:
        tb.zfs.run("set", "pgzfs:backup_label=" + label, snapshot)


# -- another cluster's sets on the same pool ------------------------------------

@pytest.fixture
def other_cluster(story):
    """Newer sets of other configs on the story's pool: the same prefix on other datasets,
    another prefix on the story's own datasets; and a clone of one, as its restore made it."""
    from test_restore_rollback import Own, hand_made_set
    tb = story.tb
    other = Own(tb, "oc")
    other.names = [other.take_set("20991125T040100Z", prefix="pgzfs"),
                   hand_made_set(tb, tb.datasets, "other_20991125T050100Z")]
    other.clone = "%s_restore_%s" % (other.datasets[1], other.names[0])
    tb.zfs.run("clone", "-o", "pgzfs:clone_of=" + other.names[0], "-o",
               "mountpoint=" + os.path.join(tb.run_dir, "oc_mnt", "clone"),
               "%s@%s" % (other.datasets[1], other.names[0]), other.clone)
    try:
        yield other
    finally:
        if tb.zfs.exists(other.clone):
            tb.zfs.destroy(other.clone)
        for dataset in tb.datasets:
            tb.zfs.destroy("%s@%s" % (dataset, other.names[1]))
        other.remove()


@pytest.mark.host_only("which sets are this config's is our decision (test_restore_unit); the clones are every other test's")
def test_another_configs_newer_sets_are_never_listed_chosen_drilled_or_cleaned_up(story, other_cluster):
    tb = story.tb
    names = [s["name"] for s in json.loads(restore_script(story.config, "list", "--json").stdout)]
    assert story.sets[1] == names[-1] and not set(other_cluster.names) & set(names)

    proc = restore_script(story.config, "restore", "--latest", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "set %s " % story.sets[1] in proc.stderr and "20991125" not in proc.stdout + proc.stderr

    proc = restore_script(story.config, "drill")
    assert proc.returncode == 0 and proc.stdout.startswith("OK: drill of set %s " % story.sets[1]), proc.stdout

    proc = restore_script(story.config, "cleanup", "--all")
    assert proc.returncode == 0, proc.stderr
    assert tb.zfs.exists(other_cluster.clone)
    assert our_clones(tb) == [other_cluster.clone]


# -- the end of the archive: holes, damaged copies, a source that stops recovery --

@pytest.fixture
def three_more_segments(story):
    """Three more archived segments after the story, with 100 rows of later_rows each."""
    tb = story.tb
    tb.primary.psql("CREATE TABLE later_rows (n int)")
    try:
        names = []
        for _ in range(3):
            tb.primary.psql("INSERT INTO later_rows SELECT generate_series(1, 100)")
            names.append(tb.switch_wal())
        yield names
    finally:
        tb.primary.psql("DROP TABLE later_rows")


@contextlib.contextmanager
def archive_changed(story, wal_name, hosts, damage=False):
    """wal_name taken out of these hosts' archives (or, with damage, a copy with a
    page in its middle overwritten); put back as it was afterwards."""
    kept = []
    try:
        for host in hosts:
            path = os.path.join(host.wal_dir, wal_name)
            aside = os.path.join(story.tb.run_dir, "%s.%s.aside" % (wal_name, host.name))
            os.rename(path, aside)
            kept.append((aside, path))
            if damage:
                data = bytearray(open(aside, "rb").read())
                data[len(data) // 2:len(data) // 2 + 8192] = b"\xa5" * 8192
                with open(path, "wb") as out:
                    out.write(bytes(data))
        yield
    finally:
        for aside, path in kept:
            os.rename(aside, path)


def assert_failed_in_one_line_leaving_nothing(story, proc):
    """The restore exited 1, its reason is one ERROR line (returned), nothing is left."""
    if proc.returncode == 0:        # wrongly whole: remove the copy before failing
        restore_script(story.config, "cleanup", "--all")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": ERROR: " in line]
    assert len(errors) == 2 and errors[0].startswith("pg_zfs_restore: ERROR: restore of set"), proc.stderr
    assert story.leftovers() == []
    return errors[1]


@pytest.mark.host_only("a hole in the archive")
def test_latest_at_a_hole_in_every_archive_fails_naming_the_missing_segment(story, three_more_segments):
    hole = three_more_segments[1]
    with archive_changed(story, hole, story.tb.hosts):
        proc = restore_script(story.config, "restore", "--latest")
    error = assert_failed_in_one_line_leaving_nothing(story, proc)
    assert re.search(r"restore failed: replay ended at LSN [0-9A-F]+/[0-9A-F]+ in %s, but the archive holds "
                     r"WAL up to %s: %s is missing or damaged in every archive"
                     % (three_more_segments[0], three_more_segments[2], hole), error), error


@pytest.mark.host_only("check's WAL continuity")
def test_check_names_a_segment_missing_in_every_archive_and_not_one_missing_in_one(story, three_more_segments):
    # pg_zfs_snap.py check: every segment from the oldest set's start to the newest
    # archived one must be on some source (Barman's check does as much).
    def check():
        proc = run_script("pg_zfs_snap", "check", config=story.config, timeout=180)
        assert proc.stdout.startswith("PG_ZFS_SNAP ") and len(proc.stdout.splitlines()) == 1, proc.stdout + proc.stderr
        return proc
    assert "in no archive" not in check().stdout
    hole = three_more_segments[1]
    with archive_changed(story, hole, story.tb.hosts[:1]):          # host2 still has it
        assert "in no archive" not in check().stdout
    with archive_changed(story, hole, story.tb.hosts):
        proc = check()
    assert proc.returncode == 2, proc.stdout
    assert "; WAL %s is in no archive: no set restores past it" % hole in proc.stdout, proc.stdout


@pytest.mark.host_only("a damaged archived copy")
def test_latest_with_a_damaged_copy_in_one_archive_restores_from_the_other(story, three_more_segments):
    with archive_changed(story, three_more_segments[1], story.tb.hosts[:1], damage=True):
        with restored(story, "--latest") as copy:
            assert copy.psql("SELECT count(*) FROM later_rows") == "300"
            assert copy.rows() == story.rows


@pytest.mark.host_only("the archive's clean-up")
def test_an_archive_cleaned_by_oldest_wal_still_restores_the_oldest_set_whole(story, three_more_segments):
    # oldest-wal --commands' pg_archivecleanup lines run on copies of both archives
    # (hard links: the testbed's own stay whole), then the oldest complete set is
    # restored from the cleaned copies alone, to the end: every row of the primary.
    tb = story.tb
    cleaned = os.path.join(tb.run_dir, "cleaned_archives")
    sources = {}
    for host in tb.hosts:
        directory = os.path.join(cleaned, host.name)
        os.makedirs(directory)
        for name in os.listdir(host.wal_dir):
            os.link(os.path.join(host.wal_dir, name), os.path.join(directory, name))
        sources["source c" + host.name] = {"path": directory}
    sections = tb.default_config()
    for section in [section for section in sections if section.startswith("source ")]:
        del sections[section]
    sections.update(sources)
    sections["archive"]["sources"] = " ".join(sorted(name.split()[1] for name in sources))
    sections["restore"] = {"mount_root": os.path.join(tb.run_dir, "restore_mnt"),
                           "wal_root": os.path.join(tb.run_dir, "restore_wal"), "timeout": "240"}
    try:
        config = tb.write_config(os.path.join(tb.run_dir, "cleaned.conf"), sections=sections)
        oldest = run_script("pg_zfs_snap", "oldest-wal", config=config)
        assert oldest.returncode == 0, oldest.stderr
        [wal_name] = oldest.stdout.split()
        commands = run_script("pg_zfs_snap", "oldest-wal", "--commands", config=config)
        assert commands.returncode == 0, commands.stderr
        before = dict((d, sorted(os.listdir(os.path.join(cleaned, d)))) for d in os.listdir(cleaned))
        env = dict(os.environ, PATH=tb.pg_bindir + ":" + os.environ["PATH"])
        subprocess.run(["sh", "-ec", commands.stdout], env=env, check=True, timeout=120)
        for directory, names in before.items():
            left = sorted(os.listdir(os.path.join(cleaned, directory)))
            assert wal_name in left
            segments_before = [n for n in names if len(n) == 24 and n[8:] < wal_name[8:]]
            assert segments_before and not [n for n in left if n in segments_before], (directory, wal_name)
        listed = run_script("pg_zfs_snap", "list", "--json", config=config)
        assert listed.returncode == 0, listed.stderr
        oldest_set = [one["name"] for one in json.loads(listed.stdout) if one["complete"]][0]
        only_cleaned = Story()
        only_cleaned.__dict__.update(story.__dict__, config=config)
        with restored(only_cleaned, "--set", oldest_set, "--latest") as copy:
            assert copy.psql("SELECT count(*) FROM later_rows") == "300"
            assert copy.rows() == story.rows
    finally:
        shutil.rmtree(cleaned, ignore_errors=True)


@pytest.mark.host_only("pg_wal_fetch stopping recovery")
def test_a_recovery_pg_wal_fetch_stops_fails_with_its_reason_and_the_lsn_reached(story, three_more_segments):
    tb = story.tb
    hole = three_more_segments[1]
    with archive_changed(story, hole, tb.hosts[1:]):
        with tb.hosts[0].dead():
            proc = restore_script(story.config, "restore", "--latest")
    error = assert_failed_in_one_line_leaving_nothing(story, proc)
    assert re.search(r"restore failed: recovery stopped at %s: .* \(LSN reached [0-9A-F]+/[0-9A-F]+\)$" % hole,
                     error), error
    assert "[source %s] unreachable" % tb.hosts[0].name in error and "[source %s] absent" % tb.hosts[1].name \
        in error


# -- a set whose stop segment is not archived yet --------------------------------

@contextlib.contextmanager
def set_waiting_for_wal(story):
    """Yield (set name, a row only it holds): a set whose stop segment is archived
    only when the block switches the WAL. archive_timeout is 0 meanwhile, so a
    slow machine cannot outlast it; the set is destroyed after."""
    tb = story.tb
    tb.primary.psql("ALTER SYSTEM SET archive_timeout = 0")
    tb.primary.psql("SELECT pg_reload_conf()")
    try:
        tb.switch_wal()     # the next segment stays unarchived
        note = "unarchived %s" % utc_now().isoformat()
        tb.primary.psql("INSERT INTO smoke (note) VALUES ('%s')" % note)
        wait_for(lambda: tb.standby.psql("SELECT count(*) FROM smoke WHERE note = '%s'" % note) == "1",
                 30, "the standby to replay the row")
        before = set(set_names(tb))
        snap(tb, story.config)
        name = [name for name in set_names(tb) if name not in before][0]
        try:
            yield name, note
        finally:
            for dataset in tb.datasets:
                tb.zfs.destroy("%s@%s" % (dataset, name))
    finally:
        tb.primary.psql("ALTER SYSTEM SET archive_timeout = %d" % ARCHIVE_TIMEOUT)
        tb.primary.psql("SELECT pg_reload_conf()")


@pytest.mark.host_only("a stop segment not archived yet")
def test_a_set_whose_stop_segment_is_not_archived_yet_waits_and_is_passed_over(story):
    tb = story.tb
    with set_waiting_for_wal(story) as (newest, _):
        listing = dict((s["name"], s) for s in json.loads(restore_script(story.config, "list", "--json").stdout))
        table = restore_script(story.config, "list").stdout
        drill = restore_script(story.config, "drill")
        refused = restore_script(story.config, "restore", "--immediate", "--set", newest)
        checked = run_script("pg_zfs_snap", "check", config=story.tb.write_config(
            os.path.join(tb.run_dir, "wal_wait.conf"), {"snapshot": {"wal_wait": "0"}}))
        snap_listing = dict((s["name"], s) for s in json.loads(
            run_script("pg_zfs_snap", "list", "--json", config=story.config).stdout))
        snap_table = run_script("pg_zfs_snap", "list", config=story.config).stdout
    assert re.match(r"^[0-9A-F]{24}$", listing[newest]["waiting_for_wal"] or "")
    assert listing[story.sets[1]]["waiting_for_wal"] is None
    assert re.search(r"^%s .* WAITING " % newest, table, re.M), table
    assert "WAITING set %s is waiting for WAL: its stop segment %s" % (newest, listing[newest]["waiting_for_wal"]) \
        in table
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert drill.stdout.startswith("OK: drill of set %s " % story.sets[1]), drill.stdout
    assert "newer set %s waits for WAL %s" % (newest, listing[newest]["waiting_for_wal"]) in drill.stdout
    assert refused.returncode == 1 and "cannot restore yet: set %s is waiting for WAL" % newest in refused.stderr
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert snap_listing[newest]["waiting_for_wal"] == listing[newest]["waiting_for_wal"]
    assert snap_listing[story.sets[1]]["waiting_for_wal"] is None
    assert re.search(r"^%s\t.*\tWAITING for WAL %s$" % (newest, listing[newest]["waiting_for_wal"]), snap_table,
                     re.M), snap_table
    assert checked.stdout.startswith("PG_ZFS_SNAP WARNING - newest set %s " % newest)
    assert "waiting for WAL %s" % listing[newest]["waiting_for_wal"] in checked.stdout
    assert our_clones(tb) == []


# -- the stop time to the microsecond ---------------------------------------------

@pytest.mark.host_only("which set serves a target time")
def test_a_target_a_moment_after_a_sets_stop_uses_that_set(story):
    tb = story.tb
    before = set(set_names(tb))
    snap(tb, story.config)
    newest = [name for name in set_names(tb) if name not in before][0]
    try:
        stop = props_of(tb, tb.datasets[1] + "@" + newest)["pgzfs:stop_time"]
        stopped = datetime.datetime.strptime(stop, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
        target = stopped + datetime.timedelta(milliseconds=1)       # before the next whole second
        note = "after the target %s" % target.isoformat()
        tb.primary.psql("INSERT INTO smoke (note) VALUES ('%s')" % note)
        tb.switch_wal()
        with restored(story, "--target-time", target.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                      "--action", "promote") as copy:
            assert "restored set %s to" % newest in copy.out
            assert copy.psql("SELECT count(*) FROM smoke WHERE note = '%s'" % note) == "0"
            assert copy.rows() == story.rows
    finally:
        for dataset in tb.datasets:
            tb.zfs.destroy("%s@%s" % (dataset, newest))


def test_drill_runs_from_cron_with_only_usr_bin_and_bin_on_path(story):
    from testbed import run_script
    proc = run_script(SCRIPT, "drill", config=story.config, env={"PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK: drill of set %s " % story.sets[1])
    assert our_clones(story.tb) == [] and story.leftovers() == []


# -- a guest clock that is wrong --------------------------------------------------

@pytest.mark.host_only("a wrong clock")
def test_a_set_taken_under_a_clock_an_hour_behind_serves_no_target_before_its_real_stop(story):
    tb = story.tb
    note = "before the set %s" % utc_now().isoformat()
    tb.primary.psql("INSERT INTO smoke (note) VALUES ('%s')" % note)
    wait_for(lambda: tb.standby.psql("SELECT count(*) FROM smoke WHERE note = '%s'" % note) == "1",
             30, "the standby to replay the row")
    before = set(set_names(tb))
    behind = utc_now() - datetime.timedelta(hours=1)
    proc = sh([PY36,
               os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bin", "pg_zfs_snap.py"),
               "-c", story.config, "--now", behind.strftime("%Y%m%dT%H%M%SZ"), "snapshot", "--no-prune"],
              check=False, timeout=180)
    assert proc.returncode == 0, proc.stderr
    wrong = [name for name in set_names(tb) if name not in before][0]
    try:
        props = props_of(tb, tb.datasets[1] + "@" + wrong)
        db_time = parse_iso(props["pgzfs:db_time"])
        assert parse_iso(props["pgzfs:stop_time"]) < db_time - datetime.timedelta(minutes=50)
        assert abs(db_time - utc_now()) < datetime.timedelta(minutes=5)
        tb.primary.psql("INSERT INTO smoke (note) VALUES ('after the set')")
        tb.switch_wal()
        target = utc_now() - datetime.timedelta(minutes=30)    # after its guest stop time, before its rows
        proc = restore_script(story.config, "restore", "--target-time", target.strftime("%Y-%m-%dT%H:%M:%SZ"),
                              "--action", "promote")
        if proc.returncode == 0:
            restore_script(story.config, "cleanup", "--all")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "earliest possible target is" in proc.stderr and "set %s" % wrong not in proc.stdout
        assert our_clones(tb) == []
    finally:
        for dataset in tb.datasets:
            tb.zfs.destroy("%s@%s" % (dataset, wrong))
