"""The log writer's bytes are pinned: the same transactions always make the
same write groups, byte for byte.

The writer packs groups for speed (one buffer per group, records packed in
place); the hash below was taken from the straightforward writer that
joined one bytes object per record, so any change to how groups are packed
that alters a single byte (or an index entry, or the cursor's position)
fails here. A deliberate format change updates docs/statefs.md and this
hash in the same commit. (The hash was retaken once with the same group
bytes: an empty value's index entry stopped calling itself sealed.)
"""

from __future__ import annotations

import hashlib
import random

import pytest

from statefsd.errors import InternalError
from statefsd.storage import format as fmt
from statefsd.storage.crypto import RecordCipher
from statefsd.storage.logwriter import LogCursor, LogPosition, txn_bytes

PINNED = "e8c4745e09e14d774786684a6423a5e2b572b89f90c652cd77d159e0934f4754"


class _Signer:
    public_key = bytes(range(32))

    def sign(self, label: str, message: bytes) -> bytes:
        return hashlib.sha512(label.encode() + message).digest()


def _groups_digest() -> str:
    """Groups of 1-5 transactions of 1-12 puts (empty, one-byte, 100 B,
    one-chunk, chunk-edge and multi-chunk values) and deletes, with
    checkpoints between them; parity on and off, sealed and plain."""
    rng = random.Random(5)
    sb = fmt.new_superblock(64 << 20, device_uuid=bytes(16), salt=bytes(range(32)))
    out = hashlib.sha256()
    for parity in (False, True):
        for sealed in (False, True):
            cipher = RecordCipher(bytes(32), sb) if sealed else None
            cur = LogCursor(LogPosition(8192, 7, 3, bytes(32), 11), epoch=5, mount_gen=2, parity=parity)
            for g in range(30):
                txns = []
                for _ in range(rng.randint(1, 5)):
                    ops = []
                    for o in range(rng.randint(1, 12)):
                        path = f"k/{rng.randint(0, 50)}/é{o}".encode()
                        if rng.random() < 0.2:
                            ops.append((fmt.Op(fmt.OP_DELETE, path), b""))
                        else:
                            size = rng.choice([0, 1, 100, 4096, 65536, 65537, 200000])
                            ops.append((fmt.Op(fmt.OP_PUT, path, size), rng.randbytes(size)))
                    txns.append(ops)
                blob, ids, applied = cur.encode_group(txns, cipher)
                out.update(bytes(blob))
                out.update(repr((ids, applied)).encode())
                if g % 7 == 0:
                    out.update(bytes(cur.encode_checkpoint(_Signer(), bytes(16))))
            out.update(repr(cur.position).encode())
    return out.hexdigest()


def test_the_writer_packs_every_kind_of_group_into_exactly_the_pinned_bytes():
    assert _groups_digest() == PINNED


def test_a_group_whose_records_disagree_with_the_size_given_for_them_is_refused():
    cur = LogCursor(LogPosition(0, 0, 1, bytes(32), 1), epoch=1, mount_gen=1, parity=True)
    ops = [(fmt.Op(fmt.OP_PUT, b"k", 3), b"abc")]
    with pytest.raises(InternalError, match="came out"):
        cur.encode_group([ops], None, data_bytes=txn_bytes(ops, False) + 1)
