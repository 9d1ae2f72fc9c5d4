"""pg_zfs_snap.py replicate with `backend = btrfs`, against the real components: a
streaming standby of this module's own on subvolumes of the testbed's btrfs
(MOUNT/rp/data01..04, test_restore_btrfs's BtrfsStandby) sends its sets to a
second loop-mounted btrfs (a ReplicaHost with btrfs=True) through a real sshd
on loopback whose only key, root's, runs pg_zfs_receive as forced command;
pg_zfs_restore.py run with the replica's own config restores there.

Layout there: the copy of MOUNT/rp/NAME is TARGET/NAME, so its snapshots are
TARGET/.pgzfs/NAME@SET (read-only, received by btrfs receive) with
NAME@SET.json beside them: the layout the guest's sets have.

The story the module sets up once, on prefix rpb: a loop inserts rows on the
primary; set A; the target time T; set B; the WAL archived (test_restore's
pitr_story). Later tests add sets. Each test says what it proves.
"""

import json
import os
import re

import pytest

from testbed import ReplicaHost, free_port, sh
from test_replicate import (assert_a_second_run_sends_nothing_and_check_is_ok, assert_the_newest_set_there_drills,
                            complete_there, install_key, install_receiver, processes, replay_bulk_table,
                            replica_host_config, restore, slow_replicate_cut, snap)
from test_restore import Restored, Story, assert_rows_up_to, pitr_story
from test_restore_btrfs import BtrfsStandby

PREFIX = "rpb"
SIZE_UNITS = "BKMGTP"


def show(path):
    """{field: value} of `btrfs subvolume show PATH` (UUID, Received UUID, Flags...)."""
    out = sh(["btrfs", "subvolume", "show", path]).stdout
    return dict((key.strip(), value.strip()) for key, _, value in
                (line.partition(":") for line in out.splitlines()[1:]) if value.strip())


def is_subvolume(path):
    return os.path.isdir(path) and os.lstat(path).st_ino == 256


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def size_of(text):
    """Bytes of a size as pg_zfs_snap prints it (human_size: 512B, 1.5K, 30.2M)."""
    return float(text[:-1]) * 1024 ** SIZE_UNITS.index(text[-1])


def take_set(rep):
    before = set(rep.bt.set_names())
    proc = snap(rep.config, "snapshot", "--no-prune", timeout=180)
    assert proc.returncode == 0, proc.stderr
    [name] = set(rep.bt.set_names()) - before
    return name


def copy_path(rep, subvolume, name):
    """TARGET/.pgzfs/NAME@SET: where the copy of subvolume's snapshot of set name lands."""
    return os.path.join(rep.parent, ".pgzfs", "%s@%s" % (os.path.basename(subvolume), name))


def copies(rep):
    """Every entry of the replica's TARGET/.pgzfs: a JSON file's text, a subvolume's
    received UUID and flags."""
    directory = os.path.join(rep.parent, ".pgzfs")
    found = []
    for entry in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        path = os.path.join(directory, entry)
        if is_subvolume(path):
            found.append((entry, show(path)["Received UUID"], show(path)["Flags"]))
        elif os.path.isfile(path):
            found.append((entry, open(path).read()))
        else:
            found.append((entry, sorted(os.listdir(path))))
    return found


def assert_arrived_whole(rep, name):
    """Each snapshot of set name has its copy there: read-only, its Received UUID the
    snapshot's UUID here, its JSON the snapshot's here without replicated_to, plus
    copy_of; here the set names the replica in replicated_to."""
    for subvolume in rep.bt.subvolumes:
        here, there = rep.bt.snapshot_path(subvolume, name), copy_path(rep, subvolume, name)
        copy = show(there)
        assert copy["Received UUID"] == show(here)["UUID"]
        assert copy["Flags"] == "readonly"
        sent = read_json(here + ".json")
        assert sent.pop("replicated_to").split() == ["r1"]
        assert read_json(there + ".json") == dict(sent, copy_of=subvolume)


def with_replica(config, path, replica):
    """A copy of config (an ini file) with a [replica r1] section of these keys."""
    with open(config) as handle:
        text = handle.read()
    with open(path, "w") as out:
        out.write(text + "\n[replica r1]\n" + "".join("%s = %s\n" % item for item in sorted(replica.items())))
    return path


@pytest.fixture(scope="module")
def rep(tb):
    s = Story()
    s.tb = tb
    s.bt = BtrfsStandby(tb, "rp", PREFIX)
    s.host = ReplicaHost(tb, "replica_bt", port=2225, btrfs=True)
    try:
        s.parent = os.path.join(s.host.btrfs.mountpoint, "guest1")
        os.makedirs(s.parent)
        s.receiver = install_receiver(s.host)
        s.replica_keys = {"host": s.host.address, "port": s.host.port, "user": "root", "identity_file": s.host.key,
                          "ssh_options": s.host.ssh_options, "target": s.parent, "keep_hourly": 0,
                          "keep_daily": 7, "keep_weekly": 0, "keep_monthly": 0}
        s.config = with_replica(s.bt.config, os.path.join(tb.run_dir, "replicate_btrfs.conf"), s.replica_keys)
        # The key's line as the guest prints it, installed as the replica's only one.
        s.key_comment, s.key_line = install_key(s.host, s.config, s.receiver)
        # On the replica host: its own config, the copies' subvolume paths (none of
        # which exists there: only their snapshots do) and the surviving archive host.
        s.replica_config = replica_host_config(
            tb, os.path.join(tb.run_dir, "on_the_btrfs_replica.conf"), s.bt.cluster.port,
            {"backend": "btrfs", "prefix": PREFIX, "datasets": " ".join(
                os.path.join(s.parent, os.path.basename(subvolume)) for subvolume in s.bt.subvolumes)},
            os.path.join(s.host.btrfs.mountpoint, "restore"))
        pitr_story(tb, s, lambda: take_set(s), "rpb_point")
        s.sets = s.bt.set_names()
        assert len(s.sets) == 2
        yield s
    finally:
        restore(getattr(s, "replica_config", None) or "/nonexistent", "cleanup", "--all")
        restore(s.bt.config, "cleanup", "--all")
        s.bt.cluster.stop()
        tb.primary.psql("DROP TABLE IF EXISTS rpb_bulk")
        s.host.teardown()


# -- sending ---------------------------------------------------------------------------


def test_the_first_run_sends_each_set_whole_then_from_the_one_before_and_a_second_run_nothing(rep):
    a, b = rep.sets
    proc = snap(rep.config, "replicate", "--no-prune", timeout=300)
    assert proc.returncode == 0, proc.stderr
    sizes = {}
    for subvolume in rep.bt.subvolumes:
        copy = os.path.join(rep.parent, os.path.basename(subvolume))
        full = re.search(r"sent %s@%s to \S+:%s \(full\): (\S+) in " % (subvolume, a, copy), proc.stderr)
        incremental = re.search(r"sent %s@%s to \S+:%s \(incremental from %s\): (\S+) in " % (
            subvolume, b, copy, a), proc.stderr)
        assert full and incremental, proc.stderr
        sizes[subvolume] = size_of(full.group(1)), size_of(incremental.group(1))
    # btrfs send -p: PGDATA's second stream carries what changed in seconds, not the cluster.
    full, incremental = sizes[rep.bt.subvolumes[1]]
    assert full > 20 * 1024 * 1024 and incremental < full / 4, sizes
    assert proc.stderr.index("set %s complete on" % a) < proc.stderr.index("sent %s@%s" % (rep.bt.subvolumes[0], b))
    assert "(4 datasets, UUIDs checked)" in proc.stderr
    for name in (a, b):
        assert_arrived_whole(rep, name)
    # Only the snapshots arrive: no subvolume TARGET/NAME, nothing beside .pgzfs.
    assert os.listdir(rep.parent) == [".pgzfs"]
    assert complete_there(rep) == [a, b]
    assert_a_second_run_sends_nothing_and_check_is_ok(rep, b, 2)


def test_a_restore_on_the_replica_to_a_time_between_two_sets_has_the_primarys_rows_by_then(rep):
    """The replica's own config: backend btrfs, datasets TARGET/NAME (which do not
    exist there), the archive of host2 only. The sets' metadata name the guest's
    subvolumes; the restore maps them."""
    target = rep.target_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    proc = restore(rep.replica_config, "restore", "--target-time", target, "--action", "promote")
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "restored set %s to" % rep.sets[0] in proc.stdout
        copy = Restored(proc, rep.tb)
        clones = os.path.join(rep.host.btrfs.mountpoint, "restore")
        assert copy.pgdata == os.path.join(clones, "data02_restore_%s" % rep.sets[0], "pgdata")
        assert_rows_up_to(rep, copy.rows(), rep.target_time, rep.target_committed)
        tablespace = copy.psql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'")
        assert tablespace == os.path.join(clones, "data01_restore_%s" % rep.sets[0], "ts1")
        assert sorted(os.listdir(os.path.join(rep.parent, ".pgzfs", "clones"))) == sorted(
            "%s_restore_%s.json" % (os.path.basename(s), rep.sets[0]) for s in rep.bt.subvolumes)
    finally:
        cleanup = restore(rep.replica_config, "cleanup", "--all")
        assert cleanup.returncode == 0, cleanup.stderr
    assert not os.path.exists(os.path.join(rep.host.btrfs.mountpoint, "restore")) or \
        os.listdir(os.path.join(rep.host.btrfs.mountpoint, "restore")) == []


def test_snapshot_replicate_sends_the_new_set_from_the_one_before(rep):
    rep.tb.primary.psql("INSERT INTO smoke(note) SELECT md5(g::text) FROM generate_series(1, 2000) g")
    before = set(rep.bt.set_names())
    proc = snap(rep.config, "snapshot", "--no-prune", "--replicate", timeout=300)
    assert proc.returncode == 0, proc.stderr
    [c] = set(rep.bt.set_names()) - before
    for subvolume in rep.bt.subvolumes:
        assert re.search(r"sent %s@%s to \S+ \(incremental from %s\): [0-9.]+[BKMG] in " % (
            subvolume, c, rep.sets[-1]), proc.stderr), proc.stderr
    assert_arrived_whole(rep, c)
    rep.sets.append(c)


def test_oldest_wal_counts_the_sets_the_replica_holds(rep):
    """A set on the replica alone, older than every set here, with an earlier
    start_wal (made there from the copies of the oldest set), moves oldest-wal back."""
    here = snap(rep.config, "oldest-wal")
    assert here.returncode == 0, here.stderr
    oldest = read_json(rep.bt.snapshot_path(rep.bt.subvolumes[1], rep.sets[0]) + ".json")
    assert here.stdout.strip() == oldest["start_wal"]
    older = "%s_20000101T000000Z" % PREFIX
    made = [copy_path(rep, subvolume, older) for subvolume in rep.bt.subvolumes]
    try:
        for subvolume, copy in zip(rep.bt.subvolumes, made):
            sh(["btrfs", "subvolume", "snapshot", "-r", copy_path(rep, subvolume, rep.sets[0]), copy])
            metadata = read_json(copy_path(rep, subvolume, rep.sets[0]) + ".json")
            metadata.update(set=older, start_wal="000000010000000000000001")
            with open(copy + ".json", "w") as out:
                json.dump(metadata, out)
        assert older in complete_there(rep)
        proc = snap(rep.config, "oldest-wal")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "000000010000000000000001"
    finally:
        for copy in made:
            if is_subvolume(copy):
                sh(["btrfs", "subvolume", "delete", copy])
            if os.path.exists(copy + ".json"):
                os.unlink(copy + ".json")


def btrfs_processes(rep):
    """(PIDs of `btrfs receive ... TARGET/.pgzfs` there, of every btrfs send or receive of ours)."""
    there = os.path.join(rep.parent, ".pgzfs").encode()

    def receives():
        return processes(lambda args: args[1:2] == [b"receive"] and args[-2:] == [there, b""], b"btrfs")

    def ours():
        return receives() + processes(lambda args: args[1:2] == [b"send"] and any(
            arg.startswith(rep.bt.snapshot_dir.encode() + b"/") for arg in args), b"btrfs")
    return receives, ours


def test_a_receive_killed_mid_stream_leaves_the_last_complete_set_restorable_and_the_next_run_repairs(rep):
    replay_bulk_table(rep.tb, rep.bt.cluster, "rpb_bulk", 20000)
    d = take_set(rep)
    slow = with_replica(rep.bt.config, os.path.join(rep.tb.run_dir, "replicate_btrfs_slow.conf"),
                        dict(rep.replica_keys, bwlimit="1M"))
    # Kill the btrfs receive on the replica while PGDATA's stream is under way (11 MiB at 1 MiB/s).
    receives, ours = btrfs_processes(rep)
    code, err = slow_replicate_cut(rep, slow, lambda pid, run: os.kill(pid, 9), receives, ours)
    assert code == 1, err
    assert re.search(r"ERROR: btrfs receive on %s: " % re.escape(rep.host.address), err), err
    assert "1 replica(s) not brought up to date" in err
    # What the cut receive left: a writable subvolume without a received UUID, no metadata.
    cut = copy_path(rep, rep.bt.subvolumes[1], d)
    assert is_subvolume(cut) and show(cut)["Flags"] == "-" and show(cut)["Received UUID"] == "-"
    assert not os.path.exists(cut + ".json")
    assert complete_there(rep) == rep.sets
    # The newest complete set there still restores.
    assert_the_newest_set_there_drills(rep)
    # The next run deletes what the cut left and sends the set again (btrfs cannot resume).
    again = snap(rep.config, "replicate", "--no-prune", timeout=300)
    assert again.returncode == 0, again.stderr
    assert "deleted %s, left by a receive cut short" % cut in again.stderr
    assert re.search(r"sent %s@%s to \S+ \(incremental from %s\): [0-9.]+M in " % (
        rep.bt.subvolumes[1], d, rep.sets[-1]), again.stderr), again.stderr
    assert_arrived_whole(rep, d)
    rep.sets.append(d)
    assert complete_there(rep) == rep.sets


def test_dry_run_prints_each_stream_and_what_it_would_delete_and_changes_nothing(rep):
    e = take_set(rep)
    # A leftover as a cut receive leaves it, for the dry run to find.
    leftover = copy_path(rep, rep.bt.subvolumes[3], e)
    sh(["btrfs", "subvolume", "create", leftover])
    before = copies(rep)
    proc = snap(rep.config, "replicate", "--dry-run", "--no-prune")
    assert proc.returncode == 0, proc.stderr
    assert "would delete %s on [replica r1]: a receive cut short" % leftover in proc.stdout
    for subvolume in rep.bt.subvolumes:
        assert re.search(r"^would send %s@%s to %s:%s \(incremental from %s\): [0-9.]+[BKMG] "
                         r"\(counted: btrfs send has no estimate\)$" % (
                             subvolume, e, rep.host.address, os.path.join(rep.parent, os.path.basename(subvolume)),
                             rep.sets[-1]), proc.stdout, re.MULTILINE), proc.stdout
    assert "would make set %s complete on [replica r1]" % e in proc.stdout
    assert copies(rep) == before
    assert "replicated_to" not in read_json(rep.bt.snapshot_path(rep.bt.subvolumes[1], e) + ".json")
    sent = snap(rep.config, "replicate", "--no-prune")
    assert sent.returncode == 0, sent.stderr
    assert "deleted %s, left by a receive cut short" % leftover in sent.stderr
    assert_arrived_whole(rep, e)
    rep.sets.append(e)


# -- what each side keeps --------------------------------------------------------------


def test_the_replica_keeps_by_its_own_policy_and_never_a_subvolume_the_tool_did_not_send(rep):
    snapshot_dir = os.path.join(rep.parent, ".pgzfs")
    data02 = rep.bt.subvolumes[1]
    old = "%s_20000101T000000Z" % PREFIX
    # A set-named snapshot made there by hand, one with metadata but no copy_of (a set
    # of the replica's own, as a btrfs guest there would have it), one with another name.
    decoys = [os.path.join(snapshot_dir, "data02@" + old), os.path.join(snapshot_dir, "data02@%s_20000102T000000Z"
                                                                         % PREFIX),
              os.path.join(snapshot_dir, "data02@manual")]
    metadata = read_json(rep.bt.snapshot_path(data02, rep.sets[0]) + ".json")
    metadata.update(set="%s_20000102T000000Z" % PREFIX, datasets=os.path.join(rep.parent, "data02"),
                    pgdata_dataset=os.path.join(rep.parent, "data02"))
    metadata.pop("replicated_to", None)
    with open(decoys[1] + ".json", "w") as out:
        json.dump(metadata, out)
    for decoy in decoys:
        sh(["btrfs", "subvolume", "snapshot", "-r", copy_path(rep, data02, rep.sets[0]), decoy])
    try:
        # Its own keep_*: only the newest set of today; the guest keeps its 7 days.
        strict = with_replica(rep.bt.config, os.path.join(rep.tb.run_dir, "replicate_btrfs_strict.conf"),
                              dict(rep.replica_keys, keep_daily=1))
        proc = snap(strict, "replicate")
        assert proc.returncode == 0, proc.stderr
        for name in rep.sets[:-1]:
            assert "pruned set %s on [replica r1]" % name in proc.stderr
            for subvolume in rep.bt.subvolumes:
                assert not os.path.exists(copy_path(rep, subvolume, name))
                assert not os.path.exists(copy_path(rep, subvolume, name) + ".json")
        assert complete_there(rep) == rep.sets[-1:]
        assert all(is_subvolume(decoy) for decoy in decoys) and os.path.exists(decoys[1] + ".json")
        assert rep.bt.set_names() == rep.sets        # nothing pruned here
    finally:
        for decoy in decoys:
            sh(["btrfs", "subvolume", "delete", decoy])
        os.unlink(decoys[1] + ".json")


# -- the key on the replica ------------------------------------------------------------


def test_the_key_line_is_roots_restricted_to_the_receiver_below_the_target_from_the_guest(rep):
    assert rep.key_line.startswith('restrict,from="%s",command="%s %s" ssh-ed25519 ' % (
        rep.host.guest_address, rep.receiver, rep.parent))
    assert rep.key_comment.startswith("# [replica r1] root@")
    assert "(mkdir -p %s, on a btrfs there)" % rep.parent in rep.key_comment
    assert "root's key, as btrfs receive needs root (CAP_SYS_ADMIN)" in rep.key_comment


@pytest.mark.parametrize("command", [
    "id",
    "sh -c id",
    "cat /etc/shadow",
    "scp -t /tmp",
    "zfs list",
    "pgzfs-list /",
    "pgzfs-list {mount}",
    "pgzfs-list {parent}/..",
    "pgzfs-list {parent};id",
    "btrfs receive {parent}",
    "btrfs receive {mount}/.pgzfs",
    "btrfs receive -e {parent}/.pgzfs",
    "btrfs receive {parent}/.pgzfs/../..",
    "btrfs subvolume delete {parent}/.pgzfs/data02@{set}",
    "btrfs property set {parent}/.pgzfs/data02@{set} ro false",
    "pgzfs-delete {parent}/.pgzfs",
    "pgzfs-delete {parent}/.pgzfs/data02@manual",
    "pgzfs-delete {parent}/.pgzfs/../.pgzfs/data02@{set}",
    "pgzfs-delete {parent}/data02@{set}",
    "pgzfs-delete {parent}/.pgzfs/data02@{set} {parent}/.pgzfs/data01@{set}",
    "pgzfs-delete {parent}/.pgzfs/data02@{set};id",
    "pgzfs-delete {parent}/.pgzfs/data02@{set}$(id)",
    "pgzfs-write {parent}/.pgzfs/data02@{set}",
    "pgzfs-write /etc/passwd",
    "pgzfs-write {parent}/.pgzfs/clones/x.json",
    "pgzfs-write {parent}/.pgzfs/data02@{set}.json\nid",
])
def test_the_forced_command_refuses_anything_but_its_verbs_below_the_target(rep, command):
    before = copies(rep)
    done = rep.host.ssh(command.format(parent=rep.parent, mount=rep.host.btrfs.mountpoint, set=rep.sets[-1]),
                        input="{}")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "pg_zfs_receive: refused: " in done.stderr
    assert done.stdout == ""
    assert copies(rep) == before


@pytest.mark.parametrize("metadata", ['{"set": "$(id)"}', '{"set": "a\\\\b"}', "{" + " " * 70000 + "}"])
def test_the_forced_command_writes_only_metadata_of_our_characters_and_size(rep, metadata):
    before = copies(rep)
    done = rep.host.ssh("pgzfs-write %s.json" % copy_path(rep, rep.bt.subvolumes[1], rep.sets[-1]), input=metadata)
    assert done.returncode == 1 and "pg_zfs_receive: refused: " in done.stderr, done.stderr
    assert copies(rep) == before
    assert not [entry for entry in os.listdir(os.path.join(rep.parent, ".pgzfs")) if entry.endswith(".tmp")]


def test_the_key_is_refused_from_any_other_address(rep):
    done = rep.host.ssh("pgzfs-list %s" % rep.parent, bind=False)
    assert done.returncode == 255 and "Permission denied" in done.stderr
    allowed = rep.host.ssh("pgzfs-list %s" % rep.parent)
    assert allowed.returncode == 0
    assert "subvolume data02@%s " % rep.sets[-1] in allowed.stdout
    unreachable = with_replica(rep.bt.config, os.path.join(rep.tb.run_dir, "replica_bt_gone.conf"), dict(
        rep.replica_keys, port=free_port(rep.host.address), ssh_options="-o ConnectTimeout=5"))
    check = snap(unreachable, "check", "--replica", "r1")
    assert check.returncode == 3 and check.stdout.startswith("PG_ZFS_SNAP UNKNOWN - "), check.stdout
