#!/usr/bin/env python3
"""Benchmark: pg_wal_fetch.py beside its peers, in ../shared/bench/wal_restore_bench.py.

Run as root, from the repository (the bench needs postgresql-15, barman,
pgbackrest, openssh; see its docstring):

    python3 bench/peers.py [--script bin/pg_wal_fetch.py] [--python PYTHON] [-- BENCH OPTIONS]

Runs that bench with cp, the article's command, scp over a shared connection,
barman-wal-restore -p 8 and pgBackRest async, and pg_wal_fetch.py twice as
--extra: prefetch = 8 (extra1) and prefetch = 0 (extra2), both hosts of the
bench as sources, run as `PYTHON -S SCRIPT -c CONFIG %f %p` (PYTHON: the
Python 3.6 the tests give the postgres user, else python3). Each config's
control_dir is /tmp/pgzfs-peers-cmN, which the postgres user makes itself
(a directory it cannot make means no shared connection: a handshake per call).
Loopback only, like the bench.
"""

import argparse
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(os.path.dirname(REPO), "shared", "bench", "wal_restore_bench.py")
PY36 = "/opt/pg_zfs-tests/python-3.6.15/python3"

# The bench fills in the {placeholders} of an --extra-setup command.
CONFIG = """[archive]
sources = h1 h2
spool_dir = {spool}
prefetch = %(prefetch)d
control_dir = /tmp/pgzfs-peers-cm%(prefetch)d
""" + "".join("""[source %s]
host = %s
port = {port}
user = root
path = {arch}/*
probe = tcp
identity_file = {identity}
ssh_options = -o UserKnownHostsFile={known_hosts} -o IdentitiesOnly=yes
""" % (name, host) for name, host in (("h1", "{host1}"), ("h2", "{host2}")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", default=os.path.join(REPO, "bin", "pg_wal_fetch.py"))
    parser.add_argument("--python", default=PY36 if os.path.exists(PY36) else "python3")
    parser.add_argument("bench_options", nargs="*", help="passed on to wal_restore_bench.py (after --)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (the bench starts sshd and runs the contenders as postgres)")
    argv = [sys.executable, BENCH, "--only", "cp,article,scp_cm,barman8,pgbr_async", "--no-pg-check"]
    for prefetch in (8, 0):
        shutil.rmtree("/tmp/pgzfs-peers-cm%d" % prefetch, ignore_errors=True)
        config = "{tmp}/f%d.conf" % prefetch
        text = CONFIG % {"prefetch": prefetch}
        argv += ["--extra-setup", "printf '%%s' '%s' > %s && chmod 644 %s" % (text, config, config),
                 "--extra", "%s -S %s -c %s %%f %%p" % (args.python, os.path.abspath(args.script), config)]
    try:
        return subprocess.call(argv + args.bench_options)
    finally:
        for prefetch in (8, 0):
            shutil.rmtree("/tmp/pgzfs-peers-cm%d" % prefetch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
