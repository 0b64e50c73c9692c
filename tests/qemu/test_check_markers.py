"""qemu/check_markers.py on synthetic serial logs (no QEMU boots here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from qemu.check_markers import ENC_OFF, ENC_OK, ENC_ON, acked_transactions, check

REPO = Path(__file__).resolve().parents[2]

CRASH = "SELFTEST: statefs v2 crash-atomic ok"
COMPACT = "SELFTEST: statefs v2 compact ok"
PERSIST = "SELFTEST: statefs cold-boot persist ok"


def console(*lines: str, exit_status: int | None = 0) -> str:
    """A serial log as QEMU writes it: kernel noise, CRLF line ends, /init's exit line."""
    out = ["[    0.000000] Linux version 6.1.0", "GUEST: up mode=x enc=off uptime=3.1", *lines]
    if exit_status is not None:
        out.append(f"GUEST: exit {exit_status}")
    return "\r\n".join(out) + "\r\n"


def test_selftest_with_every_marker_passes_with_encryption_off():
    assert check(console(ENC_OFF, CRASH, COMPACT), "selftest", enc=False) == []


def test_selftest_with_every_marker_passes_with_encryption_on():
    assert check(console(ENC_ON, ENC_OK, CRASH, COMPACT), "selftest", enc=True) == []


def test_missing_compact_marker_fails():
    problems = check(console(ENC_OFF, CRASH), "selftest", enc=False)
    assert problems == [f"missing marker: {COMPACT}"]


def test_encryption_banner_without_round_trip_marker_fails():
    problems = check(console(ENC_ON, CRASH, COMPACT), "selftest", enc=True)
    assert f"missing marker: {ENC_OK}" in problems
    assert f"'{ENC_ON}' without '{ENC_OK}'" in problems


def test_round_trip_marker_without_encryption_banner_fails_even_when_off_was_asked():
    problems = check(console(ENC_OFF, ENC_OK, CRASH, COMPACT), "selftest", enc=False)
    assert problems == [f"'{ENC_OK}' without '{ENC_ON}'"]


def test_banner_contradicting_the_requested_encryption_fails():
    problems = check(console(ENC_OFF, ENC_OK, ENC_ON, CRASH, COMPACT), "selftest", enc=True)
    assert problems == [f"asked for encryption on but saw '{ENC_OFF}'"]


def test_marker_inside_a_longer_line_does_not_count():
    for line in (f"echo {CRASH}", f"{CRASH}ay", f"{CRASH} maybe"):
        log = console(ENC_OFF, line, COMPACT)
        assert f"missing marker: {CRASH}" in check(log, "selftest", enc=False), line


def test_marker_followed_by_details_in_parentheses_counts():
    log = console(ENC_ON, f"{PERSIST} (token 7ece78b3)")
    assert check(log, "persist", enc=True) == []


def test_failed_command_is_reported_even_with_every_marker_present():
    log = console(ENC_OFF, CRASH, COMPACT, "GUEST: command failed (exit 2): python -m x")
    assert check(log, "selftest", enc=False) == ["GUEST: command failed (exit 2): python -m x"]


def test_python_traceback_on_the_console_fails():
    log = console(ENC_OFF, CRASH, COMPACT, "Traceback (most recent call last):",
                  '  File "x.py", line 1', "ValueError: boom")
    assert check(log, "selftest", enc=False) == ["a Python traceback on the console"]


def test_selftest_line_that_reports_failure_fails():
    for bad in ("SELFTEST: statefs v2 compact FAILED", "SELFTEST: device round trip not ok",
                "SELFTEST: replay error ok", "SELFTEST: statefs v2 compact"):
        log = console(ENC_OFF, CRASH, COMPACT, bad)
        assert check(log, "selftest", enc=False) == [f"failed self-test: {bad}"], bad


def test_extra_passing_selftest_lines_with_details_are_accepted():
    log = console(ENC_OFF, "SELFTEST: device round trip ok (token 6d24)", CRASH, COMPACT)
    assert check(log, "selftest", enc=False) == []


def test_guest_that_never_finished_fails():
    log = console(ENC_OFF, CRASH, COMPACT, exit_status=None)
    assert check(log, "selftest", enc=False) == [
        "the guest did not finish (no 'GUEST: exit' line)"]


def test_guest_program_exiting_nonzero_fails():
    log = console(ENC_OFF, CRASH, COMPACT, exit_status=3)
    assert check(log, "selftest", enc=False) == ["the guest program exited with status 3"]


def test_persist_boot_needs_the_persist_marker_and_the_banner():
    assert check(console(ENC_ON, PERSIST), "persist", enc=True) == []
    assert check(console(PERSIST), "persist", enc=True) == [f"missing marker: {ENC_ON}"]
    assert check(console(ENC_OFF), "persist", enc=False) == [f"missing marker: {PERSIST}"]


def test_smoke_boot_needs_only_the_smoke_marker():
    assert check(console("SELFTEST: smoke ok"), "smoke", enc=False) == []
    assert check(console(), "smoke", enc=False) == ["missing marker: SELFTEST: smoke ok"]


def test_killed_crashloop_guest_passes_with_acks_and_fails_without():
    log = console(ENC_OFF, "ACK 1 k/1", "ACK 2 k/2", exit_status=None)
    assert check(log, "crashloop", enc=False) == []
    assert check(console(ENC_OFF, exit_status=None), "crashloop", enc=False) == [
        "no ACK line: the crash writer acknowledged nothing"]


def test_acked_transactions_are_read_in_console_order():
    log = console("ACK 7 a/b", "noise ACK 8 x", "ACK 9 c", "ACK x y")
    assert acked_transactions(log) == [(7, "a/b"), (9, "c")]


def test_command_line_exit_status_follows_the_verdict(tmp_path):
    good = tmp_path / "good.log"
    good.write_text(console(ENC_OFF, CRASH, COMPACT))
    bad = tmp_path / "bad.log"
    bad.write_text(console(ENC_OFF, CRASH))
    cmd = [sys.executable, str(REPO / "qemu" / "check_markers.py"), "--mode", "selftest"]
    ok = subprocess.run([*cmd, str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    assert "markers ok" in ok.stdout
    fail = subprocess.run([*cmd, str(bad)], capture_output=True, text=True)
    assert fail.returncode == 1
    assert f"missing marker: {COMPACT}" in fail.stdout
    missing = subprocess.run([*cmd, str(tmp_path / "nope.log")], capture_output=True, text=True)
    assert missing.returncode == 1
    assert "cannot read" in missing.stderr
