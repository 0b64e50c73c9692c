"""Hand-made log groups, encoded from docs/statefs.md sections 5-7 and 11, appended
after the log end of a real statefsd image. They reach the replay rules a normal
workload never exercises (ABORT, orphans, stale mount generations, broken chains,
tampered ciphertext, ...). The spec reader and statefsd must reach the same verdict.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

from statefsd.storage.blockdev import FileDevice, create_image
from statefsd.storage.engine import Engine

from tests.format import spec_reader as sr
from tests.format.test_format_spec_reader import (
    KEY, SIGNER, _assert_agrees, _key_provider, _rw_mount_refuses_as_corrupt, _statefsd_view)

BODY = struct.Struct("<2sBBIIQQQ8sIIH6x")  # the header without its CRC field (5.1)


class Log:
    """Writes groups after the log end of `data` exactly as section 6.1 says a writer does."""

    def __init__(self, data: bytes):
        found = sr.read_image(data, key=KEY)
        self.img, self.sb = bytearray(data), found["superblock"]
        self.pos, self.seq, self.group = found["log_end"], found["next_seq"], found["next_group"]
        self.mount_gen = max(self.sb["generation"], found["last_mount_gen"]) + 1
        self.chain, self.t = found["chain_head"], found["max_txn_id"]
        self.pending: list[bytes] = []

    def encode(self, typ, txn, payload=b"", *, flags=0, phash=bytes(8), chunk=0, op=0, **over) -> bytes:
        """One record (5.1), numbered as the next record of the group in progress."""
        f = dict(epoch=self.sb["log_epoch"], group=self.group, seq=self.seq,
                 mount_gen=self.mount_gen, reserved=bytes(6)) | over
        body = bytearray(BODY.pack(b"R2", typ, flags, f["epoch"], f["group"], f["seq"],
                                   f["mount_gen"], txn, phash, len(payload), chunk, op))
        body[54:60] = f["reserved"]
        return struct.pack("<I", sr.crc32c(bytes(body) + payload)) + bytes(body) + payload

    def rec(self, typ, txn, payload=b"", **kw) -> bytes:
        raw = self.encode(typ, txn, payload, **kw)
        self.pending.append(raw)
        self.seq += 1
        return raw

    def reflag(self, flags: int) -> bytes:
        """Sets flag bits on the last record written, with a fresh CRC."""
        raw = bytearray(self.pending[-1])
        raw[7] |= flags
        struct.pack_into("<I", raw, 0, sr.crc32c(bytes(raw[4:])))
        self.pending[-1] = bytes(raw)
        return self.pending[-1]

    def open(self, txn, ops, *, tamper=False, sealed=None) -> list[bytes]:
        """PREPARE plus PAYLOAD/DELETE records; ops are ("put", path, value) or ("delete", path)."""
        enc = self.sb["encryption"] != 0 if sealed is None else sealed
        recs = [self.rec(sr.PREPARE, txn, prepare_payload(ops))]
        for i, o in enumerate(ops):
            ph = sr.path_hash(o[1])
            if o[0] == "delete":
                recs.append(self.rec(sr.DELETE, txn, o[1], phash=ph, op=i))
                continue
            for c in range(0, len(o[2]), sr.CHUNK):
                chunk = o[2][c:c + sr.CHUNK]
                if enc:
                    nonce, aad = sr.seal_nonce_aad(self.sb["salt"], self.sb["device_uuid"], txn, i,
                                                   c // sr.CHUNK, ph, len(chunk) + 16)
                    chunk = bytearray(crypto_aead_xchacha20poly1305_ietf_encrypt(chunk, aad, nonce, KEY))
                    chunk[0] ^= 0x01 if tamper else 0  # CRC, digest and chain stay right
                    chunk = bytes(chunk)
                recs.append(self.rec(sr.PAYLOAD, txn, chunk, phash=ph, chunk=c // sr.CHUNK, op=i,
                                     flags=sr.SEALED if enc else 0))
        return recs

    def commit(self, txn, recs, *, end=True, prev=None, count=None, extra=b"", flags=0) -> None:
        payload = struct.pack("<32s32sI", prev or self.chain,
                              hashlib.sha256(b"".join(recs)).digest(),
                              len(recs) if count is None else count) + extra
        raw = self.rec(sr.COMMIT, txn, payload, flags=flags | (sr.GROUP_END if end else 0))
        self.chain = hashlib.sha256(raw).digest()
        if end:
            self.flush()

    def checkpoint(self, *, end=True, txn=0, flags=0, chain=None, signature=None, extra=b"") -> bytes:
        """A CHECKPOINT (5.3) signed with SIGNER over the chain head, normally a group of its own."""
        head = self.chain if chain is None else chain
        message = sr.checkpoint_message(self.sb["device_uuid"], self.sb["log_epoch"], self.seq, head)
        sig = SIGNER.sign(sr.CHECKPOINT_SIGN_LABEL.decode(), message) if signature is None else signature
        raw = self.rec(sr.CHECKPOINT, txn, head + SIGNER.public_key + sig + extra,
                       flags=flags | (sr.GROUP_END if end else 0))
        if end:
            self.flush()
        return raw

    def txn(self, txn, ops, *, sealed=None, **kw) -> None:
        self.commit(txn, self.open(txn, ops, sealed=sealed), **kw)

    def flush(self) -> None:
        """Ends the group: place it at the log end, pad to 512 (6.1 rules 1-2)
        and, with redundancy on, append its parity trailer (6.5)."""
        blob = b"".join(self.pending)
        blob += bytes(-len(blob) % 512)
        if self.sb.get("redundancy") == 1:
            blob += self.parity_trailer(blob, seq=self.seq - len(self.pending))
        self.img[self.pos:self.pos + len(blob)] = blob
        self.pos += len(blob)
        self.group += 1
        self.pending = []

    def parity_trailer(self, data: bytes, *, seq: int) -> bytes:
        """PARITY record (5.3) whose payload is the XOR of the group's data sectors, padded to 1024 (6.5)."""
        n = len(data) // 512
        rec = self.encode(sr.PARITY, 0, sr._xor(*(data[i * 512:(i + 1) * 512] for i in range(n))),
                          chunk=n, seq=seq)
        return rec + bytes(sr.TRAILER - len(rec))


def prepare_payload(ops) -> bytes:
    """The op list of a PREPARE (5.3)."""
    return struct.pack("<H", len(ops)) + b"".join(
        struct.pack("<BBHI", 1 if o[0] == "put" else 2, 0, len(o[1]),
                    len(o[2]) if o[0] == "put" else 0) + o[1] for o in ops)


def put(path, value):
    return ("put", path.encode(), value)


def delete(path):
    return ("delete", path.encode())


# Each scenario writes groups with ids above T = the base image's max txn id.
def abort_burns_ids_and_closes_only_its_own_txn(L, T):
    L.rec(sr.ABORT, T + 5)
    L.txn(T + 6, [put("ab/1", b"one")])
    L.open(T + 7, [put("ab/2", b"two")])
    L.rec(sr.ABORT, T + 3, b"ignored payload")  # a lower id: no effect, T+7 stays open
    L.rec(sr.ABORT, T + 7)
    L.txn(T + 8, [put("ab/3", b"three")])


def abort_as_a_group_of_its_own_burns_the_id(L, T):
    L.rec(sr.ABORT, T + 40, flags=sr.GROUP_END)
    L.flush()


def prepare_without_commit_is_an_orphan(L, T):
    L.open(T + 1, [put("orphan", b"x")])
    L.txn(T + 2, [put("kept", b"y")])


def group_ending_inside_a_transaction_leaves_an_orphan(L, T):
    L.open(T + 1, [put("orphan", b"x")])
    L.reflag(sr.GROUP_END)  # on the PAYLOAD: the group ends, the txn never commits
    L.flush()
    L.txn(T + 2, [put("kept", b"y")])


def transaction_spanning_two_groups(L, T):
    recs = L.open(T + 1, [put("span", b"z")])
    recs[-1] = L.reflag(sr.GROUP_END)
    L.flush()
    L.commit(T + 1, recs)


def ops_on_one_path_apply_in_list_order(L, T):
    L.txn(T + 1, [put("p", b"1"), delete("p"), put("p", b"2"), put("q", b"3"), delete("q"),
                  delete("never-existed")])


def chunks_of_different_ops_may_interleave(L, T):
    a, b = bytes(range(256)) * 300, bytes(reversed(range(256))) * 300  # 2 chunks each
    ha, hb, C = sr.path_hash(b"a"), sr.path_hash(b"b"), sr.CHUNK
    recs = [L.rec(sr.PREPARE, T + 1, prepare_payload([put("a", a), put("b", b)])),
            L.rec(sr.PAYLOAD, T + 1, a[:C], phash=ha, chunk=0, op=0),
            L.rec(sr.PAYLOAD, T + 1, b[:C], phash=hb, chunk=0, op=1),
            L.rec(sr.PAYLOAD, T + 1, a[C:], phash=ha, chunk=1, op=0),
            L.rec(sr.PAYLOAD, T + 1, b[C:], phash=hb, chunk=1, op=1)]
    L.commit(T + 1, recs)


def non_consecutive_ids_and_mixed_mount_gens_in_one_group(L, T):
    L.txn(T + 1, [put("n/1", b"a")], end=False)
    L.mount_gen += 1
    L.txn(T + 9, [put("n/2", b"b")])


def reserved_and_unused_header_fields_are_ignored(L, T):
    recs = [L.rec(sr.PREPARE, T + 1, prepare_payload([put("r", b"v")]),
                  phash=b"\xff" * 8, chunk=7, op=3, reserved=b"\xee" * 6)]
    recs.append(L.rec(sr.PAYLOAD, T + 1, b"v", phash=sr.path_hash(b"r"), reserved=b"\x01" * 6))
    L.commit(T + 1, recs)


def lower_mount_gen_after_a_complete_group_is_a_stale_tail(L, T):
    L.txn(T + 1, [put("fresh", b"1")])
    L.mount_gen -= 1
    L.txn(T + 2, [put("stale", b"2")])


def other_epoch_is_stale(L, T):
    L.txn(T + 1, [put("fresh", b"1")])
    recs = [L.rec(sr.PREPARE, T + 2, prepare_payload([put("s", b"")]),
                  epoch=L.sb["log_epoch"] ^ 1)]
    L.commit(T + 2, recs, flags=0)


def repeated_txn_id_is_corruption(L, T):
    L.txn(T + 1, [put("first", b"1")])
    L.txn(T + 1, [put("again", b"2")])
    L.txn(T + 2, [put("later", b"3")])


def broken_chain_is_corruption(L, T):
    L.txn(T + 1, [put("c/1", b"1")], prev=bytes(32))
    L.txn(T + 2, [put("c/2", b"2")])


def wrong_record_count_is_corruption(L, T):
    L.txn(T + 1, [put("c/1", b"1")], count=3)


def commit_payload_of_69_bytes_is_corruption(L, T):
    L.txn(T + 1, [put("c/1", b"1")], extra=b"\0")


def invalid_utf8_path_is_corruption(L, T):
    L.txn(T + 1, [("put", b"\xff\xfe", b"1")])


def nul_in_path_is_corruption(L, T):
    L.txn(T + 1, [("put", b"a\0b", b"1")])


def sealed_flag_on_a_plaintext_image_is_corruption(L, T):
    recs = L.open(T + 1, [put("s", b"1")])
    recs[-1] = L.reflag(sr.SEALED)
    L.commit(T + 1, recs)


def sealed_flag_on_a_delete_record(L, T):
    recs = L.open(T + 1, [delete("x")])
    recs[-1] = L.reflag(sr.SEALED)
    L.commit(T + 1, recs)
    L.txn(T + 2, [put("after", b"1")])


def sealed_flag_on_a_commit_record(L, T):
    L.txn(T + 1, [put("sc", b"1")], flags=sr.SEALED)
    L.txn(T + 2, [put("after", b"1")])


def damage_two_groups_before_a_valid_one_is_corruption(L, T):
    L.txn(T + 1, [put("g/1", b"1")])
    start = L.pos
    L.txn(T + 2, [put("g/2", b"2")])
    L.txn(T + 3, [put("g/3", b"3")])
    L.img[start + 70] ^= 1


def zeroed_group_before_valid_groups_is_corruption(L, T):
    L.txn(T + 1, [put("g/1", b"1")])
    start = L.pos
    L.txn(T + 2, [put("g/2", b"2")])
    L.img[start:L.pos] = bytes(L.pos - start)  # a flushed group lost whole: a clean-looking end
    L.txn(T + 3, [put("g/3", b"3")])


PLAIN = [zeroed_group_before_valid_groups_is_corruption, abort_burns_ids_and_closes_only_its_own_txn, abort_as_a_group_of_its_own_burns_the_id,
         prepare_without_commit_is_an_orphan, group_ending_inside_a_transaction_leaves_an_orphan,
         transaction_spanning_two_groups, ops_on_one_path_apply_in_list_order,
         chunks_of_different_ops_may_interleave, non_consecutive_ids_and_mixed_mount_gens_in_one_group,
         reserved_and_unused_header_fields_are_ignored,
         lower_mount_gen_after_a_complete_group_is_a_stale_tail, other_epoch_is_stale,
         repeated_txn_id_is_corruption, broken_chain_is_corruption, wrong_record_count_is_corruption,
         commit_payload_of_69_bytes_is_corruption, invalid_utf8_path_is_corruption,
         nul_in_path_is_corruption, sealed_flag_on_a_plaintext_image_is_corruption,
         sealed_flag_on_a_delete_record, sealed_flag_on_a_commit_record,
         damage_two_groups_before_a_valid_one_is_corruption]


def signed_checkpoint_as_its_own_group_verifies(L, T):
    L.txn(T + 1, [put("cp/1", b"1")])
    L.checkpoint()
    L.txn(T + 2, [put("cp/2", b"2")])


def checkpoint_header_fields_and_sealed_flag_are_ignored(L, T):
    L.txn(T + 1, [put("cp/1", b"1")])
    L.checkpoint(txn=T + 77, flags=sr.SEALED)  # txn_id is not burned: T+2 is still fine
    L.txn(T + 2, [put("cp/2", b"2")])


def checkpoint_need_not_be_alone_in_its_group(L, T):
    L.txn(T + 1, [put("cp/1", b"1")], end=False)
    L.checkpoint(end=False)
    L.txn(T + 2, [put("cp/2", b"2")])


def checkpoint_inside_a_transaction_orphans_it(L, T):
    recs = L.open(T + 1, [put("orphan", b"x")])
    L.checkpoint(end=False)
    L.commit(T + 1, recs)  # its transaction was dropped: this COMMIT is corruption


def checkpoint_over_another_chain_head_is_corruption(L, T):
    L.txn(T + 1, [put("cp/1", b"1")])
    L.checkpoint(chain=bytes(32))
    L.txn(T + 2, [put("cp/2", b"2")])


def checkpoint_payload_of_129_bytes_is_corruption(L, T):
    L.txn(T + 1, [put("cp/1", b"1")])
    L.checkpoint(extra=b"\0")
    L.txn(T + 2, [put("cp/2", b"2")])


def forged_checkpoint_stops_replay_only_with_the_device_key(L, T):
    L.txn(T + 1, [put("cp/1", b"1")])
    L.checkpoint(signature=bytes(64))
    L.txn(T + 2, [put("cp/2", b"2")])


CHECKPOINTS = [signed_checkpoint_as_its_own_group_verifies, checkpoint_header_fields_and_sealed_flag_are_ignored,
               checkpoint_need_not_be_alone_in_its_group, checkpoint_inside_a_transaction_orphans_it,
               checkpoint_over_another_chain_head_is_corruption, checkpoint_payload_of_129_bytes_is_corruption,
               forged_checkpoint_stops_replay_only_with_the_device_key]


def tampered_ciphertext_drops_only_its_txn_and_the_chain_goes_on(L, T):
    L.commit(T + 1, L.open(T + 1, [put("t/1", b"secret")], tamper=True))
    L.txn(T + 2, [put("t/2", b"fine")])


def unsealed_payload_on_an_encrypted_image_is_corruption(L, T):
    L.txn(T + 1, [put("u", b"plain")], sealed=False)


SEALED = [tampered_ciphertext_drops_only_its_txn_and_the_chain_goes_on,
          unsealed_payload_on_an_encrypted_image_is_corruption]


@pytest.fixture(scope="module")
def base_images(tmp_path_factory):
    """"off": plaintext, redundancy off; "parity": plaintext, parity trailers; "on": encrypted, parity."""
    out = {}
    for name, enc, redundancy in (("off", "off", "off"), ("parity", "off", "parity"), ("on", "on", "parity")):
        path = str(tmp_path_factory.mktemp("base") / f"{name}.img")
        create_image(path, 1 << 20)
        with FileDevice(path) as dev:
            Engine.mkfs(dev, encryption=enc, key_provider=_key_provider, redundancy=redundancy)
        eng = Engine.mount(FileDevice(path), key_provider=_key_provider)
        eng.put("base", b"b" * 100)
        eng.put("gone", b"g")
        eng.delete("gone")
        eng.close()
        out[name] = open(path, "rb").read()
    return out


def test_key_check_not_yet_recorded_lets_a_wrong_key_through_as_integrity_findings(tmp_path):
    path = str(tmp_path / "unrecorded.img")
    create_image(path, 1 << 20)
    with FileDevice(path) as dev:
        Engine.mkfs(dev, encryption="on")  # no key at hand: key_check stays zero (11.1)
    L = Log(open(path, "rb").read())
    assert L.sb["key_check"] == bytes(16)
    L.txn(L.t + 1, [put("k/1", b"one"), put("k/empty", b"")])
    L.txn(L.t + 2, [put("k/2", b"two")])
    img = bytes(L.img)
    ours = sr.read_image(img, key=bytes(32))
    assert ours["state"] == {} and [k for k, _ in ours["findings"]] == ["integrity", "integrity"]
    path2 = tmp_path / "crafted.img"
    path2.write_bytes(img)
    eng = Engine.mount(FileDevice(str(path2), read_only=True), read_only=True,
                       key_provider=lambda sb: bytes(32))
    try:
        assert eng.list() == [] and eng.info()["chain_head"] == ours["chain_head"].hex()
    finally:
        eng.close()
    assert sr.read_image(img, key=KEY)["state"] == {"k/1": b"one", "k/empty": b"", "k/2": b"two"}


def _run(base: bytes, scenario, tmp_path, signer=None) -> dict:
    """Both readers on the crafted image; with ``signer`` both are given its public key."""
    L = Log(base)
    scenario(L, L.t)
    path = tmp_path / "crafted.img"
    path.write_bytes(bytes(L.img))
    ours = sr.read_image(str(path), key=KEY, device_key=signer.public_key if signer else None)
    _assert_agrees(ours, _statefsd_view(str(path), signer))
    assert ours["corrupt"] == _rw_mount_refuses_as_corrupt(str(path), signer)
    return ours


@pytest.mark.parametrize("base", ["off", "parity"], ids=["redundancy-off", "redundancy-parity"])
@pytest.mark.parametrize("scenario", PLAIN, ids=lambda f: f.__name__)
def test_crafted_plaintext_log_gets_the_same_verdict_from_both(base_images, tmp_path, scenario, base):
    _run(base_images[base], scenario, tmp_path)


@pytest.mark.parametrize("with_device_key", [True, False], ids=["device-key", "no-device-key"])
@pytest.mark.parametrize("scenario", CHECKPOINTS, ids=lambda f: f.__name__)
def test_crafted_checkpoint_gets_the_same_verdict_from_both(base_images, tmp_path, scenario, with_device_key):
    _run(base_images["off"], scenario, tmp_path, SIGNER if with_device_key else None)


def test_crafted_checkpoint_scenarios_reach_what_they_are_named_for(base_images, tmp_path):
    def run(scn, signed=True):
        return _run(base_images["off"], scn, tmp_path, SIGNER if signed else None)
    for scn in (signed_checkpoint_as_its_own_group_verifies, checkpoint_header_fields_and_sealed_flag_are_ignored,
                checkpoint_need_not_be_alone_in_its_group):
        r = run(scn)
        assert not r["corrupt"] and r["verified_checkpoints"] == 1 and {"cp/1", "cp/2"} <= set(r["state"]), scn
    r = run(checkpoint_inside_a_transaction_orphans_it)
    assert [k for k, _ in r["findings"]] == ["orphan", "corruption"]
    for scn in (checkpoint_over_another_chain_head_is_corruption, checkpoint_payload_of_129_bytes_is_corruption):
        for signed in (True, False):
            r = run(scn, signed)
            assert r["corrupt"] and "cp/1" in r["state"] and "cp/2" not in r["state"], scn
    with_key, without = run(forged_checkpoint_stops_replay_only_with_the_device_key), run(
        forged_checkpoint_stops_replay_only_with_the_device_key, signed=False)
    assert with_key["corrupt"] and "cp/2" not in with_key["state"]
    assert not without["corrupt"] and without["state"]["cp/2"] == b"2" and without["checkpoints"] == 1


@pytest.mark.parametrize("scenario", SEALED, ids=lambda f: f.__name__)
def test_crafted_encrypted_log_gets_the_same_verdict_from_both(base_images, tmp_path, scenario):
    _run(base_images["on"], scenario, tmp_path)


def test_crafted_scenarios_reach_the_findings_they_are_named_for(base_images, tmp_path):
    """Guards the scenarios themselves: each one must exercise what it claims."""
    def kinds(scn, enc="off"):
        return [k for k, _ in _run(base_images[enc], scn, tmp_path)["findings"]]
    r = _run(base_images["off"], abort_burns_ids_and_closes_only_its_own_txn, tmp_path)
    assert set(r["state"]) == {"base", "ab/1", "ab/3"} and "aborted" in kinds(
        abort_burns_ids_and_closes_only_its_own_txn)
    assert _run(base_images["off"], ops_on_one_path_apply_in_list_order, tmp_path)["state"]["p"] == b"2"
    assert "orphan" in kinds(prepare_without_commit_is_an_orphan)
    r = _run(base_images["off"], chunks_of_different_ops_may_interleave, tmp_path)
    assert len(r["state"]["a"]) == len(r["state"]["b"]) == 76800
    for scn in (zeroed_group_before_valid_groups_is_corruption, repeated_txn_id_is_corruption, broken_chain_is_corruption, nul_in_path_is_corruption,
                damage_two_groups_before_a_valid_one_is_corruption):
        assert _run(base_images["off"], scn, tmp_path)["corrupt"], scn.__name__
    # With parity the single damaged byte is rebuilt, and nothing is lost.
    r = _run(base_images["parity"], damage_two_groups_before_a_valid_one_is_corruption, tmp_path)
    assert not r["corrupt"] and len(r["repaired"]) == 1 and {"g/1", "g/2", "g/3"} <= set(r["state"])
    r = _run(base_images["off"], lower_mount_gen_after_a_complete_group_is_a_stale_tail, tmp_path)
    assert r["stop_reason"] == "stale mount generation" and "stale" not in r["state"]
    r = _run(base_images["on"], tampered_ciphertext_drops_only_its_txn_and_the_chain_goes_on, tmp_path)
    assert "t/1" not in r["state"] and r["state"]["t/2"] == b"fine"
    assert kinds(tampered_ciphertext_drops_only_its_txn_and_the_chain_goes_on, "on") == ["integrity"]
