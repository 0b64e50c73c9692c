"""The vault end to end through the `statefs vault` command, on real daemons."""

from __future__ import annotations

import os
import shutil

from statefsd.vault import records as rec
from tests.vault.trees import make_tree, snapshot_of


def edit_tree(root: str) -> None:
    with open(os.path.join(root, "docs", "file-001.txt"), "ab") as f:
        f.write(b"an edit\n")
    os.remove(os.path.join(root, "file-004.txt"))
    with open(os.path.join(root, "docs", "new-file.txt"), "wb") as f:
        f.write(b"fresh\n")
    path = os.path.join(root, "big-0.bin")
    data = open(path, "rb").read()
    with open(path, "wb") as f:       # an insert in the middle of a large file
        f.write(data[:1 << 20] + b"inserted bytes" * 100 + data[1 << 20:])


def test_a_tree_backed_up_twice_restores_byte_identical_with_modes_times_and_symlinks(vault_env, tmp_path):
    src = str(tmp_path / "src")
    make_tree(src)
    vault_env.cli("init")
    first = vault_env.cli("backup", src)
    before = snapshot_of(src)
    edit_tree(src)
    second = vault_env.cli("backup", src)
    assert second["parent"] == first["snapshot"]
    assert second["added"] == 1 and second["modified"] == 2 and second["deleted"] == 1
    # The insert re-uses most of the large file's chunks: far less than the file is stored again.
    assert second["new_bytes"] < 1 << 20, second

    for snap, expected in ((first["snapshot"], before), (second["snapshot"], snapshot_of(src))):
        target = tmp_path / f"restore-{snap}"
        result = vault_env.cli("restore", f"{snap}:{src}", "--target", str(target))
        assert result["damaged"] == [] and result["failed"] == []
        assert snapshot_of(str(target / os.path.basename(src))) == expected

    snaps = vault_env.cli("snapshots")
    assert [s["id"] for s in snaps] == [first["snapshot"], second["snapshot"]]


def test_diff_names_what_was_added_modified_and_removed(vault_env, tmp_path):
    src = str(tmp_path / "src")
    make_tree(src)
    vault_env.cli("init")
    a = vault_env.cli("backup", src)["snapshot"]
    edit_tree(src)
    b = vault_env.cli("backup", src)["snapshot"]
    changes = {(c["change"], os.path.relpath(c["path"], src)) for c in vault_env.cli("diff", a, b)}
    assert {("+", "docs/new-file.txt"), ("-", "file-004.txt"), ("M", "docs/file-001.txt"),
            ("M", "big-0.bin")} <= changes
    assert not any(path.startswith("docs/deep") for _, path in changes)


def test_log_lists_every_version_of_one_file(vault_env, tmp_path):
    src = str(tmp_path / "src")
    make_tree(src)
    target = os.path.join(src, "docs", "file-001.txt")
    vault_env.cli("init")
    for n in range(3):
        with open(target, "ab") as f:
            f.write(b"version %d\n" % n)
        vault_env.cli("backup", src)
    os.remove(target)
    vault_env.cli("backup", src)
    events = vault_env.cli("log", target)
    assert [e["op"] for e in events] == ["add", "modify", "modify", "delete"]
    sizes = [e["size"] for e in events]
    assert sizes[0] < sizes[1] < sizes[2] and sizes[3] == sizes[2]


def test_ls_lists_a_snapshot_and_one_path_of_it(vault_env, tmp_path):
    src = str(tmp_path / "src")
    make_tree(src)
    vault_env.cli("init")
    snap = vault_env.cli("backup", src)["snapshot"]
    proc = vault_env.cli("ls", snap[:6], os.path.join(src, "docs", "deep"), json_out=False)
    lines = proc.stdout.splitlines()
    assert lines[0] == os.path.join(src, "docs", "deep")
    assert os.path.join(src, "docs", "deep", "er", "file-003.txt") in lines
    missing = vault_env.cli("ls", snap, "/no/such/path", check=False, json_out=False)
    assert missing.returncode == 11 and "not in snapshot" in missing.stderr


def test_a_chunk_is_stored_once_across_files_and_versions(vault_env, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(2 << 20)
    (src / "a.bin").write_bytes(payload)
    (src / "b.bin").write_bytes(payload)                 # same content, another name
    (src / "c.bin").write_bytes(payload[:1 << 20])       # a prefix of it
    vault = vault_env.init()
    from statefsd.vault.backup import Backup
    first = Backup(vault, [str(src)]).run()
    assert first["bytes"] == 5 << 20
    assert first["new_bytes"] < (2 << 20) + (256 << 10) + 65536, first     # a.bin once, c.bin's tail chunk at most
    (src / "d.bin").write_bytes(payload)                 # a new file with old content
    second = Backup(vault, [str(src)]).run()
    assert second["read_bytes"] == 2 << 20
    assert second["new_bytes"] < 16 << 10, second        # only new tree nodes
    chunk_keys = [k for k in vault_env.client().list(rec.OBJECT_PREFIX)]
    assert len(chunk_keys) == len(set(chunk_keys))


def test_no_file_name_or_content_reaches_the_image(vault_env, tmp_path):
    src = tmp_path / "src"
    (src / "CANARYDIRNAME").mkdir(parents=True)
    (src / "CANARYDIRNAME" / "CANARYFILENAME.txt").write_bytes(b"CANARYCONTENT " * 5000)
    (src / "small").write_bytes(b"CANARYSMALL")
    os.symlink("CANARYLINKTARGET", src / "link")
    vault_env.cli("init")
    vault_env.cli("backup", str(src), "--tag", "CANARYTAG")
    vault_env.statefsd.stop()
    image = open(os.path.join(vault_env.dir, "vault.img"), "rb").read()
    for canary in (b"CANARYDIRNAME", b"CANARYFILENAME", b"CANARYCONTENT", b"CANARYSMALL", b"CANARYLINKTARGET",
                   b"CANARYTAG", os.fsencode(str(src))):
        assert canary not in image, canary


def test_excluded_paths_are_not_backed_up(vault_env, tmp_path):
    src = str(tmp_path / "src")
    make_tree(src)
    vault_env.cli("init")
    snap = vault_env.cli("backup", src, "--exclude", "*.bin", "--exclude", os.path.join(src, "docs", "deep"))
    listed = vault_env.cli("ls", snap["snapshot"], json_out=False).stdout.splitlines()
    assert not any(p.endswith(".bin") for p in listed)
    assert not any("/docs/deep" in p for p in listed)
    assert os.path.join(src, "docs", "file-001.txt") in listed
