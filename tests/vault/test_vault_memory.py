"""Backup, restore, forget/prune and check run in memory that does not grow with the vault."""

from __future__ import annotations

import os
import random

from tests.vault.trees import make_tree

MIB = 1024


def fill(root: str, files: int, seed: int) -> None:
    """Many small files: many objects, which is what an index in memory would grow with."""
    rnd = random.Random(seed)
    for i in range(files):
        d = os.path.join(root, f"d{i % 100:03}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(rnd.randbytes(rnd.randint(100, 3000)))


def peak_rss_of_every_command(vault_env, work: str) -> dict[str, int]:
    """The same commands on the same tree; the vault around them is what differs."""
    tree = os.path.join(work, "tree")
    make_tree(tree, seed=7, files=30, big=0)
    # A large file that is one block repeated: restore must stream it, whatever its size.
    block = random.Random(9).randbytes(1 << 20)
    with open(os.path.join(tree, "large.bin"), "wb") as f:
        for _ in range(384):
            f.write(block)
    rss = {}
    _, rss["backup"] = vault_env.cli_peak_rss("backup", tree)
    _, rss["restore"] = vault_env.cli_peak_rss("restore", f"latest:{tree}", "--target", os.path.join(work, "out"))
    assert os.path.getsize(os.path.join(work, "out", "tree", "large.bin")) == 384 << 20
    _, rss["check"] = vault_env.cli_peak_rss("check", "--read-data")
    _, rss["forget_prune"] = vault_env.cli_peak_rss("forget", "--keep-last", "1", "--prune")
    return rss


def test_peak_memory_of_each_command_does_not_grow_with_the_vault(vault_env, tmp_path):
    vault_env.cli("init")
    small = peak_rss_of_every_command(vault_env, str(tmp_path / "small"))
    # Grow the vault by 12,500 objects in five snapshots, then do the same again.
    for n in range(5):
        other = str(tmp_path / f"other-{n}")
        fill(other, 2500, seed=n)
        vault_env.cli("backup", other)
    objects = len(vault_env.client().list("vault/o/"))
    assert objects > 12_500
    large = peak_rss_of_every_command(vault_env, str(tmp_path / "large"))
    print({"objects_in_the_large_vault": objects, "small_kib": small, "large_kib": large})
    for command in small:
        assert large[command] < small[command] + 12 * MIB, (command, small, large)
        assert large[command] < 200 * MIB, (command, large)
