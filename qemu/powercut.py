"""Real power cuts on a real guest (issue 7): the guest's crash writer, cut and recovered.

  .venv/bin/python qemu/powercut.py [--seed S] [--cycles 3] [--model SPEC] [--keep]
  .venv/bin/python qemu/powercut.py --check-log DIR [--point K] [--outcome CODE]

Encryption is off in both stages (the host would need the guest keystored's key to
recover an encrypted image). The guest runs ``crashloop``: statefsd's crash writer
commits txn n as ``crash/<n>/a`` + ``crash/<n>/b`` and prints ``ACK <txn_id> <n>``
once durable (qemu/powercut_check.py says what a recovered store must look like).

Stage 1, guest crashes: a disk formatted on the host is booted ``--cycles`` times. Each
boot waits for a few ACKs and a random delay (seeded RNG, printed), checks the VM over
QMP (query-status), then crashes it: SIGKILL or QMP ``quit``. The host recovers the
image with the engine after every crash; the next boot recovers it again in the guest.
Every ACK of every cycle must survive. QEMU's writes sit in the host page cache, so
this loses no write the guest issued: it is a crash of the guest, not of its disk.

Stage 2, lost write cache: one more boot of a copy of that disk, with QEMU's
blklogwrites recording every write and flush (qemu/logwrites.py). After the kill, at
each flush point the writes since the previous flush are the pending set, and the
simulated device's crash model (statefsd.simdev, via statefsd.campaign.outcomes)
decides what a power cut leaves of them (qemu/powercut_log.py). Each distinct state is
recovered with the engine and checked; every ACKed txn whose COMMIT was durable at that
flush must be there.

The last line is always ``guest crash states: N, violations: V``; exit status 1 when
V > 0, 2 when a stage could not run. On violations the work directory is kept and a
command reproducing each failing state is printed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from statefsd.blockdev import FileDevice, create_image  # noqa: E402
from statefsd.campaign.outcomes import distinct_outcomes  # noqa: E402
from statefsd.engine import Engine  # noqa: E402
from statefsd.errors import StateFSError  # noqa: E402
from statefsd.simdev import CrashModel, Outcome, SimulatedDevice  # noqa: E402

from qemu import check_markers, logwrites  # noqa: E402
from qemu.powercut_check import acked, check_device  # noqa: E402
from qemu.powercut_log import crash_points  # noqa: E402
from qemu.run_guest import Guest, GuestTimeout, parse_size  # noqa: E402

SUMMARY = "guest crash states: {n}, violations: {v}"
REPO = Path(__file__).resolve().parent.parent
SELF = "qemu/powercut.py"


def say(msg: str) -> None:
    print(f"powercut: {msg}", flush=True)


@dataclass
class Tally:
    show: int = 10
    states: int = 0
    violations: list[str] = field(default_factory=list)
    repro: list[str] = field(default_factory=list)
    broken_by: collections.Counter = field(default_factory=collections.Counter)

    def add(self, where: str, problems: list[str], repro: str = "", *, state: bool = True) -> None:
        """Record one checked crash state (``state``) or a problem outside any state."""
        self.states += state
        if not problems:
            return
        for p in problems:
            if len(self.violations) < self.show:
                say(f"VIOLATION at {where}: {p}")
            self.violations.append(f"{where}: {p}")
        if repro and len(self.repro) < 3:
            self.repro.append(repro)


# ------------------------------------------------------------------ stage 1


def format_disk(path: Path, size: int) -> None:
    create_image(str(path), size)
    with FileDevice(str(path)) as dev:
        Engine.mkfs(dev, encryption="off")


def boot_until_acks(guest: Guest, want: int, timeout: float) -> list[tuple[int, str]]:
    """Wait until the console shows ``want`` ACK lines; the ACKs so far if QEMU exits first."""
    deadline = time.monotonic() + timeout
    while True:
        acks = check_markers.acked_transactions(guest.serial())
        if len(acks) >= want:
            return acks
        if guest.proc.poll() is not None:
            return acks
        if time.monotonic() > deadline:
            raise GuestTimeout(f"{len(acks)} of {want} ACKs within {timeout} s")
        time.sleep(0.05)


def crash(guest: Guest, how: str) -> None:
    """End the VM abruptly: SIGKILL, or QMP quit (stops the VM; no guest shutdown)."""
    if how == "quit":
        try:
            guest.qmp("quit")
        except Exception:  # QEMU may close the socket before answering
            pass
        try:
            guest.proc.wait(30)
        except Exception:
            guest.kill()
    else:
        guest.kill()


def console_problems(serial: str) -> list[str]:
    return [f"guest console: {p}" for p in check_markers.check(serial, "crashloop", enc=False)]


def crash_cycles(disk: Path, work: Path, args, rng: random.Random, tally: Tally) -> None:
    """Stage 1: boot, crash, recover on the host; ``required``: what must survive from now on."""
    required: dict[int, int] = {}
    for cycle in range(1, args.cycles + 1):
        want, delay = crash_moment(rng, args)
        how = rng.choice(("kill", "quit"))
        guest = Guest(disk, "crashloop", workdir=work / f"cycle-{cycle}")
        start = time.monotonic()
        try:
            guest.start()
            acks = boot_until_acks(guest, want, args.timeout)
            if len(acks) >= want:
                time.sleep(delay)
                status = guest.qmp("query-status")
                if status.get("status") != "running":
                    tally.add(f"cycle {cycle}", [f"QMP query-status before the crash: {status}"],
                              state=False)
                crash(guest, how)
        finally:
            guest.close()
        serial = guest.serial()
        (work / f"cycle-{cycle}.serial").write_text(serial)
        acks = acked(check_markers.acked_transactions(serial))
        problems = console_problems(serial)
        if len(acks) < want:
            problems.append(f"the guest stopped after {len(acks)} ACKs (wanted {want}); "
                            f"last console line: {serial.strip().splitlines()[-1:] or ['-']}")
        required.update(acks)
        verdict = check_device(FileDevice(str(disk)), required)
        required.update(verdict.visible)  # durable now: the host's recovery flushed it
        say(f"cycle {cycle}: {len(acks)} ACKs (n {_span(acks)}), waited {want} ACKs + {delay} s, "
            f"{how}; recovered {len(verdict.visible)} txns; "
            f"{'ok' if verdict.ok and not problems else 'VIOLATIONS'} ({time.monotonic() - start:.1f} s)")
        tally.add(f"cycle {cycle} ({how} after {want} ACKs + {delay} s)",
                  problems + verdict.violations, f"{SELF} --seed {args.seed} (timing-dependent)")


def crash_moment(rng: random.Random, args) -> tuple[int, float]:
    """When to cut: after this many ACKs, plus this many seconds."""
    return rng.randint(args.min_acks, 2 * args.min_acks), round(rng.uniform(0, args.max_delay), 3)


def _span(acks: dict[int, int]) -> str:
    return f"{min(acks)}..{max(acks)}" if acks else "none"


# ------------------------------------------------------------------ stage 2


def log_boot(initial_disk: Path, work: Path, args, rng: random.Random, tally: Tally) -> None:
    """Stage 2's boot: a copy of ``initial_disk`` with every write logged; then the analysis."""
    shutil.copyfile(initial_disk, work / "initial.img")
    disk = work / "logged.img"
    shutil.copyfile(initial_disk, disk)
    want, delay = crash_moment(rng, args)
    guest = Guest(disk, "crashloop", log_writes=work / "writes.log", workdir=work / "log-boot")
    start = time.monotonic()
    try:
        guest.start()
        acks = boot_until_acks(guest, want, args.timeout)
        if len(acks) >= want:
            time.sleep(delay)
        guest.kill()
    finally:
        guest.close()
    serial = guest.serial()
    (work / "log-boot.serial").write_text(serial)
    problems = console_problems(serial)
    n_acks = len(check_markers.acked_transactions(serial))
    if n_acks < want:
        problems.append(f"the logged guest stopped after {n_acks} ACKs (wanted {want})")
    tally.add("log boot", problems, state=False)
    say(f"log boot: {n_acks} ACKs, killed {delay} s after ACK {want} "
        f"({time.monotonic() - start:.1f} s)")
    params = {"model": args.model, "outcomes": args.outcomes, "byte_cuts": args.byte_cuts,
              "seed": args.seed}
    (work / "params.json").write_text(json.dumps(params))
    log = logwrites.read_log(work / "writes.log")
    replayed = bytes(logwrites.replay(log.entries, bytearray((work / "initial.img").read_bytes())))
    same = replayed == disk.read_bytes()
    say(f"write log replayed onto the initial image {'gives' if same else 'DIFFERS from'} "
        f"the disk QEMU left{'' if same else ' (an entry cut short by the kill?)'}")
    analyze(work, params, tally)


def analyze(work: Path, params: dict, tally: Tally, *, only_point: int | None = None,
            only_outcome: str | None = None) -> None:
    """Every crash point of ``work``/writes.log x the model's distinct outcomes, checked."""
    model = CrashModel.from_spec(params["model"])
    initial = (work / "initial.img").read_bytes()
    log = logwrites.read_log(work / "writes.log")
    acks = acked(check_markers.acked_transactions((work / "log-boot.serial").read_text()))
    by_txn = {txn_id: n for n, txn_id in acks.items()}
    base = check_device(SimulatedDevice(len(initial), image=initial, record=False), {})
    if not base.ok:
        tally.add("initial image", base.violations, state=False)
    say(f"write log: {len(log.entries)} entries ({len(log.flush_indexes())} flushes), "
        f"{describe_pattern(log, initial)}; model {model.describe()}")
    start = time.monotonic()
    points = states = 0
    last_commits: frozenset[int] = frozenset()
    for lp in crash_points(log, initial, model):
        last_commits = lp.commits
        if only_point is not None and lp.number != only_point:
            continue
        points += 1
        required = dict(base.visible)
        required.update({n: t for t, n in by_txn.items() if t in lp.commits})
        if only_outcome is not None:
            pairs = [(Outcome.decode(only_outcome), None)]
        else:
            seed = (params["seed"] * 1_000_003 + lp.number) % (1 << 64)
            pairs = distinct_outcomes(lp.point, limit=params["outcomes"], extra=params["byte_cuts"],
                                      seed=seed)
        for outcome, device in pairs:
            device = device or lp.point.device(outcome)
            code = outcome.encode()
            verdict = check_device(device, required)
            states += 1
            if not verdict.ok:
                tally.broken_by[_fate_kinds(outcome)] += 1
            tally.add(f"{lp.where()} outcome {code}", verdict.violations,
                      f"{SELF} --check-log {work} --point {lp.number} --outcome '{code}'")
    # The flush a commit waited for is logged before the guest could print its ACK.
    if only_point is None:
        missing = sorted(t for t in by_txn if t not in last_commits)
        tally.add("end of the write log", [f"txn {t} (n={by_txn[t]}) was acknowledged but its "
                                           "COMMIT never reached a flushed image" for t in missing],
                  state=False)
    say(f"write log: {states} crash states at {points} flush points checked "
        f"({time.monotonic() - start:.1f} s)")


def describe_pattern(log: logwrites.Log, initial: bytes) -> str:
    """Write sizes, and how many writes re-send sectors the disk already held (and flushed)."""
    disk = bytearray(initial)
    sizes: collections.Counter = collections.Counter()
    resent_writes = resent_sectors = 0
    for e in log.entries:
        if not e.is_write:
            continue
        sizes[e.length] += 1
        same = sum(1 for s in range(0, e.length, 512)
                   if disk[e.offset + s:e.offset + s + 512] == e.data[s:s + 512]
                   and any(e.data[s:s + 512]))
        if same:
            resent_writes += 1
            resent_sectors += same
        disk[e.offset:e.offset + e.length] = e.data
    shown = ", ".join(f"{count} x {size} B" for size, count in sorted(sizes.items()))
    return (f"writes {shown or 'none'}; {resent_writes} of them re-write {resent_sectors} "
            "non-zero sectors with the bytes already on disk")


def _fate_kinds(outcome: Outcome) -> str:
    kinds = sorted({f.kind.name for f in outcome.fates} - {"KEEP"})
    return "+".join(kinds) or "KEEP"


# ------------------------------------------------------------------ main


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Power cuts on the StateFS QEMU guest (TCG).")
    ap.add_argument("--seed", type=int, help="RNG seed (default: random, printed)")
    ap.add_argument("--cycles", type=int, default=3, help="stage 1: crash/recover cycles")
    ap.add_argument("--no-log", action="store_true", help="skip stage 2 (the logged boot)")
    ap.add_argument("--min-acks", type=int, default=3,
                    help="crash after a random number of ACKs in [N, 2N] plus a random delay")
    ap.add_argument("--max-delay", type=float, default=0.5,
                    help="seconds of random delay, at most (the guest ACKs ~50-100 txns/s)")
    ap.add_argument("--model", default=CrashModel().spec(),
                    help="crash model (statefsd.simdev CrashModel spec); default: the simulated "
                         "device's default, the most adversarial disk")
    ap.add_argument("--outcomes", type=int, default=24, help="outcomes per flush point (limit)")
    ap.add_argument("--byte-cuts", type=int, default=2, help="extra random mid-sector cuts per point")
    ap.add_argument("--disk-size", type=parse_size, default=parse_size("16M"),
                    help="StateFS image size; every recovery scans the whole log region, "
                         "so a small disk keeps the analysis fast (default 16M)")
    ap.add_argument("--timeout", type=float, default=180, help="seconds a boot may take to ACK")
    ap.add_argument("--show", type=int, default=10, help="violations printed in full")
    ap.add_argument("--workdir", type=Path, help="keep everything here (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--check-log", type=Path, metavar="DIR",
                    help="re-check a kept stage-2 work directory instead of booting")
    ap.add_argument("--point", type=int, help="with --check-log: only this crash point")
    ap.add_argument("--outcome", help="with --check-log --point: only this outcome code")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tally = Tally(show=args.show)
    if args.check_log:
        return recheck(args, tally)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    try:
        CrashModel.from_spec(args.model)
    except StateFSError as exc:
        print(f"powercut: {exc.message}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="statefs-powercut-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"seed {args.seed} (rerun: {SELF} --seed {args.seed}); encryption off; work dir {work}")
    t0 = time.monotonic()
    failed = ""
    try:
        disk = work / "disk.img"
        format_disk(disk, args.disk_size)
        crash_cycles(disk, work, args, rng, tally)
        if not args.no_log:
            log_boot(disk, work, args, rng, tally)
    except (GuestTimeout, StateFSError, OSError) as exc:
        failed = f"{type(exc).__name__}: {exc}"
        say(f"ERROR: stage could not run: {failed}")
    say(f"done in {time.monotonic() - t0:.1f} s")
    keep = args.keep or args.workdir or tally.violations or failed
    return finish(tally, failed, keep=bool(keep), work=work)


def recheck(args, tally: Tally) -> int:
    work = args.check_log
    if args.outcome and args.point is None:
        print("powercut: --outcome needs --point (an outcome fits one point's pending writes)",
              file=sys.stderr)
        return 2
    try:
        params = json.loads((work / "params.json").read_text())
        analyze(work, params, tally, only_point=args.point, only_outcome=args.outcome)
    except (OSError, ValueError, StateFSError) as exc:
        return finish(tally, f"{type(exc).__name__}: {exc}", keep=True, work=work)
    return finish(tally, "", keep=True, work=work)


def finish(tally: Tally, failed: str, *, keep: bool, work: Path) -> int:
    v = len(tally.violations)
    if v:
        if len(tally.violations) > tally.show:
            say(f"... {v - tally.show} more violations not shown (--show)")
        if tally.broken_by:
            say("states with violations, by the fates of their outcome: "
                + ", ".join(f"{k}: {c}" for k, c in tally.broken_by.most_common()))
        for line in tally.repro:
            say(f"reproduce: {line}")
    if keep:
        say(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(SUMMARY.format(n=tally.states, v=v), flush=True)
    if v:
        return 1
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
