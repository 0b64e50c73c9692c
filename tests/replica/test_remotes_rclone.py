"""Remotes through rclone, against real ``rclone serve sftp`` (key
authentication both ways) and ``rclone serve webdav`` on loopback."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from nacl.signing import SigningKey

from statefsd.errors import Code, InvalidArgument, NoSpace, NotFound, PeerUnavailable
from statefsd.replica import format as rfmt
from statefsd.replica import remotes
from statefsd.replica.rclone import Rclone, classify, find_binary, redact
from statefsd.replica.verify import verify_copy
from tests.replica.conftest import image_state, served_state
from tests.replica.rclone_fixtures import (  # noqa: F401  (pytest fixtures)
    any_server, kill_rclone_children, rclone, rclone_binary, sftp_server, small_filesystem, start_sftp,
    start_webdav, webdav_server, write_ssh_key,
)
from tests.replica.test_replica_format import write_copy
from tests.replica.test_replica_restore import set_up, write_some

DEVICE_KEY = SigningKey.generate()


def make_outbox(root: Path, segments: int = 3, *, seg_bytes: int = 64 << 10, counter: int = 1) -> Path:
    """A directory with the outbox layout: key file, segments, one head
    signed by DEVICE_KEY that lists them."""
    (root / "seg").mkdir(parents=True, exist_ok=True)
    for _ in range(segments):
        add_segment(root, seg_bytes)
    add_head(root, counter)
    return root


def add_segment(root: Path, size: int = 64 << 10) -> str:
    rel = f"seg/{os.urandom(16).hex()}.sfs"
    (root / rel).write_bytes(os.urandom(size))
    return rel


def add_head(root: Path, counter: int, retired: tuple[str, ...] = ()) -> str:
    """A signed head listing every segment now in ``root`` (and retiring
    ``retired``)."""
    live = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "seg").glob("*.sfs"))}
    public = write_copy(root, DEVICE_KEY, counter, live, retired)
    return rfmt.head_name(public, counter)


def tree(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under root."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_push_leaves_a_byte_identical_copy_on_the_remote(any_server, rclone, tmp_path):
    outbox = make_outbox(tmp_path / "outbox")
    report = remotes.push(rclone, outbox, any_server.spec())
    assert tree(any_server.root / "backup") == tree(outbox)
    assert sorted(report["uploaded"]) == sorted(tree(outbox))
    assert report["head_counter"] == 1
    assert sorted(f.path for f in rclone.list(any_server.spec())) == sorted(tree(outbox))


def test_a_second_push_uploads_only_the_new_files(any_server, rclone, tmp_path):
    outbox = make_outbox(tmp_path / "outbox")
    remote = any_server.spec()
    remotes.push(rclone, outbox, remote)
    before = {p: (any_server.root / "backup" / p).stat().st_mtime_ns for p in tree(outbox)}
    time.sleep(0.05)
    new = [add_segment(outbox), add_head(outbox, 2)]
    report = remotes.push(rclone, outbox, remote)
    assert report["uploaded"] == new, "the key file and the old segments and head are not sent again"
    assert report["head_counter"] == 2
    assert tree(any_server.root / "backup") == tree(outbox)
    assert {p: (any_server.root / "backup" / p).stat().st_mtime_ns for p in before} == before
    assert remotes.push(rclone, outbox, remote)["uploaded"] == []


def test_a_changed_key_file_is_sent_again(sftp_server, rclone, tmp_path):
    outbox = make_outbox(tmp_path / "outbox")
    remotes.push(rclone, outbox, sftp_server.spec())
    (outbox / "keys.sfk").write_bytes(os.urandom(300))   # same size, new content
    assert remotes.push(rclone, outbox, sftp_server.spec())["uploaded"] == ["keys.sfk"]
    assert tree(sftp_server.root / "backup") == tree(outbox)


def test_a_push_deletes_on_the_remote_exactly_what_the_newest_signed_head_retires(sftp_server, rclone, tmp_path):
    outbox = make_outbox(tmp_path / "outbox", segments=3)
    old_head = rfmt.head_name(bytes(DEVICE_KEY.verify_key), 1)
    remotes.push(rclone, outbox, sftp_server.spec())
    gone = sorted(p.relative_to(outbox).as_posix() for p in (outbox / "seg").iterdir())[0]
    (outbox / gone).unlink()
    (outbox / old_head).unlink()
    add_segment(outbox)
    add_head(outbox, 2, retired=(gone, old_head))
    (sftp_server.root / "backup" / "seg" / "extra.sfs").write_bytes(b"not ours to delete")
    report = remotes.push(rclone, outbox, sftp_server.spec())
    assert sorted(report["deleted"]) == sorted([gone, old_head])
    held = tree(sftp_server.root / "backup")
    assert "seg/extra.sfs" in held, "a push deletes only what a signed head retires"
    del held["seg/extra.sfs"]
    assert held == tree(outbox)


def test_a_head_signed_by_another_key_in_the_outbox_retires_nothing(tmp_path):
    outbox = make_outbox(tmp_path / "outbox", segments=2)
    victim = sorted(p.relative_to(outbox).as_posix() for p in (outbox / "seg").iterdir())[0]
    assert remotes.retired_files(outbox) == []
    write_copy(outbox, SigningKey.generate(), 5, {}, [victim])
    assert remotes.retired_files(outbox) == [], "two signers: not one device's outbox"


def test_status_trusts_only_a_head_whose_signature_verifies(sftp_server, rclone, tmp_path):
    outbox = make_outbox(tmp_path / "outbox", segments=1, counter=3)
    remotes.push(rclone, outbox, sftp_server.spec())
    forged = rfmt.head_name(bytes(DEVICE_KEY.verify_key), 9)
    (sftp_server.root / "backup" / forged).write_bytes((outbox / rfmt.head_name(bytes(DEVICE_KEY.verify_key),
                                                                                  3)).read_bytes())
    status = remotes.remote_status(rclone, sftp_server.spec())
    assert status["reachable"] and status["heads"] == 2
    assert status["head_counter"] == 3, "a forged newer head cannot fake a newer history"
    head = rfmt.decode_head_file((outbox / rfmt.head_name(bytes(DEVICE_KEY.verify_key), 3)).read_bytes(), "h")
    assert status["head_digest"] == rfmt.file_digest(head.body).hex()
    assert len(status["problems"]) == 1 and forged in status["problems"][0]
    other = remotes.remote_status(rclone, sftp_server.spec(), signer=bytes(SigningKey.generate().verify_key))
    assert other["head_counter"] == 0 and len(other["problems"]) == 2


def test_an_interrupted_push_resumes_and_ends_byte_identical(any_server, tmp_path):
    outbox = make_outbox(tmp_path / "outbox", segments=1)
    big = add_segment(outbox, 6 << 20)
    config = tmp_path / "state" / "rclone.conf"
    slow = Rclone(rclone_binary(), config, extra_args=["--bwlimit", "2M"])
    remote = any_server.spec()
    failure: list[BaseException] = []

    def run_push():
        try:
            remotes.push(slow, outbox, remote)
        except BaseException as exc:   # noqa: BLE001  (reported to the test thread)
            failure.append(exc)

    pusher = threading.Thread(target=run_push)
    pusher.start()
    seg_dir = any_server.root / "backup" / "seg"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:   # wait until the big segment is partly on the server
        if seg_dir.exists() and any(p.name.startswith(Path(big).name) and p.stat().st_size >= 1 << 20
                                    for p in seg_dir.iterdir()):
            break
        time.sleep(0.02)
    assert kill_rclone_children(config) == 1
    pusher.join(timeout=30)
    assert len(failure) == 1 and isinstance(failure[0], PeerUnavailable), failure
    assert "again" in failure[0].hint
    assert not (any_server.root / "backup" / "head").exists(), "no head before its segments"
    held = (any_server.root / "backup" / big)
    # WebDAV writes the upload under its final name; SFTP under a .partial name.
    assert not held.exists() or held.stat().st_size < (6 << 20)

    fast = Rclone(rclone_binary(), config)
    report = remotes.push(fast, outbox, remote)
    assert big in report["uploaded"]
    assert tree(any_server.root / "backup") == tree(outbox), "no partial file is left behind"


def test_an_unreachable_remote_gives_EPEER_with_a_hint_and_leaves_the_outbox_untouched(sftp_server, rclone,
                                                                                        tmp_path):
    outbox = make_outbox(tmp_path / "outbox")
    before = tree(outbox)
    sftp_server.stop()
    with pytest.raises(PeerUnavailable) as err:
        remotes.push(rclone, outbox, sftp_server.spec())
    assert err.value.code == Code.EPEER
    assert f"port={sftp_server.served.port}" in err.value.message and "connection refused" in err.value.message
    assert "reachable" in err.value.hint
    assert tree(outbox) == before


@contextmanager
def full_server(start, tmp_path):
    """A server on a 2 MiB tmpfs and an outbox with a 3 MiB segment: its disk
    really fills during the push."""
    with small_filesystem(tmp_path / "small", "2m") as small:
        server = start(rclone_binary(), tmp_path / "server", small)
        try:
            outbox = make_outbox(tmp_path / "outbox", segments=1)
            add_segment(outbox, 3 << 20)
            yield server, outbox
        finally:
            server.stop()


def test_a_full_remote_gives_ENOSPC_and_loses_nothing_locally(rclone, tmp_path):
    with full_server(start_sftp, tmp_path) as (server, outbox):
        before = tree(outbox)
        with pytest.raises(NoSpace) as err:
            remotes.push(rclone, outbox, server.spec())
        assert err.value.code == Code.ENOSPC
        # rclone's SFTP client reports the server's ENOSPC, or only a broken stream (with
        # concurrent writes); then the remote's free space, asked over SFTP, tells.
        assert "is full" in err.value.message
        assert "no space left on device" in err.value.message or "bytes still to upload" in err.value.message
        assert f"port={server.served.port}" in err.value.hint and "untouched" in err.value.hint
        assert tree(outbox) == before
        assert not (server.root / "backup" / "head").exists(), "no head names segments the remote lacks"


def test_a_full_webdav_server_that_answers_405_is_reported_as_maybe_full(rclone, tmp_path):
    with full_server(start_webdav, tmp_path) as (server, outbox):
        before = tree(outbox)
        with pytest.raises(PeerUnavailable) as err:
            remotes.push(rclone, outbox, server.spec())
        assert "may be full" in err.value.message and "free space" in err.value.hint
        assert tree(outbox) == before


def test_a_wrong_host_key_is_refused_and_the_remote_is_not_added(sftp_server, rclone, tmp_path):
    impostor = write_ssh_key(tmp_path / "impostor_key")
    pinned = tmp_path / "other_known_hosts"
    pinned.write_text(f"[127.0.0.1]:{sftp_server.served.port} {impostor}\n")
    state = tmp_path / "state"
    with pytest.raises(PeerUnavailable) as err:
        remotes.add_remote(rclone, "box", sftp_server.spec(known_hosts=pinned), state)
    assert "host key" in err.value.message and "known_hosts_file" in err.value.hint
    assert remotes.remote_names(state) == []


def test_a_client_key_the_server_does_not_know_is_refused(sftp_server, rclone, tmp_path):
    write_ssh_key(tmp_path / "stranger_key")
    with pytest.raises(PeerUnavailable) as err:
        rclone.check_reachable(sftp_server.spec(key=tmp_path / "stranger_key"))
    assert "refused our credentials" in err.value.message and "authorized_keys" in err.value.hint


def test_pull_brings_back_byte_identical_files_and_only_replica_files(any_server, rclone, tmp_path):
    outbox = make_outbox(tmp_path / "outbox", segments=4)
    remotes.push(rclone, outbox, any_server.spec())
    (any_server.root / "backup" / "seg" / "stray.sfs.1234abcd.partial").write_bytes(b"half")
    fetched = remotes.pull(rclone, any_server.spec(), tmp_path / "restore")
    assert sorted(fetched) == sorted(tree(outbox))
    assert tree(tmp_path / "restore") == tree(outbox)
    assert remotes.pull(rclone, any_server.spec(), tmp_path / "restore") == []


def test_an_added_remote_is_addressed_by_name_for_push_status_and_removal(webdav_server, rclone, tmp_path):
    state = tmp_path / "state"
    remote = remotes.add_remote(rclone, "share", webdav_server.spec("statefs"), state)
    assert remote == "share:" and remotes.remote_names(state) == ["share"]
    assert (state / "rclone.conf").stat().st_mode & 0o077 == 0, "the config holds credentials"
    assert webdav_server.obscured_password not in str(remotes.remote_status(rclone, remote))
    outbox = make_outbox(tmp_path / "outbox", segments=2, counter=7)
    remotes.push(rclone, outbox, "share")
    status = remotes.remote_status(rclone, "share", state)
    assert status["reachable"] and status["head_counter"] == 7
    assert status["files"] == 4 and status["segments"] == 2 and status["heads"] == 1
    assert status["bytes"] == sum(p.stat().st_size for p in outbox.rglob("*") if p.is_file())
    assert status["last_push"]["head_counter"] == 7 and time.time() - status["last_push"]["time"] < 60
    assert tree(webdav_server.root / "statefs") == tree(outbox)
    with pytest.raises(InvalidArgument):
        remotes.add_remote(rclone, "share", webdav_server.spec("other"), state)
    remotes.remove_remote(rclone, "share", state)
    assert remotes.remote_names(state) == []
    with pytest.raises(NotFound):
        remotes.remove_remote(rclone, "share", state)


def test_status_of_an_unreachable_remote_says_why_instead_of_raising(sftp_server, rclone):
    sftp_server.stop()
    status = remotes.remote_status(rclone, sftp_server.spec())
    assert not status["reachable"] and status["code"] == "EPEER" and "connection refused" in status["error"]


@pytest.mark.parametrize("name", ["", "-x", "a b", "a:b", "x" * 64, "../etc"])
def test_a_bad_remote_name_is_refused_before_anything_runs(name, tmp_path):
    never = Rclone("/nonexistent/rclone", tmp_path / "rclone.conf")
    with pytest.raises(InvalidArgument) as err:
        remotes.add_remote(never, name, ":sftp,host=h:p", tmp_path)
    assert "letters, digits" in err.value.hint


@pytest.mark.parametrize("spec", ["", "nocolon", ":sftp,host=h", "unknown:path"])
def test_a_malformed_spec_is_refused_with_the_forms_that_work(spec, tmp_path):
    never = Rclone("/nonexistent/rclone", tmp_path / "rclone.conf")
    with pytest.raises(InvalidArgument) as err:
        remotes.add_remote(never, "box", spec, tmp_path)
    assert ":sftp,host=" in err.value.hint or "path" in err.value.hint


def test_an_sftp_remote_without_a_pinned_host_key_or_a_client_key_is_refused(sftp_server, rclone, tmp_path):
    unpinned = sftp_server.spec().replace(f",known_hosts_file={sftp_server.known_hosts}", "")
    with pytest.raises(InvalidArgument) as err:
        remotes.add_remote(rclone, "box", unpinned, tmp_path / "state")
    assert "host key" in err.value.message and "known_hosts_file=" in err.value.hint
    keyless = sftp_server.spec().replace(f",key_file={sftp_server.client_key}", "")
    with pytest.raises(InvalidArgument) as err:
        remotes.add_remote(rclone, "box", keyless, tmp_path / "state")
    assert "client key" in err.value.message and "authorized_keys" in err.value.hint
    assert remotes.add_remote(rclone, "box", sftp_server.spec(), tmp_path / "state") == "box:"


def test_a_connection_string_is_read_as_rclone_reads_it():
    assert remotes.parse_connection_string(":webdav,url='http://h:1/a,b',user=u,pass=\"x\"\"y\":dir/sub") == (
        "webdav", {"url": "http://h:1/a,b", "user": "u", "pass": 'x"y'}, "dir/sub")
    assert remotes.parse_connection_string(":local:") == ("local", {}, "")


def test_rclone_messages_map_to_stable_codes_and_never_show_a_password():
    remote = ":webdav,url='http://h:1',user=u,pass=SECRETOBSCURED:x"
    full = classify(1, "ERROR : x: Failed to copy: 507 Insufficient Storage", remote, "uploading to")
    assert full.code == Code.ENOSPC and "SECRETOBSCURED" not in full.message + full.hint
    assert classify(2, "Error: unknown flag", remote, "listing").code == Code.EINVAL
    assert classify(-9, "", remote, "uploading to").code == Code.EPEER
    escaped = 'CRITICAL: Propfind "http/h%3A1%2Cpass%3DSECRETOBSCURED%3Ax": unsupported protocol scheme ""'
    assert "SECRETOBSCURED" not in str(classify(1, escaped, remote, "listing"))
    assert redact("pass='a,b'") == "pass=***"
    retried = ('ERROR : Attempt 1/2 failed: write x.partial: no space left on device (SSH_FX_FAILURE)\n'
               'ERROR : Attempt 2/2 failed: sftp: "io: read/write on closed pipe" (SSH_FX_FAILURE)\n')
    assert "no space left on device" in classify(1, retried, remote, "uploading to").message
    busy = classify(1, "ERROR : Update mkParentDir failed: Locked: 423 Locked", remote, "uploading to")
    assert busy.code == Code.EPEER and "push again" in busy.hint



def test_a_device_replicates_to_an_sftp_remote_and_a_fresh_device_restores_from_it(replica_env, sftp_server,
                                                                                     rclone, tmp_path):
    env = replica_env
    set_up(env)
    assert env.cli("remote", "add", "box", sftp_server.spec()) == {"remote": "box"}
    served = sftp_server.root / "backup"
    with env.client() as c:
        write_some(c, 0, 60)
        first = env.cli("replicate", "push")["engines"]["box"]
        assert "error" not in first, first
        assert sorted(first["uploaded"]) == sorted(tree(env.outbox))
        before = tree(env.outbox)
        write_some(c, 60, 60)
        second = env.cli("replicate", "push")["engines"]["box"]
        assert second["uploaded"] and not set(second["uploaded"]) & set(before), "only new files are sent"
        want = served_state(c)
    assert tree(served) == tree(env.outbox)
    status = env.cli("replicate", "status")
    box = status["remotes"][0]
    assert box["name"] == "box" and box["reachable"] and box["head_counter"] == status["local"]["head_counter"]
    assert status["rollback"] == [] and status["forks"] == []

    pulled = tmp_path / "pulled"
    remotes.pull(rclone, sftp_server.spec(), pulled)
    report = verify_copy(pulled)
    assert report.ok(), report.as_dict()
    # A fresh device: no keystored, no statefsd, no replica state; the remote's spec and the passphrase.
    new_image = str(tmp_path / "new.img")
    env.cli("restore", "--from", sftp_server.spec(), "--image", new_image, STATEFS_KEYSTORE_SOCKET=None,
            STATEFS_SOCKET=None, STATEFS_REPLICA_DIR=str(tmp_path / "fresh-state"))
    assert image_state(new_image) == want


def test_the_rclone_binary_named_by_STATEFS_RCLONE_wins_and_a_wrong_one_is_named(monkeypatch, tmp_path):
    binary = rclone_binary()
    monkeypatch.setenv("STATEFS_RCLONE", binary)
    assert find_binary() == binary
    (tmp_path / "not-rclone").write_text("")
    monkeypatch.setenv("STATEFS_RCLONE", str(tmp_path / "not-rclone"))
    with pytest.raises(InvalidArgument) as err:
        find_binary()
    assert "STATEFS_RCLONE" in err.value.hint
