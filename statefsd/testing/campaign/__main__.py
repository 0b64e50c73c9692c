"""scripts/powerloss-campaign: cut the power after every write of every workload and check recovery.

    scripts/powerloss-campaign [--long] [--seed N] [--workers N] [--model SPEC] [--repro CODE]

The last line of a run is always ``crash states: N, violations: V``; the
exit status is 1 when V > 0 (each violation prints a one-line reproduction
command) or when the campaign itself failed on a run (CAMPAIGN ERROR), 2 on
a usage error. ``--repro CODE`` rebuilds one crash state from
its code and narrates its recovery. docs/crash-model.md describes the model.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from dataclasses import replace

from statefsd.errors import StateFSError
from statefsd.testing.simdev import CrashModel

from statefsd.testing.campaign import fsckhook
from statefsd.testing.campaign.repro import Code
from statefsd.testing.campaign.runner import Result, Settings, Task, execute, reproduce
from statefsd.testing.campaign.variants import SYSTEMS
from statefsd.testing.campaign.workloads import WORKLOADS

DEFAULT_SEEDS = 11              # per workload: about 130,000 crash states, under 5 minutes on 2 idle cores
LONG_SEEDS = 40
LONG = dict(limit=96, extra=8, second_every=1, second_limit=12, second_extra=3, fsck_every=1)
SHOWN_VIOLATIONS = 20
HEARTBEAT_SECONDS = 30.0        # progress line interval when stdout is not a terminal (CI logs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="powerloss-campaign", description=__doc__.split("\n\n")[0])
    p.add_argument("--long", action="store_true", help="nightly depth: more seeds, more outcomes per "
                   "crash point, a second power cut inside every recovery, fsck on every state")
    p.add_argument("--seed", type=int, default=1, help="first workload seed (default 1)")
    p.add_argument("--seeds", type=int, help=f"seeds per workload (default {DEFAULT_SEEDS}, --long {LONG_SEEDS})")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--model", default=CrashModel().spec(),
                   help="crash model: 'none' or a comma list of atomic_sectors, in_order, garbage, "
                        "reorder, tear (default: %(default)s, the most adversarial disk)")
    p.add_argument("--workload", action="append", choices=sorted(WORKLOADS), metavar="NAME",
                   help="run only this workload (repeatable); see --list")
    p.add_argument("--system", default="engine", choices=sorted(SYSTEMS),
                   help="system under test: the engine, or a deliberately broken variant")
    p.add_argument("--repro", metavar="CODE", help="rebuild and check the one crash state CODE names")
    p.add_argument("--list", action="store_true", help="list workloads and systems, then exit")
    p.add_argument("--heartbeat", type=float, default=HEARTBEAT_SECONDS, metavar="SECONDS",
                   help="when stdout is not a terminal, print a progress line this often "
                        "(default %(default)g; on a terminal a progress bar is shown instead)")
    return p


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.workers < 1 or (args.seeds is not None and args.seeds < 1):
        cli.error("--workers and --seeds must be at least 1")
    if args.heartbeat <= 0:
        cli.error("--heartbeat must be a positive number of seconds")
    try:
        if args.list:
            return list_plugins()
        if args.repro:
            return run_repro(Code.parse(args.repro))
        model = CrashModel.from_spec(args.model)
    except StateFSError as exc:
        print(f"powerloss-campaign: {exc.message}", file=sys.stderr)
        return 2
    settings = Settings(system=args.system, model=model.spec())
    if args.long:
        settings = replace(settings, **LONG)
    seeds = args.seeds or (LONG_SEEDS if args.long else DEFAULT_SEEDS)
    names = args.workload or sorted(WORKLOADS)
    tasks = [Task(name, seed, WORKLOADS[name].settings(settings))
             for seed in range(args.seed, args.seed + seeds) for name in names
             if seed < args.seed + workload_seeds(WORKLOADS[name], args)]
    print(f"power-loss campaign: system {args.system}; {model.describe()}")
    print(f"{len(names)} workloads x {seeds} seeds (from {args.seed}); {settings.limit} outcomes per crash "
          f"point (+{settings.extra} byte cuts); second cut every {settings.second_every or 'no'} points; "
          f"{args.workers} workers")
    for name in names:
        wl = WORKLOADS[name]
        if wl.outcomes is not None or workload_seeds(wl, args) != seeds:
            st = wl.settings(settings)
            print(f"  {name}: {workload_seeds(wl, args)} seeds, {st.limit} outcomes per crash point "
                  f"(+{st.extra} byte cuts) (a costly workload)")
    print(fsckhook.NOTE)
    sys.stdout.flush()
    started = time.perf_counter()
    if sys.stdout.isatty():
        results = execute(tasks, args.workers, progress(len(tasks)))
    else:
        with Heartbeat(len(tasks), args.heartbeat) as beat:
            results = execute(tasks, args.workers, beat.on_result)
    return report(results, time.perf_counter() - started)


class Heartbeat:
    """Off a terminal (CI logs, a pipe), a line every ``interval`` seconds, so
    a ten-minute run is visibly alive and its pace can be read from the log."""

    def __init__(self, total: int, interval: float) -> None:
        self.total, self.interval = total, interval
        self.runs = self.states = self.violations = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def on_result(self, r: Result) -> None:
        with self._lock:
            self.runs += 1
            self.states += r.states + r.second
            self.violations += len(r.violations)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                line = (f"progress: {self.runs}/{self.total} runs, {self.states:,} crash states, "
                        f"{self.violations} violations, {time.monotonic() - self._started:.0f} s elapsed")
            print(line, flush=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def workload_seeds(wl, args) -> int:
    """Seeds for one workload: --seeds if given; else the campaign's default, or a costly
    workload's own (scaled up for --long like the default)."""
    if args.seeds:
        return args.seeds
    if wl.seeds is None:
        return LONG_SEEDS if args.long else DEFAULT_SEEDS
    return wl.seeds * LONG_SEEDS // DEFAULT_SEEDS if args.long else wl.seeds


def progress(total: int):
    """A per-run callback drawing a rich progress bar (stdout is a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), transient=True)
    task = bar.add_task("", total=total)
    states = [0, 0]

    def on_result(r: Result) -> None:
        if not bar.live.is_started:
            bar.start()
        states[0] += r.states + r.second
        states[1] += len(r.violations)
        bar.update(task, advance=1, description=f"{states[0]:,} states, {states[1]} violations")
        if bar.finished:
            bar.stop()
    return on_result


def report(results: list[Result], wall: float) -> int:
    per: dict[str, list[Result]] = {}
    for r in results:
        per.setdefault(r.workload, []).append(r)
    rows = [("workload", "runs", "ops", "1 cut", "2 cuts", "cpu s", "violations")]
    for name in sorted(per):
        rs = per[name]
        rows.append((name, str(len(rs)), str(sum(r.ops for r in rs)), str(sum(r.states for r in rs)),
                     str(sum(r.second for r in rs)), f"{sum(r.cpu_seconds for r in rs):.1f}",
                     str(sum(len(r.violations) for r in rs))))
    print_table(rows)
    violations = sorted(v for r in results for v in r.violations)
    first = sum(r.states for r in results)
    second = sum(r.second for r in results)
    cpu = sum(r.cpu_seconds for r in results)
    by_inv = Counter(inv for _, inv, _ in violations)
    print(f"{first:,} states after one cut, {second:,} after a second cut during recovery; "
          f"wall {wall:.1f} s, worker cpu {cpu:.1f} s")
    counts = Counter()
    for r in results:
        counts.update(r.counts)
    if counts:
        print("vault checks: " + "; ".join(f"{name} {n:,}" for name, n in sorted(counts.items())))
    if violations:
        print("violations by invariant: " + ", ".join(f"({k}) {n}" for k, n in sorted(by_inv.items())))
        for code, inv, message in violations[:SHOWN_VIOLATIONS]:
            print(f"VIOLATION ({inv}) {message}")
            print(f"  reproduce: {Code.parse(code).command()}")
        if len(violations) > SHOWN_VIOLATIONS:
            print(f"... and {len(violations) - SHOWN_VIOLATIONS} more")
    errors = [r for r in results if r.error]
    for r in errors:
        print(f"CAMPAIGN ERROR in {r.workload} seed {r.seed} (a harness bug; no verdict for this run): {r.error}")
    print(f"crash states: {first + second}, violations: {len(violations)}")
    return 1 if violations or errors else 0


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Columns as wide as their widest cell: names left, numbers right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        print(" ".join(cells).rstrip())


def run_repro(code: Code) -> int:
    if code.system not in SYSTEMS or code.workload not in WORKLOADS:
        print(f"powerloss-campaign: unknown system or workload in {code.text()!r} (see --list)", file=sys.stderr)
        return 2
    print(f"reproducing {code.text()}")
    violations = reproduce(code, lambda line: print(f"  {line}"))
    for v in violations:
        print(f"VIOLATION ({v.invariant}) {v.message}")
    print(f"crash states: {2 if code.second else 1}, violations: {len(violations)}")
    return 1 if violations else 0


def list_plugins() -> int:
    width = max(map(len, [*WORKLOADS, *SYSTEMS]))
    print("workloads:")
    for name, wl in sorted(WORKLOADS.items()):
        print(f"  {name:{width}}  {wl.doc}")
    print("systems:")
    for name, cls in sorted(SYSTEMS.items()):
        print(f"  {name:{width}}  {cls.description}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
