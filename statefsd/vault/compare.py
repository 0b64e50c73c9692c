"""ls and diff over snapshot trees, one directory in memory at a time."""

from __future__ import annotations

from typing import Iterator

from statefsd.vault import records as rec
from statefsd.vault import tree
from statefsd.vault.objects import ObjectStore

ADDED, REMOVED, MODIFIED, TYPE_CHANGED, METADATA = "+", "-", "M", "T", "U"


def diff(store: ObjectStore, a: bytes | None, b: bytes | None, prefix: bytes = b"") -> Iterator[tuple[str, bytes]]:
    """(change, path) between two trees, restic's letters: + - M T U.
    Identical subtrees (same ID) are skipped without being read."""
    if a == b:
        return
    old = {e.name: e for e in tree.iter_directory(store, a)} if a else {}
    new = {e.name: e for e in tree.iter_directory(store, b)} if b else {}
    for name in sorted(old.keys() | new.keys()):
        path = prefix + b"/" + name
        ea, eb = old.get(name), new.get(name)
        if ea is None or eb is None:
            change, entry = (ADDED, eb) if ea is None else (REMOVED, ea)
            yield change, path
            if entry.type == rec.DIR:
                yield from ((change, p) for p, _ in tree.walk(store, entry.content, path))
            continue
        if ea.type != eb.type:
            yield TYPE_CHANGED, path
            continue
        if ea.type == rec.DIR:
            if _metadata(ea) != _metadata(eb):
                yield METADATA, path
            yield from diff(store, ea.content, eb.content, path)
        elif (ea.content, ea.size, ea.target) != (eb.content, eb.size, eb.target):
            yield MODIFIED, path
        elif _metadata(ea) != _metadata(eb):
            yield METADATA, path


def _metadata(e: rec.Entry) -> tuple:
    return (e.mode, e.uid, e.gid, e.mtime_ns)


def listing(store: ObjectStore, root: bytes, path: bytes = b"") -> Iterator[tuple[bytes, rec.Entry]]:
    """Every (path, entry) of a snapshot, or of the subtree at ``path``."""
    if not path.strip(b"/"):
        yield from ((b"/" + p, e) for p, e in tree.walk(store, root))
        return
    entry = tree.find_entry(store, root, path)
    if entry is None:
        return
    base = b"/" + path.strip(b"/")
    yield base, entry
    if entry.type == rec.DIR:
        yield from ((base + b"/" + p, e) for p, e in tree.walk(store, entry.content))


def entry_json(path: bytes, e: rec.Entry) -> dict:
    return {"path": path.decode(errors="surrogateescape"), "type": {"f": "file", "d": "dir", "l": "symlink",
            "p": "fifo"}[e.type], "size": e.size, "mode": oct(e.mode), "uid": e.uid, "gid": e.gid,
            "mtime_ns": e.mtime_ns, "target": e.target.decode(errors="surrogateescape") if e.target else None}
