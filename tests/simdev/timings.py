"""Timings of the simulated device's hot operations (not a test; run by hand).

    PYTHONPATH=. .venv/bin/python tests/simdev/timings.py
"""

from __future__ import annotations

import random
import time

from statefsd.testing.simdev import CrashModel, SimulatedDevice, enumerate_outcomes

MIB = 1 << 20


def per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:9.1f} us"


def main() -> None:
    rng = random.Random(1)
    big = bytearray(8 * MIB)
    print(f"bytearray(8 MiB) copy              {fmt(per_call(lambda: bytearray(big), 200))}")

    dev = SimulatedDevice(8 * MIB)
    block = rng.randbytes(4096)
    offsets = [rng.randrange(0, 8 * MIB // 4096) * 4096 for _ in range(20000)]
    it = iter(offsets)
    print(f"write 4 KiB (pending grows)        {fmt(per_call(lambda: dev.write(next(it), block), 10000))}")
    print(f"flush (128 chunks)                 {fmt(per_call(dev.flush, 1000))}")

    def write_flush():
        dev.write(next(it), block)
        dev.flush()
    print(f"write 4 KiB + flush (COW each)     {fmt(per_call(write_flush, 5000))}")
    print(f"read 512 B                         {fmt(per_call(lambda: dev.read(rng.randrange(16384) * 512, 512), 20000))}")
    print(f"read 4 KiB                         {fmt(per_call(lambda: dev.read(offsets[7], 4096), 20000))}")
    print(f"read 256 KiB (spans chunks)        {fmt(per_call(lambda: dev.read(1 * MIB + 512, 256 * 1024), 2000))}")

    # A typical crash point: a transaction of 8 x 4 KiB log writes plus a superblock write.
    dev = SimulatedDevice(8 * MIB)
    dev.write(0, bytes(4096))
    dev.flush()
    for i in range(8):
        dev.write(2 * MIB + i * 4096, rng.randbytes(4096))
    dev.write(0, rng.randbytes(512))
    point = dev.crash_point()
    print(f"crash_point() snapshot             {fmt(per_call(dev.crash_point, 10000))}")
    outcomes = list(point.outcomes(limit=2000, rng=7))
    start = time.perf_counter()
    for o in outcomes:
        point.device(o, record=False)
    build = (time.perf_counter() - start) / len(outcomes)
    print(f"build crashed device (9 pending)   {fmt(build)}   ({len(outcomes)} outcomes, 8 MiB image)")
    crashed = [point.device(o, record=False) for o in outcomes[:200]]
    start = time.perf_counter()
    for c in crashed:
        c.read(2 * MIB, 64 * 1024)
        c.read(0, 4096)
    print(f"read back 64 KiB + 4 KiB           {fmt((time.perf_counter() - start) / len(crashed))}")
    start = time.perf_counter()
    for o in outcomes[:200]:
        point.device(o).durable_image()
    print(f"build + materialize 8 MiB bytes    {fmt((time.perf_counter() - start) / 200)}")
    start = time.perf_counter()
    n = sum(1 for _ in enumerate_outcomes(point.pending, CrashModel(), limit=2000, rng=3))
    print(f"sample outcome (9 pending)         {fmt((time.perf_counter() - start) / n)}")
    small = point.pending[:3]
    start = time.perf_counter()
    n = sum(1 for _ in enumerate_outcomes(small, CrashModel()))
    print(f"exhaustive outcome (3 pending)     {fmt((time.perf_counter() - start) / n)}   ({n} outcomes)")

    # 64 MiB image: building a crash state must not scale with the image.
    huge = SimulatedDevice(64 * MIB)
    huge.write(32 * MIB, rng.randbytes(8192))
    hpoint = huge.crash_point()
    hout = list(hpoint.outcomes(limit=200, rng=1))
    start = time.perf_counter()
    for o in hout:
        hpoint.device(o)
    print(f"build crashed device, 64 MiB image {fmt((time.perf_counter() - start) / len(hout))}")

    # Campaign walk: record 10,000 ops, then visit every crash point and build one state at each.
    dev = SimulatedDevice(8 * MIB)
    for i in range(10000):
        dev.write((i * 4096) % (8 * MIB), block)
        if i % 4 == 3:
            dev.flush()
    trace = dev.trace
    start = time.perf_counter()
    count = 0
    for cp in trace.crash_points():
        for o in cp.outcomes(limit=4, rng=cp.index):
            cp.device(o, record=False)
            count += 1
    elapsed = time.perf_counter() - start
    print(f"walk {len(trace)} ops, {count} crash states   {elapsed:.2f} s  = {fmt(elapsed / count)} per state")
    start = time.perf_counter()
    trace.replay(upto=len(trace) // 2)
    print(f"replay to op {len(trace) // 2}                {fmt(time.perf_counter() - start)}")


if __name__ == "__main__":
    main()
