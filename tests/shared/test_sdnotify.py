"""Readiness notifications both daemons send (statefsd/shared/sdnotify.py)."""

from __future__ import annotations

import os
import socket

from statefsd.shared.sdnotify import sd_notify


def test_the_state_reaches_an_abstract_notify_socket(monkeypatch):
    name = f"sdnotify-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("READY=1", warn=lambda message: None) is True
        assert receiver.recv(64) == b"READY=1"


def test_an_unreachable_notify_socket_is_a_warning_not_a_failure(monkeypatch, tmp_path):
    warnings: list[str] = []
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sd_notify("READY=1", warn=warnings.append) is False
    assert len(warnings) == 1 and warnings[0].startswith(f"sd_notify to {tmp_path / 'gone'} failed:")


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1", warn=lambda message: 1 / 0) is False
