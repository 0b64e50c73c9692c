"""Boot the StateFS guest under QEMU (TCG, never KVM) and collect its serial console.

  .venv/bin/python qemu/run_guest.py --mode smoke --disk /tmp/d.img --create 64M [--echo]

As a library:

  with Guest(disk, "crashloop", enc=False) as g:
      g.wait_for(r"ACK \\d+", timeout=60)   # seconds since boot
      g.kill()                             # SIGKILL: the guest crashes mid-write
  text = g.serial()                        # everything the guest printed before the kill

Disks: ``disk`` becomes /dev/vda (the StateFS image); ``state_disk`` (ext4, see
make_state_disk) becomes /dev/vdb and keeps keystored's keys across boots.
``log_writes=PATH`` puts QEMU's blklogwrites driver between vda and the image: every
write and flush the guest issues is recorded, in order, in PATH (dm-log-writes format,
read it with qemu/logwrites.py). Its default unit, 512 bytes, is the guest's own write
granularity: with a larger log sector QEMU read-modify-writes smaller writes, so the log
would show merged neighbours instead of what the guest wrote.

QEMU always dies with the Guest: close() (also run by the with-block and by run_guest)
kills it, so a failing harness never leaves a VM holding the image lock.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `qemu.*` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu.qmp import QMPClient  # noqa: E402

from qemu import build_guest  # noqa: E402

# isa-debug-exit: the guest writes its status to port 0xf4, QEMU exits with (status << 1) | 1.
DEBUG_EXIT_PORT = 0xF4


class GuestTimeout(Exception):
    pass


@dataclass
class GuestResult:
    returncode: int            # QEMU's exit status (negative: killed by that signal)
    guest_status: int | None   # the guest program's exit status, when it reported one
    timed_out: bool
    seconds: float
    serial: str                # console text, CRLF turned into LF

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.guest_status == 0


def make_disk(path: Path, size: int) -> None:
    """A fresh sparse raw image (zeros): what the guest formats with --mkfs."""
    with open(path, "wb") as fh:
        fh.truncate(size)


def make_state_disk(path: Path, size: int = 16 << 20, files: dict[str, bytes] | None = None) -> None:
    """An ext4 image for the guest's persistent state (/dev/vdb -> /run/keys).

    ``files`` (name -> bytes, mode 0600) are put in its root directory, e.g. a keystored
    key file made on the host; qemu/hostkeys.py reads them back after the guest ran.
    """
    make_disk(path, size)
    cmd = ["mkfs.ext4", "-q", "-F", "-L", "statefs-keys"]
    with tempfile.TemporaryDirectory(prefix="statefs-keydisk-") as tree:
        if files:
            for name, data in files.items():
                fd = os.open(os.path.join(tree, name), os.O_WRONLY | os.O_CREAT, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            os.chmod(tree, 0o700)  # the root directory of the disk becomes keystored's state dir
            cmd += ["-d", tree]
        subprocess.run(cmd + [str(path)], check=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 64M)")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


class Guest:
    def __init__(self, disk: Path | str, mode: str, enc: bool = False, *,
                 state_disk: Path | str | None = None, log_writes: Path | str | None = None,
                 log_sector_size: int = 512, workdir: Path | str | None = None,
                 memory_mb: int = 1024, echo: bool = False, append: str = ""):
        self.disk = Path(disk)
        self.mode = mode
        self.enc = enc
        self.state_disk = Path(state_disk) if state_disk else None
        self.log_writes = Path(log_writes) if log_writes else None
        self.log_sector_size = log_sector_size
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="statefs-guest-")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log = self.workdir / "serial.log"
        self.qmp_socket = self.workdir / "qmp.sock"
        self.memory_mb = memory_mb
        self.echo = echo
        self.append = append
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self._buf = bytearray()
        self._read_pos = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._qmp: QMPClient | None = None

    # -------------------------------------------------------------- lifecycle

    def command(self, info: dict) -> list[str]:
        append = (f"console=ttyS0 panic=-1 quiet statefs.mode={self.mode} "
                  f"statefs.enc={'on' if self.enc else 'off'} {self.append}").strip()
        cmd = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(self.memory_mb), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", info["vmlinux"], "-initrd", info["initrd"], "-append", append,
            "-serial", f"file:{self.serial_log}",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=0x04",
        ]
        # Explicit PCI slots keep the names stable: vda, then vdb, whatever else is added.
        cmd += ["-blockdev", f"driver=file,filename={self.disk},node-name=vda-file,"
                             "cache.direct=on,aio=native"]
        drive = "vda-file"
        if self.log_writes:
            cmd += ["-blockdev", f"driver=file,filename={self.log_writes},node-name=vda-log",
                    "-blockdev", "driver=blklogwrites,file=vda-file,log=vda-log,node-name=vda-lw,"
                                 f"log-sector-size={self.log_sector_size}"]
            drive = "vda-lw"
        cmd += ["-device", f"virtio-blk-pci,drive={drive},addr=0x4"]
        if self.state_disk:
            cmd += ["-blockdev", f"driver=file,filename={self.state_disk},node-name=vdb-file,"
                                 "cache.direct=on,aio=native",
                    "-device", "virtio-blk-pci,drive=vdb-file,addr=0x5"]
        cmd += ["-device", "virtio-rng-pci,addr=0x6"]  # else Python waits ~1.5 s for entropy
        return cmd

    def start(self) -> "Guest":
        info = build_guest.build()  # cached: only rebuilds what changed
        self.serial_log.write_bytes(b"")
        if self.log_writes:
            make_disk(self.log_writes, 0)  # a fresh log: blklogwrites writes a new superblock
        self._stderr = open(self.workdir / "qemu.stderr", "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.command(info), stdin=subprocess.DEVNULL,
                                     stdout=self._stderr, stderr=self._stderr)
        return self

    def close(self) -> None:
        """Kill QEMU if it still runs; always safe to call."""
        try:
            if self._qmp is not None and self._loop is not None:
                try:
                    self._loop.run_until_complete(asyncio.wait_for(self._qmp.disconnect(), 5))
                except Exception:
                    pass
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        finally:
            if self._loop is not None:
                self._loop.close()
                self._loop = None
            self._qmp = None
            if getattr(self, "_stderr", None):
                self._stderr.close()
            self._pump()

    def __enter__(self) -> "Guest":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def kill(self) -> None:
        """SIGKILL QEMU: the guest stops between two instructions, like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._pump()

    # -------------------------------------------------------------- console

    def _pump(self) -> None:
        """Read what QEMU appended to the serial log since the last call."""
        try:
            with open(self.serial_log, "rb") as fh:
                fh.seek(self._read_pos)
                new = fh.read()
        except FileNotFoundError:
            return
        self._read_pos += len(new)
        self._buf += new
        if self.echo and new:
            sys.stdout.write(new.replace(b"\r\n", b"\n").decode("utf-8", "replace"))
            sys.stdout.flush()

    def serial(self) -> str:
        self._pump()
        return self._buf.replace(b"\r\n", b"\n").decode("utf-8", "replace")

    def wait_for(self, pattern: str | re.Pattern, timeout: float) -> float:
        """Seconds since start when `pattern` first appeared on the console.

        A str pattern is compiled with re.MULTILINE (^ and $ match at line ends). Only
        lines not yet searched by this call are searched again, so waiting is cheap
        even on a long console. Raises GuestTimeout if the pattern did not appear in
        time or QEMU exited first.
        """
        rx = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        start = 0
        while True:
            exited = self.proc.poll() is not None
            text = self.serial()
            if rx.search(text, start):
                return time.monotonic() - self.started
            start = text.rfind("\n") + 1  # resume at the last, maybe incomplete, line
            if exited:
                raise GuestTimeout(f"QEMU exited ({self.proc.returncode}) before {rx.pattern!r}")
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{rx.pattern!r} not seen within {timeout} s")
            time.sleep(0.05)

    def wait(self, timeout: float) -> GuestResult:
        """Wait for QEMU to exit (the guest powers off); kill it after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        timed_out = False
        while self.proc.poll() is None:
            self._pump()
            if time.monotonic() > deadline:
                timed_out = True
                self.kill()
                break
            time.sleep(0.05)
        rc = self.proc.returncode
        status = rc >> 1 if rc > 0 and rc & 1 else None
        return GuestResult(returncode=rc, guest_status=status, timed_out=timed_out,
                           seconds=time.monotonic() - self.started, serial=self.serial())

    # -------------------------------------------------------------- QMP

    def qmp(self, command: str, **arguments) -> object:
        """Run one QMP command (e.g. "query-status", "query-blockstats", "quit")."""
        if self._qmp is None:
            self._loop = asyncio.new_event_loop()
            self._qmp = QMPClient("statefs-harness")
            self._loop.run_until_complete(self._connect())
        return self._loop.run_until_complete(self._qmp.execute(command, arguments or None))

    async def _connect(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                await self._qmp.connect(str(self.qmp_socket))
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                await asyncio.sleep(0.05)


def run_guest(disk: Path | str, mode: str, enc: bool = False, *, timeout: float = 120,
              **kw) -> GuestResult:
    """Boot, wait for power-off (or the timeout), return the console; QEMU never outlives it."""
    guest = Guest(disk, mode, enc, **kw)
    try:
        guest.start()
        return guest.wait(timeout)
    finally:
        guest.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Boot the StateFS guest under QEMU/TCG.")
    ap.add_argument("--mode", required=True,
                    help="smoke, selftest, persist, crashloop or writetest")
    ap.add_argument("--enc", choices=("on", "off"), default="off")
    ap.add_argument("--disk", required=True, type=Path, help="raw image for /dev/vda")
    ap.add_argument("--create", type=parse_size, metavar="SIZE",
                    help="first create a fresh zeroed disk of SIZE (e.g. 64M)")
    ap.add_argument("--state-disk", type=Path,
                    help="ext4 image for /dev/vdb (keystored's keys); created if missing")
    ap.add_argument("--log-writes", type=Path, metavar="LOG",
                    help="record the guest's writes and flushes to LOG (dm-log-writes format)")
    ap.add_argument("--serial-log", type=Path, help="also copy the console to this file")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--echo", action="store_true", help="stream the console while it runs")
    args = ap.parse_args(argv)

    if args.create:
        make_disk(args.disk, args.create)
    if args.state_disk and not args.state_disk.exists():
        make_state_disk(args.state_disk)
    res = run_guest(args.disk, args.mode, args.enc == "on", timeout=args.timeout,
                    state_disk=args.state_disk, log_writes=args.log_writes, echo=args.echo)
    if args.serial_log:
        args.serial_log.write_text(res.serial)
    if not args.echo:
        sys.stdout.write(res.serial)
    how = ("timed out" if res.timed_out else
           f"guest status {res.guest_status}" if res.guest_status is not None else
           f"qemu exit {res.returncode} (no guest status)")
    print(f"run_guest: {args.mode} enc={args.enc}: {how} after {res.seconds:.1f} s",
          file=sys.stderr)
    if res.timed_out:
        return 124
    return res.guest_status if res.guest_status is not None else 125


if __name__ == "__main__":
    sys.exit(main())
