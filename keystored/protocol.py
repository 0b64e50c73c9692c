"""The keystored wire protocol, version 1 (specified in docs/keystored.md).

Frames (a u32 big-endian length, then one msgpack map) are moved by
statefsd.shared.unixrpc. Requests carry ``"v": PROTOCOL_VERSION`` and
``"op"``; replies carry ``"v"`` and ``"ok"``. The ops themselves are
answered in service.py.
"""

from __future__ import annotations

from statefsd.errors import StateFSError
from statefsd.shared import unixrpc

PROTOCOL_VERSION = 1

# Access control is SO_PEERCRED plus the allow list, so any uid may connect
# (mode 0666): public_key is for everyone, and a refused uid gets a clear
# EACCES instead of ECONNREFUSED.
ENDPOINT = unixrpc.Endpoint(
    owner="keystored", example="keystored.sock", max_frame=64 * 1024, socket_mode=0o666, backlog=512,
    too_big_hint="a sign message can be up to about 65,400 bytes")


def ok_reply(**fields: object) -> dict:
    return {"v": PROTOCOL_VERSION, "ok": True, **fields}


def error_reply(error: StateFSError) -> dict:
    return unixrpc.error_reply(error, v=PROTOCOL_VERSION)
