"""statefsd and keystored as real processes: encrypted images get their key
from keystored, and every way of not getting it is a clear refusal."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine
from statefsd.errors import Code
from tests.daemon.harness import REPO, Daemon, env_with_repo, short_tempdir


class Keystored:
    def __init__(self, state_dir, socket_path, *extra):
        self.socket = socket_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keystored", "--state-dir", state_dir, "--socket", socket_path, *extra],
            cwd=REPO, env=env_with_repo(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 20
        while not os.path.exists(socket_path):
            assert self.proc.poll() is None and time.time() < deadline, "keystored did not start"
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def workdir():
    d = short_tempdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def encrypted_image(path, size=8 << 20):
    create_image(path, size)
    with FileDevice(path) as dev:
        Engine.mkfs(dev, encryption="on")
    return path


def test_encrypted_image_is_served_with_the_key_from_keystored_across_restarts(workdir):
    ks = Keystored(f"{workdir}/keys", f"{workdir}/ks.sock")
    image = encrypted_image(f"{workdir}/enc.img")
    try:
        d = Daemon(image, f"{workdir}/s.sock", extra=["--keystore-socket", ks.socket])
        assert "statefsd: encryption on (xchacha20poly1305)" in d.stdout
        with d.client() as c:
            c.put("secret", b"TOP-SECRET-VALUE" * 10)
        assert d.stop() == 0
        assert b"TOP-SECRET-VALUE" not in open(image, "rb").read()
        d = Daemon(image, f"{workdir}/s.sock", extra=["--keystore-socket", ks.socket])
        with d.client() as c:
            assert c.get("secret") == b"TOP-SECRET-VALUE" * 10
        assert d.stop() == 0
    finally:
        ks.stop()


def test_unreachable_keystored_refuses_the_mount_with_no_plaintext_fallback(workdir):
    image = encrypted_image(f"{workdir}/enc.img")
    d = Daemon(image, f"{workdir}/s.sock", extra=["--keystore-socket", f"{workdir}/missing.sock"], wait=False)
    assert d.wait_exit() == Code.EKEY
    assert any("missing.sock" in line for line in d.stderr), d.stderr


def test_keystored_refusing_the_label_refuses_the_mount(workdir):
    ks = Keystored(f"{workdir}/keys", f"{workdir}/ks.sock", "--allow", "0:other.*")
    image = encrypted_image(f"{workdir}/enc.img")
    try:
        d = Daemon(image, f"{workdir}/s.sock", extra=["--keystore-socket", ks.socket], wait=False)
        assert d.wait_exit() == Code.EACCES
        assert any("EACCES" in line for line in d.stderr), d.stderr
    finally:
        ks.stop()


def test_a_different_device_identity_is_refused_at_mount_by_the_key_check(workdir):
    image = encrypted_image(f"{workdir}/enc.img")
    ks = Keystored(f"{workdir}/keys1", f"{workdir}/ks.sock")
    try:
        d = Daemon(image, f"{workdir}/s.sock", extra=["--keystore-socket", ks.socket])
        with d.client() as c:
            c.put("k", b"v")
        d.stop()
    finally:
        ks.stop()
    ks = Keystored(f"{workdir}/keys2", f"{workdir}/ks2.sock")  # a new identity: another root secret
    try:
        d = Daemon(image, f"{workdir}/s.sock", extra=["--keystore-socket", ks.socket], wait=False)
        assert d.wait_exit() == Code.EKEY
        assert any("does not match this image" in line for line in d.stderr), d.stderr
    finally:
        ks.stop()


def test_puts_with_keystored_gone_answer_ok_and_the_failed_checkpoint_is_audited_and_retried(workdir):
    from statefsd.storage.engine import CHECKPOINT_EVERY
    ks = Keystored(f"{workdir}/keys", f"{workdir}/ks.sock")
    image = encrypted_image(f"{workdir}/enc.img", 32 << 20)  # room for 2,048 puts without compaction
    audit = f"{workdir}/audit.jsonl"
    d = Daemon(image, f"{workdir}/s.sock", audit=audit, extra=["--keystore-socket", ks.socket])
    try:
        ks.stop()  # the payload key is already held; only checkpoint signatures need keystored now
        puts = CHECKPOINT_EVERY + 76
        with d.client() as c:
            txns = [c.put(f"k/{i}", b"v%d" % i) for i in range(puts)]
            assert all(isinstance(t, int) for t in txns) and txns == sorted(set(txns))
            assert all(c.get(f"k/{i}") == b"v%d" % i for i in range(puts))
        failed = [e["fields"] for e in d.audit_events() if e["event"] == "checkpoint_failed"]
        assert len(failed) == 1, failed
        assert failed[0]["retry_after_commits"] == CHECKPOINT_EVERY
        assert "keystored" in failed[0]["reason"]

        # keystored back with the same identity: the retry, due 1024 commits
        # after the failed one, is signed and nothing in between was refused.
        ks = Keystored(f"{workdir}/keys", f"{workdir}/ks.sock")
        signed_before = sum(e["event"] == "checkpoint" for e in d.audit_events())
        with d.client() as c:
            for i in range(2 * CHECKPOINT_EVERY - puts - 1):
                c.put(f"m/{i}", b"w")
            assert sum(e["event"] == "checkpoint" for e in d.audit_events()) == signed_before
            c.put("m/last", b"w")
        events = d.audit_events()
        assert sum(e["event"] == "checkpoint" for e in events) == signed_before + 1
        assert sum(e["event"] == "checkpoint_failed" for e in events) == 1, events[-5:]
        assert d.stop() == 0
    finally:
        d.kill()
        ks.stop()
