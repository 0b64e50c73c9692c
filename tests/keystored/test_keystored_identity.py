"""The device identity: creation, reuse, derivation, signatures, sealing, damage."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import crc32c
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.exceptions import InvalidSignature

from keystored import keyfile
from keystored.client import verify_signature
from keystored.identity import Identity
from statefsd.errors import Code, EntropyNotReady

PASS = {"STATEFS_KEY_PASSPHRASE": "correct horse battery staple"}
CHEAP_SEAL = keyfile.SealParams(time_cost=1, memory_cost_kib=64, parallelism=1)


def test_first_start_creates_a_0600_key_file_in_a_0700_state_dir(keystored):
    st = os.stat(keystored.key_path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keystored.state_dir).st_mode) == 0o700
    assert keystored.key_path.read_bytes()[:8] == b"STATEFSK"
    assert not os.path.exists(str(keystored.key_path) + ".tmp")
    created = keystored.log_events("identity_created")
    assert len(created) == 1
    with keystored.client() as ks:
        assert created[0]["fields"]["public_key"] == ks.public_key().hex()


def test_creating_an_unsealed_key_file_says_so_on_stderr(keystored):
    assert f"keystored: warning: {keystored.key_path} is written unsealed" in keystored.stderr
    assert "STATEFS_KEY_PASSPHRASE" in keystored.stderr


def test_creating_a_sealed_key_file_gives_no_unsealed_warning(launcher):
    sealed = launcher.start(env=PASS)
    assert "unsealed" not in sealed.stderr


def test_restart_reuses_the_same_identity(launcher):
    first = launcher.start()
    with first.client() as ks:
        public = ks.public_key()
        key = ks.derive("statefs.data", b"dev-1")
        signature = ks.sign("statefs.superblock", b"generation 7")
    key_file = first.key_path.read_bytes()
    assert first.stop() == 0

    second = launcher.start()
    assert second.log_events("identity_loaded") and not second.log_events("identity_created")
    with second.client() as ks:
        assert ks.public_key() == public
        assert ks.derive("statefs.data", b"dev-1") == key
        assert ks.sign("statefs.superblock", b"generation 7") == signature
    assert second.key_path.read_bytes() == key_file


def test_separate_state_dirs_get_independent_identities(launcher, tmp_path, sock_dir):
    a = launcher.start()
    b = launcher.start(state_dir=tmp_path / "other", socket_path=os.path.join(sock_dir, "b.sock"))
    with a.client() as ka, b.client() as kb:
        assert ka.public_key() != kb.public_key()
        assert ka.derive("statefs.data") != kb.derive("statefs.data")


def test_derive_is_deterministic_per_label_and_context_and_differs_across_them(keystored):
    with keystored.client() as ks:
        base = ks.derive("statefs.data", b"ctx")
        assert len(base) == 32
        assert ks.derive("statefs.data", b"ctx") == base
        variants = [
            ks.derive("statefs.data", b"ctx2"),
            ks.derive("statefs.data", b""),
            ks.derive("statefs.meta", b"ctx"),
            # label/context boundary must not be shiftable: "statefs.data"+"\0x" vs "statefs.datax"
            ks.derive("statefs.datac", b"tx"),
            ks.derive("statefs.data", b"ctx", 64)[:32],
        ]
        assert len(set(variants + [base])) == len(variants) + 1
        short = ks.derive("statefs.data", b"ctx", 16)
        assert len(short) == 16 and short != base[:16]


def test_derived_key_matches_the_documented_hkdf_bytes(keystored):
    # docs/keystored.md: plain key file body at offset 64 is root secret || seed;
    # info = "statefs/v1/derive\0" || label || "\0" || u16be(length) || context.
    root = keystored.key_path.read_bytes()[64:96]
    info = b"statefs/v1/derive\x00" + b"statefs.data" + b"\x00" + (32).to_bytes(2, "big") + b"\x00ctx\xff"
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(root)
    with keystored.client() as ks:
        assert ks.derive("statefs.data", b"\x00ctx\xff") == expected


def test_signature_verifies_and_is_bound_to_label_and_message(keystored):
    with keystored.client() as ks:
        public = ks.public_key()
        sig = ks.sign("statefs.superblock", b"payload")
    assert len(public) == 32 and len(sig) == 64
    assert verify_signature(public, "statefs.superblock", b"payload", sig)
    assert not verify_signature(public, "statefs.journal", b"payload", sig)
    assert not verify_signature(public, "statefs.superblock", b"payload!", sig)
    assert not verify_signature(public, "statefs.superblock", b"payload", sig[:-1] + bytes([sig[-1] ^ 1]))


def test_signature_is_domain_separated_from_a_plain_ed25519_signature(keystored):
    with keystored.client() as ks:
        public = Ed25519PublicKey.from_public_bytes(ks.public_key())
        sig = ks.sign("statefs.superblock", b"payload")
    with pytest.raises(InvalidSignature):
        public.verify(sig, b"payload")
    public.verify(sig, b"statefs/v1/sign\x00statefs.superblock\x00payload")  # the documented bytes


def test_passphrase_sealed_key_file_round_trips(launcher):
    first = launcher.start(env=PASS)
    data = first.key_path.read_bytes()
    assert data[10] == 1  # seal type: Argon2id + XChaCha20-Poly1305
    with first.client() as ks:
        public, key = ks.public_key(), ks.derive("statefs.data")
    assert first.stop() == 0

    second = launcher.start(env=PASS)
    assert second.log_events("identity_loaded")[0]["fields"]["sealed"] is True
    with second.client() as ks:
        assert (ks.public_key(), ks.derive("statefs.data")) == (public, key)


def test_passphrase_can_come_from_a_named_environment_variable(launcher):
    first = launcher.start("--passphrase-env", "MY_PASS", env={"MY_PASS": "s3cret"})
    assert first.key_path.read_bytes()[10] == 1
    assert first.stop() == 0
    assert launcher.start("--passphrase-env", "MY_PASS", env={"MY_PASS": "s3cret"}).proc.poll() is None


def test_wrong_passphrase_is_refused_with_clear_error(launcher):
    assert launcher.start(env=PASS).stop() == 0
    before = launcher.state_dir.joinpath("identity.key").read_bytes()

    refused = launcher.fail(env={"STATEFS_KEY_PASSPHRASE": "wrong"})
    assert refused.proc.returncode == Code.EPASSPHRASE
    assert "EPASSPHRASE: wrong passphrase" in refused.stderr
    assert "keystored: ready" not in refused.stderr
    assert not os.path.exists(launcher.socket)
    assert launcher.state_dir.joinpath("identity.key").read_bytes() == before


def test_sealed_key_file_without_passphrase_is_refused(launcher):
    assert launcher.start(env=PASS).stop() == 0
    refused = launcher.fail()
    assert refused.proc.returncode == Code.EPASSPHRASE
    assert "sealed with a passphrase and none was given" in refused.stderr


def test_named_passphrase_variable_that_is_unset_is_refused(launcher):
    refused = launcher.fail("--passphrase-env", "NOT_SET_ANYWHERE")
    assert refused.proc.returncode == Code.EPASSPHRASE
    assert "NOT_SET_ANYWHERE is not set" in refused.stderr
    assert not launcher.state_dir.joinpath("identity.key").exists()


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:]


def _version_2(data: bytes) -> bytes:
    body = data[:8] + (2).to_bytes(2, "big") + data[10:-4]
    return body + crc32c.crc32c(body).to_bytes(4, "big")


def _write_key_file(launcher, passphrase: bytes | None = None) -> Path:
    """A valid key file made by the same code keystored uses (cheap Argon2 cost when sealed)."""
    launcher.state_dir.mkdir(mode=0o700)
    state_dir = keyfile.StateDir(str(launcher.state_dir))
    state_dir.write_key(keyfile.encode(Identity.generate(), passphrase, CHEAP_SEAL))
    state_dir.close()
    return Path(state_dir.key_path)


@pytest.mark.parametrize(
    "damage, code, words",
    [
        (lambda d: b"NOTAKEY!" + d[8:], Code.ECORRUPT, "bad magic"),
        (lambda d: d[:100], Code.ECORRUPT, "truncated"),
        (lambda d: b"", Code.ECORRUPT, "truncated"),
        (lambda d: _flip(d, 70), Code.ECORRUPT, "CRC32C mismatch"),
        (lambda d: _flip(d, len(d) - 1), Code.ECORRUPT, "CRC32C mismatch"),
        (lambda d: d + b"\x00", Code.ECORRUPT, "trailing bytes"),
        (_version_2, Code.EFORMAT, "format version 2"),
    ],
    ids=["bad-magic", "truncated", "empty", "flipped-secret", "flipped-crc", "trailing", "future-version"],
)
def test_corrupt_key_file_is_refused_and_never_regenerated(launcher, damage, code, words):
    key_path = _write_key_file(launcher)
    damaged = damage(key_path.read_bytes())
    key_path.write_bytes(damaged)

    refused = launcher.fail()
    assert refused.proc.returncode == code
    assert words in refused.stderr and str(key_path) in refused.stderr
    assert "keystored never overwrites it" in refused.stderr or code != Code.ECORRUPT
    assert key_path.read_bytes() == damaged
    assert not os.path.exists(launcher.socket)


def test_damaged_sealed_key_file_is_reported_as_corrupt_not_as_wrong_passphrase(launcher):
    key_path = _write_key_file(launcher, PASS["STATEFS_KEY_PASSPHRASE"].encode())
    key_path.write_bytes(_flip(key_path.read_bytes(), 100))
    refused = launcher.fail(env=PASS)
    assert refused.proc.returncode == Code.ECORRUPT
    assert "CRC32C mismatch" in refused.stderr


def test_entropy_not_ready_serves_no_keys_and_creates_no_identity(launcher):
    daemon = launcher.start(env={"KEYSTORED_TEST_ENTROPY_NOT_READY": "1"})
    assert "kernel entropy is not ready" in daemon.stderr
    with daemon.client() as ks:
        assert ks.hello()["identity_ready"] is False
        for call in (lambda: ks.derive("statefs.data"), lambda: ks.sign("statefs.sb", b"m"), ks.public_key):
            with pytest.raises(EntropyNotReady) as err:
                call()
            assert err.value.code == Code.EENTROPY
    assert not daemon.key_path.exists()
    assert daemon.stop() == 0

    # Once the kernel has entropy, the identity is created as usual.
    with launcher.start().client() as ks:
        assert len(ks.derive("statefs.data")) == 32


def test_identity_is_created_as_soon_as_entropy_arrives(launcher, tmp_path):
    not_ready = tmp_path / "entropy-not-ready"
    not_ready.touch()
    daemon = launcher.start(env={"KEYSTORED_TEST_ENTROPY_NOT_READY": str(not_ready)})
    with daemon.client() as ks:
        with pytest.raises(EntropyNotReady):
            ks.derive("statefs.data")
        not_ready.unlink()  # the kernel pool is seeded now
        (created,) = daemon.wait_log_events("identity_created", 1)
        assert ks.public_key().hex() == created["fields"]["public_key"]
        assert len(ks.derive("statefs.data")) == 32
    assert stat.S_IMODE(os.stat(daemon.key_path).st_mode) == 0o600


def test_existing_key_file_is_served_even_before_entropy_is_ready(launcher):
    first = launcher.start()
    with first.client() as ks:
        public = ks.public_key()
    assert first.stop() == 0
    daemon = launcher.start(env={"KEYSTORED_TEST_ENTROPY_NOT_READY": "1"})
    with daemon.client() as ks:
        assert ks.public_key() == public
        assert len(ks.derive("statefs.data")) == 32
