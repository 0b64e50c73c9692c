"""scripts/replica-demo as a newcomer runs it: real statefsd, keystored, two
Syncthing instances, statefs-node and an rclone WebDAV share, all on loopback."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from statefsd.replica.syncthing import binary

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(binary() is None, reason="syncthing is not installed (scripts/setup installs it)")
@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "statefs-node").exists(), reason="needs scripts/setup's .venv")
def test_the_replica_demo_restores_the_same_state_from_the_friend_and_from_the_share():
    work = tempfile.mkdtemp(prefix="rdemo", dir="/tmp")    # short: sockets live here
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO), STATEFS_REPLICA_DEMO_DIR=work)
        for name in ("STATEFS_SOCKET", "STATEFS_KEYSTORE_SOCKET", "STATEFS_REPLICA_DIR"):
            env.pop(name, None)
        result = subprocess.run([str(REPO / "scripts" / "replica-demo")], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out = result.stdout
        assert "copies of the newest head: 2" in out
        assert out.count("same state: ") == 2 and "Traceback" not in out + result.stderr
        left = subprocess.run(["pgrep", "-af", work], capture_output=True, text=True).stdout
        assert left == "", f"the demo left processes running: {left}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_replica_demo_help_runs_nothing():
    result = subprocess.run([str(REPO / "scripts" / "replica-demo"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: scripts/replica-demo\n")
