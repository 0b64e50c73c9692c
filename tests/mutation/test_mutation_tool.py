"""scripts/mutation itself: the mutants it makes, the equivalent list it
trusts, and that an interrupted run leaves the working tree as it was."""

from __future__ import annotations

import ast
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.mutation import mutator
from tests.mutation.run import EQUIVALENT_FILE, REPO, classify_equivalents, load_equivalents
from tests.mutation.targets import TARGETS

SNIPPET = '''\
def check(a, b, xs):
    if a < b or a >= 10:
        raise ValueError("out of range")
    if a is None and b in xs:
        return "found"
    self.corrupt(a, "reason")
    return a == b


def untouched(a):
    return a < 1
'''


def test_each_operator_yields_its_mutants_in_the_named_functions_only():
    ms = mutator.mutants("m.py", SNIPPET, frozenset({"check"}))
    assert sorted((m.line, m.desc) for m in ms) == sorted([
        (2, "< -> <="), (2, ">= -> >"), (2, "10 -> 11"), (2, "10 -> 9"), (2, "or -> and"),
        (3, "drop raise"),
        (4, "is -> is not"), (4, "in -> not in"), (4, "and -> or"),
        (5, "drop return"),
        (6, "drop finding"),
        (7, "== -> !="),      # the function's last statement is a comparison, never dropped
    ])
    assert all(m.function == "check" for m in ms)
    assert len(mutator.mutants("m.py", SNIPPET)) == len(ms) + 3   # whole module: untouched's < and 1


def test_each_mutant_changes_exactly_one_site_and_the_control_changes_none():
    funcs = frozenset({"check"})
    control = mutator.mutated_source(SNIPPET, -1, funcs)
    assert ast.dump(ast.parse(control)) == ast.dump(ast.parse(SNIPPET))
    sources = {mutator.mutated_source(SNIPPET, m.index, funcs) for m in mutator.mutants("m.py", SNIPPET, funcs)}
    assert len(sources) == len(mutator.mutants("m.py", SNIPPET, funcs)) and control not in sources
    drop_raise = next(m for m in mutator.mutants("m.py", SNIPPET, funcs) if m.desc == "drop raise")
    dropped = mutator.mutated_source(SNIPPET, drop_raise.index, funcs)
    assert "raise" not in dropped.split("def untouched")[0] and "raise" in SNIPPET


def test_every_target_regenerates_to_the_same_program_when_unmutated():
    for target in TARGETS.values():
        source = (REPO / target.module).read_text()
        assert mutator.mutants(target.module, source, target.functions), target.module
        control = mutator.mutated_source(source, -1, target.functions)
        assert ast.dump(ast.parse(control)) == ast.dump(ast.parse(source)), target.module


def test_every_declared_equivalent_mutant_exists_and_has_a_reason():
    eqs = load_equivalents()
    matched, stale = 0, []
    for target in TARGETS.values():
        ms = mutator.mutants(target.module, (REPO / target.module).read_text(), target.functions)
        found, gone = classify_equivalents(ms, eqs)
        matched += len(found)
        stale += gone
    assert stale == [], f"entries in {EQUIVALENT_FILE.name} that match no mutant: {stale}"
    assert matched == len(eqs)
    assert all(len(e.reason) > 10 for e in eqs)


def _tree_digest() -> str:
    h = hashlib.sha256()
    for rel in subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                              check=True, capture_output=True, text=True).stdout.split():
        p = REPO / rel
        if p.is_file():
            h.update(rel.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_an_interrupted_run_kills_its_pytest_and_leaves_no_copy_and_no_change(tmp_path):
    before = _tree_digest()
    proc = subprocess.Popen([sys.executable, "-m", "tests.mutation.run", "format", "-j", "1",
                             "--tests", "tests/mutation/test_mutation_tool.py::test_sleeps_when_asked"],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), MUTATION_TOOL_SLEEP="60"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    root = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("sandbox: "):
            root = Path(line.split(" ", 1)[1].strip())
        if "tests:" in line:     # the control run (sleeping) has started
            break
    assert root is not None and root.is_dir(), lines
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, "".join(lines) + out
    assert "interrupted" in out
    assert not root.exists()
    assert _tree_digest() == before
    still_running = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and str(root).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                still_running.append(pid)
        except OSError:
            pass
    assert still_running == []


def test_sleeps_when_asked():
    """Helper for the interrupt test: a test that runs long only when asked to."""
    time.sleep(float(os.environ.get("MUTATION_TOOL_SLEEP", "0")))
