"""The audit journal of both daemons: one JSON object per line, appended and
flushed per event.

Line format (docs/protocol.md, "Audit journal"; docs/keystored.md, "Log")::

    {"ts": "2025-01-31T12:00:00.123456Z", "component": "statefsd", "event": "mount", "fields": {...}}

``component`` names the daemon that wrote the line, so journals of statefsd
and keystored can be merged and still be told apart; an event's own fields
sit under ``fields`` and can never overwrite ``ts``, ``component`` or
``event``. Events worth a later investigation go here: mounts and replay
summaries, integrity failures, refused requests and refused callers, clients
vanishing mid-transaction, internal errors, start and stop. Routine reads and
writes do not.

An ``AuditLog`` is callable as ``audit(event, **fields)``, the shape the
engine expects for its ``audit=`` hook.

Bounded, whatever a client sends. Text fields (and bytes, as hex) are cut to
``EXCERPT_CHARS``, structured fields to ``STRUCT_CHARS`` of JSON; a cut line
says so with ``"truncated": {field: original length}``. Each (event, peer
uid) pair writes at most ``burst`` lines per ``window`` seconds; the rest are
counted and summed up, once the window is over, in one line
``{"event": "suppressed", "fields": {"event", "uid", "count", "window_s"}}``
(written by a short-lived flusher thread, or at close). A hostile client can
thus make the journal grow by a few hundred bytes a second per uid and event,
not by the size or rate of its requests.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import threading
import time
from typing import Any, Callable, TextIO

from statefsd.errors import DeviceIOError, InvalidArgument


EXCERPT_CHARS = 256     # text kept per field (bytes: this many hex digits)
STRUCT_CHARS = 4096     # JSON kept of a list or map field (replay summaries fit)
BURST = 20              # lines per (event, uid) per window ...
WINDOW = 10.0           # ... of this many seconds


def _jsonable(value: object) -> object:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


class AuditLog:
    """Thread-safe, line-buffered JSON-lines journal.

    ``path`` is the journal file (created 0640, appended to). Without a path
    lines go to ``stream`` (keystored logs to stderr), or nowhere. ``option``
    is the command-line flag that named the path, for error hints.
    """

    def __init__(self, path: str | None, *, component: str, option: str = "--audit",
                 stream: TextIO | None = None, burst: int = BURST, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.component = component
        self._lock = threading.Lock()
        self._limits = _RateLimits(burst, window, clock)
        self._flusher: threading.Thread | None = None
        self._file: TextIO | None = stream
        if path is not None:
            try:
                # O_NOFOLLOW: a symlink planted at the path must not make a
                # privileged daemon append to (or create) a file of its choosing.
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise InvalidArgument(f"audit journal {path} is a symlink; refusing to follow it",
                                          hint=f"give {option} the real file, or remove the link (rm {path})") from None
                parent = os.path.dirname(os.path.abspath(path))
                if not os.path.isdir(parent):
                    raise InvalidArgument(f"audit journal {path}: directory {parent} does not exist",
                                          hint=f"create it first with mkdir -p {parent}") from None
                if isinstance(exc, (PermissionError, IsADirectoryError)):
                    raise InvalidArgument(f"audit journal {path}: {exc.strerror}",
                                          hint=f"give {option} a file this user may append to") from None
                raise DeviceIOError(f"audit journal {path}: {exc.strerror}") from None
            self._file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    @property
    def is_file(self) -> bool:
        """True when lines go to a journal file of their own (not a shared stream)."""
        return self.path is not None

    def __call__(self, event: str, **fields: object) -> None:
        self.event(event, **fields)

    def event(self, event: str, **fields: object) -> None:
        if self._file is None:
            return
        with self._lock:
            allowed, summaries = self._limits.admit(event, fields.get("uid"))
            if not allowed:
                self._start_flusher()
        for summary in summaries:
            self._write("suppressed", summary)
        if allowed:
            self._write(event, _bounded(fields))

    def _write(self, event: str, fields: dict) -> None:
        ts = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        # ensure_ascii keeps undecodable key bytes (surrogates) writable.
        line = json.dumps({"ts": ts, "component": self.component, "event": event, "fields": fields},
                          default=_jsonable, ensure_ascii=True, sort_keys=False)
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except OSError:
                # A full or broken journal disk must not take the daemon down.
                pass

    def _start_flusher(self) -> None:
        """(lock held) Make sure someone writes the suppressed counts when
        their window ends, even if the flood stops and nothing else is logged."""
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._flush_loop, name="audit-flusher", daemon=True)
            self._flusher.start()

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                wait = self._limits.next_due()
                if wait is None or self._file is None:
                    self._flusher = None
                    return
            if wait > 0:
                time.sleep(wait)
            with self._lock:
                summaries = self._limits.expired()
            for summary in summaries:
                self._write("suppressed", summary)

    def close(self) -> None:
        """Close the journal file (a borrowed stream is left open)."""
        with self._lock:
            summaries = self._limits.expired(everything=True)
        for summary in summaries:
            self._write("suppressed", summary)
        with self._lock:
            if self._file is not None and self.is_file:
                self._file.close()
            self._file = None


def _bounded(fields: dict[str, object]) -> dict[str, object]:
    """``fields`` with long input cut to an excerpt, and a note of what was cut."""
    out: dict[str, object] = {}
    cut: dict[str, int] = {}
    for name, value in fields.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = _jsonable(value)
        if isinstance(value, str):
            if len(value) > EXCERPT_CHARS:
                cut[name] = len(value)
                value = value[:EXCERPT_CHARS]
        elif not isinstance(value, (int, float, bool, type(None))):
            text = json.dumps(value, default=_jsonable, ensure_ascii=True)
            if len(text) > STRUCT_CHARS:
                cut[name] = len(text)
                value = text[:STRUCT_CHARS]
        out[name] = value
    if cut:
        out["truncated"] = cut
    return out


class _RateLimits:
    """Fixed windows per (event, uid): the first ``burst`` lines of a window
    pass, the rest are counted for one summary line after it."""

    def __init__(self, burst: int, window: float, clock: Callable[[], float]) -> None:
        self.burst, self.window, self.clock = burst, window, clock
        self._windows: dict[tuple[str, Any], list] = {}   # key -> [start, lines, suppressed]

    def admit(self, event: str, uid: object) -> tuple[bool, list[dict]]:
        """Whether this line may be written, and the summaries now due."""
        summaries = self.expired()
        key = (event, uid if isinstance(uid, int) else None)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = [self.clock(), 0, 0]
        if window[1] < self.burst:
            window[1] += 1
            return True, summaries
        window[2] += 1
        return False, summaries

    def expired(self, everything: bool = False) -> list[dict]:
        """Close the windows that are over: a summary for each that suppressed lines."""
        now = self.clock()
        summaries = []
        for key, (start, _, suppressed) in list(self._windows.items()):
            if everything or now - start >= self.window:
                del self._windows[key]
                if suppressed:
                    summaries.append({"event": key[0], "uid": key[1], "count": suppressed,
                                      "window_s": self.window})
        return summaries

    def next_due(self) -> float | None:
        """Seconds until the earliest window holding suppressed lines ends."""
        starts = [start for start, _, suppressed in self._windows.values() if suppressed]
        return None if not starts else max(0.0, min(starts) + self.window - self.clock())
