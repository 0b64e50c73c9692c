"""The bench's working directory and the StateFS daemons served from it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from bench import procs
from bench.procs import REPO
from bench.stores import StateFSSpec
from statefsd.client import Client


def same_fs_tmpdir(parent: str | None = None) -> str:
    """A fresh directory on the file system that holds the repository, so
    every store is measured on the same disk the project lives on."""
    if parent is None:
        parent = tempfile.gettempdir()
        if os.stat(parent).st_dev != os.stat(REPO).st_dev:
            parent = REPO
    return tempfile.mkdtemp(prefix="statefs-bench-", dir=parent)


class Lab:
    def __init__(self, workdir: str, *, keep: bool = False) -> None:
        self.dir = workdir
        self.keep = keep
        self._keystore: procs.Process | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def keystore_socket(self) -> str:
        if self._keystore is None:
            self._keystore = procs.keystored(self.path("keys"), self.path("keystored.sock"))
        return self.path("keystored.sock")

    @contextlib.contextmanager
    def statefs(self, *, encrypted: bool = False, image_size: int, name: str | None = None,
                audit: bool = False, redundancy: str = "parity"):
        """A freshly formatted image served by a real statefsd; yields
        (spec, daemon process). The image file is reused between calls."""
        name = name or ("enc" if encrypted else "plain") + ("" if redundancy == "parity" else f"-{redundancy}")
        image = self.path(f"{name}.img")
        procs.fresh_image(image, image_size, encryption="on" if encrypted else "off", redundancy=redundancy)
        keystore = self.keystore_socket() if encrypted else None
        audit_path = self.path(f"{name}.audit") if audit else None
        if audit_path and os.path.exists(audit_path):
            os.unlink(audit_path)
        daemon = procs.statefsd(image, self.path(f"{name}.sock"), keystore=keystore, audit=audit_path)
        try:
            yield StateFSSpec(self.path(f"{name}.sock"), "statefs-encrypted" if encrypted else "statefs"), daemon
        except Exception as exc:
            # The daemon's own account (a traceback, audit lines) is the useful part.
            tail = f"{exc}\n--- statefsd log tail ---\n{daemon.output()[-3000:]}"
            if audit_path and os.path.exists(audit_path):
                with open(audit_path, encoding="utf-8", errors="replace") as f:
                    tail += f"\n--- audit journal tail ---\n{''.join(f.readlines()[-10:])}"
            raise RuntimeError(tail) from exc
        finally:
            daemon.stop()

    def close(self) -> None:
        if self._keystore is not None:
            self._keystore.stop()
            self._keystore = None
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def server_info(spec: StateFSSpec) -> dict:
    with Client(spec.socket) as client:
        return client.info()
