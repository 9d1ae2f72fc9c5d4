#!/usr/bin/env python3
"""make demo: build the article's setup on loopback, show it, tear it down.

This first version builds the testbed (primary archiving to two sshd hosts,
a zfs-fuse pool with the standby on it), prints what it built and removes it.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

import testbed  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave everything running")
    args = parser.parse_args(argv)
    started = time.monotonic()
    bed = testbed.Testbed(os.environ.get("PG_ZFS_TEST_PG", "15"))
    try:
        standby = bed.standby
        print("primary   PostgreSQL %s on port %d, archiving to %s"
              % (bed.pg_version, bed.primary.port, ", ".join(
                  "%s (%s:%d)" % (h.name, h.address, h.port) for h in bed.hosts)))
        print("guest     pool %s, datasets %s" % (bed.zfs.name, " ".join(bed.datasets)))
        print("standby   PGDATA %s, pg_wal %s (not on ZFS), port %d"
              % (standby.pgdata, bed.standby_wal, standby.port))
        print("          in recovery: %s" % standby.psql("SELECT pg_is_in_recovery()"))
        if args.keep:
            print("kept: run dir %s; remove with: zpool destroy %s; pkill -f %s"
                  % (bed.run_dir, bed.zfs.name, bed.run_dir))
            return 0
    finally:
        if not args.keep:
            bed.teardown()
    print("demo: OK in %.1f s" % (time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
