"""The three stores behind one shape: ``spec.open()`` in the worker process
returns a session whose ``commit(items)`` makes one durable transaction.

Specs are plain picklable values so worker processes can open their own
connection (no handle ever crosses a fork).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass


@dataclass(frozen=True)
class StateFSSpec:
    socket: str
    label: str = "statefs"

    def open(self):
        from statefsd.client import Client

        client = Client(self.socket)
        client.connect()
        return _StateFSSession(client)


class _StateFSSession:
    def __init__(self, client) -> None:
        self.client = client

    def commit(self, items: list[tuple[str, bytes]]) -> None:
        if len(items) == 1:
            self.client.put(*items[0])
        else:
            self.client.apply([("put", key, value) for key, value in items])

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class SQLiteSpec:
    path: str
    label: str = "sqlite"

    def prepare(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.unlink(self.path + suffix)
        db = self._connect()
        db.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BLOB NOT NULL)")
        db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=120)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # fsync the WAL on every commit: durable
        return db

    def open(self):
        return _SQLiteSession(self._connect())


class _SQLiteSession:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def commit(self, items: list[tuple[str, bytes]]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", items)
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


@dataclass(frozen=True)
class LMDBSpec:
    path: str
    label: str = "lmdb"
    map_size: int = 8 << 30

    def prepare(self) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
        os.makedirs(self.path)

    def open(self):
        import lmdb

        return _LMDBSession(lmdb.open(self.path, map_size=self.map_size, sync=True, metasync=True))


class _LMDBSession:
    def __init__(self, env) -> None:
        self.env = env

    def commit(self, items: list[tuple[str, bytes]]) -> None:
        with self.env.begin(write=True) as txn:
            for key, value in items:
                txn.put(key.encode(), value)

    def close(self) -> None:
        self.env.close()
