"""Opening a vault: passphrase alone on a new machine, passwd, recovery secret, wrong secrets."""

from __future__ import annotations

import os
import shutil
import tempfile

from tests.vault.conftest import start
from tests.vault.trees import make_tree, snapshot_of


def test_a_copy_of_the_image_opens_with_the_passphrase_alone_on_a_new_machine(vault_env, tmp_path):
    src = str(tmp_path / "src")
    make_tree(src, files=12)
    vault_env.cli("init")
    snap = vault_env.cli("backup", src)["snapshot"]
    vault_env.statefsd.stop()
    other = tempfile.mkdtemp(prefix="sfn", dir="/tmp")
    try:
        shutil.copy(os.path.join(vault_env.dir, "vault.img"), os.path.join(other, "vault.img"))
        # A new machine: another keystored (another device key), and no keystored at all for the CLI.
        fresh = start(other, sign_log=False)
        try:
            target = tmp_path / "restored"
            fresh.cli("restore", f"{snap}:{src}", "--target", str(target), STATEFS_KEYSTORE_SOCKET=None)
            assert snapshot_of(str(target / "src")) == snapshot_of(src)
            wrong = fresh.cli("snapshots", check=False, STATEFS_KEYSTORE_SOCKET=None,
                              STATEFS_VAULT_PASSPHRASE="not the passphrase")
            assert wrong.returncode == 26 and "passphrase" in wrong.stderr
            nothing = fresh.cli("snapshots", check=False, STATEFS_KEYSTORE_SOCKET=None, STATEFS_VAULT_PASSPHRASE=None)
            assert nothing.returncode == 20 and "--passphrase-file" in nothing.stderr
            # The new device has not joined: its keystored alone does not open the vault.
            alone = fresh.cli("snapshots", check=False, STATEFS_VAULT_PASSPHRASE=None)
            assert alone.returncode == 20
        finally:
            fresh.statefsd.stop()
            fresh.keystored.stop()
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_the_device_that_made_the_vault_opens_it_without_a_passphrase(vault_env, tmp_path):
    vault_env.cli("init")
    assert vault_env.cli("snapshots", STATEFS_VAULT_PASSPHRASE=None) == []


def test_key_passwd_changes_the_passphrase_without_touching_the_data(vault_env, tmp_path):
    src = str(tmp_path / "src")
    make_tree(src, files=8)
    vault_env.cli("init")
    vault_env.cli("backup", src)
    objects_before = vault_env.client().list("vault/d/")
    vault_env.cli("key", "passwd", STATEFS_VAULT_NEW_PASSPHRASE="a new passphrase")
    assert vault_env.client().list("vault/d/") == objects_before
    old = vault_env.cli("snapshots", check=False, STATEFS_KEYSTORE_SOCKET=None)
    assert old.returncode == 26
    assert len(vault_env.cli("snapshots", STATEFS_KEYSTORE_SOCKET=None,
                             STATEFS_VAULT_PASSPHRASE="a new passphrase")) == 1


def test_the_recovery_secret_opens_the_vault_and_a_new_one_replaces_it(vault_env, tmp_path):
    vault_env.cli("init")
    first = vault_env.cli("key", "export-recovery")["recovery"]
    second = vault_env.cli("key", "export-recovery")["recovery"]
    assert first != second
    good, stale = tmp_path / "good", tmp_path / "stale"
    good.write_text(second.lower().replace("-", " ") + "\n")     # spacing and case do not matter
    stale.write_text(first)
    opened = vault_env.cli("snapshots", "--recovery-file", str(good), STATEFS_KEYSTORE_SOCKET=None,
                           STATEFS_VAULT_PASSPHRASE=None)
    assert opened == []
    refused = vault_env.cli("snapshots", "--recovery-file", str(stale), check=False,
                            STATEFS_KEYSTORE_SOCKET=None, STATEFS_VAULT_PASSPHRASE=None)
    assert refused.returncode == 26
    garbage = tmp_path / "garbage"
    garbage.write_text("not a secret")
    bad = vault_env.cli("snapshots", "--recovery-file", str(garbage), check=False, STATEFS_KEYSTORE_SOCKET=None)
    assert bad.returncode == 10 and "recovery secret" in bad.stderr


def test_init_twice_and_a_vault_command_without_a_vault_say_what_to_do(vault_env):
    missing = vault_env.cli("snapshots", check=False)
    assert missing.returncode == 11 and "statefs vault init" in missing.stderr
    vault_env.cli("init")
    again = vault_env.cli("init", check=False)
    assert again.returncode == 10 and "already holds a vault" in again.stderr


def test_backup_without_keystored_says_how_to_sign(vault_env, tmp_path):
    vault_env.cli("init")
    proc = vault_env.cli("backup", str(tmp_path), check=False, STATEFS_KEYSTORE_SOCKET=None)
    assert proc.returncode == 20 and "STATEFS_KEYSTORE_SOCKET" in proc.stderr


