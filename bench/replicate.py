#!/usr/bin/env python3
"""Benchmark: pg_zfs_snap.py replicate, per set, against what changed; a whole
first send against pg_basebackup of the same cluster.

Run as root, from the repository:

    python3 bench/replicate.py [--pg 15] [--scale 7] [--sets 3]

Builds on the testbed (tests/testbed.py) and removes all of it at the end: a
primary archiving to two sshd "hosts", a streaming standby on a zfs-fuse pool
(datasets data01..data04, PGDATA on data02, recordsize=8K as setup_guest.py
--init makes them, set before the data is loaded), and a replica: a second
pool behind an sshd on loopback whose key runs pg_zfs_receive as forced
command (ReplicaHost). Loopback only.

- whole: pgbench -i -s SCALE, set A, then `replicate` of A (zfs send | ssh |
  zfs recv of every dataset, and the set's properties): its wall time and
  the bytes of its streams, against `pg_basebackup -X stream -c fast` of the
  same standby into a local directory (wall time, bytes on disk). ssh
  encrypts the stream on the same 2 cores; pg_basebackup reads a Unix socket.
- per set, --sets times: pgbench changes about 1 % of the heap pages (as
  bench/snapshot.py), a restartpoint, a set; then `replicate` of that one
  set: its wall time and the bytes of its streams (zfs send -i PREVIOUS SET,
  counted here: the streams replicate sends), against the bytes of the 8 KiB
  pages that changed under PGDATA/base (every page hashed before and after)
  and against the previous set's `used` (the blocks only it still held).
"""

import argparse
import os
import re
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "bench"))

import testbed  # noqa: E402
from snapshot import PAGE, page_hashes, zfs_bytes  # noqa: E402  (bench/snapshot.py)

PREFIX = "bench"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", default="15", help="PostgreSQL major version (15, 14, 18)")
    parser.add_argument("--scale", type=int, default=7, help="pgbench scale (7: about 100 MB)")
    parser.add_argument("--sets", type=int, default=3, help="incremental sets to send")
    return parser.parse_args()


def mib(count):
    return "%.2f MiB" % (count / 1048576.0)


def stream_bytes(*send_args):
    """Bytes of `zfs send SEND_ARGS`, counted here (what replicate pipes to ssh)."""
    import subprocess
    sender = subprocess.Popen(["zfs", "send"] + list(send_args), stdout=subprocess.PIPE)
    total = 0
    while True:
        chunk = sender.stdout.read(1 << 20)
        if not chunk:
            break
        total += len(chunk)
    if sender.wait() != 0:
        raise RuntimeError("zfs send %s failed" % " ".join(send_args))
    return total


def du_bytes(path):
    return int(testbed.sh(["du", "-sb", path]).stdout.split()[0])


class Bench(object):
    def __init__(self, args):
        self.args = args
        self.tb = testbed.Testbed(args.pg)

    def setup(self):
        tb = self.tb
        self.standby = tb.standby
        for dataset in tb.datasets:
            tb.zfs.run("set", "recordsize=8K", dataset)
        self.host = testbed.ReplicaHost(tb)
        self.parent = self.host.pool.create("guest1")
        receiver = os.path.join(self.host.home, "pg_zfs_receive")
        with open(receiver, "w") as out:
            out.write(testbed.run_script("pg_zfs_snap", "receiver-script").stdout)
        os.chmod(receiver, 0o755)
        self.config = tb.write_config(os.path.join(tb.run_dir, "bench_replicate.conf"), {
            "snapshot": {"prefix": PREFIX},
            "replica r1": {"host": self.host.address, "port": self.host.port, "user": "root",
                           "identity_file": self.host.key, "ssh_options": self.host.ssh_options,
                           "target": self.parent}})
        line = testbed.run_script("pg_zfs_snap", "authorized-keys", "--receiver-path", receiver,
                                  config=self.config).stdout.splitlines()[-1]
        with open(self.host.authorized_keys, "w") as out:
            out.write(line + "\n")

    def pgbench(self, *args):
        primary = self.tb.primary
        testbed.sh([primary.tool("pgbench")] + list(args) + ["-h", primary.socket_dir, "-p", str(primary.port),
                                                            "postgres"], user=testbed.PG_USER, timeout=3600)

    def catch_up(self):
        """The standby replayed all the primary wrote, a checkpoint included, and made
        it a restartpoint: the changed pages are in its files."""
        self.tb.primary.psql("CHECKPOINT")
        target = self.tb.primary.psql("SELECT pg_current_wal_lsn()")
        testbed.wait_for(lambda: self.standby.psql("SELECT pg_last_wal_replay_lsn() >= '%s'::pg_lsn" % target)
                         == "t", 1800, "replay")
        self.standby.psql("CHECKPOINT")

    def take_set(self):
        time.sleep(1.05 - time.time() % 1)
        proc = testbed.run_script("pg_zfs_snap", "snapshot", "--no-prune", config=self.config, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError("snapshot failed: %s" % proc.stderr)
        return proc.stderr.split("took set ", 1)[1].split()[0]

    def replicate(self):
        start = time.time()
        proc = testbed.run_script("pg_zfs_snap", "replicate", "--no-prune", config=self.config, timeout=3600)
        elapsed = time.time() - start
        if proc.returncode != 0:
            raise RuntimeError("replicate failed: %s" % proc.stderr)
        streaming = sum(float(s) for s in re.findall(r"\bsent \S+ to .*: \S+ in ([0-9.]+) s", proc.stderr))
        return elapsed, streaming

    def basebackup(self):
        target = os.path.join(self.tb.run_dir, "basebackup")
        tablespace = os.path.join(self.tb.run_dir, "basebackup_ts1")
        for directory in (target, tablespace):
            os.makedirs(directory, mode=0o700)
            testbed.chown_pg(directory)
        ts1 = os.path.join(self.tb.zfs.mountpoint(self.tb.datasets[0]), "ts1")
        start = time.time()
        testbed.sh([self.standby.tool("pg_basebackup"), "-D", target, "-X", "stream", "-c", "fast",
                    "-T", "%s=%s" % (ts1, tablespace), "-h", self.standby.socket_dir, "-p", str(self.standby.port),
                    "-U", testbed.PG_USER], user=testbed.PG_USER, timeout=3600)
        elapsed = time.time() - start
        size = du_bytes(target) + du_bytes(tablespace)
        testbed.sh(["rm", "-rf", target, tablespace])
        return elapsed, size

    def run(self):
        tb, args = self.tb, self.args
        self.pgbench("-i", "-q", "-s", str(args.scale))
        self.catch_up()
        size = int(tb.primary.psql("SELECT pg_database_size('postgres')"))
        first = self.take_set()
        start = time.time()
        whole = sum(stream_bytes("%s@%s" % (d, first)) for d in tb.datasets)
        send_alone = time.time() - start
        send_time, streaming = self.replicate()
        base_time, base_bytes = self.basebackup()
        print("\ncluster %s (pgbench -s %d), recordsize=8K" % (mib(size), args.scale))
        print("whole first send of set %s: %s of streams, replicate %.2f s (streams %.2f s; "
              "zfs send alone into a counter here %.2f s)" % (first, mib(whole), send_time, streaming, send_alone))
        print("pg_basebackup -X stream of the same standby: %s on disk, %.2f s" % (mib(base_bytes), base_time))
        print("replicate / pg_basebackup time: %.2f" % (send_time / base_time))
        heap_pages = int(tb.primary.psql("SELECT pg_relation_size('pgbench_accounts') / %d" % PAGE))
        print("\n%-24s %14s %14s %9s %14s %9s %10s %10s" % (
            "set", "pages changed", "stream bytes", "/changed", "prev set used", "/changed", "replicate",
            "streams"))
        previous, ratios = first, []
        for _ in range(args.sets):
            before = page_hashes(self.standby.pgdata)
            self.pgbench("-n", "-c", "1", "-t", str(max(heap_pages // 100, 1)))
            self.catch_up()
            after = page_hashes(self.standby.pgdata)
            changed = sum(1 for key, digest in after.items() if before.get(key) != digest) * PAGE
            name = self.take_set()
            sent = sum(stream_bytes("-i", "%s@%s" % (d, previous), "%s@%s" % (d, name)) for d in tb.datasets)
            used = sum(zfs_bytes(tb.zfs.run("get", "-H", "-o", "value", "used", "%s@%s" % (d, previous)))
                       for d in tb.datasets)
            elapsed, streaming = self.replicate()
            ratios.append(sent / float(max(changed, 1)))
            print("%-24s %14s %14s %9.2f %14s %9.2f %8.2f s %8.2f s" % (
                name, mib(changed), mib(sent), ratios[-1], mib(used), used / float(max(changed, 1)), elapsed,
                streaming))
            previous = name
        print("\nstream bytes / bytes of pages changed, median of %d sets: %.2f" % (len(ratios),
                                                                                   statistics.median(ratios)))

    def teardown(self):
        self.tb.teardown()


def main():
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: zfs, sshd and PostgreSQL's user need it")
    bench = Bench(args)
    try:
        bench.setup()
        bench.run()
    finally:
        bench.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
