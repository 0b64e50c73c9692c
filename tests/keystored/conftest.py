"""Real keystored processes on real sockets, for the tests in this folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import pytest

from keystored.client import KeystoreClient
from tests.uidswitch import AsUid, run_as_uid

REPO = Path(__file__).resolve().parents[2]
READY_LINE = "keystored: ready"
START_TIMEOUT = 20.0


class Keystored:
    """One running (or exited) keystored and what it printed on stderr."""

    def __init__(self, args: list[str], env: dict[str, str], socket_path: str, state_dir: Path) -> None:
        self.socket = socket_path
        self.state_dir = state_dir
        self.key_path = Path(state_dir) / "identity.key"
        self._lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keystored", *args], env=env, cwd=REPO,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self._lines)

    def log_events(self, event: str) -> list[dict]:
        return [e for e in map(_json_or_none, self._lines) if e and e.get("event") == event]

    def wait_log_events(self, event: str, count: int, timeout: float = 5.0) -> list[dict]:
        """The ``event`` lines once ``count`` of them arrived (stderr is read by another thread)."""
        deadline = time.monotonic() + timeout
        while len(found := self.log_events(event)) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return found

    def wait_ready(self) -> "Keystored":
        deadline = time.monotonic() + START_TIMEOUT
        while READY_LINE not in self._lines:
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"keystored exited {self.proc.returncode} before ready:\n{self.stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"keystored not ready after {START_TIMEOUT}s:\n{self.stderr}")
            time.sleep(0.02)
        return self

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait_exit()

    def client(self, timeout: float = 5.0) -> KeystoreClient:
        return KeystoreClient(self.socket, timeout=timeout)


def _json_or_none(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Launcher:
    """Starts keystored processes sharing one state dir and socket path by default."""

    def __init__(self, state_dir: Path, sock_dir: str) -> None:
        self.state_dir = state_dir
        self.socket = os.path.join(sock_dir, "keystored.sock")
        self.sock_dir = sock_dir
        self._procs: list[Keystored] = []

    def spawn(self, *extra: str, env: dict[str, str] | None = None, state_dir: Path | None = None,
              socket_path: str | None = None) -> Keystored:
        state_dir = state_dir or self.state_dir
        socket_path = socket_path or self.socket
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("STATEFS_KEY_PASSPHRASE", "NOTIFY_SOCKET", "KEYSTORED_TEST_ENTROPY_NOT_READY")}
        full_env["PYTHONPATH"] = str(REPO)
        full_env.update(env or {})
        args = ["--state-dir", str(state_dir), "--socket", socket_path, *extra]
        proc = Keystored(args, full_env, socket_path, state_dir)
        self._procs.append(proc)
        return proc

    def start(self, *extra: str, **kw) -> Keystored:
        return self.spawn(*extra, **kw).wait_ready()

    def fail(self, *extra: str, **kw) -> Keystored:
        """Run a keystored that must refuse to start; returns it after it exited."""
        proc = self.spawn(*extra, **kw)
        proc.wait_exit()
        return proc

    def cleanup(self) -> None:
        for proc in self._procs:
            if proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait(10)


def _make_sock_dir() -> str:
    # Short path (sun_path is 108 bytes) that uid 65534 can traverse.
    path = tempfile.mkdtemp(prefix="ks-", dir="/tmp")
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def sock_dir():
    path = _make_sock_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def launcher(tmp_path, sock_dir):
    launcher = Launcher(tmp_path / "state", sock_dir)
    yield launcher
    launcher.cleanup()


@pytest.fixture
def keystored(launcher) -> Keystored:
    return launcher.start()


@pytest.fixture(scope="module")
def shared_keystored(tmp_path_factory):
    """One daemon for a module's tests that neither stop it nor count its log lines."""
    path = _make_sock_dir()
    launcher = Launcher(tmp_path_factory.mktemp("shared") / "state", path)
    yield launcher.start()
    launcher.cleanup()
    shutil.rmtree(path, ignore_errors=True)


def exchange(socket_path: str, *frames: bytes, timeout: float = 5.0) -> list[dict | None]:
    """Send raw bytes frame by frame on one connection; the decoded reply to each (None on EOF)."""
    replies: list[dict | None] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        for data in frames:
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # keystored may answer and hang up before reading (EBUSY): read its reply
            header = _recv(s, 4)
            if header is None:
                replies.append(None)
                break
            replies.append(msgpack.unpackb(_recv(s, struct.unpack(">I", header)[0]), raw=False))
    return replies


def _recv(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def request(**fields) -> bytes:
    return frame(msgpack.packb(fields, use_bin_type=True))


@pytest.fixture
def helpers():
    """The raw-socket helpers, for tests that speak the protocol by hand."""
    class H:
        pass
    H.exchange = staticmethod(exchange)
    H.frame = staticmethod(frame)
    H.request = staticmethod(request)
    H.run_as_uid = staticmethod(run_as_uid)
    H.AsUid = AsUid
    return H
