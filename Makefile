# make demo   the whole backup-and-restore story on this one machine (root, Debian 12)
# make test   the test suite against real zfs-fuse, PostgreSQL, sshd and nftables
#             PG=14|15|18 picks the PostgreSQL major version (default 15),
#             TESTS="tests/test_snap.py ..." a part of the suite
PYTHON ?= python3
PG ?= 15
PYTEST_ARGS ?=
TESTS ?= tests

.PHONY: test demo deps

deps:
	PYTHON=$(PYTHON) sh tools/install-deps.sh

test: deps
	PG_ZFS_TEST_PG=$(PG) $(PYTHON) -m pytest $(PYTEST_ARGS) $(TESTS)

demo: deps
	$(PYTHON) tools/demo.py $(if $(KEEP),--keep,)
