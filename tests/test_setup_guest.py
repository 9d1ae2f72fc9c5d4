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
import shutil
import socket
import subprocess
import time

import pytest

from testbed import BIN, PY36, chown_pg, free_port, sh, wait_for

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
    kwargs.setdefault("timeout", 300)
    argv = [PY36, os.path.join(BIN, "setup_guest.py")] + [str(arg) for arg in args]
    env = dict(os.environ)
    env.pop("PG_ZFS_CONFIG", None)
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, **kwargs)


# ---------------------------------------------------------------------------
# Host role: libvirt's test driver
# ---------------------------------------------------------------------------

def test_host_start_leaves_a_running_domain_alone(tmp_path):
    config = host_config(tmp_path, node_xml(tmp_path / "node.xml", "running"))
    proc = setup_guest("-c", config, "--start")
    assert proc.returncode == 0, proc.stderr
    assert "already running: nothing to do" in proc.stderr
    assert "issued" not in proc.stderr


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


def test_host_start_gives_up_after_start_timeout_when_the_domain_never_runs(tmp_path):
    config = host_config(tmp_path, node_xml(tmp_path / "node.xml", "shut off"), start_timeout="2")
    began = time.time()
    proc = setup_guest("-c", config, "--start")
    assert proc.returncode == 1
    assert "domain centos6_6_x64 did not reach running within 2 s (it is shut off)" in proc.stderr
    assert 2 <= time.time() - began < 30


def test_host_start_resumes_a_paused_domain(tmp_path):
    node = node_xml(tmp_path / "node.xml", "paused")
    proc = setup_guest("-c", host_config(tmp_path, node, start_timeout="2"), "--start")
    # resume succeeded against the paused XML; the XML still says paused, so the wait times out.
    assert "was paused: resume issued" in proc.stderr
    assert proc.returncode == 1


def test_host_start_on_a_missing_domain_is_a_clear_error(tmp_path):
    config = host_config(tmp_path, node_xml(tmp_path / "node.xml", "running", name="other"))
    proc = setup_guest("-c", config, "--start")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cannot get the state of domain centos6_6_x64" in lines[0]
    assert "failed to get domain" in lines[0]


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


def test_a_config_with_both_roles_needs_role(tmp_path):
    config = tmp_path / "both.conf"
    config.write_text("[host]\ndomain = d\n[guest]\nwaldir = /w\n")
    proc = setup_guest("-c", config, "--start")
    assert proc.returncode == 2
    assert "both [host] and [guest]: pass --role" in proc.stderr


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
