"""Domain separation for HKDF: the exact bytes keystored feeds to key derivation.

The signing half (``sign_payload``, ``verify_signature``, the label rules)
lives in statefsd.shared.signing, below both daemons, so that the storage
core and fsck-statefs verify signatures without importing keystored. Every
byte string here is documented in docs/keystored.md; changing one changes
every derived key, so they are frozen for "v1".
"""

from __future__ import annotations

from statefsd.errors import InvalidArgument
from statefsd.shared.signing import check_label

DERIVE_PREFIX = b"statefs/v1/derive\x00"

MIN_DERIVE_LEN = 16
MAX_DERIVE_LEN = 64


def derive_info(label: str, context: bytes, length: int) -> bytes:
    """HKDF info: prefix || label || 0x00 || u16be(length) || context.

    The length is bound in so that a 16-byte key is not the prefix of the
    32-byte key for the same label and context (HKDF output otherwise is).
    """
    if not MIN_DERIVE_LEN <= length <= MAX_DERIVE_LEN:
        raise InvalidArgument(f"length must be {MIN_DERIVE_LEN}..{MAX_DERIVE_LEN} bytes, got {length}")
    return DERIVE_PREFIX + check_label(label) + b"\x00" + length.to_bytes(2, "big") + bytes(context)
