"""The host reads an encrypted guest image with the key file of the guest's key disk.

No QEMU here: the key disks are real ext4 images (mkfs.ext4, read back with debugfs),
keystored and fsck-statefs run as real processes, the image is written by the engine as
the guest's crash writer writes it. scripts/qemu-test.sh runs the same checks after
real guest crashes (qemu/powercut.py, stage crashes-enc-on).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from keystored.keyfile import FILE_NAME
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine
from statefsd.keystore import keystore_key_provider

from qemu.hostkeys import HostKeystore, HostKeystoreError, read_state_file
from qemu.powercut import format_disk, recover_on_host
from qemu.powercut_check import check_device
from qemu.run_guest import make_state_disk

from tests.qemu.test_qemu_powercut import txn

pytestmark = pytest.mark.skipif(not (shutil.which("mkfs.ext4") and shutil.which("debugfs")),
                                reason="e2fsprogs (mkfs.ext4, debugfs) not installed")

SIZE = 4 << 20
REPO = Path(__file__).resolve().parents[2]


def test_key_disk_gives_back_the_files_it_was_made_with(tmp_path):
    disk = tmp_path / "keys.img"
    make_state_disk(disk, files={FILE_NAME: b"\x01key bytes\x00" * 11, "other": b"x"})
    assert read_state_file(disk, FILE_NAME) == b"\x01key bytes\x00" * 11
    assert read_state_file(disk, "other") == b"x"


def test_key_disk_without_a_key_file_is_refused_by_name(tmp_path):
    disk = tmp_path / "keys.img"
    make_state_disk(disk)
    with pytest.raises(HostKeystoreError, match=rf"cannot read /{FILE_NAME} from the key disk"):
        HostKeystore.from_state_disk(disk, tmp_path / "ks")


def crash_writer(image: Path, socket: str, count: int, first: int = 0) -> dict[int, int]:
    """What the guest's crash writer commits through its keystored: n -> txn id."""
    acks = {}
    with Engine.mount(FileDevice(str(image)), key_provider=keystore_key_provider(socket)) as e:
        for n in range(first, first + count):
            acks[n] = e.commit(txn(n))
    return acks


def encrypted_image_with_txns(tmp_path: Path, count: int) -> tuple[Path, Path, dict[int, int]]:
    image, keys = tmp_path / "disk-enc.img", tmp_path / "keys-enc.img"
    format_disk(image, SIZE, keys)
    with HostKeystore.from_state_disk(keys, tmp_path / "guest-keys") as guest_ks:
        acks = crash_writer(image, guest_ks.socket, count)
    return image, keys, acks


def test_encrypted_image_is_checked_whole_with_the_key_from_its_key_disk(tmp_path):
    image, keys, acks = encrypted_image_with_txns(tmp_path, 5)
    # The host's copy of the key made at format time is gone: only the key disk has it.
    assert not (tmp_path / "keys-enc-new").exists()
    verdict, problems = recover_on_host(image, acks, keys, tmp_path / "check")
    assert problems == [] and verdict.ok, problems + verdict.violations
    assert verdict.visible == acks
    assert '"authentication": "verified"' in (tmp_path / "check" / "fsck.json").read_text()


def test_encrypted_image_cannot_be_recovered_without_a_key(tmp_path):
    image, _, acks = encrypted_image_with_txns(tmp_path, 2)
    verdict = check_device(FileDevice(str(image)), acks)
    assert len(verdict.violations) == 1
    assert verdict.violations[0].startswith("recovery mount refused: EKEY")


def test_key_disk_of_another_identity_is_a_violation_for_fsck_and_recovery(tmp_path):
    image, _, acks = encrypted_image_with_txns(tmp_path, 2)
    other_image, other_keys = tmp_path / "other.img", tmp_path / "other-keys.img"
    format_disk(other_image, SIZE, other_keys)
    verdict, problems = recover_on_host(image, acks, other_keys, tmp_path / "check")
    assert any(p.startswith("fsck-statefs exit 8") and "does not match this image" in p
               for p in problems), problems
    assert len(verdict.violations) == 1
    assert verdict.violations[0].startswith("recovery mount refused: EKEY")
    assert "does not match this image" in verdict.violations[0]


def test_damaged_record_of_an_acked_txn_fails_fsck_and_recovery(tmp_path):
    image, keys, acks = encrypted_image_with_txns(tmp_path, 4)
    # Flipped bytes in two sectors of the first txn's group (its paths are the clear part of
    # the PREPARE; its sealed values follow), durable txns after: more than the group's
    # parity trailer rebuilds.
    data = bytearray(image.read_bytes())
    pos = data.find(b"crash/0/a")
    assert pos > 0 and data.find(b"crash/1/a") - pos >= 512
    data[pos + 100] ^= 0x40
    data[pos + 100 + 512] ^= 0x40
    image.write_bytes(bytes(data))
    verdict, problems = recover_on_host(image, acks, keys, tmp_path / "check")
    assert any(p.startswith("fsck-statefs exit 4") for p in problems), problems
    assert verdict.violations and verdict.violations[0].startswith("recovery mount refused: ECORRUPT")


def test_txns_committed_after_the_acked_ones_are_recovered_too(tmp_path):
    image, keys, acks = encrypted_image_with_txns(tmp_path, 3)
    with HostKeystore.from_state_disk(keys, tmp_path / "more") as ks:
        crash_writer(image, ks.socket, 2, first=3)  # committed, never acknowledged to the host
    verdict, problems = recover_on_host(image, acks, keys, tmp_path / "check")
    assert problems == [] and verdict.ok, problems + verdict.violations
    assert sorted(verdict.visible) == [0, 1, 2, 3, 4]


def test_command_line_runs_fsck_with_the_key_of_the_key_disk(tmp_path):
    image, keys, _ = encrypted_image_with_txns(tmp_path, 2)
    other_keys = tmp_path / "other-keys.img"
    format_disk(tmp_path / "other.img", SIZE, other_keys)
    fsck = [sys.executable, "-m", "fsck_statefs", str(image), "--keystore-socket", "{socket}"]
    cmd = [sys.executable, str(REPO / "qemu" / "hostkeys.py"), "--state-disk"]
    ok = subprocess.run([*cmd, str(keys), "--", *fsck], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "authentication: every sealed chunk of the log checked with the image key" in ok.stdout
    assert "4 live keys" in ok.stdout
    wrong = subprocess.run([*cmd, str(other_keys), "--", *fsck], capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 8 and "does not match this image" in wrong.stderr
    empty = tmp_path / "empty-keys.img"
    make_state_disk(empty)
    none = subprocess.run([*cmd, str(empty), "--", *fsck], capture_output=True, text=True, timeout=120)
    assert none.returncode == 8
    assert none.stderr.startswith(f"hostkeys: cannot read /{FILE_NAME} from the key disk")
