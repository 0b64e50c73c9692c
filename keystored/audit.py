"""Structured log: one JSON object per line, to stderr or a --log file.

Refusals and protocol errors go here so an operator can see who tried what.
Only labels and peer credentials are logged, never contexts, messages or keys.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TextIO


class AuditLog:
    def __init__(self, stream: TextIO, is_file: bool) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.is_file = is_file

    @classmethod
    def open(cls, path: str | None) -> "AuditLog":
        if path is None:
            return cls(sys.stderr, is_file=False)
        return cls(open(path, "a", encoding="utf-8", buffering=1), is_file=True)

    def event(self, event: str, **fields: object) -> None:
        line = json.dumps({"ts": round(time.time(), 3), "component": "keystored", "event": event, **fields},
                          default=str)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()
