"""scripts/bench [--quick] [--json PATH] [--only LETTERS] [--dir DIR] [--keep] [--vault-mb MB]
                    [--replica-mb MIB] [--replica-segment-size SIZE]

Runs every workload side by side in one run, on one disk, at one durability
(every commit durable before it returns), prints tables and optionally
writes every raw figure, the ratios and the targets as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import time
import traceback

from rich.console import Console

from bench import compaction, fsck, memory, mount, replica, report, throughput, vault
from bench.lab import Lab, same_fs_tmpdir
from bench.params import FULL, QUICK

# letter, JSON key, function(lab, params, progress); (e) runs last because it
# runs engine threads in this process and the others fork client processes.
WORKLOADS = [
    ("a", "a_single_client", throughput.single_client),
    ("b", "b_concurrent_clients", throughput.many_clients),
    ("c", "c_100_puts_per_txn", throughput.batched),
    ("d", "d_bulk_1mib", throughput.bulk),
    ("f", "f_fsck", fsck.fsck_rate),
    ("g", "g_compaction", compaction.compaction),
    ("h", "h_memory", memory.memory),
    ("v", "v_vault", vault.vault),
    ("r", "r_replica", replica.replica),
    ("e", "e_mount", mount.mount_vs_history),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny counts (checks the bench works)")
    parser.add_argument("--json", metavar="PATH", help="write every figure, ratio and target here")
    parser.add_argument("--only", metavar="LETTERS", default="abcdefghvr",
                        help="run only these workloads, e.g. 'ae' (default: all of abcdefghvr)")
    parser.add_argument("--dir", help="parent directory for the scratch files (default: a temp dir on "
                                      "the repository's file system)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--vault-mb", type=int, metavar="MB",
                        help="backup data for (v), version 1 (default: 500, --quick: 8)")
    parser.add_argument("--replica-mb", type=int, metavar="MIB",
                        help="data replicated and restored in (r), in MiB (default: 1024, --quick: 2)")
    parser.add_argument("--replica-segment-size", metavar="SIZE",
                        help="segment size of the replica in (r), e.g. 4M (default: the product's, 1M)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = set(args.only) - {letter for letter, _, _ in WORKLOADS}
    if unknown:
        build_parser().error(f"unknown workload letters: {''.join(sorted(unknown))}")
    params = QUICK if args.quick else FULL
    if args.vault_mb is not None:
        if args.vault_mb < 1:
            build_parser().error("--vault-mb must be at least 1")
        params = dataclasses.replace(params, vault_bytes=args.vault_mb * 1_000_000)
    if args.replica_mb is not None:
        if args.replica_mb < 1:
            build_parser().error("--replica-mb must be at least 1")
        params = dataclasses.replace(params, replica_bytes=args.replica_mb << 20)
    if args.replica_segment_size is not None:
        params = dataclasses.replace(params, replica_segment=args.replica_segment_size)
    out, err = Console(width=None if sys.stdout.isatty() else 120), Console(stderr=True)
    lab = Lab(same_fs_tmpdir(args.dir), keep=args.keep)
    began, started = time.monotonic(), dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()
    figures: dict = {}
    failed = False
    try:
        for letter, key, run in WORKLOADS:
            if letter not in args.only:
                continue

            def progress(text: str, letter=letter) -> None:
                err.print(f"[dim]bench {time.monotonic() - began:6.1f}s ({letter}) {text}[/dim]")

            try:
                figures[key] = run(lab, params, progress)
                # A workload that measured some tools but not all says so in "errors".
                failed = failed or bool(isinstance(figures[key], dict) and figures[key].get("errors"))
            except Exception as exc:  # keep going: the other figures are still worth having
                failed = True
                figures[key] = {"error": f"{type(exc).__name__}: {exc}"}
                err.print(traceback.format_exc())
    finally:
        lab.close()
    values = report.ratios(figures)
    doc = {
        "schema": "statefs-bench/1", "mode": params.name, "started": started.isoformat(),
        "seconds": round(time.monotonic() - began, 2),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
                 # Other work on the machine skews absolute numbers; ratios are side by side.
                 "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "notes": ["timed runs prefill every key first, so they measure overwrites of a steady-state "
                  "store (every store alike); bulk (d) writes fresh keys"],
        "params": dataclasses.asdict(params), "scratch_dir": lab.dir, "durability": "every commit durable (fsync/fdatasync) before it returns",
        "figures": figures, "ratios": values, "targets": report.judge(values),
    }
    report.render(doc, out)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=False)
            f.write("\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
