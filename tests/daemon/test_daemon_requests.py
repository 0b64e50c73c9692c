"""Requests to a real statefsd over its real socket: the client library, and
raw frames for everything a client library would never send."""

import os
import threading

import msgpack
import pytest

from statefsd import protocol
from statefsd.client import Client
from statefsd.errors import (
    Code, ConnectionFailed, InvalidArgument, NotFound, ProtocolError, TooBig,
)
from statefsd.shared import unixrpc
from statefsd.storage.format import MAX_KEY_BYTES, MAX_TXN_OPS, MAX_VALUE_BYTES
from tests.daemon.harness import RawConnection


@pytest.fixture
def client(shared_daemon):
    with shared_daemon.client() as c:
        yield c


def assert_error(response, code):
    assert response["ok"] is False, response
    assert response["error"]["code"] == int(code), response
    assert response["error"]["name"] == code.name
    assert response["error"]["message"]


def assert_still_serving(daemon):
    with daemon.client() as c:
        c.put("alive/probe", b"yes")
        assert c.get("alive/probe") == b"yes"


# ------------------------------------------------------------ client library

def test_put_get_stat_list_delete_round_trip(client):
    txn = client.put("rt/a", b"\x00binary\xff")
    assert client.get("rt/a") == b"\x00binary\xff"
    assert client.stat("rt/a") == {"path": "rt/a", "size": 8, "txn_id": txn}
    client.put("rt/b", b"")
    assert client.get("rt/b") == b""
    assert client.list("rt/") == ["rt/a", "rt/b"]
    assert client.delete("rt/a") > txn
    assert client.list("rt/") == ["rt/b"]
    with pytest.raises(NotFound):
        client.get("rt/a")


def test_hello_reports_protocol_encryption_and_mode(client):
    hello = client.hello()
    assert hello["protocol"] == protocol.PROTOCOL_VERSION
    assert hello["encryption"] == "off"
    assert hello["read_only"] is False
    assert hello["caps"]["max_value_bytes"] == MAX_VALUE_BYTES


def test_info_describes_the_mounted_image(client, shared_daemon):
    info = client.info()
    assert info["image"] == shared_daemon.image
    assert info["read_only"] is False and info["keys"] >= 0


def test_reading_or_deleting_a_missing_key_is_enotfound(client):
    with pytest.raises(NotFound) as err:
        client.get("missing/key")
    assert err.value.code == Code.ENOTFOUND and "missing/key" in err.value.message
    with pytest.raises(NotFound):
        client.delete("missing/key")
    with pytest.raises(NotFound):
        client.stat("missing/key")


def test_oversize_key_and_value_are_etoobig_and_nothing_is_stored(client):
    with pytest.raises(TooBig):
        client.put("k" * (MAX_KEY_BYTES + 1), b"v")
    with pytest.raises(TooBig):
        client.put("big/value", bytes(MAX_VALUE_BYTES + 1))
    with pytest.raises(NotFound):
        client.get("big/value")
    client.put("big/max", bytes(MAX_VALUE_BYTES))
    assert len(client.get("big/max")) == MAX_VALUE_BYTES


def test_invalid_keys_are_einval(client):
    for bad in ("", "nul\x00inside"):
        with pytest.raises(InvalidArgument):
            client.put(bad, b"v")


def test_list_pages_through_more_keys_than_one_answer_holds(client):
    count = protocol.LIST_PAGE_KEYS + 5
    for start in range(0, count, MAX_TXN_OPS):
        client.apply([("put", f"many/{i:05d}", b"") for i in range(start, min(count, start + MAX_TXN_OPS))])
    first = client.call("list", prefix="many/")
    assert first["more"] is True and len(first["keys"]) == protocol.LIST_PAGE_KEYS
    assert client.list("many/") == [f"many/{i:05d}" for i in range(count)]


def test_transaction_commits_all_ops_on_clean_exit(client):
    client.put("tx1/old", b"x")
    with client.transaction() as t:
        t.put("tx1/a", b"1")
        t.put("tx1/b", b"2")
        t.delete("tx1/old")
    assert t.txn_id is not None
    assert client.list("tx1/") == ["tx1/a", "tx1/b"]
    assert client.stat("tx1/a")["txn_id"] == client.stat("tx1/b")["txn_id"] == t.txn_id


def test_transaction_aborts_on_exception_and_leaves_nothing(client):
    with pytest.raises(RuntimeError):
        with client.transaction() as t:
            t.put("tx2/a", b"1")
            raise RuntimeError("changed my mind")
    assert client.list("tx2/") == []
    client.put("tx2/after", b"ok")  # the connection is usable afterwards


def test_open_transaction_is_invisible_to_others_until_commit(client, shared_daemon):
    with shared_daemon.client() as other:
        with client.transaction() as t:
            t.put("tx3/a", b"1")
            t.put("tx3/b", b"2")
            assert other.list("tx3/") == []
        assert other.list("tx3/") == ["tx3/a", "tx3/b"]


def test_transaction_over_the_op_cap_fails_at_the_offending_op_and_commits_nothing(client):
    with pytest.raises(TooBig) as err:
        with client.transaction() as t:
            for i in range(MAX_TXN_OPS + 1):
                t.put(f"tx4/{i}", b"v")
    assert "aborted" in err.value.message
    assert client.list("tx4/") == []


def test_rejected_op_sinks_the_whole_server_side_transaction(shared_daemon):
    raw = RawConnection(shared_daemon.socket)
    assert raw.request("begin")["ok"]
    assert raw.request("txn_put", key="tx5/good", value=b"1")["ok"]
    assert_error(raw.request("txn_put", key="", value=b"1"), Code.EINVAL)
    assert_error(raw.request("commit"), Code.ETXN)
    raw.close()
    with shared_daemon.client() as c:
        assert c.list("tx5/") == []


def test_streamed_transaction_may_exceed_one_frame(client):
    big = MAX_VALUE_BYTES - 1024
    with client.transaction() as t:
        t.put("tx6/a", b"a" * big)
        t.put("tx6/b", b"b" * big)
    assert client.get("tx6/a") == b"a" * big and client.get("tx6/b") == b"b" * big


def test_one_shot_txn_applies_every_op(client):
    client.put("tx7/gone", b"x")
    txn = client.apply([("put", "tx7/a", b"1"), ("delete", "tx7/gone"), ("delete", "tx7/never")])
    assert client.list("tx7/") == ["tx7/a"] and client.stat("tx7/a")["txn_id"] == txn


def test_one_shot_txn_ops_go_as_arrays_and_a_daemon_reads_maps_too(client, shared_daemon):
    assert client.server["caps"]["txn_op_arrays"] is True
    raw = RawConnection(shared_daemon.socket)
    arrays = raw.request("txn", ops=[["put", "tx8/a", b"1"], ["put", "tx8/b", b"2"], ["delete", "tx8/a"]])
    maps = raw.request("txn", ops=[{"op": "put", "key": "tx8/c", "value": b"3"}, {"op": "delete", "key": "tx8/b"}])
    assert arrays["ok"] and maps["ok"] and maps["txn"] > arrays["txn"]
    assert client.list("tx8/") == ["tx8/c"]


@pytest.mark.parametrize("arrays", [True, False], ids=["daemon-reads-arrays", "older-daemon"])
def test_the_client_sends_txn_ops_in_the_form_its_daemon_reads(shared_daemon, monkeypatch, arrays):
    sent = []
    make_request = protocol.make_request
    monkeypatch.setattr(protocol, "make_request", lambda *a, **kw: sent.append(kw) or make_request(*a, **kw))
    with Client(shared_daemon.socket) as c:
        if not arrays:
            del c.server["caps"]["txn_op_arrays"]   # as a daemon from before arrays answers hello
        c.apply([("put", "tx9/a", b"1"), ("delete", "tx9/b")])
        assert c.get("tx9/a") == b"1"
    ops = next(kw["ops"] for kw in sent if "ops" in kw)
    assert ops == ([["put", "tx9/a", b"1"], ["delete", "tx9/b"]] if arrays else
                   [{"op": "put", "key": "tx9/a", "value": b"1"}, {"op": "delete", "key": "tx9/b"}])


def test_a_client_whose_daemon_restarted_shapes_its_next_txn_by_the_new_daemons_caps(ws, monkeypatch):
    sent = []
    make_request = protocol.make_request
    monkeypatch.setattr(protocol, "make_request", lambda *a, **kw: sent.append(kw) or make_request(*a, **kw))
    daemon = ws.start()
    with Client(daemon.socket) as c:
        del c.server["caps"]["txn_op_arrays"]   # the first daemon was one from before arrays
        daemon.stop()
        daemon = ws.start()                      # the same image, now served by one that reads them
        c.apply([("put", "restart/a", b"1")])
        assert c.get("restart/a") == b"1"
    daemon.stop()
    assert next(kw["ops"] for kw in sent if "ops" in kw) == [["put", "restart/a", b"1"]]


def test_transaction_misuse_is_etxn(shared_daemon):
    raw = RawConnection(shared_daemon.socket)
    assert_error(raw.request("commit"), Code.ETXN)
    assert_error(raw.request("txn_put", key="a", value=b""), Code.ETXN)
    assert raw.request("begin")["ok"]
    assert_error(raw.request("begin"), Code.ETXN)
    assert raw.request("abort") == {"id": 1, "ok": True, "aborted": True}
    raw.close()


def test_clients_in_threads_share_one_connection_safely(client):
    def work(n):
        for i in range(20):
            client.put(f"thr/{n}/{i}", str(i).encode())
    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(client.list("thr/")) == 80


def test_unreachable_daemon_is_econn_naming_the_socket(tmp_path):
    path = str(tmp_path / "nobody.sock")
    with pytest.raises(ConnectionFailed) as err:
        Client(path).get("a")
    assert path in err.value.message and err.value.code == Code.ECONN


# ------------------------------------------------------------- raw frames

def test_oversize_length_prefix_is_eproto_then_closed_and_daemon_serves_others(shared_daemon):
    raw = RawConnection(shared_daemon.socket)
    raw.send_bytes(unixrpc.LENGTH.pack(0xFFFFFFFF))
    response = raw.receive()
    assert_error(response, Code.EPROTO)
    assert response["id"] is None
    assert raw.at_eof()
    assert_still_serving(shared_daemon)


@pytest.mark.parametrize("body", [
    b"", b"\xc1", b"\x93\x01\x02\x03", b"not msgpack at all \xff\xfe", b"\x81\x01\x02",
    msgpack.packb("a string"), msgpack.packb({"v": 1, "id": 1}) + b"trailing",
])
def test_garbage_frames_are_eproto_and_the_connection_keeps_working(shared_daemon, body):
    raw = RawConnection(shared_daemon.socket)
    raw.send_body(body)
    assert_error(raw.receive(), Code.EPROTO)
    assert raw.request("hello", request_id=2)["ok"]
    raw.close()


@pytest.mark.parametrize("message", [
    {"v": 2, "id": 5, "op": "hello"},
    {"v": 1, "id": 5, "op": "format_disk"},
    {"v": 1, "id": 5, "op": "put", "key": "typed", "value": "text, not bin"},
    {"v": 1, "id": 5, "op": "get", "key": 12},
    {"v": 1, "id": 5, "op": "txn", "ops": "not a list"},
])
def test_unknown_version_op_or_wrong_types_are_eproto_echoing_the_id(shared_daemon, message):
    raw = RawConnection(shared_daemon.socket)
    raw.send(message)
    response = raw.receive()
    assert_error(response, Code.EPROTO)
    assert response["id"] == 5
    raw.close()
    assert_still_serving(shared_daemon)


def test_non_utf8_key_in_a_raw_frame_is_einval(shared_daemon):
    raw = RawConnection(shared_daemon.socket)
    body = msgpack.packb({"v": 1, "id": 8, "op": "put", "key": "KEY", "value": b"v"}, use_bin_type=True)
    raw.send_body(body.replace(b"KEY", b"k\xff\xfe"))
    response = raw.receive()
    assert_error(response, Code.EINVAL)
    assert response["id"] == 8
    raw.close()
    assert_still_serving(shared_daemon)


def test_list_with_a_prefix_that_is_not_utf8_is_einval_naming_the_prefix(shared_daemon):
    raw = RawConnection(shared_daemon.socket)
    # {"v": 1, "id": 1, "op": "list", "prefix": <str holding the byte ff>}, as a client sent it
    raw.send_body(bytes.fromhex("84a17601a2696401a26f70a46c697374a6707265666978a1ff"))
    response = raw.receive()
    assert_error(response, Code.EINVAL)
    assert response["id"] == 1
    assert "list prefix must be valid UTF-8" in response["error"]["message"]
    assert "\\xff" in response["error"]["message"]
    raw.close()
    assert_still_serving(shared_daemon)


TEXT = "T\u00e9XT"  # a str field whose bytes are replaced by invalid UTF-8 below


@pytest.mark.parametrize("fields", [
    {"op": "list", "prefix": TEXT},
    {"op": "list", "after": TEXT},
    {"op": "get", "key": TEXT},
    {"op": "stat", "key": TEXT},
    {"op": "delete", "key": TEXT},
    {"op": "put", "key": TEXT, "value": b"v"},
    {"op": "txn", "ops": [{"op": "put", "key": "fine", "value": b"v"}, {"op": "delete", "key": TEXT}]},
], ids=lambda f: f["op"] + "-" + next(k for k in f if k != "op"))
def test_every_text_field_holding_invalid_utf8_is_einval_never_einternal(shared_daemon, fields):
    raw = RawConnection(shared_daemon.socket)
    body = msgpack.packb({"v": 1, "id": 12, **fields}, use_bin_type=True)
    raw.send_body(body.replace(TEXT.encode(), b"T\xff\xfeXT"))
    response = raw.receive()
    assert_error(response, Code.EINVAL)
    assert "valid UTF-8" in response["error"]["message"]
    raw.close()
    assert_still_serving(shared_daemon)


def test_a_txn_put_key_that_is_not_utf8_is_einval_and_aborts_the_transaction(shared_daemon):
    raw = RawConnection(shared_daemon.socket)
    assert raw.request("begin")["ok"]
    body = msgpack.packb({"v": 1, "id": 13, "op": "txn_put", "key": TEXT, "value": b"v"},
                         use_bin_type=True)
    raw.send_body(body.replace(TEXT.encode(), b"T\xff\xfeXT"))
    assert_error(raw.receive(), Code.EINVAL)
    assert_error(raw.request("commit", request_id=14), Code.ETXN)
    raw.close()


def test_client_refuses_a_value_too_big_for_any_frame_without_sending(client):
    with pytest.raises(TooBig):
        client.put("huge", bytes(protocol.MAX_FRAME))
    assert client.hello()["protocol"] == 1


def test_refused_requests_are_audited(daemon):
    # A daemon of its own: on the shared one, other tests' refusals from this
    # uid may already have used up the journal's burst for "refused".
    raw = RawConnection(daemon.socket)
    raw.send({"v": 1, "id": 77, "op": "no_such_op"})
    raw.receive()
    raw.close()
    events = daemon.audit_events()
    assert all(e["component"] == "statefsd" for e in events)
    refusals = [e for e in events if e["event"] == "refused"]
    assert any(e["fields"].get("request") == 77 and e["fields"]["code"] == "EPROTO" for e in refusals)


def test_protocol_error_from_response_raises_on_client(shared_daemon):
    with Client(shared_daemon.socket) as c:
        with pytest.raises(ProtocolError):
            c.call("hello", v=2)  # overriding the version is refused by the daemon


def test_a_flood_of_huge_bad_requests_grows_the_audit_journal_by_a_bounded_amount(daemon):
    from statefsd.shared.audit import BURST, EXCERPT_CHARS
    requests, op = 3 * BURST, "x" * (1 << 20)
    before = os.path.getsize(daemon.audit_path)
    raw = RawConnection(daemon.socket)
    for n in range(requests):
        raw.send({"v": 1, "id": n, "op": op})
        assert_error(raw.receive(), Code.EPROTO)
    raw.close()
    assert_still_serving(daemon)
    grown = os.path.getsize(daemon.audit_path) - before
    assert grown < BURST * 4 * EXCERPT_CHARS, grown      # the requests were 60 MiB
    assert daemon.stop() == 0
    events = daemon.audit_events()
    refused = [e["fields"] for e in events if e["event"] == "refused"]
    assert len(refused) == BURST
    # the error quotes a bounded excerpt of the op, and the journal bounds every field anyway
    assert all(len(f["message"]) <= EXCERPT_CHARS for f in refused)
    (suppressed,) = [e["fields"] for e in events if e["event"] == "suppressed"]
    assert suppressed["event"] == "refused" and suppressed["count"] == requests - BURST
    assert suppressed["uid"] == os.getuid()
