"""The format module's checks of bytes read from a device, at their exact edges.

Every value here is built with statefsd.storage.format's own packers (or is a slot
the real mkfs wrote) and then bent by one field, so each test pins one
decision: the last accepted value and the first refused one, and the
refusal is a clear problem or ValueError naming it, never a struct.error.
"""

from __future__ import annotations

import struct

import pytest

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine
from statefsd.errors import FormatError

UUID = bytes(range(16))
MiB = 1 << 20


# ------------------------------------------------------------------ helpers

def _sb(**changes) -> fmt.Superblock:
    return fmt.new_superblock(MiB, device_uuid=UUID).evolve(**changes)


def _slot(**changes) -> bytes:
    return fmt.encode_superblock(_sb(**changes))


def _reseal(slot: bytes | bytearray) -> bytes:
    """A slot with its CRC recomputed over whatever its bytes now say."""
    slot = bytearray(slot)
    struct.pack_into("<I", slot, fmt.SUPERBLOCK_CRC_OFFSET, fmt.crc32c(bytes(slot[:fmt.SUPERBLOCK_CRC_OFFSET])))
    return bytes(slot)


def _problem(**changes) -> str:
    return fmt.decode_superblock(_slot(**changes)).problem


def _header(rtype=fmt.PREPARE, *, flags=0, payload=b"", magic=None):
    raw = bytearray(fmt.pack_record(rtype, flags=flags, epoch=7, group=1, seq=0, mount_gen=1, txn_id=1,
                                    payload=payload))
    if magic is not None:
        raw[4:6] = magic
    return fmt.unpack_header(bytes(raw))


def _put(path: bytes, value_len: int = 0) -> fmt.Op:
    return fmt.Op(fmt.OP_PUT, path, value_len)


def _op(kind: int, path: bytes, value_len: int = 0, reserved: int = 0) -> bytes:
    return struct.pack("<BBHI", kind, reserved, len(path), value_len) + path


def _prepare(*ops: bytes, count: int | None = None) -> bytes:
    return struct.pack("<H", len(ops) if count is None else count) + b"".join(ops)


def _forge_suffix(data: bytes, target: int) -> bytes:
    """Four bytes x with crc32c(data + x) == target (CRC is affine over GF(2))."""
    base = fmt.crc32c(data + bytes(4))
    cols = [fmt.crc32c(data + (1 << i).to_bytes(4, "little")) ^ base for i in range(32)]
    want = target ^ base
    # Gaussian elimination: rows are (vector of the 32 unknowns, result bit).
    rows = [(sum(((cols[i] >> bit) & 1) << i for i in range(32)), (want >> bit) & 1) for bit in range(32)]
    solution = 0
    pivots = []
    for col in range(32):
        pivot = next((r for r in range(len(pivots), 32) if rows[r][0] >> col & 1), None)
        if pivot is None:
            continue
        k = len(pivots)
        rows[k], rows[pivot] = rows[pivot], rows[k]
        for r in range(32):
            if r != k and rows[r][0] >> col & 1:
                rows[r] = (rows[r][0] ^ rows[k][0], rows[r][1] ^ rows[k][1])
        pivots.append(col)
    for k, col in enumerate(pivots):
        solution |= rows[k][1] << col
    x = solution.to_bytes(4, "little")
    assert fmt.crc32c(data + x) == target
    return x


# --------------------------------------------------------------- superblock

def test_a_slot_written_by_mkfs_decodes_to_the_superblock_it_holds(tmp_path):
    path = str(tmp_path / "img")
    create_image(path, 2 * MiB)
    with FileDevice(path) as dev:
        Engine.mkfs(dev)
    raw = open(path, "rb").read(2 * fmt.BLOCK_SIZE)
    a = fmt.decode_superblock(raw[:fmt.BLOCK_SIZE])
    assert a.problem == "" and a.superblock.generation == 1
    assert a.superblock.total_blocks == 512
    assert a.superblock.regions == fmt.new_superblock(2 * MiB, device_uuid=UUID).regions
    assert a.superblock.active_region == 0 and a.superblock.encryption == fmt.ENCRYPTION_OFF


def test_a_slot_of_exactly_256_bytes_is_enough_and_255_is_truncated():
    slot = _slot()
    assert fmt.decode_superblock(slot[:256]).superblock == _sb()
    assert fmt.decode_superblock(slot[:255]) == (None, "slot truncated")
    assert fmt.decode_superblock(b"") == (None, "slot truncated")


def test_magic_must_match_in_all_eight_bytes_even_under_a_valid_checksum():
    for i in range(8):
        slot = bytearray(_slot())
        slot[i] ^= 0x01
        assert fmt.decode_superblock(_reseal(slot)) == (None, "no StateFS magic"), i


def test_any_changed_byte_under_the_checksum_is_a_checksum_mismatch():
    for offset in (8, 100, 251, 252, 255):
        slot = bytearray(_slot())
        slot[offset] ^= 0x40
        assert fmt.decode_superblock(bytes(slot)) == (None, "superblock checksum mismatch"), offset


def test_bytes_after_the_checksum_are_not_covered():
    slot = bytearray(_slot())
    slot[256:300] = b"\xff" * 44
    assert fmt.decode_superblock(bytes(slot)).problem == ""


def test_major_version_other_than_2_is_refused_outright():
    for major in (1, 3):
        with pytest.raises(FormatError, match="reads only major version 2"):
            fmt.decode_superblock(_slot(version_major=major))


def test_minor_versions_up_to_this_code_are_read_and_a_newer_one_is_refused():
    for minor in range(fmt.VERSION_MINOR + 1):
        assert fmt.decode_superblock(_slot(version_minor=minor)).problem == ""
    with pytest.raises(FormatError, match="upgrade statefs"):
        fmt.decode_superblock(_slot(version_minor=fmt.VERSION_MINOR + 1))


@pytest.mark.parametrize("changes,problem", [
    (dict(block_size=8192), "unsupported block size 8192"),
    (dict(block_size=4095), "unsupported block size 4095"),
    (dict(active_region=2), "active_region 2 is not 0 or 1"),
    (dict(encryption=2), "unknown encryption mode 2"),
    (dict(flags=1), "unknown superblock flags 0x1"),
    (dict(flags=0x8000), "unknown superblock flags 0x8000"),
    (dict(regions=((1, 127), (129, 127))), "log region (1, 127) outside the device"),
    (dict(regions=((2, 0), (2, 254))), "log region (2, 0) outside the device"),
    (dict(regions=((2, 128), (129, 127))), "log region (129, 127) outside the device"),
    (dict(regions=((2, 127), (129, 128))), "log region (129, 128) outside the device"),
    (dict(regions=((2, 255), (2, 1))), "log region (2, 255) outside the device"),
    (dict(regions=((2, 127), (129, 127)), total_blocks=255), "log region (129, 127) outside the device"),
])
def test_each_field_check_names_the_field_that_fails(changes, problem):
    assert _problem(**changes) == problem
    assert fmt.superblock_layout_problem(_sb(**changes)) == problem


@pytest.mark.parametrize("changes", [
    dict(active_region=1),
    dict(encryption=fmt.ENCRYPTION_XCHACHA20POLY1305),
    dict(regions=((2, 1), (3, 1))),                 # one-block regions, back to back
    dict(regions=((2, 127), (129, 127))),           # the second ends exactly at the last block
    dict(regions=((2, 100), (200, 56))),            # a gap between them is allowed
])
def test_field_values_at_the_edge_of_what_is_allowed_are_accepted(changes):
    status = fmt.decode_superblock(_slot(**changes))
    assert status.problem == "" and status.superblock == _sb(**changes)


# ------------------------------------------------------------ record header

def test_a_packed_header_of_every_record_type_has_no_problem():
    for rtype in set(fmt.RECORD_TYPES) - {fmt.PARITY}:
        for flags in (0, fmt.FLAG_GROUP_END, fmt.FLAG_SEALED, fmt.KNOWN_FLAGS):
            assert fmt.header_problem(_header(rtype, flags=flags)) == ""
    assert fmt.header_problem(_header(fmt.PARITY, payload=bytes(fmt.GROUP_ALIGN))) == ""


@pytest.mark.parametrize("flags,payload_len", [(0, fmt.GROUP_ALIGN - 1), (0, fmt.GROUP_ALIGN + 1), (0, 0),
                                               (fmt.FLAG_GROUP_END, fmt.GROUP_ALIGN),
                                               (fmt.FLAG_SEALED, fmt.GROUP_ALIGN)])
def test_a_parity_record_carries_exactly_one_sector_and_no_flags(flags, payload_len):
    h = _header(fmt.PARITY, flags=flags, payload=bytes(payload_len))
    assert fmt.header_problem(h) == "malformed PARITY record"


def test_record_magic_must_be_R2():
    assert fmt.header_problem(_header(magic=b"R3")) == "bad record magic"
    assert fmt.header_problem(_header(magic=b"r2")) == "bad record magic"


def test_record_types_outside_the_known_set_are_named():
    below, above = min(fmt.RECORD_TYPES) - 1, max(fmt.RECORD_TYPES) + 1
    assert fmt.header_problem(_header(below)) == f"unknown record type {below:#x}"
    assert fmt.header_problem(_header(above)) == f"unknown record type {above:#x}"


def test_unknown_record_flags_are_named():
    assert fmt.header_problem(_header(flags=0x04)) == "unknown record flags 0x4"
    assert fmt.header_problem(_header(flags=0x80 | fmt.FLAG_GROUP_END)) == "unknown record flags 0x81"


def test_payload_length_is_capped_at_the_largest_sealed_payload():
    h = _header()._replace(payload_len=fmt.MAX_PAYLOAD + fmt.SEAL_OVERHEAD)
    assert fmt.header_problem(h) == ""
    h = h._replace(payload_len=fmt.MAX_PAYLOAD + fmt.SEAL_OVERHEAD + 1)
    assert fmt.header_problem(h) == f"payload length {fmt.MAX_PAYLOAD + fmt.SEAL_OVERHEAD + 1} over the cap"


def test_record_crc_covers_header_bytes_4_to_63_and_the_payload():
    raw = fmt.pack_record(fmt.PAYLOAD, flags=0, epoch=3, group=1, seq=0, mount_gen=1, txn_id=5,
                          payload=b"value bytes")
    h = fmt.unpack_header(raw)
    buf = b"\xaa" * 100 + raw   # at an offset, with nothing after it: the record ends the buffer
    assert fmt.record_crc_ok(buf, 100, h)
    for i in range(4, len(raw)):
        bad = bytearray(buf)
        bad[100 + i] ^= 1
        assert not fmt.record_crc_ok(bytes(bad), 100, h), i
    assert not fmt.record_crc_ok(buf, 100, h._replace(crc=h.crc ^ 1))


def test_a_record_running_past_the_buffer_fails_even_when_the_shorter_bytes_match_its_crc():
    # A payload whose last 4 bytes were chosen so that the CRC is the same with
    # and without them: only the length check tells the truncated copy apart.
    body = b"payload that the buffer cuts short"
    raw = fmt.pack_record(fmt.PAYLOAD, flags=0, epoch=3, group=1, seq=0, mount_gen=1, txn_id=5,
                          payload=body + bytes(4))
    header = raw[:64]
    # Choose the 4 trailing bytes so that crc(header[4:] + body + x) == crc(header[4:] + body).
    prefix = header[4:] + body
    x = _forge_suffix(prefix, fmt.crc32c(prefix))
    raw = fmt.pack_record(fmt.PAYLOAD, flags=0, epoch=3, group=1, seq=0, mount_gen=1, txn_id=5,
                          payload=body + x)
    h = fmt.unpack_header(raw)
    assert fmt.record_crc_ok(raw, 0, h)
    assert fmt.crc32c(raw[4:-4]) == h.crc          # the cut-short bytes would pass the CRC alone
    assert not fmt.record_crc_ok(raw[:-4], 0, h)
    assert not fmt.record_crc_ok(raw[:-1], 0, h)


# ----------------------------------------------------------------- PREPARE

def test_prepare_encoding_round_trips_through_the_decoder():
    ops = [_put(b"a", 1), fmt.Op(fmt.OP_DELETE, b"b/c"), _put("ключ".encode(), fmt.MAX_VALUE_BYTES)]
    payload = fmt.encode_prepare(ops)
    assert len(payload) == fmt.prepare_size(ops)
    assert fmt.decode_prepare(payload) == ops


@pytest.mark.parametrize("payload", [b"", b"\x01"])
def test_prepare_payload_under_two_bytes_is_too_short_not_a_struct_error(payload):
    with pytest.raises(ValueError, match="^PREPARE payload too short$"):
        fmt.decode_prepare(payload)


def test_zero_op_prepare_is_refused_and_one_op_is_the_minimum():
    with pytest.raises(ValueError, match="^PREPARE: a transaction needs at least one operation$"):
        fmt.decode_prepare(_prepare())
    assert fmt.decode_prepare(_prepare(_op(fmt.OP_PUT, b"k"))) == [_put(b"k")]


def test_128_ops_are_allowed_and_129_are_not():
    ops = [_op(fmt.OP_PUT, b"k%d" % i) for i in range(fmt.MAX_TXN_OPS + 1)]
    assert len(fmt.decode_prepare(_prepare(*ops[:fmt.MAX_TXN_OPS]))) == fmt.MAX_TXN_OPS == 128
    with pytest.raises(ValueError, match=f"129 operations exceed the limit of {fmt.MAX_TXN_OPS}"):
        fmt.decode_prepare(_prepare(*ops))


def test_op_count_is_read_from_the_first_two_bytes_little_endian():
    two = _prepare(_op(fmt.OP_PUT, b"x"), _op(fmt.OP_DELETE, b"y"))
    assert two[:2] == b"\x02\x00"
    assert [op.path for op in fmt.decode_prepare(two)] == [b"x", b"y"]


def test_an_op_list_shorter_than_its_count_is_truncated():
    with pytest.raises(ValueError, match="^PREPARE op truncated$"):
        fmt.decode_prepare(_prepare(_op(fmt.OP_PUT, b"x"), count=2))
    with pytest.raises(ValueError, match="^PREPARE op truncated$"):
        fmt.decode_prepare(_prepare(count=1) + bytes(7))


def test_an_op_header_with_no_path_bytes_after_it_has_an_invalid_path_length():
    # the 8-byte op header fits exactly; its 1-byte path does not
    with pytest.raises(ValueError, match="^PREPARE path length 1 runs past the payload$"):
        fmt.decode_prepare(_prepare(count=1) + struct.pack("<BBHI", fmt.OP_PUT, 0, 1, 0))


@pytest.mark.parametrize("kind,reserved", [(0, 0), (3, 0), (fmt.OP_PUT, 1), (fmt.OP_DELETE, 0x80)])
def test_unknown_op_kind_or_reserved_byte_is_refused(kind, reserved):
    problem = f"reserved byte {reserved} is not zero" if reserved else f"operation kind {kind} unknown"
    with pytest.raises(ValueError, match=problem):
        fmt.decode_prepare(_prepare(_op(kind, b"p", reserved=reserved)))


def test_an_empty_path_is_refused_and_a_one_byte_path_is_not():
    with pytest.raises(ValueError, match="a key must not be empty"):
        fmt.decode_prepare(_prepare(_op(fmt.OP_PUT, b"")))
    assert fmt.decode_prepare(_prepare(_op(fmt.OP_DELETE, b"/")))[0].path == b"/"


def test_a_512_byte_path_is_allowed_and_513_is_not():
    assert fmt.decode_prepare(_prepare(_op(fmt.OP_PUT, b"p" * 512)))[0].path == b"p" * 512
    with pytest.raises(ValueError, match="key of 513 bytes exceeds the limit of 512"):
        fmt.decode_prepare(_prepare(_op(fmt.OP_PUT, b"p" * 513)))


def test_a_path_running_past_the_payload_is_an_invalid_length():
    payload = _prepare(_op(fmt.OP_PUT, b"abcd"))
    with pytest.raises(ValueError, match="path length 4 runs past the payload"):
        fmt.decode_prepare(payload[:-1])


@pytest.mark.parametrize("path", [b"a\x00b", b"\x00", b"\xff", b"ok\xc3"])
def test_a_path_with_nul_or_invalid_utf8_is_refused(path):
    with pytest.raises(ValueError, match="a key must (be valid UTF-8|not contain NUL)"):
        fmt.decode_prepare(_prepare(_op(fmt.OP_PUT, path)))


def test_a_value_of_exactly_8_MiB_is_allowed_and_one_byte_more_is_not():
    assert fmt.decode_prepare(_prepare(_op(fmt.OP_PUT, b"v", fmt.MAX_VALUE_BYTES)))[0].value_len == 8 * MiB
    with pytest.raises(ValueError, match=f"value of {8 * MiB + 1} bytes exceeds the limit of {8 * MiB}"):
        fmt.decode_prepare(_prepare(_op(fmt.OP_PUT, b"v", fmt.MAX_VALUE_BYTES + 1)))


def test_a_delete_op_carries_no_value_length():
    assert fmt.decode_prepare(_prepare(_op(fmt.OP_DELETE, b"d"))) == [fmt.Op(fmt.OP_DELETE, b"d")]
    with pytest.raises(ValueError, match=r"a delete carries no value \(value length 1\)"):
        fmt.decode_prepare(_prepare(_op(fmt.OP_DELETE, b"d", 1)))


def test_trailing_bytes_after_the_last_op_are_refused():
    with pytest.raises(ValueError, match="trailing bytes"):
        fmt.decode_prepare(_prepare(_op(fmt.OP_PUT, b"x")) + b"\x00")


def test_total_value_bytes_may_reach_16_MiB_and_not_one_byte_more():
    full = [_op(fmt.OP_PUT, b"a", fmt.MAX_VALUE_BYTES), _op(fmt.OP_PUT, b"b", fmt.MAX_VALUE_BYTES)]
    assert sum(op.value_len for op in fmt.decode_prepare(_prepare(*full))) == fmt.MAX_TXN_BYTES == 16 * MiB
    with pytest.raises(ValueError, match=f"transaction of {16 * MiB + 1} value bytes exceeds the limit of {16 * MiB}"):
        fmt.decode_prepare(_prepare(*full, _op(fmt.OP_PUT, b"c", 1)))
    with pytest.raises(ValueError, match="exceeds the limit"):
        fmt.decode_prepare(_prepare(full[0], _op(fmt.OP_PUT, b"b", fmt.MAX_VALUE_BYTES - 1),
                                    _op(fmt.OP_PUT, b"c", 2)))


# ------------------------------------------------------- COMMIT, CHECKPOINT

def test_commit_payload_must_be_exactly_68_bytes():
    body = fmt.CommitBody(b"p" * 32, b"d" * 32, 3)
    assert fmt.decode_commit(fmt.encode_commit(body)) == body
    for size in (0, 67, 69):
        with pytest.raises(ValueError, match=f"COMMIT payload is {size} bytes, expected 68"):
            fmt.decode_commit(fmt.encode_commit(body)[:size].ljust(size, b"\0"))


def test_checkpoint_payload_must_be_exactly_128_bytes():
    body = fmt.CheckpointBody(b"h" * 32, b"k" * 32, b"s" * 64)
    assert fmt.decode_checkpoint(fmt.encode_checkpoint(body)) == body
    for size in (0, 127, 129):
        with pytest.raises(ValueError, match=f"CHECKPOINT payload is {size} bytes, expected 128"):
            fmt.decode_checkpoint(fmt.encode_checkpoint(body)[:size].ljust(size, b"\0"))


# -------------------------------------------------------- format 2.1 fields

def test_redundancy_modes_off_and_parity_are_read_and_another_is_named():
    for mode in (fmt.REDUNDANCY_NONE, fmt.REDUNDANCY_PARITY):
        assert _problem(redundancy=mode) == ""
    assert _problem(redundancy=2) == "unknown redundancy mode 2"
    assert fmt.superblock_layout_problem(_sb(redundancy=0xFF)) == "unknown redundancy mode 255"


def test_the_durable_floor_may_be_unset_or_anywhere_from_the_start_to_the_end_of_the_active_region():
    for active in (0, 1):
        start, length = _sb(active_region=active).active_extent
        for floor in (0, start, start + 512, start + length):
            assert _problem(active_region=active, durable_end=floor) == "", (active, floor)
        for floor in (start - 1, start + length + 1, 1):
            assert _problem(active_region=active, durable_end=floor) == (
                f"durable_end {floor} outside the active log region"), (active, floor)


def test_an_identity_copy_exists_only_where_the_regions_leave_the_last_block_free():
    assert fmt.has_identity_copy(_sb())                                             # what mkfs lays out now
    assert fmt.has_identity_copy(_sb(regions=((2, 100), (102, 153))))               # region 1 ends at block 254
    assert not fmt.has_identity_copy(_sb(regions=((2, 127), (129, 127))))           # a 2.0 layout: the log owns it
    assert not fmt.has_identity_copy(_sb(regions=((2, 100), (102, 154))))
