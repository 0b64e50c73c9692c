"""A real keystored and statefsd on a fresh image, and the vault CLI run as a process."""

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
from statefsd.keystore import KeystoreSigner
from statefsd.vault import vault as vaultmod
from statefsd.vault.kv import ClientKV

REPO = Path(__file__).resolve().parents[2]
PASSPHRASE = "correct horse battery staple"
# Small chunks so that small test trees still cut into many chunks.
TEST_CHUNKER = {"min": 16 << 10, "avg": 64 << 10, "max": 256 << 10}


@dataclass
class VaultEnv:
    dir: str
    statefsd: procs.Process
    keystored: procs.Process
    socket: str
    keystore_socket: str

    def env(self, **extra: str) -> dict:
        env = dict(os.environ, PYTHONPATH=str(REPO), STATEFS_SOCKET=self.socket,
                   STATEFS_KEYSTORE_SOCKET=self.keystore_socket, STATEFS_VAULT_PASSPHRASE=PASSPHRASE)
        env.update(extra)
        return {k: v for k, v in env.items() if v is not None}

    def cli(self, *args: str, check: bool = True, json_out: bool = True, **env: str):
        argv = [sys.executable, "-m", "statefsd.cli", "vault", *args] + (["--json"] if json_out else [])
        proc = subprocess.run(argv, env=self.env(**env), capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"statefs vault {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        if json_out and proc.returncode == 0:
            return json.loads(proc.stdout)
        return proc

    def cli_peak_rss(self, *args: str, **env: str) -> tuple[dict, int]:
        """Run one vault command; its JSON result and its peak RSS in KiB.

        Linux keeps a process's peak RSS across exec, so a child forked from
        this (large) test process would report the test's peak: a small
        wrapper forks the command instead and reports the command's own."""
        argv = [sys.executable, "-m", "statefsd.cli", "vault", *args, "--json"]
        try:
            run = procs.run_measured(argv, env=self.env(**env), cwd=str(REPO), timeout=600)
        except procs.ToolFailed as exc:
            raise AssertionError(f"statefs vault {' '.join(args)}: {exc}") from None
        return json.loads(run["stdout"]), run["rss_bytes"] // 1024

    def client(self) -> Client:
        return Client(self.socket)

    def open(self, *, passphrase: str | None = PASSPHRASE, device: bool = True) -> vaultmod.Vault:
        dev = vaultmod.Device(KeystoreSigner(self.keystore_socket)) if device else None
        return vaultmod.open_vault(ClientKV(self.client()), vaultmod.Secret(passphrase=passphrase), dev)

    def init(self) -> vaultmod.Vault:
        dev = vaultmod.Device(KeystoreSigner(self.keystore_socket))
        return vaultmod.init(ClientKV(self.client()), vaultmod.Secret(passphrase=PASSPHRASE), dev,
                             chunker=TEST_CHUNKER)


def start(dir_: str, image_size: int = 256 << 20, *, sign_log: bool = True) -> VaultEnv:
    """keystored and statefsd on ``dir_/vault.img``; with ``sign_log`` statefsd
    signs its checkpoints with the device key (a copy of the image on another
    machine is served without it: checkpoints signed by a lost device cannot
    be verified there, and the vault needs only its passphrase)."""
    image = os.path.join(dir_, "vault.img")
    if not os.path.exists(image):
        procs.fresh_image(image, image_size)
    ks_sock = os.path.join(dir_, "ks.sock")
    ks = procs.keystored(os.path.join(dir_, "keys"), ks_sock)
    sock = os.path.join(dir_, "sfs.sock")
    daemon = procs.statefsd(image, sock, keystore=ks_sock if sign_log else None)
    return VaultEnv(dir_, daemon, ks, sock, ks_sock)


@pytest.fixture
def vault_env():
    dir_ = tempfile.mkdtemp(prefix="sfv", dir="/tmp")
    env = start(dir_)
    yield env
    env.statefsd.stop()
    env.keystored.stop()
    shutil.rmtree(dir_, ignore_errors=True)
