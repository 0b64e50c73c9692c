"""Seeded wire fuzzing for both daemons: inputs, sessions, and the checks on every reply.

One case is one connection: the fuzzer sends its bytes, shuts down its
write side (so a frame left unfinished ends in EOF, not in a wait) and reads
every reply until the daemon closes. Each reply must fit the daemon's frame
cap, be one msgpack map with a bool ``ok``, and never carry EINTERNAL.
Case ``i`` draws from ``random.Random(f"{seed}:{i}")``, so a failure names
the one case that reproduces it.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from dataclasses import dataclass, field

import msgpack

from statefsd.errors import Code

LENGTH = struct.Struct(">I")
REPLY_TIMEOUT = 15.0


@dataclass(frozen=True)
class Protocol:
    """What the fuzzer knows of one daemon's protocol (docs/protocol.md, docs/keystored.md)."""

    name: str
    max_frame: int
    ops: dict[str, dict[str, str]]     # op -> field -> kind ("str", "bin", "int", "key", "keys", ...)
    head: tuple[str, ...]              # fields every request carries ("v", "id")
    key_prefix: str = "fz"             # keys the fuzzer may write: never the normal client's


STATEFSD = Protocol(
    name="statefsd", max_frame=8 * 1024 * 1024 + 64 * 1024, head=("v", "id"),
    ops={"hello": {}, "info": {}, "get": {"key": "key"}, "mget": {"keys": "keys"}, "stat": {"key": "key"},
         "put": {"key": "key", "value": "bin"}, "delete": {"key": "key"},
         "list": {"prefix": "str", "after": "str", "limit": "int"},
         "txn": {"ops": "txnops", "expect": "expect"},
         "begin": {}, "txn_put": {"key": "key", "value": "bin"}, "txn_delete": {"key": "key"},
         "commit": {"expect": "expect"}, "abort": {}, "compact": {}, "verify": {}})

KEYSTORED = Protocol(
    name="keystored", max_frame=64 * 1024, head=("v",),
    ops={"hello": {}, "ping": {}, "public_key": {},
         "derive": {"label": "label", "context": "bin", "length": "int"},
         "sign": {"label": "label", "message": "bin"}})


# ------------------------------------------------------------------ inputs

def _text(rng: random.Random, n: int) -> str:
    alphabet = "abcxyz/._-:0123456789ÄéΩ\u2603\U0001F600 \t\n"
    return "".join(rng.choice(alphabet) for _ in range(n))


def _raw_str(data: bytes) -> bytes:
    """A msgpack str header around arbitrary bytes (invalid UTF-8 included)."""
    n = len(data)
    if n < 32:
        return bytes([0xA0 | n]) + data
    if n < 256:
        return b"\xd9" + bytes([n]) + data
    if n < 65536:
        return b"\xda" + struct.pack(">H", n) + data
    return b"\xdb" + struct.pack(">I", n) + data


class Invalid:
    """A str whose bytes are not UTF-8: packed by hand, since msgpack-python will not."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def pack(value: object) -> bytes:
    """msgpack of ``value``, where Invalid parts become str headers over raw bytes."""
    if isinstance(value, Invalid):
        return _raw_str(value.data)
    if isinstance(value, dict):
        n = len(value)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
        return head + b"".join(pack(k) + pack(v) for k, v in value.items())
    if isinstance(value, list):
        n = len(value)
        head = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n)
        return head + b"".join(pack(v) for v in value)
    return msgpack.packb(value, use_bin_type=True)


def _invalid_utf8(rng: random.Random) -> Invalid:
    bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\x80"])
    return Invalid(rng.choice([b"", b"fz", b"a/"]) + bad + rng.choice([b"", b"x", b"\x00"]))


def scalar(rng: random.Random) -> object:
    kind = rng.randrange(14)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1, 16, 64, 65, 15, 4096, 4097])
    if kind == 3:
        return rng.randrange(-(2**63), 2**64)
    if kind == 4:
        return rng.choice([0.0, -0.0, 1.5, float("inf"), float("nan"), 1e308])
    if kind == 5:
        return _text(rng, rng.randrange(0, 40))
    if kind == 6:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 7:
        return _invalid_utf8(rng)
    if kind == 8:
        return msgpack.ExtType(rng.randrange(0, 128), rng.randbytes(rng.randrange(0, 9)))
    if kind == 9:
        return "\x00" + _text(rng, 3)
    if kind == 10:
        return "k" * rng.choice([511, 512, 513, 1024, 5000])
    if kind == 11:
        return ""
    if kind == 12:
        return rng.choice([[], {}])
    return rng.randbytes(rng.choice([0, 1, 4096, 70000]))


def nested(rng: random.Random, depth: int) -> object:
    """A random tree of maps and arrays, ``depth`` deep at most."""
    if depth <= 0 or rng.random() < 0.3:
        return scalar(rng)
    if rng.random() < 0.5:
        return [nested(rng, depth - 1) for _ in range(rng.randrange(0, 5))]
    return {_map_key(rng): nested(rng, depth - 1) for _ in range(rng.randrange(0, 5))}


def _map_key(rng: random.Random) -> object:
    r = rng.random()
    if r < 0.7:
        return _text(rng, rng.randrange(1, 10))
    if r < 0.8:
        return _invalid_utf8(rng)
    key = scalar(rng)  # non-str map keys: the decoder must refuse them cleanly
    return key if not isinstance(key, (list, dict)) else b"k"


def deep(depth: int, kind: str) -> bytes:
    """An array or map nested ``depth`` deep, as raw msgpack."""
    if kind == "array":
        return b"\x91" * depth + b"\xc0"
    return b"\x81\xa1k" * depth + b"\xc0"


def _field_value(rng: random.Random, proto: Protocol, kind: str) -> object:
    """A right-typed value most of the time, a wrong one otherwise."""
    if rng.random() < 0.25:
        return scalar(rng)
    if kind == "key":
        return proto.key_prefix + rng.choice(["", "/", "/a", "/é", "/" + _text(rng, 8)])
    if kind == "label":
        return rng.choice(["statefs.data", "statefs.fuzz", "app.x", "", "*", "a" * 129, _text(rng, 6)])
    if kind == "str":
        return rng.choice([proto.key_prefix, "", _text(rng, 5), "\uffff"])
    if kind == "bin":
        return rng.randbytes(rng.choice([0, 1, 16, 300]))
    if kind == "int":
        return rng.choice([0, 1, 16, 32, 64, 65, 4096, 10**6, -5])
    if kind == "txnops":
        return [{"op": rng.choice(["put", "delete", "get", 7]),
                 "key": _field_value(rng, proto, "key"),
                 "value": rng.randbytes(rng.randrange(0, 40))} for _ in range(rng.randrange(0, 6))]
    if kind == "keys":
        return [_field_value(rng, proto, "key") for _ in range(rng.choice([0, 1, 3, 40, 1024, 1025]))]
    if kind == "expect":
        return [{"key": _field_value(rng, proto, "key"),
                 "txn": rng.choice([0, 0, 1, 7, -1, 2**64 - 1, True, None, "1"])}
                if rng.random() < 0.9 else scalar(rng)
                for _ in range(rng.choice([0, 1, 2, 5, 1024, 1025]))]
    return scalar(rng)


def request(rng: random.Random, proto: Protocol) -> object:
    """A request shaped like the protocol's own, then damaged at random."""
    op = rng.choice(list(proto.ops))
    message: dict[object, object] = {"v": 1, "op": op}
    if "id" in proto.head:
        message["id"] = rng.randrange(0, 2**32)
    for name, kind in proto.ops[op].items():
        if rng.random() < 0.85:
            message[name] = _field_value(rng, proto, kind)
    damage = rng.randrange(10)
    if damage == 0:
        message[rng.choice(["v", "id", "op"])] = scalar(rng)
    elif damage == 1:
        message.pop(rng.choice(["v", "op"]), None)
    elif damage == 2:
        message["op"] = rng.choice(["", "HELLO", "get\x00", _long_name(rng, proto), _invalid_utf8(rng)])
    elif damage == 3:
        message[_map_key(rng)] = nested(rng, 4)
    elif damage == 4:
        message[rng.choice(list(proto.ops[op]) or ["extra"])] = _invalid_utf8(rng)
    elif damage == 5:
        message[_long_name(rng, proto)] = 1
    return message


def _long_name(rng: random.Random, proto: Protocol) -> str:
    """A name up to most of a frame long, in characters that quoting makes longer."""
    n = rng.choice([300, proto.max_frame // 12, proto.max_frame // 4, proto.max_frame // 3])
    return rng.choice(["x", "\u2603", "\x01", "'"]) * n


def case(rng: random.Random, proto: Protocol) -> bytes:
    """The bytes of one connection: one or more frames, whole or broken."""
    out = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.randrange(12)
        if kind == 0:
            out.append(rng.randbytes(rng.randrange(0, 200)))          # anything at all
        elif kind == 1:
            body = rng.randbytes(rng.randrange(0, 300))               # a frame of noise
            out.append(LENGTH.pack(len(body)) + body)
        elif kind == 2:
            body = pack(nested(rng, 6))                               # any msgpack object
            out.append(LENGTH.pack(len(body)) + body)
        elif kind == 3:
            body = deep(rng.choice([100, 1000, 5000, 20000]), rng.choice(["array", "map"]))
            body = body[:proto.max_frame]
            out.append(LENGTH.pack(len(body)) + body)
        elif kind == 4:                                               # lengths that lie
            body = pack(request(rng, proto))
            claimed = rng.choice([0, 1, len(body) - 1, len(body) + 1, len(body) + 1000,
                                  proto.max_frame, proto.max_frame + 1, 2**32 - 1])
            out.append(LENGTH.pack(max(0, claimed)) + body)
        elif kind == 5:                                               # trailing bytes in a frame
            body = pack(request(rng, proto)) + rng.randbytes(rng.randrange(1, 8))
            out.append(LENGTH.pack(len(body)) + body)
        elif kind == 6:                                               # msgpack headers that lie
            head = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\x7f\xff\xff\xff", b"\xdb\xff\xff\xff\xf0",
                               b"\xc6\x7f\xff\xff\xff", b"\xc9\x7f\xff\xff\xff\x01", b"\xde\xff\xff"])
            body = head + rng.randbytes(rng.randrange(0, 16))
            out.append(LENGTH.pack(len(body)) + body)
        else:                                                         # structured requests
            body = pack(request(rng, proto))
            if len(body) > proto.max_frame:
                body = body[:proto.max_frame]
            out.append(LENGTH.pack(len(body)) + body)
    return b"".join(out)


# ----------------------------------------------------------------- running

@dataclass
class Findings:
    """What the fuzzer saw that the protocol forbids, with the case that did it."""

    cases: int = 0
    replies: int = 0
    problems: list[str] = field(default_factory=list)
    last_case: int = -1           # the case the latest finding came from

    def add(self, index: int, what: str) -> None:
        self.last_case = index
        if len(self.problems) < 20:
            self.problems.append(f"case {index}: {what}")


def expected_replies(data: bytes, max_frame: int) -> int:
    """How many replies the bytes of one connection are owed: one per complete
    frame, and one for an over-cap length prefix, after which framing is lost."""
    owed, at = 0, 0
    while at + LENGTH.size <= len(data):
        (length,) = LENGTH.unpack_from(data, at)
        if length > max_frame:
            return owed + 1
        at += LENGTH.size + length
        if at > len(data):
            break
        owed += 1
    return owed


def run_case(socket_path: str, proto: Protocol, data: bytes, index: int, findings: Findings) -> None:
    owed = expected_replies(data, proto.max_frame)
    answered = _exchange(socket_path, proto, data, index, findings)
    if answered < owed and findings.last_case != index:
        findings.add(index, f"the daemon hung up after answering {answered} of {owed} complete frames")


def _exchange(socket_path: str, proto: Protocol, data: bytes, index: int, findings: Findings) -> int:
    """Send the case, read every reply until the daemon closes; the number of replies."""
    answered = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(REPLY_TIMEOUT)
        s.connect(socket_path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may hang up after a fatal frame before reading the rest
        stream = s.makefile("rb")
        while True:
            try:
                head = stream.read(LENGTH.size)
            except ConnectionResetError:
                return answered
            except TimeoutError:
                findings.add(index, f"no reply or close within {REPLY_TIMEOUT}s")
                return answered
            if not head:
                return answered
            if len(head) < LENGTH.size:
                findings.add(index, "reply cut inside its length prefix")
                return answered
            (length,) = LENGTH.unpack(head)
            if length > proto.max_frame:
                findings.add(index, f"reply of {length} bytes exceeds the {proto.max_frame}-byte frame cap")
                return answered
            body = stream.read(length)
            answered += 1
            findings.replies += 1
            check_reply(body, length, index, findings)


def check_reply(body: bytes, length: int, index: int, findings: Findings) -> None:
    if len(body) < length:
        findings.add(index, f"reply cut after {len(body)} of {length} bytes")
        return
    try:
        reply = msgpack.unpackb(body, raw=False)
    except Exception as exc:
        findings.add(index, f"reply is not msgpack: {exc!r}")
        return
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        findings.add(index, f"reply is not a map with a bool 'ok': {str(reply)[:200]}")
        return
    if reply["ok"]:
        return
    error = reply.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("code"), int):
        findings.add(index, f"error reply without an error map: {str(reply)[:200]}")
    elif error["code"] == Code.EINTERNAL:
        findings.add(index, f"EINTERNAL: {str(error.get('message'))[:200]}")


def fuzz(socket_path: str, proto: Protocol, seed: int, cases: int, budget: float,
         alive=lambda: True) -> Findings:
    """Run up to ``cases`` cases within ``budget`` seconds; stop early if the daemon dies."""
    findings = Findings()
    deadline = time.monotonic() + budget
    for index in range(cases):
        if time.monotonic() > deadline:
            break
        data = case(random.Random(f"{seed}:{index}"), proto)
        try:
            run_case(socket_path, proto, data, index, findings)
        except OSError as exc:
            findings.add(index, f"connection failed: {exc!r}")
        findings.cases += 1
        if not alive():
            findings.add(index, "the daemon died")
            break
    return findings
