"""What a recovered state may be: invariants (1), (2) and (3).

A :class:`Timeline` lists the transactions a workload submitted, in txn id
order (the order the engine wrote them), each with two trace positions:
``submit`` (device ops issued when commit() was called) and ``ack`` (ops
issued when it had returned). After a cut following op N (the first N ops
ran), the recovered state must equal the state after some prefix of the
transactions that

* includes every transaction acknowledged by then (``ack <= N``): (1), and
* includes only transactions submitted by then (``submit < N``): (3).

Values are unique per write, so a state that matches no prefix is diagnosed
as a lost acknowledged value (1), a half-applied transaction (2), or a value
no submitted transaction wrote (3). States are ``{path: value}`` dicts; the
values are the workload's own bytes objects, shared, not copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

State = dict[str, bytes]         # path -> value
DELETED = None


class Violation(NamedTuple):
    invariant: int               # number as in docs/DESIGN.md
    message: str


@dataclass(frozen=True)
class Txn:
    txn_id: int
    writes: tuple[tuple[str, bytes | None], ...]  # (path, value) or (path, DELETED), in op order
    submit: int
    ack: int

    @property
    def paths(self) -> set[str]:
        return {p for p, _ in self.writes}

    def apply(self, state: State) -> State:
        out = dict(state)
        for path, d in self.writes:
            if d is DELETED:
                out.pop(path, None)
            else:
                out[path] = d
        return out


class Timeline:
    def __init__(self, base: State, txns: list[Txn]) -> None:
        self.base = dict(base)
        self.txns = sorted(txns, key=lambda t: t.txn_id)
        self.states = [self.base]
        for t in self.txns:
            self.states.append(t.apply(self.states[-1]))
        self.writer: dict[bytes, list[int]] = {}   # value -> txn ids that wrote it
        for t in self.txns:
            for _, d in t.writes:
                if d is not DELETED:
                    self.writer.setdefault(d, []).append(t.txn_id)
        self.base_values = set(self.base.values())

    def bounds(self, cut: int) -> tuple[int, int]:
        """(shortest, longest) allowed prefix length after a cut following op ``cut``."""
        lo = max((k + 1 for k, t in enumerate(self.txns) if t.ack <= cut), default=0)
        hi = 0
        while hi < len(self.txns) and self.txns[hi].submit < cut:
            hi += 1
        return lo, max(lo, hi)

    def check(self, state: State, cut: int) -> list[Violation]:
        lo, hi = self.bounds(cut)
        if any(self.states[k] == state for k in range(lo, hi + 1)):
            return []
        return [self._diagnose(state, cut, lo, hi)]

    # -- diagnosis (only on failure) -----------------------------------------------------------

    def _diagnose(self, state: State, cut: int, lo: int, hi: int) -> Violation:
        matches = [k for k, s in enumerate(self.states) if s == state]
        if matches and max(matches) < lo:
            k = max(matches)
            lost = [t.txn_id for t in self.txns[k:lo]]
            return Violation(1, f"acknowledged txn(s) {_ids(lost)} lost: the state is the one after "
                                f"{self._name(k)} (txn {self.txns[lo - 1].txn_id} was acknowledged at op "
                                f"#{self.txns[lo - 1].ack}, the cut followed op #{cut})")
        if matches:
            k = min(matches)
            return Violation(3, f"txn {self.txns[k - 1].txn_id} is visible but was submitted only at op "
                                f"#{self.txns[k - 1].submit}, after the cut at #{cut}")
        for path, d in sorted(state.items()):
            if d not in self.writer and d not in self.base_values:
                return Violation(3, f"{path!r} holds a value no submitted transaction wrote")
            late = [i for i in self.writer.get(d, []) if self._by_id(i).submit >= cut]
            if late and d not in self.base_values and len(late) == len(self.writer[d]):
                return Violation(3, f"{path!r} holds the value of txn {late[0]}, submitted after the cut")
        for k in range(lo, min(hi + 1, len(self.txns))):
            partial = self._partial(state, k)
            if partial:
                return Violation(2, partial)
        required = self.states[lo]
        for path, d in sorted(required.items()):
            if state.get(path) != d and not self._overwritten_later(path, state.get(path), lo, hi):
                return Violation(1, f"{path!r} lost its acknowledged value (expected the value of the "
                                    f"state after {self._name(lo)}, cut after op #{cut})")
        return Violation(3, f"the state equals the state after no prefix of the submitted transactions "
                            f"(allowed: after {self._name(lo)} .. {self._name(hi)}; {len(state)} keys)")

    def _partial(self, state: State, k: int) -> str:
        """Describe txn k applied in part on top of the state after txns[:k], or ''."""
        t = self.txns[k]
        before, after = self.states[k], self.states[k + 1]
        touched = t.paths
        others = set(before) | set(after) | set(state)
        if any(state.get(p) != before.get(p) for p in others - touched):
            return ""
        new = sorted(p for p in touched if state.get(p) == after.get(p) != before.get(p))
        old = sorted(p for p in touched if state.get(p) == before.get(p) != after.get(p))
        if new and old and all(state.get(p) in (before.get(p), after.get(p)) for p in touched):
            return (f"txn {t.txn_id} is half applied: {', '.join(map(repr, new))} changed but "
                    f"{', '.join(map(repr, old))} did not")
        return ""

    def _overwritten_later(self, path: str, d, lo: int, hi: int) -> bool:
        return any(self.states[k].get(path) == d for k in range(lo, hi + 1))

    def _by_id(self, txn_id: int) -> Txn:
        return next(t for t in self.txns if t.txn_id == txn_id)

    def _name(self, k: int) -> str:
        return "no txn" if k == 0 else f"txn {self.txns[k - 1].txn_id}"


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:5])) + (" ..." if len(ids) > 5 else "")
