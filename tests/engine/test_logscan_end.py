"""Where the log walk stops, and whether the stop is a torn tail or corruption.

Real images (a base image written by the engine) with log groups crafted
after its end by the crafted-log writer, some placed at exact byte offsets:
flush against the end of the log region, straddling it, or two groups past
a damaged one. Each test checks the walk's ScanEnd whole.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine
from statefsd.storage.image import read_superblock_slot
from statefsd.storage.replay import replay

from tests.format import spec_reader as sr
from tests.format.test_format_crafted_logs import Log, base_images, prepare_payload, put  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ helpers

def _next_offset(L: Log) -> int:
    return L.pos + sum(len(r) for r in L.pending)


def _region_end(L: Log) -> int:
    sb = fmt.decode_superblock(bytes(L.img[:fmt.BLOCK_SIZE])).superblock
    other = fmt.decode_superblock(bytes(L.img[fmt.BLOCK_SIZE:2 * fmt.BLOCK_SIZE])).superblock
    if other is not None and (sb is None or other.generation > sb.generation):
        sb = other
    start, length = sb.active_extent
    return start + length


def _place(L: Log, offset: int) -> None:
    """Writes the pending records (one group) at ``offset`` instead of the log end."""
    blob = b"".join(L.pending)
    L.img[offset:offset + len(blob)] = blob
    L.pending = []
    L.group += 1


def _replay(L: Log, tmp_path):
    path = tmp_path / "crafted.img"
    path.write_bytes(bytes(L.img))
    with FileDevice(str(path), read_only=True) as dev:
        return replay(dev, read_superblock_slot(dev)[0])


def _fill_to(L: Log, room: int) -> None:
    """ABORT groups (their payload is ignored by replay) until less than
    ``room`` bytes of the region are left after the log end."""
    end = _region_end(L)
    big = fmt.MAX_PAYLOAD
    while end - L.pos - room >= fmt.align_up(fmt.HEADER_SIZE + big):
        L.t += 1
        L.rec(sr.ABORT, L.t, bytes(big), flags=sr.GROUP_END)
        L.flush()
    while end - L.pos > room:
        L.t += 1
        L.rec(sr.ABORT, L.t, flags=sr.GROUP_END)
        L.flush()


@pytest.fixture
def L(base_images) -> Log:
    return Log(base_images["off"])


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> bytes:
    path = str(tmp_path_factory.mktemp("fresh") / "fresh.img")
    create_image(path, 1 << 20)
    with FileDevice(path) as dev:
        Engine.mkfs(dev, redundancy="off")   # a damaged sector stays damaged
    return open(path, "rb").read()


# ------------------------------------------------- the end of the region

def test_a_group_ending_exactly_at_the_region_end_is_read_and_the_walk_stops_there(L, tmp_path):
    end = _region_end(L)
    _fill_to(L, fmt.MAX_PAYLOAD)
    last = L.t + 1
    L.rec(sr.ABORT, last, bytes(end - L.pos - fmt.HEADER_SIZE), flags=sr.GROUP_END)
    L.flush()
    assert L.pos == end
    r = _replay(L, tmp_path)
    assert (r.end.offset, r.end.stop_offset, r.end.stop_reason, r.end.torn_bytes) == (end, end, "end of region", 0)
    assert r.max_txn_id == last and not r.end.corrupt and r.findings == []


def test_a_record_running_one_byte_past_the_region_end_stops_the_walk_without_a_crash(L, tmp_path):
    end = _region_end(L)
    _fill_to(L, fmt.MAX_PAYLOAD)
    start = L.pos
    L.rec(sr.ABORT, L.t + 1, bytes(end - L.pos - fmt.HEADER_SIZE + 1), flags=sr.GROUP_END)
    blob = b"".join(L.pending)
    L.img[start:end] = blob[:end - start]       # what fits; the last byte would be outside the region
    L.pending = []
    r = _replay(L, tmp_path)
    assert (r.end.offset, r.end.stop_offset, r.end.stop_reason) == (
        start, start, "record runs past the end of the region")
    assert not r.end.corrupt and r.max_txn_id == L.t


# ----------------------------------------------------------- stop reasons

def _damaged_group(L: Log, how: str) -> tuple[int, str]:
    """Writes one group after the log end and damages it as ``how`` says;
    returns its offset and the stop reason the walk must give."""
    T, start = L.t, L.pos
    epoch, mount_gen = L.sb["log_epoch"], L.mount_gen
    over = {}
    reason = ""
    if how == "epoch":
        over, reason = dict(epoch=epoch ^ 0x5A), f"record of epoch {epoch ^ 0x5A}, not {epoch} (stale)"
    elif how == "seq":
        over, reason = dict(seq=L.seq + 3), f"sequence {L.seq + 3}, expected {L.seq}"
    elif how == "group":
        # a lower group: a higher one two past would be its own evidence
        over, reason = dict(group=L.group - 1), f"group {L.group - 1}, expected {L.group}"
    elif how == "mount_gen":
        L.txn(T + 1, [put("m", b"1")])
        start = L.pos
        over = dict(mount_gen=mount_gen - 1)
        reason = f"mount generation {mount_gen - 1} below {mount_gen} (stale)"
    L.rec(sr.PREPARE, T + 2, prepare_payload([put("x", b"1")]), flags=sr.GROUP_END, **over)
    L.flush()
    if how == "checksum":
        L.img[start + 70] ^= 1
        reason = "checksum mismatch"
    elif how == "magic":
        L.img[start + 4] ^= 1
        reason = "bad record magic"
    return start, reason


@pytest.mark.parametrize("how", ["checksum", "magic", "epoch", "seq", "group", "mount_gen"])
def test_the_walk_names_why_it_stopped_and_ends_at_the_last_complete_group(L, tmp_path, how):
    before = _replay(L, tmp_path).end
    start, reason = _damaged_group(L, how)
    end = _replay(L, tmp_path).end
    grew = 1 if how == "mount_gen" else 0
    assert (end.offset, end.stop_offset, end.stop_reason, end.torn_bytes) == (start, start, reason, 0)
    assert end.next_seq == before.next_seq + 3 * grew and end.next_group == before.next_group + grew
    assert end.mount_gen == (L.mount_gen if grew else before.mount_gen)
    assert not end.corrupt and (end.corruption_offset, end.evidence_offset) == (-1, -1)


def test_a_clean_end_is_zeroed_space(L, tmp_path):
    end = _replay(L, tmp_path).end
    assert end.stop_reason == "zeroed space (clean end)" and end.offset == end.stop_offset == L.pos
    assert end.torn_bytes == 0 and end.next_seq == L.seq and end.next_group == L.group


def test_a_torn_group_counts_the_bytes_of_its_complete_records(L, tmp_path):
    T, start = L.t, L.pos
    recs = L.open(T + 1, [put("a", b"1" * 300), put("b", b"2" * 200)])
    L.flush()                           # no COMMIT: the group never ended
    end = _replay(L, tmp_path).end
    assert end.offset == start and end.torn_bytes == sum(len(r) for r in recs)
    assert end.stop_offset == start + end.torn_bytes and end.stop_reason == "zeroed space (clean end)"
    assert end.next_seq == L.seq - len(recs) and end.next_group == L.group - 1


def test_the_first_group_of_a_fresh_image_may_carry_any_mount_generation(fresh, tmp_path):
    L = Log(fresh)
    L.mount_gen = 0
    L.txn(1, [put("zero-gen", b"0")])
    r = _replay(L, tmp_path)
    assert r.findings == [] and set(r.index) == {b"zero-gen"} and r.end.mount_gen == 0


# ---------------------------------------------------------- the evidence

def _damage_next_group(L: Log) -> int:
    """A complete group after the log end whose first record is damaged."""
    start = L.pos
    L.txn(L.t + 1, [put("damaged", b"d")])
    L.img[start + 70] ^= 1
    return start


def _evidence(L: Log, *, payload=b"", flags=sr.GROUP_END, **over) -> None:
    """One ABORT group, two past the last complete group (L.group is one past it)."""
    L.rec(sr.ABORT, L.t + 50, payload, flags=flags, **over)


def test_a_valid_record_two_groups_past_the_last_complete_one_proves_corruption(L, tmp_path):
    damaged = _damage_next_group(L)
    evidence = L.pos
    _evidence(L)
    L.flush()
    end = _replay(L, tmp_path).end
    assert (end.corrupt, end.corruption, end.corruption_offset, end.evidence_offset) == (
        True, "checksum mismatch", damaged, evidence)


def test_valid_records_of_the_torn_group_itself_are_no_evidence(L, tmp_path):
    start = L.pos
    L.txn(L.t + 1, [put("a", b"1" * 600), put("b", b"2")])   # one group, several sectors
    L.img[start + 70] ^= 1                                     # its PREPARE: later records stay valid
    end = _replay(L, tmp_path).end
    assert end.stop_offset == start and not end.corrupt and end.evidence_offset == -1


def test_evidence_must_be_of_this_or_a_later_mount(L, tmp_path):
    last_mount_gen = _replay(L, tmp_path).end.mount_gen
    _damage_next_group(L)
    _evidence(L, mount_gen=last_mount_gen - 1)
    L.flush()
    assert not _replay(L, tmp_path).end.corrupt


def test_evidence_may_have_exactly_the_next_sequence_number(L, tmp_path):
    # 6.4: seq >= the next seq (inclusive); one lower is no evidence
    damaged = _damage_next_group(L)
    next_seq = L.seq - 3
    ok = L.pos
    _evidence(L, seq=next_seq)
    L.flush()
    end = _replay(L, tmp_path).end
    assert end.corrupt and end.corruption_offset == damaged and end.evidence_offset == ok


def test_evidence_one_sequence_number_too_low_is_no_evidence(L, tmp_path):
    _damage_next_group(L)
    _evidence(L, seq=L.seq - 4)
    L.flush()
    assert not _replay(L, tmp_path).end.corrupt


def test_evidence_with_a_header_problem_is_no_evidence(L, tmp_path):
    _damage_next_group(L)
    _evidence(L, flags=sr.GROUP_END | 0x40)    # CRC right, flags unknown
    L.flush()
    assert not _replay(L, tmp_path).end.corrupt


def test_the_first_of_several_evidence_records_is_reported(L, tmp_path):
    _damage_next_group(L)
    first = L.pos
    _evidence(L)
    L.flush()
    L.t += 60
    L.txn(L.t, [put("later", b"l")])
    end = _replay(L, tmp_path).end
    assert end.corrupt and end.evidence_offset == first


@pytest.mark.parametrize("payload_len", [0, 100])
def test_evidence_ending_exactly_at_the_region_end_counts(L, tmp_path, payload_len):
    end = _region_end(L)
    damaged = _damage_next_group(L)
    _evidence(L, payload=bytes(payload_len))
    at = end - fmt.HEADER_SIZE - payload_len
    _place(L, at)
    r = _replay(L, tmp_path)
    assert (r.end.corrupt, r.end.corruption_offset, r.end.evidence_offset) == (True, damaged, at)


def test_a_valid_record_straddling_the_region_end_is_no_evidence(L, tmp_path):
    # Its CRC is right over bytes that lie partly in the next region: those
    # bytes are not this region's, so the record cannot prove anything.
    end = _region_end(L)
    _damage_next_group(L)
    _evidence(L, payload=bytes(range(20)))
    _place(L, end - fmt.HEADER_SIZE - 10)
    assert bytes(L.img[end:end + 10]) == bytes(range(10, 20))
    r = _replay(L, tmp_path)
    assert not r.end.corrupt and r.end.evidence_offset == -1


def test_header_like_bytes_in_the_last_63_bytes_of_the_region_are_skipped(L, tmp_path):
    end = _region_end(L)
    _damage_next_group(L)
    tail = bytearray(40)
    tail[4:6] = b"R2"
    tail[8:12] = struct.pack("<I", L.sb["log_epoch"])
    L.img[end - 40:end] = tail
    r = _replay(L, tmp_path)
    assert not r.end.corrupt


def test_the_search_finds_a_header_when_a_match_of_the_epoch_starts_one_byte_earlier(fresh, tmp_path):
    # An epoch of four equal bytes, equal to the GROUP_END flags byte before
    # it: the epoch bytes also match one byte earlier than the header's field.
    img = bytearray(fresh)
    for off in fmt.SUPERBLOCK_OFFSETS:
        status = fmt.decode_superblock(bytes(img[off:off + fmt.BLOCK_SIZE]))
        if status.superblock is not None:
            img[off:off + fmt.BLOCK_SIZE] = fmt.encode_superblock(status.superblock.evolve(log_epoch=0x01010101))
    L = Log(bytes(img))
    assert L.sb["log_epoch"] == 0x01010101
    L.txn(1, [put("a", b"1")])
    damaged = _damage_next_group(L)
    at = L.pos
    _evidence(L)        # a lone ABORT with GROUP_END: flags byte 0x01 right before the epoch
    L.flush()
    end = _replay(L, tmp_path).end
    assert L.img[at + 7:at + 12] == b"\x01" * 5
    assert (end.corrupt, end.corruption_offset, end.evidence_offset) == (True, damaged, at)


# --------------------------------------------------- cost of the search

SEARCH_PROBE = textwrap.dedent("""
    import json, sys, time
    from statefsd.storage.blockdev import FileDevice
    from statefsd.storage.image import read_superblock_slot
    from statefsd.storage.logscan import scan_groups

    class Counting(FileDevice):
        reads = 0
        bytes = 0
        def read(self, offset, length):
            Counting.reads += 1
            Counting.bytes += length
            return super().read(offset, length)

    dev = Counting(sys.argv[1], read_only=True)
    sb = read_superblock_slot(dev)[0]
    t0 = time.monotonic()
    end = [item for item in scan_groups(dev, sb)][-1]
    print(json.dumps({"seconds": time.monotonic() - t0, "reads": Counting.reads, "bytes": Counting.bytes,
                      "corrupt": end.corrupt, "region": sb.active_extent[1]}))
""")


def test_the_search_past_the_stop_ends_and_reads_each_byte_about_once_even_if_every_word_matches(L, tmp_path):
    # The worst case for the search: every 4-byte word after the stop is this
    # epoch, so every position is a candidate.
    end = _region_end(L)
    _damage_next_group(L)
    L.img[L.pos:end] = struct.pack("<I", L.sb["log_epoch"]) * ((end - L.pos) // 4)
    path = tmp_path / "matches.img"
    path.write_bytes(bytes(L.img))
    proc = subprocess.run([sys.executable, "-c", SEARCH_PROBE, str(path)], capture_output=True, text=True,
                          timeout=20, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert not out["corrupt"]
    assert out["bytes"] <= 2 * out["region"] + (1 << 20)
    assert out["seconds"] < 10


# ------------------------------------------------------------- the group cap

@pytest.fixture(scope="module")
def roomy(tmp_path_factory) -> tuple[bytes, fmt.Superblock, object]:
    """A 72 MiB image (log regions of about 36 MiB) with one committed put,
    no redundancy; with where its log ends."""
    path = str(tmp_path_factory.mktemp("roomy") / "roomy.img")
    create_image(path, 72 << 20)
    with FileDevice(path) as dev:
        Engine.mkfs(dev, redundancy="off")
    with Engine.mount(FileDevice(path)) as eng:
        eng.put("k", b"v")
    with FileDevice(path, read_only=True) as dev:
        sb = read_superblock_slot(dev)[0]
        result = replay(dev, sb)
    return open(path, "rb").read(), sb, result


def _abort_group(sb, result, sizes: list[int]) -> bytes:
    """One write group of ABORT records (their payloads are not replayed)
    with the given payload sizes, packed by statefsd.storage.format."""
    end = result.end
    out = []
    for i, size in enumerate(sizes):
        out.append(fmt.pack_record(fmt.ABORT, flags=fmt.FLAG_GROUP_END if i == len(sizes) - 1 else 0,
                                   epoch=sb.log_epoch, group=end.next_group, seq=end.next_seq + i,
                                   mount_gen=end.mount_gen + 1, txn_id=result.max_txn_id + 1 + i,
                                   payload=bytes(size)))
    return b"".join(out)


def _records_up_to(total: int) -> list[int]:
    """Payload sizes of records that together take exactly ``total`` bytes."""
    sizes = []
    while total > 0:
        size = min(fmt.MAX_PAYLOAD, total - fmt.HEADER_SIZE)
        sizes.append(size)
        total -= fmt.HEADER_SIZE + size
    assert total == 0
    return sizes


@pytest.mark.parametrize("extra,accepted", [(0, True), (fmt.HEADER_SIZE, False)])
def test_a_group_may_hold_a_record_starting_at_its_32_MiB_cap_but_none_after_it(roomy, tmp_path, extra, accepted):
    data, sb, result = roomy
    sizes = _records_up_to(fmt.MAX_GROUP_BYTES + extra) + [0]   # the last record starts at the cap (+ extra)
    group = _abort_group(sb, result, sizes)
    img = bytearray(data)
    start = result.end.offset
    img[start:start + len(group)] = group
    path = tmp_path / "capped.img"
    path.write_bytes(bytes(img))
    with FileDevice(str(path), read_only=True) as dev:
        r = replay(dev, read_superblock_slot(dev)[0])
    if accepted:
        assert r.max_txn_id == result.max_txn_id + len(sizes) and r.end.offset == fmt.align_up(start + len(group))
    else:
        assert r.max_txn_id == result.max_txn_id and r.end.offset == start
        assert r.end.stop_offset == start + fmt.MAX_GROUP_BYTES + extra
        assert r.end.stop_reason == f"write group larger than {fmt.MAX_GROUP_BYTES} bytes"


def test_a_group_of_mixed_mount_generations_counts_as_its_last_records(L, tmp_path):
    # a later group of the first record's (lower) generation is stale tail data
    gen = L.mount_gen
    L.txn(L.t + 1, [put("a", b"1")], end=False)
    L.mount_gen = gen + 1
    L.txn(L.t + 2, [put("b", b"2")])
    stale = L.pos
    L.mount_gen = gen
    L.txn(L.t + 3, [put("c", b"3")])
    end = _replay(L, tmp_path).end
    assert end.mount_gen == gen + 1 and end.offset == stale
    assert end.stop_reason == f"mount generation {gen} below {gen + 1} (stale)"
