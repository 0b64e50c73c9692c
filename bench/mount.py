"""Workload (e): mount time against history length, before and after
compaction, measured in-process with statefsd.storage.engine.Engine.

Every history overwrites the same 1000 keys, so after compaction the live
state is identical whatever the history length: a mount that then still
grows with history would be paying for history it no longer has. All
histories use the same image size, so a mount cost that scales with the
region size shows up equally in every row.

A history too long to build through commits within the budget (the 1M one
on a slow or busy machine) is built with the engine's own group writer
instead: GROUP_TXNS one-put transactions per write group (each still its
own PREPARE, PAYLOAD and COMMIT records, txn ids and hash chain), so the
build is not paced by one flush per handful of commits. The mount then
replays the same records, in fewer, larger groups; the row says which
build it had.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time

from bench.lab import Lab
from bench.params import Params
from bench.procs import fresh_image
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine, Mutation, validate_mutations
from statefsd.storage.groupcommit import Request

KEYS = 1000
VALUE = b"v" * 16
TXN_BYTES = 320       # log bytes one 16-byte put transaction takes, with margin
WRITERS = 128         # threads committing at once: the engine groups them (group commit)
GROUP_TXNS = 256      # transactions per write group in a grouped build


def image_size_for(txns: int) -> int:
    # The log must stay under 3/4 of one region (half the image), or the
    # engine would compact on its own and erase the history being measured.
    need = txns * TXN_BYTES * 2 * 4 // 3 + (16 << 20)
    return max(64 << 20, -(-need // (64 << 20)) * (64 << 20))


def build_history(image: str, txns: int) -> float:
    """Commit ``txns`` one-put transactions from WRITERS threads; seconds taken."""
    engine = Engine.mount(FileDevice(image))
    epoch = engine.sb.log_epoch
    tickets = itertools.count()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            while (n := next(tickets)) < txns:
                engine.commit([Mutation("put", f"key/{n % KEYS}", VALUE)])
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    began = time.monotonic()
    threads = [threading.Thread(target=writer) for _ in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    compacted = engine.sb.log_epoch != epoch  # a compaction starts a new log epoch
    engine.close()
    if errors:
        raise errors[0]
    if compacted:
        raise RuntimeError("the engine compacted while building the history; image too small")
    return elapsed


def build_grouped(image: str, txns: int) -> float:
    """The same history, written GROUP_TXNS transactions per group by the
    engine's group writer (holding the writer role, as a commit leader
    does); seconds taken."""
    engine = Engine.mount(FileDevice(image))
    epoch = engine.sb.log_epoch
    began = time.monotonic()
    try:
        for first in range(0, txns, GROUP_TXNS):
            batch = [Request(validate_mutations([Mutation("put", f"key/{n % KEYS}", VALUE)]))
                     for n in range(first, min(first + GROUP_TXNS, txns))]
            with engine.role.exclusive():
                left = engine._write_group(batch)
            failed = [req.error for req in batch if req.error is not None]
            if left or failed:
                raise RuntimeError(f"grouped build stopped at txn {first}: {failed[:1] or 'group too large'}")
        elapsed = time.monotonic() - began
        compacted = engine.sb.log_epoch != epoch
    finally:
        engine.close()
    if compacted:
        raise RuntimeError("the engine compacted while building the history; image too small")
    return elapsed


def time_mount(image: str, repeats: int) -> tuple[float, dict]:
    """Median seconds of a read-write mount (what statefsd does), and the replay summary."""
    times = []
    summary: dict = {}
    for _ in range(repeats):
        began = time.monotonic()
        engine = Engine.mount(FileDevice(image))
        times.append(time.monotonic() - began)
        summary = engine.replay_summary
        engine.close()
    return statistics.median(times), summary


def compact(image: str) -> tuple[dict, float]:
    engine = Engine.mount(FileDevice(image))
    try:
        began = time.monotonic()
        stats = engine.compact()
        return stats, time.monotonic() - began
    finally:
        engine.close()


def mount_vs_history(lab: Lab, p: Params, progress) -> dict:
    rows = []
    notes = []
    size = image_size_for(max(p.mount_histories))
    rate = None
    for wanted in p.mount_histories:
        txns, build, how = wanted, build_history, f"commits from {WRITERS} threads"
        # Bigger histories build more slowly (and the machine is noisy): project with a margin.
        if rate is not None and wanted / (rate * 0.8) > p.mount_build_budget:
            build, how = build_grouped, f"engine group writer, {GROUP_TXNS} txns per group"
            notes.append(f"a history of {wanted} txns would take ~{wanted / rate:.0f}s to build through "
                         f"commits (budget {p.mount_build_budget:.0f}s); built with the {how}")
        image = lab.path("mount.img")
        progress(f"mount: building {txns} txns ({how})")
        fresh_image(image, size)
        build_s = build(image, txns)
        rate = txns / build_s if build is build_history else rate
        if build_s > p.mount_build_budget:
            notes.append(f"building {txns} txns took {build_s:.0f}s, over the {p.mount_build_budget:.0f}s budget")
        repeats = 3 if txns <= 100_000 else 1
        progress(f"mount: {txns} txns before compaction")
        before, replay = time_mount(image, repeats)
        stats, compact_s = compact(image)
        progress(f"mount: {txns} txns after compaction")
        after, _ = time_mount(image, 3)
        rows.append({
            "requested_txns": wanted, "txns": txns, "build": how, "build_s": round(build_s, 3),
            "build_txn_per_s": round(txns / build_s, 1), "mount_before_s": round(before, 5),
            "mount_after_s": round(after, 5), "replayed_txns": replay.get("committed_txns"),
            "compaction_s": round(compact_s, 4), "compaction": stats,
        })
    return {"keys": KEYS, "value_bytes": len(VALUE), "image_bytes": size, "writers": WRITERS,
            "page_cache": "warm (the image was just written)", "histories": rows,
            "largest_history": rows[-1]["txns"], "notes": notes}
