"""backup: a streamed walk of the given paths into a new signed snapshot.

Memory follows the largest directory and the largest file's chunk list,
never the vault: trees are written bottom-up as each directory ends, the
parent snapshot is read one directory at a time beside the walk, and only
a bounded set of recently seen chunk IDs is remembered. Nothing is visible
until the last transaction writes the snapshot record and counts its root;
a crash before it leaves stored objects that a re-run reuses.
"""

from __future__ import annotations

import fnmatch
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass, field

from pyfastcdc import FastCDC

from statefsd.errors import InvalidArgument, KeyUnavailable, NotFound
from statefsd.vault import records as rec
from statefsd.vault import tree
from statefsd.vault.history import HistoryWriter
from statefsd.vault.objects import MissingObjects, ObjectStore
from statefsd.vault.progress import Progress
from statefsd.vault.vault import Vault

WHOLE_FILE_READ = 8 << 20
RETRIES = 5       # a prune beside the backup collected what it meant to reuse: store it again


@dataclass
class BackupStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0              # file bytes in the snapshot
    read_bytes: int = 0         # file bytes actually read (changed or new files)
    unchanged_files: int = 0
    added: int = 0
    modified: int = 0
    deleted: int = 0
    skipped: list[str] = field(default_factory=list)


def _read_up_to(f, limit: int) -> bytes:
    parts, left = [], limit
    while left:
        part = f.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


class _PathNode:
    """The given paths as a tree: inner names lead to them, targets are backed up whole."""

    def __init__(self) -> None:
        self.children: dict[bytes, _PathNode] = {}
        self.target = False


def _path_tree(paths: list[str]) -> _PathNode:
    root = _PathNode()
    for path in paths:
        absolute = os.fsencode(os.path.abspath(path))
        if not os.path.lexists(absolute):
            raise NotFound(f"{path}: no such file or directory", hint="check the path to back up")
        node = root
        for part in [p for p in absolute.split(b"/") if p]:
            node = node.children.setdefault(part, _PathNode())
        if node is root:
            raise InvalidArgument("backing up / as a whole is not supported", hint="name the directories under it")
        node.target = True
    return root


class Backup:
    def __init__(self, vault: Vault, paths: list[str], *, excludes: list[str] = (), tags: list[str] = (),
                 parent: dict | None = None, progress: Progress | None = None) -> None:
        if not paths:
            raise InvalidArgument("nothing to back up", hint="name at least one PATH")
        if vault.device is None:
            raise KeyUnavailable("a backup is signed by this device's key, and no keystored was given",
                                 hint="start keystored and set $STATEFS_KEYSTORE_SOCKET (or --keystore-socket)")
        self.vault = vault
        for p in paths:
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(f"{p!r}: a path to back up must be valid UTF-8 (names below it may be anything)",
                                      hint="back up the directory above it") from None
        self.paths = sorted(os.path.abspath(p) for p in paths)
        self.excludes = list(excludes)
        self.tags = sorted(tags)
        self.parent = parent if parent is not None else self._find_parent()
        self.progress = progress or Progress(None)
        self.stats = BackupStats()
        c = vault.config["chunker"]
        self.chunker = FastCDC(c["avg"], min_size=c["min"], max_size=c["max"], normalized_chunking=1,
                               seed=vault.keys.chunker_seed)

    def _find_parent(self) -> dict | None:
        host = socket.gethostname()
        same = [s for s in self.vault.snapshots() if s.get("host") == host and s.get("paths") == self.paths]
        return same[-1] if same else None

    def _estimate_total(self) -> None:
        """On a terminal, a walk beside the backup gives the bar its total (and an ETA)."""
        total = 0
        for top in self.paths:
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = [d for d in dirnames if not self._excluded(os.fsencode(os.path.join(dirpath, d)))]
                for name in filenames:
                    path = os.path.join(dirpath, name)
                    if not self._excluded(os.fsencode(path)):
                        try:
                            total += os.lstat(path).st_size
                        except OSError:
                            pass
            self.progress.set_total(total)

    def run(self) -> dict:
        started = time.time()
        if self.progress.visible:
            threading.Thread(target=self._estimate_total, name="vault-estimate", daemon=True).start()
        snapshot_id = os.urandom(rec.SNAPSHOT_ID_BYTES)
        self.snap_time = time.time_ns()
        with self.vault.start_session("backup") as session:
            self.session = session
            self.store: ObjectStore = self.vault.objects(session.id, pipelined=True)
            self.history = HistoryWriter(self.vault, snapshot_id, self.snap_time)
            try:
                root = self._directory(_path_tree(self.paths), b"", self.parent["root"] if self.parent else None)
                self.store.flush()
            finally:
                self.store.close()
            self.history.flush()
            snap = {"id": snapshot_id, "time": self.snap_time, "host": socket.gethostname(),
                    "device": self.vault.device.id, "paths": self.paths, "tags": self.tags, "root": root,
                    "parent": self.parent["id"] if self.parent else None,
                    "stats": {"files": self.stats.files, "dirs": self.stats.dirs, "bytes": self.stats.bytes,
                              "new_bytes": self.store.stats.new_bytes,
                              "stored_bytes": self.store.stats.stored_bytes}}
            snap["sig"] = self.vault.device.sign(rec.snapshot_signed_bytes(self.vault.vault_id, snap))
            name = rec.snapshot_key(snapshot_id)
            self.store.change_count(root, +1, [self.vault.record_op(name, snap)], [(name, 0)])
        self.progress.done()
        s, w = self.stats, self.store.stats
        return {"snapshot": snapshot_id.hex(), "parent": snap["parent"].hex() if snap["parent"] else None,
                "root": root.hex(), "files": s.files, "dirs": s.dirs, "symlinks": s.symlinks, "bytes": s.bytes,
                "read_bytes": s.read_bytes, "unchanged_files": s.unchanged_files, "added": s.added,
                "modified": s.modified, "deleted": s.deleted, "new_objects": w.new_objects,
                "new_bytes": w.new_bytes, "stored_bytes": w.stored_bytes, "transactions": w.txns,
                "conflicts_retried": w.conflicts, "skipped": s.skipped,
                "seconds": round(time.time() - started, 3)}

    # ------------------------------------------------------------ walk

    def _excluded(self, path: bytes) -> bool:
        text = os.fsdecode(path)
        base = os.path.basename(text)
        return any(fnmatch.fnmatch(text, p) or fnmatch.fnmatch(base, p) for p in self.excludes)

    def _parent_entries(self, tree_id: bytes | None) -> dict[bytes, rec.Entry]:
        if tree_id is None:
            return {}
        return {e.name: e for e in tree.iter_directory(self.store, tree_id)}

    def _directory(self, spec: _PathNode | None, path: bytes, parent_tree: bytes | None) -> bytes:
        """Back up one directory; ``spec`` limits it to the given paths (the
        directories above them), None backs up everything in it."""
        old = self._parent_entries(parent_tree)
        if spec is not None and not spec.target:
            names = sorted(spec.children)
        else:
            try:
                names = sorted(os.fsencode(e.name) for e in os.scandir(path or b"/"))
            except OSError as exc:
                self._skip(path, exc)
                names = []
        entries: list[rec.Entry] = []
        for name in names:
            child_path = path + b"/" + name
            if self._excluded(child_path):
                continue
            child_spec = spec.children.get(name) if spec is not None and not spec.target else None
            entry = self._entry(child_path, name, old.get(name), child_spec)
            if entry is not None:
                entries.append(entry)
        present = {e.name for e in entries}
        if spec is None or spec.target:
            for name, gone in old.items():
                if name not in present and not self._excluded(path + b"/" + name):
                    self._deleted(path + b"/" + name, gone)
        self.stats.dirs += 1
        if parent_tree is not None and entries == list(old.values()):
            # Unchanged since the parent snapshot: its tree is stored and counted
            # already; the new parent node counts one more reference to it.
            return parent_tree
        return self._store_directory(path, entries)

    def _entry(self, path: bytes, name: bytes, old: rec.Entry | None, spec: _PathNode | None) -> rec.Entry | None:
        self.session.beat(force=False)
        try:
            st = os.lstat(path)
        except OSError as exc:
            self._skip(path, exc)
            return None
        base = dict(name=name, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                    mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, inode=st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            old_tree = old.content if old is not None and old.type == rec.DIR else None
            tree_id = self._directory(spec, path, old_tree)
            return rec.Entry(type=rec.DIR, size=0, content=tree_id, content_kind=rec.KIND_NODE, target=None, **base)
        if spec is not None and not spec.target:
            self._skip(path, "not a directory any more")
            return None
        if stat.S_ISREG(st.st_mode):
            self.stats.files += 1
            if (old is not None and old.type == rec.FILE and old.size == st.st_size
                    and old.mtime_ns == st.st_mtime_ns and old.ctime_ns == st.st_ctime_ns and old.inode == st.st_ino):
                self.stats.unchanged_files += 1
                self.stats.bytes += old.size
                self.progress.advance(files=1, bytes=old.size)
                return rec.Entry(type=rec.FILE, size=old.size, content=old.content, content_kind=old.content_kind,
                                 target=None, **base)
            got = self._file(path)
            if got is None:
                return None
            content, kind, size = got
            entry = rec.Entry(type=rec.FILE, size=size, content=content, content_kind=kind, target=None, **base)
            self._changed(path, old, entry)
            return entry
        if stat.S_ISLNK(st.st_mode):
            self.stats.symlinks += 1
            entry = rec.Entry(type=rec.SYMLINK, size=0, content=None, content_kind=0, target=os.readlink(path),
                              **base)
            if old is None or old.type != rec.SYMLINK or old.target != entry.target:
                self._changed(path, old, entry)
            return entry
        if stat.S_ISFIFO(st.st_mode):
            return rec.Entry(type=rec.FIFO, size=0, content=None, content_kind=0, target=None, **base)
        self._skip(path, "sockets and device nodes are not backed up")
        return None

    def _file(self, path: bytes) -> tuple[bytes | None, int, int] | None:
        lost: list[bytes] = []
        for _ in range(RETRIES):
            chunks = self._read_chunks(path)
            if chunks is None:
                return None
            try:
                content, kind = tree.store_file_chunks(self.store, chunks)
            except MissingObjects as gone:
                lost = gone.ids
                self.store.forget_known(lost)          # a prune took them meanwhile: store them again
                continue
            size = sum(n for _, n in chunks)
            self.stats.bytes += size
            self.stats.read_bytes += size
            self.progress.advance(files=1)
            return content, kind, size
        raise MissingObjects(lost)

    def _read_chunks(self, path: bytes) -> list[tuple[bytes, int]] | None:
        chunks: list[tuple[bytes, int]] = []
        try:
            with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb", buffering=0) as f:
                # A small file is read in one call: most files are small, and
                # a stream per file costs more than the chunking.
                size = os.fstat(f.fileno()).st_size
                pieces = None
                if size < WHOLE_FILE_READ:
                    whole = _read_up_to(f, size + 1)
                    if len(whole) <= size:
                        pieces = self.chunker.cut_buf(whole)
                    else:
                        f.seek(0)          # it grew while we read it: take it as a stream
                for chunk in pieces if pieces is not None else self.chunker.cut_stream(f):
                    cid = self.store.chunk_id(chunk.data)
                    self.store.add_chunk(cid, chunk.data)
                    chunks.append((cid, chunk.length))
                    self.progress.advance(bytes=chunk.length)
                    self.session.beat(force=False)        # a long file must not make the session look dead
        except OSError as exc:
            self._skip(path, exc)
            return None
        return chunks

    def _store_directory(self, path: bytes, entries: list[rec.Entry]) -> bytes:
        for _ in range(RETRIES):
            try:
                return tree.store_directory(self.store, entries)
            except MissingObjects as gone:
                # A prune collected something this directory reuses while the
                # backup ran: store it again from the files themselves.
                lost = set(gone.ids)
                self.store.forget_known(lost)
                redone = []
                for e in entries:
                    if e.content in lost:
                        e = self._entry(path + b"/" + e.name, e.name, None, None)
                    if e is not None:
                        redone.append(e)
                entries = redone
        return tree.store_directory(self.store, entries)

    # ------------------------------------------------------------ history

    def _changed(self, path: bytes, old: rec.Entry | None, new: rec.Entry) -> None:
        if old is None or old.type != new.type:
            self.stats.added += 1
            self.history.event(path, "add", new)
        else:
            self.stats.modified += 1
            self.history.event(path, "modify", new)

    def _deleted(self, path: bytes, old: rec.Entry) -> None:
        if old.type == rec.DIR and old.content is not None:
            for sub, entry in tree.walk(self.store, old.content, path):
                if entry.type != rec.DIR:
                    self.stats.deleted += 1
                    self.history.event(sub, "delete", entry)
        else:
            self.stats.deleted += 1
            self.history.event(path, "delete", old)

    def _skip(self, path: bytes, why) -> None:
        self.stats.skipped.append(f"{os.fsdecode(path)}: {why}")
        self.progress.warn(f"skipped {os.fsdecode(path)}: {why}")
