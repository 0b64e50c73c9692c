"""Workloads: deterministic, seeded operation sequences, registered as plug-ins.

A workload is a function of a :class:`Session`; ``@workload(name)``
registers it twice, plain and with encryption on (``name-enc``), and with
``signed=True`` a third time, mounted with a device signing key so that
signed checkpoints are written at unmount and compaction (``name-signed``). A run's
bytes depend only on (system, workload, seed, crash model), which is what
makes a reproduction code enough to rebuild a crash state.

Adding a workload: write a function that drives the session (``maintain``
runs steps like compaction that must not change the logical state),
decorate it, and it runs in the default campaign. fsck joins through
``fsckhook``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from statefsd.storage.engine import Mutation
from statefsd.storage.image import read_superblock
from statefsd.testing.simdev import CrashModel

from statefsd.testing.campaign.session import Run, Session
from statefsd.testing.campaign.systems import DEVICE_BYTES, FixedSigner, System, format_image

if TYPE_CHECKING:
    from statefsd.testing.campaign.runner import Settings

KEYS = [f"k/{i}" for i in range(8)]


@dataclass(frozen=True)
class Workload:
    name: str
    steps: Callable[[Session], None]
    encrypted: bool
    doc: str
    signed: bool = False
    device_bytes: int = DEVICE_BYTES
    # A costly workload (every recovery reads tens of MiB) runs fewer seeds (unless --seeds is
    # given) and fewer outcomes per crash point, so that the whole campaign keeps its running time.
    seeds: int | None = None        # default seeds per campaign (None: the campaign's own)
    outcomes: int | None = None     # cap on sampled outcomes per crash point

    def settings(self, base: "Settings") -> "Settings":
        if self.outcomes is None:
            return base
        return replace(base, limit=min(base.limit, self.outcomes), extra=min(base.extra, 1),
                       second_limit=min(base.second_limit, max(1, self.outcomes // 2)),
                       second_extra=min(base.second_extra, 1))


WORKLOADS: dict[str, Workload] = {}


def workload(name: str, *, signed: bool = False, device_bytes: int = DEVICE_BYTES,
             seeds: int | None = None, outcomes: int | None = None):
    def register(fn: Callable[[Session], None]):
        doc = " ".join((fn.__doc__ or "").split())
        size = {"device_bytes": device_bytes, "seeds": seeds, "outcomes": outcomes}
        WORKLOADS[name] = Workload(name, fn, False, doc, **size)
        WORKLOADS[name + "-enc"] = Workload(name + "-enc", fn, True, doc + " Encryption on.", **size)
        if signed:
            WORKLOADS[name + "-signed"] = Workload(name + "-signed", fn, False,
                                                   doc + " Signed checkpoints.", signed=True, **size)
        return fn
    return register


def run_workload(system: System, wl: Workload, seed: int, model: CrashModel) -> Run:
    label = f"{wl.name}/{seed}"
    device = format_image(label, encryption=wl.encrypted, model=model, size=wl.device_bytes)
    salt = read_superblock(device)[0].salt
    session = Session(system, device, seed=hash_seed(label), encrypted=wl.encrypted, salt=salt,
                      signer=FixedSigner() if wl.signed else None)
    wl.steps(session)
    return session.finish()


def hash_seed(label: str) -> int:
    """A seed from text that does not depend on PYTHONHASHSEED."""
    return int.from_bytes(label.encode(), "little") % (1 << 61)


def _mutation(s: Session, path: str, *, p_delete: float, max_size: int) -> Mutation:
    if s.rng.random() < p_delete:
        return Mutation("delete", path)
    return Mutation("put", path, s.value(s.rng.randrange(8, max_size)))


# -- the workloads ---------------------------------------------------------------------------------


@workload("single-puts")
def single_puts(s: Session) -> None:
    """Single-key puts of 1 to 3 sectors over six keys, so most are overwrites."""
    for _ in range(28):
        s.put(s.rng.choice(KEYS[:6]), s.rng.randrange(8, 1400))


@workload("multi-key")
def multi_key(s: Session) -> None:
    """Transactions of 2 to 6 puts and deletes over shared keys, written as groups of several
    sectors; one transaction is abandoned by its client before commit (nothing is written)."""
    for i in range(22):
        paths = s.rng.sample(KEYS, s.rng.randrange(2, 7))
        mutations = [_mutation(s, p, p_delete=0.25, max_size=900) for p in paths]
        if i == 9:
            s.abandon(mutations)
        else:
            s.commit(mutations)


@workload("deletes-overwrites", signed=True)
def deletes_overwrites(s: Session) -> None:
    """Puts, overwrites, single deletes, deletes inside transactions (also of missing keys),
    empty values, and a remount after each round."""
    for _ in range(3):
        for path in KEYS[:4]:
            s.put(path, s.rng.randrange(8, 700))
        s.commit([Mutation("put", KEYS[0], b""), Mutation("delete", KEYS[1]), Mutation("delete", "never/was")])
        s.delete(KEYS[2])
        s.commit([Mutation("put", KEYS[2], s.value(300)), Mutation("put", KEYS[1], s.value(40))])
        s.delete(KEYS[3])
        s.remount()


@workload("large-values")
def large_values(s: Session) -> None:
    """Values of 70 to 140 KiB (two or three 64 KiB PAYLOAD chunks): single puts, a transaction
    mixing a large and small values with a delete, and large values overwritten by small ones."""
    kib = 1024
    s.put("big/a", s.rng.randrange(70 * kib, 140 * kib))
    s.put("small", 100)
    s.commit([Mutation("put", "big/b", s.value(s.rng.randrange(66 * kib, 100 * kib))),
              Mutation("put", "small", s.value(50)), Mutation("delete", "big/a")])
    s.put("big/a", 200)
    s.put("big/b", s.rng.randrange(65 * kib, 90 * kib))
    s.commit([Mutation("put", "big/b", s.value(10)), Mutation("put", "big/c", s.value(3000))])


@workload("near-full")
def near_full(s: Session) -> None:
    """Fill the log with 8 to 16 KiB values until the engine refuses (ENOSPC), then deletes,
    which may use the space kept for them, and more refused puts."""
    n = 0
    while s.put(f"fill/{n}", s.rng.randrange(8 << 10, 16 << 10)) is not None:
        n += 1
    s.commit([Mutation("put", "x", s.value(2000)), Mutation("delete", "fill/0")])   # refused whole
    for i in range(0, min(n, 6), 2):
        s.delete(f"fill/{i}")
    s.commit([Mutation("delete", "fill/1"), Mutation("delete", "fill/3")])
    s.put("after-full", 1000)


@workload("group-commit")
def group_commit(s: Session) -> None:
    """Commits from 2 to 5 threads at once: a leader group, then one group holding every
    follower's transaction; single commits in between."""
    for _ in range(7):
        batches = [[_mutation(s, p, p_delete=0.2, max_size=600)
                    for p in s.rng.sample(KEYS, s.rng.randrange(1, 4))]
                   for _ in range(s.rng.randrange(2, 6))]
        s.concurrent(batches)
        s.put(s.rng.choice(KEYS), s.rng.randrange(8, 400))


@workload("compaction", signed=True)
def compaction(s: Session) -> None:
    """Overwrites of four keys until the engine compacts on its own (log 75% full), an explicit
    compaction back over the stale records of the first region, then more writes."""
    for _ in range(40):
        s.put(s.rng.choice(KEYS[:4]), s.rng.randrange(6 << 10, 14 << 10))
    s.maintain(lambda engine: engine.compact())
    for _ in range(4):
        s.put(s.rng.choice(KEYS[:5]), s.rng.randrange(8, 3000))


@workload("compaction-large-values", device_bytes=44 << 20, seeds=1, outcomes=4)
def compaction_large_values(s: Session) -> None:
    """A compaction during whose snapshot copy three values of 5.5 to 6 MiB (more value bytes than
    one transaction holds) and a delete with an overwrite are committed, so the catch-up must be cut
    by bytes as well as ops; the snapshot holds a value of 256 KiB to 1 MiB; then an overwrite in
    the new region (the checker's recoveries are the read-write mounts that follow). The image is just large enough for both regions to hold every value; one seed and
    4 outcomes per crash point by default (each recovery reads about 20 MiB)."""
    kib = 1024
    for path in KEYS[:2]:
        s.put(path, s.rng.randrange(8, 3000))
    s.put("big/0", s.rng.randrange(256 * kib, 1024 * kib))
    s.compact_during([[Mutation("put", f"big/{i}", s.value(s.rng.randrange(5632 * kib, 6144 * kib)))]
                      for i in (1, 2, 3)]
                     + [[Mutation("delete", KEYS[0]), Mutation("put", KEYS[1], s.value(500))]])
    s.put("big/2", 100)


# The vault's workloads register themselves with the decorator above.
from statefsd.testing.campaign import vaultworkloads  # noqa: E402,F401
