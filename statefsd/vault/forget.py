"""forget and prune: retention policy, and reclaiming what no snapshot uses.

Neither takes a lock. forget replaces a snapshot record by a tombstone and
counts its root down, in one conditional transaction. prune walks only the
zero-count markers (``vault/z/``), never the whole vault: each garbage
object is deleted and its children counted down in one transaction, so a
prune can stop at any write and a backup can run beside it. Space comes
back when StateFS compacts its log (prune asks for it at the end).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

from statefsd.errors import Conflict, InvalidArgument
from statefsd.vault import kv as kvmod
from statefsd.vault import records as rec
from statefsd.vault.objects import CONFLICT_RETRIES
from statefsd.vault.progress import Progress
from statefsd.vault.vault import Vault

PERIODS = {
    "hourly": "%Y-%m-%d %H",
    "daily": "%Y-%m-%d",
    "weekly": "%G-W%V",
    "monthly": "%Y-%m",
    "yearly": "%Y",
}


@dataclass
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    tags: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly or self.yearly
                    or self.tags)


def choose(snapshots: list[dict], policy: Policy) -> tuple[list[dict], list[dict]]:
    """(keep, forget) per group of (host, paths), newest first, as restic does."""
    if policy.empty():
        raise InvalidArgument("no retention rule given: forget would remove every snapshot",
                              hint="give --keep-last N, --keep-daily N, ... or --keep-tag T")
    groups: dict[tuple, list[dict]] = {}
    for snap in snapshots:
        groups.setdefault((snap["host"], tuple(snap["paths"])), []).append(snap)
    keep, forget = [], []
    for group in groups.values():
        group.sort(key=lambda s: s["time"], reverse=True)
        kept: set[bytes] = {s["id"] for s in group[:policy.last]}
        kept |= {s["id"] for s in group if set(s.get("tags", ())) & set(policy.tags)}
        for period, fmt in PERIODS.items():
            want = getattr(policy, period)
            seen: list[str] = []
            for snap in group:
                if len(seen) >= want:
                    break
                bucket = datetime.fromtimestamp(snap["time"] / 1e9, timezone.utc).strftime(fmt)
                if bucket not in seen:
                    seen.append(bucket)
                    kept.add(snap["id"])
        for snap in group:
            (keep if snap["id"] in kept else forget).append(snap)
    return keep, forget


def forget(vault: Vault, snap: dict) -> bool:
    """Tombstone one snapshot and count its root down, in one transaction.
    False if another forget got there first."""
    name = rec.snapshot_key(snap["id"])
    tombstone = {"id": snap["id"], "time": snap["time"], "host": snap["host"], "paths": snap["paths"],
                 "tags": snap.get("tags", []), "forgotten": time.time_ns()}
    for _ in range(CONFLICT_RETRIES):
        try:
            vault.objects().change_count(snap["root"], -1, [vault.record_op(name, tombstone)],
                                         [(name, snap["_txn"])])
            return True
        except Conflict:
            # Compaction renumbers every key, and another forget may have run:
            # read the record again and go on only if it is still this snapshot.
            snap = vault.snapshot_at(name)
            if snap is None or snap.get("forgotten"):
                return False
    raise Conflict(f"snapshot {name} kept changing while forget ran", hint="run forget again")


@dataclass
class PruneStats:
    collected: int = 0
    freed_bytes: int = 0
    skipped_live: int = 0
    passes: int = 0
    conflicts: int = 0


PRUNE_BATCH = 64


def _collect(vault: Vault, store, batch: list[bytes], live: set[bytes], stats: "PruneStats",
             progress: Progress) -> int:
    def is_live(session: bytes) -> bool:
        if session in live:
            return True
        if vault.session_is_live(session):     # began after this pass listed the sessions
            live.add(session)
            return True
        return False

    collected, freed, left = store.collect_many(batch, is_live)
    stats.freed_bytes += freed
    stats.skipped_live += left
    progress.advance(files=collected, bytes=freed)
    return collected


def prune(vault: Vault, progress: Progress | None = None, compact: bool = True) -> dict:
    progress = progress or Progress(None)
    stats = PruneStats()
    started = time.time()
    with vault.start_session("prune") as session:
        store = vault.objects(session.id)
        while True:
            stats.passes += 1
            live = vault.live_sessions() - {session.id}
            collected_this_pass = 0
            stats.skipped_live = 0
            batch: list[bytes] = []
            for name in kvmod.iter_keys(vault.kv, rec.ZERO_PREFIX):
                batch.append(rec.id_from_key(name, rec.ZERO_PREFIX))
                if len(batch) >= PRUNE_BATCH:
                    collected_this_pass += _collect(vault, store, batch, live, stats, progress)
                    session.beat(force=False)
                    batch = []
            if batch:
                collected_this_pass += _collect(vault, store, batch, live, stats, progress)
            stats.collected += collected_this_pass
            if collected_this_pass == 0:
                break
        stats.conflicts = store.stats.conflicts
        damaged = sorted(oid.hex() for oid in store.damaged)
    compaction = vault.kv.compact() if compact and stats.collected else None
    progress.done()
    return {"collected_objects": stats.collected, "freed_bytes": stats.freed_bytes,
            "left_for_running_backups": stats.skipped_live, "passes": stats.passes,
            "conflicts_retried": stats.conflicts, "damaged_left": damaged, "compaction": compaction,
            "seconds": round(time.time() - started, 3)}
