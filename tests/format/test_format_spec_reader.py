"""Differential test: an image decoder written from docs/statefs.md alone
(spec_reader.py) must agree with statefsd on every image statefsd writes.

statefsd is used here only to PRODUCE images and to give its own view of them
(a read-only mount); the decoder imports nothing from statefsd.
"""

from __future__ import annotations

import pathlib
import random
import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine, Mutation
from statefsd.errors import CorruptImage, FormatError, KeyUnavailable

from tests.format import spec_reader
from tests.format.spec_reader import Refused, read_image
from tests.statefs_v2b_crypto_host.test_signed_checkpoints import LocalSigner

KEY = bytes.fromhex("9f" * 8 + "3c" * 8 + "a5" * 8 + "17" * 8)  # fixed payload key
SPEC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "statefs.md"
PATHS = ["a", "b/c", "greeting", "ключ/é", "emoji-\U0001f600", "p" * 512, "cfg/net/eth0", "z"]
IMAGE_BYTES = 4 << 20


def _key_provider(_sb):
    return KEY


# --- producing images with statefsd ----------------------------------------------

def _value(rng: random.Random, large: bool) -> bytes:
    if large:
        n = rng.choice([65536, 65537, 131072, rng.randint(65537, 200_000)])
    else:
        n = rng.choice([0, 1, rng.randint(2, 300)])
    return rng.randbytes(n)


def _workload(path: str, seed: int, encryption: str, signer=None) -> dict[str, bytes]:
    """Runs a seeded random workload; returns the acknowledged state (the model).
    With a signer, statefsd writes signed checkpoints (unmount, compaction)."""
    rng = random.Random(seed)
    kp = _key_provider if encryption == "on" else None
    create_image(path, IMAGE_BYTES)
    with FileDevice(path) as dev:
        # Half of the encrypted images record key_check at mkfs, half at first mount.
        Engine.mkfs(dev, encryption=encryption, key_provider=kp if seed % 2 else None,
                    **({"redundancy": "off"} if seed in UNREDUNDANT_SEEDS else {}))
    eng = Engine.mount(FileDevice(path), key_provider=kp, signer=signer)
    model: dict[str, bytes] = {}
    for _ in range(40):
        r = rng.random()
        if r < 0.45:  # 0.35..0.45: a value of more than one chunk
            k, v = rng.choice(PATHS), _value(rng, large=r >= 0.35)
            eng.put(k, v)
            model[k] = v
        elif r < 0.55 and model:
            k = rng.choice(sorted(model))
            eng.delete(k)
            del model[k]
        elif r < 0.80:
            muts = []
            for _ in range(rng.randint(1, 5)):
                k = rng.choice(PATHS)  # repeats allowed: the last op on a path wins
                if rng.random() < 0.7:
                    v = _value(rng, large=rng.random() < 0.1)
                    muts.append(Mutation("put", k, v))
                    model[k] = v
                else:
                    muts.append(Mutation("delete", k))
                    model.pop(k, None)
            eng.commit(muts)
        elif r < 0.90:
            eng.close()
            eng = Engine.mount(FileDevice(path), key_provider=kp, signer=signer)
        else:
            eng.compact()
    model["big/final"] = rng.randbytes(150_000)  # three chunks, live in every image
    eng.put("big/final", model["big/final"])
    for i in range(6):  # several small trailing groups, so mid-log damage has groups after it
        eng.put(f"tail/{i}", bytes([i]) * 40)
        model[f"tail/{i}"] = bytes([i]) * 40
    assert {k: eng.get(k) for k in eng.list()} == model
    eng.close()
    return model


def _statefsd_view(path: str, signer=None) -> dict:
    eng = Engine.mount(FileDevice(path, read_only=True), read_only=True, key_provider=_key_provider,
                       signer=signer)
    try:
        return {"state": {k: eng.get(k) for k in eng.list()}, "info": eng.info()}
    finally:
        eng.close()


def _rw_mount_refuses_as_corrupt(path: str, signer=None) -> bool:
    try:
        eng = Engine.mount(FileDevice(path), key_provider=_key_provider, signer=signer)
    except CorruptImage:
        return True
    eng.close()
    return False


def _assert_agrees(ours: dict, theirs: dict) -> None:
    assert ours["state"] == theirs["state"]
    assert ours["chain_head"].hex() == theirs["info"]["chain_head"]
    replay = theirs["info"]["replay"]
    assert ours["max_txn_id"] == replay["max_txn_id"]
    assert ours["log_end"] == replay["log_end"]
    assert ours["torn_tail_bytes"] == replay["torn_tail_bytes"]
    assert ours["checkpoints"] == replay["checkpoints"]
    assert ours["verified_checkpoints"] == replay["verified_checkpoints"]
    assert ours["corrupt"] == bool(replay["findings"].get("corruption"))
    if not ours["corrupt"]:  # 6.4: the same outcome, reported the same way
        assert (ours["outcome"] == "torn tail") == bool(replay["findings"].get("torn-tail"))


SIGNER = LocalSigner()            # the device key of the signed images
SIGNED_SEEDS = {20, 21, 30, 31}   # images written with signed checkpoints
UNREDUNDANT_SEEDS = {4, 5, 13, 21}  # images made with redundancy off (the others: the default, parity)
CASES = ([(seed, "off") for seed in range(6)] + [(seed, "on") for seed in range(10, 14)]
         + [(20, "off"), (21, "off"), (30, "on"), (31, "on")])


def _signer(seed: int):
    return SIGNER if seed in SIGNED_SEEDS else None


def _ours(image, seed: int, enc: str) -> dict:
    """The spec reader's view, given what statefsd is given: the payload key
    and, for signed images, the device's public key."""
    return read_image(image, key=KEY if enc == "on" else None,
                      device_key=SIGNER.public_key if seed in SIGNED_SEEDS else None)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(seed, encryption) -> (image bytes, acknowledged state), built once per module."""
    out = {}
    for seed, enc in CASES:
        path = str(tmp_path_factory.mktemp("img") / f"{enc}-{seed}.img")
        model = _workload(path, seed, enc, signer=_signer(seed))
        out[seed, enc] = (pathlib.Path(path).read_bytes(), model)
    return out


def _write(tmp_path, data: bytes) -> str:
    path = tmp_path / "copy.img"
    path.write_bytes(data)
    return str(path)


# --- undamaged, torn and corrupt images ------------------------------------------

@pytest.mark.parametrize("seed,enc", CASES)
def test_spec_reader_decodes_undamaged_image_exactly_like_statefsd(images, tmp_path, seed, enc):
    data, model = images[seed, enc]
    path = _write(tmp_path, data)
    ours = _ours(path, seed, enc)
    assert not ours["corrupt"]
    assert ours["state"] == model  # every acknowledged write, nothing else
    assert ours["verified_checkpoints"] == ours["checkpoints"] > 0 if seed in SIGNED_SEEDS else not ours["checkpoints"]
    _assert_agrees(ours, _statefsd_view(path, _signer(seed)))


def _with_floor(data: bytes, durable_end: int) -> bytes:
    """Both superblock slots with another durable floor (3.1)."""
    return (_resealed(data[:4096], durable_end=durable_end) + _resealed(data[4096:8192], durable_end=durable_end)
            + data[8192:])


@pytest.mark.parametrize("seed,enc", CASES)
def test_torn_tail_is_dropped_identically_and_not_called_corruption(images, tmp_path, seed, enc):
    data, _ = images[seed, enc]
    clean = _ours(data, seed, enc)
    # The last group of transactions (signed images end with a CHECKPOINT group).
    last = [s for s in clean["group_starts"] if data[s + 6] != spec_reader.CHECKPOINT][-1]
    # A crash before that group's flush returned: no superblock recorded it as
    # durable, and only its first record (no trailer, nothing after) reached the disk.
    torn = bytearray(_with_floor(data, last))
    first_end = last + 64 + struct.unpack_from("<I", torn, last + 48)[0]
    torn[first_end:clean["log_end"]] = bytes(clean["log_end"] - first_end)
    path = _write(tmp_path, bytes(torn))
    ours = _ours(path, seed, enc)
    assert not ours["corrupt"] and ours["outcome"] == "torn tail"
    assert ours["log_end"] == last and ours["torn_tail_bytes"] == first_end - last
    _assert_agrees(ours, _statefsd_view(path, _signer(seed)))
    assert not _rw_mount_refuses_as_corrupt(path, _signer(seed))


@pytest.mark.parametrize("seed,enc", CASES)
def test_a_lost_last_group_of_a_cleanly_unmounted_image_is_corruption_for_both_readers(images, tmp_path, seed, enc):
    data, _ = images[seed, enc]
    clean = _ours(data, seed, enc)
    assert clean["superblock"]["durable_end"] == clean["log_end"]  # the clean unmount's floor
    last = clean["group_starts"][-1]
    lost = bytearray(data)
    lost[last:clean["log_end"]] = bytes(clean["log_end"] - last)  # flushed, then zeroed
    path = _write(tmp_path, bytes(lost))
    ours = _ours(path, seed, enc)
    assert ours["corrupt"] and ours["outcome"] == "corruption below the durable floor"
    _assert_agrees(ours, _statefsd_view(path, _signer(seed)))
    assert _rw_mount_refuses_as_corrupt(path, _signer(seed))


@pytest.mark.parametrize("seed,enc", CASES)
def test_one_damaged_sector_anywhere_in_the_log_is_repaired_with_parity_and_corruption_without(
        images, tmp_path, seed, enc):
    data, model = images[seed, enc]
    clean = _ours(data, seed, enc)
    rng = random.Random(seed)
    starts = clean["group_starts"]
    # the first group (after a compaction: the snapshot), a middle one and the last
    for start in sorted({starts[0], starts[len(starts) // 2], starts[-1]}):
        bad = bytearray(data)
        bad[start:start + 512] = rng.randbytes(512)
        path = _write(tmp_path, bytes(bad))
        ours = _ours(path, seed, enc)
        _assert_agrees(ours, _statefsd_view(path, _signer(seed)))
        if seed in UNREDUNDANT_SEEDS:
            assert ours["corrupt"] and _rw_mount_refuses_as_corrupt(path, _signer(seed))
        else:
            assert not ours["corrupt"] and ours["state"] == model
            assert ours["repaired"] == [(start, data[start:start + 512])]
            assert not _rw_mount_refuses_as_corrupt(path, _signer(seed))
            after = pathlib.Path(path).read_bytes()
            assert after[start:start + 512] == data[start:start + 512]  # written back in place


@pytest.mark.parametrize("seed,enc", [c for c in CASES if c[0] in UNREDUNDANT_SEEDS])
def test_damage_in_the_middle_of_the_log_is_corruption_for_both_readers(images, tmp_path, seed, enc):
    data, _ = images[seed, enc]
    clean = _ours(data, seed, enc)
    start = clean["superblock"]["regions"][clean["superblock"]["active_region"]][0] * 4096
    # A 512-aligned offset before the log end always lies inside a record: group
    # padding ends just before a 512 boundary, never on one.
    mid = (start + (clean["log_end"] - start) // 2) // 512 * 512
    bad = bytearray(data)
    bad[mid] ^= 0x40
    path = _write(tmp_path, bytes(bad))
    ours = _ours(path, seed, enc)
    assert ours["corrupt"]
    _assert_agrees(ours, _statefsd_view(path, _signer(seed)))  # both serve the same consistent prefix
    assert _rw_mount_refuses_as_corrupt(path, _signer(seed))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), where=st.floats(0, 1.02), bit=st.integers(0, 7))
def test_any_single_bit_flip_in_the_log_gets_the_same_verdict_from_both(images, tmp_path, case, where, bit):
    data, _ = images[case]
    clean = _ours(data, *case)
    start = clean["superblock"]["regions"][clean["superblock"]["active_region"]][0] * 4096
    off = start + int(where * (clean["log_end"] - start))
    bad = bytearray(data)
    bad[off] ^= 1 << bit
    path = _write(tmp_path, bytes(bad))
    ours = _ours(path, *case)
    _assert_agrees(ours, _statefsd_view(path, _signer(case[0])))
    assert ours["corrupt"] == _rw_mount_refuses_as_corrupt(path, _signer(case[0]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), where=st.floats(0, 1), damage=st.sampled_from(["garbage", "zeroed"]))
def test_any_single_damaged_sector_of_the_log_gets_the_same_verdict_and_repair_from_both(
        images, tmp_path, case, where, damage):
    data, model = images[case]
    clean = _ours(data, *case)
    start = clean["superblock"]["regions"][clean["superblock"]["active_region"]][0] * 4096
    at = start + int(where * (clean["log_end"] - start - 1)) // 512 * 512  # data or trailer
    bad = bytearray(data)
    bad[at:at + 512] = random.Random(at).randbytes(512) if damage == "garbage" else bytes(512)
    path = _write(tmp_path, bytes(bad))
    ours = _ours(path, *case)
    _assert_agrees(ours, _statefsd_view(path, _signer(case[0])))
    if case[0] not in UNREDUNDANT_SEEDS:
        assert ours["state"] == model and not ours["corrupt"]  # parity repairs any one sector
    assert ours["corrupt"] == _rw_mount_refuses_as_corrupt(path, _signer(case[0]))


@pytest.mark.parametrize("redundancy", ["parity", "off"])
def test_a_damaged_compacted_snapshot_with_nothing_after_it_is_repaired_or_corruption_never_empty(
        tmp_path, redundancy):
    path = str(tmp_path / "compacted.img")
    create_image(path, IMAGE_BYTES)
    with FileDevice(path) as dev:
        Engine.mkfs(dev, redundancy=redundancy)
    model = {f"k{i}": bytes([i, r]) * 30 for i in range(40) for r in range(3)}
    with Engine.mount(FileDevice(path)) as eng:
        for r in range(3):
            for i in range(40):
                eng.put(f"k{i}", bytes([i, r]) * 30)
        eng.compact()
    data = bytearray(pathlib.Path(path).read_bytes())
    sb = read_image(bytes(data))["superblock"]
    first = sb["regions"][sb["active_region"]][0] * 4096
    data[first + 100] ^= 0xFF  # inside the snapshot's first group; no group follows the snapshot
    path = _write(tmp_path, bytes(data))
    ours = read_image(path)
    _assert_agrees(ours, _statefsd_view(path))
    if redundancy == "parity":
        assert not ours["corrupt"] and ours["state"] == model and ours["repaired"][0][0] == first
    else:
        assert ours["corrupt"] and ours["outcome"] == "corruption below the durable floor"
    assert ours["corrupt"] == _rw_mount_refuses_as_corrupt(path)


# --- record types and signed checkpoints ------------------------------------------

def test_spec_reader_decodes_every_record_type_statefsd_defines():
    """statefsd.storage.format is imported only to list its record types: a type the
    writer may put on disk that the spec reader does not decode fails here."""
    from statefsd.storage import format as fmt
    missing = {f"{t:#x} {n}" for t, n in fmt.RECORD_TYPES.items() if spec_reader.RECORD_TYPES.get(t) != n}
    assert not missing, f"record types statefsd defines but the spec reader does not decode: {missing}"
    undecoded = set(spec_reader.RECORD_TYPES) - set(spec_reader.HANDLERS) - spec_reader.WALK_TYPES
    assert not undecoded, f"the spec reader accepts types it has no decoder for: {undecoded}"


@pytest.mark.parametrize("seed,enc", [(20, "off"), (30, "on")])
def test_checkpoints_signed_by_another_key_are_corruption_only_for_a_reader_given_the_device_key(
        images, tmp_path, seed, enc):
    data, model = images[seed, enc]
    path = _write(tmp_path, data)
    other = LocalSigner()
    key = KEY if enc == "on" else None
    ours = read_image(path, key=key, device_key=other.public_key)
    assert ours["corrupt"] and ours["verified_checkpoints"] == 0
    assert ours["state"] != model  # replay stopped at the first checkpoint
    _assert_agrees(ours, _statefsd_view(path, other))
    assert _rw_mount_refuses_as_corrupt(path, other)
    # Without the device key the same checkpoints are matched, unverified, and nothing is refused.
    ours = read_image(path, key=key)
    assert not ours["corrupt"] and ours["state"] == model
    assert ours["checkpoints"] > 0 and ours["verified_checkpoints"] == 0
    _assert_agrees(ours, _statefsd_view(path))


# --- encryption ------------------------------------------------------------------

def test_encrypted_image_without_key_yields_paths_but_no_values(images):
    data, model = images[10, "on"]
    ours = read_image(data)
    assert set(ours["state"]) == set(model)
    # An empty value has no PAYLOAD record, so it is known without the key.
    assert ours["state"] == {k: (b"" if v == b"" else None) for k, v in model.items()}


def test_encrypted_image_with_wrong_key_is_refused_by_both(images, tmp_path):
    data, _ = images[11, "on"]  # odd seed: key_check recorded at mkfs
    with pytest.raises(Refused, match="wrong key"):
        read_image(data, key=bytes(32))
    path = _write(tmp_path, data)
    with pytest.raises(KeyUnavailable):
        Engine.mount(FileDevice(path, read_only=True), read_only=True, key_provider=lambda sb: bytes(32))


def test_sealed_payloads_are_not_plaintext_on_disk(images):
    data, model = images[12, "on"]
    values = [v for v in model.values() if len(set(v[:32])) > 8]  # random, not b"\0" * 40
    assert values and not any(v[:32] in data for v in values)


def test_fresh_image_is_empty_and_its_chain_head_is_the_genesis_hash(tmp_path):
    path = str(tmp_path / "fresh.img")
    create_image(path, 1 << 20)
    with FileDevice(path) as dev:
        Engine.mkfs(dev)
    ours = read_image(path)
    sb = ours["superblock"]
    assert ours["state"] == {} and ours["log_end"] == sb["regions"][0][0] * 4096
    assert ours["chain_head"] == spec_reader.genesis_hash(sb["device_uuid"])
    _assert_agrees(ours, _statefsd_view(path))


# --- superblock choice and refusals ---------------------------------------------

def _resealed(slot: bytes, **fields) -> bytes:
    offsets = {"minor": (10, "<H"), "major": (8, "<H"), "generation": (16, "<Q"),
               "chain_base": (160, "<32s"), "durable_end": (208, "<Q"), "redundancy": (216, "<B")}
    s = bytearray(slot)
    for name, value in fields.items():
        off, fmt = offsets[name]
        struct.pack_into(fmt, s, off, value)
    struct.pack_into("<I", s, 252, spec_reader.crc32c(bytes(s[:252])))
    return bytes(s)


@pytest.mark.parametrize("version", [{"minor": 2}, {"major": 3}, {"major": 1}])
def test_unknown_version_in_either_slot_is_refused_by_both(images, tmp_path, version):
    data, _ = images[0, "off"]
    bad = data[:4096] + _resealed(data[4096:8192], **version) + data[8192:]  # the losing slot
    with pytest.raises(Refused, match="version"):
        read_image(bad)
    with pytest.raises(FormatError):
        Engine.mount(FileDevice(_write(tmp_path, bad), read_only=True), read_only=True)


def test_damaged_newest_slot_falls_back_to_the_other_in_both(images, tmp_path):
    data, _ = images[1, "off"]
    sb = read_image(data)["superblock"]
    newest = 0 if sb["generation"] == struct.unpack_from("<Q", data, 16)[0] else 1
    bad = bytearray(data)
    bad[newest * 4096 + 100] ^= 0xFF
    path = _write(tmp_path, bytes(bad))
    ours = read_image(path)
    assert ours["superblock"]["generation"] < sb["generation"]
    _assert_agrees(ours, _statefsd_view(path))


def test_generation_tie_is_won_by_slot_a_in_both(images, tmp_path):
    data, model = images[3, "off"]
    newest = read_image(data)["superblock"]["generation"]
    good = next(data[i:i + 4096] for i in (0, 4096) if struct.unpack_from("<Q", data, i + 16)[0] == newest)
    # Same generation in slot B, but a chain_base that would break the chain.
    bad = good + _resealed(good, chain_base=bytes(32)) + data[8192:]
    path = _write(tmp_path, bad)
    ours = read_image(path)
    assert not ours["corrupt"] and ours["state"] == model
    _assert_agrees(ours, _statefsd_view(path))


@pytest.mark.parametrize("damage,ours_reason,theirs", [
    (lambda d: bytes(len(d)), "not a StateFS", FormatError),
    (lambda d: d[:len(d) // 2], "truncated", CorruptImage),
    (lambda d: d[:100] + b"\1" + d[101:4196] + b"\1" + d[4197:], "damaged", CorruptImage),
])
def test_images_without_a_usable_superblock_are_refused_by_both(images, tmp_path, damage, ours_reason, theirs):
    bad = damage(images[2, "off"][0])
    with pytest.raises(Refused, match=ours_reason):
        read_image(bad)
    with pytest.raises(theirs):
        Engine.mount(FileDevice(_write(tmp_path, bad), read_only=True), read_only=True)


# --- the spec's own test vectors and worked example ------------------------------

def _spec_crc32c(data: bytes) -> int:  # the bit-wise reference of section 4.1
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_checksum_and_hash_test_vectors_of_the_spec_hold():
    assert spec_reader.crc32c(b"123456789") == _spec_crc32c(b"123456789") == 0xE3069283
    blob = random.Random(7).randbytes(3000)
    assert spec_reader.crc32c(blob) == _spec_crc32c(blob)
    assert spec_reader.path_hash(b"greeting") == bytes.fromhex("d8041d017525074d")
    assert spec_reader.genesis_hash(bytes(16)).hex() == (
        "51ea90af7df6c7c6b638c052e4284995e734b052fcda4f2e5ed48fef1062ea2a")


def test_encryption_test_vectors_of_the_spec_hold():
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt
    key, salt, uuid = bytes(range(32)), bytes(range(0x20, 0x40)), bytes(range(0x40, 0x50))
    assert spec_reader.key_check(key, uuid, salt).hex() == "13a9a9a1538ede478f76a09a219adef4"
    nonce, aad = spec_reader.seal_nonce_aad(salt, uuid, 1, 0, 0, spec_reader.path_hash(b"greeting"), 21)
    assert nonce.hex() == "2021222324252627" + "0100000000000000" + "0000" + "00000000" + "1100"
    assert aad.hex() == ("73746174656673 2e7365616c2e763200 404142434445464748494a4b4c4d4e4f 11"
                         " 0100000000000000 0000 00000000 d8041d017525074d 15000000").replace(" ", "")
    sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(b"hello", aad, nonce, key)
    assert sealed.hex() == "a4fb9c61c5a484bdecaf7ea37ebe5b8b5f47459ea6"
    listed = re.search(r"\nsealed ((?:[0-9a-f]{2} )+)", SPEC.read_text(encoding="utf-8"))[1].split()
    assert bytes.fromhex("".join(listed)) == sealed  # the vector as section 11.4 prints it
    assert spec_reader._open(key, nonce, aad, sealed) == b"hello"


def _worked_example_image() -> bytes:
    """Rebuilds the 1 MiB image of section 13 from the spec's hex dumps."""
    text = SPEC.read_text(encoding="utf-8").split("## 13. Worked example")[1].split("## 14.")[0]
    img = bytearray(1 << 20)
    expected = None
    for line in text.splitlines():
        m = re.match(r"([0-9a-f]{6})  (?:00 \.\. 00 \((\d+) bytes\)|= ([0-9a-f]{6}) \.\. ([0-9a-f]{6}) |"
                     r"((?:[0-9a-f]{2} )*[0-9a-f]{2})(?:  |$))", line)
        if not m:
            continue
        off = int(m[1], 16)
        if m[2]:
            chunk = bytes(int(m[2]))
        elif m[3]:  # "= FROM .. TO": a copy of earlier bytes (a one-sector group's parity)
            chunk = bytes(img[int(m[3], 16):int(m[4], 16) + 1])
        else:
            chunk = bytes.fromhex(m[5])
        # Dump lines of one structure follow each other without gaps.
        assert expected is None or off == expected or off % 512 == 0, line
        img[off:off + len(chunk)] = chunk
        expected = off + len(chunk)
    # "Slot B is identical except generation = 3, durable_end = 0x2000 and its CRC ..."
    # "The identity copy is identical except generation = 1, txn_reserved = 0, durable_end = 0 and its CRC ..."
    crcs = re.findall(r"its CRC\s+`((?:[0-9a-f]{2} ){3}[0-9a-f]{2})`", text)
    assert len(crcs) == 2, crcs
    for at, fields, crc in ((4096, {16: 3, 0xd0: 0x2000}, crcs[0]),
                            (0xff000, {16: 1, 0x58: 0, 0xd0: 0}, crcs[1])):
        block = bytearray(img[:4096])
        for field, value in fields.items():
            struct.pack_into("<Q", block, field, value)
        block[0xFC:0x100] = bytes.fromhex(crc)
        assert spec_reader._decode_slot(bytes(block))[0] is not None  # the stated CRC is right
        img[at:at + 4096] = block
    return bytes(img)


def test_worked_example_of_the_spec_decodes_to_its_stated_result():
    ours = read_image(_worked_example_image())
    sb = ours["superblock"]
    assert sb["generation"] == 4 and ours["last_mount_gen"] == 3
    assert sb["redundancy"] == 1 and sb["durable_end"] == 0x2c00
    assert ours["state"] == {"motd": b""}
    assert ours["max_txn_id"] == 2
    assert ours["log_end"] == 0x2c00 and ours["torn_tail_bytes"] == 0 and ours["outcome"] == "clean end"
    assert not ours["corrupt"] and ours["findings"] == []
    assert ours["chain_head"].hex() == "bdd6198731ec92aba1a78e4fa2f0faa1c007f227002a4f1b061fc46d3a026368"


def test_worked_example_of_the_spec_is_byte_for_byte_what_statefsd_writes(tmp_path):
    """Section 13's recipe, run with the example's device_uuid and log_epoch
    (random in a real mkfs), must give exactly the bytes the spec shows."""
    from statefsd.storage import format as fmt
    spec_image = _worked_example_image()
    path = str(tmp_path / "example.img")
    create_image(path, 1 << 20)
    with FileDevice(path) as dev:
        sb = Engine.mkfs(dev)
        uuid = spec_image[4096 + 0x18:4096 + 0x28]
        sb = sb.evolve(device_uuid=uuid, chain_base=fmt.genesis_hash(uuid),
                       log_epoch=struct.unpack_from("<I", spec_image, 4096 + 0x54)[0])
        for offset in (*fmt.SUPERBLOCK_OFFSETS, fmt.identity_copy_offset(sb.total_blocks)):
            dev.write(offset, fmt.encode_superblock(sb))
    eng = Engine.mount(FileDevice(path))
    eng.put("greeting", b"hello")
    eng.commit([Mutation("put", "motd", b""), Mutation("delete", "greeting")])
    eng.close()
    written = pathlib.Path(path).read_bytes()
    diff = [hex(i) for i in range(len(written)) if written[i] != spec_image[i]][:8]
    assert not diff, f"the spec's worked example differs from statefsd's bytes at {diff}"
