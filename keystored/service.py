"""Request handling: validate a decoded request, check access, answer it.

Knows nothing about sockets; server.py feeds it decoded maps plus the
peer's kernel-reported credentials and sends back what it returns.
"""

from __future__ import annotations

import os
import sys
import threading

from keystored import domain, entropy, keyfile, protocol
from keystored.identity import Identity
from keystored.policy import AccessList
from statefsd.errors import AccessDenied, EntropyNotReady, InvalidArgument, ProtocolError
from statefsd.shared import signing
from statefsd.shared.audit import AuditLog
from statefsd.shared.unixrpc import Peer, excerpt

ENTROPY_POLL_SECONDS = 1.0


def _fields(request: dict, required: dict[str, type], optional: dict[str, tuple[type, object]]) -> dict:
    """The op's arguments, type-checked; unknown fields are refused, not ignored."""
    unknown = set(request) - {"v", "op"} - set(required) - set(optional)
    if unknown:
        raise InvalidArgument(f"unknown field(s) for op {request['op']!r}: {excerpt(sorted(map(str, unknown)))}")
    out = {}
    for name, kind in required.items():
        if name not in request:
            raise InvalidArgument(f"op {request['op']!r} needs field {name!r}")
        out[name] = request[name]
    for name, (kind, default) in optional.items():
        out[name] = request.get(name, default)
    for name, value in out.items():
        kind = required[name] if name in required else optional[name][0]
        # bool is an int subclass in Python; a msgpack true is not a length.
        if type(value) is not kind:
            raise InvalidArgument(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return out


class Keystore:
    """The identity (once there is one) and the rules for handing out its products."""

    def __init__(self, state_dir: keyfile.StateDir, passphrase: bytes | None, access: AccessList,
                 audit: AuditLog) -> None:
        self._state_dir = state_dir
        self.key_path = state_dir.key_path
        self._passphrase = passphrase
        self._access = access
        self._audit = audit
        self._identity: Identity | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # --- identity lifecycle -------------------------------------------------

    def open(self) -> bool:
        """Load the key file, or create the identity. False if entropy is not ready yet.

        A damaged file or wrong passphrase raises: keys are never regenerated
        over an existing file.
        """
        data = self._state_dir.read_key()
        if data is not None:
            identity, sealed = keyfile.decode(data, self._passphrase, where=self.key_path)
            mode = os.stat(keyfile.FILE_NAME, dir_fd=self._state_dir.fd, follow_symlinks=False).st_mode & 0o777
            if mode & 0o077:
                self._audit.event("warning", message=f"{self.key_path} has mode {mode:o}; it should be 600")
            if self._passphrase and not sealed:
                self._audit.event("warning", message=f"{self.key_path} is not sealed; the passphrase is unused")
            self._set(identity, "identity_loaded", sealed=sealed)
            return True
        return self._try_create()

    def _try_create(self) -> bool:
        try:
            identity = Identity.generate()
            data = keyfile.encode(identity, self._passphrase)
        except EntropyNotReady:
            return False
        self._state_dir.write_key(data)
        if self._passphrase is None:
            # Say it where a person starting keystored reads it, not only in the log.
            message = (f"{self.key_path} is written unsealed: anyone who can read it has the "
                       "device keys; to seal it, set STATEFS_KEY_PASSPHRASE (or --passphrase-env VAR) "
                       "before the first start")
            print(f"keystored: warning: {message}", file=sys.stderr, flush=True)
            self._audit.event("warning", message=message)
        self._set(identity, "identity_created", sealed=self._passphrase is not None)
        return True

    def _set(self, identity: Identity, event: str, sealed: bool) -> None:
        with self._lock:
            self._identity = identity
        self._audit.event(event, key_file=self.key_path, sealed=sealed, public_key=identity.public_key.hex())

    def wait_for_entropy(self) -> None:
        """Background: create the identity as soon as the kernel CRNG is seeded."""
        def poll() -> None:
            while not self._stop.wait(ENTROPY_POLL_SECONDS):
                if self._try_create():
                    return
        threading.Thread(target=poll, name="entropy-wait", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def _require_identity(self) -> Identity:
        with self._lock:
            identity = self._identity
        if identity is None:
            raise EntropyNotReady(entropy.NOT_READY_MESSAGE)
        return identity

    # --- requests -----------------------------------------------------------

    def handle(self, request: dict, peer: Peer) -> dict:
        version = request.get("v")
        if type(version) is not int or version != protocol.PROTOCOL_VERSION:
            raise ProtocolError(f"unsupported protocol version {excerpt(version)}; "
                                f"keystored speaks v{protocol.PROTOCOL_VERSION}")
        op = request.get("op")
        handler = self._OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            raise ProtocolError(f"unknown op {excerpt(op)}; known ops: {', '.join(sorted(self._OPS))}")
        return handler(self, request, peer)

    def _hello(self, request: dict, peer: Peer) -> dict:
        _fields(request, {}, {})
        return protocol.ok_reply(protocol=protocol.PROTOCOL_VERSION, server="keystored", uid=peer.uid,
                             identity_ready=self._identity is not None)

    def _ping(self, request: dict, peer: Peer) -> dict:
        _fields(request, {}, {})
        return protocol.ok_reply(protocol=protocol.PROTOCOL_VERSION)

    def _public_key(self, request: dict, peer: Peer) -> dict:
        _fields(request, {}, {})
        return protocol.ok_reply(public_key=self._require_identity().public_key)

    def _derive(self, request: dict, peer: Peer) -> dict:
        args = _fields(request, {"label": str}, {"context": (bytes, b""), "length": (int, 32)})
        domain.derive_info(args["label"], args["context"], args["length"])  # validate before access check
        self._authorize("derive", args["label"], peer)
        return protocol.ok_reply(key=self._require_identity().derive(args["label"], args["context"], args["length"]))

    def _sign(self, request: dict, peer: Peer) -> dict:
        args = _fields(request, {"label": str, "message": bytes}, {})
        signing.check_label(args["label"])
        self._authorize("sign", args["label"], peer)
        return protocol.ok_reply(signature=self._require_identity().sign(args["label"], args["message"]))

    def _authorize(self, op: str, label: str, peer: Peer) -> None:
        if self._access.allows(peer.uid, label):
            return
        self._audit.event("access_denied", op=op, label=label, pid=peer.pid, uid=peer.uid, gid=peer.gid)
        raise AccessDenied(f"uid {peer.uid} may not {op} with label {label!r} "
                           "(keystored --allow UID:LABEL grants it)")

    _OPS = {"hello": _hello, "ping": _ping, "public_key": _public_key, "derive": _derive, "sign": _sign}
