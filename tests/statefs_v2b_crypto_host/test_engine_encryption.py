"""Encryption at rest in the engine: sealed payloads, tamper detection,
no plaintext on disk. The key here comes from a fixed provider; the
keystored integration has its own tests."""

import os

import pytest

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine, Mutation
from statefsd.errors import CorruptImage, IntegrityError, KeyUnavailable

KEY = bytes(range(32))


def provider(sb):
    assert sb.key_descriptor == fmt.KEY_DESCRIPTOR_V1
    return KEY


@pytest.fixture
def enc_image(tmp_path):
    path = str(tmp_path / "enc.img")
    create_image(path, 4 << 20)
    with FileDevice(path) as dev:
        Engine.mkfs(dev, encryption="on")
    return path


def mount(path, **kw):
    kw.setdefault("key_provider", provider)
    return Engine.mount(FileDevice(path, read_only=kw.get("read_only", False)), **kw)


def test_encrypted_round_trip_survives_replay(enc_image):
    big = os.urandom(300_000)
    with mount(enc_image) as e:
        assert e.info()["encryption"] == "xchacha20poly1305"
        e.put("small", b"hello")
        e.put("big", big)
        e.commit([Mutation("put", "t1", b"a"), Mutation("put", "t2", b"b"), Mutation("delete", "small")])
    with mount(enc_image) as e:
        assert e.get("big") == big
        assert e.list() == ["big", "t1", "t2"]


def test_no_plaintext_of_a_value_appears_in_the_image(enc_image):
    marker = b"PLAINTEXT-CANARY-" * 200
    with mount(enc_image) as e:
        e.put("canary", marker)
    data = open(enc_image, "rb").read()
    assert b"PLAINTEXT-CANARY" not in data
    assert b"canary" in data  # paths stay plaintext in format 2, as documented


def test_mount_without_a_key_is_refused_with_no_plaintext_fallback(enc_image):
    with pytest.raises(KeyUnavailable, match="keystored"):
        Engine.mount(FileDevice(enc_image))


def test_a_wrong_key_is_refused_at_mount_once_the_image_knows_its_key(enc_image):
    with mount(enc_image) as e:  # first read-write mount records the key check
        e.put("a", b"secret")
    with pytest.raises(KeyUnavailable, match="does not match"):
        mount(enc_image, key_provider=lambda sb: bytes(32))


def test_wrong_key_without_a_key_check_makes_every_sealed_value_fail_authentication(enc_image):
    with mount(enc_image, read_only=True):
        pass  # a read-only mount records nothing
    with mount(enc_image) as e:
        e.put("a", b"secret")
    with mount(enc_image, read_only=True) as r:
        sb = r.sb
    for off in fmt.SUPERBLOCK_OFFSETS:  # an image from before key checks existed
        with open(enc_image, "r+b") as f:
            f.seek(off)
            f.write(fmt.encode_superblock(sb.evolve(key_check=bytes(16))))
    events = []
    with mount(enc_image, key_provider=lambda sb: bytes(32), audit=lambda ev, **f: events.append((ev, f))) as e:
        assert e.list() == []  # the txn is discarded deterministically
    assert [f["kind"] for ev, f in events if ev == "replay_finding"] == ["integrity"]


def _sealed_record(path):
    with mount(path) as e:
        e.put("victim", b"v" * 100)
        (offset, plen), = e.index[b"victim"].chunks
        e.put("after", b"later")
    return offset, plen


def test_every_bit_flip_in_a_sealed_record_is_repaired_or_rejected_and_never_yields_other_plaintext(enc_image):
    offset, plen = _sealed_record(enc_image)
    original = open(enc_image, "rb").read()
    length = fmt.HEADER_SIZE + plen
    for bit in range(0, length * 8, 7):  # every 7th bit keeps the test quick; still hits every field
        data = bytearray(original)
        data[offset + bit // 8] ^= 1 << (bit % 8)
        with open(enc_image, "wb") as f:
            f.write(data)
        try:
            with mount(enc_image) as e:
                # one damaged sector: rebuilt from the group's parity, or the txn is dropped
                assert "victim" not in e.list() or e.get("victim") == b"v" * 100
        except CorruptImage:
            pass  # a CRC error inside a flushed group: refused, never wrong plaintext
    with open(enc_image, "wb") as f:
        f.write(original)


def test_tampered_ciphertext_with_fixed_checksum_reads_as_eintegrity_never_as_plaintext(enc_image):
    e = mount(enc_image)
    try:
        e.put("victim", b"v" * 100)
        (offset, plen), = e.index[b"victim"].chunks
        raw = bytearray(e.device.read(offset, fmt.HEADER_SIZE + plen))
        raw[fmt.HEADER_SIZE + 5] ^= 0x40
        fmt.restamp_record_crc(raw)
        with open(enc_image, "r+b") as f:  # an attacker rewrites the disk under the daemon
            f.seek(offset)
            f.write(raw)
        with pytest.raises(IntegrityError, match="authentication"):
            e.get("victim")
    finally:
        e.close()


def test_nonces_never_repeat_across_transactions_and_chunks(enc_image):
    seen = set()
    with mount(enc_image) as e:
        for i in range(20):
            e.put(f"k{i % 3}", os.urandom(70_000))
        for entry in e.index.values():
            for off, _ in entry.chunks:
                h = fmt.unpack_header(e.device.read(off, 64))
                n = fmt.seal_nonce(e.sb.salt, h.txn_id, h.op_index, h.chunk_index)
                assert n not in seen
                seen.add(n)
