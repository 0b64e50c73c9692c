"""How big each workload is: a smoke run (--quick) or the real one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Params:
    name: str
    duration: float             # seconds of each throughput round
    rounds: int                 # rounds per cell in (a)-(c), the stores interleaved; the median counts
    clients: int                # concurrent client processes in workload (b)
    keyspace: int               # keys each client overwrites in (a)-(c)
    bulk_count: int             # 1 MiB values per bulk measurement (d)
    throughput_image: int       # StateFS image for (a)-(d); big enough never to compact
    mount_histories: tuple[int, ...]
    mount_build_budget: float   # seconds the largest history may take to build (e)
    fsck_image: int             # image filled with 4 KiB values for (f)
    fsck_small_image: int       # image filled with 100-byte values for (f)
    compaction_image: int
    compaction_live_keys: int   # 4 KiB values live during (g)
    compaction_rounds: int      # compactions to sit through in (g)
    memory_keys: int            # keys loaded for the RSS figure (h)
    vault_bytes: int            # generated backup data, version 1 (v)
    replica_bytes: int          # generated data replicated and restored (r)
    replica_lag_runs: int       # small changes timed to the peer, the median counts (r)
    replica_segment: str = "1M"  # segment size of the replica (r): the product's default


QUICK = Params(
    name="quick", duration=0.25, rounds=1, clients=16, keyspace=100, bulk_count=6, throughput_image=64 << 20,
    mount_histories=(1_000, 10_000), mount_build_budget=20.0, fsck_image=16 << 20, fsck_small_image=4 << 20,
    compaction_image=16 << 20, compaction_live_keys=256, compaction_rounds=1, memory_keys=5_000,
    vault_bytes=8_000_000, replica_bytes=2 << 20, replica_lag_runs=3,
)

FULL = Params(
    name="full", duration=1.0, rounds=3, clients=16, keyspace=1000, bulk_count=96, throughput_image=1 << 30,
    mount_histories=(1_000, 100_000, 1_000_000), mount_build_budget=180.0, fsck_image=64 << 20, fsck_small_image=64 << 20,
    compaction_image=128 << 20, compaction_live_keys=2048, compaction_rounds=5, memory_keys=1_000_000,
    vault_bytes=500_000_000, replica_bytes=1 << 30, replica_lag_runs=3,
)
