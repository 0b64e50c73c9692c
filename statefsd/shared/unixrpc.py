"""Unix-socket RPC as statefsd and keystored both speak it.

A connection is a Unix stream socket carrying frames in both directions::

    frame = u32 big-endian body length || body
    body  = exactly one msgpack map

What the maps say is each protocol's own business (statefsd/protocol.py,
keystored/protocol.py); this module moves maps and owns the socket file.
A protocol describes its socket once, as an :class:`Endpoint`: the frame cap,
how text is decoded, the socket file's mode, and the limits that keep one
peer from exhausting the daemon (decode budget, frame and idle deadlines,
connections per uid and in total). The limits differ per daemon, the code
that enforces them is written once, here:

* :meth:`Endpoint.decode` refuses a body that declares more msgpack objects,
  or nests deeper, than the endpoint allows, by walking its headers before
  msgpack builds a single object.
* :class:`FrameReader` with deadlines cuts a peer that does not finish a
  started frame (length prefix and body) in time, or stays silent too long.
* :class:`Acceptor` admits connections against a :class:`ConnectionTable`
  (reading the peer's uid at accept), answers a refused one with an EBUSY
  error frame, and survives running out of file descriptors.
* :func:`excerpt` quotes peer-supplied values in error messages, bounded, and
  :func:`error_reply` caps what any message may add to a frame.

The --socket path rules: a daemon takes a path only when it can be its own.
The directory exists, the path is not a directory or some other file (never
replaced), and no process listens there. A socket file nobody listens on was
left by a daemon that died and is replaced. A daemon checks the path before
it does anything lasting (mounting an image, creating a key), so a second
start fails at once and names the socket.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import reprlib
import resource
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import msgpack

from statefsd.errors import Busy, DeviceIOError, InvalidArgument, ProtocolError, StateFSError, TooBig

LENGTH = struct.Struct(">I")
_READ_BUFFER = 1 << 16
_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# An error message or hint is cut to this many characters (an error frame
# must always fit the smallest frame cap, whatever the peer sent).
MAX_ERROR_TEXT = 2048
# Seconds an over-limit peer is given to take its error frame.
_REFUSAL_SEND_TIMEOUT = 1.0
# Accept failures (e.g. out of descriptors) are logged at most this often.
_REPORT_INTERVAL = 10.0


@dataclass(frozen=True)
class Endpoint:
    """One protocol's socket: who listens, and the limits its frames obey."""

    owner: str                  # the daemon, as messages name it ("statefsd")
    example: str                # socket file name suggested when --socket names a directory
    max_frame: int              # body bytes; a longer length prefix is refused unread
    socket_mode: int            # the socket file's mode: who may connect at all
    backlog: int
    # "surrogateescape" lets undecodable text through as lone surrogates, so
    # that the protocol's own validation can name it instead of EPROTO.
    text_errors: str = "strict"
    too_big_hint: str = "split the request into smaller ones"
    text_hint: str = "text travels as UTF-8; rename or recode it"
    # Decode budget: msgpack objects one body may declare (every map key and
    # value, array item and scalar counts) and container nesting depth.
    max_objects: int = 4096
    max_depth: int = 16
    # Server-side deadlines in seconds (None: unbounded). A started frame
    # (length prefix and body) must be complete frame_deadline seconds after
    # its first byte; a connection with no frame started for idle_deadline
    # seconds is closed.
    frame_deadline: float | None = 10.0
    idle_deadline: float | None = None
    # Connections served at once: in total, per peer uid, and (when the
    # daemon names trusted uids) by all other uids together, so the rest of
    # the table stays free for the trusted ones.
    max_connections: int = 256
    max_connections_per_uid: int = 256
    max_connections_others: int | None = None
    # Fields every error frame of this protocol starts with (statefsd: id,
    # keystored: v), as pairs so the Endpoint stays immutable.
    error_head: tuple[tuple[str, object], ...] = ()
    # Decode a bin of LARGE_BIN bytes or more at a frame's top level as a
    # read-only memoryview of the frame body instead of a copy (the daemon's
    # handlers must then take memoryviews where they take bytes).
    large_bins_as_views: bool = False

    def add_limit_flags(self, parser: argparse.ArgumentParser, *names: str) -> None:
        """Command-line flags (``--frame-deadline``...) for the named limits,
        defaulting to this endpoint's values; :meth:`with_limits` applies them."""
        group = parser.add_argument_group("limits")
        for name in names:
            kind, metavar, what = _LIMIT_FLAGS[name]
            default = getattr(self, name)
            group.add_argument("--" + name.replace("_", "-"), dest=name, type=_positive(kind),
                               default=default, metavar=metavar,
                               help=f"{what} (default {'none' if default is None else format(default, 'g')})")

    def with_limits(self, args: argparse.Namespace) -> "Endpoint":
        """This endpoint with the limits given by :meth:`add_limit_flags` flags."""
        return dataclasses.replace(self, **{name: getattr(args, name) for name in _LIMIT_FLAGS
                                            if hasattr(args, name)})

    def error_frame(self, error: StateFSError) -> bytes:
        """A complete error frame for ``error`` when no request id is known."""
        return self.pack(error_reply(error, **dict(self.error_head)))

    def pack(self, message: dict) -> bytes:
        """Length prefix plus msgpack body, ready for one sendall()."""
        body = self._packb(message)
        self._check_size(len(body))
        return LENGTH.pack(len(body)) + body

    def frame_parts(self, message: dict) -> list:
        """The frame of ``message`` as buffers to send in order (send_parts):
        a bin of LARGE_BIN bytes or more at the map's top level (a put's
        value, a get's answer) is sent from where it is, not copied into the
        body and the body into the frame. The map's keys may come out in
        another order than pack() writes them; a map's order means nothing."""
        large = [key for key, value in message.items() if _large_bin(value)]
        if not large:
            body = self._packb(message)
            self._check_size(len(body))
            if len(body) < LARGE_BIN:
                return [LENGTH.pack(len(body)) + body]
            return [LENGTH.pack(len(body)), body]
        rest = {key: value for key, value in message.items() if key not in large}
        # The rest as one map that declares every entry, large ones included.
        head = _map_header(len(message)) + self._packb(rest)[len(_map_header(len(rest))):]
        parts: list = [head]
        for key in large:
            value = memoryview(message[key]).cast("B")
            parts += [self._packb(key) + _bin_header(len(value)), value]
        size = sum(len(part) for part in parts)
        self._check_size(size)
        return [LENGTH.pack(size), *parts]

    def _packb(self, obj: object) -> bytes:
        try:
            return msgpack.packb(obj, use_bin_type=True)
        except UnicodeEncodeError as exc:  # e.g. text taken from undecodable argv bytes
            shown = exc.object[:80].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise InvalidArgument(f"text '{shown}' is not valid UTF-8", hint=self.text_hint) from None

    def _check_size(self, size: int) -> None:
        if size > self.max_frame:
            # The peer would refuse it unread.
            raise TooBig(f"frame of {size} bytes exceeds the {self.max_frame}-byte frame cap",
                         hint=self.too_big_hint)

    def decode(self, body: bytes | bytearray) -> dict:
        """The frame's map, or ProtocolError if the body is not exactly one
        msgpack map or declares more objects or depth than the endpoint allows
        (refused before any object is built)."""
        problem = _shape_problem(body, self.max_objects, self.max_depth)
        if problem:
            raise ProtocolError(problem, hint="send one small map per request; see the protocol's limits")
        try:
            message = None
            if self.large_bins_as_views and len(body) >= LARGE_BIN:
                message = _large_bins_as_views(body, self._unpack)
            if message is None:
                message = self._unpack(body)
        except Exception as exc:  # msgpack raises many types for garbage: all mean EPROTO
            raise ProtocolError(f"frame is not valid msgpack ({type(exc).__name__})") from None
        if not isinstance(message, dict):
            raise ProtocolError(f"frame must hold a msgpack map, got {type(message).__name__}")
        return message

    def _unpack(self, data) -> object:
        return msgpack.unpackb(data, raw=False, unicode_errors=self.text_errors,
                               strict_map_key=True, use_list=True,
                               max_str_len=self.max_frame, max_bin_len=self.max_frame,
                               max_ext_len=self.max_frame, max_array_len=self.max_objects,
                               max_map_len=self.max_objects)

    def check_socket_path(self, path: str, *, remove_stale: bool = False) -> None:
        """Refuse a path this daemon cannot listen on; with ``remove_stale``,
        unlink a socket file nobody listens on."""
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise InvalidArgument(f"cannot listen on {path}: directory {parent} does not exist",
                                  hint=f"create the directory first with mkdir -p {parent}")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"--socket {path} is a directory",
                                  hint=f"give a socket path inside it, e.g. {os.path.join(path, self.example)}")
        if not stat.S_ISSOCK(st.st_mode):
            raise InvalidArgument(f"{path} exists and is not a socket; refusing to replace it",
                                  hint="remove it yourself if it is not needed, or choose another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            if remove_stale:
                _unlink(path)
            return
        except OSError as exc:
            raise DeviceIOError(f"cannot probe existing socket {path}: {exc.strerror}") from None
        finally:
            probe.close()
        raise Busy(f"another process is already listening on {path}",
                   hint=f"is {self.owner} already running? use its socket, or choose another --socket")

    def listen(self, path: str) -> "BoundSocket":
        """Listen on ``path`` with the endpoint's mode, replacing only a stale socket file."""
        self.check_socket_path(path, remove_stale=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o777 & ~self.socket_mode)  # no window with a looser mode
        try:
            sock.bind(path)
            inode = _set_socket_mode(path, self.socket_mode)
            sock.listen(self.backlog)
        except OSError as exc:
            sock.close()
            raise InvalidArgument(f"cannot listen on {path}: {exc.strerror or exc}",
                                  hint="check the directory's permissions, or choose another --socket") from None
        finally:
            os.umask(old_umask)
        return BoundSocket(sock, path, inode, self)


class BoundSocket:
    """A listening socket, the file it is bound to and the endpoint it serves."""

    def __init__(self, sock: socket.socket, path: str, inode: int, endpoint: Endpoint) -> None:
        self.sock = sock
        self.path = path
        self.endpoint = endpoint
        self._inode = inode

    def close(self) -> None:
        """Stop listening (waking a thread blocked in accept) and remove the
        socket file, unless another daemon has bound that path since."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


class IdleTimeout(TimeoutError):
    """No frame started within the reader's idle deadline."""


# A bin this large travels as a buffer of its own (Endpoint.frame_parts).
LARGE_BIN = 64 << 10
# Buffers per sendmsg call: the kernel takes at most IOV_MAX (1024).
_SEND_BATCH = 256


def _large_bin(value: object) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview)) and memoryview(value).nbytes >= LARGE_BIN


def _map_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x80 | count,))
    return (b"\xde" + count.to_bytes(2, "big")) if count < 1 << 16 else (b"\xdf" + count.to_bytes(4, "big"))


def _bin_header(size: int) -> bytes:
    if size < 1 << 8:
        return b"\xc4" + bytes((size,))
    return (b"\xc5" + size.to_bytes(2, "big")) if size < 1 << 16 else (b"\xc6" + size.to_bytes(4, "big"))


def send_parts(sock: socket.socket, parts: list) -> None:
    """sendall() of a frame given as Endpoint.frame_parts buffers."""
    if len(parts) == 1:
        sock.sendall(parts[0])
        return
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    while views:
        sent = sock.sendmsg(views[:_SEND_BATCH])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0], sent = views[0][sent:], 0


class FrameReader:
    """Reads frame bodies off one connected socket (buffered: a frame's
    length prefix and its body usually arrive in one recv)."""

    def __init__(self, sock: socket.socket, endpoint: Endpoint, *,
                 frame_deadline: float | None = None, idle_deadline: float | None = None) -> None:
        """Without deadlines (a client) every recv waits as the socket's own
        timeout says. A server passes its endpoint's deadlines: then a frame
        must be complete ``frame_deadline`` seconds after its first byte,
        however the peer spaces its bytes, and the wait for the next frame
        to start ends after ``idle_deadline`` seconds (None: never).

        A reader with deadlines owns the socket's receive timeout: the
        socket stays blocking and the kernel's SO_RCVTIMEO carries the
        deadline, so a request costs one recv (no poll, no switching the
        socket between blocking and timeout mode around every frame). Only
        a frame that needs more than one recv sets it to what is left of
        the frame deadline, and back to the idle deadline after."""
        self._sock = sock
        self._endpoint = endpoint
        self._frame_deadline = frame_deadline
        self._idle_deadline = idle_deadline
        self._timed = frame_deadline is not None or idle_deadline is not None
        self._pending = bytearray()
        self._receive_timeout: float | None = None   # SO_RCVTIMEO now (None: none)
        if self._timed:
            sock.settimeout(None)
            self._set_receive_timeout(idle_deadline)

    def read(self) -> bytes | bytearray | None:
        """The next frame's body; None on a clean end of stream between frames.

        An over-cap length prefix raises ProtocolError before a body byte is
        read or allocated: the stream can no longer be framed, so the caller
        answers and closes the connection; so does a frame not finished by
        its deadline. A stream cut inside a frame raises ConnectionResetError,
        no frame started within the idle deadline IdleTimeout, a peer too slow
        for the socket's own timeout TimeoutError (all OSError: the connection
        is gone).
        """
        try:
            if not self._pending:
                try:
                    chunk = self._sock.recv(_READ_BUFFER)
                except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO expiring is EAGAIN
                    if self._idle_deadline is not None:
                        raise IdleTimeout(f"no frame started within {self._idle_deadline:g} s") from None
                    raise
                if not chunk:
                    return None
                self._pending += chunk
            deadline = None if self._frame_deadline is None else time.monotonic() + self._frame_deadline
            while len(self._pending) < LENGTH.size:
                chunk = self._recv(deadline, LENGTH.size)
                if not chunk:
                    raise ConnectionResetError("connection closed inside a frame length prefix")
                self._pending += chunk
            (length,) = LENGTH.unpack_from(self._pending)
            cap = self._endpoint.max_frame
            if length > cap:
                raise ProtocolError(f"frame length {length} exceeds the {cap}-byte cap", fatal=True)
            del self._pending[:LENGTH.size]
            return self._body(length, deadline)
        finally:
            if self._timed and self._receive_timeout != self._idle_deadline:
                try:
                    self._set_receive_timeout(self._idle_deadline)
                except OSError:
                    pass  # the connection is gone; its next recv says so

    def _body(self, length: int, deadline: float | None) -> bytes | bytearray:
        if len(self._pending) >= length:
            body = bytes(self._pending[:length])
            del self._pending[:length]
            return body
        # Receive the rest straight into the body's one buffer (no copies of
        # a large value while it arrives).
        body = bytearray(length)
        got = len(self._pending)
        body[:got] = self._pending
        self._pending.clear()
        view = memoryview(body)
        while got < length:
            self._set_timeout(deadline)
            try:
                n = self._sock.recv_into(view[got:])
            except (TimeoutError, BlockingIOError):
                self._late(deadline)
                raise
            if not n:
                raise ConnectionResetError(f"connection closed after {got} of {length} frame bytes")
            got += n
        return body

    def _recv(self, deadline: float | None, size: int) -> bytes:
        self._set_timeout(deadline)
        try:
            return self._sock.recv(max(size, _READ_BUFFER))
        except (TimeoutError, BlockingIOError):
            self._late(deadline)
            raise

    def _set_timeout(self, deadline: float | None) -> None:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                self._late(deadline)
            self._set_receive_timeout(left)

    def _set_receive_timeout(self, seconds: float | None) -> None:
        whole, micro = (0, 0) if seconds is None else divmod(max(round(seconds * 1e6), 1), 1_000_000)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(whole, micro))
        self._receive_timeout = seconds

    def _late(self, deadline: float | None) -> None:
        if deadline is not None:
            raise ProtocolError(f"frame not completed within {self._frame_deadline:g} s of its first byte",
                                fatal=True, hint="send each frame in one go")

    def close(self) -> None:
        self._pending.clear()


_LIMIT_FLAGS = {
    "frame_deadline": (float, "SECONDS", "a started frame must be complete this long after its first byte"),
    "idle_deadline": (float, "SECONDS", "close a connection when no frame starts for this long"),
    "max_connections": (int, "N", "connections served at once"),
    "max_connections_per_uid": (int, "N", "connections one uid may hold"),
    "max_connections_others": (int, "N", "connections all uids the daemon does not trust may hold together"),
}


def _positive(kind: type) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


class ConnectionTable:
    """Connections held per peer uid, checked against an endpoint's caps.

    ``trusted`` uids (keystored: those on its allow list) are bounded by the
    total and the per-uid cap; all other uids together also by
    ``max_connections_others``.
    """

    def __init__(self, endpoint: Endpoint, trusted: Iterable[int] = ()) -> None:
        self._endpoint = endpoint
        self._trusted = frozenset(trusted)
        self._held: dict[int, int] = {}
        self._others = 0
        self._lock = threading.Lock()

    def admit(self, uid: int) -> None:
        """Count a connection of ``uid``, or raise Busy saying which cap is full."""
        ep = self._endpoint
        trusted = uid in self._trusted
        with self._lock:
            total = sum(self._held.values())
            mine = self._held.get(uid, 0)
            if total >= ep.max_connections:
                raise Busy(f"{ep.owner} is serving {ep.max_connections} clients already",
                           hint="try again shortly")
            if mine >= ep.max_connections_per_uid:
                raise Busy(f"uid {uid} already holds {mine} connections to {ep.owner}, the limit per uid",
                           hint="close idle connections, or share one client per process")
            if not trusted and ep.max_connections_others is not None and self._others >= ep.max_connections_others:
                raise Busy(f"uids without access to {ep.owner}'s keys hold all {ep.max_connections_others} "
                           "connections they may share", hint="try again shortly")
            self._held[uid] = mine + 1
            if not trusted:
                self._others += 1

    def release(self, uid: int) -> None:
        with self._lock:
            left = self._held.get(uid, 0) - 1
            if left > 0:
                self._held[uid] = left
            else:
                self._held.pop(uid, None)
            if uid not in self._trusted:
                self._others -= 1


# accept() errors that mean "no descriptor or memory for one more connection".
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# Descriptors a daemon needs besides its connections (image, journal, keystored...).
_DESCRIPTOR_RESERVE = 64


class Acceptor:
    """Accepts connections on a listening socket and admits each against a
    :class:`ConnectionTable`, reading the peer's uid at accept.

    A refused peer gets an EBUSY error frame and is closed here, before any
    thread exists for it. One spare descriptor is kept: when accept fails for
    lack of descriptors it is given up to take the waiting peer, which is
    then served if a descriptor is free again and refused with EBUSY
    otherwise, so nobody hangs in the backlog and the loop does not spin.
    Refusals and accept failures are reported through ``report(event,
    **fields)`` at most once per 10 s each, with the number left unsaid.
    """

    def __init__(self, bound: BoundSocket, table: ConnectionTable,
                 report: Callable[..., None]) -> None:
        self.bound = bound
        self.table = table
        self._endpoint = bound.endpoint
        self._reports = {event: _RateLimit(report, event) for event in ("connection_refused", "accept_failed")}
        _raise_descriptor_limit(self._endpoint.max_connections + _DESCRIPTOR_RESERVE)
        self._spare = _open_spare()
        self._backoff = 0.0

    def accept(self) -> tuple[socket.socket, Peer] | None:
        """The next admitted connection (blocking as the listening socket
        blocks) and its peer, or None when nobody was admitted this time.
        Other OSErrors (the socket was closed) are raised."""
        try:
            conn, _ = self.bound.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                raise
            conn = self._accept_with_spare(exc)
            if conn is None:
                return None
        self._backoff = 0.0
        conn.setblocking(True)
        try:
            peer = peer_credentials(conn)
            self.table.admit(peer.uid)
        except Busy as refusal:
            self._refuse(conn, refusal, uid=peer.uid, pid=peer.pid)
            return None
        except OSError:
            conn.close()
            return None
        return conn, peer

    def release(self, peer: Peer) -> None:
        self.table.release(peer.uid)

    def close(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    def failed(self, exc: OSError) -> None:
        """Report an accept failure (rate-limited) and back off before the
        next attempt, up to a second, instead of spinning."""
        self._reports["accept_failed"](error=exc.strerror or str(exc))
        self._backoff = min(1.0, max(0.05, self._backoff * 2))
        time.sleep(self._backoff)

    def _accept_with_spare(self, exc: OSError) -> socket.socket | None:
        if self._spare is None:  # nothing to give up: wait for a descriptor
            self.failed(exc)
            self._spare = _open_spare()
            return None
        self._reports["accept_failed"](error=exc.strerror or str(exc))
        os.close(self._spare)
        self._spare = None
        try:
            conn, _ = self.bound.sock.accept()
        except OSError:
            conn = None
        if conn is not None:
            self._spare = _open_spare()
            if self._spare is None:  # still no descriptor to spare: this peer is refused
                conn.setblocking(True)
                self._refuse(conn, Busy(f"{self._endpoint.owner} is out of file descriptors",
                                        hint="try again shortly; raising the daemon's descriptor limit "
                                             "(LimitNOFILE) or lowering its connection cap avoids this"))
                conn = None
        if self._spare is None:
            self._spare = _open_spare()
        return conn

    def _refuse(self, conn: socket.socket, refusal: Busy, **who: object) -> None:
        self._reports["connection_refused"](reason=refusal.message, **who)
        try:
            conn.settimeout(_REFUSAL_SEND_TIMEOUT)
            conn.sendall(self._endpoint.error_frame(refusal))
        except OSError:
            pass
        finally:
            conn.close()


class _RateLimit:
    """Calls ``report(event, **fields)`` at most once per interval; the next
    call after a quiet spell says how many were left out (``suppressed``)."""

    def __init__(self, report: Callable[..., None], event: str) -> None:
        self._report = report
        self._event = event
        self._last = -_REPORT_INTERVAL
        self._suppressed = 0
        self._lock = threading.Lock()

    def __call__(self, **fields: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < _REPORT_INTERVAL:
                self._suppressed += 1
                return
            self._last, suppressed, self._suppressed = now, self._suppressed, 0
        self._report(self._event, **fields, suppressed=suppressed)


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _raise_descriptor_limit(wanted: int) -> None:
    """Raise our soft RLIMIT_NOFILE toward ``wanted`` (never above the hard
    limit): a connection cap the descriptor limit cannot honour is no cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


@dataclass(frozen=True)
class Peer:
    """Credentials from SO_PEERCRED: set by the kernel at connect, not claimed by the client."""

    pid: int
    uid: int
    gid: int


def peer_credentials(conn: socket.socket) -> Peer:
    pid, uid, gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return Peer(pid=pid, uid=uid, gid=gid)


def error_reply(error: StateFSError, **head: object) -> dict:
    """An error frame's map: the protocol's own fields (``head``: statefsd's
    ``id``, keystored's ``v``), then ``ok: false`` and the error map. Message
    and hint are cut to MAX_ERROR_TEXT characters, so the frame fits any cap."""
    wire = error.to_wire()
    for field in ("message", "hint"):
        if field in wire:
            text = printable(wire[field])
            if len(text) > MAX_ERROR_TEXT:
                text = text[:MAX_ERROR_TEXT] + f"... ({len(text)} characters)"
            wire[field] = text
    return {**head, "ok": False, "error": wire}


_EXCERPT = reprlib.Repr()
_EXCERPT.maxstring = _EXCERPT.maxother = 80
_EXCERPT.maxlist = _EXCERPT.maxdict = _EXCERPT.maxtuple = _EXCERPT.maxset = 8
_EXCERPT.maxlevel = 2


def excerpt(value: object) -> str:
    """A peer-supplied value as an error message quotes it: its repr, cut
    to about 80 characters (with "..." in the middle), so a message never
    grows with what the peer sent."""
    return _EXCERPT.repr(value)


def printable(text: str) -> str:
    """Text safe to send as msgpack str: lone surrogates from undecodable
    input become visible escapes instead of breaking the encoder."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _set_socket_mode(path: str, mode: int) -> int:
    """Give the socket file just bound at ``path`` its mode; its inode number.

    The umask already made the mode at bind; a chmod is needed only where a
    default ACL overrode it. Neither step follows a symlink: a path swapped
    for a link to another file after bind must not make a privileged daemon
    chmod that file (fchmod on the socket itself would not reach the file).
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, "the socket file was replaced by another file while binding")
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(f"/proc/self/fd/{fd}", mode)  # this inode, whatever the path holds now
        return st.st_ino
    finally:
        os.close(fd)


# ------------------------------------------------------------- decode budget

# Bytes after the type byte of msgpack types with a fixed size
# (nil, bools, floats, ints, fixext 1/2/4/8/16 with their type byte).
_FIXED = {0xc0: 0, 0xc2: 0, 0xc3: 0, 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8,
          0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8, 0xd4: 2, 0xd5: 3, 0xd6: 5, 0xd7: 9, 0xd8: 17}
# bin, ext, str with a length field: type byte -> (length width, bytes before the payload).
_SIZED = {0xc4: (1, 0), 0xc5: (2, 0), 0xc6: (4, 0), 0xc7: (1, 1), 0xc8: (2, 1), 0xc9: (4, 1),
          0xd9: (1, 0), 0xda: (2, 0), 0xdb: (4, 0)}
# array16/32, map16/32: type byte -> (count width, objects per entry).
_CONTAINERS = {0xdc: (2, 1), 0xdd: (4, 1), 0xde: (2, 2), 0xdf: (4, 2)}


def _header(body, pos: int) -> tuple[int, int]:
    """The msgpack object whose header starts at ``pos``: where what follows
    it starts (after a scalar's payload; after a container's header only)
    and how many objects it contains directly (a map of n entries: 2n).
    (0, -1) for the never-used type byte 0xc1."""
    kind = body[pos]
    pos += 1
    # The kinds a request is mostly made of first: fixstr (keys), bin 8 and
    # str 8 (values), fixints, then the containers.
    if 0xa0 <= kind <= 0xbf:                # fixstr
        return pos + (kind & 0x1f), 0
    if kind == 0xc4 or kind == 0xd9:        # bin 8, str 8
        return (pos + 1 + body[pos] if pos < len(body) else pos + 1), 0
    if kind <= 0x7f or kind >= 0xe0:        # fixints
        return pos, 0
    if kind <= 0x8f:                        # fixmap
        return pos, 2 * (kind & 0x0f)
    if kind <= 0x9f:                        # fixarray
        return pos, kind & 0x0f
    if kind in _FIXED:
        return pos + _FIXED[kind], 0
    if kind in _SIZED:
        width, extra = _SIZED[kind]
        return pos + width + extra + int.from_bytes(body[pos:pos + width], "big"), 0
    if kind in _CONTAINERS:
        width, per_entry = _CONTAINERS[kind]
        return pos + width, per_entry * int.from_bytes(body[pos:pos + width], "big")
    return 0, -1


def _shape_problem(body: bytes | bytearray, max_objects: int, max_depth: int) -> str:
    """Why ``body`` is over the decode budget, or "" when it is within it.

    Walks the msgpack headers only, counting the objects each container
    declares (a map of n entries declares 2n), so the work is bounded by
    ``max_objects`` however long the body is, and nothing is allocated. A
    malformed body passes here; msgpack itself then names it.
    """
    size = len(body)
    pos = 0
    declared = 1
    left = 1           # objects still to read in the innermost open container
    outer: list[int] = []   # the same for each container around it
    while True:
        if not left:
            if not outer:
                return ""
            left = outer.pop()
            continue
        left -= 1
        if pos >= size:
            return ""
        pos, count = _header(body, pos)
        if count < 0:
            return ""
        declared += count
        if declared > max_objects:
            return f"frame declares more than {max_objects} msgpack objects"
        if count:
            if len(outer) >= max_depth:
                return f"frame nests msgpack containers deeper than {max_depth} levels"
            outer.append(left)
            left = count


def _object_end(body, pos: int) -> int:
    """Where the msgpack object starting at ``pos`` ends (past the end of
    ``body``, or -1, when it is malformed)."""
    left = 1
    while left:
        if pos >= len(body):
            return -1
        pos, count = _header(body, pos)
        if count < 0:
            return -1
        left += count - 1
    return pos


_BIN_TYPES = {0xc4: 1, 0xc5: 2, 0xc6: 4}   # bin 8/16/32: width of the length


def _large_bins_as_views(body, unpack: Callable[[object], object]) -> dict | None:
    """The map ``body`` holds, with each bin of LARGE_BIN bytes or more at
    its top level as a read-only view of ``body`` (no copy) and everything
    else decoded by ``unpack``; None when ``body`` is not a well-formed map
    (the caller's msgpack then says what is wrong)."""
    if not 0x80 <= body[0] <= 0x8f and body[0] not in (0xde, 0xdf):
        return None
    end, count = _header(body, 0)
    view = memoryview(body).toreadonly()
    message = {}
    pos = end
    for _ in range(count // 2):
        key_end = _object_end(body, pos)
        if not 0 < key_end < len(body):
            return None
        key = unpack(view[pos:key_end])
        if not isinstance(key, str):
            return None
        width = _BIN_TYPES.get(body[key_end])
        if width is not None:
            start = key_end + 1 + width
            end = start + int.from_bytes(body[key_end + 1:start], "big")
            # A view keeps the whole frame alive: only for a bin that is
            # nearly all of it, so what a buffered transaction pins is what
            # its budget was charged (server.TxnBuffer).
            large = end - start >= LARGE_BIN and len(body) - (end - start) < LARGE_BIN
        else:
            end, large = _object_end(body, key_end), False
        if not 0 < end <= len(body):
            return None
        message[key] = view[start:end] if large else unpack(view[key_end:end])
        pos = end
    return message if pos == len(body) else None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
