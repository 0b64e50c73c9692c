"""keystored's limits against hostile clients (docs/keystored.md, "Limits"):
bounded error replies, whole-frame deadlines, connection caps per uid that
keep allowed uids served whatever other uids do."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import msgpack
import pytest

from keystored.client import KeystoreClient

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 65534 needs root")


def _error(reply: dict | None) -> tuple[str, str]:
    assert reply is not None, "keystored closed the connection instead of answering"
    assert reply["ok"] is False
    return reply["error"]["name"], reply["error"]["message"]


@pytest.mark.parametrize("fields, name", [
    ({"v": 1, "op": "\x01" * 20000}, "EPROTO"),                       # escapes make it 80 kB of repr
    ({"v": 1, "op": "ping", "\x01" * 20000: 1}, "EINVAL"),            # an unknown field's name
    ({"v": "\x01" * 20000, "op": "ping"}, "EPROTO"),                  # a protocol version
])
def test_a_20_kB_name_gets_a_short_error_reply_and_the_connection_stays_usable(shared_keystored, helpers,
                                                                              fields, name):
    bad, ping = helpers.exchange(shared_keystored.socket, helpers.request(**fields),
                                 helpers.request(v=1, op="ping"))
    got, message = _error(bad)
    assert got == name and len(message) < 400
    assert "..." in message  # a bounded excerpt of what was sent
    assert ping == {"v": 1, "ok": True, "protocol": 1}


def test_a_frame_declaring_more_objects_than_a_request_can_hold_is_eproto(shared_keystored, helpers):
    body = b"\x82\xa1v\x01\xa2op\xdc" + struct.pack(">H", 60000) + b"\x80" * 60000  # op: 60000 empty maps
    bad, ping = helpers.exchange(shared_keystored.socket, helpers.frame(body), helpers.request(v=1, op="ping"))
    got, message = _error(bad)
    assert got == "EPROTO" and "more than 128 msgpack objects" in message
    assert ping["ok"] is True


def test_a_sender_trickling_one_byte_at_a_time_is_cut_at_the_whole_frame_deadline(launcher):
    daemon = launcher.start("--frame-deadline", "1.5")
    frame = struct.pack(">I", 200) + msgpack.packb({"v": 1, "op": "ping", "pad": b"x" * 180})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(daemon.socket)
        s.settimeout(0.3)  # each byte comes well within any per-recv timeout
        started = time.monotonic()
        received = b""
        for byte in frame:
            try:
                s.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            received += chunk
            if not chunk:
                break
            assert time.monotonic() - started < 10, "keystored never cut the trickling sender"
        elapsed = time.monotonic() - started
        s.settimeout(5)
        try:
            while chunk := s.recv(4096):
                received += chunk
        except ConnectionResetError:  # bytes we sent after the cut were never read
            pass
    (length,) = struct.unpack(">I", received[:4])
    reply = msgpack.unpackb(received[4:4 + length])
    assert _error(reply) == ("EPROTO", "frame not completed within 1.5 s of its first byte")
    assert 1.4 < elapsed < 6
    with daemon.client() as ks:
        ks.ping()


def _hold_connections(socket_path: str, count: int, ready_w: int, release_r: int) -> dict:
    """In a child of another uid: open ``count`` connections, say how each
    was received, and keep the admitted ones open until released."""
    held, refused = [], []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(socket_path)
        body = msgpack.packb({"v": 1, "op": "ping"})
        try:
            s.sendall(struct.pack(">I", len(body)) + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at accept: the EBUSY frame is already waiting
        head = s.recv(4, socket.MSG_WAITALL)
        reply = msgpack.unpackb(s.recv(struct.unpack(">I", head)[0], socket.MSG_WAITALL))
        if reply["ok"]:
            held.append(s)
        else:
            refused.append(reply["error"]["message"])
            s.close()
    os.write(ready_w, b"r")
    os.read(release_r, 1)
    return {"held": len(held), "refused": len(refused), "message": refused[0] if refused else ""}


@needs_root
def test_another_uid_holding_hundreds_of_connections_cannot_stop_an_allowed_uids_derive(keystored, helpers):
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    result: dict = {}
    attacker = threading.Thread(target=lambda: result.update(helpers.run_as_uid(
        NOBODY, lambda: _hold_connections(keystored.socket, 300, ready_w, release_r))))
    attacker.start()
    try:
        assert os.read(ready_r, 1) == b"r"
        with KeystoreClient(keystored.socket, timeout=5) as ks:  # root is on the allow list
            assert len(ks.derive("statefs.data")) == 32
            assert len(ks.sign("statefs.sb", b"m")) == 64
    finally:
        os.write(release_w, b"x")
        attacker.join(30)
        for fd in (ready_r, ready_w, release_r, release_w):
            os.close(fd)
    assert result["held"] == 64 and result["refused"] == 236
    assert "hold all 64 connections" in result["message"]
    assert keystored.wait_log_events("connection_refused", 1)


@needs_root
def test_one_uid_over_its_own_cap_gets_ebusy_while_another_uid_is_served(launcher, helpers):
    daemon = launcher.start("--allow", f"{NOBODY}:app.*", "--allow", "0:statefs.*",
                            "--max-connections-per-uid", "5")
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    result: dict = {}
    other = threading.Thread(target=lambda: result.update(helpers.run_as_uid(
        NOBODY, lambda: _hold_connections(daemon.socket, 8, ready_w, release_r))))
    other.start()
    try:
        assert os.read(ready_r, 1) == b"r"
        with daemon.client() as ks:
            assert len(ks.derive("statefs.data")) == 32
    finally:
        os.write(release_w, b"x")
        other.join(30)
        for fd in (ready_r, ready_w, release_r, release_w):
            os.close(fd)
    assert result == {"held": 5, "refused": 3,
                      "message": f"uid {NOBODY} already holds 5 connections to keystored, the limit per uid"}
