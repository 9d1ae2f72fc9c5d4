"""setup_guest.py's decisions, without a system: role, mounts, lines, settings, verdicts."""

import os

import pytest

from testbed import BIN, load_script

ETC = os.path.join(os.path.dirname(BIN), "etc")


@pytest.fixture(scope="module")
def sg():
    return load_script("setup_guest")


# -- the role ----------------------------------------------------------------

def test_role_comes_from_the_only_section_present(sg):
    assert sg.choose_role(True, False) == "host"
    assert sg.choose_role(False, True) == "guest"


def test_role_override_wins_over_the_sections(sg):
    assert sg.choose_role(True, True, "guest") == "guest"
    assert sg.choose_role(False, True, "host") == "host"


def test_both_sections_without_role_is_a_config_error_that_says_what_to_do(sg):
    with pytest.raises(sg.Failure) as caught:
        sg.choose_role(True, True)
    assert caught.value.code == 2
    assert "--role" in str(caught.value)


def test_neither_section_is_a_config_error(sg):
    with pytest.raises(sg.Failure) as caught:
        sg.choose_role(False, False)
    assert caught.value.code == 2


# -- copy-on-write file systems --------------------------------------------------

MOUNTS = """\
overlay / overlay rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
tpool /tmp/run/mnt fuse.zfs rw,relatime 0 0
tpool/data02 /tmp/run/mnt/data02 fuse.zfs rw,relatime 0 0
zp1/data01 /zp1/data01 zfs rw,xattr 0 0
/dev/loop0 /tmp/run/bt btrfs rw 0 0
/dev/sdb1 /tmp/run/mnt/data02/plain ext4 rw 0 0
/dev/sdc1 /srv/my\\040disk ext4 rw 0 0
"""


def test_longest_mountpoint_holds_the_path(sg):
    mounts = sg.parse_mounts(MOUNTS)
    assert sg.filesystem_of("/tmp/run/mnt/data02/pgdata", mounts)[0] == "tpool/data02"
    assert sg.filesystem_of("/tmp/run/mnt/data02/plain/wal", mounts)[2] == "ext4"
    assert sg.filesystem_of("/tmp/run/mnt/data02x", mounts)[0] == "tpool"
    assert sg.filesystem_of("/var/lib", mounts)[1] == "/"


def test_mount_table_escapes_are_decoded(sg):
    mounts = sg.parse_mounts(MOUNTS)
    assert sg.filesystem_of("/srv/my disk/wal", mounts)[1] == "/srv/my disk"


def test_zfs_zfs_fuse_and_btrfs_are_cow_ext4_and_tmpfs_are_not(sg):
    assert sg.is_cow("zfs") and sg.is_cow("fuse.zfs") and sg.is_cow("btrfs")
    assert not sg.is_cow("ext4") and not sg.is_cow("tmpfs") and not sg.is_cow("overlay")


def test_cow_verdict_names_the_path_its_target_and_the_dataset(sg):
    mounts = sg.parse_mounts(MOUNTS)
    verdict = sg.cow_verdict("/pg/pg_wal", "/tmp/run/mnt/data02/wal", mounts)
    assert "/pg/pg_wal (-> /tmp/run/mnt/data02/wal)" in verdict
    assert "fuse.zfs" in verdict and "tpool/data02" in verdict
    assert "btrfs" in sg.cow_verdict("/tmp/run/bt/x", "/tmp/run/bt/x", mounts)


def test_wal_off_cow_has_no_verdict(sg):
    mounts = sg.parse_mounts(MOUNTS)
    assert sg.cow_verdict("/pg/pg_wal", "/tmp/standby_wal", mounts) is None
    assert sg.cow_verdict("/x", "/tmp/run/mnt/data02/plain/wal", mounts) is None


def test_a_btrfs_subvolume_is_created_only_below_a_directory_on_btrfs(sg):
    mounts = sg.parse_mounts(MOUNTS)
    assert sg.btrfs_parent_problem("/tmp/run/bt/sg/data01", "/tmp/run/bt/sg", mounts) is None
    assert "/tmp/run/bt/nope does not exist" in sg.btrfs_parent_problem("/tmp/run/bt/nope/data01", None, mounts)
    assert "/srv/my disk is on ext4, not btrfs" in sg.btrfs_parent_problem("/srv/my disk/data01", "/srv/my disk",
                                                                           mounts)


# -- lines in crontab and rc.local ---------------------------------------------------

LINE = "/opt/pg_zfs/bin/setup_guest.py -c /etc/pg_zfs/pg_zfs.conf --role guest --start"
MARKERS = ["setup_guest.py", "--start"]


def test_a_line_is_added_once_however_often_it_is_merged(sg):
    text, changed = sg.merge_line(sg.RC_LOCAL_HEADER, LINE, MARKERS)
    assert changed and text.startswith("#!/bin/sh\n") and text.endswith(LINE + "\n")
    again, changed_again = sg.merge_line(text, LINE, MARKERS)
    assert not changed_again and again == text


def test_a_line_goes_before_the_final_exit_0_of_an_rc_local(sg):
    debian = "#!/bin/sh -e\n# rc.local\n\nexit 0\n"
    text, changed = sg.merge_line(debian, LINE, MARKERS)
    assert changed
    assert text.splitlines()[-2:] == [LINE, "exit 0"]


def test_a_commented_out_line_does_not_count_as_installed(sg):
    text, changed = sg.merge_line("#!/bin/sh\n# " + LINE + "\n", LINE, MARKERS)
    assert changed and text.count(LINE) == 2


def test_an_edited_line_with_the_markers_is_kept_not_repeated(sg):
    edited = "#!/bin/sh\n/usr/local/pg_zfs/setup_guest.py --role guest --start -v\n"
    assert sg.merge_line(edited, LINE, MARKERS) == (edited, False)


def test_cron_line_names_root_and_quotes_paths(sg):
    line = sg.cron_line("1 4 * * *", "/opt/pg zfs/pg_zfs_snap.py", "/etc/pg_zfs/pg_zfs.conf")
    assert line == "1 4 * * * root '/opt/pg zfs/pg_zfs_snap.py' -c /etc/pg_zfs/pg_zfs.conf"
    with pytest.raises(sg.Failure):
        sg.cron_line("daily", "/x", "/y")


def test_crontab_example_has_the_line_install_writes(sg):
    example = open(os.path.join(ETC, "crontab.example")).read()
    line = sg.cron_line(sg.DEFAULT_CRON_SCHEDULE, "/opt/pg_zfs/bin/pg_zfs_snap.py", sg.DEFAULT_CONFIG)
    assert line in example.splitlines()


def test_rc_local_examples_have_the_lines_install_writes(sg):
    for role in ("host", "guest"):
        example = open(os.path.join(ETC, "rc.local." + role)).read()
        line = sg.start_line("/opt/pg_zfs/bin/setup_guest.py", sg.DEFAULT_CONFIG, role)
        assert line in example.splitlines()
        assert example.startswith("#!/bin/sh\n")


def test_units_are_rendered_with_the_real_paths(sg):
    for unit, _ in sg.UNITS:
        source = open(os.path.join(ETC, "systemd", unit)).read()
        assert source.startswith("# Goes in /etc/systemd/system/")
        text = sg.render_unit(source, "/srv/pgz/bin", "/srv/pgz/conf")
        assert "/opt/pg_zfs" not in text and sg.DEFAULT_CONFIG not in text
        if "ExecStart" in text:
            assert "ExecStart=/srv/pgz/bin/" in text and "-c /srv/pgz/conf" in text


# -- PostgreSQL settings ---------------------------------------------------------------

AUTO_CONF = """\
# Do not edit this file manually!
port = 5433
primary_conninfo = 'user=postgres passfile=''/var/lib/postgresql/.pgpass'' host=/tmp/s port=5432'
"""


def test_settings_read_like_postgresql_reads_them(sg):
    settings = sg.parse_settings(AUTO_CONF + "port = 5434  # later wins\n")
    assert settings["port"] == "5434"
    assert settings["primary_conninfo"] == \
        "user=postgres passfile='/var/lib/postgresql/.pgpass' host=/tmp/s port=5432"


def test_merging_settings_replaces_changed_keys_and_appends_new_ones(sg):
    wanted = {"port": "5433", "primary_conninfo": "host=h port=1 user=replica",
              "restore_command": "/b/pg_wal_fetch.py -c /c %f %p"}
    text, changed = sg.merge_settings(AUTO_CONF, wanted)
    assert changed == ["primary_conninfo", "restore_command"]
    assert text.count("primary_conninfo") == 1
    assert sg.parse_settings(text) == wanted
    assert sg.merge_settings(text, wanted) == (text, [])


def test_quotes_in_values_survive_a_round_trip(sg):
    wanted = {"primary_conninfo": "host=h password='it''s' user=o'brien"}
    text, _ = sg.merge_settings("", wanted)
    assert sg.parse_settings(text) == wanted


def test_recovery_settings_go_where_the_version_reads_them(sg, tmp_path):
    config = tmp_path / "c.conf"
    config.write_text("[postgres]\npgdata = /d/pgdata\nhost = /run/pg\nport = 1921\n"
                      "[snapshot]\ndatasets = zp1/data02\n"
                      "[guest]\nprimary_conninfo = host=h\nwaldir = /w\n")
    guest = sg.Guest(sg.Config.load(str(config)))
    new = sg.standby_settings(guest, (15,), "/etc/c.conf")
    assert sorted(new) == ["postgresql.auto.conf"]
    assert new["postgresql.auto.conf"]["primary_conninfo"] == "host=h"
    assert new["postgresql.auto.conf"]["unix_socket_directories"] == "/run/pg"
    assert new["postgresql.auto.conf"]["restore_command"].endswith("pg_wal_fetch.py -c /etc/c.conf %f %p")
    old = sg.standby_settings(guest, (11,), "/etc/c.conf")
    assert old["recovery.conf"]["standby_mode"] == "on"
    assert "restore_command" in old["recovery.conf"]
    assert "restore_command" not in old["postgresql.auto.conf"]


def test_restore_command_quotes_paths_for_the_shell(sg):
    assert sg.restore_command("/a b/pg_wal_fetch.py", "/c.conf", "#!/usr/bin/env python3") == \
        "/usr/bin/env python3 -S '/a b/pg_wal_fetch.py' -c /c.conf %f %p"
    # A script it cannot read (or not a python one) runs by itself, as before.
    assert sg.restore_command("/a b/none.py", "/c.conf") == "'/a b/none.py' -c /c.conf %f %p"


@pytest.mark.parametrize("first_line, words", [
    ("#!/usr/bin/env python3", ["/usr/bin/env", "python3", "-S", "/s.py"]),
    ("#!/usr/bin/python3", ["/usr/bin/python3", "-S", "/s.py"]),
    ("#! /usr/libexec/platform-python -s", ["/usr/libexec/platform-python", "-s", "-S", "/s.py"]),
    ("#!/opt/py/bin/python3.6", ["/opt/py/bin/python3.6", "-S", "/s.py"]),
    ("#!/bin/sh", ["/s.py"]),
    ("import os", ["/s.py"]),
    ("", ["/s.py"])])
def test_restore_command_runs_the_scripts_own_python_with_minus_S(sg, first_line, words):
    assert sg.script_words("/s.py", first_line) == words


def test_versions_pick_options_and_names(sg):
    assert sg.parse_pg_version("pg_basebackup (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)") == (15,)
    assert sg.parse_pg_version("pg_basebackup (PostgreSQL) 9.6.24") == (9, 6)
    assert sg.parse_pg_version("18\n") == (18,)
    assert sg.waldir_option((15,)) == "--waldir" and sg.waldir_option((9, 6)) == "--xlogdir"
    assert sg.wal_dir_name((9, 6)) == "pg_xlog" and sg.wal_dir_name((10,)) == "pg_wal"
    assert sg.recovery_settings_file((11,)) == "recovery.conf"
    assert sg.recovery_settings_file((12,)) == "postgresql.auto.conf"


def test_data_directory_is_classified_from_its_file_names(sg):
    assert sg.classify_pgdata(None) == "missing"
    assert sg.classify_pgdata([]) == "empty"
    assert sg.classify_pgdata(["lost+found"]) == "empty"
    assert sg.classify_pgdata(["PG_VERSION", "base", "standby.signal"]) == "standby"
    assert sg.classify_pgdata(["PG_VERSION", "base", "recovery.conf"]) == "standby"
    assert sg.classify_pgdata(["PG_VERSION", "base"]) == "cluster"
    assert sg.classify_pgdata(["notes.txt"]) == "other"


def test_bad_dataset_properties_and_tablespace_mappings_are_refused(sg):
    assert sg.parse_properties("compression=lz4 recordsize=8K") == [("compression", "lz4"), ("recordsize", "8K")]
    with pytest.raises(sg.Failure):
        sg.parse_properties("compression")
    assert sg.parse_tablespace_mapping("/a=/b") == [("/a", "/b")]
    with pytest.raises(sg.Failure):
        sg.parse_tablespace_mapping("a=/b")


# -- ssh ---------------------------------------------------------------------------

def test_ssh_options_are_read_in_all_three_spellings(sg):
    options = sg.parse_ssh_options("-o HostKeyAlias=archive25 -oConnectTimeout=2 -o 'UserKnownHostsFile /k h' -v")
    assert options == {"hostkeyalias": "archive25", "connecttimeout": "2", "userknownhostsfile": "/k h"}


def test_scanned_keys_are_recorded_under_the_alias_once(sg):
    scanned = "# 127.0.0.2:2222 SSH-2.0-OpenSSH_9.2\n[127.0.0.2]:2222 ssh-ed25519 AAAAkey1\n"
    records = sg.known_hosts_records(scanned, "archive25")
    assert records == ["archive25 ssh-ed25519 AAAAkey1"]
    text, added, conflicts = sg.merge_known_hosts("other ssh-rsa AAAAx", records)
    assert added == records and not conflicts
    assert text == "other ssh-rsa AAAAx\narchive25 ssh-ed25519 AAAAkey1\n"
    assert sg.merge_known_hosts(text, records) == (text, [], [])


def test_a_changed_host_key_is_a_conflict_and_never_replaced(sg):
    text = "archive25 ssh-ed25519 AAAAold\n"
    new_text, added, conflicts = sg.merge_known_hosts(text, ["archive25 ssh-ed25519 AAAAnew"])
    assert new_text == text and added == [] and conflicts == ["archive25 ssh-ed25519 AAAAnew"]


# -- host ------------------------------------------------------------------------------

def test_domain_state_decides_the_host_action(sg):
    assert sg.parse_domstate("shut off\n\n") == "shut off"
    assert sg.host_action("running") == "none"
    assert sg.host_action("shut off") == "start"
    assert sg.host_action("crashed") == "start"
    assert sg.host_action("paused") == "resume"
    assert sg.host_action("in shutdown") == "refuse"


# -- the doctor ---------------------------------------------------------------------------

def test_clock_tools_are_read(sg):
    assert sg.clock_from_chrony("Reference ID    : A9FEA97B\nLeap status     : Normal\n") is True
    assert sg.clock_from_chrony("Leap status     : Not synchronised\n") is False
    assert sg.clock_from_chrony("506 Cannot talk to daemon\n") is None
    assert sg.clock_from_ntpq(" remote refid\n*192.0.2.1 .GPS.\n") is True
    assert sg.clock_from_ntpq(" remote refid\n 192.0.2.1 .INIT.\n") is False
    assert sg.clock_from_timedatectl("yes\n") is True
    assert sg.clock_from_timedatectl("no\n") is False
    assert sg.clock_from_timedatectl("") is None


def test_archive_source_lines_name_the_failing_source(sg):
    output = ("host1 127.0.0.2:2222 OK (12 ms)\n"
              "host2 127.0.0.3:2222 unreachable: connection timed out\n")
    verdicts = sg.source_verdicts(output, ["host1", "host2", "host3"])
    assert verdicts["host1"][0] is True
    assert verdicts["host2"] == (False, "host2 127.0.0.3:2222 unreachable: connection timed out")
    assert "host3" not in verdicts


def test_pg_wal_fetch_check_lines_are_read(sg):
    output = ("host1 (root@127.0.0.2:2222): reachable, /a/* 2 dirs, newest WAL file 000000010000000000000003, "
              "round trip 40 ms\n"
              "host2 (root@127.0.0.3:2222): unreachable (probe = tcp)\n"
              "host3 (root@127.0.0.4:2222): reachable, listing /a/* failed: permission denied\n")
    verdicts = sg.source_verdicts(output, ["host1", "host2", "host3"])
    assert [verdicts[name][0] for name in ("host1", "host2", "host3")] == [True, False, False]


def test_a_source_name_inside_another_word_is_not_a_match(sg):
    assert sg.source_verdicts("host10 failed\n", ["host1"]) == {}


def test_nagios_codes_map_to_statuses_and_unknown_is_a_warning(sg):
    assert [sg.nagios_status(code) for code in (0, 1, 2, 3)] == ["OK", "WARNING", "CRITICAL", "WARNING"]


def test_the_worst_check_decides_and_the_summary_names_the_faults_worst_first(sg):
    checks = [("config", "OK", "readable"), ("clock", "WARNING", "not synchronised (chronyc)"),
              ("pg_wal", "CRITICAL", "/w is on zfs"), ("wal receiver", "SKIPPED", "PostgreSQL does not answer")]
    status, code, line = sg.aggregate(checks)
    assert (status, code) == ("CRITICAL", 2)
    assert line == "SETUP_GUEST CRITICAL - pg_wal: /w is on zfs; clock: not synchronised (chronyc)"


def test_all_ok_counts_the_checks_and_skipped_ones_do_not_count(sg):
    status, code, line = sg.aggregate([("a", "OK", ""), ("b", "OK", ""), ("c", "SKIPPED", "")])
    assert (status, code, line) == ("OK", 0, "SETUP_GUEST OK - 2 checks passed")


def test_is_under_respects_path_boundaries(sg):
    assert sg.is_under("/a/b", "/a") and sg.is_under("/a", "/a/") and sg.is_under("/x", "/")
    assert not sg.is_under("/ab", "/a")


def test_an_archive_source_without_user_is_the_local_postgres_user_as_pg_wal_fetch_reads_it(sg, tmp_path):
    # pg_wal_fetch.py leaves ssh's default (the user it runs as); --install must
    # name the same account on the archive host, not root.
    config = tmp_path / "c.conf"
    config.write_text("[postgres]\npgdata = /d/pgdata\nuser = pgsql\n[snapshot]\ndatasets = zp1/data02\n"
                      "[guest]\nprimary_conninfo = host=h\nwaldir = /w\n[archive]\nsources = a b\n"
                      "[source a]\nhost = 10.0.0.1\npath = /arch/*\n"
                      "[source b]\nhost = 10.0.0.2\nuser = archiver\npath = /arch/*\n")
    guest = sg.Guest(sg.Config.load(str(config)))
    assert [source["user"] for source in guest.sources] == ["pgsql", "archiver"]


# -- the replica's key: only a line restricted to pg_zfs_receive is installed --------

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGuestGuestGuestGuestGuestGuestGuestGues root@guest pg_zfs"


@pytest.mark.parametrize("line, found", [
    ('restrict,from="10.0.0.5",command="/usr/local/bin/pg_zfs_receive bk/g1" ' + KEY,
     ("/usr/local/bin/pg_zfs_receive", "bk/g1")),
    ('restrict,from="10.0.0.5,10.0.0.6",command="\'/opt/pg zfs/pg_zfs_receive\' bk/g1" ' + KEY,
     ("/opt/pg zfs/pg_zfs_receive", "bk/g1")),
    (KEY, None),                                                                         # bare: any command
    ('from="10.0.0.5",command="/usr/local/bin/pg_zfs_receive bk/g1" ' + KEY, None),     # no restrict
    ('restrict,command="/usr/local/bin/pg_zfs_receive bk/g1" ' + KEY, None),            # from anywhere
    ('restrict,from="10.0.0.5" ' + KEY, None),                                          # no forced command
    ('restrict,from="10.0.0.5",command="/bin/sh -c id" ' + KEY, None),
    ('restrict,from="10.0.0.5",command="/usr/local/bin/pg_wal_serve \'/arch/*\'" ' + KEY, None),
    ('restrict,from="10.0.0.5",command="pg_zfs_receive bk/g1" ' + KEY, None),           # PATH decides
    ('restrict,from="10.0.0.5",command="/usr/local/bin/../bin/pg_zfs_receive bk/g1" ' + KEY, None),
    ('restrict,from="10.0.0.5",command="/usr/local/bin/pg_zfs_receive" ' + KEY, None),  # no parent
    ('restrict,from="10.0.0.5",command="/usr/local/bin/pg_zfs_receive bk/g1 bk" ' + KEY, None),
    ('restrict,from="10.0.0.5",command="/usr/local/bin/pg_zfs_receive bk/g1;id" ' + KEY, None),
    ('restrict,from="10.0.0.5",command="/usr/local/bin/pg_zfs_receive bk/../etc" ' + KEY, None),
    # a btrfs replica's parent: an absolute, normalised directory without dot components
    ('restrict,from="10.0.0.5",command="/usr/local/bin/pg_zfs_receive /srv/bk" ' + KEY,
     ("/usr/local/bin/pg_zfs_receive", "/srv/bk")),
    ('restrict,from="10.0.0.5",command="/usr/local/bin/pg_zfs_receive /srv/../etc" ' + KEY, None),
    ('restrict,from="10.0.0.5",command="/usr/local/bin/pg_zfs_receive /srv/.pgzfs" ' + KEY, None),
    ('restrict,from="10.0.0.5",command="/usr/local/bin/pg_zfs_receive /srv/bk/" ' + KEY, None),
    # the shell would run /x first: the words must be written as the shell reads them
    ('restrict,from="10.0.0.5",command="/x;id/pg_zfs_receive bk/g1" ' + KEY, None),
    ('restrict,from="10.0.0.5",command="/usr/local/bin/pg_zfs_receive \'bk/g1\'" ' + KEY, None),
    ('restrict,from="10.0.0.5",command="/usr/local/bin/pg_zfs_receive bk/g1",command="/bin/sh" ' + KEY, None),
])
def test_only_a_line_restricting_the_key_to_pg_zfs_receive_below_one_parent_is_a_replicas(sg, line, found):
    assert sg.restricted_receiver(line) == found


def test_the_line_pg_zfs_snap_writes_is_one_a_replica_takes(sg):
    snap = load_script("pg_zfs_snap")
    for path, parent in ((snap.RECEIVER_PATH, "bk/centos6_6_x64"), ("/opt/pg zfs/pg_zfs_receive", "tank/a.b:c-d"),
                         (snap.RECEIVER_PATH, "/srv/replica/centos6_6_x64")):
        line = snap.receiver_keys_line(KEY, "192.168.122.10", parent, path)
        assert sg.restricted_receiver(line) == (path, parent)
    assert (sg.RECEIVER, sg.RECEIVER_PATH) == (snap.RECEIVER, snap.RECEIVER_PATH)
