"""Snapshot trees: directories and files as nodes of at most FANOUT items.

A directory of more than FANOUT entries, or a file of more than FANOUT
chunks, becomes pages under list nodes (a B-tree without keys): every node
is small, and creating one counts all its children in one transaction.
"""

from __future__ import annotations

from typing import Iterator

from statefsd.errors import IntegrityError
from statefsd.vault import records as rec
from statefsd.vault.objects import ObjectStore


def store_paged(store: ObjectStore, leaf: str, upper: str, items: list) -> bytes:
    """Store ``items`` as one leaf node, or as leaf pages under list nodes."""
    level = [store.create_node(leaf, items[i:i + rec.FANOUT]) for i in range(0, max(len(items), 1), rec.FANOUT)]
    while len(level) > 1:
        level = [store.create_node(upper, level[i:i + rec.FANOUT]) for i in range(0, len(level), rec.FANOUT)]
    return level[0]


def store_directory(store: ObjectStore, entries: list[rec.Entry]) -> bytes:
    entries = sorted(entries, key=lambda e: e.name)
    return store_paged(store, rec.TREE, rec.TREELIST, [e.encode() for e in entries])


def store_file_chunks(store: ObjectStore, chunks: list[tuple[bytes, int]]) -> tuple[bytes | None, int]:
    """A file's content reference: (None, 0) when empty, the chunk itself when
    there is one, else a chunk-list node."""
    if not chunks:
        return None, 0
    if len(chunks) == 1:
        return chunks[0][0], rec.KIND_CHUNK
    return store_paged(store, rec.CHUNKS, rec.CHUNKLIST, [[cid, size] for cid, size in chunks]), rec.KIND_NODE


def iter_directory(store: ObjectStore, tree_id: bytes) -> Iterator[rec.Entry]:
    """A directory's entries in name order, one page in memory at a time."""
    for raw in _iter_paged(store, tree_id, rec.TREE, rec.TREELIST):
        yield rec.Entry.decode(raw)


def iter_file_chunks(store: ObjectStore, entry: rec.Entry) -> Iterator[tuple[bytes, int]]:
    """(chunk id, size) of a file's content in order."""
    if entry.content is None:
        return
    if entry.content_kind == rec.KIND_CHUNK:
        yield entry.content, entry.size
        return
    for cid, size in _iter_paged(store, entry.content, rec.CHUNKS, rec.CHUNKLIST):
        yield cid, size


def _iter_paged(store: ObjectStore, oid: bytes, leaf: str, upper: str, depth: int = 0) -> Iterator:
    if depth > 8:
        raise IntegrityError(f"node {oid.hex()[:16]}: list nodes nested deeper than any vault writes")
    tag, items = store.read_node(oid)
    if tag == leaf:
        yield from items
    elif tag == upper:
        for child in items:
            yield from _iter_paged(store, child, leaf, upper, depth + 1)
    else:
        raise IntegrityError(f"node {oid.hex()[:16]} is a {tag!r} where a {leaf!r} belongs",
                             hint="run `statefs vault check`")


def find_entry(store: ObjectStore, root: bytes, path: bytes) -> rec.Entry | None:
    """The entry at ``path`` (b"a/b/c", relative to the snapshot root)."""
    parts = [p for p in path.split(b"/") if p]
    tree = root
    entry = None
    for i, part in enumerate(parts):
        entry = next((e for e in iter_directory(store, tree) if e.name == part), None)
        if entry is None:
            return None
        if i < len(parts) - 1:
            if entry.type != rec.DIR:
                return None
            tree = entry.content
    return entry


def walk(store: ObjectStore, tree_id: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, rec.Entry]]:
    """Every (path, entry) below a tree, depth first, parents before children."""
    for entry in iter_directory(store, tree_id):
        path = prefix + b"/" + entry.name if prefix else entry.name
        yield path, entry
        if entry.type == rec.DIR and entry.content is not None:
            yield from walk(store, entry.content, path)
