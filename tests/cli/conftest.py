"""Fixtures: real statefsd processes (see tests/daemon/harness.py)."""

from tests.daemon.harness import daemon, shared_daemon, ws  # noqa: F401
