"""Compaction writes only transactions the reader accepts: values committed
while the snapshot is copied are carried over in catch-up transactions cut by
the transaction rule (op count and value bytes), and survive the switch and
the next read-write mount byte for byte.

The copy phase is held at its first write by a gate on the device (the
campaign's GateDevice), so the commits made meanwhile land in the catch-up
delta every time, not only when the scheduler happens to interleave them.
"""

from __future__ import annotations

import os
import threading

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice
from statefsd.testing.campaign.session import GateDevice, wait_until
from statefsd.storage.engine import Engine, Mutation

from tests.engine.conftest import Image

MiB = 1 << 20


def _commit_through_gate(engine: Engine, gate: GateDevice, mutations: list[Mutation]) -> int:
    """Commit from a thread of its own and let its writes (and only its) through the gate."""
    result: list = []
    t = threading.Thread(target=lambda: result.append(engine.commit(mutations)), daemon=True)
    t.start()
    while t.is_alive():
        if t.ident in gate.waiting():
            gate.admit(t.ident)
        t.join(0.001)
    assert result, "the commit failed"
    return result[0]


def _compact_with_commits_during_the_copy(engine: Engine, gate: GateDevice,
                                          commits: list[list[Mutation]]) -> dict:
    stats: list = []
    gate.hold()
    compactor = threading.Thread(target=lambda: stats.append(engine.compact()), daemon=True)
    compactor.start()
    try:
        wait_until(lambda: compactor.ident in gate.waiting(), "the compaction's first snapshot write")
        for mutations in commits:
            _commit_through_gate(engine, gate, mutations)
    finally:
        gate.release()
    compactor.join(60)
    assert stats, "compaction failed"
    return stats[0]


def test_three_8_mib_values_committed_during_a_compaction_survive_it_and_the_next_read_write_mount(tmp_path):
    img = Image(tmp_path / "big.img", 96 << 20)
    gate = GateDevice(FileDevice(img.path))
    engine = Engine.mount(gate)
    for i in range(40):
        engine.put(f"live/{i}", os.urandom(3000))
    engine.put("live/large", os.urandom(5 * MiB))   # the snapshot, too, has a batch of its own
    engine.delete("live/0")
    big = {f"big/{i}": os.urandom(fmt.MAX_VALUE_BYTES) for i in range(3)}
    commits = [[Mutation("put", path, value)] for path, value in big.items()]
    commits.append([Mutation("delete", "live/1"), Mutation("put", "live/2", b"changed")])
    stats = _compact_with_commits_during_the_copy(engine, gate, commits)
    assert stats["delta_ops"] == 5, stats   # all three large puts went through the catch-up
    expected = {path: engine.get(path) for path in engine.list()}
    for path, value in big.items():
        assert expected[path] == value
    assert "live/1" not in expected and expected["live/2"] == b"changed"
    engine.close()

    with img.mount() as again:                     # read-write: refuses an over-cap PREPARE as ECORRUPT
        assert not again.read_only
        assert {path: again.get(path) for path in again.list()} == expected
        again.put("after", b"x")
    with img.mount(read_only=True) as ro:
        assert {path: ro.get(path) for path in ro.list()} == expected | {"after": b"x"}


def test_many_keys_changed_during_a_compaction_are_caught_up_in_transactions_of_at_most_128_ops(tmp_path):
    img = Image(tmp_path / "many.img", 16 << 20)
    gate = GateDevice(FileDevice(img.path))
    engine = Engine.mount(gate)
    engine.commit([Mutation("put", f"seed/{i}", b"s") for i in range(10)])
    commits = [[Mutation("put", f"many/{n}/{i}", f"{n}-{i}".encode()) for i in range(100)] for n in range(3)]
    stats = _compact_with_commits_during_the_copy(engine, gate, commits)
    assert stats["delta_ops"] == 300
    expected = {path: engine.get(path) for path in engine.list()}
    assert len(expected) == 310
    engine.close()
    with img.mount() as again:
        assert {path: again.get(path) for path in again.list()} == expected


def test_keys_overwritten_or_deleted_before_the_copy_reaches_them_are_written_once_by_the_catch_up(tmp_path):
    img = Image(tmp_path / "overwritten.img", 16 << 20)
    gate = GateDevice(FileDevice(img.path))
    engine = Engine.mount(gate)
    for start in range(0, 300, 100):
        engine.commit([Mutation("put", f"k/{i:03d}", b"old" * 100) for i in range(start, start + 100)])
    # The copy waits at its first batch (keys 000-127); keys 200-299 lie ahead of it.
    commits = [[Mutation("put", f"k/{i:03d}", b"new") for i in range(200, 300) if i != 250],
               [Mutation("delete", "k/250")]]
    stats = _compact_with_commits_during_the_copy(engine, gate, commits)
    assert stats["snapshot_keys"] == 300
    assert stats["snapshot_copied"] == 200, stats   # the snapshot's old values of 200-299 are skipped
    assert stats["delta_ops"] == 99, stats          # their newest values, once; 250 needs no delete
    expected = {f"k/{i:03d}": b"old" * 100 for i in range(200)} | {f"k/{i}": b"new" for i in range(200, 300) if i != 250}
    assert {path: engine.get(path) for path in engine.list()} == expected
    engine.close()
    with img.mount() as again:
        assert {path: again.get(path) for path in again.list()} == expected
