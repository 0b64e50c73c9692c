"""The device identity: a root secret for HKDF and a separate Ed25519 key.

The two secrets are independent random draws: knowing one tells nothing
about the other, and neither is ever used as an AEAD key.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keystored import domain, entropy
from statefsd.shared import signing

ROOT_SECRET_LEN = 32
SIGNING_SEED_LEN = 32
SECRETS_LEN = ROOT_SECRET_LEN + SIGNING_SEED_LEN


class Identity:
    """Holds the secrets; hands out only derived keys, signatures and the public key."""

    def __init__(self, root_secret: bytes, signing_seed: bytes) -> None:
        if len(root_secret) != ROOT_SECRET_LEN or len(signing_seed) != SIGNING_SEED_LEN:
            raise ValueError("root secret and signing seed must be 32 bytes each")
        self._root = bytes(root_secret)
        self._seed = bytes(signing_seed)
        self._signer = Ed25519PrivateKey.from_private_bytes(self._seed)
        self.public_key = self._signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> "Identity":
        """A fresh identity from the kernel CRNG (EntropyNotReady if unseeded)."""
        raw = entropy.random_bytes(SECRETS_LEN)
        return cls(raw[:ROOT_SECRET_LEN], raw[ROOT_SECRET_LEN:])

    @classmethod
    def from_secrets(cls, secrets: bytes) -> "Identity":
        return cls(secrets[:ROOT_SECRET_LEN], secrets[ROOT_SECRET_LEN:])

    def secrets(self) -> bytes:
        """Root secret || signing seed: only for the key file, never for the wire."""
        return self._root + self._seed

    def derive(self, label: str, context: bytes, length: int) -> bytes:
        info = domain.derive_info(label, context, length)
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(self._root)

    def sign(self, label: str, message: bytes) -> bytes:
        return self._signer.sign(signing.sign_payload(label, message))
