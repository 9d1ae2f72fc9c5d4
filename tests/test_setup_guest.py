"""setup_guest.py run as a process, as rc.local, cron and a DBA run it.

Host role: against libvirt's test driver (the real virsh, a built-in
hypervisor). Its state lives in the XML file and is read anew by every virsh
process, so a started domain reads as shut off again in the next `domstate`.
The start-and-wait test therefore plays the hypervisor: it watches the
script's log, and only once the script has issued `virsh start` (which must
succeed against the shut-off XML) does it replace the XML, atomically, by one
in which the domain runs, as a real guest comes up a moment after the start.
A `virsh start` against the running XML fails ("already active"), so a script
that started a running domain, or started before reading the state, fails
these tests.

Guest role: against the testbed (tests/testbed.py): a standby of its own made
by --init on new datasets of the testbed's pool, the shared standby for the
doctor's healthy case.
"""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from testbed import BIN, PY36, chown_pg, free_port, load_script, on_a_terminal, sh, wait_for

PG_USER = "postgres"

NODE_XML = """<node>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>%(name)s</name>
    <memory>1048576</memory>
    <os><type>hvm</type></os>
    %(runstate)s
  </domain>
</node>
"""
RUNSTATES = {"running": "", "shut off": "<test:runstate>5</test:runstate>",
             "paused": "<test:runstate>3</test:runstate>"}


def node_xml(path, state, name="centos6_6_x64"):
    """Write (atomically: virsh may be reading it) a test-driver node with one domain."""
    temp = str(path) + ".tmp"
    with open(temp, "w") as out:
        out.write(NODE_XML % {"name": name, "runstate": RUNSTATES[state]})
    os.rename(temp, str(path))
    return str(path)


def host_config(tmp_path, node, **keys):
    host = {"domain": "centos6_6_x64", "libvirt_uri": "test://" + node, "start_timeout": "20",
            "guest_address": "", "guest_port": "5432"}
    host.update(keys)
    path = tmp_path / "host.conf"
    path.write_text("[host]\n" + "".join("%s = %s\n" % item for item in host.items()))
    return str(path)


def setup_guest(*args, **kwargs):
    """Run bin/setup_guest.py under Python 3.6, as rc.local would."""
    return run_script_copy(os.path.join(BIN, "setup_guest.py"), *args, **kwargs)


def run_script_copy(path, *args, **kwargs):
    """Run the setup_guest.py at path (bin/ or a copy) under Python 3.6."""
    kwargs.setdefault("timeout", 300)
    argv = [PY36, path] + [str(arg) for arg in args]
    env = dict(os.environ)
    env.pop("PG_ZFS_CONFIG", None)
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, **kwargs)


# ---------------------------------------------------------------------------
# Host role: libvirt's test driver
# ---------------------------------------------------------------------------

@pytest.mark.host_only("virsh (libvirt's test driver), no ZFS")
def test_host_start_leaves_a_running_domain_alone(tmp_path):
    config = host_config(tmp_path, node_xml(tmp_path / "node.xml", "running"))
    proc = setup_guest("-c", config, "--start")
    assert proc.returncode == 0, proc.stderr
    assert "already running: nothing to do" in proc.stderr
    assert "issued" not in proc.stderr


@pytest.mark.host_only("virsh (libvirt's test driver), no ZFS")
def test_host_start_starts_a_shut_off_domain_and_waits_until_it_runs(tmp_path):
    node = node_xml(tmp_path / "node.xml", "shut off")
    config = host_config(tmp_path, node)
    proc = subprocess.Popen([PY36, os.path.join(BIN, "setup_guest.py"), "-c", config, "--start"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    log = []
    started_at = None
    for line in proc.stderr:
        log.append(line)
        if "start issued" in line:
            # The hypervisor brings the domain up a moment after the start.
            time.sleep(1.5)
            started_at = time.time()
            node_xml(node, "running")
    assert proc.wait(timeout=60) == 0, "".join(log)
    assert started_at is not None, "no start was issued: %s" % "".join(log)
    assert any("was shut off: start issued; waiting up to 20 s" in line for line in log)
    assert "domain centos6_6_x64 is running" in log[-1]


@pytest.mark.host_only("virsh (libvirt's test driver), no ZFS")
def test_host_start_gives_up_after_start_timeout_when_the_domain_never_runs(tmp_path):
    config = host_config(tmp_path, node_xml(tmp_path / "node.xml", "shut off"), start_timeout="2")
    began = time.time()
    proc = setup_guest("-c", config, "--start")
    assert proc.returncode == 1
    assert "domain centos6_6_x64 did not reach running within 2 s (it is shut off)" in proc.stderr
    assert 2 <= time.time() - began < 30


@pytest.mark.host_only("virsh (libvirt's test driver), no ZFS")
def test_host_start_resumes_a_paused_domain(tmp_path):
    node = node_xml(tmp_path / "node.xml", "paused")
    proc = setup_guest("-c", host_config(tmp_path, node, start_timeout="2"), "--start")
    # resume succeeded against the paused XML; the XML still says paused, so the wait times out.
    assert "was paused: resume issued" in proc.stderr
    assert proc.returncode == 1


@pytest.mark.host_only("virsh (libvirt's test driver), no ZFS")
def test_host_start_on_a_missing_domain_is_a_clear_error(tmp_path):
    config = host_config(tmp_path, node_xml(tmp_path / "node.xml", "running", name="other"))
    proc = setup_guest("-c", config, "--start")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cannot get the state of domain centos6_6_x64" in lines[0]
    assert "failed to get domain" in lines[0]


@pytest.mark.host_only("virsh (libvirt's test driver), no ZFS")
def test_host_start_waits_for_the_guest_postgresql_port(tmp_path):
    node = node_xml(tmp_path / "node.xml", "running")
    with contextlib.closing(socket.socket()) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        proc = setup_guest("-c", host_config(tmp_path, node, guest_address="127.0.0.1", guest_port=port),
                           "--start")
        assert proc.returncode == 0, proc.stderr
        assert "answers at 127.0.0.1:%d" % port in proc.stderr
    closed = free_port()
    proc = setup_guest("-c", host_config(tmp_path, node, guest_address="127.0.0.1", guest_port=closed,
                                         start_timeout="2"), "--start")
    assert proc.returncode == 1
    assert "did not answer within 2 s" in proc.stderr


@pytest.mark.host_only("the config's roles, no ZFS")
def test_a_config_with_both_roles_needs_role(tmp_path):
    config = tmp_path / "both.conf"
    config.write_text("[host]\ndomain = d\n[guest]\nwaldir = /w\n")
    proc = setup_guest("-c", config, "--start")
    assert proc.returncode == 2
    assert "both [host] and [guest]: pass --role" in proc.stderr


@pytest.mark.host_only("rc.local on the host, no ZFS")
def test_host_install_writes_the_rc_local_line_once_and_executable(tmp_path):
    config = host_config(tmp_path, node_xml(tmp_path / "node.xml", "running"))
    root = tmp_path / "root"
    for _ in range(3):
        proc = setup_guest("-c", config, "--install", "--root", root)
        assert proc.returncode == 0, proc.stderr
    rc_local = root / "etc" / "rc.local"
    text = rc_local.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert text.count("--role host --start") == 1
    assert os.access(str(rc_local), os.X_OK)
    assert "nothing to change" in proc.stderr


@pytest.mark.host_only("virsh (libvirt's test driver), no ZFS")
def test_host_check_reports_the_domain_state(tmp_path):
    root = tmp_path / "root"
    config = host_config(tmp_path, node_xml(tmp_path / "node.xml", "running"))
    setup_guest("-c", config, "--install", "--root", root)
    proc = setup_guest("-c", config, "--check", "--root", root)
    assert "OK       domain: centos6_6_x64 is running" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("SETUP_GUEST ")
    node_xml(tmp_path / "node.xml", "shut off")
    proc = setup_guest("-c", config, "--check", "--root", root, "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 2 and report["status"] == "CRITICAL"
    assert "domain: centos6_6_x64 is shut off" in report["summary"]


# ---------------------------------------------------------------------------
# Guest role: the testbed
# ---------------------------------------------------------------------------

ZFS_FUSE_PROPERTIES = "compression=on recordsize=8K atime=off"   # zfs-fuse knows no lz4, no xattr=sa


class OwnStandby(object):
    """A standby --init makes on datasets of its own (pool/g_data01, pool/g_data02)."""

    def __init__(self, tb):
        self.tb = tb
        self.dir = os.path.join(tb.run_dir, "sg_own")
        self.socket_dir = os.path.join(self.dir, "sock")
        os.makedirs(self.socket_dir)
        chown_pg(self.socket_dir)
        pool = tb.zfs.name
        self.datasets = [pool + "/g_data01", pool + "/g_data02"]
        self.pgdata = os.path.join(self.mountpoint(self.datasets[1]), "pgdata")
        self.ts1 = os.path.join(self.mountpoint(self.datasets[0]), "ts1")
        self.waldir = os.path.join(self.dir, "wal")
        self.port = free_port()
        self.overrides = {
            "postgres": {"pgdata": self.pgdata, "port": self.port, "host": self.socket_dir},
            "snapshot": {"datasets": " ".join(self.datasets), "prefix": "sgown"},
            "guest": {"primary_conninfo": tb.primary.conninfo() + " application_name=sg_own",
                      "waldir": self.waldir, "logfile": os.path.join(self.dir, "start.log"),
                      "start_timeout": "120", "dataset_properties": ZFS_FUSE_PROPERTIES,
                      "tablespace_mapping": "%s=%s" % (tb.primary.ts1_dir, self.ts1),
                      "check_clock": "no"},
        }
        self.config = self.write_config("own.conf")

    def mountpoint(self, dataset):
        return os.path.join(self.tb.zfs.mountroot, dataset.split("/", 1)[1])

    def write_config(self, name, overrides=None):
        merged = {section: dict(keys) for section, keys in self.overrides.items()}
        for section, keys in (overrides or {}).items():
            merged.setdefault(section, {}).update(keys)
        return self.tb.write_config(os.path.join(self.dir, name), merged)

    def pg_ctl(self, *args, check=True):
        return sh([os.path.join(self.tb.pg_bindir, "pg_ctl")] + list(args) + ["-D", self.pgdata],
                  user=PG_USER, check=check, timeout=180)

    def is_running(self):
        return os.path.exists(self.pgdata) and self.pg_ctl("status", check=False).returncode == 0

    def stop(self):
        if self.is_running():
            self.pg_ctl("stop", "-w", "-m", "fast")

    def psql(self, sql):
        return sh([os.path.join(self.tb.pg_bindir, "psql"), "-X", "-q", "-A", "-t", "-h", self.socket_dir,
                   "-p", str(self.port), "-d", "postgres", "-c", sql], user=PG_USER).stdout.strip()

    def receiver_status(self):
        return self.psql("select status from pg_stat_wal_receiver")

    def teardown(self):
        self.stop()
        for dataset in reversed(self.datasets):
            if self.tb.zfs.exists(dataset):
                self.tb.zfs.destroy(dataset, recursive=True)


@pytest.fixture(scope="module")
def own(tb):
    standby = OwnStandby(tb)
    try:
        yield standby
    finally:
        standby.teardown()


def test_init_dry_run_prints_every_step_and_does_none(own, tb):
    proc = setup_guest("-c", own.config, "--init", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for dataset in own.datasets:
        assert "would: create dataset %s (%s)" % (dataset, ZFS_FUSE_PROPERTIES) in proc.stdout
    assert "would: make the standby: " in proc.stdout
    assert "--waldir=%s -R -X stream" % own.waldir in proc.stdout
    assert "-T %s=%s" % (tb.primary.ts1_dir, own.ts1) in proc.stdout
    assert "would: set " in proc.stdout and "restore_command" in proc.stdout
    assert not any(tb.zfs.exists(dataset) for dataset in own.datasets)
    assert not os.path.exists(own.waldir)


# pg_basebackup --progress's report as setup_guest logs it when stderr is not a terminal.
PROGRESS_LOG_LINE = re.compile(r"^setup_guest: INFO: pg_basebackup: (\d+)/(\d+) kB \((\d+)%\), (\d+)/(\d+) tablespaces?$")
PROGRESS_INTERVAL = load_script("setup_guest").PROGRESS_INTERVAL


def test_init_builds_a_standby_on_new_datasets_with_pg_wal_off_zfs(own, tb):
    started = time.monotonic()
    proc = setup_guest("-c", own.config, "--init", timeout=900)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "--progress" in proc.stderr
    # Not a terminal: pg_basebackup's progress, thinned to one report per 10 s and the last.
    reports = [PROGRESS_LOG_LINE.match(line) for line in proc.stderr.splitlines()]
    reports = [report for report in reports if report]
    assert reports, proc.stderr
    assert len(reports) <= 2 + elapsed // PROGRESS_INTERVAL, proc.stderr
    done, total, percent, tablespace, tablespaces = (int(field) for field in reports[-1].groups())
    assert (percent, done, tablespace, tablespaces) == (100, total, 2, 2), proc.stderr   # pg_default and ts1
    for dataset in own.datasets:
        assert tb.zfs.run("get", "-H", "-o", "value", "recordsize", dataset).strip() == "8K"
        assert tb.zfs.run("get", "-H", "-o", "value", "atime", dataset).strip() == "off"
        assert os.stat(own.mountpoint(dataset)).st_uid == os.stat(own.socket_dir).st_uid  # postgres
    assert os.path.exists(os.path.join(own.pgdata, "standby.signal"))
    assert os.path.realpath(os.path.join(own.pgdata, "pg_wal")) == os.path.realpath(own.waldir)
    assert os.listdir(own.ts1), "the tablespace was not mapped into g_data01"
    auto = open(os.path.join(own.pgdata, "postgresql.auto.conf")).read()
    # The fetch script's own interpreter (#!/usr/bin/env python3), with -S.
    assert "restore_command = '/usr/bin/env python3 -S %s -c %s %%f %%p'" % (
        os.path.join(BIN, "pg_wal_fetch.py"), own.config) in auto
    assert "primary_conninfo = '%s'" % own.overrides["guest"]["primary_conninfo"] in auto
    assert "port = '%d'" % own.port in auto


def test_init_a_second_time_changes_nothing_and_says_so(own):
    auto = os.path.join(own.pgdata, "postgresql.auto.conf")
    before = (open(auto).read(), os.stat(auto).st_mtime_ns, sorted(os.listdir(own.pgdata)))
    proc = setup_guest("-c", own.config, "--init")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to change" in proc.stderr
    assert "pg_basebackup" not in proc.stderr
    assert (open(auto).read(), os.stat(auto).st_mtime_ns, sorted(os.listdir(own.pgdata))) == before


@pytest.mark.host_only("pg_ctl and streaming; the standby's datasets are init's")
def test_start_starts_a_stopped_standby_which_then_streams(own):
    assert not own.is_running()
    proc = setup_guest("-c", own.config, "--start")
    assert proc.returncode == 0, proc.stderr
    assert own.is_running()
    assert own.psql("select pg_is_in_recovery()") == "t"
    wait_for(lambda: own.receiver_status() == "streaming", 60, "the WAL receiver to stream")


@pytest.mark.host_only("pg_ctl; the standby's datasets are init's")
def test_start_leaves_a_running_standby_alone(own):
    pid_file = os.path.join(own.pgdata, "postmaster.pid")
    before = open(pid_file).readline()
    proc = setup_guest("-c", own.config, "--start")
    assert proc.returncode == 0, proc.stderr
    assert "already runs" in proc.stderr
    assert open(pid_file).readline() == before


def test_init_refuses_a_non_empty_data_directory_without_force(own):
    other = os.path.join(own.mountpoint(own.datasets[1]), "other")
    os.makedirs(other)
    with open(os.path.join(other, "notes.txt"), "w") as notes:
        notes.write("keep me\n")
    config = own.write_config("other.conf", {"postgres": {"pgdata": other}})
    proc = setup_guest("-c", config, "--init")
    assert proc.returncode == 1
    assert "is not empty (unknown files): refusing to overwrite it without --force" in proc.stderr
    assert os.listdir(other) == ["notes.txt"]
    shutil.rmtree(other)


@pytest.mark.host_only("pg_basebackup's error")
def test_init_whose_pg_basebackup_fails_names_its_error_in_one_line(own):
    """Its messages reach the log as they come; the last line names the error, not the
    continuation ("\tIs the server running...") after it."""
    dead = free_port()   # nothing listens there
    failing = os.path.join(own.mountpoint(own.datasets[1]), "failing")
    waldir = os.path.join(own.dir, "wal_failing")
    config = own.write_config("failing.conf", {
        "postgres": {"pgdata": failing},
        "guest": {"primary_conninfo": "host=127.0.0.1 port=%d connect_timeout=5" % dead, "waldir": waldir,
                  "tablespace_mapping": ""}})
    try:
        proc = setup_guest("-c", config, "--init")
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("setup_guest: ERROR: pg_basebackup failed: "), proc.stderr
        assert "Connection refused" in last and "Is the server running" not in last, proc.stderr
        assert "setup_guest: INFO: pg_basebackup: Is the server running" in proc.stderr
    finally:
        shutil.rmtree(failing, ignore_errors=True)
        shutil.rmtree(waldir, ignore_errors=True)


@pytest.mark.host_only("pg_basebackup's progress line")
def test_init_on_a_terminal_leaves_pg_basebackups_progress_line_to_redraw_itself(own, tb):
    pgdata = os.path.join(own.mountpoint(own.datasets[1]), "on_tty")
    ts1 = os.path.join(own.mountpoint(own.datasets[0]), "ts1_on_tty")
    waldir = os.path.join(own.dir, "wal_on_tty")
    config = own.write_config("on_tty.conf", {"postgres": {"pgdata": pgdata},
                                              "guest": {"waldir": waldir,
                                                        "tablespace_mapping": "%s=%s" % (tb.primary.ts1_dir, ts1)}})
    try:
        code, _, text = on_a_terminal([PY36, os.path.join(BIN, "setup_guest.py"), "-c", config, "--init"],
                                      timeout=900, stdout_too=True)
        assert code == 0, text
        assert re.search(r"\r(?!\n)", text), text          # a report redrawn over the one before
        assert re.search(r"\d+/\d+ kB \(100%\), 2/2 tablespaces", text), text
        assert "INFO: pg_basebackup:" not in text                # not thinned into the log
        assert os.path.exists(os.path.join(pgdata, "standby.signal"))
    finally:
        for directory in (pgdata, ts1, waldir):
            shutil.rmtree(directory, ignore_errors=True)


def test_init_refuses_a_waldir_on_zfs(own):
    on_zfs = os.path.join(own.mountpoint(own.datasets[0]), "wal")
    config = own.write_config("walzfs.conf", {"guest": {"waldir": on_zfs}})
    proc = setup_guest("-c", config, "--init")
    assert proc.returncode == 1
    assert "pg_wal must not live on ZFS or btrfs" in proc.stderr and own.tb.zfs.fstype in proc.stderr
    assert not os.path.exists(on_zfs)


def test_a_refused_init_creates_no_dataset(own, tb):
    extra = tb.zfs.name + "/g_refused"
    on_zfs = os.path.join(own.mountpoint(own.datasets[0]), "wal")
    config = own.write_config("refused.conf", {"guest": {"waldir": on_zfs},
                                               "snapshot": {"datasets": " ".join(own.datasets + [extra])}})
    try:
        proc = setup_guest("-c", config, "--init")
        assert proc.returncode == 1
        assert "pg_wal must not live on ZFS or btrfs" in proc.stderr
        assert not tb.zfs.exists(extra)
    finally:
        if tb.zfs.exists(extra):
            tb.zfs.destroy(extra, recursive=True)


@pytest.mark.host_only("crontab and rc.local, no ZFS")
def test_install_writes_the_crontab_and_rc_local_lines_once(own, tmp_path):
    root = tmp_path / "root"
    outputs = []
    for _ in range(3):
        proc = setup_guest("-c", own.config, "--install", "--root", root)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    cron = (root / "etc" / "cron.d" / "pg_zfs").read_text()
    assert cron.count("pg_zfs_snap.py") == 1
    assert "1 4 * * * root %s -c %s" % (os.path.join(BIN, "pg_zfs_snap.py"), own.config) in cron
    rc_local = root / "etc" / "rc.local"
    assert rc_local.read_text().count("--role guest --start") == 1
    assert os.access(str(rc_local), os.X_OK)
    assert "nothing to change" in proc.stderr
    # The key is made once; every run prints the same line for each archive host:
    # the key restricted to pg_wal_serve there (tests/test_archive_key.py installs it).
    assert outputs[0] == outputs[2]
    assert "# on archive host host1 (%s), as root: setup_guest.py --role host --install --authorized-key" \
        % own.tb.hosts[0].address in outputs[0]
    lines = [line for line in outputs[0].splitlines() if line.startswith("restrict,from=")]
    assert len(lines) == len(own.tb.hosts) and all(" ssh-ed25519 " in line for line in lines)


@pytest.mark.host_only("crontab and rc.local, no ZFS")
def test_install_print_writes_nothing(own, tmp_path):
    root = tmp_path / "root"
    proc = setup_guest("-c", own.config, "--install", "--print", "--root", root)
    assert proc.returncode == 0, proc.stderr
    assert "would: add to %s/etc/cron.d/pg_zfs" % root in proc.stdout
    assert not root.exists()


@pytest.mark.host_only("systemd units, no ZFS")
def test_install_where_systemd_runs_writes_the_units_once_and_enables_them(own, tmp_path):
    root = tmp_path / "root"
    (root / "run" / "systemd" / "system").mkdir(parents=True)
    for _ in range(2):
        proc = setup_guest("-c", own.config, "--install", "--root", root)
        assert proc.returncode == 0, proc.stderr
    units = root / "etc" / "systemd" / "system"
    assert "ExecStart=%s -c %s --role guest --start" % (os.path.join(BIN, "setup_guest.py"), own.config) \
        in (units / "pg-zfs-guest.service").read_text()
    assert os.readlink(str(units / "timers.target.wants" / "pg-zfs-snap.timer")) == \
        "/etc/systemd/system/pg-zfs-snap.timer"
    assert os.path.islink(str(units / "multi-user.target.wants" / "pg-zfs-guest.service"))
    assert not (root / "etc" / "cron.d").exists()
    assert "nothing to change" in proc.stderr


@pytest.mark.host_only("systemd units, no ZFS")
def test_install_from_a_package_finds_the_units_the_package_installed(own, tmp_path):
    """Installed by rpm/deb: setup_guest.py in PREFIX/bin, the units in
    PREFIX/lib/systemd/system (make install), no etc/systemd of a pg_zfs tree."""
    prefix = tmp_path / "usr"
    (prefix / "bin").mkdir(parents=True)
    shutil.copy(os.path.join(BIN, "setup_guest.py"), str(prefix / "bin"))
    packaged = prefix / "lib" / "systemd" / "system"
    shutil.copytree(os.path.join(os.path.dirname(BIN), "etc", "systemd"), str(packaged))
    root = tmp_path / "root"
    (root / "run" / "systemd" / "system").mkdir(parents=True)
    proc = run_script_copy(str(prefix / "bin" / "setup_guest.py"), "-c", own.config, "--install", "--root", root)
    assert proc.returncode == 0, proc.stderr
    assert "ExecStart=%s -c %s --role guest --start" % (prefix / "bin" / "setup_guest.py", own.config) \
        in (root / "etc" / "systemd" / "system" / "pg-zfs-guest.service").read_text()


@pytest.mark.host_only("ssh's known_hosts, no ZFS")
def test_install_known_hosts_records_keys_under_the_alias_ssh_checks(own, tmp_path):
    tb = own.tb
    host1 = tb.hosts[0]
    options = tb.default_config()["source host1"]["ssh_options"] + " -o HostKeyAlias=archive1"
    config = own.write_config("alias.conf", {"source host1": {"ssh_options": options}})
    root = tmp_path / "root"
    for _ in range(2):
        proc = setup_guest("-c", config, "--install", "--known-hosts", "--root", root)
        assert proc.returncode == 0, proc.stderr
    known = root / tb.known_hosts.lstrip("/")
    records = known.read_text().splitlines()
    assert len([r for r in records if r.startswith("archive1 ssh-ed25519 ")]) == 1
    assert len([r for r in records if r.startswith("host2 ")]) == 1
    assert "add -o HostKeyAlias=host2" in proc.stderr
    # ssh, strict, with only the recorded file, accepts host1 under its alias.
    login = sh(["ssh", "-p", str(host1.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-i", tb.client_key, "-o", "UserKnownHostsFile=%s" % known, "-o", "HostKeyAlias=archive1",
                "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5", "root@" + host1.address, "true"],
               check=False, timeout=30)
    assert login.returncode == 0, login.stderr


# -- the doctor --------------------------------------------------------------

def checks_of(proc):
    report = json.loads(proc.stdout)
    return report, {check["name"]: check for check in report["checks"]}


@pytest.mark.host_only("every check line; the ZFS ones (PGDATA on ZFS, pg_wal off it) are the next test's")
def test_check_reports_ok_on_the_healthy_testbed(tb, tmp_path):
    config = tb.write_config(os.path.join(tb.run_dir, "sg_healthy.conf"), {
        "guest": {"primary_conninfo": tb.primary.conninfo(), "waldir": tb.standby_wal, "check_clock": "no"},
        "snapshot": {"prefix": "sgcheck"}})
    root = tmp_path / "root"
    assert setup_guest("-c", config, "--install", "--root", root).returncode == 0
    try:
        snap = setup_guest_sibling("pg_zfs_snap.py", "-c", config)
        assert snap.returncode == 0, snap.stderr
        proc = setup_guest("-c", config, "--check", "--root", root)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip().splitlines()[-1].startswith("SETUP_GUEST OK - ")
    finally:
        for name in tb.zfs.snapshots():
            if "@sgcheck_" in name:
                tb.zfs.destroy(name)


def setup_guest_sibling(script, *args):
    return subprocess.run([PY36, os.path.join(BIN, script)] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


def test_check_names_pg_wal_moved_onto_zfs(own):
    wal_link = os.path.join(own.pgdata, "pg_wal")
    on_zfs = os.path.join(own.mountpoint(own.datasets[0]), "wal_moved")
    own.stop()
    sh(["mv", own.waldir, on_zfs])   # across file systems, keeping the owner
    os.unlink(wal_link)
    os.symlink(on_zfs, wal_link)
    try:
        assert setup_guest("-c", own.config, "--start").returncode == 0
        proc = setup_guest("-c", own.config, "--check", "--json")
        report, checks = checks_of(proc)
        assert proc.returncode == 2
        assert checks["pg_wal"]["status"] == "CRITICAL"
        assert "%s (-> %s) is on %s (%s" % (wal_link, on_zfs, own.tb.zfs.fstype, own.datasets[0]) \
            in checks["pg_wal"]["detail"]
        assert checks["postgres"]["status"] == "OK"
        assert "pg_wal: " in report["summary"]
    finally:
        own.stop()
        sh(["mv", on_zfs, own.waldir])
        os.unlink(wal_link)
        os.symlink(own.waldir, wal_link)
        setup_guest("-c", own.config, "--start")
    proc = setup_guest("-c", own.config, "--check", "--json")
    assert checks_of(proc)[1]["pg_wal"]["status"] == "OK"


@pytest.mark.host_only("pg_ctl status")
def test_check_names_a_stopped_standby(own):
    own.stop()
    try:
        proc = setup_guest("-c", own.config, "--check")
        assert proc.returncode == 2
        summary = proc.stdout.strip().splitlines()[-1]
        assert summary.startswith("SETUP_GUEST CRITICAL - postgres: not running in %s" % own.pgdata)
        assert "SKIPPED  wal receiver: PostgreSQL does not answer" in proc.stdout
    finally:
        assert setup_guest("-c", own.config, "--start").returncode == 0


@pytest.mark.host_only("a dead archive host (nftables)")
def test_check_names_a_dead_archive_host(own):
    dead = own.tb.hosts[1]
    with dead.dead():
        proc = setup_guest("-c", own.config, "--check", "--json")
    report, checks = checks_of(proc)
    assert checks["archive"]["status"] == "WARNING"
    assert "source host2 fails" in checks["archive"]["detail"]
    assert "archive: source host2 fails" in report["summary"]


@pytest.mark.host_only("the clock tools")
def test_check_without_a_clock_tool_says_it_cannot_tell(own):
    config = own.write_config("clock.conf", {"guest": {"check_clock": "yes"}})
    proc = setup_guest("-c", config, "--check", "--json")
    clock = checks_of(proc)[1]["clock"]
    assert clock["status"] in ("OK", "WARNING")
    if clock["status"] == "WARNING":
        assert clock["detail"].startswith(("cannot tell", "not synchronised"))


def test_init_force_refuses_while_the_standby_runs_and_rebuilds_it_when_stopped(own):
    assert own.is_running()
    marker = os.path.join(own.pgdata, "not_from_the_primary")
    open(marker, "w").close()
    proc = setup_guest("-c", own.config, "--init", "--force")
    assert proc.returncode == 1
    assert "PostgreSQL runs in %s: stop it before --init --force" % own.pgdata in proc.stderr
    own.stop()
    proc = setup_guest("-c", own.config, "--init", "--force", timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "empty %s (--force)" % own.pgdata in proc.stderr
    assert not os.path.exists(marker)
    assert os.path.realpath(os.path.join(own.pgdata, "pg_wal")) == os.path.realpath(own.waldir)
    assert "nothing to change" in setup_guest("-c", own.config, "--init").stderr
    assert setup_guest("-c", own.config, "--start").returncode == 0
    wait_for(lambda: own.receiver_status() == "streaming", 60, "the rebuilt standby to stream")
