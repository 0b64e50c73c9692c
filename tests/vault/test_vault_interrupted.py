"""A backup killed halfway leaves no snapshot, and its re-run reuses what it stored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from statefsd.vault import records as rec
from tests.vault.trees import snapshot_of


def test_a_killed_backup_leaves_no_snapshot_and_its_rerun_reuses_the_stored_chunks(vault_env, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"part-{i}.bin").write_bytes(os.urandom(16 << 20))
    vault_env.cli("init")
    client = vault_env.client()
    proc = subprocess.Popen([sys.executable, "-m", "statefsd.cli", "vault", "backup", str(src), "--json"],
                            env=vault_env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(client.list(rec.DATA_PREFIX)) < 40 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the backup ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored_before = len(client.list(rec.DATA_PREFIX))
    assert stored_before >= 40
    assert vault_env.cli("snapshots") == []
    assert client.list(rec.SESSION_PREFIX)          # the dead session is left; it goes stale by itself

    rerun = vault_env.cli("backup", str(src))
    assert rerun["new_bytes"] < rerun["bytes"] - (stored_before - 10) * (64 << 10), rerun
    target = tmp_path / "out"
    vault_env.cli("restore", f"latest:{src}", "--target", str(target))
    assert snapshot_of(str(target / "src")) == snapshot_of(str(src))
    # The killed session's leftovers are referenced now or collectable; a prune leaves a clean vault.
    vault_env.cli("prune")
    assert vault_env.cli("check", "--read-data")["problems"] == []
