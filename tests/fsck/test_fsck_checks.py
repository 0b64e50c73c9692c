"""fsck-statefs as a user runs it: a real process on real image files, its
report and its fsck(8) exit status."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice

from fsck_images import (
    REPO, append_group, digest, fsck, make_image, mount, patch, put_each, records, repack, state, txn_records,
)

VALUES = {f"cfg/{i}": bytes([65 + i]) * (1000 + 20_000 * i) for i in range(8)}


@pytest.fixture
def img(tmp_path):
    path = make_image(tmp_path / "state.img", redundancy="off")   # damage is detected, not rebuilt
    put_each(path, VALUES)
    return path


def _first_record_of(path, key):
    """The PREPARE of the txn that put ``key`` (each key has its own txn)."""
    recs, _, _ = records(path)
    key_hash = fmt.path_hash(key.encode())
    payload = next(r for r in recs if r.header.type == fmt.PAYLOAD and r.header.path_hash == key_hash)
    return recs, txn_records(recs, payload.header.txn_id)


def test_clean_image_exits_0_and_reports_space(img):
    proc = fsck(img, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["status"] == "clean" and rep["errors"] == 0 and rep["findings"] == []
    assert rep["summary"]["committed_txns"] == len(VALUES)
    assert rep["space"]["live_bytes"] == sum(map(len, VALUES.values()))
    assert rep["space"]["log_used"] + rep["space"]["log_free"] == rep["space"]["log_size"]
    assert rep["authentication"] == "not-applicable"
    assert [s["active"] for s in rep["superblocks"]].count(True) == 1


def test_human_report_names_each_superblock_slot_and_the_verdict(img):
    proc = fsck(img)
    assert proc.returncode == 0
    assert "superblock slot A" in proc.stdout and "superblock slot B" in proc.stdout
    assert f"{img}: clean (0 errors" in proc.stdout


def test_torn_tail_is_a_note_and_exits_0(img):
    # A group whose GROUP_END never landed: what a power cut mid-write leaves.
    offset = append_group(img, fmt.PREPARE, txn_id=100, group_end=False,
                          payload=fmt.encode_prepare([fmt.Op(fmt.OP_PUT, b"late", 5)]))
    rep = json.loads(fsck(img, "--json").stdout)
    assert rep["exit_code"] == 0
    (torn,) = [f for f in rep["findings"] if f["kind"] == "torn-tail"]
    assert torn["severity"] == "note" and torn["offset"] == offset and torn["record"] == "PREPARE"


def test_orphaned_transaction_is_a_note_with_its_txn_id_and_exits_0(img):
    offset = append_group(img, fmt.PREPARE, txn_id=100, group_end=True,
                          payload=fmt.encode_prepare([fmt.Op(fmt.OP_PUT, b"never", 5)]))
    proc = fsck(img, "--json")
    rep = json.loads(proc.stdout)
    assert proc.returncode == 0
    (orphan,) = [f for f in rep["findings"] if f["kind"] == "orphan"]
    assert orphan == {"severity": "note", "kind": "orphan", "offset": offset, "record": "PREPARE",
                      "txn_id": 100, "reason": "prepared but never committed", "repairable": False}
    assert rep["summary"]["committed_txns"] == len(VALUES)


def test_checksum_damage_before_durable_records_is_an_uncorrected_error(img):
    _, victim = _first_record_of(img, "cfg/4")
    chunk = next(r for r in victim if r.header.type == fmt.PAYLOAD)
    patch(img, chunk.offset + fmt.HEADER_SIZE + 100, b"\xff\x00\xff")
    proc = fsck(img, "--json")
    assert proc.returncode == 4
    rep = json.loads(proc.stdout)
    (bad,) = [f for f in rep["findings"] if f["severity"] == "error"]
    assert bad["kind"] == "corruption" and bad["offset"] == chunk.offset
    assert bad["record"] == "PAYLOAD" and bad["txn_id"] == chunk.header.txn_id
    # a cleanly unmounted image: its superblock's durable floor proves the damage
    assert "checksum mismatch" in bad["reason"] and "below the durable floor" in bad["reason"]


def test_repair_keeps_the_committed_prefix_and_a_second_run_is_clean(img):
    _, victim = _first_record_of(img, "cfg/4")
    chunk = next(r for r in victim if r.header.type == fmt.PAYLOAD)
    patch(img, chunk.offset + fmt.HEADER_SIZE + 100, b"\xff\x00\xff")
    repaired = fsck(img, "--repair")
    assert repaired.returncode == 1, repaired.stdout + repaired.stderr
    assert "re-check clean" in repaired.stdout
    prefix = {k: v for k, v in VALUES.items() if k < "cfg/4"}
    assert state(img) == prefix
    before = digest(img)
    again = fsck(img, "--repair")
    assert again.returncode == 0 and "nothing to repair" in again.stdout
    assert digest(img) == before
    with mount(img) as e:  # read-write again, and writable
        e.put("after-repair", b"ok")
    assert fsck(img).returncode == 0


def test_broken_digest_with_valid_checksums_is_found_by_replay_and_repaired(img):
    # An altered PREPARE whose CRC was recomputed: only the txn digest can tell.
    _, victim = _first_record_of(img, "cfg/2")
    prep = victim[0]
    ops = fmt.decode_prepare(prep.payload)
    forged = fmt.encode_prepare([fmt.Op(ops[0].kind, b"cfg/X", ops[0].value_len)])
    forged_rec = repack(prep, forged)
    assert len(forged_rec) == len(prep.raw())
    patch(img, prep.offset, forged_rec)
    rep = json.loads(fsck(img, "--json").stdout)
    assert rep["exit_code"] == 4
    (bad,) = [f for f in rep["findings"] if f["severity"] == "error"]
    assert bad["record"] in ("PAYLOAD", "COMMIT") and bad["txn_id"] == prep.header.txn_id
    assert fsck(img, "--repair").returncode == 1
    assert state(img) == {k: v for k, v in VALUES.items() if k < "cfg/2"}


def test_dry_run_says_what_it_would_do_and_writes_nothing(img):
    _, victim = _first_record_of(img, "cfg/5")
    with open(img, "rb") as f:   # flip the byte, whatever it was (it is part of the random epoch)
        f.seek(victim[0].offset + 10)
        patch(img, victim[0].offset + 10, bytes([f.read(1)[0] ^ 0x99]))
    before = digest(img)
    proc = fsck(img, "--repair", "--dry-run")
    assert proc.returncode == 4
    assert "would rewrite the committed state" in proc.stdout and "nothing written" in proc.stdout
    assert digest(img) == before


def test_repair_of_a_clean_image_with_notes_changes_no_byte(img):
    append_group(img, fmt.PREPARE, txn_id=100, group_end=True,
                 payload=fmt.encode_prepare([fmt.Op(fmt.OP_PUT, b"never", 5)]))
    before = digest(img)
    proc = fsck(img, "--repair")
    assert proc.returncode == 0
    assert digest(img) == before


def test_image_held_by_statefsd_is_refused_with_exit_8(img):
    before = digest(img)
    with FileDevice(img):  # the exclusive flock statefsd holds while it runs
        for args in ((), ("--repair",)):
            proc = fsck(img, *args)
            assert proc.returncode == 8
            assert "in use" in proc.stderr and "stop it first" in proc.stderr
    assert digest(img) == before


def test_image_held_by_statefsd_prints_the_header_line_before_the_error(img):
    with FileDevice(img):
        proc = subprocess.run([sys.executable, "-m", "fsck_statefs", img], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = proc.stdout.splitlines()
    assert proc.returncode == 8
    assert lines[0] == f"fsck-statefs: {img}"
    assert lines[1].startswith(f"fsck-statefs: cannot check {img}: EBUSY")
    assert lines[2].startswith(f"{img}: operational-error")


def test_missing_image_and_non_statefs_file_are_operational_errors(tmp_path):
    assert fsck(str(tmp_path / "nope.img")).returncode == 8
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"not a file system" * 100_000)
    proc = fsck(str(junk), "--json")
    assert proc.returncode == 8
    assert "not a StateFS image" in json.loads(proc.stdout)["operational_error"]


@pytest.mark.parametrize("argv", [(), ("--frobnicate", "x.img"), ("a.img", "b.img")])
def test_bad_command_line_is_a_usage_error_16(argv):
    proc = fsck(*argv)
    assert proc.returncode == 16
    assert "usage: fsck-statefs" in proc.stderr


def test_both_superblock_slots_with_bad_checksums_are_an_error_that_repair_rebuilds(img):
    for offset in fmt.SUPERBLOCK_OFFSETS:
        patch(img, offset + 20, b"\x00\x01")
    found = json.loads(fsck(img, "--json").stdout)
    assert found["exit_code"] == 4 and found["findings"][0]["kind"] == "superblock"
    rep = json.loads(fsck(img, "--repair", "--json").stdout)
    assert rep["exit_code"] == 1 and rep["repair"]["performed"]
    assert rep["summary"]["committed_txns"] == len(VALUES)
    assert fsck(img).returncode == 0


def test_one_torn_superblock_slot_is_a_note(img):
    mount(img).close()  # a mount writes a newer slot; the older one still covers every txn id used
    rep = json.loads(fsck(img, "--json").stdout)
    active = next(s for s in rep["superblocks"] if s["active"])
    patch(img, active["offset"] + 30, b"\xee")
    rep = json.loads(fsck(img, "--json").stdout)
    assert rep["exit_code"] == 0
    assert any(f["kind"] == "superblock" and f["severity"] == "note" for f in rep["findings"])
    assert rep["summary"]["committed_txns"] == len(VALUES)  # the older slot describes the same log


def test_progress_bar_appears_only_when_stderr_is_a_terminal(img):
    env = dict(os.environ, PYTHONPATH=str(REPO), TERM="xterm")
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "fsck_statefs", img], stdout=subprocess.PIPE,
                              stderr=slave, env=env, cwd=REPO, timeout=60)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert b"scanning log" in b"".join(chunks)
    piped = fsck(img)
    assert piped.returncode == 0 and piped.stderr == ""
