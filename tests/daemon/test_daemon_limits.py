"""statefsd's limits against hostile clients (docs/protocol.md, "Limits"),
on a real daemon: bounded error replies, a decode budget, whole-frame and
idle deadlines, connection caps per uid, and running out of descriptors."""

from __future__ import annotations

import os
import resource
import socket
import struct
import threading
import time

import msgpack
import pytest

from statefsd.client import Client
from statefsd.protocol import MAX_FRAME, MAX_FRAME_OBJECTS
from tests.daemon.harness import RawConnection
from tests.keystored.conftest import run_as_uid

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 65534 needs root")


def _error(reply: dict) -> tuple[str, str]:
    assert reply["ok"] is False, reply
    return reply["error"]["name"], reply["error"]["message"]


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_an_unknown_op_of_2_5_MB_gets_a_short_eproto_and_the_connection_keeps_working(daemon):
    conn = RawConnection(daemon.socket)
    try:
        reply = conn.request("\x01" * 2_500_000, request_id=7)  # its repr alone would be 10 MB
        assert reply["id"] == 7
        name, message = _error(reply)
        assert name == "EPROTO" and message.startswith("unknown op '\\x01") and len(message) < 200
        assert conn.request("hello", request_id=8)["ok"] is True
    finally:
        conn.close()


def test_a_frame_of_millions_of_empty_maps_is_refused_without_growing_the_daemon(daemon):
    head = msgpack.packb({"v": 1, "id": 3, "op": "hello"})
    count = MAX_FRAME - len(head) - 9
    body = bytes([head[0] + 1]) + head[1:] + b"\xa3pad\xdd" + struct.pack(">I", count) + b"\x80" * count
    assert len(body) == MAX_FRAME
    before = _peak_rss_mib(daemon.proc.pid)
    conn = RawConnection(daemon.socket)
    try:
        conn.send_body(body)
        name, message = _error(conn.receive())
        assert name == "EPROTO" and f"more than {MAX_FRAME_OBJECTS} msgpack objects" in message
        assert conn.request("hello", request_id=4)["ok"] is True
    finally:
        conn.close()
    grown = _peak_rss_mib(daemon.proc.pid) - before
    assert grown < 50, f"peak RSS grew by {grown:.0f} MiB"


def test_a_sender_trickling_bytes_is_cut_at_the_frame_deadline_but_a_slow_transaction_is_not(ws):
    daemon = ws.start(extra=["--frame-deadline", "1.5", "--idle-deadline", "1.5"])
    patient = RawConnection(daemon.socket)
    assert patient.request("begin", request_id=1)["ok"] is True
    trickler = RawConnection(daemon.socket)
    frame = struct.pack(">I", 30) + msgpack.packb({"v": 1, "id": 9, "op": "hello", "pad": b"x" * 10})
    trickler.sock.settimeout(0.25)
    started = time.monotonic()
    received = b""
    for i, byte in enumerate(frame):  # every gap is short, the whole frame is not
        try:
            trickler.sock.send(bytes([byte]))
            received += trickler.sock.recv(4096)
            break
        except (TimeoutError, BlockingIOError):
            pass
        except (BrokenPipeError, ConnectionResetError):
            break
        if i % 2 == 0:  # the transaction pauses about 0.5 s between requests, longer than the idle deadline in all
            assert patient.request("txn_put", request_id=2 + i, key=f"slow/{i}", value=b"v")["ok"] is True
    elapsed = time.monotonic() - started
    trickler.sock.settimeout(5)
    try:
        while chunk := trickler.sock.recv(4096):
            received += chunk
    except ConnectionResetError:  # bytes sent after the cut were never read
        pass
    (length,) = struct.unpack(">I", received[:4])
    reply = msgpack.unpackb(received[4:4 + length])
    assert reply["id"] is None
    assert _error(reply) == ("EPROTO", "frame not completed within 1.5 s of its first byte")
    assert 1.4 < elapsed < 6
    assert patient.request("commit", request_id=99)["ok"] is True
    with daemon.client() as client:
        assert client.list("slow/")
    started = time.monotonic()
    patient.sock.settimeout(10)
    assert patient.at_eof()  # silent past the idle deadline: closed
    assert 1 < time.monotonic() - started < 4
    patient.close()
    trickler.close()


@needs_root
def test_one_uid_at_its_connection_cap_gets_ebusy_while_another_uid_is_served(ws):
    daemon = ws.start(extra=["--max-connections", "6", "--max-connections-per-uid", "3"])
    os.chmod(os.path.dirname(daemon.socket), 0o755)
    os.chmod(daemon.socket, 0o666)  # let uid 65534 reach the socket at all
    held = [RawConnection(daemon.socket) for _ in range(3)]
    try:
        for i, conn in enumerate(held):
            assert conn.request("hello", request_id=i)["ok"] is True
        over = RawConnection(daemon.socket)
        reply = over.receive()  # answered at accept, before any request
        assert reply["id"] is None and _error(reply) == (
            "EBUSY", f"uid {os.getuid()} already holds 3 connections to statefsd, the limit per uid")
        assert "close idle connections" in reply["error"]["hint"]
        assert over.at_eof()
        over.close()

        def hello_as_other_uid() -> bool:
            conn = RawConnection(daemon.socket)
            try:
                return conn.request("hello", request_id=1)["ok"]
            finally:
                conn.close()
        assert run_as_uid(NOBODY, hello_as_other_uid) is True
    finally:
        for conn in held:
            conn.close()
    refused = [e for e in daemon.audit_events() if e["event"] == "connection_refused"]
    assert refused and refused[0]["fields"]["uid"] == os.getuid()


def test_out_of_descriptors_clients_get_ebusy_and_the_log_says_so_once(ws):
    limit = 48

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    daemon = ws.start(extra=["--max-connections", "500"], preexec_fn=few_descriptors)
    outcomes: list[str] = []
    conns = []
    try:
        for i in range(2 * limit):
            conn = RawConnection(daemon.socket)
            conns.append(conn)
            conn.sock.settimeout(5)
            try:
                reply = conn.request("hello", request_id=i)
            except (BrokenPipeError, ConnectionResetError):
                reply = conn.receive()  # refused at accept: its answer is waiting
            outcomes.append("ok" if reply["ok"] else reply["error"]["message"])
        time.sleep(1)  # let a flood of log lines, were there one, pile up
    finally:
        for conn in conns:
            conn.close()
    assert "ok" in outcomes
    assert set(outcomes) == {"ok", "statefsd is out of file descriptors"}
    stderr = "\n".join(daemon.stderr)
    assert "Traceback" not in stderr
    assert stderr.count("accept failed") <= 2
    with daemon.client() as client:  # descriptors are back: served again
        assert client.hello()["ok"] is True


def test_a_client_idle_past_the_deadline_reconnects_quietly_on_its_next_call(ws):
    daemon = ws.start(extra=["--idle-deadline", "0.5"])
    with daemon.client() as client:
        client.put("idle/a", b"1")
        time.sleep(1.2)  # the daemon closes the idle connection meanwhile
        assert client.get("idle/a") == b"1"


def test_a_client_with_a_timeout_sends_its_next_request_at_once(ws):
    """The check for an idle close must not wait out the socket's timeout."""
    daemon = ws.start()
    with Client(daemon.socket, timeout=5) as client:
        client.put("quick/a", b"1")
        began = time.monotonic()
        assert client.get("quick/a") == b"1"
        assert time.monotonic() - began < 1.0
