"""scripts/demo as a newcomer runs it: the real script, a real statefsd."""

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def demo(*args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    env.pop("STATEFS_SOCKET", None)
    return subprocess.run([str(REPO / "scripts" / "demo"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_demo_help_prints_usage_and_runs_nothing():
    result = demo("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: scripts/demo\n")
    assert "$ statefs" not in result.stdout and result.stderr == ""


def test_demo_with_an_unknown_argument_is_a_usage_error():
    result = demo("--frobnicate")
    assert result.returncode == 2
    assert "unknown argument '--frobnicate' (see scripts/demo --help)" in result.stderr


@pytest.fixture
def demo_dir():
    path = tempfile.mkdtemp(prefix="demo", dir="/tmp")  # short: the socket lives here
    yield path
    pid_file = Path(path, "statefsd.pid")
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "statefs").exists(), reason="needs scripts/setup's .venv")
def test_demo_output_is_clean_commands_and_values_each_on_their_own_line(demo_dir):
    result = demo(env_extra={"STATEFS_DEMO_DIR": demo_dir})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert not re.search(r"^\+ \S", out, re.M), out          # no set -x artifacts ("+  PATH" is vault diff's)
    assert "setuptools" not in out + result.stderr and "Traceback" not in out + result.stderr
    lines = out.splitlines()
    assert "$ statefs put config/motd \"hello from StateFS\"" in lines
    assert lines[lines.index("$ statefs get config/hostname") + 1] == "demo-device"
    assert lines[lines.index("$ statefs get net/ip") + 1] == "10.0.0.2"
    assert "next txn id:" in out and "next_txn_id" not in out
    assert lines[-1].startswith(f"statefsd keeps running on {demo_dir}/statefs.sock")
    # The vault round trip: two snapshots, their diff, a byte-identical restore, a clean check.
    assert f"M  {demo_dir}/vault/src/DESIGN.md" in lines and f"+  {demo_dir}/vault/src/new-file.txt" in lines
    assert "restored tree is identical" in lines
    assert lines[lines.index("$ statefs vault check --read-data") + 1].endswith("no problems")
