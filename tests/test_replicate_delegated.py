"""Replication to a replica where a user without root receives (OpenZFS only).

zfs-fuse has no `zfs allow`: there the replica's user is root (test_replicate).
With kernel OpenZFS, the key of the guest logs in as an ordinary user given
`zfs allow USER create,mount,receive,destroy,userprop PARENT` (the receiver
script's and the example config's advice): the sets arrive whole with their
metadata, the replica is pruned by its own policy, and that user can do
nothing to the pool outside PARENT, nor anything but pg_zfs_receive's verbs
through the key. Runs in the guest (make test-guest); skipped on zfs-fuse.
"""

import os
import subprocess

import pytest

from testbed import ReplicaHost, kernel_zfs, run_script, sh
from test_replicate import install_receiver

pytestmark = pytest.mark.skipif(not kernel_zfs(), reason="zfs-fuse has no zfs allow: its replica receives as root")

PREFIX = "dlg"
USER = "pgzfs_recv"
PERMISSIONS = "create,mount,receive,destroy,userprop"


def snap(config, *args, **kwargs):
    return run_script("pg_zfs_snap", *args, config=config, **kwargs)


def as_user(argv):
    return sh(["runuser", "-u", USER, "--"] + argv, check=False, timeout=60)


def our_sets(tb):
    return sorted(set(s.split("@", 1)[1] for s in tb.zfs.snapshots() if s.split("@", 1)[1].startswith(PREFIX + "_")))


def test_a_user_given_zfs_allow_receives_the_sets_and_can_do_nothing_else(tb):
    tb.standby
    host = ReplicaHost(tb, name="delegated", port=2223)
    sh(["useradd", "--system", "--no-create-home", "--home-dir", host.home, "--shell", "/bin/sh", USER])
    try:
        sh(["usermod", "-p", "*", USER])        # no password, not locked: sshd (UsePAM no) lets the key in
        parent = host.pool.create("guest1")
        other = host.pool.create("other")
        sh(["zfs", "allow", USER, PERMISSIONS, parent])
        receiver = install_receiver(host)
        config = tb.write_config(os.path.join(tb.run_dir, "delegated.conf"), {
            "snapshot": {"prefix": PREFIX, "keep_hourly": 0, "keep_daily": 7, "keep_weekly": 0, "keep_monthly": 0},
            "replica d1": {"host": host.address, "port": host.port, "user": USER, "identity_file": host.key,
                           "ssh_options": host.ssh_options, "target": parent, "keep_hourly": 0, "keep_daily": 1,
                           "keep_weekly": 0, "keep_monthly": 0}})
        keys = snap(config, "authorized-keys", "--receiver-path", receiver)
        assert keys.returncode == 0, keys.stderr
        with open(host.authorized_keys, "w") as out:
            out.write(keys.stdout.splitlines()[-1] + "\n")
        os.chmod(host.authorized_keys, 0o644)

        # Two sets, sent whole then incrementally, by the user; each arrives whole.
        for _ in range(2):
            made = snap(config, "snapshot", "--no-prune", timeout=180)
            assert made.returncode == 0, made.stderr
        sets = our_sets(tb)
        sent = snap(config, "replicate", "--no-prune", timeout=300)
        assert sent.returncode == 0, sent.stderr
        listed = snap(config, "list", "--replica", "d1")
        assert [line.split("\t")[0] for line in listed.stdout.splitlines()[1:]
                if line.split("\t")[3] == "complete"] == sets, listed.stdout + listed.stderr
        for dataset in tb.datasets:
            for name in sets:
                source = "%s@%s" % (dataset, name)
                copy = "%s/%s@%s" % (parent, dataset.partition("/")[2], name)
                assert sh(["zfs", "get", "-Hp", "-o", "value", "guid", copy]).stdout == \
                    sh(["zfs", "get", "-Hp", "-o", "value", "guid", source]).stdout
                assert sh(["zfs", "get", "-H", "-o", "value", "pgzfs:stop_lsn", copy]).stdout.strip() == \
                    sh(["zfs", "get", "-H", "-o", "value", "pgzfs:stop_lsn", source]).stdout.strip()

        # The replica's own policy (keep_daily 1) destroys, as the user, the older set there.
        pruned = snap(config, "replicate", timeout=300)
        assert pruned.returncode == 0, pruned.stderr
        there = sh(["zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", parent]).stdout.split()
        assert sorted(set(name.split("@")[1] for name in there)) == sets[-1:], there

        # Outside PARENT the user has no right: no destroy, no receive, no property.
        marker = sh(["zfs", "snapshot", other + "@keep"])
        assert marker.returncode == 0
        for argv in (["zfs", "destroy", other + "@keep"], ["zfs", "destroy", "-r", parent],
                     ["zfs", "set", "pgzfs:x=1", other], ["zfs", "create", other + "/new"]):
            refused = as_user(argv)
            assert refused.returncode != 0, (argv, refused.stdout)
        assert sh(["zfs", "list", "-H", "-o", "name", other + "@keep"]).returncode == 0
        assert sh(["zfs", "list", "-H", "-o", "name", parent]).returncode == 0
        # ... and through the key only pg_zfs_receive's verbs below PARENT.
        for command in ("id", "zfs destroy %s@keep" % other, "zfs recv -u -d %s" % other, "sh -c id"):
            refused = subprocess.run(
                ["ssh", "-p", str(host.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i", host.key]
                + host.ssh_options.split() + ["%s@%s" % (USER, host.address), command],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                universal_newlines=True, timeout=60)
            assert refused.returncode == 1 and "pg_zfs_receive: refused: " in refused.stderr, (command, refused)
        assert sh(["zfs", "list", "-H", "-o", "name", other + "@keep"]).returncode == 0
    finally:
        for snapshot in tb.zfs.snapshots():
            if snapshot.split("@", 1)[1].startswith(PREFIX + "_"):
                tb.zfs.destroy(snapshot)
        host.teardown()
        sh(["userdel", USER], check=False)
