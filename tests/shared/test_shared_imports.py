"""What keystored and the shared plumbing may import from statefsd: the
errors and statefsd.shared, never the storage core or the daemon modules.
keystored then runs without statefsd's engine, and the plumbing has no
cycle back into the daemons that use it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALLOWED = ("statefsd.errors", "statefsd.shared")


def statefsd_imports(path: Path) -> list[str]:
    """Every statefsd module ``path`` imports, at top level or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "statefsd" else [f"statefsd.{a.name}" for a in node.names]
        else:
            continue
        found += [name for name in names if name == "statefsd" or name.startswith("statefsd.")]
    return found


def _allowed(name: str) -> bool:
    return any(name == ok or name.startswith(ok + ".") for ok in ALLOWED)


@pytest.mark.parametrize("folder", ["keystored", "statefsd/shared"])
def test_keystored_and_the_shared_plumbing_import_only_errors_and_shared_from_statefsd(folder):
    modules = sorted((REPO / folder).glob("*.py"))
    assert modules
    wrong = {f"{path.relative_to(REPO)}: {name}"
             for path in modules for name in statefsd_imports(path) if not _allowed(name)}
    assert not wrong, f"imports outside {ALLOWED}: {sorted(wrong)}"


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from statefsd import storage\n    import statefsd.server\n")
    assert [name for name in statefsd_imports(module) if not _allowed(name)] == [
        "statefsd.storage", "statefsd.server"]
