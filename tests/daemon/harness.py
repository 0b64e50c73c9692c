"""Real statefsd processes on real images and sockets, for tests/daemon and tests/cli."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import pytest

from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.client import Client
from statefsd.storage.engine import Engine
from statefsd.protocol import PROTOCOL_VERSION
from statefsd.shared.unixrpc import LENGTH

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


def env_with_repo(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTIFY_SOCKET", None)
    env.pop("STATEFS_SOCKET", None)
    env.update(extra)
    return env


def make_image(path: Path, size: int = 16 << 20) -> str:
    create_image(str(path), size)
    with FileDevice(str(path)) as device:
        Engine.mkfs(device)
    return str(path)


def short_tempdir() -> str:
    """Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer."""
    return tempfile.mkdtemp(prefix="sfs", dir="/tmp")


class Daemon:
    """One statefsd process and everything it printed."""

    def __init__(self, image: str, socket_path: str, *, audit: str | None = None,
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 wait: bool = True, preexec_fn=None) -> None:
        self.image = image
        self.socket = socket_path
        self.audit_path = audit
        args = ["--image", image, "--socket", socket_path]
        if audit:
            args += ["--audit", audit]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "statefsd.daemon", *args, *(extra or [])],
            cwd=REPO, env=env or env_with_repo(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._ready = threading.Event()
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr), daemon=True)]
        for t in self._threads:
            t.start()
        if wait:
            self.wait_ready()

    def _pump(self, stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if line.startswith("statefsd: ready on"):
                self._ready.set()
        self._ready.set()  # EOF: the process is gone; wait_ready reports it

    def wait_ready(self) -> None:
        if not self._ready.wait(START_TIMEOUT) or self.proc.poll() is not None:
            raise AssertionError(f"statefsd did not start: rc={self.proc.poll()} "
                                 f"stdout={self.stdout} stderr={self.stderr}")

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait_exit()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def client(self) -> Client:
        return Client(self.socket)

    def audit_events(self) -> list[dict]:
        with open(self.audit_path) as f:
            return [json.loads(line) for line in f]


class RawConnection:
    """Speaks frames byte by byte, for feeding the daemon malformed input."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(socket_path)

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_body(self, body: bytes) -> None:
        self.send_bytes(LENGTH.pack(len(body)) + body)

    def send(self, message: object) -> None:
        self.send_body(msgpack.packb(message, use_bin_type=True))

    def request(self, op: str, request_id: int = 1, **fields: object) -> dict:
        self.send({"v": PROTOCOL_VERSION, "id": request_id, "op": op, **fields})
        return self.receive()

    def receive(self) -> dict:
        head = self._exact(LENGTH.size)
        (length,) = LENGTH.unpack(head)
        return msgpack.unpackb(self._exact(length), raw=False)

    def at_eof(self) -> bool:
        return self.sock.recv(1) == b""

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"daemon closed the connection after {len(data)} of {n} bytes")
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


class Workspace:
    """A temp dir with a formatted image; starts daemons on it."""

    def __init__(self, tmp_path: Path, image_size: int = 16 << 20) -> None:
        self.dir = short_tempdir()
        self.image = make_image(tmp_path / "state.img", image_size)
        self.socket = os.path.join(self.dir, "statefs.sock")
        self.audit = str(tmp_path / "audit.jsonl")
        self.daemons: list[Daemon] = []

    def start(self, **kw) -> Daemon:
        kw.setdefault("audit", self.audit)
        daemon = Daemon(kw.pop("image", self.image), kw.pop("socket", self.socket), **kw)
        self.daemons.append(daemon)
        return daemon

    def cleanup(self) -> None:
        for daemon in self.daemons:
            if daemon.proc.poll() is None:
                daemon.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ------------------------------------------------------------------ fixtures
# Imported by the conftest.py of tests/daemon and tests/cli.

@pytest.fixture
def ws(tmp_path):
    workspace = Workspace(tmp_path)
    yield workspace
    workspace.cleanup()


@pytest.fixture
def daemon(ws):
    return ws.start()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    """One daemon for the tests of a module that only need their own keys."""
    # Big enough for several full-size (8 MiB) values in one log region.
    workspace = Workspace(tmp_path_factory.mktemp("shared"), image_size=96 << 20)
    yield workspace.start()
    workspace.cleanup()
