"""README.md cannot rot: `make demo` plays the story, and every command the
README shows is one the demo (or this module) ran successfully."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from testbed import PY36, REPO, unused_daemons

README = os.path.join(REPO, "README.md")
SCRIPTS = ("pg_wal_fetch.py", "pg_zfs_snap.py", "pg_zfs_restore.py", "setup_guest.py")
SUBCOMMANDS = {"list", "snapshot", "prune", "check", "oldest-wal", "restore", "drill",
               "cleanup", "rollback"}
# Commands whose refusal is the point the README makes (exit code expected).
EXPECTED_EXIT = {("pg_zfs_restore.py", "rollback", "--set"): 1}


def readme_commands():
    """Every `$ command` line in README.md's indented code blocks."""
    commands = []
    for line in open(README):
        match = re.match(r"^    \$ (.+)$", line.rstrip("\n"))
        if match:
            commands.append(match.group(1))
    return commands


def shape(command):
    """(script, flags and subcommands...) of a command line; None if not ours."""
    words = shlex.split(command)
    for index, word in enumerate(words):
        if os.path.basename(word) in SCRIPTS:
            rest = words[index + 1:]
            kept = [w.split("=")[0] for w in rest if w.startswith("-") or w in SUBCOMMANDS]
            return (os.path.basename(word),) + tuple(w for w in kept if w not in ("-c",))
    return None


def demo_runs(output):
    """{shape: exit code} of every script command the demo printed it ran."""
    runs = {}
    for line in output.splitlines():
        match = re.match(r"^\s+\$ (\S+\.py .*?)\s+\[exit (\d+), ", line)
        if match:
            runs[shape(match.group(1))] = int(match.group(2))
    return runs


@pytest.fixture(scope="module")
def demo():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "demo.py")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=900, cwd=REPO)
    return proc


def test_demo_runs_the_whole_story_and_ends_with_ok(demo):
    lines = demo.stdout.strip().splitlines()
    assert demo.returncode == 0, demo.stdout[-4000:]
    assert lines[-1].startswith("demo: OK in ")
    assert "rows written after the target in the copy: 0 (rightly none)" in demo.stdout
    assert "SETUP_GUEST OK" in demo.stdout
    assert "OK: drill of set" in demo.stdout


def test_every_script_command_in_the_readme_was_run_by_the_demo(demo):
    runs = demo_runs(demo.stdout)
    missing = []
    for command in readme_commands():
        wanted = shape(command)
        if wanted is None:
            continue
        script, words = wanted[0], set(wanted[1:])
        matches = [(ran, code) for ran, code in runs.items()
                   if ran[0] == script and words <= set(ran[1:])]
        if not matches:
            missing.append(command)
            continue
        expected = EXPECTED_EXIT.get(wanted, 0)
        assert any(code == expected for _, code in matches), (command, matches)
    assert not missing, "README commands the demo never ran: %s" % missing


def test_the_readme_install_commands_copy_a_working_bundle(tmp_path):
    """The README's mkdir/cp lines, run from a clone with / moved to tmp_path."""
    root = str(tmp_path)
    for command in readme_commands():
        if shape(command) is not None:
            continue
        moved = command.replace(" /opt/", " %s/opt/" % root).replace(" /etc/pg_zfs",
                                                                     " %s/etc/pg_zfs" % root)
        proc = subprocess.run(["sh", "-c", moved], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        assert proc.returncode == 0, (command, proc.stderr)
    for script in SCRIPTS:
        proc = subprocess.run([PY36, os.path.join(root, "opt", "pg_zfs", "bin", script), "--help"],
                              stdout=subprocess.PIPE, universal_newlines=True, timeout=30)
        assert proc.returncode == 0
    assert os.path.exists(os.path.join(root, "etc", "pg_zfs", "pg_zfs.conf"))


def test_readme_shows_exactly_the_two_setup_commands():
    text = open(README).read()
    assert re.findall(r"^    (make \w+)$", text, re.M) == ["make demo", "make test"]
    assert "make test" in open(os.path.join(REPO, ".ci", "run")).read()


def test_demo_keep_leaves_it_running_and_its_remove_line_removes_everything():
    demo_py = os.path.join(REPO, "tools", "demo.py")
    proc = subprocess.run([sys.executable, demo_py, "--keep"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=900)
    remove = [line.split("remove it all: ", 1)[1] for line in proc.stdout.splitlines()
              if "remove it all: " in line]
    assert proc.returncode == 0 and remove, proc.stdout[-3000:]
    run_dir = shlex.split(remove[0])[-1]
    try:
        standby = [line for line in proc.stdout.splitlines() if line.strip().startswith("standby: psql")]
        words = shlex.split(standby[0].split("standby: ", 1)[1])
        rows = subprocess.run(["runuser", "-u", "postgres", "--"] + words + ["-Atc",
                              "SELECT count(*) > 0 FROM demo"], stdout=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
        assert rows.stdout.strip() == "t"
    finally:
        removed = subprocess.run(shlex.split(remove[0]), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert removed.returncode == 0, removed.stdout
    assert not os.path.exists(run_dir)
    assert run_dir not in open("/proc/mounts").read()
    net = int(os.path.basename(run_dir).split("-")[2])
    pools = subprocess.run(["zpool", "list", "-H", "-o", "name"], stdout=subprocess.PIPE,
                           universal_newlines=True, timeout=60).stdout.split()
    assert [pool for pool in pools if pool in ("pgzfs_t%d" % net, "pgzfs_r%d" % net)] == []   # the replica's too
    # zfs-fuse, started by the kept demo (whose process is gone) when none ran:
    # stopped by --remove once no pool is left in it (it was left running).
    assert unused_daemons() == []
