"""The simulated device keeps the BlockDevice contract, records a replayable
trace, and builds crashed devices that share nothing mutable."""

from __future__ import annotations

import pytest

from statefsd.storage.blockdev import SECTOR
from statefsd.errors import InvalidArgument
from statefsd.testing.simdev import DROP, KEEP, CrashModel, Outcome, SimulatedDevice

KIB = 1024


def pattern(tag: int, length: int) -> bytes:
    return bytes((tag + i) % 251 for i in range(length))


def test_read_sees_unflushed_writes():
    dev = SimulatedDevice(64 * KIB, chunk_size=4 * KIB)
    dev.write(3 * KIB, pattern(1, 6 * KIB))          # spans two chunks, never flushed
    assert dev.read(3 * KIB, 6 * KIB) == pattern(1, 6 * KIB)
    assert dev.read(3 * KIB + 100, 50) == pattern(1, 6 * KIB)[100:150]
    assert dev.durable_image() == bytes(64 * KIB)


def test_flush_makes_every_earlier_write_durable():
    dev = SimulatedDevice(16 * KIB)
    dev.write(0, pattern(2, 2 * KIB))
    dev.write(SECTOR, pattern(3, SECTOR))
    dev.flush()
    assert dev.pending == ()
    assert dev.durable_image() == dev.image()
    assert dev.durable_image()[:2 * KIB] == pattern(2, SECTOR) + pattern(3, SECTOR) + pattern(2, 2 * KIB)[1024:]


def test_unaligned_or_out_of_range_writes_are_refused_with_clear_error():
    dev = SimulatedDevice(8 * KIB)
    with pytest.raises(InvalidArgument, match="unaligned"):
        dev.write(100, bytes(SECTOR))
    with pytest.raises(InvalidArgument, match="unaligned"):
        dev.write(0, bytes(100))
    with pytest.raises(InvalidArgument, match="outside device"):
        dev.write(8 * KIB, bytes(SECTOR))
    with pytest.raises(InvalidArgument, match="outside device"):
        dev.read(8 * KIB - 10, 20)
    assert dev.trace.ops == [] and dev.pending == ()
    assert dev.read(8 * KIB, 0) == b""


def test_bad_geometry_is_refused_with_clear_error():
    with pytest.raises(InvalidArgument, match="multiple of 512"):
        SimulatedDevice(1000)
    with pytest.raises(InvalidArgument, match="does not match"):
        SimulatedDevice(4096, image=bytes(1024))
    with pytest.raises(InvalidArgument, match="size or an image"):
        SimulatedDevice()


def test_power_cut_after_flush_keeps_everything():
    dev = SimulatedDevice(32 * KIB, chunk_size=2 * KIB)
    for i in range(10):
        dev.write(i * 3 * KIB % (30 * KIB), pattern(i, 3 * KIB))
    dev.flush()
    before = dev.image()
    crashed = dev.power_cut(Outcome(()))
    assert crashed.image() == before
    assert crashed.durable_image() == before


def test_power_cut_leaves_the_original_device_untouched():
    dev = SimulatedDevice(16 * KIB)
    dev.write(0, pattern(1, 4 * KIB))
    dev.flush()
    dev.write(0, pattern(9, 4 * KIB))
    image, durable = dev.image(), dev.durable_image()
    crashed = dev.power_cut(Outcome.drop_all(1))
    assert crashed.read(0, 4 * KIB) == pattern(1, 4 * KIB)
    assert dev.image() == image and dev.durable_image() == durable and len(dev.pending) == 1


def test_crashed_devices_from_one_point_do_not_share_writes():
    dev = SimulatedDevice(256 * KIB, chunk_size=16 * KIB)
    dev.write(0, pattern(1, 64 * KIB))
    dev.flush()
    dev.write(16 * KIB, pattern(2, 4 * KIB))
    point = dev.crash_point()
    first = point.device(Outcome.keep_all(1))
    second = point.device(Outcome.drop_all(1))
    first.write(0, pattern(7, 32 * KIB))          # touches chunks the sibling and the snapshot share
    first.flush()
    second.write(20 * KIB, pattern(8, KIB))
    assert second.read(0, 16 * KIB) == pattern(1, 64 * KIB)[:16 * KIB]
    assert second.read(16 * KIB, 4 * KIB) == pattern(1, 64 * KIB)[16 * KIB:20 * KIB]
    assert point.device(Outcome.keep_all(1)).read(16 * KIB, 4 * KIB) == pattern(2, 4 * KIB)
    assert dev.read(0, 16 * KIB) == pattern(1, 64 * KIB)[:16 * KIB]


def test_crashed_device_can_crash_again_during_recovery():
    dev = SimulatedDevice(16 * KIB)
    dev.write(0, pattern(1, KIB))
    crashed = dev.power_cut(Outcome.keep_all(1))
    crashed.write(KIB, pattern(2, KIB))            # recovery writes, unflushed
    again = crashed.power_cut(Outcome.drop_all(1))
    assert again.read(0, 2 * KIB) == pattern(1, KIB) + bytes(KIB)
    assert [op.kind for op in crashed.trace] == ["write"]
    assert crashed.trace.initial_image()[:KIB] == pattern(1, KIB)


def test_durable_image_round_trips_through_from_image():
    dev = SimulatedDevice(24 * KIB, chunk_size=4 * KIB)
    dev.write(2 * KIB, pattern(5, 10 * KIB))
    dev.flush()
    dev.write(0, pattern(6, KIB))                   # pending: not part of the durable image
    copy = SimulatedDevice.from_image(dev.durable_image())
    assert copy.size == dev.size
    assert copy.image() == dev.durable_image()
    assert copy.read(0, KIB) == bytes(KIB)


def test_replay_to_a_trace_point_equals_the_state_at_that_point():
    dev = SimulatedDevice(32 * KIB, chunk_size=2 * KIB)
    states = []
    for i in range(12):
        states.append((dev.image(), dev.durable_image(), dev.pending))
        if i % 4 == 3:
            dev.flush()
        else:
            dev.write((i * 5 * SECTOR) % (28 * KIB), pattern(i, 3 * KIB))
    states.append((dev.image(), dev.durable_image(), dev.pending))
    trace = dev.trace
    assert len(trace) == 12
    for n, (image, durable, pending) in enumerate(states):
        replayed = SimulatedDevice.replay(trace, upto=n)
        assert replayed.image() == image
        assert replayed.durable_image() == durable
        assert [(p.offset, p.data) for p in replayed.pending] == [(p.offset, p.data) for p in pending]


def test_crash_points_walk_matches_replay_at_every_index():
    dev = SimulatedDevice(16 * KIB, chunk_size=KIB)
    for i in range(9):
        dev.write((i * 3 * SECTOR) % (12 * KIB), pattern(i, 2 * KIB))
        if i % 3 == 2:
            dev.flush()
    points = list(dev.trace.crash_points())
    assert [p.index for p in points] == list(range(len(dev.trace) + 1))
    for point in points:
        replayed = dev.trace.replay(upto=point.index)
        assert point.durable_image() == replayed.durable_image()
        assert point.pending == replayed.pending
        everything = Outcome.keep_all(len(point.pending))
        assert point.device(everything).image() == replayed.image()


def test_replay_refuses_an_index_outside_the_trace():
    dev = SimulatedDevice(4 * KIB)
    dev.write(0, bytes(SECTOR))
    with pytest.raises(InvalidArgument, match="outside 0..1"):
        dev.trace.replay(upto=2)


def test_trace_keeps_the_bytes_written_even_if_the_caller_reuses_its_buffer():
    dev = SimulatedDevice(4 * KIB)
    buf = bytearray(pattern(1, SECTOR))
    dev.write(0, buf)
    buf[:] = bytes(SECTOR)
    assert dev.trace[0].data == pattern(1, SECTOR)
    assert dev.read(0, SECTOR) == pattern(1, SECTOR)


def test_device_refuses_an_outcome_outside_its_model():
    dev = SimulatedDevice(8 * KIB, model=CrashModel.from_spec("atomic_sectors,in_order,tear"))
    dev.write(0, pattern(1, KIB))
    dev.write(KIB, pattern(2, KIB))
    with pytest.raises(InvalidArgument, match="prefix"):
        dev.power_cut(Outcome((DROP, KEEP)))
    with pytest.raises(InvalidArgument, match="garbage"):
        dev.power_cut("KG5")
    with pytest.raises(InvalidArgument, match="partial"):
        dev.power_cut("KP0+0.100")
    with pytest.raises(InvalidArgument, match="3 writes but 2"):
        dev.power_cut("KKK")
    assert dev.power_cut("KP1").read(0, 2 * KIB) == pattern(1, KIB) + pattern(2, SECTOR) + bytes(SECTOR)


def test_building_a_crash_state_does_not_copy_the_whole_image():
    import time
    dev = SimulatedDevice(256 << 20)               # 256 MiB: a full copy would take tens of ms
    dev.write(100 << 20, pattern(1, 8 * KIB))
    point = dev.crash_point()
    outcomes = list(point.outcomes(limit=100, rng=1))
    start = time.perf_counter()
    for outcome in outcomes:
        point.device(outcome, record=False)
    assert (time.perf_counter() - start) / len(outcomes) < 0.005
