"""Checkpoints of the hash chain, signed with the device's Ed25519 key:
an attacker without that key cannot forge a consistent history."""


import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from statefsd.shared.signing import sign_payload
from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine
from statefsd.storage.image import read_superblock
from statefsd.errors import CorruptImage


class LocalSigner:
    """keystored's signing rule, in-process (keystored itself is tested apart)."""

    def __init__(self):
        self._key = Ed25519PrivateKey.generate()
        self.public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, label, message):
        return self._key.sign(sign_payload(label, message))


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "cp.img")
    create_image(path, 4 << 20)
    with FileDevice(path) as dev:
        Engine.mkfs(dev)
    return path


def mount(path, signer, **kw):
    return Engine.mount(FileDevice(path), signer=signer, **kw)


def test_unmount_writes_a_checkpoint_that_the_next_mount_verifies(image):
    signer = LocalSigner()
    with mount(image, signer) as e:
        e.put("a", b"1")
    with mount(image, signer) as e:
        assert e.replay_summary["verified_checkpoints"] == 1
        assert e.get("a") == b"1"


def test_compaction_carries_a_signed_checkpoint_into_the_new_region(image):
    signer = LocalSigner()
    with mount(image, signer) as e:
        for i in range(30):
            e.put(f"k{i % 4}", bytes([i]) * 1000)
        e.compact()
    with mount(image, signer) as e:
        assert e.replay_summary["verified_checkpoints"] >= 1
        assert len(e.list()) == 4


def test_a_checkpoint_from_another_device_key_is_refused(image):
    with mount(image, LocalSigner()) as e:
        e.put("a", b"1")
    with pytest.raises(CorruptImage, match="not this device"):
        mount(image, LocalSigner())


def test_history_rewritten_without_the_device_key_breaks_the_signed_checkpoint(image):
    signer = LocalSigner()
    with mount(image, signer) as e:
        e.put("a", b"original")
        (offset, plen), = e.index[b"a"].chunks
    # The attacker rewrites the value and recomputes CRC, txn digest and chain,
    # everything except the signature, which needs the device key.
    with FileDevice(image, read_only=True) as dev:
        sb, _ = read_superblock(dev)
    data = bytearray(open(image, "rb").read())
    data[offset + fmt.HEADER_SIZE:offset + fmt.HEADER_SIZE + plen] = b"tampered"
    fmt.restamp_record_crc(data, offset)
    _rechain(data, sb.active_extent[0], sb.chain_base)
    open(image, "wb").write(data)
    with pytest.raises(CorruptImage, match="history was rewritten"):
        mount(image, signer)


def _rechain(data, pos, chain):
    """Recompute every txn digest and COMMIT prev_hash along the log."""
    import hashlib
    digest = None
    count = 0
    while True:
        h = fmt.unpack_header(bytes(data[pos:pos + 64]))
        if h.magic != fmt.RECORD_MAGIC:
            return
        end = pos + 64 + h.payload_len
        if h.type == fmt.COMMIT:
            body = fmt.encode_commit(fmt.CommitBody(chain, digest.digest(), count))
            data[pos + 64:end] = body
            fmt.restamp_record_crc(data, pos)
            chain = fmt.chain_hash(bytes(data[pos:end]))
        elif h.type == fmt.CHECKPOINT:
            pass  # the attacker cannot re-sign it
        else:
            if h.type == fmt.PREPARE:
                digest, count = hashlib.sha256(), 0
            digest.update(bytes(data[pos:end]))
            count += 1
        pos = fmt.align_up(end) if h.flags & fmt.FLAG_GROUP_END else end
