"""qemu/powercut*.py on synthetic write logs (no QEMU boots here).

The logs are what a guest would record: the crash writer's commits run on a simulated
device, its trace encoded in the dm-log-writes format. A second device turns every
write into whole 4 KiB pages, as the guest's page cache does on /dev/vda.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from statefsd.storage.blockdev import BlockDevice
from statefsd.storage.engine import Engine, Mutation
from statefsd.testing.simdev import CrashModel, SimulatedDevice

from qemu import logwrites
from qemu.logwrites import DISCARD, FLUSH
from qemu.powercut import Tally, analyze
from qemu.powercut_check import check_device, value_of
from qemu.powercut_log import crash_points

REPO = Path(__file__).resolve().parents[2]
SIZE = 1 << 20
S = 512
PAGE = 4096


def formatted() -> bytes:
    dev = SimulatedDevice(SIZE)
    Engine.mkfs(dev)
    return dev.image()


def txn(n: int, halves: str = "ab") -> list[Mutation]:
    return [Mutation("put", f"crash/{n}/{h}", value_of(n)) for h in halves]


class PageCacheDevice(BlockDevice):
    """Writes whole 4 KiB pages, re-sending the bytes around the caller's range."""

    def __init__(self, inner: SimulatedDevice) -> None:
        self.inner, self.size, self.path = inner, inner.size, "<page-cache>"

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        lo, hi = offset // PAGE * PAGE, -(-(offset + len(data)) // PAGE) * PAGE
        page = bytearray(self.inner.read(lo, hi - lo))
        page[offset - lo:offset - lo + len(data)] = data
        self.inner.write(lo, bytes(page))

    def flush(self) -> None:
        self.inner.flush()


def crash_writer(initial: bytes, count: int, *, page_cache: bool = False):
    """Run the crash writer for ``count`` txns; (recording device, [(txn_id, n)], log ends)."""
    dev = SimulatedDevice(SIZE, image=initial)
    acks, ends = [], []
    with Engine.mount(PageCacheDevice(dev) if page_cache else dev) as engine:
        for n in range(count):
            ends.append(engine.log_end)
            acks.append((engine.commit(txn(n)), n))
    return dev, acks, ends


FLAGS = {"write": 0, "flush": FLUSH, "flush+write": FLUSH, "discard": DISCARD}


def encode_log(ops, *, counted: int | None = None) -> bytes:
    """dm-log-writes bytes for (kind, offset, data) ops; the superblock counts ``counted``.

    A discard covers len(data) bytes but carries no data, as in the format."""
    body = b""
    for kind, offset, data in ops:
        body += struct.pack("<QQQQ", offset // S, len(data) // S, FLAGS[kind], 0).ljust(S, b"\0")
        body += b"" if kind == "discard" else data
    n = len(ops) if counted is None else counted
    return struct.pack("<QQQI", logwrites.MAGIC, 1, n, S).ljust(S, b"\0") + body


def trace_ops(dev: SimulatedDevice) -> list[tuple]:
    return [(op.kind, op.offset, op.data) for op in dev.trace]


def workdir(tmp: Path, initial: bytes, ops, acks, *, model: str = CrashModel().spec(),
            counted: int | None = None) -> Path:
    """A stage-2 work directory as qemu/powercut.py leaves it."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "initial.img").write_bytes(initial)
    (tmp / "writes.log").write_bytes(encode_log(ops, counted=counted))
    serial = "GUEST: run statefsd --crash-writer\r\nstatefsd: encryption off\r\n"
    serial += "".join(f"ACK {t} {n}\r\n" for t, n in acks)
    (tmp / "log-boot.serial").write_text(serial)
    (tmp / "params.json").write_text(json.dumps(
        {"model": model, "outcomes": 24, "byte_cuts": 2, "seed": 5}))
    return tmp


def run_analysis(work: Path, **kw) -> Tally:
    tally = Tally(show=0)
    analyze(work, json.loads((work / "params.json").read_text()), tally, **kw)
    return tally


# ----------------------------------------------------------------- state checks


def test_recovered_store_with_every_acked_txn_whole_passes():
    dev, acks, _ = crash_writer(formatted(), 4)
    verdict = check_device(SimulatedDevice(SIZE, image=dev.image()), {n: t for t, n in acks})
    assert verdict.ok, verdict.violations
    assert verdict.visible == {n: t for t, n in acks}


def test_partial_txn_is_reported_as_a_violation():
    dev = SimulatedDevice(SIZE, image=formatted())
    with Engine.mount(dev) as engine:
        engine.commit(txn(0))
        broken = engine.commit(txn(1, halves="a"))  # a writer that forgot crash/1/b
    verdict = check_device(SimulatedDevice(SIZE, image=dev.image()), {})
    assert verdict.violations == [f"partial txn {broken} (n=1): only crash/1/a is visible"]


def test_wrong_value_hole_and_stray_key_are_each_reported():
    dev = SimulatedDevice(SIZE, image=formatted())
    with Engine.mount(dev) as engine:
        engine.commit(txn(0))
        engine.commit([Mutation("put", "crash/1/a", b"x"), Mutation("put", "crash/1/b", value_of(1))])
        engine.commit(txn(3))
        engine.commit([Mutation("put", "crash/other", b"?")])
    problems = check_device(SimulatedDevice(SIZE, image=dev.image()), {}).violations
    assert "unexpected key 'crash/other'" in problems
    assert any(p.startswith("crash/1/a: wrong value (1 bytes") for p in problems)
    assert "not a prefix: n=2 missing below visible n=3" in problems


def test_required_txn_missing_or_from_another_txn_is_a_violation():
    dev, acks, _ = crash_writer(formatted(), 2)
    (t0, _), (t1, _) = acks
    image = dev.image()
    lost = check_device(SimulatedDevice(SIZE, image=image), {0: t0, 1: t1, 2: t1 + 1})
    assert lost.violations == [f"txn {t1 + 1} (n=2), durable before the cut, is lost: "
                               "crash/2/a and crash/2/b are gone"]
    other = check_device(SimulatedDevice(SIZE, image=image), {1: t1 + 7})
    assert other.violations == [f"n=1: visible from txn {t1}, but txn {t1 + 7} was acknowledged"]


def test_image_the_engine_refuses_to_mount_is_a_violation():
    verdict = check_device(SimulatedDevice(SIZE), {})
    assert len(verdict.violations) == 1
    assert verdict.violations[0].startswith("recovery mount refused: EFORMAT")


# ----------------------------------------------------------------- log -> crash points


def test_each_crash_point_holds_the_commits_flushed_before_it():
    initial = formatted()
    dev, acks, _ = crash_writer(initial, 3)
    log = logwrites.parse(encode_log(trace_ops(dev)))
    points = list(crash_points(log, initial))
    ids = [t for t, _ in acks]
    # mount: a flush, then the txn-id reservation; one write + flush per commit;
    # close: a flush, then the clean-unmount superblock (the durable floor) and its flush
    assert [len(p.point.pending) for p in points] == [1, 1, 1, 1, 1, 0]
    assert [sorted(p.commits) for p in points] == [[], [], ids[:1], ids[:2], ids, ids]
    assert points[-1].point.outcomes(limit=1)  # the simulated device's own outcome API


def test_flush_entry_carrying_data_flushes_before_its_write():
    log = logwrites.parse(encode_log([("write", 0, b"\1" * S), ("flush+write", S, b"\2" * S)]))
    assert [(e.is_flush, e.length) for e in log.entries] == [(False, S), (True, S)]
    before, after = crash_points(log, bytes(4 * S))
    assert (before.cut_before, after.durable_at, after.cut_before) == (1, 1, -1)
    assert [w.offset for w in before.point.pending] == [0]
    assert after.point.durable_image()[:S] == b"\1" * S   # written before the flush: durable
    assert [(w.offset, w.data) for w in after.point.pending] == [(S, b"\2" * S)]


def test_discard_is_a_pending_write_of_zeros():
    log = logwrites.parse(encode_log([("discard", 2 * S, bytes(S)), ("flush", 0, b"")]))
    point, end = crash_points(log, b"\7" * (4 * S))
    assert [(w.offset, w.data) for w in point.point.pending] == [(2 * S, bytes(S))]
    assert end.point.durable_image() == b"\7" * (2 * S) + bytes(S) + b"\7" * S


# ----------------------------------------------------------------- whole analysis


def test_engine_writes_as_issued_survive_every_modelled_cut(tmp_path):
    initial = formatted()
    dev, acks, _ = crash_writer(initial, 5)
    tally = run_analysis(workdir(tmp_path, initial, trace_ops(dev), acks))
    assert tally.violations == []
    assert tally.states >= 5 * 3  # several distinct states at each commit's flush point


def test_pending_write_wiping_an_acked_commit_is_reported(tmp_path):
    initial = formatted()
    dev, acks, ends = crash_writer(initial, 4)
    ops = trace_ops(dev)
    last_txn, last_n = acks[-1]
    # After the last flush, a write zeroes the last acked txn's group and its parity trailer.
    wipe = ("write", ends[-1], bytes(3 * S))
    tally = run_analysis(workdir(tmp_path, initial, ops + [wipe], acks, counted=len(ops)))
    # the clean unmount recorded the group as durable: the damage is refused, never served older
    assert any("outcome K" in v and "below the durable floor" in v for v in tally.violations), tally.violations
    assert tally.broken_by, "the violating states are not attributed to outcomes"


def test_acked_txn_whose_commit_never_reached_a_flush_is_reported(tmp_path):
    initial = formatted()
    dev, acks, _ = crash_writer(initial, 3)
    ops = trace_ops(dev)
    last_log_write = max(i for i, op in enumerate(ops) if op[0] == "write" and op[1] >= 2 * PAGE)
    tally = run_analysis(workdir(tmp_path, initial, ops[:last_log_write + 1], acks))
    t, n = acks[-1]
    assert f"end of the write log: txn {t} (n={n}) was acknowledged but its COMMIT never " \
           "reached a flushed image" in tally.violations


def test_page_cache_rewrites_of_acked_sectors_lose_them_to_garbage(tmp_path):
    """The real guest's pattern: each commit re-sends its whole 4 KiB page."""
    initial = formatted()
    dev, acks, _ = crash_writer(initial, 6, page_cache=True)
    ops = trace_ops(dev)
    assert {len(data) % PAGE for kind, _, data in ops if kind == "write"} == {0}
    adversarial = run_analysis(workdir(tmp_path / "default", initial, ops, acks))
    assert adversarial.violations
    assert set(adversarial.broken_by) == {"GARBAGE"}
    no_garbage = run_analysis(workdir(tmp_path / "nogarbage", initial, ops, acks,
                                      model="reorder,tear"))
    assert no_garbage.violations == [] and no_garbage.states > 0


def test_command_line_ends_with_the_summary_and_reproduces_one_state(tmp_path):
    initial = formatted()
    dev, acks, ends = crash_writer(initial, 3)
    ops = trace_ops(dev)
    bad = workdir(tmp_path / "bad", initial, ops + [("write", ends[-1], bytes(3 * S))], acks,
                  counted=len(ops))
    cmd = [sys.executable, str(REPO / "qemu" / "powercut.py"), "--check-log"]
    run = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, timeout=120)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 1, run.stdout + run.stderr
    assert lines[-1].startswith("guest crash states: ") and not lines[-1].endswith(" 0")
    hint = next(line for line in lines if line.startswith("powercut: reproduce: "))
    again = hint.removeprefix("powercut: reproduce: qemu/powercut.py ").split()
    point, outcome = again[again.index("--point") + 1], again[again.index("--outcome") + 1].strip("'")
    one = subprocess.run([*cmd, str(bad), "--point", point, "--outcome", outcome],
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 1
    assert one.stdout.strip().splitlines()[-1].startswith("guest crash states: 1, violations: ")

    good = workdir(tmp_path / "good", initial, ops, acks)
    ok = subprocess.run([*cmd, str(good)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().splitlines()[-1].endswith(", violations: 0")
