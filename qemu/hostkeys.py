"""The guest's keys on the host: keystored run on the key file of the guest's key disk.

An encrypted guest keeps keystored's state on its own ext4 disk (/dev/vdb, see
run_guest.make_state_disk), so the payload key never touches the StateFS image. To read
an encrypted image after the guest is gone, the host copies ``identity.key`` out of
that disk image (debugfs: no mount, no root-only loop device) and starts its own
keystored on the copy. Everything then goes through keystored as in the guest:
statefsd's key provider and fsck-statefs ``--keystore-socket`` derive the same key.

  with HostKeystore.from_state_disk(keys_img, workdir) as ks:
      engine = Engine.mount(FileDevice(img), key_provider=keystore_key_provider(ks.socket))

  qemu/hostkeys.py --state-disk keys.img -- fsck-statefs disk.img --keystore-socket {socket}

``HostKeystore.fresh(workdir)`` instead lets keystored create a new identity: the host
formats an encrypted image with it, then writes the key file into a new key disk
(``make_state_disk(..., files={FILE_NAME: ks.key_file()})``) for the guest to boot with.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keystored.keyfile import FILE_NAME  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
READY_LINE = b"keystored: ready"
START_TIMEOUT = 60.0


class HostKeystoreError(Exception):
    pass


def repo_env() -> dict[str, str]:
    """The environment for a tool this harness starts: this checkout's code first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def read_state_file(state_disk: Path | str, name: str) -> bytes:
    """The bytes of /``name`` on an ext4 key disk image, read with debugfs (no mount)."""
    run = subprocess.run(["debugfs", "-R", f"cat /{name}", str(state_disk)],
                         capture_output=True, timeout=60)
    # debugfs exits 0 even when the file is missing; it only says so on stderr.
    if run.returncode != 0 or not run.stdout:
        why = run.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {run.returncode}"]
        raise HostKeystoreError(f"cannot read /{name} from the key disk {state_disk}: {why[0]}")
    return run.stdout


class HostKeystore:
    """A keystored process on the host, on ``state_dir``; stopped by close()."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A Unix socket path is limited to 107 bytes; a short directory of its own keeps
        # it valid whatever the caller's work directory is.
        self._sock_dir = tempfile.mkdtemp(prefix="sfks-")
        self.socket = os.path.join(self._sock_dir, "ks.sock")
        self.proc: subprocess.Popen | None = None
        self.log = self.state_dir.parent / f"{self.state_dir.name}.keystored.log"

    @classmethod
    def fresh(cls, state_dir: Path) -> "HostKeystore":
        """keystored on an empty directory: it creates a new device identity."""
        return cls(state_dir)

    @classmethod
    def from_state_disk(cls, state_disk: Path | str, state_dir: Path) -> "HostKeystore":
        """keystored on a copy of the key file that sits on the guest's key disk."""
        data = read_state_file(state_disk, FILE_NAME)
        ks = cls(state_dir)
        path = ks.state_dir / FILE_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return ks

    def key_file(self) -> bytes:
        return (self.state_dir / FILE_NAME).read_bytes()

    def start(self) -> "HostKeystore":
        cmd = [sys.executable, "-m", "keystored", "--state-dir", str(self.state_dir),
               "--socket", self.socket]
        self._log_fh = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                     stderr=self._log_fh, env=repo_env())
        deadline = time.monotonic() + START_TIMEOUT
        while READY_LINE not in self.log.read_bytes():
            if self.proc.poll() is not None:
                tail = self.log.read_bytes().decode(errors="replace").strip().splitlines()[-2:]
                self.close()
                raise HostKeystoreError(f"keystored on {self.state_dir} exited "
                                        f"{self.proc.returncode} before it was ready: {' / '.join(tail)}")
            if time.monotonic() > deadline:
                self.close()
                raise HostKeystoreError(f"keystored on {self.state_dir} not ready in {START_TIMEOUT} s")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log_fh", None):
            self._log_fh.close()
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    def __enter__(self) -> "HostKeystore":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """Run one command with a host keystored on the key file of a guest's key disk."""
    import argparse
    ap = argparse.ArgumentParser(
        description="Run COMMAND with a keystored on the host serving the key file of a guest's "
                    "key disk; the argument {socket} in COMMAND becomes its socket path.",
        usage="%(prog)s --state-disk KEYS.img -- COMMAND [ARG|{socket}]...")
    ap.add_argument("--state-disk", required=True, type=Path, help="the guest's ext4 key disk image")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no COMMAND given (put it after --)")
    work = Path(tempfile.mkdtemp(prefix="statefs-hostkeys-"))
    try:
        with HostKeystore.from_state_disk(args.state_disk, work / "keys") as ks:
            return subprocess.run([ks.socket if a == "{socket}" else a for a in command],
                                  env=repo_env()).returncode
    except HostKeystoreError as exc:
        print(f"hostkeys: {exc}", file=sys.stderr)
        return 8  # fsck(8)'s "operational error": the check could not run
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
