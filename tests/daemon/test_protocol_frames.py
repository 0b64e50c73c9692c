"""The pure framing and request-validation layer (statefsd/protocol.py)."""

import io

import msgpack
import pytest

from statefsd import protocol
from statefsd.errors import Code, ConnectionFailed, NotFound, ProtocolError, StateFSError, TooBig
from statefsd.storage.format import MAX_VALUE_BYTES


def test_frame_is_big_endian_length_then_msgpack_map():
    frame = protocol.encode_frame(protocol.make_request(7, "get", key="a"))
    assert frame == bytes.fromhex("00000015") + bytes.fromhex(
        "84a17601a26964" "07a26f70a3676574a36b6579a161")
    assert protocol.decode_body(protocol.read_frame(io.BytesIO(frame))) == {
        "v": 1, "id": 7, "op": "get", "key": "a"}


def test_values_travel_as_msgpack_bin():
    frame = protocol.encode_frame(protocol.make_request(1, "put", key="k", value=b"\x00\xff"))
    assert b"\xc4\x02\x00\xff" in frame  # bin8, length 2


def test_oversize_length_prefix_is_refused_before_reading_the_body():
    stream = io.BytesIO(protocol.LENGTH.pack(protocol.MAX_FRAME + 1) + b"x" * 100)
    with pytest.raises(ProtocolError) as err:
        protocol.read_frame(stream)
    assert err.value.details.get("fatal") is True
    assert stream.tell() == 4  # not one body byte consumed


def test_frame_of_exactly_the_cap_is_read():
    body = b"\x00" * protocol.MAX_FRAME
    assert protocol.read_frame(io.BytesIO(protocol.LENGTH.pack(len(body)) + body)) == body


def test_stream_cut_inside_a_frame_is_a_connection_failure():
    with pytest.raises(ConnectionFailed):
        protocol.read_frame(io.BytesIO(b"\x00\x00"))
    with pytest.raises(ConnectionFailed):
        protocol.read_frame(io.BytesIO(b"\x00\x00\x00\x10abc"))
    assert protocol.read_frame(io.BytesIO(b"")) is None


def test_encoding_a_frame_over_the_cap_raises_toobig():
    with pytest.raises(TooBig):
        protocol.encode_frame(protocol.make_request(1, "put", key="k", value=bytes(protocol.MAX_FRAME)))


def test_a_full_size_value_fits_in_one_frame():
    frame = protocol.encode_frame(protocol.make_request(1, "put", key="k" * 512, value=bytes(MAX_VALUE_BYTES)))
    assert len(frame) <= protocol.MAX_FRAME + 4


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x92\x01", b"\xa3ab", b"\x81\x01\x02", b"garbage!"])
def test_garbage_and_non_map_bodies_are_eproto(body):
    with pytest.raises(ProtocolError):
        protocol.parse_request(protocol.decode_body(body))


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
    ({"v": 1, "id": 1, "op": "txn", "ops": [5]}, "must be a map"),
])
def test_malformed_requests_name_the_problem(message, fragment):
    with pytest.raises(ProtocolError) as err:
        protocol.parse_request(message)
    assert fragment in err.value.message


def test_invalid_utf8_in_a_key_survives_decoding_for_key_validation():
    body = msgpack.packb({"v": 1, "id": 3, "op": "get", "key": "KEY"}).replace(b"KEY", b"\xff\xfe\xfd")
    request = protocol.parse_request(protocol.decode_body(body))
    assert request.args["key"] == "\udcff\udcfe\udcfd"
    with pytest.raises(StateFSError) as err:
        protocol.encode_frame({"key": request.args["key"]})
    assert err.value.code == Code.EINVAL


def test_one_shot_txn_ops_are_normalised():
    request = protocol.parse_request({"v": 1, "id": 9, "op": "txn", "ops": [
        {"op": "put", "key": "a", "value": b"1"}, {"op": "delete", "key": "b"}]})
    assert request.args["ops"] == [("put", "a", b"1"), ("delete", "b", b"")]


def test_unknown_extra_fields_are_ignored_for_compatibility():
    request = protocol.parse_request({"v": 1, "id": 1, "op": "get", "key": "a", "future": [1]})
    assert request.args == {"key": "a"}


def test_error_response_carries_stable_code_and_printable_message():
    response = protocol.error_response(4, NotFound("no such key: \udcff"))
    assert response == {"id": 4, "ok": False, "error": {
        "code": 11, "name": "ENOTFOUND", "message": "no such key: \\udcff"}}
    protocol.encode_frame(response)  # must not raise


def test_client_side_check_raises_the_matching_error_class():
    with pytest.raises(NotFound):
        protocol.check_response(protocol.error_response(4, NotFound("gone")), 4)
    with pytest.raises(ProtocolError):
        protocol.check_response(protocol.ok_response(5), 4)
    assert protocol.check_response(protocol.ok_response(4, txn=3), 4)["txn"] == 3
