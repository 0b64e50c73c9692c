"""Real QEMU boots (TCG): the write log and QMP control the crash harnesses rely on.

About 15 s in all on two cores, plus a one-time guest build (qemu/build_guest.py).
Skipped when QEMU is not installed: scripts/qemu-test.sh installs it.
"""

from __future__ import annotations

import shutil

import pytest

from qemu import logwrites
from qemu.guest.guest_main import WRITETEST_DIRECT_OFFSET, WRITETEST_ROUNDS
from qemu.run_guest import Guest, make_disk, run_guest

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="QEMU not installed (scripts/qemu-test.sh installs it)")

DISK = 16 << 20
ROUND = 65536


def test_write_log_of_a_real_guest_replays_to_every_durable_state(tmp_path):
    disk, wlog = tmp_path / "disk.img", tmp_path / "writes.log"
    make_disk(disk, DISK)
    res = run_guest(disk, "writetest", log_writes=wlog, timeout=90, workdir=tmp_path / "run")
    assert res.guest_status == 0, res.serial[-2000:]
    assert "SELFTEST: writetest ok" in res.serial

    log = logwrites.read_log(wlog)
    assert log.sector_size == 512
    assert log.nr_entries == len(log.entries)  # the guest's last act was a flush
    assert replay_all(log) == disk.read_bytes()

    # Each round's write is durable at some flush, and the next round's is not yet there.
    states = [state for _, state in logwrites.states_at_flushes(log, bytes(DISK))]
    for i in range(WRITETEST_ROUNDS):
        mine, nxt = i * ROUND, (i + 1) * ROUND
        assert any(s[mine:mine + 4096] == bytes([i + 1]) * 4096 and s[nxt:nxt + 1] == b"\0"
                   for s in states), f"no flush point isolates round {i}"

    direct = [e for e in log.entries if e.offset == WRITETEST_DIRECT_OFFSET]
    assert [(e.length, e.data) for e in direct] == [(512, b"\xaa" * 512)]


def replay_all(log: logwrites.Log) -> bytes:
    return bytes(logwrites.replay(log.entries, bytearray(DISK)))


def test_guest_answers_qmp_and_a_kill_stops_qemu_at_once(tmp_path):
    disk = tmp_path / "disk.img"
    make_disk(disk, DISK)
    guest = Guest(disk, "writetest", workdir=tmp_path / "run")
    try:
        guest.start()
        guest.wait_for(r"GUEST: writetest round 0 durable", timeout=90)
        assert guest.qmp("query-status")["running"] is True
        stats = guest.qmp("query-blockstats")
        vda = next(d for d in stats if d.get("node-name") == "vda-file")
        assert vda["stats"]["flush_operations"] >= 1
        guest.kill()
        assert guest.proc.returncode == -9
        assert "GUEST: exit" not in guest.serial()
    finally:
        guest.close()
    assert guest.proc.poll() is not None


def test_guest_overrunning_its_timeout_is_killed_and_reported(tmp_path):
    disk = tmp_path / "disk.img"
    make_disk(disk, DISK)
    res = run_guest(disk, "smoke", timeout=1.0, workdir=tmp_path / "run")
    assert res.timed_out and not res.ok
    assert res.returncode == -9 and res.guest_status is None
