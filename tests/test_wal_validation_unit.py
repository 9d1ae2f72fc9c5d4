"""pg_wal_fetch.py's whole-segment checks (check_pages, walk_records, the CRC-32C
engines) on REAL WAL segments.

The segments come from a throw-away PostgreSQL 15 cluster (tests/walgen.py),
built once per session in a temporary directory. Each damage is applied to a
copy of a real segment; the verdict is compared with PostgreSQL's own reader:
pg_waldump -z FILE (exit 0 = valid). `pytest -s` prints the comparison.
bench/wal_fetch.py times the checks.
"""

import json
import mmap
import os
import random
import re
import shutil
import socket
import struct
import subprocess

import pytest

import walgen
from testbed import load_script

validator = load_script("pg_wal_fetch")
PG_WALDUMP = os.path.join(walgen.PG_BINDIR, "pg_waldump")
MAGICS = frozenset([validator.PAGE_MAGIC["15"]])
PAGE = 8192
ROLES = ("small", "fpi", "switch", "covered", "timeline2", "partial", "partial_recycled")
COMPARISON = []     # (case, our verdict, pg_waldump's), printed by the last test


@pytest.fixture(scope="module")
def wal(tmp_path_factory):
    """{role: (wal name, bytes)} of the real segments, made by a real PostgreSQL 15."""
    wal_dir = str(tmp_path_factory.mktemp("wal"))
    walgen.make_fixtures(wal_dir)
    with open(os.path.join(wal_dir, "manifest.json")) as manifest_file:
        manifest = json.load(manifest_file)
    segments = {}
    for role, name in manifest.items():
        with open(os.path.join(wal_dir, role, name), "rb") as segment_file:
            segments[role] = (name, segment_file.read())
    shutil.rmtree(wal_dir)
    return segments


def kind_of(wal_name):
    return "partial" if wal_name.endswith(".partial") else "segment"


def verdict(wal_name, segment, crc32c=validator.crc32c_python):
    """What pg_wal_fetch would say: None (deliver) or the first reason."""
    kind = kind_of(wal_name)
    return (validator.check_segment(segment[:validator.LONG_HEADER.size], len(segment),
                                    wal_name[:24], None, MAGICS)
            or validator.check_pages(segment, wal_name, MAGICS, kind)
            or validator.walk_records(segment, wal_name, kind, crc32c))


def waldump_verdict(wal_name, segment, tmp_path):
    """None if pg_waldump -z reads the segment without error, else its message."""
    directory = tmp_path / ("waldump-%d" % random.getrandbits(32))
    directory.mkdir()
    path = directory / wal_name[:24]          # pg_waldump wants a plain segment name
    path.write_bytes(bytes(segment))
    proc = subprocess.Popen([PG_WALDUMP, "-z", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    _out, err = proc.communicate(timeout=120)
    path.unlink()
    directory.rmdir()
    if proc.returncode == 0:
        return None
    return err.strip().splitlines()[-1].replace("pg_waldump: error: ", "")


def records(wal_name, segment, tmp_path):
    """[(offset, total length)] of the records pg_waldump lists in the segment."""
    directory = tmp_path / "list"
    directory.mkdir(exist_ok=True)
    path = directory / wal_name[:24]
    path.write_bytes(segment)
    out = subprocess.Popen([PG_WALDUMP, str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           universal_newlines=True).communicate()[0]
    start = int(wal_name[8:16], 16) << 32 | int(wal_name[16:24], 16) * len(segment)
    found = []
    for match in re.finditer(r"len \(rec/tot\):\s*\d+/\s*(\d+), tx:\s*\d+, lsn: ([0-9A-F]+)/([0-9A-F]+)", out):
        lsn = int(match.group(2), 16) << 32 | int(match.group(3), 16)
        found.append((lsn - start, int(match.group(1))))
    return found


def record_in_page(wal_name, segment, tmp_path, after):
    """Offset of the first record at or after offset `after` that lies whole in one page."""
    for offset, length in records(wal_name, segment, tmp_path):
        if offset >= after and offset % PAGE + length <= PAGE:
            return offset
    raise AssertionError("no record after %d" % after)


def lsn_text(wal_name, segment, offset):
    start = int(wal_name[8:16], 16) << 32 | int(wal_name[16:24], 16) * len(segment)
    return validator.format_lsn(start + offset)


# ---------------------------------------------------------------------------
# CRC-32C
# ---------------------------------------------------------------------------

def bitwise_crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _bit in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_pure_python_crc32c_gives_the_standard_check_value():
    assert validator.crc32c_python([b"123456789"]) == 0xE3069283
    assert validator.crc32c_python([b"1234", memoryview(b"56789")]) == 0xE3069283
    assert validator.crc32c_python([]) == 0


def test_pure_python_crc32c_matches_a_bitwise_reference_for_any_length_and_split():
    rnd = random.Random(15)
    messages, expected = [], []
    for length in list(range(0, 600)) + [4095, 4096, 8191, 8192, 100003]:
        data = bytes(rnd.getrandbits(8) for _ in range(length))
        cuts = sorted(rnd.randrange(length + 1) for _ in range(rnd.randrange(4)))
        parts = [data[a:b] for a, b in zip([0] + cuts, cuts + [length])]
        messages.append([memoryview(part) for part in parts] if length % 3 == 0 else parts)
        expected.append(bitwise_crc32c(data))
    order = list(range(len(messages)))
    rnd.shuffle(order)
    assert validator.crc32c_python_many([messages[i] for i in order]) == [expected[i] for i in order]


class FakeAlgSocket(object):
    """Stands in for an AF_ALG "hash"/"crc32c" socket (this kernel has none):
    digests like the kernel does (a send without MSG_MORE ends the digest, the
    next send starts a new one) and, like sendmsg, takes at most 1024 parts."""

    def __init__(self, *args):
        self.pending = b""
        self.digest = None

    def bind(self, address):
        if address != ("hash", "crc32c"):
            raise OSError("unknown algorithm")

    def accept(self):
        return FakeAlgSocket(), None

    def sendmsg(self, buffers, ancdata=(), flags=0):
        buffers = list(buffers)
        if len(buffers) > 1024:
            raise OSError(22, "Invalid argument")
        data = b"".join(bytes(buffer) for buffer in buffers)
        self.pending += data
        if not flags & socket.MSG_MORE:
            self.digest = bitwise_crc32c(self.pending).to_bytes(4, "little")
            self.pending = b""
        return len(data)

    def recv(self, size):
        return self.digest[:size]

    def close(self):
        pass


def test_kernel_crc32c_is_used_through_af_alg_when_the_kernel_has_it(monkeypatch):
    monkeypatch.setattr(socket, "socket", FakeAlgSocket)
    kernel = validator.crc32c_kernel()
    assert kernel is not None
    assert kernel([b"123456789"]) == 0xE3069283
    many_parts = [bytes([i % 251]) * 7 for i in range(1500)]     # more than one sendmsg
    assert kernel(many_parts) == bitwise_crc32c(b"".join(many_parts))
    assert kernel.many([[b"1234", b"56789"], [b""]]) == [0xE3069283, 0]
    assert validator.crc32c_engine() is not validator.crc32c_python


def test_crc32c_engine_falls_back_to_python_without_af_alg(monkeypatch):
    def no_alg(*args):
        raise OSError(97, "Address family not supported by protocol")
    monkeypatch.setattr(socket, "socket", no_alg)
    assert validator.crc32c_kernel() is None
    assert validator.crc32c_engine() is validator.crc32c_python


def test_crc32c_engine_on_this_machine_gives_the_check_value():
    engine = validator.crc32c_engine()
    print("\nCRC-32C engine here: %s" % ("kernel (AF_ALG)" if engine is not validator.crc32c_python
                                          else "pure Python (no AF_ALG in this kernel)"))
    assert engine([b"123456789"]) == 0xE3069283


# ---------------------------------------------------------------------------
# Real segments pass
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("role", ROLES)
def test_every_real_segment_passes_page_and_record_checks(wal, role):
    wal_name, segment = wal[role]
    assert verdict(wal_name, segment) is None


def test_a_real_segment_passes_with_the_engine_of_this_machine(wal):
    wal_name, segment = wal["fpi"]
    assert validator.walk_records(segment, wal_name, "segment", validator.crc32c_engine()) is None


@pytest.mark.parametrize("role", ["switch", "timeline2", "partial_recycled"])
def test_a_real_segment_passes_with_the_af_alg_path_too(wal, monkeypatch, role):
    monkeypatch.setattr(socket, "socket", FakeAlgSocket)
    kernel = validator.crc32c_kernel()
    wal_name, segment = wal[role]
    assert validator.walk_records(segment, wal_name, kind_of(wal_name), kernel) is None


def test_segments_are_read_from_bytes_memoryview_and_mmap_alike(wal, tmp_path):
    wal_name, segment = wal["fpi"]
    path = tmp_path / wal_name
    path.write_bytes(segment)
    with open(str(path), "rb") as segment_file:
        mapped = mmap.mmap(segment_file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            for data in (segment, memoryview(segment), mapped):
                assert validator.check_pages(data, wal_name, MAGICS) is None
                assert validator.walk_records(data, wal_name, "segment", validator.crc32c_python) is None
        finally:
            mapped.close()         # fails if a view into the map was kept


def test_what_the_real_segments_hold(wal):
    """The fixtures are what the tests think they are."""
    _name, small = wal["small"]
    assert small.count(b"\0" * PAGE) == 0                       # full, no switch
    _name, covered = wal["covered"]
    assert all(struct.unpack_from("=H", covered, offset + 2)[0] & validator.XLP_FIRST_IS_CONTRECORD
               for offset in range(0, len(covered), PAGE))       # one record throughout
    _name, timeline2 = wal["timeline2"]
    assert struct.unpack_from("=I", timeline2, 4)[0] == 1        # parent's page first
    assert struct.unpack_from("=I", timeline2, PAGE + 4)[0] == 2
    _name, recycled = wal["partial_recycled"]
    assert struct.unpack_from("=H", recycled, PAGE)[0] == validator.PAGE_MAGIC["15"]


def test_a_recycled_partial_is_valid_only_as_a_partial(wal):
    """A .partial is the file the old timeline's server was writing: past its
    last record, an older segment's pages (recycled file)."""
    wal_name, segment = wal["partial_recycled"]
    assert "page address" in validator.check_pages(segment, wal_name, MAGICS, "segment")
    assert validator.check_pages(segment, wal_name, MAGICS, "partial") is None
    assert "without a switch record" in validator.walk_records(
        segment, wal_name, "segment", validator.crc32c_python)
    assert validator.walk_records(segment, wal_name, "partial", validator.crc32c_python) is None


# ---------------------------------------------------------------------------
# Damaged segments are refused, with a reason naming the place
# ---------------------------------------------------------------------------

def flip(segment, offset, bit=0):
    damaged = bytearray(segment)
    damaged[offset] ^= 1 << bit
    return bytes(damaged)


def put(segment, offset, chunk):
    damaged = bytearray(segment)
    damaged[offset:offset + len(chunk)] = chunk
    return bytes(damaged)


def damage_record_data(wal, tmp_path):
    name, segment = wal["small"]
    offset = record_in_page(name, segment, tmp_path, 5 << 20)
    return name, flip(segment, offset + 30), r"record at %s: CRC mismatch" % lsn_text(name, segment, offset)


def damage_record_header_xid(wal, tmp_path):
    name, segment = wal["small"]
    offset = record_in_page(name, segment, tmp_path, 6 << 20)
    return name, flip(segment, offset + 4), r"record at %s: CRC mismatch" % lsn_text(name, segment, offset)


def damage_record_header_prev_link(wal, tmp_path):
    name, segment = wal["small"]
    offset = record_in_page(name, segment, tmp_path, 7 << 20)
    return name, flip(segment, offset + 8, 3), r"record at %s: previous record link" % lsn_text(name, segment, offset)


def damage_fpi_record_data(wal, tmp_path):
    name, segment = wal["fpi"]
    for offset, length in records(name, segment, tmp_path):
        if offset >= 3 << 20 and length > 4000 and offset % PAGE < PAGE - 200:
            return name, flip(segment, offset + 100), r"record at %s: CRC mismatch" % lsn_text(name, segment, offset)
    raise AssertionError("no full-page image record")


def damage_page_100_address(wal, tmp_path):
    name, segment = wal["small"]
    return name, flip(segment, 100 * PAGE + 8), r"page 100 \(offset 819200\): page address %s, expected %s" % (
        lsn_text(name, segment, 100 * PAGE + 1), lsn_text(name, segment, 100 * PAGE))


def damage_zeros_from_8_mib(wal, tmp_path):
    name, segment = wal["small"]
    return name, segment[:8 << 20] + bytes(len(segment) - (8 << 20)), \
        r"WAL ends at %s.* without a switch record: zero-filled or truncated copy" % lsn_text(name, segment, 8 << 20)


def damage_last_page_zeroed(wal, tmp_path):
    name, segment = wal["small"]
    return name, segment[:-PAGE] + bytes(PAGE), \
        r"WAL ends at %s.* without a switch record" % lsn_text(name, segment, len(segment) - PAGE)


def damage_zero_page_then_valid_page(wal, tmp_path):
    name, segment = wal["small"]
    return name, put(segment, 500 * PAGE, bytes(PAGE)), \
        r"page 501 \(offset 4104192\): data after the zero-filled page 500 \(offset 4096000\) \(a hole\)"


def damage_page_from_another_segment(wal, tmp_path):
    name, segment = wal["small"]
    _other_name, other = wal["fpi"]
    return name, put(segment, 300 * PAGE, other[300 * PAGE:301 * PAGE]), \
        r"page 300 \(offset 2457600\): page address %s, expected %s" % (
            lsn_text(_other_name, other, 300 * PAGE), lsn_text(name, segment, 300 * PAGE))


def damage_magic_of_another_version(wal, tmp_path):
    name, segment = wal["small"]
    return name, put(segment, 1000 * PAGE, struct.pack("=H", validator.PAGE_MAGIC["14"])), \
        r"page 1000 \(offset 8192000\): page magic 0xD10D, expected 0xD110"


def damage_timeline_goes_down(wal, tmp_path):
    name, segment = wal["timeline2"]
    return name, put(segment, 50 * PAGE + 4, struct.pack("=I", 1)), \
        r"page 50 \(offset 409600\): timeline 1 after timeline 2"


def damage_continuation_length(wal, tmp_path):
    name, segment = wal["fpi"]
    for page in range(10, 2048):
        info, rem_len = struct.unpack_from("=H", segment, page * PAGE + 2)[0], \
            struct.unpack_from("=I", segment, page * PAGE + 16)[0]
        if info & validator.XLP_FIRST_IS_CONTRECORD and rem_len > 8:
            return name, put(segment, page * PAGE + 16, struct.pack("=I", rem_len - 8)), \
                r"record at [0-9A-F/]+: page %d \(offset %d\) says %d bytes to come, expected %d" % (
                    page, page * PAGE, rem_len - 8, rem_len)
    raise AssertionError("no continuation page")


def damage_byte_after_switch_record(wal, tmp_path):
    name, segment = wal["switch"]
    return name, flip(segment, 6000), r"data after the switch record at [0-9A-F/]+, at %s" % lsn_text(
        name, segment, 6000)


def damage_record_in_a_partial(wal, tmp_path):
    name, segment = wal["partial_recycled"]          # its one record: a checkpoint at offset 40
    return name, flip(segment, 40 + 24 + 16), r"record at %s: CRC mismatch" % lsn_text(name, segment, 40)


DAMAGES = [
    damage_record_data, damage_record_header_xid, damage_record_header_prev_link,
    damage_fpi_record_data, damage_page_100_address, damage_zeros_from_8_mib,
    damage_last_page_zeroed, damage_zero_page_then_valid_page,
    damage_page_from_another_segment, damage_magic_of_another_version,
    damage_timeline_goes_down, damage_continuation_length,
    damage_byte_after_switch_record, damage_record_in_a_partial,
]
# Where pg_waldump -z and we disagree, and why (see also the originals below).
WALDUMP_ACCEPTS = {
    # pg_waldump, like recovery, jumps to the next segment after a switch
    # record and never looks at the rest of the file.
    "damage_byte_after_switch_record",
}


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__ for d in DAMAGES])
def test_damaged_segment_is_refused_with_a_reason_naming_the_place(wal, tmp_path, damage):
    wal_name, damaged, expected = damage(wal, tmp_path)
    ours = verdict(wal_name, damaged)
    theirs = waldump_verdict(wal_name, damaged, tmp_path)
    COMPARISON.append((damage.__name__[len("damage_"):], ours, theirs))
    assert ours is not None and re.search(expected, ours), ours
    assert (theirs is None) == (damage.__name__ in WALDUMP_ACCEPTS), theirs


def test_damaged_segment_is_refused_with_the_python_crc_and_the_af_alg_path(wal, tmp_path, monkeypatch):
    wal_name, damaged, expected = damage_record_data(wal, tmp_path)
    assert re.search(expected, validator.walk_records(damaged, wal_name, "segment", validator.crc32c_python))
    monkeypatch.setattr(socket, "socket", FakeAlgSocket)
    kernel = validator.crc32c_kernel()
    assert re.search(expected, validator.walk_records(damaged, wal_name, "segment", kernel))


@pytest.mark.parametrize("garbage", [b"", b"\xff" * 39, bytes(8192), b"\x10\xd1\x02\x00" + bytes(8188)])
def test_garbage_gives_a_reason_never_an_exception(garbage):
    wal_name = "000000010000000000000003"
    assert isinstance(validator.check_pages(garbage, wal_name, MAGICS), str)
    assert isinstance(validator.walk_records(garbage, wal_name, "segment", validator.crc32c_python), str)


@pytest.mark.parametrize("role,rounds", [("timeline2", 60), ("fpi", 15)])
def test_random_damage_never_raises(wal, role, rounds):
    """Bytes anywhere (headers, lengths, links) give None or a reason, never an exception."""
    rnd = random.Random(18)
    wal_name, segment = wal[role]
    for _ in range(rounds):
        damaged = bytearray(segment)
        offset = rnd.choice([rnd.randrange(len(segment)), rnd.randrange(2048) * PAGE + rnd.randrange(24),
                             rnd.randrange(300 * PAGE)])
        damaged[offset:offset + 4] = struct.pack("=I", rnd.getrandbits(32))
        damaged = bytes(damaged)
        for kind in ("segment", "partial"):
            problem = validator.check_pages(damaged, wal_name, MAGICS, kind)
            problem = validator.walk_records(damaged, wal_name, kind, validator.crc32c_python)
            assert problem is None or isinstance(problem, str)


# ---------------------------------------------------------------------------
# The verdicts side by side, and the timings
# ---------------------------------------------------------------------------

def test_originals_compared_with_pg_waldump(wal, tmp_path):
    """pg_waldump cannot read a segment that lies inside one record, and it
    reports the end of WAL of a .partial as an error; we accept both."""
    for role in ROLES:
        wal_name, segment = wal[role]
        theirs = waldump_verdict(wal_name, segment, tmp_path)
        COMPARISON.append(("original " + role, verdict(wal_name, segment), theirs))
        assert (theirs is None) == (role not in ("covered", "partial", "partial_recycled")), theirs


def test_zz_print_the_comparison_with_pg_waldump():
    print("\n%-28s | %-70s | %s" % ("case", "our verdict", "pg_waldump -z"))
    for case, ours, theirs in COMPARISON:
        print("%-28s | %-70s | %s" % (case, (ours or "valid")[:70], (theirs or "valid")[:90]))
