"""keystored's process: command line, key loading, the Unix socket, signals.

A selector loop accepts, one thread serves each connection; every request is
answered by service.Keystore. See docs/keystored.md for the protocol.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import selectors
import signal
import socket
import sys
import threading

from keystored import entropy, keyfile, policy, protocol
from keystored.service import Keystore
from statefsd.shared import unixrpc
from statefsd.shared.audit import AuditLog
from statefsd.shared.sdnotify import sd_notify
from statefsd.shared.unixrpc import Peer
from statefsd.errors import (
    Busy, DeviceIOError, InternalError, InvalidArgument, ProtocolError, StateFSError, UsageError, WrongPassphrase,
)

DEFAULT_PASSPHRASE_ENV = "STATEFS_KEY_PASSPHRASE"
LOCK_NAME = "keystored.lock"
_MAX_SUN_PATH = 107


def _allow(spec: str) -> tuple[int, list[str]]:
    try:
        return policy.parse_allow(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keystored", description="StateFS key daemon (docs/keystored.md).")
    p.add_argument("--state-dir", required=True, help="directory holding the key file (created 0700)")
    p.add_argument("--socket", required=True, help="Unix socket path to listen on")
    p.add_argument("--allow", action="append", type=_allow, default=[], metavar="UID:LABEL[,LABEL...]",
                   help="let UID derive/sign with these labels; a trailing * matches a prefix "
                        "(default: our own uid, statefs.*)")
    p.add_argument("--passphrase-env", metavar="VAR",
                   help=f"seal the key file with the passphrase in $VAR (default: ${DEFAULT_PASSPHRASE_ENV} if set)")
    p.add_argument("--log", metavar="FILE", help="append JSON log lines here instead of stderr")
    protocol.ENDPOINT.add_limit_flags(p, "frame_deadline", "max_connections", "max_connections_per_uid",
                                      "max_connections_others")
    return p


def read_passphrase(var: str | None) -> bytes | None:
    explicit = var is not None
    name = var or DEFAULT_PASSPHRASE_ENV
    value = os.environb.get(os.fsencode(name))
    if value is None:
        if explicit:
            raise WrongPassphrase(f"--passphrase-env {name}: environment variable {name} is not set")
        return None
    if not value:
        raise WrongPassphrase(f"environment variable {name} is set but empty")
    return value


def lock_state_dir(state_dir: keyfile.StateDir) -> int:
    """Hold an exclusive lock for our lifetime: two daemons must never race to create keys."""
    fd = state_dir.open(LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(f"another keystored holds {state_dir.path}") from None
    return fd


class Listener:
    """The listening socket and one thread per admitted connection.

    Connections are admitted at accept against the endpoint's caps, uids on
    the allow list being trusted (docs/keystored.md, "Limits"): whoever else
    connects, allowed uids keep getting service.
    """

    def __init__(self, path: str, keystore: Keystore, audit: AuditLog, endpoint: unixrpc.Endpoint,
                 trusted: set[int]) -> None:
        self.path = path
        self.keystore = keystore
        self.audit = audit
        self.endpoint = endpoint
        self._trusted = trusted
        self._acceptor: unixrpc.Acceptor | None = None

    def bind(self) -> None:
        bound = self.endpoint.listen(self.path)
        bound.sock.setblocking(False)
        self._acceptor = unixrpc.Acceptor(bound, unixrpc.ConnectionTable(self.endpoint, self._trusted),
                                          self.audit.event)

    def serve(self, wakeup_fd: int, stop: threading.Event) -> None:
        """Accept until ``stop`` is set; signals wake us through ``wakeup_fd`` (no polling)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._acceptor.bound.sock, selectors.EVENT_READ)
            selector.register(wakeup_fd, selectors.EVENT_READ)
            while not stop.is_set():
                for key, _ in selector.select():
                    if key.fileobj == wakeup_fd:
                        os.read(wakeup_fd, 512)
                    else:
                        self._accept()

    def _accept(self) -> None:
        admitted = self._acceptor.accept()
        if admitted is None:
            return
        conn, peer = admitted
        try:
            threading.Thread(target=self._serve_connection, args=(conn, peer), daemon=True).start()
        except RuntimeError:  # cannot start a thread: refuse this one, keep serving
            self._acceptor.release(peer)
            conn.close()

    def _serve_connection(self, conn: socket.socket, peer: Peer) -> None:
        try:
            with conn:
                reader = unixrpc.FrameReader(conn, self.endpoint, frame_deadline=self.endpoint.frame_deadline,
                                             idle_deadline=self.endpoint.idle_deadline)
                try:
                    self._converse(conn, reader, peer)
                finally:
                    reader.close()
        except Exception as exc:  # a bug must cost one connection, not the daemon
            self.audit.event("internal_error", error=repr(exc))
        finally:
            self._acceptor.release(peer)

    def _converse(self, conn: socket.socket, reader: unixrpc.FrameReader, peer: Peer) -> None:
        while True:
            try:
                body = reader.read()
            except ProtocolError as exc:  # stream out of sync or frame too slow: answer, then hang up
                self._report(peer, exc)
                _send(conn, protocol.error_reply(exc))
                return
            except OSError:
                return
            if body is None:
                return
            try:
                reply = self.keystore.handle(self.endpoint.decode(body), peer)
            except StateFSError as exc:
                if isinstance(exc, (InvalidArgument, ProtocolError)):
                    self._report(peer, exc)  # refusals are logged where they are decided
                reply = protocol.error_reply(exc)
            except Exception as exc:  # a bug must cost one request, not the connection
                self.audit.event("internal_error", error=repr(exc), pid=peer.pid, uid=peer.uid)
                reply = protocol.error_reply(InternalError("internal error in keystored; see its log"))
            if not _send(conn, reply):
                return

    def _report(self, peer: Peer, exc: StateFSError) -> None:
        self.audit.event("bad_request", code=exc.code.name, message=exc.message,
                         pid=peer.pid, uid=peer.uid, gid=peer.gid)

    def close(self) -> None:
        """Stop listening and remove the socket, unless someone else has replaced it."""
        if self._acceptor is not None:
            self._acceptor.bound.close()
            self._acceptor.close()


def _send(sock: socket.socket, reply: dict) -> bool:
    try:
        sock.sendall(protocol.ENDPOINT.pack(reply))
        return True
    except OSError:
        return False


def _run(args: argparse.Namespace, audit: AuditLog) -> int:
    if len(os.fsencode(args.socket)) > _MAX_SUN_PATH:
        raise UsageError(f"--socket path is longer than {_MAX_SUN_PATH} bytes: {args.socket}")
    access = policy.AccessList.from_allows(args.allow)
    passphrase = read_passphrase(args.passphrase_env)
    # Everything that can refuse the socket is checked before a key is
    # created: a start that fails must not leave a new identity behind.
    protocol.ENDPOINT.check_socket_path(args.socket)
    state_dir = keyfile.StateDir(args.state_dir)
    lock_fd = lock_state_dir(state_dir)
    keystore = Keystore(state_dir, passphrase, access, audit)
    if not keystore.open():
        print(f"keystored: warning: {entropy.NOT_READY_MESSAGE}", file=sys.stderr, flush=True)
        audit.event("entropy_not_ready", message=entropy.NOT_READY_MESSAGE)
        keystore.wait_for_entropy()

    stop = threading.Event()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    listener = Listener(args.socket, keystore, audit, protocol.ENDPOINT.with_limits(args), set(access.rules))

    def warn(message: str) -> None:
        audit.event("warning", message=message)

    try:
        listener.bind()
        audit.event("listening", socket=args.socket, pid=os.getpid(), allow=access.describe())
        sd_notify("READY=1", warn)
        print("keystored: ready", file=sys.stderr, flush=True)
        listener.serve(wake_r, stop)
        sd_notify("STOPPING=1", warn)
    finally:
        listener.close()
        keystore.close()
        os.close(lock_fd)
        state_dir.close()
    audit.event("stopped", socket=args.socket)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    audit = AuditLog(None, component="keystored", stream=sys.stderr)
    try:
        audit = AuditLog(args.log, component="keystored", option="--log", stream=sys.stderr)
        return _run(args, audit)
    except StateFSError as exc:
        print(f"keystored: error: {exc}", file=sys.stderr)
        hint = exc.details.get("hint") or exc.hint
        if hint:
            print(f"keystored: hint: {hint}", file=sys.stderr)
        if audit.is_file:
            audit.event("fatal", code=exc.code.name, message=exc.message)
        return int(exc.code)
    except OSError as exc:  # e.g. state dir not writable: say which path and why
        print(f"keystored: error: {exc}", file=sys.stderr)
        if audit.is_file:
            audit.event("fatal", code="EIO", message=str(exc))
        return int(DeviceIOError.code)
    finally:
        audit.close()


if __name__ == "__main__":
    raise SystemExit(main())
