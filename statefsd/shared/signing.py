"""Ed25519 signing with domain separation: the exact bytes keystored signs.

keystored signs with these bytes; the storage core (checkpoint replay),
fsck-statefs and the test rig verify or reproduce them with a stored public
key and no keystored at hand. Living here, below both, lets every side
import them without a cycle. Every byte string is documented in
docs/keystored.md; changing one invalidates every signature ever made, so
they are frozen for "v1".
"""

from __future__ import annotations

import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from statefsd.errors import InvalidArgument

SIGN_PREFIX = b"statefs/v1/sign\x00"

MAX_LABEL_LEN = 128
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64

# No NUL (the separator after the label) and nothing invisible, so a label
# always ends at the first NUL and reads the same in logs and access lists.
_LABEL_RE = re.compile(r"[A-Za-z0-9._:/-]+")


def check_label(label: object) -> bytes:
    """Return the label's bytes, or raise InvalidArgument saying what is wrong."""
    if not isinstance(label, str):
        raise InvalidArgument(f"label must be a string, not {type(label).__name__}")
    if not label or len(label) > MAX_LABEL_LEN:
        raise InvalidArgument(f"label must be 1..{MAX_LABEL_LEN} characters, got {len(label)}")
    if not _LABEL_RE.fullmatch(label):
        raise InvalidArgument(f"label {label!r} may only contain letters, digits and . _ : / -")
    return label.encode("ascii")


def sign_payload(label: str, message: bytes) -> bytes:
    """What Ed25519 actually signs: prefix || label || 0x00 || message."""
    return SIGN_PREFIX + check_label(label) + b"\x00" + bytes(message)


def verify_signature(public_key: bytes, label: str, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is keystored's signature of ``message`` under ``label``.

    A malformed key or signature is simply "not valid"; a malformed label is
    the caller's bug and raises InvalidArgument.
    """
    payload = sign_payload(label, message)
    if len(public_key) != PUBLIC_KEY_LEN or len(signature) != SIGNATURE_LEN:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(bytes(signature), payload)
    except (InvalidSignature, ValueError):
        return False
    return True
