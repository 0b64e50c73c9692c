"""Small AST mutator: the mutants of one module, one source text per mutant.

Operators (each mutant applies exactly one):

* ``cmp``    a comparison operator flipped: < <=, > >=, == !=, is / is not, in / not in
* ``bool``   ``and`` <-> ``or`` (the whole boolean expression)
* ``int``    an integer literal + 1 and - 1
* ``raise``  a ``raise`` statement dropped
* ``return`` a guard ``return`` (one inside an if/try/loop body, not a function's last
             statement) dropped, so the code after it runs
* ``report`` a statement that reports a finding (``self.corrupt(...)``,
             ``....findings.append(...)``) dropped

A mutant is identified by module, line, column and a short description
(``< -> <=``); the equivalent-mutant list uses the same identity plus the
source line, so entries survive code moving up or down.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

_CMP_FLIPS = {
    ast.Lt: (ast.LtE, "<", "<="), ast.LtE: (ast.Lt, "<=", "<"),
    ast.Gt: (ast.GtE, ">", ">="), ast.GtE: (ast.Gt, ">=", ">"),
    ast.Eq: (ast.NotEq, "==", "!="), ast.NotEq: (ast.Eq, "!=", "=="),
    ast.Is: (ast.IsNot, "is", "is not"), ast.IsNot: (ast.Is, "is not", "is"),
    ast.In: (ast.NotIn, "in", "not in"), ast.NotIn: (ast.In, "not in", "in"),
}
_REPORT_CALLS = {"corrupt"}             # self.corrupt(...)
_REPORT_LISTS = {"findings"}            # <x>.findings.append(...)


@dataclass(frozen=True)
class Mutant:
    module: str         # repository-relative path, e.g. statefsd/storage/replay.py
    index: int          # position in the module's mutant list
    line: int
    col: int
    op: str             # operator family: cmp, bool, int, raise, return, report
    desc: str           # e.g. "< -> <="
    source_line: str    # the original line, stripped
    function: str       # enclosing top-level function or class ("" for module level)

    @property
    def key(self) -> str:
        return f"{self.module}:{self.line}:{self.col} {self.desc}"


class _Sites(ast.NodeTransformer):
    """Walks the tree in a fixed order, numbering every mutation site. With
    ``apply`` set, performs only the mutation of that number."""

    def __init__(self, functions: frozenset[str] | None, apply: int = -1) -> None:
        self.functions = functions      # None: the whole module
        self.apply = apply
        self.count = 0
        self.found: list[tuple[int, int, str, str, str]] = []   # line, col, op, desc, function
        self._scope: list[str] = []
        self._in_target = functions is None
        self._func_depth = 0
        self._last_stmt: set[int] = set()

    # -- scoping ------------------------------------------------------------

    def _visit_def(self, node):
        top = not self._scope
        self._scope.append(node.name)
        was = self._in_target
        if top and self.functions is not None:
            self._in_target = node.name in self.functions
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            self._last_stmt.add(id(node.body[-1]))
        try:
            return self.generic_visit(node)
        finally:
            self._in_target = was
            self._scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _visit_def

    def _site(self, node, op: str, desc: str) -> bool:
        """Registers one site; True when it is the one to apply."""
        n = self.count
        self.count += 1
        self.found.append((node.lineno, node.col_offset, op, desc, self._scope[0] if self._scope else ""))
        return n == self.apply

    # -- operators ----------------------------------------------------------

    def visit_Compare(self, node):
        self.generic_visit(node)
        if not self._in_target:
            return node
        for i, cmp_op in enumerate(node.ops):
            flip = _CMP_FLIPS.get(type(cmp_op))
            if flip and self._site(node, "cmp", f"{flip[1]} -> {flip[2]}" + (f" (#{i + 1})" if len(node.ops) > 1 else "")):
                node.ops[i] = flip[0]()
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        if not self._in_target:
            return node
        if isinstance(node.op, ast.And):
            if self._site(node, "bool", "and -> or"):
                node.op = ast.Or()
        elif self._site(node, "bool", "or -> and"):
            node.op = ast.And()
        return node

    def visit_Constant(self, node):
        if not self._in_target or type(node.value) is not int:
            return node
        for delta in (1, -1):
            if self._site(node, "int", f"{node.value} -> {node.value + delta}"):
                return ast.copy_location(ast.Constant(node.value + delta), node)
        return node

    def visit_Raise(self, node):
        self.generic_visit(node)
        if self._in_target and self._site(node, "raise", "drop raise"):
            return ast.copy_location(ast.Pass(), node)
        return node

    def visit_Return(self, node):
        self.generic_visit(node)
        if self._in_target and id(node) not in self._last_stmt and self._site(node, "return", "drop return"):
            return ast.copy_location(ast.Pass(), node)
        return node

    def visit_Expr(self, node):
        self.generic_visit(node)
        if self._in_target and _reports(node.value) and self._site(node, "report", "drop finding"):
            return ast.copy_location(ast.Pass(), node)
        return node


def _reports(expr) -> bool:
    if not isinstance(expr, ast.Call) or not isinstance(expr.func, ast.Attribute):
        return False
    f = expr.func
    if f.attr in _REPORT_CALLS:
        return True
    return f.attr == "append" and isinstance(f.value, ast.Attribute) and f.value.attr in _REPORT_LISTS


def mutants(module: str, source: str, functions: frozenset[str] | None = None) -> list[Mutant]:
    """Every mutant of ``source`` (restricted to the named top-level functions
    when ``functions`` is given)."""
    sites = _Sites(functions)
    sites.visit(ast.parse(source))
    lines = source.splitlines()
    return [Mutant(module, i, line, col, op, desc, lines[line - 1].strip(), func)
            for i, (line, col, op, desc, func) in enumerate(sites.found)]


def mutated_source(source: str, index: int, functions: frozenset[str] | None = None) -> str:
    """The module's source with mutant ``index`` applied (index -1: unmutated,
    but regenerated the same way, as a control)."""
    tree = ast.parse(source)
    sites = _Sites(functions, apply=index)
    tree = sites.visit(tree)
    if index >= sites.count:
        raise IndexError(f"mutant {index} does not exist ({sites.count} sites)")
    ast.fix_missing_locations(tree)
    return ast.unparse(tree) + "\n"
