"""Push an image's history into an outbox and restore it on a "fresh device"
with only the passphrase: real statefsd, keystored and CLI processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from statefsd.errors import Code
from statefsd.keystore import KeystoreSigner
from statefsd.replica import format as rfmt
from statefsd.vault.keys import VaultKeys
from tests.replica.conftest import image_state, served_state, start
from tests.vault.conftest import PASSPHRASE

CANARY = b"CANARY-plaintext-7f3a"


def write_some(client, start_at: int, count: int, *, size: int = 300) -> None:
    for i in range(start_at, start_at + count):
        with client.transaction() as txn:
            txn.put(f"app/{i:05d}", CANARY + os.urandom(size))
            txn.put(f"counter/{i % 7}", str(i).encode())
            if i % 5 == 0:
                txn.delete(f"app/{i - 3:05d}")


def set_up(env, *extra: str) -> None:
    env.cli("replicate", "init", "--segment-size", "64K", *extra)


@pytest.mark.parametrize("replica_env", ["off", "on"], indirect=True)
def test_a_fresh_device_restores_the_newest_state_with_only_the_passphrase(replica_env, tmp_path):
    env = replica_env
    set_up(env)
    with env.client() as c:
        write_some(c, 0, 120)
        c.put("big/value", os.urandom(300_000))      # spans several 64 KiB segments
        want = served_state(c)
    pushed = env.cli("replicate", "push")
    assert pushed["txns"] >= 121 and pushed["segments_written"] >= 6
    copy = tmp_path / "peer-copy"
    shutil.copytree(env.outbox, copy)
    sizes = {p.stat().st_size for p in (copy / "seg").iterdir()}
    assert sizes == {64 << 10}
    new_image = str(tmp_path / "new.img")
    # No keystored, no socket: a new machine with the passphrase alone.
    result = env.cli("restore", "--from", str(copy), "--image", new_image,
                     STATEFS_KEYSTORE_SOCKET=None, STATEFS_SOCKET=None)
    assert result["stale_copies"] == [] and result["fetched_elsewhere"] == []
    assert image_state(new_image) == want


def test_nothing_but_ciphertext_leaves_the_device(replica_env):
    env = replica_env
    set_up(env)
    with env.client() as c:
        write_some(c, 0, 40)
    env.cli("replicate", "push")
    for path in env.outbox.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert CANARY not in data and b"app/000" not in data and b"counter/" not in data, path


def test_each_push_adds_only_new_segments_and_any_retained_txn_can_be_restored(replica_env, tmp_path):
    env = replica_env
    set_up(env)
    with env.client() as c:
        write_some(c, 0, 30)
        first = served_state(c)
        at = c.info()["next_txn_id"] - 1
    env.cli("replicate", "push")
    before = set((env.outbox / "seg").iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    with env.client() as c:
        write_some(c, 30, 30)
        second = served_state(c)
    env.cli("replicate", "push")
    after = set((env.outbox / "seg").iterdir())
    assert before < after and all(p.stat().st_mtime_ns == mtimes[p] for p in before)
    old = env.cli("restore", "--from", str(env.outbox), "--at", str(at), "--image", str(tmp_path / "a.img"))
    assert old["txn"] == at and image_state(str(tmp_path / "a.img")) == first
    env.cli("restore", "--from", str(env.outbox), "--image", str(tmp_path / "b.img"))
    assert image_state(str(tmp_path / "b.img")) == second
    refused = env.cli("restore", "--from", str(env.outbox), "--at", "999999", "--image",
                      str(tmp_path / "c.img"), check=False, json_out=False)
    assert refused.returncode == Code.ENOTFOUND and "retention" in refused.stderr
    assert not (tmp_path / "c.img").exists() and not (tmp_path / "c.img.partial").exists()


def test_after_a_compaction_a_new_base_is_pushed_and_old_points_stay_restorable(replica_env, tmp_path):
    env = replica_env
    set_up(env)
    with env.client() as c:
        write_some(c, 0, 40)
        at = c.info()["next_txn_id"] - 1
        first = served_state(c)
    env.cli("replicate", "push")
    with env.client() as c:
        write_some(c, 40, 10)
        c.compact()
        write_some(c, 50, 10)
        want = served_state(c)
    pushed = env.cli("replicate", "push")
    assert pushed["generation"] == 2
    env.cli("restore", "--from", str(env.outbox), "--image", str(tmp_path / "new.img"))
    assert image_state(str(tmp_path / "new.img")) == want
    env.cli("restore", "--from", str(env.outbox), "--at", str(at), "--image", str(tmp_path / "old.img"))
    assert image_state(str(tmp_path / "old.img")) == first


def test_old_generations_are_retired_by_a_signed_head_and_deleted_only_then(replica_env):
    env = replica_env
    set_up(env, "--keep-generations", "1")
    with env.client() as c:
        write_some(c, 0, 20)
    env.cli("replicate", "push")
    gen1 = {p.name for p in (env.outbox / "seg").iterdir()}
    with env.client() as c:
        c.compact()
        write_some(c, 20, 5)
    pushed = env.cli("replicate", "push")
    retired = {Path(n).name for n in pushed["retired"] if n.startswith("seg/")}
    assert retired == gen1
    assert not gen1 & {p.name for p in (env.outbox / "seg").iterdir()}
    heads = sorted((env.outbox / "head").iterdir())
    newest = rfmt.decode_head_file(heads[-1].read_bytes(), "head/" + heads[-1].name)
    assert {Path(n).name for n in newest.retired if n.startswith("seg/")} == gen1


def test_a_segment_missing_or_damaged_in_one_copy_is_read_from_another(replica_env, tmp_path):
    env = replica_env
    set_up(env)
    with env.client() as c:
        write_some(c, 0, 60, size=3000)
        want = served_state(c)
    env.cli("replicate", "push")
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(env.outbox, a)
    shutil.copytree(env.outbox, b)
    segs = sorted((a / "seg").iterdir())
    segs[0].unlink()
    damaged = bytearray(segs[1].read_bytes())
    damaged[5000] ^= 0x40
    segs[1].write_bytes(bytes(damaged))
    result = env.cli("restore", "--from", str(a), "--from", str(b), "--image", str(tmp_path / "n.img"))
    assert image_state(str(tmp_path / "n.img")) == want
    events = " ".join(result["fetched_elsewhere"])
    assert segs[0].name in events and "missing" in events and segs[1].name in events and "damaged" in events
    alone = env.cli("restore", "--from", str(a), "--image", str(tmp_path / "m.img"), check=False, json_out=False)
    assert alone.returncode == Code.EINTEGRITY and "every copy" in alone.stderr


def test_a_copy_serving_an_older_head_is_named_stale(replica_env, tmp_path):
    env = replica_env
    set_up(env)
    with env.client() as c:
        write_some(c, 0, 10)
    env.cli("replicate", "push")
    stale = tmp_path / "stale"
    shutil.copytree(env.outbox, stale)
    with env.client() as c:
        write_some(c, 10, 10)
        want = served_state(c)
    env.cli("replicate", "push")
    result = env.cli("restore", "--from", str(stale), "--from", str(env.outbox), "--image", str(tmp_path / "n.img"))
    assert result["stale_copies"] == [str(stale)]
    assert image_state(str(tmp_path / "n.img")) == want


@pytest.mark.parametrize("compacted", [False, True], ids=["same-log", "compacted-since"])
def test_a_rolled_back_image_is_refused_by_push(replica_env, tmp_path, compacted):
    env = replica_env
    set_up(env)
    with env.client() as c:
        write_some(c, 0, 10)
    env.cli("replicate", "push")
    env.statefsd.stop()
    old_copy = str(tmp_path / "old.img")
    shutil.copyfile(env.image, old_copy)
    env.restart()
    with env.client() as c:
        write_some(c, 10, 10)
        if compacted:       # the older copy is of another log epoch: only txn ids tell
            c.compact()
    env.cli("replicate", "push")
    env.restart(old_copy)           # the device now serves the older image
    refused = env.cli("replicate", "push", check=False, json_out=False)
    assert refused.returncode == Code.EROLLBACK and "rolled back" in refused.stderr


def test_a_wrong_passphrase_opens_nothing_and_writes_no_image(replica_env, tmp_path):
    env = replica_env
    set_up(env)
    with env.client() as c:
        write_some(c, 0, 5)
    env.cli("replicate", "push")
    out = env.cli("restore", "--from", str(env.outbox), "--image", str(tmp_path / "n.img"), check=False,
                  json_out=False, STATEFS_VAULT_PASSPHRASE="not it", STATEFS_KEYSTORE_SOCKET=None)
    assert out.returncode == Code.EPASSPHRASE and not (tmp_path / "n.img").exists()


def test_a_vault_snapshot_names_the_point_to_restore(replica_env, tmp_path):
    env = replica_env
    set_up(env)
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.txt").write_text("version one\n")
    first = env.cli("vault", "backup", str(files))["snapshot"]
    with env.client() as c:
        at_first = {k: v for k, v in served_state(c).items() if not k.startswith("vault/session/")}
    (files / "a.txt").write_text("version two\n")
    env.cli("vault", "backup", str(files))
    env.cli("replicate", "push")
    result = env.cli("restore", "--from", str(env.outbox), "--at", first[:8], "--image", str(tmp_path / "n.img"))
    assert result["txn"] > 0
    restored = {k: v for k, v in image_state(str(tmp_path / "n.img")).items() if not k.startswith("vault/session/")}
    assert restored == at_first


def test_replicate_run_pushes_soon_after_each_commit(replica_env):
    env = replica_env
    set_up(env)
    runner = subprocess.Popen([sys.executable, "-m", "statefsd.cli", "replicate", "run", "--interval", "0.2"],
                              env=env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        heads = lambda: sorted((env.outbox / "head").glob("*.sfh")) if (env.outbox / "head").is_dir() else []
        assert wait_for(lambda: len(heads()) == 1, 30), runner.stderr.read() if runner.poll() is not None else ""
        with env.client() as c:
            c.put("app/late", CANARY)
            txn = c.info()["next_txn_id"] - 1
        assert wait_for(lambda: len(heads()) == 2, 30)
        newest = rfmt.decode_head_file(heads()[-1].read_bytes(), "head/" + heads()[-1].name)
        assert newest.counter == 2
    finally:
        runner.terminate()
        runner.wait(timeout=30)
    result = env.cli("restore", "--from", str(env.outbox), "--at", str(txn), "--image", str(env.dir / "n.img"))
    assert image_state(str(env.dir / "n.img"))["app/late"] == CANARY and result["txn"] == txn


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_push_killed_midway_is_rerun_and_what_it_left_is_retired(replica_env, tmp_path):
    env = replica_env
    set_up(env)
    with env.client() as c:
        for i in range(60):
            c.put(f"bulk/{i}", os.urandom(200_000))
        want = served_state(c)
    argv = [sys.executable, "-m", "statefsd.cli", "replicate", "push"]
    push = subprocess.Popen(argv, env=env.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    segs = lambda: set((env.outbox / "seg").glob("*.sfs")) if (env.outbox / "seg").is_dir() else set()
    assert wait_for(lambda: len(segs()) >= 3 or push.poll() is not None, 60)
    push.kill()
    push.wait()
    left = segs()
    assert left and not list((env.outbox / "head").glob("*.sfh")), "the push finished before it was killed"
    rerun = env.cli("replicate", "push")
    retired = {env.outbox / n for n in rerun["retired"]}
    assert left <= retired and not left & segs()
    env.cli("restore", "--from", str(env.outbox), "--image", str(tmp_path / "n.img"))
    assert image_state(str(tmp_path / "n.img")) == want


def test_a_device_rolled_back_whole_is_caught_by_the_newer_head_a_remote_holds(replica_env, tmp_path):
    env = replica_env
    set_up(env)
    remote = tmp_path / "usb-disk"
    env.cli("remote", "add", "usb", f":local:{remote}")
    with env.client() as c:
        write_some(c, 0, 10)
    env.cli("replicate", "push")
    assert env.cli("replicate", "status")["rollback"] == []
    env.statefsd.stop()         # an old backup of the whole device: image and replication state
    shutil.copyfile(env.image, tmp_path / "old.img")
    shutil.copytree(env.state, tmp_path / "old-state")
    env.restart()
    with env.client() as c:
        write_some(c, 10, 10)
    env.cli("replicate", "push")
    env.restart(str(tmp_path / "old.img"))
    shutil.rmtree(env.state)
    shutil.copytree(tmp_path / "old-state", env.state)
    status = env.cli("replicate", "status", check=False)
    assert status.returncode == Code.EROLLBACK, status.stderr
    assert "remote usb holds head 2, newer than this device's head 1" in status.stdout
    journal = (env.state / "audit.jsonl").read_text()
    assert "rollback_detected" in journal


def test_the_recovery_secret_alone_restores_a_copy(replica_env, tmp_path):
    env = replica_env
    set_up(env)
    recovery = env.cli("vault", "key", "export-recovery", json_out=False).stdout.strip()
    (tmp_path / "recovery.txt").write_text(recovery + "\n")
    with env.client() as c:
        write_some(c, 0, 5)
        want = served_state(c)
    env.cli("replicate", "push")
    env.cli("restore", "--from", str(env.outbox), "--image", str(tmp_path / "n.img"),
            "--recovery-file", str(tmp_path / "recovery.txt"),
            STATEFS_VAULT_PASSPHRASE=None, STATEFS_KEYSTORE_SOCKET=None, STATEFS_SOCKET=None)
    assert image_state(str(tmp_path / "n.img")) == want


def test_a_device_restored_onto_a_new_machine_goes_on_and_its_newer_heads_win(replica_env, tmp_path):
    env = replica_env
    set_up(env)
    with env.client() as c:
        write_some(c, 0, 30)            # the old device reaches head 3
    for _ in range(3):
        with env.client() as c:
            c.put("tick", os.urandom(8))
        env.cli("replicate", "push")
    peer = tmp_path / "peer"
    shutil.copytree(env.outbox, peer)
    env.cli("restore", "--from", str(peer), "--image", str(tmp_path / "new.img"))
    env.statefsd.stop()
    env.keystored.stop()
    (tmp_path / "newdev").mkdir()
    new = start(tmp_path / "newdev")    # another machine: its own keystored, so another device key
    try:
        new.statefsd.stop()
        shutil.copyfile(tmp_path / "new.img", new.image)
        new.restart()
        new.cli("replicate", "init", "--segment-size", "64K")
        with new.client() as c:
            c.put("only/new", b"written after the restore")
            want = served_state(c)
        new.cli("replicate", "push")    # head 1 of the new device
        shutil.copytree(new.outbox, peer, dirs_exist_ok=True)   # one folder id: the same peer folder
        result = new.cli("restore", "--from", str(peer), "--image", str(tmp_path / "again.img"))
        assert image_state(str(tmp_path / "again.img")) == want
        assert any("written last" in p for p in result["problems"])
    finally:
        new.statefsd.stop()
        new.keystored.stop()


def test_a_head_listing_thousands_of_segments_is_signed_by_keystored(replica_env):
    signer = KeystoreSigner(replica_env.keystore_socket)
    keys = rfmt.ReplicaKeys.derive(VaultKeys.derive(b"v" * 16, b"m" * 32))
    entries = [rfmt.SegmentEntry(rfmt.segment_name(keys, i), os.urandom(32)) for i in range(5000)]
    head = rfmt.Head(keys.replica_id, signer.public_key, 7, entries, [e.name for e in entries[:4096]],
                     os.urandom(32), b"sealed")
    body = rfmt.encode_head_body(head)
    assert len(body) > 300_000      # far over what keystored signs in one message
    signature = signer.sign(rfmt.HEAD_SIGN_LABEL, rfmt.head_signing_bytes(body))
    decoded = rfmt.decode_head_file(rfmt.encode_head_file(body, signature), rfmt.head_name(signer.public_key, 7))
    assert len(decoded.segments) == 5000 and decoded.counter == 7



def test_a_second_push_while_one_runs_is_refused_and_changes_nothing(replica_env):
    import fcntl
    env = replica_env
    set_up(env)
    with env.client() as c:
        write_some(c, 0, 5)
    env.outbox.mkdir(parents=True, exist_ok=True)
    with open(env.state / "outbox.lock", "w") as held:      # what a running push holds
        fcntl.flock(held, fcntl.LOCK_EX)
        refused = env.cli("replicate", "push", check=False, json_out=False)
    assert refused.returncode == Code.EBUSY and "another push" in refused.stderr
    assert not (env.outbox / "head").exists()
    assert env.cli("replicate", "push")["counter"] == 1


def test_at_says_whether_it_names_a_txn_or_a_snapshot(replica_env, tmp_path):
    env = replica_env
    set_up(env)
    with env.client() as c:
        write_some(c, 0, 5)
        at = c.info()["next_txn_id"] - 1
    env.cli("replicate", "push")
    result = env.cli("restore", "--from", str(env.outbox), "--at", f"txn:{at}", "--image", str(tmp_path / "a.img"))
    assert result["txn"] == at
    bad = env.cli("restore", "--from", str(env.outbox), "--at", "txn:x1", "--image", str(tmp_path / "b.img"),
                  check=False, json_out=False)
    assert bad.returncode == Code.EINVAL and "txn id is a number" in bad.stderr
