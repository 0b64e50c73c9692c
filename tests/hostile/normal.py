"""The well-behaved client that hostile tests run beside the attackers.

It runs on its own thread and checks every answer against what it wrote:
a hostile client may slow it down but must never make it see an error or a
wrong value. Latency of each round trip is kept for percentiles.
"""

from __future__ import annotations

import threading
import time

from keystored.client import KeystoreClient, verify_signature
from statefsd.client import Client

KEYS = 50


class NormalClient(threading.Thread):
    """Repeats ``step`` until stopped; records latencies, errors and wrong answers."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.latencies: list[float] = []
        self.problems: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            self.open()
            i = 0
            while not self._stop_event.is_set():
                self.step(i)
                i += 1
        except Exception as exc:  # any error is a finding, not a crash of the test
            self.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.close()

    def timed(self, fn, *args):
        began = time.monotonic()
        result = fn(*args)
        self.latencies.append(time.monotonic() - began)
        return result

    def wrong(self, what: str) -> None:
        self.problems.append(what)
        self._stop_event.set()

    def finish(self) -> "NormalClient":
        self._stop_event.set()
        self.join(60)
        return self

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("inf")

    def open(self) -> None: ...
    def step(self, i: int) -> None: ...
    def close(self) -> None: ...


class StatefsdNormal(NormalClient):
    """Puts and gets its own keys (prefix ``normal/``) and lists them now and then."""

    def __init__(self, socket_path: str) -> None:
        super().__init__("normal-statefsd")
        self.socket = socket_path
        self.expected: dict[str, bytes] = {}

    def open(self) -> None:
        self.client = Client(self.socket, timeout=30)

    def step(self, i: int) -> None:
        key = f"normal/k{i % KEYS}"
        value = f"{i}:".encode() * (1 + i % 7)
        self.timed(self.client.put, key, value)
        self.expected[key] = value
        got = self.timed(self.client.get, key)
        if got != value:
            self.wrong(f"get {key} answered {got[:40]!r}, expected {value[:40]!r}")
        if i % 25 == 24:
            listed = self.timed(self.client.list, "normal/")
            if sorted(listed) != sorted(self.expected):
                self.wrong(f"list normal/ answered {len(listed)} keys, expected {len(self.expected)}")

    def close(self) -> None:
        self.client.close()


class KeystoredNormal(NormalClient):
    """Derives and signs with an allowed label; answers must match the first ones."""

    def __init__(self, socket_path: str) -> None:
        super().__init__("normal-keystored")
        self.socket = socket_path

    def open(self) -> None:
        self.client = KeystoreClient(self.socket, timeout=30)
        self.public = self.client.public_key()
        self.key = self.client.derive("statefs.data", b"normal")

    def step(self, i: int) -> None:
        key = self.timed(self.client.derive, "statefs.data", b"normal")
        if key != self.key:
            self.wrong("derive answered a different key for the same label and context")
        message = f"message {i}".encode()
        signature = self.timed(self.client.sign, "statefs.normal", message)
        if not verify_signature(self.public, "statefs.normal", message, signature):
            self.wrong(f"sign answered a signature that does not verify for {message!r}")

    def close(self) -> None:
        self.client.close()
