"""The statefsd wire protocol, version 1 (specified in docs/protocol.md).

Frames (a u32 big-endian length, then one msgpack map) are moved by
statefsd.shared.unixrpc; values are msgpack bin, text is msgpack str.
Requests carry ``v`` (protocol version), ``id`` (echoed in the response) and
``op``; responses carry ``id`` and ``ok``. Everything here is pure: the
endpoint's limits, request validation and response shapes. Sockets and the
engine live in server.py and client.py, which both use these helpers so the
two ends cannot drift.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from statefsd.errors import InvalidArgument, ProtocolError, StateFSError, TooBig
from statefsd.shared import unixrpc
from statefsd.storage.format import (
    FEED_DEFAULT_BYTES, FEED_MAX_BYTES, FEED_MAX_OBJECTS, FEED_MAX_PAGE_COST, MAX_KEY_BYTES, MAX_TXN_BYTES,
    MAX_TXN_CONDITIONS, MAX_TXN_OPS, MAX_VALUE_BYTES,
)

PROTOCOL_VERSION = 1

# One value plus generous room for the map around it; a bigger length prefix
# is refused before a single body byte is read or allocated.
MAX_FRAME = MAX_VALUE_BYTES + (64 << 10)

# Access to the store is access to the socket file (mode 0660). Text that is
# not UTF-8 survives decoding so that key validation can name it (EINVAL)
# instead of losing the frame.
# list answers at most this many keys (and about this many key bytes) per
# frame; the client pages with "after" so any number of keys fits the cap.
LIST_PAGE_KEYS = 4096
LIST_PAGE_BYTES = 1 << 20

# mget asks for at most this many keys; its answer stops before the value
# that would take its values past MGET_REPLY_BYTES (the first value is
# always sent), so the answer fits a frame: one value's worth of bytes plus
# at most 1024 entries of 16 bytes of msgpack around them.
MAX_MGET_KEYS = 1024
MGET_REPLY_BYTES = MAX_VALUE_BYTES

# The biggest legitimate maps are a list page (4096 keys) and a one-shot txn
# with every condition (128 ops of 7 objects, 1024 conditions of 5); more
# than twice that leaves room, while a frame of millions of tiny objects is
# refused before msgpack builds any of them.
MAX_FRAME_OBJECTS = 4 * LIST_PAGE_KEYS

# The limits of docs/protocol.md, "Limits". Connections: every uid that may
# open the socket gets a share (no uid holds them all), and the total stays
# within the descriptors the daemon can have (it raises its soft limit to
# fit). A client may stay idle, even inside a streamed transaction, for 15
# minutes between requests; a frame it starts must arrive within 10 s.
ENDPOINT = unixrpc.Endpoint(
    owner="statefsd", example="statefs.sock", max_frame=MAX_FRAME, socket_mode=0o660, backlog=128,
    text_errors="surrogateescape",
    too_big_hint=f"values are limited to {MAX_VALUE_BYTES} bytes; split the value over several keys",
    text_hint="keys are UTF-8 text; rename or recode the key",
    max_objects=MAX_FRAME_OBJECTS, max_depth=16, frame_deadline=10.0, idle_deadline=900.0,
    max_connections=1024, max_connections_per_uid=768, error_head=(("id", None),),
    # A put's value reaches the engine as a view of the request frame, not a copy.
    large_bins_as_views=True)

# Answers may be larger than requests: a feed page costs up to
# FEED_MAX_PAGE_COST (max_bytes of keys and values, or one whole transaction
# of the maximum size, charged more than msgpack spends around them) and
# holds up to FEED_MAX_OBJECTS objects (storage/format.py). The daemon still
# reads requests within ENDPOINT's caps; the client reads answers within these.
MAX_FEED_BYTES = FEED_MAX_BYTES
MAX_REPLY_FRAME = FEED_MAX_PAGE_COST + (64 << 10)
REPLY_ENDPOINT = dataclasses.replace(ENDPOINT, max_frame=MAX_REPLY_FRAME,
                                     max_objects=FEED_MAX_OBJECTS + MAX_FRAME_OBJECTS,
                                     large_bins_as_views=False)

MAX_REQUEST_ID = (1 << 64) - 1

# Fields each op needs beyond v/id/op: name -> (type, required).
_KEY = ("key", str, True)
_VALUE = ("value", bytes, True)
_EXPECT = ("expect", list, False)
OPS: dict[str, tuple[tuple[str, type, bool], ...]] = {
    "hello": (),
    "info": (),
    "get": (_KEY,),
    "mget": (("keys", list, True),),
    "stat": (_KEY,),
    "put": (_KEY, _VALUE),
    "delete": (_KEY,),
    "list": (("prefix", str, False), ("after", str, False), ("limit", int, False)),
    "txn": (("ops", list, True), _EXPECT),
    "begin": (),
    "txn_put": (_KEY, _VALUE),
    "txn_delete": (_KEY,),
    "commit": (_EXPECT,),
    "abort": (),
    "compact": (),
    "verify": (),
    "feed": (("after", int, False), ("cursor", bytes, False), ("max_bytes", int, False)),
}
TXN_KINDS = ("put", "delete")
# A one-shot txn's op may also be an array, ["put", key, value] or
# ["delete", key]: four msgpack objects instead of a map's seven, which the
# daemon reads faster (clients send it when `caps` has "txn_op_arrays").
TXN_ARRAY_LENGTHS = {"put": 3, "delete": 2}

CAPS = {
    "max_frame": MAX_FRAME,
    "max_key_bytes": MAX_KEY_BYTES,
    "max_value_bytes": MAX_VALUE_BYTES,
    "max_txn_ops": MAX_TXN_OPS,
    "max_txn_bytes": MAX_TXN_BYTES,
    "max_txn_conditions": MAX_TXN_CONDITIONS,
    "max_mget_keys": MAX_MGET_KEYS,
    "max_feed_bytes": MAX_FEED_BYTES,
    "max_reply_frame": MAX_REPLY_FRAME,
    "txn_op_arrays": True,
}


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: dict[str, Any]


# --------------------------------------------------------------- requests

def make_request(request_id: int, op: str, **args: Any) -> dict:
    return {"v": PROTOCOL_VERSION, "id": request_id, "op": op, **args}


def request_id_of(message: Any) -> int | None:
    """The id to echo in an error response, or None when it is unusable."""
    if isinstance(message, dict):
        rid = message.get("id")
        if _is_int(rid) and 0 <= rid <= MAX_REQUEST_ID:
            return rid
    return None


def parse_request(message: dict) -> Request:
    """Check a decoded request map against the op table; ProtocolError if off.

    Unknown extra fields are ignored so that later minor additions stay
    compatible with this daemon.
    """
    version = message.get("v")
    if not _is_int(version):
        raise ProtocolError("request has no integer protocol version 'v'")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is not supported; this daemon "
                            f"speaks version {PROTOCOL_VERSION}")
    rid = request_id_of(message)
    if rid is None:
        raise ProtocolError("request 'id' must be an unsigned 64-bit integer")
    op = message.get("op")
    if not isinstance(op, str):
        raise ProtocolError("request 'op' must be a string")
    fields = OPS.get(op)
    if fields is None:
        raise ProtocolError(f"unknown op {unixrpc.excerpt(op)}")
    args = {}
    for name, kind, required in fields:
        if name not in message:
            if required:
                raise ProtocolError(f"op {op!r} needs field {name!r}")
            continue
        args[name] = _typed(op, name, message[name], kind)
    if op == "txn":
        args["ops"] = [_txn_op(i, item) for i, item in enumerate(args["ops"])]
    if "expect" in args:
        args["expect"] = [_condition(i, item) for i, item in enumerate(args["expect"])]
    if op == "mget":
        args["keys"] = _mget_keys(args["keys"])
    if op == "feed":
        _feed_args(args)
    return Request(rid, op, args)


def _condition(index: int, item: Any) -> tuple[str, int]:
    """One element of ``expect``: -> (key, txn id); its values are checked
    by the engine (a valid key, txn >= 0, how many)."""
    where = f"expect[{index}]"
    if not isinstance(item, dict):
        raise ProtocolError(f"{where} must be a map {{\"key\": str, \"txn\": int}}, got {type(item).__name__}")
    return _typed(where, "key", item.get("key"), str), _typed(where, "txn", item.get("txn"), int)


def _mget_keys(keys: list) -> list[str]:
    if not keys:
        raise InvalidArgument("mget needs at least one key", hint=f"send 1 to {MAX_MGET_KEYS} keys")
    if len(keys) > MAX_MGET_KEYS:
        raise TooBig(f"mget of {len(keys)} keys exceeds the limit of {MAX_MGET_KEYS} per request",
                     hint="split the keys over several requests (the Python client does)")
    for i, key in enumerate(keys):
        _typed("mget", f"keys[{i}]", key, str)
    return keys


def _feed_args(args: dict) -> None:
    """Defaults, and ``max_bytes`` capped at MAX_FEED_BYTES; the values
    (``after`` >= 0, 0 without a cursor, a cursor that fits the log) are
    the engine's to check."""
    args.setdefault("after", 0)
    args["max_bytes"] = min(args.get("max_bytes", FEED_DEFAULT_BYTES), MAX_FEED_BYTES)


def _txn_op(index: int, item: Any) -> tuple[str, str, bytes]:
    """One element of a one-shot txn: -> (kind, key, value)."""
    if type(item) is list and len(item) == 3 and item[0] == "put" and type(item[1]) is str \
            and type(item[2]) is bytes:
        return "put", item[1], item[2]   # the common case first: ["put", key, value]
    where = f"txn op {index}"
    if isinstance(item, list):
        if not item or item[0] not in TXN_KINDS:
            raise ProtocolError(f"{where}: its first item must be one of {', '.join(TXN_KINDS)}")
        if len(item) != TXN_ARRAY_LENGTHS[item[0]]:
            raise ProtocolError(f"{where}: [{item[0]!r}, ...] must hold {TXN_ARRAY_LENGTHS[item[0]]} items, "
                                f"got {len(item)}")
        item = dict(zip(("op", "key", "value"), item))
    if not isinstance(item, dict):
        raise ProtocolError(f"{where} must be a map or an array")
    kind = item.get("op")
    if kind not in TXN_KINDS:
        raise ProtocolError(f"{where}: 'op' must be one of {', '.join(TXN_KINDS)}")
    key = _typed(where, "key", item.get("key"), str)
    value = _typed(where, "value", item.get("value"), bytes) if kind == "put" else b""
    return kind, key, value


def _typed(where: str, name: str, value: Any, kind: type) -> Any:
    if kind is int:
        ok = _is_int(value)
    elif kind is bytes:   # a large bin arrives as a read-only view of the frame (ENDPOINT)
        ok = isinstance(value, (bytes, memoryview))
    else:
        ok = isinstance(value, kind)
    if not ok:
        wire = {str: "str", bytes: "bin", int: "int", list: "array"}[kind]
        raise ProtocolError(f"{where}: field {name!r} must be msgpack {wire}, "
                            f"got {type(value).__name__}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -------------------------------------------------------------- responses

def ok_response(request_id: int | None, **fields: Any) -> dict:
    return {"id": request_id, "ok": True, **fields}


def error_response(request_id: int | None, error: StateFSError) -> dict:
    return unixrpc.error_reply(error, id=request_id)


def check_response(message: dict, expected_id: int) -> dict:
    """Client side: validate a response map; raise the error it carries.

    An error frame with a nil id answers a frame the daemon could not read
    far enough to learn its id; it still belongs to the request just sent.
    """
    ok = message.get("ok")
    if not isinstance(ok, bool) or message.get("id") not in (expected_id, None if not ok else expected_id):
        raise ProtocolError(f"response does not answer request {expected_id}")
    if not ok:
        error = message.get("error")
        if not isinstance(error, dict):
            raise ProtocolError("error response without an error map")
        raise StateFSError.from_wire(error)
    return message
