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


def encrypted_image(path):
    create_image(path, 8 << 20)
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
