"""A workload's view of the store: every commit is recorded for the checker.

The session mounts the system under test on a simulated device and records,
for each transaction, its txn id, what it wrote and the trace positions at
which commit() was called and had returned. Runs are deterministic from the
seed, including concurrent commits: the :class:`GateDevice` holds each
group write until the main thread lets that writer through, so who lands in
which group, and when each commit returns, never depends on the scheduler.
"""

from __future__ import annotations

import random
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from statefsd.storage.engine import Engine, Mutation
from statefsd.errors import Conflict, NoSpace
from statefsd.testing.simdev import SimulatedDevice, Trace

from statefsd.testing.campaign.systems import DeviceProxy, FixedSigner, System
from statefsd.testing.campaign.timeline import DELETED, Timeline, Txn

WAIT_SECONDS = 30.0             # a thread that does not reach the gate by then is a harness bug


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"campaign: timed out waiting for {what}")
        time.sleep(0.0002)


class GateDevice(DeviceProxy):
    """While holding, a write waits until the main thread admits its thread."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self._cv = threading.Condition()
        self._holding = False
        self._waiting: set[int] = set()
        self._admitted: set[int] = set()

    def hold(self) -> None:
        with self._cv:
            self._holding = True

    def release(self) -> None:
        with self._cv:
            self._holding = False
            self._cv.notify_all()

    def waiting(self) -> set[int]:
        with self._cv:
            return set(self._waiting)

    def admit(self, ident: int) -> None:
        with self._cv:
            self._admitted.add(ident)
            self._cv.notify_all()

    def write(self, offset: int, data: bytes) -> None:
        me = threading.get_ident()
        with self._cv:
            if self._holding:
                self._waiting.add(me)
                self._cv.notify_all()
                if not self._cv.wait_for(lambda: me in self._admitted or not self._holding, WAIT_SECONDS):
                    raise RuntimeError("campaign: a gated write was never admitted")
                self._waiting.discard(me)
                self._admitted.discard(me)
        self.inner.write(offset, data)


@dataclass
class Run:
    """A workload run: its trace, the transactions it submitted, and the image's identity."""

    trace: Trace
    timeline: Timeline
    salt: bytes
    encrypted: bool
    notes: list[str] = field(default_factory=list)
    signer: FixedSigner | None = None
    start: int = 0                      # first crash point (a workload's setup may be left uncut)
    extra_check: object | None = None   # checks of an application on the store (vaultcheck.VaultPlan)


class Session:
    def __init__(self, system: System, device: SimulatedDevice, *, seed: int, encrypted: bool,
                 salt: bytes, signer: FixedSigner | None = None) -> None:
        self.system = system
        self.device = device
        self.gate = GateDevice(device)
        self.rng = random.Random(seed)
        self.encrypted = encrypted
        self.salt = salt
        self.signer = signer
        self.txns: list[Txn] = []
        self.rejected = 0
        self.abandoned = 0
        self.conflicts = 0
        self.start = 0
        self.extra_check = None
        self._serial = 0
        self.engine: Engine = system.mount(self.gate, signer=signer)

    # -- helpers for workloads -------------------------------------------------------------------

    def ops(self) -> int:
        return len(self.device.trace)

    def value(self, size: int) -> bytes:
        """A value no other write of this run has (a serial number, then seeded bytes)."""
        self._serial += 1
        if size < 8:
            size = 8
        return struct.pack("<Q", self._serial) + self.rng.randbytes(size - 8)

    # -- operations --------------------------------------------------------------------------------

    def commit(self, mutations: list[Mutation], expect=()) -> int | None:
        """Commit and record; None if the engine refused it for lack of space (nothing written).
        A transaction whose ``expect`` conditions fail raises Conflict (nothing written)."""
        submit = self.ops()
        try:
            txn_id = self.engine.commit(mutations, expect)
        except NoSpace:
            self.rejected += 1
            return None
        except Conflict:
            self.conflicts += 1
            raise
        self._record(txn_id, mutations, submit, self.ops())
        return txn_id

    def put(self, path: str, size: int) -> int | None:
        return self.commit([Mutation("put", path, self.value(size))])

    def delete(self, path: str) -> int | None:
        return self.commit([Mutation("delete", path)])

    def abandon(self, mutations: list[Mutation]) -> None:
        """A transaction its client abandoned (disconnect) before commit: at engine level it is
        never submitted, so nothing is written; its values are unique, so if one ever showed up
        the state would match no prefix (invariant 3)."""
        self.abandoned += 1

    def concurrent(self, batches: list[list[Mutation]]) -> None:
        """Commit each batch from its own thread, as one leader group then one follower group.

        The leader is admitted alone until it has returned. A leader that needs the engine again
        after its group (an automatic compaction) while the follower group waits at the gate
        would stall: the gate then times out with an error rather than hang the campaign."""
        results: list[tuple[int, int] | None] = [None] * len(batches)
        errors: list[BaseException] = []
        submit = self.ops()

        def worker(i: int) -> None:
            try:
                txn_id = self.engine.commit(batches[i])
            except NoSpace:
                return
            except BaseException as exc:  # re-raised in the main thread below
                errors.append(exc)
                return
            results[i] = (txn_id, self.ops())

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(batches))]
        self.gate.hold()
        try:
            threads[0].start()
            wait_until(lambda: threads[0].ident in self.gate.waiting() or not threads[0].is_alive(),
                       "the leader's group write")
            if not threads[0].is_alive():
                raise RuntimeError("campaign: concurrent() needs a leader transaction that fits the log")
            for i, t in enumerate(threads[1:], start=1):
                t.start()
                # The engine's queue is private; reading its length is the one way to know a
                # follower is waiting (and in which order) without racing it.
                wait_until(lambda i=i: self.engine.role.queued == i, f"follower {i} to queue")
            # The leader records its ack before the next group is admitted.
            self._drain(threads[:1], only=threads[0].ident)
            self._drain(threads[1:])
        finally:
            self.gate.release()
        for t in threads:
            t.join(WAIT_SECONDS)
        if errors:
            raise errors[0]
        for i, result in enumerate(results):
            if result is None:
                self.rejected += 1
            else:
                self._record(result[0], batches[i], submit, result[1])

    def _drain(self, threads: list[threading.Thread], only: int | None = None) -> None:
        while any(t.is_alive() for t in threads):
            for ident in self.gate.waiting():
                if only is None or ident == only:
                    self.gate.admit(ident)
            for t in threads:
                t.join(0.0005)

    def remount(self) -> None:
        self.engine.close()
        self.engine = self.system.mount(self.gate, signer=self.signer)

    def maintain(self, step: Callable[[Engine], object]):
        """A step that must not change the logical state (e.g. compaction); returns its result."""
        return step(self.engine)

    def compact_during(self, batches: list[list[Mutation]]) -> None:
        """Compact, and commit each batch while the compaction copies its snapshot.

        The compaction's first snapshot write is held at the gate; meanwhile each batch is
        committed from a thread of its own whose writes alone are let through, so every one
        lands in the old region after the snapshot was taken and must reach the new region
        through the catch-up. Deterministic: nothing here depends on the scheduler."""
        stats: list[dict] = []
        errors: list[BaseException] = []

        def compactor() -> None:
            try:
                stats.append(self.engine.compact())
            except BaseException as exc:  # re-raised in the main thread below
                errors.append(exc)

        thread = threading.Thread(target=compactor, daemon=True)
        self.gate.hold()
        try:
            thread.start()
            wait_until(lambda: thread.ident in self.gate.waiting() or not thread.is_alive(),
                       "the compaction's first snapshot write")
            if not thread.is_alive():
                raise RuntimeError(f"campaign: compaction ended before writing a snapshot: {errors}")
            for mutations in batches:
                self._commit_admitted(mutations)
        finally:
            self.gate.release()
        thread.join(WAIT_SECONDS)
        if errors:
            raise errors[0]
        if not stats or stats[0]["delta_ops"] < sum(map(len, batches)):
            raise RuntimeError(f"campaign: the commits did not reach the compaction's catch-up: {stats}")

    def _commit_admitted(self, mutations: list[Mutation]) -> None:
        """commit() from a thread of its own, letting through the gate only that thread's writes."""
        result: list[tuple[int, int]] = []
        errors: list[BaseException] = []
        submit = self.ops()

        def worker() -> None:
            try:
                result.append((self.engine.commit(mutations), self.ops()))
            except NoSpace:
                pass
            except BaseException as exc:  # re-raised in the main thread below
                errors.append(exc)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        self._drain([thread], only=thread.ident)
        if errors:
            raise errors[0]
        if result:
            self._record(result[0][0], mutations, submit, result[0][1])
        else:
            self.rejected += 1

    def finish(self) -> Run:
        self.engine.close()
        notes = [f"{len(self.txns)} txns, {self.rejected} refused (ENOSPC), {self.abandoned} abandoned"
                 + (f", {self.conflicts} conflicts (ECONFLICT, nothing written)" if self.conflicts else "")]
        return Run(self.device.trace, Timeline({}, self.txns), self.salt, self.encrypted, notes,
                   self.signer, self.start, self.extra_check)

    def _record(self, txn_id: int, mutations: list[Mutation], submit: int, ack: int) -> None:
        writes = tuple((m.path, DELETED if m.kind == "delete" else bytes(m.value)) for m in mutations)
        self.txns.append(Txn(txn_id, writes, submit, ack))
