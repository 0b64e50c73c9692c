"""The vault's bytes: every key name, record and object encoding it stores.

The vault keeps everything as StateFS keys under ``vault/``. This module is
the only one that builds those names or packs and unpacks their values
(docs/statefs.md, "The vault"); the rest of the vault works with the types
below. Nothing secret or size-revealing appears in a key name: objects are
named by keyed IDs, history by keyed path IDs, snapshots and sessions by
random IDs. Every value but the plaintext config, the key slots and the
zero-ref markers is sealed, and sealed values are bound to their key name
(records) or object ID (object data), so a value moved to another name
fails authentication.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import blake3
import msgpack
from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from statefsd.errors import FormatError, IntegrityError

FORMAT = 1
PREFIX = "vault/"
CONFIG_KEY = "vault/config"
KEYSLOT_PREFIX = "vault/keyslot/"
DEVICE_PREFIX = "vault/dev/"
OBJECT_PREFIX = "vault/o/"
DATA_PREFIX = "vault/d/"
ZERO_PREFIX = "vault/z/"
SNAPSHOT_PREFIX = "vault/s/"
SESSION_PREFIX = "vault/session/"
HISTORY_PREFIX = "vault/h/"

KIND_CHUNK = 1
KIND_NODE = 2
ID_BYTES = 32
SNAPSHOT_ID_BYTES = 8
SESSION_ID_BYTES = 16
PATH_ID_BYTES = 16

NONCE_BYTES = 24
TAG_BYTES = 16
SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES
MIN_PADDED = 512          # object data is never shorter: hides the size of tiny files
LENGTH_PREFIX = 4

# Node fan-out: a node's creation and the reference increments of all its
# children fit one StateFS transaction (3 + 2 x 60 ops <= MAX_TXN_OPS 128).
FANOUT = 60

OBJECT_AD = b"statefs.vault.object\x00"
RECORD_AD = b"statefs.vault.record\x00"
KEYSLOT_AD = b"statefs.vault.keyslot.v1\x00"
SNAPSHOT_SIG_DOMAIN = b"statefs.vault.snapshot.v1"
SNAPSHOT_SIGN_LABEL = "statefs.vault.snapshot"
DEVICE_WRAP_LABEL = "statefs.vault.wrap"

_OBJECT_RECORD = struct.Struct("<BB6sQQQ16s")   # kind, format, reserved (zero), refs, size, created_ns, session


# ------------------------------------------------------------------ names

def object_key(oid: bytes) -> str:
    return OBJECT_PREFIX + oid.hex()


def data_key(oid: bytes) -> str:
    return DATA_PREFIX + oid.hex()


def zero_key(oid: bytes) -> str:
    return ZERO_PREFIX + oid.hex()


def snapshot_key(sid: bytes) -> str:
    return SNAPSHOT_PREFIX + sid.hex()


def session_key(sid: bytes) -> str:
    return SESSION_PREFIX + sid.hex()


def history_prefix(path_id: bytes) -> str:
    return f"{HISTORY_PREFIX}{path_id.hex()}/"


def history_key(path_id: bytes, snapshot_id: bytes) -> str:
    return history_prefix(path_id) + snapshot_id.hex()


def device_key(device_id: str) -> str:
    return DEVICE_PREFIX + device_id


def keyslot_key(slot: str) -> str:
    return KEYSLOT_PREFIX + slot


def id_from_key(key: str, prefix: str, length: int = ID_BYTES) -> bytes:
    """The ID a key name carries, checked (a foreign key under our prefix is corruption)."""
    text = key[len(prefix):]
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if not key.startswith(prefix) or len(raw) != length:
        raise IntegrityError(f"unexpected vault key {key!r}", hint="run `statefs vault check`")
    return raw


# ------------------------------------------------------------------ AEAD

def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def unseal(key: bytes, sealed: bytes, ad: bytes, what: str) -> bytes:
    if len(sealed) < SEAL_OVERHEAD:
        raise IntegrityError(f"{what} is {len(sealed)} bytes, shorter than its seal",
                             hint="run `statefs vault check`")
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
            sealed[NONCE_BYTES:], ad, sealed[:NONCE_BYTES], key)
    except CryptoError:
        raise IntegrityError(f"{what} failed authentication (damaged, or not this vault's)",
                             hint="run `statefs vault check`") from None


def seal_record(key: bytes, name: str, value: object) -> bytes:
    return seal(key, packb(value), RECORD_AD + name.encode())


def unseal_record(key: bytes, name: str, sealed: bytes) -> object:
    return unpackb(unseal(key, sealed, RECORD_AD + name.encode(), name), name)


def packb(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpackb(raw: bytes, what: str) -> object:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:
        raise IntegrityError(f"{what} does not decode: {exc}", hint="run `statefs vault check`") from None


# ------------------------------------------------------------------ object IDs and data

def object_id(id_key: bytes, kind: int, data: bytes | memoryview) -> bytes:
    h = blake3.blake3(bytes((kind,)), key=id_key)
    h.update(data)
    return h.digest()


def padme(length: int) -> int:
    """Padmé: round up so that only O(log log L) bits of the length remain."""
    if length < 2:
        return length
    e = length.bit_length() - 1
    last_bits = e - e.bit_length()
    mask = (1 << last_bits) - 1
    return (length + mask) & ~mask


def padded_size(length: int) -> int:
    return max(MIN_PADDED, padme(length + LENGTH_PREFIX))


def stored_size(length: int) -> int:
    """Bytes a value of `length` plaintext bytes occupies as object data."""
    return padded_size(length) + SEAL_OVERHEAD


def seal_object(seal_key: bytes, oid: bytes, data: bytes | memoryview) -> bytes:
    n = len(data)
    body = bytearray(padded_size(n))
    body[:LENGTH_PREFIX] = n.to_bytes(LENGTH_PREFIX, "little")
    body[LENGTH_PREFIX:LENGTH_PREFIX + n] = data
    return seal(seal_key, bytes(body), OBJECT_AD + oid)


def open_object(seal_key: bytes, id_key: bytes, oid: bytes, kind: int, sealed: bytes) -> bytes:
    """Unseal object data and prove it is the object `oid` names (ID recomputed)."""
    what = f"object {oid.hex()[:16]}"
    body = unseal(seal_key, sealed, OBJECT_AD + oid, what)
    n = int.from_bytes(body[:LENGTH_PREFIX], "little")
    if len(body) != padded_size(n) or any(body[LENGTH_PREFIX + n:]):
        raise IntegrityError(f"{what} has a bad length or padding", hint="run `statefs vault check`")
    data = body[LENGTH_PREFIX:LENGTH_PREFIX + n]
    if object_id(id_key, kind, data) != oid:
        raise IntegrityError(f"{what}: content does not match its ID", hint="run `statefs vault check`")
    return data


@dataclass(frozen=True)
class ObjectRecord:
    kind: int
    refs: int
    size: int
    created_ns: int
    session: bytes

    def with_refs(self, refs: int) -> "ObjectRecord":
        return ObjectRecord(self.kind, refs, self.size, self.created_ns, self.session)

    def with_session(self, session: bytes) -> "ObjectRecord":
        return ObjectRecord(self.kind, self.refs, self.size, self.created_ns, session)


def seal_object_record(record_key: bytes, oid: bytes, rec: ObjectRecord) -> bytes:
    plain = _OBJECT_RECORD.pack(rec.kind, FORMAT, bytes(6), rec.refs, rec.size, rec.created_ns, rec.session)
    return seal(record_key, plain, RECORD_AD + object_key(oid).encode())


def open_object_record(record_key: bytes, oid: bytes, sealed: bytes) -> ObjectRecord:
    name = object_key(oid)
    plain = unseal(record_key, sealed, RECORD_AD + name.encode(), name)
    if len(plain) != _OBJECT_RECORD.size:
        raise IntegrityError(f"{name}: record is {len(plain)} bytes, expected {_OBJECT_RECORD.size}")
    kind, fmt, reserved, refs, size, created, session = _OBJECT_RECORD.unpack(plain)
    if fmt != FORMAT or kind not in (KIND_CHUNK, KIND_NODE) or any(reserved):
        raise IntegrityError(f"{name}: unknown kind {kind} or format {fmt}")
    return ObjectRecord(kind, refs, size, created, session)


# ------------------------------------------------------------------ nodes

# Node shapes (msgpack arrays, so the encoding is deterministic):
#   ["tree", [entry, ...]]         one page of a directory, entries sorted by name
#   ["treelist", [node id, ...]]   a directory of more than FANOUT entries
#   ["chunks", [[id, size], ...]]  one page of a file's chunks
#   ["chunklist", [node id, ...]]  a file of more than FANOUT chunks
TREE, TREELIST, CHUNKS, CHUNKLIST = "tree", "treelist", "chunks", "chunklist"
NODE_TAGS = (TREE, TREELIST, CHUNKS, CHUNKLIST)

# File types in tree entries
FILE, DIR, SYMLINK, FIFO = "f", "d", "l", "p"


@dataclass(frozen=True)
class Entry:
    """One name in a directory, as a snapshot keeps it."""

    name: bytes
    type: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    size: int
    content: bytes | None     # file: chunk or chunk-list node id; dir: tree id
    content_kind: int         # 0 no content, KIND_CHUNK or KIND_NODE
    target: bytes | None      # symlink target

    def encode(self) -> list:
        return [self.name, self.type, self.mode, self.uid, self.gid, self.mtime_ns, self.ctime_ns,
                self.inode, self.size, self.content, self.content_kind, self.target]

    @classmethod
    def decode(cls, raw: object) -> "Entry":
        if not isinstance(raw, list) or len(raw) != 12:
            raise IntegrityError(f"malformed tree entry {str(raw)[:80]}")
        name, typ, mode, uid, gid, mtime, ctime, inode, size, content, kind, target = raw
        ints = (mode, uid, gid, mtime, ctime, inode, size, kind)
        if (not isinstance(name, bytes) or not name or b"/" in name or name in (b".", b"..")
                or typ not in (FILE, DIR, SYMLINK, FIFO) or not all(type(i) is int for i in ints)
                or not (content is None or (isinstance(content, bytes) and len(content) == ID_BYTES))
                or (content is None) != (kind == 0) or kind not in (0, KIND_CHUNK, KIND_NODE)
                or not (target is None or isinstance(target, bytes))):
            raise IntegrityError(f"malformed tree entry {str(raw)[:80]}")
        return cls(name, typ, mode, uid, gid, mtime, ctime, inode, size, content, kind, target)

    def children(self) -> list[bytes]:
        return [self.content] if self.content is not None else []


def encode_node(tag: str, items: list) -> bytes:
    return packb([tag, items])


def decode_node(raw: bytes, what: str) -> tuple[str, list]:
    node = unpackb(raw, what)
    if not (isinstance(node, list) and len(node) == 2 and node[0] in NODE_TAGS and isinstance(node[1], list)):
        raise IntegrityError(f"{what} is not a vault node")
    tag, items = node
    if len(items) > FANOUT or (tag != TREE and not items):
        raise IntegrityError(f"{what}: {len(items)} items in a {tag} node")
    if tag in (TREELIST, CHUNKLIST):
        if not all(isinstance(i, bytes) and len(i) == ID_BYTES for i in items):
            raise IntegrityError(f"{what}: malformed {tag}")
    elif tag == CHUNKS:
        if not all(isinstance(i, list) and len(i) == 2 and isinstance(i[0], bytes) and len(i[0]) == ID_BYTES
                   and type(i[1]) is int and i[1] >= 0 for i in items):
            raise IntegrityError(f"{what}: malformed chunk list")
    return tag, items


def node_children(tag: str, items: list) -> list[bytes]:
    """Distinct child IDs of a decoded node, in first-seen order (each counts one reference)."""
    if tag == TREE:
        ids = [Entry.decode(e).content for e in items]
    elif tag == CHUNKS:
        ids = [i[0] for i in items]
    else:
        ids = list(items)
    return list(dict.fromkeys(i for i in ids if i is not None))


# ------------------------------------------------------------------ snapshots

def snapshot_signed_bytes(vault_id: bytes, snap: dict) -> bytes:
    return packb([SNAPSHOT_SIG_DOMAIN, vault_id, snap["id"], snap["time"], snap["host"], snap["device"],
                  snap["paths"], snap["tags"], snap["root"], snap["parent"]])


def check_config(config: object) -> dict:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise FormatError(f"vault/config holds an unknown vault format: {str(config)[:80]}",
                          hint="this vault was made by another version of statefs")
    for field, kind in (("vault_id", bytes), ("chunker", dict), ("mac", bytes), ("created", int)):
        if not isinstance(config.get(field), kind):
            raise IntegrityError(f"vault/config lacks a valid {field!r}", hint="run `statefs vault check`")
    return config


def config_mac(mac_key: bytes, config: dict) -> bytes:
    """Keyed BLAKE3 over the canonical form of every field but ``mac``."""
    body = {k: v for k, v in config.items() if k != "mac"}
    return blake3.blake3(packb(_canonical(body)), key=mac_key).digest()


def _canonical(value: object) -> object:
    """Maps become lists of [key, value] pairs sorted by key, at every depth."""
    if isinstance(value, dict):
        return [[k, _canonical(v)] for k, v in sorted(value.items())]
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value
