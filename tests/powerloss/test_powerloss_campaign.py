"""The campaign finds nothing wrong with the real engine, catches every
deliberately broken variant, and reproduces a violation from its code.

Runs are small (a few workloads, one seed, fewer outcomes per crash point)
but still cut the power after every single write of each run.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from statefsd.storage import format as fmt
from statefsd.testing.campaign.records import records_in
from statefsd.testing.campaign.repro import Code
from statefsd.testing.campaign.runner import Settings, Task, build_run, reproduce, run_task
from statefsd.testing.campaign.variants import SYSTEMS
from statefsd.testing.campaign.workloads import WORKLOADS, run_workload
from statefsd.testing.simdev import CrashModel

ROOT = Path(__file__).resolve().parents[2]
SMALL = Settings(limit=6, extra=1, second_every=12, second_limit=3, second_extra=0, fsck_every=3)
LAST_LINE = re.compile(r"^crash states: (\d+), violations: (\d+)$")


def small_run(workload: str, system: str = "engine", **changes):
    return run_task(Task(workload, 1, replace(SMALL, system=system, **changes)))


@pytest.mark.parametrize("workload", ["multi-key-enc", "group-commit", "deletes-overwrites", "compaction-signed"])
def test_the_real_engine_survives_a_cut_after_every_write_with_no_violation(workload):
    result = small_run(workload)
    assert result.violations == []
    assert result.states > result.ops        # at least one state per crash point, more where writes pend
    assert result.second > 0                 # and some cuts during recovery


# Each variant breaks one rule; the invariant it must be caught on is named.
VARIANTS = [
    ("lying-disk", "single-puts", {1}),
    ("no-crc", "multi-key", {5}),
    ("visible-before-commit", "multi-key", {2}),
    ("txn-id-reuse", "single-puts-enc", {8, 10}),
]


@pytest.mark.parametrize("system,workload,expected", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_each_broken_variant_is_caught(system, workload, expected):
    result = small_run(workload, system, second_every=0)
    caught = Counter(inv for _, inv, _ in result.violations)
    assert expected <= set(caught), f"{system} caught only as {dict(caught)}"


def test_a_violation_is_reproduced_exactly_from_its_code():
    result = small_run("single-puts", "lying-disk", second_every=0)
    code, invariant, message = next(v for v in result.violations if v[1] == 1)
    again = reproduce(Code.parse(code), lambda line: None)
    assert (invariant, message) in [(v.invariant, v.message) for v in again]


def test_the_command_line_prints_a_repro_command_and_exits_1_on_violations():
    out = campaign("--system", "lying-disk", "--workload", "single-puts", "--seeds", "1", "--workers", "2")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert LAST_LINE.match(lines[-1]) and int(LAST_LINE.match(lines[-1])[2]) > 0
    repro = next(line for line in lines if "reproduce: scripts/powerloss-campaign --repro" in line)
    code = re.search(r"--repro '([^']+)'", repro)[1]
    again = campaign("--repro", code)
    assert again.returncode == 1
    assert "VIOLATION (" in again.stdout
    assert LAST_LINE.match(again.stdout.splitlines()[-1])


def test_the_command_line_reports_zero_violations_for_the_engine_and_exits_0():
    out = campaign("--workload", "large-values", "--seeds", "1", "--workers", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    m = LAST_LINE.match(out.stdout.splitlines()[-1])
    assert m and int(m[1]) > 50 and m[2] == "0"


def test_a_bad_reproduction_code_is_refused_with_a_clear_error():
    out = campaign("--repro", "engine:single-puts:1:garbage:notanumber:K")
    assert out.returncode == 2
    assert "bad reproduction code" in out.stderr


@pytest.mark.parametrize("workload", sorted(w for w in WORKLOADS if not w.startswith("compaction")))
def test_a_workload_run_is_the_same_bytes_every_time(workload):
    # Reproduction codes rely on this. Compaction workloads are left out: their epochs are
    # pinned per mount, but where a background compaction lands depends on thread timing.
    system, model = SYSTEMS["engine"](), CrashModel()
    a = run_workload(system, WORKLOADS[workload], 3, model)
    b = run_workload(system, WORKLOADS[workload], 3, model)
    assert [(op.kind, op.offset, op.data) for op in a.trace] == [(op.kind, op.offset, op.data) for op in b.trace]
    assert a.timeline.txns == b.timeline.txns


def test_concurrent_commits_share_one_group_write():
    run = build_run(Task("group-commit", 1))
    commits_per_write = [sum(h.type == fmt.COMMIT for h, _ in records_in(op.data))
                         for op in run.trace if op.kind == "write"]
    assert max(commits_per_write) >= 2


HEADER_CELLS = ("runs", "ops", "1 cut", "2 cuts", "cpu s", "violations")


def _column_ends(line: str) -> list[int]:
    return [m.end() for m in re.finditer(r"\S+", line)][1:]  # numbers are right-aligned


def test_off_a_terminal_a_heartbeat_line_reports_progress_and_the_table_is_aligned():
    out = campaign("--workload", "single-puts", "--workload", "deletes-overwrites-signed",
                   "--seeds", "1", "--workers", "1", "--heartbeat", "0.2")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    beats = [line for line in lines if line.startswith("progress: ")]
    assert beats and re.match(r"^progress: \d+/2 runs, [\d,]+ crash states, 0 violations, \d+ s elapsed$", beats[0])
    header = lines.index(next(line for line in lines if line.startswith("workload ")))
    assert all(not line.startswith("progress: ") for line in lines[header:])
    table = lines[header:header + 3]
    assert table[1].startswith("deletes-overwrites-signed ") and table[2].startswith("single-puts ")
    header_ends = [table[0].index(cell) + len(cell) for cell in HEADER_CELLS]
    assert _column_ends(table[1]) == _column_ends(table[2]) == header_ends, "\n".join(table)
    assert LAST_LINE.match(lines[-1])


def test_on_a_terminal_a_progress_bar_is_drawn_instead_of_heartbeat_lines():
    main, child = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120", TERM="xterm")
    proc = subprocess.Popen([str(ROOT / "scripts/powerloss-campaign"), "--workload", "single-puts", "--seeds", "2",
                             "--workers", "1", "--heartbeat", "0.2"],
                            cwd=ROOT, env=env, stdout=child, stderr=child, stdin=subprocess.DEVNULL)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    assert proc.wait(120) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert re.search(r"runs .*1/2.*crash states|runs .*states, 0 violations", text), text[-2000:]
    assert "progress: " not in text
    assert "crash states: " in text


def test_list_aligns_names_longer_than_the_old_column():
    entries = [line for line in campaign("--list").stdout.splitlines() if line.startswith("  ")]
    assert any(len(line.split()[0]) > 24 for line in entries)
    doc_columns = {len(line) - len(line[2:].split(None, 1)[1]) for line in entries}
    assert len(doc_columns) == 1, entries


def campaign(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([str(ROOT / "scripts/powerloss-campaign"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
