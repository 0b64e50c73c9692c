"""Workloads (a)-(d): durable commit throughput, StateFS next to its peers."""

from __future__ import annotations

import mmap
import os
import time
from array import array

from bench.lab import Lab, server_info
from bench.load import measure, percentile
from bench.params import Params
from bench.stores import LMDBSpec, SQLiteSpec

SIZES = (100, 4096)
MIB = 1 << 20


def _statefs(lab: Lab, p: Params, *, encrypted: bool = False, redundancy: str = "parity", **kw) -> dict:
    with lab.statefs(encrypted=encrypted, image_size=p.throughput_image, redundancy=redundancy) as (spec, _):
        epoch = server_info(spec)["log_epoch"]
        result = measure(spec, **kw)
        info = server_info(spec)
    # A compaction inside a throughput run would distort it; say so if one happened.
    result["compacted_during_run"] = info["log_epoch"] != epoch
    result["log_used_bytes"] = info["log_used"]
    return result


def _peer(spec, **kw) -> dict:
    spec.prepare()
    return measure(spec, **kw)


def dsync_writes(path: str, *, value_size: int, duration: float, **_ignored) -> dict:
    """The flush limit of one durable commit at a time: back-to-back single
    O_DIRECT|O_DSYNC writes of ``value_size`` rounded up to 512 bytes into
    pre-written space (one device round trip each, no file-system
    metadata), for ``duration`` seconds. Reported in the throughput
    tables' shape (one write = one "txn")."""
    from statefsd.storage.blockdev import create_image

    size = -(-value_size // 512) * 512
    span = 16 * MIB
    if not os.path.exists(path) or os.path.getsize(path) != span:
        create_image(path, span)
    buf = mmap.mmap(-1, max(size, mmap.PAGESIZE))  # page aligned, as O_DIRECT wants
    buf[:size] = os.urandom(size)
    view = memoryview(buf)[:size]
    lats = array("d")
    fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC | os.O_CLOEXEC)
    try:
        offset, began = 0, time.monotonic()
        end = began + duration
        while True:
            t0 = time.monotonic()
            if t0 >= end:
                break
            os.pwritev(fd, [view], offset)
            lats.append(time.monotonic() - t0)
            offset = (offset + size) % span
        elapsed = time.monotonic() - began
    finally:
        os.close(fd)
        view.release()
        buf.close()
    ordered = sorted(lats)
    rate = len(lats) / elapsed
    return {"clients": 1, "value_bytes": size, "puts_per_txn": 1, "txns": len(lats), "seconds": round(elapsed, 4),
            "txn_per_s": round(rate, 2), "puts_per_s": round(rate, 2), "mb_per_s": round(rate * size / 1e6, 3),
            "p50_us": round(percentile(ordered, 0.5) * 1e6, 1), "p99_us": round(percentile(ordered, 0.99) * 1e6, 1)}


def _matrix(lab: Lab, p: Params, *, clients: int, puts_per_txn: int, encrypted_too: bool,
            progress, unprotected_too: bool = False, flush_limit_too: bool = False) -> dict:
    """Every store at every size, in p.rounds rounds that interleave the
    stores: the disk's speed drifts on a shared machine, and interleaving
    spreads that drift over all stores instead of landing on one."""
    runners = {
        "statefs": lambda kw: _statefs(lab, p, **kw),
        "statefs_encrypted": lambda kw: _statefs(lab, p, encrypted=True, **kw),
        # The cost of per-group parity: the same store with redundancy off.
        "statefs_no_redundancy": lambda kw: _statefs(lab, p, redundancy="off", **kw),
        "sqlite": lambda kw: _peer(SQLiteSpec(lab.path("bench.sqlite")), **kw),
        "lmdb": lambda kw: _peer(LMDBSpec(lab.path("bench.lmdb")), **kw),
        # What one durable write at a time can reach on this disk, in the same rounds.
        "disk_dsync_write": lambda kw: dsync_writes(lab.path("dsync.raw"), **kw),
    }
    if not encrypted_too:
        del runners["statefs_encrypted"]
    if not unprotected_too:
        del runners["statefs_no_redundancy"]
    if not flush_limit_too:
        del runners["disk_dsync_write"]
    out: dict = {store: {} for store in runners}
    for size in SIZES:
        kw = dict(clients=clients, value_size=size, puts_per_txn=puts_per_txn, duration=p.duration,
                  keyspace=p.keyspace)
        runs: dict = {store: [] for store in runners}
        for r in range(p.rounds):
            for store, run in runners.items():
                progress(f"{store} {size} B (round {r + 1}/{p.rounds})")
                runs[store].append(run(kw))
        for store, results in runs.items():
            out[store][str(size)] = _median_round(results)
    return out


def _median_round(results: list[dict]) -> dict:
    """The round with the median throughput, plus every round's rate."""
    median = dict(sorted(results, key=lambda r: r["txn_per_s"])[len(results) // 2])
    median["rounds_txn_per_s"] = [r["txn_per_s"] for r in results]
    if "compacted_during_run" in median:
        median["compacted_during_run"] = any(r["compacted_during_run"] for r in results)
    return median


def single_client(lab: Lab, p: Params, progress) -> dict:
    """(a) one client, one put per transaction; the disk's flush limit
    (single O_DSYNC writes of the value's size) in the same rounds."""
    return _matrix(lab, p, clients=1, puts_per_txn=1, encrypted_too=False, progress=progress,
                   unprotected_too=True, flush_limit_too=True)


def many_clients(lab: Lab, p: Params, progress) -> dict:
    """(b) p.clients concurrent client processes, one put per transaction."""
    return _matrix(lab, p, clients=p.clients, puts_per_txn=1, encrypted_too=True, progress=progress)


def batched(lab: Lab, p: Params, progress) -> dict:
    """(c) one client, 100 puts per transaction."""
    return _matrix(lab, p, clients=1, puts_per_txn=100, encrypted_too=False, progress=progress)


def bulk(lab: Lab, p: Params, progress) -> dict:
    """(d) 1 MiB values, plain and encrypted, against write+fsync of the disk."""
    kw = dict(clients=1, value_size=MIB, count=p.bulk_count)
    progress("statefs bulk 1 MiB")
    plain = _statefs(lab, p, **kw)
    progress("statefs encrypted bulk 1 MiB")
    encrypted = _statefs(lab, p, encrypted=True, **kw)
    progress("statefs bulk 1 MiB, redundancy off")
    unprotected = _statefs(lab, p, redundancy="off", **kw)
    progress("disk write+fsync 1 MiB")
    disk = disk_write_fsync(lab.path("disk.raw"), p.bulk_count)
    return {"statefs": plain, "statefs_encrypted": encrypted, "statefs_no_redundancy": unprotected,
            "disk_write_fsync": disk}


def disk_write_fsync(path: str, count: int, size: int = MIB) -> dict:
    """Raw bandwidth of the disk at the same durability: write ``size``
    bytes into pre-written space, fsync, repeat."""
    from statefsd.storage.blockdev import create_image

    create_image(path, count * size)
    block = os.urandom(size)
    lats = array("d")
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        began = time.monotonic()
        for i in range(count):
            t0 = time.monotonic()
            os.pwrite(fd, block, i * size)
            os.fsync(fd)
            lats.append(time.monotonic() - t0)
        elapsed = time.monotonic() - began
    finally:
        os.close(fd)
        os.unlink(path)
    ordered = sorted(lats)
    return {"writes": count, "value_bytes": size, "seconds": round(elapsed, 4),
            "mb_per_s": round(count * size / elapsed / 1e6, 3),
            "p50_us": round(percentile(ordered, 0.5) * 1e6, 1), "p99_us": round(percentile(ordered, 0.99) * 1e6, 1)}
