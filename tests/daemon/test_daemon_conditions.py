"""Versioned reads (get's txn, mget) and conditional commits (expect) against
a real statefsd: the client library, and raw frames for what it never sends."""

import threading

import pytest

from statefsd import protocol
from statefsd.client import Client
from statefsd.errors import Code, Conflict, InvalidArgument, NotFound, ProtocolError, TooBig
from statefsd.storage.format import MAX_TXN_CONDITIONS
from tests.daemon.harness import RawConnection


@pytest.fixture
def client(shared_daemon):
    with shared_daemon.client() as c:
        yield c


def error_of(response):
    assert response["ok"] is False, response
    return response["error"]["name"], response["error"]["message"]


def test_two_clients_incrementing_one_counter_by_read_and_conditional_write_lose_no_update(shared_daemon):
    rounds = 300
    with shared_daemon.client() as c:
        c.put("cas/counter", b"0")
    conflicts = [0, 0]
    failures = []

    def increment(n):
        try:
            with Client(shared_daemon.socket) as c:
                for _ in range(rounds):
                    while True:
                        value, txn = c.get_versioned("cas/counter")
                        try:
                            c.apply([("put", "cas/counter", b"%d" % (int(value) + 1))],
                                    expect=[("cas/counter", txn)])
                            break
                        except Conflict:
                            conflicts[n] += 1
        except Exception as exc:   # reported below, never lost in a thread
            failures.append(exc)

    threads = [threading.Thread(target=increment, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []
    with shared_daemon.client() as c:
        assert c.get("cas/counter") == b"%d" % (2 * rounds)
    # The two clients did race (so unconditional writes would have lost
    # updates), and every race was caught as a conflict, then retried.
    assert sum(conflicts) > 0, conflicts


def test_get_answers_the_txn_id_that_wrote_the_value(client):
    txn = client.put("v/a", b"1")
    assert client.get_versioned("v/a") == (b"1", txn)
    assert client.stat("v/a")["txn_id"] == txn
    raw = RawConnection(client.socket_path)
    assert raw.request("get", key="v/a") == {"id": 1, "ok": True, "value": b"1", "txn": txn}
    raw.close()
    with pytest.raises(NotFound):
        client.get_versioned("v/none")


def test_mget_answers_each_key_in_order_with_nil_for_missing_ones(client):
    a = client.put("m/a", b"A")
    b = client.put("m/b", b"")
    assert client.mget(["m/b", "m/none", "m/a", "m/b"]) == [(b"", b), None, (b"A", a), (b"", b)]
    assert client.mget([]) == []
    raw = RawConnection(client.socket_path)
    assert raw.request("mget", keys=["m/a", "m/none"])["values"] == [[b"A", a], None]
    raw.close()


def test_mget_stops_before_8_mib_of_values_and_the_client_asks_again_for_the_rest(client):
    value = bytes(3 << 20)
    txns = [client.put(f"big/{n}", value) for n in range(3)]
    raw = RawConnection(client.socket_path)
    answer = raw.request("mget", keys=["big/0", "big/none", "big/1", "big/2"])
    raw.close()
    # 3 + 3 MiB fit the 8 MiB of one answer, a third value would not.
    assert answer["values"] == [[value, txns[0]], None, [value, txns[1]]]
    assert client.mget(["big/0", "big/none", "big/1", "big/2"]) == \
        [(value, txns[0]), None, (value, txns[1]), (value, txns[2])]


def test_mget_of_more_keys_than_one_request_holds_is_split_by_the_client(client):
    present = client.put("many/0500", b"x")
    keys = [f"many/{n:04}" for n in range(2 * protocol.MAX_MGET_KEYS + 5)]
    found = client.mget(keys)
    assert len(found) == len(keys)
    assert found[500] == (b"x", present)
    assert found.count(None) == len(keys) - 1


def test_expecting_an_existing_key_absent_is_econflict_27_and_writes_nothing(client):
    txn = client.put("c/exists", b"1")
    with pytest.raises(Conflict) as err:
        client.apply([("put", "c/exists", b"2"), ("put", "c/new", b"n")], expect=[("c/exists", 0)])
    assert err.value.code == Code.ECONFLICT == 27
    assert err.value.message == f"key 'c/exists' changed: expected it absent, it exists (txn {txn}); " \
                                f"nothing was written"
    assert client.get("c/exists") == b"1"
    with pytest.raises(NotFound):
        client.get("c/new")
    assert client.apply([("put", "c/new", b"n")], expect=[("c/new", 0), ("c/exists", txn)]) > txn


def test_a_compaction_between_read_and_commit_gives_a_conflict_never_a_wrong_success(client):
    client.put("c/compacted", b"1")
    _, read_txn = client.get_versioned("c/compacted")
    client.compact()
    with pytest.raises(Conflict):
        client.apply([("put", "c/compacted", b"2")], expect=[("c/compacted", read_txn)])
    assert client.get("c/compacted") == b"1"


def test_a_conflicting_streamed_commit_discards_the_buffer_and_the_connection_goes_on(client):
    stale = client.put("s/k", b"1")
    client.put("s/k", b"2")
    with pytest.raises(Conflict):
        with client.transaction() as t:
            t.put("s/k", b"3")
            t.put("s/other", b"x")
            t.commit(expect=[("s/k", stale)])
    assert client.get("s/k") == b"2"
    with pytest.raises(NotFound):
        client.get("s/other")
    with client.transaction() as t:   # nothing is left open on the connection
        t.put("s/other", b"y")
        _, current = client.get_versioned("s/k")
    assert client.get("s/other") == b"y"
    with client.transaction() as t:
        t.delete("s/k")
        assert t.commit(expect=[("s/k", current)]) > current


def test_a_daemon_that_does_not_announce_conditions_is_never_sent_a_conditional_write(client):
    client.connect()
    del client.server["caps"]["max_txn_conditions"]   # what an older daemon answers to hello
    try:
        with pytest.raises(ProtocolError) as err:
            client.apply([("put", "old/k", b"1")], expect=[("old/k", 0)])
        assert "does not check transaction conditions" in err.value.message
        with pytest.raises(NotFound):
            client.get("old/k")
    finally:
        client.close()


@pytest.mark.parametrize("fields, name, words", [
    ({"op": "mget", "keys": []}, "EINVAL", "mget needs at least one key"),
    ({"op": "mget", "keys": ["a"] * (protocol.MAX_MGET_KEYS + 1)}, "ETOOBIG",
     f"mget of {protocol.MAX_MGET_KEYS + 1} keys exceeds the limit of {protocol.MAX_MGET_KEYS}"),
    ({"op": "mget", "keys": ["ok", ""]}, "EINVAL", "a key must be a non-empty string"),
    ({"op": "mget", "keys": ["ok", 7]}, "EPROTO", "mget: field 'keys[1]' must be msgpack str, got int"),
    ({"op": "mget", "keys": "m/a"}, "EPROTO", "field 'keys' must be msgpack array"),
    ({"op": "txn", "ops": [{"op": "put", "key": "x/a", "value": b"1"}], "expect": [{"key": "x/a", "txn": -1}]},
     "EINVAL", "condition 0 on key 'x/a': the expected txn id must be an integer >= 0"),
    ({"op": "txn", "ops": [{"op": "put", "key": "x/a", "value": b"1"}], "expect": [{"key": "", "txn": 0}]},
     "EINVAL", "condition 0: a key must be a non-empty string"),
    ({"op": "txn", "ops": [{"op": "put", "key": "x/a", "value": b"1"}],
      "expect": [{"key": f"x/{n}", "txn": 0} for n in range(MAX_TXN_CONDITIONS + 1)]},
     "ETOOBIG", f"{MAX_TXN_CONDITIONS + 1} conditions exceed the limit of {MAX_TXN_CONDITIONS}"),
    ({"op": "txn", "ops": [], "expect": [{"key": "x/a", "txn": 0}]},
     "EINVAL", "a transaction with conditions needs at least one put or delete"),
    ({"op": "txn", "ops": [{"op": "put", "key": "x/a", "value": b"1"}], "expect": [{"key": "x/a", "txn": True}]},
     "EPROTO", "expect[0]: field 'txn' must be msgpack int, got bool"),
    ({"op": "txn", "ops": [{"op": "put", "key": "x/a", "value": b"1"}], "expect": [["x/a", 0]]},
     "EPROTO", "expect[0] must be a map"),
    ({"op": "txn", "ops": [{"op": "put", "key": "x/a", "value": b"1"}], "expect": {"x/a": 0}},
     "EPROTO", "field 'expect' must be msgpack array"),
])
def test_malformed_mget_and_expect_fields_are_refused_and_the_connection_keeps_working(client, fields, name,
                                                                                        words):
    raw = RawConnection(client.socket_path)
    raw.send({"v": 1, "id": 9, **fields})
    response = raw.receive()
    assert response["id"] == 9
    assert error_of(response)[0] == name and words in error_of(response)[1], response
    assert raw.request("get", request_id=10, key="x/a")["error"]["name"] == "ENOTFOUND"   # nothing written
    raw.close()


def test_a_streamed_commit_with_a_malformed_condition_ends_the_transaction_with_einval(client):
    with pytest.raises(InvalidArgument):
        with client.transaction() as t:
            t.put("bad/k", b"1")
            t.commit(expect=[("bad/k", -3)])
    with pytest.raises(NotFound):
        client.get("bad/k")
    with pytest.raises(TooBig):
        client.apply([("put", "bad/k", b"1")], expect=[("bad/k", 0)] * (MAX_TXN_CONDITIONS + 1))
