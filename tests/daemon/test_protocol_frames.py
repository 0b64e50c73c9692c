"""The statefsd protocol's pure parts (statefsd/protocol.py): its frames'
bytes, its caps, request validation. The framing itself is tested in
tests/shared/test_unixrpc.py."""

import socket

import msgpack
import pytest

from statefsd import protocol
from statefsd.errors import Code, Conflict, NotFound, ProtocolError, StateFSError, TooBig
from statefsd.shared import unixrpc
from statefsd.storage.format import MAX_VALUE_BYTES


def test_frame_is_big_endian_length_then_msgpack_map():
    frame = protocol.ENDPOINT.pack(protocol.make_request(7, "get", key="a"))
    assert frame == bytes.fromhex("00000015") + bytes.fromhex(
        "84a17601a26964" "07a26f70a3676574a36b6579a161")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(frame)
        body = unixrpc.FrameReader(ours, protocol.ENDPOINT).read()
    assert protocol.ENDPOINT.decode(body) == {"v": 1, "id": 7, "op": "get", "key": "a"}


def test_values_travel_as_msgpack_bin():
    frame = protocol.ENDPOINT.pack(protocol.make_request(1, "put", key="k", value=b"\x00\xff"))
    assert b"\xc4\x02\x00\xff" in frame  # bin8, length 2


def test_the_frame_cap_is_one_full_value_plus_room_for_its_map():
    assert protocol.ENDPOINT.max_frame == protocol.MAX_FRAME == protocol.CAPS["max_frame"]
    assert protocol.MAX_FRAME == MAX_VALUE_BYTES + 64 * 1024


def test_encoding_a_frame_over_the_cap_raises_toobig_naming_the_value_limit():
    with pytest.raises(TooBig) as err:
        protocol.ENDPOINT.pack(protocol.make_request(1, "put", key="k", value=bytes(protocol.MAX_FRAME)))
    assert f"values are limited to {MAX_VALUE_BYTES} bytes" in err.value.hint


def test_a_full_size_value_fits_in_one_frame():
    frame = protocol.ENDPOINT.pack(protocol.make_request(1, "put", key="k" * 512, value=bytes(MAX_VALUE_BYTES)))
    assert len(frame) <= protocol.MAX_FRAME + 4


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x92\x01", b"\xa3ab", b"\x81\x01\x02", b"garbage!"])
def test_garbage_and_non_map_bodies_are_eproto(body):
    with pytest.raises(ProtocolError):
        protocol.parse_request(protocol.ENDPOINT.decode(body))


@pytest.mark.parametrize("message, fragment", [
    ({"id": 1, "op": "info"}, "protocol version"),
    ({"v": 2, "id": 1, "op": "info"}, "version 2 is not supported"),
    ({"v": True, "id": 1, "op": "info"}, "protocol version"),
    ({"v": 1, "op": "info"}, "'id'"),
    ({"v": 1, "id": -1, "op": "info"}, "'id'"),
    ({"v": 1, "id": "x", "op": "info"}, "'id'"),
    ({"v": 1, "id": 1, "op": "frobnicate"}, "unknown op"),
    ({"v": 1, "id": 1, "op": 5}, "'op'"),
    ({"v": 1, "id": 1, "op": "get"}, "needs field 'key'"),
    ({"v": 1, "id": 1, "op": "get", "key": b"a"}, "must be msgpack str"),
    ({"v": 1, "id": 1, "op": "put", "key": "a", "value": "text"}, "must be msgpack bin"),
    ({"v": 1, "id": 1, "op": "list", "limit": "9"}, "must be msgpack int"),
    ({"v": 1, "id": 1, "op": "txn", "ops": [{"op": "put", "key": "a"}]}, "'value'"),
    ({"v": 1, "id": 1, "op": "txn", "ops": [{"op": "chmod", "key": "a"}]}, "must be one of"),
    ({"v": 1, "id": 1, "op": "txn", "ops": [5]}, "must be a map or an array"),
    ({"v": 1, "id": 1, "op": "txn", "ops": [[]]}, "first item must be one of put, delete"),
    ({"v": 1, "id": 1, "op": "txn", "ops": [["chmod", "a"]]}, "first item must be one of put, delete"),
    ({"v": 1, "id": 1, "op": "txn", "ops": [["put", "a"]]}, "must hold 3 items, got 2"),
    ({"v": 1, "id": 1, "op": "txn", "ops": [["delete", "a", b""]]}, "must hold 2 items, got 3"),
    ({"v": 1, "id": 1, "op": "txn", "ops": [["put", b"a", b"1"]]}, "field 'key' must be msgpack str"),
    ({"v": 1, "id": 1, "op": "txn", "ops": [["put", "a", "1"]]}, "field 'value' must be msgpack bin"),
])
def test_malformed_requests_name_the_problem(message, fragment):
    with pytest.raises(ProtocolError) as err:
        protocol.parse_request(message)
    assert fragment in err.value.message


def test_invalid_utf8_in_a_key_survives_decoding_for_key_validation():
    body = msgpack.packb({"v": 1, "id": 3, "op": "get", "key": "KEY"}).replace(b"KEY", b"\xff\xfe\xfd")
    request = protocol.parse_request(protocol.ENDPOINT.decode(body))
    assert request.args["key"] == "\udcff\udcfe\udcfd"
    with pytest.raises(StateFSError) as err:
        protocol.ENDPOINT.pack({"key": request.args["key"]})
    assert err.value.code == Code.EINVAL


def test_one_shot_txn_ops_are_normalised():
    request = protocol.parse_request({"v": 1, "id": 9, "op": "txn", "ops": [
        {"op": "put", "key": "a", "value": b"1"}, {"op": "delete", "key": "b"}]})
    assert request.args["ops"] == [("put", "a", b"1"), ("delete", "b", b"")]
    request = protocol.parse_request({"v": 1, "id": 9, "op": "txn", "ops": [["put", "a", b"1"], ["delete", "b"]]})
    assert request.args["ops"] == [("put", "a", b"1"), ("delete", "b", b"")]


def test_unknown_extra_fields_are_ignored_for_compatibility():
    request = protocol.parse_request({"v": 1, "id": 1, "op": "get", "key": "a", "future": [1]})
    assert request.args == {"key": "a"}


def test_error_response_carries_stable_code_and_printable_message():
    response = protocol.error_response(4, NotFound("no such key: \udcff"))
    assert response == {"id": 4, "ok": False, "error": {
        "code": 11, "name": "ENOTFOUND", "message": "no such key: \\udcff"}}
    protocol.ENDPOINT.pack(response)  # must not raise


def test_client_side_check_raises_the_matching_error_class():
    with pytest.raises(NotFound):
        protocol.check_response(protocol.error_response(4, NotFound("gone")), 4)
    with pytest.raises(ProtocolError):
        protocol.check_response(protocol.ok_response(5), 4)
    assert protocol.check_response(protocol.ok_response(4, txn=3), 4)["txn"] == 3


def test_a_conflict_travels_as_code_27_and_comes_back_as_the_conflict_class():
    response = protocol.error_response(6, Conflict("key 'a' changed: expected txn 5, it is now txn 9"))
    assert response["error"]["code"] == 27 and response["error"]["name"] == "ECONFLICT"
    with pytest.raises(Conflict) as err:
        protocol.check_response(response, 6)
    assert err.value.code == Code.ECONFLICT and err.value.hint.startswith("read the keys again")
