"""Deterministic file trees for vault tests, and a comparison of two trees."""

from __future__ import annotations

import os
import random
import stat


def make_tree(root: str, *, seed: int = 1, files: int = 40, big: int = 1, big_size: int = 3 << 20) -> None:
    rnd = random.Random(seed)
    os.makedirs(os.path.join(root, "docs", "deep", "er"), exist_ok=True)
    os.makedirs(os.path.join(root, "empty-dir"), exist_ok=True)
    for i in range(files):
        sub = ["", "docs", "docs/deep", "docs/deep/er"][i % 4]
        body = rnd.randbytes(rnd.randint(0, 20000)) if i % 3 else (f"line {i}\n" * rnd.randint(1, 400)).encode()
        with open(os.path.join(root, sub, f"file-{i:03}.txt"), "wb") as f:
            f.write(body)
    for i in range(big):
        with open(os.path.join(root, f"big-{i}.bin"), "wb") as f:
            f.write(rnd.randbytes(big_size))
    open(os.path.join(root, "empty-file"), "w").close()
    os.symlink("docs/file-001.txt", os.path.join(root, "link-to-file"))
    os.symlink("/nonexistent/target", os.path.join(root, "dangling"))
    os.chmod(os.path.join(root, "docs", "file-001.txt"), 0o640)
    os.chmod(os.path.join(root, "docs", "deep"), 0o750)
    os.utime(os.path.join(root, "file-000.txt"), ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


def snapshot_of(root: str) -> dict[str, tuple]:
    """Everything restore promises to bring back, per relative path."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(path), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_mtime_ns, f.read())
    return out
