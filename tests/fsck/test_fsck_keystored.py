"""fsck-statefs --keystore-socket against a real keystored process: the key
that authenticates every sealed payload comes over the real socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from statefsd.keystore import KeystoreSigner, keystore_key_provider

from fsck_images import REPO, fsck, make_image, put_each, records, state, tamper_sealed_txn

READY_LINE = "keystored: ready"


@pytest.fixture(scope="module")
def keystore_socket(tmp_path_factory):
    sock_dir = tempfile.mkdtemp(prefix="fsck-ks-", dir="/tmp")  # sun_path is short
    sock = os.path.join(sock_dir, "keystored.sock")
    env = {k: v for k, v in os.environ.items() if k not in ("STATEFS_KEY_PASSPHRASE", "NOTIFY_SOCKET")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-m", "keystored", "--state-dir",
                             str(tmp_path_factory.mktemp("ks-state")), "--socket", sock],
                            env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        for line in proc.stderr:
            if READY_LINE in line:
                break
            if time.monotonic() > deadline:
                pytest.fail("keystored did not become ready")
        else:
            pytest.fail(f"keystored exited {proc.wait()} before ready")
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_keystored_key_authenticates_and_repair_drops_the_tampered_txn(tmp_path, keystore_socket):
    key = keystore_key_provider(keystore_socket)
    path = make_image(tmp_path / "enc.img", encryption="on")
    put_each(path, {"wifi/psk": b"hunter2" * 10, "cert": os.urandom(100_000)}, key_provider=key)
    clean = fsck(path, "--keystore-socket", keystore_socket, "--json")
    assert clean.returncode == 0 and json.loads(clean.stdout)["authentication"] == "verified"

    recs, _, _ = records(path)
    offset = tamper_sealed_txn(path, max(r.header.txn_id for r in recs))
    assert fsck(path).returncode == 0  # without the key only checksums can be checked
    found = fsck(path, "--keystore-socket", keystore_socket, "--json")
    assert found.returncode == 4
    (bad,) = [f for f in json.loads(found.stdout)["findings"] if f["severity"] == "error"]
    assert bad["kind"] == "integrity" and bad["offset"] == offset

    assert fsck(path, "--keystore-socket", keystore_socket, "--repair").returncode == 1
    assert fsck(path, "--keystore-socket", keystore_socket, "--repair").returncode == 0
    assert state(path, key_provider=key) == {"wifi/psk": b"hunter2" * 10}


def test_signed_checkpoints_are_verified_with_the_device_key(tmp_path, keystore_socket):
    path = make_image(tmp_path / "signed.img")
    put_each(path, {"a": b"1", "b": b"2"}, signer=KeystoreSigner(keystore_socket))  # checkpoint at unmount
    without = json.loads(fsck(path, "--json").stdout)
    assert without["exit_code"] == 0 and without["summary"]["checkpoints"] == 1
    assert any(f["kind"] == "checkpoint" and "not verified" in f["reason"] for f in without["findings"])
    with_key = json.loads(fsck(path, "--keystore-socket", keystore_socket, "--json").stdout)
    assert with_key["exit_code"] == 0 and with_key["summary"]["verified_checkpoints"] == 1
    assert not any(f["kind"] == "checkpoint" for f in with_key["findings"])


def test_checkpoint_signed_by_another_key_is_corruption(tmp_path, keystore_socket):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from statefsd.storage import format as fmt

    class Impostor:  # a well-formed signature by a key that is not this device's
        _key = Ed25519PrivateKey.generate()
        public_key = _key.public_key().public_bytes_raw()

        def sign(self, label: str, message: bytes) -> bytes:
            return self._key.sign(message)

    path = make_image(tmp_path / "forged.img")
    put_each(path, {"a": b"1"}, signer=Impostor())
    rep = json.loads(fsck(path, "--keystore-socket", keystore_socket, "--json").stdout)
    assert rep["exit_code"] == 4
    (bad,) = [f for f in rep["findings"] if f["severity"] == "error"]
    assert bad["kind"] == "corruption" and bad["record"] == fmt.RECORD_TYPES[fmt.CHECKPOINT]
    assert "not this device" in bad["reason"]
    # Repair keeps the transaction before the forged checkpoint and signs with the real key.
    assert fsck(path, "--keystore-socket", keystore_socket, "--repair").returncode == 1
    again = json.loads(fsck(path, "--keystore-socket", keystore_socket, "--json").stdout)
    assert again["exit_code"] == 0 and again["summary"]["verified_checkpoints"] == 1
    assert state(path) == {"a": b"1"}


def test_a_signed_image_rebuilt_after_losing_both_superblocks_still_verifies_its_checkpoints(tmp_path, keystore_socket):
    from statefsd.storage import format as fmt
    from fsck_images import mount, patch
    signer = KeystoreSigner(keystore_socket)
    path = make_image(tmp_path / "signed.img", 4 << 20)
    put_each(path, {"a": b"1", "b": b"2"}, signer=signer)
    with mount(path, signer=signer) as e:
        e.compact()          # the new region opens with a checkpoint over the chain head
        e.put("c", b"3")
    before = state(path)
    for offset in fmt.SUPERBLOCK_OFFSETS:
        patch(path, offset, os.urandom(fmt.BLOCK_SIZE))

    assert fsck(path, "--keystore-socket", keystore_socket, "--repair").returncode == 1
    rep = json.loads(fsck(path, "--keystore-socket", keystore_socket, "--json").stdout)
    assert rep["exit_code"] == 0, rep["findings"]
    assert rep["superblock"]["active_region"] == 1
    assert rep["summary"]["verified_checkpoints"] == rep["summary"]["checkpoints"] >= 2
    assert state(path, signer=signer) == before
