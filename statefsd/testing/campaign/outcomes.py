"""Which power-cut outcomes to try at a crash point, each yielding a distinct image.

The simulated device enumerates outcomes exhaustively when their number is
at most ``limit`` and samples ``limit`` of them otherwise. Its exhaustive
mode cuts a partial sector only at byte 256, and tears a write of more than
four sectors only into prefixes, so ``extra`` outcomes of each kind are
added: a random byte cut (where the model allows partial sectors), and a
random sector subset or suffix landing (where it allows tearing), which
leaves later records of a group on the medium without the earlier ones. Outcomes
that leave the same bytes as an earlier one at the same point (a torn
superblock whose torn sectors were zero anyway) are skipped: every state
the campaign checks, and counts, is distinct.
"""

from __future__ import annotations

import hashlib
import random
from typing import Iterator

from statefsd.storage.blockdev import SECTOR
from statefsd.testing.simdev import DROP, KEEP, CrashPoint, Fate, Outcome, SimulatedDevice


def byte_cuts(point: CrashPoint, rng: random.Random, count: int) -> Iterator[Outcome]:
    """Earlier writes landed, one write landed up to a random byte, later ones dropped."""
    pending = point.pending
    if not pending or not point.model.allow_partial:
        return
    for _ in range(count):
        i = rng.randrange(len(pending))
        sector = rng.randrange(pending[i].length // SECTOR)
        fate = Fate.torn((1 << sector) - 1, (sector, rng.randrange(1, SECTOR)))
        yield Outcome((KEEP,) * i + (fate,) + (DROP,) * (len(pending) - i - 1))


def sector_tears(point: CrashPoint, rng: random.Random, count: int) -> Iterator[Outcome]:
    """Earlier writes landed, a random subset (or suffix) of one write's sectors, later ones dropped."""
    pending = point.pending
    if not pending or not point.model.allow_tear:
        return
    for _ in range(count):
        i = rng.randrange(len(pending))
        nsec = pending[i].length // SECTOR
        if nsec < 2:
            continue
        full = (1 << nsec) - 1
        mask = full ^ ((1 << rng.randrange(1, nsec)) - 1) if rng.random() < 0.5 else rng.randrange(1, full)
        yield Outcome((KEEP,) * i + (Fate.torn(mask),) + (DROP,) * (len(pending) - i - 1))


def landed_digest(device: SimulatedDevice, point: CrashPoint) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for write in point.pending:
        h.update(device.read(write.offset, write.length))
    return h.digest()


def distinct_outcomes(point: CrashPoint, *, limit: int, extra: int,
                      seed: int) -> Iterator[tuple[Outcome, SimulatedDevice]]:
    """(outcome, crashed device) for each distinct image; deterministic in ``seed``."""
    seen: set[bytes] = set()
    rng = random.Random(seed)
    candidates = list(point.outcomes(limit=limit, rng=rng.getrandbits(64)))
    candidates += byte_cuts(point, rng, extra)
    candidates += sector_tears(point, rng, extra)
    for outcome in candidates:
        device = point.device(outcome)
        key = landed_digest(device, point)
        if key not in seen:
            seen.add(key)
            yield outcome, device
