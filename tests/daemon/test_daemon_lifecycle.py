"""statefsd as a process: startup refusals, signals, systemd readiness,
crashes, and many client processes at once."""

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine
from statefsd.errors import Code, IntegrityError, ReadOnly
from tests.daemon.harness import REPO, RawConnection, env_with_repo, make_image, wait_for
from tests.daemon.stream_writer import KEYS, txn_keys, value_for

WRITER = str(REPO / "tests" / "daemon" / "stream_writer.py")


def start_writers(daemon, tmp_path, count, txns):
    procs = []
    for w in range(count):
        ackfile = tmp_path / f"acks.{w}"
        ackfile.touch()
        procs.append(subprocess.Popen(
            [sys.executable, WRITER, daemon.socket, str(w), str(txns), str(ackfile)],
            cwd=REPO, env=env_with_repo()))
    return procs


def acked(tmp_path, writer):
    return [int(line) for line in (tmp_path / f"acks.{writer}").read_text().split()]


def check_writers(client, tmp_path, writers):
    """Every acknowledged txn is present with its exact values; the one txn
    each writer had in flight is either wholly present or wholly absent."""
    for w in range(writers):
        done = acked(tmp_path, w)
        assert done == list(range(len(done))), f"writer {w} acks out of order"
        for i in done:
            for j, key in enumerate(txn_keys(w, i)):
                assert client.get(key) == value_for(w, i, j), f"acked {key} lost or wrong"
        in_flight = txn_keys(w, len(done))
        present = set(client.list(f"w{w}/t{len(done)}/"))
        assert present in (set(), set(in_flight)), f"partial txn visible: {sorted(present)}"
        txns_seen = {int(m.group(1)) for k in client.list(f"w{w}/t")
                     if (m := re.fullmatch(rf"w{w}/t(\d+)/k\d+", k))}
        assert max(txns_seen, default=-1) <= len(done), "a txn never attempted is visible"
        if done:
            assert int(client.get(f"w{w}/last")) >= done[-1]


# ------------------------------------------------------------------ startup

def test_daemon_prints_encryption_mode_then_ready(daemon):
    assert daemon.stdout[:2] == ["statefsd: encryption off", f"statefsd: ready on {daemon.socket}"]


def test_socket_file_has_mode_0660(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o660


def test_second_daemon_on_the_same_image_exits_ebusy_with_clear_message(ws, daemon):
    second = ws.start(socket=os.path.join(ws.dir, "other.sock"), wait=False)
    assert second.wait_exit() == Code.EBUSY
    assert any(line.startswith("statefsd: ERROR EBUSY: ") and ws.image in line for line in second.stderr), second.stderr
    with daemon.client() as c:  # the first one is unharmed
        c.put("still", b"here")


def test_second_daemon_on_a_live_socket_exits_ebusy(ws, daemon, tmp_path):
    other_image = tmp_path / "other.img"
    make_image(other_image)
    second = ws.start(image=str(other_image), wait=False)
    assert second.wait_exit() == Code.EBUSY
    assert any("already listening on" in line and "is statefsd already running? use its socket"
               in line for line in second.stderr), second.stderr
    assert not any("holds the image" in line for line in second.stderr)
    assert "statefsd: encryption off" not in second.stdout  # refused before mounting its image
    assert os.path.exists(daemon.socket)


def test_image_that_is_not_statefs_is_refused_with_eformat(ws, tmp_path):
    blank = tmp_path / "blank.img"
    create_image(str(blank), 4 << 20)
    daemon = ws.start(image=str(blank), wait=False)
    assert daemon.wait_exit() == Code.EFORMAT
    assert any(line.startswith("statefsd: ERROR EFORMAT: ") and "not a StateFS image" in line
               for line in daemon.stderr), daemon.stderr
    assert not os.path.exists(ws.socket)


def test_missing_image_is_refused_with_einval_pointing_at_mkfs(ws, tmp_path):
    daemon = ws.start(image=str(tmp_path / "nope.img"), wait=False)
    assert daemon.wait_exit() == Code.EINVAL
    assert any("no such image" in line and "statefs mkfs" in line for line in daemon.stderr), daemon.stderr


def test_a_directory_as_image_is_einval_not_an_io_error(ws, tmp_path):
    daemon = ws.start(image=str(tmp_path), wait=False)
    assert daemon.wait_exit() == Code.EINVAL
    assert any(line.startswith(f"statefsd: ERROR EINVAL: {tmp_path} is a directory") for line in daemon.stderr)
    assert not any("dmesg" in line for line in daemon.stderr)


def test_a_directory_as_socket_is_einval_suggesting_a_path_inside_it(ws):
    daemon = ws.start(socket=ws.dir, wait=False)
    assert daemon.wait_exit() == Code.EINVAL
    assert any(f"--socket {ws.dir} is a directory" in line and os.path.join(ws.dir, "statefs.sock") in line
               for line in daemon.stderr), daemon.stderr


def test_a_socket_in_a_missing_directory_is_einval_suggesting_mkdir(ws):
    daemon = ws.start(socket=os.path.join(ws.dir, "nodir", "s.sock"), wait=False)
    assert daemon.wait_exit() == Code.EINVAL
    assert any(f"mkdir -p {os.path.join(ws.dir, 'nodir')}" in line for line in daemon.stderr), daemon.stderr


def test_a_regular_file_at_the_socket_path_is_not_replaced(ws):
    with open(ws.socket, "w") as f:
        f.write("precious")
    daemon = ws.start(wait=False)
    assert daemon.wait_exit() == Code.EINVAL
    assert any("is not a socket" in line for line in daemon.stderr)
    assert open(ws.socket).read() == "precious"


@pytest.mark.parametrize("flag", ["--no-such-flag", "--mkfs"])
def test_usage_errors_exit_2(ws, flag):
    daemon = ws.start(extra=[flag], wait=False)
    assert daemon.wait_exit() == 2


def test_encrypted_image_without_a_keystore_is_refused_with_ekey(ws, tmp_path):
    image = str(tmp_path / "sealed.img")
    create_image(image, 4 << 20)
    with FileDevice(image) as device:
        Engine.mkfs(device, encryption="on")
    daemon = ws.start(image=image, wait=False)
    assert daemon.wait_exit() == Code.EKEY
    assert any(line.startswith("statefsd: ERROR EKEY: ") and "--keystore-socket" in line
               for line in daemon.stderr), daemon.stderr
    line = next(line for line in daemon.stderr if line.startswith("statefsd: ERROR EKEY: "))
    assert line.count("--keystore-socket") == 1 and line.count("start keystored") == 1, line


def test_lost_superblocks_are_refused_with_ecorrupt_naming_the_fsck_command_that_rebuilds_them(ws):
    daemon = ws.start()
    with daemon.client() as c:
        for i in range(10):
            c.put(f"keep/{i}", str(i).encode())
    assert daemon.stop(signal.SIGTERM) == 0
    with open(ws.image, "r+b") as f:   # both slots: blocks 0 and 1
        f.write(bytes(8192))
    refused = ws.start(wait=False)
    assert refused.wait_exit() == Code.ECORRUPT
    assert any(line.startswith("statefsd: ERROR ECORRUPT: ") and
               f"run: fsck-statefs --repair {ws.image}" in line and "mount read-only to read" not in line
               for line in refused.stderr), refused.stderr
    fsck = subprocess.run([sys.executable, "-m", "fsck_statefs", "--repair", ws.image], cwd=REPO,
                          env=env_with_repo(), capture_output=True, text=True, timeout=60)
    assert fsck.returncode == 1, fsck.stdout + fsck.stderr
    restarted = ws.start()
    with restarted.client() as c:
        assert c.list("keep/") == sorted(f"keep/{i}" for i in range(10))
        assert c.get("keep/7") == b"7"
        c.put("after/rebuild", b"ok")
    assert restarted.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_ready_and_stopping_reach_the_notify_socket(ws, abstract):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"statefs-test-{os.getpid()}-{time.monotonic_ns()}"
        listener.bind("\0" + name)
        notify = "@" + name
    else:
        notify = os.path.join(ws.dir, "notify")
        listener.bind(notify)
    listener.settimeout(20)
    daemon = ws.start(env=env_with_repo(NOTIFY_SOCKET=notify))
    ready = listener.recv(4096).decode()
    assert "READY=1" in ready.split("\n") and f"MAINPID={daemon.proc.pid}" in ready
    assert daemon.stop() == 0
    assert listener.recv(4096) == b"STOPPING=1"
    listener.close()


def test_read_only_daemon_serves_reads_and_refuses_writes(ws):
    first = ws.start()
    with first.client() as c:
        c.put("ro/key", b"value")
    assert first.stop() == 0
    daemon = ws.start(extra=["--read-only"])
    with daemon.client() as c:
        assert c.hello()["read_only"] is True
        assert c.get("ro/key") == b"value"
        for attempt in (lambda: c.put("ro/new", b"x"), lambda: c.delete("ro/key"), c.transaction().__enter__):
            with pytest.raises(ReadOnly):
                attempt()
    assert daemon.stop() == 0


# ----------------------------------------------------------- stop and crash

def test_sigterm_exits_0_removes_the_socket_and_a_restart_sees_all_data(ws):
    daemon = ws.start()
    with daemon.client() as c:
        for i in range(20):
            c.put(f"keep/{i}", str(i).encode())
        c.delete("keep/0")
    assert daemon.stop(signal.SIGTERM) == 0
    assert not os.path.exists(ws.socket)
    assert "statefsd: stopped" in daemon.stdout
    restarted = ws.start()
    with restarted.client() as c:
        assert c.list("keep/") == sorted(f"keep/{i}" for i in range(1, 20))
        assert c.get("keep/7") == b"7"
    assert restarted.stop(signal.SIGINT) == 0
    events = [e["event"] for e in restarted.audit_events()]
    assert events.count("daemon_start") == 2 and events.count("shutdown") == 2
    assert "mount" in events and "replay" in events


def test_stale_socket_file_of_a_killed_daemon_is_replaced(ws):
    daemon = ws.start()
    daemon.kill()
    assert stat.S_ISSOCK(os.lstat(ws.socket).st_mode)  # left behind
    restarted = ws.start()
    with restarted.client() as c:
        assert c.hello()["protocol"] == 1


def test_concurrent_client_processes_are_all_acknowledged(ws, tmp_path):
    daemon = ws.start()
    writers = start_writers(daemon, tmp_path, count=8, txns=15)
    assert [p.wait(60) for p in writers] == [0] * 8
    with daemon.client() as c:
        for w in range(8):
            assert acked(tmp_path, w) == list(range(15))
        check_writers(c, tmp_path, 8)
        assert len(c.list("w")) == 8 * (15 * KEYS + 1)


def test_client_killed_mid_transaction_leaves_nothing_visible(ws):
    daemon = ws.start()
    script = (
        "import sys, time\n"
        "from statefsd.client import Client\n"
        "c = Client(sys.argv[1])\n"
        "t = c.transaction().__enter__()\n"
        "t.put('half/a', b'1'); t.put('half/b', b'2')\n"
        "print('buffered', flush=True)\n"
        "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, daemon.socket], cwd=REPO,
                            env=env_with_repo(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "buffered"
    proc.kill()
    proc.wait()
    assert wait_for(lambda: any(e["event"] == "txn_abandoned" for e in daemon.audit_events()))
    abandoned = [e for e in daemon.audit_events() if e["event"] == "txn_abandoned"][0]["fields"]
    assert abandoned["ops"] == 2 and abandoned["reason"] == "disconnect" and abandoned["pid"] == proc.pid
    with daemon.client() as c:
        assert c.list("half/") == []
        c.put("half/after", b"ok")


def test_kill_9_during_acknowledged_commits_loses_nothing_and_shows_no_partial_txn(ws, tmp_path):
    daemon = ws.start()
    writers = start_writers(daemon, tmp_path, count=4, txns=0)
    assert wait_for(lambda: all(len(acked(tmp_path, w)) >= 10 for w in range(4)), timeout=30)
    daemon.kill()
    assert [p.wait(30) for p in writers] == [0] * 4
    restarted = ws.start()
    with restarted.client() as c:
        check_writers(c, tmp_path, 4)
    assert restarted.stop() == 0


def test_sigterm_during_commit_stream_exits_0_and_keeps_every_acknowledged_txn(ws, tmp_path):
    daemon = ws.start()
    writers = start_writers(daemon, tmp_path, count=4, txns=0)
    assert wait_for(lambda: all(len(acked(tmp_path, w)) >= 5 for w in range(4)), timeout=30)
    assert daemon.stop(signal.SIGTERM) == 0
    assert [p.wait(30) for p in writers] == [0] * 4
    restarted = ws.start()
    with restarted.client() as c:
        check_writers(c, tmp_path, 4)


def test_corrupted_value_is_eintegrity_audited_and_the_daemon_keeps_serving(ws):
    daemon = ws.start()
    canary = b"INTEGRITY-CANARY" * 64
    with daemon.client() as c:
        c.put("sound", b"fine")
        c.put("damaged", canary)
        with open(ws.image, "r+b") as image:
            offset = image.read().index(canary) + 100
            image.seek(offset)
            image.write(bytes(700))   # two sectors: beyond what a group's parity rebuilds
        with pytest.raises(IntegrityError) as err:
            c.get("damaged")
        assert err.value.code == Code.EINTEGRITY
        assert c.get("sound") == b"fine"
    events = daemon.audit_events()
    assert any(e["event"] == "integrity_failure" and e["fields"]["path"] == "damaged" for e in events)
    assert any(e["event"] == "refused" and e["fields"]["code"] == "EINTEGRITY" for e in events)


def test_client_vanishing_inside_a_frame_does_not_disturb_the_daemon(daemon):
    raw = RawConnection(daemon.socket)
    raw.send_bytes(b"\x00\x00\x10\x00" + b"\x85partial")
    raw.close()
    with daemon.client() as c:
        c.put("after/partial", b"ok")
        assert c.get("after/partial") == b"ok"


def test_corrupt_image_is_ecorrupt_giving_its_advice_once(ws):
    with Engine.mount(FileDevice(ws.image)) as engine:
        engine.put("first", b"1")
        middle = engine.log_end
        engine.put("second", b"2")
        engine.put("third", b"3")
    with open(ws.image, "r+b") as f:  # damage inside a flushed group and its parity trailer
        f.seek(middle + 20)
        f.write(b"\xff" * 600)
    daemon = ws.start(wait=False)
    assert daemon.wait_exit() == Code.ECORRUPT
    line = next(line for line in daemon.stderr if line.startswith("statefsd: ERROR ECORRUPT: "))
    assert f"corruption at byte offset {middle}" in line
    assert line.count("read-only") == 1 and line.count("fsck-statefs") == 1, line
    assert line.endswith(f"(run fsck-statefs {ws.image}; statefsd --read-only serves the 1 committed "
                         "transactions before it)")


def test_full_log_is_enospc_saying_committed_data_is_intact_once(ws, tmp_path):
    small = make_image(tmp_path / "small.img", 1 << 20)
    daemon = ws.start(image=small)
    value = tmp_path / "value"
    value.write_bytes(os.urandom(100_000))
    for i in range(20):
        result = subprocess.run([sys.executable, "-m", "statefsd.cli", "--socket", daemon.socket,
                                 "put", f"k{i}", "--file", str(value)],
                                cwd=REPO, env=env_with_repo(), capture_output=True, text=True, timeout=60)
        if result.returncode:
            break
    assert result.returncode == Code.ENOSPC, result.stderr
    assert result.stderr.startswith("statefs: ENOSPC: ") and "log full" in result.stderr
    assert result.stderr.count("committed data is intact") == 1, result.stderr


def _statefsd(*args):
    return subprocess.run([sys.executable, "-m", "statefsd.daemon", *args], cwd=REPO, env=env_with_repo(),
                          capture_output=True, text=True, timeout=60)


def test_help_shows_image_and_socket_as_required_and_hides_internal_test_flags():
    result = _statefsd("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: statefsd --image PATH --socket PATH ")
    required = result.stdout[result.stdout.index("\nrequired:"):]
    assert "--image PATH" in required and "--socket PATH" in required
    assert "--selftest-persist" not in result.stdout and "--crash-writer" not in result.stdout


def test_a_missing_required_option_is_a_usage_error_naming_it():
    result = _statefsd("--image", "x.img")
    assert result.returncode == 2
    assert "the following arguments are required: --socket (or set STATEFS_SOCKET)" in result.stderr


def test_an_audit_journal_in_a_missing_directory_is_einval_suggesting_mkdir_not_dmesg(ws, tmp_path):
    daemon = ws.start(audit=str(tmp_path / "nodir" / "audit.jsonl"), wait=False)
    assert daemon.wait_exit() == Code.EINVAL
    line = next(line for line in daemon.stderr if line.startswith("statefsd: ERROR "))
    assert line.startswith("statefsd: ERROR EINVAL: audit journal ")
    assert f"(create it first with mkdir -p {tmp_path / 'nodir'})" in line and "dmesg" not in line
