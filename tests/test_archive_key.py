"""The guest's key on an archive host reads archived WAL and nothing else.

A host of its own: sshd on two loopback addresses, a per-user authorized_keys
and PAM, as real hosts run it. pg_wal_serve and the guest's key are installed
on it exactly as README.md says ("The archive hosts: a key that reads WAL and
nothing else"), for the postgres user; the guest is the postgres user here,
its ssh bound to the guest's own address. Then: fetch, prefetch, --check and a
real recovery work through the key, and everything else that key could try
(a shell command, a path, a metacharacter, scp, sftp, forwarding, an agent,
a PTY, another source address) is refused and changes nothing on the host.
"""

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
import types

import pytest

from testbed import (BIN, PG_USER, ArchiveHost, chown_pg, free_port, load_script, python36_for_postgres,
                     sh, wait_for)

pytestmark = pytest.mark.timeout(300)

SCRIPT = os.path.join(BIN, "pg_wal_fetch.py")
FETCH = load_script("pg_wal_fetch")
MARK = FETCH.REQUEST_MARK


class Rig(object):
    """The restricted host, the guest's key, data directory and config."""

    def __init__(self, tb, segments):
        self.tb = tb
        self.segments = segments
        self.python = python36_for_postgres()
        self.guest_address = tb.address(14)
        self.other_address = tb.address(15)
        self.host = ArchiveHost(tb, "rhost", tb.address(12), user_keys=True, more_addresses=[tb.address(13)],
                                log_level="DEBUG1")
        self.link_archive()
        # The guest: postgres's key (as setup_guest.py --install makes it), a data
        # directory to run in (PostgreSQL runs restore_command there), spool, config.
        self.guest = os.path.join(tb.run_dir, "guest")
        ssh_dir = os.path.join(self.guest, ".ssh")
        os.makedirs(ssh_dir)
        self.pgdata = os.path.join(self.guest, "pgdata")
        self.pg_wal = os.path.join(self.pgdata, "pg_wal")
        os.makedirs(self.pg_wal)
        for name in ("global/pg_control", "PG_VERSION"):      # the cluster's identity and version
            target = os.path.join(self.pgdata, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(os.path.join(tb.primary.pgdata, name), target)
        sh(["chown", "-R", PG_USER, self.guest])
        os.chmod(ssh_dir, 0o700)
        self.key = os.path.join(ssh_dir, "id_ed25519")
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "postgres@guest pg_zfs", "-f", self.key],
           user=PG_USER)
        self.spool_root = os.path.join(self.guest, "spool")
        self.control = os.path.join(self.guest, "c")
        self.configure()
        self.server = self.install_as_the_readme_says()

    def link_archive(self):
        """Link every file of host1's archive (as it is now) into this host's."""
        source = self.tb.hosts[0].wal_dir
        for name in os.listdir(source):
            target = os.path.join(self.host.wal_dir, name)
            if not name.startswith(".") and not os.path.lexists(target):
                os.link(os.path.join(source, name), target)

    def source(self, **keys):
        section = {"host": self.host.address, "port": str(self.host.port), "user": PG_USER,
                   "path": self.host.glob, "probe": "tcp", "identity_file": self.key,
                   "ssh_options": "-o UserKnownHostsFile=%s -o BindAddress=%s"
                                  % (self.tb.known_hosts, self.guest_address)}
        section.update(keys)
        return section

    def configure(self, prefetch=0, **keys):
        sections = {
            "postgres": {"pgdata": self.pgdata, "bindir": self.tb.pg_bindir},
            "archive": {"sources": "rhost", "spool_dir": self.spool_root, "control_dir": self.control,
                        "control_persist": "5", "prefetch": str(prefetch), "timeout": "20"},
            "source rhost": self.source(**keys),
        }
        self.config = self.tb.write_config(os.path.join(self.guest, "pg_zfs.conf"), sections=sections)
        return self.config

    def install_as_the_readme_says(self):
        """README, "The archive hosts": the server and the key's line. Where a real
        host has /usr/local/bin and ~postgres, this one has its own directories."""
        local_bin = os.path.join(self.host.home, "usr", "local", "bin")
        os.makedirs(local_bin)
        # On the guest: the server, and the line for each host (as postgres, who owns the key).
        served = os.path.join(self.guest, "pg_wal_serve")
        with open(served, "w") as out:
            subprocess.run([self.python, SCRIPT, "--serve-script"], stdout=out, check=True)
        server = os.path.join(local_bin, "pg_wal_serve")
        proc = self.run("--authorized-keys", "--server", server)
        assert proc.returncode == 0, proc.stderr
        lines = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
        assert len(lines) == 1
        self.authorized_line = lines[0]
        # On the host, as root.
        sh(["install", "-o", "root", "-g", "root", "-m", "0755", served, server])
        home = self.host.home_of(PG_USER)
        os.makedirs(home)
        chown_pg(home)
        ssh_dir = os.path.join(home, ".ssh")
        sh(["install", "-d", "-m", "0700", "-o", PG_USER, "-g", PG_USER, ssh_dir])
        authorized_keys = self.host.authorized_keys_of(PG_USER)
        with open(authorized_keys, "a") as out:
            out.write(self.authorized_line + "\n")
        sh(["chown", "%s:%s" % (PG_USER, PG_USER), authorized_keys])
        sh(["chmod", "0600", authorized_keys])
        return server

    def argv(self, *args):
        return ["runuser", "-u", PG_USER, "--", self.python, SCRIPT, "-c", self.config] + list(args)

    def run(self, *args):
        return subprocess.run(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, cwd=self.pgdata, timeout=120)

    def ssh_argv(self, *args, **options):
        """ssh as the guest's postgres user with the guest's key to this host."""
        return ["runuser", "-u", PG_USER, "--", "ssh", "-p", str(self.host.port), "-i", self.key,
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                "-o", "UserKnownHostsFile=%s" % self.tb.known_hosts, "-o", "ConnectTimeout=5",
                "-b", options.get("bind", self.guest_address)] + list(args)

    def command(self, remote_command, *ssh_options, **options):
        """ssh HOST REMOTE_COMMAND with the guest's key."""
        target = "%s@%s" % (PG_USER, options.pop("address", self.host.address))
        return subprocess.run(self.ssh_argv(*ssh_options, **options) + [target, remote_command],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)

    def original(self, name):
        with open(os.path.join(self.host.wal_dir, name), "rb") as segment:
            return segment.read()

    def delivered(self):
        with open(os.path.join(self.pg_wal, "RECOVERYXLOG"), "rb") as segment:
            return segment.read()

    def log_since(self, offset):
        with open(self.host.log, "rb") as log_file:
            log_file.seek(offset)
            return log_file.read().decode("utf-8", "replace")

    def log_size(self):
        return os.path.getsize(self.host.log)

    def state(self):
        """Every file below the host's directory and ~postgres there, as (mode, owner,
        size, mtime), but sshd's own log; and /tmp's entries of the postgres user."""
        state = {}
        for top, _dirs, files in os.walk(self.host.home):
            for name in [""] + files:
                path = os.path.join(top, name)
                if path == self.host.log:
                    continue
                info = os.lstat(path)
                state[path] = (info.st_mode, info.st_uid, info.st_size, info.st_mtime_ns)
        return state

    def prefetchers(self):
        """The pids of the detached prefetchers filling this data directory's spool."""
        spool = FETCH.spool_for(self.spool_root, self.pgdata).encode()
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as cmdline:
                    words = cmdline.read().split(b"\0")
            except OSError:
                continue
            if b"--prefetch" in words and spool in words:
                pids.append(int(pid))
        return pids

    def wait_for_prefetcher(self):
        wait_for(lambda: not self.prefetchers(), 60, "the prefetcher to finish")

    def close_masters(self):
        """End the shared ssh connections pg_wal_fetch.py left (ControlPersist)."""
        sockets = os.listdir(self.control) if os.path.isdir(self.control) else []
        for name in [name for name in sockets if not name.startswith("down-")]:
            sh(["ssh", "-O", "exit", "-o", "ControlPath=" + os.path.join(self.control, name), "guest-master"],
               user=PG_USER, check=False, timeout=30)

    def reset(self):
        self.wait_for_prefetcher()
        self.close_masters()
        for directory in (self.pg_wal, self.spool_root):
            if os.path.isdir(directory):
                for name in os.listdir(directory):
                    path = os.path.join(directory, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        self.configure()

    def teardown(self):
        try:
            self.wait_for_prefetcher()
            self.close_masters()
        finally:
            self.host.teardown()
            wait_for(lambda: not os.path.exists("/proc/%d" % self.host.pid), 10, "sshd to end")
            shutil.rmtree(self.host.home, ignore_errors=True)
            shutil.rmtree(self.guest, ignore_errors=True)


@pytest.fixture(scope="module")
def rig(tb):
    names = [tb.switch_wal() for _ in range(6)]
    run = None
    for start in range(len(names) - 3):
        window = names[start:start + 4]
        if all(int(b[8:], 16) == int(a[8:], 16) + 1 for a, b in zip(window, window[1:])):
            run = window
            break
    assert run, names
    bed = Rig(tb, run)
    try:
        yield bed
    finally:
        bed.teardown()


@pytest.fixture
def fresh(rig):
    rig.reset()
    try:
        yield rig
    finally:
        rig.reset()


@pytest.fixture
def unchanged(rig):
    """The host as it was before the test, checked after it."""
    before = rig.state()
    yield rig
    assert rig.state() == before


# ---------------------------------------------------------------------------
# Installed as the README says: the line, and the key works for WAL
# ---------------------------------------------------------------------------

def test_the_line_restricts_the_key_to_pg_wal_serve_from_the_guest_address(rig):
    with open(rig.key + ".pub") as public:
        key = " ".join(public.read().split())
    assert rig.authorized_line == 'restrict,from="%s",command="%s \'%s\'" %s' % (
        rig.guest_address, rig.server, rig.host.glob, key)
    mode = os.stat(rig.server).st_mode & 0o7777
    assert mode == 0o755 and os.stat(rig.server).st_uid == 0
    ssh_dir = os.path.dirname(rig.host.authorized_keys_of(PG_USER))
    assert os.stat(ssh_dir).st_mode & 0o777 == 0o700
    assert os.stat(rig.host.authorized_keys_of(PG_USER)).st_mode & 0o777 == 0o600
    assert os.stat(rig.key).st_mode & 0o777 == 0o600


def test_fetch_through_the_restricted_key_delivers_the_archived_bytes(fresh):
    name = fresh.segments[0]
    offset = fresh.log_size()
    proc = fresh.run("-v", name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert fresh.delivered() == fresh.original(name)
    assert "delivered from [source rhost]" in proc.stderr
    log_text = fresh.log_since(offset)
    assert "forced-command (key-option)" in log_text and "for %s from %s" % (PG_USER, fresh.guest_address) \
        in log_text, log_text[-2000:]
    # The control socket and the spool stay private.
    assert os.stat(fresh.control).st_mode & 0o777 == 0o700


def test_missing_segment_through_the_restricted_key_is_not_found(fresh):
    last = fresh.segments[-1]
    after = last[:16] + "%08X" % (int(last[16:], 16) + 0x100)
    proc = fresh.run(after, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 1, proc.stderr
    assert not os.path.exists(os.path.join(fresh.pg_wal, "RECOVERYXLOG"))


def test_prefetch_through_the_restricted_key_fills_the_spool_with_the_archived_bytes(fresh):
    fresh.configure(prefetch=3)
    first, rest = fresh.segments[0], fresh.segments[1:]
    proc = fresh.run(first, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    spool = FETCH.spool_for(fresh.spool_root, fresh.pgdata)
    wait_for(lambda: all(os.path.exists(os.path.join(spool, name)) for name in rest), 60,
             "the prefetcher to spool %s" % rest)
    fresh.wait_for_prefetcher()
    for name in rest:
        with open(os.path.join(spool, name), "rb") as spooled:
            assert spooled.read() == fresh.original(name)
    assert os.stat(spool).st_mode & 0o777 == 0o700
    os.unlink(os.path.join(fresh.pg_wal, "RECOVERYXLOG"))
    proc = fresh.run("-v", rest[0], "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert "delivered from the spool" in proc.stderr
    assert fresh.delivered() == fresh.original(rest[0])


def test_check_says_the_key_is_restricted_and_how_the_host_sees_the_guest(fresh):
    proc = fresh.run("--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("rhost (%s:%d): reachable, %s matches 1 directory, newest WAL file "
                               % (fresh.host.address, fresh.host.port, fresh.host.glob)), lines
    assert ("rhost: key restricted: pg_wal_serve %s on %s answers as postgres, serving %s; the host sees "
            "this guest as %s" % (FETCH.VERSION, fresh.host.address, fresh.host.glob, fresh.guest_address)
            ) in lines
    assert "WARNING" not in proc.stdout
    [source] = json.loads(fresh.run("--check", "--json").stdout)["sources"]
    assert source["state"] == "working" and source["warnings"] == []
    assert (source["key"]["mode"], source["key"]["user"], source["key"]["client"]) == (
        "restricted", "postgres", fresh.guest_address)


def test_check_warns_that_an_unrestricted_key_runs_any_command(fresh, tb):
    config = tb.write_config(os.path.join(fresh.guest, "unrestricted.conf"), sections=tb.archive_config(),
                             overrides={"archive": {"control_dir": fresh.control}})
    proc = subprocess.run(["runuser", "-u", PG_USER, "--", fresh.python, SCRIPT, "-c", config, "--check"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for host in tb.hosts:
        assert ("WARNING: [source %s] key unrestricted: it runs any command on %s as root; install it "
                "restricted to pg_wal_serve (pg_wal_fetch.py --authorized-keys)" % (host.name, host.address)
                ) in proc.stdout.splitlines()


def test_the_second_listen_address_serves_the_same_key(rig, unchanged):
    proc = rig.command(MARK + " probe", address=rig.host.addresses[1])
    assert proc.returncode == 0, proc.stderr
    answer = FETCH.parse_probe(proc.stdout)
    assert answer["mode"] == "restricted" and answer["client"] == rig.guest_address


@pytest.mark.timeout(600)
def test_real_recovery_through_the_restricted_key_has_every_row(fresh, tb):
    primary = tb.primary
    backup = os.path.join(fresh.guest, "restored")
    sh([primary.tool("pg_basebackup"), "-D", backup, "-X", "none", "-c", "fast",
        "-T", "%s=%s" % (primary.ts1_dir, os.path.join(fresh.guest, "restored_ts1")),
        "-h", primary.socket_dir, "-p", str(primary.port), "-U", PG_USER], user=PG_USER, timeout=300)
    table = "archive_key_rows"
    primary.psql("DROP TABLE IF EXISTS %s; CREATE TABLE %s (id int, note text)" % (table, table))
    for batch in range(3):
        primary.psql("INSERT INTO %s SELECT g, md5(g::text) FROM generate_series(%d, %d) g"
                     % (table, batch * 20000, batch * 20000 + 19999))
        last = tb.switch_wal()
    expected = primary.psql("SELECT count(*), md5(string_agg(note, ',' ORDER BY id)) FROM %s" % table)
    fresh.link_archive()
    config = fresh.configure(prefetch=4)
    cluster = tb.new_cluster("archive_key_restore", pgdata=backup)
    try:
        cluster.configure(port=cluster.port, unix_socket_directories="'%s'" % cluster.socket_dir,
                          archive_mode="off", hot_standby="off", recovery_target_timeline="'current'",
                          restore_command="'%s %s -c %s %%f %%p'" % (fresh.python, SCRIPT, config))
        open(os.path.join(backup, "recovery.signal"), "w").close()
        chown_pg(os.path.join(backup, "recovery.signal"))
        sh([cluster.tool("pg_ctl"), "start", "-D", backup, "-l", cluster.logfile], user=PG_USER)

        def opened():
            return cluster.is_running() and cluster.psql("SELECT NOT pg_is_in_recovery()",
                                                         check=False).stdout.strip() == "t"
        wait_for(opened, 300, "the end of recovery", interval=1)
        assert cluster.psql("SELECT count(*), md5(string_agg(note, ',' ORDER BY id)) FROM %s" % table) == expected
        with open(cluster.logfile) as log_file:
            log_text = log_file.read()
        assert 'restored log file "%s" from archive' % last in log_text, log_text[-3000:]
        assert "stopping recovery" not in log_text
    finally:
        cluster.stop("immediate")
        fresh.wait_for_prefetcher()
        shutil.rmtree(backup, ignore_errors=True)
        shutil.rmtree(os.path.join(fresh.guest, "restored_ts1"), ignore_errors=True)
        primary.psql("DROP TABLE IF EXISTS %s" % table)


# ---------------------------------------------------------------------------
# Everything else the key could try: refused, and nothing on the host changes
# ---------------------------------------------------------------------------

def assert_refused(proc, reason):
    """Exit 1, nothing on stdout, and exactly one line on stderr: pg_wal_serve's."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pg_wal_serve: refused: " + reason), proc.stderr


def marker(rig):
    """A file a command run as postgres on the host could create: in ~postgres."""
    return os.path.join(rig.host.home_of(PG_USER), "PWNED")


@pytest.mark.parametrize("command, reason", [
    ("id", "not a pg_wal_fetch request: id"),
    ("cat /etc/shadow", "not a pg_wal_fetch request: cat /etc/shadow"),
    ("touch PWNED", "not a pg_wal_fetch request: touch PWNED"),
    ("sh -c 'touch PWNED'", "not a pg_wal_fetch request: sh -c 'touch PWNED'"),
    (MARK + " fetch 1 ../../etc/passwd", "not a WAL file name: ../../etc/passwd"),
    (MARK + " fetch 1 ../../../../../../etc/shadow", "not a WAL file name: ../../../../../../etc/shadow"),
    (MARK + " fetch 1 /etc/passwd", "not a WAL file name: /etc/passwd"),
    (MARK + " fetch 1 000000010000000000000001;touch PWNED", "not a WAL file name: 000000010000000000000001;"),
    (MARK + " fetch 1 000000010000000000000001$(touch PWNED)", "not a WAL file name: 000000010000000000000001$("),
    (MARK + " fetch 1 `touch PWNED`", "not a WAL file name: `touch"),
    (MARK + " fetch 1 00000001000000000000000*", "not a WAL file name: 00000001000000000000000*"),
    (MARK + " fetch 1 000000010000000000000001|tee PWNED", "not a WAL file name: 000000010000000000000001|tee"),
    (MARK + " list; touch PWNED", "not a pg_wal_fetch request: list;"),
    (MARK + " list /etc", "list takes no argument"),
    (MARK + " shell", "not a pg_wal_fetch request: shell"),
    ("scp -t .", "not a pg_wal_fetch request: scp -t ."),
    ("scp -f /etc/passwd", "not a pg_wal_fetch request: scp -f /etc/passwd"),
    ("rsync --server --sender -vlogDtpre.iLsfxC . /", "not a pg_wal_fetch request: rsync"),
])
def test_a_command_other_than_a_wal_request_is_refused_in_one_line(rig, unchanged, command, reason):
    proc = rig.command(command)
    assert_refused(proc, reason)
    assert not os.path.exists(marker(rig))


def test_a_login_without_a_command_gets_no_shell(rig, unchanged):
    proc = subprocess.run(rig.ssh_argv("-T") + ["%s@%s" % (PG_USER, rig.host.address)],
                          input="touch PWNED\nid\n", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert_refused(proc, "no command")
    assert not os.path.exists(marker(rig))


def test_a_pty_is_not_allocated(rig, unchanged):
    offset = rig.log_size()
    proc = subprocess.run(rig.ssh_argv("-tt") + ["%s@%s" % (PG_USER, rig.host.address), "touch PWNED"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert proc.returncode != 0
    assert "PTY allocation request failed" in proc.stderr
    assert "Allocating a pty not permitted" in rig.log_since(offset)
    assert not os.path.exists(marker(rig))


def upload_source(rig):
    path = os.path.join(rig.guest, "upload.txt")
    with open(path, "w") as out:
        out.write("ssh-ed25519 AAAA attacker\n")
    chown_pg(path)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["scp-over-sftp", "scp-legacy-protocol"])
def test_scp_upload_and_download_are_refused(rig, unchanged, legacy):
    scp = ["runuser", "-u", PG_USER, "--", "scp"] + (["-O"] if legacy else []) + [
        "-P", str(rig.host.port), "-i", rig.key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "UserKnownHostsFile=%s" % rig.tb.known_hosts, "-o", "BindAddress=%s" % rig.guest_address]
    remote = "%s@%s:" % (PG_USER, rig.host.address)
    up = subprocess.run(scp + [upload_source(rig), remote + ".ssh/authorized_keys2"], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert up.returncode != 0
    downloaded = os.path.join(rig.guest, "passwd")
    down = subprocess.run(scp + [remote + "/etc/passwd", downloaded], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert down.returncode != 0
    assert not os.path.exists(downloaded) or os.path.getsize(downloaded) == 0
    if os.path.exists(downloaded):
        os.unlink(downloaded)
    assert not os.path.exists(os.path.join(rig.host.home_of(PG_USER), ".ssh", "authorized_keys2"))


def test_sftp_is_refused(rig, unchanged):
    batch = os.path.join(rig.guest, "sftp.batch")
    with open(batch, "w") as out:
        out.write("put %s PWNED\nget /etc/passwd %s/passwd\nls /\n" % (upload_source(rig), rig.guest))
    chown_pg(batch)
    proc = subprocess.run(["runuser", "-u", PG_USER, "--", "sftp", "-b", batch, "-P", str(rig.host.port),
                           "-i", rig.key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                           "-o", "UserKnownHostsFile=%s" % rig.tb.known_hosts,
                           "-o", "BindAddress=%s" % rig.guest_address, "%s@%s" % (PG_USER, rig.host.address)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    os.unlink(batch)
    assert proc.returncode != 0
    assert not os.path.exists(marker(rig)) and not os.path.exists(os.path.join(rig.guest, "passwd"))


@contextlib.contextmanager
def listener(address):
    """A TCP listener on address that records every connection it accepts."""
    server = socket.socket()
    server.bind((address, 0))
    server.listen(5)
    server.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, peer = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            accepted.append(peer)
            connection.close()
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join(5)
        server.close()


@contextlib.contextmanager
def background(argv):
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.out, proc.err = proc.communicate(timeout=30)


def test_local_port_forwarding_reaches_nothing(rig, unchanged):
    target = rig.tb.address(16)
    local_port = free_port(rig.guest_address)
    offset = rig.log_size()
    with listener(target) as (port, accepted):
        forward = "%s:%d:%s:%d" % (rig.guest_address, local_port, target, port)
        with background(rig.ssh_argv("-N", "-L", forward) + ["%s@%s" % (PG_USER, rig.host.address)]) as proc:
            def forwarding():
                with contextlib.closing(socket.socket()) as probe:
                    probe.settimeout(1)
                    return probe.connect_ex((rig.guest_address, local_port)) == 0
            wait_for(forwarding, 20, "ssh to listen on its local port")
            for _attempt in range(3):
                with contextlib.closing(socket.create_connection((rig.guest_address, local_port), 5)) as client:
                    client.settimeout(2)
                    client.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    try:
                        assert client.recv(100) == b""      # closed: the channel was refused
                    except (socket.timeout, ConnectionResetError):
                        pass
            time.sleep(1)
            assert proc.poll() is None
        assert accepted == []
    assert "refused local port forward" in rig.log_since(offset)


def test_remote_port_forwarding_is_refused(rig, unchanged):
    remote_port = free_port(rig.host.address)
    with listener(rig.tb.address(16)) as (port, accepted):
        proc = subprocess.run(rig.ssh_argv("-N", "-o", "ExitOnForwardFailure=yes", "-R", "%s:%d:%s:%d" % (
            rig.host.address, remote_port, rig.tb.address(16), port)) + ["%s@%s" % (PG_USER, rig.host.address)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=60)
        assert proc.returncode == 255 and "remote port forwarding failed" in proc.stderr, proc.stderr
        with contextlib.closing(socket.socket()) as probe:
            probe.settimeout(1)
            assert probe.connect_ex((rig.host.address, remote_port)) != 0
        assert accepted == []


def test_agent_forwarding_is_refused(rig, unchanged):
    agent_socket = os.path.join(rig.guest, "agent.sock")
    offset = rig.log_size()
    with background(["runuser", "-u", PG_USER, "--", "ssh-agent", "-D", "-a", agent_socket]):
        wait_for(lambda: os.path.exists(agent_socket), 10, "ssh-agent")
        argv = rig.ssh_argv("-A") + ["%s@%s" % (PG_USER, rig.host.address), MARK + " probe"]
        argv[argv.index("--") + 1:argv.index("--") + 1] = ["env", "SSH_AUTH_SOCK=" + agent_socket]
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert FETCH.parse_probe(proc.stdout)["mode"] == "restricted"
    log_text = rig.log_since(offset)
    assert "auth-agent-req@openssh.com" in log_text and "agent forwarding disabled" in log_text, log_text[-2000:]


def test_a_connection_from_another_address_is_refused(rig, unchanged):
    offset = rig.log_size()
    proc = rig.command(MARK + " probe", bind=rig.other_address)
    assert proc.returncode == 255 and "Permission denied (publickey)" in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert "not from a permitted host" in rig.log_since(offset)
    # The same key from the guest's address is served.
    proc = rig.command(MARK + " probe")
    assert proc.returncode == 0 and FETCH.parse_probe(proc.stdout)["client"] == rig.guest_address


def test_pg_wal_fetch_from_another_address_fetches_nothing(fresh):
    fresh.configure(ssh_options="-o UserKnownHostsFile=%s -o BindAddress=%s"
                                % (fresh.tb.known_hosts, fresh.other_address))
    proc = fresh.run(fresh.segments[0], "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 3, proc.stderr
    assert "Permission denied" in proc.stderr
    assert os.listdir(fresh.pg_wal) == []
    check = fresh.run("--check")
    assert check.returncode == 3 and "Permission denied" in check.stdout


def test_install_server_writes_it_once_atomically_and_leaves_a_current_one_alone(rig, tmp_path):
    directory = tmp_path / "bin"
    directory.mkdir()
    first = subprocess.run([rig.python, SCRIPT, "--install-server", str(directory)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert first.returncode == 0 and first.stdout.startswith("installed "), first.stderr
    server = directory / "pg_wal_serve"
    assert server.read_text() == FETCH.serve_script() and server.stat().st_mode & 0o7777 == 0o755
    inode = server.stat().st_ino
    again = subprocess.run([rig.python, SCRIPT, "--install-server", str(directory)], stdout=subprocess.PIPE,
                           universal_newlines=True, timeout=60)
    assert again.returncode == 0 and "is up to date" in again.stdout and server.stat().st_ino == inode
    server.write_text("#!/bin/sh\nexec sh\n")           # an old or changed one is replaced whole
    third = subprocess.run([rig.python, SCRIPT, "--install-server", str(directory)], stdout=subprocess.PIPE,
                           universal_newlines=True, timeout=60)
    assert third.returncode == 0 and server.read_text() == FETCH.serve_script()
    assert server.stat().st_ino != inode and sorted(os.listdir(str(directory))) == ["pg_wal_serve"]
    missing = subprocess.run([rig.python, SCRIPT, "--install-server", str(tmp_path / "nope")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert missing.returncode == 2 and "not a directory" in missing.stderr


# ---------------------------------------------------------------------------
# setup_guest.py: the line on the guest, the host's side in one command
# ---------------------------------------------------------------------------

SETUP = load_script("setup_guest")


def setup_guest(*args):
    return subprocess.run([python36_for_postgres(), os.path.join(BIN, "setup_guest.py")] + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)


def archive_key_block(script):
    with open(os.path.join(BIN, script + ".py")) as source_file:
        source = source_file.read()
    start = source.index("# The archive key block: ")
    return source[start:source.index("# End of the archive key block.", start)]


def test_the_archive_key_block_is_the_same_in_pg_wal_fetch_and_setup_guest():
    assert archive_key_block("pg_wal_fetch") == archive_key_block("setup_guest")
    assert "\ndef authorized_keys_line(" in archive_key_block("setup_guest")


def test_setup_guest_install_prints_the_line_restricting_the_key_on_each_host(rig):
    sections = {"postgres": {"pgdata": rig.pgdata, "user": PG_USER}, "snapshot": {"datasets": "unused/data"},
                "guest": {"primary_conninfo": "host=unused"},
                "archive": {"sources": "rhost nat"},
                "source rhost": rig.source(),
                "source nat": rig.source(**{"from": "10.9.8.7,10.9.8.6", "ssh_options": ""})}
    config = rig.tb.write_config(os.path.join(rig.guest, "guest.conf"), sections=sections)
    proc = setup_guest("-c", config, "--role", "guest", "--install", "--print")
    assert proc.returncode == 0, proc.stderr
    with open(rig.key + ".pub") as public:
        key = public.read()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("restrict,")]
    # from: BindAddress of ssh_options; then [source] from as given (NAT: the host's address).
    assert lines == [FETCH.authorized_keys_line(key, rig.guest_address, rig.host.glob),
                     FETCH.authorized_keys_line(key, "10.9.8.7,10.9.8.6", rig.host.glob)]
    assert "setup_guest.py --role host --install --authorized-key" in proc.stdout
    # pg_wal_fetch.py --authorized-keys, run by the key's owner, prints the same lines.
    fetch = subprocess.run(["runuser", "-u", PG_USER, "--", rig.python, SCRIPT, "-c", config, "--authorized-keys"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert fetch.returncode == 0, fetch.stderr
    assert [line for line in fetch.stdout.splitlines() if not line.startswith("#")] == lines


def host_tree(tmp_path, guest_key, other_key):
    """A --root tree of an archive host as the article left it: the guest's key bare in
    root's authorized_keys and in postgres's, beside keys of other people."""
    root = tmp_path / "root"
    home = pwd.getpwnam(PG_USER).pw_dir
    root_keys = root / pwd.getpwuid(0).pw_dir.lstrip("/") / ".ssh" / "authorized_keys"
    pg_keys = root / home.lstrip("/") / ".ssh" / "authorized_keys"
    for path in (root_keys, pg_keys):
        path.parent.mkdir(parents=True)
        path.write_text("%s\n%s\n" % (other_key, guest_key))
        path.chmod(0o600)
    return root, root_keys, pg_keys


def test_setup_guest_host_install_puts_the_server_and_the_restricted_key_once(rig, tmp_path):
    with open(rig.key + ".pub") as public:
        guest_key = " ".join(public.read().split())
    other_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherOtherOtherOtherOtherOtherOtherOth admin@desk"
    root, root_keys, pg_keys = host_tree(tmp_path, guest_key, other_key)
    line = FETCH.authorized_keys_line(guest_key, rig.guest_address, "/data04/pgdata/arch/*")
    config = rig.tb.write_config(tmp_path / "host.conf", sections={"host": {"domain": "guest"}})
    proc = setup_guest("-c", config, "--install", "--root", root, "--authorized-key", line)
    assert proc.returncode == 0, proc.stderr
    server = root / FETCH.SERVER_PATH.lstrip("/")
    assert server.read_text() == FETCH.serve_script() and server.stat().st_mode & 0o7777 == 0o755
    assert pg_keys.read_text() == "%s\n%s\n" % (other_key, line)      # the bare line replaced
    assert pg_keys.stat().st_mode & 0o777 == 0o600 and pg_keys.stat().st_uid == pwd.getpwnam(PG_USER).pw_uid
    assert root_keys.read_text() == other_key + "\n"                   # no way in as root any more
    assert not (root / "etc" / "rc.local").exists()                    # only the archive's side
    again = setup_guest("-c", config, "--install", "--root", root, "--authorized-key", line)
    assert again.returncode == 0 and "nothing to change" in again.stderr, again.stderr
    for bare in (guest_key, line.replace("restrict,", ""), line.replace("pg_wal_serve", "sh")):
        refused = setup_guest("-c", config, "--install", "--root", root, "--authorized-key", bare)
        assert refused.returncode == 2 and "a bare key would run any command" in refused.stderr
    assert pg_keys.read_text() == "%s\n%s\n" % (other_key, line)


@pytest.mark.parametrize("line, fields", [
    ('restrict,from="1.2.3.4",command="/usr/local/bin/pg_wal_serve \'/a b/*\'" ssh-ed25519 AAAA c',
     ([("restrict", None), ("from", "1.2.3.4"), ("command", "/usr/local/bin/pg_wal_serve '/a b/*'")],
      "ssh-ed25519", "AAAA")),
    ("ssh-ed25519 AAAA postgres@guest", ([], "ssh-ed25519", "AAAA")),
    ('command="echo \\"hi\\"",no-pty ssh-rsa BBBB', ([("command", 'echo "hi"'), ("no-pty", None)], "ssh-rsa", "BBBB")),
    ("# ssh-ed25519 AAAA", None), ("", None), ('command="unclosed ssh-ed25519 AAAA', None),
    ("from=1.2.3.4 ssh-ed25519 AAAA", None), ("garbage", None),
])
def test_authorized_keys_lines_are_read_as_sshd_reads_them(line, fields):
    assert SETUP.authorized_key_fields(line) == fields


@pytest.mark.parametrize("line, server", [
    (FETCH.authorized_keys_line("ssh-ed25519 AAAA", "1.2.3.4", "/arch/*"), FETCH.SERVER_PATH),
    (FETCH.authorized_keys_line("ssh-ed25519 AAAA", "1.2.3.4", "/arch/*", "/opt/x/pg_wal_serve"),
     "/opt/x/pg_wal_serve"),
    ("ssh-ed25519 AAAA", None),
    ('from="1.2.3.4",command="/usr/local/bin/pg_wal_serve /a/*" ssh-ed25519 AAAA', None),
    ('restrict,command="/usr/local/bin/pg_wal_serve /a/*" ssh-ed25519 AAAA', None),
    ('restrict,from="1.2.3.4",command="/bin/sh -c id" ssh-ed25519 AAAA', None),
    ('restrict,from="1.2.3.4",command="pg_wal_serve /a/*" ssh-ed25519 AAAA', None),
    ('restrict,from="1.2.3.4",command="/usr/local/bin/pg_wal_serve /a/* ; id" ssh-ed25519 AAAA', None),
    # two words to shlex, but the login shell would run id first / expand the glob
    ('restrict,from="1.2.3.4",command="/usr/local/bin/pg_wal_serve $(id)" ssh-ed25519 AAAA', None),
    ('restrict,from="1.2.3.4",command="/usr/local/bin/pg_wal_serve /a/*" ssh-ed25519 AAAA', None),
    ('restrict,from="1.2.3.4",command="/usr/local/bin/pg_wal_serve \'/a/*\'" ssh-ed25519 AAAA',
     "/usr/local/bin/pg_wal_serve"),
])
def test_only_a_line_restricted_to_pg_wal_serve_is_installed(line, server):
    assert SETUP.restricted_server(line) == server


def test_setup_guest_check_names_the_sources_whose_key_is_unrestricted(rig, tb):
    unrestricted = tb.write_config(os.path.join(rig.guest, "bare.conf"), sections=tb.archive_config(),
                                   overrides={"archive": {"control_dir": rig.control}})
    guest = types.SimpleNamespace(user=PG_USER, sources=[{"name": host.name} for host in tb.hosts])
    try:
        assert SETUP.check_archive_sources(guest, unrestricted) == (
            "archive", SETUP.CHECK_OK, "host1 host2 answer; key unrestricted (runs any command) on source host1 host2")
        guest = types.SimpleNamespace(user=PG_USER, sources=[{"name": "rhost"}])
        assert SETUP.check_archive_sources(guest, rig.configure()) == ("archive", SETUP.CHECK_OK, "rhost answer")
    finally:
        rig.close_masters()
