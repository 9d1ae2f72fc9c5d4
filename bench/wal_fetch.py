#!/usr/bin/env python3
"""Benchmark: pg_wal_fetch.py against cp, the article's restore_command and ssh itself.

Run as root, from the repository:

    python3 bench/wal_fetch.py [--segments 64] [--reps 3] [--pg 15] [--baseline-rev REV]
                               [--floor] [--skip-validation] [--skip-keys] [--peers]

Builds everything under a fresh /tmp directory and removes it at the end: a
PostgreSQL primary archiving into ARCH/primary/, a base backup taken before
--segments WAL segments are written and archived, and two sshd "archive hosts"
on loopback addresses (127.77.0.2 and .3) serving that archive. Loopback only.

The client side runs as postgres, as PostgreSQL does, with Python 3.6.15 (the
oldest supported; the copy the postgres user can run, see tests/testbed.py).
It logs in to the hosts as root, like the article. Root's ~/.bashrc on the test
machines runs `pyenv init`, and Debian's bash sources ~/.bashrc for every
command sshd runs: about 120 ms per ssh session that would measure this
machine's shell, not the transfer. The bench sshd sets SHLVL=1 for its
sessions, which makes bash skip that (the postgres account is locked, so sshd
refuses it).

Every pg_wal_fetch.py runs as the README wires it for speed, `python3 -S
pg_wal_fetch.py` (no site-packages: none of their .pth files run).
Parts 1, 2 and 4 run --reps times (round robin over the contenders: the
machine is shared) and print medians; the load average is printed with them.

1. Delivery, one process per file in order, each delivered to
   pg_wal/RECOVERYXLOG and renamed as PostgreSQL does:
   (a) cp from a local directory; (b) the article's command with both hosts up;
   (c) the transport limit: ONE `ssh HOST cat ...` streaming every segment,
   ssh's default cipher; (c2) the same with AES-GCM first, the cipher order
   pg_wal_fetch.py asks for on a CPU with AES instructions;
   (s) scp over a shared connection (ControlMaster, ControlPersist), one
   process per segment; (d) pg_wal_fetch.py, prefetch = 0;
   (e) pg_wal_fetch.py, prefetch = 8.
   Targets (issue 17): (e) within 1.3x of (c); (d) no slower than (s).
2. Recovery of the base backup replaying the segments with restore_command
   (a) and (e), from `pg_ctl start` to the end of recovery; with
   --baseline-rev REV also (f): pg_wal_fetch.py as it was at git revision REV,
   prefetch = 8. Targets: (e) within 1.5x of (a) (issue 17).
3. Whole-segment validation, per segment, in the client's Python: the page
   headers (check_pages), the records by pg_waldump (one process per
   segment), the records in Python (walk_records, where there is no
   pg_waldump; on three segments); against cp of the segment.
4. Delivery from a warm spool (the segment waiting in the spool, one process
   per file, as PostgreSQL calls it) against cp of the same file, both run as
   postgres through runuser. Target: within 2.5x of cp (issue 17).
5. The guest's key restricted to pg_wal_serve (README, "The archive hosts"):
   a third host (127.77.0.4, sshd with PAM as real hosts run it) where the
   postgres user has two keys, one installed restricted (forced command
   pg_wal_serve), one bare; delivery of every segment, one process per file,
   prefetch = 0 and 8, through each. Target: restricted within 1.1x of bare.
   `--only-keys` runs this part alone (after building the archive).
With --floor, parts 1 and 2 also run the floors: what pg_wal_fetch.py must do,
done by /bin/sh and the standard tools without a line of Python (and without
the page checks), so a target below its floor is out of reach on this machine:
   (f0) each call: ssh over a shared connection into a scratch file,
   `pg_waldump -z` on it, the rename (the floor under (d));
   (f8) the first call starts one ssh stream (AES-GCM first) of every
   segment into a spool by tar, each segment checked by pg_waldump once the
   next has begun and renamed into place; each call waits for its segment
   and renames it (the floor under (e));
   (g) a recovery through (f8); (h) a recovery through cp while the same
   stream and checks run beside it, timed until both end: no call waits
   for anything (the floor under part 2's (e)).
--skip-validation leaves parts 3, 4 and 5 out.
6. With --peers: the peers, in the same run, once this bench's hosts are
   gone: ../shared/bench/wal_restore_bench.py through bench/peers.py (cp,
   the article's command, scp over a shared connection, barman-wal-restore
   -p 8, pgBackRest async, and this pg_wal_fetch.py with prefetch 8 and 0 as
   its extras), so the README's table of issue 17 comes from one run.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from testbed import (PG_USER, chown_pg, free_port, load_script, pg_bindir,  # noqa: E402
                     python36_for_postgres, sh, wait_for)

SCRIPT = os.path.join(REPO, "bin", "pg_wal_fetch.py")
HOSTS = ("127.77.0.2", "127.77.0.3")
KEY_HOST = "127.77.0.4"
FETCH = load_script("pg_wal_fetch")


class Bench(object):
    def __init__(self, run_dir, bindir, segments):
        self.run_dir = run_dir
        self.bindir = bindir
        self.segments = segments
        self.arch = os.path.join(run_dir, "arch")
        self.wal_dir = os.path.join(self.arch, "primary")
        self.python = python36_for_postgres()
        self.sshd_pids = []
        os.makedirs(self.wal_dir)
        chown_pg(self.arch, self.wal_dir)

    def pg(self, tool):
        return os.path.join(self.bindir, tool)

    # -- the archive ---------------------------------------------------------

    def build_archive(self):
        self.pgdata = os.path.join(self.run_dir, "primary")
        self.sock = os.path.join(self.run_dir, "sock")
        os.makedirs(self.sock)
        chown_pg(self.sock)
        sh([self.pg("initdb"), "-A", "trust", "-U", PG_USER, "-D", self.pgdata], user=PG_USER)
        self.port = free_port()
        with open(os.path.join(self.pgdata, "postgresql.auto.conf"), "a") as conf:
            conf.write("port = %d\nunix_socket_directories = '%s'\nlisten_addresses = ''\n"
                       "archive_mode = on\narchive_command = 'cp %%p %s/%%f'\nfsync = off\n"
                       "wal_level = replica\n" % (self.port, self.sock, self.wal_dir))
        sh([self.pg("pg_ctl"), "start", "-w", "-D", self.pgdata, "-l",
            os.path.join(self.run_dir, "primary.log")], user=PG_USER)
        self.backup = os.path.join(self.run_dir, "backup")
        sh([self.pg("pg_basebackup"), "-D", self.backup, "-X", "none", "-c", "fast",
            "-h", self.sock, "-p", str(self.port), "-U", PG_USER], user=PG_USER, timeout=600)
        self.psql("CREATE TABLE bench (id int, note text)")
        for batch in range(self.segments):
            self.psql("INSERT INTO bench SELECT g, md5(g::text) FROM generate_series(1, 20000) g; "
                      "SELECT pg_switch_wal()")
        wait_for(lambda: len(self.archived()) >= self.segments + 2, 120, "the archive")
        self.expected = self.psql("SELECT count(*) FROM bench")
        sh([self.pg("pg_ctl"), "stop", "-m", "fast", "-D", self.pgdata], user=PG_USER)
        self.names = self.archived()

    def backup_start_segment(self):
        """The segment the base backup's recovery starts in (backup_label's START WAL LOCATION)."""
        with open(os.path.join(self.backup, "backup_label")) as label:
            return label.read().split("(file ", 1)[1].split(")", 1)[0]

    def psql(self, sql):
        return sh([self.pg("psql"), "-X", "-q", "-A", "-t", "-h", self.sock, "-p", str(self.port),
                   "-U", PG_USER, "-d", "postgres", "-c", sql], user=PG_USER).stdout.strip()

    def archived(self):
        return sorted(n for n in os.listdir(self.wal_dir) if len(n) == 24)

    # -- the hosts -----------------------------------------------------------

    def start_hosts(self):
        self.client_key = os.path.join(self.run_dir, "client_key")
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.client_key])
        chown_pg(self.client_key)
        self.known_hosts = os.path.join(self.run_dir, "known_hosts")
        open(self.known_hosts, "w").close()
        chown_pg(self.known_hosts)
        self.ssh_port = free_port(HOSTS[0])
        os.makedirs("/run/sshd", exist_ok=True)
        for index, address in enumerate(HOSTS):
            home = os.path.join(self.run_dir, "host%d" % (index + 1))
            os.makedirs(home)
            self.start_sshd(home, address, "AuthorizedKeysFile %s.pub\nUsePAM no\nSubsystem sftp internal-sftp\n"
                                            "PermitRootLogin prohibit-password\nSetEnv SHLVL=1\n"
                                            % self.client_key)
        self.ssh_opts = ("-o BatchMode=yes -o IdentitiesOnly=yes -i %s -o UserKnownHostsFile=%s"
                         % (self.client_key, self.known_hosts))
        self.user = "root"

    def start_key_host(self):
        """Part 5's host: the postgres user's keys in its own authorized_keys, one of
        them restricted to pg_wal_serve exactly as the README installs it."""
        home = os.path.join(self.run_dir, "keyhost")
        ssh_dir = os.path.join(home, "users", PG_USER, ".ssh")
        os.makedirs(ssh_dir)
        sh([sys.executable, SCRIPT, "--install-server", home])
        self.keys = {}
        lines = []
        for kind in ("restricted", "bare"):
            key = os.path.join(self.run_dir, "%s_key" % kind)
            sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
            chown_pg(key)
            self.keys[kind] = key
            with open(key + ".pub") as public:
                lines.append(" ".join(public.read().split()))
        # The bench's client does not bind: loopback connections come from 127.0.0.1.
        lines[0] = FETCH.authorized_keys_line(lines[0], "127.0.0.1", self.arch + "/*",
                                              os.path.join(home, "pg_wal_serve"))
        with open(os.path.join(ssh_dir, "authorized_keys"), "w") as out:
            out.write("\n".join(lines) + "\n")
        sh(["chown", "-R", PG_USER, os.path.join(home, "users")])
        self.start_sshd(home, KEY_HOST, "AuthorizedKeysFile %s/users/%%u/.ssh/authorized_keys\n"
                                        "KbdInteractiveAuthentication no\nUsePAM yes\n" % home)

    def start_sshd(self, home, address, settings):
        """An sshd of the bench on address:ssh_port with its own host key (in known_hosts)."""
        host_key = os.path.join(home, "host_key")
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key])
        config = os.path.join(home, "sshd_config")
        pidfile = os.path.join(home, "sshd.pid")
        with open(config, "w") as out:
            out.write("ListenAddress %s:%d\nHostKey %s\nPasswordAuthentication no\nStrictModes no\n"
                      "PidFile %s\nMaxStartups 100\nMaxSessions 100\n%s"
                      % (address, self.ssh_port, host_key, pidfile, settings))
        sh(["/usr/sbin/sshd", "-f", config, "-E", os.path.join(home, "sshd.log")])
        wait_for(lambda: os.path.exists(pidfile) and open(pidfile).read().strip(), 10, "sshd")
        self.sshd_pids.append(int(open(pidfile).read().split()[0]))
        with open(host_key + ".pub") as pub, open(self.known_hosts, "a") as known:
            known.write("[%s]:%d %s\n" % (address, self.ssh_port, " ".join(pub.read().split()[:2])))

    def key_config(self, prefetch, spool, control, kind):
        """Part 5's config: the key host alone, as postgres, with the restricted or bare key."""
        path = os.path.join(self.run_dir, "pg_zfs_%s.conf" % kind)
        with open(path, "w") as out:
            out.write("[archive]\nsources = k\nspool_dir = %s\nprefetch = %d\ntimeout = 60\n"
                      "control_dir = %s\n[source k]\nhost = %s\nport = %d\nuser = %s\npath = %s/*\n"
                      "probe = tcp\nssh_options = -o IdentitiesOnly=yes -o UserKnownHostsFile=%s\n"
                      "identity_file = %s\n" % (spool, prefetch, control, KEY_HOST, self.ssh_port, PG_USER,
                                                 self.arch, self.known_hosts, self.keys[kind]))
        os.chmod(path, 0o644)
        return path

    def write_config(self, prefetch, spool, control):
        path = os.path.join(self.run_dir, "pg_zfs.conf")
        with open(path, "w") as out:
            out.write("[archive]\nsources = h1 h2\nspool_dir = %s\nprefetch = %d\ntimeout = 60\n"
                      "control_dir = %s\n" % (spool, prefetch, control))
            for index, address in enumerate(HOSTS):
                out.write("[source h%d]\nhost = %s\nport = %d\nuser = %s\npath = %s/*\nprobe = tcp\n"
                          "ssh_options = -o IdentitiesOnly=yes -o UserKnownHostsFile=%s\n"
                          "identity_file = %s\n" % (index + 1, address, self.ssh_port, self.user,
                                                    self.arch, self.known_hosts, self.client_key))
        os.chmod(path, 0o644)
        return path

    def close_masters(self, control):
        if os.path.isdir(control):
            for name in os.listdir(control):
                sh(["ssh", "-S", os.path.join(control, name), "-O", "exit", "x"], user=PG_USER,
                   check=False)

    # -- delivery ------------------------------------------------------------

    def deliver_all(self, restore_command):
        """Seconds to deliver every archived file, one process per file, as PostgreSQL would."""
        target = os.path.join(self.run_dir, "target")
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(os.path.join(target, "pg_wal"))
        shutil.copy(os.path.join(self.pgdata, "global", "pg_control"), os.path.join(target, "pg_control"))
        os.makedirs(os.path.join(target, "global"))
        shutil.move(os.path.join(target, "pg_control"), os.path.join(target, "global"))
        shutil.copy(os.path.join(self.pgdata, "PG_VERSION"), target)
        sh(["chown", "-R", PG_USER, target])
        driver = os.path.join(self.run_dir, "driver.sh")
        with open(driver, "w") as out:
            out.write("#!/bin/sh\ncd %s || exit 9\n" % target)
            for name in self.names:
                command = restore_command.replace("%f", name).replace("%p", "pg_wal/RECOVERYXLOG")
                out.write("sh -c %s || { echo failed %s >&2; exit 1; }\n" % (shell_quote(command), name))
                out.write("mv pg_wal/RECOVERYXLOG pg_wal/%s\n" % name)
        os.chmod(driver, 0o755)
        started = time.monotonic()
        proc = sh([driver], user=PG_USER, check=False, timeout=3600)
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError("delivery failed: %s" % proc.stderr[-2000:])
        delivered = sorted(os.listdir(os.path.join(target, "pg_wal")))
        if delivered != self.names:
            raise RuntimeError("delivered %d of %d files" % (len(delivered), len(self.names)))
        shutil.rmtree(target)
        return elapsed

    def stream_all(self, ciphers=None):
        """(c): one ssh session streaming every segment into one local file (ciphers:
        ssh's Ciphers option, else its default)."""
        out = os.path.join(self.run_dir, "stream.out")
        command = "cd %s && cat %s" % (self.wal_dir, " ".join(self.names))
        argv = ["sh", "-c", "ssh %s%s -p %d -l %s %s %s > %s" % (
            self.ssh_opts, " -o Ciphers=" + ciphers if ciphers else "", self.ssh_port, self.user, HOSTS[0],
            shell_quote(command), out)]
        started = time.monotonic()
        sh(argv, user=PG_USER, timeout=3600)
        elapsed = time.monotonic() - started
        size = os.path.getsize(out)
        os.unlink(out)
        if size != 16 * 1024 * 1024 * len(self.names):
            raise RuntimeError("streamed %d bytes" % size)
        return elapsed

    # -- the floors: the same work without Python (--floor) --------------------

    def floor_commands(self, tag):
        """(prefetch 0, prefetch 8) restore_commands that do what pg_wal_fetch.py must
        (fetch over ssh, pg_waldump -z on the whole segment, rename into place)
        in /bin/sh, without a line of Python and without the page checks: the
        floor under each target (README, "Why the targets are out of reach")."""
        home = self.floor_home(tag)
        spool = os.path.join(home, "spool")
        for sub in ("cm", "scratch", "spool/in", "spool/ready"):
            os.makedirs(os.path.join(home, sub))
        ssh = "ssh %s -p %d -l %s" % (self.ssh_opts, self.ssh_port, self.user)
        waldump = self.pg("pg_waldump")
        scripts = {
            # One call, one segment: ssh over a shared connection into a scratch
            # file, pg_waldump on it (its verdict is not judged: only its cost
            # counts here), then the rename.
            "deliver0.sh": FLOOR0 % {"ssh": ssh, "cm": os.path.join(home, "cm"), "host": HOSTS[0],
                                     "wal_dir": self.wal_dir, "scratch": os.path.join(home, "scratch"),
                                     "waldump": waldump},
            # The first call starts feed.sh (one ssh stream of every segment from
            # the one asked, AES-GCM first, into spool/in by tar; each segment
            # checked by pg_waldump once the next one has begun, then renamed into
            # spool/ready); every call waits for its segment there and renames it.
            "deliver8.sh": FLOOR8 % {"spool": spool, "feed": os.path.join(home, "feed.sh"),
                                     "names": " ".join(self.names)},
            "feed.sh": FEED % {"spool": spool, "names": " ".join(self.names), "waldump": waldump,
                               "stream": "%s -o Ciphers=%s %s" % (ssh, FETCH.AES_FIRST_CIPHERS, HOSTS[0]),
                               "wal_dir": self.wal_dir},
        }
        for name, text in scripts.items():
            with open(os.path.join(home, name), "w") as out:
                out.write(text)
        sh(["chown", "-R", PG_USER, home])
        return ("sh %s/deliver0.sh %%f %%p" % home, "sh %s/deliver8.sh %%f %%p" % home)

    def floor_home(self, tag):
        """The directory of one floor run's scripts, spool and control sockets."""
        return os.path.join(self.run_dir, "floor_" + tag)

    def floor_done(self, tag):
        """Wait for a floor's feeder to end (it streams every segment) and close its master."""
        home = self.floor_home(tag)
        if os.path.exists(os.path.join(home, "spool", "started")):
            wait_for(lambda: os.path.exists(os.path.join(home, "spool", "checked")), 120, "the floor's feeder")
        self.close_masters(os.path.join(home, "cm"))

    # -- recovery ------------------------------------------------------------

    def recover(self, restore_command, beside=None):
        """Seconds from pg_ctl start to the end of recovery of a copy of the base backup.
        beside: a command run as postgres from pg_ctl start on; then the seconds
        until both have ended."""
        data = os.path.join(self.run_dir, "recovery")
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(self.backup, data, symlinks=True)
        port = free_port()
        with open(os.path.join(data, "postgresql.auto.conf"), "a") as conf:
            conf.write("port = %d\narchive_mode = off\nhot_standby = off\nrestore_command = '%s'\n"
                       % (port, restore_command.replace("'", "''")))
        open(os.path.join(data, "recovery.signal"), "w").close()
        sh(["chown", "-R", PG_USER, data])
        logfile = os.path.join(self.run_dir, "recovery.log")
        if os.path.exists(logfile):
            os.unlink(logfile)
        started = time.monotonic()
        if beside:
            beside = subprocess.Popen(["runuser", "-u", PG_USER, "--"] + beside, stdin=subprocess.DEVNULL)
        # pg_ctl -w counts a server in recovery as started: watch the log for the end,
        # reading only what was added (rereading all of it 50 times a second took
        # a tenth of the CPU a recovery through ssh has on 2 cores).
        sh([self.pg("pg_ctl"), "start", "-W", "-D", data, "-l", logfile], user=PG_USER)
        seen = [0, b""]      # bytes read so far, their tail

        def ready():
            with open(logfile, "rb") as log_file:
                log_file.seek(seen[0])
                added = log_file.read()
            seen[0] += len(added)
            seen[1] = seen[1][-64:] + added
            return b"ready to accept connections" in seen[1]
        wait_for(lambda: os.path.exists(logfile) and ready(), 1200, "the end of recovery", 0.02)
        if beside and beside.wait(600):
            raise RuntimeError("the command beside the recovery failed: exit code %d" % beside.returncode)
        elapsed = time.monotonic() - started
        count = sh([self.pg("psql"), "-X", "-q", "-A", "-t", "-h", self.sock, "-p", str(port), "-U",
                    PG_USER, "-d", "postgres", "-c", "SELECT count(*) FROM bench"], user=PG_USER).stdout
        sh([self.pg("pg_ctl"), "stop", "-m", "immediate", "-D", data], user=PG_USER)
        if count.strip() != self.expected:
            raise RuntimeError("recovered %s rows, the primary had %s" % (count, self.expected))
        with open(os.path.join(self.run_dir, "recovery.log")) as log_file:
            restored = log_file.read().count("restored log file")
        shutil.rmtree(data)
        return elapsed, restored

    # -- validation and the spool -------------------------------------------

    def validation_costs(self):
        """[(label, median seconds per segment)] of each check, timed in the client's Python."""
        code = VALIDATION_TIMER % {"script": SCRIPT, "wal_dir": self.wal_dir, "pgdata": self.pgdata,
                                   "scratch": self.run_dir, "names": " ".join(self.names)}
        out = sh([self.python, "-c", code], user=PG_USER, timeout=3600).stdout
        return [(line.split("\t")[0], float(line.split("\t")[1])) for line in out.splitlines() if "\t" in line]

    def spool_deliveries(self, rep=0):
        """(cp ms, pg_wal_fetch-from-the-spool ms): medians over every segment, the file put in
        the spool (or a local directory) before each call, untimed."""
        target = os.path.join(self.run_dir, "spooltarget")
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(os.path.join(target, "pg_wal"))
        os.makedirs(os.path.join(target, "global"))
        shutil.copy(os.path.join(self.pgdata, "global", "pg_control"), os.path.join(target, "global"))
        shutil.copy(os.path.join(self.pgdata, "PG_VERSION"), target)
        spool_root = os.path.join(self.run_dir, "spool_w%d" % rep)
        config = self.write_config(8, spool_root, os.path.join(self.run_dir, "cw"))
        stage = os.path.join(self.run_dir, "stage")
        os.makedirs(stage)
        sh(["chown", "-R", PG_USER, target, stage])
        timer = SPOOL_TIMER % {"script": SCRIPT, "python": self.python, "config": config, "target": target,
                               "wal_dir": self.wal_dir, "stage": stage, "spool_root": spool_root,
                               "names": " ".join(self.names)}
        out = sh([self.python, "-c", timer], user=PG_USER, timeout=3600).stdout.split()
        shutil.rmtree(target)
        shutil.rmtree(stage)
        return float(out[0]) * 1000, float(out[1]) * 1000

    def teardown(self):
        for pid in self.sshd_pids:
            try:
                os.kill(pid, 15)
            except OSError:
                pass
        sh([self.pg("pg_ctl"), "stop", "-m", "immediate", "-D", self.pgdata], user=PG_USER, check=False)


VALIDATION_TIMER = r"""
import importlib.util, os, shutil, sys, time
spec = importlib.util.spec_from_file_location("fetch", "%(script)s")
fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch)
with open(os.path.join("%(pgdata)s", "PG_VERSION")) as version:
    major = version.read().strip()
cluster = fetch.Cluster(None, major)
waldump = fetch.find_waldump("", major)
names = "%(names)s".split()

def median(values):
    values = sorted(values)
    return values[len(values) // 2]

def staged(name):
    file = fetch.StagedFile("%(scratch)s")
    with open(os.path.join("%(wal_dir)s", name), "rb") as segment:
        file.write(segment.read())
    file.file.flush()
    return file

cp, pages, dump, walk = [], [], [], []
import mmap
for index, name in enumerate(names):
    started = time.time()
    shutil.copy(os.path.join("%(wal_dir)s", name), os.path.join("%(scratch)s", "cp.tmp"))
    cp.append(time.time() - started)
    file = staged(name)
    with mmap.mmap(file.file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        started = time.time()
        assert fetch.check_pages(data, name, cluster.magics) is None
        pages.append(time.time() - started)
        if waldump:
            started = time.time()
            code, message = fetch.run_waldump(waldump, file, name, 60)
            dump.append(time.time() - started)
            assert code == 0, message
        if index < 3:
            engine = fetch.crc32c_engine()
            started = time.time()
            assert fetch.walk_records(data, name, "segment", engine) is None
            walk.append(time.time() - started)
    file.discard()
os.unlink(os.path.join("%(scratch)s", "cp.tmp"))
print("cp of the segment	%%f" %% median(cp))
print("page headers (check_pages)	%%f" %% median(pages))
if dump:
    print("records by %%s	%%f" %% (os.path.basename(waldump), median(dump)))
print("records in Python (walk_records)	%%f" %% median(walk))
"""

SPOOL_TIMER = r"""
import hashlib, os, shutil, subprocess, time
names = "%(names)s".split()

def median(values):
    values = sorted(values)
    return values[len(values) // 2]

target = "%(target)s"
spool = None
cp, spool_times = [], []
for name in names:
    source = os.path.join("%(wal_dir)s", name)
    dest = os.path.join(target, "pg_wal", "RECOVERYXLOG")
    started = time.time()
    subprocess.check_call(["cp", source, dest])
    cp.append(time.time() - started)
    os.unlink(dest)
    if spool is None:
        # The first call fetches over ssh and makes this data directory's spool.
        subprocess.check_call(["%(python)s", "-S", "%(script)s", "-c", "%(config)s", name, "pg_wal/RECOVERYXLOG"],
                              cwd=target)
        os.unlink(dest)
        # This data directory's spool: the directory beside fetch-stats.json.
        spool = [os.path.join("%(spool_root)s", d) for d in os.listdir("%(spool_root)s")
                 if not d.startswith(".") and os.path.isdir(os.path.join("%(spool_root)s", d))][0]
        # Hold the prefetch lock (once the prefetcher this call started has ended):
        # no prefetcher competes for the 2 cores while deliveries are timed.
        import fcntl
        lock = open(os.path.join(spool, ".prefetch.lock"), "a")
        fcntl.flock(lock, fcntl.LOCK_EX)
        continue
    # Stage on the spool's file system, then into the spool: a warm spool, as a
    # prefetcher leaves it.
    staged = os.path.join(spool, ".bench.tmp")
    shutil.copy(source, staged)
    os.rename(staged, os.path.join(spool, name))
    started = time.time()
    subprocess.check_call(["%(python)s", "-S", "%(script)s", "-c", "%(config)s", name, "pg_wal/RECOVERYXLOG"],
                          cwd=target)
    spool_times.append(time.time() - started)
    os.unlink(dest)
print(median(cp), median(spool_times))
"""


FLOOR0 = r"""#!/bin/sh
%(ssh)s -o ControlMaster=auto -o ControlPath=%(cm)s/%%C -o ControlPersist=60 %(host)s \
    "cat %(wal_dir)s/$1" > %(scratch)s/$1 || exit 1
%(waldump)s -z %(scratch)s/$1 > /dev/null 2>&1
mv %(scratch)s/$1 "$2"
"""

FLOOR8 = r"""#!/bin/sh
case " %(names)s " in *" $1 "*) ;; *) exit 1;; esac
if [ ! -e %(spool)s/started ] && mkdir %(spool)s/started 2> /dev/null; then
    sh %(feed)s "$1" < /dev/null > /dev/null 2>&1 &
fi
while [ ! -e %(spool)s/ready/$1 ]; do
    if [ -e %(spool)s/checked ]; then
        [ -e %(spool)s/ready/$1 ] || exit 1
        break
    fi
    sleep 0.002
done
mv %(spool)s/ready/$1 "$2"
"""

FEED = r"""#!/bin/sh
list="" on=""
for n in %(names)s; do
    [ "$n" = "$1" ] && on=1
    [ -n "$on" ] && list="$list $n"
done
cd %(spool)s/in || exit 1
{ %(stream)s "cd %(wal_dir)s && tar -b 2048 -cf - $list" | tar -b 2048 -B -xf -; : > %(spool)s/streamed; } &
set -- $list
while [ $# -gt 0 ]; do
    n=$1
    shift
    while ! { [ $# -gt 0 ] && [ -e "$1" ]; } && [ ! -e %(spool)s/streamed ]; do
        sleep 0.002
    done
    %(waldump)s -z $n > /dev/null 2>&1
    mv $n %(spool)s/ready/$n
done
: > %(spool)s/checked
"""


def restricted_key_part(bench, old_script=None, baseline_rev=None):
    """5: delivery through the key restricted to pg_wal_serve against the same user's
    bare key (and, with --baseline-rev, that revision's script through the bare key)."""
    bench.start_key_host()
    n = len(bench.names)
    runs = [("bare", SCRIPT), ("restricted", SCRIPT)] + ([("bare", old_script)] if old_script else [])
    times = {}
    # Alternated, twice each: the 2 cores are shared with whatever else runs.
    for round_ in (1, 2):
        for prefetch in (0, 8):
            for index, (kind, script) in enumerate(runs):
                tag = "%d%d_%d" % (index, prefetch, round_)
                control = os.path.join(bench.run_dir, "ck" + tag)
                config = bench.key_config(prefetch, os.path.join(bench.run_dir, "spool_k" + tag), control, kind)
                try:
                    elapsed = bench.deliver_all("%s -S %s -c %s %%f %%p" % (bench.python, script, config))
                finally:
                    bench.close_masters(control)
                times[index, prefetch] = min(elapsed, times.get((index, prefetch), elapsed))
    print("\n5. the guest's key restricted to pg_wal_serve, %d segments, one process per file (best of 2)" % n)
    for prefetch in (0, 8):
        bare, restricted = times[0, prefetch], times[1, prefetch]
        print("  prefetch = %d: bare key %7.2f s (%5.1f ms/segment), restricted %7.2f s (%5.1f ms/segment);"
              " restricted/bare = %.2f (target <= 1.1)" % (prefetch, bare, bare * 1000 / n, restricted,
                                                            restricted * 1000 / n, restricted / bare))
        if old_script:
            then = times[2, prefetch]
            print("  prefetch = %d: bare key, pg_wal_fetch.py at %-12s %7.2f s (%5.1f ms/segment); restricted "
                  "now/bare then = %.2f" % (prefetch, baseline_rev[:12], then, then * 1000 / n, restricted / then))


def validation_parts(bench, args, old_script, n):
    """Parts 3, 4 and (without --skip-keys) 5."""
    print("\n3. whole-segment validation, per 16 MiB segment (median; client Python)")
    for label, value in bench.validation_costs():
        print("  %-44s %8.1f ms" % (label, value * 1000))

    spool_runs = [bench.spool_deliveries(rep) for rep in range(args.reps)]
    cp_ms, spool_ms = median([run[0] for run in spool_runs]), median([run[1] for run in spool_runs])
    print("\n4. delivery from a warm spool, one process per file (median of %d x %d; load %s)"
          % (args.reps, n, load_average()))
    print("  cp of the same file (runuser)              %8.1f ms  (%s)"
          % (cp_ms, " ".join("%.1f" % run[0] for run in spool_runs)))
    print("  pg_wal_fetch.py from the spool (runuser)   %8.1f ms  (%s)"
          % (spool_ms, " ".join("%.1f" % run[1] for run in spool_runs)))
    print("  spool/cp = %.2f (target <= 2.5)" % (spool_ms / cp_ms))
    if not args.skip_keys:
        restricted_key_part(bench, old_script, args.baseline_rev)


def shell_quote(text):
    return "'" + text.replace("'", "'\"'\"'") + "'"


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def load_average():
    with open("/proc/loadavg") as loadavg:
        return " ".join(loadavg.read().split()[:3])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of parts 1, 2 and 4 (medians)")
    parser.add_argument("--pg", default="15")
    parser.add_argument("--baseline-rev", help="also run bin/pg_wal_fetch.py of this git revision")
    parser.add_argument("--only-keys", action="store_true", help="run part 5 alone (the restricted key)")
    parser.add_argument("--skip-keys", action="store_true", help="leave part 5 out")
    parser.add_argument("--peers", action="store_true", help="then part 6: the peers' bench (bench/peers.py)")
    parser.add_argument("--floor", action="store_true",
                        help="also the floors: each target's work in /bin/sh, without Python (parts 1 and 2)")
    parser.add_argument("--skip-validation", action="store_true", help="leave parts 3, 4 and 5 out (not 6)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (sshd, runuser)")
    run_dir = tempfile.mkdtemp(prefix="pgzfs-bench-", dir="/tmp")
    os.chmod(run_dir, 0o755)
    chown_pg(run_dir)
    bench = Bench(run_dir, pg_bindir(args.pg), args.segments)
    try:
        bench.build_archive()
        bench.start_hosts()
        python = sh([bench.python, "-c", "import sys; print(sys.version.split()[0])"]).stdout.strip()
        n = len(bench.names)
        print("archive: %d segments of 16 MiB; client Python %s as %s; PostgreSQL %s; load average %s"
              % (n, python, PG_USER, args.pg, load_average()))
        old_script = None
        if args.baseline_rev:
            old_script = os.path.join(run_dir, "pg_wal_fetch_%s.py" % args.baseline_rev[:12])
            with open(old_script, "w") as out:
                out.write(sh(["git", "-C", REPO, "show", "%s:bin/pg_wal_fetch.py" % args.baseline_rev]).stdout)
            os.chmod(old_script, 0o755)
        if args.only_keys:
            restricted_key_part(bench, old_script, args.baseline_rev)
            return
        scp = "ping -c 1 -W 1 HOST && scp -q -P %d %s %s@HOST:%s/*/%%f %%p" % (
            bench.ssh_port, bench.ssh_opts, bench.user, bench.arch)
        article = "; ".join(scp.replace("HOST", address) for address in HOSTS)
        cm_dir = os.path.join(run_dir, "cs")
        scp_cm = ("scp -q -P %d %s -o ControlMaster=auto -o ControlPath=%s/%%%%C -o ControlPersist=60 "
                  "%s@%s:%s/*/%%f %%p" % (bench.ssh_port, bench.ssh_opts, cm_dir, bench.user, HOSTS[0], bench.arch))
        runs = [("d", 0, SCRIPT), ("e", 8, SCRIPT)]
        if old_script:
            runs += [("d_base", 0, old_script), ("e_base", 8, old_script)]
        results, loads = {}, []
        for rep in range(args.reps):
            results.setdefault("a", []).append(bench.deliver_all("cp %s/primary/%%f %%p" % bench.arch))
            results.setdefault("b", []).append(bench.deliver_all(article))
            results.setdefault("c", []).append(bench.stream_all())
            results.setdefault("c2", []).append(bench.stream_all(FETCH.AES_FIRST_CIPHERS))
            if not os.path.isdir(cm_dir):
                os.makedirs(cm_dir, 0o700)
                chown_pg(cm_dir)
            try:
                results.setdefault("s", []).append(bench.deliver_all(scp_cm))
            finally:
                bench.close_masters(cm_dir)
            for key, prefetch, script in runs:
                spool = os.path.join(run_dir, "spool_%s_%d" % (key, rep))
                control = os.path.join(run_dir, "c%s%d" % (key, rep))
                config = bench.write_config(prefetch, spool, control)
                fetch = "%s -S %s -c %s %%f %%p" % (bench.python, script, config)
                try:
                    results.setdefault(key, []).append(bench.deliver_all(fetch))
                finally:
                    bench.close_masters(control)
            if args.floor:
                floor0, floor8 = bench.floor_commands("d%d" % rep)
                for key, command in (("f0", floor0), ("f8", floor8)):
                    try:
                        results.setdefault(key, []).append(bench.deliver_all(command))
                    finally:
                        bench.floor_done("d%d" % rep)
            loads.append(load_average())
        result = dict((key, median(values)) for key, values in results.items())
        labels = {"a": "cp from a local directory", "b": "article's command, both hosts up",
                  "c": "one ssh cat of every segment", "c2": "the same, AES-GCM first",
                  "s": "scp, shared connection", "d": "pg_wal_fetch.py, prefetch = 0",
                  "e": "pg_wal_fetch.py, prefetch = 8", "f0": "floor: sh, ssh, pg_waldump, prefetch 0",
                  "f8": "floor: sh, ssh stream, pg_waldump, prefetch"}
        print("\n1. delivery of %d segments, one process per file (median of %d; load %s)"
              % (n, args.reps, "; ".join(loads)))
        for key in ("a", "b", "c", "c2", "s", "d", "e", "f0", "f8"):
            if key not in result:
                continue
            print("  (%-2s) %-36s %7.2f s  %6.1f ms/segment  (%s)" % (
                key, labels[key], result[key], result[key] * 1000 / n,
                " ".join("%.2f" % value for value in results[key])))
        print("  (e)/(c) = %.2f (target <= 1.3)   (e)/(c2) = %.2f   (d)/(s) = %.2f (target <= 1.0)   "
              "(b)/(e) = %.1f   (s)/(e) = %.1f" % (result["e"] / result["c"], result["e"] / result["c2"],
                                                   result["d"] / result["s"], result["b"] / result["e"],
                                                   result["s"] / result["e"]))
        if args.floor:
            print("  floors: (f8)/(c) = %.2f (the target for (e): <= 1.3)   (f0)/(s) = %.2f (the target for (d): "
                  "<= 1.0)" % (result["f8"] / result["c"], result["f0"] / result["s"]))
        if old_script:
            for key in ("d", "e"):
                print("  (%s) at %-12s %24s %7.2f s  %6.1f ms/segment; now/then = %.2f"
                      % (key, args.baseline_rev[:12], "", result[key + "_base"],
                         result[key + "_base"] * 1000 / n, result[key] / result[key + "_base"]))

        recovery = {}
        for rep in range(args.reps):
            recovery.setdefault("a", []).append(bench.recover("cp %s/primary/%%f %%p" % bench.arch))
            control = os.path.join(run_dir, "cr%d" % rep)
            config = bench.write_config(8, os.path.join(run_dir, "spool_r%d" % rep), control)
            try:
                recovery.setdefault("e", []).append(bench.recover("%s -S %s -c %s %%f %%p" % (bench.python, SCRIPT, config)))
            finally:
                bench.close_masters(control)
            if old_script:
                control = os.path.join(run_dir, "cf%d" % rep)
                config = bench.write_config(8, os.path.join(run_dir, "spool_f%d" % rep), control)
                try:
                    recovery.setdefault("f", []).append(
                        bench.recover("%s -S %s -c %s %%f %%p" % (bench.python, old_script, config)))
                finally:
                    bench.close_masters(control)
            if args.floor:
                try:
                    recovery.setdefault("g", []).append(bench.recover(bench.floor_commands("r%d" % rep)[1]))
                finally:
                    bench.floor_done("r%d" % rep)
                # (h): no call waits for anything: cp serves the replay while the
                # stream and pg_waldump do the same work beside it, until both end.
                bench.floor_commands("h%d" % rep)
                first = bench.backup_start_segment()
                try:
                    recovery.setdefault("h", []).append(bench.recover(
                        "cp %s/primary/%%f %%p" % bench.arch,
                        beside=["sh", os.path.join(bench.floor_home("h%d" % rep), "feed.sh"), first]))
                finally:
                    bench.floor_done("h%d" % rep)
        print("\n2. recovery of the base backup (pg_ctl start to end of recovery; median of %d; load %s)"
              % (args.reps, load_average()))
        seconds = dict((key, median([elapsed for elapsed, _restored in values])) for key, values in recovery.items())
        labels["f"] = "pg_wal_fetch.py at %s" % (args.baseline_rev or "")[:12]
        labels["g"] = "floor: sh, ssh stream, pg_waldump"
        labels["h"] = "floor: cp, the stream and checks beside"
        for key in sorted(recovery):
            print("  (%s) %-36s %7.2f s  (%d files restored; %s)" % (
                key, labels[key], seconds[key], recovery[key][0][1],
                " ".join("%.2f" % elapsed for elapsed, _restored in recovery[key])))
        print("  (e)/(a) = %.2f (target <= 1.5)" % (seconds["e"] / seconds["a"]))
        if args.floor:
            print("  floors: (g)/(a) = %.2f   (h)/(a) = %.2f (the target for (e): <= 1.5)"
                  % (seconds["g"] / seconds["a"], seconds["h"] / seconds["a"]))
        if old_script:
            print("  (e)/(f) = %.2f" % (seconds["e"] / seconds["f"]))

        if not args.skip_validation:
            validation_parts(bench, args, old_script, n)
    finally:
        bench.teardown()
        shutil.rmtree(run_dir, ignore_errors=True)
    if args.peers and not args.only_keys:
        print("\n6. the peers: ../shared/bench/wal_restore_bench.py, through bench/peers.py (load average %s)"
              % load_average(), flush=True)
        code = subprocess.call([sys.executable, os.path.join(REPO, "bench", "peers.py"), "--script", SCRIPT,
                                "--python", bench.python])
        if code:
            sys.exit("the peers' bench failed: exit code %d" % code)


if __name__ == "__main__":
    main()
