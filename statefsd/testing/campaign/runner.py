"""Run the campaign: every crash point of every workload run, checked in worker processes.

A task is one workload run (workload, seed). Its worker replays the run,
then for every crash point (after every op of the trace) tries the distinct
outcomes of the unflushed writes, recovers each crashed image and checks it
(checker.py). Every ``second_every``-th crash point also gets a second power
cut: at every point of one of its recoveries, with that point's outcomes,
and the result is checked again.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import time
from dataclasses import dataclass, field, replace

from statefsd.testing.simdev import CrashModel

from statefsd.testing.campaign import fsckhook
from statefsd.testing.campaign.checker import Checker, Recovered
from statefsd.testing.campaign.outcomes import distinct_outcomes
from statefsd.testing.campaign.records import History, WriteIndex
from statefsd.testing.campaign.repro import Code
from statefsd.testing.campaign.session import Run
from statefsd.testing.campaign.variants import SYSTEMS
from statefsd.testing.campaign.workloads import WORKLOADS, run_workload


@dataclass(frozen=True)
class Settings:
    system: str = "engine"
    model: str = CrashModel().spec()
    limit: int = 24             # outcomes per crash point: exhaustive up to this many, else sampled
    extra: int = 3              # plus this many random byte cuts (partial sectors)
    second_every: int = 8       # every Nth crash point also gets a second cut in its recovery (0: never)
    second_limit: int = 6
    second_extra: int = 1
    fsck_every: int = 4         # run fsck (invariant 6) on every Nth crash state (0: never)


@dataclass(frozen=True)
class Task:
    workload: str
    seed: int
    settings: Settings = Settings()


@dataclass
class Result:
    workload: str
    seed: int
    ops: int = 0
    states: int = 0             # first-cut crash states checked
    second: int = 0             # second-cut crash states checked (cut during recovery)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    violations: list[tuple[str, int, str]] = field(default_factory=list)   # (code, invariant, message)
    note: str = ""
    error: str = ""             # the campaign itself failed on this run (a harness bug, not a verdict)
    counts: dict[str, int] = field(default_factory=dict)   # an application check's own tallies


def mix(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def build_run(code_or_task) -> Run:
    s = code_or_task
    system = SYSTEMS[s.system]() if isinstance(s, Code) else SYSTEMS[s.settings.system]()
    model = CrashModel.from_spec(s.model if isinstance(s, Code) else s.settings.model)
    return run_workload(system, WORKLOADS[s.workload], s.seed, model)


def run_task(task: Task) -> Result:
    started, cpu = time.perf_counter(), time.process_time()
    st = task.settings
    result = Result(task.workload, task.seed)
    run = build_run(task)
    result.ops = len(run.trace)
    result.note = "; ".join(run.notes)
    checker = Checker(SYSTEMS[st.system](), run.salt, fsckhook.FSCK, fsck_every=st.fsck_every,
                      signer=run.signer)
    index = WriteIndex.of(run.trace, run.salt)
    base = Code(st.system, task.workload, task.seed, st.model, len(run.trace), "_")
    for v in History().check(index):
        result.violations.append((base.text(), v.invariant, f"during the workload: {v.message}"))

    for point in run.trace.crash_points(run.start):
        history = History().then(index, point.index, "workload")
        seed = mix(task.workload, task.seed, point.index)
        outcomes = list(distinct_outcomes(point, limit=st.limit, extra=st.extra, seed=seed))
        second = seed % len(outcomes) if st.second_every and point.index % st.second_every == 0 else -1
        for n, (outcome, device) in enumerate(outcomes):
            code = replace(base, index=point.index, outcome=outcome.encode())
            rec = checker.recover(device, run.timeline, point.index, history, code.text())
            rec.violations += _application(run, checker, device, rec, point.index)
            result.states += 1
            result.violations += [(code.text(), v.invariant, v.message) for v in rec.violations]
            if n == second and rec.trace is not None:
                result.second += _second_cuts(checker, code, rec, history, st, result)
    if run.extra_check is not None:
        result.counts = run.extra_check.counts()
    result.seconds = time.perf_counter() - started
    result.cpu_seconds = time.process_time() - cpu
    return result


def _application(run: Run, checker: Checker, device, rec: Recovered, cut: int) -> list:
    """An application's invariants on the recovered image of a first cut (vault workloads)."""
    if run.extra_check is None or rec.trace is None:
        return []
    return run.extra_check.check(checker.system, device, rec.state, cut)


def _second_cuts(checker: Checker, code: Code, rec: Recovered, history: History, st: Settings,
                 result: Result) -> int:
    """Cut the power at every point of ``rec``'s recovery and check again; returns states checked."""
    index = rec.index or WriteIndex.of(rec.trace, checker.salt)
    timeline = rec.timeline
    if timeline is None:                 # the recovery failed early: it is already a violation
        return 0
    count = 0
    for point in rec.trace.crash_points():
        history2 = history.then(index, point.index, "interrupted recovery")
        seed = mix(code.text(), point.index)
        for outcome, device in distinct_outcomes(point, limit=st.second_limit, extra=st.second_extra, seed=seed):
            code2 = code.then(point.index, outcome.encode())
            rec2 = checker.recover(device, timeline, point.index, history2, code2.text())
            count += 1
            result.violations += [(code2.text(), v.invariant, v.message) for v in rec2.violations]
    return count


def reproduce(code: Code, log) -> list:
    """Rebuild the state ``code`` names and check it, narrating every step through ``log``."""
    run = build_run(code)
    log(f"workload {code.workload} seed {code.seed}: {len(run.trace)} trace ops; {'; '.join(run.notes)}")
    log(fsckhook.NOTE)
    checker = Checker(SYSTEMS[code.system](), run.salt, fsckhook.FSCK, log, signer=run.signer)
    index = WriteIndex.of(run.trace, run.salt)
    violations = list(History().check(index))
    point = next(run.trace.crash_points(code.index, code.index))
    log(f"cut after op #{code.index} ({len(point.pending)} unflushed writes: "
        f"{', '.join(f'{w.offset}+{w.length}' for w in point.pending) or 'none'}), outcome {code.outcome}")
    history = History().then(index, code.index, "workload")
    device = point.device(code.outcome)
    rec = checker.recover(device, run.timeline, code.index, history, code.first_cut().text())
    violations += rec.violations + _application(run, checker, device, rec, code.index)
    if code.second is not None:
        if rec.trace is None or rec.timeline is None:
            log("the first recovery failed before its trace was complete; no second cut")
            return violations
        q, outcome = code.second
        point = next(rec.trace.crash_points(q, q))
        log(f"second cut after recovery op #{q} ({len(point.pending)} unflushed writes), outcome {outcome}")
        index2 = rec.index or WriteIndex.of(rec.trace, run.salt)
        violations += checker.recover(point.device(outcome), rec.timeline, q,
                                      history.then(index2, q, "interrupted recovery"), code.text()).violations
    return violations


def _run_task_safely(task: Task) -> Result:
    try:
        return run_task(task)
    except Exception as exc:    # reported and failing the campaign, but the other runs go on
        return Result(task.workload, task.seed, error=f"{type(exc).__name__}: {exc}")


def execute(tasks: list[Task], workers: int, on_result=None) -> list[Result]:
    """Run ``tasks`` on ``workers`` processes (1: in this process)."""
    results = []
    if workers <= 1:
        for task in tasks:
            results.append(_run_task_safely(task))
            if on_result:
                on_result(results[-1])
        return results
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for result in pool.imap_unordered(_run_task_safely, tasks, chunksize=1):
            results.append(result)
            if on_result:
                on_result(result)
    return results
