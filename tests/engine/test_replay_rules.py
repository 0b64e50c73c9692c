"""Every replay rule that turns a record into a finding, pinned exactly.

The images are real: a base image written by the engine, then log groups
crafted after its log end with the same writer the crafted-log tests use
(docs/statefs.md sections 5-7). Each test replays the image with
statefsd.storage.replay and checks the findings list whole (offset, kind, reason,
txn id), the committed state and the counters, so a rule that is skipped,
reported twice, or reported as something else fails here.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from statefsd.shared.signing import sign_payload
from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.crypto import RecordCipher
from statefsd.storage.engine import Engine
from statefsd.storage.image import read_superblock_slot
from statefsd.errors import CorruptImage
from statefsd.storage.replay import Finding, replay

from tests.format import spec_reader as sr
from tests.format.test_format_crafted_logs import Log, base_images, delete, prepare_payload, put  # noqa: F401
from tests.format.test_format_spec_reader import KEY


# ------------------------------------------------------------------ helpers

def _next_offset(L: Log) -> int:
    """Device offset of the next record L.rec() writes."""
    return L.pos + sum(len(r) for r in L.pending)


def _write(L: Log, tmp_path, name="crafted.img") -> str:
    path = tmp_path / name
    path.write_bytes(bytes(L.img))
    return str(path)


def _replay(L: Log, tmp_path, *, key: bytes | None = None, device_key: bytes | None = None):
    path = _write(L, tmp_path)
    with FileDevice(path, read_only=True) as dev:
        sb = read_superblock_slot(dev)[0]
        return replay(dev, sb, RecordCipher(key, sb) if key else None, device_key)


def _state(L: Log, tmp_path) -> dict[str, bytes]:
    eng = Engine.mount(FileDevice(_write(L, tmp_path, "state.img"), read_only=True), read_only=True,
                       key_provider=lambda sb: KEY)
    try:
        return {k: eng.get(k) for k in eng.list()}
    finally:
        eng.close()


def _corruption(offset: int, reason: str, txn: int) -> list[Finding]:
    return [Finding(offset, "corruption", reason, txn)]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> bytes:
    """An image straight from mkfs: no transaction was ever written."""
    path = str(tmp_path_factory.mktemp("fresh") / "fresh.img")
    create_image(path, 1 << 20)
    with FileDevice(path) as dev:
        Engine.mkfs(dev)
    return open(path, "rb").read()


@pytest.fixture
def L(base_images) -> Log:
    return Log(base_images["off"])


BASE_STATE = {"base": b"b" * 100}
BASE_COMMITTED = 3      # base_images: put base, put gone, delete gone
BASE_RECORDS = 3 + 3 + 3


# ----------------------------------------------- records outside their txn

@pytest.mark.parametrize("rtype,name", [(sr.PAYLOAD, "PAYLOAD"), (sr.DELETE, "DELETE")])
def test_a_payload_or_delete_with_no_open_transaction_is_reported_as_corruption(L, tmp_path, rtype, name):
    T = L.t
    at = _next_offset(L)
    L.rec(rtype, T + 1, b"v", phash=sr.path_hash(b"v"), flags=sr.GROUP_END)
    L.flush()
    L.txn(T + 2, [put("after", b"2")])   # nothing after the damage is trusted
    r = _replay(L, tmp_path)
    assert r.findings == _corruption(at, f"{name} of txn {T + 1} outside its transaction", T + 1)
    assert r.committed == BASE_COMMITTED and set(r.index) == {b"base"} and r.max_txn_id == T
    with pytest.raises(CorruptImage, match=f"corruption at byte offset {at}: {name} of txn"):
        Engine.mount(FileDevice(_write(L, tmp_path, "rw.img")))


def test_a_payload_of_another_txn_than_the_open_one_is_corruption(L, tmp_path):
    T = L.t
    L.rec(sr.PREPARE, T + 1, prepare_payload([put("a", b"1")]))
    at = _next_offset(L)
    L.rec(sr.PAYLOAD, T + 2, b"1", phash=sr.path_hash(b"a"), flags=sr.GROUP_END)
    L.flush()
    r = _replay(L, tmp_path)
    # the open txn is not reported as an orphan: replay stopped at the corruption
    assert r.findings == _corruption(at, f"PAYLOAD of txn {T + 2} outside its transaction", T + 2)
    assert r.max_txn_id == T + 1


def test_an_op_index_one_past_the_prepared_ops_is_corruption(L, tmp_path):
    T = L.t
    L.rec(sr.PREPARE, T + 1, prepare_payload([put("a", b"1")]))
    at = _next_offset(L)
    L.rec(sr.PAYLOAD, T + 1, b"1", phash=sr.path_hash(b"a"), op=1, flags=sr.GROUP_END)
    L.flush()
    assert _replay(L, tmp_path).findings == _corruption(at, "op index 1 beyond the 1 prepared ops", T + 1)


def test_a_record_whose_path_hash_is_not_its_ops_path_is_corruption(L, tmp_path):
    T = L.t
    L.rec(sr.PREPARE, T + 1, prepare_payload([put("a", b"1")]))
    at = _next_offset(L)
    L.rec(sr.PAYLOAD, T + 1, b"1", phash=sr.path_hash(b"b"), flags=sr.GROUP_END)
    L.flush()
    assert _replay(L, tmp_path).findings == _corruption(at, "path hash does not match the prepared path", T + 1)


def test_a_delete_record_with_a_wrong_path_hash_is_reported_once(L, tmp_path):
    # path and hash both name another path: the first broken rule is the
    # finding, and nothing more is said about the record
    T = L.t
    L.rec(sr.PREPARE, T + 1, prepare_payload([delete("p")]))
    at = _next_offset(L)
    L.rec(sr.DELETE, T + 1, b"q", phash=sr.path_hash(b"q"), flags=sr.GROUP_END)
    L.flush()
    assert _replay(L, tmp_path).findings == _corruption(at, "path hash does not match the prepared path", T + 1)


# ------------------------------------------------------------ PAYLOAD rules

def test_a_payload_for_a_delete_op_is_corruption(L, tmp_path):
    T = L.t
    L.rec(sr.PREPARE, T + 1, prepare_payload([delete("d")]))
    at = _next_offset(L)
    L.rec(sr.PAYLOAD, T + 1, b"", phash=sr.path_hash(b"d"), flags=sr.GROUP_END)
    L.flush()
    assert _replay(L, tmp_path).findings == _corruption(at, "PAYLOAD for a DELETE op", T + 1)


def test_chunks_out_of_order_are_corruption(L, tmp_path):
    T, C = L.t, sr.CHUNK
    value = bytes(C + 10)
    L.rec(sr.PREPARE, T + 1, prepare_payload([put("big", value)]))
    at = _next_offset(L)
    L.rec(sr.PAYLOAD, T + 1, value[C:], phash=sr.path_hash(b"big"), chunk=1, flags=sr.GROUP_END)
    L.flush()
    assert _replay(L, tmp_path).findings == _corruption(at, "chunk 1, expected 0", T + 1)


def test_a_chunk_of_the_wrong_size_is_corruption(L, tmp_path):
    T = L.t
    L.rec(sr.PREPARE, T + 1, prepare_payload([("put", b"v", b"ab")]))
    at = _next_offset(L)
    L.rec(sr.PAYLOAD, T + 1, b"abc", phash=sr.path_hash(b"v"), flags=sr.GROUP_END)
    L.flush()
    assert _replay(L, tmp_path).findings == _corruption(at, "chunk payload of 3 bytes, expected 2", T + 1)


@pytest.mark.parametrize("size", [0, sr.CHUNK])
def test_an_empty_chunk_past_the_end_of_a_value_is_corruption_at_that_chunk(L, tmp_path, size):
    T = L.t
    value = bytes(size)
    recs = L.open(T + 1, [put("v", value)])
    at = _next_offset(L)
    recs.append(L.rec(sr.PAYLOAD, T + 1, b"", phash=sr.path_hash(b"v"), chunk=len(recs) - 1))
    L.commit(T + 1, recs)
    assert _replay(L, tmp_path).findings == _corruption(at, "chunk payload of 0 bytes, expected 0", T + 1)


def test_one_byte_values_and_exact_chunk_multiples_replay_whole(L, tmp_path):
    T, C = L.t, sr.CHUNK
    values = {"one": b"1", "chunk": bytes(range(256)) * (C // 256), "two": b"\x07" * (2 * C),
              "empty": b""}
    L.txn(T + 1, [put(k, v) for k, v in values.items()])
    r = _replay(L, tmp_path)
    assert r.findings == [] and r.committed == BASE_COMMITTED + 1
    assert {k.decode(): e.size for k, e in r.index.items()} == {"base": 100} | {k: len(v) for k, v in values.items()}
    assert [len(c) for c in (r.index[b"one"].chunks, r.index[b"chunk"].chunks, r.index[b"two"].chunks,
                             r.index[b"empty"].chunks)] == [1, 1, 2, 0]
    assert _state(L, tmp_path) == BASE_STATE | values


# ------------------------------------------------------------- DELETE rules

def test_a_delete_record_for_a_put_op_is_corruption(L, tmp_path):
    T = L.t
    L.rec(sr.PREPARE, T + 1, prepare_payload([put("p", b"")]))
    at = _next_offset(L)
    L.rec(sr.DELETE, T + 1, b"p", phash=sr.path_hash(b"p"), flags=sr.GROUP_END)
    L.flush()
    assert _replay(L, tmp_path).findings == _corruption(at, "DELETE record does not match its prepared op", T + 1)


def test_a_delete_record_naming_another_path_is_corruption(L, tmp_path):
    T = L.t
    L.rec(sr.PREPARE, T + 1, prepare_payload([delete("p")]))
    at = _next_offset(L)
    L.rec(sr.DELETE, T + 1, b"q", phash=sr.path_hash(b"p"), flags=sr.GROUP_END)
    L.flush()
    assert _replay(L, tmp_path).findings == _corruption(at, "DELETE record does not match its prepared op", T + 1)


def test_a_second_delete_record_for_one_op_is_corruption(L, tmp_path):
    T = L.t
    L.rec(sr.PREPARE, T + 1, prepare_payload([delete("p")]))
    L.rec(sr.DELETE, T + 1, b"p", phash=sr.path_hash(b"p"))
    at = _next_offset(L)
    L.rec(sr.DELETE, T + 1, b"p", phash=sr.path_hash(b"p"), flags=sr.GROUP_END)
    L.flush()
    assert _replay(L, tmp_path).findings == _corruption(at, "DELETE record does not match its prepared op", T + 1)


def test_a_delete_removes_the_path_and_a_delete_of_a_missing_path_is_harmless(L, tmp_path):
    T = L.t
    L.txn(T + 1, [delete("base"), delete("never")])
    r = _replay(L, tmp_path)
    assert r.findings == [] and r.index == {} and r.committed == BASE_COMMITTED + 1


# ------------------------------------------------------------- COMMIT rules

def test_a_commit_with_no_open_transaction_is_corruption(L, tmp_path):
    T = L.t
    at = _next_offset(L)
    L.commit(T + 1, [])
    assert _replay(L, tmp_path).findings == _corruption(at, f"COMMIT of txn {T + 1} without its PREPARE", T + 1)


def test_a_commit_of_another_txn_than_the_open_one_is_corruption(L, tmp_path):
    T = L.t
    recs = L.open(T + 1, [put("a", b"1")])
    at = _next_offset(L)
    L.commit(T + 2, recs)
    assert _replay(L, tmp_path).findings == _corruption(at, f"COMMIT of txn {T + 2} without its PREPARE", T + 2)


def test_a_commit_missing_a_chunk_is_corruption(L, tmp_path):
    T, C = L.t, sr.CHUNK
    value = bytes(C + 1)
    recs = L.open(T + 1, [put("v", b"ok"), put("big", value)])
    recs.pop()                      # the last chunk never written
    L.pending.pop()
    L.seq -= 1
    at = _next_offset(L)
    L.commit(T + 1, recs)
    assert _replay(L, tmp_path).findings == _corruption(at, f"txn {T + 1} committed with 1 of 2 chunks of op 1",
                                                         T + 1)


def test_a_commit_missing_a_delete_record_is_corruption(L, tmp_path):
    T = L.t
    recs = L.open(T + 1, [put("v", b"ok"), delete("base")])
    recs.pop()
    L.pending.pop()
    L.seq -= 1
    at = _next_offset(L)
    L.commit(T + 1, recs)
    assert _replay(L, tmp_path).findings == _corruption(at, f"txn {T + 1} committed without the DELETE of op 1",
                                                         T + 1)


def test_a_commit_whose_digest_does_not_match_its_records_is_corruption(L, tmp_path):
    T = L.t
    recs = L.open(T + 1, [put("v", b"ok")])
    at = _next_offset(L)
    L.commit(T + 1, [recs[0], recs[1][:-1] + b"X"])   # digest over other bytes, same count
    assert _replay(L, tmp_path).findings == _corruption(
        at, "transaction digest mismatch: records were altered", T + 1)


# ------------------------------------------------------------ PREPARE rules

def test_a_sealed_prepare_is_corruption(L, tmp_path):
    T = L.t
    at = _next_offset(L)
    L.rec(sr.PREPARE, T + 1, prepare_payload([put("a", b"")]), flags=sr.SEALED | sr.GROUP_END)
    L.flush()
    assert _replay(L, tmp_path).findings == _corruption(at, "PREPARE must not be sealed", T + 1)


@pytest.mark.parametrize("payload,reason", [
    (b"", "PREPARE payload too short"),
    (b"\x01", "PREPARE payload too short"),
    (b"\x00\x00", "PREPARE: a transaction needs at least one operation"),
    (b"\x01\x00\x01\x00\x01", "PREPARE op truncated"),
])
def test_a_prepare_payload_too_short_or_empty_is_a_finding_not_a_crash(L, tmp_path, payload, reason):
    T = L.t
    at = _next_offset(L)
    L.rec(sr.PREPARE, T + 1, payload, flags=sr.GROUP_END)
    L.flush()
    r = _replay(L, tmp_path)
    assert r.findings == _corruption(at, reason, T + 1)
    assert r.max_txn_id == T        # a refused PREPARE does not take its id


def test_a_prepare_with_txn_id_zero_on_a_fresh_image_is_corruption(fresh, tmp_path):
    L = Log(fresh)
    assert L.t == 0
    at = _next_offset(L)
    L.txn(0, [put("zero", b"0")])
    r = _replay(L, tmp_path)
    assert r.findings == _corruption(at, "txn id 0 not above earlier txn id 0", 0)
    assert r.max_txn_id == 0 and r.index == {}


def test_the_base_image_holds_what_the_counts_above_assume(L, tmp_path):
    r = _replay(L, tmp_path)
    assert (r.committed, r.records, r.max_txn_id, r.findings) == (BASE_COMMITTED, BASE_RECORDS, L.t, [])
    assert _state(L, tmp_path) == BASE_STATE


def test_an_empty_image_replays_to_nothing(fresh, tmp_path):
    r = _replay(Log(fresh), tmp_path)
    assert (r.index, r.findings, r.max_txn_id, r.committed, r.records) == ({}, [], 0, 0, 0)
    assert r.summary()["findings"] == {}


def test_txn_id_one_is_the_first_a_fresh_image_accepts(fresh, tmp_path):
    L = Log(fresh)
    L.txn(1, [put("first", b"1")])
    r = _replay(L, tmp_path)
    assert r.findings == [] and r.max_txn_id == 1 and set(r.index) == {b"first"}


def test_a_prepare_superseding_an_open_one_makes_it_an_orphan(L, tmp_path):
    T = L.t
    first = _next_offset(L)
    L.open(T + 1, [put("o", b"x")])
    L.txn(T + 2, [put("kept", b"y")])
    r = _replay(L, tmp_path)
    assert r.findings == [Finding(first, "orphan", f"superseded by txn {T + 2} before its COMMIT", T + 1)]
    assert set(r.index) == {b"base", b"kept"}


def test_a_prepare_left_open_at_the_end_of_the_log_is_an_orphan(L, tmp_path):
    T = L.t
    first = _next_offset(L)
    L.open(T + 1, [put("o", b"x")])
    L.reflag(sr.GROUP_END)
    L.flush()
    r = _replay(L, tmp_path)
    assert r.findings == [Finding(first, "orphan", "prepared but never committed", T + 1)]
    assert r.max_txn_id == T + 1 and r.committed == BASE_COMMITTED


# -------------------------------------------------------------- stop rules

def test_nothing_after_a_corruption_is_applied_or_reported(L, tmp_path):
    T = L.t
    L.txn(T + 1, [put("before", b"1")])
    L.rec(sr.PREPARE, T + 2, prepare_payload([put("a", b"1")]))     # open when the damage comes
    at = _next_offset(L)
    L.rec(sr.DELETE, T + 2, b"a", phash=sr.path_hash(b"a"), flags=sr.GROUP_END)
    L.flush()
    L.txn(T + 3, [put("after", b"3")])
    L.open(T + 4, [put("orphan", b"4")])                               # never committed
    L.reflag(sr.GROUP_END)
    L.flush()
    r = _replay(L, tmp_path)
    assert r.findings == _corruption(at, "DELETE record does not match its prepared op", T + 2)
    assert set(r.index) == {b"base", b"before"} and r.committed == BASE_COMMITTED + 1
    assert r.max_txn_id == T + 2
    assert r.records == BASE_RECORDS + 3 + 2   # the txn before it and the two records up to the damage
    assert r.summary()["findings"] == {"corruption": 1}


def test_a_torn_tail_after_a_corruption_is_not_reported_separately(L, tmp_path):
    T = L.t
    at = _next_offset(L)
    L.commit(T + 1, [])   # corruption: COMMIT without PREPARE
    torn = L.pos
    L.open(T + 2, [put("t", b"torn")])
    L.flush()             # a group without GROUP_END: torn
    r = _replay(L, tmp_path)
    assert r.end.torn_bytes > 0 and r.end.offset == torn
    assert r.findings == _corruption(at, f"COMMIT of txn {T + 1} without its PREPARE", T + 1)


def test_a_torn_tail_is_reported_with_its_size_and_no_txn(L, tmp_path):
    T = L.t
    start = L.pos
    L.open(T + 1, [put("t", b"torn")])
    L.flush()
    r = _replay(L, tmp_path)
    assert r.end.offset == start and r.end.torn_bytes > 0
    assert [f.as_dict() for f in r.findings] == [{
        "offset": start, "kind": "torn-tail", "txn_id": 0,
        "reason": f"incomplete last group of {r.end.torn_bytes} bytes discarded ({r.end.stop_reason}): "
                  f"a write cut by power loss, or damage past the durable floor that cannot be told from one"}]


def test_damage_followed_by_a_durable_group_is_reported_with_the_evidence_offset(L, tmp_path):
    T = L.t
    L.txn(T + 1, [put("g/1", b"1")])
    damaged = L.pos
    L.txn(T + 2, [put("g/2", b"2")])
    evidence = L.pos
    L.txn(T + 3, [put("g/3", b"3")])
    L.img[damaged + 70] ^= 1
    r = _replay(L, tmp_path)
    assert r.end.corruption_offset == damaged and r.end.evidence_offset == evidence
    assert [f.as_dict() for f in r.findings] == [{
        "offset": damaged, "kind": "corruption", "txn_id": 0,
        "reason": f"checksum mismatch; a durable record follows at offset {evidence}"}]
    assert r.corruption == r.findings and set(r.index) == {b"base", b"g/1"}


def test_only_corruption_findings_count_as_corruption(L, tmp_path):
    T = L.t
    L.open(T + 1, [put("o", b"x")])
    L.txn(T + 2, [put("kept", b"y")])
    L.rec(sr.ABORT, T + 3, flags=sr.GROUP_END)
    L.flush()
    r = _replay(L, tmp_path)
    assert [f.kind for f in r.findings] == ["orphan"] and r.corruption == []


# --------------------------------------------------------------- ABORT rules

def test_an_abort_burns_its_id_so_a_later_prepare_with_it_is_corruption(L, tmp_path):
    T = L.t
    L.rec(sr.ABORT, T + 5, flags=sr.GROUP_END)
    L.flush()
    at = _next_offset(L)
    L.txn(T + 5, [put("late", b"5")])
    r = _replay(L, tmp_path)
    assert r.findings == _corruption(at, f"txn id {T + 5} not above earlier txn id {T + 5}", T + 5)


def test_an_abort_of_a_lower_id_does_not_lower_the_txn_counter(L, tmp_path):
    T = L.t
    L.txn(T + 9, [put("a", b"1")])
    L.rec(sr.ABORT, T + 3, flags=sr.GROUP_END)
    L.flush()
    r = _replay(L, tmp_path)
    assert r.findings == [] and r.max_txn_id == T + 9


def test_abort_closes_only_its_own_open_transaction(L, tmp_path):
    T = L.t
    first = _next_offset(L)
    L.open(T + 1, [put("x", b"1")])
    L.rec(sr.ABORT, T + 1, flags=sr.GROUP_END)
    L.flush()
    L.txn(T + 2, [put("y", b"2")])
    r = _replay(L, tmp_path)
    assert r.findings == [Finding(first, "aborted", "transaction aborted", T + 1)]
    assert set(r.index) == {b"base", b"y"} and r.max_txn_id == T + 2


# ------------------------------------------------------------- CHECKPOINTs

class Device:
    """An Ed25519 device key that signs checkpoints the way keystored does."""

    def __init__(self):
        self.private = Ed25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def checkpoint(self, L: Log, *, head: bytes | None = None, public: bytes | None = None,
                   tamper: bool = False) -> int:
        """Writes a CHECKPOINT group; returns its offset."""
        head = L.chain if head is None else head
        msg = fmt.checkpoint_message(L.sb["device_uuid"], L.sb["log_epoch"], L.seq, head)
        sig = bytearray(self.private.sign(sign_payload(fmt.CHECKPOINT_SIGN_LABEL, msg)))
        sig[0] ^= 1 if tamper else 0
        at = _next_offset(L)
        L.rec(fmt.CHECKPOINT, 0, fmt.encode_checkpoint(fmt.CheckpointBody(head, public or self.public, bytes(sig))),
              flags=sr.GROUP_END)
        L.flush()
        return at


def test_a_signed_checkpoint_is_counted_and_verified_under_the_device_key(L, tmp_path):
    dev = Device()
    T = L.t
    L.txn(T + 1, [put("a", b"1")])
    dev.checkpoint(L)
    L.txn(T + 2, [put("b", b"2")])
    dev.checkpoint(L)
    r = _replay(L, tmp_path, device_key=dev.public)
    assert r.findings == [] and (r.checkpoints, r.verified_checkpoints) == (2, 2)
    assert r.summary()["checkpoints"] == 2 and r.summary()["verified_checkpoints"] == 2
    r = _replay(L, tmp_path)
    assert r.findings == [] and (r.checkpoints, r.verified_checkpoints) == (2, 0)


def test_a_checkpoint_payload_too_short_is_reported_and_replay_stops(L, tmp_path):
    T = L.t
    at = _next_offset(L)
    L.rec(fmt.CHECKPOINT, 0, bytes(127), flags=sr.GROUP_END)
    L.flush()
    L.txn(T + 1, [put("after", b"1")])
    r = _replay(L, tmp_path)
    assert r.findings == _corruption(at, "CHECKPOINT payload is 127 bytes, expected 128", 0)
    assert set(r.index) == {b"base"} and r.checkpoints == 0


def test_a_checkpoint_of_another_chain_head_is_corruption(L, tmp_path):
    dev = Device()
    at = dev.checkpoint(L, head=bytes(32))
    r = _replay(L, tmp_path)
    assert r.findings == _corruption(at, "checkpoint does not match the hash chain: history was rewritten", 0)
    assert r.checkpoints == 0


def test_a_checkpoint_signed_by_another_key_is_corruption_only_when_the_device_key_is_known(L, tmp_path):
    dev, other = Device(), Device()
    at = other.checkpoint(L)
    assert _replay(L, tmp_path, device_key=dev.public).findings == _corruption(
        at, "checkpoint signed by a key that is not this device's", 0)
    assert _replay(L, tmp_path).findings == []


def test_a_checkpoint_with_a_bad_signature_is_forged_history(L, tmp_path):
    dev = Device()
    at = dev.checkpoint(L, tamper=True)
    r = _replay(L, tmp_path, device_key=dev.public)
    assert r.findings == _corruption(at, "checkpoint signature does not verify: forged history", 0)
    assert (r.checkpoints, r.verified_checkpoints) == (1, 0)


def test_a_checkpoint_after_a_prepare_in_the_same_group_drops_the_prepare_as_an_orphan(L, tmp_path):
    dev = Device()
    T = L.t
    first = _next_offset(L)
    L.rec(sr.PREPARE, T + 1, prepare_payload([put("x", b"")]))
    dev.checkpoint(L)
    r = _replay(L, tmp_path, device_key=dev.public)
    assert r.findings == [Finding(first, "orphan", "checkpoint before its COMMIT", T + 1)]
    assert (r.checkpoints, r.verified_checkpoints) == (1, 1)


# ----------------------------------------------------------------- counters

def test_replay_counts_records_transactions_and_findings_exactly(fresh, tmp_path):
    L = Log(fresh)
    C = sr.CHUNK
    L.txn(1, [put("a", bytes(C + 1)), put("b", b"")])        # 1 PREPARE + 2 PAYLOAD + COMMIT
    L.txn(2, [delete("b")])                                    # PREPARE + DELETE + COMMIT
    L.open(3, [put("o", b"x")])                                # PREPARE + PAYLOAD: orphaned by 4
    L.txn(4, [put("c", b"c")])                                 # 3 records
    L.rec(sr.ABORT, 5, flags=sr.GROUP_END)                     # 1 record
    L.flush()
    L.open(6, [put("torn", b"t")])
    L.flush()                                                  # torn: not counted
    r = _replay(L, tmp_path)
    assert r.summary() == {
        "committed_txns": 3, "records": 4 + 3 + 2 + 3 + 1, "keys": 2, "max_txn_id": 5,
        "log_end": r.end.offset, "torn_tail_bytes": r.end.torn_bytes, "stop_reason": r.end.stop_reason,
        "unverified_chunks": 0, "checkpoints": 0, "verified_checkpoints": 0,
        "findings": {"orphan": 1, "torn-tail": 1}}
    assert r.end.torn_bytes > 0
    assert [f.txn_id for f in r.findings] == [3, 0]


# --------------------------------------------------------------- encryption

def test_sealed_chunks_are_counted_unverified_without_the_key_and_verified_with_it(base_images, tmp_path):
    L = Log(base_images["on"])
    T = L.t
    L.txn(T + 1, [put("s", bytes(sr.CHUNK + 5)), put("t", b"x")])
    before = _replay(Log(base_images["on"]), tmp_path).unverified_chunks
    without, with_key = _replay(L, tmp_path), _replay(L, tmp_path, key=KEY)
    assert before >= 1 and without.unverified_chunks == before + 3 and with_key.unverified_chunks == 0
    assert without.findings == with_key.findings == []
    assert with_key.index[b"s"].sealed and with_key.index[b"s"].size == sr.CHUNK + 5


def test_a_txn_with_two_tampered_chunks_is_reported_once_at_the_first(base_images, tmp_path):
    L = Log(base_images["on"])
    T = L.t
    first = _next_offset(L) + len(L.rec(sr.PREPARE, T + 1, prepare_payload([put("s", bytes(2 * sr.CHUNK))])))
    L.pending.pop()
    L.seq -= 1
    L.commit(T + 1, L.open(T + 1, [put("s", bytes(2 * sr.CHUNK))], tamper=True))
    L.txn(T + 2, [put("fine", b"f")])
    r = _replay(L, tmp_path, key=KEY)
    assert r.findings == [Finding(first, "integrity", "sealed payload failed authentication; transaction discarded",
                                  T + 1)]
    assert b"s" not in r.index and b"fine" in r.index and r.committed >= 1


# ------------------------------------------------ stops past the durable floor

@pytest.mark.parametrize("how,reported", [("checksum", True), ("magic", True), ("seq", True), ("group", True),
                                          ("epoch", False), ("mount_gen", False)])
def test_a_stop_past_the_floor_is_a_torn_tail_finding_unless_it_is_a_clean_end(L, tmp_path, how, reported):
    # stale records (another epoch, a lower mount) and zeroed space end a log
    # normally; anything else there is a tear, or damage that cannot be told from one
    from tests.engine.test_logscan_end import _damaged_group
    start, reason = _damaged_group(L, how)
    r = _replay(L, tmp_path)
    assert r.end.stop_reason == reason and r.end.torn_bytes == 0 and not r.end.corrupt
    assert [(f.kind, f.offset) for f in r.findings] == ([("torn-tail", start)] if reported else [])


def test_the_end_of_the_region_is_a_clean_end(L, tmp_path):
    from tests.engine.test_logscan_end import _fill_to, _region_end
    end = _region_end(L)
    _fill_to(L, 0)
    assert L.pos == end
    r = _replay(L, tmp_path)
    assert r.end.stop_reason == "end of region" and r.findings == []
