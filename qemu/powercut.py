"""Real power cuts on a real guest: the guest's crash writer, cut and recovered.

  .venv/bin/python qemu/powercut.py [--seed S] [--cycles 3] [--model SPEC] [--keep]
  .venv/bin/python qemu/powercut.py --check-log DIR [--point K] [--outcome CODE]

The guest runs ``crashloop``: statefsd's crash writer commits txn n as ``crash/<n>/a``
+ ``crash/<n>/b`` and prints ``ACK <txn_id> <n>`` once durable
(qemu/powercut_check.py says what a recovered store must look like).

Stage 1, guest crashes: a disk formatted on the host is booted ``--cycles`` times. Each
boot waits for a few ACKs and a random delay (seeded RNG, printed), checks the VM over
QMP (query-status), then crashes it: SIGKILL or QMP ``quit``. After every crash the host
checks the image as the crash left it with fsck-statefs (read-only, exit 0 wanted), then
recovers it with the engine; the next boot recovers it again in the guest. Every ACK of
every cycle must survive, and fsck must count the same keys the recovery serves. QEMU's
writes sit in the host page cache, so this loses no write the guest issued: it is a
crash of the guest, not of its disk.

Stage 1 runs twice: encryption off (``--cycles``), then on (``--enc-cycles``). For the
encrypted image the host makes a keystored identity, formats the image with it and
writes the key file onto a fresh ext4 key disk; the guest boots with that disk as
/dev/vdb and its own keystored serves the key from it. After each crash the host copies
the key file back out of the key disk (qemu/hostkeys.py), starts a keystored on the
copy, and runs the same checks through it: fsck-statefs ``--keystore-socket`` (every
sealed chunk authenticated) and the engine with keystored's key provider.

Stage 2, lost write cache: one more boot of a copy of that disk, with QEMU's
blklogwrites recording every write and flush (qemu/logwrites.py). After the kill, at
each flush point the writes since the previous flush are the pending set, and the
simulated device's crash model (statefsd.testing.simdev, via statefsd.testing.campaign.outcomes)
decides what a power cut leaves of them (qemu/powercut_log.py). Each distinct state is
recovered with the engine and checked; every ACKed txn whose COMMIT was durable at that
flush must be there. This stage runs with encryption off: its cost is the recovery of
hundreds of states, and sealing does not change which writes the guest issues when.

Before the last line, one line per stage: ``powercut: stage <name>: N states, V
violations`` (names ``crashes-enc-off``, ``crashes-enc-on``, ``write-log``).

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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from statefsd.storage.blockdev import FileDevice, create_image  # noqa: E402
from statefsd.testing.campaign.outcomes import distinct_outcomes  # noqa: E402
from statefsd.storage.engine import Engine  # noqa: E402
from statefsd.errors import StateFSError  # noqa: E402
from statefsd.keystore import keystore_key_provider  # noqa: E402
from statefsd.testing.simdev import CrashModel, Outcome, SimulatedDevice  # noqa: E402

from qemu import check_markers, logwrites  # noqa: E402
from qemu.hostkeys import FILE_NAME, HostKeystore, HostKeystoreError, repo_env  # noqa: E402
from qemu.powercut_check import Verdict, acked, check_device  # noqa: E402
from qemu.powercut_log import crash_points  # noqa: E402
from qemu.run_guest import Guest, GuestTimeout, make_state_disk, parse_size  # noqa: E402

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
    stages: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (states, violations)

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

    def stage(self, name: str, run) -> None:
        """Run ``run()`` and remember how many states and violations it added."""
        states, violations = self.states, len(self.violations)
        try:
            run()
        finally:
            self.stages[name] = (self.states - states, len(self.violations) - violations)


# ------------------------------------------------------------------ stage 1


def format_disk(path: Path, size: int, keys_disk: Path | None = None) -> None:
    """A fresh StateFS image; with ``keys_disk``, encrypted, and its key file on that disk.

    The encrypted image is formatted through a keystored with a new identity (so the
    superblock's key check pins that identity); its key file then goes onto a new ext4
    key disk and the host's copy is deleted: from here on, the key comes from that disk.
    """
    create_image(str(path), size)
    if keys_disk is None:
        with FileDevice(str(path)) as dev:
            Engine.mkfs(dev, encryption="off")
        return
    made = keys_disk.parent / f"{keys_disk.stem}-new"
    with HostKeystore.fresh(made) as ks:
        with FileDevice(str(path)) as dev:
            Engine.mkfs(dev, encryption="on", key_provider=keystore_key_provider(ks.socket))
        key_file = ks.key_file()
    make_state_disk(keys_disk, files={FILE_NAME: key_file})
    shutil.rmtree(made)


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


def console_problems(serial: str, enc: bool = False) -> list[str]:
    return [f"guest console: {p}" for p in check_markers.check(serial, "crashloop", enc=enc)]


def fsck_problems(disk: Path, socket: str | None, out: Path) -> tuple[list[str], int | None]:
    """fsck-statefs, read-only, on the image as the crash left it: (problems, live keys).

    A crash leaves only notes (torn tail, orphan PREPARE): anything but exit 0 is a
    violation. With keystored's ``socket`` every sealed chunk must be authenticated.
    """
    cmd = [sys.executable, "-m", "fsck_statefs", "--json", str(disk)]
    if socket:
        cmd += ["--keystore-socket", socket]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=repo_env())
    out.write_text(run.stdout + run.stderr)
    try:
        report = json.loads(run.stdout)
    except ValueError:
        return [f"fsck-statefs exit {run.returncode} without a JSON report: "
                f"{(run.stderr.strip().splitlines() or ['-'])[-1]}"], None
    problems = []
    if run.returncode != 0:
        why = report.get("operational_error") or "; ".join(
            f"{f['kind']} at offset {f['offset']}: {f['reason']}"
            for f in report.get("findings", []) if f.get("severity") == "error")[:300]
        problems.append(f"fsck-statefs exit {run.returncode} ({report.get('status')}): {why}")
    if socket and report.get("authentication") != "verified":
        problems.append(f"fsck-statefs did not authenticate the sealed chunks "
                        f"(authentication: {report.get('authentication')})")
    return problems, report.get("summary", {}).get("keys")


def recover_on_host(disk: Path, required: dict[int, int], keys_disk: Path | None,
                    work: Path) -> tuple[Verdict, list[str]]:
    """The host's checks after a crash: fsck, then the engine's recovery, both with the
    guest's key when the image is encrypted."""
    ks = None
    try:
        if keys_disk is not None:
            ks = HostKeystore.from_state_disk(keys_disk, work / "host-keys").start()
        socket = ks.socket if ks else None
        problems, fsck_keys = fsck_problems(disk, socket, work / "fsck.json")
        provider = keystore_key_provider(socket) if socket else None
        verdict = check_device(FileDevice(str(disk)), required, key_provider=provider)
    finally:
        if ks is not None:
            ks.close()
    if not problems and verdict.ok and fsck_keys != 2 * len(verdict.visible):
        problems.append(f"fsck-statefs counts {fsck_keys} live keys, the recovered store "
                        f"holds {2 * len(verdict.visible)}")
    return verdict, problems


def crash_cycles(disk: Path, work: Path, args, rng: random.Random, tally: Tally, *,
                 keys_disk: Path | None = None) -> None:
    """Stage 1: boot, crash, check on the host; ``required``: what must survive from now on.

    With ``keys_disk`` the image is encrypted and the guest's keystored reads its key
    file from that disk (/dev/vdb); the host reads the same file to check the image.
    """
    enc = keys_disk is not None
    name, cycles = ("enc cycle", args.enc_cycles) if enc else ("cycle", args.cycles)
    required: dict[int, int] = {}
    for cycle in range(1, cycles + 1):
        want, delay = crash_moment(rng, args)
        how = rng.choice(("kill", "quit"))
        cwork = work / f"{name.replace(' ', '-')}-{cycle}"
        guest = Guest(disk, "crashloop", enc=enc, state_disk=keys_disk, workdir=cwork)
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
        (work / f"{cwork.name}.serial").write_text(serial)
        acks = acked(check_markers.acked_transactions(serial))
        problems = console_problems(serial, enc)
        if len(acks) < want:
            problems.append(f"the guest stopped after {len(acks)} ACKs (wanted {want}); "
                            f"last console line: {serial.strip().splitlines()[-1:] or ['-']}")
        required.update(acks)
        verdict, host_problems = recover_on_host(disk, required, keys_disk, cwork)
        problems += host_problems
        required.update(verdict.visible)  # durable now: the host's recovery flushed it
        say(f"{name} {cycle}: {len(acks)} ACKs (n {_span(acks)}), waited {want} ACKs + {delay} s, "
            f"{how}; fsck{'+key' if enc else ''} and recovery: {len(verdict.visible)} txns; "
            f"{'ok' if verdict.ok and not problems else 'VIOLATIONS'} ({time.monotonic() - start:.1f} s)")
        tally.add(f"{name} {cycle} ({how} after {want} ACKs + {delay} s)",
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
    ap.add_argument("--enc-cycles", type=int, default=2,
                    help="stage 1 again on an encrypted image, keys on the guest's key disk "
                         "(0: skip)")
    ap.add_argument("--no-log", action="store_true", help="skip stage 2 (the logged boot)")
    ap.add_argument("--min-acks", type=int, default=3,
                    help="crash after a random number of ACKs in [N, 2N] plus a random delay")
    ap.add_argument("--max-delay", type=float, default=0.5,
                    help="seconds of random delay, at most (the guest ACKs ~50-100 txns/s)")
    ap.add_argument("--model", default=CrashModel().spec(),
                    help="crash model (statefsd.testing.simdev CrashModel spec); default: the simulated "
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
    say(f"seed {args.seed} (rerun: {SELF} --seed {args.seed}); work dir {work}")
    t0 = time.monotonic()
    failed = []

    def stage(name: str, run) -> bool:
        try:
            tally.stage(name, run)
            return True
        except (GuestTimeout, StateFSError, HostKeystoreError, OSError,
                subprocess.SubprocessError) as exc:
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
            say(f"ERROR: stage {name} could not run: {failed[-1]}")
            return False

    disk = work / "disk.img"
    plain_ok = stage("crashes-enc-off", lambda: (format_disk(disk, args.disk_size),
                                                 crash_cycles(disk, work, args, rng, tally)))
    if args.enc_cycles > 0:
        # Its own RNG: a seed draws the same plaintext and write-log crash moments as before.
        enc_rng = random.Random(f"{args.seed}-enc")
        enc_disk, keys_disk = work / "disk-enc.img", work / "keys-enc.img"
        stage("crashes-enc-on", lambda: (format_disk(enc_disk, args.disk_size, keys_disk),
                                         crash_cycles(enc_disk, work, args, enc_rng, tally,
                                                      keys_disk=keys_disk)))
    if not args.no_log and plain_ok:  # the logged boot starts from that stage's disk
        stage("write-log", lambda: log_boot(disk, work, args, rng, tally))
    for name, (n, v) in tally.stages.items():
        say(f"stage {name}: {n} states, {v} violations")
    failed = "; ".join(failed)
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
