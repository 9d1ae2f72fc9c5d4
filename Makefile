# make demo   the whole backup-and-restore story on this one machine (root, Debian 12)
# make test   the test suite against real zfs-fuse, PostgreSQL, sshd and nftables
#             PG=14|15|18 picks the PostgreSQL major version (default 15),
#             TESTS="tests/test_snap.py ..." a part of the suite
# make test-guest  the suite again inside a KVM guest on kernel OpenZFS 2.1 (tools/guest.py:
#             the image is built once, ~3 GB in ~/.cache/pg_zfs-tests), then the article's
#             topology (tests/test_guest_topology.py: the guest started through libvirt)
#             GUEST_TESTS="tests/test_snap.py ..." other modules in the guest (default: those using the pool)
#             (make test-guest-suite and make test-guest-topology: each half alone; the suite
#             needs nothing of the host's testbed, so CI runs it beside the host's legs)
# make install  the four scripts (BINDIR), /etc/pg_zfs/pg_zfs.conf (kept if there),
#             man pages, systemd units (not enabled), README and the cron and
#             rc.local examples (DOCDIR/examples); PREFIX=/usr DESTDIR=... for a package
# make rpm    build/rpm/RPMS/noarch/pg_zfs-VERSION-1.noarch.rpm (rpmbuild; packaging/pg_zfs.spec)
# make deb    build/pg-zfs_VERSION-1_all.deb (dpkg-deb; tools/mkdeb.py)
PYTHON ?= python3
PG ?= 15
PYTEST_ARGS ?=
TESTS ?= tests
# The modules that use the ZFS pool (tests/test_testbed.py keeps this list whole).
GUEST_TESTS ?= tests/test_testbed.py tests/test_snap.py tests/test_snap_signals.py tests/test_openzfs.py tests/test_restore.py tests/test_restore_edges.py tests/test_restore_faults.py tests/test_restore_concurrent.py tests/test_restore_mountpoints.py tests/test_restore_rollback.py tests/test_restore_rollback_edges.py tests/test_restore_signal_steps.py tests/test_replicate.py tests/test_replicate_delegated.py tests/test_setup_guest.py

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
DOCDIR ?= $(PREFIX)/share/doc/pg_zfs
UNITDIR ?= $(PREFIX)/lib/systemd/system
# The scripts read /etc/pg_zfs/pg_zfs.conf whatever the prefix.
CONFDIR = /etc/pg_zfs
# The scripts' first line; the packages name the system Python.
SHEBANG ?= /usr/bin/env python3
BUILD ?= build
VERSION := $(shell sed -n 's/^VERSION = "\(.*\)"$$/\1/p' bin/pg_zfs_snap.py)
SCRIPTS = pg_wal_fetch.py pg_zfs_restore.py pg_zfs_snap.py setup_guest.py
UNITS = pg-zfs-guest.service pg-zfs-snap.service pg-zfs-snap.timer
EXAMPLES = crontab.example rc.local.guest rc.local.host pg_zfs.conf.example
# The path the wiring lines of etc/ name; installed copies name BINDIR.
WIRED_BINDIR = /opt/pg_zfs/bin
DIST = pg_zfs-$(VERSION)
DIST_FILES = Makefile README.md DEVELOPERS.md bin/*.py etc tools/mkman.py tools/mkdeb.py packaging
# rpmbuild on Debian has no rpm database to find BuildRequires in.
RPMBUILD_FLAGS ?= $(if $(wildcard /etc/debian_version),--nodeps)

.PHONY: test test-guest test-guest-suite test-guest-topology guest-deps demo deps build install uninstall dist rpm deb check-version clean

deps:
	PYTHON=$(PYTHON) sh tools/install-deps.sh

test: deps
	PG_ZFS_TEST_PG=$(PG) $(PYTHON) -m pytest $(PYTEST_ARGS) $(TESTS)

guest-deps:
	GUEST=1 PYTHON=$(PYTHON) sh tools/install-deps.sh

test-guest: test-guest-suite test-guest-topology

test-guest-suite: guest-deps
	$(PYTHON) tools/guest.py test -- $(PYTEST_ARGS) $(GUEST_TESTS)

test-guest-topology: guest-deps
	PG_ZFS_TEST_GUEST=1 PG_ZFS_TEST_PG=15 $(PYTHON) -m pytest $(PYTEST_ARGS) tests/test_guest_topology.py

demo: deps
	$(PYTHON) tools/demo.py $(if $(KEEP),--keep,)

# Everything install copies, under $(BUILD)/files: the scripts with SHEBANG, the
# man pages (tools/mkman.py, from the scripts), units and examples naming BINDIR.
build:
	rm -rf $(BUILD)/files
	mkdir -p $(BUILD)/files/bin $(BUILD)/files/systemd $(BUILD)/files/examples
	for script in $(SCRIPTS); do sed '1s|^#!.*|#!$(SHEBANG)|' bin/$$script > $(BUILD)/files/bin/$$script; done
	for unit in $(UNITS); do sed 's|$(WIRED_BINDIR)/|$(BINDIR)/|g' etc/systemd/$$unit > $(BUILD)/files/systemd/$$unit; done
	for example in $(EXAMPLES); do sed 's|$(WIRED_BINDIR)/|$(BINDIR)/|g' etc/$$example > $(BUILD)/files/examples/$$example; done
	$(PYTHON) tools/mkman.py --bindir $(BINDIR) --docdir $(DOCDIR) $(BUILD)/files/man

install: build
	install -d -m 0755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(CONFDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5 \
		$(DESTDIR)$(UNITDIR) $(DESTDIR)$(DOCDIR)/examples
	install -m 0755 $(addprefix $(BUILD)/files/bin/,$(SCRIPTS)) $(DESTDIR)$(BINDIR)/
	install -m 0644 $(BUILD)/files/man/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 0644 $(BUILD)/files/man/*.5 $(DESTDIR)$(MANDIR)/man5/
	install -m 0644 $(addprefix $(BUILD)/files/systemd/,$(UNITS)) $(DESTDIR)$(UNITDIR)/
	install -m 0644 $(addprefix $(BUILD)/files/examples/,$(EXAMPLES)) $(DESTDIR)$(DOCDIR)/examples/
	install -m 0644 README.md DEVELOPERS.md $(DESTDIR)$(DOCDIR)/
	@if [ -e $(DESTDIR)$(CONFDIR)/pg_zfs.conf ]; then \
		echo "install: kept $(DESTDIR)$(CONFDIR)/pg_zfs.conf (the example is $(DOCDIR)/examples/pg_zfs.conf.example)"; \
	else install -m 0644 $(BUILD)/files/examples/pg_zfs.conf.example $(DESTDIR)$(CONFDIR)/pg_zfs.conf; fi

uninstall:
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,$(SCRIPTS)) $(addprefix $(DESTDIR)$(UNITDIR)/,$(UNITS)) \
		$(addprefix $(DESTDIR)$(MANDIR)/man1/,$(addsuffix .1,$(SCRIPTS))) $(DESTDIR)$(MANDIR)/man5/pg_zfs.conf.5
	rm -rf $(DESTDIR)$(DOCDIR)
	@echo "uninstall: $(DESTDIR)$(CONFDIR)/pg_zfs.conf is left in place"

check-version:
	@grep -q '^Version: *$(VERSION)$$' packaging/pg_zfs.spec || \
		{ echo "packaging/pg_zfs.spec: Version is not $(VERSION), the VERSION of bin/*.py"; exit 1; }

# The source tarball rpmbuild builds from (rpmbuild -tb works on it too).
dist: check-version
	rm -rf $(BUILD)/$(DIST) $(BUILD)/$(DIST).tar.gz
	mkdir -p $(BUILD)/$(DIST)
	tar -cf - --exclude=__pycache__ $(DIST_FILES) | tar -C $(BUILD)/$(DIST) -xf -
	tar -C $(BUILD) -czf $(BUILD)/$(DIST).tar.gz $(DIST)
	rm -rf $(BUILD)/$(DIST)

rpm: dist
	rm -rf $(BUILD)/rpm
	rpmbuild -bb $(RPMBUILD_FLAGS) --define "_topdir $(abspath $(BUILD))/rpm" \
		--define "_sourcedir $(abspath $(BUILD))" packaging/pg_zfs.spec

deb: check-version
	rm -rf $(BUILD)/deb
	$(MAKE) install DESTDIR=$(abspath $(BUILD))/deb PREFIX=/usr DOCDIR=/usr/share/doc/pg-zfs SHEBANG=/usr/bin/python3
	$(PYTHON) tools/mkdeb.py --version $(VERSION) $(BUILD)/deb $(BUILD)

clean:
	rm -rf $(BUILD)
