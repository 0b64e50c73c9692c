"""Kernel entropy, and refusing to make keys before the pool is ready.

``getrandom(GRND_NONBLOCK)`` fails with EAGAIN until the kernel's CRNG is
seeded; that is the one readiness signal we trust. Tests cannot starve the
real pool, so KEYSTORED_TEST_ENTROPY_NOT_READY makes the probe answer "not
ready": always when it is "1", or while the file it names exists when it is
an absolute path (a documented test hook, see docs/keystored.md).
"""

from __future__ import annotations

import os

from statefsd.errors import EntropyNotReady

TEST_HOOK_ENV = "KEYSTORED_TEST_ENTROPY_NOT_READY"

NOT_READY_MESSAGE = (
    "kernel entropy is not ready (getrandom would block): no device identity yet, "
    "derive/sign/public_key answer EENTROPY until it is"
)


def _test_hook_says_not_ready() -> bool:
    value = os.environ.get(TEST_HOOK_ENV, "")
    return value == "1" or (value.startswith("/") and os.path.exists(value))


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the kernel CRNG, or EntropyNotReady if it is not seeded."""
    if _test_hook_says_not_ready():
        raise EntropyNotReady(NOT_READY_MESSAGE + f" ({TEST_HOOK_ENV} is set)")
    out = bytearray()
    while len(out) < n:  # getrandom may return short reads for large n
        try:
            out += os.getrandom(n - len(out), os.GRND_NONBLOCK)
        except BlockingIOError:
            raise EntropyNotReady(NOT_READY_MESSAGE) from None
    return bytes(out)
