"""qemu/logwrites.py on logs built here from the format description (no QEMU boots)."""

from __future__ import annotations

import struct

import pytest

from qemu import logwrites
from qemu.logwrites import DISCARD, FLUSH, MARK, parse, replay, states_at_flushes
from statefsd.errors import CorruptImage, FormatError

S = 512


def build_log(entries, *, counted=None, sector_size=S, tail=b""):
    """Encode (sector, nr_sectors, flags, data, mark) entries; the superblock counts `counted`."""
    body = b""
    for sector, nr, flags, data, mark in entries:
        head = struct.pack("<QQQQ", sector, nr, flags, len(mark)) + mark
        body += head.ljust(sector_size, b"\0") + data
    n = len(entries) if counted is None else counted
    sup = struct.pack("<QQQI", 0x6A736677736872, 1, n, sector_size).ljust(sector_size, b"\0")
    return sup + body + tail


def write(sector, fill, nr=1):
    return (sector, nr, 0, bytes([fill]) * (nr * S), b"")


FLUSH_ENTRY = (0, 0, FLUSH, b"", b"")


def test_writes_and_flushes_read_back_in_log_order():
    log = parse(build_log([write(2, 1), FLUSH_ENTRY, write(8, 2, nr=2), FLUSH_ENTRY]))
    assert log.sector_size == S and log.nr_entries == 4
    assert [(e.offset, e.length, e.is_flush) for e in log.entries] == [
        (2 * S, S, False), (0, 0, True), (8 * S, 2 * S, False), (0, 0, True)]
    assert log.entries[2].data == b"\2" * (2 * S)
    assert log.flush_indexes() == [1, 3]


def test_state_at_each_flush_holds_exactly_the_writes_before_it():
    log = parse(build_log([write(0, 1), FLUSH_ENTRY, write(1, 2), write(0, 3), FLUSH_ENTRY]))
    states = list(states_at_flushes(log, bytes(4 * S)))
    assert [i for i, _ in states] == [1, 4]
    first, second = states[0][1], states[1][1]
    assert first[:S] == b"\1" * S and first[S:] == bytes(3 * S)
    assert second[:2 * S] == b"\3" * S + b"\2" * S


def test_file_that_is_not_a_log_is_refused():
    with pytest.raises(FormatError, match="not a dm-log-writes log"):
        parse(b"\0" * 4096)
    with pytest.raises(FormatError, match="no superblock"):
        parse(b"short")


def test_unsupported_version_and_bad_sector_size_are_refused():
    log = bytearray(build_log([]))
    struct.pack_into("<Q", log, 8, 2)
    with pytest.raises(FormatError, match="version 2"):
        parse(bytes(log))
    log = bytearray(build_log([]))
    struct.pack_into("<I", log, 24, 1000)
    with pytest.raises(FormatError, match="bad sector size 1000"):
        parse(bytes(log))


def test_unknown_flags_inside_the_counted_entries_are_corruption():
    data = build_log([write(0, 1), (0, 0, 0x40, b"", b""), FLUSH_ENTRY])
    with pytest.raises(CorruptImage, match=r"entry 1 at byte 1536: unknown flags 0x40"):
        parse(data)


def test_counted_entry_cut_short_by_the_end_of_the_log_is_corruption():
    data = build_log([write(0, 1, nr=4)])[:-S]
    with pytest.raises(CorruptImage, match="run past the end of the log"):
        parse(data)


def test_entries_after_the_last_flush_are_kept_and_marked():
    log = parse(build_log([write(0, 1), FLUSH_ENTRY, write(1, 2)], counted=2))
    assert [e.after_last_flush for e in log.entries] == [False, False, True]
    assert log.nr_entries == 2


def test_torn_entry_after_the_last_flush_ends_the_log_quietly():
    data = build_log([write(0, 1), FLUSH_ENTRY, write(1, 2), write(2, 3, nr=8)], counted=2)
    log = parse(data[:-S])  # the last write lost its final sector: QEMU was killed mid-log
    assert [e.index for e in log.entries] == [0, 1, 2]


def test_blank_space_after_the_entries_ends_the_log():
    log = parse(build_log([write(0, 1), FLUSH_ENTRY], tail=bytes(8 * S)))
    assert len(log.entries) == 2


def test_discard_has_no_data_and_zeroes_its_range_on_replay():
    log = parse(build_log([write(0, 7, nr=2), (1, 1, DISCARD, b"", b""), write(3, 9)]))
    assert log.entries[1].data == b"" and log.entries[1].length == S
    disk = replay(log.entries, bytearray(4 * S))
    assert disk == b"\7" * S + bytes(2 * S) + b"\x09" * S


def test_mark_entry_carries_its_name_and_writes_nothing():
    log = parse(build_log([(0, 0, MARK, b"", b"mkfs-done"), write(0, 1)]))
    assert log.entries[0].mark == "mkfs-done"
    assert not log.entries[0].is_write
    assert replay(log.entries, bytearray(S)) == b"\1" * S


def test_replay_refuses_a_write_past_the_end_of_the_disk():
    log = parse(build_log([write(4, 1)]))
    with pytest.raises(CorruptImage, match="past the end of the disk"):
        replay(log.entries, bytearray(4 * S))


def test_larger_log_sector_sizes_scale_offsets_and_data():
    big = 4096
    data = build_log([(3, 1, 0, b"\5" * big, b""), (0, 0, FLUSH, b"", b"")], sector_size=big)
    log = parse(data)
    assert (log.entries[0].offset, log.entries[0].length) == (3 * big, big)


def test_read_log_reads_a_file(tmp_path):
    path = tmp_path / "w.log"
    path.write_bytes(build_log([write(0, 1), FLUSH_ENTRY]))
    assert len(logwrites.read_log(path).entries) == 2
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match="no superblock"):
        logwrites.read_log(empty)
