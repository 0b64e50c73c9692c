"""Robustness: fsck-statefs and Engine.mount on damaged images.

Hypothesis mutates real images (bit flips, truncation, zeroed, swapped,
foreign and replayed-old blocks, and forgeries: superblock fields or record
headers rewritten with valid checksums). For every mutant:

* fsck returns a report and an exit status in {0, 4, 8} (never an exception),
  and --repair one in {0, 1, 4, 8}; a repair that says "corrected" leaves an
  image that the next run finds clean without writing a byte;
* Engine.mount either mounts a consistent state or raises a StateFSError,
  read-only and read-write; after a read-write mount and a commit, fsck finds
  no error (DESIGN.md invariant 6).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from statefsd.storage import format as fmt
from statefsd.storage.engine import Mutation
from statefsd.errors import IntegrityError, StateFSError

from fsck_images import fixed_key, make_image, mount, put_each, records
from fsck_statefs.cli import run

SIZE = 1 << 20
BLOCKS = SIZE // fmt.BLOCK_SIZE


class Images(dict):
    """current / old / foreign image bytes (short repr: hypothesis prints its arguments)."""

    def __repr__(self) -> str:
        return f"Images({sorted(self)})"


def _build(path, encryption: str) -> Images:
    """A current image, an older snapshot of it, and a foreign image."""
    make_image(path, SIZE, encryption=encryption)
    put_each(path, {"a": b"1" * 100, "b": os.urandom(150_000), "c": b"3"})
    with mount(path) as e:
        e.commit([Mutation("delete", "a"), Mutation("put", "d", b"4" * 5000)])
    old = open(path, "rb").read()
    with mount(path) as e:
        e.compact()  # both log regions now hold records (one of them stale)
        e.put("e", b"5" * 70_000)
        e.commit([Mutation("put", "f", b"6"), Mutation("delete", "c")])
    current = open(path, "rb").read()
    foreign_path = str(path) + ".foreign"
    make_image(foreign_path, SIZE, encryption=encryption)
    put_each(foreign_path, {"a": b"x" * 9000, "z": b"y" * 90_000})
    foreign = open(foreign_path, "rb").read()
    images = Images(current=current, old=old, foreign=foreign)
    images.records = _records(current)
    images.mutations = st.lists(_mutation(_used_blocks(images)), min_size=1, max_size=3)
    return images


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsck-mutations")
    return {enc: _build(d / f"base-{enc}.img", enc) for enc in ("off", "on")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    # Hundreds of mounts and repairs each flush: on tmpfs a flush costs nothing.
    if os.path.isdir("/dev/shm"):
        path = tempfile.mkdtemp(prefix="fsck-mutants-", dir="/dev/shm")
        yield Path(path)
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("fsck-mutants")


def _records(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of every record the log reader accepts in ``data``."""
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        recs, _, _ = records(f.name)
    return [(r.offset, fmt.HEADER_SIZE + r.header.payload_len) for r in recs]


# Forged 64-bit counters stay well below the end of their range, which a
# mount's few increments must not reach; the very top is pinned by
# test_fsck_engine_reproducers.py.
_U63 = st.one_of(st.integers(0, 16), st.integers(0, (1 << 62) - 1))
_SB_FIELDS = {
    "generation": _U63, "txn_reserved": _U63, "total_blocks": _U63,
    "log_epoch": st.integers(0, 0xFFFFFFFF), "active_region": st.integers(0, 255),
    "encryption": st.integers(0, 255), "flags": st.integers(0, 0xFFFF),
    "regions": st.tuples(st.tuples(st.integers(0, 300), st.integers(0, 300)),
                         st.tuples(st.integers(0, 300), st.integers(0, 300))),
    "chain_base": st.binary(min_size=32, max_size=32),
}
_REC_FIELDS = {
    "type": st.integers(0x10, 0x16), "flags": st.integers(0, 255), "epoch": st.integers(0, 0xFFFFFFFF),
    "group": st.integers(0, 40), "seq": st.integers(0, 60), "mount_gen": _U63, "txn_id": _U63,
    "path_hash": st.binary(min_size=8, max_size=8), "chunk_index": st.integers(0, 5),
    "op_index": st.integers(0, 5),
}


def _forgery():
    sb = st.tuples(st.just("forge-sb"), st.integers(0, 1),
                   st.one_of(*[st.tuples(st.just(k), v) for k, v in _SB_FIELDS.items()]))
    rec = st.tuples(st.just("forge-rec"), st.integers(0, 1 << 16),
                    st.one_of(*[st.tuples(st.just(k), v) for k, v in _REC_FIELDS.items()]))
    return st.one_of(sb, rec)


def _used_blocks(images: dict[str, bytes]) -> list[int]:
    zero = bytes(fmt.BLOCK_SIZE)
    return sorted({b for data in images.values() for b in range(BLOCKS)
                   if data[b * fmt.BLOCK_SIZE:(b + 1) * fmt.BLOCK_SIZE] != zero})


def _block_index(used: list[int]):
    return st.one_of(st.sampled_from(used), st.integers(0, BLOCKS - 1))


def _mutation(used: list[int]):
    block = _block_index(used)
    return st.one_of(
        st.tuples(st.just("flip"), block, st.integers(0, fmt.BLOCK_SIZE * 8 - 1)),
        st.tuples(st.just("zero"), block, st.sampled_from([512, fmt.BLOCK_SIZE])),
        st.tuples(st.just("swap"), block, block),
        st.tuples(st.just("foreign"), block, block),
        st.tuples(st.just("old"), block, st.just(0)),
        st.tuples(st.just("garble"), block, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("truncate"), st.integers(0, SIZE - 1), st.just(0)),
        _forgery(),
    )


def _apply(images: dict[str, bytes], mutations) -> bytes:
    data = bytearray(images["current"])
    bs = fmt.BLOCK_SIZE
    cut = None
    # Forgeries first, on pristine bytes, so that what they rewrite parses.
    for kind, a, b in sorted(mutations, key=lambda m: not m[0].startswith("forge")):
        if kind == "forge-sb":
            _forge_superblock(data, a, *b)
        elif kind == "forge-rec":
            _forge_record(data, images.records[a % len(images.records)], *b)
        elif kind == "flip":
            data[a * bs + b // 8] ^= 1 << (b % 8)
        elif kind == "zero":
            data[a * bs:a * bs + b] = bytes(b)
        elif kind == "swap":
            data[a * bs:(a + 1) * bs], data[b * bs:(b + 1) * bs] = data[b * bs:(b + 1) * bs], data[a * bs:(a + 1) * bs]
        elif kind == "foreign":
            data[b * bs:(b + 1) * bs] = images["foreign"][a * bs:(a + 1) * bs]
        elif kind == "old":
            data[a * bs:(a + 1) * bs] = images["old"][a * bs:(a + 1) * bs]
        elif kind == "garble":
            at = a * bs + (len(b) * 37) % (bs - len(b))
            data[at:at + len(b)] = b
        elif kind == "truncate":
            cut = a
    return bytes(data[:cut] if cut is not None else data)


def _forge_superblock(data: bytearray, slot: int, field: str, value) -> None:
    offset = fmt.SUPERBLOCK_OFFSETS[slot]
    sb = fmt.decode_superblock(bytes(data[offset:offset + fmt.BLOCK_SIZE])).superblock
    if sb is not None:
        data[offset:offset + fmt.BLOCK_SIZE] = fmt.encode_superblock(sb.evolve(**{field: value}))


def _forge_record(data: bytearray, where: tuple[int, int], field: str, value) -> None:
    offset, length = where
    h = fmt.unpack_header(data, offset)._asdict()
    h[field] = value
    payload = bytes(data[offset + fmt.HEADER_SIZE:offset + length])
    data[offset:offset + length] = fmt.pack_record(
        h["type"], flags=h["flags"], epoch=h["epoch"], group=h["group"], seq=h["seq"],
        mount_gen=h["mount_gen"], txn_id=h["txn_id"], payload=payload, path_hash=h["path_hash"],
        chunk_index=h["chunk_index"], op_index=h["op_index"])


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _check_fsck(path: str, key) -> None:
    report = run(path, key_provider=key)
    assert report.exit_code in (0, 4, 8), report.to_text()
    report.to_text(verbose=True)
    report.to_json()
    before = _digest(path)
    repaired = run(path, repair_image=True, key_provider=key)
    assert repaired.exit_code in (0, 1, 4, 8), repaired.to_text()
    if report.exit_code == 0:
        assert repaired.exit_code == 0 and _digest(path) == before, "repair wrote to a clean image"
    if repaired.exit_code == 1:
        after = _digest(path)
        again = run(path, repair_image=True, key_provider=key)
        assert again.exit_code == 0, again.to_text()
        assert _digest(path) == after, "a second repair wrote again"


def _read_everything(engine) -> None:
    for key in engine.list():
        try:
            engine.get(key)
        except IntegrityError:
            pass  # a damaged value reads as EINTEGRITY, never as other bytes


def _check_mount(path: str, key) -> None:
    try:
        with mount(path, read_only=True, key_provider=key) as e:
            _read_everything(e)
    except StateFSError:
        pass
    try:
        e = mount(path, key_provider=key)
    except StateFSError:
        return
    try:
        _read_everything(e)
        e.put("fsck/probe", b"after mount")
        assert e.get("fsck/probe") == b"after mount"
    except StateFSError:
        return  # e.g. ENOSPC, or read-only after a failed write
    finally:
        e.close()
    # Invariant 6: whatever a read-write mount accepted and wrote, fsck finds consistent.
    report = run(path, key_provider=key)
    assert not report.errors and report.exit_code == 0, report.to_text()


def _property(images, workdir, mutations, key) -> None:
    data = _apply(images, mutations)
    _check_fsck(_write(workdir / "fsck.img", data), key)
    _check_mount(_write(workdir / "mount.img", data), key)


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                        HealthCheck.too_slow, HealthCheck.data_too_large])


EXAMPLES = int(os.environ.get("FSCK_MUTATION_EXAMPLES", "150"))  # raise it for a long hunt


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(data=st.data())
def test_mutated_plain_images_get_a_report_and_an_fsck_exit_status(bases, workdir, data):
    images = bases["off"]
    _property(images, workdir, data.draw(images.mutations), None)


@settings(max_examples=max(EXAMPLES * 2 // 5, 1), **SETTINGS)
@given(data=st.data())
def test_mutated_encrypted_images_get_a_report_with_and_without_the_key(bases, workdir, data):
    images = bases["on"]
    key = data.draw(st.sampled_from([fixed_key, None]))
    _property(images, workdir, data.draw(images.mutations), key)
