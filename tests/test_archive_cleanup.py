"""Archive clean-up: `pg_zfs_snap.py oldest-wal --apply [--dry-run]` removes, on
each archive host, the archived WAL no set needs, through a key of its own that
runs `pg_wal_serve --cleanup GLOB` and nothing else.

The host is test_archive_key.py's (sshd on loopback, a per-user
authorized_keys, PAM, the guest's fetch key installed restricted for postgres);
the cleanup key is root's on the guest, installed beside the fetch key with the
line `pg_wal_fetch.py --authorized-keys` prints. Its archive holds two
directories of made-up names around the oldest set's real start WAL file: two
timelines, compressed copies, .partial, .backup and .history files. The set is
a real one, taken of the testbed's standby.
"""

import os
import shutil
import subprocess

import pytest

from testbed import PG_USER, free_port, load_script, run_script, sh, wait_for
from test_archive_key import Rig

pytestmark = pytest.mark.timeout(300)

FETCH = load_script("pg_wal_fetch")
SNAP = load_script("pg_zfs_snap")
MARK = FETCH.REQUEST_MARK
PREFIX = "cleanup"


def name_at(timeline, position):
    """The segment name of timeline at position (log and segment as one 64-bit number)."""
    return "%08X%016X" % (timeline, position)


class Archive(object):
    """The made-up archive around the oldest needed file: what must go, what must stay."""

    def __init__(self, rig, oldest):
        self.rig = rig
        self.oldest = oldest
        self.first = rig.host.wal_dir
        self.second = os.path.join(rig.host.root, "second")
        tli, here = int(oldest[:8], 16), int(oldest[8:], 16)
        other = tli + 1
        self.doomed = [os.path.join(self.first, name) for name in (
            name_at(tli, here - 2), name_at(tli, here - 2) + ".gz", name_at(tli, here - 1) + ".bz2",
            name_at(other, here - 1) + ".xz", name_at(other, here - 2) + ".partial",
            name_at(other, here - 1) + ".partial.gz")] + [os.path.join(self.second, name_at(tli, here - 1))]
        self.kept = [os.path.join(self.first, name) for name in (
            oldest, oldest + ".gz", name_at(other, here), name_at(tli, here + 1) + ".xz",
            name_at(other, here + 1) + ".partial", "%08X.history" % other,
            name_at(tli, here - 2) + ".00000028.backup", "%08X%08X%08x" % (tli, 0, 0xab), "README")] + [
            os.path.join(self.second, name_at(tli, here + 2))]

    def fill(self):
        """Every file afresh (owned by postgres, as archive_command writes them)."""
        for directory in (self.first, self.second):
            shutil.rmtree(directory, ignore_errors=True)
            os.makedirs(directory)
        for path in self.doomed + self.kept:
            with open(path, "w") as out:
                out.write("x")
        sh(["chown", "-R", "%s:%s" % (PG_USER, PG_USER), self.rig.host.root])

    def files(self):
        return sorted(os.path.join(top, name) for top, _dirs, names in os.walk(self.rig.host.root)
                      for name in names)


class CleanupRig(Rig):
    """test_archive_key.py's host and fetch key, plus root's cleanup key installed beside it."""

    def __init__(self, tb, segments):
        self.cleanup_key = None
        Rig.__init__(self, tb, segments)
        key_dir = os.path.join(self.guest, "root-ssh")
        sh(["install", "-d", "-m", "0755", "-o", "root", "-g", "root", key_dir])
        self.cleanup_key = os.path.join(key_dir, "cleanup_ed25519")
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@guest pg_zfs cleanup", "-f",
            self.cleanup_key])
        self.configure()
        proc = self.run("--authorized-keys", "--server", self.server)
        assert proc.returncode == 0, proc.stderr
        lines = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
        assert len(lines) == 2 and lines[0] == self.authorized_line, proc.stdout
        self.cleanup_line = lines[1]
        with open(self.host.authorized_keys_of(PG_USER), "a") as out:
            out.write(self.cleanup_line + "\n")

    def link_archive(self):
        """No WAL of host1's: the archive is made up (Archive)."""

    def configure(self, prefetch=0, **keys):
        if self.cleanup_key:
            keys.setdefault("cleanup_identity", self.cleanup_key)
        return Rig.configure(self, prefetch, **keys)

    def snap_config(self, name="snap.conf", replica=None, **sources):
        """The testbed's standby and datasets, this host as the only archive source (or sources)."""
        sections = self.tb.default_config()
        if replica:
            sections["replica gone"] = replica
        for section in [section for section in sections if section.startswith("source ")]:
            del sections[section]
        sections["snapshot"]["prefix"] = PREFIX
        sections["archive"] = {"sources": " ".join(sorted(sources)) if sources else "rhost"}
        for source, keys in (sorted(sources.items()) if sources else [("rhost", {})]):
            section = {"cleanup_identity": self.cleanup_key}
            section.update(keys)
            sections["source " + source] = self.source(**section)
        return self.tb.write_config(os.path.join(self.guest, name), sections=sections)

    def cleanup_command(self, remote_command, key=None):
        """ssh HOST REMOTE_COMMAND as root on the guest with the cleanup key."""
        argv = ["ssh", "-p", str(self.host.port), "-i", key or self.cleanup_key, "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ControlPath=none",
                "-o", "UserKnownHostsFile=%s" % self.tb.known_hosts, "-o", "ConnectTimeout=5",
                "-b", self.guest_address, "-l", PG_USER, "--", self.host.address]
        return subprocess.run(argv + ([remote_command] if remote_command else []), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                              timeout=60)


def snap(cfg, *args):
    return run_script("pg_zfs_snap", *args, config=cfg)


@pytest.fixture(scope="module")
def rig(tb):
    bed = CleanupRig(tb, [])
    try:
        yield bed
    finally:
        for snapshot in tb.zfs.snapshots():
            if snapshot.split("@", 1)[1].startswith(PREFIX + "_"):
                tb.zfs.destroy(snapshot)
        bed.teardown()


@pytest.fixture(scope="module")
def oldest(rig):
    """The start WAL file of a real set of the standby, the only set of PREFIX;
    a few segments into the timeline (a restartpoint after a checkpoint there),
    so that the archive has older names to make up."""
    tb = rig.tb
    for _ in range(3):
        tb.switch_wal()
    tb.primary.psql("CHECKPOINT")
    tb.switch_wal()
    lsn = tb.primary.psql("SELECT pg_current_wal_lsn()")
    wait_for(lambda: tb.standby.psql("SELECT pg_last_wal_replay_lsn() >= '%s'" % lsn) == "t", 60,
             "the standby to replay %s" % lsn)
    tb.standby.psql("CHECKPOINT")
    cfg = rig.snap_config()
    proc = snap(cfg, "snapshot", "--no-prune")
    assert proc.returncode == 0, proc.stderr
    proc = snap(cfg, "oldest-wal")
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()[8:], 16) >= 2, proc.stdout
    return proc.stdout.strip()


@pytest.fixture
def archive(rig, oldest):
    made = Archive(rig, oldest)
    made.fill()
    try:
        yield made
    finally:
        for directory in (made.first, made.second):
            shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(made.first)
        sh(["chown", "%s:%s" % (PG_USER, PG_USER), made.first])


# ---------------------------------------------------------------------------
# The line, and oldest-wal --apply end to end
# ---------------------------------------------------------------------------

def test_the_cleanup_line_restricts_its_own_key_to_pg_wal_serve_cleanup(rig):
    with open(rig.cleanup_key + ".pub") as public:
        key = " ".join(public.read().split())
    assert rig.cleanup_line == 'restrict,from="%s",command="%s --cleanup \'%s\'" %s' % (
        rig.guest_address, rig.server, rig.host.glob, key)
    assert rig.cleanup_line != rig.authorized_line


def test_dry_run_lists_every_older_copy_and_removes_nothing(rig, archive):
    before = archive.files()
    proc = snap(rig.snap_config(), "oldest-wal", "--apply", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "oldest needed WAL file: %s" % archive.oldest
    where = "[source rhost] %s: " % rig.host.address
    assert sorted(lines[1:-1]) == sorted(where + "would remove " + path for path in archive.doomed)
    assert lines[-1] == where + "%d file(s) would be removed before %s" % (len(archive.doomed), archive.oldest)
    assert archive.files() == before


def test_apply_removes_exactly_the_older_segments_and_keeps_the_oldest_needed_and_later(rig, archive):
    proc = snap(rig.snap_config(), "oldest-wal", "--apply")
    assert proc.returncode == 0, proc.stderr
    where = "[source rhost] %s: " % rig.host.address
    assert sorted(proc.stdout.splitlines()[1:-1]) == sorted(where + "removed " + path for path in archive.doomed)
    assert proc.stdout.splitlines()[-1] == where + "%d file(s) removed before %s" % (
        len(archive.doomed), archive.oldest)
    assert archive.files() == sorted(archive.kept)
    again = snap(rig.snap_config(), "oldest-wal", "--apply")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[1:] == [where + "0 file(s) removed before %s" % archive.oldest]


def test_a_source_without_cleanup_identity_is_named_and_the_others_are_still_cleaned(rig, archive):
    cfg = rig.snap_config("two.conf", rhost={}, nokey={"cleanup_identity": ""})
    proc = snap(cfg, "oldest-wal", "--apply")
    assert proc.returncode == 1, proc.stderr
    assert "[source nokey] has no cleanup_identity: not cleaned up" in proc.stderr
    assert "1 of 2 archive source(s) not cleaned up" in proc.stderr
    assert archive.files() == sorted(archive.kept)


def test_a_replica_that_cannot_be_listed_stops_it_before_any_host_is_asked(rig, archive):
    before = archive.files()
    gone = {"host": rig.host.address, "port": str(free_port(rig.host.address)), "user": "root",
            "target": "nowhere/pg_zfs", "ssh_options": "-o ConnectTimeout=5"}
    proc = snap(rig.snap_config("gone.conf", replica=gone), "oldest-wal", "--apply")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "cannot be listed" in proc.stderr and "keep every archived WAL file" in proc.stderr
    assert archive.files() == before


def test_a_fetch_key_in_place_of_the_cleanup_key_removes_nothing_and_fails(rig, archive):
    before = archive.files()
    proc = snap(rig.snap_config("wrong.conf", rhost={"cleanup_identity": rig.key}), "oldest-wal", "--apply")
    assert proc.returncode == 1, proc.stderr
    assert "cleanup: this key reads WAL only" in proc.stderr
    assert archive.files() == before


# ---------------------------------------------------------------------------
# The cleanup key does nothing else; the fetch key no cleanup
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("request_words, reason", [
    ("id", "not a pg_wal_fetch request: id"),
    ("sh -c 'touch PWNED'", "not a pg_wal_fetch request: sh -c 'touch PWNED'"),
    ("scp -t .", "not a pg_wal_fetch request: scp -t ."),
    ("scp -f /etc/passwd", "not a pg_wal_fetch request: scp -f /etc/passwd"),
    (MARK + " fetch 1 {oldest}", "not a cleanup request: fetch"),
    (MARK + " list", "not a cleanup request: list"),
    (MARK + " cleanup ../../etc/passwd", "not a WAL segment name: ../../etc/passwd"),
    (MARK + " cleanup /etc/passwd", "not a WAL segment name: /etc/passwd"),
    (MARK + " cleanup {oldest}.partial", "not a WAL segment name: {oldest}.partial"),
    (MARK + " cleanup {oldest}.00000028.backup", "not a WAL segment name: {oldest}.00000028.backup"),
    (MARK + " cleanup 00000002.history", "not a WAL segment name: 00000002.history"),
    (MARK + " cleanup 00000000{rest}", "not a WAL segment name: 00000000{rest}"),
    (MARK + " cleanup FFFFFFFFFFFFFFFFFFFFFFF*", "not a WAL segment name: FFFFFFFFFFFFFFFFFFFFFFF*"),
    (MARK + " cleanup {oldest};touch PWNED", "not a WAL segment name: {oldest};touch"),
    (MARK + " cleanup {oldest} now", "not a cleanup option: now"),
    (MARK + " cleanup {oldest} dry-run more", "cleanup wants one WAL segment name"),
    (MARK + " cleanup", "cleanup wants one WAL segment name"),
])
def test_the_cleanup_key_refuses_anything_but_one_segment_name_in_one_line_exit_2(rig, archive, request_words,
                                                                                  reason):
    before = archive.files()
    words = request_words.format(oldest=archive.oldest, rest=archive.oldest[8:])
    proc = rig.cleanup_command(words)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "pg_wal_serve: refused: " + reason.format(oldest=archive.oldest, rest=archive.oldest[8:])), proc.stderr
    assert archive.files() == before
    assert not os.path.exists(os.path.join(rig.host.home_of(PG_USER), "PWNED"))


def test_the_cleanup_key_without_a_command_gets_no_shell(rig, archive):
    before = archive.files()
    proc = rig.cleanup_command(None)
    assert proc.returncode == 2 and "pg_wal_serve: refused: no command" in proc.stderr
    assert archive.files() == before


def test_scp_and_sftp_with_the_cleanup_key_are_refused(rig, archive):
    before = archive.files()
    common = ["-i", rig.cleanup_key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
              "-o", "UserKnownHostsFile=%s" % rig.tb.known_hosts, "-o", "BindAddress=%s" % rig.guest_address]
    remote = "%s@%s" % (PG_USER, rig.host.address)
    down = os.path.join(rig.guest, "taken")
    for argv in (["scp", "-P", str(rig.host.port)] + common + [remote + ":" + archive.kept[0], down],
                 ["scp", "-O", "-P", str(rig.host.port)] + common + [remote + ":" + archive.kept[0], down],
                 ["scp", "-P", str(rig.host.port)] + common + [archive.kept[0], remote + ":PWNED"]):
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
        assert proc.returncode != 0, argv
    batch = os.path.join(rig.guest, "sftp.batch")
    with open(batch, "w") as out:
        out.write("rm %s\nget %s %s\n" % (archive.doomed[0], archive.kept[0], down))
    proc = subprocess.run(["sftp", "-b", batch, "-P", str(rig.host.port)] + common + [remote],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    os.unlink(batch)
    assert proc.returncode != 0
    taken = os.path.exists(down) and os.path.getsize(down) > 0
    if os.path.exists(down):
        os.unlink(down)
    assert not taken
    assert archive.files() == before
    assert not os.path.exists(os.path.join(rig.host.home_of(PG_USER), "PWNED"))


def test_the_fetch_key_cannot_run_a_cleanup(rig, archive):
    before = archive.files()
    proc = rig.command("%s cleanup %s" % (MARK, archive.oldest))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["pg_wal_serve: refused: cleanup: this key reads WAL only (the cleanup "
                                        "key runs pg_wal_serve --cleanup)"]
    assert archive.files() == before


# ---------------------------------------------------------------------------
# The server removes what pg_archivecleanup removes, every copy kind at once
# ---------------------------------------------------------------------------

def test_cleanup_mode_lists_what_pg_archivecleanup_would_remove_with_each_suffix(rig, archive, tmp_path):
    tool = os.path.join(rig.tb.pg_bindir, "pg_archivecleanup")
    if not os.path.exists(tool):
        pytest.skip("no pg_archivecleanup in %s" % rig.tb.pg_bindir)
    expected = set()
    for directory in (archive.first, archive.second):
        for suffix in ("", ".gz", ".bz2", ".xz"):
            proc = subprocess.run([tool, "-n"] + (["-x", suffix] if suffix else []) + [directory, archive.oldest],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                  timeout=60, check=True)
            expected |= set(proc.stdout.split())
    server = tmp_path / "pg_wal_serve"
    server.write_text(FETCH.serve_script())
    env = dict(os.environ, SSH_ORIGINAL_COMMAND="%s cleanup %s dry-run" % (MARK, archive.oldest))
    proc = subprocess.run(["sh", str(server), "--cleanup", rig.host.glob], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    answer = SNAP.parse_cleanup_answer(proc.stdout, archive.oldest, True)
    assert set(answer) == expected == set(archive.doomed)


# ---------------------------------------------------------------------------
# The decisions on the guest's side (pure functions)
# ---------------------------------------------------------------------------

class FakeSet(object):
    def __init__(self, name, time, start_wal, complete=True):
        self.name, self.time, self.complete = name, time, complete
        self.properties = {"start_wal": start_wal}


def test_the_request_names_the_oldest_complete_sets_start_and_nothing_later():
    sets = [FakeSet("b", 2, "000000010000000000000009"), FakeSet("a", 1, "000000010000000000000003"),
            FakeSet("z", 0, "000000010000000000000001", complete=False)]
    assert SNAP.cleanup_request(sets, False) == ("000000010000000000000003",
                                                 MARK + " cleanup 000000010000000000000003")
    assert SNAP.cleanup_request(sets, True)[1] == MARK + " cleanup 000000010000000000000003 dry-run"
    with pytest.raises(SNAP.Failure):
        SNAP.cleanup_request([FakeSet("z", 0, "000000010000000000000001", complete=False)], False)


def test_the_mark_is_pg_wal_fetchs():
    assert SNAP.CLEANUP_MARK == FETCH.REQUEST_MARK


@pytest.mark.parametrize("keys, reason", [
    ({"cleanup_identity": ""}, "has no cleanup_identity"),
    ({"host": ""}, "is a local directory"),
    ({"user": ""}, "has no user"),
    ({"ssh_options": "-o 'unclosed"}, "ssh_options"),
])
def test_a_source_that_cannot_be_cleaned_up_says_why(keys, reason):
    source = {"name": "h", "host": "10.0.0.1", "port": 22, "user": "postgres", "path": "/a/*", "ssh_options": "",
              "cleanup_identity": "/root/.ssh/cleanup"}
    source.update(keys)
    with pytest.raises(SNAP.Failure) as raised:
        SNAP.cleanup_ssh_argv(source, "x", 5)
    assert reason in str(raised.value)


def test_the_ssh_command_uses_the_cleanup_key_alone_and_no_shared_connection():
    source = {"name": "h", "host": "10.0.0.1", "port": 2222, "user": "postgres", "path": "/a/*",
              "ssh_options": "-o ControlPath=/tmp/x", "cleanup_identity": "/root/.ssh/cleanup"}
    argv = SNAP.cleanup_ssh_argv(source, "REQ", 7)
    assert argv[:11] == ["ssh", "-o", "BatchMode=yes", "-o", "ControlMaster=no", "-o", "ControlPath=none",
                         "-o", "IdentitiesOnly=yes", "-i", "/root/.ssh/cleanup"]
    assert argv[-8:] == ["-p", "2222", "-l", "postgres", "-T", "--", "10.0.0.1", "REQ"]
    assert "ConnectTimeout=7" in argv


@pytest.mark.parametrize("text", [
    "", "removed /a/x\n", "removed /a/x\nCLEANED 000000010000000000000003 2 1\n",
    "would remove /a/x\nCLEANED 000000010000000000000003 1 1\n",
    "removed /a/x\nCLEANED 000000010000000000000004 1 1\n", "PROBE restricted postgres 0.1.0 - /a/*\n",
])
def test_an_answer_cut_short_or_not_the_servers_is_none(text):
    assert SNAP.parse_cleanup_answer(text, "000000010000000000000003", False) is None


def test_a_cleanup_key_that_runs_commands_is_named_as_such():
    line = SNAP.cleanup_failure("h", 127, "sh: 1: pg_wal_fetch-request: not found\n")
    assert line.startswith("[source h] the cleanup key is not restricted to pg_wal_serve --cleanup")
    assert SNAP.cleanup_failure("h", 255, "ssh: connect to host x port 22: Connection refused\n") == \
        "[source h] not reached by ssh: ssh: connect to host x port 22: Connection refused"

