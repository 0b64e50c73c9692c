"""Engine.feed: the committed transactions of the log, in commit order,
resumable by cursor (rule C11), on real image files."""

from __future__ import annotations

import threading
import time

import pytest

from statefsd.errors import CorruptImage, IntegrityError, InvalidArgument, ReadOnly
from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine, Mutation
from statefsd.storage.feed import CURSOR_BYTES, FROM_BASE, Cursor
from statefsd.testing.campaign.systems import DeviceProxy, FixedSigner
from tests.engine.conftest import Consumer, Image, committed_records, forged_cursor
from tests.engine.test_engine_concurrency import run_threads

KEY = bytes(range(32))


def engine_state(engine) -> dict[str, bytes]:
    return {key: engine.get(key) for key in engine.list()}


def some_history(engine, rounds: int = 30) -> None:
    for i in range(rounds):
        engine.put(f"k{i % 7}", bytes([i]) * (500 * (i % 5)))
        if i % 4 == 3:
            engine.commit([Mutation("put", f"t{i}/a", b"A" * i), Mutation("delete", f"k{(i + 1) % 7}"),
                           Mutation("put", f"t{i}/b", b"B")])
    engine.delete("k3")


def test_a_consumer_applying_every_page_reaches_exactly_the_engine_state(image):
    with image.mount(signer=FixedSigner()) as e:
        some_history(e)
        e.checkpoint()
        e.put("after-checkpoint", b"x")
        c = Consumer()
        c.catch_up(e)
        assert c.state == engine_state(e)
        ids = [t[0] for t in c.txns]
        assert ids == sorted(set(ids)) and ids[-1] == c.pages[-1]["max_txn"] == e.get_versioned("after-checkpoint")[1]
        assert c.pages[0]["reset"] and not c.pages[-1]["more"]
        assert c.txns[-1][1] == c.pages[-1]["chain"] == bytes.fromhex(e.verify()["chain_head"])
        deleted = [change for t in c.txns for change in t[2] if change[1] is None]
        assert ["k3", None] in deleted and len(deleted) >= 8


def test_a_sealed_image_feeds_plaintext_values(tmp_path):
    img = Image(tmp_path / "sealed.img", 4 << 20)
    with FileDevice(img.path) as dev:
        Engine.mkfs(dev, encryption="on", key_provider=lambda sb: KEY)
    with img.mount(key_provider=lambda sb: KEY) as e:
        some_history(e, 12)
        c = Consumer()
        c.catch_up(e)
        assert c.state == engine_state(e) and b"A" * 11 in c.state.values()
    assert b"A" * 11 not in img.bytes()   # what the feed gave was sealed on the device


def test_a_cursor_resumes_after_the_last_transaction_it_was_given(image):
    with image.mount() as e:
        some_history(e, 10)
        c = Consumer()
        c.catch_up(e)
        seen = c.last
        again = e.feed(c.last, c.cursor)
        assert again["txns"] == [] and not again["reset"] and not again["more"]
        assert again["cursor"] == c.cursor and again["chain"] == c.txns[-1][1]
        new = [e.put("n1", b"1"), e.commit([Mutation("put", "n2", b"2"), Mutation("delete", "n1")])]
        page = e.feed(c.last, c.cursor)
        assert not page["reset"] and [t[0] for t in page["txns"]] == new and new[0] > seen
        assert page["txns"][1][2] == [["n2", b"2"], ["n1", None]]
        c.apply(page)
        assert c.state == engine_state(e)


def test_max_bytes_pages_the_feed_and_more_says_when_to_ask_again(image):
    with image.mount() as e:
        for i in range(12):
            e.put(f"v{i}", bytes([i]) * 10_000)
        c = Consumer()
        pages = c.catch_up(e, max_bytes=25_000)
        assert pages == 6 and [p["more"] for p in c.pages] == [True] * 5 + [False]
        assert all(len(p["txns"]) == 2 for p in c.pages)
        assert c.state == engine_state(e)
        # A value larger than max_bytes still comes, alone: the feed always moves on.
        e.put("huge", b"h" * 100_000)
        page = e.feed(c.last, c.cursor, 1)
        assert [len(v) for _, _, ch in page["txns"] for _, v in ch] == [100_000] and not page["more"]


class SlowFlush(DeviceProxy):
    """Flushes take a while: commits of other threads pile up into one group."""

    def flush(self):
        time.sleep(0.02)
        self.inner.flush()


def test_a_group_of_many_transactions_is_split_between_pages_and_each_comes_once(image):
    engine = Engine.mount(SlowFlush(FileDevice(image.path)))
    with engine as e:
        assert run_threads(8, lambda n: [e.put(f"w{n}/{i}", bytes([n]) * 3000) for i in range(6)]) == []
        groups: dict[int, int] = {}
        for rec in committed_records(image.path):
            if rec.header.type == fmt.COMMIT:
                groups[rec.header.group] = groups.get(rec.header.group, 0) + 1
        assert max(groups.values()) >= 3   # the premise: groups of several transactions
        c = Consumer()
        c.catch_up(e, max_bytes=7000)
        assert all(len(p["txns"]) == 2 for p in c.pages[:-1])
        assert len(c.txns) == 48 and [t[0] for t in c.txns] == sorted({t[0] for t in c.txns})
        assert c.state == engine_state(e)


def test_after_a_compaction_an_old_cursor_restarts_from_the_copies_and_still_converges(image):
    with image.mount() as e:
        some_history(e, 10)
        c = Consumer()
        c.catch_up(e)
        epoch = c.pages[-1]["epoch"]
        # Created and deleted between the consumer's last read and the compaction:
        # no id-based skip could tell it is gone.
        e.put("ephemeral", b"gone soon")
        e.put("k0", b"rewritten")
        e.delete("ephemeral")
        e.compact()
        e.put("after", b"compaction")
        page = e.feed(c.last, c.cursor)
        assert page["reset"] and page["epoch"] != epoch
        c.apply(page)
        assert c.state == engine_state(e) and "ephemeral" not in c.state and c.state["k0"] == b"rewritten"
        ids = [t[0] for t in page["txns"]]
        assert ids == sorted(set(ids)) and ids[-1] == page["max_txn"]
        assert page["chain"] == bytes.fromhex(e.verify()["chain_head"])


def test_an_emptied_store_compacted_feeds_a_reset_with_no_transactions(image):
    with image.mount() as e:
        e.put("a", b"1")
        c = Consumer()
        c.catch_up(e)
        e.delete("a")
        e.compact()
        page = e.feed(c.last, c.cursor)
        assert page["reset"] and page["txns"] == [] and page["max_txn"] == 0 and not page["more"]


def offset_of(cursor: bytes) -> int:
    return Cursor.unpack(cursor).point.offset


@pytest.mark.parametrize("name, garble", [
    ("short", lambda c: c[:-1]),
    ("long", lambda c: c + b"\0"),
    ("version", lambda c: forged_cursor(c, version=c[0] + 1)),
    ("offset off the group grid", lambda c: forged_cursor(c, offset=offset_of(c) + 512)),
    ("offset past the log", lambda c: forged_cursor(c, offset=offset_of(c) + (1 << 20))),
    ("offset before the region", lambda c: forged_cursor(c, offset=0)),
    ("seq", lambda c: forged_cursor(c, next_seq=Cursor.unpack(c).point.next_seq + 1)),
    ("group", lambda c: forged_cursor(c, next_group=Cursor.unpack(c).point.next_group + 1)),
    ("group zero", lambda c: forged_cursor(c, next_group=0)),
    ("chain", lambda c: forged_cursor(c, chain=bytes(32))),
    ("txn id never given out", lambda c: forged_cursor(c, max_txn=10_000)),
    ("skip", lambda c: forged_cursor(c, skip=5)),
    ("skip of a whole group", lambda c: forged_cursor(c, skip=1)),
])
def test_a_garbled_cursor_is_refused_with_the_way_back_to_the_base(image, name, garble):
    with image.mount() as e:
        some_history(e, 6)
        first = e.feed(0, None, 2000)   # stops early: its cursor points inside the log
        assert first["more"] and len(first["cursor"]) == CURSOR_BYTES
        with pytest.raises(InvalidArgument) as err:
            e.feed(first["txns"][-1][0], garble(first["cursor"]))
        assert err.value.details["hint"] == FROM_BASE
        # The unharmed cursor still works.
        assert e.feed(first["txns"][-1][0], first["cursor"])["txns"]


def test_a_cursor_at_the_end_with_a_forged_chain_is_refused(image):
    with image.mount() as e:
        e.put("a", b"1")
        end = e.feed()["cursor"]
        with pytest.raises(InvalidArgument, match="chain"):
            e.feed(1, forged_cursor(end, chain=bytes(32)))


def test_after_without_a_cursor_is_refused(image):
    with image.mount() as e:
        e.put("a", b"1")
        with pytest.raises(InvalidArgument) as err:
            e.feed(5, None)
        assert err.value.details["hint"] == FROM_BASE
        with pytest.raises(InvalidArgument):
            e.feed(0, None, 0)


def test_damage_in_the_log_is_raised_with_its_offset_never_a_shorter_history(plain_image):
    with plain_image.mount() as e:
        for i in range(10):
            e.put(f"k{i}", bytes([i]) * 3000)
        rec = [r for r in committed_records(plain_image.path) if r.header.type == fmt.PAYLOAD][4]
        offset = rec.offset + fmt.HEADER_SIZE + 100
        plain_image.patch(offset, bytes([plain_image.read(offset, 1)[0] ^ 0x40]))
        with pytest.raises((CorruptImage, IntegrityError)) as err:
            e.feed()
        assert err.value.details["offset"] == rec.offset


def test_a_sector_damaged_under_a_parity_image_is_repaired_and_fed(image):
    with image.mount() as e:
        for i in range(10):
            e.put(f"k{i}", bytes([i]) * 3000)
        rec = [r for r in committed_records(image.path) if r.header.type == fmt.PAYLOAD][4]
        offset = rec.offset + fmt.HEADER_SIZE + 100
        image.patch(offset, bytes([image.read(offset, 1)[0] ^ 0x40]))
        c = Consumer()
        c.catch_up(e)
        assert c.state == engine_state(e) and c.state["k4"] == bytes([4]) * 3000


def test_a_feed_while_commits_go_on_never_holds_part_of_a_transaction(tmp_path):
    image = Image(tmp_path / "roomy.img", 64 << 20)   # no compaction meanwhile: every txn is a client's
    with image.mount() as e:
        stop = threading.Event()

        def committer(n):
            i = 0
            while not stop.is_set():
                e.commit([Mutation("put", f"c{n}/{i}/{part}", f"{n}:{i}".encode()) for part in "xyz"]
                         + [Mutation("delete", f"c{n}/{i - 1}/y")])
                i += 1

        threads = [threading.Thread(target=committer, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        c = Consumer()
        try:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                c.apply(e.feed(c.last if c.cursor else 0, c.cursor, 4000))
        finally:
            stop.set()
            for t in threads:
                t.join()
        c.catch_up(e)
        assert len(c.txns) > 50 and [p["reset"] for p in c.pages].count(True) == 1
        for txn_id, _, changes in c.txns:
            keys = [k for k, _ in changes]
            n, i = keys[0].split("/")[:2]
            assert keys == [f"{n}/{i}/x", f"{n}/{i}/y", f"{n}/{i}/z", f"{n}/{int(i) - 1}/y"]
        assert c.state == engine_state(e)


def test_a_feed_of_a_closing_engine_is_refused(image):
    e = image.mount()
    for i in range(5):
        e.put(f"k{i}", b"v")
    e.role.begin_close()
    with pytest.raises(ReadOnly, match="being unmounted; the feed stopped"):
        e.feed()
    e.device.close()


def test_a_consumer_paging_while_commits_and_compactions_go_on_converges(image):
    with image.mount() as e:
        stop = threading.Event()
        compactions = []

        def committer(n):
            i = 0
            while not stop.is_set():
                e.commit([Mutation("put", f"c{n}/{i % 40}", bytes([i % 251]) * 2000),
                          Mutation("delete", f"c{n}/{(i + 7) % 40}")])
                i += 1

        def compactor(_):
            while not stop.is_set():
                compactions.append(e.compact())
                time.sleep(0.1)

        threads = [threading.Thread(target=committer, args=(n,)) for n in range(2)]
        threads.append(threading.Thread(target=compactor, args=(0,)))
        for t in threads:
            t.start()
        c = Consumer()
        try:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                c.apply(e.feed(c.last if c.cursor else 0, c.cursor, 10_000))
        finally:
            stop.set()
            for t in threads:
                t.join()
        c.catch_up(e)
        assert len(compactions) >= 3 and sum(p["reset"] for p in c.pages) >= 2
        assert c.state == engine_state(e)
