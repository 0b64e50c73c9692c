"""Real remote stores on loopback for the remote tests: ``rclone serve sftp``
with key authentication both ways (the server accepts only the client key
in its authorized_keys; the client pins the server's host key in a
known_hosts file) and ``rclone serve webdav`` with basic auth. Each serves
a temporary directory and is stopped (and waited for) at teardown.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.loopback import accepts, free_ports, write_ssh_key
from statefsd.errors import StateFSError
from statefsd.replica.rclone import Rclone, find_binary


def rclone_binary() -> str:
    try:
        return find_binary()
    except StateFSError as exc:
        pytest.skip(f"rclone is not installed ({exc.hint})")


class Served:
    """One ``rclone serve`` child on 127.0.0.1, ready once its port accepts."""

    def __init__(self, binary: str, workdir: Path, argv: list[str], root: Path) -> None:
        self.root = root
        self.log_path = workdir / f"serve-{argv[0]}.log"
        empty = workdir / "server-rclone.conf"   # never the user's config, on either side
        empty.touch()
        for _ in range(5):   # another process may take the free port before rclone binds it
            self.port = free_ports(1)[0]
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    # No directory cache: tests change the served tree behind the server's back.
                    [binary, "--config", str(empty), "serve", *argv, "--addr", f"127.0.0.1:{self.port}",
                     "--dir-cache-time", "0s", str(root)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env={k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")})
            deadline = time.monotonic() + 20
            while self.proc.poll() is None and not accepts(self.port) and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.proc.poll() is None and accepts(self.port):
                return
            self.stop()
            if "address already in use" not in self.log_path.read_text(errors="replace"):
                break
        raise RuntimeError(f"rclone serve {argv[0]} did not start:\n{self.log_path.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class SftpServer:
    served: Served
    client_key: Path
    known_hosts: Path
    user: str = "statefs"

    @property
    def root(self) -> Path:
        return self.served.root

    def spec(self, path: str = "backup", *, known_hosts: Path | None = None, key: Path | None = None) -> str:
        return (f":sftp,host=127.0.0.1,port={self.served.port},user={self.user},"
                f"key_file={key or self.client_key},known_hosts_file={known_hosts or self.known_hosts}:{path}")

    def stop(self) -> None:
        self.served.stop()


@dataclass
class WebdavServer:
    served: Served
    user: str
    obscured_password: str

    @property
    def root(self) -> Path:
        return self.served.root

    def spec(self, path: str = "backup") -> str:
        # The URL holds ':' so it is quoted; rclone wants the password obscured.
        return (f":webdav,url='http://127.0.0.1:{self.served.port}',user={self.user},"
                f"pass={self.obscured_password}:{path}")

    def stop(self) -> None:
        self.served.stop()


def start_sftp(binary: str, workdir: Path, root: Path) -> SftpServer:
    workdir.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    host_public = write_ssh_key(workdir / "host_key")
    client_public = write_ssh_key(workdir / "client_key")
    (workdir / "authorized_keys").write_text(client_public + "\n")
    served = Served(binary, workdir, ["sftp", "--key", str(workdir / "host_key"),
                                      "--authorized-keys", str(workdir / "authorized_keys")], root)
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{served.port} {host_public}\n")
    return SftpServer(served, workdir / "client_key", known_hosts)


def start_webdav(binary: str, workdir: Path, root: Path) -> WebdavServer:
    workdir.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    password = secrets.token_hex(12)   # a leading "-" would read as an rclone flag
    obscured = subprocess.run([binary, "obscure", password], capture_output=True, check=True,
                              text=True).stdout.strip()
    served = Served(binary, workdir, ["webdav", "--user", "statefs", "--pass", password], root)
    return WebdavServer(served, "statefs", obscured)


@contextmanager
def small_filesystem(path: Path, size: str = "2m"):
    """A tmpfs of ``size`` at ``path``: a server whose disk really fills."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def kill_rclone_children(config_path: Path) -> int:
    """SIGKILL this process's rclone children that use ``config_path``
    (an upload in flight); returns how many."""
    killed = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and str(config_path).encode() in cmdline:
            os.kill(int(entry.name), signal.SIGKILL)
            killed += 1
    return killed


@pytest.fixture
def rclone(tmp_path) -> Rclone:
    """The product's settings (retries included: rclone serve webdav answers
    two uploads that create one directory at once with 423 Locked)."""
    return Rclone(rclone_binary(), tmp_path / "state" / "rclone.conf")


@pytest.fixture
def sftp_server(tmp_path):
    server = start_sftp(rclone_binary(), tmp_path / "sftp", tmp_path / "sftp-root")
    yield server
    server.stop()


@pytest.fixture
def webdav_server(tmp_path):
    server = start_webdav(rclone_binary(), tmp_path / "webdav", tmp_path / "webdav-root")
    yield server
    server.stop()


@pytest.fixture(params=["sftp", "webdav"])
def any_server(request, tmp_path):
    """Each remote kind in turn."""
    start = start_sftp if request.param == "sftp" else start_webdav
    server = start(rclone_binary(), tmp_path / request.param, tmp_path / f"{request.param}-root")
    yield server
    server.stop()
