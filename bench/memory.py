"""Workload (h): statefsd's resident memory with many keys."""

from __future__ import annotations

from bench.lab import Lab, server_info
from bench.load import run_worker
from bench.params import Params

IMAGE_BYTES = 128 << 20
VALUE_BYTES = 100
PUTS_PER_TXN = 100


def memory(lab: Lab, p: Params, progress) -> dict:
    with lab.statefs(image_size=IMAGE_BYTES, name="memory") as (spec, daemon):
        empty = daemon.memory()
        progress(f"memory: loading {p.memory_keys} keys")
        run_worker(spec, 0, VALUE_BYTES, PUTS_PER_TXN, count=-(-p.memory_keys // PUTS_PER_TXN), warmup=0,
                   keyspace=p.memory_keys)
        loaded = daemon.memory()
        keys = server_info(spec)["keys"]
    return {
        "keys": keys, "value_bytes": VALUE_BYTES,
        "rss_empty_bytes": empty["VmRSS"], "rss_bytes": loaded["VmRSS"], "hwm_bytes": loaded["VmHWM"],
        "rss_mib": round(loaded["VmRSS"] / (1 << 20), 2),
        "bytes_per_key": round((loaded["VmRSS"] - empty["VmRSS"]) / keys, 1) if keys else None,
    }
