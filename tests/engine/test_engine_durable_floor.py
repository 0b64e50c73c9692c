"""Damaged durable data is repaired or refused, never read as a torn tail.

The durable floor (superblock durable_end) and the per-group parity trailer
(redundancy "parity"), on real image files damaged between mounts.
"""

import subprocess
import sys

import pytest

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine, Mutation
from statefsd.storage.image import read_superblock
from statefsd.errors import CorruptImage, IntegrityError


def _values(n, rounds=3):
    return {f"k{i:02d}": f"round{rounds}-{i}".encode() * 40 for i in range(n)}


def _fill_and_compact(image):
    with image.mount() as e:
        for r in range(1, 4):
            for i in range(40):
                e.put(f"k{i:02d}", f"round{r}-{i}".encode() * 40)
        e.compact()
    with FileDevice(image.path, read_only=True) as dev:
        sb, _ = read_superblock(dev)
    return sb


def _superblock(image):
    """The active superblock, read from the file without taking the lock."""
    slots = [fmt.decode_superblock(image.read(off, fmt.BLOCK_SIZE)).superblock for off in fmt.SUPERBLOCK_OFFSETS]
    return max((sb for sb in slots if sb is not None), key=lambda sb: sb.generation)


def _fsck(path, *args):
    return subprocess.run([sys.executable, "-m", "fsck_statefs", path, *args],
                          capture_output=True, text=True, timeout=120)


def test_a_flipped_byte_in_a_compacted_snapshot_refuses_read_write_and_fsck_exits_4(plain_image):
    sb = _fill_and_compact(plain_image)
    start, _ = sb.active_extent
    flipped = bytearray(plain_image.read(start + 100, 1))
    flipped[0] ^= 0x01
    plain_image.patch(start + 100, bytes(flipped))
    with pytest.raises(CorruptImage) as err:
        plain_image.mount()
    assert str(start) in str(err.value) or "offset" in str(err.value)
    done = _fsck(plain_image.path)
    assert done.returncode == 4, done.stdout + done.stderr
    with plain_image.mount(read_only=True) as e:
        assert e.list() == []   # nothing before the damage; nothing older is served as current


def test_a_flipped_byte_in_a_compacted_snapshot_is_repaired_from_parity(image):
    sb = _fill_and_compact(image)
    start, _ = sb.active_extent
    flipped = bytearray(image.read(start + 100, 1))
    flipped[0] ^= 0x01
    image.patch(start + 100, bytes(flipped))
    assert _fsck(image.path).returncode == 4   # damaged on disk, repairable
    with image.mount() as e:
        assert {k: e.get(k) for k in e.list()} == _values(40)
    assert any(ev == "sector_repaired" for ev, _ in image.events)
    assert _fsck(image.path).returncode == 0   # the mount wrote the sector back


def test_fsck_repair_writes_a_rebuilt_sector_back(image):
    sb = _fill_and_compact(image)
    start, _ = sb.active_extent
    image.patch(start + 600, bytes(300))
    assert _fsck(image.path, "--repair").returncode == 1
    assert _fsck(image.path).returncode == 0
    with image.mount(read_only=True) as e:
        assert {k: e.get(k) for k in e.list()} == _values(40)


@pytest.mark.parametrize("damage", ["zeroed", "rolled-back"])
def test_a_damaged_block_in_the_last_groups_of_a_clean_image_is_never_served_as_an_older_state(plain_image,
                                                                                              damage):
    with plain_image.mount() as e:
        for i in range(30):
            e.put(f"key{i}", b"v" * 300)
        before = plain_image.bytes()
        e.put("last", b"x" * 3000)
        end = e.log_end
    block = (end - 1) // fmt.BLOCK_SIZE * fmt.BLOCK_SIZE
    old = before[block:block + fmt.BLOCK_SIZE] if damage == "rolled-back" else bytes(fmt.BLOCK_SIZE)
    plain_image.patch(block, old)
    with pytest.raises(CorruptImage):
        plain_image.mount()
    assert _fsck(plain_image.path).returncode == 4


def test_a_torn_tail_past_the_durable_floor_is_still_a_torn_tail(plain_image):
    with plain_image.mount() as e:
        e.put("kept", b"1")
    with plain_image.mount_then_crash() as e:
        e.put("torn", b"2" * 2000)
        end = e.log_end
    plain_image.tear_tail(end)
    with plain_image.mount() as e:
        assert e.list() == ["kept"]
    assert [f["kind"] for ev, f in plain_image.events if ev == "replay_finding"] == ["torn-tail"]


def test_every_superblock_write_records_the_durable_floor(image):
    with image.mount() as e:
        e.put("a", b"1")
        mounted_at = _superblock(image).durable_end
        assert mounted_at == e.sb.active_extent[0]   # the mount's own superblock: the empty log
        e.put("b", b"2")
        end = e.log_end
    assert _superblock(image).durable_end == end   # clean unmount
    with image.mount() as e:
        e.compact()
        assert _superblock(image).durable_end == e.log_end   # the compaction switch



@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_any_single_damaged_sector_of_a_group_is_rebuilt_on_replay(image, which):
    with image.mount() as e:
        e.put("before", b"b")
        start = e.log_end
        e.commit([Mutation("put", f"v{i}", bytes([i]) * 5000) for i in range(4)])
        end = e.log_end
    data_sectors = (end - fmt.PARITY_TRAILER_SIZE - start) // 512
    index = {"first": 0, "middle": data_sectors // 2, "last": data_sectors - 1}[which]
    image.patch(start + index * 512, b"\xa5" * 512)
    with image.mount() as e:
        assert e.get("before") == b"b"
        assert [e.get(f"v{i}") for i in range(4)] == [bytes([i]) * 5000 for i in range(4)]


def test_a_damaged_parity_trailer_leaves_the_group_readable(image):
    with image.mount() as e:
        e.put("a", b"1" * 100)
        end = e.log_end
    image.patch(end - fmt.PARITY_TRAILER_SIZE, bytes(64))
    with image.mount() as e:
        assert e.get("a") == b"1" * 100
    assert _fsck(image.path).returncode == 0   # a note, not an error


def test_two_damaged_sectors_of_one_group_are_refused_not_guessed(image):
    with image.mount() as e:
        e.put("a", b"1")
        start = e.log_end
        e.put("big", b"z" * 8000)
    image.patch(start + 512, b"\x11" * 512)
    image.patch(start + 2048, b"\x22" * 512)
    with pytest.raises(CorruptImage):
        image.mount()
    with image.mount(read_only=True) as e:
        assert e.list() == ["a"]


def test_a_value_damaged_after_mount_is_rebuilt_by_the_read(image):
    with image.mount() as e:
        e.put("v", b"q" * 20000)
        inside = (e.index[b"v"].chunks[0][0] + 4000) // 512 * 512   # one sector of the payload
        image.patch(inside + 10, b"\x00" * 100)
        assert e.get("v") == b"q" * 20000
    assert any(ev == "sector_repaired" and f.get("during") == "read" for ev, f in image.events)
    with image.mount() as e:
        assert e.get("v") == b"q" * 20000


def test_a_value_damaged_after_mount_without_redundancy_is_eintegrity(plain_image):
    with plain_image.mount() as e:
        e.put("v", b"q" * 20000)
        offset = e.index[b"v"].chunks[0][0]
        plain_image.patch(offset + 4000, b"\x00" * 100)
        with pytest.raises(IntegrityError):
            e.get("v")


def test_write_groups_never_exceed_the_group_cap(image, tmp_path):
    from tests.engine.conftest import Image
    big = Image(tmp_path / "big.img", 160 << 20)
    values = [bytes([i]) * (fmt.MAX_VALUE_BYTES) for i in range(6)]
    import threading
    with big.mount() as e:
        threads = [threading.Thread(target=e.put, args=(f"b{i}", v)) for i, v in enumerate(values)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    with FileDevice(big.path, read_only=True) as dev:
        sb, _ = read_superblock(dev)
        from statefsd.storage.logscan import scan_groups
        groups = [g for g in scan_groups(dev, sb) if isinstance(g, list)]
    assert len(groups) >= 2
    for g in groups:
        assert g[-1].end - g[0].offset <= fmt.MAX_GROUP_BYTES
    with big.mount(read_only=True) as e:
        assert [e.get(f"b{i}") for i in range(6)] == values


def test_redundancy_is_chosen_at_mkfs_and_recorded_in_the_superblock(tmp_path):
    from tests.engine.conftest import Image
    for mode, code in (("off", fmt.REDUNDANCY_NONE), ("parity", fmt.REDUNDANCY_PARITY)):
        img = Image(tmp_path / f"{mode}.img", 2 << 20, redundancy=mode)
        with FileDevice(img.path, read_only=True) as dev:
            assert read_superblock(dev)[0].redundancy == code
            copy = fmt.decode_superblock(dev.read(fmt.identity_copy_offset(dev.size // fmt.BLOCK_SIZE),
                                                  fmt.BLOCK_SIZE)).superblock
            assert copy is not None and copy.redundancy == code
    with FileDevice(str(tmp_path / "off.img")) as dev:
        with pytest.raises(Exception):
            Engine.mkfs(dev, redundancy="mirror")
