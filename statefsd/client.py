"""Python client for statefsd.

    from statefsd.client import Client

    with Client("/run/statefs.sock") as c:      # or $STATEFS_SOCKET
        c.put("app/config", b"...")
        value = c.get("app/config")
        with c.transaction() as t:              # commits on clean exit,
            t.put("a", b"1")                    # aborts on an exception
            t.delete("b")
        print(t.txn_id)

        while True:                             # read, compute, commit if unchanged
            value, txn = c.get_versioned("counter")
            try:
                c.apply([("put", "counter", b"%d" % (int(value) + 1))], expect=[("counter", txn)])
                break
            except Conflict:                    # someone wrote it meanwhile: read again
                continue

Failures raise the matching :class:`statefsd.errors.StateFSError` subclass
(``NotFound``, ``TooBig``, ``Conflict``...); an unreachable daemon raises
``ConnectionFailed`` naming the socket.

Conditions (``expect``): (key, txn id) pairs a write depends on, the txn id
as ``get_versioned``/``mget`` returned it, 0 for "the key must be absent".
If any no longer holds when the transaction is written, nothing is written
and ``Conflict`` is raised: read again and retry. No lock is held between
the read and the write.

Threads: a Client owns one connection and is safe to share, but calls are
serialised on it, and an open ``transaction()`` holds the connection until it
ends (other threads wait). For parallel work use one Client per thread.
A dropped connection is reopened by the next call; the call that saw the
drop raises ConnectionFailed, and whether a commit in flight then landed is
unknown to the client. A connection the daemon closed while it sat idle (its
idle deadline, docs/protocol.md "Limits") is noticed before a request is
sent and reopened quietly, outside a transaction.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import stat
import threading
from typing import Any, Iterable

from statefsd import protocol
from statefsd.errors import (
    Conflict, ConnectionFailed, InvalidArgument, ProtocolError, StateFSError, TooBig, TransactionError,
)
from statefsd.shared import unixrpc
from statefsd.storage.format import FEED_DEFAULT_BYTES, MAX_VALUE_BYTES


class Client:
    def __init__(self, socket_path: str | None = None, *, timeout: float | None = None) -> None:
        path = socket_path or os.environ.get("STATEFS_SOCKET")
        if not path:
            raise ConnectionFailed("no statefsd socket given",
                                   hint="pass --socket PATH or set STATEFS_SOCKET=PATH")
        self.socket_path = path
        self.timeout = timeout
        self.server: dict = {}          # the daemon's hello answer
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._reader = None
        self._ids = itertools.count(1)
        self._in_transaction = False

    # ------------------------------------------------------- connection

    def connect(self) -> None:
        with self._lock:
            if self._sock is not None:
                return
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                raise _connect_error(self.socket_path, exc) from None
            self._sock, self._reader = sock, unixrpc.FrameReader(sock, protocol.REPLY_ENDPOINT)
            try:
                hello = self._roundtrip("hello", {})
            except BaseException:
                self.close()
                raise
            if hello.get("protocol") != protocol.PROTOCOL_VERSION:
                self.close()
                raise ProtocolError(f"statefsd at {self.socket_path} speaks protocol "
                                    f"{hello.get('protocol')!r}, this client {protocol.PROTOCOL_VERSION}")
            self.server = hello

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
            if self._sock is not None:
                self._sock.close()
            self._sock = self._reader = None

    def __enter__(self) -> "Client":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, **args: Any) -> dict:
        """Send one request and return the response map (errors raised)."""
        with self._lock:
            self._connect_afresh_if_dropped()
            return self._roundtrip(op, args)

    def _connect_afresh_if_dropped(self) -> None:
        """Connected, on a connection the daemon has not closed (the caps a
        request is shaped by come from that connection's hello)."""
        with self._lock:
            if self._sock is not None and not self._in_transaction and _closed_by_daemon(self._sock):
                self.close()  # nothing was sent on it: reconnecting is safe
            self.connect()

    def _roundtrip(self, op: str, args: dict) -> dict:
        request_id = next(self._ids)
        frame = protocol.ENDPOINT.frame_parts(protocol.make_request(request_id, op, **args))
        try:
            unixrpc.send_parts(self._sock, frame)
            body = self._reader.read()
        except OSError as exc:
            self.close()
            raise ConnectionFailed(f"lost the connection to statefsd at {self.socket_path} "
                                   f"during {op}: {exc}") from None
        except ProtocolError:
            self.close()  # the framing is lost; start clean next time
            raise
        if body is None:
            self.close()
            raise ConnectionFailed(f"statefsd at {self.socket_path} closed the connection during {op}")
        return protocol.check_response(protocol.REPLY_ENDPOINT.decode(body), request_id)

    # -------------------------------------------------------- operations

    def hello(self) -> dict:
        return self.call("hello")

    def info(self) -> dict:
        return _field(self.call("info"), "info", dict)

    def compact(self) -> dict:
        """Compact the log now; returns the compaction statistics."""
        return _field(self.call("compact"), "compaction", dict)

    def verify(self) -> dict:
        """Scrub the mounted log online (docs/protocol.md, verify): the
        verdict map; damage is in its ``findings``, never raised. A long log
        takes a while: give this client a timeout that allows for it."""
        return _field(self.call("verify"), "verify", dict)

    def feed(self, after: int = 0, cursor: bytes | None = None,
             max_bytes: int = FEED_DEFAULT_BYTES) -> dict:
        """One page of the committed transactions after ``cursor`` (None:
        from the base of the log), in commit order (docs/protocol.md, feed):
        ``{"epoch", "reset", "txns": [(txn id, chain, [(key, value or None
        for a delete), ...]), ...], "cursor", "more", "max_txn", "chain", "from_empty"}``.
        ``reset`` True: drop every key held before applying ``txns``. Feed
        again with the returned cursor (and ``after`` the last txn id
        applied) while ``more`` is True."""
        args: dict[str, Any] = {"after": after, "max_bytes": max_bytes}
        if cursor is not None:
            args["cursor"] = _bytes(cursor)
        response = self.call("feed", **args)
        page = {name: _field(response, name, kind) for name, kind in
                (("epoch", int), ("reset", bool), ("txns", list), ("cursor", bytes), ("more", bool),
                 ("max_txn", int), ("chain", bytes), ("from_empty", bool))}
        page["txns"] = [_feed_txn(txn) for txn in page["txns"]]
        return page

    def get(self, key: str) -> bytes:
        return _field(self.call("get", key=key), "value", bytes)

    def get_versioned(self, key: str) -> tuple[bytes, int]:
        """The value and the txn id that wrote it (what ``expect`` names)."""
        response = self.call("get", key=key)
        return _field(response, "value", bytes), _field(response, "txn", int)

    def mget(self, keys: Iterable[str]) -> list[tuple[bytes, int] | None]:
        """(value, txn id) per key in order, None for a missing key. Any
        number of keys: sent in requests of at most MAX_MGET_KEYS, asking
        again for the rest when an answer stopped early at its byte cap.
        Each key is read as the daemon reaches it, not all at one instant."""
        keys = list(keys)
        found: list[tuple[bytes, int] | None] = []
        while len(found) < len(keys):
            batch = keys[len(found):len(found) + protocol.MAX_MGET_KEYS]
            values = _field(self.call("mget", keys=batch), "values", list)
            if not values or len(values) > len(batch):
                raise ProtocolError(f"mget of {len(batch)} keys answered {len(values)} values")
            found.extend(_versioned(entry) for entry in values)
        return found

    def stat(self, key: str) -> dict:
        return _field(self.call("stat", key=key), "stat", dict)

    def put(self, key: str, value: bytes) -> int:
        return self.call("put", key=key, value=_value(value))["txn"]

    def delete(self, key: str) -> int:
        return self.call("delete", key=key)["txn"]

    def list(self, prefix: str = "") -> list[str]:
        """Every key starting with ``prefix``, sorted; paged under the hood."""
        keys: list[str] = []
        args: dict[str, Any] = {"prefix": prefix}
        while True:
            page = self.call("list", **args)
            batch = _field(page, "keys", list)
            keys.extend(batch)
            if not page.get("more") or not batch:
                return keys
            args["after"] = batch[-1]

    def apply(self, ops: Iterable[tuple], expect: Iterable[tuple[str, int]] = ()) -> int | None:
        """One-shot atomic transaction in a single frame.

        ``ops``: ("put", key, value) or ("delete", key) tuples; ``expect``:
        conditions (key, txn id), else ``Conflict`` and nothing is written.
        The frame cap bounds the total size; use :meth:`transaction` for
        bigger ones.
        """
        wire: list = []
        for op in ops:
            if op[0] == "put":
                wire.append(["put", op[1], _value(op[2])])
            elif op[0] == "delete":
                wire.append(["delete", op[1]])
            else:
                raise InvalidArgument(f"unknown transaction op {op[0]!r}; use put or delete")
        with self._lock:
            self._connect_afresh_if_dropped()
            if self.server.get("caps", {}).get("txn_op_arrays") is not True:   # an older daemon reads maps only
                wire = [dict(zip(("op", "key", "value"), op)) for op in wire]
            return self.call("txn", ops=wire, **self._conditions(expect))["txn"]

    def _conditions(self, expect: Iterable[tuple[str, int]]) -> dict:
        """The ``expect`` field for a commit (none when there is no
        condition). A daemon that does not know the field would ignore it
        and write regardless, so it is refused here instead."""
        wire = [{"key": key, "txn": txn} for key, txn in expect]
        if not wire:
            return {}
        self._connect_afresh_if_dropped()
        if "max_txn_conditions" not in self.server.get("caps", {}):
            raise ProtocolError(f"statefsd at {self.socket_path} does not check transaction conditions",
                                hint="upgrade statefsd; a write with conditions was not sent")
        return {"expect": wire}

    def transaction(self) -> "Transaction":
        return Transaction(self)


class Transaction:
    """A server-side transaction streamed op by op (begin, txn_put..., commit).

    Each op is checked by the daemon as it arrives, so a bad key or a cap
    overrun raises at the offending ``put``; the daemon then drops the whole
    transaction. Nothing is visible to anyone until commit returns.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.txn_id: int | None = None
        self._open = False

    def __enter__(self) -> "Transaction":
        self.client._lock.acquire()  # the connection is ours until the end
        try:
            self.client.call("begin")
        except BaseException:
            self.client._lock.release()
            raise
        self._open = True
        self.client._in_transaction = True  # a dropped connection must not be reopened silently
        return self

    def put(self, key: str, value: bytes) -> None:
        self._check_open()
        self.client.call("txn_put", key=key, value=_value(value))

    def delete(self, key: str) -> None:
        self._check_open()
        self.client.call("txn_delete", key=key)

    def commit(self, expect: Iterable[tuple[str, int]] = ()) -> int | None:
        """Write the buffered ops, if every condition of ``expect`` (key,
        txn id) still holds; else ``Conflict`` and the transaction is gone."""
        self._check_open()
        conditions = self.client._conditions(expect)
        self._open = False
        self.txn_id = self.client.call("commit", **conditions)["txn"]
        return self.txn_id

    def abort(self) -> None:
        if self._open:
            self._open = False
            self.client.call("abort")

    def _check_open(self) -> None:
        if not self._open:
            raise TransactionError("this transaction already ended")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self._open:
                    self.commit()
            elif self._open and not isinstance(exc, ConnectionFailed):
                try:
                    self.abort()
                except StateFSError:
                    pass  # the original exception matters more
        finally:
            self._open = False
            self.client._in_transaction = False
            self.client._lock.release()


def _closed_by_daemon(sock: socket.socket) -> bool:
    """True when the daemon has closed an idle connection (end of stream, or
    anything unasked for, waiting to be read). A poll, not a peeking recv: on
    a socket with a timeout Python waits out the timeout even for MSG_DONTWAIT."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


def _bytes(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidArgument(f"values are bytes, got {type(value).__name__}; encode text first")


def _value(value: object) -> bytes:
    """A value to send; one over the documented limit is refused here, with
    the limit that matters to the caller (not the frame cap it would hit)."""
    data = _bytes(value)
    if len(data) > MAX_VALUE_BYTES:
        raise TooBig(f"value of {len(data)} bytes exceeds the limit of {MAX_VALUE_BYTES}",
                     hint="split the value over several keys")
    return data


def _connect_error(path: str, exc: OSError) -> ConnectionFailed:
    """Why the socket cannot be reached, in the words that lead to the fix."""
    if os.path.isdir(path):
        return ConnectionFailed(f"{path} is a directory, not a statefsd socket",
                                hint=f"give the socket file, e.g. {os.path.join(path, 'statefs.sock')}")
    if os.path.exists(path) and not stat.S_ISSOCK(os.stat(path).st_mode):
        return ConnectionFailed(f"{path} is not a socket", hint="check --socket or STATEFS_SOCKET")
    if isinstance(exc, FileNotFoundError):
        return ConnectionFailed(f"cannot connect to statefsd at {path}: no such socket",
                                hint="is statefsd running? start it with --socket " + path)
    return ConnectionFailed(f"cannot connect to statefsd at {path}: {exc.strerror or exc}")


def _versioned(entry: object) -> tuple[bytes, int] | None:
    """One mget answer: [value, txn id] or nil."""
    if entry is None:
        return None
    if (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], bytes)
            and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
        return entry[0], entry[1]
    raise ProtocolError("an mget answer holds an entry that is neither [bin, int] nor nil")


def _feed_txn(txn: object) -> tuple[int, bytes, list[tuple[str, bytes | None]]]:
    """One transaction of a feed page: [txn id, chain, [[key, value or nil], ...]]."""
    if (isinstance(txn, list) and len(txn) == 3 and type(txn[0]) is int and isinstance(txn[1], bytes)
            and isinstance(txn[2], list)):
        changes = txn[2]
        if all(isinstance(c, list) and len(c) == 2 and isinstance(c[0], str)
               and (c[1] is None or isinstance(c[1], bytes)) for c in changes):
            return txn[0], txn[1], [(key, value) for key, value in changes]
    raise ProtocolError("a feed page holds a transaction that is not [int, bin, [[str, bin or nil], ...]]")


def _field(response: dict, name: str, kind: type) -> Any:
    value = response.get(name)
    if not isinstance(value, kind):
        raise ProtocolError(f"response field {name!r} is missing or not {kind.__name__}")
    return value
