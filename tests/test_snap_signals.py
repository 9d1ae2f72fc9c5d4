"""pg_zfs_snap.py prune and a signal, on the real zfs-fuse pool: the set being
destroyed goes whole, the run stops there (exit 1), the sets not reached stay.

The sets are made by hand (test_restore_rollback.hand_made_set); a `zfs` found
first on PATH announces each destroy and takes a second over it, so that the
signal reliably comes while a set is half destroyed.
"""

import os
import shutil
import signal
import subprocess

from testbed import BIN, PY36, wait_for
from test_restore_rollback import Own, hand_made_set

PREFIX = "prn"


def test_sigterm_during_prune_finishes_the_set_under_way_and_keeps_the_rest(tb):
    own = Own(tb, "prn")
    wrapper_dir = os.path.join(tb.run_dir, "slow_zfs")
    marker = os.path.join(wrapper_dir, "destroying")
    try:
        names = [hand_made_set(tb, own.datasets, "%s_202611%02dT000000Z" % (PREFIX, day)) for day in (1, 2, 3, 4)]
        config = tb.write_config(os.path.join(tb.run_dir, "prn.conf"), sections={
            "postgres": {"pgdata": own.pgdata, "user": "postgres"},
            "snapshot": {"backend": "zfs", "datasets": " ".join(own.datasets), "prefix": PREFIX,
                         "keep_hourly": "0", "keep_daily": "0", "keep_weekly": "0", "keep_monthly": "0",
                         "lock_file": os.path.join(tb.run_dir, "prn.lock"),
                         "state_file": os.path.join(tb.run_dir, "prn.json")}})
        os.mkdir(wrapper_dir)
        with open(os.path.join(wrapper_dir, "zfs"), "w") as out:
            out.write('#!/bin/sh\nif [ "$1" = destroy ]; then touch %s; sleep 1; fi\nexec %s "$@"\n'
                      % (marker, shutil.which("zfs")))
        os.chmod(os.path.join(wrapper_dir, "zfs"), 0o755)
        proc = subprocess.Popen([PY36, os.path.join(BIN, "pg_zfs_snap.py"), "-c", config, "prune"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                env=dict(os.environ, PATH=wrapper_dir + ":" + os.environ["PATH"]))
        try:
            wait_for(lambda: os.path.exists(marker) or proc.poll() is not None, 60, "the first zfs destroy")
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 1, out + err
        assert "stopped by signal %d after set %s" % (signal.SIGTERM, names[0]) in err, err
        assert own.snapshots() == sorted("%s@%s" % (d, n) for d in own.datasets for n in names[1:])
    finally:
        shutil.rmtree(wrapper_dir, ignore_errors=True)
        own.remove()
