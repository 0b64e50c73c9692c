"""Where statefsd gets its payload key: keystored, never the disk."""

from __future__ import annotations

from statefsd.storage import format as fmt
from statefsd.storage.image import KeyProvider
from statefsd.errors import KeyUnavailable


def keystore_key_provider(socket_path: str | None) -> KeyProvider:
    """A key provider asking keystored at ``socket_path`` for the image's
    payload key (label format.RECORD_KEY_LABEL, context uuid || salt)."""

    def provide(sb: fmt.Superblock) -> bytes:
        if not socket_path:
            raise KeyUnavailable("the image is encrypted and no keystored was given",
                                 hint="start keystored and pass --keystore-socket")
        from keystored.client import KeystoreClient
        with KeystoreClient(socket_path) as client:
            return client.derive(fmt.RECORD_KEY_LABEL, fmt.record_key_context(sb))

    return provide


def encryption_banner(sb: fmt.Superblock) -> str:
    """The exact startup line the QEMU markers look for."""
    if sb.encryption == fmt.ENCRYPTION_OFF:
        return "statefsd: encryption off"
    return f"statefsd: encryption on ({fmt.ENCRYPTION_NAMES[sb.encryption]})"


class KeystoreSigner:
    """The device's Ed25519 key, used through keystored: the private key
    never leaves it. The public key is fetched once, at start."""

    def __init__(self, socket_path: str) -> None:
        from keystored.client import KeystoreClient
        self._client = KeystoreClient(socket_path)
        self.public_key = self._client.public_key()

    def sign(self, label: str, message: bytes) -> bytes:
        return self._client.sign(label, message)

    def derive(self, label: str, context: bytes, length: int = 32) -> bytes:
        return self._client.derive(label, context, length)
