"""A power cut during fsck-statefs --repair: the simulated device (statefsd's
only crash injector) records the repair's writes and flushes; at every
point of that trace, sampled power-cut outcomes must leave either the old
image (same damage, same committed prefix) or the repaired one, and a
second repair must always finish the job."""

from __future__ import annotations

import random

from statefsd.storage import format as fmt
from statefsd.storage.engine import Engine
from statefsd.testing.simdev import SimulatedDevice

from fsck_images import make_image, patch, put_each, records
from fsck_statefs.check import check
from fsck_statefs.repair import repair

VALUES = {f"k{i}": bytes([48 + i]) * (3000 + 40_000 * i) for i in range(5)}
PREFIX = {k: v for k, v in VALUES.items() if k < "k3"}


def _damaged_image(tmp_path) -> bytes:
    path = make_image(tmp_path / "crash.img", 1 << 20, redundancy="off")
    put_each(path, VALUES)
    recs, _, _ = records(path)
    victim = next(r for r in recs if r.header.type == fmt.PAYLOAD and r.header.path_hash == fmt.path_hash(b"k3"))
    patch(path, victim.offset + fmt.HEADER_SIZE + 7, b"\x5a\xa5")
    with open(path, "rb") as f:
        return f.read()


def _state(dev) -> dict[str, bytes]:
    with Engine.mount(dev, read_only=True) as e:
        return {k: e.get(k) for k in e.list()}


def test_power_cut_during_repair_leaves_the_old_or_the_repaired_image(tmp_path):
    dev = SimulatedDevice.from_image(_damaged_image(tmp_path))
    checked = check(dev)
    assert [i.kind for i in checked.report.errors] == ["corruption"]
    repair(dev, checked)
    assert not check(dev).report.errors

    rng = random.Random(20261123)
    seen = {"old": 0, "repaired": 0}
    points = list(dev.trace.crash_points())
    assert len(points) > 4  # reservation, compaction groups, flushes, superblock switch
    for point in points:
        for outcome in point.outcomes(limit=5, rng=rng):
            crashed = point.device(outcome)
            after = check(crashed)
            kinds = [i.kind for i in after.report.errors]
            assert kinds in ([], ["corruption"]), (point.index, outcome.encode(), after.report.to_text())
            seen["old" if kinds else "repaired"] += 1
            assert _state(crashed) == PREFIX, (point.index, outcome.encode())
            if kinds:
                # Re-running the repair after the cut finishes it.
                again = point.device(outcome)
                repair(again, check(again))
                assert not check(again).report.errors
                assert _state(again) == PREFIX
    assert seen["old"] and seen["repaired"]
