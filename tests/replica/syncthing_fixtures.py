"""Real Syncthing instances on loopback for the replication tests.

Each instance has its own home (keys, config, database), its own API and
listen ports on 127.0.0.1, and discovery, relays, NAT and reporting off
(statefsd.replica.syncthing.start_instance). Instances lead their own
process group and are killed with it at teardown, whatever the test did.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from bench.loopback import free_ports
from statefsd.replica import syncthing


@dataclass
class Instance:
    name: str
    home: str
    gui_port: int
    listen_port: int
    proc: subprocess.Popen | None = None
    st: syncthing.Syncthing | None = None
    id: str = ""
    log: list = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.listen_port}"

    def start(self) -> "Instance":
        self.proc, self.st = syncthing.start_instance(self.home, self.gui_port, self.listen_port, name=self.name)
        self.id = self.st.device_id()
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut would end it."""
        if self.proc is not None:
            syncthing.stop_instance(self.proc, kill=True)

    def stop(self) -> None:
        if self.proc is not None:
            syncthing.stop_instance(self.proc)


def require_syncthing() -> None:
    if syncthing.binary() is None:
        pytest.skip("syncthing is not installed (scripts/setup installs Debian's 'syncthing'; "
                    "it could not be installed here)")


def start_cluster(base: str, names: tuple[str, ...]) -> dict[str, Instance]:
    """Starts one instance per name (in parallel: each takes a second or
    two), homes under ``base``."""
    require_syncthing()
    ports = free_ports(2 * len(names))
    instances = {name: Instance(name, os.path.join(base, name), ports[2 * i], ports[2 * i + 1])
                 for i, name in enumerate(names)}
    with ThreadPoolExecutor(len(names)) as pool:
        futures = [pool.submit(inst.start) for inst in instances.values()]
        errors = [f.exception() for f in futures]
    if any(errors):
        stop_cluster(instances)
        raise next(e for e in errors if e)
    return instances


def stop_cluster(instances: dict[str, Instance]) -> None:
    for inst in instances.values():
        inst.kill()


def connect(a: Instance, b: Instance) -> None:
    """Each knows the other's device id and address."""
    a.st.add_device(b.id, b.address, name=b.name)
    b.st.add_device(a.id, a.address, name=a.name)


def wait_for(condition, timeout: float = 30.0, what: str = "condition", interval: float = 0.2):
    """Polls ``condition`` until it returns something true; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def tree(root: str, *, skip: tuple[str, ...] = (syncthing.MARKER,)) -> dict[str, bytes]:
    """Relative path -> bytes of every regular file under ``root``, without
    Syncthing's marker and temporary files."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            if name.startswith(".syncthing.") or name in skip:
                continue
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
    return out


def wipe(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
