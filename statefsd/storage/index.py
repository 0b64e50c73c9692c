"""The in-memory index: where the newest committed value of each key lives.

A mounted image keeps one entry per live key in memory, so the cost of an
entry is what bounds how many keys one statefsd can serve (the vault puts
millions of chunk keys into one image). A dataclass per key with a tuple of
chunk tuples costs about 350 bytes of RSS per key; nearly all of it is
Python object overhead, not information.

The writer puts the PAYLOAD records of one value back to back (one
transaction is one block of records), each chunk CHUNK_SIZE bytes but the
last, so a value's location is four numbers: the txn id, the value size,
the offset of its first PAYLOAD record and whether it is sealed. Every
payload length and every other offset follows from them (replay accepts no
other payload length). So ``KeyIndex`` keeps a plain ``dict[bytes, int]``
whose value packs those four numbers into one Python int (48 bytes with its
header for any txn id below 2**77), and stores an ``Entry`` object only for
what does not fit: chunks that are not where that layout puts them, or an
offset past 2**OFFSET_BITS. Readers get ``Entry`` values either way,
decoded on access.

Thread safety is the engine's (engine.py, rules C1-C3): only the writer-role
holder changes an index; readers look a key up with one dict operation and
decode their own copy of the packed value, so a reader never sees half an
update.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass

from statefsd.storage import format as fmt


@dataclass(frozen=True)
class Entry:
    """Where the newest committed value of a path lives."""

    txn_id: int
    size: int
    chunks: tuple[tuple[int, int], ...]   # (record offset, payload_len) per chunk
    sealed: bool = False


# Packed layout, low bits first: sealed (1 bit), size (SIZE_BITS), offset
# of the first PAYLOAD record (OFFSET_BITS), txn id (the rest: a Python int
# has no top). Size 0 means no chunk at all (an empty value); the offset is
# then 0.
SIZE_BITS = 24                  # 0 .. MAX_VALUE_BYTES
OFFSET_BITS = 48                # 256 TiB of device
_SIZE_SHIFT = 1
_OFFSET_SHIFT = _SIZE_SHIFT + SIZE_BITS
_TXN_SHIFT = _OFFSET_SHIFT + OFFSET_BITS
_SIZE_MASK = (1 << SIZE_BITS) - 1
_OFFSET_MASK = (1 << OFFSET_BITS) - 1
_OFFSET_LIMIT = 1 << OFFSET_BITS
assert fmt.MAX_VALUE_BYTES <= _SIZE_MASK


def chunk_layout(size: int, offset: int, sealed: bool) -> tuple[tuple[int, int], ...]:
    """The (offset, payload_len) of each chunk of a ``size``-byte value whose
    PAYLOAD records lie back to back from ``offset``, as the writer puts them."""
    tag = fmt.SEAL_OVERHEAD if sealed else 0
    if size <= fmt.CHUNK_SIZE:
        return ((offset, size + tag),) if size else ()
    last = (size - 1) // fmt.CHUNK_SIZE
    stride = fmt.HEADER_SIZE + fmt.CHUNK_SIZE + tag
    return (*[(offset + n * stride, fmt.CHUNK_SIZE + tag) for n in range(last)],
            (offset + last * stride, size - last * fmt.CHUNK_SIZE + tag))


def pack(txn_id: int, size: int, chunks, sealed: bool) -> int | Entry:
    """The stored form of an entry: one int when it fits the packed layout,
    else the Entry itself. ``chunks`` is a sequence of (offset, payload_len)."""
    if txn_id >= 0 and 0 <= size <= _SIZE_MASK:
        offset = chunks[0][0] if chunks else 0
        if len(chunks) == 1:    # nearly every value: checked without building the layout
            fits = 0 < size <= fmt.CHUNK_SIZE and chunks[0][1] == (size + fmt.SEAL_OVERHEAD if sealed else size)
        else:
            fits = tuple(chunks) == chunk_layout(size, offset, sealed)
        if fits and 0 <= offset < _OFFSET_LIMIT:
            return (txn_id << _TXN_SHIFT) | (offset << _OFFSET_SHIFT) | (size << _SIZE_SHIFT) | bool(sealed)
    return Entry(txn_id, size, tuple(chunks), bool(sealed))


def unpack(stored: int | Entry) -> Entry:
    """The Entry a stored value stands for."""
    if type(stored) is not int:
        return stored
    sealed = bool(stored & 1)
    size = (stored >> _SIZE_SHIFT) & _SIZE_MASK
    return Entry(stored >> _TXN_SHIFT, size, chunk_layout(size, (stored >> _OFFSET_SHIFT) & _OFFSET_MASK, sealed),
                 sealed)


def _size(stored: int | Entry) -> int:
    return (stored >> _SIZE_SHIFT) & _SIZE_MASK if type(stored) is int else stored.size


class KeyIndex(MutableMapping):
    """path -> Entry, stored packed (see the module docstring). Also keeps
    ``value_bytes``, the sum of the sizes of the values it points at (the
    live bytes compaction's policy weighs against the log)."""

    __slots__ = ("_stored", "value_bytes")

    def __init__(self, entries: Iterable[tuple[bytes, Entry]] = ()) -> None:
        self._stored: dict[bytes, int | Entry] = {}
        self.value_bytes = 0
        for path, entry in entries:
            self[path] = entry

    # -- writes (the writer role's, engine.py C1) ------------------------------

    def put(self, path: bytes, txn_id: int, size: int, chunks, sealed: bool) -> None:
        """Point ``path`` at a value without building an Entry first (replay's path)."""
        old = self._stored.get(path)
        self._stored[path] = pack(txn_id, size, chunks, sealed)
        self.value_bytes += size - (0 if old is None else _size(old))

    def __setitem__(self, path: bytes, entry: Entry) -> None:
        self.put(path, entry.txn_id, entry.size, entry.chunks, entry.sealed)

    def discard(self, path: bytes) -> None:
        """Forget ``path`` if it is there."""
        old = self._stored.pop(path, None)
        if old is not None:
            self.value_bytes -= _size(old)

    def __delitem__(self, path: bytes) -> None:
        if path not in self._stored:
            raise KeyError(path)
        self.discard(path)

    # -- reads (any thread, engine.py C3: one dict operation each) -------------

    def get(self, path: bytes, default=None) -> Entry | None:
        stored = self._stored.get(path)
        return default if stored is None else unpack(stored)

    def __getitem__(self, path: bytes) -> Entry:
        return unpack(self._stored[path])

    def txn_id(self, path: bytes) -> int | None:
        """The txn id that wrote ``path`` (None: absent), without decoding the rest."""
        stored = self._stored.get(path)
        if stored is None:
            return None
        return stored >> _TXN_SHIFT if type(stored) is int else stored.txn_id

    def __contains__(self, path: object) -> bool:
        return path in self._stored

    def __len__(self) -> int:
        return len(self._stored)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._stored)

    def paths(self) -> list[bytes]:
        """Every path, taken at one instant (a single dict operation)."""
        return list(self._stored)

    def items(self) -> Iterator[tuple[bytes, Entry]]:
        return ((path, unpack(stored)) for path, stored in self._stored.items())

    def values(self) -> Iterator[Entry]:
        return (unpack(stored) for stored in self._stored.values())

    def sizes(self) -> Iterator[tuple[bytes, int]]:
        """(path, value size) per key, without decoding whole entries."""
        return ((path, _size(stored)) for path, stored in self._stored.items())

    # -- compaction's snapshot ---------------------------------------------------

    def copy(self) -> KeyIndex:
        """An independent index with the same entries (the packed values are
        immutable and shared: a copy costs one dict of references)."""
        twin = KeyIndex()
        twin._stored = self._stored.copy()
        twin.value_bytes = self.value_bytes
        return twin

    def changes_since(self, earlier: KeyIndex) -> tuple[list[tuple[bytes, Entry]], list[bytes]]:
        """What was put and what was deleted since ``earlier`` (a copy of this
        index): ([(path, entry), ...], [path, ...]). Entries compare by value;
        every commit gives its entries a new txn id, so a key written again
        never compares equal to its earlier entry."""
        before, now = earlier._stored, self._stored
        put = [(path, unpack(stored)) for path, stored in now.items() if before.get(path) != stored]
        deleted = [path for path in before if path not in now]
        return put, deleted

    def __repr__(self) -> str:
        return f"KeyIndex({len(self._stored)} keys, {self.value_bytes} value bytes)"
