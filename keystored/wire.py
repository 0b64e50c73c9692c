"""Framing shared by keystored and its client.

A frame is a u32 big-endian body length followed by that many bytes of
msgpack encoding one map. Requests carry ``"v": PROTOCOL_VERSION`` and
``"op"``; replies carry ``"v"`` and ``"ok"``. See docs/keystored.md.
"""

from __future__ import annotations

import socket
import struct

import msgpack

from statefsd.errors import ProtocolError, StateFSError, TooBig

PROTOCOL_VERSION = 1
MAX_FRAME = 64 * 1024
_LENGTH = struct.Struct(">I")


def pack(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise TooBig(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte cap")
    return _LENGTH.pack(len(body)) + body


def _recv_exact(sock: socket.socket, n: int, *, at_boundary: bool) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if at_boundary and not buf:
                return None
            raise ConnectionResetError("peer closed the connection in the middle of a frame")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket, body_timeout: float | None = None) -> bytes | None:
    """One frame's body; None on a clean EOF between frames.

    An over-cap length raises ProtocolError: the stream cannot be resynced,
    so the caller must close the connection after reporting it.
    ``body_timeout`` bounds how long a peer may take to finish a started
    frame (the wait for the next frame to start is not bounded by it).
    """
    header = _recv_exact(sock, _LENGTH.size, at_boundary=True)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame length {length} exceeds the {MAX_FRAME}-byte cap")
    if body_timeout is not None:
        previous = sock.gettimeout()
        sock.settimeout(body_timeout)
        try:
            return _recv_exact(sock, length, at_boundary=False)
        finally:
            sock.settimeout(previous)
    return _recv_exact(sock, length, at_boundary=False)


def decode(body: bytes) -> dict:
    """The frame's map, or ProtocolError if it is not exactly one msgpack map."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"frame is not valid msgpack: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"frame must hold a msgpack map, got {type(message).__name__}")
    return message


def ok_reply(**fields: object) -> dict:
    return {"v": PROTOCOL_VERSION, "ok": True, **fields}


def error_reply(error: StateFSError) -> dict:
    return {"v": PROTOCOL_VERSION, "ok": False, "error": error.to_wire()}
