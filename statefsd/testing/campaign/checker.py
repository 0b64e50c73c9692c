"""Recover one crashed image and check invariants (1)-(6), (8) and (10).

For a crashed device (nothing pending) and the timeline of what was
submitted before the cut:

1. Mount read-write (the recovery). It must succeed, and no mount may report
   a "corruption" or "integrity" finding: a crash alone never looks like
   damage (5). Every value is read back; the state must be a prefix of the
   submitted transactions holding every acknowledged one (1)(2)(3).
2. fsck (6), through ``fsckhook``, on every ``fsck_every``-th recovered image.
3. Mount read-write again: the same state, and no byte outside the
   superblock slots written (4). Commit a probe: the recovered store takes
   new writes.
4. Mount read-only: not a single write (4); the state is the recovered one
   plus the acknowledged probe (1).
5. No txn id (8) or nonce (10) written by steps 1-4 was issued, with other
   bytes, before the cut.

The recovery's trace, with the probe's timeline, is returned so that the
runner can cut the power again *during* recovery and check the result with
the same battery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from statefsd.storage import format as fmt
from statefsd.storage.engine import Engine, Mutation
from statefsd.errors import NoSpace, StateFSError
from statefsd.testing.simdev import SimulatedDevice, Trace

from statefsd.testing.campaign import fsckhook
from statefsd.testing.campaign.records import History, WriteIndex
from statefsd.testing.campaign.systems import FixedSigner, System
from statefsd.testing.campaign.timeline import State, Timeline, Txn, Violation

Log = Callable[[str], None]
BAD_FINDINGS = ("corruption", "integrity")
UNREADABLE = b"\0campaign: value failed its checks\0"   # no workload writes this


def _quiet(_: str) -> None:
    pass


@dataclass
class Recovered:
    violations: list[Violation]
    trace: Trace | None = None          # every op the recovery steps issued
    timeline: Timeline | None = None    # recovered state + the probe, in that trace's positions
    index: WriteIndex | None = None
    state: State = field(default_factory=dict)


@dataclass
class Checker:
    system: System
    salt: bytes
    fsck: fsckhook.FsckFn | None = None
    log: Log = _quiet
    fsck_every: int = 1         # fsck every Nth recovered image (it costs a fourth replay)
    signer: FixedSigner | None = None   # a signed workload's device key: checkpoints verify
    _recoveries: int = 0

    def recover(self, device: SimulatedDevice, timeline: Timeline, cut: int, history: History,
                label: str) -> Recovered:
        out: list[Violation] = []
        engine = self._mount(device, out, "recovery", read_only=False)
        if engine is None:
            return Recovered(out)
        with engine:
            state = self._read(engine, out, "recovery")
        lo, hi = timeline.bounds(cut)
        self.log(f"recovered {len(state)} keys; allowed: {lo}..{hi} of {len(timeline.txns)} txns "
                 f"(cut after op #{cut})")
        out += timeline.check(state, cut)
        self._recoveries += 1
        if self.fsck is not None and self.fsck_every and (self._recoveries - 1) % self.fsck_every == 0:
            out += fsckhook.check(self.fsck, device)

        mark = len(device.trace)
        engine = self._mount(device, out, "second recovery", read_only=False)
        if engine is None:
            return Recovered(out, device.trace, state=state)
        with engine:
            again = self._read(engine, out, "second recovery")
            if again != state:
                out.append(Violation(4, f"a second recovery gives another state: {_diff(state, again)}"))
            for op in device.trace[mark:]:
                if op.kind == "write" and op.offset not in fmt.SUPERBLOCK_OFFSETS:
                    out.append(Violation(4, f"a second recovery rewrote log bytes at offset {op.offset}"))
                    break
            probe = self._probe(engine, device, out, label)

        mark = len(device.trace)
        engine = self._mount(device, out, "read-only mount", read_only=True)
        if engine is None:
            return Recovered(out, device.trace, state=state)
        with engine:
            final = self._read(engine, out, "read-only mount")
        if len(device.trace) != mark:
            out.append(Violation(4, f"a read-only mount issued {len(device.trace) - mark} device ops"))
        after = Timeline(state, [probe] if probe else [])
        for v in after.check(final, len(device.trace)):
            out.append(Violation(v.invariant, f"after recovery: {v.message}"))

        index = WriteIndex.of(device.trace, self.salt)
        out += history.check(index)
        return Recovered(out, device.trace, after, index, state)

    # -- steps -----------------------------------------------------------------------------------

    def _mount(self, device, out: list[Violation], step: str, *, read_only: bool) -> Engine | None:
        findings: list[dict] = []

        def audit(event: str, **fields) -> None:
            if event == "replay_finding":
                findings.append(fields)

        try:
            engine = self.system.mount(device, read_only=read_only, audit=audit, signer=self.signer)
        except StateFSError as exc:
            out.append(Violation(5, f"{step}: mount refused: {exc}"))
            return None
        except Exception as exc:  # an engine bug is a finding, not a campaign crash
            out.append(Violation(5, f"{step}: mount raised {type(exc).__name__}: {exc}"))
            return None
        for f in findings:
            self.log(f"{step}: replay finding {f['kind']} at byte offset {f['offset']}: {f['reason']}")
            if f["kind"] in BAD_FINDINGS:
                out.append(Violation(5, f"{step}: replay reports {f['kind']} at byte offset "
                                        f"{f['offset']}: {f['reason']}"))
        return engine

    def _read(self, engine: Engine, out: list[Violation], step: str) -> State:
        state: State = {}
        for path in engine.list():
            try:
                state[path] = engine.get(path)
            except StateFSError as exc:
                out.append(Violation(5, f"{step}: reading {path!r} failed: {exc}"))
                state[path] = UNREADABLE
        return state

    def _probe(self, engine: Engine, device: SimulatedDevice, out: list[Violation], label: str) -> Txn | None:
        """Commit one fresh value; its txn id and nonce must be new (8)(10)."""
        value = b"probe:" + label.encode()
        submit = len(device.trace)
        try:
            txn_id = engine.commit([Mutation("put", "probe", value)])
        except NoSpace:
            self.log("probe refused: log full (allowed, nothing written)")
            return None
        except Exception as exc:
            out.append(Violation(5, f"the recovered store refused a write: {type(exc).__name__}: {exc}"))
            return None
        return Txn(txn_id, (("probe", value),), submit, len(device.trace))


def _diff(a: State, b: State) -> str:
    changed = sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))
    return f"{len(changed)} keys differ ({', '.join(map(repr, changed[:4]))})"
