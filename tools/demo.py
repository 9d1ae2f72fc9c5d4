#!/usr/bin/env python3
"""make demo: the article's setup, backup and point-in-time restore, on loopback.

1. The "physical hosts": a PostgreSQL primary archiving every WAL file into two
   archives, each served by its own sshd (127.N.0.2 and 127.N.0.3).
2. The "guest": a zfs-fuse pool on a sparse file; `setup_guest.py --init`
   creates data01..data04 and makes the standby (pg_wal off ZFS);
   `--start`, `--install` (into a stand-in root).
3. Rows with timestamps on the primary, `pg_zfs_snap.py` (the cron line) and
   `pg_zfs_snap.py snapshot --no-prune` with rows between and after,
   `pg_zfs_snap.py list`, then `setup_guest.py --check` (all green once a
   set exists; the cron line is installed under a stand-in root).
4. Archive host 1 dies (nftables); `pg_zfs_restore.py restore --target-time`
   (between the sets) still succeeds through host 2; the rows it has and the
   ones it rightly lacks.
5. `pg_zfs_restore.py drill`, `pg_zfs_snap.py check`.
6. A copy on another machine: a second pool behind its own sshd (127.N.0.4)
   where the guest's key may only run pg_zfs_receive; `replicate`, `list
   --replica`, `check --replica`; then, as if the guest's host were gone,
   `pg_zfs_restore.py restore --target-time` on the replica's own config
   (the received datasets, the surviving archive host) with the same rows.
7. The rest of the toolbox: `pg_wal_fetch.py --check`, `prune --dry-run`,
   `oldest-wal`, and `rollback` refusing while the standby runs; cleanup.

Everything is removed at the end, also on Ctrl-C or failure, unless --keep.
Only loopback addresses are used. The scripts run under the oldest Python
(3.6) when pyenv has it. The last line is `demo: OK ...` or `demo: FAILED ...`.
"""

import argparse
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "tests"))

import testbed  # noqa: E402
from testbed import PG_USER, chown_pg, run_script  # noqa: E402

PYTHON = testbed.PY36 if os.path.exists(testbed.PY36) else sys.executable
ZFS_FUSE_PROPERTIES = "compression=on recordsize=8K atime=off"


class Demo(object):
    def __init__(self, bed):
        self.bed = bed
        self.started = time.monotonic()
        self.step_started = self.started

    def step(self, title):
        now = time.monotonic()
        print("\n== %s  (+%.1f s)" % (title, now - self.started), flush=True)
        self.step_started = now

    def say(self, text):
        print("   " + text.replace("\n", "\n   "), flush=True)

    def script(self, name, *args, user=None, check=True, config=None):
        shown = " ".join([name + ".py"] + [str(a) for a in args])
        started = time.monotonic()
        proc = run_script(name, *args, config=config or self.config, python=PYTHON, user=user,
                          timeout=600)
        self.say("$ %s   [exit %d, %.1f s]" % (shown, proc.returncode,
                                                 time.monotonic() - started))
        output = (proc.stdout + proc.stderr).strip()
        if output:
            self.say("  " + output.replace("\n", "\n  "))
        if check and proc.returncode != 0:
            raise RuntimeError("%s exited %d" % (shown, proc.returncode))
        return proc

    # -- the story -------------------------------------------------------------

    def hosts_and_primary(self):
        self.step("1. The physical hosts: a primary archiving to two hosts over ssh")
        bed = self.bed
        primary = bed.primary
        primary.psql("CREATE TABLE demo (id serial PRIMARY KEY, "
                     "at timestamptz NOT NULL DEFAULT clock_timestamp(), note text)")
        self.say("primary: PostgreSQL %s, port %d, archive_command copies each WAL file to:"
                 % (bed.pg_version, primary.port))
        for host in bed.hosts:
            self.say("  %s  sshd %s:%d  archive %s" % (host.name, host.address, host.port,
                                                      host.wal_dir))

    def guest(self):
        self.step("2. The guest: ZFS datasets, the standby (pg_wal off ZFS), check")
        bed = self.bed
        zfs = bed.zfs
        guest_dir = os.path.join(bed.run_dir, "guest")
        os.makedirs(guest_dir)
        chown_pg(guest_dir)
        datasets = ["%s/data%02d" % (zfs.name, n) for n in (1, 2, 3, 4)]
        mnt = zfs.mountroot
        self.pgdata = os.path.join(mnt, "data02", "pgdata")
        self.socket_dir = os.path.join(guest_dir, "sock")
        os.makedirs(self.socket_dir)
        chown_pg(self.socket_dir)
        self.port = testbed.free_port()
        sections = bed.archive_config()
        sections.update({
            "postgres": {"pgdata": self.pgdata, "bindir": bed.pg_bindir, "user": PG_USER,
                         "host": self.socket_dir, "port": self.port, "dbname": "postgres"},
            "snapshot": {"backend": "zfs", "datasets": " ".join(datasets), "prefix": "pgzfs",
                         "keep_daily": "7", "lock_file": os.path.join(guest_dir, "snap.lock"),
                         "state_file": os.path.join(guest_dir, "last-snapshot.json")},
            "guest": {"primary_conninfo": bed.primary.conninfo() + " application_name=guest",
                      "waldir": os.path.join(guest_dir, "pg_wal"),
                      "logfile": os.path.join(guest_dir, "postgresql.log"),
                      "dataset_properties": ZFS_FUSE_PROPERTIES,
                      "tablespace_mapping": "%s=%s" % (bed.primary.ts1_dir,
                                                       os.path.join(mnt, "data01", "ts1")),
                      "check_clock": "no"},
        })
        self.sections = sections
        self.config = bed.write_config(os.path.join(guest_dir, "pg_zfs.conf"),
                                       sections=sections)
        self.say("pool %s on a sparse file; config %s" % (zfs.name, self.config))
        self.script("setup_guest", "--role", "guest", "--init", "--dry-run")
        self.script("setup_guest", "--role", "guest", "--init")
        self.script("setup_guest", "--role", "guest", "--start")
        self.standby = testbed.Cluster("guest", self.pgdata, bed.pg_bindir, bed.run_dir,
                                       port=self.port)
        self.standby.socket_dir = self.socket_dir
        bed.adopt(self.standby)
        testbed.wait_for(lambda: self.standby.psql(
            "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'") == "1",
            60, "the standby to stream")
        self.guest_root = os.path.join(guest_dir, "root")
        os.makedirs(self.guest_root)
        self.say("installing the cron and rc.local lines into %s (a stand-in for /)"
                 % self.guest_root)
        self.script("setup_guest", "--role", "guest", "--install", "--print", "--using", "cron",
                    "--root", self.guest_root)
        self.script("setup_guest", "--role", "guest", "--install", "--using", "cron",
                    "--root", self.guest_root)

    def insert(self, note, rows=3):
        primary = self.bed.primary
        for _ in range(rows):
            primary.psql("INSERT INTO demo (note) VALUES ('%s')" % note)
            time.sleep(0.3)

    def wait_standby_caught_up(self):
        lsn = self.bed.primary.psql("SELECT pg_current_wal_lsn()")
        testbed.wait_for(lambda: self.standby.psql(
            "SELECT pg_last_wal_replay_lsn() >= '%s'" % lsn) == "t", 60, "the standby")

    def snapshots(self):
        self.step("3. Writes on the primary, a snapshot set, more writes, another set")
        self.insert("before set 1")
        self.wait_standby_caught_up()
        self.script("pg_zfs_snap")
        self.insert("between the sets")
        # The target: a moment after these rows and before the next ones.
        time.sleep(1.1)
        self.target = self.bed.primary.psql(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
            "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        time.sleep(1.1)
        self.insert("after the target")
        self.wait_standby_caught_up()
        # The cron line would keep one set a day; this one is a manual extra.
        self.script("pg_zfs_snap", "snapshot", "--no-prune", "--label", "demo")
        self.insert("after set 2")
        self.bed.switch_wal()
        self.script("pg_zfs_snap", "list")
        self.say("now that sets exist, the doctor should be all green:")
        self.script("setup_guest", "--role", "guest", "--check", "--root", self.guest_root)
        self.say("the primary has:")
        self.say("  " + self.bed.primary.psql(
            "SELECT note || ': ' || count(*) FROM demo GROUP BY note ORDER BY min(id)")
            .replace("\n", "\n  "))

    def restore(self):
        self.step("4. Host 1 dies; restore to %s through host 2" % self.target)
        host1 = self.bed.hosts[0]
        host1.kill()
        self.say("nft drops every packet to %s (host1)" % host1.address)
        self.restore_and_compare()
        host1.revive()
        self.script("pg_zfs_restore", "cleanup", "--all")

    def restore_and_compare(self, config=None):
        """restore --target-time, then the copy's rows: those before the target, none after."""
        proc = self.script("pg_zfs_restore", "restore", "--target-time", self.target,
                           "--action", "promote", config=config)
        socket_dir, port = _connect_line(proc.stdout)
        copy = testbed.Cluster("restored", "/nonexistent", self.bed.pg_bindir,
                               self.bed.run_dir, port=port)
        copy.socket_dir = socket_dir
        rows = copy.psql("SELECT note || ': ' || count(*) FROM demo GROUP BY note "
                         "ORDER BY min(id)")
        self.say("the restored copy (port %d) has:\n  %s" % (port, rows.replace("\n", "\n  ")))
        later = copy.psql("SELECT count(*) FROM demo WHERE note IN "
                          "('after the target', 'after set 2')")
        self.say("rows written after the target in the copy: %s (rightly none)" % later)
        if later != "0" or "between the sets" not in rows:
            raise RuntimeError("the restored copy does not match the target")

    def drill_and_check(self):
        self.step("5. Restore drill, snapshot check")
        self.script("pg_zfs_restore", "drill", "--query", "SELECT count(*) FROM demo")
        self.script("pg_zfs_snap", "check")
        self.script("pg_zfs_snap", "check", "--json")

    def replica(self):
        self.step("6. A copy on another machine; the guest's host gone, restore there")
        bed = self.bed
        host = testbed.ReplicaHost(bed)
        parent = host.pool.create("guest1")
        self.say("replica: pool %s, parent dataset %s, sshd %s:%d (root: forced commands only)"
                 % (host.pool.name, parent, host.address, host.port))
        receiver = os.path.join(host.home, "pg_zfs_receive")
        with open(receiver, "w") as out:
            out.write(self.script("pg_zfs_snap", "receiver-script").stdout)
        os.chmod(receiver, 0o755)
        self.sections["replica host3"] = {
            "host": host.address, "port": host.port, "user": "root", "identity_file": host.key,
            "ssh_options": host.ssh_options, "target": parent, "keep_daily": "7"}
        self.config = bed.write_config(self.config, sections=self.sections)
        keys = self.script("pg_zfs_snap", "authorized-keys", "--receiver-path", receiver)
        with open(host.authorized_keys, "w") as out:
            out.write(keys.stdout.splitlines()[-1] + "\n")
        self.script("pg_zfs_snap", "replicate", "--dry-run")
        # --no-prune: the replica's keep_daily would keep one set of today, and the
        # target lies between today's two
        self.script("pg_zfs_snap", "replicate", "--no-prune")
        self.script("pg_zfs_snap", "list", "--replica", "host3")
        self.script("pg_zfs_snap", "check", "--replica", "host3")
        self.say("the guest's host is gone (its pool, and host1's archive with it): on the replica,"
                 " a config naming the received datasets and host2 only")
        sections = bed.archive_config()
        sections["archive"]["sources"] = "host2"
        del sections["source host1"]
        sections["restore"] = {"mount_root": os.path.join(host.home, "restore"),
                               "wal_root": os.path.join(bed.run_dir, "restore-wal")}
        sections.update({
            "postgres": {"bindir": bed.pg_bindir, "user": PG_USER, "dbname": "postgres"},
            "snapshot": {"backend": "zfs", "prefix": "pgzfs",
                         "datasets": " ".join("%s/data%02d" % (parent, n) for n in (1, 2, 3, 4))}})
        on_the_replica = bed.write_config(os.path.join(host.home, "pg_zfs.conf"), sections=sections)
        self.script("pg_zfs_restore", "list", config=on_the_replica)
        self.restore_and_compare(on_the_replica)
        self.script("pg_zfs_restore", "cleanup", "--all", config=on_the_replica)

    def toolbox(self):
        self.step("7. The rest of the daily toolbox")
        self.script("pg_wal_fetch", "--check", user=PG_USER)
        self.script("pg_zfs_snap", "prune", "--dry-run")
        self.script("pg_zfs_snap", "oldest-wal")
        sets = [line.split()[0] for line in self.script("pg_zfs_snap", "list").stdout.splitlines()
                if line.startswith("pgzfs_")]
        self.say("rollback refuses while the standby runs (and without --force):")
        proc = self.script("pg_zfs_restore", "rollback", "--set", sets[0], check=False)
        if proc.returncode != 1:
            raise RuntimeError("rollback of a running standby was not refused")


def _connect_line(restore_output):
    """(socket dir, port) from restore's `connect: psql -h DIR -p PORT` line."""
    for line in restore_output.splitlines():
        words = line.split()
        if words[:2] == ["connect:", "psql"] and "-h" in words and "-p" in words:
            return words[words.index("-h") + 1], int(words[words.index("-p") + 1])
    raise RuntimeError("restore printed no `connect: psql -h DIR -p PORT` line")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave everything running")
    parser.add_argument("--remove", metavar="RUN_DIR", help="remove what --keep left")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: FAILED: run as root (zfs, mount, nft)")
        return 1
    if args.remove:
        left = testbed.remove_run_dir(args.remove)
        print("demo: removed %s%s" % (args.remove, "; left: " + ", ".join(left) if left else ""))
        return 1 if left else 0
    # Ctrl-C and SIGTERM both go through the teardown below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    bed = testbed.Testbed(os.environ.get("PG_ZFS_TEST_PG", "15"))
    demo = Demo(bed)
    ok = False
    try:
        demo.hosts_and_primary()
        demo.guest()
        demo.snapshots()
        demo.restore()
        demo.drill_and_check()
        demo.replica()
        demo.toolbox()
        ok = True
    except KeyboardInterrupt:
        print("\ndemo: interrupted")
    except Exception as error:
        print("\ndemo: %s" % error)
    finally:
        if args.keep and ok:
            print("\nkept running: config %s" % demo.config)
            print("  primary: psql -h %s -p %d -U postgres" % (bed.primary.socket_dir,
                                                               bed.primary.port))
            print("  standby: psql -h %s -p %d -U postgres" % (demo.socket_dir, demo.port))
            print("  remove it all: %s %s --remove %s" % (sys.executable, __file__, bed.run_dir))
        else:
            demo.step("Cleanup: servers, sshd, nftables, pool")
            bed.teardown()
    elapsed = time.monotonic() - demo.started
    if ok:
        print("demo: OK in %.0f s" % elapsed)
        return 0
    print("demo: FAILED after %.0f s" % elapsed)
    return 1


if __name__ == "__main__":
    sys.exit(main())
