"""Smoke tests: each real component of the testbed works and is cleaned up."""

import contextlib
import os
import re
import subprocess
import time

import pytest

import testbed
from testbed import PY36, PY313, BIN, ZfsPool, sh, wait_for


def test_write_on_primary_is_visible_on_standby(tb):
    standby = tb.standby
    tb.primary.psql("INSERT INTO smoke (note) VALUES ('seen on the standby')")
    wait_for(lambda: standby.psql("SELECT count(*) FROM smoke WHERE note = 'seen on the standby'")
             == "1", 30, "the row on the standby")
    assert standby.psql("SELECT pg_is_in_recovery()") == "t"


def test_standby_pgdata_is_on_zfs_and_pg_wal_is_not(tb):
    standby = tb.standby
    assert standby.pgdata.startswith(tb.zfs.mountpoint(tb.zfs.name + "/data02"))
    wal = os.path.realpath(os.path.join(standby.pgdata, "pg_wal"))
    assert wal == tb.standby_wal and not wal.startswith(tb.zfs.mountroot)
    links = os.listdir(os.path.join(standby.pgdata, "pg_tblspc"))
    assert len(links) == 1
    target = os.readlink(os.path.join(standby.pgdata, "pg_tblspc", links[0]))
    assert target.startswith(tb.zfs.mountpoint(tb.zfs.name + "/data01"))


@pytest.mark.host_only("scp, no ZFS")
def test_archived_wal_can_be_copied_by_scp_from_the_first_host(tb, tmp_path):
    name = tb.switch_wal()
    host = tb.hosts[0]
    dest = str(tmp_path / name)
    proc = sh(["scp", "-q", "-P", str(host.port)] + tb.ssh_options
              + ["root@%s:%s/%s" % (host.address, host.wal_dir, name), dest], check=False)
    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(dest) == os.path.getsize(os.path.join(host.wal_dir, name))
    with open(dest, "rb") as copy, open(os.path.join(host.wal_dir, name), "rb") as original:
        assert copy.read() == original.read()


@pytest.mark.host_only("nftables, no ZFS")
def test_dead_host_fails_within_2_seconds_and_answers_after_revival(tb):
    host = tb.hosts[0]
    with host.dead():
        started = time.monotonic()
        proc = host.ssh("true")
        elapsed = time.monotonic() - started
        assert proc.returncode == 255
        assert elapsed < 3.5  # ConnectTimeout=2 plus process start-up
        ping = sh(["ping", "-c", "1", "-W", "1", host.address], check=False)
        assert ping.returncode != 0
    assert host.ssh("true").returncode == 0
    assert sh(["ping", "-c", "1", "-W", "1", host.address], check=False).returncode == 0


def test_zfs_snapshot_and_clone_of_the_standby_dataset_exist_and_are_removed(tb):
    tb.standby
    dataset = tb.zfs.name + "/data02"
    snapshot = dataset + "@smoke"
    clone = tb.zfs.name + "/smoke_clone"
    tb.zfs.run("snapshot", snapshot)
    mountpoint = os.path.join(tb.run_dir, "smoke_clone")
    tb.zfs.run("clone", "-o", "mountpoint=" + mountpoint, snapshot, clone)
    try:
        assert os.path.exists(os.path.join(mountpoint, "pgdata", "global", "pg_control"))
    finally:
        tb.zfs.destroy(clone)
        tb.zfs.destroy(snapshot)
    assert snapshot not in tb.zfs.snapshots()
    assert not tb.zfs.exists(clone)


def test_btrfs_subvolume_snapshot_is_read_only(tb):
    subvolume = tb.btrfs.create("smoke")
    with open(os.path.join(subvolume, "file"), "w") as out:
        out.write("x")
    snapdir = os.path.join(tb.btrfs.mountpoint, ".snap")
    os.makedirs(snapdir, exist_ok=True)
    snapshot = os.path.join(snapdir, "smoke@one")
    sh(["btrfs", "subvolume", "snapshot", "-r", subvolume, snapshot])
    with pytest.raises(OSError):
        open(os.path.join(snapshot, "file"), "w")
    sh(["btrfs", "subvolume", "delete", snapshot])
    sh(["btrfs", "subvolume", "delete", subvolume])


@pytest.mark.parametrize("python", [python for python in (PY36, PY313) if python])
@pytest.mark.parametrize("script", ["pg_wal_fetch", "pg_zfs_snap", "pg_zfs_restore",
                                    "setup_guest"])
@pytest.mark.host_only("--help, no ZFS")
def test_each_script_copied_alone_runs_help(tmp_path, python, script):
    lonely = tmp_path / (script + ".py")
    lonely.write_bytes(open(os.path.join(BIN, script + ".py"), "rb").read())
    proc = subprocess.run([python, str(lonely), "--help"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, cwd=str(tmp_path),
                          env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


@pytest.mark.parametrize("script", ["pg_wal_fetch", "pg_zfs_snap", "pg_zfs_restore",
                                    "setup_guest"])
@pytest.mark.host_only("a missing config, no ZFS")
def test_missing_config_file_is_a_one_line_error_with_exit_2(run_script, tmp_path, script):
    args = {"pg_wal_fetch": ["000000010000000000000001", "pg_wal/x"], "pg_zfs_snap": ["list"],
            "pg_zfs_restore": ["list"], "setup_guest": ["--start"]}[script]
    proc = run_script(script, *args, config=tmp_path / "absent.conf")
    assert proc.returncode == 2
    assert "absent.conf" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.host_only("vermin, no ZFS")
def test_scripts_use_nothing_newer_than_python_3_6():
    proc = subprocess.run(["vermin", "--target=3.6-", "--violations", "--no-tips", "-q", BIN],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.host_only("the testbed's own message")
def test_a_dataset_a_mount_namespace_holds_is_busy_and_the_testbed_names_that_namespace(tb):
    # What left zfs-fuse's datasets "busy" beside the guest (DEVELOPERS.md, "CI"):
    # a mount namespace made while the dataset was mounted, as libvirt makes one
    # for QEMU, where / is private, keeps it. The testbed names it.
    dataset = tb.zfs.create("held", mountpoint=os.path.join(tb.run_dir, "held"))
    path = tb.zfs.mountpoint(dataset)
    with open(os.path.join(path, "x"), "w") as handle:
        handle.write("x")
    # Its namespace keeps only this mount: another session's datasets stay free.
    keep_only = ("awk -v p=\"$1\" '($3 == \"fuse.zfs\" || $3 == \"zfs\") && $2 != p && index($2, p \"/\") != 1 "
                 "{print $2}' /proc/self/mounts | sort -r | while read -r m; do umount -l \"$m\"; done; exec sleep 60")
    held = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", keep_only, "sh", path])
    try:
        wait_for(lambda: "sleep: " in str(testbed.namespace_holders(path)), 10, "the namespace's sleep")
        assert [pid for pid, _what in testbed.namespace_holders(path)] == [held.pid]
        assert "sleep: its own mount namespace holds %s" % path in dict(testbed.holders_of(path))[held.pid]
        assert testbed.open_holders_of(path) == []
        if "private" in sh(["findmnt", "-n", "-o", "PROPAGATION", "/"]).stdout:
            # Retried for 3 s (any dataset written a moment ago is busy for about 0.5 s).
            deadline = time.time() + 3
            while time.time() < deadline:
                assert sh(["zfs", "destroy", dataset], check=False).returncode != 0, "destroyed while held"
                time.sleep(0.5)
    finally:
        held.kill()
        held.wait()
    tb.zfs.destroy(dataset)
    assert not tb.zfs.exists(dataset)


@pytest.mark.host_only("the testbed's clean-up of servers and nft; its pools are the dead-session test's")
def test_a_testbed_leaves_nothing_behind_even_with_a_dead_host_and_a_stray_server():
    import testbed
    bed = testbed.Testbed(os.environ.get("PG_ZFS_TEST_PG", "15"))
    try:
        bed.standby
        # An ssh master pg_wal_fetch.py leaves for ControlPersist (60 s), its socket
        # in /tmp (the default control_dir), and the sshd session it holds open.
        config = bed.write_config(os.path.join(bed.run_dir, "fetch.conf"), sections=bed.archive_config(),
                                  overrides={"postgres": {"system_identifier": "7000000000000000001"}})
        testbed.run_script("pg_wal_fetch", "0000000100000000000000FE", os.path.join(bed.run_dir, "x"),
                           config=config)
        lingering = ssh_masters(bed.net)
        assert lingering, "no ssh master lingers: nothing to check"
        bed.hosts[1].kill()
        # A server a test forgot: a clone of the standby's dataset, running.
        clone = bed.zfs.name + "/stray"
        bed.zfs.run("snapshot", bed.zfs.name + "/data02@stray")
        bed.zfs.run("clone", "-o", "mountpoint=%s/stray" % bed.run_dir,
                    bed.zfs.name + "/data02@stray", clone)
        subprocess.Popen(["sleep", "600"], cwd=bed.run_dir + "/stray")
    finally:
        run_dir, pool, table = bed.run_dir, bed.pool_name, bed.nft_table
        bed.teardown()
    assert not os.path.exists(run_dir)
    assert pool not in sh(["zpool", "list", "-H", "-o", "name"], check=False).stdout.split()
    assert sh(["nft", "list", "table", "inet", table], check=False).returncode != 0
    assert run_dir not in open("/proc/mounts").read()
    assert [pid for pid in lingering if testbed._pid_alive(pid)] == []


def ssh_masters(net):
    """PIDs of the ssh masters (ssh titles one "ssh: CONTROLPATH [mux]") connected to
    127.NET.0.0/24: not another session's, such as this pytest session's testbed's."""
    found = []
    for pid in testbed.pids_connected_to(net):
        with contextlib.suppress(OSError):
            with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
                if re.match(rb"ssh: \S+ \[mux\]", cmdline.read()):
                    found.append(pid)
    return found


@pytest.mark.host_only("install-deps' choice, both ways on any machine")
@pytest.mark.parametrize("kernel_zfs", [True, False])
def test_install_deps_never_installs_zfs_fuse_where_kernel_zfs_runs(tmp_path, kernel_zfs):
    # zfsutils-linux declares Conflicts: zfs-fuse: installing it would remove OpenZFS.
    device = tmp_path / "zfs"
    if kernel_zfs:
        device.write_text("")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                          "install-deps.sh")
    # (ZFSUTILS_PACKAGE: a package no machine has, so that only the device decides,
    # also in the guest of make test-guest, which has zfsutils-linux.)
    proc = subprocess.run(["sh", script], env=dict(os.environ, DRY_RUN="1", ZFS_DEVICE=str(device),
                                                   ZFSUTILS_PACKAGE="pg-zfs-no-such-package"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    packages = [line for line in proc.stdout.splitlines() if line.startswith("install-deps: packages:")]
    assert len(packages) == 1
    assert ("zfs-fuse" in packages[0].split()) is not kernel_zfs


def test_a_dead_sessions_pool_is_destroyed_by_the_next_session_even_when_its_image_is_gone(tb, tmp_path):
    """A session killed before its teardown leaves its pool in zfs-fuse; its run
    dir (and pool image) may be gone too. The next pool made destroys it."""
    if testbed.kernel_zfs():
        pytest.skip("kernel ZFS: pools of dead sessions are the guest's, not this machine's")
    tb.zfs                                       # the daemon runs
    number = 900000 + os.getpid() % 99999       # no live session holds this net lock
    dead = "pgzfs_t%d" % number
    image = str(tmp_path / "dead.img")
    with open(image, "w") as handle:
        handle.truncate(128 << 20)
    sh(["zpool", "create", "-m", "none", dead, image])
    try:
        os.unlink(image)
        assert sh(["zpool", "list", "-H", "-o", "name"]).stdout.split().count(dead) == 1
        fresh = ZfsPool(str(tmp_path), "pgzfs_tfresh%d" % os.getpid(), size="128M")
        try:
            assert dead not in sh(["zpool", "list", "-H", "-o", "name"]).stdout.split()
        finally:
            fresh.teardown()
    finally:
        sh(["zpool", "destroy", "-f", dead], check=False)
        with contextlib.suppress(OSError):
            os.unlink("/tmp/pg_zfs-tests-net-%d.lock" % number)


# The modules make test-guest does not run in the guest although they mention
# the pool, and why.
GUEST_EXEMPT = {
    "test_readme.py": "the demo: the README's story on zfs-fuse, played on the host",
    "test_guest_topology.py": "runs on the host and boots the guest itself",
    "test_archive_cleanup.py": "one set for oldest-wal; the cleanup is the archive hosts' (no ZFS); "
                               "it passed in the guest once, 3.5 min under TCG, CI's budget is 90",
    "test_drill_state.py": "the drill's result file and its quiet under cron; the drill's ZFS steps "
                           "run in the guest with test_restore*",
    "test_signal_at_exit.py": "our own signal handling as the interpreter exits; no ZFS step",
}


def test_every_module_that_uses_the_pool_runs_in_the_guest_too():
    # make test-guest runs GUEST_TESTS on kernel OpenZFS: a new module that
    # uses the pool (tb.zfs, tb.standby, tb.datasets, test_restore's story,
    # hand-made sets) belongs there; btrfs modules and GUEST_EXEMPT do not.
    with open(os.path.join(testbed.REPO, "Makefile")) as handle:
        listed = re.search(r"^GUEST_TESTS \?= (.*)$", handle.read(), re.M).group(1).split()
    tests_dir = os.path.join(testbed.REPO, "tests")
    assert all(os.path.exists(os.path.join(testbed.REPO, path)) for path in listed), listed
    uses_pool = set()
    for name in os.listdir(tests_dir):
        if name.startswith("test_") and name.endswith(".py") and "btrfs" not in name:
            with open(os.path.join(tests_dir, name)) as handle:
                if re.search(r"tb\.zfs|tb\.standby|tb\.datasets|\bstory\b|hand_made_set", handle.read()):
                    uses_pool.add(name)
    assert uses_pool - set(GUEST_EXEMPT) <= set(os.path.basename(path) for path in listed)
    assert "test_openzfs.py" in uses_pool
