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
# EACCES instead of ECONNREFUSED. Because anyone may connect, the limits
# (docs/keystored.md, "Limits") keep any one uid, and all uids off the
# allow list together, from holding the connections allowed uids need.
# A request or reply is one flat map (an error reply nests one more): a
# few dozen objects at most.
ENDPOINT = unixrpc.Endpoint(
    owner="keystored", example="keystored.sock", max_frame=64 * 1024, socket_mode=0o666, backlog=512,
    too_big_hint="a sign message can be up to about 65,400 bytes",
    max_objects=128, max_depth=4, frame_deadline=10.0, idle_deadline=None,
    max_connections=256, max_connections_per_uid=128, max_connections_others=64,
    error_head=(("v", PROTOCOL_VERSION),))


def ok_reply(**fields: object) -> dict:
    return {"v": PROTOCOL_VERSION, "ok": True, **fields}


def error_reply(error: StateFSError) -> dict:
    return unixrpc.error_reply(error, **dict(ENDPOINT.error_head))
