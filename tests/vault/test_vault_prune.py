"""forget and prune: reference counts, no locks, backups beside them."""

from __future__ import annotations

import os
import threading

from statefsd.vault import records as rec
from statefsd.vault.backup import Backup
from statefsd.vault.forget import forget, prune
from tests.vault.trees import make_tree, snapshot_of


def count_invariants(vault_env) -> tuple[int, int]:
    """Every object has a record and data; a z/ marker exactly when its count is 0."""
    client = vault_env.client()
    objects = {k[len(rec.OBJECT_PREFIX):] for k in client.list(rec.OBJECT_PREFIX)}
    data = {k[len(rec.DATA_PREFIX):] for k in client.list(rec.DATA_PREFIX)}
    zeros = {k[len(rec.ZERO_PREFIX):] for k in client.list(rec.ZERO_PREFIX)}
    assert objects == data
    vault = vault_env.open()
    records = vault.objects().lookup([bytes.fromhex(h) for h in objects])
    assert {oid.hex() for oid, (r, _) in records.items() if r.refs == 0} == zeros
    return len(objects), len(zeros)


def test_forget_and_prune_reclaim_only_what_no_snapshot_uses_and_check_proves_the_rest(vault_env, tmp_path):
    src = str(tmp_path / "src")
    make_tree(src)
    vault_env.cli("init")
    snaps = []
    for n in range(3):
        with open(os.path.join(src, f"version-{n}.bin"), "wb") as f:
            f.write(os.urandom(512 << 10))
        snaps.append(vault_env.cli("backup", src))
    kept_roots = {s["snapshot"]: s["root"] for s in snaps[1:]}
    objects_before, _ = count_invariants(vault_env)
    result = vault_env.cli("forget", "--keep-last", "2", "--prune")
    assert result["forget"] == [snaps[0]["snapshot"]]
    assert result["prune"]["collected_objects"] > 0
    objects_after, zeros = count_invariants(vault_env)
    assert zeros == 0 and objects_after < objects_before
    listed = {s["id"]: s["root"] for s in vault_env.cli("snapshots")}
    assert listed == {k: bytes.fromhex(v).hex() for k, v in kept_roots.items()}
    assert vault_env.cli("check", "--read-data")["problems"] == []
    # Forgetting everything and pruning leaves no object behind.
    vault_env.cli("forget", "--keep-tag", "none-has-this", "--prune")
    assert count_invariants(vault_env) == (0, 0)


def test_a_backup_running_during_a_prune_succeeds_and_both_leave_a_consistent_vault(vault_env, tmp_path):
    old = str(tmp_path / "old")
    make_tree(old, seed=2, files=60, big=2)
    vault = vault_env.init()
    for _ in range(2):
        Backup(vault, [old]).run()
        with open(os.path.join(old, "big-1.bin"), "ab") as f:
            f.write(os.urandom(300 << 10))
    for snap in vault.snapshots():
        forget(vault, snap)                              # all of it is garbage now ...
    new = str(tmp_path / "new")
    make_tree(new, seed=2, files=60, big=2)              # ... but the new tree shares most of its chunks
    results: dict = {}

    def backup():
        results["backup"] = Backup(vault_env.open(), [new]).run()

    def pruner():
        results["prune"] = prune(vault_env.open(), compact=False)

    threads = [threading.Thread(target=backup), threading.Thread(target=pruner)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert set(results) == {"backup", "prune"}
    prune(vault_env.open(), compact=False)               # whatever the first prune had to leave
    count_invariants(vault_env)
    target = tmp_path / "out"
    vault_env.cli("restore", f"latest:{new}", "--target", str(target))
    assert snapshot_of(str(target / "new")) == snapshot_of(new)
    assert vault_env.cli("check", "--read-data")["problems"] == []


def test_two_backups_of_different_trees_at_the_same_time_both_succeed(vault_env, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_tree(a, seed=3)
    make_tree(b, seed=3)                                 # identical content: both race to store the same chunks
    with open(os.path.join(b, "only-in-b"), "wb") as f:
        f.write(b"b")
    vault_env.init()
    results: dict = {}

    def run(path):
        results[path] = Backup(vault_env.open(), [path]).run()

    threads = [threading.Thread(target=run, args=(p,)) for p in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert set(results) == {a, b}
    count_invariants(vault_env)
    for path in (a, b):
        target = tmp_path / ("out-" + os.path.basename(path))
        vault_env.cli("restore", f"{results[path]['snapshot']}:{path}",
                      "--target", str(target))
        assert snapshot_of(str(target / os.path.basename(path))) == snapshot_of(path)


def test_forget_without_a_rule_refuses_to_forget_everything(vault_env):
    vault_env.cli("init")
    proc = vault_env.cli("forget", check=False, json_out=False)
    assert proc.returncode == 10 and "--keep-last" in proc.stderr
