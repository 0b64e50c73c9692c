"""Invariant (6): fsck finds every recovered image consistent.

fsck-statefs does not exist yet, so this hook is skipped with a note. It
turns on by itself once ``fsck_statefs`` exposes

    check_device(device: BlockDevice, *, key_provider) -> int

a read-only check (no repair) of an open device returning the fsck(8)
status (``statefsd.errors.FsckExit``). A recovered image may hold what a
crash leaves (a torn tail, an orphan PREPARE): those must count as clean.
Any UNCORRECTED or OPERATIONAL bit is a violation, and so is a write.
"""

from __future__ import annotations

import importlib
from typing import Callable

from statefsd.errors import FsckExit
from statefsd.simdev import SimulatedDevice

from statefsd.campaign.systems import key_provider
from statefsd.campaign.timeline import Violation

FsckFn = Callable[..., int]


def resolve() -> tuple[FsckFn | None, str]:
    """The fsck entry point, or None and why invariant (6) is skipped."""
    try:
        module = importlib.import_module("fsck_statefs")
    except ImportError:
        return None, "invariant (6) skipped: fsck-statefs does not exist yet (no fsck_statefs package)"
    fn = getattr(module, "check_device", None)
    if not callable(fn):
        return None, "invariant (6) skipped: fsck_statefs has no check_device() hook yet"
    return fn, "invariant (6) checked with fsck_statefs.check_device"


def check(fn: FsckFn, device: SimulatedDevice) -> list[Violation]:
    before = len(device.trace)
    try:
        status = int(fn(device, key_provider=key_provider))
    except Exception as exc:  # a crash of the checker is a finding, not a campaign crash
        return [Violation(6, f"fsck raised {type(exc).__name__}: {exc}")]
    out = []
    if status & (FsckExit.UNCORRECTED | FsckExit.OPERATIONAL):
        out.append(Violation(6, f"fsck found the recovered image inconsistent (status {status})"))
    if len(device.trace) != before:
        out.append(Violation(6, "fsck wrote to the image during a check"))
    return out
