"""The one transaction rule (format.transaction_problem) at the exact edges of
every cap in docs/statefs.md section 10, and the writers and the reader that
apply it: the PREPARE decoder refuses what it refuses, the encoder will not
write it, and compaction's batcher never produces a batch that breaks it.
"""

from __future__ import annotations

import struct

import pytest

from statefsd.storage import format as fmt
from statefsd.errors import Code, InternalError

MiB = 1 << 20


def put(path: bytes | str, size: int = 0) -> fmt.Op:
    return fmt.Op(fmt.OP_PUT, path.encode() if isinstance(path, str) else path, size)


def puts(n: int, size: int = 0) -> list[fmt.Op]:
    return [put(f"k/{i}", size) for i in range(n)]


def raw_prepare(ops: list[fmt.Op], count: int | None = None) -> bytes:
    """A PREPARE payload laid out by hand from section 5.3, whatever its ops are."""
    body = struct.pack("<H", len(ops) if count is None else count)
    for op in ops:
        body += struct.pack("<BBHI", op.kind, 0, len(op.path), op.value_len) + op.path
    return body


def test_a_transaction_of_128_ops_fits_and_one_of_129_does_not():
    assert fmt.transaction_problem(puts(128)) == ""
    assert "129 operations exceed the limit of 128" in fmt.transaction_problem(puts(129))


def test_a_transaction_of_zero_ops_is_refused():
    assert fmt.transaction_problem([]) == fmt.NO_OPERATIONS


def test_values_adding_up_to_exactly_16_mib_fit_and_one_byte_more_does_not():
    exact = [put("a", 8 * MiB), put("b", 8 * MiB)]
    assert fmt.transaction_problem(exact) == ""
    assert fmt.transaction_problem(exact + [put("c", 0)]) == ""
    problem = fmt.transaction_problem(exact + [put("c", 1)])
    assert f"{16 * MiB + 1} value bytes exceeds the limit of {16 * MiB}" in problem


def test_a_value_of_8_mib_fits_and_one_byte_more_does_not():
    assert fmt.transaction_problem([put("v", 8 * MiB)]) == ""
    assert "exceeds the limit of 8388608" in fmt.transaction_problem([put("v", 8 * MiB + 1)])


def test_a_512_byte_key_fits_and_a_513_byte_key_does_not():
    assert fmt.transaction_problem([put("k" * 512)]) == ""
    assert "key of 513 bytes exceeds the limit of 512" in fmt.transaction_problem([put("k" * 513)])
    # the cap counts UTF-8 bytes, not characters
    assert fmt.transaction_problem([put("é" * 256)]) == ""
    assert fmt.transaction_problem([put("é" * 256 + "x")]) != ""


@pytest.mark.parametrize("op, why", [
    (fmt.Op(fmt.OP_PUT, b""), "empty"),
    (fmt.Op(fmt.OP_PUT, b"a\x00b"), "NUL"),
    (fmt.Op(fmt.OP_PUT, b"\xff\xfe"), "UTF-8"),
    (fmt.Op(fmt.OP_DELETE, b"gone", 1), "delete carries no value"),
    (fmt.Op(3, b"k"), "kind 3 unknown"),
])
def test_an_op_that_is_not_a_valid_put_or_delete_is_refused_with_the_reason(op, why):
    assert why in fmt.transaction_problem([put("fine"), op])


def test_the_tally_refuses_the_op_that_would_break_the_rule_and_counts_nothing_for_it():
    tally = fmt.TransactionTally(puts(127, 0))
    assert tally.problem(put("last")) == ""
    tally.add(put("last"))
    assert tally.problem() == ""
    assert "129 operations" in tally.problem(put("one too many"))
    assert tally.count == 128 and tally.problem() == ""


@pytest.mark.parametrize("ops, count, why", [
    (puts(129), None, "129 operations"),
    ([], 0, "at least one operation"),
    ([put("k" * 513)], None, "key of 513 bytes"),
    ([put("k", 8 * MiB + 1)], None, "8388608"),
    ([put("a", 8 * MiB), put("b", 8 * MiB), put("c", 1)], None, "value bytes exceeds the limit"),
    ([fmt.Op(fmt.OP_DELETE, b"d", 5)], None, "delete carries no value"),
    ([put("")], None, "must not be empty"),
])
def test_the_prepare_decoder_refuses_what_the_rule_refuses(ops, count, why):
    with pytest.raises(ValueError, match=why):
        fmt.decode_prepare(raw_prepare(ops, count))


def test_the_prepare_decoder_accepts_every_edge_the_rule_accepts():
    for ops in (puts(128), [put("k" * 512)], [put("a", 8 * MiB), put("b", 8 * MiB)]):
        assert fmt.decode_prepare(raw_prepare(ops)) == ops
        assert fmt.decode_prepare(fmt.encode_prepare(ops)) == ops


def test_the_prepare_decoder_still_refuses_malformed_bytes():
    good = raw_prepare([put("k", 1)])
    for payload, why in ((b"\x01", "too short"), (good[:-1], "runs past"), (good + b"\x00", "trailing"),
                         (good[:2] + good[2:10], "runs past"), (raw_prepare(puts(2), 3), "truncated"),
                         (good[:3] + b"\x01" + good[4:], "reserved byte")):
        with pytest.raises(ValueError, match=why):
            fmt.decode_prepare(payload)


@pytest.mark.parametrize("ops", [puts(129), [], [put("a", 8 * MiB), put("b", 8 * MiB), put("c", 1)],
                                 [put("k" * 513)]], ids=["129-ops", "zero-ops", "16MiB+1", "513-byte-key"])
def test_the_prepare_encoder_raises_an_internal_error_rather_than_write_what_the_reader_refuses(ops):
    with pytest.raises(InternalError) as caught:
        fmt.encode_prepare(ops)
    assert caught.value.code == Code.EINTERNAL


def test_three_8_mib_values_are_split_into_transactions_within_the_byte_cap():
    ops = [put(f"big/{i}", 8 * MiB) for i in range(3)]
    batches = fmt.split_into_transactions(ops)
    assert [len(b) for b in batches] == [2, 1]
    assert all(fmt.transaction_problem(b) == "" for b in batches)
    assert [op for b in batches for op in b] == ops


def test_a_split_respects_the_op_cap_the_value_budget_and_keeps_the_order():
    items = [(i, put(f"k/{i}", 1000)) for i in range(300)]
    batches = fmt.split_into_transactions(items, lambda item: item[1])
    assert [len(b) for b in batches] == [128, 128, 44]
    assert [i for b in batches for i, _ in b] == list(range(300))
    budgeted = fmt.split_into_transactions([put(f"v/{i}", 3 * MiB) for i in range(4)], value_budget=4 * MiB)
    assert [len(b) for b in budgeted] == [1, 1, 1, 1]
    # a single value over the budget still forms a batch of its own
    assert [len(b) for b in fmt.split_into_transactions([put("a", 5 * MiB), put("b", 1)],
                                                        value_budget=4 * MiB)] == [1, 1]


def test_a_split_refuses_an_op_that_fits_no_transaction():
    with pytest.raises(InternalError, match="fits no transaction"):
        fmt.split_into_transactions([put("ok"), put("k" * 513)])


def test_two_keys_that_are_each_broken_utf8_are_refused_even_though_their_bytes_together_decode():
    # b"a\xc3" + b"\xa9b" is b"a\xc3\xa9b", valid UTF-8 ("aéb"); each key alone is not.
    assert fmt.transaction_problem([put(b"a\xc3"), put(b"\xa9b")]) == "a key must be valid UTF-8"
    assert fmt.transaction_problem([put(b"a\xc3\xa9b"), put(b"ok")]) == ""


def test_the_rule_says_the_same_of_a_whole_transaction_as_when_it_is_tallied_op_by_op():
    import random

    rng = random.Random(3)
    good = [b"a", b"/", b"\xc3\xa9", b"\xf0\x9f\x98\x80", b"k" * 200]
    bad = [b"\xc3", b"\xa9", b"\x00", b"\xed\xa0\x80"]   # lead byte, continuation, NUL, surrogate
    refused = 0
    for _ in range(3000):
        ops = []
        for _ in range(rng.choice([0, 1, 2, 5, 127, 128, 129]) if rng.random() < 0.1 else rng.randint(1, 4)):
            path = b"".join(rng.choice(bad if rng.random() < 0.03 else good) for _ in range(rng.randint(0, 4)))
            kind = rng.choice([fmt.OP_PUT, fmt.OP_PUT, fmt.OP_DELETE, 7])
            size = rng.choice([0, 0, 1, 8 * MiB, 8 * MiB + 1]) if kind != fmt.OP_DELETE or rng.random() < 0.1 else 0
            ops.append(fmt.Op(kind, path, size))
        expected = fmt.TransactionTally(ops).problem()
        assert fmt.transaction_problem(ops) == expected, ops
        refused += bool(expected)
    assert 300 < refused < 2700   # both answers were exercised
