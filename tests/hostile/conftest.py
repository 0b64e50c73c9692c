"""Real statefsd and keystored processes for the hostile-client tests."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from bench import procs


@pytest.fixture
def short_dir():
    """Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer."""
    path = tempfile.mkdtemp(prefix="sfh", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def statefsd(short_dir):
    image = os.path.join(short_dir, "state.img")
    procs.fresh_image(image, 64 << 20)
    sock = os.path.join(short_dir, "statefs.sock")
    daemon = procs.statefsd(image, sock, audit=os.path.join(short_dir, "audit.jsonl"))
    daemon.socket = sock
    yield daemon
    daemon.stop()


@pytest.fixture
def keystored(short_dir):
    state = os.path.join(short_dir, "keys")
    sock = os.path.join(short_dir, "ks.sock")
    daemon = procs.keystored(state, sock)
    daemon.socket = sock
    yield daemon
    daemon.stop()
