"""Engine behaviour across remounts, torn tails, corruption and full devices.

Damage is applied to real image files between mounts, the way a power cut or
a bad disk leaves them; numbers in names refer to docs/DESIGN.md invariants.
"""


import pytest

from statefsd.storage import format as fmt
from statefsd.storage.engine import Mutation, validate_mutations
from statefsd.errors import CorruptImage, FormatError, IntegrityError, NoSpace, NotFound, ReadOnly, TooBig


def test_committed_values_survive_remount(image):
    with image.mount() as e:
        e.put("a", b"1")
        e.put("big", bytes(range(256)) * 1000)
        e.commit([Mutation("put", "b", b"2"), Mutation("delete", "a")])
    with image.mount() as e:
        assert e.list() == ["b", "big"]
        assert e.get("b") == b"2"
        assert e.get("big") == bytes(range(256)) * 1000
        with pytest.raises(NotFound):
            e.get("a")


def test_a_read_only_view_is_committed_as_it_is_and_anything_mutable_is_copied_first(image):
    frame = bytearray(b"head" + bytes(range(256)) * 400)
    view = memoryview(frame).toreadonly()[4:]
    mutable = bytearray(b"changes later")
    ((_, kept), (_, copied)) = validate_mutations([Mutation("put", "v", view), Mutation("put", "m", mutable)])
    assert kept is view and isinstance(copied, bytes)
    with image.mount() as e:
        e.commit([Mutation("put", "v", view), Mutation("put", "m", mutable)])
        mutable[:] = b"changed"
        assert e.get("v") == bytes(range(256)) * 400 and e.get("m") == b"changes later"


def test_empty_value_round_trips(image):
    with image.mount() as e:
        e.put("empty", b"")
    with image.mount() as e:
        assert e.get("empty") == b""
        assert e.stat("empty")["size"] == 0


def test_torn_last_group_is_discarded_whole_and_is_not_an_error(image):
    # invariant 2: the multi-key txn whose COMMIT was torn is invisible, the earlier one stays
    with image.mount_then_crash() as e:
        e.put("keep", b"old")
        start = e.log_end
        e.commit([Mutation("put", "x", b"1" * 5000), Mutation("put", "keep", b"new")])
        end = e.log_end
    image.tear_tail(end)  # the sector holding the COMMIT never landed
    with image.mount() as e:
        assert e.get("keep") == b"old"
        assert e.list() == ["keep"]
        assert e.log_end == start
        assert not e.read_only
    kinds = [f["kind"] for ev, f in image.events if ev == "replay_finding"]
    assert kinds == ["torn-tail"]


def test_writes_after_a_torn_tail_are_replayed_and_stale_tail_records_are_ignored(image):
    with image.mount_then_crash() as e:
        e.put("a", b"1")
        e.commit([Mutation("put", f"k{i}", b"v" * 3000) for i in range(20)])
        end = e.log_end
    image.tear_tail(end)  # torn: the large group's end is lost
    with image.mount() as e:
        assert e.list() == ["a"]
        e.put("b", b"2")  # a short group over the start of the stale one
    with image.mount() as e:
        assert e.list() == ["a", "b"]
    assert not [f for ev, f in image.events if ev == "replay_finding" and f["kind"] == "corruption"]


def test_txn_ids_are_never_reused_after_the_record_that_used_them_was_lost(image):
    # invariant 8
    with image.mount_then_crash() as e:
        e.put("a", b"1")
        lost = e.put("b", b"2")
        end = e.log_end
    image.tear_tail(end)
    with image.mount() as e:
        assert e.list() == ["a"]
        assert e.put("c", b"3") > lost


def test_corruption_followed_by_durable_records_refuses_read_write_mount(plain_image):
    # invariant 9
    with plain_image.mount() as e:
        e.put("first", b"1")
        middle = e.log_end
        e.put("second", b"2")
        e.put("third", b"3")
    plain_image.patch(middle + 20, b"\xff\xff")  # damage inside a flushed group
    with pytest.raises(CorruptImage) as err:
        plain_image.mount()
    assert f"offset {middle}" in str(err.value)
    with plain_image.mount(read_only=True) as e:
        assert e.list() == ["first"]
        with pytest.raises(ReadOnly):
            e.put("x", b"y")
    assert any(ev == "mount_read_only_prefix" for ev, _ in plain_image.events)


def test_altered_value_with_recomputed_checksum_breaks_the_transaction_digest(image):
    with image.mount() as e:
        e.put("a", b"secret-1")
        (offset, plen), = e.index[b"a"].chunks
        e.put("b", b"after")
    raw = bytearray(image.read(offset, fmt.HEADER_SIZE + plen))
    raw[fmt.HEADER_SIZE] ^= 1
    fmt.restamp_record_crc(raw)
    image.patch(offset, bytes(raw))
    with pytest.raises(CorruptImage, match="digest"):
        image.mount()


def test_reads_verify_the_checksum(plain_image):
    e = plain_image.mount()
    e.put("a", b"value")
    (offset, _), = e.index[b"a"].chunks
    plain_image.patch(offset + fmt.HEADER_SIZE, b"X")
    with pytest.raises(IntegrityError):
        e.get("a")
    e.close()


def test_newest_superblock_torn_falls_back_to_the_other_slot(image):
    with image.mount() as e:
        e.put("a", b"1")
        gen = e.sb.generation
    image.patch(fmt.SUPERBLOCK_OFFSETS[gen % 2] + 100, b"garbage!")
    with image.mount() as e:
        assert e.get("a") == b"1"


def test_both_superblocks_damaged_is_a_clear_corruption_error(image):
    for off in fmt.SUPERBLOCK_OFFSETS:
        image.patch(off + 100, b"garbage!")
    with pytest.raises(CorruptImage, match="both superblock slots"):
        image.mount()


def test_an_image_that_is_not_statefs_is_refused(tmp_path):
    from statefsd.storage.blockdev import FileDevice
    from statefsd.storage.engine import Engine
    path = tmp_path / "other.img"
    path.write_bytes(b"\x7fELF" + bytes(2 << 20))
    with pytest.raises(FormatError, match="not a StateFS image"):
        Engine.mount(FileDevice(str(path)))


@pytest.mark.parametrize("major,minor,msg", [(3, 0, "major version 2"), (2, fmt.VERSION_MINOR + 1, "upgrade statefs")])
def test_unknown_format_versions_are_refused_with_a_clear_message(image, major, minor, msg):
    with image.mount() as e:
        sb = e.sb
    for off in fmt.SUPERBLOCK_OFFSETS:
        image.patch(off, fmt.encode_superblock(sb.evolve(version_major=major, version_minor=minor)))
    with pytest.raises(FormatError, match=msg):
        image.mount()


def test_truncated_image_is_refused(image):
    import os
    os.truncate(image.path, 2 << 20)
    with pytest.raises(CorruptImage, match="truncated"):
        image.mount()


def test_full_device_returns_enospc_and_keeps_serving_reads_and_deletes(image):
    with image.mount() as e:
        e.put("keep", b"k")
        written = 0
        with pytest.raises(NoSpace):
            while True:
                e.put(f"fill{written}", bytes(60000))
                written += 1
        assert written > 10
        assert e.get("keep") == b"k"
        e.delete("fill0")
        with pytest.raises(NoSpace):
            e.put("more", bytes(60000))
    with image.mount() as e:
        assert e.get("keep") == b"k"
        assert len(e.list()) == written  # keep + fills - fill0


def test_caps_are_enforced_before_anything_is_written(image):
    with image.mount() as e:
        before = e.log_end
        with pytest.raises(TooBig):
            e.put("k" * (fmt.MAX_KEY_BYTES + 1), b"")
        with pytest.raises(TooBig):
            e.put("k", bytes(fmt.MAX_VALUE_BYTES + 1))
        with pytest.raises(TooBig):
            e.commit([Mutation("put", f"k{i}", b"") for i in range(fmt.MAX_TXN_OPS + 1)])
        assert e.log_end == before


def test_replay_is_idempotent_and_a_read_only_mount_changes_no_byte(image):
    # invariant 4
    with image.mount() as e:
        for i in range(30):
            e.put(f"k{i % 7}", bytes([i]) * (i * 100))
        e.commit([Mutation("delete", "k3"), Mutation("put", "z", b"z")])
    before = image.bytes()
    states = []
    for _ in range(2):
        with image.mount(read_only=True) as e:
            states.append({k: e.get(k) for k in e.list()})
    assert states[0] == states[1]
    assert image.bytes() == before


def test_concurrent_commits_share_flushes(image):
    import threading
    e = image.mount()
    flushes = 0
    real_flush = e.device.flush

    def counting_flush():
        nonlocal flushes
        flushes += 1
        real_flush()
    e.device.flush = counting_flush
    threads = [threading.Thread(target=lambda i=i: [e.put(f"t{i}/{j}", b"v") for j in range(25)])
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(e.list()) == 200
    assert flushes < 200
    e.close()


def test_compaction_keeps_every_value_and_continues_the_hash_chain(image):
    with image.mount() as e:
        for i in range(200):
            e.put(f"k{i % 9}", bytes([i]) * 2000)
        e.delete("k0")
        before = {k: e.get(k) for k in e.list()}
        chain = e.info()["chain_head"]
        stats = e.compact()
        assert stats["log_after"] < stats["log_before"] / 10
        assert e.sb.chain_base.hex() == chain
        assert {k: e.get(k) for k in e.list()} == before
        e.put("after", b"1")
    with image.mount() as e:
        assert {k: e.get(k) for k in e.list() if k != "after"} == before
        assert not [f for ev, f in image.events if ev == "replay_finding"]


def test_a_full_log_is_compacted_instead_of_returning_enospc_when_live_data_fits(image):
    with image.mount() as e:
        for i in range(400):  # about 5x the log region in overwrites of 3 keys
            e.put(f"k{i % 3}", bytes([i % 256]) * 30000)
        assert e.get("k0") == bytes([399 - 256]) * 30000  # 399 % 3 == 0: the last write of k0
        assert sorted(e.list()) == ["k0", "k1", "k2"]
        assert any(ev == "compaction" for ev, _ in image.events)
        last = {k: e.get(k) for k in e.list()}
    with image.mount() as e:
        assert {k: e.get(k) for k in e.list()} == last


def test_the_space_a_transaction_needs_is_computed_exactly(image):
    with image.mount() as e:
        for muts in ([Mutation("delete", "x" * 300)] * 3, [Mutation("put", "k", bytes(70000))],
                     [Mutation("put", f"p{i}", b"v") for i in range(50)]):
            start = e.log_end
            e.commit(muts)
            trailer = fmt.PARITY_TRAILER_SIZE if e.sb.redundancy else 0
            assert e.log_end - start == fmt.align_up(e.log.txn_bytes(validate_mutations(muts))) + trailer


def test_a_mount_never_overwrites_the_only_valid_superblock(image):
    with image.mount() as e:
        e.put("a", b"1")
        newest = e.sb.generation % 2
    image.patch(fmt.SUPERBLOCK_OFFSETS[newest] + 100, b"garbage!")
    survivor = image.read(fmt.SUPERBLOCK_OFFSETS[1 - newest], fmt.BLOCK_SIZE)
    with image.mount_then_crash() as e:   # one superblock write: the mount's own
        assert e.get("a") == b"1"
        assert e.sb.generation % 2 == newest  # the mount wrote over the damaged slot
    assert image.read(fmt.SUPERBLOCK_OFFSETS[1 - newest], fmt.BLOCK_SIZE) == survivor


def test_a_compaction_cut_before_its_switch_leaves_no_records_a_later_compaction_could_adopt():
    from statefsd.storage.engine import Engine
    from statefsd.testing.simdev import Outcome, SimulatedDevice
    dev = SimulatedDevice(2 << 20)
    Engine.mkfs(dev)
    e = Engine.mount(dev)
    e.put("a", b"1" * 1000)
    e.put("b", b"2")
    mark = len(dev.trace)
    e.compact()
    # the cut: snapshot written and flushed, superblock switch (and its copy in the other slot) lost
    flushes = [op.index for op in dev.trace.ops[mark:] if op.kind == "flush"]
    point = next(p for p in dev.trace.crash_points(start=flushes[-3] + 1, stop=flushes[-3] + 1))
    crashed = point.device(Outcome.keep_all(0))
    e = Engine.mount(crashed)
    e.delete("a")
    e.delete("b")
    e.compact()
    e.close()
    with Engine.mount(SimulatedDevice.from_image(crashed.image())) as again:
        assert again.list() == []


def test_commits_go_on_during_compaction_and_none_is_lost(tmp_path):
    import threading
    from tests.engine.conftest import Image
    img = Image(tmp_path / "big.img", 64 << 20)
    e = img.mount()
    for i in range(300):
        e.put(f"live/{i}", bytes([i % 256]) * 20000)  # ~6 MB of live data to copy
    done = threading.Event()
    written, deleted = {}, set()

    def writer(n):
        i = 0
        while not done.is_set() or i < 5:
            key = f"w{n}/{i % 7}"
            e.put(key, f"{n}-{i}".encode())
            written[key] = f"{n}-{i}".encode()
            if i == 3:
                e.delete(f"live/{n}")
                deleted.add(f"live/{n}")
            i += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    stats = e.compact()
    done.set()
    for t in threads:
        t.join()
    assert stats["delta_ops"] > 0, stats  # commits really happened while the snapshot was written
    expected = {k: e.get(k) for k in e.list()}
    for k, v in written.items():
        assert expected[k] == v
    assert not deleted & set(expected)
    e.close()
    with img.mount() as again:
        assert {k: again.get(k) for k in again.list()} == expected
