"""The import layering of the product, as data, and a checker for it.

docs/DESIGN.md ("Layers") says which package may import which and why; this
module is the same table in a form a test can enforce. The checker reads
every .py file under the product packages with ``ast`` (nothing is
imported or run), so it sees module-level and function-level imports alike,
resolves relative imports, and follows ``importlib.import_module("...")``
calls with a literal name, so a dependency cannot hide from it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PRODUCT = ("statefsd", "keystored", "fsck_statefs")
# Top-level folders of the checkout that are not product: the product never
# imports them (they import the product).
NOT_PRODUCT = ("tests", "bench", "qemu", "scripts")

ERRORS = "statefsd.errors"
SHARED = "statefsd.shared"
STORAGE = "statefsd.storage"
KEYSTORED = "keystored"
KEYSTORE = "statefsd.keystore"
PROTOCOL = "statefsd.protocol"
CLIENT = "statefsd.client"
DAEMON_SIDE = ("statefsd.server", "statefsd.daemon", "statefsd.cli", "statefsd.__main__")
FSCK = "fsck_statefs"
TESTING = "statefsd.testing"
VAULT = "statefsd.vault"
REPLICA = "statefsd.replica"

# Source module prefix -> the module prefixes it may import. The longest
# matching prefix decides; a module always may import its own prefix. Every
# product module must match one (a new room gets its rule when it is built).
# The root package ``statefsd`` (only the version) may be imported by all.
RULES: dict[str, tuple[str, ...]] = {
    "statefsd": (),
    ERRORS: (),
    SHARED: (ERRORS, SHARED),
    STORAGE: (ERRORS, SHARED, STORAGE),
    KEYSTORED: (ERRORS, SHARED, KEYSTORED),
    KEYSTORE: (ERRORS, SHARED, STORAGE, KEYSTORED),
    PROTOCOL: (ERRORS, SHARED, STORAGE + ".format", PROTOCOL),
    CLIENT: (ERRORS, SHARED, STORAGE + ".format", PROTOCOL),
    VAULT: (ERRORS, SHARED, CLIENT, KEYSTORE, VAULT),
    REPLICA: (ERRORS, SHARED, STORAGE, CLIENT, KEYSTORE, VAULT, REPLICA),
    **{m: (ERRORS, SHARED, STORAGE, PROTOCOL, CLIENT, KEYSTORE, VAULT, REPLICA, *DAEMON_SIDE) for m in DAEMON_SIDE},
    FSCK: (ERRORS, SHARED, STORAGE, KEYSTORE, FSCK),
    TESTING: PRODUCT,
}


@dataclass(frozen=True)
class Allowance:
    """One import the rules forbid but the product needs, and why."""

    source: str
    function: str  # the import is allowed only inside this function
    target: str
    reason: str


EXCEPTIONS = (
    Allowance("statefsd.daemon", "main", "statefsd.testing.selftest",
              "statefsd --selftest runs the guest self-test from the installed daemon; the import "
              "sits inside main(), taken only when a --selftest flag is given, so serving never "
              "loads the test rig"),
)


@dataclass(frozen=True)
class Import:
    file: str       # path relative to the checked root
    line: int
    source: str     # dotted name of the importing module
    target: str     # dotted name of the imported module (or package)
    function: str | None  # innermost enclosing function, None at module level


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_files(root: Path) -> list[Path]:
    return sorted(p for top in PRODUCT if (root / top).is_dir() for p in (root / top).rglob("*.py"))


class _Finder(ast.NodeVisitor):
    def __init__(self, file: str, source: str, is_package: bool, modules: set[str]) -> None:
        self.file, self.source, self.modules = file, source, modules
        self.package = source if is_package else source.rpartition(".")[0]
        self.functions: list[str] = []
        self.found: list[Import] = []

    def _add(self, node: ast.AST, target: str) -> None:
        function = self.functions[-1] if self.functions else None
        self.found.append(Import(self.file, node.lineno, self.source, target, function))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base_parts = self.package.split(".")
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod
            # import name`` imports mod.
            sub = f"{base}.{alias.name}"
            self._add(node, sub if sub in self.modules else base)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if (name in ("import_module", "__import__") and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            self._add(node, node.args[0].value)
        self.generic_visit(node)


def imports(root: Path) -> list[Import]:
    """Every import of a project module by a product module under ``root``."""
    files = product_files(root)
    modules = {module_name(p.relative_to(root)) for p in files}
    found: list[Import] = []
    for path in files:
        rel = path.relative_to(root)
        finder = _Finder(str(rel), module_name(rel), rel.name == "__init__.py", modules)
        finder.visit(ast.parse(path.read_text(), filename=str(rel)))
        found += [i for i in finder.found if i.target.split(".")[0] in PRODUCT + NOT_PRODUCT]
    return list(dict.fromkeys(found))  # ``from m import a, b`` is one import of m


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def rule_for(module: str) -> str | None:
    """The RULES key that governs ``module``: its longest matching prefix."""
    keys = [k for k in RULES if _within(module, k) and (k != "statefsd" or module == "statefsd")]
    return max(keys, key=len, default=None)


def excused(imp: Import, exceptions=EXCEPTIONS) -> Allowance | None:
    return next((e for e in exceptions if (e.source, e.function, e.target)
                 == (imp.source, imp.function, imp.target)), None)


def breaches(root: Path, exceptions=EXCEPTIONS) -> list[str]:
    """One line per import that breaks the layering: file, line, what, and the rule.

    A product module no rule covers is a breach too (reported at line 1),
    so a new room cannot go unchecked.
    """
    out = []
    for path in product_files(root):
        rel = path.relative_to(root)
        if rule_for(module_name(rel)) is None:
            out.append(f"{rel}:1: {module_name(rel)} belongs to no layer: give it a rule in "
                       "tests/architecture/layers.py and a line in docs/DESIGN.md (\"Layers\")")
    for imp in imports(root):
        key = rule_for(imp.source)
        if key is None:
            continue
        where = f"{imp.file}:{imp.line}: {imp.source} imports {imp.target}"
        allowed = (key,) + RULES[key]
        if imp.target == "statefsd" or any(_within(imp.target, a) for a in allowed):
            continue
        if excused(imp, exceptions):
            continue
        may = ", ".join(RULES[key]) or "no project module"
        out.append(f"{where}; {key} may import only {may} (docs/DESIGN.md, \"Layers\")")
    return out
