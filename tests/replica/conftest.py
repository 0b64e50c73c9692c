"""A real keystored and statefsd for replication tests, and the statefs CLI run as a process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench import procs
from statefsd.client import Client
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine
from tests.vault.conftest import PASSPHRASE, REPO


@dataclass
class ReplicaEnv:
    dir: Path
    image: str
    socket: str
    keystore_socket: str
    statefsd: procs.Process
    keystored: procs.Process
    encryption: str

    @property
    def state(self) -> Path:
        return self.dir / "replica"

    @property
    def outbox(self) -> Path:
        return self.state / "outbox"

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONPATH=str(REPO), STATEFS_SOCKET=self.socket,
                   STATEFS_KEYSTORE_SOCKET=self.keystore_socket, STATEFS_VAULT_PASSPHRASE=PASSPHRASE,
                   STATEFS_REPLICA_DIR=str(self.state))
        env.update(extra)
        return {k: v for k, v in env.items() if v is not None}

    def cli(self, *args: str, check: bool = True, json_out: bool = True, **env):
        argv = [sys.executable, "-m", "statefsd.cli", *args] + (["--json"] if json_out else [])
        proc = subprocess.run(argv, env=self.env(**env), capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"statefs {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        if json_out and proc.returncode == 0:
            return json.loads(proc.stdout)
        return proc

    def client(self) -> Client:
        return Client(self.socket)

    def restart(self, image: str | None = None) -> None:
        """Stop statefsd and serve ``image`` (a copy put in place) instead."""
        self.statefsd.stop()
        if image is not None:
            shutil.copyfile(image, self.image)
        self.statefsd = procs.statefsd(self.image, self.socket, keystore=self.keystore_socket)


def served_state(client: Client) -> dict[str, bytes]:
    keys = client.list("")
    return dict(zip(keys, (v for v, _ in client.mget(keys))))


def image_state(path: str) -> dict[str, bytes]:
    """Every key and value of an image, read by mounting it read-only here."""
    engine = Engine.mount(FileDevice(path, read_only=True), read_only=True)
    try:
        return {k: engine.get(k) for k in engine.list("")}
    finally:
        engine.close()


def start(dir_: Path, *, encryption: str = "off", size: int = 128 << 20) -> ReplicaEnv:
    image = str(dir_ / "device.img")
    procs.fresh_image(image, size, encryption=encryption)
    ks_sock = str(dir_ / "ks.sock")
    ks = procs.keystored(str(dir_ / "keys"), ks_sock)
    sock = str(dir_ / "sfs.sock")
    daemon = procs.statefsd(image, sock, keystore=ks_sock)
    return ReplicaEnv(dir_, image, sock, ks_sock, daemon, ks, encryption)


@pytest.fixture(params=["off"])
def replica_env(request):
    dir_ = Path(tempfile.mkdtemp(prefix="sfr", dir="/tmp"))
    env = start(dir_, encryption=request.param)
    yield env
    env.statefsd.stop()
    env.keystored.stop()
    shutil.rmtree(dir_, ignore_errors=True)
