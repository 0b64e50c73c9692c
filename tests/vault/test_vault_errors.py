"""Errors a vault user meets name the next step, and lose nothing."""

from __future__ import annotations

import os
import shutil
import tempfile

from tests.vault.conftest import start


def test_a_full_image_names_the_vault_commands_that_free_space(tmp_path):
    dir_ = tempfile.mkdtemp(prefix="sff", dir="/tmp")
    env = start(dir_, image_size=16 << 20)
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "big.bin").write_bytes(os.urandom(12 << 20))
        env.cli("init")
        proc = env.cli("backup", str(src), check=False, json_out=False)
        assert proc.returncode == 13 and "statefs vault prune" in proc.stderr
        assert env.cli("snapshots") == []
        (src / "big.bin").unlink()
        (src / "small.bin").write_bytes(b"fits")
        env.cli("prune")
        assert env.cli("backup", str(src))["files"] == 1
    finally:
        env.statefsd.stop()
        env.keystored.stop()
        shutil.rmtree(dir_, ignore_errors=True)
