"""The media-fault campaign: damaged durable data is repaired or refused,
never served as an older state.

Power loss only ever touches unflushed writes. Media faults touch flushed
data: a sector rots (a bit flips), is zeroed, fills with garbage, rolls back
to an older version of itself, or trades places with another sector; an
image file is truncated. For each scenario image (cleanly unmounted,
recovered after a cut, compacted with nothing after, compacted with commits
after, encrypted, large values), in both redundancy modes, every sector of
both superblock slots, the identity copy and the written log (plus a sample
of the rest of the device) gets each fault, one at a time. Each damaged image
is a *state*; for each, the verdict:

* statefsd's engine mounts read-write and serves exactly the latest
  acknowledged state (every key, every byte), having repaired what it could; or
* it refuses the read-write mount (CorruptImage), and fsck-statefs (read-only,
  in-process) exits 4 naming a byte offset.

With redundancy ``parity`` a fault confined to one sector must be repaired: a
refusal is a violation. Never an older state, never wrong data, never another
exception (a traceback).

    python -m statefsd.testing.campaign.mediafaults [--workers N] [--system NAME] [--sample N]

The last line is ``media-fault states: N, violations: V``; exit 1 when V > 0.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from statefsd.storage import format as fmt
from statefsd.storage.engine import Engine, Mutation
from statefsd.storage.image import read_superblock
from statefsd.errors import CorruptImage, StateFSError
from statefsd.storage.replay import replay
from statefsd.testing.simdev import SimulatedDevice

from statefsd.testing.campaign import variants
from statefsd.testing.campaign.runner import mix
from statefsd.testing.campaign.systems import key_provider

FAULTS = ("bitflip", "zero", "garbage", "rollback", "swap")
SINGLE_SECTOR = {"bitflip", "zero", "garbage", "rollback"}
SECTOR = fmt.GROUP_ALIGN
DEVICE_BYTES = 1536 << 10
TAIL_SECTORS = 16            # sectors past the log end, where a fault must not matter
SAMPLE_ELSEWHERE = 24        # sectors sampled from the rest of the device
TRUNCATIONS = 6              # truncation points per scenario image


# ------------------------------------------------------------- scenarios

@dataclass
class Scenario:
    """An image, the state it must serve, and an older image for rollbacks."""

    name: str
    redundancy: str
    encrypted: bool
    image: bytes = b""
    older: bytes = b""
    expected: dict[str, bytes] = field(default_factory=dict)


class _Store:
    """Drives the engine on a simulated device and keeps the model state."""

    def __init__(self, redundancy: str, encrypted: bool, seed: int) -> None:
        self.dev = SimulatedDevice(DEVICE_BYTES, record=False)
        self.encrypted = encrypted
        Engine.mkfs(self.dev, encryption="on" if encrypted else "off", redundancy=redundancy,
                    key_provider=key_provider if encrypted else None)
        self.rng = random.Random(seed)
        self.model: dict[str, bytes] = {}
        self.engine: Engine | None = None

    def mount(self) -> Engine:
        self.engine = Engine.mount(self.dev, key_provider=key_provider if self.encrypted else None)
        return self.engine

    def crash(self) -> None:
        """End the mount like a process crash: every commit was flushed, no clean unmount."""
        self.engine = None

    def unmount(self) -> None:
        self.engine.close()
        self.engine = None

    def value(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def commit(self, mutations: list[Mutation]) -> None:
        self.engine.commit(mutations)
        for m in mutations:
            if m.kind == "put":
                self.model[m.path] = m.value
            else:
                self.model.pop(m.path, None)

    def workload(self, rounds: int, *, big: bool = False) -> None:
        sizes = (0, 17, 300, 900, 4000, 70_000) if not big else (100, 90_000, 150_000)
        for r in range(rounds):
            key = f"k{self.rng.randrange(12)}"
            kind = self.rng.random()
            if kind < 0.15 and self.model:
                self.commit([Mutation("delete", self.rng.choice(sorted(self.model)))])
            elif kind < 0.35:
                self.commit([Mutation("put", f"{key}/{i}", self.value(self.rng.choice((0, 17, 300, 900))))
                             for i in range(self.rng.randrange(2, 6))])
            else:
                self.commit([Mutation("put", key, self.value(self.rng.choice(sizes)))])

    def image(self) -> bytes:
        return self.dev.image()


# Each scenario as steps: a number writes that many workload rounds (a
# negative one, rounds of large values), "older" keeps the image for
# rollbacks, the rest drive the store.
SCENARIOS: dict[str, tuple] = {
    "clean": (25, "older", 10, "unmount"),
    # a cut, then the recovery mount (it replays, flushes and writes the durable floor), then a cut again
    "recovered": (20, "older", "crash", "mount", "crash"),
    "compacted": (30, "older", "compact", "unmount"),
    "compacted-then-commits": (25, "compact", "older", 12, "unmount"),
    "encrypted": (20, "older", 8, "unmount"),
    "large-values": (-3, "older", -2, "unmount"),
}


def build_scenarios(redundancy: str, seed: int = 1) -> list[Scenario]:
    out = []
    for name, steps in SCENARIOS.items():
        encrypted = name == "encrypted"
        store = _Store(redundancy, encrypted, mix("media", name, redundancy, seed))
        sc = Scenario(f"{name}#{seed}", redundancy, encrypted)
        store.mount()
        for step in steps:
            if isinstance(step, int):
                store.workload(abs(step), big=step < 0)
            elif step == "older":
                sc.older = store.image()
            elif step == "compact":
                store.engine.compact()
            else:
                getattr(store, step)()
        out.append(_done(sc, store))
    return out


def _done(sc: Scenario, store: _Store) -> Scenario:
    sc.image, sc.expected = store.image(), dict(store.model)
    return sc


# ---------------------------------------------------------------- faults

@dataclass(frozen=True)
class Fault:
    kind: str          # one of FAULTS, or "truncate"
    offset: int        # sector offset (truncate: the new image size)

    def apply(self, image: bytes, older: bytes, rng: random.Random) -> bytes | None:
        """The damaged image, or None when this fault changes nothing here."""
        if self.kind == "truncate":
            return image[:self.offset]
        at = self.offset
        sector = image[at:at + SECTOR]
        if self.kind == "bitflip":
            bit = rng.randrange(SECTOR * 8)
            new = bytearray(sector)
            new[bit // 8] ^= 1 << (bit % 8)
            new = bytes(new)
        elif self.kind == "zero":
            new = bytes(SECTOR)
        elif self.kind == "garbage":
            new = rng.randbytes(SECTOR)
        elif self.kind == "rollback":
            new = older[at:at + SECTOR]
        else:  # swap with the next sector
            other = image[at + SECTOR:at + 2 * SECTOR]
            if other == sector or len(other) < SECTOR:
                return None
            return image[:at] + other + sector + image[at + 2 * SECTOR:]
        if new == sector:
            return None
        return image[:at] + new + image[at + SECTOR:]


def faults_for(sc: Scenario, rng: random.Random) -> list[Fault]:
    dev = SimulatedDevice(image=sc.image, record=False)
    sb, _ = read_superblock(dev)
    start, length = sb.active_extent
    log_end = _log_end(dev)
    dev.close()
    sectors = set()
    for slot in fmt.SUPERBLOCK_OFFSETS:
        sectors.update(range(slot, slot + fmt.BLOCK_SIZE, SECTOR))
    sectors.update(range(sb.identity_copy_offset, sb.identity_copy_offset + fmt.BLOCK_SIZE, SECTOR))
    sectors.update(range(start, min(log_end + TAIL_SECTORS * SECTOR, start + length), SECTOR))
    elsewhere = [s for s in range(0, len(sc.image), SECTOR) if s not in sectors]
    sectors.update(rng.sample(elsewhere, min(SAMPLE_ELSEWHERE, len(elsewhere))))
    out = [Fault(kind, s) for s in sorted(sectors) for kind in FAULTS]
    cuts = rng.sample(range(SECTOR, len(sc.image), SECTOR), TRUNCATIONS)
    out += [Fault("truncate", c) for c in sorted(cuts)]
    return out


def _log_end(dev) -> int:
    sb, _ = read_superblock(dev)
    return replay(dev, sb).end.offset


# --------------------------------------------------------------- verdicts

@dataclass
class Outcome:
    states: int = 0
    repaired: int = 0        # mounted read-write and served the exact state
    refused: int = 0         # refused read-write, fsck exit 4
    violations: list[str] = field(default_factory=list)
    by_kind: Counter = field(default_factory=Counter)


def judge(sc: Scenario, fault: Fault, damaged: bytes, system: str) -> str:
    """'' when the state is served exactly, 'refused' when refused properly,
    else the violation."""
    engine_class = SYSTEMS[system]
    dev = SimulatedDevice(image=damaged, record=False)
    keys = key_provider if sc.encrypted else None
    try:
        engine = engine_class.mount(dev, key_provider=keys)
    except CorruptImage:
        return _fsck_refuses(damaged, keys, fault)
    except StateFSError as exc:
        return f"mount failed with {exc.code.name} instead of serving or refusing: {exc}"
    except Exception as exc:   # a traceback is a finding
        return f"mount raised {type(exc).__name__}: {exc}"
    try:
        served = {path: engine.get(path) for path in engine.list()}
    except Exception as exc:
        return f"a read of the mounted image raised {type(exc).__name__}: {exc}"
    finally:
        try:
            engine.close()
        except Exception:
            pass
    if served != sc.expected:
        missing = sorted(set(sc.expected) - set(served))[:3]
        wrong = sorted(k for k in served if k in sc.expected and served[k] != sc.expected[k])[:3]
        extra = sorted(set(served) - set(sc.expected))[:3]
        return (f"served a state other than the latest acknowledged one (missing {missing}, "
                f"wrong {wrong}, extra {extra})")
    return ""


def _fsck_refuses(damaged: bytes, keys, fault: Fault) -> str:
    from fsck_statefs.check import check
    try:
        checked = check(SimulatedDevice(image=damaged, record=False), key_provider=keys)
    except StateFSError as exc:
        return f"statefsd refused, and fsck could not check the image: {exc}"
    except Exception as exc:
        return f"statefsd refused, and fsck raised {type(exc).__name__}: {exc}"
    report = checked.report
    if not report.errors:   # fsck-statefs exits 4 exactly when errors are left
        return "statefsd refused read-write, but fsck finds no error (it would exit 0, want 4)"
    if fault.kind != "truncate" and not any(i.offset >= 0 for i in report.errors):
        return "statefsd refused read-write, but fsck names no byte offset"
    return "refused"


SYSTEMS = {"engine": Engine}


def _floor_ignored() -> type[Engine]:
    from statefsd.storage import logscan, replay as replay_mod
    scan = variants.rebind(logscan.scan_groups, decide_stop=logscan._look_for_durable_records_beyond)
    return variants._engine_with_replay("FloorIgnoredEngine", variants.rebind(replay_mod.replay, scan_groups=scan))


def _redundancy_ignored() -> type[Engine]:
    from statefsd.storage import logscan, replay as replay_mod
    scan = variants.rebind(logscan.scan_groups, _repair_group=lambda *args: None)
    return variants._engine_with_replay("ParityIgnoredEngine", variants.rebind(replay_mod.replay, scan_groups=scan))


SYSTEMS["floor-ignored"] = _floor_ignored()
SYSTEMS["redundancy-ignored"] = _redundancy_ignored()


def run_chunk(args) -> Outcome:
    sc, faults, system, seed = args
    rng = random.Random(seed)
    out = Outcome()
    for fault in faults:
        damaged = fault.apply(sc.image, sc.older, rng)
        if damaged is None:
            continue
        out.states += 1
        out.by_kind[fault.kind] += 1
        verdict = judge(sc, fault, damaged, system)
        if verdict == "refused":
            if sc.redundancy == "parity" and fault.kind in SINGLE_SECTOR:
                verdict = "one damaged sector was refused, not repaired (redundancy parity)"
            else:
                out.refused += 1
                continue
        if verdict:
            out.violations.append(f"{sc.name}/{sc.redundancy}: {fault.kind} at {fault.offset}: {verdict}")
        else:
            out.repaired += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="media-fault-campaign", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--system", default="engine", choices=sorted(SYSTEMS),
                   help="system under test: the engine, or a deliberately broken variant")
    p.add_argument("--seed", type=int, default=1, help="first image seed (default 1)")
    p.add_argument("--images", type=int, default=3,
                   help="images per scenario and redundancy mode, each from its own seed (default 3: "
                        "over 50,000 states)")
    p.add_argument("--redundancy", choices=("parity", "off"), action="append",
                   help="only this redundancy mode (repeatable; default both)")
    p.add_argument("--scenario", action="append", help="only this scenario (repeatable)")
    args = p.parse_args(argv)
    began = time.monotonic()
    rng = random.Random(args.seed)
    tasks = []
    scenarios = [sc for redundancy in args.redundancy or ("parity", "off")
                 for seed in range(args.seed, args.seed + args.images)
                 for sc in build_scenarios(redundancy, seed)]
    for sc in scenarios:
        if args.scenario and sc.name.split("#")[0] not in args.scenario:
            continue
        faults = faults_for(sc, rng)
        step = max(1, len(faults) // (4 * args.workers))
        for i in range(0, len(faults), step):
            tasks.append((sc, faults[i:i + step], args.system, rng.randrange(1 << 30)))
    total = Outcome()
    per_scenario: dict[str, Outcome] = {}
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        for (sc, _faults, _system, _seed), out in zip(tasks, pool.imap(run_chunk, tasks)):
            row = per_scenario.setdefault(f"{sc.name}/{sc.redundancy}", Outcome())
            for agg in (row, total):
                agg.states += out.states
                agg.repaired += out.repaired
                agg.refused += out.refused
                agg.violations += out.violations
                agg.by_kind.update(out.by_kind)
    print(f"media-fault campaign: system {args.system}; faults {', '.join(FAULTS)}, truncate; "
          f"{len(per_scenario)} scenario images; {args.workers} workers")
    width = max(len(k) for k in per_scenario)
    print(f"{'scenario/redundancy':<{width}}  {'states':>7}  {'served':>7}  {'refused':>7}  {'violations':>10}")
    for name, row in per_scenario.items():
        print(f"{name:<{width}}  {row.states:>7}  {row.repaired:>7}  {row.refused:>7}  {len(row.violations):>10}")
    for v in total.violations[:20]:
        print(f"VIOLATION {v}")
    if len(total.violations) > 20:
        print(f"... and {len(total.violations) - 20} more violations")
    print(f"elapsed {time.monotonic() - began:.1f} s")
    print(f"media-fault states: {total.states}, violations: {len(total.violations)}")
    return 1 if total.violations else 0


if __name__ == "__main__":
    sys.exit(main())
