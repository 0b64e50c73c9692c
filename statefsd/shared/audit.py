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
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import threading
from typing import TextIO

from statefsd.errors import DeviceIOError, InvalidArgument


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
                 stream: TextIO | None = None) -> None:
        self.path = path
        self.component = component
        self._lock = threading.Lock()
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

    def close(self) -> None:
        """Close the journal file (a borrowed stream is left open)."""
        with self._lock:
            if self._file is not None and self.is_file:
                self._file.close()
            self._file = None
