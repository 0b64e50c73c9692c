"""StateFS benchmark harness.

Runs StateFS (a real statefsd process, through statefsd.client), SQLite
(WAL, synchronous=FULL) and LMDB (sync=True, metasync=True) side by side in
one run, on one disk, every commit durable before it returns, and reports
raw figures plus the ratios the project targets. Entry point: scripts/bench.
"""
