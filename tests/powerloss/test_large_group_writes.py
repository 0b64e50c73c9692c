"""A large group goes out as two writes of adjacent sectors before its one
flush (its leading sectors while the COMMIT digests are computed), and a
power cut anywhere in between leaves its transaction whole or absent, with
the image still mountable read-write (a torn tail, never corruption)."""

from __future__ import annotations

import pytest

from statefsd.storage import format as fmt
from statefsd.storage.logwriter import EARLY_WRITE_MIN
from statefsd.testing.campaign.systems import System, format_image
from statefsd.testing.simdev import CrashModel

BIG = 1 << 20


def _value(tag: bytes, size: int) -> bytes:
    return (tag * (size // len(tag) + 1))[:size]


def _ops_of_one_put(engine, device, key: str, value: bytes) -> list:
    submit = len(device.trace)
    engine.put(key, value)
    return list(device.trace)[submit:]


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_large_transaction_is_written_as_two_adjacent_writes_and_one_flush(encrypted):
    device = format_image(f"large-group/{encrypted}", encryption=encrypted, model=CrashModel(),
                          size=8 << 20)
    engine = System().mount(device)
    try:
        ops = _ops_of_one_put(engine, device, "big", _value(b"v1", BIG))
        assert [op.kind for op in ops] == ["write", "write", "flush"]
        head, rest = ops[0], ops[1]
        assert head.offset + head.length == rest.offset
        assert head.length >= EARLY_WRITE_MIN and head.offset % fmt.GROUP_ALIGN == 0
        # The first write holds no COMMIT; the second starts in the sector of the first one.
        assert fmt.COMMIT not in {fmt.unpack_header(head.data, at).type for at in _record_starts(head.data)}
        assert engine.get("big") == _value(b"v1", BIG)
    finally:
        engine.close()


def test_a_small_transaction_is_still_one_write_and_one_flush():
    device = format_image("small-group", encryption=False, model=CrashModel(), size=4 << 20)
    engine = System().mount(device)
    try:
        ops = _ops_of_one_put(engine, device, "small", b"x" * 100)
        assert [op.kind for op in ops] == ["write", "flush"]
    finally:
        engine.close()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_power_cut_anywhere_in_a_large_group_leaves_its_value_whole_or_absent(encrypted):
    device = format_image(f"large-cut/{encrypted}", encryption=encrypted, model=CrashModel(), size=8 << 20)
    system = System()
    engine = system.mount(device)
    old, new = _value(b"old", 300 << 10), _value(b"new", BIG)
    engine.put("k", old)
    engine.put("other", b"kept")
    submit = len(device.trace)
    engine.put("k", new)
    ack = len(device.trace)
    engine.close()
    seen = set()
    for point in device.trace.crash_points(submit, ack):
        for outcome in point.outcomes(limit=24, rng=point.index):
            crashed = system.mount(point.device(outcome))
            try:
                assert not crashed.read_only, f"cut after op {point.index} ({outcome.encode()})"
                value = crashed.get("k")
                assert value in (old, new), f"cut after op {point.index} ({outcome.encode()})"
                assert crashed.get("other") == b"kept"
                seen.add(value == new)
            finally:
                crashed.close()
    assert seen == {False, True}  # the cuts reached both sides of the flush


def _record_starts(data: bytes) -> list[int]:
    """Where the records of a group's leading bytes start (those wholly inside them)."""
    starts, at = [], 0
    while at + fmt.HEADER_SIZE <= len(data):
        starts.append(at)
        at += fmt.HEADER_SIZE + fmt.unpack_header(data, at).payload_len
    return starts
