"""Damage and tampering: check finds it, restore names the files and restores the rest."""

from __future__ import annotations

import os

from statefsd.vault import records as rec
from statefsd.vault import tree
from tests.vault.trees import make_tree


def backed_up(vault_env, tmp_path):
    """A vault with one snapshot of the test tree: (source dir, snapshot id, opened vault)."""
    src = str(tmp_path / "src")
    make_tree(src)
    vault_env.cli("init")
    return src, vault_env.cli("backup", src)["snapshot"], vault_env.open()


def _file_chunk(vault, snap_id: str, path: str) -> bytes:
    snap = vault.find_snapshot(snap_id)
    entry = tree.find_entry(vault.objects(), snap["root"], os.fsencode(path.lstrip("/")))
    return next(tree.iter_file_chunks(vault.objects(), entry))[0]


def test_check_is_clean_on_a_healthy_vault_and_proves_every_chunk_with_read_data(vault_env, tmp_path):
    src = str(tmp_path / "src")
    make_tree(src)
    vault_env.cli("init")
    vault_env.cli("backup", src)
    result = vault_env.cli("check", "--read-data")
    assert result["problems"] == [] and result["exit"] == 0
    assert result["chunk_bytes_read"] >= 3 << 20
    assert result["chain"]["committed_txns"] > 0


def test_a_tampered_chunk_is_found_by_check_and_restore_names_the_file_and_restores_the_rest(vault_env, tmp_path):
    src, snap, vault = backed_up(vault_env, tmp_path)
    victim = os.path.join(src, "docs", "file-005.txt")
    cid = _file_chunk(vault, snap, victim)
    client = vault_env.client()
    sealed = bytearray(client.get(rec.data_key(cid)))
    sealed[40] ^= 0x01                                   # one flipped bit in the ciphertext
    client.put(rec.data_key(cid), bytes(sealed))

    assert vault_env.cli("check", check=False, json_out=False).returncode == 0      # records only: not read
    proc = vault_env.cli("check", "--read-data", check=False, json_out=False)
    assert proc.returncode == 4
    assert cid.hex() in proc.stdout and "file-005.txt" in proc.stdout

    target = tmp_path / "out"
    restored = vault_env.cli("restore", snap, "--target", str(target), check=False, json_out=False)
    assert restored.returncode == 14
    assert "file-005.txt" in restored.stderr
    assert not os.path.exists(str(target) + victim)
    assert not [n for n in os.listdir(str(target) + os.path.dirname(victim)) if ".statefs-restore-" in n]
    with open(str(target) + os.path.join(src, "docs", "file-001.txt"), "rb") as f:
        assert f.read() == open(os.path.join(src, "docs", "file-001.txt"), "rb").read()


def test_a_chunk_swapped_for_another_is_caught_by_its_id(vault_env, tmp_path):
    src, snap, vault = backed_up(vault_env, tmp_path)
    a = _file_chunk(vault, snap, os.path.join(src, "file-004.txt"))
    b = _file_chunk(vault, snap, os.path.join(src, "file-008.txt"))
    client = vault_env.client()
    client.put(rec.data_key(a), client.get(rec.data_key(b)))    # a valid sealed object, under the wrong name
    proc = vault_env.cli("check", "--read-data", check=False, json_out=False)
    assert proc.returncode == 4 and a.hex() in proc.stdout


def test_a_tampered_tree_node_is_found_by_check_and_restore_goes_on_with_the_other_directories(vault_env, tmp_path):
    src, snap, vault = backed_up(vault_env, tmp_path)
    docs = tree.find_entry(vault.objects(), vault.find_snapshot(snap)["root"],
                           os.fsencode(os.path.join(src, "docs").lstrip("/")))
    client = vault_env.client()
    sealed = bytearray(client.get(rec.data_key(docs.content)))
    sealed[-1] ^= 0x80
    client.put(rec.data_key(docs.content), bytes(sealed))
    proc = vault_env.cli("check", check=False, json_out=False)
    assert proc.returncode == 4 and "failed authentication" in proc.stdout
    assert f"{snap[:8]}:{src}/docs" in proc.stdout

    target = tmp_path / "out"
    restored = vault_env.cli("restore", f"{snap}:{src}", "--target", str(target), check=False, json_out=False)
    assert restored.returncode == 14 and "/docs/: damaged" in restored.stderr
    assert not os.listdir(target / "src" / "docs")          # nothing below the damaged node is trusted
    with open(target / "src" / "file-000.txt", "rb") as f:   # the rest of the tree is restored
        assert f.read() == open(os.path.join(src, "file-000.txt"), "rb").read()


def test_a_forged_snapshot_signature_is_reported(vault_env, tmp_path):
    src = str(tmp_path / "src")
    make_tree(src, files=4)
    vault_env.cli("init")
    snap_id = vault_env.cli("backup", src)["snapshot"]
    vault = vault_env.open()
    name = rec.snapshot_key(bytes.fromhex(snap_id))
    snap, _ = vault.read_record(name)
    snap["tags"] = ["added-later"]                       # someone with the vault key but not the device key
    vault_env.client().put(name, rec.seal_record(vault.keys.record_seal, name, snap))
    proc = vault_env.cli("check", check=False, json_out=False)
    assert proc.returncode == 4 and "does not verify" in proc.stdout


def test_check_usage_errors_exit_16_as_fsck_does(vault_env):
    proc = vault_env.cli("check", "--no-such-flag", check=False, json_out=False)
    assert proc.returncode == 16
