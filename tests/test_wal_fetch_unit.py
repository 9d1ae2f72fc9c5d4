"""pg_wal_fetch.py: its pure decisions and file checks, on real segments of the testbed.

No network here; the segments come from the testbed primary's archive.
"""

import bz2
import fcntl
import gzip
import lzma
import os
import pwd
import shlex
import struct
import subprocess
import sys

import pytest

from testbed import load_script

fetch = load_script("pg_wal_fetch")

SEG = 16 * 1024 * 1024


# ---------------------------------------------------------------------------
# WAL names
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, kind", [
    ("000000010000000000000001", "segment"),
    ("0000000A0000001F000000FE", "segment"),
    ("000000010000000000000FFF", "segment"),              # possible with 1 MiB segments
    ("00000002.history", "history"),
    ("0000001F.history", "history"),
    ("000000010000000000000001.00000028.backup", "backup"),
    ("000000010000000000000001.partial", "partial"),
])
def test_names_postgresql_asks_for_are_accepted(name, kind):
    assert fetch.wal_kind(name) == kind


@pytest.mark.parametrize("name", [
    "", "../x", ";rm -rf /", "$(id)", "-c", "/tmp/000000010000000000000001",
    "pg_wal/000000010000000000000001",
    "0000000100000000000000011",                 # 25 digits
    "00000001000000000000001",                   # 23 digits
    "00000001000000000000000a",                  # lower case
    "00000001000000000000001G",
    "000000000000000000000001",                  # timeline 0
    "000000010000000000001000",                  # no log id holds 4096+ segments
    "00000000.history", "0000000G.history", "00000002.HISTORY", "2.history",
    "000000010000000000000001.backup",           # no start offset
    "000000010000000000000001.0000002G.backup",
    "000000010000000000000001.partial.gz",
    "000000010000000000000001.gz",
    "000000010000000000000001 ", " 000000010000000000000001",
    "000000010000000000000001\n",
    "000000010000000000000001/../../x",
    "RECOVERYXLOG",
])
def test_anything_else_is_refused(name):
    assert fetch.wal_kind(name) is None


def test_following_segments_cross_the_log_id_boundary():
    assert fetch.following_segments("0000000100000000000000FE", SEG, 3) == [
        "0000000100000000000000FF", "000000010000000100000000", "000000010000000100000001"]
    # 64 MiB segments: 64 per log id
    assert fetch.following_segments("00000002000000050000003F", 64 << 20, 1) == [
        "000000020000000600000000"]


# ---------------------------------------------------------------------------
# Page magic per version
# ---------------------------------------------------------------------------

def test_known_major_version_accepts_exactly_its_magic():
    assert fetch.expected_magics("15") == {0xD110}
    assert fetch.expected_magics("9.6") == {0xD093}
    assert fetch.expected_magics("18") == {0xD118}


def test_unknown_version_accepts_any_known_magic_and_a_newer_one_only_newer_magics():
    assert fetch.expected_magics(None) == set(fetch.PAGE_MAGIC.values())
    newer = fetch.expected_magics("19")
    assert 0xD119 in newer and 0xD118 not in newer and 0xD110 not in newer


# ---------------------------------------------------------------------------
# Segment checks on a real segment and corrupted copies
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real(tb):
    """(name, bytes, system identifier, major version) of a real archived segment."""
    name = tb.switch_wal()
    with open(os.path.join(tb.hosts[0].wal_dir, name), "rb") as segment:
        content = segment.read()
    with open(os.path.join(tb.primary.pgdata, "global", "pg_control"), "rb") as control:
        sysid = struct.unpack("=Q", control.read(8))[0]
    with open(os.path.join(tb.primary.pgdata, "PG_VERSION")) as version:
        major = version.read().strip()
    return name, content, sysid, major


def problem(real, content=None, name=None, sysid=None, major=None):
    real_name, real_content, real_sysid, real_major = real
    content = real_content if content is None else content
    return fetch.check_segment(content[:fetch.LONG_HEADER.size], len(content), name or real_name,
                               sysid or real_sysid, fetch.expected_magics(major or real_major))


def patched(content, offset, fmt, value):
    return content[:offset] + struct.pack(fmt, value) + content[offset + struct.calcsize(fmt):]


def test_real_segment_passes(real):
    assert problem(real) is None


def test_truncated_segment_is_refused(real):
    assert "header says" in problem(real, content=real[1][:SEG // 2])
    assert "not a WAL segment" in problem(real, content=real[1][:20])


def test_flipped_magic_is_refused(real):
    assert "page magic" in problem(real, content=patched(real[1], 0, "=H", 0xD110 ^ 0x0100))


def test_magic_of_another_version_is_refused_when_the_version_is_known(real):
    another_version = "14" if real[3] != "14" else "15"
    other = patched(real[1], 0, "=H", fetch.PAGE_MAGIC[another_version])
    assert "page magic" in problem(real, content=other)
    assert fetch.check_segment(other[:40], len(other), real[0], real[2], fetch.expected_magics(None)) is None


def test_segment_under_another_name_is_refused_for_its_address(real):
    name = real[0]
    other = name[:16] + "%08X" % (int(name[16:], 16) + 1)
    assert "first page address" in problem(real, name=other)


def test_segment_of_another_cluster_is_refused(real):
    assert "system identifier" in problem(real, sysid=real[2] + 1)


def test_first_page_of_an_older_timeline_is_accepted_a_newer_one_refused(real):
    name = real[0]
    on_timeline_2 = "00000002" + name[8:]
    assert problem(real, name=on_timeline_2) is None      # new timeline's first segment
    newer = patched(real[1], 4, "=I", 3)
    assert "timeline 3" in problem(real, content=newer, name=on_timeline_2)


def test_segment_size_must_be_a_power_of_two_in_range(real):
    assert "segment size" in problem(real, content=patched(real[1], 32, "=I", 3 << 20))


# ---------------------------------------------------------------------------
# .history and .backup files
# ---------------------------------------------------------------------------

def test_history_and_backup_files_are_checked_as_text():
    assert fetch.check_text_file("history", b"1\t0/3000000\tno recovery target specified\n", 40) is None
    assert fetch.check_text_file("history", b"", 0) == "empty file"
    assert "binary" in fetch.check_text_file("history", b"1\0", 2)
    assert "not a timeline history" in fetch.check_text_file("history", b"<html>\n", 7)
    history = b"1\t0/3000000\tno recovery target specified\n\n2\t0/5000000\tat restore point x\n"
    assert fetch.check_text_file("history", history, len(history), 3) is None
    assert "not below the file's 2" in fetch.check_text_file("history", history, len(history), 2)
    assert "not increasing" in fetch.check_text_file("history", b"2\t0/5000000\tx\n1\t0/6000000\tx\n", 30, 3)
    assert "going back" in fetch.check_text_file("history", b"1\t0/5000000\tx\n2\t0/4000000\tx\n", 30, 3)
    assert "line 1" in fetch.check_text_file("history", b"1\t0/X\tx\n", 9, 3)
    assert "no timeline" in fetch.check_text_file("history", b"# only a comment\n", 17, 3)
    assert fetch.check_text_file("backup", b"START WAL LOCATION: 0/2000028\n", 30) is None
    assert "backup" in fetch.check_text_file("backup", b"hello\n", 6)


# ---------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("outcomes, code, in_archive_recovery", [
    (["found"], 0, 0),
    (["unreachable", "found"], 0, 0),
    (["absent", "absent"], 1, 1),
    # Only a clean "absent" from every source may say "the archive ends here".
    (["unreachable", "absent"], 3, 200),
    (["invalid", "absent"], 3, 200),
    (["failed", "absent"], 3, 200),
    (["stalled", "absent"], 3, 200),
    (["no archive directory", "absent"], 3, 200),
    (["unreachable", "unreachable"], 3, 200),
    (["unreachable", "failed"], 3, 200),
    ([], 3, 200),
])
def test_exit_code_for_the_sources_outcomes(outcomes, code, in_archive_recovery):
    assert fetch.exit_code_for(outcomes) == code
    assert fetch.exit_code_for(outcomes, stop_on_doubt=True) == in_archive_recovery


def test_exit_codes_above_125_stop_postgresql_and_ours_is_not_a_shell_code():
    # RestoreArchivedFile: an exit status above 125 is FATAL for the startup
    # process (9.6-18); 126/127 would read as "not executable"/"not found".
    assert 125 < fetch.STOP_RECOVERY < 256 and fetch.STOP_RECOVERY not in (126, 127)


@pytest.mark.parametrize("files, conf, mode", [
    ([], None, None),
    (["standby.signal"], None, "standby"),
    (["recovery.signal"], None, "archive"),
    (["standby.signal", "recovery.signal"], None, "standby"),
    ([], "restore_command = 'x'\n", "archive"),
    ([], "standby_mode = 'on'\nrestore_command = 'x'\n", "standby"),
    ([], "standby_mode=true\n", "standby"),
    ([], "standby_mode = off  # no\n", "archive"),
    ([], "# standby_mode = on\n", "archive"),
])
def test_recovery_mode_from_signal_files_or_recovery_conf(files, conf, mode):
    assert fetch.recovery_mode(files, conf) == mode


def test_each_source_gets_a_share_of_the_time_left_so_the_last_gets_its_turn():
    assert fetch.source_deadline(100.0, 160.0, 2) == 130.0
    assert fetch.source_deadline(130.0, 160.0, 1) == 160.0
    assert fetch.source_deadline(170.0, 160.0, 1) == 170.0


def test_doubt_summary_names_each_source_and_why():
    assert fetch.doubt_summary([("host1", "unreachable", "probe ping"), ("host2", "absent", "")]) == \
        "[source host1] unreachable (probe ping); [source host2] absent"


def test_spool_keeps_only_the_window():
    window = ["000000010000000000000005", "000000010000000000000006", "000000010000000000000007"]
    spooled = {"000000010000000000000004", "000000010000000000000006", ".prefetch.lock",
               ".prefetch.want", ".prefetch.log", ".pg_wal_fetch.123.tmp", "000000020000000000000005"}
    remove, missing = fetch.spool_plan(spooled, window)
    assert remove == [".pg_wal_fetch.123.tmp", "000000010000000000000004", "000000020000000000000005"]
    assert missing == ["000000010000000000000005", "000000010000000000000007"]
    # The prefetcher's notes, and theirs being written, stay.
    notes = {".prefetch.missed", ".prefetch.missed.77", ".prefetch.want.78"}
    assert fetch.spool_plan(spooled | notes, window)[0] == remove


@pytest.mark.parametrize("parts", [
    ("/var/lib/pg_zfs/spool", "pgdata-0123456789"), ("/var/lib/pg_zfs/spool/", "x"), ("spool", "x"),
    ("", "x"), ("/a", "/b", "c"), (".", "global", "pg_control"), ("/", "x"), ("a//", "b"), ("/a", ""),
])
def test_the_quick_path_joins_paths_as_os_path_does(parts):
    assert fetch.path_join(*parts) == os.path.join(*parts)


@pytest.mark.parametrize("path", ["pg_wal/RECOVERYXLOG", "RECOVERYXLOG", "/x", "/", "//x", "a//b",
                                  "a/b/", "/a/b//c", "", "./p"])
def test_the_quick_path_takes_the_directory_of_a_path_as_os_path_does(path):
    assert fetch.path_dirname(path) == os.path.dirname(path)


def test_the_quick_path_reads_the_environment_as_os_does(monkeypatch, tmp_path):
    monkeypatch.setenv("PG_ZFS_CONFIG", "/etc/pg_zfs/caf\u00e9.conf")
    assert fetch.environment("PG_ZFS_CONFIG") == os.environ["PG_ZFS_CONFIG"]
    monkeypatch.delenv("PG_ZFS_CONFIG")
    assert fetch.environment("PG_ZFS_CONFIG") is None
    assert fetch.is_directory(str(tmp_path)) and not fetch.is_directory(str(tmp_path / "none"))
    assert fetch.path_exists(str(tmp_path)) and not fetch.path_exists(str(tmp_path / "none"))
    assert not fetch.path_exists("bad\0name")


def test_the_compiled_rest_is_kept_below_a_spool_dir_not_made_yet(tmp_path):
    # prefetch = 0 makes no spool: without the directory the rest was compiled at
    # every call (about 50 ms), not loaded from spool_dir/.code.
    code_dir = str(tmp_path / "spool" / "root" / ".code")
    fetch.keep_code(code_dir, "rest-1", b"compiled")
    assert open(os.path.join(code_dir, "rest-1"), "rb").read() == b"compiled"
    for path in (code_dir, os.path.dirname(code_dir)):
        assert os.stat(path).st_mode & 0o777 == 0o700
    assert fetch.private_directory(code_dir)
    fetch.keep_code(code_dir, "quick-1", b"the other part")
    fetch.keep_code(code_dir, "rest-2", b"newer")          # another version replaces it, not the other part
    assert sorted(os.listdir(code_dir)) == ["quick-1", "rest-2"]


def test_a_call_loads_both_parts_compiled_from_the_spool_dir_and_compiles_again_when_the_file_changes(tmp_path):
    # Each part is kept with its text: a file written since (even in place: same
    # inode, same size) is compiled again, never run from the old code.
    script = tmp_path / "pg_wal_fetch.py"
    script.write_bytes(open(fetch.__file__, "rb").read())
    spool_root = tmp_path / "spool"
    config = tmp_path / "fetch.conf"
    config.write_text("[archive]\nspool_dir = %s\n" % spool_root)

    def version():
        return subprocess.run([sys.executable, "-S", str(script), "-c", str(config), "--version"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                              check=True).stdout.strip()
    assert version().endswith(fetch.VERSION)
    code_dir = str(spool_root / ".code")
    kept = sorted(os.listdir(code_dir))
    assert [name.split("-")[0] for name in kept] == ["quick", "rest"], kept
    stamps = [os.stat(os.path.join(code_dir, name)).st_mtime_ns for name in kept]
    assert version().endswith(fetch.VERSION)
    assert [os.stat(os.path.join(code_dir, name)).st_mtime_ns for name in kept] == stamps    # loaded, not kept again
    text = script.read_text()
    with open(str(script), "r+") as same_inode:       # the same size: VERSION 0.1.0 -> 9.1.0
        same_inode.write(text.replace('VERSION = "%s"' % fetch.VERSION, 'VERSION = "9%s"' % fetch.VERSION[1:]))
    assert version().endswith("9" + fetch.VERSION[1:])
    assert sorted(os.listdir(code_dir)) == kept


def test_the_quick_path_imports_no_os():
    # os brings posixpath, stat and _collections_abc: about 4 ms of a delivery under 3.6.
    import ast
    with open(fetch.__file__) as script:
        text = script.read()
    first_part = text[:text.index("\nQUICK = r\'\'\'\n")] + "\n" + fetch.QUICK
    names = {node.id for node in ast.walk(ast.parse(first_part)) if isinstance(node, ast.Name)}
    assert "os" not in names
    probe = ("import sys; f = sys.argv[1]; t = open(f).read(); g = {'__name__': 'probe', '__file__': f}\n"
             "exec(compile(t[:t.index(\"\\nREST = r\'\'\'\\n\")], f, 'exec'), g)\n"
             "g['load_part']('QUICK')\n"
             "print(sorted(m for m in ('os', 'posixpath', 'stat', 'posix') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-S", "-c", probe, fetch.__file__], stdout=subprocess.PIPE,
                         universal_newlines=True, check=True).stdout
    assert out.split() == ["['posix']"]

def test_prefetch_refills_only_when_half_the_window_or_less_is_spooled():
    assert fetch.should_start_prefetch(0, 8) and fetch.should_start_prefetch(4, 8)
    assert not fetch.should_start_prefetch(5, 8)
    assert not fetch.should_start_prefetch(0, 0)


def test_newest_wal_ignores_other_files_and_compression():
    names = ["000000010000000000000003", "000000010000000000000004.gz", "00000002.history",
             "000000020000000000000002", "notes.txt", "000000010000000000000002.00000028.backup"]
    assert fetch.newest_wal(names) == "000000010000000000000004"
    assert fetch.newest_wal(["x"]) is None


def settings_for(tmp_path, ssh_options="-o HostKeyAlias=arch25"):
    config_file = tmp_path / "c.conf"
    config_file.write_text(
        "[archive]\nsources = a\ncontrol_dir = /tmp/ctl\n"
        "[source a]\nhost = 127.0.0.9\nport = 2222\nuser = root\npath = /data04/pgdata/arch/*\n"
        "identity_file = /k\nssh_options = %s\n" % ssh_options)
    return fetch.Settings(fetch.Config.load(str(config_file)))


def test_ssh_command_shares_the_connection_and_quotes_the_remote_command(tmp_path):
    settings = settings_for(tmp_path)
    argv = fetch.ssh_argv(settings.sources[0], settings, "echo 'x y'")
    assert argv[:3] == ["ssh", "-o", "HostKeyAlias=arch25"]       # ssh_options first: they win
    for option in ("BatchMode=yes", "ConnectTimeout=5", "ControlMaster=auto",
                   "ControlPath=/tmp/ctl/%C", "ControlPersist=60", "ServerAliveInterval=2"):
        assert option in argv
    assert argv[-3:] == ["--", "127.0.0.9", "echo 'x y'"]         # remote_command() quotes
    assert argv[argv.index("-i") + 1] == "/k" and argv[argv.index("-l") + 1] == "root"


def test_unbalanced_ssh_options_are_a_config_error(tmp_path):
    settings = settings_for(tmp_path, ssh_options="-o 'oops")
    with pytest.raises(fetch.Failure) as failure:
        fetch.ssh_argv(settings.sources[0], settings, "true")
    assert failure.value.code == 2


def test_missing_source_section_is_a_config_error(tmp_path):
    config_file = tmp_path / "c.conf"
    config_file.write_text("[archive]\nsources = a b\n[source a]\npath = /x\n")
    with pytest.raises(fetch.Failure) as failure:
        fetch.Settings(fetch.Config.load(str(config_file)))
    assert failure.value.code == 2 and "[source b]" in str(failure.value)


# ---------------------------------------------------------------------------
# The remote script, run by a real sh on a hostile directory tree
# ---------------------------------------------------------------------------

def frames(stream, names):
    """(directories, [(name, suffix, index, count, path, bytes)], last frame) of a framed stream,
    read with the script's own parse_frame."""
    line, stream = stream.split(b"\n", 1)
    assert line.startswith(b"DIRS ")
    directories, found = int(line.split()[1]), []
    for name in names:
        if not stream:
            return directories, found, None
        line, stream = stream.split(b"\n", 1)
        frame = fetch.parse_frame(line + b"\n", name)
        assert frame is not None, line
        if frame[0] != "FILE":
            return directories, found, frame
        _, suffix, size, index, count, path = frame
        found.append((name, suffix, index, count, os.path.basename(path), stream[:size]))
        stream = stream[size:]
    return directories, found, None


NAMES = ["000000010000000000000001", "000000010000000000000002", "000000010000000000000003",
         "000000010000000000000004"]


def hostile_archive(tmp_path):
    root = tmp_path / "arch $(touch PWNED) `touch PWNED2`; x"
    (root / "a dir").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a dir" / NAMES[0]).write_bytes(b"one\n" * 3)
    (root / "b" / NAMES[0]).write_bytes(b"second copy")
    (root / "b" / (NAMES[0] + ".xz")).write_bytes(b"third copy")
    (root / "b" / (NAMES[1] + ".gz")).write_bytes(b"\x1f\x8bzz")
    return str(root) + "/*"


SERVER_WAYS = ("unrestricted", "restricted dash", "restricted bash")


def serve(tmp_path, way, path_glob, request, cwd=None):
    """(exit code, stdout, stderr) of a request answered as a host answers it: unrestricted,
    a login shell runs the command string; restricted, pg_wal_serve (under dash or bash
    as /bin/sh) reads it from $SSH_ORIGINAL_COMMAND with the glob of its own command
    line, and the client's glob is never used."""
    env = {"PATH": os.environ["PATH"], "SSH_CLIENT": "127.0.0.14 40000 22"}
    if way == "unrestricted":
        argv = ["sh", "-c", fetch.remote_command(path_glob, request)]
    else:
        server = tmp_path / "pg_wal_serve"
        server.write_text(fetch.serve_script())
        env["SSH_ORIGINAL_COMMAND"] = fetch.remote_command("/the/client/glob/is/ignored/*", request)
        argv = [way.split()[1], str(server), path_glob]
    proc = subprocess.run(argv, cwd=str(cwd or tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc.returncode, proc.stdout, proc.stderr.decode()


def run_remote(tmp_path, path_glob, names, candidate=1, way="unrestricted"):
    code, out, err = serve(tmp_path, way, path_glob, fetch.fetch_request(names, candidate))
    assert code == 0, err
    return out


@pytest.mark.parametrize("way", SERVER_WAYS)
def test_remote_script_streams_the_first_copy_of_each_in_order_and_never_evaluates_the_glob(tmp_path, way):
    out = run_remote(tmp_path, hostile_archive(tmp_path), NAMES, way=way)
    directories, found, last = frames(out, NAMES)
    assert directories == 2
    assert found == [(NAMES[0], "", 1, 3, NAMES[0], b"one\n" * 3),
                     (NAMES[1], ".gz", 1, 1, NAMES[1] + ".gz", b"\x1f\x8bzz")]
    assert last == ("MISSING",)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "PWNED2").exists()


@pytest.mark.parametrize("way", SERVER_WAYS)
def test_remote_script_streams_any_later_copy_on_request_and_says_when_there_is_none(tmp_path, way):
    path_glob = hostile_archive(tmp_path)
    copies = []
    for candidate in (1, 2, 3):
        _, found, _ = frames(run_remote(tmp_path, path_glob, NAMES[:1], candidate, way), NAMES[:1])
        copies.append(found[0][1:])
    # Every directory of the glob, every suffix: a bad first copy hides nothing.
    assert copies == [("", 1, 3, NAMES[0], b"one\n" * 3), ("", 2, 3, NAMES[0], b"second copy"),
                      (".xz", 3, 3, NAMES[0] + ".xz", b"third copy")]
    assert frames(run_remote(tmp_path, path_glob, NAMES[:1], 4, way), NAMES[:1])[2] == ("NOMORE", 3)


@pytest.mark.parametrize("way", SERVER_WAYS)
def test_remote_script_says_when_the_glob_matches_no_directory(tmp_path, way):
    out = run_remote(tmp_path, str(tmp_path / "not-mounted") + "/*", NAMES[:1], way=way)
    assert out == b"DIRS 0\nMISSING " + NAMES[0].encode() + b"\n"


@pytest.mark.parametrize("line", [
    b"FILE 000000010000000000000001 - 12 1\n", b"FILE 000000010000000000000009 - 12 1 1 /a\n",
    b"FILE 000000010000000000000001 .zip 12 1 1 /a\n", b"FILE 000000010000000000000001 - x 1 1 /a\n",
    b"MISSING 000000010000000000000002\n", b"\n", b"NOMORE 000000010000000000000001 x\n"])
def test_a_frame_for_another_name_or_malformed_is_not_taken(line):
    assert fetch.parse_frame(line, "000000010000000000000001") is None


@pytest.mark.parametrize("way", SERVER_WAYS)
def test_remote_list_counts_directories(tmp_path, way):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "000000010000000000000001").write_bytes(b"")
    (tmp_path / "file").write_bytes(b"")
    code, out, err = serve(tmp_path, way, str(tmp_path) + "/*", fetch.LIST_REQUEST)
    assert code == 0, err
    assert out.decode().splitlines() == ["000000010000000000000001", "DIRS 1"]


@pytest.mark.parametrize("way", SERVER_WAYS)
def test_the_probe_says_who_answers_and_how_the_host_sees_the_guest(tmp_path, way):
    code, out, err = serve(tmp_path, way, "/arch ive/*", fetch.PROBE_REQUEST)
    assert code == 0, err
    answer = fetch.parse_probe(out.decode())
    assert answer == {"mode": way.split()[0], "user": pwd.getpwuid(os.getuid()).pw_name,
                      "version": fetch.VERSION, "client": "127.0.0.14", "glob": "/arch ive/*"}


@pytest.mark.parametrize("text", ["", "PROBE restricted a b c\n", "PROBE maybe u 1 - /x\n",
                                  "PROBE restricted u 1 - /x\nmore\n", "pg_wal_serve: refused: x\n"])
def test_anything_but_one_probe_line_is_not_a_probe_answer(text):
    assert fetch.parse_probe(text) is None


def test_one_command_string_carries_the_request_after_the_mark_both_ways():
    command = fetch.remote_command("/data04/pgdata/arch/*", fetch.fetch_request(NAMES[:2], 3))
    words = shlex.split(command)
    # Unrestricted, a login shell runs: sh -c SCRIPT MARK WORDS ($0 is the mark).
    assert words[:2] == ["sh", "-c"] and words[3:] == [fetch.REQUEST_MARK, "fetch", "3"] + NAMES[:2]
    # Restricted, pg_wal_serve takes the words after the last mark, split at blanks.
    assert command.split()[-4:] == ["fetch", "3"] + NAMES[:2]
    assert fetch.REQUEST_MARK not in words[2]
    assert "'" not in fetch.SERVE_FUNCTIONS


HOSTILE_REQUESTS = [
    ("id", "not a pg_wal_fetch request: id"),
    ("cat /etc/shadow", "not a pg_wal_fetch request: cat /etc/shadow"),
    ("scp -t /tmp/x", "not a pg_wal_fetch request"),
    ("scp -f /etc/passwd", "not a pg_wal_fetch request"),
    ("internal-sftp", "not a pg_wal_fetch request"),
    ("/usr/lib/openssh/sftp-server", "not a pg_wal_fetch request"),
    ("", "no command"),
    (fetch.REQUEST_MARK + " fetch 1 ../../etc/passwd", "not a WAL file name: ../../etc/passwd"),
    (fetch.REQUEST_MARK + " fetch 1 /etc/passwd", "not a WAL file name: /etc/passwd"),
    (fetch.REQUEST_MARK + " fetch 1 " + NAMES[0] + ";touch${IFS}MARKER", "not a WAL file name"),
    (fetch.REQUEST_MARK + " fetch 1 $(touch MARKER)", "not a WAL file name: $(touch"),
    (fetch.REQUEST_MARK + " fetch 1 `touch MARKER`", "not a WAL file name: `touch"),
    (fetch.REQUEST_MARK + " fetch 1 " + NAMES[0][:-1] + "*", "not a WAL file name"),
    (fetch.REQUEST_MARK + " fetch 1 00000001000000000000000a", "not a WAL file name"),
    (fetch.REQUEST_MARK + " fetch 1 " + NAMES[0] + ".gz", "not a WAL file name"),
    (fetch.REQUEST_MARK + " fetch 1 " + NAMES[0] + " ../x", "not a WAL file name: ../x"),
    (fetch.REQUEST_MARK + " fetch 0 " + NAMES[0], "not a copy number: 0"),
    (fetch.REQUEST_MARK + " fetch -1 " + NAMES[0], "not a copy number"),
    (fetch.REQUEST_MARK + " fetch 1", "fetch wants"),
    (fetch.REQUEST_MARK + " list /etc", "list takes no argument"),
    (fetch.REQUEST_MARK + " probe x", "probe takes no argument"),
    (fetch.REQUEST_MARK + " sh -c id", "not a pg_wal_fetch request: sh"),
    (fetch.REQUEST_MARK, "not a pg_wal_fetch request"),
]


@pytest.mark.parametrize("shell", ["dash", "bash"])
@pytest.mark.parametrize("original, reason", HOSTILE_REQUESTS)
def test_pg_wal_serve_refuses_in_one_line_and_changes_nothing(tmp_path, shell, original, reason):
    archive = tmp_path / "arch" / "primary"
    archive.mkdir(parents=True)
    (archive / NAMES[0]).write_bytes(b"x")
    server = tmp_path / "pg_wal_serve"
    server.write_text(fetch.serve_script())
    before = sorted(os.listdir(str(tmp_path)))
    env = {"PATH": os.environ["PATH"], "SSH_CLIENT": "127.0.0.14 40000 22"}
    if original:
        env["SSH_ORIGINAL_COMMAND"] = original
    proc = subprocess.run([shell, str(server), str(tmp_path / "arch") + "/*"], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("pg_wal_serve: refused: " + reason) and proc.stderr.count("\n") == 1
    assert sorted(os.listdir(str(tmp_path))) == before


@pytest.mark.parametrize("shell", ["dash", "bash"])
def test_pg_wal_serve_never_runs_the_words_before_the_mark(tmp_path, shell):
    (tmp_path / "arch" / "primary").mkdir(parents=True)
    server = tmp_path / "pg_wal_serve"
    server.write_text(fetch.serve_script())
    env = {"PATH": os.environ["PATH"],
           "SSH_ORIGINAL_COMMAND": "touch MARKER; $(touch MARKER2) sh -c 'touch MARKER3' %s list"
                                   % fetch.REQUEST_MARK}
    proc = subprocess.run([shell, str(server), str(tmp_path / "arch") + "/*"], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "DIRS 1\n", "")
    assert sorted(os.listdir(str(tmp_path))) == ["arch", "pg_wal_serve"]


@pytest.mark.parametrize("argv, reason", [([], "usage"), (["/a/*", "/b/*"], "usage"),
                                          (["arch/*"], "absolute")])
def test_pg_wal_serve_refuses_a_bad_command_line_in_authorized_keys(tmp_path, argv, reason):
    server = tmp_path / "pg_wal_serve"
    server.write_text(fetch.serve_script())
    env = {"PATH": os.environ["PATH"],
           "SSH_ORIGINAL_COMMAND": fetch.remote_command("/x/*", fetch.PROBE_REQUEST)}
    proc = subprocess.run(["sh", str(server)] + argv, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    assert proc.returncode == 1 and proc.stdout == "" and reason in proc.stderr


def sshd_dequote(line):
    """(options, rest) of an authorized_keys line as sshd reads command="...": only \\" is special."""
    assert line.startswith('restrict,from="')
    options, index = [], len("restrict,")
    while line[index] != " ":
        name_end = line.index('="', index)
        value, index = "", name_end + 2
        while line[index] != '"':
            if line[index] == "\\" and line[index + 1] == '"':
                index += 1
            value += line[index]
            index += 1
        options.append((line[name_end - len(line[:name_end].split(",")[-1]):name_end], value))
        index += 1
        if line[index] == ",":
            index += 1
    return options, line[index + 1:]


@pytest.mark.parametrize("path_glob", ["/data04/pgdata/arch/*", "/arch ive/it's \"x\"/$(id)/*"])
def test_authorized_keys_line_restricts_the_key_to_pg_wal_serve_on_the_glob(path_glob):
    line = fetch.authorized_keys_line("ssh-ed25519 AAAAC3Nza postgres@guest pg_zfs", "192.168.122.10",
                                      path_glob, "/usr/local/bin/pg_wal_serve")
    options, key = sshd_dequote(line)
    assert line.startswith("restrict,") and key == "ssh-ed25519 AAAAC3Nza postgres@guest pg_zfs"
    assert dict(options)["from"] == "192.168.122.10"
    # The login shell reads the command: the server and the glob, each one word.
    assert shlex.split(dict(options)["command"]) == ["/usr/local/bin/pg_wal_serve", path_glob]


@pytest.mark.parametrize("key, source, path_glob, server", [
    ("ssh-ed25519 AAAA", "192.168.122.10", "arch/*", "/usr/local/bin/pg_wal_serve"),
    ("ssh-ed25519 AAAA", "192.168.122.10", "/arch/*\nssh-rsa x", "/usr/local/bin/pg_wal_serve"),
    ("ssh-ed25519 AAAA", '1.2.3.4" x', "/arch/*", "/usr/local/bin/pg_wal_serve"),
    ("ssh-ed25519 AAAA", "", "/arch/*", "/usr/local/bin/pg_wal_serve"),
    ("ssh-ed25519", "10.0.0.1", "/arch/*", "/usr/local/bin/pg_wal_serve"),
    ("command=\"id\" ssh-ed25519 AAAA", "10.0.0.1", "/arch/*", "/usr/local/bin/pg_wal_serve"),
    ("ssh-ed25519 AAAA", "10.0.0.1", "/arch/*", "pg_wal_serve"),
])
def test_authorized_keys_line_refuses_what_would_break_or_widen_it(key, source, path_glob, server):
    with pytest.raises(fetch.Failure) as failure:
        fetch.authorized_keys_line(key, source, path_glob, server)
    assert failure.value.code == 2


@pytest.mark.parametrize("options, address", [
    ("", None), ("-o HostKeyAlias=a25", None), ("-b 127.0.0.14", "127.0.0.14"), ("-b127.0.0.15", "127.0.0.15"),
    ("-o BindAddress=10.1.1.1", "10.1.1.1"), ("-oBindAddress=10.1.1.2", "10.1.1.2"),
    ("-o 'BindAddress 10.1.1.3'", "10.1.1.3"), ("-o bindaddress=10.1.1.4 -p 22", "10.1.1.4")])
def test_the_address_ssh_options_bind_to_is_the_guest_address_the_host_sees(options, address):
    assert fetch.bind_address(options) == address


# ---------------------------------------------------------------------------
# Staged files and decompression
# ---------------------------------------------------------------------------

def test_staged_file_appears_only_on_commit_and_discard_leaves_nothing(tmp_path):
    staged = fetch.StagedFile(str(tmp_path), durable=True)
    staged.write(b"abc")
    assert os.listdir(str(tmp_path)) == []          # unnamed until committed
    staged.commit(str(tmp_path / "RECOVERYXLOG"))
    staged.discard()
    assert os.listdir(str(tmp_path)) == ["RECOVERYXLOG"]
    assert (tmp_path / "RECOVERYXLOG").read_bytes() == b"abc"
    staged = fetch.StagedFile(str(tmp_path))
    staged.write(b"new")
    staged.commit(str(tmp_path / "RECOVERYXLOG"))   # replaces an existing file
    staged.discard()
    assert (tmp_path / "RECOVERYXLOG").read_bytes() == b"new"
    staged = fetch.StagedFile(str(tmp_path))
    staged.write(b"never")
    staged.discard()
    assert os.listdir(str(tmp_path)) == ["RECOVERYXLOG"]


def segment_like(size, random_bytes):
    """size bytes starting with a first page header that states size, then random bytes, then zeros."""
    header = fetch.LONG_HEADER.pack(0xD110, 2, 1, 0, 0, 1, size, 8192)
    return header + os.urandom(random_bytes) + bytes(size - len(header) - random_bytes)


def test_a_source_that_answered_a_moment_ago_is_not_probed():
    assert fetch.probe_needed(None, 1000.0) is True
    assert fetch.probe_needed(999.0, 1000.0) is False
    assert fetch.probe_needed(1000.0 - fetch.UP_MEMO, 1000.0) is True
    # "In the future" after a clock change: probed.
    assert fetch.probe_needed(1001.0, 1000.0) is True


@pytest.mark.parametrize("suffix, compress", [
    (".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)])
def test_compressed_copies_are_decompressed_and_broken_ones_refused(tmp_path, suffix, compress):
    original = segment_like(1 << 20, 100000)
    packed = compress(original)
    for data, ok in ((packed, True), (packed[:len(packed) // 2], False), (b"garbage" * 10, False)):
        staged = fetch.StagedFile(str(tmp_path))
        receiver = fetch.Receiver(staged, suffix, "segment")
        for start in range(0, len(data), 7000):
            receiver.feed(data[start:start + 7000])
        receiver.finish()
        assert (receiver.problem is None) == ok, receiver.problem
        if ok:
            staged.commit(str(tmp_path / "out"))
            assert (tmp_path / "out").read_bytes() == original and receiver.head == original[:40]
        staged.discard()


def test_each_data_directory_has_its_own_spool_below_spool_dir():
    standby = fetch.spool_for("/var/lib/pg_zfs/spool", "/zp1/data02/pgdata")
    clone = fetch.spool_for("/var/lib/pg_zfs/spool",
                            "/var/lib/pg_zfs/restore/data02_restore_pgzfs_20261125T040100Z/pgdata")
    assert standby.startswith("/var/lib/pg_zfs/spool/pgdata-")
    assert clone.startswith("/var/lib/pg_zfs/spool/pgdata-")
    assert standby != clone
    assert fetch.spool_for("/s", "/zp1/data02/pgdata") == fetch.spool_for("/s", "/zp1/data02/pgdata")
    # Versions before the spool served one boot named it without ".boot": they never
    # read a spool whose segments were not fsynced.
    assert standby.endswith(".boot") and clone.endswith(".boot")


def test_a_spool_an_older_version_named_is_removed_and_one_a_prefetcher_holds_is_not(tmp_path):
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    (pgdata / "PG_VERSION").write_text("15\n")
    root = tmp_path / "spool"
    own = fetch.spool_for(str(root), str(pgdata))
    old, held, gone = root / "pgdata-0123456789", root / "held-0123456789", root / "gone-0123456789.boot"
    for spool, owner in ((own, pgdata), (old, pgdata), (held, pgdata), (gone, tmp_path / "gone")):
        os.makedirs(str(spool))
        with open(os.path.join(str(spool), fetch.SPOOL_OWNER), "w") as owner_file:
            owner_file.write("%s\n" % owner)
    with open(str(held / fetch.SPOOL_LOCK), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)             # an older version's prefetcher at work
        fetch.remove_orphan_spools(str(root), own)
    assert sorted(os.listdir(str(root))) == sorted([os.path.basename(own), "held-0123456789"])


@pytest.mark.parametrize("suffix, compress", [
    (".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)])
def test_multi_stream_compressed_copies_are_decompressed_whole(tmp_path, suffix, compress):
    # pbzip2, pigz -i, xz -T and `cat a.gz b.gz` write several streams in one file;
    # gzip, bzip2 and xz decompress all of them, and so must we.
    original = segment_like(1 << 20, 100000)
    data = compress(original[:120000]) + compress(original[120000:])
    staged = fetch.StagedFile(str(tmp_path))
    receiver = fetch.Receiver(staged, suffix, "segment")
    for start in range(0, len(data), 7000):
        receiver.feed(data[start:start + 7000])
    receiver.finish()
    assert receiver.problem is None
    staged.commit(str(tmp_path / "out"))
    staged.discard()
    assert (tmp_path / "out").read_bytes() == original


def test_the_time_limit_hit_after_delivery_does_not_fail_the_delivery(monkeypatch):
    # The segment is at DEST: exiting 3 now would leave it there on a failure.
    def times_out(*args):
        raise fetch.TimedOut()
    monkeypatch.setattr(fetch, "start_prefetch", times_out)
    fetch.after_delivery(None, fetch.Arguments(None, "000000010000000000000003", "x"), None, None)


def test_a_source_whose_probe_failed_recently_is_tried_last_never_skipped():
    class Source(object):
        def __init__(self, name):
            self.name = name
    host1, host2, host3 = Source("host1"), Source("host2"), Source("host3")
    sources = [host1, host2, host3]
    assert fetch.source_order(sources, {}, 1000.0) == sources
    assert fetch.source_order(sources, {"host1": 990.0}, 1000.0) == [host2, host3, host1]
    # Long ago, or "in the future" after a clock change: back in config order.
    assert fetch.source_order(sources, {"host1": 900.0}, 1000.0) == sources
    assert fetch.source_order(sources, {"host1": 1100.0}, 1000.0) == sources
    assert fetch.source_order(sources, {"host1": 995.0, "host2": 999.0}, 1000.0) == [
        host3, host1, host2]


@pytest.mark.parametrize("suffix, compress", [
    (".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)])
def test_a_small_archive_that_inflates_past_the_segment_size_is_refused_there(tmp_path, suffix, compress):
    # A first page stating 1 MiB segments, then 64 MiB of zeros: a few kB compressed.
    header = fetch.LONG_HEADER.pack(0xD110, 2, 1, 0, 0, 1, 1 << 20, 8192)
    bomb = compress(header + bytes(64 << 20))
    staged = fetch.StagedFile(str(tmp_path))
    receiver = fetch.Receiver(staged, suffix, "segment")
    written = []
    staged.write = lambda data: written.append(len(data))
    receiver.feed(bomb)
    receiver.finish()
    staged.discard()
    assert receiver.problem == "more than 1048576 bytes, the segment size its first page states"
    assert sum(written) <= 1 << 20 and max(written) <= fetch.CHUNK
    assert os.listdir(str(tmp_path)) == []


def test_a_plain_copy_bigger_than_any_segment_is_refused_before_a_byte_is_written(tmp_path):
    def never_read(size):
        raise AssertionError("read %d bytes of a copy that cannot be a segment" % size)
    result = fetch.store("000000010000000000000001", "", 3 << 30, never_read, str(tmp_path / "RECOVERYXLOG"),
                         False, None, None)
    assert result == ("invalid", "3221225472 bytes, more than a segment file can hold", False)
    assert os.listdir(str(tmp_path)) == []


def test_the_begin_of_a_timeline_is_the_last_switch_point_of_its_history():
    history = "1\t0/3000000\tno recovery target specified\n\n2\t1/5A000028\tbefore 2026-11-25\n"
    assert fetch.timeline_begins(history) == (1 << 32) | 0x5A000028
    assert fetch.timeline_begins("") is None and fetch.timeline_begins("# only a comment\n") is None


@pytest.mark.parametrize("name, before", [
    ("000000030000000000000010", True),          # log 0: long before 1/5A000028
    ("000000030000000100000000", True),           # ends by 1/40000000 even with 1 GiB segments
    ("000000030000000100000001", False),          # with 1 GiB segments it would hold 1/5A000028
    ("000000030000000100000059", False),          # could end past 1/5A000028 (32 MiB segments)
    ("00000003000000010000005A", False),          # holds the switch point
    ("000000030000000200000000", False),
])
def test_a_segment_wholly_before_its_timeline_began_cannot_exist(name, before):
    begins = (1 << 32) | 0x5A000028
    assert fetch.before_its_timeline(name, begins) is before
    assert fetch.before_its_timeline(name, None) is False


def test_a_copy_whose_first_page_states_no_segment_size_is_refused_at_once(tmp_path):
    staged = fetch.StagedFile(str(tmp_path))
    receiver = fetch.Receiver(staged, ".bz2", "segment")
    written = []
    staged.write = lambda data: written.append(len(data))
    receiver.feed(bz2.compress(bytes(64 << 20)))
    staged.discard()
    assert receiver.problem == "implausible segment size 0 in the first page header"
    assert sum(written) == 0


def test_gzip_streams_back_to_back_of_a_mostly_zero_segment_are_decompressed_once_each(tmp_path):
    # What follows a stream's end was taken twice (unused_data and unconsumed_tail):
    # pigz -i or `cat a.gz b.gz` of a good segment was refused, or grew past its size.
    original = segment_like(16 << 20, 100000)
    quarter = len(original) // 4
    data = b"".join(gzip.compress(original[i * quarter:(i + 1) * quarter]) for i in range(4))
    staged = fetch.StagedFile(str(tmp_path))
    receiver = fetch.Receiver(staged, ".gz", "segment")
    for start in range(0, len(data), 65536):       # as the bytes come from ssh
        receiver.feed(data[start:start + 65536])
    receiver.finish()
    assert receiver.problem is None
    staged.commit(str(tmp_path / "out"))
    staged.discard()
    assert (tmp_path / "out").read_bytes() == original


# ---------------------------------------------------------------------------
# The file's two parts: the delivery from the spool, and REST
# ---------------------------------------------------------------------------

def plain_text():
    """pg_wal_fetch.py as if QUICK and REST were plain code: the file without the
    lines that open and close those strings (for pyflakes and the name checks)."""
    with open(fetch.__file__) as script:
        text = script.read()
    for name in ("QUICK", "REST"):
        head, rest = text.split("\n%s = r'''\n" % name, 1)
        body, tail = rest.split("\n'''\n", 1)
        text = head + "\n" + body + "\n" + tail
    return text


def test_quick_and_rest_are_the_files_own_text_and_run_with_the_files_line_numbers():
    with open(fetch.__file__) as script:
        text = script.read()
    for part in (fetch.QUICK, fetch.REST):
        assert "\n" + part.lstrip("\n") in text            # a raw string: nothing escaped
    lines = text.splitlines()
    for function in (fetch.full_main, fetch.check_pages, fetch.store, fetch.quick_delivery, fetch.count_fetch,
                     fetch.load_part):
        assert lines[function.__code__.co_firstlineno - 1].startswith("def %s(" % function.__name__)


def test_the_file_read_as_plain_code_passes_pyflakes(tmp_path):
    pytest.importorskip("pyflakes")
    plain = tmp_path / "pg_wal_fetch_plain.py"
    plain.write_text(plain_text())
    proc = subprocess.run(["python3", "-m", "pyflakes", str(plain)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True)
    # QUICK and REST themselves are the names the plain reading no longer defines.
    problems = [line for line in proc.stdout.splitlines()
                if "undefined name 'REST'" not in line and "undefined name 'QUICK'" not in line]
    assert problems == []


@pytest.mark.skipif(sys.version_info < (3, 8), reason="end_lineno needs Python 3.8")
def test_a_name_in_rest_means_what_it_means_in_the_other_scripts(monkeypatch):
    # tests/test_config.py reads REST as a string: the same check, on the plain reading.
    import test_config
    source_of = test_config.source_of
    monkeypatch.setattr(test_config, "source_of",
                        lambda script: plain_text() if script == "pg_wal_fetch" else source_of(script))
    assert "full_main" in test_config.top_level("pg_wal_fetch")[0]
    test_config.test_a_name_means_one_thing_across_the_four_scripts()


@pytest.fixture
def spooled(tmp_path, monkeypatch):
    """A data directory (cwd), a config with prefetch 8, its spool holding a valid-looking
    1 MiB segment 000000010000000000000000, and the config note of a full run."""
    pgdata = tmp_path / "pgdata"
    (pgdata / "global").mkdir(parents=True)
    (pgdata / "pg_wal").mkdir()
    (pgdata / "global" / "pg_control").write_bytes(struct.pack("=Q", 1) + bytes(100))
    (pgdata / "PG_VERSION").write_text("15\n")
    config = tmp_path / "c.conf"
    config.write_text("[archive]\nsources = a\nspool_dir = %s\nprefetch = 8\n"
                      "[source a]\npath = /nowhere/*\n" % (tmp_path / "spool"))
    monkeypatch.chdir(str(pgdata))
    settings = fetch.Settings(fetch.Config.load(str(config)))
    settings.spool_dir = fetch.spool_for(settings.spool_root, str(pgdata))
    os.makedirs(settings.spool_dir)
    fetch.note_config(settings)
    with open(os.path.join(settings.spool_dir, fetch.SPOOL_BOOT), "w") as mark:
        mark.write(fetch.this_boot() + "\n")       # a prefetcher of this boot filled it
    name = "000000010000000000000000"
    (tmp_path / "segment").write_bytes(segment_like(1 << 20, 1000))
    os.rename(str(tmp_path / "segment"), os.path.join(settings.spool_dir, name))
    refills = []
    monkeypatch.setattr(fetch, "refill_after_quick_delivery", lambda *args: refills.append(args) or 0)
    return {"config": str(config), "spool": settings.spool_dir, "name": name, "pgdata": pgdata,
            "refills": refills}


def test_a_spooled_segment_is_renamed_into_place_and_the_next_ones_asked_for(spooled):
    argv = ["-c", spooled["config"], spooled["name"], "pg_wal/RECOVERYXLOG"]
    assert fetch.quick_delivery(argv) == fetch.DELIVERED
    assert (spooled["pgdata"] / "pg_wal" / "RECOVERYXLOG").stat().st_size == 1 << 20
    assert not os.path.exists(os.path.join(spooled["spool"], spooled["name"]))
    assert fetch.read_want(spooled["spool"]) == (spooled["name"], 1 << 20)
    # An empty window and no prefetcher: the rest is asked to start one.
    assert len(spooled["refills"]) == 1


def test_a_config_changed_since_the_last_full_run_leaves_the_delivery_to_the_rest(spooled):
    with open(spooled["config"], "a") as config:
        config.write("prefecth = 4\n")                  # a typo the full reader refuses
    argv = ["-c", spooled["config"], spooled["name"], "pg_wal/RECOVERYXLOG"]
    assert fetch.quick_delivery(argv) is None
    assert os.path.exists(os.path.join(spooled["spool"], spooled["name"]))
    assert os.listdir(str(spooled["pgdata"] / "pg_wal")) == []


@pytest.mark.parametrize("argv", [
    ["-v", "-c", "C", "000000010000000000000000", "pg_wal/RECOVERYXLOG"],
    ["-c", "C", "00000002.history", "pg_wal/RECOVERYHISTORY"],
    ["-c", "C", "000000010000000000000000.partial", "pg_wal/RECOVERYXLOG"],
    ["--check"],
])
def test_anything_but_a_segment_asked_the_restore_command_way_is_left_to_the_rest(spooled, argv):
    argv = [spooled["config"] if word == "C" else word for word in argv]
    assert fetch.quick_delivery(argv) is None
    assert os.path.exists(os.path.join(spooled["spool"], spooled["name"]))


@pytest.mark.parametrize("mark", [None, "", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n"])
def test_a_spool_of_another_boot_or_none_is_left_to_the_rest(spooled, mark):
    path = os.path.join(spooled["spool"], fetch.SPOOL_BOOT)
    os.unlink(path)
    if mark is not None:
        with open(path, "w") as mark_file:
            mark_file.write(mark)
    assert fetch.quick_delivery(["-c", spooled["config"], spooled["name"], "pg_wal/RECOVERYXLOG"]) is None
    assert os.listdir(str(spooled["pgdata"] / "pg_wal")) == []
    assert fetch.spooled_in_window(spooled["spool"], ("000000010000000000000000", 1 << 20), 8) == 0


def test_the_boot_id_is_the_kernels_and_unknown_without_one(monkeypatch, tmp_path):
    with open("/proc/sys/kernel/random/boot_id") as boot_file:
        assert fetch.this_boot() == boot_file.read().strip()
    monkeypatch.setattr(fetch, "BOOT_ID", str(tmp_path / "none"))
    assert fetch.this_boot() == "unknown"


def test_claiming_a_spool_empties_one_of_another_boot_and_marks_it_durably(tmp_path, monkeypatch):
    spool = str(tmp_path)
    for name in ("000000010000000000000003", "000000010000000000000004", ".pgdata", ".config-ok"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / fetch.SPOOL_BOOT).write_text("another\n")
    assert fetch.claim_spool_boot(spool) is True          # this boot is known: no fsync per segment
    assert sorted(os.listdir(spool)) == sorted([".pgdata", ".config-ok", fetch.SPOOL_BOOT])
    assert fetch.spool_of_this_boot(spool)
    (tmp_path / "000000010000000000000005").write_bytes(b"x")
    assert fetch.claim_spool_boot(spool) is True          # already this boot's: nothing removed
    assert "000000010000000000000005" in os.listdir(spool)
    monkeypatch.setattr(fetch, "BOOT_ID", str(tmp_path / "none"))
    assert fetch.claim_spool_boot(spool) is False         # unknown: each segment fsynced
    assert "000000010000000000000005" not in os.listdir(spool)
    assert fetch.spool_of_this_boot(spool)


def test_a_spooled_copy_of_another_cluster_is_left_to_the_rest(spooled):
    (spooled["pgdata"] / "global" / "pg_control").write_bytes(struct.pack("=Q", 2) + bytes(100))
    assert fetch.quick_delivery(["-c", spooled["config"], spooled["name"], "pg_wal/RECOVERYXLOG"]) is None
    assert os.listdir(str(spooled["pgdata"] / "pg_wal")) == []


def test_compiled_rest_is_kept_only_in_a_private_directory(tmp_path):
    code_dir = str(tmp_path / ".code")
    fetch.keep_code(code_dir, "rest-1", b"one")
    fetch.keep_code(code_dir, "rest-2", b"two")
    assert os.listdir(code_dir) == ["rest-2"]              # older versions removed
    assert fetch.private_directory(code_dir)
    os.chmod(code_dir, 0o777)
    assert not fetch.private_directory(code_dir)
    fetch.keep_code(code_dir, "rest-3", b"three")
    assert sorted(os.listdir(code_dir)) == ["rest-2"]      # never written where others may write


def test_aes_gcm_goes_first_only_on_a_cpu_with_aes_instructions():
    assert fetch.preferred_ciphers(frozenset(["fpu", "aes", "avx2"])).startswith("aes128-gcm@openssh.com,")
    assert fetch.preferred_ciphers(frozenset(["fpu", "avx2"])) is None
    # The same set as OpenSSH's default: a host that takes the default takes this.
    assert sorted(fetch.AES_FIRST_CIPHERS.split(",")) == sorted(
        "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,"
        "aes256-gcm@openssh.com".split(","))


def test_a_second_patient_probe_only_when_every_source_failed_its_probe():
    probe_failed = (fetch.UNREACHABLE, "probe tcp")
    assert fetch.all_probes_failed([("h1",) + probe_failed, ("h2", fetch.UNREACHABLE, "probe ping")])
    assert not fetch.all_probes_failed([])
    assert not fetch.all_probes_failed([("h1",) + probe_failed, ("h2", fetch.ABSENT, "")])
    # ssh itself gave up after the probe answered: asking again with patience would not help
    assert not fetch.all_probes_failed([("h1",) + probe_failed, ("h2", fetch.UNREACHABLE, "ssh h2: timed out")])


@pytest.mark.parametrize("way", SERVER_WAYS)
def test_remote_script_streams_whole_mib_files_and_odd_sizes_exactly(tmp_path, way):
    # A segment (whole MiBs) goes out by dd in 1 MiB blocks, any other size by head -c:
    # either way exactly the bytes the frame announces, and the next frame after them.
    archive = tmp_path / "arch" / "primary"
    archive.mkdir(parents=True)
    sizes = {NAMES[0]: 2 << 20, NAMES[1]: (1 << 20) + 1}
    contents = {name: os.urandom(size) for name, size in sizes.items()}
    for name, content in contents.items():
        (archive / name).write_bytes(content)
    out = run_remote(tmp_path, str(tmp_path / "arch") + "/*", NAMES, way=way)
    directories, found, last = frames(out, NAMES)
    assert directories == 1 and last == ("MISSING",)
    assert [(frame[0], frame[5]) for frame in found] == [(name, contents[name]) for name in NAMES[:2]]


# ---------------------------------------------------------------------------
# The early ssh of a call without prefetch (start_early_fetch, issue 17)
# ---------------------------------------------------------------------------

NAME = "000000010000000000000007"


def early_note(config_id, memo, argv):
    return "\0".join([config_id, memo] + argv)


def test_the_early_command_is_the_noted_one_for_this_config_and_name_only():
    ssh = ["ssh", "-p", "22", "--", "host", "sh -c 'serve' pg_wal_fetch-request fetch 1 " + fetch.EARLY_PLACEHOLDER]
    note = early_note("/etc/pg_zfs.conf 1 2 3 4 5", "/c/down-h1", ssh)
    argv = fetch.early_fetch_argv(note, "/etc/pg_zfs.conf 1 2 3 4 5", NAME, None, 1000.0)
    assert argv == ssh[:-1] + ["sh -c 'serve' pg_wal_fetch-request fetch 1 " + NAME]
    assert fetch.early_note_memo(note) == "/c/down-h1"
    # The config written since (another identity), a name that is not a segment.
    assert fetch.early_fetch_argv(note, "/etc/pg_zfs.conf 1 2 3 4 6", NAME, None, 1000.0) is None
    for name in ("00000002.history", NAME + ".partial", "../" + NAME[3:]):
        assert fetch.early_fetch_argv(note, "/etc/pg_zfs.conf 1 2 3 4 5", name, None, 1000.0) is None
    # The source failed a moment ago: the rest asks it last, so nothing starts early.
    assert fetch.early_fetch_argv(note, "/etc/pg_zfs.conf 1 2 3 4 5", NAME, 990.0, 1000.0) is None
    assert fetch.early_fetch_argv(note, "/etc/pg_zfs.conf 1 2 3 4 5", NAME, 1000.0 - fetch.DOWN_MEMO,
                                  1000.0) == argv
    # Not a note this version writes.
    for bad in ("", "/etc/pg_zfs.conf 1 2 3 4 5", early_note("/etc/pg_zfs.conf 1 2 3 4 5", "/c/down-h1",
                                                                ["ssh", "host", "fetch 2 " + fetch.EARLY_PLACEHOLDER])):
        assert fetch.early_fetch_argv(bad, "/etc/pg_zfs.conf 1 2 3 4 5", NAME, None, 1000.0) is None
    assert fetch.early_note_memo(early_note("x", "relative/down-h1", ssh)) is None


@pytest.mark.parametrize("argv, words", [
    ([NAME, "pg_wal/RECOVERYXLOG"], (None, NAME, "pg_wal/RECOVERYXLOG")),
    (["-c", "/etc/x.conf", NAME, "pg_wal/X"], ("/etc/x.conf", NAME, "pg_wal/X")),
    (["--config", "/etc/x.conf", NAME, "pg_wal/X"], ("/etc/x.conf", NAME, "pg_wal/X")),
    ([NAME, "-v", "pg_wal/X"], None),
    (["--check"], None),
    (["-c", "/etc/x.conf", "-" + NAME, "pg_wal/X"], None),
])
def test_the_forms_of_a_restore_command_call(argv, words):
    assert fetch.restore_words(argv) == words
    assert fetch.restore_words(["-v"] + argv, verbose_too=True) == words
    if words:
        assert fetch.restore_words(argv[:-2] + ["--verbose", argv[-2], argv[-1]], verbose_too=True) == words


class EarlyPlace(object):
    """What start_early_fetch reads: a config, a private spool_root/.code with a
    note, a private control dir for the memo, a data directory (the cwd)."""

    def __init__(self, tmp_path, argv):
        self.config = str(tmp_path / "pg_zfs.conf")
        with open(self.config, "w") as out:
            out.write("[archive]\nprefetch = 0\n")
        self.spool_root = str(tmp_path / "spool")
        self.code = os.path.join(self.spool_root, fetch.CODE_DIR)
        os.makedirs(self.code, 0o700)
        self.control = str(tmp_path / "c")
        os.mkdir(self.control, 0o700)
        self.memo = os.path.join(self.control, "down-h1")
        self.data = tmp_path / "data"
        (self.data / "pg_wal").mkdir(parents=True)
        self.write(argv)

    def write(self, argv):
        with open(os.path.join(self.code, fetch.EARLY_NOTE), "w") as out:
            out.write(early_note(fetch.config_identity(self.config), self.memo, argv))

    def start(self):
        fetch.start_early_fetch(["-c", self.config, NAME, "pg_wal/RECOVERYXLOG"], self.spool_root)
        return fetch.EARLY.pop() if fetch.EARLY else None


def test_the_early_process_runs_the_noted_command_as_subprocess_would(tmp_path, monkeypatch):
    # A real fork and exec: stdout a pipe, stderr an unnamed file, stdin /dev/null,
    # cwd /, SIGPIPE back to its default, no descriptor of ours inherited.
    script = ('printf "%s|\\n" "$0" "$@"; pwd; cat; grep SigIgn /proc/$$/status; ls /proc/$$/fd; '
              'echo complaint >&2; exit 3')
    place = EarlyPlace(tmp_path, ["sh", "-c", script, "x fetch 1 " + fetch.EARLY_PLACEHOLDER])
    monkeypatch.chdir(place.data)
    kept_open = open(place.config)
    os.set_inheritable(kept_open.fileno(), True)     # as a descriptor PostgreSQL let us inherit
    try:
        proc = place.start()
        assert proc is not None
        out = proc.stdout.read().decode()
        assert proc.wait() == 3 and proc.poll() == 3
    finally:
        kept_open.close()
    words, cwd, ignored, descriptors = out.split("\n", 3)
    assert words == "x fetch 1 %s|" % NAME and cwd == "/"
    assert int(ignored.split()[1], 16) & (1 << 12) == 0          # SIGPIPE (13) not ignored
    assert sorted(descriptors.split()) == ["0", "1", "2"]
    proc.errors.seek(0)
    assert proc.errors.read() == b"complaint\n"


def test_no_early_process_from_a_note_others_could_have_written_or_for_a_failing_source(tmp_path, monkeypatch):
    place = EarlyPlace(tmp_path, ["sh", "-c", "exit 0 # fetch 1 " + fetch.EARLY_PLACEHOLDER])
    monkeypatch.chdir(place.data)
    os.chmod(place.code, 0o770)                   # the note's directory writable by a group
    assert place.start() is None
    os.chmod(place.code, 0o700)
    os.chmod(place.control, 0o777)                # the memo's (the control dir) by anyone
    assert place.start() is None
    os.chmod(place.control, 0o700)
    open(place.memo, "w").close()                 # the source failed a moment ago
    assert place.start() is None
    os.utime(place.memo, (0, 0))                  # long ago
    proc = place.start()
    assert proc is not None and proc.wait() == 0
    with open(place.config, "a") as out:          # the config changed since the note
        out.write("# edited\n")
    assert place.start() is None


def test_an_early_process_the_rest_does_not_adopt_is_stopped(tmp_path, monkeypatch):
    place = EarlyPlace(tmp_path, ["sh", "-c", "exec sleep 30 # fetch 1 " + fetch.EARLY_PLACEHOLDER])
    monkeypatch.chdir(place.data)
    fetch.start_early_fetch(["-c", place.config, NAME, "pg_wal/RECOVERYXLOG"], place.spool_root)
    assert len(fetch.EARLY) == 1
    proc = fetch.EARLY[0]
    assert fetch.adopt_early(["ssh", "another", "command"]) is None
    assert fetch.EARLY == [] and proc.poll() == -9
    # Adopted when it is the very command; stop_children stops what was not adopted.
    fetch.start_early_fetch(["-c", place.config, NAME, "pg_wal/RECOVERYXLOG"], place.spool_root)
    same = fetch.EARLY[0]
    assert fetch.adopt_early(list(same.args)) is same and fetch.EARLY == []
    fetch.EARLY.append(same)
    fetch.stop_children()
    assert same.poll() == -9 and fetch.EARLY == [] and fetch.RUNNING == []


def test_the_noted_command_is_the_one_fetch_remote_runs_and_a_bad_one_is_never_noted(tmp_path):
    # What the rest adopts is compared word for word (adopt_early): the note must
    # give, for any name, exactly fetch_remote's command for copy 1 of it.
    settings = settings_for(tmp_path)
    spool_root = str(tmp_path / "spool")
    fetch.note_early_fetch(settings, spool_root)
    with open(os.path.join(spool_root, fetch.CODE_DIR, fetch.EARLY_NOTE), "rb") as note_file:
        note = note_file.read().decode()
    source = settings.sources[0]
    expected = fetch.ssh_argv(source, settings, fetch.remote_command(source.path, fetch.fetch_request([NAME])))
    assert fetch.early_fetch_argv(note, fetch.config_identity(settings.config_path), NAME, None,
                                  1000.0) == expected
    assert fetch.early_note_memo(note) == "/tmp/ctl/down-a"
    # ssh_options that do not parse: no note, and no error (the source may be asked last).
    bad = settings_for(tmp_path, ssh_options="-o 'oops")
    other_root = str(tmp_path / "other")
    assert fetch.note_early_fetch(bad, other_root) is None
    assert not os.path.exists(os.path.join(other_root, fetch.CODE_DIR, fetch.EARLY_NOTE))
