#!/usr/bin/env python3
"""Benchmark: pg_zfs_snap.py snapshot against pg_basebackup, and a set's space.

Run as root (zfs, mount and btrfs need it), from the repository:

    python3 bench/snapshot.py [--pg 15] [--small-scale 7] [--large-scale 68] [--runs 5]

Builds everything it uses under a fresh /tmp directory and removes it at the
end: a zfs-fuse pool on a sparse file (datasets data01..data04, PGDATA on
data02, like the article), a primary on plain disk, a streaming standby on the
pool with pg_wal off ZFS, and the same on btrfs (below). Loopback only (Unix
sockets).

For a cluster of about 100 MB (pgbench -i -s 7) and about 1 GB (-s 68):
- the wall time of `pg_zfs_snap.py snapshot --no-prune` on the standby (median
  of --runs), and of `pg_basebackup -X stream -c fast` of the same standby;
- the space a set holds after pgbench changes about 1 % of the pages: set A,
  pgbench -t (heap pages / 100), restartpoint, set B; then A's `used` (the old
  blocks only A still references: what keeping one daily set costs) against
  the bytes of the 8 KiB pages that really changed (every page of PGDATA/base
  hashed before and after).

recordsize: the datasets use recordsize=8K, PostgreSQL's page size. ZFS copies
a whole record on write, so with the default 128K every changed page would pin
a 128 KiB old record in the snapshot (up to 16x the bytes changed); with 8K a
changed page costs one 8 KiB record plus metadata. The price is more block
pointers (metadata) and less compression per record, which does not matter for
a standby that is only replayed and snapshotted.

btrfs (issue 8), beside ZFS in the same run: a second standby of the same
primary on subvolumes data01..data04 of a loop-mounted btrfs (PGDATA on
data02, pg_wal off btrfs), snapshotted by `pg_zfs_snap.py` with backend =
btrfs; both standbys replay the same pgbench. btrfs has no per-snapshot
`used`; without enabling quotas (qgroups would count whole extents the same
way) the set's space is reported two ways:
- excl: the set's exclusive bytes, `btrfs filesystem du -s --raw` summed over
  its snapshots (what deleting set A would free now);
- growth: how much the file system's data+metadata use grew from before set A
  to after set B (`btrfs filesystem usage -b`, after a sync), which also holds
  the new copies of the changed pages that the live standby needs anyway.
btrfs shares whole extents: a page rewritten inside a large extent written
by pg_basebackup leaves the old extent referenced by the live subvolume, so
`excl` can be far below the bytes changed; deleting the set would free
nothing more.

Targets (issue 4): snapshot time flat (1 GB / 100 MB under 1.5), at least 20x
faster than pg_basebackup at 1 GB, set space within 3x of the bytes changed.
"""

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import testbed  # noqa: E402  (the shared zfs-fuse daemon protocol and cluster helpers)

PAGE = 8192


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", default="15", help="PostgreSQL major version (15, 14, 18)")
    parser.add_argument("--small-scale", type=int, default=7, help="pgbench scale of the ~100 MB cluster")
    parser.add_argument("--large-scale", type=int, default=68, help="pgbench scale of the ~1 GB cluster")
    parser.add_argument("--runs", type=int, default=5, help="snapshot runs per size (median)")
    parser.add_argument("--guest", action="store_true",
                        help="run this benchmark inside the KVM guest of tools/guest.py, on kernel OpenZFS")
    return parser.parse_args()


def zfs_bytes(text):
    """Bytes of a zfs size ('1.21M'); zfs-fuse has no -p."""
    units = "BKMGTP"
    text = text.strip()
    if text[-1] in units:
        return float(text[:-1]) * 1024 ** units.index(text[-1])
    return float(text)


def mib(count):
    return "%.1f MiB" % (count / 1048576.0)


class Side(object):
    """One standby of the primary on one snapshot backend, and pg_zfs_snap's config for it."""

    def __init__(self, bench, backend, datasets, mountpoints):
        self.bench = bench
        self.backend = backend
        self.datasets = datasets
        self.mountpoints = mountpoints      # dataset -> directory
        run_dir = bench.run_dir
        pgdata = os.path.join(mountpoints[datasets[1]], "pgdata")
        waldir = os.path.join(run_dir, "%s_standby_wal" % backend)
        os.makedirs(waldir, mode=0o700)
        testbed.chown_pg(waldir)
        self.standby = testbed.Cluster("%s_standby" % backend, pgdata, bench.bindir, run_dir)
        primary = bench.primary
        bench.pg(primary, "pg_basebackup", "-D", pgdata, "--waldir", waldir, "-R", "-X", "stream",
                 "-c", "fast", "-h", primary.socket_dir, "-p", str(primary.port), "-U", testbed.PG_USER)
        self.standby.configure(port=self.standby.port,
                               unix_socket_directories="'%s'" % self.standby.socket_dir)
        self.standby.start()
        self.config = os.path.join(run_dir, "%s.conf" % backend)
        with open(self.config, "w") as out:
            out.write("[postgres]\npgdata = %s\nbindir = %s\nuser = postgres\nhost = %s\n"
                      "port = %d\ndbname = postgres\n\n[snapshot]\nbackend = %s\ndatasets = %s\n"
                      "prefix = bench\nlock_file = %s\n"
                      % (pgdata, bench.bindir, self.standby.socket_dir, self.standby.port, backend,
                         " ".join(datasets), os.path.join(run_dir, "%s_snap.lock" % backend)))

    def snapshot(self):
        # Start in a fresh second: a set name has one-second resolution, and a
        # run in the same second as the previous one waits for the next.
        time.sleep(1.05 - time.time() % 1)
        start = time.time()
        proc = testbed.run_script("pg_zfs_snap", "snapshot", "--no-prune", config=self.config,
                                  timeout=600)
        elapsed = time.time() - start
        if proc.returncode != 0:
            raise RuntimeError("pg_zfs_snap failed: %s" % proc.stderr)
        name = proc.stderr.split("took set ", 1)[1].split()[0]
        return elapsed, name

    def page_hashes(self):
        return page_hashes(self.standby.pgdata)


def page_hashes(pgdata):
    """{(file, page number): digest} of every page under PGDATA/base (bench/replicate.py too)."""
    hashes = {}
    base = os.path.join(pgdata, "base")
    for root, _, files in os.walk(base):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                number = 0
                while True:
                    page = handle.read(PAGE)
                    if not page:
                        break
                    hashes[(os.path.relpath(path, base), number)] = hashlib.sha1(page).digest()
                    number += 1
    return hashes


class ZfsSide(Side):
    def __init__(self, bench):
        self.pool = bench.pool
        datasets = [self.pool.create("data%02d" % n, recordsize="8K") for n in (1, 2, 3, 4)]
        mountpoints = dict((d, self.pool.mountpoint(d)) for d in datasets)
        for directory in mountpoints.values():
            testbed.chown_pg(directory)
        Side.__init__(self, bench, "zfs", datasets, mountpoints)

    def set_used(self, name):
        return sum(zfs_bytes(self.pool.run("get", "-H", "-o", "value", "used",
                                           "%s@%s" % (dataset, name)))
                   for dataset in self.datasets)

    def space_in_use(self):
        return zfs_bytes(self.pool.run("get", "-H", "-o", "value", "used", self.pool.name))

    def destroy_sets(self):
        for snapshot in self.pool.snapshots():
            self.pool.destroy(snapshot)


class BtrfsSide(Side):
    def __init__(self, bench):
        self.mount = bench.btrfs.mountpoint
        datasets = [bench.btrfs.create("data%02d" % n) for n in (1, 2, 3, 4)]
        for directory in datasets:
            testbed.chown_pg(directory)
        Side.__init__(self, bench, "btrfs", datasets, dict((d, d) for d in datasets))

    def snapshot_path(self, dataset, name):
        return os.path.join(self.mount, ".pgzfs", "%s@%s" % (os.path.basename(dataset), name))

    def set_used(self, name):
        """Exclusive bytes of the set's snapshots (btrfs filesystem du, no quota)."""
        out = testbed.sh(["btrfs", "filesystem", "du", "-s", "--raw"]
                         + [self.snapshot_path(d, name) for d in self.datasets]).stdout
        return sum(int(line.split()[1]) for line in out.splitlines()[1:] if line.split())

    def space_in_use(self):
        # Deleted snapshots are freed by the cleaner later: wait for it first.
        testbed.sh(["btrfs", "subvolume", "sync", self.mount], timeout=600)
        testbed.sh(["btrfs", "filesystem", "sync", self.mount])
        out = testbed.sh(["btrfs", "filesystem", "usage", "-b", self.mount]).stdout
        for line in out.splitlines():
            if line.strip().startswith("Used:"):
                return int(line.split()[1])
        raise RuntimeError("btrfs filesystem usage: no Used line")

    def destroy_sets(self):
        directory = os.path.join(self.mount, ".pgzfs")
        for entry in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            path = os.path.join(directory, entry)
            if entry.endswith(".json"):
                os.unlink(path)
            else:
                testbed.sh(["btrfs", "subvolume", "delete", path])


class Bench(object):
    def __init__(self, args, run_dir):
        self.args = args
        self.run_dir = run_dir
        self.bindir = testbed.pg_bindir(args.pg)
        self.pool = self.btrfs = self.primary = None
        self.sides = []

    def setup(self):
        run_dir = self.run_dir
        self.pool = testbed.ZfsPool(run_dir, "pgzfs_bench%d" % (os.getpid() % 10000), size="8G")
        self.btrfs = testbed.BtrfsMount(run_dir, size="8G")
        primary = testbed.Cluster("primary", os.path.join(run_dir, "primary"), self.bindir, run_dir)
        self.primary = primary
        self.primary.initdb()
        self.primary.configure(wal_level="replica", max_wal_size="4GB", checkpoint_timeout="30min")
        self.primary.start()
        self.sides = [ZfsSide(self), BtrfsSide(self)]

    def pg(self, cluster, tool, *args, **kwargs):
        return testbed.sh([cluster.tool(tool)] + list(args), user=testbed.PG_USER,
                          timeout=kwargs.get("timeout", 3600))

    def catch_up(self):
        """Wait until every standby replayed all the primary wrote, then flush them."""
        for _ in range(2):
            target = self.primary.psql("SELECT pg_current_wal_lsn()")
            for side in self.sides:
                testbed.wait_for(lambda: side.standby.psql(
                    "SELECT pg_last_wal_replay_lsn() >= '%s'::pg_lsn" % target) == "t", 1800, "replay")
            self.primary.psql("CHECKPOINT")
        for side in self.sides:
            side.standby.psql("CHECKPOINT")     # a restartpoint: pages reach the files

    def load(self, scale):
        self.pg(self.primary, "pgbench", "-i", "-q", "-s", str(scale), "-h", self.primary.socket_dir,
                "-p", str(self.primary.port), "postgres")
        self.catch_up()
        return int(self.primary.psql("SELECT pg_database_size('postgres')"))

    def basebackup(self, standby):
        target = os.path.join(self.run_dir, "basebackup")
        os.makedirs(target, mode=0o700)
        testbed.chown_pg(target)
        start = time.time()
        self.pg(standby, "pg_basebackup", "-D", target, "-X", "stream", "-c", "fast",
                "-h", standby.socket_dir, "-p", str(standby.port), "-U", testbed.PG_USER)
        elapsed = time.time() - start
        shutil.rmtree(target)
        return elapsed

    def measure(self, scale):
        size = self.load(scale)
        results = {}
        for side in self.sides:
            times = [side.snapshot()[0] for _ in range(self.args.runs)]
            results[side.backend] = {"scale": scale, "size": size, "snap": statistics.median(times),
                                     "snaps": times, "basebackup": self.basebackup(side.standby)}
            side.destroy_sets()
        # Space: set A on both, pgbench changes ~1 % of the heap pages, set B on both.
        heap_pages = int(self.primary.psql(
            "SELECT pg_relation_size('pgbench_accounts') / %d" % PAGE))
        before = {}
        for side in self.sides:
            before[side.backend] = (side.page_hashes(), side.space_in_use(), side.snapshot()[1])
        self.pg(self.primary, "pgbench", "-n", "-c", "1", "-t", str(max(heap_pages // 100, 1)),
                "-h", self.primary.socket_dir, "-p", str(self.primary.port), "postgres")
        self.catch_up()
        for side in self.sides:
            hashes, in_use, set_a = before[side.backend]
            after = side.page_hashes()
            side.snapshot()
            growth = side.space_in_use() - in_use
            changed = sum(1 for key, digest in after.items() if hashes.get(key) != digest)
            results[side.backend].update(changed_pages=changed, pages=len(after),
                                         used_a=side.set_used(set_a), growth=growth)
            side.destroy_sets()
        return results

    def teardown(self):
        for cluster in [side.standby for side in self.sides] + [self.primary]:
            if cluster is not None:
                try:
                    cluster.stop("fast")
                except Exception as error:      # keep tearing down
                    print("stopping %s: %s" % (cluster.name, error), file=sys.stderr)
        if self.btrfs is not None:
            self.btrfs.teardown()
        if self.pool is not None:
            self.pool.teardown()


def report(results):
    print("\n%-6s %-6s %10s %10s %14s %8s %15s %12s %8s %12s %8s" % (
        "fs", "scale", "db size", "snapshot", "pg_basebackup", "speedup", "pages changed",
        "set A used", "/changed", "fs growth", "/changed"))
    for backend in ("zfs", "btrfs"):
        for r in (results[0][backend], results[1][backend]):
            changed_bytes = max(r["changed_pages"] * PAGE, 1)
            print("%-6s %-6d %10s %8.3f s %12.2f s %7.0fx %7d (%.2f%%) %12s %8.2f %12s %8.2f" % (
                backend, r["scale"], mib(r["size"]), r["snap"], r["basebackup"],
                r["basebackup"] / r["snap"], r["changed_pages"], 100.0 * r["changed_pages"] / r["pages"],
                mib(r["used_a"]), r["used_a"] / changed_bytes, mib(r["growth"]),
                r["growth"] / changed_bytes))
    for backend in ("zfs", "btrfs"):
        small, large = results[0][backend], results[1][backend]
        print("\n%s snapshot runs (s): small %s, large %s" % (
            backend, " ".join("%.3f" % t for t in small["snaps"]),
            " ".join("%.3f" % t for t in large["snaps"])))
        ratio = large["snap"] / small["snap"]
        speedup = large["basebackup"] / large["snap"]
        space = large["used_a"] / max(large["changed_pages"] * PAGE, 1)
        print("%s snapshot time 1 GB / 100 MB: %.2f (target < 1.5) %s"
              % (backend, ratio, "ok" if ratio < 1.5 else "MISSED"))
        print("%s pg_basebackup / snapshot at 1 GB: %.0fx (target >= 20x) %s"
              % (backend, speedup, "ok" if speedup >= 20 else "MISSED"))
        print("%s set space / bytes changed at 1 GB: %.2f (target <= 3) %s"
              % (backend, space, "ok" if space <= 3 else "MISSED"))
    print("\nzfs: recordsize=8K on every dataset (PostgreSQL page size); set A used = zfs `used`.")
    print("btrfs: no quota; set A used = exclusive bytes (btrfs filesystem du), fs growth = "
          "`btrfs filesystem usage` Used, before set A to after set B.")
    print("zfs fs growth = the pool's `used`, same interval.")


def main():
    args = parse_args()
    if args.guest:
        return testbed.rerun_in_guest()
    if os.geteuid() != 0:
        sys.exit("run as root: zfs, mount and btrfs need it")
    run_dir = tempfile.mkdtemp(prefix="pgzfs-bench-", dir="/tmp")
    os.chmod(run_dir, 0o755)
    bench = None
    try:
        bench = Bench(args, run_dir)
        bench.setup()
        results = []
        for scale in (args.small_scale, args.large_scale):
            print("scale %d ..." % scale, flush=True)
            results.append(bench.measure(scale))
        report(results)
    finally:
        if bench is not None:
            bench.teardown()
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
