"""Conditional commits (rule C9 in statefsd/storage/engine.py): the commit
leader checks each request's expected txn ids in group order, on a real
image file with real threads meeting in one write group."""

import threading

import pytest

from statefsd.errors import Conflict, InvalidArgument, NotFound, TooBig
from statefsd.storage import format as fmt
from statefsd.storage.blockdev import FileDevice
from statefsd.storage.engine import Engine, Mutation
from statefsd.testing.campaign.systems import DeviceProxy

from tests.engine.conftest import Image


class HeldFlush(DeviceProxy):
    """A disk whose next flush, once armed, waits until released: the commits
    queued meanwhile become the next leader's one group, in queue order."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.armed = threading.Event()
        self.holding = threading.Event()
        self.release = threading.Event()

    def flush(self) -> None:
        if self.armed.is_set():
            self.armed.clear()
            self.holding.set()
            assert self.release.wait(30), "the test never released the flush"
        self.inner.flush()


def put(path, value=b"v"):
    return Mutation("put", path, value)


class OneGroup:
    """Commits started one after another while a blocker's flush is held,
    so that they queue in this order and are written as one group."""

    def __init__(self, image: Image) -> None:
        self.device = HeldFlush(FileDevice(image.path))
        self.engine = Engine.mount(self.device)
        self.threads: list[threading.Thread] = []
        self.results: dict[str, object] = {}

    def hold(self) -> None:
        self.device.armed.set()
        self._start("blocker", [put("blocker")], ())
        assert self.device.holding.wait(10)

    def queue(self, name: str, mutations, expect=()) -> None:
        before = self.engine.role.queued
        self._start(name, mutations, expect)
        for _ in range(1000):
            if self.engine.role.queued > before:
                return
            threading.Event().wait(0.01)
        raise AssertionError(f"commit {name} never queued")

    def write(self) -> dict[str, object]:
        self.device.release.set()
        for t in self.threads:
            t.join(30)
        return self.results

    def _start(self, name, mutations, expect) -> None:
        def run():
            try:
                self.results[name] = self.engine.commit(mutations, expect)
            except Exception as exc:   # the outcome under test, kept for the assertions
                self.results[name] = exc

        thread = threading.Thread(target=run)
        self.threads.append(thread)
        thread.start()


@pytest.fixture
def engine(image):
    with image.mount() as e:
        yield e


def test_a_condition_on_a_key_written_earlier_in_the_same_group_fails_while_an_unrelated_request_commits(image):
    with image.mount() as e:
        read_txn = e.put("x", b"old")
    group = OneGroup(image)
    try:
        group.hold()
        group.queue("writer", [put("x", b"new")])
        group.queue("stale", [put("y")], expect=[("x", read_txn)])
        group.queue("unrelated", [put("z")], expect=[("z", 0)])
        results = group.write()
        writer, stale, unrelated = results["writer"], results["stale"], results["unrelated"]
        assert isinstance(stale, Conflict), results
        assert stale.message == (f"key 'x' changed: expected txn {read_txn}, it is now txn {writer}; "
                                 f"nothing was written")
        assert unrelated == writer + 1   # same group, and the refused request took no txn id
        engine = group.engine
        assert engine.get_versioned("x") == (b"new", writer)
        assert engine.get_versioned("z") == (b"v", unrelated)
        with pytest.raises(NotFound):
            engine.get("y")
    finally:
        group.engine.close()
    with image.mount() as e:   # what was acknowledged is what replay finds
        assert e.get_many(["x", "y", "z"]) == [(b"new", writer), None, (b"v", unrelated)]


def test_a_request_deferred_to_the_next_group_is_checked_when_that_group_is_written(image, monkeypatch):
    # A full group defers the rest of the queue: a condition checked before
    # the deferral would miss the write of the group it waited behind.
    monkeypatch.setattr(fmt, "MAX_GROUP_BYTES", 16 << 10)
    group = OneGroup(image)
    try:
        group.hold()
        group.queue("creator", [put("x", bytes(12 << 10))])
        group.queue("deferred", [put("y", bytes(12 << 10))], expect=[("x", 0)])
        results = group.write()
        assert isinstance(results["deferred"], Conflict), results
        assert f"expected it absent, it exists (txn {results['creator']})" in results["deferred"].message
        assert group.engine.list() == ["blocker", "x"]
    finally:
        group.engine.close()


def test_expecting_an_existing_key_to_be_absent_is_a_conflict_and_writes_nothing(engine):
    txn = engine.put("k", b"1")
    with pytest.raises(Conflict) as err:
        engine.commit([put("k", b"2"), put("other")], expect=[("k", 0)])
    assert err.value.message == f"key 'k' changed: expected it absent, it exists (txn {txn}); nothing was written"
    assert engine.get_versioned("k") == (b"1", txn)
    assert engine.list() == ["k"]


def test_a_condition_holds_while_nothing_changed_and_the_first_failing_key_is_named(engine):
    a = engine.put("a", b"1")
    b = engine.commit([put("b")], expect=[("b", 0), ("a", a)])
    assert engine.get_versioned("b") == (b"v", b)
    engine.delete("a")
    with pytest.raises(Conflict) as err:
        engine.commit([put("c")], expect=[("b", b), ("a", a), ("b", 1)])
    assert err.value.message == f"key 'a' changed: expected txn {a}, it is absent; nothing was written"
    assert engine.commit([put("a", b"again")], expect=[("a", 0), ("b", b)]) > b


def test_a_compaction_between_read_and_commit_gives_a_conflict_never_a_wrong_success(engine):
    engine.put("counter", b"1")
    value, read_txn = engine.get_versioned("counter")
    engine.compact()
    _, copied_txn = engine.get_versioned("counter")
    assert copied_txn > read_txn   # the copy has a fresh id, which the reader never saw
    with pytest.raises(Conflict) as err:
        engine.commit([put("counter", b"2")], expect=[("counter", read_txn)])
    assert f"it is now txn {copied_txn}" in err.value.message
    assert engine.get("counter") == b"1"
    # Read again, then the condition holds.
    assert engine.commit([put("counter", b"2")], expect=[("counter", copied_txn)]) > copied_txn


def test_txn_ids_read_before_a_remount_still_match_after_it(image):
    with image.mount() as e:
        txn = e.put("k", b"1")
    with image.mount() as e:
        assert e.get_versioned("k") == (b"1", txn)
        assert e.commit([put("k", b"2")], expect=[("k", txn)]) > txn


@pytest.mark.parametrize("expect, error, words", [
    ([("", 1)], InvalidArgument, "condition 0: a key must be a non-empty string"),
    ([("a", 1), ("k" * (fmt.MAX_KEY_BYTES + 1), 1)], TooBig, "condition 1: "),
    ([("a", -1)], InvalidArgument, "condition 0 on key 'a': the expected txn id must be an integer >= 0"),
    ([("a", True)], InvalidArgument, "got bool"),
    ([("a", "5")], InvalidArgument, "got str"),
    ([("a",)], InvalidArgument, "condition 0 must be a (key, txn id) pair, got 1 items"),
    ([("a", 1)] * (fmt.MAX_TXN_CONDITIONS + 1), TooBig,
     f"{fmt.MAX_TXN_CONDITIONS + 1} conditions exceed the limit of {fmt.MAX_TXN_CONDITIONS}"),
])
def test_malformed_conditions_are_refused_before_anything_is_written(engine, expect, error, words):
    with pytest.raises(error) as err:
        engine.commit([put("a")], expect=expect)
    assert words in err.value.message
    assert engine.list() == []


def test_as_many_conditions_as_the_limit_are_checked(engine):
    expect = [(f"absent/{n}", 0) for n in range(fmt.MAX_TXN_CONDITIONS)]
    assert engine.commit([put("a")], expect=expect) > 0


def test_conditions_without_an_op_are_refused_rather_than_ignored(engine):
    with pytest.raises(InvalidArgument) as err:
        engine.commit([], expect=[("a", 0)])
    assert "needs at least one put or delete" in err.value.message


def test_get_many_answers_in_order_with_none_for_missing_keys(engine):
    a = engine.put("a", b"1")
    b = engine.put("b", b"22")
    assert engine.get_many(["b", "missing", "a", "b"]) == [(b"22", b), None, (b"1", a), (b"22", b)]
    with pytest.raises(InvalidArgument):
        engine.get_many(["a", ""])


def test_get_many_stops_before_the_value_that_would_pass_its_byte_budget(engine):
    for name in "abc":
        engine.put(name, bytes(100))
    assert [v and v[1] > 0 for v in engine.get_many(["a", "none", "b", "c"], max_bytes=250)] == [True, None, True]
    # A first value bigger than the budget is still given: a caller always makes progress.
    assert len(engine.get_many(["a", "b"], max_bytes=10)) == 1
    assert engine.get_many(["none", "a"], max_bytes=10)[0] is None
