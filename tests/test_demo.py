"""make demo plays the whole story and says so on its last line."""

import os
import subprocess
import sys

from testbed import REPO


def test_demo_runs_the_whole_story_and_ends_with_ok():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "demo.py")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=900, cwd=REPO)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert lines[-1].startswith("demo: OK in ")
    assert "rows written after the target in the copy: 0 (rightly none)" in proc.stdout
    assert "SETUP_GUEST OK" in proc.stdout
    assert "OK: drill of set" in proc.stdout
