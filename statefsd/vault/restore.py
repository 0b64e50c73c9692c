"""restore: a snapshot (or part of it) streamed into a directory.

Every chunk is verified (AEAD, then its keyed ID) before a byte of it is
written; a file is written under a temporary name and renamed into place
only when all of it checked out, so a damaged chunk never leaves a file
that looks whole. A damaged file is named and restore goes on with the
rest. Memory is bounded by one batch of chunks (RESTORE_BATCH bytes).
"""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from statefsd.errors import InvalidArgument, NotFound, StateFSError
from statefsd.vault import records as rec
from statefsd.vault import tree
from statefsd.vault.progress import Progress
from statefsd.vault.vault import Vault

RESTORE_BATCH = 8 << 20
TEMP_MARK = b".statefs-restore-"


@dataclass
class RestoreStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    damaged: list[dict] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class Restore:
    def __init__(self, vault: Vault, snap: dict, target: str, subpath: str = "",
                 progress: Progress | None = None) -> None:
        self.vault = vault
        self.store = vault.objects()
        self.snap = snap
        self.target = os.fsencode(os.path.abspath(target))
        self.subpath = os.fsencode(subpath.strip("/")) if subpath else b""
        self.progress = progress or Progress(None)
        self.stats = RestoreStats()
        self.as_root = os.geteuid() == 0

    def run(self) -> dict:
        if not self.subpath:
            self.progress.set_total(int((self.snap.get("stats") or {}).get("bytes", 0)) or None)
        os.makedirs(self.target, exist_ok=True)
        if not self.subpath:
            self._directory(self.snap["root"], self.target)
        else:
            entry = tree.find_entry(self.store, self.snap["root"], self.subpath)
            if entry is None:
                raise NotFound(f"{os.fsdecode(self.subpath)!r} is not in snapshot {self.snap['id'].hex()}",
                               hint=f"list it with `statefs vault ls {self.snap['id'].hex()[:8]}`")
            self._entries([entry], self.target)
        self.progress.done()
        s = self.stats
        return {"snapshot": self.snap["id"].hex(), "target": os.fsdecode(self.target), "files": s.files,
                "dirs": s.dirs, "symlinks": s.symlinks, "bytes": s.bytes, "damaged": s.damaged,
                "failed": s.failed}

    def _directory(self, tree_id: bytes, dest: bytes) -> None:
        try:
            self._entries(tree.iter_directory(self.store, tree_id), dest)
        except StateFSError as exc:           # a damaged page of this directory: the rest of it is lost
            self._damaged({"path": os.fsdecode(dest) + "/", "error": exc.message})

    def _entries(self, entries, dest: bytes) -> None:
        small: list[tuple[rec.Entry, bytes]] = []
        small_bytes = 0
        for entry in entries:
            path = dest + b"/" + entry.name
            if entry.type == rec.FILE and entry.content_kind != rec.KIND_NODE:
                small.append((entry, path))        # one chunk or empty: fetched together
                small_bytes += entry.size
                if small_bytes >= RESTORE_BATCH or len(small) >= 256:
                    self._small_files(small)
                    small, small_bytes = [], 0
                continue
            try:
                if entry.type == rec.DIR:
                    self._mkdir(path)
                    self._directory(entry.content, path)
                    self._set_metadata(path, entry)
                    self.stats.dirs += 1
                elif entry.type == rec.FILE:
                    self._file(entry, path, tree.iter_file_chunks(self.store, entry))
                elif entry.type == rec.SYMLINK:
                    self._symlink(entry, path)
                elif entry.type == rec.FIFO:
                    self._replace(path, lambda tmp: os.mkfifo(tmp, 0o600), entry)
            except OSError as exc:
                self.stats.failed.append(f"{os.fsdecode(path)}: {exc}")
                self.progress.warn(f"could not restore {os.fsdecode(path)}: {exc}")
            except StateFSError as exc:       # a damaged node of this file or directory
                self._damaged({"path": os.fsdecode(path), "error": exc.message})
        if small:
            self._small_files(small)

    def _small_files(self, batch: list[tuple[rec.Entry, bytes]]) -> None:
        wanted = [(e.content, rec.KIND_CHUNK) for e, _ in batch if e.content is not None]
        data = dict(self.store.read_many(wanted)) if wanted else {}
        for entry, path in batch:
            chunks = [] if entry.content is None else [(entry.content, entry.size)]
            try:
                self._file(entry, path, chunks, data)
            except OSError as exc:
                self.stats.failed.append(f"{os.fsdecode(path)}: {exc}")

    def _file(self, entry: rec.Entry, path: bytes, chunks, prefetched: dict | None = None) -> None:
        tmp = self._temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        damaged = None
        written = 0
        try:
            batches = ((batch, prefetched) for batch in _batches(chunks, RESTORE_BATCH)) \
                if prefetched is not None else self._read_ahead(_batches(chunks, RESTORE_BATCH))
            for batch, got in batches:
                for cid, size in batch:
                    data = got.get(cid)
                    if isinstance(data, StateFSError) or data is None or len(data) != size:
                        damaged = {"path": os.fsdecode(path), "chunk": cid.hex(), "offset": written,
                                   "error": data.message if isinstance(data, StateFSError) else "wrong size"}
                        break
                    _write_all(fd, data)
                    written += size
                    self.progress.advance(bytes=size)
                if damaged:
                    break
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        if damaged:
            os.unlink(tmp)
            self._damaged(damaged)
            return
        self._set_metadata(tmp, entry)
        os.rename(tmp, path)
        self.stats.files += 1
        self.stats.bytes += written
        self.progress.advance(files=1)

    def _damaged(self, what: dict) -> None:
        self.stats.damaged.append(what)
        where = f" (chunk {what['chunk'][:16]} at byte {what['offset']})" if "chunk" in what else ""
        self.progress.warn(f"{what['path']}: damaged{where}: {what['error']}; not restored")

    def _read_ahead(self, batches):
        """(batch, its verified chunks), the next batch fetched and verified
        while this one is written: two batches in memory at most."""
        def fetch(batch):
            return dict(self.store.read_many([(cid, rec.KIND_CHUNK) for cid, _ in batch]))
        with ThreadPoolExecutor(1, thread_name_prefix="vault-restore") as pool:
            ahead = None
            for batch in batches:
                future = pool.submit(fetch, batch)
                if ahead is not None:
                    yield ahead[0], ahead[1].result()
                ahead = (batch, future)
            if ahead is not None:
                yield ahead[0], ahead[1].result()

    def _symlink(self, entry: rec.Entry, path: bytes) -> None:
        self._replace(path, lambda tmp: os.symlink(entry.target, tmp), entry)
        self.stats.symlinks += 1

    def _replace(self, path: bytes, make, entry: rec.Entry) -> None:
        tmp = self._temp_name(path)
        make(tmp)
        self._set_metadata(tmp, entry)
        os.rename(tmp, path)

    def _mkdir(self, path: bytes) -> None:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise InvalidArgument(f"{os.fsdecode(path)} exists and is not a directory",
                                      hint="restore into an empty directory") from None

    def _temp_name(self, path: bytes) -> bytes:
        head, _, name = path.rpartition(b"/")
        return head + b"/." + name[:200] + TEMP_MARK + os.urandom(4).hex().encode()

    def _set_metadata(self, path: bytes, entry: rec.Entry) -> None:
        if self.as_root:
            os.lchown(path, entry.uid, entry.gid)
        if entry.type != rec.SYMLINK:
            os.chmod(path, entry.mode)
        os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _batches(chunks, limit: int):
    batch, size = [], 0
    for cid, n in chunks:
        batch.append((cid, n))
        size += n
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
