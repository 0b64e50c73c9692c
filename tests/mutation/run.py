"""scripts/mutation: mutate one module at a time and run a fast test selection
against each mutant.

The working tree is never written. Each worker gets a private copy of the
repository (the files git knows about, as they are in the working tree,
uncommitted edits included) in a temporary directory; a mutant is the
target file of that copy overwritten with the mutated source, and pytest runs
inside the copy with the copy on PYTHONPATH. The copies are deleted on exit,
Ctrl-C and SIGTERM included, and running pytest processes are killed by
their process group.

Outcomes: *killed* (a test failed or the mutant did not import), *timeout*
(the selection ran past the per-mutant limit: counted as killed, reported
separately), *survived*, *flaky* (killed by the broad selection once, but
not when run again: counted as surviving), and *equivalent* (listed in
equivalent.txt; left out of the score).
Score per module = (killed + timeout) / (total - equivalent).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.mutation.mutator import Mutant, mutants, mutated_source
from tests.mutation.targets import TARGETS, Target

REPO = Path(__file__).resolve().parents[2]
EQUIVALENT_FILE = Path(__file__).with_name("equivalent.txt")
PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=")


# ------------------------------------------------------------ equivalents

@dataclass(frozen=True)
class Equivalent:
    module: str
    function: str       # enclosing top-level function or class ("" at module level)
    line: int
    col: int
    desc: str
    source_line: str
    reason: str

    def matches(self, m: Mutant) -> bool:
        # Function, source text and column identify the site even if lines moved.
        return ((m.module, m.function, m.col, m.desc, m.source_line)
                == (self.module, self.function, self.col, self.desc, self.source_line))


_FIELDS = "module | function | line:col | mutation | source line | reason"


def load_equivalents(path: Path = EQUIVALENT_FILE) -> list[Equivalent]:
    """Lines: ``module | function | line:col | mutation | source line | reason``; # starts a comment."""
    out = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in raw.split(" | ")]
        if len(parts) != 6 or not parts[5]:
            raise SystemExit(f"{path}:{n}: want '{_FIELDS}'")
        line, col = (int(x) for x in parts[2].split(":"))
        out.append(Equivalent(parts[0], parts[1], line, col, parts[3], parts[4], parts[5]))
    return out


def classify_equivalents(ms: list[Mutant], eqs: list[Equivalent]) -> tuple[dict[int, Equivalent], list[Equivalent]]:
    """Mutant index -> its entry (each entry claims the one matching mutant
    nearest its line); and the entries of these modules that match no mutant (stale)."""
    found: dict[int, Equivalent] = {}
    stale = []
    modules = {m.module for m in ms}
    for e in eqs:
        if e.module not in modules:
            continue
        candidates = [m for m in ms if e.matches(m) and m.index not in found]
        if not candidates:
            stale.append(e)
            continue
        found[min(candidates, key=lambda m: abs(e.line - m.line)).index] = e
    return found, stale


# ---------------------------------------------------------------- workers

class Sandbox:
    """A private copy of the repository that one mutant at a time is applied to."""

    def __init__(self, root: Path, files: list[str], number: int, stop: threading.Event) -> None:
        self.stop = stop
        self.dir = root / f"repo{number}"
        self.basetemp = root / f"pytest{number}"
        for rel in files:
            src, dst = REPO / rel, self.dir / rel
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        self.proc: subprocess.Popen | None = None

    def run(self, module: str, source: str, tests: list[str], timeout: float) -> tuple[str, float, str]:
        target = self.dir / module
        original = (REPO / module).read_text()
        target.write_text(source)
        # No plugin autoloading: a second less per pytest start (the selections need none).
        env = dict(os.environ, PYTHONPATH=str(self.dir), PYTHONDONTWRITEBYTECODE="1",
                   PYTHONHASHSEED="0", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        env.pop("PYTEST_ADDOPTS", None)
        shutil.rmtree(self.basetemp, ignore_errors=True)
        cmd = [sys.executable, "-m", "pytest", *PYTEST_ARGS, f"--basetemp={self.basetemp}", *tests]
        t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(cmd, cwd=self.dir, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            if self.stop.is_set():  # interrupted while starting: do not wait for it
                self.kill()
            try:
                out, _ = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.communicate()
                return "timeout", time.monotonic() - t0, ""
            except BaseException:   # Ctrl-C while waiting: the run dies with us
                self.kill()
                raise
            rc = self.proc.returncode
        finally:
            self.proc = None
            target.write_text(original)
        text = out.decode(errors="replace")
        if rc == 0:
            return "survived", time.monotonic() - t0, text
        if rc in (1, 2):  # tests failed / collection (import) error
            return "killed", time.monotonic() - t0, _first_failure(text)
        return f"error (pytest exit {rc})", time.monotonic() - t0, text[-2000:]

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _first_failure(text: str) -> str:
    for line in text.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line
    return ""


def _repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, check=True, stdout=subprocess.PIPE).stdout
    return [f for f in out.decode().split("\0") if f and not f.startswith(".venv")]


# -------------------------------------------------------------------- run

@dataclass
class Result:
    key: str
    module: str
    line: int
    col: int
    desc: str
    source_line: str
    outcome: str
    seconds: float
    detail: str = ""


def _selection(tests: tuple[str, ...] | list[str]) -> list[str]:
    kept: list[str] = []
    for t in tests:
        if t.startswith("-"):
            kept.append(t)
            continue
        path = t.split("::")[0]
        if (REPO / path).exists():
            kept.append(t)
        elif kept and kept[-1] == "--deselect":
            kept.pop()
        else:
            print(f"  (test selection: {path} does not exist; skipped)", file=sys.stderr)
    return kept


def run_target(name: str, target: Target, args, sandboxes: list[Sandbox], stop: threading.Event,
               eqs: list[Equivalent]) -> dict:
    source = (REPO / target.module).read_text()
    ms = mutants(target.module, source, target.functions)
    equivalent, stale = classify_equivalents(ms, eqs)
    stages = [_selection(args.tests)] if args.tests else [_selection(target.fast), _selection(target.broad)]
    stages = [s for s in stages if any(not t.startswith("-") for t in s)]
    if args.only:
        ms = [m for m in ms if any(sel in m.key for sel in args.only)]
    print(f"== {target.module}: {len(ms)} mutants ({len(equivalent)} declared equivalent); "
          f"tests: {' | then: '.join(' '.join(s) for s in stages)}", flush=True)
    for e in stale:
        print(f"  STALE equivalent entry (matches no mutant): {e.module} | {e.function} | {e.line}:{e.col} | "
              f"{e.desc} | {e.source_line}", flush=True)

    # Control: the unmutated module, regenerated from its AST like every mutant, must pass.
    timeouts = []
    for tests in stages:
        outcome, secs, detail = sandboxes[0].run(target.module, mutated_source(source, -1, target.functions),
                                                 tests, timeout=args.max_baseline)
        if outcome != "survived":
            raise SystemExit(f"control run of {target.module} does not pass ({outcome}):\n{detail[-3000:]}")
        timeouts.append(max(args.min_timeout, args.timeout_factor * secs))
        print(f"  control run of stage {len(timeouts)} passed in {secs:.1f}s; "
              f"per-mutant timeout {timeouts[-1]:.0f}s", flush=True)

    todo = [m for m in ms if m.index not in equivalent or args.run_equivalent]
    results: list[Result] = [Result(m.key, m.module, m.line, m.col, m.desc, m.source_line, "equivalent", 0.0,
                                    equivalent[m.index].reason)
                             for m in ms if m.index in equivalent and not args.run_equivalent]
    free = list(sandboxes)
    lock = threading.Lock()

    def one(m: Mutant) -> Result:
        with lock:
            box = free.pop()
        try:
            if stop.is_set():
                return Result(m.key, m.module, m.line, m.col, m.desc, m.source_line, "not run", 0.0)
            src = mutated_source(source, m.index, target.functions)
            try:
                compile(src, m.module, "exec")
            except SyntaxError as exc:   # never counted as killed
                return Result(m.key, m.module, m.line, m.col, m.desc, m.source_line, "error (does not compile)",
                              0.0, str(exc))
            secs = 0.0
            for stage, (tests, timeout) in enumerate(zip(stages, timeouts)):
                outcome, took, detail = box.run(m.module, src, tests, timeout)
                secs += took
                if outcome == "killed" and (stage > 0 or len(stages) == 1):
                    # The broad selection holds timing-sensitive tests: a kill
                    # there counts only if it happens again.
                    again, took, _ = box.run(m.module, src, tests, timeout)
                    secs += took
                    if again == "survived":
                        outcome, detail = "flaky", f"killed once, then passed ({detail})"
                if outcome != "survived":
                    break
            if m.index in equivalent:
                detail = f"[declared equivalent: {equivalent[m.index].reason}] {detail}"
            return Result(m.key, m.module, m.line, m.col, m.desc, m.source_line, outcome, secs, detail)
        finally:
            with lock:
                free.append(box)

    with ThreadPoolExecutor(max_workers=len(sandboxes)) as pool:
        pending = {pool.submit(one, m) for m in todo}
        done_count = 0
        try:
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    r = fut.result()
                    results.append(r)
                    done_count += 1
                    mark = {"killed": "K", "timeout": "T", "survived": "S", "flaky": "F",
                            "equivalent": "="}.get(r.outcome, "E")
                    print(f"  [{done_count}/{len(todo)}] {mark} {r.key:60s} {r.seconds:5.1f}s  {r.source_line[:70]}",
                          flush=True)
        except BaseException:
            stop.set()
            for fut in pending:
                fut.cancel()
            for box in sandboxes:
                box.kill()
            raise
    return summarize(target.module, results, stale)


def summarize(module: str, results: list[Result], stale: list[Equivalent]) -> dict:
    count = {k: sum(r.outcome == k for r in results) for k in ("killed", "timeout", "survived", "flaky", "equivalent")}
    errors = [r for r in results if r.outcome.startswith("error")]
    total = len(results)
    judged = total - count["equivalent"]
    score = (count["killed"] + count["timeout"]) / judged if judged else 1.0   # flaky counts as alive
    return {"module": module, "total": total, **count, "errors": len(errors), "score": score,
            "survivors": [asdict(r) for r in results if r.outcome == "survived"],
            "timeouts": [asdict(r) for r in results if r.outcome == "timeout"],
            "flaky_mutants": [asdict(r) for r in results if r.outcome == "flaky"],
            "error_details": [asdict(r) for r in errors],
            "equivalents": [asdict(r) for r in results if r.outcome == "equivalent"],
            "stale_equivalents": [asdict(e) for e in stale],
            "results": [asdict(r) for r in results]}


def report(summaries: list[dict], wall: float) -> None:
    print("\n==================== mutation score ====================")
    for s in summaries:
        print(f"\n{s['module']}: score {100 * s['score']:.1f}% = (killed {s['killed']} + timeout {s['timeout']})"
              f" / (total {s['total']} - equivalent {s['equivalent']}); survived {s['survived']}, "
              f"flaky {s['flaky']}, errors {s['errors']}")
        for r in s["timeouts"]:
            print(f"  timeout  {r['key']}   {r['source_line']}")
        for r in s["survivors"]:
            print(f"  SURVIVED {r['key']}   {r['source_line']}")
        for r in s["flaky_mutants"]:
            print(f"  FLAKY    {r['key']}   {r['source_line']}   {r['detail'][:120]}")
        for r in s["error_details"]:
            print(f"  ERROR    {r['key']}   {r['outcome']}")
    print(f"\nwall time {wall:.0f}s")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/mutation", description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", default=list(TARGETS), metavar="TARGET",
                   help=f"which modules (default: all): {', '.join(TARGETS)}")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--only", action="append", metavar="TEXT",
                   help="run only mutants whose id (module:line:col desc) contains TEXT (repeatable)")
    p.add_argument("--tests", nargs="+", metavar="PYTEST_ARG", help="override the test selection")
    p.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="mutants run at once")
    p.add_argument("--timeout-factor", type=float, default=3.0,
                   help="per-mutant timeout = max(--min-timeout, factor x control run time)")
    p.add_argument("--min-timeout", type=float, default=30.0)
    p.add_argument("--max-baseline", type=float, default=600.0, help="limit for the control run")
    p.add_argument("--run-equivalent", action="store_true",
                   help="run declared-equivalent mutants too (they still do not count)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--min-score", type=float, default=0.0,
                   help="exit 1 if any module scores below this fraction")
    args = p.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    eqs = load_equivalents()

    if args.list:
        for name in args.targets:
            t = TARGETS[name]
            ms = mutants(t.module, (REPO / t.module).read_text(), t.functions)
            equivalent, stale = classify_equivalents(ms, eqs)
            for m in ms:
                tag = "equivalent" if m.index in equivalent else m.op
                print(f"{m.key:60s} [{tag}] {m.source_line}")
            for e in stale:
                print(f"STALE equivalent entry: {e.module} | {e.function} | {e.line}:{e.col} | {e.desc} | "
                      f"{e.source_line}")
        return 0

    # SIGTERM takes the same path as Ctrl-C: kill the pytest runs, delete the copies.
    signal.signal(signal.SIGTERM, _interrupt)
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix="statefs-mutation-", dir=base))
    print(f"sandbox: {root}", flush=True)
    stop = threading.Event()
    t0 = time.monotonic()
    summaries = []
    try:
        files = _repo_files()
        sandboxes = [Sandbox(root, files, i, stop) for i in range(max(1, args.jobs))]
        for name in args.targets:
            summaries.append(run_target(name, TARGETS[name], args, sandboxes, stop, eqs))
    except KeyboardInterrupt:
        print("\ninterrupted: pytest runs killed, temporary copies removed; the working tree was never written",
              file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wall = time.monotonic() - t0
    report(summaries, wall)
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_seconds": wall, "modules": summaries}, indent=1))
    return 1 if any(s["score"] < args.min_score for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
