"""Engine.verify: the online scrub of a mounted log (rule C10)."""

import threading
import time

from statefsd.errors import ReadOnly
from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine
from statefsd.testing.campaign.systems import DeviceProxy, FixedSigner
from tests.engine.conftest import Image, committed_records
from tests.engine.test_engine_concurrency import run_threads


def commit_ten_and_rot_the_fifth(image, engine):
    """Ten committed values, then a byte of the fifth flipped on the image
    under the mounted engine; the damaged PAYLOAD record."""
    for i in range(10):
        engine.put(f"k{i}", bytes([i]) * 3000)
    rec = [r for r in committed_records(image.path) if r.header.type == fmt.PAYLOAD][4]
    offset = rec.offset + fmt.HEADER_SIZE + 100
    image.patch(offset, bytes([image.read(offset, 1)[0] ^ 0x40]))
    return rec


class SlowReads(DeviceProxy):
    """Reads take a while once ``slow`` is set (to True, or to the one
    thread whose reads are slow): a scrub of a long log."""

    slow = False

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.reading = threading.Event()     # set once a slow read has begun

    def read(self, offset, length):
        if self.slow is True or self.slow is threading.current_thread():
            self.reading.set()
            time.sleep(0.3)
        return self.inner.read(offset, length)


def test_verify_of_a_clean_signed_log_proves_the_chain_and_every_checkpoint(image):
    with image.mount(signer=FixedSigner()) as e:
        for i in range(30):
            e.put(f"k{i % 7}", bytes([i]) * 3000)
            if i % 10 == 9:
                e.checkpoint()
        info = e.info()
        v = e.verify()
        last = [r.offset for r in committed_records(image.path) if r.header.type == fmt.CHECKPOINT][-1]
    assert v["findings"] == {} and v["first_finding"] is None
    assert v["checkpoints"] == v["verified_checkpoints"] == 3
    assert v["chain_head_matches"] and v["chain_head"] == info["chain_head"]
    assert v["position"] == info["log_used"] + e.log.region_start
    assert v["scanned_bytes"] == info["log_used"]
    assert v["committed_txns"] == 30 and v["log_epoch"] == info["log_epoch"]
    assert v["last_checkpoint_offset"] == last
    assert ("verify", {k: v[k] for k in v if k != "first_finding"}) in image.events


def test_verify_after_a_compaction_starts_at_the_compaction_base(image):
    with image.mount(signer=FixedSigner()) as e:
        for i in range(40):
            e.put(f"k{i % 5}", bytes([i]) * 2000)
        e.compact()
        e.put("after", b"x")
        v = e.verify()
        assert v["findings"] == {} and v["chain_head_matches"]
        assert v["committed_txns"] == 2   # the copy (five small keys make one transaction), one put
        assert v["checkpoints"] == v["verified_checkpoints"] == 1   # the one over the copy
        assert v["log_epoch"] == e.sb.log_epoch


def test_verify_changes_no_engine_state(image):
    with image.mount() as e:
        for i in range(20):
            e.put(f"k{i}", bytes([i]) * 500)
        index, position, sb, before = e.index, e.log.position, e.sb, dict(e.index)
        disk = image.bytes()
        e.verify()
        assert e.index is index and e.index == before
        assert e.log.position is position and e.sb is sb
        assert image.bytes() == disk


def test_a_byte_flipped_in_a_committed_record_is_reported_and_the_engine_goes_on(plain_image):
    with plain_image.mount() as e:
        rec = commit_ten_and_rot_the_fifth(plain_image, e)
        v = e.verify()
        assert v["findings"] == {"corruption": 1}
        assert v["first_finding"]["offset"] == rec.offset
        assert "checksum mismatch" in v["first_finding"]["reason"]
        assert v["committed_txns"] == 4 and v["scanned_bytes"] < e.log.used
        assert e.put("still", b"writable") > 0
        assert e.get("k9") == bytes([9]) * 3000


def test_with_parity_a_flipped_byte_is_reported_repairable_and_left_in_place(image):
    with image.mount() as e:
        commit_ten_and_rot_the_fifth(image, e)
        damaged = image.bytes()
        v = e.verify()
        assert v["findings"] == {"repairable-sector": 1}
        assert v["chain_head_matches"] and v["committed_txns"] == 10
        assert image.bytes() == damaged   # a scrub writes nothing


def test_commits_go_on_while_a_long_verify_runs(tmp_path):
    image = Image(tmp_path / "big.img", 16 << 20)
    slow = SlowReads(FileDevice(image.path))
    e = Engine.mount(slow)
    try:
        for i in range(40):
            e.put(f"k{i}", bytes([i]) * 60000)
        slow.slow = True
        done = threading.Event()
        results = []
        t = threading.Thread(target=lambda: (results.append(e.verify()), done.set()))
        t.start()
        committed = 0
        while not done.is_set():
            e.put(f"during{committed % 5}", b"x" * 100)
            committed += 1
        t.join()
    finally:
        e.close()
    assert results[0]["findings"] == {} and results[0]["committed_txns"] == 40
    assert committed >= 5


def test_close_stops_a_running_verify_and_waits_for_it(tmp_path):
    image = Image(tmp_path / "big.img", 16 << 20)
    slow = SlowReads(FileDevice(image.path))
    e = Engine.mount(slow)
    for i in range(40):
        e.put(f"k{i}", bytes([i]) * 60000)
    slow.slow = True
    errors = []

    def verify():
        try:
            e.verify()
        except ReadOnly as exc:
            errors.append(exc)

    t = threading.Thread(target=verify)
    t.start()
    assert slow.reading.wait(30)   # the scan is under way (a fixed sleep raced a slow thread start)
    e.close()
    assert not t.is_alive()   # close waited for it
    assert errors and "unmounted" in errors[0].message
    with image.mount() as again:
        assert again.verify()["findings"] == {}


def test_compactions_wait_for_a_running_verify_so_it_never_reads_a_reused_region(tmp_path):
    """Two compactions during a scan would rewrite the region it reads (the
    second writes where the first switched away from): rule C10 holds them
    off until the scan has ended."""
    image = Image(tmp_path / "big.img", 32 << 20)
    slow = SlowReads(FileDevice(image.path))
    e = Engine.mount(slow)
    try:
        for i in range(200):   # 6 MiB live, 12 MiB of log: more than one read window
            e.put(f"k{i % 100}", bytes([i]) * 60000)
        verdicts = []
        t = threading.Thread(target=lambda: verdicts.append(e.verify()))
        slow.slow = t
        t.start()
        time.sleep(0.1)   # the scan has read its first window
        e.compact()
        e.compact()
        assert not t.is_alive()   # the compactions waited for it
        t.join()
        assert verdicts[0]["findings"] == {} and verdicts[0]["committed_txns"] == 200
        assert e.verify()["findings"] == {}
    finally:
        e.close()


def test_verifies_racing_compactions_and_commits_all_come_out_clean(tmp_path):
    image = Image(tmp_path / "race.img", 2 << 20)
    with image.mount(signer=FixedSigner()) as e:
        stop = threading.Event()
        verdicts = []

        def work(n):
            i = 0
            while not stop.is_set():
                if n == 0:
                    verdicts.append(e.verify())
                elif n == 1:
                    e.compact()
                else:
                    e.put(f"w{n}/{i % 30}", bytes([i % 251]) * 2000)
                i += 1

        timer = threading.Timer(2.0, stop.set)
        timer.start()
        assert run_threads(4, work) == []
        compactions = sum(1 for event, _ in image.events if event == "compaction")
    assert compactions >= 2 and len(verdicts) >= 2
    assert all(v["findings"] == {} and v["chain_head_matches"] for v in verdicts)
    assert all(v["checkpoints"] == v["verified_checkpoints"] for v in verdicts)
    assert max(v["checkpoints"] for v in verdicts) >= 1
    assert len({v["log_epoch"] for v in verdicts}) >= 2


def test_a_read_only_mount_verifies_too(image):
    with image.mount() as e:
        e.put("k", b"v")
    with image.mount(read_only=True) as e:
        v = e.verify()
    assert v["findings"] == {} and v["committed_txns"] == 1
