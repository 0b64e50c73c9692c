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


def test_a_peer_stalling_inside_a_frame_times_out_but_an_idle_one_does_not(pair):
    ours, theirs = pair
    ours.settimeout(None)
    reader = unixrpc.FrameReader(ours, ENDPOINT, body_timeout=0.3)
    late = threading.Timer(0.6, theirs.sendall, [ENDPOINT.pack({"late": 1})])
    late.start()
    assert ENDPOINT.decode(reader.read()) == {"late": 1}  # 0.6 s idle between frames is fine
    late.join()
    theirs.sendall(unixrpc.LENGTH.pack(10) + b"\x81")  # promises 10 bytes, sends 1
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        reader.read()
    assert 0.25 < time.monotonic() - started < 3
    assert ours.gettimeout() is None  # the socket's own timeout is restored


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
