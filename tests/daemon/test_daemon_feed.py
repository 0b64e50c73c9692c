"""`feed` end to end: real statefsd processes, a consumer that applies the
pages, and what it must reach: exactly the daemon's state."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import pytest

from bench import procs
from statefsd.client import Client
from statefsd.errors import Code, InvalidArgument, StateFSError
from statefsd.protocol import MAX_FRAME
from statefsd.storage.feed import FROM_BASE
from tests.daemon.harness import RawConnection, make_image
from tests.engine.conftest import Consumer, forged_cursor


def daemon_state(client: Client) -> dict[str, bytes]:
    keys = client.list()
    return {key: value for key, (value, _txn) in zip(keys, client.mget(keys))}


def history(c: Client, rounds: int = 20) -> None:
    for i in range(rounds):
        c.put(f"k{i % 6}", bytes([i]) * (300 * (i % 4)))
        if i % 5 == 4:
            c.apply([("put", f"t{i}/a", b"A" * i), ("delete", f"k{(i + 1) % 6}"), ("put", f"t{i}/b", b"B")])
    c.delete("t4/b")


def test_a_consumer_of_feed_pages_reaches_exactly_the_daemons_state(daemon):
    with daemon.client() as c:
        history(c)
        consumer = Consumer()
        consumer.catch_up(c)
        assert consumer.state == daemon_state(c)
        ids = [t[0] for t in consumer.txns]
        assert ids == sorted(set(ids)) and ids[-1] == consumer.pages[-1]["max_txn"]
        assert consumer.txns[-1][2] == [("t4/b", None)]
        verdict = c.verify()
        assert consumer.txns[-1][1] == consumer.pages[-1]["chain"] == bytes.fromhex(verdict["chain_head"])
        caps = c.hello()["caps"]
        assert caps["max_feed_bytes"] == 32 << 20 and caps["max_reply_frame"] > caps["max_frame"]


def test_a_cursor_returns_only_newer_transactions_and_max_bytes_pages_them(daemon):
    with daemon.client() as c:
        history(c, 5)
        consumer = Consumer()
        consumer.catch_up(c)
        before = consumer.last
        new = [c.put(f"v{i}", bytes([i]) * 10_000) for i in range(6)]
        pages = consumer.catch_up(c, max_bytes=21_000)
        assert pages == 3 and [p["more"] for p in consumer.pages[-3:]] == [True, True, False]
        assert not any(p["reset"] for p in consumer.pages[1:])
        assert [t[0] for t in consumer.txns if t[0] > before] == new == [t[0] for t in consumer.txns[-6:]]
        assert consumer.state == daemon_state(c)


def test_after_compact_an_old_cursor_gets_a_reset_and_the_consumer_still_converges(daemon):
    with daemon.client() as c:
        history(c, 10)
        consumer = Consumer()
        consumer.catch_up(c)
        # Created and deleted between the consumer's last read and the
        # compaction: the case that defeats any skip by txn id.
        c.put("ephemeral", b"here a moment")
        c.put("k0", b"rewritten")
        c.delete("ephemeral")
        c.compact()
        c.put("after", b"compaction")
        page = consumer.page(c)
        assert page["reset"] and page["epoch"] != consumer.pages[0]["epoch"] and not page["more"]
        assert consumer.state == daemon_state(c) and "ephemeral" not in consumer.state
        assert page["chain"] == bytes.fromhex(c.verify()["chain_head"])
        again = consumer.page(c)
        assert not again["reset"] and again["txns"] == []


@pytest.mark.parametrize("field", [{"version": 9}, {"offset": 4096 * 1000}, {"next_seq": 1},
                                   {"next_group": 1}, {"chain": bytes(32)}, {"skip": 3}])
def test_a_forged_cursor_is_einval_with_the_way_back_to_the_base(daemon, field):
    with daemon.client() as c:
        history(c, 8)
        first = c.feed(0, None, 1000)
        assert first["more"]
        with pytest.raises(InvalidArgument) as err:
            c.feed(first["txns"][-1][0], forged_cursor(first["cursor"], **field))
        assert err.value.code == Code.EINVAL and err.value.details["hint"] == FROM_BASE
        with pytest.raises(InvalidArgument):
            c.feed(1, b"not a cursor")


def test_after_without_a_cursor_is_einval(daemon):
    with daemon.client() as c:
        c.put("a", b"1")
        with pytest.raises(InvalidArgument) as err:
            c.feed(3)
        assert err.value.details["hint"] == FROM_BASE
    raw = RawConnection(daemon.socket)
    try:
        answer = raw.request("feed", cursor="text, not bin")
        assert not answer["ok"] and answer["error"]["code"] == Code.EPROTO
        answer = raw.request("feed", 2, max_bytes=0)
        assert not answer["ok"] and answer["error"]["code"] == Code.EINVAL
    finally:
        raw.close()


def test_a_transaction_larger_than_a_request_frame_comes_whole_in_one_page(ws, tmp_path):
    daemon = ws.start(image=make_image(tmp_path / "big.img", 96 << 20))
    with daemon.client() as c:
        big = [os.urandom(8 << 20), os.urandom(8 << 20)]
        with c.transaction() as t:
            t.put("big/0", big[0])
            t.put("big/1", big[1])
        page = c.feed(0, None, 1)
        assert [len(page["txns"]), page["more"]] == [1, False]
        assert page["txns"][0][2] == [("big/0", big[0]), ("big/1", big[1])]
        assert sum(len(v) for _, v in page["txns"][0][2]) > MAX_FRAME


def test_a_feed_while_another_client_commits_never_returns_part_of_a_transaction(daemon):
    stop = threading.Event()
    errors = []

    def committer():
        try:
            with daemon.client() as other:
                i = 0
                while not stop.is_set():
                    other.apply([("put", f"c/{i}/{part}", b"%d" % i) for part in "xyz"]
                                + [("delete", f"c/{i - 1}/y")])
                    i += 1
        except StateFSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=committer)
    thread.start()
    consumer = Consumer()
    try:
        with daemon.client() as c:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                consumer.page(c, 300)
    finally:
        stop.set()
        thread.join()
    with daemon.client() as c:
        consumer.catch_up(c)
        assert errors == [] and len(consumer.txns) > 20
        for _txn, _chain, changes in consumer.txns:
            i = int(changes[0][0].split("/")[1])
            assert [k for k, _ in changes] == [f"c/{i}/x", f"c/{i}/y", f"c/{i}/z", f"c/{i - 1}/y"]
            assert [v for _, v in changes] == [b"%d" % i] * 3 + [None]
        assert consumer.state == daemon_state(c)


@pytest.fixture(scope="module")
def keystored():
    short = tempfile.mkdtemp(prefix="sff", dir="/tmp")
    daemon = procs.keystored(os.path.join(short, "keys"), os.path.join(short, "ks.sock"))
    daemon.socket, daemon.dir = os.path.join(short, "ks.sock"), short
    yield daemon
    daemon.stop()
    shutil.rmtree(short, ignore_errors=True)


def test_an_encrypted_image_feeds_plaintext_and_converges_across_a_compaction(keystored):
    image, socket = os.path.join(keystored.dir, "sealed.img"), os.path.join(keystored.dir, "sealed.sock")
    procs.fresh_image(image, 16 << 20, encryption="on")
    served = procs.statefsd(image, socket, keystore=keystored.socket)
    try:
        with Client(socket) as c:
            assert c.hello()["encryption"] == "on"
            history(c, 12)
            consumer = Consumer()
            consumer.catch_up(c, max_bytes=2000)
            assert consumer.state == daemon_state(c) and consumer.state["t9/a"] == b"A" * 9
            c.put("gone", b"x")
            c.delete("gone")
            c.compact()
            assert consumer.page(c)["reset"] and consumer.state == daemon_state(c)
    finally:
        served.stop()
    with open(image, "rb") as f:
        assert b"A" * 9 not in f.read()
