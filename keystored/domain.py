"""Domain separation: the exact bytes keystored feeds to HKDF and Ed25519.

Lives apart from the secrets so that statefsd and fsck-statefs can verify
signatures (``verify_signature``) without talking to keystored. Every byte
string here is documented in docs/keystored.md; changing one changes every
derived key and invalidates every signature, so they are frozen for "v1".
"""

from __future__ import annotations

import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from statefsd.errors import InvalidArgument

DERIVE_PREFIX = b"statefs/v1/derive\x00"
SIGN_PREFIX = b"statefs/v1/sign\x00"

MAX_LABEL_LEN = 128
MIN_DERIVE_LEN = 16
MAX_DERIVE_LEN = 64
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


def derive_info(label: str, context: bytes, length: int) -> bytes:
    """HKDF info: prefix || label || 0x00 || u16be(length) || context.

    The length is bound in so that a 16-byte key is not the prefix of the
    32-byte key for the same label and context (HKDF output otherwise is).
    """
    if not MIN_DERIVE_LEN <= length <= MAX_DERIVE_LEN:
        raise InvalidArgument(f"length must be {MIN_DERIVE_LEN}..{MAX_DERIVE_LEN} bytes, got {length}")
    return DERIVE_PREFIX + check_label(label) + b"\x00" + length.to_bytes(2, "big") + bytes(context)


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
