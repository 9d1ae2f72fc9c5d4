"""setup_guest.py --init's pg_basebackup --progress, not on a terminal: which lines reach the log.

The texts are pg_basebackup's own, 9.6 to 18: its report
"%*s/%s kB (%d%%), %d/%d tablespace(s)" (the done figure right-aligned to the
total's width, a file name after it with -v), ended by \\r before 12 and by \\n
in a pipe since; "waiting for checkpoint" (10+, -P without -v); its errors, a
continuation line after a tab. The real run is in test_setup_guest.py
(test_init_builds_a_standby_on_new_datasets_with_pg_wal_off_zfs).
"""

import os
import threading

import pytest

from testbed import load_script

# pg_basebackup 15 -P into a pipe, two tablespaces (pg_default and one mapped).
PIPE_15 = (b"waiting for checkpoint\n"
           + b"".join(b"%5d/31245 kB (%d%%), 0/2 tablespaces\n" % (kb, kb * 100 // 31245)
                      for kb in range(0, 31245, 1024))
           + b"31245/31245 kB (100%), 1/2 tablespaces\n"
           + b"31245/31245 kB (100%), 2/2 tablespaces\n")
# pg_basebackup 9.6 -P into a pipe: \r after every report, \n at the very end.
PIPE_96 = (b"    0/22870 kB (0%), 0/1 tablespace\r"
           b" 9624/22870 kB (42%), 0/1 tablespace\r"
           b"22879/22879 kB (100%), 0/1 tablespace\r"
           b"22879/22879 kB (100%), 1/1 tablespace\r\n")
# pg_basebackup 15 when the primary does not answer.
REFUSED_15 = (b'pg_basebackup: error: connection to server at "127.0.0.1", port 5999 failed: Connection refused\n'
              b"\tIs the server running on that host and accepting TCP/IP connections?\n")


@pytest.fixture(scope="module")
def sg():
    return load_script("setup_guest")


def lines_through_a_pipe(sg, chunks):
    """pipe_lines over a real pipe into which chunks are written one by one."""
    read_end, write_end = os.pipe()

    def write():
        for chunk in chunks:
            os.write(write_end, chunk)
        os.close(write_end)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        return [line for _, line in sg.pipe_lines(read_end)]
    finally:
        writer.join()
        os.close(read_end)


def one_per_second(text):
    """(seconds, line): pg_basebackup reports at most once a second."""
    return [(float(second), line) for second, line in enumerate(text.decode().replace("\r", "\n").split("\n"))]


def test_pipe_lines_end_at_newline_or_carriage_return_even_across_reads(sg):
    assert lines_through_a_pipe(sg, [PIPE_96[:10], PIPE_96[10:50], PIPE_96[50:]]) == [
        "    0/22870 kB (0%), 0/1 tablespace", " 9624/22870 kB (42%), 0/1 tablespace",
        "22879/22879 kB (100%), 0/1 tablespace", "22879/22879 kB (100%), 1/1 tablespace", ""]
    assert lines_through_a_pipe(sg, [b"no newline at the end"]) == ["no newline at the end"]
    assert lines_through_a_pipe(sg, [REFUSED_15])[1] == \
        "\tIs the server running on that host and accepting TCP/IP connections?"


def test_a_report_passes_once_per_interval_and_the_last_one_always(sg):
    passed = list(sg.thin_progress(one_per_second(PIPE_15), interval=10))
    assert passed == [
        (False, "waiting for checkpoint"),
        (True, "0/31245 kB (0%), 0/2 tablespaces"),           # second 1: the first report
        (True, "10240/31245 kB (32%), 0/2 tablespaces"),      # second 11
        (True, "20480/31245 kB (65%), 0/2 tablespaces"),      # second 21
        (True, "30720/31245 kB (98%), 0/2 tablespaces"),      # second 31
        (True, "31245/31245 kB (100%), 2/2 tablespaces"),     # the last, held back until the end
    ]


def test_a_short_backup_logs_its_first_and_last_report(sg):
    assert list(sg.thin_progress(one_per_second(PIPE_96), interval=sg.PROGRESS_INTERVAL)) == [
        (True, "0/22870 kB (0%), 0/1 tablespace"), (True, "22879/22879 kB (100%), 1/1 tablespace")]


def test_every_message_passes_at_once_after_the_report_held_before_it(sg):
    timed = [(0.0, "    0/31245 kB (0%), 0/2 tablespaces"),
             (1.0, " 1024/31245 kB (3%), 0/2 tablespaces"),
             (2.0, " 2048/31245 kB (6%), 0/2 tablespaces"),
             (2.5, "pg_basebackup: error: could not read COPY data: server closed the connection unexpectedly"),
             (2.5, "\tThis probably means the server terminated abnormally"),
             (2.5, "pg_basebackup: removing contents of data directory \"/pool/g_data02/pgdata\"")]
    assert list(sg.thin_progress(timed, interval=10)) == [
        (True, "0/31245 kB (0%), 0/2 tablespaces"),
        (True, "2048/31245 kB (6%), 0/2 tablespaces"),
        (False, "pg_basebackup: error: could not read COPY data: server closed the connection unexpectedly"),
        (False, "\tThis probably means the server terminated abnormally"),
        (False, "pg_basebackup: removing contents of data directory \"/pool/g_data02/pgdata\"")]


def test_a_verbose_report_with_its_file_name_is_a_report_and_numbers_in_a_message_are_not(sg):
    timed = [(0.0, "  512/31245 kB (1%), 0/2 tablespaces (...pgdata/base/5/1259            )"),
             (0.5, "pg_basebackup: write-ahead log end point: 0/2000100"),
             (0.6, "pg_basebackup: error: could not write to file \"base/1/2/3\": No space left on device")]
    assert [is_progress for is_progress, _ in sg.thin_progress(timed)] == [True, False, False]


def test_a_failure_names_the_error_line_not_its_continuation(sg):
    messages = REFUSED_15.decode().splitlines()
    assert sg.basebackup_failure(messages, 1) == (
        'pg_basebackup failed: error: connection to server at "127.0.0.1", port 5999 failed: Connection refused')
    # 9.6 says it without "error:"; the clean-up note after the error is a line of its own.
    assert sg.basebackup_failure(["pg_basebackup: could not connect to server: Connection refused",
                                  "\tIs the server running on host \"127.0.0.1\" and accepting",
                                  "\tTCP/IP connections on port 5999?"], 1) == (
        "pg_basebackup failed: could not connect to server: Connection refused")
    assert sg.basebackup_failure([], 2) == "pg_basebackup failed: exit code 2"


def test_a_failure_mid_copy_names_the_error_not_the_clean_up_after_it(sg):
    messages = ["waiting for checkpoint",
                "pg_basebackup: error: could not read COPY data: server closed the connection unexpectedly",
                "\tThis probably means the server terminated abnormally",
                "pg_basebackup: removing contents of data directory \"/pool/g_data02/pgdata\""]
    assert sg.basebackup_failure(messages, 1) == (
        "pg_basebackup failed: error: could not read COPY data: server closed the connection unexpectedly")
    assert sg.basebackup_failure(["runuser: user postgres does not exist"], 1) == (
        "pg_basebackup failed: runuser: user postgres does not exist")
