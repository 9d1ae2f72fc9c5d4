"""Build real WAL segments with a throw-away PostgreSQL 15 cluster.

make_fixtures(wal_dir) runs a primary as user postgres (it refuses root),
generates the WAL the tests need, promotes a copy of the stopped primary to
timeline 2, copies the archived segments into wal_dir/<role>/<WAL NAME> and
writes wal_dir/manifest.json ({role: wal name}). Every server is stopped and
every directory it made is removed at the end, also on failure.

Roles:
  small      a segment full of small records (an INSERT of 1M rows)
  fpi        a segment of full-page images (a CHECKPOINT, then UPDATEs)
  switch     a few records, then pg_switch_wal()
  covered    a segment entirely inside one 40 MiB record (a logical message)
  timeline2  the first segment of timeline 2 (a page of timeline 1, then 2)
  partial    the .partial segment timeline 1 left behind at the promotion
  partial_recycled  the same after checkpoints that recycled segment files:
             an older segment's pages follow the last record
"""

import json
import os
import shutil
import subprocess
import tempfile
import time

PG_BINDIR = "/usr/lib/postgresql/15/bin"
PG_USER = "postgres"


def as_postgres(argv, **kwargs):
    """Run argv as postgres; return its stdout (text). Raises on failure."""
    proc = subprocess.Popen(["runuser", "-u", PG_USER, "--"] + argv,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, **kwargs)
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(argv), proc.returncode, err.strip()))
    return out


class Server(object):
    """One PostgreSQL data directory with its own socket directory."""

    def __init__(self, pgdata, socket_dir, port):
        self.pgdata, self.socket_dir, self.port = pgdata, socket_dir, port

    def pg_ctl(self, *args):
        return as_postgres([os.path.join(PG_BINDIR, "pg_ctl"), "-D", self.pgdata,
                            "-l", self.pgdata + ".log", "-w", "-t", "300"] + list(args))

    def start(self):
        self.pg_ctl("start")

    def stop(self, mode="fast"):
        if os.path.exists(os.path.join(self.pgdata, "postmaster.pid")):
            self.pg_ctl("stop", "-m", mode)

    def sql(self, query):
        return as_postgres([os.path.join(PG_BINDIR, "psql"), "-X", "-A", "-t", "-q",
                            "-v", "ON_ERROR_STOP=1", "-h", self.socket_dir,
                            "-p", str(self.port), "-d", "postgres", "-c", query]).strip()

    def configure(self, settings):
        with open(os.path.join(self.pgdata, "postgresql.auto.conf"), "a") as conf:
            for key, value in settings.items():
                conf.write("%s = '%s'\n" % (key, value))


def wait_for(path, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise RuntimeError("%s did not appear within %d s" % (path, timeout))
        time.sleep(0.2)


def make_fixtures(wal_dir):
    """Generate the real segments of every role into wal_dir; return the manifest."""
    work = tempfile.mkdtemp(prefix="validator-pg-", dir="/tmp")
    os.chmod(work, 0o755)
    shutil.chown(work, PG_USER, PG_USER)
    servers = []

    def promote_copy(primary, pgdata, port, restore_from, archive_to):
        """Promote a copy of the stopped primary (archive recovery to the end
        of its WAL); return (its first segment of the new timeline, the
        .partial it archived for the old one, or None)."""
        copy = Server(pgdata, primary.socket_dir, port)
        servers.append(copy)
        as_postgres(["cp", "-a", primary.pgdata, copy.pgdata])
        copy.configure({"port": copy.port, "archive_command": "cp %%p %s/%%f" % archive_to,
                        "restore_command": "cp %s/%%f %%p" % restore_from})
        as_postgres(["touch", os.path.join(copy.pgdata, "recovery.signal")])
        copy.start()
        deadline = time.time() + 120
        while copy.sql("SELECT pg_is_in_recovery()") != "f":
            if time.time() > deadline:
                raise RuntimeError("the copy did not leave recovery")
            time.sleep(0.2)
        timeline = int(copy.sql("SELECT timeline_id FROM pg_control_checkpoint()"))
        # Enough WAL for pages of the new timeline after the parent's.
        copy.sql("INSERT INTO t SELECT -g, 'new ' || g FROM generate_series(1, 20000) g")
        first = current_wal(copy, timeline)
        copy.sql("SELECT pg_switch_wal()")
        wait_for(os.path.join(archive_to, first))
        partial = "00000001" + first[8:] + ".partial"
        time.sleep(1)
        copy.stop()
        return first, partial if os.path.exists(os.path.join(archive_to, partial)) else None

    def current_wal(server, timeline=1):
        # The insert position (pg_current_wal_lsn is the write position,
        # which lags), named without pg_walfile_name's "previous segment"
        # rule for a position on a segment boundary.
        high, low = server.sql("SELECT pg_current_wal_insert_lsn()").split("/")
        segno = (int(high, 16) << 32 | int(low, 16)) >> 24
        return "%08X%08X%08X" % (timeline, segno >> 8, segno & 0xFF)

    try:
        for sub in ("sock", "arch", "arch2", "arch3"):
            os.mkdir(os.path.join(work, sub), 0o700)
            shutil.chown(os.path.join(work, sub), PG_USER, PG_USER)
        sock, arch, arch2, arch3 = (os.path.join(work, sub) for sub in ("sock", "arch", "arch2", "arch3"))
        primary = Server(os.path.join(work, "primary"), sock, 54399)
        servers.append(primary)
        as_postgres([os.path.join(PG_BINDIR, "initdb"), "-D", primary.pgdata, "-A", "trust",
                     "--no-sync", "-U", "postgres"])
        primary.configure({
            "listen_addresses": "", "unix_socket_directories": sock, "port": primary.port,
            "archive_mode": "on", "archive_command": "cp %%p %s/%%f" % arch,
            "fsync": "off", "max_wal_size": "1GB", "checkpoint_timeout": "1h",
        })
        primary.start()
        manifest = {}

        def following(name, count=1):
            value = int(name[8:16], 16) * 256 + int(name[16:24], 16) + count
            return "%s%08X%08X" % (name[:8], value // 256, value % 256)

        primary.sql("CREATE TABLE t (id int, v text)")
        primary.sql("SELECT pg_switch_wal()")
        first = current_wal(primary)
        primary.sql("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 1000000) g")
        manifest["small"] = following(first)

        primary.sql("CHECKPOINT")
        first = current_wal(primary)
        primary.sql("UPDATE t SET v = v || 'x' WHERE id % 100 = 0")
        manifest["fpi"] = following(first)

        primary.sql("SELECT pg_switch_wal()")
        manifest["switch"] = current_wal(primary)
        primary.sql("INSERT INTO t VALUES (-1, 'a'), (-2, 'b'); INSERT INTO t VALUES (-3, 'c')")
        primary.sql("SELECT pg_switch_wal()")

        first = current_wal(primary)
        primary.sql("SELECT pg_logical_emit_message(false, 'big', repeat('x', 40 * 1024 * 1024))")
        manifest["covered"] = following(first)
        primary.sql("SELECT pg_switch_wal()")
        for name in set(manifest.values()):
            wait_for(os.path.join(arch, name))
        primary.sql("INSERT INTO t VALUES (-4, 'd')")
        # With archive_mode on, a clean shutdown switches to a new segment
        # and writes its shutdown checkpoint there; the copy ends recovery
        # after that checkpoint, in the segment that becomes timeline 2's first.
        primary.stop()
        sources = dict((role, os.path.join(arch, name)) for role, name in manifest.items())
        timeline2, partial = promote_copy(primary, os.path.join(work, "copy"), 54398, arch, arch2)
        manifest["timeline2"] = timeline2
        sources["timeline2"] = os.path.join(arch2, timeline2)
        if partial:
            manifest["partial"] = partial
            sources["partial"] = os.path.join(arch2, partial)

        # Again after checkpoints that recycle old segment files: the last
        # segment then holds an older segment's pages after its last record.
        primary.start()
        for _round in range(6):
            primary.sql("INSERT INTO t SELECT g, 'more ' || g FROM generate_series(1, 150000) g")
            primary.sql("CHECKPOINT")
        primary.stop()
        _timeline2, partial = promote_copy(primary, os.path.join(work, "copy2"), 54397, arch, arch3)
        if partial:
            manifest["partial_recycled"] = partial
            sources["partial_recycled"] = os.path.join(arch3, partial)

        if os.path.isdir(wal_dir):
            shutil.rmtree(wal_dir)
        os.makedirs(wal_dir)
        for role, name in sorted(manifest.items()):
            os.mkdir(os.path.join(wal_dir, role))
            shutil.copyfile(sources[role], os.path.join(wal_dir, role, name))
        with open(os.path.join(wal_dir, "manifest.json"), "w") as out:
            json.dump(manifest, out, indent=1, sort_keys=True)
        return manifest
    finally:
        for server in servers:
            try:
                server.stop("immediate")
            except Exception:
                pass
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import sys
    print(json.dumps(make_fixtures(sys.argv[1] if len(sys.argv) > 1 else "wal"), indent=1))
