"""The statefs command line, run as a real process against a real statefsd."""

import base64
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine
from statefsd.errors import Code
from statefsd.storage.format import MAX_KEY_BYTES, MAX_VALUE_BYTES
from tests.daemon.harness import REPO, env_with_repo


def statefs(*args, socket=None, input=None, env=None):
    argv = [sys.executable, "-m", "statefsd.cli"]
    if socket:
        argv += ["--socket", socket]
    return subprocess.run(argv + list(args), cwd=REPO, env=env or env_with_repo(),
                          input=input, capture_output=True, timeout=60)


def assert_fails(result, code, fragment=""):
    stderr = result.stderr.decode()
    assert result.returncode == code, (result.returncode, stderr)
    if code != Code.EUSAGE or fragment:
        assert stderr.startswith(f"statefs: {Code(code).name}: "), stderr
    assert fragment in stderr
    assert result.stdout == b""


BLKID = shutil.which("blkid") or next((p for p in ("/usr/sbin/blkid", "/sbin/blkid")
                                      if os.access(p, os.X_OK)), None)


@pytest.fixture
def sock(shared_daemon):
    return shared_daemon.socket


# -------------------------------------------------------------------- mkfs

def test_mkfs_creates_a_zero_filled_image_that_mounts_empty(tmp_path):
    image = tmp_path / "new.img"
    result = statefs("mkfs", str(image), "--size", "4M")
    assert result.returncode == 0, result.stderr
    assert b"formatted" in result.stdout
    assert image.stat().st_size == 4 << 20
    with Engine.mount(FileDevice(str(image))) as engine:
        assert engine.list() == [] and engine.info()["encryption"] == "off"


def test_mkfs_prints_the_usable_log_capacity_and_the_limits(tmp_path):
    image = tmp_path / "sized.img"
    result = statefs("mkfs", str(image), "--size", "64M")
    assert result.returncode == 0, result.stderr
    with Engine.mount(FileDevice(str(image))) as engine:
        log = engine.info()["log_size"]
    lines = result.stdout.decode().splitlines()
    assert lines[0] == (f"statefs: formatted {image}: {64 << 20} bytes (64.0 MiB), encryption off, "
                        "redundancy parity")
    assert lines[1].startswith(f"  log capacity: {log} bytes (32.0 MiB) usable; the device holds two log regions")
    assert lines[2] == (f"  limits: a value up to 8.0 MiB, a key up to {MAX_KEY_BYTES} bytes, "
                        "a transaction up to 16.0 MiB of values")


def test_mkfs_sparse_creates_a_sparse_image_that_mounts_and_accepts_a_t_suffix(tmp_path):
    image = tmp_path / "sparse.img"
    assert statefs("mkfs", str(image), "--size", "64M", "--sparse").returncode == 0
    assert image.stat().st_size == 64 << 20 and image.stat().st_blocks * 512 < 1 << 20
    with Engine.mount(FileDevice(str(image))) as engine:
        engine.put("k", b"v")
    huge = tmp_path / "huge.img"
    result = statefs("mkfs", str(huge), "--size", "1T", "--sparse")
    try:
        assert result.returncode == 0, result.stderr
        assert huge.stat().st_size == 1 << 40 and b"(1.0 TiB)" in result.stdout
    finally:
        huge.unlink(missing_ok=True)
    assert_fails(statefs("mkfs", str(tmp_path / "x.img"), "--size", "12Q"), Code.EINVAL, "cannot parse size")


def test_mkfs_with_a_size_that_is_not_whole_sectors_is_einval_and_creates_nothing(tmp_path):
    image = tmp_path / "odd.img"
    result = statefs("mkfs", str(image), "--size", "2000001")
    assert_fails(result, Code.EINVAL, "is not a multiple of 512")
    assert "e.g. 64M" in result.stderr.decode() and not image.exists()


def test_mkfs_sparse_without_size_is_eusage(tmp_path):
    image = tmp_path / "zeros.img"
    image.write_bytes(bytes(2 << 20))
    assert_fails(statefs("mkfs", str(image), "--sparse"), Code.EUSAGE, "--sparse goes with --size")


def test_mkfs_help_explains_the_cost_of_sparse():
    text = " ".join(statefs("mkfs", "--help").stdout.decode().split())
    assert "--sparse" in text and "metadata" in text and "K, M, G or T" in text


def test_mkfs_refuses_to_overwrite_a_statefs_image_without_force(tmp_path):
    image = str(tmp_path / "used.img")
    assert statefs("mkfs", image, "--size", "4M").returncode == 0
    with Engine.mount(FileDevice(image)) as engine:
        engine.put("precious", b"data")
    assert_fails(statefs("mkfs", image, "--size", "4M"), Code.EUSAGE, "--force")
    with Engine.mount(FileDevice(image)) as engine:
        assert engine.get("precious") == b"data"
    assert statefs("mkfs", image, "--size", "4M", "--force").returncode == 0
    with Engine.mount(FileDevice(image)) as engine:
        assert engine.list() == []


def test_mkfs_formats_an_existing_file_in_place_without_size(tmp_path):
    image = tmp_path / "raw.img"
    image.write_bytes(bytes(2 << 20))
    assert statefs("mkfs", str(image)).returncode == 0
    assert image.stat().st_size == 2 << 20


def test_mkfs_of_a_missing_file_without_size_is_eusage(tmp_path):
    assert_fails(statefs("mkfs", str(tmp_path / "absent.img")), Code.EUSAGE, "give --size")


def test_mkfs_below_the_minimum_size_leaves_no_file_and_suggests_a_bigger_size(tmp_path):
    image = tmp_path / "tiny.img"
    result = statefs("mkfs", str(image), "--size", "512K")
    assert_fails(result, Code.EUSAGE, "too small")
    assert "give a bigger --size" in result.stderr.decode()
    assert "statefs mkfs" not in result.stderr.decode()
    assert not image.exists()


def test_mkfs_in_a_missing_directory_is_einval_naming_mkdir_not_an_internal_error(tmp_path):
    image = tmp_path / "newdir" / "x.img"
    result = statefs("mkfs", str(image), "--size", "8M")
    assert_fails(result, Code.EINVAL, f"directory {tmp_path / 'newdir'} does not exist")
    assert f"mkdir -p {tmp_path / 'newdir'}" in result.stderr.decode()
    assert "EINTERNAL" not in result.stderr.decode() and not image.parent.exists()


def test_mkfs_of_a_directory_is_einval(tmp_path):
    assert_fails(statefs("mkfs", str(tmp_path)), Code.EINVAL, "is a directory")


def _ext4(path):
    if not shutil.which("mkfs.ext4") and not os.path.exists("/sbin/mkfs.ext4"):
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    path.write_bytes(bytes(8 << 20))
    subprocess.run([shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4", "-q", "-F", str(path)], check=True)


def _dos_partition_table(path):
    image = bytearray(8 << 20)
    image[446:462] = bytes([0, 0, 2, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 4096)
    image[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(image))


HOLDERS = {
    "text": (lambda p: p.write_text("my notes\n"), "data (a non-zero byte at offset 0)"),
    "random": (lambda p: p.write_bytes(os.urandom(3 << 20)), "data"),
    "ext4": (_ext4, "an ext4 file system"),
    "dos": (_dos_partition_table, "a partition table (dos)"),
}


@pytest.mark.parametrize("size", [None, "2M"], ids=["in-place", "with-size"])
@pytest.mark.parametrize("kind", sorted(HOLDERS))
def test_mkfs_refuses_a_file_that_holds_data_or_a_signature_unless_forced(tmp_path, kind, size):
    make, words = HOLDERS[kind]
    if kind in ("ext4", "dos") and not BLKID:
        words = "data (a non-zero byte"  # without blkid the zero scan still refuses
    target = tmp_path / "target"
    make(target)
    before = target.read_bytes()
    extra = ["--size", size] if size else []
    result = statefs("mkfs", str(target), *extra)
    assert_fails(result, Code.EUSAGE, f"{target} already holds {words}")
    assert "add --force" in result.stderr.decode()
    assert target.read_bytes() == before
    if len(before) >= 1 << 20 or size:
        assert statefs("mkfs", str(target), *extra, "--force").returncode == 0
        with Engine.mount(FileDevice(str(target))) as engine:
            assert engine.list() == []


def test_mkfs_formats_an_all_zero_or_sparse_file_without_force(tmp_path):
    zeros, sparse = tmp_path / "zeros.img", tmp_path / "sparse.img"
    zeros.write_bytes(bytes(2 << 20))
    with open(sparse, "wb") as f:
        f.truncate(4 << 20)
    for image in (zeros, sparse):
        result = statefs("mkfs", str(image))
        assert result.returncode == 0, result.stderr


def test_mkfs_of_an_image_in_use_by_a_daemon_is_ebusy(daemon):
    assert_fails(statefs("mkfs", daemon.image, "--size", "4M", "--force"), Code.EBUSY, daemon.image)


# ------------------------------------------------------- daemon commands

def test_put_and_get_round_trip_exact_bytes_from_argument_file_and_stdin(sock, tmp_path):
    assert statefs("put", "cli/arg", "hello world", socket=sock).returncode == 0
    assert statefs("get", "cli/arg", socket=sock).stdout == b"hello world"

    blob = bytes(range(256)) * 1000
    (tmp_path / "blob").write_bytes(blob)
    assert statefs("put", "cli/file", "--file", str(tmp_path / "blob"), socket=sock).returncode == 0
    assert statefs("get", "cli/file", socket=sock).stdout == blob

    assert statefs("put", "cli/stdin", "-", socket=sock, input=b"\x00from stdin\n").returncode == 0
    assert statefs("get", "cli/stdin", socket=sock).stdout == b"\x00from stdin\n"


def test_socket_comes_from_statefs_socket_env(sock):
    env = env_with_repo(STATEFS_SOCKET=sock)
    assert statefs("put", "cli/env", "v", env=env).returncode == 0
    assert statefs("get", "cli/env", env=env).stdout == b"v"


def test_rm_removes_and_get_of_a_missing_key_is_enotfound_with_hint(sock):
    statefs("put", "cli/gone", "x", socket=sock)
    assert statefs("rm", "cli/gone", socket=sock).returncode == 0
    result = statefs("get", "cli/gone", socket=sock)
    assert_fails(result, Code.ENOTFOUND, "cli/gone")
    assert result.stderr.decode().rstrip().endswith("(list keys with 'statefs ls')")
    assert_fails(statefs("rm", "cli/gone", socket=sock), Code.ENOTFOUND)


def test_ls_lists_the_keys_under_a_prefix_one_per_line(sock):
    for key in ("ls/b", "ls/a", "ls/sub/c", "lsx"):
        statefs("put", key, "v", socket=sock)
    assert statefs("ls", "ls/", socket=sock).stdout.decode().splitlines() == ["ls/a", "ls/b", "ls/sub/c"]
    assert "lsx" in statefs("ls", socket=sock).stdout.decode().splitlines()


def test_stat_prints_a_key_stat_or_the_daemon_info_as_json_with_json(sock, shared_daemon):
    statefs("put", "cli/stat", "12345", socket=sock)
    key_stat = json.loads(statefs("stat", "cli/stat", "--json", socket=sock).stdout)
    assert key_stat["path"] == "cli/stat" and key_stat["size"] == 5 and key_stat["txn_id"] > 0
    info = json.loads(statefs("stat", "--json", socket=sock).stdout)
    assert info["image"] == shared_daemon.image and info["read_only"] is False


def test_stat_in_words_names_size_and_txn_and_explains_the_txn_ids(sock, shared_daemon):
    statefs("put", "cli/words", "12345", socket=sock)
    txn = json.loads(statefs("stat", "cli/words", "--json", socket=sock).stdout)["txn_id"]
    result = statefs("stat", "cli/words", socket=sock)
    assert result.returncode == 0
    assert result.stdout.decode().splitlines() == [
        "key:  cli/words", "size: 5 bytes", f"txn:  {txn} (the transaction that last wrote it)"]
    info = statefs("stat", socket=sock).stdout.decode()
    assert info.startswith(f"image:         {shared_daemon.image} (")
    assert "the active half of the device" in info and "a restart skips ahead" in info
    assert "next_txn_id" not in info and "log_end" not in info


def test_put_rm_and_txn_are_quiet_on_success_and_report_the_txn_with_json_or_v(sock):
    quiet = statefs("put", "out/a", "1", socket=sock)
    assert quiet.returncode == 0 and quiet.stdout == b"" and quiet.stderr == b""
    put = json.loads(statefs("put", "out/b", "2", "--json", socket=sock).stdout)
    assert json.loads(statefs("stat", "out/b", "--json", socket=sock).stdout)["txn_id"] == put["txn"]
    verbose = statefs("put", "out/c", "333", "-v", socket=sock).stdout.decode()
    assert verbose.startswith("statefs: put out/c (3 bytes): committed as transaction ")

    doc = json.dumps({"ops": [{"op": "put", "key": "out/d", "value": "4"}]}).encode()
    assert statefs("txn", "-", socket=sock, input=doc).stdout == b""
    txn = json.loads(statefs("txn", "-", "--json", socket=sock, input=doc).stdout)["txn"]
    assert json.loads(statefs("stat", "out/d", "--json", socket=sock).stdout)["txn_id"] == txn
    assert statefs("txn", "-", "-v", socket=sock, input=doc).stdout.decode().startswith(
        "statefs: applied 1 ops: committed as transaction ")

    assert statefs("rm", "out/a", socket=sock).stdout == b""
    assert json.loads(statefs("rm", "out/b", "--json", socket=sock).stdout)["txn"] > put["txn"]
    assert statefs("rm", "out/c", "-v", socket=sock).stdout.decode().startswith("statefs: removed out/c: ")
    assert statefs("put", "k", "v", "--json", "-v", socket=sock).returncode == Code.EUSAGE


def test_get_o_writes_the_exact_value_into_a_file_and_nothing_to_stdout(sock, tmp_path):
    blob = bytes(range(256)) * 3
    (tmp_path / "in").write_bytes(blob)
    statefs("put", "out/file", "--file", str(tmp_path / "in"), socket=sock)
    result = statefs("get", "out/file", "-o", str(tmp_path / "copy"), socket=sock)
    assert result.returncode == 0 and result.stdout == b""
    assert (tmp_path / "copy").read_bytes() == blob
    bad = statefs("get", "out/file", "-o", str(tmp_path / "nodir" / "copy"), socket=sock)
    assert_fails(bad, Code.EINVAL, "cannot write")


def test_ls_l_json_and_0_show_size_txn_and_keys_with_newlines_unambiguously(sock):
    statefs("put", "lsl/a", "1", socket=sock)
    statefs("put", "lsl/long", "x" * 1234, socket=sock)
    statefs("put", "lsl/two\nlines", "22", socket=sock)
    stats = {st["path"]: st for st in json.loads(statefs("ls", "lsl/", "-l", "--json", socket=sock).stdout)}
    assert sorted(stats) == ["lsl/a", "lsl/long", "lsl/two\nlines"]
    assert [stats[k]["size"] for k in sorted(stats)] == [1, 1234, 2]

    assert json.loads(statefs("ls", "lsl/", "--json", socket=sock).stdout) == sorted(stats)
    assert statefs("ls", "lsl/", "-0", socket=sock).stdout.split(b"\0") == [
        b"lsl/a", b"lsl/long", b"lsl/two\nlines", b""]

    long = statefs("ls", "lsl/", "-l", "-0", socket=sock).stdout.decode().split("\0")[:-1]
    width = len("1234")
    tid = max(len(str(st["txn_id"])) for st in stats.values())
    for line, key in zip(long, sorted(stats)):
        assert line == f"{stats[key]['size']:>{width}} {stats[key]['txn_id']:>{tid}} {key}"


def test_txn_help_documents_the_json_format_including_value_b64():
    result = statefs("txn", "--help")
    text = result.stdout.decode()
    assert result.returncode == 0
    assert '"value_b64"' in text and '"op": "delete"' in text and "all together or not at all" in text


def test_txn_from_a_file_or_stdin_applies_every_op_at_once(sock, tmp_path):
    statefs("put", "txn/old", "x", socket=sock)
    doc = {"ops": [{"op": "put", "key": "txn/text", "value": "héllo"},
                   {"op": "put", "key": "txn/bytes", "value_b64": base64.b64encode(b"\x00\xff").decode()},
                   {"op": "delete", "key": "txn/old"}]}
    (tmp_path / "txn.json").write_text(json.dumps(doc))
    assert statefs("txn", str(tmp_path / "txn.json"), socket=sock).returncode == 0
    assert statefs("ls", "txn/", socket=sock).stdout.decode().split() == ["txn/bytes", "txn/text"]
    assert statefs("get", "txn/text", socket=sock).stdout == "héllo".encode()
    assert statefs("get", "txn/bytes", socket=sock).stdout == b"\x00\xff"

    stdin_doc = json.dumps({"ops": [{"op": "put", "key": "txn/stdin", "value": "1"}]}).encode()
    assert statefs("txn", "-", socket=sock, input=stdin_doc).returncode == 0
    assert statefs("get", "txn/stdin", socket=sock).stdout == b"1"


def test_txn_with_one_oversize_key_applies_nothing_and_exits_etoobig(sock):
    doc = {"ops": [{"op": "put", "key": "atomic/a", "value": "1"},
                   {"op": "put", "key": "k" * (MAX_KEY_BYTES + 1), "value": "2"}]}
    assert_fails(statefs("txn", socket=sock, input=json.dumps(doc).encode()), Code.ETOOBIG)
    assert statefs("ls", "atomic/", socket=sock).stdout == b""


def test_txn_with_expect_commits_while_the_key_is_unchanged_and_exits_27_once_it_changed(sock):
    txn = json.loads(statefs("put", "cas/k", "1", "--json", socket=sock).stdout)["txn"]
    doc = json.dumps({"ops": [{"op": "put", "key": "cas/k", "value": "2"}],
                      "expect": [{"key": "cas/k", "txn": txn}, {"key": "cas/none", "txn": 0}]}).encode()
    assert statefs("txn", "-", socket=sock, input=doc).returncode == 0
    result = statefs("txn", "-", socket=sock, input=doc)   # the same condition again: cas/k changed
    assert_fails(result, 27, f"key 'cas/k' changed: expected txn {txn}, it is now txn ")
    assert result.returncode == Code.ECONFLICT
    assert statefs("get", "cas/k", socket=sock).stdout == b"2"


def test_a_513_byte_key_is_etoobig_asking_for_a_shorter_key_not_a_split_value(sock):
    result = statefs("put", "k" * (MAX_KEY_BYTES + 1), "v", socket=sock)
    assert_fails(result, Code.ETOOBIG, f"key of {MAX_KEY_BYTES + 1} bytes exceeds the limit of {MAX_KEY_BYTES}")
    stderr = result.stderr.decode()
    assert f"(use a key of at most {MAX_KEY_BYTES} UTF-8 bytes)" in stderr and "split" not in stderr


@pytest.mark.parametrize("doc, fragment", [
    (b"{not json", "not valid JSON"),
    (b'[{"op": "put"}]', '{"ops": [...]}'),
    (b'{"ops": [{"op": "rename", "key": "a"}]}', "ops[0]"),
    (b'{"ops": [{"op": "put", "key": "a", "value_b64": "***"}]}', "not valid base64"),
    (b'{"ops": [{"op": "put", "key": "a", "value": "1"}], "expect": {"a": 1}}', '"expect" must be an array'),
    (b'{"ops": [{"op": "put", "key": "a", "value": "1"}], "expect": [{"key": "a", "txn": "1"}]}',
     'expect[0] must be an object with a string "key" and an integer "txn"'),
])
def test_malformed_txn_json_is_einval_naming_the_problem(sock, doc, fragment):
    result = statefs("txn", "-", socket=sock, input=doc)
    assert_fails(result, Code.EINVAL, fragment)
    assert result.stderr.decode().rstrip().endswith("(the format is in 'statefs txn --help')")


@pytest.mark.parametrize("args", [["put", "k", "--file", "/nonexistent/value"], ["txn", "/nonexistent/txn.json"]],
                         ids=["put-file", "txn-file"])
def test_a_missing_input_file_is_einval_asking_to_check_the_path(sock, args):
    result = statefs(*args, socket=sock)
    assert_fails(result, Code.EINVAL, "cannot read /nonexistent/")
    assert "(check the file's path)" in result.stderr.decode()
    assert "docs/statefs.md" not in result.stderr.decode()


def test_a_20_mb_value_file_is_etoobig_naming_the_value_limit_not_the_frame_cap(sock, tmp_path):
    (tmp_path / "big").write_bytes(bytes(20_000_000))
    result = statefs("put", "cli/big", "--file", str(tmp_path / "big"), socket=sock)
    assert_fails(result, Code.ETOOBIG, f"value of 20000000 bytes exceeds the limit of {MAX_VALUE_BYTES}")
    assert "frame" not in result.stderr.decode()


def test_oversize_value_is_etoobig(sock, tmp_path):
    (tmp_path / "big").write_bytes(bytes(MAX_VALUE_BYTES + 1))
    assert_fails(statefs("put", "cli/big", "--file", str(tmp_path / "big"), socket=sock), Code.ETOOBIG)


def test_key_that_is_not_utf8_is_einval_showing_the_bad_bytes_escaped_once(sock):
    result = subprocess.run([sys.executable, "-m", "statefsd.cli", "--socket", sock, "put", b"bad\xffkey", "v"],
                            cwd=REPO, env=env_with_repo(), capture_output=True, timeout=60)
    assert_fails(result, Code.EINVAL, "text 'bad\\xffkey' is not valid UTF-8")
    assert "\\\\" not in result.stderr.decode()


def test_unreachable_daemon_is_econn_naming_the_socket(tmp_path):
    path = str(tmp_path / "nobody.sock")
    result = statefs("get", "k", socket=path)
    assert_fails(result, Code.ECONN, f"{path}: no such socket")
    assert f"start it with --socket {path}" in result.stderr.decode()
    no_socket = statefs("get", "k", env=env_with_repo())
    assert_fails(no_socket, Code.ECONN, "no statefsd socket given (pass --socket PATH or set STATEFS_SOCKET=PATH)")


def test_a_directory_as_socket_is_econn_saying_so_not_connection_refused(tmp_path):
    result = statefs("get", "k", socket=str(tmp_path))
    assert_fails(result, Code.ECONN, f"{tmp_path} is a directory, not a statefsd socket")
    assert "refused" not in result.stderr.decode()


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["put", "only-key"], ["put", "k", "v", "--file", "f"]])
def test_usage_errors_exit_2(args, sock):
    assert statefs(*args, socket=sock).returncode == Code.EUSAGE


def test_compact_rewrites_the_log_and_keeps_every_value(sock):
    for i in range(20):
        statefs("put", "compact/k", f"value-{i}", socket=sock)
    result = statefs("compact", socket=sock)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["log_after"] < stats["log_before"]
    assert statefs("get", "compact/k", socket=sock).stdout == b"value-19"
