"""Invariant (6): fsck finds every recovered image consistent.

The hook calls fsck-statefs's checker in-process, read-only:
``fsck_statefs.check.check(device, key_provider=...)``. A recovered image may
hold what a crash leaves (a torn tail, an orphan PREPARE): fsck reports those
as notes. An error finding (damage: what makes fsck exit 4) is a violation,
and so is any write during the check. The test rig sits above the product,
so it imports fsck_statefs directly (docs/DESIGN.md, "Layers").
"""

from __future__ import annotations

from typing import Callable

from fsck_statefs.check import check as fsck_check
from statefsd.errors import StateFSError
from statefsd.testing.simdev import SimulatedDevice

from statefsd.testing.campaign.systems import key_provider
from statefsd.testing.campaign.timeline import Violation

FsckFn = Callable[..., object]

FSCK: FsckFn = fsck_check
NOTE = "invariant (6) checked with fsck_statefs.check.check (read-only)"


def check(fn: FsckFn, device: SimulatedDevice) -> list[Violation]:
    before = len(device.trace)
    out = []
    try:
        errors = fn(device, key_provider=key_provider).report.errors
    except StateFSError as exc:
        errors = [f"fsck could not check the image: {exc}"]
    except Exception as exc:  # a crash of the checker is a finding, not a campaign crash
        errors = [f"fsck raised {type(exc).__name__}: {exc}"]
    for issue in errors[:1]:
        text = issue if isinstance(issue, str) else issue.line()
        out.append(Violation(6, f"fsck finds the recovered image inconsistent: {text}"))
    if len(device.trace) != before:
        out.append(Violation(6, "fsck wrote to the image during a read-only check"))
    return out
