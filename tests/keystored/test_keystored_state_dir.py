"""keystored's state directory against another local user (uid 65534).

keystored runs as root here. The attacker can write somewhere on the way to
the state directory (an "arena" any uid may write), and tries what a local
user would: pre-create the directory, plant a key file of their choosing,
hold a temporary file open to catch the secrets, plant symlinks where
keystored opens its lock, its log and its socket.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from keystored import keyfile, protocol
from keystored.identity import Identity
from statefsd.errors import Code, InvalidArgument
from statefsd.shared import unixrpc

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 65534 needs root")

PLANTED = keyfile.encode(Identity(bytes(range(32)), bytes(range(32, 64))), None)


@pytest.fixture
def arena(sock_dir) -> Path:
    """A directory every uid may write (like a careless /srv/keys)."""
    path = Path(sock_dir) / "arena"
    path.mkdir()
    path.chmod(0o777)
    return path


def _as_owner_0700(path: Path) -> None:
    """What an administrator does when keystored says the directory is not its own."""
    os.chown(path, 0, 0)
    path.chmod(0o700)


def test_temporary_file_held_open_by_another_uid_never_receives_the_secrets(launcher, arena, helpers):
    state = arena / "state"

    def plant() -> int:
        state.mkdir()
        state.chmod(0o777)
        fd = os.open(state / "identity.key.tmp", os.O_RDWR | os.O_CREAT, 0o666)
        os.fchmod(fd, 0o666)
        return fd

    def caught(fd: int) -> str:
        return os.pread(fd, 4096, 0).hex()

    attacker = helpers.AsUid(NOBODY, plant, caught)
    try:
        _as_owner_0700(state)  # the attacker's open file survives the fix of the directory
        daemon = launcher.start(state_dir=state)
    finally:
        held = bytes.fromhex(attacker.finish())
    secrets = daemon.key_path.read_bytes()
    assert secrets[:8] == b"STATEFSK"
    assert held == b""
    assert os.stat(daemon.key_path).st_uid == 0


def test_state_dir_made_by_another_uid_is_refused_with_the_command_that_fixes_it(launcher, arena, helpers):
    state = arena / "state"

    def plant() -> None:
        state.mkdir()
        state.chmod(0o777)
        (state / "identity.key").write_bytes(PLANTED)  # secrets the attacker knows

    helpers.run_as_uid(NOBODY, plant)
    refused = launcher.fail(state_dir=state)
    assert refused.proc.returncode == Code.EINVAL, refused.stderr
    assert f"--state-dir {state} is owned by nobody (uid {NOBODY}), not by root (uid 0)" in refused.stderr
    assert f"chown root: {state} && chmod 700 {state}" in refused.stderr
    assert (state / "identity.key").read_bytes() == PLANTED
    assert not os.path.exists(launcher.socket)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_state_dir_writable_by_group_or_others_is_refused(launcher, tmp_path, mode):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    refused = launcher.fail(state_dir=state)
    assert refused.proc.returncode == Code.EINVAL, refused.stderr
    assert f"--state-dir {state} has mode {mode:o}: group or others may write it" in refused.stderr
    assert f"chmod 700 {state}" in refused.stderr
    assert not (state / "identity.key").exists()


@pytest.mark.parametrize("owner, mode, words", [
    (NOBODY, 0o600, f"is owned by nobody (uid {NOBODY})"),
    (0, 0o666, "has mode 666: group or others may write it"),
    (0, 0o620, "has mode 620: group or others may write it"),
], ids=["other-owner", "world-writable", "group-writable"])
def test_key_file_another_uid_could_have_planted_is_refused(launcher, tmp_path, owner, mode, words):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = state / "identity.key"
    key.write_bytes(PLANTED)
    os.chown(key, owner, owner)
    key.chmod(mode)
    refused = launcher.fail(state_dir=state)
    assert refused.proc.returncode == Code.EINVAL, refused.stderr
    assert f"key file {key} {words}" in refused.stderr
    assert f"chown root: {key} && chmod 600 {key}" in refused.stderr
    assert key.read_bytes() == PLANTED


def test_state_dir_that_is_a_symlink_is_refused(launcher, tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "state"
    link.symlink_to(real)
    for given in (str(link), f"{link}/"):
        refused = launcher.fail(state_dir=given)
        assert refused.proc.returncode == Code.EINVAL, refused.stderr
        assert f"--state-dir {link} is a symlink (to {real})" in refused.stderr
        assert f"--state-dir {real}" in refused.stderr
    assert list(real.iterdir()) == []


def test_lock_file_symlink_left_by_another_uid_is_not_followed(launcher, arena, helpers):
    state = arena / "state"
    victim = arena / "created-by-root"

    def plant() -> None:
        state.mkdir()
        (state / "keystored.lock").symlink_to(victim)

    helpers.run_as_uid(NOBODY, plant)
    _as_owner_0700(state)
    refused = launcher.fail(state_dir=state)
    assert refused.proc.returncode == Code.EINVAL, refused.stderr
    assert f"{state}/keystored.lock is a symlink; keystored does not follow it" in refused.stderr
    assert not victim.exists()
    assert not (state / "identity.key").exists()


def test_log_symlink_planted_by_another_uid_is_not_followed(launcher, arena, helpers, sock_dir):
    victim = Path(sock_dir) / "precious"
    victim.write_text("root's file\n")
    logs = arena / "logs"
    log = logs / "keystored.log"

    def plant() -> None:
        logs.mkdir()
        log.symlink_to(victim)

    helpers.run_as_uid(NOBODY, plant)
    refused = launcher.fail("--log", str(log))
    assert refused.proc.returncode == Code.EINVAL, refused.stderr
    assert f"audit journal {log} is a symlink; refusing to follow it" in refused.stderr
    assert victim.read_text() == "root's file\n"


def test_socket_swapped_for_a_symlink_after_bind_does_not_get_its_target_chmodded(tmp_path, monkeypatch):
    victim = tmp_path / "shadow"
    victim.write_text("secret\n")
    victim.chmod(0o600)
    path = str(tmp_path / "ks.sock")

    class SwappedAfterBind(socket.socket):
        """Binds, then lets 'another user' replace the socket file by a symlink."""

        def bind(self, address):
            super().bind(address)
            os.unlink(address)
            os.symlink(victim, address)

    monkeypatch.setattr(unixrpc.socket, "socket", SwappedAfterBind)
    with pytest.raises(InvalidArgument, match="replaced by another file while binding"):
        protocol.ENDPOINT.listen(path)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
