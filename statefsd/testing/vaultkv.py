"""The vault on an in-process engine: its KV protocol, a device key, a fixed world.

The vault normally reaches StateFS through statefsd (``statefsd.vault.kv.ClientKV``);
the power-loss campaign runs the same vault code against an engine mounted on
the simulated device, through :class:`EngineKV`. Every commit goes through a
``commit`` callable, so the campaign's session records each transaction's
submit and ack trace positions exactly as for its own workloads.

A campaign run must write the same bytes every time (a reproduction code
rebuilds a crash state from the seed), but the vault draws IDs, nonces and
salts from ``os.urandom``, stamps records with the clock and the host name,
and stores each file's inode and ctime. :class:`World` gives the vault's
modules, for the duration of a ``with`` block, a seeded ``urandom``, a clock
that starts at a fixed instant and ticks one microsecond per reading, a fixed
host name and pid, and a view of a directory under a fixed virtual path
whose inodes and ctimes are derived from the path and the mtime. Nothing
outside ``statefsd.vault`` sees any of it (the engine keeps the real ``os``).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import stat
import time
import types
from typing import Callable, Iterable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from statefsd.storage.engine import Engine, Mutation
from statefsd.vault import backup, check, forget, history, keys, objects, records, restore, tree, vault
from statefsd.vault.kv import Versioned

from statefsd.testing.campaign.systems import FixedSigner, derive

Commit = Callable[[list[Mutation], list[tuple[str, int]]], int]


class EngineKV:
    """The vault's KV protocol over an engine; ``commit`` defaults to the engine's own."""

    def __init__(self, engine: Callable[[], Engine], commit: Commit | None = None,
                 maintain: Callable[[Callable[[Engine], object]], object] | None = None) -> None:
        self.engine = engine
        self._commit = commit or (lambda mutations, expect: self.engine().commit(mutations, expect))
        self._maintain = maintain or (lambda step: step(self.engine()))

    def mget(self, keys: list[str]) -> list[Versioned | None]:
        return self.engine().get_many(keys)

    def apply(self, ops: Iterable[tuple], expect: Iterable[tuple[str, int]] = ()) -> int | None:
        return self._commit([mutation(op) for op in ops], list(expect))

    def list_page(self, prefix: str, after: str | None, limit: int) -> tuple[list[str], bool]:
        keys = [k for k in self.engine().list(prefix) if after is None or k > after]
        return keys[:limit], len(keys) > limit

    def compact(self) -> dict:
        return self._maintain(lambda engine: engine.compact())

    def verify(self) -> dict:
        raise NotImplementedError("the campaign checks the log itself (invariant 5)")

    def clone(self) -> None:
        """No second connection: the campaign records commits in one order,
        so the vault writes them in line (the same bytes every run)."""
        return None

    def close(self) -> None:
        pass


def mutation(op: tuple) -> Mutation:
    if op[0] == "put":
        return Mutation("put", op[1], bytes(op[2]))
    if op[0] == "delete":
        return Mutation("delete", op[1])
    raise ValueError(f"unknown transaction op {op[0]!r}")


class SplitSnapshotKV(EngineKV):
    """Broken on purpose: a transaction that writes a snapshot record is committed as
    two, the record first and the root's count after it, so a cut between them
    leaves a visible snapshot whose root counts no reference."""

    def apply(self, ops: Iterable[tuple], expect: Iterable[tuple[str, int]] = ()) -> int | None:
        ops, expect = list(ops), list(expect)
        first = [op for op in ops if op[1].startswith(records.SNAPSHOT_PREFIX)]
        if not first or len(first) == len(ops):
            return super().apply(ops, expect)
        names = {op[1] for op in first}
        super().apply(first, [e for e in expect if e[0] in names])
        return super().apply([op for op in ops if op[1] not in names], [e for e in expect if e[0] not in names])


class VaultSigner(FixedSigner):
    """A device for the vault: the campaign's fixed Ed25519 key signs snapshots, and
    ``derive`` stands in for keystored's key derivation (HKDF from a fixed seed)."""

    SEED = derive("vault-device-derive", 32)

    def derive(self, label: str, context: bytes, length: int = 32) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=context,
                    info=b"statefs.campaign.vault/" + label.encode()).derive(self.SEED)


# -- a fixed world for the vault's modules -------------------------------------------------------

VAULT_MODULES = (backup, check, forget, history, keys, objects, records, restore, tree, vault)
VIRTUAL_ROOT = "/statefs-campaign"
EPOCH_NS = 1_700_000_000 * 10**9


class World:
    """While entered, the vault's modules see seeded randomness, a ticking fixed clock
    starting at ``start_ns``, and ``VIRTUAL_ROOT`` as the directory ``real_root``."""

    def __init__(self, seed: int, real_root: str | None = None, start_ns: int = EPOCH_NS) -> None:
        self.rng = random.Random(seed)
        self.now = start_ns
        self.real_root = os.fsencode(real_root) if real_root else None
        self._saved: list[tuple[types.ModuleType, str, object]] = []

    # -- what the vault sees

    def urandom(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def time_ns(self) -> int:
        self.now += 1000
        return self.now

    def time(self) -> float:
        return self.time_ns() / 1e9

    def real(self, path):
        """The real path behind a path under VIRTUAL_ROOT (others are left alone)."""
        raw = os.fsencode(path)
        root = os.fsencode(VIRTUAL_ROOT)
        if self.real_root is not None and (raw == root or raw.startswith(root + b"/")):
            raw = self.real_root + raw[len(root):]
        return raw if isinstance(path, bytes) else os.fsdecode(raw)

    def lstat(self, path):
        st = os.lstat(self.real(path))
        ino = int.from_bytes(hashlib.blake2b(os.fsencode(path), digest_size=6).digest(), "little")
        return types.SimpleNamespace(st_mode=st.st_mode, st_uid=st.st_uid, st_gid=st.st_gid, st_size=st.st_size,
                                     st_mtime_ns=st.st_mtime_ns, st_ctime_ns=st.st_mtime_ns, st_ino=ino)

    def _proxies(self) -> dict[str, object]:
        path = types.SimpleNamespace(**vars(os.path))
        path.lexists = lambda p: os.path.lexists(self.real(p))
        fake_os = types.SimpleNamespace(**vars(os))
        fake_os.path = path
        fake_os.urandom = self.urandom
        fake_os.getpid = lambda: 4242
        fake_os.lstat = self.lstat
        fake_os.scandir = lambda p: os.scandir(self.real(p))
        fake_os.open = lambda p, *a, **k: os.open(self.real(p), *a, **k)
        fake_os.readlink = lambda p: os.readlink(self.real(p))
        fake_time = types.SimpleNamespace(**vars(time))
        fake_time.time_ns = self.time_ns
        fake_time.time = self.time
        fake_socket = types.SimpleNamespace(**vars(socket))
        fake_socket.gethostname = lambda: "campaign-host"
        return {"os": fake_os, "time": fake_time, "socket": fake_socket}

    def __enter__(self) -> "World":
        proxies = self._proxies()
        for module in VAULT_MODULES:
            for name, proxy in proxies.items():
                if name in vars(module):
                    self._saved.append((module, name, vars(module)[name]))
                    setattr(module, name, proxy)
        return self

    def __exit__(self, *exc) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()


# -- source trees ---------------------------------------------------------------------------------

Manifest = dict[str, tuple]     # relative path -> ("d", mode, mtime) | ("f", mode, mtime, bytes) | ("l", target, mtime)


def snapshot_of(root: str) -> Manifest:
    """Everything restore promises to bring back, per relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(path), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_mtime_ns, f.read())
    return out


def materialize(manifest: Manifest, root: str) -> None:
    """Write ``manifest`` under ``root`` (which must be empty), metadata included."""
    for rel, item in sorted(manifest.items()):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if item[0] == "d":
            os.makedirs(path, exist_ok=True)
        elif item[0] == "f":
            with open(path, "wb") as f:
                f.write(item[3])
        else:
            os.symlink(item[1], path)
    for rel, item in sorted(manifest.items(), reverse=True):     # children before their directory
        path = os.path.join(root, rel)
        if item[0] != "l":
            os.chmod(path, item[1])
        os.utime(path, ns=(item[2], item[2]), follow_symlinks=False)
