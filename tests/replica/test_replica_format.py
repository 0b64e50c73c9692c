"""The replica's bytes (statefsd/replica/format.py) and the keyless check of a copy (verify.py)."""

from __future__ import annotations

import os

import msgpack
import pytest
from nacl.signing import SigningKey

from statefsd.errors import IntegrityError
from statefsd.replica import format as rfmt
from statefsd.replica.verify import fork_problems, read_heads, verify_copy
from statefsd.shared.signing import sign_payload
from statefsd.vault.keys import VaultKeys

KEYS = rfmt.ReplicaKeys.derive(VaultKeys.derive(b"v" * 16, b"m" * 32))
SIZE = rfmt.MIN_SEGMENT_BYTES


def sealed_segment(seq: int, stream: bytes, *, keys=KEYS, flags=0) -> bytes:
    header = rfmt.SegmentHeader(seq, 1, flags, len(stream), bytes(32))
    return rfmt.seal_segment(keys, header, stream, SIZE)


def test_every_segment_has_the_same_size_whatever_it_carries():
    assert len(sealed_segment(0, b"")) == len(sealed_segment(1, b"x" * rfmt.capacity(SIZE))) == SIZE


def test_a_segment_opens_only_under_its_own_key_and_sequence_number():
    data = sealed_segment(3, b"hello")
    header, stream = rfmt.open_segment(KEYS, 3, data)
    assert (header.seq, stream) == (3, b"hello")
    with pytest.raises(IntegrityError):
        rfmt.open_segment(KEYS, 4, data)        # moved to another place in the sequence
    other = rfmt.ReplicaKeys.derive(VaultKeys.derive(b"w" * 16, b"m" * 32))
    with pytest.raises(IntegrityError):
        rfmt.open_segment(other, 3, data)
    flipped = bytearray(data)
    flipped[100] ^= 1
    with pytest.raises(IntegrityError):
        rfmt.open_segment(KEYS, 3, bytes(flipped))


def test_transactions_split_across_segments_decode_whole_and_in_order():
    stream = b"".join(rfmt.encode_txn(i, bytes([i]) * 32, [(f"k/{i}", os.urandom(i * 500)), ("gone", None)])
                      for i in range(1, 40))
    decoder = rfmt.StreamDecoder()
    got = []
    for at in range(0, len(stream), 7000):
        got += decoder.feed(stream[at:at + 7000])
    assert [t[0] for t in got] == list(range(1, 40))
    assert got[5][2][1] == ("gone", None) and len(got[5][2][0][1]) == 3000
    assert decoder.pending == 0


def test_a_stream_whose_txn_ids_go_back_is_refused():
    decoder = rfmt.StreamDecoder()
    decoder.feed(rfmt.encode_txn(5, bytes(32), []))
    with pytest.raises(IntegrityError):
        decoder.feed(rfmt.encode_txn(5, bytes(32), []))


def write_copy(root, signing: SigningKey, counter: int, segments: dict[str, bytes], retired=()):
    (root / "seg").mkdir(parents=True, exist_ok=True)
    (root / "head").mkdir(exist_ok=True)
    (root / rfmt.KEYS_FILE).write_bytes(b"keys")
    for name, data in segments.items():
        (root / name).write_bytes(data)
    public = bytes(signing.verify_key)
    head = rfmt.Head(KEYS.replica_id, public, counter,
                     [rfmt.SegmentEntry(n, rfmt.file_digest(d)) for n, d in segments.items()], list(retired),
                     rfmt.file_digest(b"keys"), b"sealed")
    body = rfmt.encode_head_body(head)
    signature = signing.sign(sign_payload(rfmt.HEAD_SIGN_LABEL, rfmt.head_signing_bytes(body))).signature
    (root / rfmt.head_name(public, counter)).write_bytes(rfmt.encode_head_file(body, signature))
    return public


def test_a_copy_is_checked_without_any_key_and_names_what_is_missing_or_damaged(tmp_path):
    device = SigningKey.generate()
    segs = {rfmt.segment_name(KEYS, i): sealed_segment(i, b"s%d" % i) for i in range(3)}
    public = write_copy(tmp_path, device, 1, segs)
    report = verify_copy(tmp_path, pinned_key=public)
    assert report.ok() and report.head_counter == 1 and report.present == 3
    names = list(segs)
    (tmp_path / names[0]).unlink()
    (tmp_path / names[1]).write_bytes(bytes([segs[names[1]][0] ^ 1]) + segs[names[1]][1:])
    report = verify_copy(tmp_path, pinned_key=public)
    assert not report.ok() and report.missing == [names[0]] and report.damaged == [names[1]]


def test_a_forged_head_and_a_foreign_signer_are_reported(tmp_path):
    device, stranger = SigningKey.generate(), SigningKey.generate()
    segs = {rfmt.segment_name(KEYS, 0): sealed_segment(0, b"a")}
    public = write_copy(tmp_path, device, 1, segs)
    outer = msgpack.unpackb((tmp_path / rfmt.head_name(public, 1)).read_bytes())
    body = msgpack.unpackb(outer["body"])
    body["counter"] = 2                          # a newer head, without the device key
    forged = rfmt.encode_head_file(msgpack.packb(body, use_bin_type=True), outer["sig"])
    (tmp_path / rfmt.head_name(public, 2)).write_bytes(forged)
    report = verify_copy(tmp_path, pinned_key=public)
    assert report.head_counter == 1 and any("signature does not verify" in p for p in report.problems)
    os.unlink(tmp_path / rfmt.head_name(public, 2))
    foreign = write_copy(tmp_path / "x", stranger, 5, segs)
    os.rename(tmp_path / "x" / rfmt.head_name(foreign, 5), tmp_path / rfmt.head_name(foreign, 5))
    report = verify_copy(tmp_path, pinned_key=public)
    assert report.head_counter == 1 and any("not by the pinned key" in p for p in report.problems)


def test_two_heads_with_one_counter_and_different_contents_are_a_fork(tmp_path):
    device = SigningKey.generate()
    write_copy(tmp_path / "a", device, 1, {rfmt.segment_name(KEYS, 0): sealed_segment(0, b"a")})
    write_copy(tmp_path / "b", device, 1, {rfmt.segment_name(KEYS, 0): sealed_segment(0, b"b")})
    heads = read_heads(tmp_path / "a", []) + read_heads(tmp_path / "b", [])
    problems = fork_problems(heads)
    assert problems and all(p.startswith("fork") for p in problems)
    assert fork_problems(read_heads(tmp_path / "a", []) * 2) == []
