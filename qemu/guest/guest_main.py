"""The guest program: runs one StateFS scenario inside the QEMU guest.

/init starts it as ``python guest_main.py --mode MODE --enc on|off`` with MODE and the
encryption switch taken from the kernel command line (statefs.mode=, statefs.enc=).
Everything printed lands on the serial console, where the host looks for markers.

This file is the whole interface between the guest and statefsd/keystored: the command
lines below are the only place that names their flags.

Disks: /dev/vda is the StateFS image. /dev/vdb, when present, is an ext4 "state disk"
mounted at /run/keys so keystored's keys survive a reboot (needed by `persist` with
encryption on). Exit status: that of the scenario's main command (1 if setup failed).
"""

from __future__ import annotations

import argparse
import importlib.util
import mmap
import os
import subprocess
import sys
import time

IMAGE = "/dev/vda"
STATE_DISK = "/dev/vdb"
KEYS_DIR = "/run/keys"
KEYSTORE_SOCKET = "/run/keystored.sock"


def statefsd(python: str, *flags: str, enc: bool) -> list[str]:
    cmd = [python, "-m", "statefsd.daemon", *flags, "--image", IMAGE]
    if enc:
        cmd += ["--encryption", "on", "--keystore-socket", KEYSTORE_SOCKET]
    return cmd


def scenario(mode: str, python: str, enc: bool) -> list[str] | None:
    """The main command of each mode; None for modes run in-process."""
    if mode == "smoke":
        return [python, "-c",
                'import statefsd.errors, cryptography, nacl; print("SELFTEST: smoke ok")']
    if mode == "selftest":  # first boot: format, then the engine's own checks
        return statefsd(python, "--selftest", "--mkfs", enc=enc)
    if mode == "persist":  # second boot of the same disk
        return statefsd(python, "--selftest-persist", enc=enc)
    if mode == "crashloop":  # prints "ACK <txn_id> <key>" per durable txn; host kills the VM
        return statefsd(python, "--crash-writer", enc=enc)
    return None


MODES = ("smoke", "selftest", "persist", "crashloop", "writetest")


def say(msg: str) -> None:
    print(f"GUEST: {msg}", flush=True)


def run(cmd: list[str]) -> int:
    say("run " + " ".join(cmd))
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        say(f"command failed (exit {rc}): {' '.join(cmd)}")
    return rc


WRITETEST_ROUNDS = 8
WRITETEST_DIRECT_OFFSET = 1536


def writetest() -> int:
    """Known writes, each followed by fsync: checks the host's dm-log-writes parser.

    Round i writes 4 KiB of byte (i + 1) at offset i * 64 KiB through the page cache,
    then fsyncs (one virtio FLUSH). Last, one 512-byte O_DIRECT write of 0xAA at
    byte 1536 and an fsync: the log must show it as a single 512-byte write.
    """
    fd = os.open(IMAGE, os.O_RDWR)
    try:
        for i in range(WRITETEST_ROUNDS):
            os.pwrite(fd, bytes([i + 1]) * 4096, i * 65536)
            os.fsync(fd)
            say(f"writetest round {i} durable")
    finally:
        os.close(fd)
    fd = os.open(IMAGE, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 512)  # O_DIRECT needs an aligned buffer; mmap is page-aligned
        buf.write(b"\xaa" * 512)
        os.pwritev(fd, [buf], WRITETEST_DIRECT_OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)
    print("SELFTEST: writetest ok", flush=True)
    return 0


class Keystore:
    """keystored on the state disk; stopped and unmounted on exit."""

    def __init__(self, python: str):
        self.python = python
        self.proc: subprocess.Popen | None = None
        self.mounted = False

    def __enter__(self) -> "Keystore":
        os.makedirs(KEYS_DIR, exist_ok=True)
        if os.path.exists(STATE_DISK):
            subprocess.run(["modprobe", "-a", "crc32c_generic", "ext4"])
            if subprocess.run(["mount", "-t", "ext4", STATE_DISK, KEYS_DIR]).returncode == 0:
                self.mounted = True
            else:
                say(f"cannot mount {STATE_DISK}; keys will not survive a reboot")
        else:
            say(f"no state disk {STATE_DISK}; keys will not survive a reboot")
        if importlib.util.find_spec("keystored") is None:
            say("keystored module missing; continuing without keystored")
            return self
        cmd = [self.python, "-m", "keystored", "--state-dir", KEYS_DIR,
               "--socket", KEYSTORE_SOCKET]
        say("start " + " ".join(cmd))
        self.proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + 60
        while not os.path.exists(KEYSTORE_SOCKET):
            if self.proc.poll() is not None:
                say(f"command failed (exit {self.proc.returncode}): {' '.join(cmd)}")
                break
            if time.monotonic() > deadline:
                say(f"keystored did not create {KEYSTORE_SOCKET} within 60 s")
                break
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.mounted:
            subprocess.run(["umount", KEYS_DIR])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True)
    ap.add_argument("--enc", choices=("on", "off"), default="off")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)
    say(f"python up mode={args.mode} enc={args.enc}")
    if args.mode not in MODES:
        say(f"unknown mode {args.mode!r}; expected one of {', '.join(MODES)}")
        return 1
    if args.mode == "writetest":
        return writetest()
    cmd = scenario(args.mode, args.python, args.enc == "on")
    if args.enc == "on" and args.mode != "smoke":
        with Keystore(args.python):
            return run(cmd)
    return run(cmd)


if __name__ == "__main__":
    sys.exit(main())
