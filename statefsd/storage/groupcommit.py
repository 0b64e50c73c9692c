"""The log's single writer role and the group-commit queue.

Any number of threads commit at once: the first to find the role free
becomes the leader, takes every queued transaction, writes them as one
group with one flush, and wakes the followers with their results. Each
waiting commit sleeps on a lock of its own, so a finished group wakes its
own requests and the next leader only, not every thread that is waiting
(with a shared condition each group woke them all, and most went straight
back to sleep: a wake-up storm per group under many clients). Work that
needs the log to itself (compaction's snapshot and switch, a checkpoint)
takes the role exclusively; while it waits, no new leader starts, so a
stream of commits cannot starve it. The rules are numbered in engine.py.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, NamedTuple

from statefsd.errors import ReadOnly, StateFSError
from statefsd.storage import format as fmt


class Condition(NamedTuple):
    """A key must still have been last written by ``txn_id`` (0: be absent)
    when its transaction is written."""

    path: str
    raw: bytes
    txn_id: int


class Request:
    """One transaction waiting for a group."""

    __slots__ = ("ops", "expect", "done", "txn_id", "error", "wake")

    def __init__(self, ops: list[tuple[fmt.Op, bytes]], expect: tuple[Condition, ...] = ()) -> None:
        self.ops = ops
        self.expect = expect
        self.done = False
        self.txn_id = 0
        self.error: StateFSError | None = None
        self.wake: threading.Lock | None = None   # held while its thread sleeps; released to wake it


WriteGroup = Callable[[list[Request]], list[Request]]


class WriterRole:
    def __init__(self, name: str) -> None:
        self._name = name
        self._cv = threading.Condition()
        self._queue: list[Request] = []
        self._held = False
        self._exclusive_waiters = 0
        self._cv_waiters = 0      # threads in exclusive() or last_hold() waiting on the condition
        self.closing = False   # no new commits; set once, by close

    @property
    def queued(self) -> int:
        return len(self._queue)

    def commit(self, req: Request, write_group: WriteGroup) -> None:
        """Queue ``req`` and return when a leader (perhaps this thread) has
        written it or failed it. ``write_group`` runs with the role held
        and returns the requests it left for the next group."""
        with self._cv:
            if self.closing:
                raise ReadOnly(f"{self._name} is unmounted")
            self._queue.append(req)
            while not req.done:
                if self._held or self._exclusive_waiters:
                    self._sleep(req)
                    continue
                batch, self._queue = self._queue, []
                self._held = True
                self._cv.release()
                deferred: list[Request] = []
                try:
                    deferred = write_group(batch)
                finally:
                    self._cv.acquire()
                    self._queue[:0] = deferred
                    self._held = False
                    for done in batch:   # done, or deferred (then they check again)
                        self._wake(done)
                    self._hand_on()

    def _sleep(self, req: Request) -> None:
        """With the condition's lock held: sleep until a leader wakes ``req``
        (written, or first in the queue with the role free)."""
        wake = req.wake = threading.Lock()
        wake.acquire()
        self._cv.release()
        try:
            wake.acquire()
        finally:
            self._cv.acquire()
            req.wake = None

    @staticmethod
    def _wake(req: Request) -> None:
        if req.wake is not None:
            req.wake.release()
            req.wake = None

    def _hand_on(self) -> None:
        """The role was just freed (condition's lock held): wake exclusive
        and closing waiters, else the first queued commit to lead (C4)."""
        if self._cv_waiters:
            self._cv.notify_all()
        if self._queue and not self._exclusive_waiters:
            self._wake(self._queue[0])

    def _wait(self) -> None:
        self._cv_waiters += 1
        try:
            self._cv.wait()
        finally:
            self._cv_waiters -= 1

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the role, ahead of any commit leader that has not started."""
        with self._cv:
            self._exclusive_waiters += 1
            while self._held:
                self._wait()
            self._exclusive_waiters -= 1
            self._held = True
        try:
            yield
        finally:
            self.release()

    def try_hold(self) -> bool:
        """Take the role only if it is free now (never waits: a read inside
        compaction's catch-up must not wait on itself)."""
        with self._cv:
            if self._held or self.closing:
                return False
            self._held = True
            return True

    def release(self) -> None:
        with self._cv:
            self._held = False
            self._hand_on()

    def begin_close(self) -> bool:
        """Refuse new commits from now on; False if already closing."""
        with self._cv:
            if self.closing:
                return False
            self.closing = True
            return True

    @contextlib.contextmanager
    def last_hold(self):
        """Hold the role once every commit queued before close is written."""
        with self._cv:
            while self._held or self._queue or self._exclusive_waiters:
                self._wait()
            self._held = True
        try:
            yield
        finally:
            self.release()
