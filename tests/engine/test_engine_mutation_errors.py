"""A refused commit names the first thing wrong with it, in op order, with
the error class and text a single bad op gets: the engine checks a
transaction's keys all at once and only walks its ops one by one when that
check refuses, and the answer must not depend on which way it went."""

from __future__ import annotations

import pytest

from statefsd.errors import InvalidArgument, StateFSError, TooBig
from statefsd.storage.engine import Mutation, mutation_op

GOOD = Mutation("put", "ok/key", b"v")
BAD = [
    (Mutation("put", "", b"v"), InvalidArgument, "a key must be a non-empty string"),
    (Mutation("put", b"bytes-key", b"v"), InvalidArgument, "a key must be a non-empty string"),
    (Mutation("put", "nul\x00key", b"v"), InvalidArgument, "a key must not contain NUL"),
    (Mutation("put", "bad\udcffkey", b"v"), InvalidArgument, "a key must be valid UTF-8"),
    (Mutation("put", "k" * 513, b"v"), TooBig, "key of 513 bytes exceeds the limit of 512"),
    (Mutation("rename", "ok/other", b""), InvalidArgument, "unknown operation 'rename'"),
    (Mutation("put", "ok/text-value", "text"), TypeError, ""),
]


@pytest.fixture
def engine(image):
    with image.mount() as e:
        yield e


def _error(engine, mutations) -> BaseException:
    with pytest.raises((StateFSError, TypeError)) as err:
        engine.commit(mutations)
    return err.value


@pytest.mark.parametrize("bad, kind, text", BAD, ids=[repr(m)[:40] for m, _, _ in BAD])
def test_a_bad_op_gets_its_own_error_wherever_it_stands_and_whatever_follows_it(engine, bad, kind, text):
    alone = _error(engine, [bad])
    assert isinstance(alone, kind) and text in str(alone)
    for others in ([GOOD] * 99, [Mutation("put", "nul\x00later", b"")], [Mutation("put", "", b"")]):
        found = _error(engine, [GOOD, GOOD, bad] + others)
        assert type(found) is type(alone) and str(found) == str(alone)
    with pytest.raises(type(alone)):
        mutation_op(bad)   # a streamed transaction's op gets the same
    assert engine.list("ok/") == []


def test_a_transaction_of_good_ops_over_the_op_cap_is_too_big_and_writes_nothing(engine):
    with pytest.raises(TooBig, match="129 operations exceed the limit of 128"):
        engine.commit([Mutation("put", f"ok/{i}", b"") for i in range(129)])
    assert engine.list("ok/") == []
    assert engine.commit([Mutation("put", f"ok/{i}", b"") for i in range(128)]) > 0
