"""scripts/setup's wait for the apt lock, run as the real script against real fcntl locks."""

import fcntl
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def wait_apt_lock(lock: Path, timeout: str):
    env = dict(os.environ, STATEFS_APT_LOCKS=str(lock))
    return subprocess.run([str(REPO / "scripts" / "wait-apt-lock"), timeout], env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_free_apt_lock_passes_silently(tmp_path):
    lock = tmp_path / "lock-frontend"
    lock.touch()
    result = wait_apt_lock(lock, "5")
    assert result.returncode == 0 and result.stderr == ""


def test_a_held_apt_lock_is_waited_for_with_a_message_until_it_is_released(tmp_path):
    lock = tmp_path / "lock-frontend"
    lock.touch()
    fd = os.open(lock, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)  # what apt-get holds; a child process cannot take it
    threading.Timer(1.5, os.close, (fd,)).start()
    started = time.monotonic()
    result = wait_apt_lock(lock, "30")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 1.0
    assert f"another apt-get or dpkg holds {lock}; waiting up to 30s" in result.stderr
    assert "the apt lock is free; continuing" in result.stderr


def test_an_apt_lock_held_past_the_timeout_fails_naming_the_next_step(tmp_path):
    lock = tmp_path / "lock-frontend"
    lock.touch()
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        result = wait_apt_lock(lock, "1")
    finally:
        os.close(fd)
    assert result.returncode == 1
    assert "waiting up to 1s" in result.stderr
    assert "still held after 1s" in result.stderr and "STATEFS_APT_LOCK_TIMEOUT" in result.stderr
    assert "run scripts/setup again" in result.stderr


def test_setup_waits_for_the_apt_lock_before_each_apt_get():
    setup = (REPO / "scripts" / "setup").read_text()
    install = setup[setup.index('if [ ${#need_apt[@]} -gt 0 ]'):]
    calls = [line.strip() for line in install.splitlines() if line.strip().startswith("apt-get")]
    assert calls and all("-o DPkg::Lock::Timeout=" in call for call in calls)
    assert install.index("scripts/wait-apt-lock") < install.index(calls[0])


def _setup_copy(tmp_path: Path, pip_exit: int) -> Path:
    """scripts/setup in a scratch checkout whose .venv/bin/python is a stand-in
    that chatters like pip and setuptools do, then exits ``pip_exit``."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup", root / "scripts" / "setup")
    shutil.copy(REPO / "scripts" / "wait-apt-lock", root / "scripts" / "wait-apt-lock")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    fake = root / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'running setup.py develop'\necho 'SetuptoolsDeprecationWarning: banner' >&2\n"
                    f"exit {pip_exit}\n")
    fake.chmod(0o755)
    return root


def _apt_packages_present() -> bool:
    setup = (REPO / "scripts" / "setup").read_text()
    tools = re.findall(r"command -v ([\w.-]+) >/dev/null \|\|", setup)
    return all(shutil.which(t) or os.path.exists(f"/sbin/{t}") for t in tools) and os.path.exists("/bin/busybox")


@pytest.mark.skipif(not _apt_packages_present(), reason="setup would install Debian packages first")
def test_setup_keeps_pip_and_setuptools_chatter_out_of_the_terminal(tmp_path):
    root = _setup_copy(tmp_path, pip_exit=0)
    result = subprocess.run([str(root / "scripts" / "setup")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == "setup: installing Python dependencies into .venv\n"
    assert "banner" in (root / ".venv" / "pip-install.log").read_text()


@pytest.mark.skipif(not _apt_packages_present(), reason="setup would install Debian packages first")
def test_setup_shows_pips_log_when_pip_fails(tmp_path):
    root = _setup_copy(tmp_path, pip_exit=1)
    result = subprocess.run([str(root / "scripts" / "setup")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "SetuptoolsDeprecationWarning: banner" in result.stderr
    assert "setup: pip install -q -e .[dev] failed (log above, also in .venv/pip-install.log)" in result.stderr
