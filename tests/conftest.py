"""pytest wiring for the testbed (see DEVELOPERS.md and tests/testbed.py)."""

import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import testbed  # noqa: E402


def pytest_report_header(config):
    return "pg_zfs testbed: ZFS = %s; scripts run under %s" % (testbed.zfs_description(), testbed.python_description())


def pytest_collection_modifyitems(config, items):
    # make test-guest runs the ZFS modules on kernel OpenZFS; a test marked
    # host_only proves something that is not ZFS's (a recovery target, the
    # archive, fetch, our own signal handling, virsh) on a set as every other
    # test makes it, and runs on the host only.
    if not testbed.kernel_zfs():
        return
    skip = pytest.mark.skip(reason="not ZFS's subject: on the host only (make test-guest: CI's 90 minutes)")
    for item in items:
        if item.get_closest_marker("host_only"):
            item.add_marker(skip)


def pytest_configure(config):
    """Started in the background by a non-interactive shell (`make test &`, nohup),
    pytest inherits SIGINT ignored, and so would every script a test starts: the
    scripts leave an ignored SIGINT ignored, as a shell does, and each test of
    Ctrl-C at a terminal then fails (seen here: 8 of them in one run). A
    terminal's process has SIGINT at its default: give pytest's back."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser):
    parser.addoption("--pg", default=None,
                     help="PostgreSQL major version to test against: 14, 15 (default) or 18; "
                          "or set PG_ZFS_TEST_PG")


@pytest.fixture(autouse=True)
def stop_signal_handlers():
    """A test that runs a script's main() in pytest's process installs its SIGTERM,
    SIGHUP and SIGINT handlers, settled once main() returns: Ctrl-C (or CI's
    SIGTERM) would then be noted and ignored for the rest of the run. Put back."""
    stops = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    before = [signal.getsignal(signum) for signum in stops]
    yield
    for signum, handler in zip(stops, before):
        signal.signal(signum, handler)


@pytest.fixture(scope="session")
def pg_version(request):
    return request.config.getoption("--pg") or os.environ.get("PG_ZFS_TEST_PG") or "15"


@pytest.fixture(scope="session")
def tb(pg_version):
    if os.geteuid() != 0:
        pytest.fail("the testbed needs root (zfs, mount, nft, runuser)")
    # the product's default state paths: a test whose config forgot to name its own
    # (state_file, spool_dir, wal_root) would write on this machine's
    defaults = ["/var/lib/pg_zfs/last-snapshot.json", "/var/lib/pg_zfs/spool", "/var/lib/pg_zfs/restore-wal"]
    before = [path for path in defaults if os.path.exists(path)]
    bed = testbed.Testbed(pg_version)
    try:
        yield bed
    finally:
        bed.teardown()
        made = [path for path in defaults if os.path.exists(path) and path not in before]
        assert made == [], "tests wrote the product's default paths (give their config its own): %s" % made


@pytest.fixture
def run_script():
    return testbed.run_script
