"""Run test code as another uid (the attacker of the hostile-user tests): a
forked child drops to the uid; results come back as JSON through a pipe."""

from __future__ import annotations

import json
import os


def run_as_uid(uid: int, fn) -> object:
    """Run ``fn`` in a forked child that has dropped to ``uid``; return its JSON-able result.

    A fork rather than a fresh interpreter: the venv's Python lives under
    /root, which uid 65534 cannot enter.
    """
    return AsUid(uid, fn).finish()


class AsUid:
    """A forked child that drops to ``uid`` and runs ``first()`` at once; on
    ``finish()`` it runs ``then(what first returned)`` and reports that.

    ``groups`` are the supplementary groups it keeps (none by default).
    Whatever ``first`` opened (a file it holds open, say) stays open in the
    child in between, the way an attacker's process would keep it. Results
    travel as JSON.
    """

    def __init__(self, uid: int, first, then=None, *, groups: list[int] | None = None) -> None:
        self.uid = uid
        self._then = then
        results_r, results_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            try:
                os.close(results_r)
                os.close(go_w)
                ok, state = _report(results_w, lambda: _drop_to(uid, groups or []) or first())
                if ok and then is not None and os.read(go_r, 1):
                    _report(results_w, lambda: then(state))
            finally:
                os._exit(0)
        os.close(results_w)
        os.close(go_r)
        self._pid = pid
        self._results = os.fdopen(results_r, "rb")
        self._go = go_w
        try:
            self.first = self._next()
        except AssertionError:
            self._reap()
            raise

    def _next(self) -> object:
        line = self._results.readline()
        if not line:
            raise AssertionError(f"child as uid {self.uid} exited without an answer")
        out = json.loads(line)
        if "crash" in out:
            raise AssertionError(f"child as uid {self.uid} failed: {out['crash']}")
        return out["result"]

    def finish(self) -> object:
        """``then``'s result (``first``'s when there is no ``then``); the child is reaped."""
        try:
            if self._then is None:
                return self.first
            os.write(self._go, b"g")
            return self._next()
        finally:
            self._reap()

    def _reap(self) -> None:
        os.close(self._go)
        self._results.close()
        os.waitpid(self._pid, 0)


def _drop_to(uid: int, groups: list[int]) -> None:
    os.setgroups(groups)
    os.setgid(uid)
    os.setuid(uid)


def _report(fd: int, fn) -> tuple[bool, object]:
    """In a child: run ``fn`` and write one JSON line, its result or how it failed."""
    try:
        result = fn()
        ok, payload = True, {"result": result}
    except BaseException as exc:  # report anything to the parent
        result = None
        ok, payload = False, {"crash": f"{type(exc).__name__}: {exc}"}
    os.write(fd, (json.dumps(payload) + "\n").encode())
    return ok, result
