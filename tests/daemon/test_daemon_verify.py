"""`verify` end to end: a real statefsd with a real keystored, scrubbed
online while other clients commit and compact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from bench import procs
from statefsd.client import Client
from statefsd.storage import format as fmt
from tests.daemon.harness import env_with_repo
from tests.engine.conftest import committed_records


@pytest.fixture(scope="module")
def short_dir():
    """Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer."""
    path = tempfile.mkdtemp(prefix="sfv", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def keystored(short_dir):
    daemon = procs.keystored(os.path.join(short_dir, "keys"), os.path.join(short_dir, "ks.sock"))
    daemon.socket = os.path.join(short_dir, "ks.sock")
    yield daemon
    daemon.stop()


class Served:
    """An image served by a real statefsd signing with keystored's device key."""

    def __init__(self, short_dir, keystored, name, *, size=32 << 20, encryption="on", redundancy="parity"):
        self.image = os.path.join(short_dir, f"{name}.img")
        self.socket = os.path.join(short_dir, f"{name}.sock")
        self.keystore = keystored.socket
        procs.fresh_image(self.image, size, encryption=encryption, redundancy=redundancy)
        self.start()

    def start(self):
        self.daemon = procs.statefsd(self.image, self.socket, keystore=self.keystore)

    def client(self, **kw):
        return Client(self.socket, **kw)

    def cli(self, *args):
        return subprocess.run([sys.executable, "-m", "statefsd.cli", "--socket", self.socket, *args],
                              capture_output=True, text=True, env=env_with_repo(), timeout=120)

    def flip_byte(self, offset):
        """Rot, written straight into the image file under the running daemon."""
        fd = os.open(self.image, os.O_RDWR)
        try:
            byte = os.pread(fd, 1, offset)[0]
            os.pwrite(fd, bytes([byte ^ 0x10]), offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def stop(self):
        self.daemon.stop()


@pytest.fixture
def served(short_dir, keystored, request):
    made = []

    def make(name, **kw):
        s = Served(short_dir, keystored, f"{request.node.name[:20]}-{name}", **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def test_a_clean_encrypted_image_proves_its_chain_and_every_signed_checkpoint(served):
    s = served("clean")
    with s.client() as c:
        for i in range(1100):   # a checkpoint every 1024 commits
            c.put(f"k{i % 50}", bytes([i % 251]) * 100)
    s.stop()                    # and one at unmount
    s.start()
    with s.client() as c:
        c.put("after-restart", b"v")
        v = c.verify()
        info = c.info()
    assert v["findings"] == {} and v["first_finding"] is None
    assert v["checkpoints"] == v["verified_checkpoints"] == 2
    assert v["chain_head_matches"] and v["chain_head"] == info["chain_head"]
    assert v["committed_txns"] == 1101 and v["scanned_bytes"] == info["log_used"]
    checkpoints = [r.offset for r in committed_records(s.image) if r.header.type == fmt.CHECKPOINT]
    assert v["last_checkpoint_offset"] == checkpoints[-1]

    text = s.cli("verify")
    assert text.returncode == 0, text.stderr
    assert "2 of 2 signatures verified" in text.stdout and "findings:      none" in text.stdout
    as_json = s.cli("verify", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["chain_head"] == v["chain_head"]


def test_commits_from_another_client_keep_succeeding_during_a_verify_of_a_long_log(served):
    s = served("long", size=64 << 20)
    with s.client() as c:
        for i in range(24):
            c.put(f"big{i}", os.urandom(1 << 20))
    stop = threading.Event()
    done: list[float] = []

    def committer():
        with s.client() as other:
            i = 0
            while not stop.is_set():
                other.put(f"small{i % 10}", b"x" * 200)
                done.append(time.monotonic())
                i += 1

    t = threading.Thread(target=committer)
    t.start()
    try:
        while not done:
            time.sleep(0.01)
        with s.client() as c:
            began = time.monotonic()
            v = c.verify()
            ended = time.monotonic()
    finally:
        stop.set()
        t.join()
    during = sum(1 for at in done if began < at < ended)
    print(f"verify of {v['scanned_bytes']} bytes took {v['seconds']} s in the daemon, "
          f"{ended - began:.3f} s at the client; {during} commits of another client finished meanwhile")
    assert v["findings"] == {} and v["chain_head_matches"]
    assert v["scanned_bytes"] > 24 << 20 and v["committed_txns"] >= 24
    assert during >= 3, f"only {during} commits finished during a {ended - began:.3f} s verify"


@pytest.mark.parametrize("redundancy,expected", [("off", "corruption"), ("parity", "repairable-sector")])
def test_a_byte_flipped_on_the_image_under_statefsd_is_reported_and_statefsd_stays_up(served, redundancy,
                                                                                      expected):
    s = served(redundancy, redundancy=redundancy)
    with s.client() as c:
        for i in range(20):
            c.put(f"k{i}", bytes([i]) * 5000)
        assert c.verify()["findings"] == {}
        rec = [r for r in committed_records(s.image) if r.header.type == fmt.PAYLOAD][10]
        s.flip_byte(rec.offset + fmt.HEADER_SIZE + 1000)
        v = c.verify()
        assert v["findings"] == {expected: 1}
        assert v["first_finding"]["kind"] == expected
        assert rec.offset - 512 < v["first_finding"]["offset"] <= rec.offset + 1000 + fmt.HEADER_SIZE
        assert c.put("still-served", b"yes") > 0 and c.get("k0") == bytes([0]) * 5000
    assert s.daemon.proc.poll() is None
    cli = s.cli("verify")
    assert cli.returncode == 4 and expected in cli.stdout and "next:" in cli.stdout


def test_verify_says_exit_8_when_statefsd_cannot_be_reached(short_dir):
    result = subprocess.run([sys.executable, "-m", "statefsd.cli", "--socket",
                             os.path.join(short_dir, "nobody.sock"), "verify"],
                            capture_output=True, text=True, env=env_with_repo(), timeout=60)
    assert result.returncode == 8 and "ECONN" in result.stderr


def test_a_verify_racing_compactions_gives_a_correct_answer(served):
    s = served("race")
    with s.client() as c:
        for i in range(300):
            c.put(f"k{i % 60}", os.urandom(20000))
    verdicts, compactions, errors = [], [], []

    def run(work):
        try:
            with s.client() as c:
                for _ in range(4):
                    work(c)
        except Exception as exc:   # reported below, never lost in a thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(lambda c: verdicts.append(c.verify()),)),
               threading.Thread(target=run, args=(lambda c: compactions.append(c.compact()),)),
               threading.Thread(target=run, args=(lambda c: c.put("during", os.urandom(5000)),))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(verdicts) == len(compactions) == 4
    assert all(v["findings"] == {} and v["chain_head_matches"] for v in verdicts)
    assert all(v["checkpoints"] == v["verified_checkpoints"] for v in verdicts)
    with s.client() as c:
        last = c.verify()
        assert last["log_epoch"] == compactions[-1]["epoch"] == c.info()["log_epoch"]
        assert last["findings"] == {} and last["checkpoints"] == last["verified_checkpoints"] >= 1
