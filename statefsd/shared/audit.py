"""The audit journal: one JSON object per line, appended and flushed per event.

Line format (docs/protocol.md, "Audit journal")::

    {"ts": "2025-01-31T12:00:00.123456Z", "event": "mount", "fields": {...}}

Events worth a later investigation go here: mount and replay summaries,
integrity failures, refused requests, clients vanishing mid-transaction,
internal errors and shutdown. Routine reads and writes do not.

An ``AuditLog`` is callable as ``audit(event, **fields)``, the shape the
engine expects for its ``audit=`` hook.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading

from statefsd.errors import DeviceIOError, InvalidArgument


def _jsonable(value: object) -> object:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


class AuditLog:
    """Thread-safe, line-buffered JSON-lines journal. ``path=None`` discards."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = None
        if path is not None:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            except OSError as exc:
                parent = os.path.dirname(os.path.abspath(path))
                if not os.path.isdir(parent):
                    raise InvalidArgument(f"audit journal {path}: directory {parent} does not exist",
                                          hint=f"create it first with mkdir -p {parent}") from None
                if isinstance(exc, (PermissionError, IsADirectoryError)):
                    raise InvalidArgument(f"audit journal {path}: {exc.strerror}",
                                          hint="give --audit a file this user may append to") from None
                raise DeviceIOError(f"audit journal {path}: {exc.strerror}") from None
            self._file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def __call__(self, event: str, **fields: object) -> None:
        self.event(event, **fields)

    def event(self, event: str, **fields: object) -> None:
        if self._file is None:
            return
        ts = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        # ensure_ascii keeps undecodable key bytes (surrogates) writable.
        line = json.dumps({"ts": ts, "event": event, "fields": fields},
                          default=_jsonable, ensure_ascii=True, sort_keys=False)
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except OSError:
                # A full or broken journal disk must not take the store down.
                pass

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
