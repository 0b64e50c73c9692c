"""Workload (h): statefsd's resident memory with many keys."""

from __future__ import annotations

from bench.lab import Lab, server_info
from bench.load import run_worker
from bench.params import Params

VALUE_BYTES = 100
PUTS_PER_TXN = 100
LOG_BYTES_PER_KEY = 200   # one 100-byte put of a key like "w0/k123456" takes 184 log bytes


def image_size_for(keys: int) -> int:
    # Every key stays live, so the log must hold them all in one region
    # (half the image) and stay under 3/4 of it, where compaction is due.
    need = keys * LOG_BYTES_PER_KEY * 2 * 4 // 3 + (32 << 20)
    return max(128 << 20, -(-need // (64 << 20)) * (64 << 20))


def memory(lab: Lab, p: Params, progress) -> dict:
    with lab.statefs(image_size=image_size_for(p.memory_keys), name="memory") as (spec, daemon):
        empty = daemon.memory()
        progress(f"memory: loading {p.memory_keys} keys")
        run_worker(spec, 0, VALUE_BYTES, PUTS_PER_TXN, count=-(-p.memory_keys // PUTS_PER_TXN), warmup=0,
                   keyspace=p.memory_keys)
        loaded = daemon.memory()
        keys = server_info(spec)["keys"]
    return {
        "keys": keys, "value_bytes": VALUE_BYTES, "image_bytes": image_size_for(p.memory_keys),
        "rss_empty_bytes": empty["VmRSS"], "rss_bytes": loaded["VmRSS"], "hwm_bytes": loaded["VmHWM"],
        "rss_mib": round(loaded["VmRSS"] / (1 << 20), 2),
        "bytes_per_key": round((loaded["VmRSS"] - empty["VmRSS"]) / keys, 1) if keys else None,
    }
