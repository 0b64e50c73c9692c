"""fsck-statefs on encrypted images: sealed payloads are authenticated with a
key, reported as skipped without one, and a transaction that fails
authentication is dropped by repair without editing any ciphertext. The key
comes from a fixed in-process provider (keystored has its own tests)."""

from __future__ import annotations

import hashlib

import pytest

from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.image import read_superblock

from fsck_images import forge_superblock as _forge_superblock, fixed_key, fsck, make_image, patch, put_each, records, state, tamper_sealed_txn
from fsck_statefs.cli import run

VALUES = {"a": b"alpha" * 100, "b": b"bravo" * 30_000, "c": b"charlie"}


@pytest.fixture
def enc(tmp_path):
    path = make_image(tmp_path / "enc.img", encryption="on", redundancy="off")
    put_each(path, VALUES)
    return path


def _region_bytes(path: str) -> tuple[int, str]:
    with FileDevice(path, read_only=True) as dev:
        sb, _ = read_superblock(dev)
        start, length = sb.active_extent
        return sb.active_region, hashlib.sha256(dev.read(start, length)).hexdigest()


def test_clean_encrypted_image_is_verified_with_the_key(enc):
    report = run(enc, key_provider=fixed_key)
    assert report.exit_code == 0 and report.authentication == "verified"
    assert report.summary["unverified_chunks"] == 0


def test_without_a_key_fsck_says_authentication_was_skipped(enc):
    proc = fsck(enc)
    assert proc.returncode == 0
    assert "authentication SKIPPED" in proc.stdout and "--keystore-socket" in proc.stdout
    report = run(enc)
    assert report.authentication == "skipped"
    assert report.summary["unverified_chunks"] == 1 + 3 + 1  # chunks of a, b (3 x 64 KiB), c


def test_tampered_ciphertext_is_detected_only_with_the_key(enc):
    recs, _, _ = records(enc)
    last_txn = max(r.header.txn_id for r in recs)
    offset = tamper_sealed_txn(enc, last_txn)
    assert run(enc).exit_code == 0  # checksums and digests all agree: only the AEAD can tell
    report = run(enc, key_provider=fixed_key)
    assert report.exit_code == 4
    (bad,) = report.errors
    assert (bad.kind, bad.offset, bad.record, bad.txn_id) == ("integrity", offset, "PAYLOAD", last_txn)
    assert "failed authentication" in bad.reason


def test_repair_drops_the_unauthenticated_txn_and_edits_no_ciphertext(enc):
    recs, _, _ = records(enc)
    last_txn = max(r.header.txn_id for r in recs)
    tamper_sealed_txn(enc, last_txn)
    old_region, old_hash = _region_bytes(enc)
    report = run(enc, repair_image=True, key_provider=fixed_key)
    assert report.exit_code == 1, report.to_text()
    assert report.repair["recheck"]["errors"] == 0
    # The old region is untouched (stale now); the new one holds fresh seals.
    with FileDevice(enc, read_only=True) as dev:
        sb, _ = read_superblock(dev)
        start_block, blocks = sb.regions[old_region]
        assert sb.active_region != old_region
        assert hashlib.sha256(dev.read(start_block * fmt.BLOCK_SIZE, blocks * fmt.BLOCK_SIZE)).hexdigest() == old_hash
    assert state(enc) == {"a": VALUES["a"], "b": VALUES["b"]}
    assert run(enc, repair_image=True, key_provider=fixed_key).exit_code == 0


def test_repairing_an_encrypted_image_without_the_key_is_refused_and_writes_nothing(enc):
    recs, _, _ = records(enc)
    first_chunk = next(r for r in recs if r.header.type == fmt.PAYLOAD)
    patch(enc, first_chunk.offset + fmt.HEADER_SIZE, b"\x00\x00\x00\x00")
    with open(enc, "rb") as f:
        before = hashlib.sha256(f.read()).hexdigest()
    report = run(enc, repair_image=True)
    assert report.exit_code == 4
    assert any("needs the key" in b for b in report.repair["blocked"])
    with open(enc, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == before


def test_unreachable_keystore_is_an_operational_error(enc, tmp_path):
    proc = fsck(enc, "--keystore-socket", str(tmp_path / "no.sock"))
    assert proc.returncode == 8
    assert "cannot check" in proc.stderr



def test_a_key_that_does_not_match_the_image_is_refused_before_any_check(enc):
    before = hashlib.sha256(open(enc, "rb").read()).hexdigest()
    report = run(enc, repair_image=True, key_provider=lambda sb: bytes(32))
    assert report.exit_code == 8
    assert "does not match this image" in report.operational_error
    assert hashlib.sha256(open(enc, "rb").read()).hexdigest() == before


def test_without_a_key_check_a_wrong_key_fails_everything_and_repair_refuses_to_guess(enc):
    _forge_superblock(enc, key_check=bytes(16))  # as if formatted without a key at hand
    before = hashlib.sha256(open(enc, "rb").read()).hexdigest()
    report = run(enc, repair_image=True, key_provider=lambda sb: bytes(32))
    assert report.exit_code == 4
    assert [i.kind for i in report.errors] == ["integrity"] * len(VALUES)
    assert any("wrong key" in b for b in report.repair["blocked"])
    assert hashlib.sha256(open(enc, "rb").read()).hexdigest() == before
    assert run(enc, key_provider=fixed_key).exit_code == 0  # the right key still reads it all


def test_any_repair_of_an_encrypted_image_needs_the_key(enc):
    # Found by the mutation tests: a txn-reserve error alone once led repair
    # to rewrite sealed values without a cipher.
    _forge_superblock(enc, txn_reserved=0)
    before = hashlib.sha256(open(enc, "rb").read()).hexdigest()
    report = run(enc, repair_image=True)
    assert report.exit_code == 4 and [i.kind for i in report.errors] == ["txn-reserve"]
    assert any("needs the key" in b for b in report.repair["blocked"])
    assert hashlib.sha256(open(enc, "rb").read()).hexdigest() == before
    fixed = run(enc, repair_image=True, key_provider=fixed_key)
    assert fixed.exit_code == 1, fixed.to_text()
    assert state(enc) == VALUES
