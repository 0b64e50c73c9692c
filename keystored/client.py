"""Client for keystored, used by statefsd and tools.

    with KeystoreClient("/run/statefs/keystored.sock") as ks:
        key = ks.derive("statefs.data", context=device_uuid)

One connection, reused; every op is idempotent (HKDF and Ed25519 are
deterministic), so a call that finds the connection dropped (keystored
restarted) reconnects once and repeats itself.
"""

from __future__ import annotations

import socket
import threading
import time

from keystored import protocol
from statefsd.shared import unixrpc
from statefsd.errors import KeyUnavailable, ProtocolError, StateFSError
from statefsd.shared.signing import PUBLIC_KEY_LEN, SIGNATURE_LEN, verify_signature

__all__ = ["KeystoreClient", "verify_signature"]


class KeystoreClient:
    def __init__(self, socket_path: str, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: unixrpc.FrameReader | None = None
        self._lock = threading.Lock()

    # --- ops ----------------------------------------------------------------

    def derive(self, label: str, context: bytes = b"", length: int = 32) -> bytes:
        key = self._call("derive", "key", label=label, context=context, length=length)
        return self._check_bytes(key, length, "derived key")

    def sign(self, label: str, message: bytes) -> bytes:
        return self._check_bytes(self._call("sign", "signature", label=label, message=message),
                                 SIGNATURE_LEN, "signature")

    def public_key(self) -> bytes:
        return self._check_bytes(self._call("public_key", "public_key"), PUBLIC_KEY_LEN, "public key")

    def ping(self) -> int:
        return self._call("ping", "protocol")

    def hello(self) -> dict:
        with self._lock:
            return self._request({"v": protocol.PROTOCOL_VERSION, "op": "hello"})

    # --- plumbing -----------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> "KeystoreClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, op: str, field: str, **args: object) -> object:
        with self._lock:
            reply = self._request({"v": protocol.PROTOCOL_VERSION, "op": op, **args})
        if field not in reply:
            raise ProtocolError(f"keystored reply to {op!r} lacks {field!r}")
        return reply[field]

    def _request(self, request: dict) -> dict:
        frame = protocol.ENDPOINT.pack(request)
        for attempt in (1, 2):
            reused = self._sock is not None
            if not reused:
                self._sock = self._connect()
                self._reader = unixrpc.FrameReader(self._sock, protocol.ENDPOINT)
            try:
                self._sock.sendall(frame)
                body = self._reader.read()
                if body is None:
                    raise ConnectionResetError("keystored closed the connection")
            except TimeoutError:
                self._drop()
                raise KeyUnavailable(f"keystored at {self.socket_path} did not answer "
                                     f"within {self.timeout:g}s") from None
            except ProtocolError:
                self._drop()
                raise
            except OSError as exc:
                self._drop()
                if reused and attempt == 1:
                    continue  # stale connection from before a keystored restart
                raise KeyUnavailable(f"lost connection to keystored at {self.socket_path}: {exc}") from None
            return self._parse(body)
        raise AssertionError("unreachable")  # pragma: no cover

    def _parse(self, body: bytes) -> dict:
        reply = protocol.ENDPOINT.decode(body)
        ok = reply.get("ok")
        if reply.get("v") != protocol.PROTOCOL_VERSION or type(ok) is not bool:
            raise ProtocolError(f"keystored at {self.socket_path} sent a reply that is not protocol v1")
        if not ok:
            error = reply.get("error")
            if not isinstance(error, dict):
                raise ProtocolError("keystored error reply lacks an error map")
            raise StateFSError.from_wire(error)
        return reply

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
                return sock
            except BlockingIOError:
                # Listen backlog full (a burst of clients): wait our turn, within the timeout.
                sock.close()
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                raise KeyUnavailable(f"keystored at {self.socket_path} is not accepting connections "
                                     f"(backlog full for {self.timeout:g}s)") from None
            except OSError as exc:
                sock.close()
                reason = exc.strerror or str(exc)
                raise KeyUnavailable(f"cannot reach keystored at {self.socket_path}: {reason}") from None

    def _drop(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None

    @staticmethod
    def _check_bytes(value: object, length: int, what: str) -> bytes:
        if type(value) is not bytes or len(value) != length:
            raise ProtocolError(f"keystored sent a malformed {what}")
        return value
