"""The on-disk bytes of StateFS format 2. Nothing else packs or parses them.

docs/statefs.md is the byte-level specification of everything here; the two
change together. All integers are little-endian.

Device layout (block size 4096)::

    block 0        superblock slot A
    block 1        superblock slot B
    blocks 2..     log region 0 | log region 1   (two equal halves)
    last block     identity copy: the mkfs superblock (format 2.1)

Superblock slot (4096 bytes; the first 256 are the structure below, the rest
zero)::

    0   8  magic "STATEFS\\0"          84  4  log_epoch
    8   2  version_major (2)           88  8  txn_reserved
    10  2  version_minor (1)           96 32  key_descriptor (UTF-8, NUL padded)
    12  4  block_size (4096)          128 32  salt
    16  8  generation                 160 32  chain_base
    24 16  device_uuid                192 16  key_check
    40  8  total_blocks               208  8  durable_end (2.1)
    48  8  region0_start              216  1  redundancy (2.1)
    56  8  region0_blocks             217 35  reserved (zero)
    64  8  region1_start              252  4  crc32c of bytes 0..251
    72  8  region1_blocks
    80  1  active_region
    81  1  encryption
    82  2  flags

Record = 64-byte header + payload::

    0  4 crc32c (of header bytes 4..63, then the payload; not masked)
    4  2 magic "R2"          24 8 mount_gen
    6  1 type                32 8 txn_id
    7  1 flags               40 8 path_hash (BLAKE2b-64 of the path)
    8  4 epoch               48 4 payload_len
    12 4 group               52 4 chunk_index
    16 8 seq                 56 2 op_index     58 6 reserved (zero)
"""

from __future__ import annotations

import hashlib
import struct
import uuid as uuidlib
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence, TypeVar

import construct as cs
import crc32c as _crc32c
import numpy as np

from statefsd.errors import FormatError, InternalError

# ---------------------------------------------------------------- constants

VERSION_MAJOR = 2
VERSION_MINOR = 1                 # 2.1: durable floor, redundancy, identity copy

BLOCK_SIZE = 4096
GROUP_ALIGN = 512                 # every write group starts on this boundary
SUPERBLOCK_OFFSETS = (0, BLOCK_SIZE)  # slot A, slot B
LOG_START_BLOCK = 2
MIN_IMAGE_BYTES = 1 << 20

SUPERBLOCK_MAGIC = b"STATEFS\x00"
RECORD_MAGIC = b"R2"
HEADER_SIZE = 64

_U32 = struct.Struct("<I")        # every stored CRC, and a record's epoch

# Caps (documented in docs/statefs.md, section "Limits"); transaction_problem
# below is the one rule that applies them.
MAX_KEY_BYTES = 512               # UTF-8 bytes of a path
MAX_VALUE_BYTES = 8 << 20         # one value
MAX_TXN_OPS = 128                 # operations (keys) per transaction
MAX_TXN_BYTES = 16 << 20          # sum of value bytes per transaction
CHUNK_SIZE = 64 << 10             # plaintext bytes per PAYLOAD record
SEAL_OVERHEAD = 16                # AEAD tag appended to a sealed payload
MAX_PAYLOAD = 128 << 10           # any record payload (PREPARE is the largest)
TXN_RESERVE_BATCH = 4096          # txn ids reserved per superblock write
MAX_GROUP_BYTES = 32 << 20        # data bytes of one write group (one device write)
MAX_TXN_CONDITIONS = 1024         # conditions (expected txn ids) per transaction: checked, never stored

# What one page of the feed (storage/feed.py; the wire's `feed`) may cost;
# never stored, here so that the engine and the wire share them. A page is
# charged each transaction's key and value bytes plus FEED_TXN_OVERHEAD, and
# FEED_CHANGE_OVERHEAD per change (more than msgpack spends around them),
# and 5 + 3 per change of FEED_MAX_OBJECTS. It stops before the transaction
# that would take it past its budget, but always holds one, so the most a
# page costs is FEED_MAX_PAGE_COST.
FEED_DEFAULT_BYTES = 8 << 20
FEED_MAX_BYTES = 2 * MAX_TXN_BYTES
FEED_TXN_OVERHEAD = 64
FEED_CHANGE_OVERHEAD = 16
FEED_MAX_OBJECTS = 1 << 18
FEED_MAX_PAGE_COST = max(FEED_MAX_BYTES, MAX_TXN_BYTES + FEED_TXN_OVERHEAD
                         + MAX_TXN_OPS * (MAX_KEY_BYTES + FEED_CHANGE_OVERHEAD))

# Record types. 0x16.. are reserved for later minor versions.
PREPARE = 0x10
PAYLOAD = 0x11
COMMIT = 0x12
ABORT = 0x13
DELETE = 0x14
CHECKPOINT = 0x15
PARITY = 0x16                     # trailer of a write group (redundancy on); never replayed
RECORD_TYPES = {PREPARE: "PREPARE", PAYLOAD: "PAYLOAD", COMMIT: "COMMIT", ABORT: "ABORT", DELETE: "DELETE",
                CHECKPOINT: "CHECKPOINT", PARITY: "PARITY"}

# Record flags.
FLAG_GROUP_END = 0x01             # next record starts at the next GROUP_ALIGN boundary
FLAG_SEALED = 0x02                # payload is AEAD-sealed (ciphertext || tag)
KNOWN_FLAGS = FLAG_GROUP_END | FLAG_SEALED

# PREPARE operation kinds.
OP_PUT = 1
OP_DELETE = 2

# Superblock encryption modes.
ENCRYPTION_OFF = 0
ENCRYPTION_XCHACHA20POLY1305 = 1
ENCRYPTION_NAMES = {ENCRYPTION_OFF: "off", ENCRYPTION_XCHACHA20POLY1305: "xchacha20poly1305"}

# Superblock redundancy modes: what guards each write group beyond its CRCs.
REDUNDANCY_NONE = 0
REDUNDANCY_PARITY = 1             # a parity trailer after every group repairs any one damaged sector
REDUNDANCY_NAMES = {REDUNDANCY_NONE: "off", REDUNDANCY_PARITY: "parity"}

ZERO_HASH = bytes(32)
GENESIS_LABEL = b"statefs.chain.genesis.v2\x00"


def crc32c(data: bytes, start: int = 0) -> int:
    """Standard CRC-32C (Castagnoli, reflected, init and xorout 0xFFFFFFFF)."""
    return _crc32c.crc32c(data, start)


_PATH_HASH = hashlib.blake2b(digest_size=8)


def path_hash(path: bytes) -> bytes:
    """BLAKE2b-64 of ``path`` (from a copy of an empty hash: one is taken per
    record written, and the copy skips parsing blake2b's keywords)."""
    h = _PATH_HASH.copy()
    h.update(path)
    return h.digest()


def genesis_hash(device_uuid: bytes) -> bytes:
    """The prev-hash of the very first COMMIT of a fresh image."""
    return hashlib.sha256(GENESIS_LABEL + device_uuid).digest()


def align_up(n: int, to: int = GROUP_ALIGN) -> int:
    return (n + to - 1) // to * to


# --------------------------------------------------------------- superblock

# Cold structure: parsed twice per mount, so construct's clarity wins over speed.
_SUPERBLOCK_BODY = cs.Struct(
    "magic" / cs.Bytes(8),
    "version_major" / cs.Int16ul,
    "version_minor" / cs.Int16ul,
    "block_size" / cs.Int32ul,
    "generation" / cs.Int64ul,
    "device_uuid" / cs.Bytes(16),
    "total_blocks" / cs.Int64ul,
    "region0_start" / cs.Int64ul,
    "region0_blocks" / cs.Int64ul,
    "region1_start" / cs.Int64ul,
    "region1_blocks" / cs.Int64ul,
    "active_region" / cs.Int8ul,
    "encryption" / cs.Int8ul,
    "flags" / cs.Int16ul,
    "log_epoch" / cs.Int32ul,
    "txn_reserved" / cs.Int64ul,
    "key_descriptor" / cs.Bytes(32),
    "salt" / cs.Bytes(32),
    "chain_base" / cs.Bytes(32),
    "key_check" / cs.Bytes(16),
    "durable_end" / cs.Int64ul,
    "redundancy" / cs.Int8ul,
    "reserved" / cs.Bytes(35),
)
SUPERBLOCK_MAGIC_OFFSET = 0
SUPERBLOCK_MAGIC_END = SUPERBLOCK_MAGIC_OFFSET + len(SUPERBLOCK_MAGIC)
SUPERBLOCK_CRC_OFFSET = 252
SUPERBLOCK_STRUCT_SIZE = 256
if _SUPERBLOCK_BODY.sizeof() != SUPERBLOCK_CRC_OFFSET:
    raise ImportError("superblock layout drifted from docs/statefs.md")


def has_superblock_magic(slot) -> bool:
    """Whether ``slot`` (at least its first SUPERBLOCK_MAGIC_END bytes) starts
    like a StateFS superblock; says nothing about its checksum."""
    return bytes(slot[SUPERBLOCK_MAGIC_OFFSET:SUPERBLOCK_MAGIC_END]) == SUPERBLOCK_MAGIC


@dataclass(frozen=True)
class Superblock:
    generation: int
    device_uuid: bytes
    total_blocks: int
    regions: tuple[tuple[int, int], tuple[int, int]]  # (start block, block count) x2
    active_region: int = 0
    log_epoch: int = 1
    txn_reserved: int = 0
    encryption: int = ENCRYPTION_OFF
    key_descriptor: str = ""
    salt: bytes = ZERO_HASH
    chain_base: bytes = ZERO_HASH
    key_check: bytes = bytes(16)
    durable_end: int = 0          # every group starting below this byte offset was flushed
    redundancy: int = REDUNDANCY_NONE
    flags: int = 0
    version_major: int = VERSION_MAJOR
    version_minor: int = VERSION_MINOR
    block_size: int = BLOCK_SIZE

    @property
    def active_extent(self) -> tuple[int, int]:
        """Byte offset and length of the active log region."""
        start, blocks = self.regions[self.active_region]
        return start * self.block_size, blocks * self.block_size

    @property
    def identity_copy_offset(self) -> int:
        return identity_copy_offset(self.total_blocks)

    def evolve(self, **changes) -> "Superblock":
        return replace(self, **changes)


def new_superblock(total_bytes: int, *, encryption: int = ENCRYPTION_OFF,
                   key_descriptor: str = "", salt: bytes = ZERO_HASH,
                   device_uuid: bytes | None = None, redundancy: int = REDUNDANCY_NONE) -> Superblock:
    if total_bytes < MIN_IMAGE_BYTES:
        raise FormatError(f"device of {total_bytes} bytes is too small; StateFS needs at least "
                          f"{MIN_IMAGE_BYTES >> 20} MiB")
    total_blocks = total_bytes // BLOCK_SIZE
    uid = device_uuid or uuidlib.uuid4().bytes
    return Superblock(
        generation=1, device_uuid=uid, total_blocks=total_blocks, regions=region_layout(total_blocks),
        encryption=encryption, key_descriptor=key_descriptor, salt=salt,
        chain_base=genesis_hash(uid), redundancy=redundancy,
    )


IDENTITY_COPY_BLOCKS = 1


def region_layout(total_blocks: int, identity_copy: bool = True) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two equal log regions mkfs lays out; ``identity_copy=False`` is
    the format 2.0 layout, whose regions may reach the last block."""
    half = (total_blocks - LOG_START_BLOCK - (IDENTITY_COPY_BLOCKS if identity_copy else 0)) // 2
    return (LOG_START_BLOCK, half), (LOG_START_BLOCK + half, half)


def has_identity_copy(sb: Superblock) -> bool:
    """Format 2.1 keeps the last block out of both regions for the copy (a
    2.0 image may have its log there)."""
    start, blocks = sb.regions[1]
    return start + blocks <= sb.total_blocks - IDENTITY_COPY_BLOCKS


def identity_copy_offset(total_blocks: int) -> int:
    """Byte offset of the identity copy: the device's last block. It keeps
    the fields no log record carries (uuid, salt, key check, layout) so a
    superblock can be rebuilt when both slots are lost."""
    return (total_blocks - IDENTITY_COPY_BLOCKS) * BLOCK_SIZE


def encode_superblock(sb: Superblock) -> bytes:
    desc = sb.key_descriptor.encode()
    if len(desc) > 32:
        raise FormatError("key descriptor longer than 32 bytes")
    body = _SUPERBLOCK_BODY.build(dict(
        magic=SUPERBLOCK_MAGIC, version_major=sb.version_major, version_minor=sb.version_minor,
        block_size=sb.block_size, generation=sb.generation, device_uuid=sb.device_uuid,
        total_blocks=sb.total_blocks,
        region0_start=sb.regions[0][0], region0_blocks=sb.regions[0][1],
        region1_start=sb.regions[1][0], region1_blocks=sb.regions[1][1],
        active_region=sb.active_region, encryption=sb.encryption, flags=sb.flags,
        log_epoch=sb.log_epoch, txn_reserved=sb.txn_reserved,
        key_descriptor=desc.ljust(32, b"\x00"), salt=sb.salt, chain_base=sb.chain_base,
        key_check=sb.key_check, durable_end=sb.durable_end, redundancy=sb.redundancy, reserved=bytes(35),
    ))
    slot = body + _U32.pack(crc32c(body))
    return slot.ljust(BLOCK_SIZE, b"\x00")


class SlotStatus(NamedTuple):
    superblock: Superblock | None
    problem: str  # "" when valid


def has_superblock_magic(block: bytes) -> bool:
    """Whether ``block`` starts as a superblock does (its CRC aside)."""
    return block[:len(SUPERBLOCK_MAGIC)] == SUPERBLOCK_MAGIC


def decode_superblock(slot: bytes) -> SlotStatus:
    """Decode one slot. Returns the problem as text instead of raising, so
    mount can weigh both slots; raises FormatError only for a *valid* slot of
    a version this code must refuse."""
    if len(slot) < SUPERBLOCK_STRUCT_SIZE:
        return SlotStatus(None, "slot truncated")
    if not has_superblock_magic(slot):
        return SlotStatus(None, "no StateFS magic")
    body = slot[:SUPERBLOCK_CRC_OFFSET]
    (stored,) = _U32.unpack_from(slot, SUPERBLOCK_CRC_OFFSET)
    if crc32c(body) != stored:
        return SlotStatus(None, "superblock checksum mismatch")
    f = _SUPERBLOCK_BODY.parse(body)
    if f.version_major != VERSION_MAJOR:
        raise FormatError(f"image has format version {f.version_major}.{f.version_minor}; this "
                          f"statefs reads only major version {VERSION_MAJOR}")
    if f.version_minor > VERSION_MINOR:
        raise FormatError(f"image has format version {f.version_major}.{f.version_minor}, newer than "
                          f"this statefs ({VERSION_MAJOR}.{VERSION_MINOR}); upgrade statefs")
    sb = Superblock(
        generation=f.generation, device_uuid=bytes(f.device_uuid), total_blocks=f.total_blocks,
        regions=((f.region0_start, f.region0_blocks), (f.region1_start, f.region1_blocks)),
        active_region=f.active_region, log_epoch=f.log_epoch, txn_reserved=f.txn_reserved,
        encryption=f.encryption, key_descriptor=bytes(f.key_descriptor).rstrip(b"\x00").decode("utf-8", "replace"),
        salt=bytes(f.salt), chain_base=bytes(f.chain_base), key_check=bytes(f.key_check), flags=f.flags,
        durable_end=f.durable_end, redundancy=f.redundancy,
        version_major=f.version_major, version_minor=f.version_minor, block_size=f.block_size,
    )
    problem = superblock_layout_problem(sb)
    return SlotStatus(None if problem else sb, problem)


def superblock_layout_problem(sb: Superblock) -> str:
    """Explicit sanity checks of a checksummed superblock's fields."""
    if sb.block_size != BLOCK_SIZE:
        return f"unsupported block size {sb.block_size}"
    if sb.active_region not in (0, 1):
        return f"active_region {sb.active_region} is not 0 or 1"
    if sb.encryption not in ENCRYPTION_NAMES:
        return f"unknown encryption mode {sb.encryption}"
    if sb.flags:
        return f"unknown superblock flags {sb.flags:#x}"
    if sb.redundancy not in REDUNDANCY_NAMES:
        return f"unknown redundancy mode {sb.redundancy}"
    end = LOG_START_BLOCK
    for start, blocks in sb.regions:
        if start < end or blocks < 1 or start + blocks > sb.total_blocks:
            return f"log region ({start}, {blocks}) outside the device"
        end = start + blocks
    start, length = sb.active_extent
    if sb.durable_end and not start <= sb.durable_end <= start + length:
        return f"durable_end {sb.durable_end} outside the active log region"
    return ""


# ------------------------------------------------------------------ records

_HEADER = struct.Struct("<I2sBBIIQQQ8sIIH6x")
# Offsets of the header fields that code outside this module finds in raw
# bytes: the CRC (restamped), the magic and the epoch (searched for).
RECORD_CRC_OFFSET = 0
RECORD_CRC_COVER = 4              # the CRC covers header bytes 4..63, then the payload
RECORD_MAGIC_OFFSET = 4
RECORD_EPOCH_OFFSET = 8
if (_HEADER.size != HEADER_SIZE or struct.calcsize("<I") != RECORD_MAGIC_OFFSET == RECORD_CRC_COVER
        or struct.calcsize("<I2sBB") != RECORD_EPOCH_OFFSET):
    raise ImportError("record header layout drifted from docs/statefs.md")


class RecordHeader(NamedTuple):
    crc: int
    magic: bytes
    type: int
    flags: int
    epoch: int
    group: int
    seq: int
    mount_gen: int
    txn_id: int
    path_hash: bytes
    payload_len: int
    chunk_index: int
    op_index: int


NO_PATH_HASH = bytes(8)            # path_hash of records that name no path


def pack_record(rtype: int, *, flags: int, epoch: int, group: int, seq: int, mount_gen: int,
                txn_id: int, payload: bytes = b"", path_hash: bytes = NO_PATH_HASH,
                chunk_index: int = 0, op_index: int = 0) -> bytes:
    rec = bytearray(HEADER_SIZE + len(payload))
    rec[HEADER_SIZE:] = payload
    pack_record_into(rec, 0, rtype, flags=flags, epoch=epoch, group=group, seq=seq, mount_gen=mount_gen,
                     txn_id=txn_id, payload_len=len(payload), path_hash=path_hash,
                     chunk_index=chunk_index, op_index=op_index)
    return bytes(rec)


def pack_record_into(buf, offset: int, rtype: int, *, flags: int, epoch: int, group: int, seq: int,
                     mount_gen: int, txn_id: int, payload_len: int, path_hash: bytes = NO_PATH_HASH,
                     chunk_index: int = 0, op_index: int = 0) -> int:
    """Write the header of a record whose ``payload_len`` payload bytes
    already sit at ``offset + HEADER_SIZE`` of ``buf`` (a writable buffer),
    with its CRC; returns the offset where the record ends. The writer
    builds a whole group in place this way: no record is copied again."""
    _HEADER.pack_into(buf, offset, 0, RECORD_MAGIC, rtype, flags, epoch, group, seq, mount_gen,
                      txn_id, path_hash, payload_len, chunk_index, op_index)
    end = offset + HEADER_SIZE + payload_len
    # Header bytes 4..63 and the payload are adjacent: one CRC call covers both.
    _U32.pack_into(buf, offset + RECORD_CRC_OFFSET, crc32c(memoryview(buf)[offset + RECORD_CRC_COVER:end]))
    return end


def record_crc(header, payload) -> int:
    """The CRC a record stores: crc32c of ``header`` (its HEADER_SIZE bytes)
    from RECORD_CRC_COVER on, continued over ``payload``."""
    return crc32c(payload, crc32c(memoryview(header)[RECORD_CRC_COVER:HEADER_SIZE]))


def restamp_record_crc(buf: bytearray, offset: int = 0) -> None:
    """Store in the record at ``offset`` of ``buf`` the CRC of the bytes it
    holds now (header, and as much payload as its payload_len says): for
    self-tests and tests that alter a record on purpose and must get it past
    the checksum, to reach the check behind it."""
    h = unpack_header(buf, offset)
    start = offset + HEADER_SIZE
    crc = record_crc(bytes(buf[offset:start]), bytes(buf[start:start + h.payload_len]))
    _U32.pack_into(buf, offset + RECORD_CRC_OFFSET, crc)


def record_magic_at(buf, offset: int) -> bool:
    """Whether a record header starting at ``offset`` of ``buf`` would hold the record magic."""
    at = offset + RECORD_MAGIC_OFFSET
    return buf[at:at + len(RECORD_MAGIC)] == RECORD_MAGIC


def epoch_field(epoch: int) -> bytes:
    """The bytes a record header of log epoch ``epoch`` holds at RECORD_EPOCH_OFFSET."""
    return _U32.pack(epoch)


def unpack_header(buf, offset: int = 0) -> RecordHeader:
    return RecordHeader._make(_HEADER.unpack_from(buf, offset))


def header_problem(h: RecordHeader) -> str:
    """Structural checks that need no payload; "" when plausible."""
    if h.magic != RECORD_MAGIC:
        return "bad record magic"
    if h.type not in RECORD_TYPES:
        return f"unknown record type {h.type:#x}"
    if h.flags & ~KNOWN_FLAGS:
        return f"unknown record flags {h.flags:#x}"
    if h.payload_len > MAX_PAYLOAD + SEAL_OVERHEAD:
        return f"payload length {h.payload_len} over the cap"
    if h.type == PARITY and (h.payload_len != GROUP_ALIGN or h.flags):
        return "malformed PARITY record"
    return ""


def record_crc_ok(buf, offset: int, h: RecordHeader) -> bool:
    mv = memoryview(buf)
    end = offset + HEADER_SIZE + h.payload_len
    if end > len(buf):
        return False
    return record_crc(mv[offset:offset + HEADER_SIZE], mv[offset + HEADER_SIZE:end]) == h.crc


# ------------------------------------------------------------ group parity
#
# With redundancy on, every write group's n data sectors (its records and
# the zero padding up to GROUP_ALIGN) are followed, in the same device
# write, by a PARITY record whose payload is the XOR of those n sectors,
# padded to PARITY_TRAILER_SIZE. Any one damaged sector of the group can be
# rebuilt from the other n-1 and the parity.

PARITY_TRAILER_SIZE = 2 * GROUP_ALIGN


def xor_sectors(data) -> bytes:
    """XOR of the GROUP_ALIGN-byte sectors of ``data`` (a whole number of
    sectors), in one vectorised pass: it runs on every group written."""
    sectors = len(data) // GROUP_ALIGN
    if sectors * GROUP_ALIGN != len(data):
        raise ValueError("parity covers whole sectors only")
    if sectors == 1:   # a one-sector group (a small commit): its parity is that sector
        return bytes(data)
    words = np.frombuffer(data, dtype=np.uint64).reshape(sectors, GROUP_ALIGN // 8)
    return np.bitwise_xor.reduce(words, axis=0).tobytes()


def pack_parity_trailer_into(buf, data_len: int, *, epoch: int, group: int, seq: int, mount_gen: int,
                             parity: bytes | None = None) -> int:
    """Write the trailer that follows a group's ``data_len`` bytes of data
    (GROUP_ALIGN aligned, at the start of ``buf``) right behind them, its
    padding included; returns where the trailer ends. ``parity``:
    xor_sectors of those bytes, when the caller has it already."""
    view = memoryview(buf)
    if parity is None:
        parity = xor_sectors(view[:data_len])
    view[data_len + HEADER_SIZE:data_len + HEADER_SIZE + GROUP_ALIGN] = parity
    end = pack_record_into(buf, data_len, PARITY, flags=0, epoch=epoch, group=group, seq=seq, mount_gen=mount_gen,
                           txn_id=0, payload_len=GROUP_ALIGN, chunk_index=data_len // GROUP_ALIGN)
    view[end:data_len + PARITY_TRAILER_SIZE] = bytes(data_len + PARITY_TRAILER_SIZE - end)
    return data_len + PARITY_TRAILER_SIZE


def parity_sectors(h: RecordHeader) -> int:
    """How many data sectors a PARITY record covers (they end where it starts)."""
    return h.chunk_index


def rebuild_sector(group_data, index: int, parity: bytes, group_xor: bytes | None = None) -> bytes:
    """Sector ``index`` of a group as it was written, from the parity and the
    other sectors (whatever sector ``index`` holds now is ignored).
    ``group_xor``, xor_sectors(group_data), saves the pass when several
    sectors of one group are tried."""
    start = index * GROUP_ALIGN
    return xor_sectors(b"".join((group_xor or xor_sectors(group_data), bytes(group_data[start:start + GROUP_ALIGN]),
                                 bytes(parity))))


# ----------------------------------------------------------------- payloads

class Op(NamedTuple):
    """One operation of a transaction: put a value, or delete a path. A
    tuple: transactions of many small puts make (and replay decodes) one
    per key, at half a frozen dataclass's cost."""

    kind: int                 # OP_PUT or OP_DELETE
    path: bytes               # UTF-8 path bytes
    value_len: int = 0

    @property
    def chunk_count(self) -> int:
        return chunk_count(self.value_len) if self.kind == OP_PUT else 0


def chunk_count(value_len: int) -> int:
    return (value_len + CHUNK_SIZE - 1) // CHUNK_SIZE


_PREPARE_HEAD = struct.Struct("<H")
_PREPARE_OP = struct.Struct("<BBHI")   # kind, reserved, path_len, value_len


# ------------------------------------------------------ the transaction rule
#
# What fits one transaction is decided here and nowhere else: the engine
# validates commits with it, the server caps a buffered transaction with it,
# compaction cuts its snapshot and catch-up transactions with it, the PREPARE
# decoder refuses what breaks it and the encoder will not write what breaks
# it. A writer that followed a rule of its own could write a transaction the
# reader calls corrupt, losing data that was acknowledged.

NO_OPERATIONS = "a transaction needs at least one operation"


def path_problem(path: bytes) -> str:
    """"" when ``path`` is a valid key: 1..MAX_KEY_BYTES bytes of UTF-8 without NUL."""
    if not path:
        return "a key must not be empty"
    if len(path) > MAX_KEY_BYTES:
        return f"key of {len(path)} bytes exceeds the limit of {MAX_KEY_BYTES}"
    if b"\x00" in path:
        return "a key must not contain NUL"
    if not _is_utf8(path):
        return "a key must be valid UTF-8"
    return ""


def op_problem(op: Op) -> str:
    """"" when ``op`` on its own could be part of a transaction."""
    if op.kind not in (OP_PUT, OP_DELETE):
        return f"operation kind {op.kind} unknown"
    problem = path_problem(op.path)
    if problem:
        return problem
    if op.kind == OP_DELETE and op.value_len:
        return f"a delete carries no value (value length {op.value_len})"
    if op.value_len > MAX_VALUE_BYTES:
        return f"value of {op.value_len} bytes exceeds the limit of {MAX_VALUE_BYTES}"
    return ""


class TransactionTally:
    """Running totals of a transaction being built; ``problem`` applies the
    transaction rule to them, so a buffer that grows op by op (the server's,
    compaction's batches) checks each op in constant time."""

    __slots__ = ("count", "value_bytes", "first_op_problem")

    def __init__(self, ops: Sequence[Op] = ()) -> None:
        self.count = 0
        self.value_bytes = 0
        self.first_op_problem = ""
        for op in ops:
            self.add(op)

    def add(self, op: Op) -> None:
        self.count += 1
        self.value_bytes += op.value_len
        if not self.first_op_problem:
            self.first_op_problem = op_problem(op)

    def problem(self, adding: Op | None = None) -> str:
        """"" when the ops counted so far (plus ``adding``, if given) fit one
        transaction; otherwise what is wrong."""
        count, value_bytes, first = self.count, self.value_bytes, self.first_op_problem
        if adding is not None:
            count, value_bytes = count + 1, value_bytes + adding.value_len
            first = first or op_problem(adding)
        if count < 1:
            return NO_OPERATIONS
        if count > MAX_TXN_OPS:
            return f"{count} operations exceed the limit of {MAX_TXN_OPS} per transaction"
        if first:
            return first
        if value_bytes > MAX_TXN_BYTES:
            return f"transaction of {value_bytes} value bytes exceeds the limit of {MAX_TXN_BYTES}"
        return ""


def transaction_problem(ops: Sequence[Op]) -> str:
    """The one rule: "" when ``ops`` fit one transaction, else why not.

    A transaction has 1..MAX_TXN_OPS ops; each is a PUT or a DELETE of a path
    of 1..MAX_KEY_BYTES bytes of UTF-8 without NUL; a PUT's value is at most
    MAX_VALUE_BYTES, a DELETE has none; the values add up to at most
    MAX_TXN_BYTES."""
    if _fits_at_a_glance(ops):
        return ""
    return TransactionTally(ops).problem()


def _fits_at_a_glance(ops: Sequence[Op]) -> bool:
    """True only when TransactionTally(ops).problem() is "": the same checks,
    with the keys' NUL and UTF-8 checks made once over all of them joined
    (a valid transaction of 100 small puts is checked several times on its
    way to the log). False says nothing; the tally then names the problem."""
    if not 0 < len(ops) <= MAX_TXN_OPS:
        return False
    value_bytes = 0
    for op in ops:
        size = op.value_len
        if not (0 < len(op.path) <= MAX_KEY_BYTES and size <= MAX_VALUE_BYTES
                and (op.kind == OP_PUT or (op.kind == OP_DELETE and not size))):
            return False
        value_bytes += size
    # Joined by an ASCII byte, which no multi-byte UTF-8 sequence can span:
    # the whole decodes only if every key does on its own.
    keys = b"/".join([op.path for op in ops])
    return value_bytes <= MAX_TXN_BYTES and b"\x00" not in keys and _is_utf8(keys)


T = TypeVar("T")


def split_into_transactions(items: Iterable[T], op_of: Callable[[T], Op] = lambda item: item,
                            value_budget: int = MAX_TXN_BYTES) -> list[list[T]]:
    """Cut ``items`` (in order) into as few consecutive batches as greedily
    fit: each batch is one transaction by ``transaction_problem`` and holds at
    most ``value_budget`` value bytes, unless a single larger value forms a
    batch of its own. An item whose op fits no transaction is a bug of the
    caller (its ops were validated when committed): InternalError."""
    return list(iter_transactions(items, op_of, value_budget))


def iter_transactions(items: Iterable[T], op_of: Callable[[T], Op] = lambda item: item,
                      value_budget: int = MAX_TXN_BYTES) -> Iterator[list[T]]:
    """split_into_transactions, one batch at a time: ``items`` is consumed
    only as far as the batch being yielded (compaction filters its snapshot
    lazily, just before each batch is written)."""
    batch: list[T] = []
    tally = TransactionTally()
    for item in items:
        op = op_of(item)
        if batch and (tally.problem(op) or tally.value_bytes + op.value_len > value_budget):
            yield batch
            batch, tally = [], TransactionTally()
        problem = tally.problem(op)
        if problem:
            raise InternalError(f"an operation fits no transaction: {problem}")
        batch.append(item)
        tally.add(op)
    if batch:
        yield batch


def encode_prepare(ops: Sequence[Op]) -> bytes:
    """The PREPARE payload of ``ops``; InternalError rather than write one
    that decode_prepare would refuse (a reader would call it corruption)."""
    problem = transaction_problem(ops)
    if problem:
        raise InternalError(f"refusing to write a PREPARE that breaks the transaction rule: {problem}")
    parts = [_PREPARE_HEAD.pack(len(ops))]
    for op in ops:
        parts.append(_PREPARE_OP.pack(op.kind, 0, len(op.path), op.value_len))
        parts.append(op.path)
    return b"".join(parts)


def decode_prepare(payload: bytes) -> list[Op]:
    """Parse a PREPARE payload; raises ValueError naming the problem.
    The parse checks the bytes' shape; whether the ops form a valid
    transaction is ``transaction_problem``'s to say."""
    if len(payload) < 2:
        raise ValueError("PREPARE payload too short")
    (count,) = _PREPARE_HEAD.unpack_from(payload, 0)
    pos, ops = 2, []
    for _ in range(count):
        if pos + _PREPARE_OP.size > len(payload):
            raise ValueError("PREPARE op truncated")
        kind, reserved, plen, vlen = _PREPARE_OP.unpack_from(payload, pos)
        pos += _PREPARE_OP.size
        if reserved:
            raise ValueError(f"PREPARE op reserved byte {reserved} is not zero")
        if pos + plen > len(payload):
            raise ValueError(f"PREPARE path length {plen} runs past the payload")
        ops.append(Op(kind, bytes(payload[pos:pos + plen]), vlen))
        pos += plen
    if pos != len(payload):
        raise ValueError("PREPARE payload has trailing bytes")
    problem = transaction_problem(ops)
    if problem:
        raise ValueError(f"PREPARE: {problem}")
    return ops


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def prepare_size(ops: list[Op]) -> int:
    """Length of the PREPARE payload encode_prepare(ops) produces."""
    return _PREPARE_HEAD.size + sum(_PREPARE_OP.size + len(op.path) for op in ops)


_COMMIT = struct.Struct("<32s32sI")
COMMIT_PAYLOAD_SIZE = _COMMIT.size


class CommitBody(NamedTuple):
    prev_hash: bytes
    txn_digest: bytes
    record_count: int


def encode_commit(body: CommitBody) -> bytes:
    return _COMMIT.pack(*body)


def decode_commit(payload: bytes) -> CommitBody:
    if len(payload) != _COMMIT.size:
        raise ValueError(f"COMMIT payload is {len(payload)} bytes, expected {_COMMIT.size}")
    return CommitBody._make(_COMMIT.unpack(payload))


# A CHECKPOINT record vouches, with the device's Ed25519 key (held by
# keystored), for the chain head at its position in the log.
CHECKPOINT_SIGN_LABEL = "statefs.checkpoint.v1"   # keystored signing label
CHECKPOINT_MESSAGE_LABEL = b"statefs.checkpoint.v2\x00"
_CHECKPOINT = struct.Struct("<32s32s64s")          # chain_head, public_key, signature
_CHECKPOINT_MESSAGE = struct.Struct("<24s16sIQ32s")  # label, uuid, log_epoch, seq, chain_head
if _CHECKPOINT_MESSAGE.size != 84:
    raise ImportError("checkpoint layout drifted from docs/statefs.md")


class CheckpointBody(NamedTuple):
    chain_head: bytes
    public_key: bytes
    signature: bytes


def checkpoint_message(device_uuid: bytes, log_epoch: int, seq: int, chain_head: bytes) -> bytes:
    """The bytes keystored signs (under CHECKPOINT_SIGN_LABEL) for a checkpoint
    record with sequence number ``seq``."""
    return _CHECKPOINT_MESSAGE.pack(CHECKPOINT_MESSAGE_LABEL, device_uuid, log_epoch, seq, chain_head)


def encode_checkpoint(body: CheckpointBody) -> bytes:
    return _CHECKPOINT.pack(*body)


def decode_checkpoint(payload: bytes) -> CheckpointBody:
    if len(payload) != _CHECKPOINT.size:
        raise ValueError(f"CHECKPOINT payload is {len(payload)} bytes, expected {_CHECKPOINT.size}")
    return CheckpointBody._make(_CHECKPOINT.unpack(payload))


def chain_hash(commit_record: bytes) -> bytes:
    """Hash of a COMMIT record (its 64-byte header and payload): the next
    COMMIT's prev_hash."""
    return hashlib.sha256(commit_record).digest()


# --------------------------------------------------------------- encryption
#
# With encryption on, every PAYLOAD record's payload is
# XChaCha20-Poly1305(key, nonce, plaintext chunk, aad) = ciphertext || 16-byte tag,
# and the record carries FLAG_SEALED. PREPARE, DELETE, COMMIT and ABORT stay
# plaintext (paths, sizes and txn structure are not secret in format 2).

KEY_DESCRIPTOR_V1 = "device-key-v1"
RECORD_KEY_LABEL = "statefs.record.v1"   # keystored label for the payload key
SEAL_AAD_LABEL = b"statefs.seal.v2\x00"
_NONCE = struct.Struct("<8sQHIBx")        # salt[0:8], txn_id, op_index, chunk_index, type, 0
_AAD = struct.Struct("<16s16sBQHI8sI")    # label, uuid, type, txn_id, op_index, chunk_index, path_hash, payload_len
if _NONCE.size != 24 or _AAD.size != 59:
    raise ImportError("seal layout drifted from docs/statefs.md")


KEY_CHECK_LABEL = b"statefs.keycheck.v2\x00"


def key_check(key: bytes, device_uuid: bytes, salt: bytes) -> bytes:
    """16 bytes that tell a wrong payload key from a right one at mount:
    keyed BLAKE2b (key = the payload key) over label || uuid || salt."""
    return hashlib.blake2b(KEY_CHECK_LABEL + device_uuid + salt, key=key, digest_size=16).digest()


def record_key_context(sb: "Superblock") -> bytes:
    """HKDF context for the payload key: ties the key to this image."""
    return sb.device_uuid + sb.salt


def seal_nonce(salt: bytes, txn_id: int, op_index: int, chunk_index: int, rtype: int = PAYLOAD) -> bytes:
    """24-byte nonce; unique per key because txn ids are never reused (invariant 8)."""
    return _NONCE.pack(salt[:8], txn_id, op_index, chunk_index, rtype)


def seal_aad(device_uuid: bytes, rtype: int, txn_id: int, op_index: int, chunk_index: int,
             phash: bytes, payload_len: int) -> bytes:
    """Binds a sealed payload to its record, position and device."""
    return _AAD.pack(SEAL_AAD_LABEL, device_uuid, rtype, txn_id, op_index, chunk_index, phash, payload_len)
