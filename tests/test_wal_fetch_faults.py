"""The archive faults of issue 11, each injected on the real component, and what
pg_wal_fetch.py must make of them: a whole copy, or no copy and a reason.

Run as PostgreSQL runs it (as postgres, Python 3.6, in a data directory) against the
testbed's two sshd archive hosts; dead and crawling hosts are nftables rules, bad
copies are real files in each host's private archive tree (never the shared archive),
and the worst faults end in a real PostgreSQL 15 recovery whose rows are counted.
"""

import bz2
import contextlib
import errno
import gzip
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import types

import pytest

from testbed import PG_USER, chown_pg, sh, wait_for
from test_wal_fetch import FETCH, SCRIPT, WalEnv, py36, python_child, segments, wal  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(300)

PAGE = 8192
SEG = 16 * 1024 * 1024
MIB = 1024 * 1024
STALL = 2            # [archive] stall_timeout in these tests


# ---------------------------------------------------------------------------
# Segments full of records, and the damage done to copies of them
# ---------------------------------------------------------------------------

def archived(tb, name):
    return all(os.path.exists(os.path.join(host.wal_dir, name)) for host in tb.hosts)


@pytest.fixture(scope="module")
def full_names(tb):
    """Three consecutive segments wholly filled with row inserts, archived on both hosts
    (tb.switch_wal() alone makes segments of a few records and zeros)."""
    primary = tb.primary
    primary.psql("CREATE TABLE IF NOT EXISTS wff_fill (id int, note text)")
    first = primary.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
    primary.psql("INSERT INTO wff_fill SELECT g, md5(g::text) FROM generate_series(1, 900000) g")
    last = tb.switch_wal()
    names = FETCH.following_segments(first, SEG, 64)
    names = names[:names.index(last)]                 # strictly between first and last
    assert len(names) >= 3, "the inserts filled only %s" % names
    for name in names:
        wait_for(lambda: archived(tb, name), 60, "%s in both archives" % name)
    return names[:3]


@pytest.fixture
def full(tb, full_names, py36):
    env = WalEnv(tb, full_names, py36)
    env.configure(archive={"stall_timeout": str(STALL)})
    try:
        yield env
    finally:
        env.teardown()


def waldump_records(tb, path):
    """[(offset in the segment, total length)] of each record pg_waldump lists in path."""
    out = sh([os.path.join(tb.pg_bindir, "pg_waldump"), path], check=False).stdout
    found = []
    for match in re.finditer(r"len \(rec/tot\):\s*\d+/\s*(\d+), .*?lsn: ([0-9A-F]+)/([0-9A-F]+)", out):
        lsn = (int(match.group(2), 16) << 32) | int(match.group(3), 16)
        found.append((lsn % SEG, int(match.group(1))))
    return found


def flip_record_byte(tb, name, good):
    """good with one byte flipped inside a record (its CRC no longer matches): a record
    at 1 MiB or later if the segment has one there, else the middle one."""
    records = [(offset, length) for offset, length in
               waldump_records(tb, os.path.join(tb.hosts[0].wal_dir, name))
               if length >= 40 and offset // PAGE == (offset + length - 1) // PAGE]
    assert records, "pg_waldump listed no record in %s" % name
    late = [r for r in records if r[0] >= MIB]
    offset, length = late[0] if late else records[len(records) // 2]
    damaged = bytearray(good)
    damaged[offset + length - 3] ^= 0x55
    return bytes(damaged)


def records_end(tb, name):
    """Offset of the last record pg_waldump lists in the archived segment name."""
    return waldump_records(tb, os.path.join(tb.hosts[0].wal_dir, name))[-1][0]


def wrong_page_address(tb, name, good):
    """good with a wrong xlp_pageaddr on page 100 (or, in a segment of fewer pages of
    records, on the page halfway through them)."""
    page = min(100, records_end(tb, name) // PAGE // 2)
    damaged = bytearray(good)
    pageaddr = struct.unpack_from("=Q", damaged, page * PAGE + 8)[0]
    struct.pack_into("=Q", damaged, page * PAGE + 8, pageaddr + SEG)
    return bytes(damaged)


def later_timeline(tb, name, good):
    """good with page 100 (or the page halfway through its records) stamped with the
    next timeline: pg_waldump reads on, PostgreSQL ends the recovery there."""
    page = min(100, records_end(tb, name) // PAGE // 2)
    damaged = bytearray(good)
    timeline = struct.unpack_from("=I", damaged, page * PAGE + 4)[0]
    struct.pack_into("=I", damaged, page * PAGE + 4, timeline + 1)
    return bytes(damaged)


def zero_tail(tb, name, good):
    """good up to half its records (at most 8 MiB), then zeros: no WAL switch record
    before them, as a copy cut short and padded would be."""
    end = min(SEG // 2, records_end(tb, name) // 2 // PAGE * PAGE)
    return good[:end] + b"\0" * (len(good) - end)


DAMAGE = {
    "flipped_record_byte": flip_record_byte,
    "wrong_page_address_on_page_100": wrong_page_address,
    "zero_filled_tail": zero_tail,
    "later_timeline_on_page_100": later_timeline,
}


def put(env, host_index, relative, content):
    """Write content at DIR/relative in one host's private archive root (never through a link)."""
    path = os.path.join(os.path.dirname(env.archive[host_index]), relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)
    with open(path, "wb") as out:
        out.write(content)
    chown_pg(os.path.dirname(path), path)
    return path


def touch(path):
    open(path, "w").close()
    chown_pg(path)


def lines_with(text, needle):
    return [line for line in text.splitlines() if needle in line]


def assert_delivered(code, stderr):
    """Exit 0, and no ERROR line: a delivery is not an error, whatever other sources said."""
    assert code == 0, stderr
    assert not lines_with(stderr, ": ERROR: "), stderr


def the_stop_line(stderr, name, sources=True):
    """The one stop line of an exit 200, checked for its shape (sources: it says what
    each source answered)."""
    stops = lines_with(stderr, "stopping recovery at")
    assert len(stops) == 1, stderr
    start = "pg_wal_fetch: ERROR: stopping recovery at %s: " % name + ("[source " if sources else "")
    assert stops[0].startswith(start), stderr
    assert lines_with(stderr, ": ERROR: ") == stops, stderr
    return stops[0]


def ssh_hosts(env, tb):
    """The archive hosts the ssh commands run so far went to, in order."""
    by_address = {host.address: host.name for host in tb.hosts}
    return [next(by_address[word] for word in command.split() if word in by_address)
            for command in env.commands() if command.startswith("ssh")
            and any(word in by_address for word in command.split())]


def reset(env):
    for path in (env.shim_log, os.path.join(env.pg_wal, "RECOVERYXLOG")):
        if os.path.exists(path):
            os.unlink(path)


def timed(env, *args):
    started = time.monotonic()
    proc = env.run(*args)
    return proc, time.monotonic() - started


def run_with_env(env, args, extra_env=None, drop_env=()):
    environment = env.env()
    for key in drop_env:
        environment.pop(key, None)
    environment.update(extra_env or {})
    return subprocess.run(env.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, cwd=env.pgdata, env=environment, timeout=120)


# ---------------------------------------------------------------------------
# 1. Every copy is tried
# ---------------------------------------------------------------------------

def test_truncated_copy_in_an_earlier_glob_directory_hides_nothing(full, tb):
    name = full.segments[0]
    good = full.original(name)
    bad = put(full, 0, "old/" + name, good[:5 * MIB])        # "old" sorts before "primary"
    with tb.hosts[1].dead():
        proc = full.run(name, "pg_wal/RECOVERYXLOG")
    assert_delivered(proc.returncode, proc.stderr)
    assert full.delivered() == good
    warnings = lines_with(proc.stderr, "WARNING")
    assert len(warnings) == 1, proc.stderr
    assert warnings[0].startswith("pg_wal_fetch: WARNING: %s: [source host1] %s is not valid: " % (name, bad))
    assert warnings[0].endswith("; trying the next copy")
    assert os.listdir(full.pg_wal) == ["RECOVERYXLOG"]


def test_truncated_plain_copy_beside_a_good_gz_hides_nothing(full, tb):
    name = full.segments[1]
    good = full.original(name)
    bad = put(full, 0, "primary/" + name, good[:SEG - PAGE])
    put(full, 0, "primary/" + name + ".gz", gzip.compress(good, 1))
    with tb.hosts[1].dead():
        proc = full.run(name, "pg_wal/RECOVERYXLOG")
    assert_delivered(proc.returncode, proc.stderr)
    assert full.delivered() == good
    warnings = lines_with(proc.stderr, "WARNING")
    assert len(warnings) == 1, proc.stderr
    assert "[source host1] %s is not valid: " % bad in warnings[0]


def test_every_copy_is_tried_in_glob_then_suffix_order_until_a_valid_one(full, tb):
    import lzma
    name = full.segments[2]
    good = full.original(name)
    bad = [put(full, 0, "2024-01/" + name, good[:MIB]),
           put(full, 0, "2024-01/" + name + ".bz2", bz2.compress(zero_tail(tb, name, good), 1)),
           put(full, 0, "primary/" + name, wrong_page_address(tb, name, good)),
           put(full, 0, "primary/" + name + ".gz", gzip.compress(good, 1)[:-100])]
    put(full, 0, "primary/" + name + ".xz", lzma.compress(good, preset=0))
    put(full, 0, "zz-later/" + name, flip_record_byte(tb, name, good))     # never reached
    with tb.hosts[1].dead():
        proc = full.run(name, "pg_wal/RECOVERYXLOG")
    assert_delivered(proc.returncode, proc.stderr)
    assert full.delivered() == good
    warnings = lines_with(proc.stderr, "WARNING")
    assert [w.split("] ", 1)[1].split(" is not valid: ")[0] for w in warnings] == bad, proc.stderr
    assert os.listdir(full.pg_wal) == ["RECOVERYXLOG"]


# ---------------------------------------------------------------------------
# 2. Damage inside a segment: never delivered
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_copy_on_host1_gives_the_good_bytes_of_host2(full, tb, damage):
    name = full.segments[1]
    good = full.original(name)
    bad = put(full, 0, "primary/" + name, DAMAGE[damage](tb, name, good))
    proc = full.run("-v", name, "pg_wal/RECOVERYXLOG")
    assert_delivered(proc.returncode, proc.stderr)
    assert full.delivered() == good
    warnings = lines_with(proc.stderr, "is not valid")
    assert len(warnings) == 1 and "[source host1] %s is not valid" % bad in warnings[0], proc.stderr
    assert "delivered from [source host2]" in proc.stderr


@pytest.mark.parametrize("mode, code", [(None, 3), ("recovery.signal", 200), ("standby.signal", 3)])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_same_damage_on_both_hosts_delivers_nothing(full, tb, damage, mode, code):
    name = full.segments[2]
    good = full.original(name)
    damaged = DAMAGE[damage](tb, name, good)
    put(full, 0, "primary/" + name, damaged)
    put(full, 1, "primary/" + name, damaged)
    if mode:
        touch(os.path.join(full.pgdata, mode))
    proc = full.run(name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == code, proc.stderr
    assert os.listdir(full.pg_wal) == []
    assert len(lines_with(proc.stderr, "is not valid")) == 2, proc.stderr
    if code == 200:
        stop = the_stop_line(proc.stderr, name)
        assert "[source host1] invalid" in stop and "[source host2] invalid" in stop, stop
    else:
        assert "stopping recovery" not in proc.stderr


@pytest.mark.parametrize("mode, code", [(None, 3), ("recovery.signal", 200)])
def test_only_bad_copies_on_host1_and_none_on_host2_is_doubt_not_absence(full, tb, mode, code):
    name = full.segments[0]
    good = full.original(name)
    put(full, 0, "old/" + name, good[:MIB])
    put(full, 0, "primary/" + name, flip_record_byte(tb, name, good))
    full.replace(1, name, None)
    if mode:
        touch(os.path.join(full.pgdata, mode))
    proc = full.run(name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == code, proc.stderr       # never 1: that would end the archive here
    assert os.listdir(full.pg_wal) == []
    assert len(lines_with(proc.stderr, "is not valid")) == 2, proc.stderr
    if code == 200:
        stop = the_stop_line(proc.stderr, name)
        assert "[source host1] invalid" in stop and "[source host2] absent" in stop, stop


@pytest.mark.parametrize("files, code", [
    ({"recovery.signal": ""}, 200),
    ({"recovery.signal": "", "standby.signal": ""}, 3),
    ({"recovery.conf": "restore_command = 'x %f %p'\n"}, 200),
    ({"recovery.conf": "restore_command = 'x %f %p'\nstandby_mode = 'on'\n"}, 3),
    ({"recovery.conf": "standby_mode = off  # not yet\n"}, 200),
], ids=["recovery.signal", "both_signals", "recovery.conf", "recovery.conf_standby_mode_on",
        "recovery.conf_standby_mode_off"])
def test_doubt_exit_code_follows_the_recovery_mode(full, tb, files, code):
    name = full.segments[0]
    full.replace(1, name, None)
    for file_name, text in files.items():
        with open(os.path.join(full.pgdata, file_name), "w") as out:
            out.write(text)
        chown_pg(os.path.join(full.pgdata, file_name))
    with tb.hosts[0].dead():
        proc = full.run(name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == code, proc.stderr
    assert os.listdir(full.pg_wal) == []
    if code == 200:
        stop = the_stop_line(proc.stderr, name)
        assert "[source host1] unreachable" in stop and "[source host2] absent" in stop, stop
    else:
        assert "stopping recovery" not in proc.stderr


def test_history_file_in_doubt_never_stops_a_recovery(full, tb):
    # PostgreSQL asks for timelines that do not exist at every start and end.
    touch(os.path.join(full.pgdata, "recovery.signal"))
    with tb.hosts[0].dead():
        proc = full.run("00000009.history", "pg_wal/RECOVERYHISTORY")
    assert proc.returncode == 3, proc.stderr
    assert "stopping recovery" not in proc.stderr
    assert os.listdir(full.pg_wal) == []


@pytest.mark.parametrize("mode, code", [(None, 2), ("recovery.signal", 200), ("standby.signal", 2)])
def test_config_error_stops_an_archive_recovery_and_only_that(full, mode, code):
    name = full.segments[0]
    full.configure(host1={"probe": "carrier-pigeon"})
    if mode:
        touch(os.path.join(full.pgdata, mode))
    proc = full.run(name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == code, proc.stderr
    assert os.listdir(full.pg_wal) == []
    if code == 200:
        assert "carrier-pigeon" in the_stop_line(proc.stderr, name, sources=False)


# ---------------------------------------------------------------------------
# 3. Stalled, crawling and silent hosts
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def crawling(tb, host, rate="400 kbytes/second"):
    """Limit what host sends (its sshd's packets) to rate, in an nft table of our own."""
    table = "pgzfs_crawl_%d" % tb.net
    sh(["nft", "add", "table", "inet", table])
    try:
        sh(["nft", "add", "chain", "inet", table, "input", "{ type filter hook input priority 0; }"])
        sh(["nft", "add", "rule", "inet", table, "input", "ip", "saddr", host.address,
            "tcp", "sport", str(host.port), "limit", "rate", "over"] + rate.split() + ["drop"])
        yield
    finally:
        sh(["nft", "delete", "table", "inet", table], check=False)


def staged_bytes(pid, directory):
    """Size of the largest file process pid has open in directory (its staged copy)."""
    fd_dir = "/proc/%d/fd" % pid
    size = 0
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return 0
    for fd in fds:
        try:
            if os.readlink(os.path.join(fd_dir, fd)).startswith(directory + "/"):
                size = max(size, os.stat(os.path.join(fd_dir, fd)).st_size)
        except OSError:
            pass
    return size


def test_host_that_stalls_mid_transfer_is_given_up_and_asked_last_next_time(full, tb):
    full.configure(archive={"stall_timeout": str(STALL), "timeout": "60"})
    name, later = full.segments[0], full.segments[1]
    host1 = tb.hosts[0]
    # Slowed first, so the transfer is surely under way when the host dies.
    with crawling(tb, host1):
        proc = full.popen("-v", name, "pg_wal/RECOVERYXLOG")
        try:
            child = python_child(proc.pid)
            wait_for(lambda: staged_bytes(child, full.pg_wal) >= MIB, 60, "1 MiB staged from host1")
            host1.kill()
            killed = time.monotonic()
            _out, err = proc.communicate(timeout=60)
            after_kill = time.monotonic() - killed
        finally:
            if proc.poll() is None:
                proc.kill()
            host1.revive()
    assert_delivered(proc.returncode, err)
    assert full.delivered() == full.original(name)
    assert "delivered from [source host1]" not in err and "delivered from [source host2]" in err, err
    assert [line for line in lines_with(err, "WARNING: [source host1]") if "stalled" in line], err
    assert after_kill < STALL + 4, "host1 held the call %.1f s after it stalled" % after_kill
    assert os.path.exists(os.path.join(full.control, "down-host1"))

    # Alive again, but it stalled a moment ago: asked after host2 (which lacks the file).
    reset(full)
    full.replace(1, later, None)
    proc = full.run("-v", later, "pg_wal/RECOVERYXLOG")
    assert_delivered(proc.returncode, proc.stderr)
    assert full.delivered() == full.original(later)
    assert ssh_hosts(full, tb) == ["host2", "host1"]


def test_crawling_host_leaves_host2_its_share_of_the_timeout(full, tb):
    full.configure(archive={"stall_timeout": str(STALL), "timeout": "10"})
    name = full.segments[0]
    with crawling(tb, tb.hosts[0]):
        proc, elapsed = timed(full, "-v", name, "pg_wal/RECOVERYXLOG")
    assert_delivered(proc.returncode, proc.stderr)
    assert "delivered from [source host2]" in proc.stderr
    assert full.delivered() == full.original(name)
    assert elapsed < 10.5, "%.1f s: longer than [archive] timeout" % elapsed
    assert ssh_hosts(full, tb)[:2] == ["host1", "host2"]


def ssh_commands_naming(word):
    """The command lines of running ssh processes with word among their arguments."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as cmdline:
                argv = cmdline.read().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        if os.path.basename(argv[0]) == "ssh" and word in argv:
            found.append(argv)
    return found


@contextlib.contextmanager
def silent_listener(address, says=None):
    """A TCP listener that accepts every connection and never sends a byte (or only
    `says`, at once). Yields (port, held, connections): held gets, per
    connection, how long the peer kept it open."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, 0))
    server.listen(16)
    server.settimeout(0.1)
    held, connections, stop = [], [], threading.Event()

    def watch(connection, accepted_at):
        connection.settimeout(30)
        try:
            while connection.recv(4096):
                pass
        except OSError:
            pass
        held.append(time.monotonic() - accepted_at)

    def serve():
        while not stop.is_set():
            try:
                connection = server.accept()[0]
            except socket.timeout:
                continue
            except OSError:
                return
            connections.append(connection)
            if says is not None:
                connection.sendall(says)
            threading.Thread(target=watch, args=(connection, time.monotonic()), daemon=True).start()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], held, connections
    finally:
        stop.set()
        thread.join(5)
        for connection in connections:
            connection.close()
        server.close()


@contextlib.contextmanager
def slow_to_speak(address, target, delay):
    """A TCP proxy on address to target (host, port) that holds each connection delay
    seconds before it passes anything on: an sshd so loaded it is slow to send its
    banner. Yields its port."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, 0))
    server.listen(16)
    server.settimeout(0.1)
    stop, open_sockets = threading.Event(), []

    def pipe(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def relay(client):
        if stop.wait(delay):
            return
        upstream = socket.create_connection(target, timeout=10)
        upstream.settimeout(None)
        client.settimeout(None)
        open_sockets.append(upstream)
        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def serve():
        while not stop.is_set():
            try:
                client = server.accept()[0]
            except socket.timeout:
                continue
            except OSError:
                return
            open_sockets.append(client)
            threading.Thread(target=relay, args=(client,), daemon=True).start()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for sock in open_sockets:
            sock.close()
        server.close()


def test_every_host_slow_to_speak_is_probed_again_with_patience_and_delivers(full, tb):
    # Both hosts take 2 s to send sshd's banner (a loaded machine): the first probes
    # call them down, and "none answers" would stop a restore. The call probes each
    # once more, giving it connect_timeout, and delivers.
    name = full.segments[0]
    with slow_to_speak(tb.address(9), (tb.hosts[0].address, tb.hosts[0].port), 2) as port1, \
            slow_to_speak(tb.address(10), (tb.hosts[1].address, tb.hosts[1].port), 2) as port2:
        with open(tb.known_hosts, "a") as known:        # each proxy is its host to ssh
            for host, address, port in ((tb.hosts[0], tb.address(9), port1), (tb.hosts[1], tb.address(10), port2)):
                with open(host.host_key + ".pub") as pub:
                    known.write("[%s]:%d %s\n" % (address, port, " ".join(pub.read().split()[:2])))
        # ssh waits for the banner as long as ConnectTimeout: connect_timeout's 5 s,
        # not the testbed's 2 s.
        options = "-o IdentitiesOnly=yes -o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes" % tb.known_hosts
        full.configure(archive={"stall_timeout": str(STALL), "connect_timeout": "5"},
                       host1={"host": tb.address(9), "port": str(port1), "probe": "tcp", "ssh_options": options},
                       host2={"host": tb.address(10), "port": str(port2), "probe": "tcp", "ssh_options": options})
        proc = full.run(name, "pg_wal/RECOVERYXLOG")
    assert_delivered(proc.returncode, proc.stderr)
    assert full.delivered() == full.original(name)
    assert lines_with(proc.stderr, "no source answered its probe in time: probing each once more"), proc.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_tcp_probe_takes_a_host_that_sends_an_ssh_banner(host):
    with silent_listener("127.0.0.1", b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n") as (port, _held, connections):
        assert FETCH.speaks_ssh(host, port, 1.0, 1.0) is True
        assert len(connections) == 1


def test_the_tcp_probe_refuses_a_host_that_speaks_something_else_or_nothing_in_time():
    with silent_listener("127.0.0.1", b"HTTP/1.0 400 Bad Request\r\n") as (port, _held, _connections):
        assert FETCH.speaks_ssh("127.0.0.1", port, 1.0, 1.0) is False
    with silent_listener("127.0.0.1") as (port, _held, _connections):
        started = time.monotonic()
        assert FETCH.speaks_ssh("127.0.0.1", port, 1.0, 0.3) is False
        assert time.monotonic() - started < 2.0       # its patience, not forever
    # The listener is closed now: its port refuses.
    assert FETCH.speaks_ssh("127.0.0.1", port, 1.0, 1.0) is False


def test_the_tcp_probe_skips_an_address_family_the_kernel_lacks(monkeypatch):
    # A kernel booted with ipv6.disable=1: socket(AF_INET6) fails. A host name
    # with an IPv6 address first: the probe goes on to the IPv4 one, as
    # socket.create_connection did.
    # The C module as speaks_ssh imports it, with socket() failing for AF_INET6
    # (socket.py, which the listener uses, keeps the real one).
    import _socket
    tried = []

    def no_ipv6(family, *args):
        tried.append(family)
        if family == _socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return _socket.socket(family, *args)
    def and_ipv6_first(host, port, *args):          # the name has an IPv6 address too
        return _socket.getaddrinfo(b"::1", port, *args) + _socket.getaddrinfo(host, port, *args)
    kernel = types.ModuleType("_socket")
    kernel.__dict__.update(_socket.__dict__)
    kernel.socket, kernel.getaddrinfo = no_ipv6, and_ipv6_first
    with silent_listener("127.0.0.1", b"SSH-2.0-OpenSSH_9.2p1\r\n") as (port, _held, _connections):
        monkeypatch.setitem(sys.modules, "_socket", kernel)
        assert FETCH.speaks_ssh("127.0.0.1", port, 1.0, 1.0) is True
        monkeypatch.undo()
    assert tried == [socket.AF_INET6, socket.AF_INET]


def test_the_tcp_probe_takes_a_name_idna_cannot_encode_for_down():
    assert FETCH.speaks_ssh("\u00fc" + "a" * 70 + ".invalid", 22, 1.0, 1.0) is False


def test_a_private_temporary_directory_for_pg_waldump_without_tempfile(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    made = FETCH.private_temp_directory()
    assert os.path.dirname(made) == str(tmp_path)
    assert os.stat(made).st_mode & 0o777 == 0o700
    assert made != FETCH.private_temp_directory()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "gone"))      # as tempfile does: the next place
    elsewhere = FETCH.private_temp_directory()
    try:
        assert os.path.dirname(elsewhere) == "/tmp"
    finally:
        os.rmdir(elsewhere)


def test_pg_waldump_runs_beside_the_page_checks_and_never_outlives_them(full, tb, tmp_path, monkeypatch):
    # verify() starts pg_waldump, checks every page header while it runs (issue
    # 17), then takes its verdict; a bad page header ends it at once. Either way
    # neither its process nor its private directory outlives the check.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    started = []
    real_start = FETCH.start_waldump

    def start(*args):
        started.append(real_start(*args))
        return started[-1]
    monkeypatch.setattr(FETCH, "start_waldump", start)
    name = full.segments[0]
    copy = bytearray(full.original(name))
    records = bytearray(copy)
    records[4 * PAGE + 100:4 * PAGE + 164] = b"\xa5" * 64     # inside a record: only pg_waldump sees it
    pages = bytearray(copy)
    pages[SEG - PAGE:SEG - PAGE + 2] = b"\x00\x00"              # the last page's magic
    verify = FETCH.make_verifier(FETCH.Cluster(None, tb.pg_version), os.path.join(tb.pg_bindir, "pg_waldump"), 60)
    verdicts = []
    for data in (copy, records, pages):
        staged = FETCH.StagedFile(str(tmp_path))
        try:
            staged.write(bytes(data))
            verdicts.append(verify(staged, name))
        finally:
            staged.discard()
    assert verdicts[0] is None
    assert verdicts[1] and verdicts[1].startswith("pg_waldump: "), verdicts[1]
    assert verdicts[2] and "magic" in verdicts[2], verdicts[2]
    assert len(started) == 3
    for proc, directory, _link in started:
        assert proc.returncode is not None
        assert not os.path.exists(directory)
    assert os.listdir(str(tmp_path)) == []


def test_listener_that_never_speaks_is_down_within_a_second_and_asked_last(full, tb):
    name, later = full.segments[0], full.segments[1]
    address = tb.address(9)
    with silent_listener(address) as (port, held, connections):
        full.configure(archive={"stall_timeout": str(STALL)},
                       host1={"host": address, "port": str(port), "probe": "tcp"})
        proc = full.run("-v", name, "pg_wal/RECOVERYXLOG")
        assert_delivered(proc.returncode, proc.stderr)
        assert "delivered from [source host2]" in proc.stderr
        assert full.delivered() == full.original(name)
        # The probe, and ssh started beside it (fetch_remote), stopped with the probe.
        assert 1 <= len(connections) <= 2
        assert [line for line in lines_with(proc.stderr, "WARNING: [source host1]") if "does not answer" in line]
        wait_for(lambda: len(held) == len(connections), 5, "the probe and ssh to close their connections")
        assert max(held) < 1.5, "a connection was held %.1f s: the probe waits a second for a banner" % max(held)
        assert not ssh_commands_naming(address)
        assert os.path.exists(os.path.join(full.control, "down-host1"))
        # Next call: host2 first, and it has the file: the silent host is not even probed.
        reset(full)
        before = len(connections)
        proc = full.run(later, "pg_wal/RECOVERYXLOG")
        assert_delivered(proc.returncode, proc.stderr)
        assert len(connections) == before


# ---------------------------------------------------------------------------
# 4. The config is UTF-8, whatever the locale
# ---------------------------------------------------------------------------

def test_utf8_config_is_read_under_the_c_locale(full, tb):
    with open(full.config, "rb") as config:
        text = config.read()
    with open(full.config, "wb") as config:
        config.write("# Archiv-Hosts: Jürgen Müller, Rechenzentrum Süd\n".encode("utf-8") + text)
    c_locale = {"LC_ALL": "C", "LANG": "C"}
    drop = ("LC_CTYPE", "LANGUAGE", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONCOERCECLOCALE")
    encoding = subprocess.run(["runuser", "-u", PG_USER, "--", full.python, "-c",
                               "import locale; print(locale.getpreferredencoding(False))"],
                              stdout=subprocess.PIPE, universal_newlines=True,
                              env=dict({k: v for k, v in full.env().items() if k not in drop}, **c_locale))
    version = subprocess.run([full.python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
    # 3.6 reads files as ASCII under the C locale (the fault); 3.7+ coerce the C
    # locale to UTF-8 (PEP 538/540): there the delivery is checked all the same.
    expected = "ANSI_X3.4-1968" if version == "3.6" else "utf-8"
    assert encoding.stdout.strip().lower() == expected.lower(), "not a C locale: %s" % encoding.stdout
    name = full.segments[0]
    proc = run_with_env(full, (name, "pg_wal/RECOVERYXLOG"), extra_env=c_locale, drop_env=drop)
    assert_delivered(proc.returncode, proc.stderr)
    assert full.delivered() == full.original(name)


# ---------------------------------------------------------------------------
# 5. Size: refused before the disk or the memory fills
# ---------------------------------------------------------------------------

def test_3_gib_sparse_plain_copy_is_refused_at_once_and_host2_delivers(full, tb):
    name = full.segments[0]
    bad = os.path.join(full.archive[0], name)
    os.unlink(bad)
    sh(["truncate", "-s", "3G", bad])
    chown_pg(bad)
    proc, elapsed = timed(full, "-v", name, "pg_wal/RECOVERYXLOG")
    assert_delivered(proc.returncode, proc.stderr)
    assert full.delivered() == full.original(name)
    assert "delivered from [source host2]" in proc.stderr
    warnings = lines_with(proc.stderr, "is not valid")
    assert len(warnings) == 1 and "[source host1] %s is not valid" % bad in warnings[0], proc.stderr
    assert elapsed < 6, "%.1f s: as if 3 GiB were read" % elapsed


def compressed_zeros(suffix, gib):
    """GIB GiB of zeros as a few KB: one 64 MiB stream, repeated (gzip, bzip2 and the
    script all read concatenated streams)."""
    compress = {".gz": lambda data: gzip.compress(data, 9), ".bz2": bz2.compress}[suffix]
    return compress(b"\0" * (64 * MIB)) * (gib * 16)


def peak_memory_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@pytest.mark.parametrize("suffix, head", [(".bz2", False), (".gz", False), (".bz2", True)],
                         ids=["bz2_of_3_gib_zeros", "gz_of_3_gib_zeros", "bz2_of_the_segment_then_3_gib_zeros"])
def test_decompression_bomb_is_refused_quickly_without_the_memory(full, tb, suffix, head):
    name = full.segments[0]
    good = full.original(name)
    bomb = ((gzip.compress(good, 1) if suffix == ".gz" else bz2.compress(good, 1)) if head else b"") \
        + compressed_zeros(suffix, 3)
    assert len(bomb) < 40 * MIB
    full.replace(0, name, None)
    bad = put(full, 0, "primary/" + name + suffix, bomb)
    started = time.monotonic()
    proc = full.popen("-v", name, "pg_wal/RECOVERYXLOG")
    peak = staged = 0
    try:
        child = python_child(proc.pid)
        while proc.poll() is None:
            peak = max(peak, peak_memory_kib(child))
            staged = max(staged, staged_bytes(child, full.pg_wal))
            time.sleep(0.02)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    elapsed = time.monotonic() - started
    assert_delivered(proc.returncode, err)
    assert full.delivered() == good
    assert "delivered from [source host2]" in err
    warnings = lines_with(err, "is not valid")
    assert len(warnings) == 1 and "[source host1] %s is not valid" % bad in warnings[0], err
    # Capped at the segment size (plus the piece that crossed it), not at 1 GiB.
    assert staged <= SEG + MIB, "the bomb put %d MiB into pg_wal before it was refused" % (staged // MIB)
    assert peak < 200 * 1024, "the fetch took %d MiB of memory" % (peak // 1024)
    assert elapsed < 5, "%.1f s to refuse a %d-byte bomb" % (elapsed, len(bomb))


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
@pytest.mark.parametrize("env_fixture", ["full", "wal"], ids=["full_segment", "mostly_zero_segment"])
def test_compressed_copy_of_several_streams_is_delivered(request, tb, suffix, env_fixture):
    """pigz -i, pbzip2, `cat a.gz b.gz`: one file of four streams back to back, of a
    segment full of records, and of one that is mostly zeros (a switch, archive_timeout)."""
    import lzma
    env = request.getfixturevalue(env_fixture)
    compress = {".gz": lambda data: gzip.compress(data, 1), ".bz2": lambda data: bz2.compress(data, 1),
                ".xz": lambda data: lzma.compress(data, preset=0)}[suffix]
    name = env.segments[2]
    good = env.original(name)
    env.replace(0, name, None)
    put(env, 0, "primary/" + name + suffix,
        b"".join(compress(good[start:start + SEG // 4]) for start in range(0, SEG, SEG // 4)))
    with tb.hosts[1].dead():
        proc = env.run(name, "pg_wal/RECOVERYXLOG")
    assert_delivered(proc.returncode, proc.stderr)
    assert env.delivered() == good


@contextlib.contextmanager
def tiny_tmpfs(path, size="8m"):
    """A file system of `size` mounted on path (owned by postgres), unmounted after."""
    import pwd
    user = pwd.getpwnam(PG_USER)
    sh(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700,uid=%d,gid=%d" % (size, user.pw_uid, user.pw_gid),
        "tmpfs", path])
    try:
        yield path
    finally:
        for _ in range(50):
            if sh(["umount", path], check=False).returncode == 0:
                break
            time.sleep(0.2)
        else:
            sh(["umount", "-l", path], check=False)


@pytest.mark.parametrize("mode, code", [(None, 3), ("recovery.signal", 200)])
def test_disk_full_is_failed_for_that_source_and_leaves_nothing(full, tb, mode, code):
    name = full.segments[0]
    if mode:
        touch(os.path.join(full.pgdata, mode))
    with tiny_tmpfs(full.pg_wal):
        proc = full.run(name, "pg_wal/RECOVERYXLOG")
        left = os.listdir(full.pg_wal)
        df = os.statvfs(full.pg_wal)
        free = df.f_bfree * df.f_frsize
    assert proc.returncode == code, proc.stderr
    if code == 200:
        stop = the_stop_line(proc.stderr, name)
        assert "[source host1] failed" in stop and "[source host2] failed" in stop, stop
    assert left == []
    assert free >= 7 * MIB, "the failed copies still take space"
    assert len(lines_with(proc.stderr, "No space left on device")) >= 2, proc.stderr   # both sources tried
    assert ssh_hosts(full, tb) == ["host1", "host2"]


# ---------------------------------------------------------------------------
# 6. A remote glob that matches no directory
# ---------------------------------------------------------------------------

def test_remote_glob_matching_no_directory_is_doubt_not_absence(full, tb):
    name = full.segments[0]
    missing = os.path.join(full.root, "not-mounted", "*")
    full.configure(archive={"stall_timeout": str(STALL)}, host1={"path": missing})
    full.replace(1, name, None)
    proc = full.run(name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 3, proc.stderr
    assert [line for line in lines_with(proc.stderr, "WARNING: [source host1]")
            if "no archive directory" in line], proc.stderr
    assert os.listdir(full.pg_wal) == []

    touch(os.path.join(full.pgdata, "recovery.signal"))
    proc = full.run(name, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 200, proc.stderr
    stop = the_stop_line(proc.stderr, name)
    assert "[source host1] no archive directory" in stop and "[source host2] absent" in stop, stop
    assert os.listdir(full.pg_wal) == []

    proc = full.run("--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines_with(proc.stdout, "WARNING: [source host1] %s matches no directory" % missing), proc.stdout


# ---------------------------------------------------------------------------
# 7. Spool hygiene
# ---------------------------------------------------------------------------

def spool_size(spool):
    return sum(os.lstat(os.path.join(spool, name)).st_size for name in os.listdir(spool))


def test_spool_of_a_gone_data_directory_is_removed_by_the_next_source_fetch(tb, segments, py36):
    gone = WalEnv(tb, segments, py36)
    live = None
    try:
        gone.configure(archive={"prefetch": "2"})
        assert gone.run(segments[0], "pg_wal/RECOVERYXLOG").returncode == 0
        wait_for(lambda: os.path.exists(os.path.join(gone.spool, segments[2])), 60, "the prefetch")
        gone.wait_for_prefetcher()
        with open(os.path.join(gone.spool, ".pgdata")) as owner:
            assert owner.read().strip() == gone.pgdata

        live = WalEnv(tb, segments, py36)
        live.configure(archive={"prefetch": "2", "spool_dir": gone.spool_root})
        live.spool = FETCH.spool_for(gone.spool_root, live.pgdata)
        assert live.run(segments[0], "pg_wal/RECOVERYXLOG").returncode == 0
        wait_for(lambda: os.path.exists(os.path.join(live.spool, segments[2])), 60, "the prefetch")
        live.wait_for_prefetcher()

        os.unlink(os.path.join(gone.pgdata, "PG_VERSION"))          # the restored copy is cleaned up
        proc = live.run("--check")
        spool_lines = lines_with(proc.stdout, "spool ")
        assert len(spool_lines) == 1, proc.stdout
        for spool, owner in ((gone.spool, gone.pgdata), (live.spool, live.pgdata)):   # and its size
            assert os.path.basename(spool) in spool_lines[0] and owner in spool_lines[0], spool_lines[0]
            assert "%.1f MiB" % (spool_size(spool) / float(MIB)) in spool_lines[0], spool_lines[0]

        # Served from its own spool: no source asked, the orphan stays.
        reset(live)
        proc = live.run(segments[1], "pg_wal/RECOVERYXLOG")
        assert_delivered(proc.returncode, proc.stderr)
        assert live.commands(this_call_only=True) == []
        assert os.path.isdir(gone.spool)
        live.wait_for_prefetcher()

        # Fetched from a source: the orphan goes, the live spool stays.
        reset(live)
        proc = live.run(segments[6], "pg_wal/RECOVERYXLOG")
        assert_delivered(proc.returncode, proc.stderr)
        assert not os.path.exists(gone.spool)
        assert os.path.isdir(live.spool)
    finally:
        if live is not None:
            live.teardown()
        gone.teardown()


# ---------------------------------------------------------------------------
# 8. Real recoveries
# ---------------------------------------------------------------------------

ROWS_SQL = "SELECT count(*), sum(id), md5(string_agg(note, ',' ORDER BY id)) FROM %s"


def link_archive(env):
    """Link every file of both hosts' archives (as they are now) into env's private trees."""
    for index, host in enumerate(env.tb.hosts):
        for name in os.listdir(host.wal_dir):
            target = os.path.join(env.archive[index], name)
            if not name.startswith(".") and not os.path.lexists(target):
                os.link(os.path.join(host.wal_dir, name), target)


class Restore(object):
    """A base backup of the primary, rows inserted after it across several segments,
    private archive trees holding all of it, and a restored cluster to start."""

    def __init__(self, tb, python, tag, wal_method="none", batches=6, rows=20000, prefetch=4):
        self.tb = tb
        primary = tb.primary
        self.env = WalEnv(tb, [], python)
        self.backup = os.path.join(self.env.root, "restored")
        sh([primary.tool("pg_basebackup"), "-D", self.backup, "-X", wal_method, "-c", "fast",
            "-T", "%s=%s" % (primary.ts1_dir, os.path.join(self.env.root, "restored_ts1")),
            "-h", primary.socket_dir, "-p", str(primary.port), "-U", PG_USER], user=PG_USER, timeout=300)
        self.table = "wff_rows_" + tag
        primary.psql("CREATE TABLE %s (id int, note text)" % self.table)
        self.names = []
        for batch in range(batches):
            primary.psql("INSERT INTO %s SELECT g, md5(g::text) FROM generate_series(%d, %d) g"
                         % (self.table, batch * rows, batch * rows + rows - 1))
            self.names.append(tb.switch_wal())
        assert len(set(self.names)) == batches
        self.expected = primary.psql(ROWS_SQL % self.table)
        link_archive(self.env)
        self.env.configure(archive={"prefetch": str(prefetch), "stall_timeout": str(STALL)})
        # Teardown waits for this data directory's prefetcher.
        self.env.spool = FETCH.spool_for(self.env.spool_root, self.backup)
        self.cluster = tb.new_cluster("wff_" + tag, pgdata=self.backup)

    def start(self, signal_file="recovery.signal", **settings):
        cluster = self.cluster
        options = dict(port=cluster.port, unix_socket_directories="'%s'" % cluster.socket_dir,
                       archive_mode="off", hot_standby="off",
                       restore_command="'%s %s -c %s %%f %%p'" % (self.env.python, SCRIPT, self.env.config),
                       recovery_target_timeline="'current'")
        options.update(settings)
        cluster.configure(**options)
        touch(os.path.join(self.backup, signal_file))
        sh([cluster.tool("pg_ctl"), "start", "-D", self.backup, "-l", cluster.logfile], user=PG_USER)

    def log(self):
        with open(self.cluster.logfile) as log_file:
            return log_file.read()

    def opened(self):
        return self.cluster.is_running() and self.cluster.psql(
            "SELECT NOT pg_is_in_recovery()", check=False).stdout.strip() == "t"

    def wait_stopped(self, timeout=240):
        wait_for(lambda: not self.cluster.is_running() or "ready to accept connections" in self.log(),
                 timeout, "the restored server to stop", interval=1)

    def close(self):
        try:
            self.cluster.stop("immediate")
        finally:
            self.env.teardown()


@pytest.fixture
def restore_case(tb, py36, request):
    cases = []

    def make(tag, **kwargs):
        case = Restore(tb, py36, tag, **kwargs)
        cases.append(case)
        return case
    try:
        yield make
    finally:
        for case in cases:
            case.close()


def assert_stopped_short(case, name, reason_parts):
    log_text = case.log()
    assert not case.cluster.is_running(), log_text[-3000:]
    stops = lines_with(log_text, "pg_wal_fetch: ERROR: stopping recovery at %s: " % name)
    assert stops, log_text[-3000:]
    for part in reason_parts:
        assert part in stops[-1], stops[-1]
    fatal = lines_with(log_text, "FATAL:")
    assert fatal and name in fatal[0] and "200" in fatal[0], log_text[-3000:]
    assert "database system is ready to accept connections" not in log_text
    assert "archive recovery complete" not in log_text


def test_the_prefetcher_checks_each_segment_while_the_next_arrives_and_spools_no_bad_copy(wal, tb):
    # The prefetcher checks segment N (pages, pg_waldump) in a thread while N+1
    # arrives: host1's bad copy is found there and never spooled, nothing staged
    # is left, and the segment comes from host2 instead.
    wal.configure(archive={"prefetch": "4"})
    first, window = wal.segments[0], wal.segments[1:5]
    bad = window[1]
    # These segments hold a few short records each (switch_wal): flip a byte of the first.
    offset, length = waldump_records(tb, os.path.join(tb.hosts[0].wal_dir, bad))[0]
    damaged = bytearray(wal.original(bad))
    damaged[offset + length - 3] ^= 0x55
    wal.replace(0, bad, bytes(damaged))
    proc = wal.run(first, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: all(os.path.exists(os.path.join(wal.spool, name)) for name in window), 60,
             "the prefetcher to spool %s" % window)
    wal.wait_for_prefetcher()
    with open(os.path.join(wal.spool, ".prefetch.log")) as log_file:
        log_text = log_file.read()
    assert "%s: the prefetched copy is not spooled" % bad in log_text, log_text
    assert [name for name in os.listdir(wal.spool) if name.endswith(".tmp")] == []
    for name in window:
        with open(os.path.join(wal.spool, name), "rb") as spooled_copy:
            assert spooled_copy.read() == wal.original(name), name
    os.unlink(os.path.join(wal.pg_wal, "RECOVERYXLOG"))
    os.unlink(wal.shim_log)
    proc = wal.run(bad, "pg_wal/RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert wal.delivered() == wal.original(bad)
    assert wal.commands(this_call_only=True) == []      # from the spool: host2's copy


@pytest.mark.timeout(600)
@pytest.mark.parametrize("damage, prefetch", [
    ("flipped_record_byte", 0), ("flipped_record_byte", 4),
    ("wrong_page_address_on_page_100", 4), ("zero_filled_tail", 4), ("later_timeline_on_page_100", 4)],
    ids=["flipped_record_byte-delivery_call", "flipped_record_byte-prefetch_spool",
         "wrong_page_address_on_page_100-prefetch_spool", "zero_filled_tail-prefetch_spool",
         "later_timeline_on_page_100-prefetch_spool"])
def test_real_recovery_with_one_segment_damaged_on_host1_has_every_row(tb, restore_case, damage, prefetch):
    case = restore_case("a%d%d" % (sorted(DAMAGE).index(damage), prefetch), prefetch=prefetch)
    middle = case.names[2]
    good = case.env.original(middle)
    damaged = DAMAGE[damage](tb, middle, good)
    assert damaged != good and len(damaged) == len(good)
    case.env.replace(0, middle, damaged)
    case.start()
    wait_for(case.opened, 300, "the end of recovery", interval=1)
    # Every row, not a copy opened short at the damage.
    assert case.cluster.psql(ROWS_SQL % case.table) == case.expected
    log_text = case.log()
    assert 'restored log file "%s" from archive' % case.names[-1] in log_text
    assert "stopping recovery" not in log_text
    if not prefetch:        # (the prefetcher logs in its spool, rewritten by each one)
        bad = os.path.join(case.env.archive[0], middle)
        assert lines_with(log_text, "[source host1] %s is not valid" % bad), log_text[-3000:]


@pytest.mark.timeout(600)
def test_real_recovery_with_host1_crawling_has_every_row_from_host2(tb, restore_case):
    case = restore_case("e")
    case.env.configure(archive={"prefetch": "4", "stall_timeout": str(STALL), "timeout": "10"})
    with crawling(tb, tb.hosts[0]):
        started = time.monotonic()
        case.start()
        wait_for(case.opened, 300, "the end of recovery", interval=1)
        elapsed = time.monotonic() - started
    assert case.cluster.psql(ROWS_SQL % case.table) == case.expected
    log_text = case.log()
    assert "stopping recovery" not in log_text
    # The first segment (no prefetch yet) met the crawl; given up, host1 is then asked
    # last: it costs its share of the timeout now and then, not per segment.
    assert [line for line in lines_with(log_text, "[source host1]") if "stalled" in line], log_text[-3000:]
    assert elapsed < 60, "the recovery took %.0f s" % elapsed


@pytest.mark.timeout(600)
def test_real_recovery_with_one_segment_damaged_on_both_hosts_stops_and_never_opens(tb, restore_case):
    case = restore_case("b")
    middle = case.names[2]
    damaged = flip_record_byte(tb, middle, case.env.original(middle))
    case.env.replace(0, middle, damaged)
    case.env.replace(1, middle, damaged)
    case.start()
    case.wait_stopped()
    assert 'restored log file "%s" from archive' % case.names[1] in case.log()
    assert_stopped_short(case, middle, ["[source host1] invalid", "[source host2] invalid"])


@pytest.mark.timeout(600)
def test_real_recovery_with_host1_dead_and_host2_lacking_a_segment_stops_with_the_reason(tb, restore_case):
    case = restore_case("c")
    middle = case.names[2]
    case.env.replace(1, middle, None)
    with tb.hosts[0].dead():
        case.start()
        case.wait_stopped()
    assert 'restored log file "%s" from archive' % case.names[1] in case.log()
    assert_stopped_short(case, middle, ["[source host1] unreachable", "[source host2] absent"])


@pytest.mark.timeout(600)
def test_real_standby_with_both_hosts_dead_keeps_retrying_in_recovery(tb, restore_case):
    # WAL of the backup itself in pg_wal: the standby reaches consistency without the archive.
    case = restore_case("d", wal_method="fetch", batches=2, rows=1000)
    with tb.hosts[0].dead(), tb.hosts[1].dead():
        # debug2: PostgreSQL then logs each restore_command's exit code.
        case.start("standby.signal", hot_standby="on", primary_conninfo="''", log_min_messages="debug2")
        wait_for(lambda: "ready to accept read-only connections" in case.log(), 120,
                 "the standby to be consistent", interval=1)
        time.sleep(15)
        log_text = case.log()
        assert case.cluster.is_running(), log_text[-3000:]
        assert case.cluster.psql("SELECT pg_is_in_recovery()") == "t"
    exits = re.findall(r'could not restore file "([0-9A-F]{24})" from archive: child process exited with '
                       r'exit code (\d+)', log_text)
    assert exits and {code for _name, code in exits} == {"3"}, exits
    assert lines_with(log_text, "%s not delivered, and not every source said it is absent" % exits[-1][0])
    assert "stopping recovery" not in log_text
    assert not lines_with(log_text, "FATAL"), log_text[-3000:]
    assert "database system is ready to accept connections" not in log_text
