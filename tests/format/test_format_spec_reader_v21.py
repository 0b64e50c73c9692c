"""Format 2.1 (durable floor, parity trailers, identity copy) as docs/statefs.md
specifies it, on images built here from the spec alone: the spec reader must
read what the spec says a 2.1 writer writes, repair any one damaged sector of a
group from its parity trailer, and call damage below the durable floor
corruption, never a torn tail or a clean end.
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from tests.format import spec_reader as sr
from tests.format.test_format_crafted_logs import Log, put
from tests.format.test_format_spec_reader import _resealed

IMAGE_BYTES = 1 << 20


def spec_mkfs(*, redundancy: int, total_bytes: int = IMAGE_BYTES) -> bytes:
    """A fresh 2.1 image exactly as sections 2, 3.1 and 3.5 describe mkfs."""
    total_blocks = total_bytes // 4096
    half = (total_blocks - 3) // 2
    uuid = os.urandom(16)
    epoch = int.from_bytes(os.urandom(4), "little") or 1
    body = struct.pack("<8sHHIQ16s5QBBHIQ32s32s32s16sQB35x", b"STATEFS\0", 2, 1, 4096, 1, uuid,
                       total_blocks, 2, half, 2 + half, half, 0, 0, 0, epoch, 0, bytes(32), bytes(32),
                       sr.genesis_hash(uuid), bytes(16), 0, redundancy)
    slot = (body + struct.pack("<I", sr.crc32c(body))).ljust(4096, b"\0")
    img = bytearray(total_bytes)
    for offset in (0, 4096, (total_blocks - 1) * 4096):
        img[offset:offset + 4096] = slot
    return bytes(img)


def with_superblock(img: bytes, **fields) -> bytes:
    """Both slots rewritten with ``fields`` (a later superblock write, 3.4)."""
    out = bytearray(img)
    for at in (0, 4096):
        out[at:at + 4096] = _resealed(bytes(out[at:at + 4096]), **fields)
    return bytes(out)


def written(redundancy: int) -> tuple[bytes, dict, list[tuple[int, int]]]:
    """Five groups (one of them 2.3 KiB of chunked data), the floor at the log end.
    Returns the image, its state and each group's (start, data end)."""
    L = Log(spec_mkfs(redundancy=redundancy))
    rng = random.Random(redundancy)
    state, groups = {}, []
    for i, value in enumerate([b"one", rng.randbytes(2300), b"", rng.randbytes(700), b"last"]):
        start = L.pos
        L.txn(i + 1, [put(f"k/{i}", value)])
        data_end = L.pos
        if redundancy:  # the data end is where the trailer starts: at its PARITY record
            data_end = next(t for t in range(start + 512, L.pos, 512) if L.img[t + 6] == sr.PARITY)
        groups.append((start, data_end))
        state[f"k/{i}"] = value
    return with_superblock(bytes(L.img), durable_end=L.pos), state, groups


@pytest.fixture(scope="module", params=[0, 1], ids=["redundancy-off", "redundancy-parity"])
def image(request):
    return (request.param, *written(request.param))


@pytest.fixture(scope="module")
def parity_image():
    return written(1)


def test_a_21_image_decodes_to_what_was_written_with_the_floor_at_its_end(image):
    redundancy, img, state, groups = image
    ours = sr.read_image(img)
    assert ours["superblock"]["version_minor"] == 1 and ours["superblock"]["redundancy"] == redundancy
    assert ours["state"] == state and not ours["corrupt"] and ours["outcome"] == "clean end"
    assert ours["log_end"] == ours["superblock"]["durable_end"] and ours["repaired"] == []
    if redundancy:  # each group's trailer sits between its data and the next group
        assert all(b > a for (_, a), (b, _) in zip(groups, groups[1:]))


@pytest.mark.parametrize("damage", ["garbage", "zeroed", "bit flip"])
def test_any_one_damaged_data_sector_of_any_group_is_rebuilt_from_its_parity(parity_image, damage):
    img, state, groups = parity_image
    rng = random.Random(damage)
    for start, data_end in groups:
        for at in range(start, data_end, 512):
            bad = bytearray(img)
            # A sector's first byte always belongs to a record (padding is under 512 bytes).
            bad[at:at + 512] = {"garbage": rng.randbytes(512), "zeroed": bytes(512),
                                "bit flip": bytes([img[at] ^ 0x80]) + bytes(img[at + 1:at + 512])}[damage]
            ours = sr.read_image(bytes(bad))
            assert ours["state"] == state and not ours["corrupt"], (at, damage)
            assert ours["repaired"] == [(at, bytes(img[at:at + 512]))], at


def test_one_damaged_sector_in_each_of_several_groups_is_repaired_in_each(parity_image):
    img, state, groups = parity_image
    bad = bytearray(img)
    for start, _ in groups:
        bad[start + 10] ^= 0xFF
    ours = sr.read_image(bytes(bad))
    assert ours["state"] == state and [at for at, _ in ours["repaired"]] == [s for s, _ in groups]


def test_damage_parity_cannot_repair_is_corruption_below_the_floor(image):
    redundancy, img, state, groups = image
    start, data_end = groups[1]  # five data sectors
    bad = bytearray(img)
    bad[start + 100] ^= 1
    bad[start + 600] ^= 1  # two sectors of one group: beyond parity
    ours = sr.read_image(bytes(bad))
    assert ours["corrupt"] and ours["outcome"] == "corruption below the durable floor"
    assert ours["log_end"] == start and ours["state"] == {"k/0": b"one"}


@pytest.mark.parametrize("floor", ["at the log end", "not recorded (2.0)"])
def test_a_lost_last_group_is_corruption_below_the_floor_and_a_clean_end_without_one(image, floor):
    redundancy, img, state, groups = image
    start, _ = groups[-1]
    end = sr.read_image(img)["log_end"]
    bad = bytearray(img)
    bad[start:end] = bytes(end - start)  # flushed, then zeroed: looks like fresh space
    if floor != "at the log end":
        bad = bytearray(with_superblock(bytes(bad), durable_end=0))
    ours = sr.read_image(bytes(bad))
    assert "k/4" not in ours["state"] and ours["log_end"] == start
    if floor == "at the log end":
        assert ours["corrupt"] and ours["outcome"] == "corruption below the durable floor"
    else:
        assert not ours["corrupt"] and ours["outcome"] == "clean end"


def test_a_torn_last_group_above_the_floor_is_a_torn_tail(image):
    redundancy, img, state, groups = image
    start, data_end = groups[-1]
    img = with_superblock(img, durable_end=start)  # the last group was never known durable
    bad = bytearray(img)
    bad[start + 150:data_end] = bytes(data_end - start - 150)  # its COMMIT lost its end
    if redundancy:
        bad[data_end:data_end + sr.TRAILER] = bytes(sr.TRAILER)  # and its trailer
    ours = sr.read_image(bytes(bad))
    assert not ours["corrupt"] and ours["outcome"] == "torn tail" and "k/4" not in ours["state"]


def test_a_damaged_trailer_leaves_its_group_valid(parity_image):
    img, state, groups = parity_image
    bad = bytearray(img)
    for _, data_end in groups:
        bad[data_end + 20] ^= 0xFF  # each PARITY record's CRC fails
    ours = sr.read_image(bytes(bad))
    assert ours["state"] == state and not ours["corrupt"] and ours["repaired"] == []


def test_a_parity_record_where_a_group_record_belongs_stops_the_walk():
    L = Log(spec_mkfs(redundancy=0))
    L.txn(1, [put("a", b"1")])
    L.rec(sr.PARITY, 0, bytes(512), chunk=1, flags=sr.GROUP_END)
    L.flush()
    L.txn(2, [put("b", b"2")])
    ours = sr.read_image(bytes(L.img))
    assert "PARITY" in ours["stop_reason"] and ours["state"] == {"a": b"1"}


@pytest.mark.parametrize("fields,valid", [
    ({"redundancy": 2}, False),
    ({"durable_end": 4096}, False),              # below the active region
    ({"durable_end": 2 * 4096}, True),           # its first byte
    ({"durable_end": (2 + 126) * 4096}, True),   # its end, inclusive
    ({"durable_end": (2 + 126) * 4096 + 512}, False),
])
def test_superblock_field_checks_of_21(fields, valid):
    img = spec_mkfs(redundancy=1)
    slot = _resealed(img[:4096], **fields)
    assert (sr._decode_slot(slot)[0] is not None) == valid


def test_minor_versions_0_and_1_are_read_and_2_is_refused():
    img = spec_mkfs(redundancy=0)
    assert sr.read_image(with_superblock(img, minor=0))["superblock"]["version_minor"] == 0
    with pytest.raises(sr.Refused, match="version 2.2"):
        sr.read_image(with_superblock(img, minor=2))


def test_the_layout_leaves_the_last_block_to_an_identical_identity_copy():
    img = spec_mkfs(redundancy=1)
    sb = sr.read_image(img)["superblock"]
    (r0s, r0b), (r1s, r1b) = sb["regions"]
    assert (r0s, r0b, r1s, r1b) == (2, 126, 128, 126) and r1s + r1b <= sb["total_blocks"] - 1
    assert img[-4096:] == img[:4096]
