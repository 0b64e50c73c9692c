"""The backup bench's data: a deterministic tree (version 1) and the edits
that turn it into version 2, the same bytes for every tool measured.

Version 1: many small files (1-64 KiB, half compressible text, half random)
in nested directories, plus four large random files. Version 2: an insert in
the middle of every large file, a 1 MiB overwrite, about 50 edited small
files, a few deleted and a few added: the changes a content-defined chunker
should store as a few MiB, where fixed blocks would store the large files
again from the insert on.
"""

from __future__ import annotations

import filecmp
import os
import random

KIB, MIB = 1 << 10, 1 << 20
LARGE_FILES = 4
LARGE_MAX = 64 * MIB
SMALL_MIN, SMALL_MAX = 1 * KIB, 64 * KIB
FILES_PER_DIR = 40
EDITS, DELETES, ADDS = 50, 10, 10
OVERWRITE = 1 * MIB


def _text_pool(rng: random.Random, size: int) -> bytes:
    """Word-like text (compresses about 2:1 with zstd) that small text files
    are sliced from, so generating them costs no per-word Python work."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(4096)]
    lines, total = [], 0
    while total < size:
        line = " ".join(rng.choices(vocab, k=rng.randint(4, 16))) + "\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def _small_path(i: int, text: bool) -> str:
    return os.path.join(f"d{i // (FILES_PER_DIR * 25):02d}", f"s{(i // FILES_PER_DIR) % 25:02d}",
                        f"f{i:05d}.{'txt' if text else 'bin'}")


def _write(root: str, rel: str, data: bytes) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _small_content(rng: random.Random, pool: bytes, i: int, text: bool) -> bytes:
    n = rng.randint(SMALL_MIN, SMALL_MAX)
    if not text:
        return rng.randbytes(n)
    head = f"file {i}\n".encode()
    start = rng.randrange(len(pool) - n)
    return (head + pool[start:start + n])[:n]


def make_v1(root: str, total_bytes: int, seed: int) -> dict:
    """Write version 1 under ``root`` (created, must not exist): about
    ``total_bytes``, half or more of it in small files."""
    rng = random.Random(seed)
    os.makedirs(root)
    large_max = max(64 * KIB, min(LARGE_MAX, total_bytes // (2 * LARGE_FILES)))
    written, large = 0, []
    for k in range(LARGE_FILES):
        size = rng.randint(large_max // 2, large_max)
        _write(root, os.path.join("large", f"big{k}.bin"), rng.randbytes(size))
        large.append(size)
        written += size
    pool = _text_pool(rng, 4 * MIB)
    small = 0
    while written < total_bytes:
        text = rng.random() < 0.5
        data = _small_content(rng, pool, small, text)
        _write(root, _small_path(small, text), data)
        written += len(data)
        small += 1
    return {"seed": seed, "files": LARGE_FILES + small, "small_files": small, "large_files": large,
            "bytes": written}


def _small_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if os.path.relpath(dirpath, root).split(os.sep)[0] == "large":
            continue
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(filenames)]
    return out


def make_v2(root: str, seed: int) -> dict:
    """Turn version 1 under ``root`` into version 2, in place (the tools
    back up the same paths again, as a nightly backup would)."""
    rng = random.Random(seed + 1)
    changed = 0
    large_dir = os.path.join(root, "large")
    for name in sorted(os.listdir(large_dir)):
        path = os.path.join(large_dir, name)
        with open(path, "rb") as f:
            data = f.read()
        at = rng.randint(len(data) * 2 // 5, len(data) * 3 // 5)
        insert = rng.randbytes(rng.randint(1 * KIB, 16 * KIB))
        with open(path, "wb") as f:
            f.write(data[:at] + insert + data[at:])
        changed += len(insert)
    first = os.path.join(large_dir, sorted(os.listdir(large_dir))[0])
    size = os.path.getsize(first)
    overwrite = min(OVERWRITE, size // 4)
    with open(first, "r+b") as f:
        f.seek(size * 3 // 4)
        f.write(rng.randbytes(overwrite))
    changed += overwrite

    small = _small_files(root)
    edits = min(EDITS, max(1, len(small) // 5))
    deletes = min(DELETES, max(1, len(small) // 20))
    picked = rng.sample(small, edits + deletes)
    for rel in picked[:edits]:
        path = os.path.join(root, rel)
        n = os.path.getsize(path)
        at, span = rng.randrange(n), rng.randint(16, 256)
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(rng.randbytes(span))
        changed += span
    for rel in picked[edits:]:
        os.unlink(os.path.join(root, rel))
    pool = _text_pool(rng, 1 * MIB)
    for j in range(ADDS):
        data = _small_content(rng, pool, 100_000 + j, j % 2 == 0)
        _write(root, os.path.join("new", f"n{j:02d}.{'txt' if j % 2 == 0 else 'bin'}"), data)
        changed += len(data)
    return {"large_inserts": LARGE_FILES, "overwrite_bytes": overwrite, "edited": edits, "deleted": deletes,
            "added": ADDS, "changed_bytes": changed, "bytes": tree_bytes(root)}


def files(root: str) -> list[str]:
    """Every regular file under ``root``, relative, in a stable order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(filenames)]
    return out


def tree_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(root, rel)) for rel in files(root))


def warm(root: str) -> None:
    """Read every file once so each tool starts from the same page cache."""
    for rel in files(root):
        with open(os.path.join(root, rel), "rb") as f:
            while f.read(4 * MIB):
                pass


def differences(source: str, restored: str, limit: int = 10) -> list[str]:
    """Why ``restored`` is not a byte-identical copy of ``source`` (file
    set, file types, contents); empty when it is."""
    problems = []
    a, b = files(source), files(restored) if os.path.isdir(restored) else []
    if a != b:
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        problems += [f"missing from the restore: {p}" for p in only_a[:limit]]
        problems += [f"not in the source: {p}" for p in only_b[:limit]]
    for rel in sorted(set(a) & set(b)):
        if len(problems) >= limit:
            break
        if not filecmp.cmp(os.path.join(source, rel), os.path.join(restored, rel), shallow=False):
            problems.append(f"different bytes: {rel}")
    return problems
