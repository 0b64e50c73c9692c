"""The Unix-socket RPC both daemons share (statefsd/shared/unixrpc.py), on
real socket pairs, real listening sockets and real peer processes."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import msgpack
import pytest

from statefsd.errors import Busy, InvalidArgument, NotFound, ProtocolError, TooBig
from statefsd.shared import unixrpc

ENDPOINT = unixrpc.Endpoint(owner="testd", example="testd.sock", max_frame=1024,
                            socket_mode=0o640, backlog=8, too_big_hint="send less")


@pytest.fixture
def pair():
    """(ours, theirs): a connected stream pair; ours reads, theirs plays the peer."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.settimeout(5)
    yield ours, theirs
    ours.close()
    theirs.close()


@pytest.fixture
def sock_dir():
    path = tempfile.mkdtemp(prefix="rpc-", dir="/tmp")  # sun_path is 108 bytes
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


# ----------------------------------------------------------------- frames

def test_a_packed_frame_is_a_big_endian_length_then_one_msgpack_map(pair):
    ours, theirs = pair
    frame = ENDPOINT.pack({"op": "ping", "data": b"\x00\xff"})
    assert frame[:4] == len(frame[4:]).to_bytes(4, "big")
    assert msgpack.unpackb(frame[4:]) == {"op": "ping", "data": b"\x00\xff"}
    theirs.sendall(frame + frame)
    reader = unixrpc.FrameReader(ours, ENDPOINT)
    assert [ENDPOINT.decode(reader.read()) for _ in range(2)] == [{"op": "ping", "data": b"\x00\xff"}] * 2


def test_an_over_cap_length_is_refused_before_any_body_byte_is_awaited(pair):
    ours, theirs = pair
    ours.settimeout(2)  # were the body awaited, read() would time out instead
    theirs.sendall(unixrpc.LENGTH.pack(0xFFFFFFFF))
    started = time.monotonic()
    with pytest.raises(ProtocolError) as err:
        unixrpc.FrameReader(ours, ENDPOINT).read()
    assert time.monotonic() - started < 1
    assert err.value.message == "frame length 4294967295 exceeds the 1024-byte cap"
    assert err.value.details.get("fatal") is True


def test_a_frame_of_exactly_the_cap_is_read_and_one_byte_more_is_refused(pair):
    ours, theirs = pair
    body = b"\x00" * ENDPOINT.max_frame
    theirs.sendall(unixrpc.LENGTH.pack(len(body)) + body + unixrpc.LENGTH.pack(len(body) + 1))
    reader = unixrpc.FrameReader(ours, ENDPOINT)
    assert reader.read() == body
    with pytest.raises(ProtocolError):
        reader.read()


def test_a_clean_end_between_frames_is_none(pair):
    ours, theirs = pair
    theirs.sendall(ENDPOINT.pack({"last": True}))
    theirs.close()
    reader = unixrpc.FrameReader(ours, ENDPOINT)
    assert ENDPOINT.decode(reader.read()) == {"last": True}
    assert reader.read() is None


@pytest.mark.parametrize("sent, words", [
    (b"\x00\x00", "inside a frame length prefix"),
    (b"\x00\x00\x00\x10abc", "after 3 of 16 frame bytes"),
])
def test_a_stream_cut_inside_a_frame_is_a_lost_connection(pair, sent, words):
    ours, theirs = pair
    theirs.sendall(sent)
    theirs.close()
    with pytest.raises(ConnectionResetError, match=words):
        unixrpc.FrameReader(ours, ENDPOINT).read()


def test_a_frame_must_be_complete_within_its_deadline_however_its_bytes_are_spaced(pair):
    ours, theirs = pair
    ours.settimeout(None)
    reader = unixrpc.FrameReader(ours, ENDPOINT, frame_deadline=0.5)
    late = threading.Timer(0.8, theirs.sendall, [ENDPOINT.pack({"late": 1})])
    late.start()
    assert ENDPOINT.decode(reader.read()) == {"late": 1}  # idle between frames is fine
    late.join()

    def trickle() -> None:  # every gap is short, the whole frame is not
        try:
            for byte in unixrpc.LENGTH.pack(10) + b"\x81\xa1a\xc4\x04abcd":
                theirs.send(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass
    sender = threading.Thread(target=trickle)
    sender.start()
    started = time.monotonic()
    with pytest.raises(ProtocolError) as err:
        reader.read()
    elapsed = time.monotonic() - started
    sender.join()
    assert 0.45 < elapsed < 1
    assert err.value.message == "frame not completed within 0.5 s of its first byte"
    assert err.value.details.get("fatal") is True
    assert ours.gettimeout() is None  # the socket's own timeout is restored


def test_a_peer_silent_past_the_idle_deadline_is_an_idle_timeout(pair):
    ours, theirs = pair
    reader = unixrpc.FrameReader(ours, ENDPOINT, frame_deadline=5, idle_deadline=0.3)
    theirs.sendall(ENDPOINT.pack({"n": 1}) + ENDPOINT.pack({"n": 2}))  # pipelined: both in one recv
    assert [ENDPOINT.decode(reader.read()) for _ in range(2)] == [{"n": 1}, {"n": 2}]
    started = time.monotonic()
    with pytest.raises(unixrpc.IdleTimeout):
        reader.read()
    assert 0.25 < time.monotonic() - started < 2


def test_a_large_body_arriving_in_pieces_is_read_whole(pair):
    ours, theirs = pair
    endpoint = unixrpc.Endpoint(owner="testd", example="testd.sock", max_frame=1 << 20,
                                socket_mode=0o640, backlog=8)
    frame = endpoint.pack({"data": bytes(range(256)) * 3000})
    sender = threading.Thread(target=lambda: [theirs.sendall(frame[i:i + 7000]) for i in range(0, len(frame), 7000)])
    sender.start()
    body = unixrpc.FrameReader(ours, endpoint, frame_deadline=5).read()
    sender.join()
    assert endpoint.decode(body) == {"data": bytes(range(256)) * 3000}


BIG = unixrpc.Endpoint(owner="testd", example="testd.sock", max_frame=4 << 20, socket_mode=0o640, backlog=8)
VIEWS = unixrpc.Endpoint(owner="testd", example="testd.sock", max_frame=4 << 20, socket_mode=0o640, backlog=8,
                         large_bins_as_views=True)


def _plain(message: dict) -> dict:
    return {key: bytes(value) if isinstance(value, memoryview) else value for key, value in message.items()}


@pytest.mark.parametrize("size", [0, 100, unixrpc.LARGE_BIN - 1, unixrpc.LARGE_BIN, 1 << 20])
def test_frame_parts_send_a_large_top_level_bin_from_where_it_is_and_decode_to_the_same_map(pair, size):
    ours, theirs = pair
    value = os.urandom(size)
    message = {"v": 1, "id": 7, "op": "put", "key": "k", "value": value, "nested": [{"value": value}]}
    parts = BIG.frame_parts(message)
    if size >= unixrpc.LARGE_BIN:
        assert any(isinstance(part, memoryview) and part.obj is value for part in parts)
    else:
        assert b"".join(parts) == BIG.pack(message)
    sender = threading.Thread(target=unixrpc.send_parts, args=(theirs, parts))
    sender.start()
    body = unixrpc.FrameReader(ours, BIG, frame_deadline=5).read()
    sender.join()
    assert BIG.decode(body) == message


def test_frame_parts_refuse_a_frame_over_the_cap_before_sending():
    with pytest.raises(TooBig, match="exceeds the 1024-byte frame cap"):
        ENDPOINT.frame_parts({"value": bytes(unixrpc.LARGE_BIN)})


def test_a_large_top_level_bin_decodes_as_a_read_only_view_of_the_body_only_where_the_endpoint_asks():
    value = os.urandom(unixrpc.LARGE_BIN + 3)
    message = {"v": 1, "key": "k", "value": value, "small": b"s", "ops": [{"value": value[:1000]}], "n": None}
    body = bytearray(BIG.pack(message)[4:])
    viewed = VIEWS.decode(body)
    assert isinstance(viewed["value"], memoryview) and viewed["value"].readonly and viewed["value"].obj is body
    assert isinstance(viewed["small"], bytes) and isinstance(viewed["ops"][0]["value"], bytes)
    assert _plain(viewed) == message
    assert BIG.decode(body) == message and isinstance(BIG.decode(body)["value"], bytes)


def test_a_large_bin_beside_another_large_field_is_copied_so_a_small_value_cannot_pin_a_large_frame():
    value, pad = os.urandom(unixrpc.LARGE_BIN), bytes(3 * unixrpc.LARGE_BIN)
    body = bytearray(BIG.pack({"key": "k", "value": value, "pad": pad})[4:])
    viewed = VIEWS.decode(body)
    assert isinstance(viewed["value"], bytes) and viewed["value"] == value
    assert isinstance(viewed["pad"], bytes)   # not nearly the whole frame either


@pytest.mark.parametrize("body", [
    b"\x81\xa1k\xc6" + (1 << 20).to_bytes(4, "big") + bytes(unixrpc.LARGE_BIN),       # bin shorter than it says
    b"\x82\xa1k\xc6" + (unixrpc.LARGE_BIN).to_bytes(4, "big") + bytes(unixrpc.LARGE_BIN),  # an entry missing
    b"\x81\x01\xc6" + (unixrpc.LARGE_BIN).to_bytes(4, "big") + bytes(unixrpc.LARGE_BIN),   # a key that is not str
    b"\x81\xa1k\xc6" + (unixrpc.LARGE_BIN).to_bytes(4, "big") + bytes(unixrpc.LARGE_BIN + 1),  # a byte too many
])
def test_a_malformed_large_body_is_eproto_on_an_endpoint_that_decodes_views(body):
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        VIEWS.decode(bytearray(body))


# ----------------------------------------------------------------- decode

@pytest.mark.parametrize("body, words", [
    (b"", "not valid msgpack"),
    (b"\xc1", "not valid msgpack"),
    (msgpack.packb({"a": 1}) + b"\x00", "not valid msgpack"),  # two objects
    (msgpack.packb([1, 2]), "must hold a msgpack map, got list"),
    (msgpack.packb({1: 2}), "not valid msgpack"),  # map keys are str
])
def test_a_body_that_is_not_exactly_one_map_is_eproto(body, words):
    with pytest.raises(ProtocolError, match=words):
        ENDPOINT.decode(body)


@pytest.mark.parametrize("body, words", [
    (b"\x81\xa1a\xdd" + (10 ** 6).to_bytes(4, "big"), "more than 4096 msgpack objects"),  # one huge array
    (b"\x81\xa1a\xdc" + (300).to_bytes(2, "big") + (b"\x9f" + b"\x80" * 15) * 300,
     "more than 4096 msgpack objects"),                                                  # many small ones
    (b"\x81\xa1a" + b"\x91" * 20 + b"\x80", "deeper than 16 levels"),
])
def test_a_body_over_the_decode_budget_is_eproto_before_anything_is_built(body, words):
    with pytest.raises(ProtocolError, match=words):
        ENDPOINT.decode(body)


def test_a_body_within_the_decode_budget_decodes():
    message = {"items": [{"k": i, "v": b"x"} for i in range(800)], "deep": [[[[[[[[[[[]]]]]]]]]]]}
    assert ENDPOINT.decode(msgpack.packb(message, use_bin_type=True)) == message


def test_an_excerpt_of_a_huge_value_is_short_and_says_where_it_was_cut():
    shown = unixrpc.excerpt("\x01" * 20000)
    assert len(shown) <= 80 and "..." in shown and shown.startswith(r"'\x01\x01")
    assert unixrpc.excerpt("ping") == "'ping'" and unixrpc.excerpt(7) == "7"
    assert len(unixrpc.excerpt([str(i) * 1000 for i in range(1000)])) < 800


def test_an_error_reply_cuts_an_overlong_message_so_it_fits_any_frame_cap():
    reply = unixrpc.error_reply(NotFound("x" * 100000, hint="y" * 100000), id=None)
    assert len(reply["error"]["message"]) < unixrpc.MAX_ERROR_TEXT + 40
    assert reply["error"]["message"].endswith("... (100000 characters)")
    assert len(reply["error"]["hint"]) < unixrpc.MAX_ERROR_TEXT + 40


def test_undecodable_text_is_eproto_unless_the_endpoint_lets_it_through_as_surrogates():
    body = msgpack.packb({"key": "KEY"}).replace(b"KEY", b"k\xff\xfe")
    with pytest.raises(ProtocolError):
        ENDPOINT.decode(body)
    lenient = unixrpc.Endpoint(owner="testd", example="testd.sock", max_frame=1024, socket_mode=0o640,
                               backlog=8, text_errors="surrogateescape")
    assert lenient.decode(body) == {"key": "k\udcff\udcfe"}


def test_packing_over_the_cap_or_undecodable_text_is_refused_before_sending():
    with pytest.raises(TooBig) as err:
        ENDPOINT.pack({"data": bytes(ENDPOINT.max_frame)})
    assert "exceeds the 1024-byte frame cap" in err.value.message and err.value.hint == "send less"
    with pytest.raises(InvalidArgument, match=r"text 'k\\xff' is not valid UTF-8"):
        ENDPOINT.pack({"key": "k\udcff"})


def test_an_error_reply_puts_the_protocols_own_fields_first_and_escapes_surrogates():
    reply = unixrpc.error_reply(NotFound("no such key: \udcff", hint="list keys"), id=4)
    assert list(reply) == ["id", "ok", "error"]
    assert reply == {"id": 4, "ok": False, "error": {
        "code": 11, "name": "ENOTFOUND", "message": "no such key: \\udcff", "hint": "list keys"}}
    ENDPOINT.pack(reply)  # must not raise


# ------------------------------------------------------------ connections

def test_the_connection_table_caps_each_uid_and_keeps_room_for_trusted_uids():
    endpoint = unixrpc.Endpoint(owner="testd", example="testd.sock", max_frame=1024, socket_mode=0o640,
                                backlog=8, max_connections=6, max_connections_per_uid=3,
                                max_connections_others=4)
    table = unixrpc.ConnectionTable(endpoint, trusted={0})
    for _ in range(3):
        table.admit(1000)
    with pytest.raises(Busy, match="uid 1000 already holds 3 connections to testd, the limit per uid"):
        table.admit(1000)
    table.admit(1001)
    with pytest.raises(Busy, match="hold all 4 connections they may share"):
        table.admit(1002)
    table.admit(0)
    table.admit(0)
    with pytest.raises(Busy, match="testd is serving 6 clients already"):
        table.admit(0)
    table.release(1000)
    table.admit(1002)  # a slot freed by another untrusted uid


def test_an_acceptor_refuses_a_peer_over_its_cap_with_an_ebusy_frame_and_reports_it(sock_dir):
    endpoint = unixrpc.Endpoint(owner="testd", example="testd.sock", max_frame=1024, socket_mode=0o640,
                                backlog=8, max_connections=1, error_head=(("id", None),))
    bound = endpoint.listen(os.path.join(sock_dir, "d.sock"))
    reports = []
    acceptor = unixrpc.Acceptor(bound, unixrpc.ConnectionTable(endpoint), lambda event, **f: reports.append((event, f)))
    try:
        with socket.socket(socket.AF_UNIX) as first, socket.socket(socket.AF_UNIX) as second:
            first.connect(bound.path)
            conn, peer = acceptor.accept()
            assert peer.uid == os.getuid()
            second.connect(bound.path)
            second.settimeout(5)
            assert acceptor.accept() is None
            reader = unixrpc.FrameReader(second, endpoint)
            assert endpoint.decode(reader.read()) == {"id": None, "ok": False, "error": {
                "code": 17, "name": "EBUSY", "message": "testd is serving 1 clients already",
                "hint": "try again shortly"}}
            assert reader.read() is None
            conn.close()
            acceptor.release(peer)
        assert reports == [("connection_refused", {"reason": "testd is serving 1 clients already",
                                                   "uid": os.getuid(), "pid": os.getpid(), "suppressed": 0})]
    finally:
        acceptor.close()
        bound.close()


# -------------------------------------------------------- peer credentials

def test_peer_credentials_are_those_of_the_connecting_process(sock_dir):
    path = os.path.join(sock_dir, "creds.sock")
    bound = ENDPOINT.listen(path)
    peer = subprocess.Popen([sys.executable, "-c",
                             "import socket, sys; s = socket.socket(socket.AF_UNIX); "
                             "s.connect(sys.argv[1]); s.recv(1)", path])
    try:
        bound.sock.settimeout(10)
        conn, _ = bound.sock.accept()
        with conn:
            creds = unixrpc.peer_credentials(conn)
            assert creds == unixrpc.Peer(pid=peer.pid, uid=os.getuid(), gid=os.getgid())
            assert creds.pid != os.getpid()
    finally:
        peer.kill()
        peer.wait(10)
        bound.close()


# ------------------------------------------------------------ socket path

def _leave_stale_socket(path: str) -> None:
    """A socket file nobody listens on, as a killed daemon leaves it."""
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()


def test_a_stale_socket_is_replaced_with_the_endpoints_mode(sock_dir):
    path = os.path.join(sock_dir, "d.sock")
    _leave_stale_socket(path)
    ENDPOINT.check_socket_path(path)  # the early check leaves it alone...
    assert os.path.exists(path)
    bound = ENDPOINT.listen(path)  # ...listen replaces it
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == ENDPOINT.socket_mode
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
    finally:
        bound.close()
    assert not os.path.exists(path)


def test_a_socket_someone_listens_on_is_refused_and_keeps_working(sock_dir):
    path = os.path.join(sock_dir, "d.sock")
    live = ENDPOINT.listen(path)
    try:
        with pytest.raises(Busy) as err:
            ENDPOINT.listen(path)
        assert "already listening" in err.value.message and "is testd already running" in err.value.hint
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
    finally:
        live.close()


def test_a_file_or_directory_at_the_path_is_never_replaced(sock_dir):
    path = os.path.join(sock_dir, "precious")
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(InvalidArgument, match="is not a socket; refusing to replace it"):
        ENDPOINT.listen(path)
    assert open(path).read() == "keep me"
    with pytest.raises(InvalidArgument, match="is a directory") as err:
        ENDPOINT.listen(sock_dir)
    assert os.path.join(sock_dir, "testd.sock") in err.value.hint


def test_a_path_in_a_missing_directory_is_einval_suggesting_mkdir(sock_dir):
    with pytest.raises(InvalidArgument, match="does not exist") as err:
        ENDPOINT.check_socket_path(os.path.join(sock_dir, "nodir", "d.sock"))
    assert "mkdir -p" in err.value.hint


def test_closing_removes_the_socket_file_only_while_it_is_still_ours(sock_dir):
    path = os.path.join(sock_dir, "d.sock")
    first = ENDPOINT.listen(path)
    os.unlink(path)  # someone else took the path over
    second = ENDPOINT.listen(path)
    first.close()
    assert os.path.exists(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
    second.close()
    assert not os.path.exists(path)
