"""pg_zfs_snap.py replicate against the real components: the testbed's streaming
standby on zfs-fuse sends its sets to a second pool (the replica, a ReplicaHost)
through a real sshd on loopback whose only key runs pg_zfs_receive as forced
command; pg_zfs_restore.py run with the replica's own config restores there.

The story the module sets up once, on prefix repl: a loop inserts rows on the
primary; set A; the target time T; set B; the WAL archived (test_restore's
pitr_story). Later tests add sets C, D, E, F. Each test says what it proves.
"""

import json
import os
import re
import subprocess
import time

import pytest

from testbed import (BIN, PG_USER, PY36, ReplicaHost, free_port, kernel_zfs, on_a_terminal, run_script, sh,
                     wait_for)
from test_restore import Story, assert_rows_up_to, pitr_story, Restored
from test_restore_rollback import hand_made_set

PREFIX = "repl"


def snap(config, *args, **kwargs):
    return run_script("pg_zfs_snap", *args, config=config, **kwargs)


def restore(config, *args):
    return run_script("pg_zfs_restore", *args, config=config, timeout=300)


def set_names(tb):
    """The guest's sets of this module, oldest first."""
    return sorted(set(s.split("@", 1)[1] for s in tb.zfs.snapshots() if s.split("@", 1)[1].startswith(PREFIX + "_")))


def take_set(rep):
    before = set(set_names(rep.tb))
    proc = snap(rep.config, "snapshot", "--no-prune", timeout=180)
    assert proc.returncode == 0, proc.stderr
    [name] = set(set_names(rep.tb)) - before
    return name


def pgzfs_properties(snapshot):
    out = sh(["zfs", "get", "-H", "-o", "property,value", "all", snapshot]).stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if line.startswith("pgzfs:"))


def guid(snapshot):
    return sh(["zfs", "get", "-Hp", "-o", "value", "guid", snapshot]).stdout.strip()


def copies(rep):
    """Every snapshot on the replica's pool."""
    return rep.host.pool.snapshots()


def copy_of(rep, dataset, name):
    return "%s/%s@%s" % (rep.parent, dataset.partition("/")[2], name)


def complete_there(rep):
    """The sets `list --replica r1` shows complete on the replica."""
    proc = snap(rep.config, "list", "--replica", "r1")
    assert proc.returncode == 0, proc.stderr
    table = [line.split("\t")[0] for line in proc.stdout.splitlines()[1:] if line.split("\t")[3] == "complete"]
    as_json = snap(rep.config, "list", "--replica", "r1", "--json")      # the same, for a machine
    assert as_json.returncode == 0, as_json.stderr
    listed = json.loads(as_json.stdout)
    assert (listed["replica"], listed["target"]) == ("r1", rep.parent)
    assert [row["set"] for row in listed["sets"] if row["replica"] and row["replica"]["state"] == "complete"
            and not row["replica"]["other_guid"]] == table
    return table


def assert_arrived_whole(rep, name):
    """Every snapshot of set name has its copy with the same GUID, the source's pgzfs:*
    and copy_of; the source notes the replica in pgzfs:replicated_to."""
    for dataset in rep.tb.datasets:
        source, target = "%s@%s" % (dataset, name), copy_of(rep, dataset, name)
        assert guid(target) == guid(source)
        sent = pgzfs_properties(source)
        assert sent.pop("pgzfs:replicated_to").split() == ["r1"]
        assert pgzfs_properties(target) == dict(sent, **{"pgzfs:copy_of": dataset})


def install_receiver(host):
    """pg_zfs_receive as `pg_zfs_snap.py receiver-script` writes it, in the replica
    host's HOME/bin (0755); its path."""
    receiver = os.path.join(host.home, "bin", "pg_zfs_receive")
    os.makedirs(os.path.dirname(receiver))
    script = run_script("pg_zfs_snap", "receiver-script")
    assert script.returncode == 0, script.stderr
    with open(receiver, "w") as out:
        out.write(script.stdout)
    os.chmod(receiver, 0o755)
    return receiver


def install_key(host, config, receiver):
    """The replica's key lines as `pg_zfs_snap.py authorized-keys` prints them for config
    (the comment, the line), the line installed as the replica host's only one."""
    keys = snap(config, "authorized-keys", "--receiver-path", receiver)
    assert keys.returncode == 0, keys.stderr
    comment, line = keys.stdout.splitlines()[-2:]
    with open(host.authorized_keys, "w") as out:
        out.write(line + "\n")
    return comment, line


def replica_host_config(tb, path, port, snapshot, mount_root):
    """The config a restore on the replica host runs with (README "The guest's host is
    gone"): [postgres] on port, its own [snapshot] section, the archive of host2
    alone, clones below mount_root, WAL in PATH_wal (not on ZFS or btrfs); path."""
    sections = {"postgres": {"bindir": tb.pg_bindir, "user": PG_USER, "port": str(port), "dbname": "postgres"},
                "snapshot": snapshot}
    sections.update(tb.archive_config())
    sections["archive"]["sources"] = "host2"
    del sections["source host1"]
    wal_root = os.path.splitext(path)[0] + "_wal"
    os.makedirs(wal_root)
    sh(["chown", PG_USER, wal_root])
    sections["restore"] = {"mount_root": mount_root, "wal_root": wal_root, "timeout": "240"}
    return tb.write_config(path, sections=sections)


@pytest.fixture(scope="module")
def rep(tb):
    tb.standby
    s = Story()
    s.tb = tb
    s.host = ReplicaHost(tb)
    try:
        s.parent = s.host.pool.create("guest1")
        receiver = install_receiver(s.host)
        replica = {"host": s.host.address, "port": s.host.port, "user": "root", "identity_file": s.host.key,
                   "ssh_options": s.host.ssh_options, "target": s.parent, "keep_hourly": 0, "keep_daily": 7,
                   "keep_weekly": 0, "keep_monthly": 0}
        s.replica_keys = replica
        s.config = tb.write_config(os.path.join(tb.run_dir, "replicate.conf"), {
            "snapshot": {"prefix": PREFIX, "keep_hourly": 0, "keep_daily": 7, "keep_weekly": 4,
                         "keep_monthly": 3},
            "replica r1": replica})
        # The key's line as the guest prints it, installed as the replica's only one.
        _, s.key_line = install_key(s.host, s.config, receiver)
        # On the replica host: its own config, the received datasets and the surviving archive host.
        s.replica_config = replica_host_config(
            tb, os.path.join(tb.run_dir, "on_the_replica.conf"), tb.standby.port,
            {"backend": "zfs", "prefix": PREFIX, "datasets": " ".join("%s/data%02d" % (s.parent, n)
                                                                      for n in (1, 2, 3, 4))},
            os.path.join(s.host.home, "restore"))
        pitr_story(tb, s, lambda: take_set(s), "repl_point")
        s.sets = set_names(tb)
        assert len(s.sets) == 2
        yield s
    finally:
        restore(getattr(s, "replica_config", None) or "/nonexistent", "cleanup", "--all")
        for snapshot in tb.zfs.snapshots():
            if snapshot.split("@", 1)[1].startswith(PREFIX + "_"):
                tb.zfs.destroy(snapshot)
        tb.primary.psql("DROP TABLE IF EXISTS bulk")
        s.host.teardown()


def assert_a_second_run_sends_nothing_and_check_is_ok(rep, newest, count):
    """Once the replica holds every set (count, the newest named newest), replicate
    sends nothing and check --replica is OK."""
    again = snap(rep.config, "replicate", "--no-prune")
    assert again.returncode == 0, again.stderr
    assert "holds every set: the newest, %s" % newest in again.stderr and "sent " not in again.stderr
    check = snap(rep.config, "check", "--replica", "r1")
    assert check.returncode == 0, check.stdout
    assert re.match(r"^PG_ZFS_SNAP OK - \[replica r1\] root@\S+: newest set %s is \d+s old, %d complete sets "
                    r"\| age=\d+s sets=%d$" % (newest, count, count), check.stdout.strip()), check.stdout


# -- sending ---------------------------------------------------------------------------


def test_the_first_run_sends_each_set_whole_then_from_the_one_before_and_a_second_run_nothing(rep):
    a, b = rep.sets
    proc = snap(rep.config, "replicate", "--no-prune", timeout=300)
    assert proc.returncode == 0, proc.stderr
    for dataset in rep.tb.datasets:
        assert re.search(r"sent %s@%s to \S+ \(full\): " % (dataset, a), proc.stderr), proc.stderr
        assert re.search(r"sent %s@%s to \S+ \(incremental from %s\): " % (dataset, b, a), proc.stderr)
    assert proc.stderr.index("set %s complete on" % a) < proc.stderr.index("sent %s@%s" % (rep.tb.datasets[0], b))
    for name in (a, b):
        assert_arrived_whole(rep, name)
    assert complete_there(rep) == [a, b]
    assert_a_second_run_sends_nothing_and_check_is_ok(rep, b, 2)


def test_a_restore_on_the_replica_to_a_time_between_two_sets_has_the_primarys_rows_by_then(rep):
    """The replica's own config: datasets below the parent, the archive of host2
    only. The set's properties name the guest's datasets; the restore maps them."""
    target = rep.target_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    proc = restore(rep.replica_config, "restore", "--target-time", target, "--action", "promote")
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "restored set %s to" % rep.sets[0] in proc.stdout
        copy = Restored(proc, rep.tb)
        assert copy.pgdata.startswith(os.path.join(rep.host.home, "restore", "guest1_data02_restore_"))
        assert_rows_up_to(rep, copy.rows(), rep.target_time, rep.target_committed)
        tablespace = copy.psql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'")
        assert tablespace.startswith(os.path.join(rep.host.home, "restore", "guest1_data01_restore_"))
        clones = sh(["zfs", "list", "-H", "-o", "name,origin", "-t", "filesystem", "-r",
                     rep.host.pool.name]).stdout
        assert sorted(line.split("\t")[1] for line in clones.splitlines() if not line.endswith("\t-")) == \
            sorted(copy_of(rep, dataset, rep.sets[0]) for dataset in rep.tb.datasets)
    finally:
        cleanup = restore(rep.replica_config, "cleanup", "--all")
        assert cleanup.returncode == 0, cleanup.stderr


@pytest.mark.host_only("snapshot --replicate's wiring; the incremental send is the first test's")
def test_snapshot_replicate_sends_the_new_set_from_the_one_before(rep):
    before = set(set_names(rep.tb))
    rep.tb.primary.psql("INSERT INTO smoke(note) SELECT md5(g::text) FROM generate_series(1, 2000) g")
    proc = snap(rep.config, "snapshot", "--no-prune", "--replicate", timeout=300)
    assert proc.returncode == 0, proc.stderr
    [c] = set(set_names(rep.tb)) - before
    for dataset in rep.tb.datasets:
        assert re.search(r"sent %s@%s to \S+ \(incremental from %s\): [0-9.]+[BKMG] in " % (dataset, c, rep.sets[1]),
                         proc.stderr), proc.stderr
    assert_arrived_whole(rep, c)
    rep.sets.append(c)


@pytest.mark.host_only("oldest-wal's counting of the replica's sets (the replica's listing is pg_zfs_receive's)")
def test_oldest_wal_counts_the_sets_a_replica_holds_and_stops_when_one_cannot_be_listed(rep):
    """A replica may keep sets the guest has pruned: the archive must keep their
    WAL. A set made on the replica alone, older than every set here, with an
    earlier start_wal, moves oldest-wal back; a replica that cannot be listed
    makes oldest-wal refuse (exit 1) rather than name a file too late."""
    here = snap(rep.config, "oldest-wal")
    assert here.returncode == 0, here.stderr
    assert here.stdout.strip() == pgzfs_properties("%s@%s" % (rep.tb.datasets[1], rep.sets[0]))["pgzfs:start_wal"]
    older = "%s_20000101T000000Z" % PREFIX
    made = []
    try:
        for dataset in rep.tb.datasets:
            source = pgzfs_properties(copy_of(rep, dataset, rep.sets[0]))
            source.update({"pgzfs:set": older, "pgzfs:start_wal": "000000010000000000000001"})
            stop = source.pop("pgzfs:stop_lsn")
            argv = ["zfs", "snapshot"]
            for key, value in sorted(source.items()):
                argv += ["-o", "%s=%s" % (key, value)]
            snapshot = copy_of(rep, dataset, older)
            sh(argv + [snapshot])
            made.append(snapshot)
            sh(["zfs", "set", "pgzfs:stop_lsn=" + stop, snapshot])
        assert older in complete_there(rep)
        proc = snap(rep.config, "oldest-wal")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "000000010000000000000001"
        lines = snap(rep.config, "oldest-wal", "--commands")
        assert lines.returncode == 0, lines.stderr
        assert "pg_archivecleanup -x .gz \"$d\" 000000010000000000000001" in lines.stdout
    finally:
        for snapshot in made:
            rep.host.pool.destroy(snapshot)
    unreachable = rep.tb.write_config(os.path.join(rep.tb.run_dir, "replica_gone.conf"), {
        "snapshot": {"prefix": PREFIX},
        "replica r1": dict(rep.replica_keys, port=free_port(rep.host.address), ssh_options="-o ConnectTimeout=5")})
    proc = snap(unreachable, "oldest-wal")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "cannot be listed" in proc.stderr and "keep every archived WAL file" in proc.stderr


def processes(wanted, program=b"zfs"):
    """PIDs of the processes of program on this machine whose argument list wanted(args) likes."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as cmdline:
                args = cmdline.read().split(b"\0")
        except (OSError, IOError):
            continue
        if args and os.path.basename(args[0]) == program and wanted(args):
            found.append(int(entry))
    return found


def receive_processes(parent):
    """`zfs receive ... PARENT` (the replica's side)."""
    return processes(lambda args: b"receive" in args and args[-2:] == [parent.encode(), b""])


def send_processes(pool):
    """`zfs send` of a snapshot of pool."""
    return processes(lambda args: args[1:2] == [b"send"] and any(arg.startswith(pool.encode() + b"/")
                                                                 for arg in args))


def slow_replicate_cut(rep, config, cut, receives=None, ours=None):
    """Run replicate with config (a bwlimit) and, once a receive has run three seconds
    (the small datasets' take well under one: it is PGDATA's, tens of MiB at 2
    MiB/s), cut(receive pid, replicate Popen); (exit code, stderr). No send or
    receive of ours is left running afterwards. receives(), ours(): the PIDs of
    the receives there, of every send or receive of ours (zfs's by default)."""
    receives = receives or (lambda: receive_processes(rep.parent))
    ours = ours or (lambda: receive_processes(rep.parent) + send_processes(rep.tb.zfs.name))
    run = subprocess.Popen([PY36, os.path.join(BIN, "pg_zfs_snap.py"), "-c", config, "replicate", "--no-prune"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        seen = {}

        def long_receive():
            now = time.time()
            for pid in receives():
                if now - seen.setdefault(pid, now) > 3:
                    return pid
            assert run.poll() is None, run.communicate()
            return None
        cut(wait_for(long_receive, 120, "a long receive", interval=0.2), run)
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    wait_for(lambda: not ours(), 30, "no send or receive left")
    return run.returncode, err


def replay_bulk_table(tb, standby, table, rows):
    """A table of `rows` rows (about 560 bytes each) on the primary, replayed by standby."""
    tb.primary.psql("CREATE TABLE %s AS SELECT g, repeat(md5(g::text), 16) AS filler "
                    "FROM generate_series(1, %d) g" % (table, rows))
    lsn = tb.primary.psql("SELECT pg_current_wal_lsn()")
    wait_for(lambda: standby.psql("SELECT pg_last_wal_replay_lsn() >= '%s'" % lsn) == "t", 60,
             "the standby to replay the bulk table")


def assert_the_newest_set_there_drills(rep):
    """A drill on the replica's config passes with the newest set complete there (its
    stop segment archived first: a drill passes over a set waiting for WAL)."""
    rep.tb.switch_wal()
    drill = restore(rep.replica_config, "drill", "--query", "SELECT count(*) FROM pitr")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert drill.stdout.startswith("OK: drill of set %s " % rep.sets[-1])


def bulk_set_and_slow_config(rep, table, rows, config_name):
    """A set after a bulk table of `rows` rows (tens of MiB), and a config sending at 2 MiB/s."""
    tb = rep.tb
    replay_bulk_table(tb, tb.standby, table, rows)
    return take_set(rep), tb.write_config(os.path.join(tb.run_dir, config_name), {
        "snapshot": {"prefix": PREFIX}, "replica r1": dict(rep.replica_keys, bwlimit="2M")})


def test_a_receive_killed_mid_stream_leaves_the_last_complete_set_restorable_and_the_next_run_repairs(rep):
    tb = rep.tb
    d, slow = bulk_set_and_slow_config(rep, "bulk", 60000, "replicate_slow.conf")
    # Kill the zfs receive on the replica while PGDATA's stream is under way.
    code, err = slow_replicate_cut(rep, slow, lambda pid, run: os.kill(pid, 9))
    assert code == 1, err
    assert re.search(r"ERROR: zfs recv on %s: " % re.escape(rep.host.address), err), err
    assert "1 replica(s) not brought up to date" in err
    assert complete_there(rep) == rep.sets
    assert not [name for name in copies(rep) if name.endswith("@" + d) and name.startswith(rep.parent + "/data02@")]
    # SIGTERM to replicate itself: it ends its zfs send and ssh, exit 1, the same state there.
    code, err = slow_replicate_cut(rep, slow, lambda pid, run: run.terminate())
    assert code == 1 and "stopped by signal 15" in err, err
    assert complete_there(rep) == rep.sets
    # The newest complete set there still restores.
    assert_the_newest_set_there_drills(rep)
    # The next run sends what did not arrive, and the set is complete there.
    # OpenZFS (zfs recv -s) kept the cut stream: the token resumes it (zfs send -t);
    # zfs-fuse has no resumable receive: the set is sent again.
    again = snap(rep.config, "replicate", "--no-prune", timeout=300)
    assert again.returncode == 0, again.stderr
    assert "sending " not in again.stderr       # not on a terminal: no progress lines
    if kernel_zfs():
        assert re.search(r"resumed the cut receive of %s/data02: [0-9.]+[BKMGT] more in " % re.escape(rep.parent),
                         again.stderr), again.stderr
        assert "data02@%s to" % d not in again.stderr
    else:
        assert re.search(r"sent %s/data02@%s to \S+ \(incremental from %s\): [0-9.]+M in " % (
            tb.zfs.name, d, rep.sets[-1]), again.stderr), again.stderr
    assert_arrived_whole(rep, d)
    rep.sets.append(d)
    assert complete_there(rep) == rep.sets


# -- what each side keeps --------------------------------------------------------------


def test_on_a_terminal_a_long_send_shows_its_progress(rep):
    tb = rep.tb
    d, slow = bulk_set_and_slow_config(rep, "bulk2", 30000, "replicate_progress.conf")
    code, _, err = on_a_terminal([PY36, os.path.join(BIN, "pg_zfs_snap.py"), "-c", slow, "replicate",
                                  "--no-prune"])
    assert code == 0, err
    lines = re.findall(r"sending %s/data02@%s to %s: [0-9.]+[BKMGT]( of [0-9.]+[BKMGT] \(\d+%%\))?, "
                       r"[0-9.]+[BKMGT]/s" % (re.escape(tb.zfs.name), d, re.escape(rep.host.address)), err)
    assert lines, err
    if kernel_zfs():        # zfs send -nvP estimates the stream: the share and the time left
        assert all(share for share in lines), err
    assert_arrived_whole(rep, d)
    rep.sets.append(d)
    assert complete_there(rep) == rep.sets


@pytest.mark.host_only("the replica's retention is our decision; zfs destroy of a set is test_snap's prune")
def test_the_replica_keeps_by_its_own_policy_and_never_a_snapshot_the_tool_did_not_send(rep):
    data02 = "%s/data02" % rep.parent
    decoys = ["%s@%s_20000101T000000Z" % (data02, PREFIX), "%s@manual" % data02]
    sh(["zfs", "snapshot", decoys[0]])
    sh(["zfs", "snapshot", "-o", "pgzfs:set=%s_20000102T000000Z" % PREFIX, "-o", "pgzfs:datasets=%s" % data02,
        "-o", "pgzfs:stop_lsn=0/1", "%s@%s_20000102T000000Z" % (data02, PREFIX)])
    decoys.append("%s@%s_20000102T000000Z" % (data02, PREFIX))
    sh(["zfs", "snapshot", decoys[1]])
    try:
        # Its own keep_*: only the newest set of today; the guest keeps its 7 days.
        strict = rep.tb.write_config(os.path.join(rep.tb.run_dir, "replicate_strict.conf"), {
            "snapshot": {"prefix": PREFIX}, "replica r1": dict(rep.replica_keys, keep_daily=1)})
        proc = snap(strict, "replicate")
        assert proc.returncode == 0, proc.stderr
        for name in rep.sets[:-1]:
            assert "pruned set %s on [replica r1]" % name in proc.stderr
        assert complete_there(rep) == rep.sets[-1:]
        assert set(decoys) <= set(copies(rep))
        assert set_names(rep.tb) == rep.sets        # nothing pruned here
    finally:
        for decoy in decoys:
            rep.host.pool.destroy(decoy)


@pytest.mark.host_only("which set the guest keeps is our decision; the incremental send is the first test's")
def test_the_guest_keeps_the_set_the_next_send_builds_on_and_the_send_uses_it(rep):
    e = take_set(rep)
    # The guest's keep_* all 0: it keeps its newest set (e) and nothing else but the
    # set the replica holds (the last one sent), the base of the next send. (Not
    # keep_daily: a run across midnight would keep yesterday's newest by that rule.)
    newest_only = rep.tb.write_config(os.path.join(rep.tb.run_dir, "replicate_newest.conf"), {
        "snapshot": {"prefix": PREFIX, "keep_hourly": 0, "keep_daily": 0, "keep_weekly": 0,
                     "keep_monthly": 0}, "replica r1": rep.replica_keys})
    proc = snap(newest_only, "prune")
    assert proc.returncode == 0, proc.stderr
    assert "set %s kept: the base of the next send to [replica r1]" % rep.sets[-1] in proc.stderr
    assert set_names(rep.tb) == [rep.sets[-1], e]
    sent = snap(rep.config, "replicate", "--no-prune")
    assert sent.returncode == 0, sent.stderr
    assert "sent %s/data02@%s to %s:%s/data02 (incremental from %s)" % (
        rep.tb.zfs.name, e, rep.host.address, rep.parent, rep.sets[-1]) in sent.stderr
    rep.sets[:] = [rep.sets[-1], e]


def test_dry_run_prints_each_stream_and_its_size_and_changes_nothing(rep):
    f = take_set(rep)
    before = copies(rep)
    proc = snap(rep.config, "replicate", "--dry-run", "--no-prune")
    assert proc.returncode == 0, proc.stderr
    for dataset in rep.tb.datasets:
        assert re.search(r"^would send %s@%s to %s:%s \(incremental from %s\): [0-9.]+[BKMG] \(" % (
            dataset, f, rep.host.address, copy_of(rep, dataset, f).partition("@")[0], rep.sets[-1]),
            proc.stdout, re.MULTILINE), proc.stdout
    assert "would make set %s complete on [replica r1]" % f in proc.stdout
    assert copies(rep) == before
    assert "replicated_to" not in pgzfs_properties("%s@%s" % (rep.tb.datasets[1], f))


# -- the key on the replica ------------------------------------------------------------


def test_the_key_line_is_restricted_to_the_receiver_below_the_parent_from_the_guest(rep):
    assert rep.key_line.startswith('restrict,from="%s",command="%s %s" ssh-ed25519 ' % (
        rep.host.guest_address, os.path.join(rep.host.home, "bin", "pg_zfs_receive"), rep.parent))


@pytest.mark.parametrize("command", [
    "id",
    "sh -c id",
    "zfs destroy {parent}",
    "zfs destroy -r {parent}",
    "zfs recv -u -d {pool}",
    "zfs recv -u {pool}/elsewhere",
    "zfs destroy {parent}/data02@{set};id",
    "zfs set 'mountpoint=/etc' {parent}/data02",
    "zfs list -r {pool}",
    "cat /etc/shadow",
    "scp -t /tmp",
])
@pytest.mark.host_only("the forced command's refusals are pg_zfs_receive's (sh), not ZFS's")
def test_the_forced_command_refuses_anything_but_its_verbs_below_the_parent(rep, command):
    before = sh(["zfs", "list", "-H", "-t", "all", "-o", "name,mountpoint", "-r", rep.host.pool.name]).stdout
    done = rep.host.ssh(command.format(parent=rep.parent, pool=rep.host.pool.name, set=rep.sets[-1]))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "pg_zfs_receive: refused: " in done.stderr
    assert done.stdout == ""
    assert sh(["zfs", "list", "-H", "-t", "all", "-o", "name,mountpoint", "-r", rep.host.pool.name]).stdout == before


@pytest.mark.host_only("sshd's from=")
def test_the_key_is_refused_from_any_other_address(rep):
    done = rep.host.ssh("zfs get -rHp -o name,property,value guid %s" % rep.parent, bind=False)
    assert done.returncode == 255 and "Permission denied" in done.stderr
    allowed = rep.host.ssh("zfs get -rHp -o name,property,value guid %s" % rep.parent)
    assert allowed.returncode == 0 and rep.parent in allowed.stdout


# -- the key as setup_guest.py installs it ----------------------------------------------

TREE_SSHD_PORT = 2224


def setup_guest(*args):
    return run_script("setup_guest", *args)


@pytest.mark.host_only("the key line setup_guest writes and sshd enforces; a non-root receive on OpenZFS is test_replicate_delegated's")
def test_the_line_setup_guest_prints_and_installs_lets_replicate_send_and_the_key_do_nothing_else(rep):
    """On the guest, setup_guest.py --install (into a tree) makes the replica's key and
    prints its line; on the replica, --role replica --install writes pg_zfs_receive and
    the line into a tree that a second sshd of the replica sees as its / (root's home
    and /usr/local/bin: ReplicaHost.sshd_seeing). replicate sends a small hand-made
    set through that key; the same key gets no shell and cannot destroy the parent."""
    tb, host = rep.tb, rep.host
    guest_tree, replica_tree = (os.path.join(tb.run_dir, name) for name in ("sg_guest_tree", "sg_replica_tree"))
    sshd = host.sshd_seeing(replica_tree, TREE_SSHD_PORT)
    # Made after the sshd started: its mount namespace holds no copy of their mounts.
    datasets = [tb.zfs.create("sgr_ts"), tb.zfs.create("sgr_pg")]
    parent = host.pool.name + "/viasetup"
    try:
        name = hand_made_set(tb, datasets, "sgr_20261125T040000Z")
        replica = {"host": host.address, "port": TREE_SSHD_PORT, "user": "root",
                   "identity_file": "/etc/pg_zfs/replica_key", "ssh_options": host.ssh_options,
                   "target": parent, "keep_hourly": 0, "keep_daily": 7, "keep_weekly": 0, "keep_monthly": 0}
        sections = {"postgres": {"pgdata": os.path.join(tb.zfs.mountpoint(datasets[1]), "pgdata"),
                                 "user": PG_USER},
                    "snapshot": {"backend": "zfs", "datasets": " ".join(datasets), "prefix": "sgr",
                                 "lock_file": os.path.join(tb.run_dir, "sgr.lock"),
                                 "state_file": os.path.join(tb.run_dir, "sgr-state.json")},
                    "guest": {"primary_conninfo": "host=unused"},
                    "replica s1": replica}
        config = tb.write_config(os.path.join(tb.run_dir, "sgr.conf"), sections=sections)
        guest = setup_guest("-c", config, "--role", "guest", "--install", "--using", "cron", "--root", guest_tree)
        assert guest.returncode == 0, guest.stderr
        assert "setup_guest.py --role replica --install --authorized-key 'LINE'" in guest.stdout
        line = guest.stdout.splitlines()[-1]
        key = os.path.join(guest_tree, "etc", "pg_zfs", "replica_key")
        assert line.startswith('restrict,from="%s",command="/usr/local/bin/pg_zfs_receive %s" ssh-ed25519 '
                               % (host.guest_address, parent)), guest.stdout
        installed = setup_guest("--role", "replica", "--install", "--authorized-key", line, "--root", replica_tree)
        assert installed.returncode == 0, installed.stderr
        create = installed.stdout.splitlines()[-1]
        assert create == "zfs create -p " + parent
        sh(create.split())                       # the next step it prints, as the DBA runs it
        # replicate as root's cron runs it on the guest, with the key in the guest's tree.
        replica["identity_file"] = key
        sending = tb.write_config(os.path.join(tb.run_dir, "sgr_send.conf"), sections=sections)
        sent = snap(sending, "replicate", "--replica", "s1", "--no-prune", timeout=180)
        assert sent.returncode == 0, sent.stderr
        for dataset in datasets:
            assert guid("%s/%s@%s" % (parent, dataset.partition("/")[2], name)) == guid("%s@%s" % (dataset, name))
        assert "pg_zfs_receive" in open(os.path.join(host.home, "sshd_%d.log" % TREE_SSHD_PORT)).read()
        # The same key: no shell, no destroy of the parent, no session without a command.
        before = sh(["zfs", "list", "-H", "-t", "all", "-o", "name", "-r", host.pool.name]).stdout
        for command in ("sh -c id", "zfs destroy -r %s" % parent, "zfs destroy %s" % parent, None):
            done = host.ssh(command, port=TREE_SSHD_PORT, key=key)
            assert done.returncode == 1 and "pg_zfs_receive: refused: " in done.stderr, (command, done)
            assert done.stdout == ""
        assert host.ssh("true", bind=False, port=TREE_SSHD_PORT, key=key).returncode == 255    # from elsewhere
        assert sh(["zfs", "list", "-H", "-t", "all", "-o", "name", "-r", host.pool.name]).stdout == before
    finally:
        host.stop_sshd(sshd)
        if host.pool.exists(parent):
            host.pool.destroy(parent, recursive=True)
        for dataset in datasets:
            tb.zfs.destroy(dataset, recursive=True)

