"""Unix-socket RPC as statefsd and keystored both speak it.

A connection is a Unix stream socket carrying frames in both directions::

    frame = u32 big-endian body length || body
    body  = exactly one msgpack map

What the maps say is each protocol's own business (statefsd/protocol.py,
keystored/protocol.py); this module moves maps and owns the socket file.
A protocol describes its socket once, as an :class:`Endpoint`: the frame cap,
how text is decoded, the socket file's mode. Limits that differ per daemon
belong on the Endpoint, so the code that enforces them is written once.

The --socket path rules: a daemon takes a path only when it can be its own.
The directory exists, the path is not a directory or some other file (never
replaced), and no process listens there. A socket file nobody listens on was
left by a daemon that died and is replaced. A daemon checks the path before
it does anything lasting (mounting an image, creating a key), so a second
start fails at once and names the socket.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass

import msgpack

from statefsd.errors import Busy, DeviceIOError, InvalidArgument, ProtocolError, StateFSError, TooBig

LENGTH = struct.Struct(">I")
_READ_BUFFER = 1 << 16
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


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

    def pack(self, message: dict) -> bytes:
        """Length prefix plus msgpack body, ready for one sendall()."""
        try:
            body = msgpack.packb(message, use_bin_type=True)
        except UnicodeEncodeError as exc:  # e.g. text taken from undecodable argv bytes
            shown = exc.object[:80].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise InvalidArgument(f"text '{shown}' is not valid UTF-8", hint=self.text_hint) from None
        if len(body) > self.max_frame:
            # The peer would refuse it unread.
            raise TooBig(f"frame of {len(body)} bytes exceeds the {self.max_frame}-byte frame cap",
                         hint=self.too_big_hint)
        return LENGTH.pack(len(body)) + body

    def decode(self, body: bytes) -> dict:
        """The frame's map, or ProtocolError if the body is not exactly one msgpack map."""
        try:
            message = msgpack.unpackb(body, raw=False, unicode_errors=self.text_errors,
                                      strict_map_key=True, use_list=True)
        except Exception as exc:  # msgpack raises many types for garbage: all mean EPROTO
            raise ProtocolError(f"frame is not valid msgpack ({type(exc).__name__})") from None
        if not isinstance(message, dict):
            raise ProtocolError(f"frame must hold a msgpack map, got {type(message).__name__}")
        return message

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
        return BoundSocket(sock, path, inode)


class BoundSocket:
    """A listening socket and the file it is bound to."""

    def __init__(self, sock: socket.socket, path: str, inode: int) -> None:
        self.sock = sock
        self.path = path
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


class FrameReader:
    """Reads frame bodies off one connected socket (buffered: a frame's
    length prefix and its body usually arrive in one recv)."""

    def __init__(self, sock: socket.socket, endpoint: Endpoint, *, body_timeout: float | None = None) -> None:
        """``body_timeout``: seconds a peer may take between the bytes of a
        frame whose length it sent (a server's guard against peers that stall
        mid-frame; the wait for the next frame to start is never bounded)."""
        self._sock = sock
        self._endpoint = endpoint
        self._body_timeout = body_timeout
        self._stream = sock.makefile("rb", buffering=_READ_BUFFER)

    def read(self) -> bytes | None:
        """The next frame's body; None on a clean end of stream between frames.

        An over-cap length prefix raises ProtocolError before a body byte is
        read or allocated: the stream can no longer be framed, so the caller
        answers and closes the connection. A stream cut inside a frame raises
        ConnectionResetError, a peer too slow to finish one TimeoutError (both
        OSError: the connection is gone either way).
        """
        head = self._stream.read(LENGTH.size)
        if not head:
            return None
        if len(head) < LENGTH.size:
            raise ConnectionResetError("connection closed inside a frame length prefix")
        (length,) = LENGTH.unpack(head)
        cap = self._endpoint.max_frame
        if length > cap:
            raise ProtocolError(f"frame length {length} exceeds the {cap}-byte cap", fatal=True)
        timeout = self._body_timeout
        if timeout is None:
            body = self._stream.read(length)
        else:
            previous = self._sock.gettimeout()
            self._sock.settimeout(timeout)
            try:
                body = self._stream.read(length)
            finally:
                self._sock.settimeout(previous)
        if len(body) < length:
            raise ConnectionResetError(f"connection closed after {len(body)} of {length} frame bytes")
        return body

    def close(self) -> None:
        self._stream.close()


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
    ``id``, keystored's ``v``), then ``ok: false`` and the error map."""
    wire = error.to_wire()
    wire["message"] = printable(wire["message"])
    if "hint" in wire:
        wire["hint"] = printable(wire["hint"])
    return {**head, "ok": False, "error": wire}


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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
