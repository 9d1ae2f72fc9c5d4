#!/usr/bin/env python3
"""Benchmark: pg_zfs_restore.py point-in-time restore against a pg_basebackup tar.

Run as root (zfs needs it), from the repository:

    python3 bench/restore.py [--pg 15] [--small-scale 7] [--large-scale 68] [--after 60]

Builds everything under a fresh /tmp directory with the tests' testbed (a
zfs-fuse pool, a primary archiving into two sshd archive hosts on loopback, a
streaming standby on the pool with pg_wal off ZFS) and removes it at the end.
Loopback only.

For a cluster of about 100 MB (pgbench -i -s 7) and about 1 GB (-s 68):
1. take a set with pg_zfs_snap.py on the standby, and right after it a
   `pg_basebackup -Ft -X none` tar of the same standby (the copy-based backup);
2. run pgbench on the primary for --after seconds; the target is the set's
   stop time plus --after seconds; switch and archive the WAL;
3. time from command to a queryable promoted copy at the target:
   - `pg_zfs_restore.py restore --target-time T --action promote` (clones);
   - the copy: untar base.tar (and the tablespace tar) into a new directory,
     write recovery.signal and the same settings (restore_command =
     pg_wal_fetch.py over ssh, same target), pg_ctl start, wait until promoted.
Both replay the same WAL from the same archive through the same fetch script.

Target (issue 5): restore time flat in database size and at least 10x faster
than the copy at 1 GB.
"""

import argparse
import datetime
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import testbed  # noqa: E402  (the shared zfs-fuse daemon protocol and cluster helpers)

PY36 = testbed.PY36


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", default="15", help="PostgreSQL major version (15, 14, 18)")
    parser.add_argument("--small-scale", type=int, default=7, help="pgbench scale of the ~100 MB cluster")
    parser.add_argument("--large-scale", type=int, default=68, help="pgbench scale of the ~1 GB cluster")
    parser.add_argument("--after", type=int, default=60, help="seconds between the set and the target")
    parser.add_argument("--prefetch", type=int, default=0, help="[archive] prefetch of pg_wal_fetch.py")
    parser.add_argument("--guest", action="store_true",
                        help="run this benchmark inside the KVM guest of tools/guest.py, on kernel OpenZFS")
    return parser.parse_args()


def script(name, *args, timeout=900):
    proc = subprocess.run([PY36, os.path.join(REPO, "bin", name + ".py")] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError("%s %s: %s%s" % (name, " ".join(args), proc.stdout, proc.stderr))
    return proc.stdout


def du_mb(path):
    out = testbed.sh(["du", "-sm", path]).stdout
    return int(out.split()[0])


def newest_set(tb):
    names = [n.split("@", 1)[1] for n in tb.zfs.snapshots() if n.startswith(tb.zfs.name + "/data02@pgzfs_")]
    return names[-1]


def stop_time(tb, set_name):
    text = tb.zfs.run("get", "-H", "-o", "value", "pgzfs:stop_time",
                      "%s/data02@%s" % (tb.zfs.name, set_name)).strip()
    # To the microsecond since issue 13's sets; older sets to the second.
    form = "%Y-%m-%dT%H:%M:%S.%fZ" if "." in text else "%Y-%m-%dT%H:%M:%SZ"
    return datetime.datetime.strptime(text, form).replace(tzinfo=datetime.timezone.utc)


def restore_with_clones(tb, config, target):
    started = time.monotonic()
    out = script("pg_zfs_restore", "-c", config, "restore", "--target-time", target, "--action", "promote")
    match = re.search(r"connect: psql -h (\S+) -p (\d+)", out)
    testbed.sh([os.path.join(tb.pg_bindir, "psql"), "-X", "-A", "-t", "-h", match.group(1), "-p",
                match.group(2), "-d", "postgres", "-c", "SELECT count(*) FROM pgbench_branches"],
               user=testbed.PG_USER)
    elapsed = time.monotonic() - started
    steps = re.search(r"steps: (.*)", out).group(1)
    script("pg_zfs_restore", "-c", config, "cleanup", "--all")
    return elapsed, steps


def restore_from_tar(tb, config, tar_dir, target, name):
    """Untar, configure the same recovery, start, wait until promoted and queryable."""
    pgdata = os.path.join(tb.run_dir, name, "pgdata")
    ts_dir = os.path.join(tb.run_dir, name, "ts1")
    wal_dir = os.path.join(tb.run_dir, name, "wal")
    socket_dir = os.path.join(tb.run_dir, name, "sock")
    started = time.monotonic()
    for path in (pgdata, ts_dir, wal_dir, socket_dir):
        os.makedirs(path, mode=0o700)
    with tarfile.open(os.path.join(tar_dir, "base.tar")) as tar:
        tar.extractall(pgdata)
    for other in glob.glob(os.path.join(tar_dir, "*.tar")):
        if os.path.basename(other) != "base.tar":
            with tarfile.open(other) as tar:
                tar.extractall(ts_dir)
    map_path = os.path.join(pgdata, "tablespace_map")
    if os.path.exists(map_path):
        lines = [line.split(" ", 1)[0] + " " + ts_dir for line in open(map_path).read().splitlines() if line]
        open(map_path, "w").write("\n".join(lines) + "\n")
    if os.path.lexists(os.path.join(pgdata, "pg_wal")) and not os.listdir(os.path.join(pgdata, "pg_wal")):
        os.rmdir(os.path.join(pgdata, "pg_wal"))
    if not os.path.exists(os.path.join(pgdata, "pg_wal")):
        os.symlink(wal_dir, os.path.join(pgdata, "pg_wal"))
        os.makedirs(os.path.join(wal_dir, "archive_status"))
    for path in ("standby.signal", "postmaster.pid"):
        if os.path.exists(os.path.join(pgdata, path)):
            os.unlink(os.path.join(pgdata, path))
    fetch = os.path.join(REPO, "bin", "pg_wal_fetch.py")
    port = testbed.free_port()
    with open(os.path.join(pgdata, "postgresql.auto.conf"), "a") as conf:
        conf.write("primary_conninfo = ''\nport = %d\nunix_socket_directories = '%s'\narchive_mode = off\n"
                   "restore_command = '%s -c %s %%f %%p'\nrecovery_target_time = '%s'\n"
                   "recovery_target_action = 'promote'\n"
                   % (port, socket_dir, fetch, config, target))
    open(os.path.join(pgdata, "recovery.signal"), "w").close()
    testbed.sh(["chown", "-R", testbed.PG_USER, os.path.join(tb.run_dir, name), wal_dir])
    copied = time.monotonic() - started
    cluster = testbed.Cluster(name, pgdata, tb.pg_bindir, tb.run_dir, port=port)
    cluster.socket_dir = socket_dir
    cluster.start(timeout=900)
    testbed.wait_for(lambda: cluster.psql("SELECT pg_is_in_recovery()") == "f", 900, "the copy to promote")
    cluster.psql("SELECT count(*) FROM pgbench_branches")
    elapsed = time.monotonic() - started
    cluster.stop("immediate")
    shutil.rmtree(os.path.join(tb.run_dir, name))
    return elapsed, copied


def measure(tb, config, scale, after):
    primary, standby = tb.primary, tb.standby
    pgbench = os.path.join(tb.pg_bindir, "pgbench")
    testbed.sh([pgbench, "-i", "-q", "-s", str(scale), "-h", primary.socket_dir, "-p", str(primary.port),
                "postgres"], user=testbed.PG_USER, timeout=1800)
    primary.psql("CHECKPOINT")
    lsn = primary.psql("SELECT pg_current_wal_lsn()")
    testbed.wait_for(lambda: standby.psql("SELECT pg_last_wal_replay_lsn() >= '%s'" % lsn) == "t", 600,
                     "the standby to catch up")
    size = du_mb(standby.pgdata)
    script("pg_zfs_snap", "-c", config, "snapshot", "--no-prune")
    set_name = newest_set(tb)
    tar_dir = os.path.join(tb.run_dir, "tar_s%d" % scale)
    os.makedirs(tar_dir)
    testbed.chown_pg(tar_dir)
    testbed.sh([os.path.join(tb.pg_bindir, "pg_basebackup"), "-D", tar_dir, "-Ft", "-X", "none", "-c", "fast",
                "-h", standby.socket_dir, "-p", str(standby.port)], user=testbed.PG_USER, timeout=1800)
    target_moment = stop_time(tb, set_name) + datetime.timedelta(seconds=after)
    wait = (target_moment - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    testbed.sh([pgbench, "-T", str(max(1, int(wait) + 5)), "-R", "50", "-h", primary.socket_dir, "-p",
                str(primary.port), "postgres"], user=testbed.PG_USER, timeout=after + 300)
    tb.switch_wal()
    target = target_moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    clone_seconds, steps = restore_with_clones(tb, config, target)
    tar_seconds, copied = restore_from_tar(tb, config, tar_dir, target.replace("T", " ").replace("Z", "+00"),
                                   "copy_s%d" % scale)
    shutil.rmtree(tar_dir)
    return size, clone_seconds, steps, tar_seconds, copied


def main():
    args = parse_args()
    if args.guest:
        return testbed.rerun_in_guest()
    if os.geteuid() != 0:
        sys.exit("run as root (zfs, runuser)")
    tb = testbed.Testbed(args.pg)
    try:
        tb._zfs = testbed.ZfsPool(tb.run_dir, tb.pool_name, size="6G")
        tb._teardowns.append(tb._zfs.teardown)
        config = tb.write_config(os.path.join(tb.run_dir, "bench.conf"), {"restore": {
            "mount_root": os.path.join(tb.run_dir, "restore_mnt"),
            "wal_root": os.path.join(tb.run_dir, "restore_wal"), "timeout": "1800"},
            "archive": {"prefetch": str(args.prefetch)}})
        results = []
        for scale in (args.small_scale, args.large_scale):
            size, clone_seconds, steps, tar_seconds, copied = measure(tb, config, scale, args.after)
            results.append((scale, size, clone_seconds, steps, tar_seconds))
            print("scale %d (%d MB): pg_zfs_restore %.2f s (%s); pg_basebackup tar %.2f s (untar and "
                  "configure %.2f s, start and replay %.2f s); %.1fx"
                  % (scale, size, clone_seconds, steps, tar_seconds, copied, tar_seconds - copied,
                     tar_seconds / clone_seconds), flush=True)
        small, large = results
        print("PostgreSQL %s, target %d s after the set, prefetch %d" % (args.pg, args.after, args.prefetch))
        print("restore time large/small: %.2f (flat if near 1); copy/clones at %d MB: %.1fx (target >= 10x)"
              % (large[2] / small[2], large[1], large[4] / large[2]))
    finally:
        tb.teardown()


if __name__ == "__main__":
    sys.exit(main())
