"""An SFTP remote on loopback: ``rclone serve sftp`` on 127.0.0.1 with key
authentication both ways, the form ``statefs remote add`` demands (the
server accepts only the client key in its authorized_keys; the client pins
the server's host key in a known_hosts file).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def write_ssh_key(path: str) -> str:
    """An Ed25519 private key in OpenSSH format at ``path`` (mode 600);
    returns the public key line ("ssh-ed25519 AAAA...")."""
    key = Ed25519PrivateKey.generate()
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                  serialization.NoEncryption()))
    os.chmod(path, 0o600)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class SftpServer:
    proc: subprocess.Popen
    port: int
    root: str
    client_key: str
    known_hosts: str
    log_path: str
    user: str = "statefs"

    def spec(self, path: str) -> str:
        """An rclone connection string for ``path`` under the served root."""
        return (f":sftp,host=127.0.0.1,port={self.port},user={self.user},"
                f"key_file={self.client_key},known_hosts_file={self.known_hosts}:{path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_sftp(binary: str, workdir: str, root: str, *, timeout: float = 20.0) -> SftpServer:
    """Serves ``root`` over SFTP on a free port of 127.0.0.1; returns once
    the port accepts connections. Keys and logs go to ``workdir``."""
    os.makedirs(workdir, exist_ok=True)
    os.makedirs(root, exist_ok=True)
    host_public = write_ssh_key(os.path.join(workdir, "host_key"))
    client_public = write_ssh_key(os.path.join(workdir, "client_key"))
    authorized = os.path.join(workdir, "authorized_keys")
    with open(authorized, "w") as f:
        f.write(client_public + "\n")
    empty = os.path.join(workdir, "server-rclone.conf")   # never the user's config
    open(empty, "a").close()
    log_path = os.path.join(workdir, "serve-sftp.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
    for _ in range(5):   # another process may take the free port before rclone binds it
        [port] = free_ports(1)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [binary, "--config", empty, "serve", "sftp", "--key", os.path.join(workdir, "host_key"),
                 "--authorized-keys", authorized, "--addr", f"127.0.0.1:{port}", root],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not accepts(port) and time.monotonic() < deadline:
            time.sleep(0.02)
        known_hosts = os.path.join(workdir, "known_hosts")
        with open(known_hosts, "w") as f:
            f.write(f"[127.0.0.1]:{port} {host_public}\n")
        server = SftpServer(proc, port, root, os.path.join(workdir, "client_key"), known_hosts, log_path)
        if proc.poll() is None and accepts(port):
            return server
        server.stop()
        with open(log_path, errors="replace") as f:
            log_text = f.read()
        if "address already in use" not in log_text:
            raise RuntimeError(f"rclone serve sftp did not start:\n{log_text[-2000:]}")
    raise RuntimeError("rclone serve sftp found no free port on 127.0.0.1")
