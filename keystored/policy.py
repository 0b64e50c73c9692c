"""Who may derive and sign what: uid -> label patterns.

A pattern is an exact label, or a prefix ending in ``*`` (``statefs.*``);
a lone ``*`` allows every label. ``public_key`` is not subject to this.
"""

from __future__ import annotations

import os
import pwd

from statefsd.errors import InvalidArgument
from statefsd.shared import signing

DEFAULT_PATTERN = "statefs.*"


def _check_pattern(pattern: str) -> str:
    if pattern == "*":
        return pattern
    stem = pattern[:-1] if pattern.endswith("*") else pattern
    try:
        signing.check_label(stem)
    except InvalidArgument as exc:
        raise ValueError(f"bad label pattern {pattern!r}: {exc.message}") from None
    return pattern


def parse_allow(spec: str) -> tuple[int, list[str]]:
    """``UID:LABEL[,LABEL...]`` (UID may be a user name) -> (uid, patterns)."""
    who, sep, labels = spec.partition(":")
    if not sep or not who or not labels:
        raise ValueError(f"--allow {spec!r}: expected UID:LABEL[,LABEL...]")
    if who.isdigit():
        uid = int(who)
    else:
        try:
            uid = pwd.getpwnam(who).pw_uid
        except KeyError:
            raise ValueError(f"--allow {spec!r}: no such user {who!r}") from None
    return uid, [_check_pattern(p.strip()) for p in labels.split(",")]


class AccessList:
    def __init__(self, rules: dict[int, list[str]]) -> None:
        self.rules = {uid: tuple(patterns) for uid, patterns in rules.items()}

    @classmethod
    def from_allows(cls, allows: list[tuple[int, list[str]]]) -> "AccessList":
        """From parsed --allow options; with none, our own uid may use ``statefs.*``."""
        if not allows:
            return cls({os.geteuid(): [DEFAULT_PATTERN]})
        rules: dict[int, list[str]] = {}
        for uid, patterns in allows:
            rules.setdefault(uid, []).extend(patterns)
        return cls(rules)

    def allows(self, uid: int, label: str) -> bool:
        for pattern in self.rules.get(uid, ()):
            if pattern.endswith("*") and label.startswith(pattern[:-1]):
                return True
            if pattern == label:
                return True
        return False

    def describe(self) -> dict[str, list[str]]:
        return {str(uid): list(patterns) for uid, patterns in sorted(self.rules.items())}
