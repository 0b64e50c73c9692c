"""Workload (g): compaction write amplification and what compaction does to
a client's commit latency.

One statefsd with an audit journal. A loader client keeps overwriting a
live set of 4 KiB values with 100-put transactions, so the daemon compacts
again and again on its own; a probe client commits one 100-byte put at a
time. A probe commit is "during compaction" when it overlaps a compaction's
window: the journal's compaction line gives the end, its stats the length
(see _windows()). "Idle" is the same probe with no loader and no compaction.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp
import os
import time

from bench.lab import Lab
from bench.load import KEYSPACE, child_main, percentile, run_clients, run_worker, summarize, unpack
from bench.params import Params

LIVE_VALUE = 4096
PROBE_VALUE = 100


def _audit_events(path: str, event: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if record.get("event") == event:
                out.append(record)
    return out


def _monotonic_of(ts: str, offset: float) -> float:
    wall = dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()
    return wall - offset


def compaction(lab: Lab, p: Params, progress) -> dict:
    with lab.statefs(image_size=p.compaction_image, name="compact", audit=True) as (spec, daemon):
        audit = lab.path("compact.audit")
        progress("compaction: preloading the live set")
        keys = p.compaction_live_keys
        run_worker(spec, 0, LIVE_VALUE, 100, count=-(-keys // 100), warmup=0, keyspace=keys)
        run_worker(spec, 1, PROBE_VALUE, 100, count=KEYSPACE // 100, warmup=0)  # the probe's keys
        progress("compaction: idle probe")
        idle = summarize(run_clients(spec, clients=1, value_size=PROBE_VALUE, duration=p.duration),
                         value_size=PROBE_VALUE, puts_per_txn=1)  # keys exist: no prefill needed
        progress(f"compaction: probe under a loader, until {p.compaction_rounds} compactions")
        loaded, loader, events, timed_out = _under_load(spec, audit, p)
    windows, window_source = _windows(events)
    during, others = [], []
    for t0, lat in zip(loaded["starts"], loaded["lats"]):
        hit = any(t0 <= w_end and t0 + lat >= w_start for w_start, w_end in windows)
        (during if hit else others).append(lat)
    during.sort()
    others.sort()
    stats = [e["fields"] for e in events]
    live = sum(s["live_bytes"] for s in stats)
    written = sum(s["log_after"] for s in stats)
    p99_during = percentile(during, 0.99) * 1e6 if during else None
    return {
        "live_keys": p.compaction_live_keys, "live_value_bytes": LIVE_VALUE, "image_bytes": p.compaction_image,
        "compactions": len(stats), "compaction_stats": stats, "timed_out": timed_out,
        "window_source": window_source,
        "write_amplification": round(written / live, 4) if live else None,
        "idle_probe": idle,
        "loader": summarize([loader], value_size=LIVE_VALUE, puts_per_txn=100),
        "p99_idle_us": idle["p99_us"],
        "p99_during_compaction_us": round(p99_during, 1) if p99_during is not None else None,
        "during_compaction_samples": len(during),
        "during_compaction_latencies_us": [round(x * 1e6, 1) for x in during],
        "p99_loaded_outside_compaction_us": round(percentile(others, 0.99) * 1e6, 1),
        "p99_during_vs_idle": round(p99_during / idle["p99_us"], 3) if p99_during and idle["p99_us"] else None,
    }


def _windows(events: list[dict]) -> tuple[list[tuple[float, float]], str]:
    """Each compaction's (start, end) in time.monotonic terms. The journal
    line marks the end; its length comes from the stats: the whole run
    (duration_ms) if the engine reports it, else the pause in which commits
    wait (pause_ms), else only the instant it ended."""
    offset = time.time() - time.monotonic()
    windows, source = [], "end"
    for event in events:
        end = _monotonic_of(event["ts"], offset)
        fields = event["fields"]
        source = next((k for k in ("duration_ms", "pause_ms") if k in fields), "end")
        span = fields[source] / 1000 if source != "end" else 0.0
        windows.append((end - span, end))
    return windows, source


def _under_load(spec, audit: str, p: Params) -> tuple[dict, dict, list[dict], bool]:
    """Loader and probe processes until enough compactions (or a deadline)."""
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    probe_q, loader_q = ctx.Queue(), ctx.Queue()
    together = ctx.Barrier(2)  # the probe must be committing before the first compaction
    probe = ctx.Process(target=child_main, args=(probe_q, spec, 1, PROBE_VALUE, 1),
                        kwargs={"stop": stop, "warmup": 0, "barrier": together})
    loader = ctx.Process(target=child_main, args=(loader_q, spec, 0, LIVE_VALUE, 100),
                         kwargs={"stop": stop, "warmup": 0, "barrier": together,
                                 "keyspace": p.compaction_live_keys})
    probe.start()
    loader.start()
    deadline = time.monotonic() + max(60.0, p.compaction_rounds * 30.0)
    timed_out = False
    try:
        while len(_audit_events(audit, "compaction")) < p.compaction_rounds:
            if time.monotonic() > deadline or not loader.is_alive():
                timed_out = True
                break
            time.sleep(0.05)
        stop.set()
        result = unpack(probe_q.get(timeout=120), "compaction probe")
        load = unpack(loader_q.get(timeout=120), "compaction loader")
    finally:
        stop.set()
        for proc in (probe, loader):
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return result, load, _audit_events(audit, "compaction"), timed_out
