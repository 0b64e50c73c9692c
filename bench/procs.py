"""Start and stop the real daemons (statefsd, keystored) the bench talks to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh_image(path: str, size: int, *, encryption: str = "off", redundancy: str = "parity") -> None:
    """A freshly formatted image. The file is created (zero-filled) only
    once; re-formatting starts a new log epoch, so earlier records are stale
    and the pre-written space keeps commits free of file-system metadata."""
    if not os.path.exists(path) or os.path.getsize(path) != size:
        create_image(path, size)
    with FileDevice(path) as device:
        Engine.mkfs(device, encryption=encryption, redundancy=redundancy)


def child_env() -> dict:
    env = dict(os.environ)
    extra = env.get("PYTHONPATH")
    env["PYTHONPATH"] = REPO + (os.pathsep + extra if extra else "")
    return env


class Process:
    """A child daemon whose output goes to a log file; ready when that file
    shows ``marker``."""

    def __init__(self, argv: list[str], log_path: str, marker: str, timeout: float = 60.0) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=REPO, env=child_env())
        deadline = time.monotonic() + timeout
        while marker not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[1]} exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[1]} not ready after {timeout}s:\n{self.output()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def memory(self) -> dict:
        """VmRSS and VmHWM in bytes, from /proc/PID/status."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[name] = int(rest.split()[0]) * 1024  # the kernel reports kB
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def statefsd(image: str, socket_path: str, *, keystore: str | None = None,
             audit: str | None = None) -> Process:
    argv = ["-m", "statefsd.daemon", "--image", image, "--socket", socket_path]
    if keystore:
        argv += ["--keystore-socket", keystore]
    if audit:
        argv += ["--audit", audit]
    return Process(argv, socket_path + ".log", "ready")


def keystored(state_dir: str, socket_path: str) -> Process:
    return Process(["-m", "keystored", "--state-dir", state_dir, "--socket", socket_path],
                   socket_path + ".log", "keystored: ready")


class ToolFailed(Exception):
    """A measured command exited with a non-zero status."""


RUSAGE_EXEC = os.path.join(REPO, "bench", "rusage_exec.py")


def run_measured(argv: list[str], *, env: dict, cwd: str, timeout: float = 3600.0) -> dict:
    """Run one command; its wall seconds, its peak RSS (its own wait4
    rusage, through rusage_exec.py: a child of this process would report
    this process's peak) and its output. Raises ToolFailed with the tail of
    its stderr on a non-zero exit."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(suffix=".json") as usage:
        proc = subprocess.Popen([sys.executable, "-I", "-S", RUSAGE_EXEC, usage.name, *argv], stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL, cwd=cwd, env=env, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
        measured = json.loads(usage.read() or b"{}")
    if proc.returncode != 0 or not measured:
        raise ToolFailed(f"{' '.join([os.path.basename(argv[0]), *argv[1:6]])} exited with {proc.returncode}: "
                         f"{stderr.strip()[-1500:] or stdout.strip()[-1500:]}")
    return {"seconds": measured["seconds"], "rss_bytes": measured["maxrss_kib"] * 1024,
            "stdout": stdout, "stderr": stderr}
