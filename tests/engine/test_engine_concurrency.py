"""The engine's concurrency rules (C1-C8 in statefsd/storage/engine.py),
each held against real threads on a real image file."""

import threading

import pytest

from statefsd.errors import DeviceIOError, KeyUnavailable, ReadOnly, StateFSError
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import CHECKPOINT_EVERY, Engine, Mutation
from statefsd.testing.campaign.systems import DeviceProxy, FixedSigner

from tests.engine.conftest import Image


class UnreachableKeystore:
    """A device key whose keystored has gone away."""

    public_key = FixedSigner().public_key

    def __init__(self) -> None:
        self.attempts = 0

    def sign(self, label: str, message: bytes) -> bytes:
        self.attempts += 1
        raise KeyUnavailable("cannot reach keystored")


class FlushFailsAfter(DeviceProxy):
    """A disk whose flush starts failing with EIO after ``good`` flushes."""

    def __init__(self, inner, good: int) -> None:
        super().__init__(inner)
        self.good = good

    def flush(self) -> None:
        if self.good <= 0:
            raise OSError(5, "Input/output error")
        self.good -= 1
        self.inner.flush()


def run_threads(count, target):
    errors = []

    def guarded(n):
        try:
            target(n)
        except BaseException as exc:   # reported below, never lost in a thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.fixture
def big_image(tmp_path):
    return Image(tmp_path / "state.img", 16 << 20)


def test_concurrent_commits_past_the_threshold_write_one_checkpoint_not_one_per_thread(big_image):
    """Rule C6: the decision is taken while holding the writer role."""
    threads, each = 16, (CHECKPOINT_EVERY + 200) // 16
    with big_image.mount(signer=FixedSigner()) as e:
        assert not run_threads(threads, lambda n: [e.put(f"t{n}/{i}", b"v") for i in range(each)])
        during = [f for event, f in big_image.events if event == "checkpoint"]
    assert len(during) == (threads * each) // CHECKPOINT_EVERY == 1
    with big_image.mount(signer=FixedSigner()) as e:
        assert e.replay_summary["verified_checkpoints"] == 2   # the one above and the unmount's


def test_a_failed_checkpoint_never_turns_a_durable_commit_into_an_error(big_image):
    """Rule C6: with keystored gone, every put still answers its txn id and
    reads back; the failure is audited and retried CHECKPOINT_EVERY later."""
    signer = UnreachableKeystore()
    total = CHECKPOINT_EVERY + 100
    with big_image.mount(signer=signer) as e:
        ids = [e.put(f"k{i}", i.to_bytes(4, "little")) for i in range(total)]
    assert len(set(ids)) == total
    failures = [f for event, f in big_image.events if event == "checkpoint_failed"]
    assert len(failures) == 2          # at the threshold, and the unmount's
    assert signer.attempts == 2        # not one attempt per later commit
    with big_image.mount() as e:
        assert all(e.get(f"k{i}") == i.to_bytes(4, "little") for i in range(total))


@pytest.mark.parametrize("size", [1, 300, 1000])
def test_with_keystored_gone_a_full_log_refuses_puts_naming_keystored_and_loses_no_acknowledged_put(
        tmp_path, size):
    """Rule C6 at the end of the log: compaction cannot sign its checkpoint
    without keystored, so a put that needs the room it would make is
    refused as EKEY (nothing committed), not as a full log that compaction
    was never asked to empty; every put that answered a txn id reads back."""
    image = Image(tmp_path / "small.img", 2 << 20)
    acked: dict[str, bytes] = {}
    refused = []
    with image.mount(signer=UnreachableKeystore()) as e:
        for i in range(5000):
            key, value = f"z/{i % 50}", bytes([i % 251]) * size
            try:
                e.put(key, value)
                acked[key] = value
            except StateFSError as exc:
                refused.append(exc)
                assert e.get(key) == acked[key]   # the refused value is not visible
                if len(refused) == 3:
                    break
        assert all(e.get(k) == v for k, v in acked.items())
    assert [type(exc) for exc in refused] == [KeyUnavailable] * 3, refused
    assert "keystored" in refused[0].message
    with image.mount() as e:
        assert all(e.get(k) == v for k, v in acked.items())


def test_close_waits_for_a_compaction_a_racing_commit_started_and_loses_no_acknowledged_commit(tmp_path):
    """Rule C7: close refuses new commits, then lets a running compaction and
    the queued commits finish before its clean-unmount superblock."""
    image = Image(tmp_path / "small.img", 1 << 20)
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    e = image.mount()
    stop = threading.Event()

    def writer(n):
        i = 0
        while True:
            key, value = f"w{n}/{i % 20}", bytes([n, i % 251]) * 300
            try:
                e.put(key, value)
            except ReadOnly:
                return
            with lock:
                acked[key] = value
            i += 1
            thread = e.compactor._thread
            if thread is not None and thread.is_alive():
                stop.set()   # close now, while the compaction runs

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    assert stop.wait(60), "no compaction started"
    e.close()
    for t in threads:
        t.join()
    assert any(event == "compaction" for event, _ in image.events)
    assert not e.compactor._thread.is_alive()
    assert image.events[-1][0] == "unmount"
    with image.mount() as again:
        assert {k: again.get(k) for k in again.list()} == acked


def test_after_a_device_error_later_writes_are_refused_naming_the_first_failure(big_image):
    """Rule C8: nobody knows what the page cache kept; the engine stops writing."""
    e = Engine.mount(FlushFailsAfter(FileDevice(big_image.path), good=4),
                     audit=lambda event, **f: big_image.events.append((event, f)))
    done = 0
    with pytest.raises(DeviceIOError):
        while True:
            e.put(f"k{done}", b"v")
            done += 1
    with pytest.raises(ReadOnly, match="after a write failure: .*Input/output error"):
        e.commit([Mutation("put", "later", b"v")])
    assert [event for event, _ in big_image.events].count("write_failure") == 1
    e.close()
    with big_image.mount() as again:
        assert all(again.get(f"k{i}") == b"v" for i in range(done))


def test_a_reader_always_sees_the_log_position_of_one_and_the_same_group(big_image):
    """Rule C3: the position is published as one immutable value, so its
    offset and txn counter always belong together, with no lock taken."""
    with big_image.mount() as e:
        e.put("k", b"0" * 100)
        base, base_txn = e.log.position.offset, e.log.position.next_txn
        e.put("k", b"1" * 100)
        step = e.log.position.offset - base   # every commit below has the same size
        stop = threading.Event()
        mismatched = []

        def reader():
            while not stop.is_set():
                position = e.log.position
                if (position.offset - base) != step * (position.next_txn - base_txn):
                    mismatched.append(position)

        watcher = threading.Thread(target=reader)
        watcher.start()
        for i in range(400):
            e.put("k", bytes([i % 256]) * 100)
        stop.set()
        watcher.join()
        assert e.log.position.offset - base == step * (e.log.position.next_txn - base_txn)
        assert not mismatched
