"""Two drills (or restores) of the same set started together, as an Icinga check
and the weekly cron drill can be: one of them runs, the other fails in one line,
and neither destroys what the other made. When both pass the "clone exists
already" check, the second `zfs clone` fails with "dataset already exists": the
clone is the other's, never destroyed (test_restore_unit.py has that decision;
here, that this pool's zfs says so).
"""

import os
import re
import subprocess

from testbed import BIN, PY36, kernel_zfs
from test_restore import our_clones, restore_script, story  # noqa: F401
from test_restore_faults import nothing_left


def test_two_drills_of_the_same_set_started_together_one_passes_and_nothing_of_it_is_destroyed(story):
    # Three tries on the host; one in make test-guest, where a pair of drills
    # takes 40 s under TCG (CI's 90 minutes).
    for attempt in range(1 if kernel_zfs() else 3):
        procs = [subprocess.Popen([PY36, os.path.join(BIN, "pg_zfs_restore.py"), "-c", story.config, "drill"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
                 for _ in range(2)]
        results = [proc.communicate(timeout=300) for proc in procs]
        codes = sorted(proc.returncode for proc in procs)
        outs = [out + err for out, err in results]
        assert codes in ([0, 0], [0, 2]), (attempt, outs)
        for proc, (out, err) in zip(procs, results):
            assert "Traceback" not in err
            assert len(out.strip().splitlines()) == 1, out
        assert nothing_left(story) == [] and our_clones(story.tb) == [], (attempt, outs)


def test_this_pools_zfs_says_already_exists_for_a_clone_made_a_moment_before(story):
    tb = story.tb
    snapshot = "%s@%s" % (tb.datasets[0], story.sets[1])
    clone = "%s_race_%s" % (tb.datasets[0], story.sets[1])
    tb.zfs.run("clone", snapshot, clone)
    try:
        proc = subprocess.run(["zfs", "clone", snapshot, clone], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True)
        assert proc.returncode != 0 and "already exists" in proc.stderr, proc.stderr
    finally:
        tb.zfs.destroy(clone)


def test_the_cleanup_a_failed_drill_advises_leaves_a_restored_copy_of_the_same_set_alone(story):
    """A drill's CRITICAL line goes to whoever is on call; the command it names must
    remove the drill's clones only, not a PITR copy someone restored from that set."""
    tb = story.tb
    newest = story.sets[1]
    restore = restore_script(story.config, "restore", "--immediate", "--set", newest, "--no-start")
    assert restore.returncode == 0, restore.stdout + restore.stderr
    kept = sorted(clone for clone in our_clones(tb) if "_restore_" in clone)
    stale = "%s_drill_%s" % (tb.datasets[0], newest)     # what a drill killed by -9 leaves
    tb.zfs.run("clone", "-o", "pgzfs:clone_of=%s" % newest, "%s@%s" % (tb.datasets[0], newest), stale)
    try:
        drill = restore_script(story.config, "drill")
        assert drill.returncode == 2, drill.stdout + drill.stderr
        advised = re.search(r"remove it with `pg_zfs_restore\.py (cleanup \S+)`", drill.stdout)
        assert advised, drill.stdout
        assert restore_script(story.config, *advised.group(1).split()).returncode == 0
        assert stale not in our_clones(tb)
        assert sorted(clone for clone in our_clones(tb) if "_restore_" in clone) == kept
    finally:
        assert restore_script(story.config, "cleanup", "--all").returncode == 0
    assert nothing_left(story) == []
