"""Drive durable transactions from one or many client processes.

Every client is its own process (multiprocessing, fork) that opens its own
connection, warms up, waits at a barrier with the others, then commits for
a fixed time (or a fixed count), timing every commit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from array import array

KEYSPACE = 1000   # keys per client: values are overwritten, like a live store


def percentile(sorted_values, q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def run_worker(spec, worker: int, value_size: int, puts_per_txn: int, *, duration: float | None = None,
               count: int | None = None, stop=None, barrier=None, warmup: int = 2,
               keyspace: int = KEYSPACE) -> dict:
    """One client's loop until ``duration``, ``count`` or the ``stop`` event;
    returns commit start times and latencies (seconds, time.monotonic)."""
    session = spec.open()
    value = os.urandom(value_size)
    starts, lats = array("d"), array("d")
    n = 0

    def batch() -> list[tuple[str, bytes]]:
        base = n * puts_per_txn
        return [(f"w{worker}/k{(base + j) % keyspace}", value) for j in range(puts_per_txn)]

    try:
        for _ in range(warmup):
            session.commit(batch())
        if barrier is not None:
            barrier.wait()
        began = time.monotonic()
        end = began + duration if duration is not None else float("inf")
        while True:
            t0 = time.monotonic()
            if t0 >= end or (count is not None and n >= count) or (stop is not None and stop.is_set()):
                break
            session.commit(batch())
            t1 = time.monotonic()
            starts.append(t0)
            lats.append(t1 - t0)
            n += 1
        elapsed = (starts[-1] + lats[-1] - began) if n else 0.0
    finally:
        session.close()
    return {"txns": n, "elapsed": elapsed, "starts": starts.tobytes(), "lats": lats.tobytes()}


def child_main(queue, *args, **kw) -> None:
    """Process target: run_worker's result (or its error) onto ``queue``."""
    try:
        queue.put(run_worker(*args, **kw))
    except BaseException as exc:  # report it rather than hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_clients(spec, *, clients: int, value_size: int, puts_per_txn: int = 1,
                duration: float | None = None, count: int | None = None,
                keyspace: int = KEYSPACE) -> list[dict]:
    """Run ``clients`` processes at once; the raw per-client results."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    barrier = ctx.Barrier(clients)
    procs = [ctx.Process(target=child_main, args=(queue, spec, w, value_size, puts_per_txn),
                         kwargs={"duration": duration, "count": count, "barrier": barrier,
                                 "keyspace": keyspace})
             for w in range(clients)]
    for p in procs:
        p.start()
    timeout = (duration or 0) + 300
    try:
        results = [queue.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    return [unpack(r, spec.label) for r in results]


def unpack(result: dict, label: str) -> dict:
    if "error" in result:
        raise RuntimeError(f"{label}: client failed: {result['error']}")
    result["starts"] = array("d", result["starts"])
    result["lats"] = array("d", result["lats"])
    return result


def summarize(results: list[dict], *, value_size: int, puts_per_txn: int) -> dict:
    """Aggregate throughput (sum of per-client rates) and latency percentiles."""
    txns = sum(r["txns"] for r in results)
    rate = sum(r["txns"] / r["elapsed"] for r in results if r["elapsed"] > 0)
    lats = sorted(x for r in results for x in r["lats"])
    return {
        "clients": len(results), "value_bytes": value_size, "puts_per_txn": puts_per_txn,
        "txns": txns, "seconds": round(max(r["elapsed"] for r in results), 4),
        "txn_per_s": round(rate, 2), "puts_per_s": round(rate * puts_per_txn, 2),
        "mb_per_s": round(rate * puts_per_txn * value_size / 1e6, 3),
        "p50_us": round(percentile(lats, 0.50) * 1e6, 1), "p99_us": round(percentile(lats, 0.99) * 1e6, 1),
        # A store whose waiting clients sleep (SQLite's busy handler) can keep
        # its p99 below its mean: the tail past p99 shows what the p99 hides.
        "mean_us": round(sum(lats) / len(lats) * 1e6, 1) if lats else None,
        "p999_us": round(percentile(lats, 0.999) * 1e6, 1), "max_us": round(lats[-1] * 1e6, 1) if lats else None,
    }


def prefill(spec, *, clients: int, value_size: int, keyspace: int = KEYSPACE) -> None:
    """Write every key the clients will touch, so the measured commits
    overwrite a steady-state store (in every store alike) instead of growing
    its index while they run."""
    session = spec.open()
    value = os.urandom(value_size)
    try:
        for worker in range(clients):
            for base in range(0, keyspace, 100):
                session.commit([(f"w{worker}/k{i}", value) for i in range(base, min(base + 100, keyspace))])
    finally:
        session.close()


def measure(spec, **kw) -> dict:
    if kw.get("count") is None:  # timed runs measure the steady state; bulk (counted) runs ingest
        prefill(spec, clients=kw["clients"], value_size=kw["value_size"], keyspace=kw.get("keyspace", KEYSPACE))
    results = run_clients(spec, **kw)
    return summarize(results, value_size=kw["value_size"], puts_per_txn=kw.get("puts_per_txn", 1))
