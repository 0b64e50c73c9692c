"""The packed in-memory index (statefsd/storage/index.py, docs/DESIGN.md
"The in-memory index"): every field survives packing at its boundaries,
whatever does not fit the packed layout is kept whole, the running sum of
value sizes follows every change, and a real engine serves the same entries
before and after a remount and a compaction."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine
from statefsd.storage.index import OFFSET_BITS, Entry, KeyIndex, chunk_layout, pack, unpack

from tests.engine.conftest import Image

MAX_OFFSET = (1 << OFFSET_BITS) - 1
KEY = bytes(range(32))


def one_chunk(txn_id: int, size: int, offset: int, sealed: bool) -> Entry:
    return Entry(txn_id, size, ((offset, size + (fmt.SEAL_OVERHEAD if sealed else 0)),), sealed)


def back_to_back(txn_id: int, size: int, offset: int, sealed: bool) -> Entry:
    """A value's chunks where the writer puts them: header, payload, header, ..."""
    tag = fmt.SEAL_OVERHEAD if sealed else 0
    chunks, at, left = [], offset, size
    while left:
        piece = min(left, fmt.CHUNK_SIZE)
        chunks.append((at, piece + tag))
        at += piece + tag + fmt.HEADER_SIZE
        left -= piece
    return Entry(txn_id, size, tuple(chunks), sealed)


PACKABLE = [
    back_to_back(txn_id, size, offset, sealed)
    for txn_id in (0, 1, (1 << 64) - 1, 1 << 84, 1 << 200)
    for size in (1, 100, fmt.CHUNK_SIZE, fmt.CHUNK_SIZE + 1, 3 * fmt.CHUNK_SIZE, fmt.MAX_VALUE_BYTES)
    for offset in (0, 8192, MAX_OFFSET)
    for sealed in (False, True)
] + [Entry(txn_id, 0, (), sealed) for txn_id in (0, 7, 1 << 90) for sealed in (False, True)]

TWO = back_to_back(9, fmt.CHUNK_SIZE + 1, 100, False)
UNPACKABLE = {
    "chunks with a gap between them": Entry(9, TWO.size, (TWO.chunks[0], (TWO.chunks[1][0] + 512, 1)), False),
    "chunks in another order": Entry(9, TWO.size, TWO.chunks[::-1], False),
    "a first chunk shorter than a chunk": Entry(9, TWO.size, ((100, 1), (100 + 65, fmt.CHUNK_SIZE)), False),
    "sealed chunks without their tags": Entry(9, 3 * fmt.CHUNK_SIZE, back_to_back(9, 3 * fmt.CHUNK_SIZE, 0, False).chunks,
                                              True),
    "a value larger than any value": back_to_back(9, 1 << 24, 100, False),
    "an offset past the packed width": one_chunk(9, 100, MAX_OFFSET + 1, False),
    "a payload length the size does not imply": Entry(9, 100, ((500, 116),), False),
    "a sealed chunk without its tag": Entry(9, 100, ((500, 100),), True),
    "one chunk larger than a chunk": Entry(9, fmt.CHUNK_SIZE + 1, ((500, fmt.CHUNK_SIZE + 1),), False),
    "a chunk of an empty value": Entry(9, 0, ((500, 0),), False),
    "an empty value without chunks that claims a size": Entry(9, 5, (), False),
    "a negative txn id": one_chunk(-1, 100, 500, False),
    "a negative offset": one_chunk(9, 100, -1, False),
}


@pytest.mark.parametrize("entry", PACKABLE, ids=lambda e: f"txn{e.txn_id}-{e.size}B-at{e.chunks[:1]}-sealed{e.sealed}")
def test_every_field_of_an_entry_whose_chunks_lie_back_to_back_survives_packing_into_one_int(entry):
    stored = pack(entry.txn_id, entry.size, entry.chunks, entry.sealed)
    assert type(stored) is int
    back = unpack(stored)
    assert back == entry and type(back.sealed) is bool and type(back.chunks) is tuple
    assert chunk_layout(entry.size, entry.chunks[0][0] if entry.chunks else 0, entry.sealed) == entry.chunks


@pytest.mark.parametrize("entry", UNPACKABLE.values(), ids=UNPACKABLE.keys())
def test_an_entry_the_packed_layout_cannot_hold_is_kept_whole(entry):
    stored = pack(entry.txn_id, entry.size, entry.chunks, entry.sealed)
    assert type(stored) is Entry and stored == entry
    index = KeyIndex()
    index[b"k"] = entry
    assert index[b"k"] == index.get(b"k") == entry and index.txn_id(b"k") == entry.txn_id
    assert index.value_bytes == entry.size


def test_the_sealed_flag_alone_tells_two_otherwise_equal_entries_apart():
    plain, sealed = one_chunk(5, 100, 4096, False), one_chunk(5, 100, 4096, True)
    index = KeyIndex([(b"plain", plain), (b"sealed", sealed)])
    assert index[b"plain"].sealed is False and index[b"sealed"].sealed is True
    assert index[b"plain"].chunks == ((4096, 100),) and index[b"sealed"].chunks == ((4096, 116),)


def test_an_index_reads_back_what_was_put_and_forgets_what_was_deleted():
    index = KeyIndex()
    entries = {f"k{n}".encode(): e for n, e in enumerate(PACKABLE + list(UNPACKABLE.values()))}
    for path, entry in entries.items():
        index[path] = entry
    assert len(index) == len(entries) and set(index) == set(index.paths()) == set(entries)
    assert dict(index.items()) == entries and index == entries
    assert sorted(index.values(), key=repr) == sorted(entries.values(), key=repr)
    assert dict(index.sizes()) == {path: e.size for path, e in entries.items()}
    gone = sorted(entries)[::3]
    for path in gone[1:]:
        index.discard(path)
    del index[gone[0]]
    index.discard(b"never there")
    with pytest.raises(KeyError):
        del index[gone[0]]
    left = {path: e for path, e in entries.items() if path not in gone}
    assert index == left and all(path not in index and index.get(path) is None for path in gone)
    assert index.txn_id(gone[0]) is None
    assert index.get(gone[0], "absent") == "absent"
    with pytest.raises(KeyError):
        index[gone[0]]


def test_value_bytes_follows_every_put_overwrite_and_delete():
    index = KeyIndex()
    index[b"a"] = one_chunk(1, 100, 0, False)
    index.put(b"b", 2, 3 * fmt.CHUNK_SIZE, [(n * 70_000, fmt.CHUNK_SIZE) for n in range(3)], False)  # whole
    assert index.value_bytes == 100 + 3 * fmt.CHUNK_SIZE
    index[b"a"] = one_chunk(3, 7, 500, True)          # packed over packed
    index[b"b"] = Entry(4, 0, (), False)               # packed over a whole entry
    assert index.value_bytes == 7
    index[b"a"] = UNPACKABLE["chunks with a gap between them"]   # a whole entry over packed
    assert index.value_bytes == fmt.CHUNK_SIZE + 1
    index.discard(b"a")
    index.discard(b"b")
    assert index.value_bytes == 0 and len(index) == 0


def test_a_copy_is_independent_and_changes_since_it_name_every_put_and_delete():
    whole = UNPACKABLE["chunks with a gap between them"]
    index = KeyIndex([(b"same", one_chunk(1, 100, 0, False)), (b"big", whole),
                      (b"rewritten", one_chunk(2, 100, 200, False)), (b"gone", one_chunk(3, 5, 400, False))])
    snapshot = index.copy()
    index[b"rewritten"] = one_chunk(7, 100, 200, False)   # only the txn id differs
    index[b"big"] = Entry(whole.txn_id, whole.size, whole.chunks, whole.sealed)   # equal, not the same object
    index[b"new"] = one_chunk(8, 1, 900, True)
    index.discard(b"gone")
    put, deleted = index.changes_since(snapshot)
    assert sorted(put) == [(b"new", one_chunk(8, 1, 900, True)), (b"rewritten", one_chunk(7, 100, 200, False))]
    assert deleted == [b"gone"]
    assert snapshot[b"rewritten"].txn_id == 2 and b"gone" in snapshot and b"new" not in snapshot
    assert snapshot.value_bytes == 100 + fmt.CHUNK_SIZE + 1 + 100 + 5
    assert index.value_bytes == 100 + fmt.CHUNK_SIZE + 1 + 100 + 1


def test_a_hundred_thousand_keys_cost_well_under_the_dataclass_index():
    paths = [f"w0/k{n:06d}".encode() for n in range(100_000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = KeyIndex()
        for n, path in enumerate(paths):
            index.put(path, 5000 + n // 100, 100, [(8192 + 184 * n, 100)], False)
        per_key = (tracemalloc.get_traced_memory()[0] - before) / len(paths)
    finally:
        tracemalloc.stop()
    # The int (36 bytes asked, 48 allocated) plus the dict's slot (~52 bytes
    # at this fill); the keys existed before. The dataclass index took ~325 (the keys aside).
    assert per_key < 100, per_key


def test_an_engine_serves_the_same_entries_after_a_remount_and_a_compaction(tmp_path):
    img = Image(tmp_path / "sealed.img", 8 << 20)
    with FileDevice(img.path) as dev:
        Engine.mkfs(dev, encryption="on", key_provider=lambda sb: KEY)
    values = {"empty": b"", "one": b"1", "chunk": b"c" * fmt.CHUNK_SIZE, "two": b"t" * (fmt.CHUNK_SIZE + 1),
              "gone": b"g" * 10}
    with img.mount(key_provider=lambda sb: KEY) as e:
        for key, value in values.items():
            e.put(key, value)
        e.delete("gone")
        del values["gone"]
        before = dict(e.index.items())
        assert e.live_bytes == sum(map(len, values.values()))
        # what the writer made packs (its chunks lie back to back), as does what replay reads below
        assert all(type(pack(x.txn_id, x.size, x.chunks, x.sealed)) is int for x in before.values())
    with img.mount(key_provider=lambda sb: KEY) as e:
        assert dict(e.index.items()) == before
        assert {k: e.get(k) for k in e.list()} == values and e.live_bytes == sum(map(len, values.values()))
        assert {p.decode(): entry.sealed for p, entry in before.items()} == {k: bool(v) for k, v in values.items()}
        e.compact()
        assert set(e.index) == set(before) and e.live_bytes == sum(map(len, values.values()))
        assert all(e.index[p].txn_id > before[p].txn_id for p in before)
        assert {k: e.get(k) for k in e.list()} == values
