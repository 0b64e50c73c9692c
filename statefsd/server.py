"""The statefsd socket server: frames in, engine calls, frames out.

One thread per connection with blocking sockets: a request costs one read
and one write, and commits from different connections meet in the engine's
group commit. Every failure of one request becomes an error frame for that
request; nothing a client sends can stop the daemon.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import logging
import socket
import threading
import time
from typing import Any, Callable

from statefsd import protocol
from statefsd.shared import unixrpc
from statefsd.storage.engine import Mutation, mutation_op, utf8_text
from statefsd.errors import (
    Busy, Code, InternalError, ProtocolError, ReadOnly, StateFSError, TooBig, TransactionError,
)
from statefsd.storage.format import MAX_KEY_BYTES, MAX_TXN_BYTES, MAX_TXN_OPS, TransactionTally

log = logging.getLogger("statefsd.server")

# Errors a client causes all the time; everything else is worth an audit line
# (the engine adds its own lines for integrity failures and a full log).
_QUIET = {Code.ENOTFOUND, Code.ETXN, Code.ECONFLICT}


def encryption_mode(info: dict) -> str:
    """'on' or 'off' from engine.info(), whatever cipher name it reports."""
    mode = info.get("encryption", "off")
    return "off" if mode in ("off", None, False, 0, "") else "on"


# A buffered op is charged its key and value plus this much bookkeeping, so
# one transaction of the maximum size is charged at most MIN_TXN_BUDGET.
OP_OVERHEAD = 128
MIN_TXN_BUDGET = MAX_TXN_BYTES + MAX_TXN_OPS * (MAX_KEY_BYTES + OP_OVERHEAD)
# What all open transactions together may buffer, unless --txn-budget says
# otherwise: four transactions of the maximum size (docs/protocol.md).
DEFAULT_TXN_BUDGET = 4 * MIN_TXN_BUDGET
# A transaction that held at least this much hands its memory back to the
# system when it ends (see return_freed_memory).
TRIM_AFTER_BYTES = 1 << 20


class TxnBudget:
    """Bytes buffered by the open transactions of every connection together,
    so that many clients cannot make the daemon hold more than ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> None:
        with self._lock:
            if self.used + size > self.limit:
                raise Busy(f"open transactions of all clients already buffer {self.used} of the "
                           f"{self.limit} bytes statefsd allows (--txn-budget)",
                           hint="retry once other transactions have committed, or send smaller "
                                "transactions; the operator may raise statefsd --txn-budget")
            self.used += size

    def give_back(self, size: int) -> None:
        with self._lock:
            self.used -= size


class TxnBuffer:
    """A connection's open transaction, capped as each op arrives so a
    client cannot make the daemon hold more than one transaction's worth,
    and charged to the daemon-wide budget until it ends."""

    def __init__(self, budget: TxnBudget) -> None:
        self.mutations: list[Mutation] = []
        self.tally = TransactionTally()
        self.budget = budget
        self.held = 0

    def add(self, kind: str, key: str, value: bytes = b"") -> None:
        mutation = Mutation(kind, key, value)
        op, _ = mutation_op(mutation)
        problem = self.tally.problem(op)
        if problem:
            raise TooBig(problem)
        # A value received as a view of its frame keeps the whole frame alive.
        pinned = len(value.obj) if isinstance(value, memoryview) else op.value_len
        size = len(op.path) + max(op.value_len, pinned) + OP_OVERHEAD
        self.budget.take(size)
        self.held += size
        self.mutations.append(mutation)
        self.tally.add(op)

    def release(self) -> None:
        """Drop the buffered ops and give their bytes back to the budget (idempotent)."""
        held, self.held = self.held, 0
        self.mutations = []
        if held:
            self.budget.give_back(held)
            if held >= TRIM_AFTER_BYTES:
                return_freed_memory()


def _libc_function(name: str) -> Callable[..., int] | None:
    # The process's own symbols already hold the C library's: no search for
    # it (find_library runs ldconfig, twice per start).
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):   # not glibc: its allocator needs no help
        return None


_malloc_trim = _libc_function("malloc_trim")
_mallopt = _libc_function("mallopt")
M_ARENA_MAX = -8               # glibc's mallopt parameter number


def share_one_heap() -> None:
    """Make every thread allocate from glibc's one main heap.

    By default each session thread may get an arena of its own, and buffered
    values freed there stay resident after their clients leave (measured:
    40-130 MiB after 20 transactions ended); malloc_trim returns the main
    heap's free pages well. Giving large blocks their own mappings instead
    (a 32 KiB mmap threshold) did the same for memory but halved bulk writes
    (1 MiB values: 268 -> 122 MB/s); one heap costs nothing measurable there
    (the GIL already serialises the threads). Called once at start.
    """
    if _mallopt is not None:
        _mallopt(M_ARENA_MAX, 1)


def return_freed_memory() -> None:
    """Hand heap pages freed by a large transaction back to the system."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class Session:
    """One client connection, served on its own thread."""

    def __init__(self, server: "Server", conn: socket.socket, number: int) -> None:
        self.server = server
        self.engine = server.engine
        self.conn = conn
        self.number = number
        self.peer = _peer_credentials(conn)
        self.txn: TxnBuffer | None = None

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        endpoint = self.server.endpoint
        reader = unixrpc.FrameReader(self.conn, endpoint, frame_deadline=endpoint.frame_deadline,
                                     idle_deadline=endpoint.idle_deadline)
        try:
            while self._serve_one(reader):
                pass
        finally:
            if self.txn is not None:
                self._audit("txn_abandoned", ops=len(self.txn.mutations),
                            reason="shutdown" if self.server.stopping else "disconnect")
            reader.close()
            self.conn.close()
            self._end_txn()  # last, so that trimming also finds the reader's buffer freed

    def _serve_one(self, reader: unixrpc.FrameReader) -> bool:
        """Serve one frame; False when the connection is done."""
        try:
            body = reader.read()
        except ProtocolError as exc:  # oversize length prefix or a late frame: framing is lost
            self._audit("refused", code=exc.code.name, message=exc.message)
            self._send(protocol.error_response(None, exc))
            return False
        except OSError:  # cut inside a frame, or idle past the deadline
            return False
        if body is None:
            return False
        request_id = None
        try:
            message = protocol.ENDPOINT.decode(body)
            request_id = protocol.request_id_of(message)
            request = protocol.parse_request(message)
            response = protocol.ok_response(request.id, **self.dispatch(request))
        except StateFSError as exc:
            self._audit_error(exc, request_id)
            response = protocol.error_response(request_id, exc)
        except Exception as bug:
            log.exception("internal error serving connection %d", self.number)
            self._audit("internal_error", request=request_id, error=repr(bug))
            response = protocol.error_response(request_id, InternalError(
                f"internal error in statefsd ({type(bug).__name__}); the traceback is in its log"))
        return self._send(response)

    def _send(self, response: dict) -> bool:
        try:
            frame = protocol.REPLY_ENDPOINT.frame_parts(response)
        except Exception:
            log.exception("cannot encode response on connection %d", self.number)
            frame = [protocol.REPLY_ENDPOINT.pack(protocol.error_response(
                response.get("id"), InternalError("response could not be encoded")))]
        try:
            unixrpc.send_parts(self.conn, frame)
        except OSError:
            return False
        return True

    def _audit(self, event: str, **fields: Any) -> None:
        self.server.audit(event, conn=self.number, **self.peer, **fields)

    def _audit_error(self, exc: StateFSError, request_id: int | None) -> None:
        if exc.code not in _QUIET:
            self._audit("refused", code=exc.code.name, message=exc.message, request=request_id)

    # -------------------------------------------------------- dispatch

    def dispatch(self, request: protocol.Request) -> dict:
        handler: Callable[[dict], dict] = getattr(self, "op_" + request.op)
        return handler(request.args)

    def op_hello(self, args: dict) -> dict:
        return {"protocol": protocol.PROTOCOL_VERSION, "server": self.server.version,
                "encryption": encryption_mode(self.engine.info()),
                "read_only": bool(self.engine.read_only), "caps": protocol.CAPS}

    def op_info(self, args: dict) -> dict:
        return {"info": self.engine.info()}

    def op_compact(self, args: dict) -> dict:
        return {"compaction": self.engine.compact()}

    def op_verify(self, args: dict) -> dict:
        return {"verify": self.engine.verify()}

    def op_feed(self, args: dict) -> dict:
        return self.engine.feed(args["after"], args.get("cursor"), args["max_bytes"])

    def op_get(self, args: dict) -> dict:
        value, txn = self.engine.get_versioned(args["key"])
        return {"value": value, "txn": txn}

    def op_mget(self, args: dict) -> dict:
        found = self.engine.get_many(args["keys"], max_bytes=protocol.MGET_REPLY_BYTES)
        return {"values": [list(pair) if pair is not None else None for pair in found]}

    def op_stat(self, args: dict) -> dict:
        return {"stat": self.engine.stat(args["key"])}

    def op_put(self, args: dict) -> dict:
        return {"txn": self.engine.put(args["key"], args["value"])}

    def op_delete(self, args: dict) -> dict:
        return {"txn": self.engine.delete(args["key"])}

    def op_list(self, args: dict) -> dict:
        keys = self.engine.list(args.get("prefix", ""))
        if "after" in args:
            utf8_text(args["after"], "list 'after'")  # no key can follow text that is not UTF-8
        start = bisect.bisect_right(keys, args["after"]) if "after" in args else 0
        limit = args.get("limit", protocol.LIST_PAGE_KEYS)
        limit = max(1, min(limit, protocol.LIST_PAGE_KEYS))
        page, size = [], 0
        for key in itertools.islice(keys, start, start + limit):
            size += len(key) + 8
            if page and size > protocol.LIST_PAGE_BYTES:
                break
            page.append(key)
        return {"keys": page, "more": start + len(page) < len(keys)}

    def op_txn(self, args: dict) -> dict:
        mutations = [Mutation(kind, key, value) for kind, key, value in args["ops"]]
        expect = args.get("expect", ())
        if not mutations and not expect:
            return {"txn": None}
        return {"txn": self.engine.commit(mutations, expect)}

    def op_begin(self, args: dict) -> dict:
        if self.txn is not None:
            raise TransactionError("a transaction is already open on this connection")
        if self.engine.read_only:
            raise ReadOnly("the image is mounted read-only; transactions are refused")
        self.txn = TxnBuffer(self.server.txn_budget)
        return {}

    def op_txn_put(self, args: dict) -> dict:
        return self._buffer("put", args["key"], args["value"])

    def op_txn_delete(self, args: dict) -> dict:
        return self._buffer("delete", args["key"])

    def _buffer(self, kind: str, key: str, value: bytes = b"") -> dict:
        if self.txn is None:
            raise TransactionError("no open transaction on this connection; send begin first")
        try:
            self.txn.add(kind, key, value)
        except StateFSError as exc:
            # All or nothing: a refused op sinks the whole transaction, so a
            # client that ignores the error cannot commit the remainder.
            self._end_txn()
            raise type(exc)(exc.message + "; the transaction was aborted", **exc.details) from None
        return {}

    def op_commit(self, args: dict) -> dict:
        if self.txn is None:
            raise TransactionError("no open transaction to commit; send begin first")
        txn, self.txn = self.txn, None
        expect = args.get("expect", ())
        try:
            if not txn.mutations and not expect:
                return {"txn": None}
            return {"txn": self.engine.commit(txn.mutations, expect)}
        finally:
            txn.release()

    def op_abort(self, args: dict) -> dict:
        aborted = self.txn is not None
        self._end_txn()
        return {"aborted": aborted}

    def _end_txn(self) -> None:
        if self.txn is not None:
            self.txn.release()
            self.txn = None


def _peer_credentials(conn: socket.socket) -> dict:
    """The audit fields naming who is connected (empty if the kernel will not say)."""
    try:
        peer = unixrpc.peer_credentials(conn)
    except OSError:
        return {}
    return {"pid": peer.pid, "uid": peer.uid}


class Server:
    """Accepts connections on a bound socket and serves each on a thread,
    within the listener's endpoint limits (docs/protocol.md, "Limits")."""

    def __init__(self, engine, listener: unixrpc.BoundSocket, *,
                 audit: Callable[..., None], version: str,
                 txn_budget: int = DEFAULT_TXN_BUDGET) -> None:
        self.engine = engine
        self.txn_budget = TxnBudget(txn_budget)
        self.listener = listener
        self.endpoint = listener.endpoint
        self.audit = audit
        self._acceptor = unixrpc.Acceptor(listener, unixrpc.ConnectionTable(self.endpoint), self._report)
        self.version = version
        self.stopping = False
        self._sessions: dict[threading.Thread, socket.socket] = {}
        self._lock = threading.Lock()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)

    def start(self) -> None:
        self._accept_thread.start()

    def _report(self, event: str, **fields: Any) -> None:
        """Refusals and accept failures (already rate-limited by the acceptor)."""
        log.warning("%s: %s", event.replace("_", " "), ", ".join(f"{k}={v}" for k, v in fields.items()))
        self.audit(event, **fields)

    def _accept_loop(self) -> None:
        for number in itertools.count(1):
            try:
                admitted = self._acceptor.accept()
            except OSError as exc:
                if self.stopping:
                    return
                self._acceptor.failed(exc)
                continue
            if admitted is None:
                continue
            conn, peer = admitted
            thread = threading.Thread(target=self._run_session, args=(conn, peer, number),
                                      name=f"conn-{number}", daemon=True)
            with self._lock:
                if self.stopping:
                    conn.close()
                    self._acceptor.release(peer)
                    return
                self._sessions[thread] = conn
            try:
                thread.start()
            except RuntimeError:  # cannot start a thread: refuse this one, keep serving
                with self._lock:
                    self._sessions.pop(thread, None)
                conn.close()
                self._acceptor.release(peer)

    def _run_session(self, conn: socket.socket, peer: unixrpc.Peer, number: int) -> None:
        try:
            Session(self, conn, number).run()
        except Exception:
            log.exception("connection %d failed", number)
        finally:
            self._acceptor.release(peer)
            with self._lock:
                self._sessions.pop(threading.current_thread(), None)

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish, drop idle clients.

        Shutting down only the read side wakes sessions waiting for a
        request, while a session inside a commit still sends its answer.
        """
        with self._lock:
            self.stopping = True
            sessions = dict(self._sessions)
        self.listener.close()
        self._accept_thread.join(2.0)
        if not self._accept_thread.is_alive():  # it may still be using the spare descriptor
            self._acceptor.close()
        for conn in sessions.values():
            _shutdown(conn, socket.SHUT_RD)
        deadline = time.monotonic() + grace
        for thread in sessions:
            thread.join(max(0.0, deadline - time.monotonic()))
        for thread, conn in sessions.items():
            if thread.is_alive():  # stuck writing to a client that stopped reading
                _shutdown(conn, socket.SHUT_RDWR)
                thread.join(1.0)


def _shutdown(conn: socket.socket, how: int) -> None:
    try:
        conn.shutdown(how)
    except OSError:
        pass
