"""Clients that hold statefsd's resources without doing useful work.

Run in one process (the tests fork it and drop it to another uid): idle
connections that never send, slow senders that trickle one byte of a frame
every few seconds, and transactions opened to their maximum size and never
committed. Whatever statefsd closes is opened again, as a persistent
attacker would. ``counts()`` says what is held and what was refused.
"""

from __future__ import annotations

import errno
import selectors
import socket
import struct
import threading
import time

import msgpack

from statefsd.storage.format import MAX_TXN_BYTES, MAX_VALUE_BYTES

LENGTH = struct.Struct(">I")
RETRY = 1.0   # seconds before opening again what the daemon closed or refused


def _frame(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return LENGTH.pack(len(body)) + body


class Holders:
    """``idle`` idle connections and ``slow`` slow senders, kept by one selector thread."""

    def __init__(self, socket_path: str, idle: int, slow: int, byte_every: float) -> None:
        self.path = socket_path
        self.byte_every = byte_every
        # A frame whose 4-byte prefix promises a small request; it is never finished quickly.
        self.slow_bytes = _frame({"v": 1, "id": 1, "op": "get", "key": "slow/" + "s" * 200})
        self.slots: list[dict] = [{"kind": "idle"} for _ in range(idle)] + [{"kind": "slow"} for _ in range(slow)]
        self.opened = {"idle": 0, "slow": 0}
        self.closed_by_daemon = {"idle": 0, "slow": 0}
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="holders", daemon=True)

    def start(self) -> "Holders":
        self._thread.start()
        return self

    def held(self) -> dict:
        return {kind: sum(1 for s in self.slots if s["kind"] == kind and s.get("sock"))
                for kind in ("idle", "slow")}

    def _open(self, slot: dict, now: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            self.refused += 1
            slot["retry_at"] = now + RETRY
            return
        sock.setblocking(False)
        slot.update(sock=sock, sent=0, next_byte=now)
        self.opened[slot["kind"]] += 1

    def _close(self, slot: dict, now: float) -> None:
        slot["sock"].close()
        slot["sock"] = None
        slot["retry_at"] = now + RETRY
        self.closed_by_daemon[slot["kind"]] += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for slot in self.slots:
                sock = slot.get("sock")
                if sock is None:
                    if now >= slot.get("retry_at", 0):
                        self._open(slot, now)
                    continue
                try:
                    if sock.recv(65536) == b"":  # an answer (a refusal) is read and dropped
                        self._close(slot, now)
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    self._close(slot, now)
                    continue
                if slot["kind"] == "slow" and now >= slot["next_byte"]:
                    data = self.slow_bytes
                    try:
                        sock.send(data[slot["sent"] % len(data):][:1])
                        slot["sent"] += 1
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                            self._close(slot, now)
                            continue
                    slot["next_byte"] = now + self.byte_every
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for slot in self.slots:
            if slot.get("sock"):
                slot["sock"].close()


class TxnHolder(threading.Thread):
    """Opens a streamed transaction, fills it to MAX_TXN_BYTES, never commits."""

    def __init__(self, socket_path: str, number: int) -> None:
        super().__init__(name=f"txn-holder-{number}", daemon=True)
        self.path = socket_path
        self.number = number
        self.full = False            # the transaction holds MAX_TXN_BYTES now
        self.refusals: list[str] = []
        self.internal: list[str] = []
        self.reopened = 0
        self.dropped = ""            # why the last connection ended
        self._stop_event = threading.Event()

    def run(self) -> None:
        value = bytes(MAX_VALUE_BYTES)
        puts = MAX_TXN_BYTES // MAX_VALUE_BYTES
        while not self._stop_event.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(120)
                    sock.connect(self.path)
                    stream = sock.makefile("rb")
                    if self._ask(sock, stream, {"v": 1, "id": 1, "op": "begin"}):
                        for i in range(puts):
                            if not self._ask(sock, stream, {"v": 1, "id": 2 + i, "op": "txn_put",
                                                            "key": f"hold/{self.number}/{i}", "value": value}):
                                break
                        else:
                            self.full = True
                    # Hold what we have until told to stop or the daemon hangs up.
                    sock.settimeout(0.5)
                    while not self._stop_event.is_set():
                        try:
                            if sock.recv(1) == b"":
                                break
                        except TimeoutError:
                            continue
            except OSError as exc:
                self.dropped = f"{type(exc).__name__}: {exc}"
            self.full = False
            if self._stop_event.wait(RETRY):
                return
            self.reopened += 1

    def _ask(self, sock: socket.socket, stream, message: dict) -> bool:
        sock.sendall(_frame(message))
        head = stream.read(LENGTH.size)
        if len(head) < LENGTH.size:
            raise ConnectionResetError("statefsd hung up")
        reply = msgpack.unpackb(stream.read(LENGTH.unpack(head)[0]), raw=False)
        if reply.get("ok"):
            return True
        error = reply.get("error") or {}
        text = f"{error.get('name')}: {str(error.get('message'))[:160]}"
        (self.internal if error.get("name") == "EINTERNAL" else self.refusals).append(text)
        return False

    def stop(self) -> None:
        self._stop_event.set()


class Attack:
    """All three kinds at once, against one socket."""

    def __init__(self, socket_path: str, *, idle: int, slow: int, txns: int, byte_every: float) -> None:
        self.holders = Holders(socket_path, idle, slow, byte_every)
        self.txns = [TxnHolder(socket_path, n) for n in range(txns)]

    def start(self) -> "Attack":
        self.holders.start()
        for txn in self.txns:
            txn.start()
        return self

    def settle(self, timeout: float) -> dict:
        """Wait until every idle/slow slot is held and every transaction is full
        or refused (or ``timeout``); what is held then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            held = self.holders.held()
            if (held["idle"] + held["slow"] == len(self.holders.slots)
                    and all(t.full or t.refusals for t in self.txns)):
                break
            time.sleep(0.2)
        return self.counts()

    def counts(self) -> dict:
        return {"held": self.holders.held(), "opened": self.holders.opened,
                "closed_by_daemon": self.holders.closed_by_daemon, "connect_refused": self.holders.refused,
                "txns_full": sum(t.full for t in self.txns),
                "txn_refusals": sorted({r for t in self.txns for r in t.refusals})[:5],
                "txn_internal_errors": [e for t in self.txns for e in t.internal][:5],
                "txns_reopened": sum(t.reopened for t in self.txns),
                "txn_dropped": sorted({t.dropped for t in self.txns if t.dropped})[:3]}

    def stop(self) -> dict:
        counts = self.counts()
        self.holders.stop()
        for txn in self.txns:
            txn.stop()
        for txn in self.txns:
            txn.join(10)
        return counts
