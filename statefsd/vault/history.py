"""Every file operation, kept in StateFS transactions under keyed path IDs.

Each added, modified or deleted file of a backup becomes one sealed event
under ``vault/h/<path id>/<snapshot id>``: the commit hash chain makes the
history tamper-evident, and no key name reveals a path. An event counts
only once its snapshot record exists (a crashed backup's events are never
shown); a forgotten snapshot's events stay, marked as such.
"""

from __future__ import annotations

import os

from statefsd.vault import kv as kvmod
from statefsd.vault import records as rec
from statefsd.vault.vault import Vault

BATCH = 120


class HistoryWriter:
    def __init__(self, vault: Vault, snapshot_id: bytes, time_ns: int) -> None:
        self.vault = vault
        self.snapshot_id = snapshot_id
        self.time_ns = time_ns
        self.ops: list[tuple] = []

    def event(self, path: bytes, op: str, entry: rec.Entry) -> None:
        name = rec.history_key(self.vault.keys.path_id(path), self.snapshot_id)
        self.ops.append(self.vault.record_op(name, {
            "op": op, "path": path, "time": self.time_ns, "device": self.vault.device.id,
            "snapshot": self.snapshot_id, "type": entry.type, "size": entry.size, "mtime_ns": entry.mtime_ns,
            "content": entry.content}))
        if len(self.ops) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if self.ops:
            self.vault.kv.apply(self.ops)
            self.ops = []


def file_log(vault: Vault, path: str) -> list[dict]:
    """Every recorded version of one path, oldest first."""
    absolute = os.fsencode(os.path.abspath(path))
    prefix = rec.history_prefix(vault.keys.path_id(absolute))
    snaps: dict[bytes, dict | None] = {}
    out = []
    for name in kvmod.iter_keys(vault.kv, prefix):
        got = vault.read_record(name)
        if got is None:
            continue
        event = got[0]
        if not isinstance(event, dict) or event.get("path") != absolute:
            continue
        sid = event.get("snapshot")
        if sid not in snaps:
            snaps[sid] = vault.snapshot_at(rec.snapshot_key(sid)) if isinstance(sid, bytes) else None
        snap = snaps[sid]
        if snap is None:
            continue            # the backup that wrote it never committed
        event["forgotten"] = bool(snap.get("forgotten"))
        out.append(event)
    out.sort(key=lambda e: e["time"])
    return out
