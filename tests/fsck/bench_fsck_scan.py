"""Scan rate of fsck-statefs on a 64 MiB image whose active log region is
full of records (not collected by pytest; run it by hand):

    PYTHONPATH=. .venv/bin/python tests/fsck/bench_fsck_scan.py [--profile] [--dir DIR]

(--dir /dev/shm keeps the disk out of the measurement.)

Prints MB/s for large values (64 KiB chunks), small values (100 bytes) and
an encrypted image checked with the key.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from statefsd.storage.blockdev import FileDevice  # noqa: E402
from statefsd.storage.engine import Mutation  # noqa: E402
from statefsd.errors import NoSpace  # noqa: E402

from fsck_images import fixed_key, make_image, mount  # noqa: E402
from fsck_statefs.check import check  # noqa: E402

SIZE = 64 << 20


def fill(path: str, value_size: int, per_txn: int) -> None:
    """Unique keys until the log is ~95% full (no compaction: all data is live)."""
    n = 0
    with mount(path) as e:
        region = e.info()["log_size"]
        while e.info()["log_used"] < region * 0.95:
            try:
                e.commit([Mutation("put", f"k/{n + i:08d}", os.urandom(value_size)) for i in range(per_txn)])
            except NoSpace:
                break
            n += per_txn


def measure(path: str, key=None, profile: bool = False) -> dict:
    best = None
    for _ in range(5):
        with FileDevice(path, read_only=True) as dev:
            prof = cProfile.Profile() if profile else None
            began = time.perf_counter()
            if prof:
                prof.enable()
            report = check(dev, key_provider=key).report
            if prof:
                prof.disable()
            total = time.perf_counter() - began
        scan = dict(report.scan, total_seconds=total, records=report.summary["records"])
        if best is None or scan["seconds"] < best["seconds"]:
            best = scan
        if prof:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(15)
            profile = False
    return best


def main() -> None:
    profile = "--profile" in sys.argv
    where = sys.argv[sys.argv.index("--dir") + 1] if "--dir" in sys.argv else None
    with tempfile.TemporaryDirectory(dir=where) as d:
        for name, value_size, per_txn, enc in (("large values (64 KiB)", 65536, 8, "off"),
                                               ("small values (100 B)", 100, 128, "off"),
                                               ("encrypted, with key (64 KiB)", 65536, 8, "on")):
            path = make_image(os.path.join(d, "bench.img"), SIZE, encryption=enc)
            fill(path, value_size, per_txn)
            s = measure(path, fixed_key if enc == "on" else None, profile)
            print(f"{name:32} {s['bytes'] / 1e6:7.1f} MB in {s['records']:7d} records: "
                  f"{s['mb_per_s']:7.1f} MB/s (whole check {s['total_seconds']:.3f} s)", flush=True)


if __name__ == "__main__":
    main()
