"""The socket protocol: bad input gets clear errors and never takes keystored down."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

import msgpack
import pytest

from keystored.client import KeystoreClient
from statefsd.errors import Code, KeyUnavailable


def _error(reply: dict | None) -> tuple[str, str]:
    assert reply is not None, "keystored closed the connection instead of answering"
    assert reply["v"] == 1 and reply["ok"] is False
    err = reply["error"]
    assert err["code"] == Code[err["name"]]
    return err["name"], err["message"]


def test_hello_and_ping_report_the_protocol_version(shared_keystored, helpers):
    hello, ping = helpers.exchange(shared_keystored.socket, helpers.request(v=1, op="hello"),
                                   helpers.request(v=1, op="ping"))
    assert hello == {"v": 1, "ok": True, "protocol": 1, "server": "keystored", "uid": 0, "identity_ready": True}
    assert ping == {"v": 1, "ok": True, "protocol": 1}


def test_malformed_frames_get_eproto_and_the_connection_keeps_working(shared_keystored, helpers):
    f, r = helpers.frame, helpers.request
    replies = helpers.exchange(
        shared_keystored.socket,
        f(b""),                                     # empty body
        f(b"\xc1"),                                 # reserved msgpack byte
        f(msgpack.packb([1, "derive"])),            # not a map
        f(msgpack.packb({"v": 1, "op": "ping"}) + b"\x00"),  # trailing bytes
        f(b"\x81\xa2op\xa4pi"),                     # truncated msgpack
        r(v=1, op="ping"),
    )
    for reply in replies[:-1]:
        assert _error(reply)[0] == "EPROTO"
    assert "not valid msgpack" in _error(replies[1])[1]
    assert "must hold a msgpack map" in _error(replies[2])[1]
    assert replies[-1]["ok"] is True


def test_oversize_frame_is_refused_and_only_that_connection_is_closed(shared_keystored, helpers):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(shared_keystored.socket)
        s.sendall(struct.pack(">I", 64 * 1024 + 1))
        header = s.recv(4, socket.MSG_WAITALL)
        reply = msgpack.unpackb(s.recv(struct.unpack(">I", header)[0], socket.MSG_WAITALL))
        assert _error(reply) == ("EPROTO", "frame length 65537 exceeds the 65536-byte cap")
        assert s.recv(1) == b""  # hung up: the stream cannot be resynced
    big = helpers.request(v=1, op="sign", label="statefs.sb", message=b"x" * 60000)
    assert helpers.exchange(shared_keystored.socket, big)[0]["ok"] is True


@pytest.mark.parametrize("version", [2, 0, "1", True, None, 1.0])
def test_unknown_protocol_version_is_refused_with_eproto(shared_keystored, helpers, version):
    fields = {"op": "ping"} if version is None else {"v": version, "op": "ping"}
    name, message = _error(helpers.exchange(shared_keystored.socket, helpers.request(**fields))[0])
    assert name == "EPROTO" and "unsupported protocol version" in message


@pytest.mark.parametrize(
    "fields, name, words",
    [
        ({"op": "explode"}, "EPROTO", "unknown op 'explode'"),
        ({"op": 7}, "EPROTO", "unknown op 7"),
        ({}, "EPROTO", "unknown op None"),
        ({"op": "derive"}, "EINVAL", "needs field 'label'"),
        ({"op": "derive", "label": b"statefs.data"}, "EINVAL", "'label' must be str"),
        ({"op": "derive", "label": "statefs.data", "context": "text"}, "EINVAL", "'context' must be bytes"),
        ({"op": "derive", "label": "statefs.data", "length": True}, "EINVAL", "'length' must be int"),
        ({"op": "derive", "label": "statefs.data", "length": 8}, "EINVAL", "length must be 16..64"),
        ({"op": "derive", "label": "statefs.data", "length": 1 << 40}, "EINVAL", "length must be 16..64"),
        ({"op": "derive", "label": ""}, "EINVAL", "label must be 1..128"),
        ({"op": "derive", "label": "statefs.\x00x"}, "EINVAL", "may only contain"),
        ({"op": "derive", "label": "statefs.data", "extra": 1}, "EINVAL", "unknown field"),
        ({"op": "sign", "label": "statefs.sb"}, "EINVAL", "needs field 'message'"),
        ({"op": "sign", "label": "statefs.sb", "message": "text"}, "EINVAL", "'message' must be bytes"),
        ({"op": "public_key", "label": "x"}, "EINVAL", "unknown field"),
    ],
)
def test_bad_requests_get_clear_errors(shared_keystored, helpers, fields, name, words):
    reply = helpers.exchange(shared_keystored.socket, helpers.request(v=1, **fields))[0]
    got_name, message = _error(reply)
    assert got_name == name and words in message


def test_bad_requests_are_logged_with_the_peer(keystored, helpers):
    helpers.exchange(keystored.socket, helpers.request(v=9, op="ping"))
    (event,) = keystored.wait_log_events("bad_request", 1)
    assert event["component"] == "keystored"
    fields = event["fields"]
    assert fields["code"] == "EPROTO" and fields["uid"] == os.getuid() and fields["pid"] > 0


def test_half_sent_frame_does_not_block_other_clients(shared_keystored):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
        stalled.connect(shared_keystored.socket)
        stalled.sendall(struct.pack(">I", 100) + b"\x81")  # promises 100 bytes, sends 1
        with shared_keystored.client(timeout=2) as ks:
            assert len(ks.derive("statefs.data")) == 32


def test_many_concurrent_clients_get_consistent_answers(shared_keystored):
    with shared_keystored.client() as ks:
        expected = {i: ks.derive("statefs.data", str(i).encode()) for i in range(8)}
    failures: list[str] = []

    def worker() -> None:
        try:
            with shared_keystored.client() as ks:
                for i in range(8):
                    if ks.derive("statefs.data", str(i).encode()) != expected[i]:
                        failures.append(f"wrong key for context {i}")
        except Exception as exc:  # surfaced by the assert below
            failures.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failures == []


def test_client_is_safe_to_share_between_threads(shared_keystored):
    ks = shared_keystored.client()
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(ks.derive("statefs.shared"))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 16 and len(set(results)) == 1


def test_sigterm_exits_cleanly_and_removes_the_socket(keystored):
    assert os.path.exists(keystored.socket)
    assert keystored.stop(signal.SIGTERM) == 0
    assert not os.path.exists(keystored.socket)
    assert keystored.log_events("stopped")


def test_readiness_is_announced_via_sd_notify(launcher, sock_dir):
    notify_path = os.path.join(sock_dir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(20)
        daemon = launcher.start(env={"NOTIFY_SOCKET": notify_path})
        assert notify.recv(256) == b"READY=1"
        daemon.stop()
        assert notify.recv(256) == b"STOPPING=1"


def test_second_keystored_on_the_same_state_dir_is_refused(keystored, launcher, sock_dir):
    other = launcher.fail(socket_path=os.path.join(sock_dir, "second.sock"))
    assert other.proc.returncode == Code.EBUSY
    assert "another keystored holds" in other.stderr
    with keystored.client() as ks:
        ks.ping()


def test_socket_of_a_live_keystored_is_not_stolen_and_no_key_is_created(keystored, launcher, tmp_path):
    other = launcher.fail(state_dir=tmp_path / "elsewhere")
    assert other.proc.returncode == Code.EBUSY
    assert "already listening" in other.stderr
    assert "is keystored already running? use its socket" in other.stderr
    assert not (tmp_path / "elsewhere" / "identity.key").exists()
    assert not other.log_events("identity_created")
    with keystored.client() as ks:
        ks.ping()


def test_stale_socket_of_a_killed_keystored_is_replaced(launcher):
    first = launcher.start()
    with first.client() as ks:
        public = ks.public_key()
    first.stop(signal.SIGKILL)
    assert os.path.exists(launcher.socket)  # left behind
    with launcher.start().client() as ks:
        assert ks.public_key() == public


def test_a_regular_file_at_the_socket_path_is_not_deleted(launcher):
    with open(launcher.socket, "w") as f:
        f.write("precious")
    refused = launcher.fail()
    assert refused.proc.returncode == Code.EINVAL
    assert "is not a socket" in refused.stderr
    assert open(launcher.socket).read() == "precious"


def test_client_reconnects_after_keystored_restarts(launcher):
    first = launcher.start()
    ks = KeystoreClient(launcher.socket)
    key = ks.derive("statefs.data")
    assert first.stop() == 0
    launcher.start()
    assert ks.derive("statefs.data") == key
    ks.close()


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + 5
    while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "keystored did not stop"
        time.sleep(0.01)


def test_client_times_out_with_key_unavailable_when_keystored_hangs(launcher):
    daemon = launcher.start()
    ks = daemon.client(timeout=0.5)
    ks.ping()
    daemon.proc.send_signal(signal.SIGSTOP)
    _wait_stopped(daemon.proc.pid)
    try:
        started = time.monotonic()
        with pytest.raises(KeyUnavailable) as err:
            ks.derive("statefs.data")
        assert err.value.code == Code.EKEY and "did not answer within 0.5s" in str(err.value)
        assert time.monotonic() - started < 3
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    ks.close()


def test_connections_over_the_limit_get_ebusy_and_others_keep_working(launcher, helpers):
    keystored = launcher.start("--max-connections", "16", "--max-connections-per-uid", "16")
    held = []
    try:
        for _ in range(16):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(keystored.socket)  # blocking: waits if the backlog is momentarily full
            s.settimeout(5)
            held.append(s)
        for s in held:  # each has its own thread now
            s.sendall(helpers.request(v=1, op="ping"))
        for s in held:
            assert s.recv(64)
        name, message = _error(helpers.exchange(keystored.socket, helpers.request(v=1, op="ping"))[0])
        assert name == "EBUSY" and "16 clients" in message
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the freed slot is released when its thread sees EOF
            reply = helpers.exchange(keystored.socket, helpers.request(v=1, op="ping"))[0]
            if reply["ok"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert reply["ok"] is True
    finally:
        for s in held:
            s.close()


def test_socket_in_a_missing_directory_is_einval_before_any_key_is_created(launcher, tmp_path):
    refused = launcher.fail(socket_path=os.path.join(launcher.sock_dir, "nodir", "k.sock"))
    assert refused.proc.returncode == Code.EINVAL
    assert "nodir does not exist" in refused.stderr and "mkdir -p" in refused.stderr
    assert not launcher.state_dir.joinpath("identity.key").exists()


def test_log_file_in_a_missing_directory_is_einval_before_any_key_is_created(launcher, tmp_path):
    refused = launcher.fail("--log", str(tmp_path / "nodir" / "keystored.log"))
    assert refused.proc.returncode == Code.EINVAL
    assert "nodir does not exist" in refused.stderr and "mkdir -p" in refused.stderr
    assert not launcher.state_dir.joinpath("identity.key").exists()
