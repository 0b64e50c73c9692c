"""The log walk with parity trailers and a durable floor (format 2.1).

Real images from the engine (redundancy "parity", or off with a floor), with
groups crafted after the log end by the crafted-log writer, which appends
the parity trailer like the engine does. Each test damages exact sectors and
checks the walk's ScanEnd whole: what was rebuilt (offset and bytes), which
trailers were unreadable, and the torn-tail-or-corruption decision.
"""

from __future__ import annotations

import pytest

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine
from statefsd.storage.image import read_superblock_slot
from statefsd.errors import CorruptImage
from statefsd.storage.logscan import apply_patches, repair_record
from statefsd.storage.replay import Finding, replay

from tests.format import spec_reader as sr
from tests.format.test_format_crafted_logs import Log, base_images, put  # noqa: F401
from tests.format.test_format_spec_reader import KEY

S = fmt.GROUP_ALIGN


def _replay(img: bytes | bytearray, tmp_path, name="crafted.img"):
    path = tmp_path / name
    path.write_bytes(bytes(img))
    with FileDevice(str(path), read_only=True) as dev:
        return replay(dev, read_superblock_slot(dev)[0])


def _sb(img) -> fmt.Superblock:
    slots = [fmt.decode_superblock(bytes(img[o:o + fmt.BLOCK_SIZE])).superblock for o in fmt.SUPERBLOCK_OFFSETS]
    return max((sb for sb in slots if sb is not None), key=lambda sb: sb.generation)


@pytest.fixture
def P(base_images) -> Log:
    L = Log(base_images["parity"])
    assert L.sb["redundancy"] == fmt.REDUNDANCY_PARITY
    return L


def _big_group(L: Log, txn: int, path="big", size=5 * S) -> tuple[int, int, bytes]:
    """One group of several sectors; returns its start, its trailer offset and its data."""
    start = L.pos
    L.txn(txn, [put(path, bytes(range(256)) * (size // 256))])
    trailer = L.pos - fmt.PARITY_TRAILER_SIZE
    return start, trailer, bytes(L.img[start:trailer])


def _smash(L: Log, offset: int, length=S) -> None:
    L.img[offset:offset + length] = bytes(b ^ 0xA5 for b in L.img[offset:offset + length])


# ------------------------------------------------------------ repair on replay

@pytest.mark.parametrize("sector", [0, 2, "last"])
def test_one_damaged_sector_is_rebuilt_and_reported_with_its_original_bytes(P, tmp_path, sector):
    T = P.t
    start, trailer, data = _big_group(P, T + 1)
    P.txn(T + 2, [put("after", b"a")])
    n = len(data) // S
    index = n - 1 if sector == "last" else sector
    at = start + index * S
    _smash(P, at)
    r = _replay(P.img, tmp_path)
    assert r.end.repaired == [(at, data[index * S:(index + 1) * S])]
    assert r.findings == [] and r.index[b"big"].size == 5 * S and b"after" in r.index
    assert r.end.damaged_trailers == [] and not r.end.corrupt


def test_one_damaged_sector_in_each_of_two_groups_is_rebuilt_in_each(P, tmp_path):
    T = P.t
    s1, _, d1 = _big_group(P, T + 1, "one")
    s2, _, d2 = _big_group(P, T + 2, "two")
    _smash(P, s1 + S)
    _smash(P, s2 + 3 * S)
    r = _replay(P.img, tmp_path)
    assert r.end.repaired == [(s1 + S, d1[S:2 * S]), (s2 + 3 * S, d2[3 * S:4 * S])]
    assert {b"one", b"two"} <= set(r.index) and r.findings == []


def test_two_damaged_sectors_of_a_group_are_not_guessed(P, tmp_path):
    T = P.t
    start, _, _ = _big_group(P, T + 1)
    P.txn(T + 2, [put("after", b"a")])
    P.txn(T + 3, [put("later", b"l")])
    _smash(P, start)
    _smash(P, start + 2 * S)
    r = _replay(P.img, tmp_path)
    assert r.end.repaired == [] and r.end.corrupt and r.end.corruption_offset == start
    assert b"big" not in r.index


def test_a_damaged_sector_without_a_trailer_of_its_group_is_not_repaired(P, tmp_path):
    # the trailer names another group: it is not this group's parity
    T = P.t
    start, trailer, _ = _big_group(P, T + 1)
    raw = bytearray(P.img[trailer:trailer + fmt.HEADER_SIZE + S])
    h = fmt.unpack_header(bytes(raw))
    P.img[trailer:trailer + fmt.HEADER_SIZE + S] = fmt.pack_record(
        fmt.PARITY, flags=0, epoch=h.epoch, group=h.group + 7, seq=h.seq, mount_gen=h.mount_gen, txn_id=0,
        payload=bytes(raw[fmt.HEADER_SIZE:]), chunk_index=h.chunk_index)
    _smash(P, start + S)
    r = _replay(P.img, tmp_path)
    assert r.end.repaired == [] and r.end.offset == start and b"big" not in r.index


def test_a_damaged_trailer_leaves_its_group_valid_and_is_reported(P, tmp_path):
    T = P.t
    _, trailer, _ = _big_group(P, T + 1)
    P.txn(T + 2, [put("after", b"a")])
    _smash(P, trailer, 8)
    r = _replay(P.img, tmp_path)
    assert r.end.damaged_trailers == [trailer] and r.end.repaired == []
    assert {b"big", b"after"} <= set(r.index) and r.findings == []


@pytest.mark.parametrize("field", ["group", "seq", "mount_gen", "epoch", "sectors"])
def test_a_trailer_of_another_group_position_or_mount_is_reported_as_damaged(P, tmp_path, field):
    T = P.t
    start, trailer, _ = _big_group(P, T + 1)
    P.txn(T + 2, [put("after", b"a")])
    h = fmt.unpack_header(bytes(P.img[trailer:trailer + fmt.HEADER_SIZE]))
    f = dict(epoch=h.epoch, group=h.group, seq=h.seq, mount_gen=h.mount_gen, chunk_index=h.chunk_index)
    if field == "sectors":
        f["chunk_index"] += 1
    else:
        f[field] += 1
    payload = bytes(P.img[trailer + fmt.HEADER_SIZE:trailer + fmt.HEADER_SIZE + S])
    P.img[trailer:trailer + fmt.HEADER_SIZE + S] = fmt.pack_record(fmt.PARITY, flags=0, txn_id=0, payload=payload,
                                                                 **f)
    r = _replay(P.img, tmp_path)
    assert r.end.damaged_trailers == [trailer] and {b"big", b"after"} <= set(r.index)


def test_an_undamaged_parity_image_reports_nothing(P, tmp_path):
    T = P.t
    _big_group(P, T + 1)
    r = _replay(P.img, tmp_path)
    assert (r.end.repaired, r.end.damaged_trailers, r.findings) == ([], [], [])
    assert r.end.offset == P.pos


def test_a_parity_record_where_a_group_record_belongs_stops_the_walk(P, tmp_path):
    start = P.pos
    P.rec(fmt.PARITY, 0, bytes(S), chunk=1)
    blob = b"".join(P.pending)
    P.img[start:start + len(blob)] = blob
    P.pending = []
    r = _replay(P.img, tmp_path)
    assert (r.end.stop_offset, r.end.stop_reason) == (start, "PARITY record where a group record belongs")


# ------------------------------------------------------------ the durable floor

@pytest.fixture
def floored(base_images) -> Log:
    """Plaintext, no redundancy: the base image's floor is at its log end."""
    L = Log(base_images["off"])
    assert _sb(L.img).durable_end == L.pos
    return L


def test_damage_below_the_floor_is_corruption_even_with_nothing_after_it(floored, tmp_path):
    sb = _sb(floored.img)
    start, _ = sb.active_extent
    last = _replay(floored.img, tmp_path)
    # the base image's last group: its first record sits somewhere below the floor
    groups = [off for off in range(start, sb.durable_end, S)
              if floored.img[off + 4:off + 6] == b"R2"]
    victim = groups[-1]
    floored.img[victim + 70] ^= 1
    r = _replay(floored.img, tmp_path)
    reason = f"checksum mismatch (below the durable floor at byte offset {sb.durable_end})"
    assert (r.end.corrupt, r.end.corruption, r.end.corruption_offset, r.end.evidence_offset) == (
        True, reason, victim, -1)
    assert r.findings == [Finding(victim, "corruption", f"{reason}; the superblock recorded it as flushed")]
    assert len(r.index) < len(last.index) or r.committed < last.committed
    with pytest.raises(CorruptImage, match="below the durable floor"):
        Engine.mount(FileDevice(str(tmp_path / "crafted.img")))


def test_damage_below_the_floor_with_later_groups_names_the_floor_not_the_evidence(floored, tmp_path):
    sb = _sb(floored.img)
    start, _ = sb.active_extent
    first = start
    floored.img[first + 70] ^= 1           # the very first group: every later one is below the floor too
    r = _replay(floored.img, tmp_path)
    assert r.end.corruption_offset == first and r.end.evidence_offset == -1
    assert r.findings[0].reason.endswith("the superblock recorded it as flushed")


def test_a_group_starting_at_the_floor_may_be_torn(floored, tmp_path):
    sb = _sb(floored.img)
    start = floored.pos
    floored.open(floored.t + 1, [put("t", b"torn")])
    floored.flush()
    r = _replay(floored.img, tmp_path)
    assert start == sb.durable_end and r.end.offset == start and r.end.torn_bytes > 0 and not r.end.corrupt
    assert [f.kind for f in r.findings] == ["torn-tail"]


def test_a_20_image_without_a_floor_reads_a_zeroed_last_group_as_a_clean_end(floored, tmp_path):
    img = bytearray(floored.img)
    for off in fmt.SUPERBLOCK_OFFSETS:
        st = fmt.decode_superblock(bytes(img[off:off + fmt.BLOCK_SIZE]))
        if st.superblock is not None:
            img[off:off + fmt.BLOCK_SIZE] = fmt.encode_superblock(st.superblock.evolve(durable_end=0))
    sb = _sb(img)
    groups = [o for o in range(sb.active_extent[0], floored.pos, S) if img[o + 4:o + 6] == b"R2"]
    img[groups[-1]:floored.pos] = bytes(floored.pos - groups[-1])
    r = _replay(img, tmp_path)
    assert not r.end.corrupt and r.end.offset == groups[-1] and r.findings == []


# ---------------------------------------------------------- reads and patches

def test_patches_lay_rebuilt_sectors_over_exactly_the_bytes_they_cover():
    data = bytes(range(256)) * 8                     # 2048 bytes read at device offset 10_000
    patches = {10_000 - S: b"\x01" * S, 10_000 + S: b"\x02" * S, 12_048: b"\x03" * S, 9_000: b"\x04" * S}
    out = apply_patches(patches, 10_000, data)
    assert len(out) == len(data)
    assert out[:S] == data[:S]                       # the patch below ends exactly at the read: untouched
    assert out[S:2 * S] == b"\x02" * S
    assert out[2 * S:] == data[2 * S:]               # the one above starts exactly at its end: untouched
    assert apply_patches({9_000: b"\x04" * S}, 9_600, data[:100]) == data[:100]
    assert apply_patches({}, 5, b"abc") == b"abc"
    partial = apply_patches({9_800: b"\x05" * S}, 10_000, data)   # overlaps the first 312 bytes
    assert partial[:312] == b"\x05" * 312 and partial[312:] == data[312:]


def test_a_value_damaged_after_replay_is_rebuilt_by_repair_record(P, tmp_path):
    T = P.t
    start, trailer, data = _big_group(P, T + 1)
    path = tmp_path / "img"
    path.write_bytes(bytes(P.img))
    with FileDevice(str(path), read_only=True) as dev:
        sb = read_superblock_slot(dev)[0]
        entry = replay(dev, sb).index[b"big"]
        chunk_at = entry.chunks[0][0]
        _smash(P, start + 3 * S)
    path.write_bytes(bytes(P.img))
    with FileDevice(str(path), read_only=True) as dev:
        assert repair_record(dev, sb, chunk_at, {}) == (start + 3 * S, data[3 * S:4 * S])


def test_a_record_with_the_largest_payload_is_repaired_in_any_of_its_sectors(P, tmp_path):
    start = P.pos
    payload = bytes(range(251)) * (fmt.MAX_PAYLOAD // 251) + bytes(fmt.MAX_PAYLOAD % 251 + fmt.SEAL_OVERHEAD)
    assert len(payload) == fmt.MAX_PAYLOAD + fmt.SEAL_OVERHEAD
    P.t += 1
    P.rec(sr.ABORT, P.t, payload, flags=sr.GROUP_END)
    P.flush()
    data = bytes(P.img[start:P.pos - fmt.PARITY_TRAILER_SIZE])
    at = start + 200 * S
    _smash(P, at)
    r = _replay(P.img, tmp_path)
    assert r.end.repaired == [(at, data[200 * S:201 * S])] and r.max_txn_id == P.t


def test_a_trailer_that_does_not_fit_in_the_region_leaves_the_last_group_valid(P, tmp_path):
    sb = _sb(P.img)
    start, length = sb.active_extent
    end = start + length
    cap = fmt.MAX_PAYLOAD + fmt.SEAL_OVERHEAD
    while end - S - P.pos - fmt.HEADER_SIZE > cap:     # fill until the last group's payload fits one record
        room = end - S - P.pos - fmt.HEADER_SIZE
        big = fmt.MAX_PAYLOAD if room >= fmt.align_up(fmt.HEADER_SIZE + fmt.MAX_PAYLOAD) + fmt.PARITY_TRAILER_SIZE else 0
        P.t += 1
        P.rec(sr.ABORT, P.t, bytes(big), flags=sr.GROUP_END)
        P.flush()
    P.t += 1
    last = P.pos
    P.rec(sr.ABORT, P.t, bytes(end - S - P.pos - fmt.HEADER_SIZE), flags=sr.GROUP_END)
    beyond = bytes(P.img[end:end + fmt.PARITY_TRAILER_SIZE])
    P.flush()                       # its trailer would start at end - 512: it cannot be read whole
    P.img[end:end + fmt.PARITY_TRAILER_SIZE] = beyond   # what the flush wrote past the region is undone
    r = _replay(P.img, tmp_path)
    assert r.max_txn_id == P.t and r.end.damaged_trailers == [end - S]
    assert r.end.stop_reason == "end of region" and not r.end.corrupt and last < end - S


def test_the_first_record_of_a_group_is_rebuilt_by_repair_record(P, tmp_path):
    T = P.t
    start, _, data = _big_group(P, T + 1)
    _smash(P, start)
    path = tmp_path / "img"
    path.write_bytes(bytes(P.img))
    with FileDevice(str(path), read_only=True) as dev:
        sb = read_superblock_slot(dev)[0]
        assert repair_record(dev, sb, start, {}) == (start, data[:S])


def _aligned_group(P: Log, count=4) -> tuple[int, int, bytes]:
    """A group of ABORT records of exactly one sector each, so every record
    starts on a sector boundary; returns its start, trailer offset and data."""
    start = P.pos
    for i in range(count):
        P.t += 1
        P.rec(sr.ABORT, P.t, bytes([i + 1]) * (S - fmt.HEADER_SIZE), flags=sr.GROUP_END if i == count - 1 else 0)
    P.flush()
    trailer = P.pos - fmt.PARITY_TRAILER_SIZE
    return start, trailer, bytes(P.img[start:trailer])


def _repair(P: Log, tmp_path, offset: int, patches=None):
    path = tmp_path / "img"
    path.write_bytes(bytes(P.img))
    with FileDevice(str(path), read_only=True) as dev:
        return repair_record(dev, read_superblock_slot(dev)[0], offset, patches or {})


def test_repair_record_passes_over_the_groups_other_records_to_its_trailer(P, tmp_path):
    start, _, data = _aligned_group(P)
    _smash(P, start + S)
    assert _repair(P, tmp_path, start + S) == (start + S, data[S:2 * S])
    assert _replay(P.img, tmp_path).end.repaired == [(start + S, data[S:2 * S])]


def test_a_trailer_whose_crc_fails_is_not_trusted_for_a_repair(P, tmp_path):
    start, trailer, _ = _aligned_group(P)
    _smash(P, start + S)
    P.img[trailer + 40] ^= 0x01          # path_hash field of the PARITY header: its CRC no longer matches
    assert _repair(P, tmp_path, start + S) is None
    r = _replay(P.img, tmp_path)
    assert r.end.repaired == [] and r.end.offset == start


def test_repair_record_uses_only_the_first_trailer_that_covers_the_record(P, tmp_path):
    # A later PARITY record that claims to cover the group too (only a forger
    # writes one) is never consulted when the group's own trailer fails.
    # (The decoy's parity is not zero: with one-sector records of equal length,
    # the XOR of three valid records is itself a record whose CRC checks out.)
    start, trailer, data = _aligned_group(P)
    decoy = fmt.unpack_header(bytes(P.img[trailer:trailer + fmt.HEADER_SIZE]))
    P.img[trailer:trailer + fmt.HEADER_SIZE + S] = fmt.pack_record(
        fmt.PARITY, flags=0, epoch=decoy.epoch, group=decoy.group, seq=decoy.seq, mount_gen=decoy.mount_gen,
        txn_id=0, payload=b"\x5a" * S, chunk_index=decoy.chunk_index)
    later = trailer + fmt.PARITY_TRAILER_SIZE
    covered = bytes(P.img[start:later])
    P.img[later:later + fmt.HEADER_SIZE + S] = fmt.pack_record(
        fmt.PARITY, flags=0, epoch=decoy.epoch, group=decoy.group, seq=decoy.seq, mount_gen=decoy.mount_gen,
        txn_id=0, payload=fmt.xor_sectors(covered), chunk_index=(later - start) // S)
    _smash(P, start + S)
    assert _repair(P, tmp_path, start + S) is None


# ------------------------------------------- finding a log without a superblock

def _first(img, offset: int, tmp_path):
    from statefsd.storage.logscan import first_record
    path = tmp_path / "first.img"
    path.write_bytes(bytes(img))
    with FileDevice(str(path), read_only=True) as dev:
        return first_record(dev, offset)


def test_the_first_record_of_a_log_is_found_by_its_group_1_and_seq_0(base_images, tmp_path):
    img = bytearray(base_images["off"])
    sb = _sb(img)
    start, _ = sb.active_extent
    h = _first(img, start, tmp_path)
    assert h is not None and (h.group, h.seq, h.epoch) == (1, 0, sb.log_epoch)
    assert _first(img, start + S, tmp_path) is None                 # zeroed or a later group: no log opens there


@pytest.mark.parametrize("field", ["group", "seq", "crc", "magic", "parity"])
def test_a_record_that_cannot_open_a_log_is_not_taken_for_its_first(base_images, tmp_path, field):
    img = bytearray(base_images["off"])
    start, _ = _sb(img).active_extent
    h = fmt.unpack_header(bytes(img[start:start + fmt.HEADER_SIZE]))
    payload = bytes(img[start + fmt.HEADER_SIZE:start + fmt.HEADER_SIZE + h.payload_len])
    f = dict(flags=h.flags, epoch=h.epoch, group=h.group, seq=h.seq, mount_gen=h.mount_gen, txn_id=h.txn_id,
             path_hash=h.path_hash, chunk_index=h.chunk_index, op_index=h.op_index)
    rtype = h.type
    if field in ("group", "seq"):
        f[field] += 1
    if field == "parity":
        rtype, payload, f["flags"] = fmt.PARITY, bytes(S), 0
    raw = bytearray(fmt.pack_record(rtype, payload=payload, **f))
    if field == "crc":
        raw[-1] ^= 1
    if field == "magic":
        raw[4] ^= 1
    img[start:start + len(raw)] = raw
    assert _first(img, start, tmp_path) is None


def test_a_header_past_the_device_end_opens_no_log(base_images, tmp_path):
    img = base_images["off"]
    assert _first(img, len(img) - fmt.HEADER_SIZE + 1, tmp_path) is None
    assert _first(img, len(img) - fmt.HEADER_SIZE, tmp_path) is None   # zeros there: read, and refused


def test_a_first_record_ending_exactly_at_the_device_end_is_found(base_images, tmp_path):
    img = bytearray(base_images["off"])
    h = fmt.unpack_header(bytes(img[_sb(img).active_extent[0]:][:fmt.HEADER_SIZE]))
    raw = fmt.pack_record(fmt.ABORT, flags=fmt.FLAG_GROUP_END, epoch=h.epoch, group=1, seq=0, mount_gen=1,
                          txn_id=9)
    img[len(img) - len(raw):] = raw
    found = _first(img, len(img) - len(raw), tmp_path)
    assert found is not None and found.txn_id == 9


def test_looking_for_a_first_record_past_the_end_of_a_strict_device_reads_nothing(base_images):
    # The simulated device refuses reads past its end (a file reads zeros there).
    from statefsd.storage.logscan import first_record
    from statefsd.testing.simdev import SimulatedDevice
    img = base_images["off"]
    dev = SimulatedDevice(image=img, record=False)
    assert first_record(dev, len(img) - fmt.HEADER_SIZE + 1) is None
    assert first_record(dev, len(img)) is None
    assert first_record(dev, _sb(img).active_extent[0]) is not None
