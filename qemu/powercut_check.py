"""Is a store recovered after a power cut what the guest's crash writer may leave?

The crash writer (``statefsd --crash-writer``, guest mode ``crashloop``) commits
transaction n = 0, 1, 2, ... as two puts, ``crash/<n>/a`` and ``crash/<n>/b``, each
``str(n).encode() * 50``, and prints ``ACK <txn_id> <n>`` once the commit is durable.
After a cut, recovering the store (a read-write mount, as the next boot does) must give:

1. a mount that succeeds, and replay findings free of "corruption" and "integrity"
   (a power cut only truncates the log; it never looks like damage);
2. every required transaction (acknowledged, or visible before the cut) visible with
   its txn id when known;
3. no partial transaction: both keys of every visible n, with exact values, written by
   one and the same transaction, and no other key under ``crash/``;
4. a prefix: the visible n are exactly 0..m-1 (n was committed in order).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from statefsd.storage.blockdev import BlockDevice
from statefsd.storage.engine import Engine
from statefsd.storage.image import KeyProvider
from statefsd.errors import StateFSError
from statefsd.testing.simdev import encode_ranges

PREFIX = "crash/"
KEY = re.compile(r"crash/(\d{1,9})/([ab])")
BAD_FINDINGS = ("corruption", "integrity")


def value_of(n: int) -> bytes:
    """The value the crash writer stores under both keys of transaction n."""
    return str(n).encode() * 50


def acked(serial_acks: list[tuple[int, str]]) -> dict[int, int]:
    """n -> txn id from check_markers.acked_transactions() of a crash writer's console."""
    out = {}
    for txn_id, n in serial_acks:
        if n.isdigit():
            out[int(n)] = txn_id
    return out


@dataclass
class Verdict:
    visible: dict[int, int] = field(default_factory=dict)   # n -> txn id of a whole txn
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def check_device(device: BlockDevice, required: Mapping[int, int | None], *,
                 key_provider: KeyProvider | None = None) -> Verdict:
    """Recover ``device`` (read-write mount; the engine closes it) and judge the store.

    ``required`` maps each n that must be visible to its txn id (None: any id).
    ``key_provider``: the payload key of an encrypted image (keystored's, as in the guest).
    """
    try:
        engine = Engine.mount(device, key_provider=key_provider)
    except StateFSError as exc:
        return Verdict(violations=[f"recovery mount refused: {exc.code.name}: {exc.message}"])
    try:
        return check_engine(engine, required)
    finally:
        engine.close()


def check_engine(engine: Engine, required: Mapping[int, int | None]) -> Verdict:
    verdict = Verdict()
    bad = verdict.violations
    findings = engine.replay_summary.get("findings", {})
    for kind in BAD_FINDINGS:
        if findings.get(kind):
            bad.append(f"replay reported {findings[kind]} {kind} finding(s)")

    halves: dict[int, dict[str, int]] = {}
    for path in engine.list(PREFIX):
        m = KEY.fullmatch(path)
        if m is None:
            bad.append(f"unexpected key {path!r}")
            continue
        n, half = int(m.group(1)), m.group(2)
        try:
            value = engine.get(path)
            txn_id = engine.stat(path)["txn_id"]
        except StateFSError as exc:
            bad.append(f"{path}: unreadable after recovery: {exc.code.name}: {exc.message}")
            continue
        if value != value_of(n):
            bad.append(f"{path}: wrong value ({len(value)} bytes, starts {value[:12]!r})")
            continue
        halves.setdefault(n, {})[half] = txn_id

    for n, got in sorted(halves.items()):
        if set(got) != {"a", "b"}:
            (half, txn_id), = got.items()
            bad.append(f"partial txn {txn_id} (n={n}): only crash/{n}/{half} is visible")
        elif got["a"] != got["b"]:
            bad.append(f"n={n}: crash/{n}/a from txn {got['a']} but crash/{n}/b from txn {got['b']}")
        else:
            verdict.visible[n] = got["a"]

    for n, txn_id in sorted(required.items()):
        if n not in verdict.visible:
            if n not in halves:  # a partial one is reported above already
                what = f"txn {txn_id} (n={n})" if txn_id is not None else f"the txn of n={n}"
                bad.append(f"{what}, durable before the cut, is lost: crash/{n}/a and "
                           f"crash/{n}/b are gone")
        elif txn_id is not None and verdict.visible[n] != txn_id:
            bad.append(f"n={n}: visible from txn {verdict.visible[n]}, but txn {txn_id} was acknowledged")

    seen = sorted(halves)
    if seen and seen != list(range(seen[-1] + 1)):
        holes = sorted(set(range(seen[-1] + 1)) - set(seen))
        bad.append(f"not a prefix: n={_ranges(holes)} missing below visible n={seen[-1]}")
    return verdict


def _ranges(values: list[int]) -> str:
    parts = encode_ranges(values).split(",")
    return ",".join(parts[:6] + ["..."] if len(parts) > 6 else parts)
